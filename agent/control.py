"""Operator control messages (from MQTT or the console) and their acknowledgements.

A message is validated strictly (:meth:`ControlMessage.from_json`): no coercion of booleans or
strings to numbers, finite numbers only, no unknown fields. What a message asks is checked
again by the agent against the run (a target inside the allowed area, a budget not below the
dose already delivered unless ``confirm`` is true) and every message, accepted or refused, is
answered with a :class:`ControlAck` and logged with its values.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stemagent.errors import shown

#: the largest control request read (MQTT payload or HTTP body), bytes
MAX_CONTROL_BYTES = 64 * 1024

Command = Literal["pause", "resume", "stop", "abort", "set_target", "set_dose_budget"]


class ControlMessage(BaseModel):
    """One control request. ``set_target`` takes ``target_A`` (x, y, Å); ``set_dose_budget`` takes
    ``value`` (e/Å²) and, to set a budget below the dose already delivered, ``confirm: true``."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    version: Literal[1] = 1
    command: Command
    id: str | None = Field(None, max_length=128)
    value: float | None = None
    target_A: tuple[float, float] | None = None
    confirm: bool = False
    reason: str = Field("", max_length=500)

    @classmethod
    def from_json(cls, raw: bytes | str) -> "ControlMessage":
        """Validate a JSON control message strictly (raises ``pydantic.ValidationError``)."""
        return cls.model_validate_json(raw)

    def arguments(self) -> dict[str, Any]:
        """The values the message carries (for the log and for replay)."""
        out: dict[str, Any] = {}
        if self.value is not None:
            out["value"] = self.value
        if self.target_A is not None:
            out["target_A"] = list(self.target_A)
        if self.confirm:
            out["confirm"] = True
        return out


class ControlAck(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    id: str | None = None
    command: str
    accepted: bool
    state: str
    detail: str = ""


class InvalidControl(ValueError):
    """A control request that is not a valid :class:`ControlMessage`; ``msg_id`` and ``command``
    name it as far as it can be read (for the refusal's acknowledgement)."""

    def __init__(self, msg_id: str | None, command: str, detail: str) -> None:
        super().__init__(f"invalid control message: {detail}")
        self.msg_id = msg_id
        self.command = command
        self.detail = detail


def read_control(payload: Any) -> ControlMessage:
    """Validate one raw control request (bytes or text) strictly, the same way for every channel
    (MQTT, the live view). Raises :class:`InvalidControl` naming the field and the value."""
    raw = payload if isinstance(payload, (bytes, bytearray)) else str(payload).encode()
    msg_id: str | None = None
    command = "<invalid>"
    try:
        if len(raw) > MAX_CONTROL_BYTES:
            raise ValueError(f"control message of {len(raw)} bytes exceeds {MAX_CONTROL_BYTES}")
        try:  # only to name the request in a refusal; validation below is strict
            data = json.loads(bytes(raw))
        except (ValueError, RecursionError):
            data = None
        if isinstance(data, dict):
            msg_id = data.get("id") if isinstance(data.get("id"), str) else None
            msg_id = msg_id[:128] if msg_id is not None else None
            command = str(data.get("command", command))[:64]
        return ControlMessage.from_json(bytes(raw))
    except (ValueError, ValidationError, RecursionError) as exc:
        raise InvalidControl(msg_id, command, explain(exc)) from None


def explain(exc: BaseException) -> str:
    """One line for why a control request is invalid: the field, the value, the rule."""
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err.get("loc", ())) or "<message>"
        if err.get("type") == "json_invalid":
            return f"not valid JSON ({err.get('msg')})"
        return f"{loc}={shown(err.get('input'))}: {err.get('msg')}"
    if isinstance(exc, RecursionError):
        return "JSON nested too deeply"
    return str(exc)
