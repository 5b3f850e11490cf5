"""The drift stage in the agent's pipeline: sample-frame atoms in, beam-frame commands out.

:class:`DriftLoopStage` (stage name ``drift``, after ``segment``) wraps a
:class:`~stemagent.drift.stage.DriftStage` for :class:`~stemagent.pipeline.Pipeline`:

- ``process(obs)``: updates the drift model from the frame's atoms (each at its own pixel
  time), and replaces ``obs.atoms`` by their sample-frame positions and ``obs.geometry`` by the
  field in the sample frame (the sample-frame scan the agent asked for, when the frame came
  from one of this stage's conversions; otherwise the frame's geometry less the estimated drift
  at its mid-time). ``obs.drift`` is the :class:`~stemagent.drift.estimate.DriftEstimate`;
  ``obs.records["drift"]`` a short summary (the agent logs the whole estimate in its ``drift``
  stream). Policies therefore decide in the sample frame only.
- ``to_device(command, start_s)``: the agent calls it on every command right before the safety
  gate, with the time the command will start; the command is converted to beam coordinates
  with the forecast at its execution time (a park at its start, a scan's centre at its
  mid-time; :mod:`~stemagent.drift.commands`). The gate then checks the converted command.
- When the estimate cannot place the beam (no reference yet, tracking lost, the forecast's
  95% band wider than ``band_limit_A``, the last frame had too few atoms, or its update failed),
  a **park** is not sent: the stage re-acquires the reference field instead (the last field
  that informed the model, converted with the forecast) and says why in the command's record
  (``replaced``), which the agent logs as an interruption. Scans always go, converted with the
  best forecast there is: a scan is how the estimate recovers.
- **Refits off the frame path**: with ``background_refit`` a hyperparameter refit that falls
  due on frame ``k`` runs on a copy of the GP in this stage's own worker thread while the
  policy decides and the next frames are acquired; the result is adopted at the start of frame
  ``k + refit_adopt_after_frames``'s update (default 2; waiting for it there if it is not
  done). At most one refit is in flight.
  The schedule is therefore fixed by the frames, not by timing, so a replay of the run log
  reproduces every estimate.

Thread safety: ``process`` runs in the agent's analysis executor, ``to_device`` on its event
loop (concurrently with analysis when the agent streams); a lock serialises them.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections import deque
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from stemagent.codec import decode_command, encode_command
from stemagent.drift.commands import to_beam_command
from stemagent.drift.estimate import DriftEstimate
from stemagent.drift.stage import DriftStage
from stemagent.errors import InputError
from stemagent.stages import Observation
from stemagent.types import BeamCommand, Blank, Frame, Park, ScanGeometry, ScanRegion

#: how many recent scan conversions are remembered to map a frame back to the sample-frame scan
_CONVERSIONS_KEPT = 16


class DriftLoopStage:
    """``drift`` stage of the pipeline around ``stage`` (see the module docstring)."""

    name = "drift"
    stream = "drift"  # the run log's stream of this stage's per-frame estimates (Pipeline.documents)

    def __init__(self, stage: DriftStage, *, background_refit: bool = True) -> None:
        self.stage = stage
        self._lock = threading.Lock()
        self._refits: concurrent.futures.ThreadPoolExecutor | None = None
        if background_refit:
            # the stage's update must not refit itself: it only marks a refit due
            if stage.config.refit_in_update:
                stage.config = stage.config.model_copy(update={"refit_in_update": False})
            self._refits = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="stemagent-drift-refit")
        self._pending: concurrent.futures.Future[dict[str, torch.Tensor]] | None = None
        self._pending_frames = 0  # frames processed since the pending refit was submitted
        self._last: DriftEstimate | None = None
        self._failed = ""  # why the last update did not finish ("" when it did)
        self._reference_geometry: ScanGeometry | None = None  # sample-frame field of the last frame the model used
        self._last_geometry: ScanGeometry | None = None  # sample-frame field of the last frame
        self._conversions: deque[tuple[ScanGeometry, ScanGeometry]] = deque(maxlen=_CONVERSIONS_KEPT)

    # --- frames ----------------------------------------------------------------------------------
    def process(self, obs: Observation) -> Observation:
        frame = obs.frame
        assert frame is not None
        adopted_ms = self._adopt_refit()
        with self._lock:
            self._failed = f"the drift update of frame {frame.index} failed"
            _check_positions(obs.atoms.positions_A)
            est = self.stage.update(frame, obs.atoms)
            self._failed = ""
            self._last = est
            geometry = self._sample_geometry(frame, est)
            self._last_geometry = geometry
            if est.used:
                self._reference_geometry = geometry
            if est.refit_due and self._refits is not None:
                self._submit_refit()
        if adopted_ms is not None:
            est.refit, est.fit_ms = True, adopted_ms
        obs.drift = est
        obs.atoms = est.atoms
        obs.geometry = geometry
        obs.records[self.name] = {
            "status": est.status,
            "reason": est.reason,
            "reference_id": int(est.reference_id),
            "n_detected": int(est.n_detected),
            "n_matched": int(est.n_matched),
            "band95_A": est.to_dict()["band95_A"],
            "refit": bool(est.refit),
            "sample_center_A": [float(v) for v in geometry.center_A],
        }
        return obs

    def log_document(self, obs: Observation) -> dict[str, Any] | None:
        """The ``drift`` stream's document for a frame: the estimate and its band (none for a park)."""
        if obs.kind != "frame" or obs.drift is None or not hasattr(obs.drift, "to_dict"):
            return None
        return dict(obs.drift.to_dict())

    def _sample_geometry(self, frame: Frame, est: DriftEstimate) -> ScanGeometry:
        """The frame's field in the sample frame: the converted scan it came from, else its
        geometry less the estimated drift at its mid-time."""
        for beam, sample in reversed(self._conversions):
            if beam == frame.geometry:
                return sample
        if len(est.times_s) == 0 or est.status == "disabled":
            return frame.geometry
        t_mid = 0.5 * (frame.start_time_s + frame.end_time_s)
        d = [float(np.interp(t_mid, est.times_s, est.displacement_A[:, ax])) for ax in range(2)]
        c = frame.geometry.center_A
        return replace(frame.geometry, center_A=(float(c[0]) - d[0], float(c[1]) - d[1]))

    # --- refits ----------------------------------------------------------------------------------
    def _submit_refit(self) -> None:
        assert self._refits is not None
        if self._pending is None:
            self._pending = self._refits.submit(self.stage.refit_job())
            self._pending_frames = 0

    def _adopt_refit(self) -> float | None:
        """Apply the refit submitted ``refit_adopt_after_frames`` frames ago (waiting for it if it
        is not done); its time in ms, or None (none pending, or not yet its frame)."""
        if self._pending is None:
            return None
        self._pending_frames += 1
        if self._pending_frames < self.stage.config.refit_adopt_after_frames:
            return None
        pending, self._pending = self._pending, None
        raw = pending.result()  # a failed refit raises here: the stage's error, logged by the pipeline
        with self._lock:
            return self.stage.adopt_refit(raw)

    # --- commands --------------------------------------------------------------------------------
    def to_device(self, command: BeamCommand, start_s: float) -> tuple[BeamCommand, dict[str, Any]]:
        """``command`` (sample frame) as the device must execute it when it starts at ``start_s``,
        and the record of the conversion (see the module docstring)."""
        with self._lock:
            converted = to_beam_command(command, self.stage, start_s)
            record = converted.to_dict()
            why = self._unreliable(converted.check.reason)
            if isinstance(command, Park) and why:
                reference = self._reference_geometry or self._last_geometry
                if reference is None:
                    return Blank(), {"replaced": why, "instead_of": record, "command": encode_command(Blank())}
                again = to_beam_command(ScanRegion(reference), self.stage, start_s)
                assert isinstance(again.command, ScanRegion)
                self._remember(again.command, ScanRegion(reference))
                return again.command, {**again.to_dict(), "replaced": f"{why}: the reference field is scanned again",
                                       "instead_of": record}
            self._remember(converted.command, command)
            if why:
                record["reliable"], record["reason"] = False, why
            return converted.command, record

    def replay_conversion(self, record: dict[str, Any]) -> None:
        """A replay hands back a logged conversion (the ``commands`` stream's ``converted.drift``):
        a scan's beam and sample-frame fields are remembered as :meth:`to_device` remembered them,
        so the frame that comes from it maps back to the same sample-frame field."""
        try:
            beam, sample = decode_command(record.get("command")), decode_command(record.get("sample_command"))
        except InputError:
            return  # a record without both commands (an old log, a blank): nothing was remembered then either
        with self._lock:
            self._remember(beam, sample)

    def _remember(self, beam: BeamCommand, sample: BeamCommand) -> None:
        """A scan's beam and sample-frame fields, to map its frame back (caller holds the lock)."""
        if isinstance(beam, ScanRegion) and isinstance(sample, ScanRegion):
            self._conversions.append((beam.geometry, sample.geometry))

    def _unreliable(self, check_reason: str) -> str:
        """Why the estimate must not place the beam now ("" when it may)."""
        if self._failed:
            return self._failed
        last = self._last
        if last is not None and last.status == "too_few_atoms":
            return f"frame {last.frame_index}: {last.reason}"
        return check_reason

    def close(self) -> None:
        if self._refits is not None:
            self._refits.shutdown(wait=False, cancel_futures=True)


def _check_positions(positions_A: np.ndarray) -> None:
    """Non-finite atom positions are a segmenter bug: a clear error naming the field."""
    p = np.asarray(positions_A)
    bad = ~np.isfinite(p).all(axis=1) if p.ndim == 2 and len(p) else np.zeros(0, dtype=bool)
    if bad.any():
        raise InputError("atoms.positions_A", p[bad][:3].tolist(), f"{int(bad.sum())} of {len(p)} positions are not finite")
