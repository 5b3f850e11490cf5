"""The closed loop: acquire, find atoms, decide, gate, act, log.

One asyncio task runs the loop; analysis (segmentation, policy) runs in an executor so the
event loop stays responsive to control messages. Every driver call has a timeout (the
watchdog): the expected duration of the command plus ``safety.watchdog_s``.

The beam is on only while a scan or park runs: after each one the agent blanks it before
analysing, and the gate counts the dose of the beam resting where the command ended until the
blank is confirmed. Each frame's and park's reported dose is reconciled with the gate's
prediction; a report above it pauses the run (rule ``dose_reported``).

Faults (a :class:`~stemagent.driver.DriverFault`, a timeout, an error in a stage) never crash
the loop: the beam is blanked, the fault is logged to the ``interruptions`` stream, the agent
goes to ``faulted`` and tries to reconnect every ``retry_s``; when the device answers again it
takes the beam current the device reports and resumes (or stays paused if the operator paused
it). Stop and abort interrupt every wait, reconnection included. Whatever happens, the beam is
blanked and the log is closed with the true exit status on the way out.

Frames are identified by the run's acquisition sequence (``frame.index`` is rewritten to it;
the device's own counter, which restarts with the device, is kept in ``meta["device_index"]``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol, TypeVar

import numpy as np

from stemagent.agent.control import ControlAck, ControlMessage
from stemagent.agent.safety import Prediction, SafetyGate
from stemagent.agent.state import AgentState, StateMachine
from stemagent.clock import Clock
from stemagent.codec import encode_decision
from stemagent.driver import CommandRefused, Driver, DriverFault, EndOfData
from stemagent.errors import StemAgentError
from stemagent.runlog import RunLogWriter
from stemagent.stages import Observation, Policy, Segmenter
from stemagent.types import BeamCommand, Decision, Frame, Park, ScanGeometry, ScanRegion

log = logging.getLogger("stemagent.agent")

T = TypeVar("T")


class TelemetrySink(Protocol):
    """Where status, frame summaries and decisions go (MQTT, or nothing). Must never block or raise."""

    def publish(self, kind: str, payload: dict[str, Any]) -> None: ...


class NullTelemetry:
    def publish(self, kind: str, payload: dict[str, Any]) -> None:
        return None


class _Aborted(Exception):
    pass


class _Left(Exception):
    """A wait ended because the run is stopping or aborting."""


@dataclass
class RunSummary:
    log_path: str
    state: str
    exit_status: str = "success"
    frames: int = 0
    atoms_per_frame: float = 0.0
    commands_sent: int = 0
    commands_refused: int = 0
    parks: int = 0
    faults: int = 0
    pauses: int = 0
    peak_dose_e_per_A2: float = 0.0
    beam_current_pA: float = 0.0
    elapsed_s: float = 0.0
    sim_time_s: float = 0.0
    reason: str = ""
    beam_blanked_at_end: bool = True
    atom_counts: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.pop("atom_counts")
        return d


class Agent:
    def __init__(
        self,
        *,
        driver: Driver,
        segmenter: Segmenter,
        policy: Policy,
        gate: SafetyGate,
        writer: RunLogWriter,
        clock: Clock,
        initial_scan: ScanGeometry,
        max_frames: int,
        telemetry: TelemetrySink | None = None,
        retry_s: float = 0.5,
        max_consecutive_refusals: int = 20,
        auto_resume_after_fault: bool = True,
        schedule: list[tuple[int, ControlMessage]] | None = None,
        pause_on_dose_report: bool = True,
    ) -> None:
        self.driver = driver
        self.segmenter = segmenter
        self.policy = policy
        self.gate = gate
        self.writer = writer
        self.clock = clock
        self.initial_scan = initial_scan
        self.max_frames = max_frames
        self.telemetry: TelemetrySink = telemetry or NullTelemetry()
        self.retry_s = retry_s
        self.max_consecutive_refusals = max_consecutive_refusals
        self.auto_resume_after_fault = auto_resume_after_fault
        #: controls to apply once this many frames are done (replay applies the logged ones)
        self.schedule = sorted(schedule or [], key=lambda s: s[0])
        #: pause when a frame or park reports more dose than predicted (a replay only logs it)
        self.pause_on_dose_report = pause_on_dose_report
        self.sm = StateMachine()
        self.summary = RunSummary(log_path=str(writer.path), state=self.sm.state.value, beam_current_pA=gate.beam_current_pA)
        self.target_A: tuple[float, float] | None = None
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

    async def _guard(self, make: Callable[[], Awaitable[T]], timeout_s: float, what: str, *, leave_on_stop: bool = False) -> T:
        """Await a driver call with a timeout; abort (and with ``leave_on_stop``, stop) ends it at once."""
        task = asyncio.ensure_future(make())
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

    async def _analyse(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

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

    # --- one step ------------------------------------------------------------------------------
    async def _execute(self, cmd: BeamCommand) -> Frame | None:
        now = self._now()
        verdict = self.gate.check(cmd, now)
        if not verdict.allowed:
            self.summary.commands_refused += 1
            self.writer.write_safety(verdict="refused", rule=verdict.rule, detail=verdict.detail, t_s=now)
            self.writer.write_command(cmd, outcome="refused", t_s=now, detail=verdict.detail)
            self.telemetry.publish("safety", {"verdict": "refused", "rule": verdict.rule, "detail": verdict.detail})
            return None
        prediction = self.gate.record(cmd, now)
        self.summary.commands_sent += 1
        self.writer.write_command(cmd, outcome="sent", t_s=now)
        if isinstance(cmd, ScanRegion):
            try:
                frame = await self._on_device(prediction, lambda: self.driver.acquire(cmd.geometry), cmd, "acquire")
            except CommandRefused as exc:
                return self._device_refused(cmd, prediction, exc)
            self._last_geometry = cmd.geometry
            frame = self._identify(frame)
            self._reconcile(prediction, frame.dose_e_per_A2)
            return frame
        if isinstance(cmd, Park):
            try:
                result = await self._on_device(prediction, lambda: self.driver.park(cmd.position_A, cmd.dwell_s), cmd, "park")
            except CommandRefused as exc:
                return self._device_refused(cmd, prediction, exc)
            self.summary.parks += 1
            self.writer.write_park(result, predicted_dose_e_per_A2=prediction.footprint.reported_e_per_A2)
            self._reconcile(prediction, float(result.dose_e_per_A2))
            return None
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
        await self._blank(f"{what} done")
        return result

    def _device_refused(self, cmd: BeamCommand, prediction: Prediction, exc: CommandRefused) -> None:
        """The device refused the command under its own limits: nothing ran, nothing was dosed."""
        self.gate.cancel(prediction)
        now = self._now()
        self.summary.commands_refused += 1
        self.writer.write_safety(verdict="refused", rule="device", detail=str(exc), t_s=now)
        self.writer.write_command(cmd, outcome="refused_by_device", t_s=now, detail=str(exc))
        self.telemetry.publish("safety", {"verdict": "refused", "rule": "device", "detail": str(exc)})
        return None

    def _identify(self, frame: Frame) -> Frame:
        """Give the frame the run's next acquisition number; keep the device's own counter in meta."""
        meta = {**frame.meta, "device_index": int(frame.index)}
        frame = dataclasses.replace(frame, index=self._seq, meta=meta)
        self._seq += 1
        return frame

    async def _process(self, frame: Frame) -> BeamCommand:
        self.writer.write_frame(frame)
        atoms = await self._analyse(self.segmenter.find, frame)
        self.writer.write_atoms(atoms)
        self.summary.frames += 1
        self.summary.atom_counts.append(len(atoms))
        obs = Observation(frame_index=frame.index, time_s=frame.end_time_s, geometry=frame.geometry, atoms=atoms)
        if self.target_A is not None:
            obs.features["target_A"] = np.asarray(self.target_A)
        decision: Decision = await self._analyse(self.policy.decide, obs)
        self.writer.write_decision(decision, frame.index)
        self.telemetry.publish(
            "frame",
            {
                "frame_index": frame.index,
                "n_atoms": len(atoms),
                "dose_e_per_A2": frame.dose_e_per_A2,
                "peak_dose_e_per_A2": self.gate.peak_dose_e_per_A2,
                "center_A": list(frame.geometry.center_A),
                "t_s": frame.end_time_s,
            },
        )
        self.telemetry.publish("decision", {"frame_index": frame.index, **encode_decision(decision)})
        self._last_obs = obs
        return decision.command

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

    async def _wait_while_held(self) -> None:
        """Paused or faulted: beam blanked; wait for resume, stop, abort or the device to return."""
        while not (self._stop_requested or self._abort.is_set()):
            self._apply_due_controls()
            if self.sm.state == AgentState.FAULTED:
                try:
                    await self._reconnect()
                except _Left:
                    return
                except _Aborted:
                    raise
                except Exception as exc:  # noqa: BLE001 - still down; try again later
                    log.info("device still unavailable: %r", exc)
                    await self._wait(self.retry_s)
                    continue
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
        await self._blank("fault")
        self._log_interruption("fault", repr(exc), self.sm.state.value)
        self.telemetry.publish("fault", {"error": repr(exc), "t_s": self._now()})
        self._set_state(AgentState.FAULTED, str(exc)[:200] or type(exc).__name__)

    async def run(self) -> RunSummary:
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
                try:
                    refused_before = self.summary.commands_refused
                    frame = await self._execute(cmd)
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
                    if frame is None:  # a park or a blank: look at the same field again
                        cmd = ScanRegion(self._last_geometry)
                        continue
                    cmd = await self._process(frame)
                except _Aborted:
                    raise
                except EndOfData as exc:
                    reason = f"end of data: {exc}"
                    break
                except (DriverFault, asyncio.TimeoutError, ConnectionError) as exc:
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
        """A command was refused: ask the policy again on the last observation, marked as such."""
        obs = self._last_obs
        assert obs is not None
        obs.features["refused"] = np.ones(1)
        decision: Decision = await self._analyse(self.policy.decide, obs)
        self.writer.write_decision(decision, obs.frame_index)
        return decision.command
