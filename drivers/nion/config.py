"""The Nion backend's options: the bridge config's ``adapter_options`` (validated, ``extra="forbid"``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from stemagent.config import TwinConfig


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class UsimConfig(_Model):
    """A headless Nion simulated microscope (nionswift-usim) started inside the bridge process."""

    generator: Literal["twin", "sample"] = Field(
        "twin", description="what the simulated scan shows: the stemagent twin, or one of usim's own samples")
    twin: TwinConfig = Field(default_factory=TwinConfig, description="the twin rendered through usim (generator: twin)")
    sample_index: int = Field(0, ge=0, le=2, description="usim's own sample (generator: sample): 0 flakes, 1 amorphous, 2 test")
    seed: int = Field(0, ge=0, description="seed of the twin's specimen, drift and noise")


class NionConfig(_Model):
    """How the bridge reaches Nion Swift's scan hardware source and STEM controller."""

    mode: Literal["usim", "swift"] = Field(
        "usim", description="usim: start a headless simulated microscope here; swift: use the instrument Swift runs")
    usim: UsimConfig = Field(default_factory=UsimConfig)
    scan_device_id: str = Field("usim_scan_device", min_length=1, description="hardware source id of the scan device")
    channel: str = Field("HAADF", min_length=1, description="the scan channel (detector) the frames come from")
    blank_control: str = Field("C_Blank", min_length=1, description="STEM controller control: 1 blanks, 0 unblanks")
    beam_current_control: str = Field("BeamCurrent", min_length=1, description="STEM controller control with the probe current, A")
    energy_control: str = Field("EHT", min_length=1, description="STEM controller control with the high tension, V")
    beam_current_pA: float | None = Field(None, gt=0, le=1e5, description="use this current instead of reading the control")
    beam_energy_keV: float | None = Field(None, gt=0, le=1000, description="use this energy instead of reading the control")
    probe_fwhm_A: float | None = Field(None, gt=0, le=50, description="the probe's FWHM if known (the twin's, in usim twin mode)")
    max_fov_A: float | None = Field(None, gt=0, description="tighter than the device's own maximum field of view")
    max_shape_px: int = Field(4096, ge=1, le=16384, description="largest rows/cols to scan (Nion does not report one)")
    min_dwell_s: float = Field(1e-7, gt=0, description="shortest pixel time to scan (Nion does not report one)")
    max_dwell_s: float = Field(1e-2, gt=0, description="longest pixel time to scan")
    call_timeout_s: float = Field(30.0, gt=0, le=3600, description="margin beyond a scan's or park's own duration")
    stop_view: bool = Field(True, description="stop Swift's live view before the agent's first scan")
