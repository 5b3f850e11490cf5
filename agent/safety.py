"""The safety gate: every command passes here before it reaches a driver.

Rules, each named in a refusal:
- ``area``: scans (their whole field) and parks stay inside the allowed square of the specimen;
- ``fov`` / ``pixels`` / ``dwell`` / ``park_dwell`` / ``park``: instrument limits, the device's
  capabilities merged with the run's ``safety`` section (the stricter wins;
  :class:`stemagent.limits.InstrumentLimits`; a refusal says when the device's limit decided);
- ``dose``: the dose map (:class:`stemagent.dose.DoseMap`, an upper bound of the dose at every
  place) may not go past the dose budget anywhere the command's scan, flyback or park reaches.
  The map also holds the dose of an unblanked beam resting where the last command ended (or
  that could not be blanked), counted until a blank is confirmed;
- ``rate``: at most ``max_commands_per_s`` commands within any one-second window.

Dose is predicted before a command runs (:meth:`SafetyGate.check`, :meth:`SafetyGate.record`)
and reconciled after (:meth:`SafetyGate.reconcile`) with the dose the frame or park reports:
a report above the prediction by more than ``dose_tolerance`` raises the accounted dose to the
report, raises the beam current the gate assumes in proportion, and comes back as the
``dose_reported`` verdict on which the agent pauses. A beam current reported by the device
(:meth:`SafetyGate.set_beam_current`) replaces the assumed one. The watchdog (no reply within
the expected time plus ``watchdog_s``) is enforced by the agent's timeouts on every driver call.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from stemagent import dose
from stemagent.config import RunConfig, SafetyConfig
from stemagent.limits import InstrumentLimits
from stemagent.types import BeamCommand, Capabilities, Park, ScanGeometry, ScanRegion

MAX_CELLS = 1024


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    rule: str = ""
    detail: str = ""


ALLOW = Verdict(True)


@dataclass(frozen=True)
class Prediction:
    """What :meth:`SafetyGate.record` accounted for a command (kept to reconcile it after)."""

    kind: str
    footprint: dose.Footprint
    beam_current_pA: float


NOTHING = Prediction("blank", dose.Footprint(dose.EMPTY, 0.0, 0.0, None), 0.0)


def site_limits(config: SafetyConfig) -> InstrumentLimits:
    """The instrument limits a run's ``safety`` section sets."""
    return InstrumentLimits.site(max_fov_A=config.max_fov_A, max_shape_px=config.max_shape_px, min_dwell_s=config.min_dwell_s,
                                 max_dwell_s=config.max_dwell_s, max_park_s=config.max_park_s)


class SafetyGate:
    """``capabilities``: the device's; its limits (and probe, when narrower) are merged with the
    site's, the stricter winning."""

    def __init__(self, config: SafetyConfig, beam_current_pA: float, probe_fwhm_A: float | None = None,
                 capabilities: Capabilities | None = None) -> None:
        self.config = config
        self.limits = site_limits(config)
        if capabilities is not None:
            self.limits = self.limits.stricter(InstrumentLimits.of_capabilities(capabilities))
            if probe_fwhm_A is None:
                probe_fwhm_A = capabilities.probe_fwhm_A
        self.beam_current_pA = float(beam_current_pA)
        self.dose_budget_e_per_A2 = float(config.dose_budget_e_per_A2)
        # the narrower probe (the higher peak density) of the config's and the device's
        self.probe_fwhm_A = float(config.probe_fwhm_A if probe_fwhm_A is None else min(config.probe_fwhm_A, probe_fwhm_A))
        self.probe_reach_A = dose.probe_reach_A(self.probe_fwhm_A)
        # the map covers the allowed area plus a probe's reach, in whole cells (so cell edges fall
        # on the area's centre lines)
        margin = math.ceil((self.probe_reach_A + config.dose_cell_A) / config.dose_cell_A) * config.dose_cell_A
        self.map = dose.DoseMap(config.area_center_A, config.area_half_width_A + margin, config.dose_cell_A, MAX_CELLS)
        self._recent: deque[float] = deque()
        self._beam_on: tuple[float, tuple[float, float]] | None = None  # (since, where) while unblanked and idle

    # --- geometry --------------------------------------------------------------------------
    def in_area(self, xy: np.ndarray) -> bool:
        c = np.asarray(self.config.area_center_A)
        return bool(np.all(np.abs(np.asarray(xy).reshape(-1, 2) - c) <= self.config.area_half_width_A + 1e-9))

    @staticmethod
    def field_corners(g: ScanGeometry) -> np.ndarray:
        """The four corners (x, y) of the scanned field (pixel edges, not centres)."""
        rows, cols = g.shape_px
        rc = np.array([[-0.5, -0.5], [-0.5, cols - 0.5], [rows - 0.5, -0.5], [rows - 0.5, cols - 0.5]])
        return g.pixel_to_sample(rc)

    # --- dose ------------------------------------------------------------------------------
    def footprint(self, cmd: BeamCommand) -> dose.Footprint:
        """The predicted dose of ``cmd`` at the current beam current (not yet accounted)."""
        if isinstance(cmd, ScanRegion):
            return dose.scan_footprint(self.map, cmd.geometry, self.beam_current_pA, self.probe_fwhm_A,
                                       flyback_blanked=self.config.flyback_blanked)
        if isinstance(cmd, Park):
            return dose.park_footprint(self.map, cmd.position_A, cmd.dwell_s, self.beam_current_pA, self.probe_fwhm_A)
        return NOTHING.footprint

    def _flush_idle(self, now_s: float) -> None:
        """Account for the unblanked beam resting where the last command ended, up to ``now_s``.

        That dose has been delivered (or may have been: a beam that could not be blanked is
        counted as on): it goes into the map and is never a reason to refuse the next command."""
        if self._beam_on is None:
            return
        since, where = self._beam_on
        t = now_s - since
        if t > 0:
            d = dose.park_dose_e_per_A2(self.beam_current_pA, t, self.probe_fwhm_A)
            self.map.add(dose.combine((self.map.disk(where, self.probe_reach_A), d)))
            self._beam_on = (now_s, where)

    @property
    def peak_dose_e_per_A2(self) -> float:
        """The most dose any place has received so far (an upper bound), e/Å²."""
        return self.map.peak

    # --- the gate ------------------------------------------------------------------------------
    def check(self, cmd: BeamCommand, now_s: float) -> Verdict:
        """Decide whether ``cmd`` may be sent now. Does not record it; call :meth:`record` after sending."""
        cfg = self.config
        if cmd.kind == "blank":
            return ALLOW  # blanking is always allowed
        window = [t for t in self._recent if now_s - t < 1.0]
        if len(window) >= cfg.max_commands_per_s:
            return Verdict(False, "rate", f"{len(window)} commands in the last second; limit max_commands_per_s={cfg.max_commands_per_s}")
        if isinstance(cmd, ScanRegion):
            g = cmd.geometry
            over = self.limits.check_scan(g)
            if over is not None:
                return Verdict(False, *over)
            if not self.in_area(self.field_corners(g)):
                return Verdict(False, "area", f"scan centred at {tuple(round(v, 3) for v in g.center_A)} Å with fov {g.fov_A} Å "
                                              f"leaves the allowed area (centre {cfg.area_center_A}, half width {cfg.area_half_width_A} Å)")
        elif isinstance(cmd, Park):
            over = self.limits.check_park(cmd.dwell_s)
            if over is not None:
                return Verdict(False, *over)
            if not self.in_area(np.asarray(cmd.position_A)):
                return Verdict(False, "area", f"park position {cmd.position_A} Å is outside the allowed area")
        self._flush_idle(now_s)
        worst = self.map.peak_with(self.footprint(cmd).increment)
        if worst > self.dose_budget_e_per_A2:
            return Verdict(False, "dose", f"dose would reach {worst:.3g} e/Å² > budget {self.dose_budget_e_per_A2:.3g} e/Å² "
                                          f"(beam current {self.beam_current_pA:.4g} pA)")
        return ALLOW

    def record(self, cmd: BeamCommand, now_s: float) -> Prediction:
        """Account for a command that is being sent: its predicted dose and the idle dose before it."""
        if cmd.kind == "blank":
            return NOTHING
        self._flush_idle(now_s)
        self._beam_on = None  # the beam is busy with the command until :meth:`finished`
        self._recent.append(now_s)
        while self._recent and now_s - self._recent[0] >= 1.0:
            self._recent.popleft()
        fp = self.footprint(cmd)
        self.map.add(fp.increment)
        return Prediction(cmd.kind, fp, self.beam_current_pA)

    def cancel(self, prediction: Prediction) -> None:
        """The device refused the command: take its predicted dose back out of the map."""
        self.map.add(prediction.footprint.increment.scaled(-1.0))
        np.maximum(self.map.values, 0.0, out=self.map.values)
        self._beam_on = None

    def finished(self, prediction: Prediction, now_s: float) -> None:
        """The command ended at ``now_s`` and the beam rests where it left it until :meth:`blanked`."""
        if prediction.footprint.end_position_A is not None:
            self._beam_on = (now_s, prediction.footprint.end_position_A)

    def blanked(self, now_s: float) -> None:
        """The beam was blanked at ``now_s``: account for its idle time and stop counting."""
        self._flush_idle(now_s)
        self._beam_on = None

    def reconcile(self, prediction: Prediction, reported_e_per_A2: float) -> Verdict:
        """Compare the dose a frame or park reports with the prediction.

        Within ``dose_tolerance`` (or nothing reported): ``ALLOW``. Above it: the difference is
        added to the map (scaled to the same footprint), the beam current the gate assumes grows
        by the same factor, and the ``dose_reported`` verdict says why the run must pause.
        """
        predicted = prediction.footprint.reported_e_per_A2
        if predicted <= 0 or not math.isfinite(reported_e_per_A2) or reported_e_per_A2 <= predicted * (1.0 + self.config.dose_tolerance):
            return ALLOW
        ratio = reported_e_per_A2 / predicted
        self.map.add(prediction.footprint.increment.scaled(ratio - 1.0))
        # the current that explains the report; never lowered by a frame
        self.beam_current_pA = max(self.beam_current_pA, prediction.beam_current_pA * ratio)
        return Verdict(
            False,
            "dose_reported",
            f"the {prediction.kind} reported {reported_e_per_A2:.3g} e/Å², {ratio:.3g}x the predicted {predicted:.3g} e/Å² "
            f"(tolerance {self.config.dose_tolerance:.0%}); assuming beam current {self.beam_current_pA:.4g} pA from now on",
        )

    def set_beam_current(self, beam_current_pA: float, now_s: float | None = None) -> bool:
        """Adopt the current a device reports (from ``now_s``: idle time before it is counted at
        the old current); returns whether it changed."""
        if not (math.isfinite(beam_current_pA) and beam_current_pA >= 0):
            raise ValueError(f"beam_current_pA={beam_current_pA!r}: must be a non-negative number of pA")
        if now_s is not None:
            self._flush_idle(now_s)
        changed = not math.isclose(beam_current_pA, self.beam_current_pA, rel_tol=1e-9)
        self.beam_current_pA = float(beam_current_pA)
        return changed

    def set_dose_budget(self, value_e_per_A2: float, *, confirm: bool = False) -> None:
        """Change the budget. A budget below the dose already delivered is refused unless ``confirm``."""
        if not (math.isfinite(value_e_per_A2) and value_e_per_A2 > 0):
            raise ValueError(f"value={value_e_per_A2!r}: dose budget must be a positive number of e/Å²")
        if value_e_per_A2 < self.peak_dose_e_per_A2 and not confirm:
            raise ValueError(
                f"value={value_e_per_A2:.4g}: below the {self.peak_dose_e_per_A2:.4g} e/Å² already delivered; "
                "send confirm=true to set it anyway (every further beam command will be refused)"
            )
        self.dose_budget_e_per_A2 = float(value_e_per_A2)


def preflight(cfg: RunConfig) -> tuple[Verdict, str]:
    """The run's initial scan through a fresh gate, as the run will do first.

    The dose rule needs the beam current: a simulated device's config says it; for a real
    device it comes from the device at start, so the dose rule is left to the run (the note
    says so)."""
    current = getattr(cfg.driver, "beam_current_pA", None)
    note = "" if current is not None else "dose not checked: the beam current comes from the device when the run starts"
    gate = SafetyGate(cfg.safety, beam_current_pA=float(current or 0.0))
    return gate.check(ScanRegion(cfg.scan.geometry()), 0.0), note
