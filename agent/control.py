"""Operator control messages (from MQTT or the console) and their acknowledgements.

A message is validated strictly (:meth:`ControlMessage.from_json`): no coercion of booleans or
strings to numbers, finite numbers only, no unknown fields. What a message asks is checked
again by the agent against the run (a target inside the allowed area, a budget not below the
dose already delivered unless ``confirm`` is true) and every message, accepted or refused, is
answered with a :class:`ControlAck` and logged with its values.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

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
