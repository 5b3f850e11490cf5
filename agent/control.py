"""Operator control messages (from MQTT or the console) and their acknowledgements."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

CONTROL_VERSION = 1


class ControlMessage(BaseModel):
    """One control request. ``set_target`` takes ``target_A``; ``set_dose_budget`` takes ``value`` (e/Å²)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = 1
    command: Literal["pause", "resume", "stop", "abort", "set_target", "set_dose_budget"]
    id: str | None = Field(None, max_length=128)
    value: float | None = None
    target_A: tuple[float, float] | None = None
    reason: str = Field("", max_length=500)


class ControlAck(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    id: str | None = None
    command: str
    accepted: bool
    state: str
    detail: str = ""
