"""The closed loop: acquire, analyse (the pipeline), gate, act, log.

The loop does only I/O, control and safety. Everything between a frame and a decision is the
:class:`~stemagent.pipeline.Pipeline` (segment -> drift -> encode -> policy), which runs in an
executor so the event loop stays responsive to control messages (torch and GP work never runs
on it); a stop or abort does not wait for it. Every stage's wall time goes into the run log's
``pipeline`` stream and the ``frame`` telemetry. Every driver call has a timeout (the
watchdog): the expected duration of the command plus ``safety.watchdog_s``.

Parks are observations: after a park the pipeline's park path runs (the policy's
``observe_park``) on the :class:`~stemagent.types.ParkResult`; the policy may ask for a small
confirmation scan, another park, or nothing (the last field is scanned again).

Overlap (``agent.overlap``): when the policy asks for the field it just scanned, the agent
streams it (``Driver.stream``, in bursts of ``stream_burst_frames`` that each pass the safety
gate before they start), so frame n+1 is acquired while frame n is analysed. Frames wait in a
one-frame slot where the newest wins; a dropped frame stays in the log and the drop is counted
(``frames_dropped``) and logged. A decision for another field ends the stream.

The agent owns its long-lived tasks (the streaming acquisition) through an
``asyncio.TaskGroup`` for the duration of :meth:`Agent.run`; ``async with agent:`` closes a run
that was built but never run (or left early).

The beam is on only while a scan or park runs: after each one the agent blanks it before
analysing, and the gate counts the dose of the beam resting where the command ended until the
blank is confirmed. Each frame's and park's reported dose is reconciled with the gate's
prediction; a report above it pauses the run (rule ``dose_reported``).

Faults (a :class:`~stemagent.driver.DriverFault`, a timeout, an error in a stage) never crash
the loop: the beam is blanked, the fault is logged to the ``interruptions`` stream, the agent
goes to ``faulted`` and tries to reconnect; when the device answers again it takes the beam
current the device reports and resumes (or stays paused if the operator paused it). Retries are
bounded: the first reconnect is at once, every later one waits ``retry_s`` x ``retry_backoff``
^ k (at most ``retry_max_s``) on the injected clock (logged as ``retry``); a device that does not
answer ``max_reconnect_attempts`` attempts in a row, or a command that faults again after
``max_fault_retries`` recoveries with no command completed between them (a park that always
faults), ends the run with ``exit_status: fail`` and the reason ("gave up: ..."). Stop and abort
interrupt every wait, reconnection included. Whatever happens, the beam is blanked and the log
is closed with the true exit status on the way out.

Refusals are never progress: a policy that finishes while the last command it asked for was
refused (by the safety gate or by the device, and nothing was sent since) ends the run with
``exit_status: fail`` and the reason ``refused: <rule>: <detail> (the policy finished: ...)``.
Nor is stopping short: a policy with a goal that finishes without it (``goal_reached`` False: a
manipulation stopped by damage, its budget or a lost path) ends the run ``fail`` with
``goal not reached (the policy finished: ...)``.

Frames are identified by the run's acquisition sequence (``frame.index`` is rewritten to it;
the device's own counter, which restarts with the device, is kept in ``meta["device_index"]``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import gc
import logging
import re
import time
from typing import Any, Awaitable, Callable, TypeVar

import numpy as np

from stemagent.agent.control import ControlAck, ControlMessage
from stemagent.agent.safety import Prediction, SafetyGate
from stemagent.agent.state import AgentState, StateMachine
from stemagent.agent.streaming import Streamer
from stemagent.agent.summary import NullTelemetry, RunSummary, TelemetrySink
from stemagent.clock import Clock
from stemagent.codec import encode_decision
from stemagent.driver import CommandRefused, Driver, DriverFault, EndOfData
from stemagent.errors import StemAgentError
from stemagent.pipeline import Pipeline, PolicyStage, SegmentStage, StageFailed
from stemagent.runlog import STREAMS, RunLogWriter
from stemagent.segmentation.classical import check_image
from stemagent.stages import Observation, Policy, Segmenter, no_atoms
from stemagent.types import BeamCommand, Decision, Frame, Park, ParkResult, ScanGeometry, ScanRegion

log = logging.getLogger("stemagent.agent")

T = TypeVar("T")

#: streams a policy may write its own events to (``drain_events``): plain lower-case names
POLICY_STREAM = re.compile(r"[a-z][a-z0-9_]{0,39}")


class _Aborted(Exception):
    pass


class _Left(Exception):
    """A wait ended because the run is stopping or aborting."""


class _GaveUp(Exception):
    """The retries after a fault are spent (``max_fault_retries`` or ``max_reconnect_attempts``)."""


class Agent:
    """One run: the driver, the pipeline, the safety gate and the run log (see the module docstring).

    ``pipeline``: the analysis; or, for the simplest runs, ``segmenter`` and ``policy``, which
    become the pipeline ``segment -> policy``.
    """

    def __init__(
        self,
        *,
        driver: Driver,
        gate: SafetyGate,
        writer: RunLogWriter,
        clock: Clock,
        initial_scan: ScanGeometry,
        max_frames: int,
        pipeline: Pipeline | None = None,
        segmenter: Segmenter | None = None,
        policy: Policy | None = None,
        telemetry: TelemetrySink | None = None,
        retry_s: float = 0.5,
        retry_backoff: float = 2.0,
        retry_max_s: float = 30.0,
        max_fault_retries: int = 3,
        max_reconnect_attempts: int = 20,
        max_consecutive_refusals: int = 20,
        auto_resume_after_fault: bool = True,
        schedule: list[tuple[int, ControlMessage]] | None = None,
        pause_on_dose_report: bool = True,
        overlap: bool = False,
        stream_burst_frames: int = 4,
        freeze_gc: bool = False,
        wall: Callable[[], float] = time.perf_counter,
    ) -> None:
        if pipeline is None:
            if segmenter is None or policy is None:
                raise ValueError("an Agent needs a pipeline, or a segmenter and a policy")
            pipeline = Pipeline([SegmentStage(segmenter), PolicyStage(policy)])
        self.pipeline = pipeline
        self.driver = driver
        self.gate = gate
        self.writer = writer
        self.clock = clock
        self.initial_scan = initial_scan
        self.max_frames = max_frames
        self.telemetry: TelemetrySink = telemetry or NullTelemetry()
        self.retry_s = retry_s
        self.retry_backoff = retry_backoff
        self.retry_max_s = retry_max_s
        self.max_fault_retries = max_fault_retries
        self.freeze_gc = freeze_gc
        self.max_reconnect_attempts = max_reconnect_attempts
        self.max_consecutive_refusals = max_consecutive_refusals
        self.auto_resume_after_fault = auto_resume_after_fault
        #: controls to apply once this many frames are done (replay applies the logged ones)
        self.schedule = sorted(schedule or [], key=lambda s: s[0])
        #: pause when a frame or park reports more dose than predicted (a replay only logs it)
        self.pause_on_dose_report = pause_on_dose_report
        self.overlap = overlap
        self.stream_burst_frames = stream_burst_frames
        self._wall = wall
        self.sm = StateMachine()
        self.summary = RunSummary(log_path=str(writer.path), state=self.sm.state.value, beam_current_pA=gate.beam_current_pA)
        self.target_A: tuple[float, float] | None = None
        #: the last decision and when it was made (for the console's status line)
        self.last_decision: Decision | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="stemagent-analysis")
        self._abort = asyncio.Event()
        self._leave = asyncio.Event()  # stop or abort: every wait ends
        self._wake = asyncio.Event()
        self._stop_requested = False
        self._pause_requested = False
        self._pause_reason = "operator pause"
        self._interrupted: str | None = None  # the signal that stopped the run
        self._abort_reason = "abort requested"
        self._last_obs: Observation | None = None
        self._last_geometry = initial_scan
        self._seq = 0  # the run's acquisition sequence: frame identity
        self._parks_since_frame: list[ParkResult] = []
        self._tasks: asyncio.TaskGroup | None = None
        self._finished = False
        self._stream_blocked = False  # a stream gave nothing: the next command goes one by one
        self._streamer = Streamer(self)
        self._arrived_s: float | None = None
        self._faults_in_a_row = 0  # faults with no command completed between them
        self._reconnects = 0  # reconnect attempts since the device last answered
        self._retry_step = 0  # waits so far since the last command completed (the backoff's exponent)
        self._last_fault = ""
        self._last_refusal: str | None = None  # "<rule>: <detail>" of a refusal with nothing sent since
        self._replaced = False  # a stage replaced a command since the last observation (feature ``replaced``)

    @property
    def policy(self) -> Policy | None:
        """The policy of the pipeline's ``policy`` stage (None if it has none)."""
        try:
            return self.pipeline.stage("policy").policy
        except (KeyError, AttributeError):
            return None

    @policy.setter
    def policy(self, policy: Policy) -> None:
        self.pipeline.stage("policy").policy = policy

    @property
    def last_observation(self) -> Observation | None:
        """The newest analysed frame's observation (a reference the loop replaces, never changes;
        the live view reads it lazily)."""
        return self._last_obs

    def frame_age_s(self) -> float | None:
        """Seconds since the current observation arrived (None between a command's issue and
        the next arrival): the live view dates a frame's arrival on its own clock with it."""
        arrived = self._arrived_s
        return None if arrived is None else self._wall() - arrived

    # --- lifetime ------------------------------------------------------------------------------
    async def __aenter__(self) -> Agent:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if not self._finished:  # built but not run to the end: blank, close the log and the driver
            await self._finish("abort", "the agent was closed before its run ended", time.perf_counter(), self._now())

    # --- control (called from MQTT, the console or a signal handler; runs on the loop) ---------
    def control(self, msg: ControlMessage) -> ControlAck:
        """Apply an operator request now, log it with its values and acknowledge it. Never raises."""
        state = self.sm.state
        accepted, detail = True, ""
        if self.sm.finished:
            accepted, detail = False, "the run has ended"
        elif msg.command == "pause":
            self._pause_requested = True
            self._pause_reason = "operator pause"
        elif msg.command == "resume":
            self._pause_requested = False
        elif msg.command == "stop":
            self._request_stop()
        elif msg.command == "abort":
            self._request_abort(msg.reason or "operator abort")
        elif msg.command == "set_target":
            accepted, detail = self._set_target(msg)
        elif msg.command == "set_dose_budget":
            if msg.value is None:
                accepted, detail = False, "value (e/Å²) is required for set_dose_budget"
            else:
                try:
                    self.gate.set_dose_budget(msg.value, confirm=msg.confirm)
                except ValueError as exc:
                    accepted, detail = False, str(exc)
        self._wake.set()
        args = msg.arguments()
        said = " ".join(f"{k}={v}" for k, v in args.items())
        self._safe_write(
            lambda: self.writer.write_event(
                "controls",
                {"command": msg.command, "id": msg.id or "", "arguments": args, "reason": msg.reason, "accepted": accepted,
                 "detail": detail, "state": state.value, "frames_done": self.summary.frames, "t_s": self._now()},
                sync=True,
            ),
            "control",
        )
        if accepted:
            self._log_interruption(f"control:{msg.command}", "; ".join(p for p in (said, msg.reason) if p), state.value)
        ack = ControlAck(id=msg.id, command=msg.command, accepted=accepted, state=self.sm.state.value, detail=detail)
        self.telemetry.publish("ack", ack.model_dump())
        return ack

    def _set_target(self, msg: ControlMessage) -> tuple[bool, str]:
        if msg.target_A is None:
            return False, "target_A (x, y in Å) is required for set_target"
        if not self.gate.in_area(np.asarray(msg.target_A)):
            cfg = self.gate.config
            return False, (f"target_A={list(msg.target_A)} is outside the allowed area (centre {list(cfg.area_center_A)}, "
                           f"half width {cfg.area_half_width_A} Å)")
        self.target_A = (float(msg.target_A[0]), float(msg.target_A[1]))
        return True, ""

    def interrupt(self, signal_name: str) -> None:
        """A signal (SIGINT, SIGTERM): the first stops the run, a second aborts it."""
        if self._interrupted is None:
            self._interrupted = signal_name
            self._log_interruption("signal", f"{signal_name}: stopping (send it again to abort)", self.sm.state.value)
            self._request_stop()
        else:
            self._log_interruption("signal", f"{signal_name} again: aborting", self.sm.state.value)
            self._request_abort(f"{signal_name} received twice")
        self._wake.set()

    def _request_stop(self) -> None:
        self._stop_requested = True
        self._leave.set()

    def _request_abort(self, reason: str) -> None:
        self._abort_reason = reason
        self._stop_requested = True
        self._abort.set()
        self._leave.set()

    def _apply_due_controls(self) -> None:
        while self.schedule and self.schedule[0][0] <= self.summary.frames:
            _, msg = self.schedule.pop(0)
            self.control(msg)

    # --- helpers -------------------------------------------------------------------------------
    def _now(self) -> float:
        return self.clock.monotonic()

    def _safe_write(self, write: Callable[[], Any], what: str) -> None:
        try:
            write()
        except Exception:  # the log must never take the loop down; it is closed at the end
            log.exception("could not log %s", what)

    def _log_interruption(self, kind: str, reason: str, state: str) -> None:
        self._safe_write(lambda: self.writer.write_interruption(kind=kind, reason=reason, state=state, t_s=self._now()),
                         f"interruption {kind}")

    def _set_state(self, target: AgentState, reason: str) -> None:
        before = self.sm.state
        if before == target:
            return
        self.sm.to(target, reason)
        self.summary.state = target.value
        self._log_interruption("state", f"{before.value} -> {target.value}: {reason}", target.value)
        self.telemetry.publish("status", {"state": target.value, "previous": before.value, "reason": reason, "t_s": self._now()})

    async def _race(self, awaitable: Awaitable[T], timeout_s: float | None, what: str, *, leave_on_stop: bool = False) -> T:
        """Await ``awaitable`` with a timeout; abort (and with ``leave_on_stop``, stop) ends the wait at once."""
        task = asyncio.ensure_future(awaitable)
        ender = asyncio.ensure_future((self._leave if leave_on_stop else self._abort).wait())
        try:
            done, _ = await asyncio.wait({task, ender}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            task.cancel()
            if ender in done:
                raise (_Left(what) if leave_on_stop and not self._abort.is_set() else _Aborted(what))
            raise DriverFault(f"{what} gave no answer within {timeout_s:.3g} s (watchdog)")
        finally:
            ender.cancel()
            if not task.done():
                task.cancel()

    async def _guard(self, make: Callable[[], Awaitable[T]], timeout_s: float, what: str, *, leave_on_stop: bool = False) -> T:
        """Await a driver call with a timeout; abort (and with ``leave_on_stop``, stop) ends it at once."""
        return await self._race(make(), timeout_s, what, leave_on_stop=leave_on_stop)

    async def _blank(self, why: str) -> bool:
        """Blank the beam; a failure is logged, never raised. Returns whether it worked."""
        try:
            await asyncio.wait_for(self.driver.blank(), timeout=self.gate.config.watchdog_s)
        except Exception as exc:  # noqa: BLE001 - blanking is best effort on a failing device
            log.error("blank (%s) failed: %r", why, exc)
            self._log_interruption("blank_failed", f"{why}: {exc!r}", self.sm.state.value)
            return False
        self.gate.blanked(self._now())
        return True

    async def _analyse(self, obs: Observation, only: tuple[str, ...] | None = None,
                       meanwhile: Callable[[], Any] | None = None) -> Observation:
        """The pipeline on ``obs`` in the executor; an abort does not wait for it. ``meanwhile``
        runs on this thread while the executor works (the frame's log write overlaps the
        analysis; the writer stays on one thread) and is done before the result is used."""
        fut = asyncio.get_running_loop().run_in_executor(self._executor, self.pipeline.run, obs, only)
        if meanwhile is not None:
            meanwhile()
        return await self._race(fut, None, "analysis")

    def _timeout_for(self, cmd: BeamCommand) -> float:
        wd = self.gate.config.watchdog_s
        if isinstance(cmd, ScanRegion):
            return cmd.geometry.frame_time_s + wd
        if isinstance(cmd, Park):
            return cmd.dwell_s + wd
        return wd

    def _adopt_current(self, beam_current_pA: float, source: str) -> None:
        before = self.gate.beam_current_pA
        if self.gate.set_beam_current(beam_current_pA, self._now()):
            self._log_interruption("beam_current", f"{source}: {before:.4g} pA -> {beam_current_pA:.4g} pA", self.sm.state.value)
        self.summary.beam_current_pA = self.gate.beam_current_pA

    def _reconcile(self, prediction: Prediction, reported_e_per_A2: float) -> None:
        verdict = self.gate.reconcile(prediction, reported_e_per_A2)
        self.summary.beam_current_pA = self.gate.beam_current_pA
        if verdict.allowed:
            return
        now = self._now()
        self._safe_write(lambda: self.writer.write_safety(verdict="paused", rule=verdict.rule, detail=verdict.detail, t_s=now),
                         "safety")
        self.telemetry.publish("safety", {"verdict": "paused", "rule": verdict.rule, "detail": verdict.detail})
        log.error("%s: %s", verdict.rule, verdict.detail)
        if not self.pause_on_dose_report:
            return
        self._pause_requested = True  # the operator decides whether to go on
        self._pause_reason = f"safety: {verdict.rule}"

    # --- one command -----------------------------------------------------------------------------
    def _to_device(self, cmd: BeamCommand) -> tuple[BeamCommand, dict[str, Any]]:
        """The command as it goes to the device, converted by the pipeline's stages at the time it acts."""
        converted = self.pipeline.to_device(cmd, self._now())
        for stage, record in converted.records.items():
            if isinstance(record, dict) and record.get("replaced"):  # e.g. drift: unreliable, the reference field again
                self._replaced = True  # the command the policy asked for did not run: the next observation says so
                self._log_interruption("command_replaced", f"{stage}: {record['replaced']}", self.sm.state.value)
                self.telemetry.publish("error", {"stage": stage, "error": f"command replaced: {record['replaced']}"})
        return converted.command, {"converted": converted.records}

    def _refused(self, cmd: BeamCommand, rule: str, detail: str, outcome: str, extra: dict[str, Any]) -> None:
        now = self._now()
        self.summary.commands_refused += 1
        self._last_refusal = f"{rule}: {detail}"
        self.writer.write_safety(verdict="refused", rule=rule, detail=detail, t_s=now)
        self.writer.write_command(cmd, outcome=outcome, t_s=now, detail=detail, **extra)
        self.telemetry.publish("safety", {"verdict": "refused", "rule": rule, "detail": detail})

    async def _execute(self, cmd: BeamCommand) -> Frame | ParkResult | None:
        """Gate, send, blank, log. Returns the frame or park result; None for a blank or a refusal."""
        asked = cmd  # in the sample frame; the device gets it converted
        cmd, extra = self._to_device(cmd)
        now = self._now()
        verdict = self.gate.check(cmd, now)
        if not verdict.allowed:
            self._refused(cmd, verdict.rule, verdict.detail, "refused", extra)
            return None
        prediction = self.gate.record(cmd, now)
        self.summary.commands_sent += 1
        self._last_refusal = None
        self.writer.write_command(cmd, outcome="sent", t_s=now, **extra)
        self._mark_issued()
        if isinstance(cmd, ScanRegion):
            try:
                frame = await self._on_device(prediction, lambda: self.driver.acquire(cmd.geometry), cmd, "acquire")
            except CommandRefused as exc:
                self._device_refused(cmd, prediction, exc, extra)
                return None
            # the field as asked (sample frame): scanning "the last field" again converts it anew
            # (a park a stage replaced by a scan of the reference field leaves the last field as it was)
            if isinstance(asked, ScanRegion):
                self._last_geometry = asked.geometry
            frame = self._identify(frame)
            self._reconcile(prediction, frame.dose_e_per_A2)
            return frame
        if isinstance(cmd, Park):
            try:
                result = await self._on_device(prediction, lambda: self.driver.park(cmd.position_A, cmd.dwell_s), cmd, "park")
            except CommandRefused as exc:
                self._device_refused(cmd, prediction, exc, extra)
                return None
            self.summary.parks += 1
            self.writer.write_park(result, predicted_dose_e_per_A2=prediction.footprint.reported_e_per_A2)
            self._reconcile(prediction, float(result.dose_e_per_A2))
            return result
        await self._blank("policy asked")
        return None

    async def _on_device(self, prediction: Prediction, make: Callable[[], Awaitable[T]], cmd: BeamCommand, what: str) -> T:
        """Run a beam command on the device, then blank. The beam counts as on from its end
        (or from a failure, when it may have run) until the blank is confirmed."""
        try:
            result = await self._guard(make, self._timeout_for(cmd), what)
        except CommandRefused:
            raise
        except BaseException:
            self.gate.finished(prediction, self._now())
            raise
        self.gate.finished(prediction, self._now())
        self.completed()
        await self._blank(f"{what} done")
        return result

    def completed(self) -> None:
        """A command completed on the device: the fault retries and the backoff start again."""
        self._faults_in_a_row = 0
        self._retry_step = 0

    def _device_refused(self, cmd: BeamCommand, prediction: Prediction, exc: CommandRefused, extra: dict[str, Any]) -> None:
        """The device refused the command under its own limits: nothing ran, nothing was dosed."""
        self.gate.cancel(prediction)
        self._refused(cmd, "device", str(exc), "refused_by_device", extra)

    def _identify(self, frame: Frame) -> Frame:
        """Give the frame the run's next acquisition number; keep the device's own counter in meta."""
        meta = {**frame.meta, "device_index": int(frame.index)}
        frame = dataclasses.replace(frame, index=self._seq, meta=meta)
        self._seq += 1
        return frame

    # --- analysis ------------------------------------------------------------------------------
    def _mark_arrival(self) -> None:
        self._arrived_s = self._wall()

    def _mark_issued(self) -> None:
        arrived = self._arrived_s
        if arrived is not None:
            self.summary.latencies_s.append(self._wall() - arrived)
            self._arrived_s = None

    def _features(self) -> dict[str, np.ndarray]:
        """The observation-wide features of the next observation: the operator's ``target_A``, and
        ``replaced`` when a stage replaced a command since the last one (what the policy asked
        for did not run; a park replaced by a scan is no park). Taking them clears ``replaced``."""
        out = {"target_A": np.asarray(self.target_A)} if self.target_A is not None else {}
        if self._replaced:
            out["replaced"] = np.ones(1)
            self._replaced = False
        return out

    async def _analyse_frame(self, frame: Frame, logged: bool = False) -> BeamCommand:
        """Log the frame (unless ``logged``), run the pipeline on it, log what it found and
        decided; the next command."""
        self._mark_arrival()
        try:
            check_image(frame.image)  # a corrupt frame is bad input (logged, the field scanned again)
        except Exception:
            if not logged:
                self.writer.write_frame(frame)
            raise
        obs = Observation(frame_index=frame.index, time_s=frame.end_time_s, geometry=frame.geometry,
                          atoms=no_atoms(frame.index), features=self._features(), frame=frame,
                          parks=self._parks_since_frame)
        self._parks_since_frame = []
        # the frame is written (fsynced) while the pipeline analyses it, and always before a
        # command that follows from it goes out
        obs = await self._analyse(obs, meanwhile=None if logged else lambda: self.writer.write_frame(frame))
        self.writer.write_atoms(obs.atoms)
        self.summary.frames += 1
        self.summary.atom_counts.append(len(obs.atoms))
        self._record(obs)
        self._last_obs = obs  # before the frame's telemetry: a sink reading it sees this frame
        self.telemetry.publish(
            "frame",
            {
                "frame_index": frame.index,
                "n_atoms": len(obs.atoms),
                "dose_e_per_A2": frame.dose_e_per_A2,
                "peak_dose_e_per_A2": self.gate.peak_dose_e_per_A2,
                "center_A": list(frame.geometry.center_A),
                "t_s": frame.end_time_s,
                "timings_ms": dict(obs.timings_ms),
            },
        )
        return self._next_command(obs)

    async def _analyse_park(self, result: ParkResult) -> BeamCommand:
        """A park is an observation: the pipeline's park path (the policy's ``observe_park``)."""
        self._mark_arrival()
        self._parks_since_frame.append(result)
        last = self._last_obs
        obs = Observation(
            frame_index=last.frame_index if last is not None else -1,
            time_s=result.start_time_s + result.dwell_s,
            geometry=last.geometry if last is not None else self._last_geometry,
            atoms=last.atoms if last is not None else no_atoms(),
            features=self._features(), kind="park", park=result, drift=last.drift if last is not None else None,
            atom_features=dict(last.atom_features) if last is not None else {},
        )
        obs = await self._analyse(obs)
        self._record(obs)
        return self._next_command(obs)

    def _record(self, obs: Observation, observation: str | None = None) -> None:
        """The observation's per-stage timings, records and errors, the documents of the stages'
        own streams, and its decision, into the log. ``observation``: what it was (``frame``,
        ``park``, or ``refused``: the policy asked again after a refusal); ``obs.kind`` by default."""
        seen = observation or obs.kind
        for stage, why in obs.errors.items():
            self.summary.stage_errors += 1
            self._log_interruption("stage_error", f"{stage}: {why}", self.sm.state.value)
            self.telemetry.publish("error", {"stage": stage, "error": why, "frame_index": obs.frame_index})
        self.writer.write_event("pipeline", {
            "frame_index": int(obs.frame_index),
            "observation": seen,
            "park_index": self.summary.parks - 1 if obs.kind == "park" else -1,
            "timings_ms": {k: float(v) for k, v in obs.timings_ms.items()},
            "errors": dict(obs.errors),
            "records": obs.records,
        })
        if seen != "refused":
            for stream, doc in self.pipeline.documents(obs):
                self.writer.write_event(stream, doc)
        for stream, doc in (obs.records.get("policy") or {}).get("events", []):
            if stream in STREAMS or not POLICY_STREAM.fullmatch(stream):
                self._log_interruption("stage_error", f"policy: event stream {stream!r} is reserved or not a plain name",
                                       self.sm.state.value)
                continue
            self.writer.write_event(stream, dict(doc))
        if obs.decision is not None:
            self.writer.write_decision(obs.decision, obs.frame_index, seen)
            self.telemetry.publish("decision", {"frame_index": obs.frame_index, "observation": seen,
                                                **encode_decision(obs.decision)})
            self.last_decision = obs.decision

    def _next_command(self, obs: Observation) -> BeamCommand:
        """The policy's command; without a decision (none after a park, or a failed policy) the
        last field is scanned again."""
        return obs.decision.command if obs.decision is not None else ScanRegion(self._last_geometry)

    def _policy_says(self, attribute: str) -> Any:
        """The policy stage's ``stop_reason`` or ``goal_reached`` (None without a policy stage)."""
        try:
            return getattr(self.pipeline.stage("policy"), attribute, None)
        except KeyError:
            return None

    def _policy_finished(self) -> str:
        return str(self._policy_says("stop_reason") or "")

    # --- the loop ------------------------------------------------------------------------------
    async def _wait(self, timeout_s: float | None) -> None:
        """Sleep until woken (a control message), the timeout, or stop/abort."""
        self._wake.clear()
        waiters = {asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(self._leave.wait())}
        try:
            await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    async def _reconnect(self) -> None:
        wd = self.gate.config.watchdog_s
        await self._guard(self.driver.connect, wd, "reconnect", leave_on_stop=True)
        caps = await self._guard(self.driver.capabilities, wd, "capabilities", leave_on_stop=True)
        self._adopt_current(caps.beam_current_pA, "device reports after reconnecting")
        if not await self._blank("device back"):  # whatever the device did meanwhile, it starts blanked
            raise DriverFault("the device answers but does not blank")

    async def _backoff(self, why: str) -> None:
        """Wait before the next reconnect attempt, on the injected clock: ``retry_s`` x
        ``retry_backoff`` ^ k, at most ``retry_max_s``. Stop and abort end the wait."""
        delay_s = min(self.retry_max_s, self.retry_s * self.retry_backoff ** self._retry_step)
        self._retry_step += 1
        self._log_interruption("retry", f"{why}; next reconnect attempt in {delay_s:.3g} s", self.sm.state.value)
        await self._race(self.clock.sleep(delay_s), None, "retry wait", leave_on_stop=True)

    def _check_retries(self) -> None:
        """Raise :class:`_GaveUp` when the retries after a fault are spent."""
        if self._faults_in_a_row > self.max_fault_retries:
            raise _GaveUp(f"gave up: {self._faults_in_a_row} faults in a row with no command completed between them "
                          f"(max_fault_retries={self.max_fault_retries}); last: {self._last_fault}")
        if self._reconnects >= self.max_reconnect_attempts:
            raise _GaveUp(f"gave up: the device did not answer {self._reconnects} reconnect attempts "
                          f"(max_reconnect_attempts={self.max_reconnect_attempts}); last: {self._last_fault}")

    async def _wait_while_held(self) -> None:
        """Paused or faulted: beam blanked; wait for resume, stop, abort or the device to return
        (a bounded number of reconnect attempts, with backoff; :class:`_GaveUp` when spent)."""
        while not (self._stop_requested or self._abort.is_set()):
            self._apply_due_controls()
            if self.sm.state == AgentState.FAULTED:
                self._check_retries()
                try:
                    if self._reconnects > 0:
                        await self._backoff(f"reconnect attempt {self._reconnects} failed")
                    elif self._faults_in_a_row > 1:
                        await self._backoff(f"fault {self._faults_in_a_row} in a row after the device came back")
                    self._reconnects += 1
                    await self._reconnect()
                except _Left:
                    return
                except _Aborted:
                    raise
                except Exception as exc:  # noqa: BLE001 - still down; try again later (bounded)
                    log.info("device still unavailable: %r", exc)
                    self._last_fault = repr(exc)
                    continue
                self._reconnects = 0
                self._log_interruption("recovered", "device answers again", self.sm.state.value)
                if self._pause_requested or not self.auto_resume_after_fault:
                    self._set_state(AgentState.PAUSED, "device back; operator pause in force")
                else:
                    self._set_state(AgentState.RUNNING, "device back")
                    return
            if self.sm.state == AgentState.PAUSED:
                if not self._pause_requested:
                    self._set_state(AgentState.RUNNING, "operator resume")
                    return
                await self._wait(None)
                continue
            return

    async def _fault(self, exc: BaseException) -> None:
        self.summary.faults += 1
        self._faults_in_a_row += 1
        self._last_fault = repr(exc)
        await self._blank("fault")
        self._log_interruption("fault", repr(exc), self.sm.state.value)
        self.telemetry.publish("fault", {"error": repr(exc), "t_s": self._now()})
        self._set_state(AgentState.FAULTED, str(exc)[:200] or type(exc).__name__)

    async def run(self) -> RunSummary:
        """Run until ``max_frames`` frames are analysed, the policy finishes, the operator stops,
        or an abort; the beam is blanked and the log closed on every way out."""
        frozen = self.freeze_gc and _freeze_long_lived()
        try:
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                try:
                    return await self._run()
                finally:
                    self._tasks = None
        finally:
            if frozen:
                gc.unfreeze()  # the run's models and buffers may be collected again

    async def _run(self) -> RunSummary:
        t_wall0 = time.perf_counter()
        t_sim0 = self._now()
        exit_status, reason = "success", ""
        try:
            try:
                await self._guard(self.driver.connect, self.gate.config.watchdog_s, "connect")
                await self._blank("start")
                self._set_state(AgentState.RUNNING, "started")
            except _Aborted:
                raise
            except Exception as exc:  # noqa: BLE001
                await self._fault(exc)
            cmd: BeamCommand = ScanRegion(self.initial_scan)
            refusals = 0
            while self.summary.frames < self.max_frames:
                self._apply_due_controls()
                if self._abort.is_set():
                    raise _Aborted(self._abort_reason)
                if self._stop_requested:
                    reason = f"interrupted by {self._interrupted}" if self._interrupted else "operator stop"
                    break
                if self._pause_requested and self.sm.state == AgentState.RUNNING:
                    self.summary.pauses += 1
                    await self._blank("pause")
                    self._set_state(AgentState.PAUSED, self._pause_reason)
                if self.sm.state in (AgentState.PAUSED, AgentState.FAULTED):
                    await self._wait_while_held()
                    continue
                finished = self._policy_finished()
                if finished:
                    if self._last_refusal is not None:  # a refusal is never progress: the run did not succeed
                        exit_status, reason = "fail", f"refused: {self._last_refusal} (the policy finished: {finished})"
                    elif self._policy_says("goal_reached") is False:  # stopped short of its goal (damage, budget, no path)
                        exit_status, reason = "fail", f"goal not reached (the policy finished: {finished})"
                    else:
                        reason = f"the policy finished: {finished}"
                    break
                try:
                    refused_before = self.summary.commands_refused
                    if self._streamer.may_stream(cmd):
                        assert isinstance(cmd, ScanRegion)
                        frames_before = self.summary.frames
                        streamed = await self._streamer.stream(cmd.geometry)
                        if self.summary.commands_refused == refused_before:
                            refusals = 0
                            if streamed is not None:
                                cmd = streamed
                            else:  # the stream gave nothing more (a finite source): one command at a time
                                self._stream_blocked = self.summary.frames == frames_before
                            continue
                        outcome: Frame | ParkResult | None = None
                    else:
                        self._stream_blocked = False
                        outcome = await self._execute(cmd)
                    if self.summary.commands_refused > refused_before:
                        refusals += 1
                        if refusals >= self.max_consecutive_refusals:
                            exit_status, reason = "fail", f"{refusals} commands in a row refused by the safety gate"
                            break
                        if self._last_obs is None:
                            exit_status, reason = "fail", "the initial scan was refused by the safety gate"
                            break
                        cmd = await self._ask_again()
                        continue
                    refusals = 0
                    if isinstance(outcome, Frame):
                        cmd = await self._analyse_frame(outcome)
                    elif isinstance(outcome, ParkResult):
                        cmd = await self._analyse_park(outcome)
                    else:  # a blank: look at the same field again
                        cmd = ScanRegion(self._last_geometry)
                except _Aborted:
                    raise
                except StageFailed as exc:
                    await self._blank("stage failed")
                    self.summary.stage_errors += 1
                    self._log_interruption("stage_error", str(exc), self.sm.state.value)
                    exit_status, reason = "fail", str(exc)
                    break
                except EndOfData as exc:
                    reason = f"end of data: {exc}"
                    break
                except (TimeoutError, DriverFault, ConnectionError) as exc:
                    await self._fault(exc)
                except StemAgentError as exc:  # bad input from a device or stage (e.g. an invalid frame)
                    await self._blank("bad input")
                    self._log_interruption("bad_input", str(exc), self.sm.state.value)
                    self.telemetry.publish("error", {"error": str(exc)})
                    cmd = ScanRegion(self._last_geometry)
            else:
                reason = f"reached max_frames={self.max_frames}"
        except _Aborted as exc:
            exit_status, reason = "abort", f"aborted ({exc}): {self._abort_reason}"
        except _GaveUp as exc:  # the fault blanked the beam; the finish blanks it again
            self._log_interruption("gave_up", str(exc), self.sm.state.value)
            exit_status, reason = "fail", str(exc)
        except asyncio.CancelledError:
            exit_status, reason = "abort", "cancelled"
            raise
        except Exception as exc:  # noqa: BLE001 - the agent never crashes out without blanking and closing
            log.exception("agent loop failed")
            exit_status, reason = "fail", f"unexpected error: {exc!r}"
        finally:
            if self._interrupted and exit_status == "success":
                exit_status = "abort"  # the run did not finish: a signal ended it
            await self._finish(exit_status, reason, t_wall0, t_sim0)
        return self.summary

    async def _finish(self, exit_status: str, reason: str, t_wall0: float, t_sim0: float) -> None:
        self._finished = True
        blanked = await self._blank("end of run")
        self.summary.beam_blanked_at_end = blanked
        final = AgentState.ABORTED if exit_status != "success" else AgentState.STOPPED
        if final == AgentState.STOPPED and self.sm.state != AgentState.STOPPING:
            self._set_state(AgentState.STOPPING, reason or "stop")
        self._set_state(final, reason or final.value)
        self.summary.exit_status = exit_status
        self.summary.reason = reason
        self.summary.peak_dose_e_per_A2 = self.gate.peak_dose_e_per_A2
        self.summary.beam_current_pA = self.gate.beam_current_pA
        self.summary.elapsed_s = time.perf_counter() - t_wall0
        self.summary.sim_time_s = self._now() - t_sim0
        counts = self.summary.atom_counts
        self.summary.atoms_per_frame = float(np.mean(counts)) if counts else 0.0
        lat = self.summary.latencies_s
        if lat:
            self.summary.latency_ms_p50 = float(np.percentile(lat, 50) * 1e3)
            self.summary.latency_ms_p95 = float(np.percentile(lat, 95) * 1e3)
        try:
            self.pipeline.close()
        except Exception as exc:  # noqa: BLE001 - a stage's cleanup must not keep the log open
            log.error("closing the pipeline failed: %r", exc)
        try:
            self.writer.close(exit_status, reason)
        except Exception as exc:  # noqa: BLE001 - e.g. a full disk; the driver must still be closed
            log.error("closing the run log failed: %r", exc)
            self.summary.reason = f"{reason}; run log close failed: {exc!r}"
        try:
            await asyncio.wait_for(self.driver.close(), timeout=self.gate.config.watchdog_s)
        except Exception as exc:  # noqa: BLE001
            log.error("driver close failed: %r", exc)
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.telemetry.publish("summary", self.summary.to_dict())

    async def _ask_again(self) -> BeamCommand:
        """A command was refused: ask the policy again on the last frame's observation, marked as
        such (``features["refused"]``); logged as a ``refused`` observation."""
        last = self._last_obs
        assert last is not None
        obs = dataclasses.replace(last, features={**last.features, "refused": np.ones(1)}, decision=None, records={},
                                  timings_ms={}, errors={})
        obs = await self._analyse(obs, only=("policy",))
        self._record(obs, "refused")
        if obs.decision is None:
            return ScanRegion(self._last_geometry)
        return obs.decision.command


def _freeze_long_lived() -> bool:
    """Collect once, then move every live object out of the cyclic collector's generations
    (``gc.freeze``): the objects built before the run (models, weights, caches) are not
    scanned again by each full collection during it. False when something else froze already."""
    if gc.get_freeze_count():
        return False
    gc.collect()
    gc.freeze()
    return True
