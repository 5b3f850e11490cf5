"""The closed loop: acquire, find atoms, decide, gate, act, log.

One asyncio task runs the loop; analysis (segmentation, policy) runs in an executor so the
event loop stays responsive to control messages. Every driver call has a timeout (the
watchdog): the expected duration of the command plus ``safety.watchdog_s``.

Faults (a :class:`~stemagent.driver.DriverFault`, a timeout, an error in a stage) never crash
the loop: the beam is blanked, the fault is logged to the ``interruptions`` stream, the agent
goes to ``faulted`` and tries to reconnect every ``retry_s``; when the device answers again it
resumes (or stays paused if the operator paused it). Whatever happens, the beam is blanked and
the log is closed on the way out.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol, TypeVar

import numpy as np

from stemagent.agent.control import ControlAck, ControlMessage
from stemagent.agent.safety import SafetyGate
from stemagent.agent.state import AgentState, StateMachine
from stemagent.clock import Clock
from stemagent.driver import Driver, DriverFault, EndOfData
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


@dataclass
class RunSummary:
    log_path: str
    state: str
    frames: int = 0
    atoms_per_frame: float = 0.0
    commands_sent: int = 0
    commands_refused: int = 0
    parks: int = 0
    faults: int = 0
    pauses: int = 0
    max_dose_e_per_A2: float = 0.0
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
        self.sm = StateMachine()
        self.summary = RunSummary(log_path=str(writer.path), state=self.sm.state.value)
        self.target_A: tuple[float, float] | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="stemagent-analysis")
        self._abort = asyncio.Event()
        self._wake = asyncio.Event()
        self._stop_requested = False
        self._pause_requested = False
        self._last_obs: Observation | None = None
        self._policy_done: str | None = None
        self._last_geometry = initial_scan

    # --- control (called from MQTT or the console; runs on the loop) ----------------------------
    def control(self, msg: ControlMessage) -> ControlAck:
        """Apply an operator request now and acknowledge it. Never raises."""
        state = self.sm.state
        accepted, detail = True, ""
        if self.sm.finished:
            accepted, detail = False, "the run has ended"
        elif msg.command == "pause":
            self._pause_requested = True
        elif msg.command == "resume":
            self._pause_requested = False
        elif msg.command == "stop":
            self._stop_requested = True
        elif msg.command == "abort":
            self._stop_requested = True
            self._abort.set()
        elif msg.command == "set_target":
            if msg.target_A is None:
                accepted, detail = False, "target_A is required for set_target"
            else:
                self.target_A = (float(msg.target_A[0]), float(msg.target_A[1]))
        elif msg.command == "set_dose_budget":
            try:
                self.gate.set_dose_budget(float(msg.value) if msg.value is not None else float("nan"))
            except ValueError as exc:
                accepted, detail = False, str(exc)
        self._wake.set()
        if accepted:
            self._log_interruption(f"control:{msg.command}", msg.reason or detail, state.value)
        ack = ControlAck(id=msg.id, command=msg.command, accepted=accepted, state=self.sm.state.value, detail=detail)
        self.telemetry.publish("ack", ack.model_dump())
        return ack

    # --- helpers -------------------------------------------------------------------------------
    def _now(self) -> float:
        return self.clock.monotonic()

    def _log_interruption(self, kind: str, reason: str, state: str) -> None:
        try:
            self.writer.write_interruption(kind=kind, reason=reason, state=state, t_s=self._now())
        except Exception:  # the log must never take the loop down; it is closed at the end
            log.exception("could not log interruption %s", kind)

    def _set_state(self, target: AgentState, reason: str) -> None:
        before = self.sm.state
        if before == target:
            return
        self.sm.to(target, reason)
        self.summary.state = target.value
        self._log_interruption("state", f"{before.value} -> {target.value}: {reason}", target.value)
        self.telemetry.publish("status", {"state": target.value, "previous": before.value, "reason": reason, "t_s": self._now()})

    async def _guard(self, make: Callable[[], Awaitable[T]], timeout_s: float, what: str) -> T:
        """Await a driver call with a timeout, cancelling it at once on abort."""
        task = asyncio.ensure_future(make())
        aborter = asyncio.ensure_future(self._abort.wait())
        try:
            done, _ = await asyncio.wait({task, aborter}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            task.cancel()
            if aborter in done:
                raise _Aborted(what)
            raise DriverFault(f"{what} gave no answer within {timeout_s:.3g} s (watchdog)")
        finally:
            aborter.cancel()
            if not task.done():
                task.cancel()

    async def _blank(self, why: str) -> bool:
        """Blank the beam; a failure is logged, never raised. Returns whether it worked."""
        try:
            await asyncio.wait_for(self.driver.blank(), timeout=self.gate.config.watchdog_s)
            return True
        except Exception as exc:  # noqa: BLE001 - blanking is best effort on a failing device
            log.error("blank (%s) failed: %r", why, exc)
            self._log_interruption("blank_failed", f"{why}: {exc!r}", self.sm.state.value)
            return False

    async def _analyse(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _timeout_for(self, cmd: BeamCommand) -> float:
        wd = self.gate.config.watchdog_s
        if isinstance(cmd, ScanRegion):
            return cmd.geometry.frame_time_s + wd
        if isinstance(cmd, Park):
            return cmd.dwell_s + wd
        return wd

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
        self.gate.record(cmd, now)
        self.summary.commands_sent += 1
        self.writer.write_command(cmd, outcome="sent", t_s=now)
        if isinstance(cmd, ScanRegion):
            frame = await self._guard(lambda: self.driver.acquire(cmd.geometry), self._timeout_for(cmd), "acquire")
            self._last_geometry = cmd.geometry
            return frame
        if isinstance(cmd, Park):
            result = await self._guard(lambda: self.driver.park(cmd.position_A, cmd.dwell_s), self._timeout_for(cmd), "park")
            self.summary.parks += 1
            sig = np.asarray(result.signal, dtype=np.float64)
            self.writer.write_event(
                "parks",
                {
                    "position_A": list(result.position_A),
                    "dwell_s": result.dwell_s,
                    "start_time_s": result.start_time_s,
                    "sample_interval_s": result.sample_interval_s,
                    "signal": sig,
                },
                sync=True,
            )
            return None
        await self._blank("policy asked")
        return None

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
                "center_A": list(frame.geometry.center_A),
                "t_s": frame.end_time_s,
            },
        )
        self.telemetry.publish("decision", {"frame_index": frame.index, **decision.to_dict()})
        self._last_obs = obs
        self._policy_done = decision.reason if decision.stop else None
        return decision.command

    # --- the loop ------------------------------------------------------------------------------
    async def _wait_while_held(self) -> None:
        """Paused or faulted: beam blanked; wait for resume, stop, abort or the device to return."""
        while not (self._stop_requested or self._abort.is_set()):
            if self.sm.state == AgentState.FAULTED:
                try:
                    await asyncio.wait_for(self.driver.connect(), timeout=self.gate.config.watchdog_s)
                    await asyncio.wait_for(self.driver.capabilities(), timeout=self.gate.config.watchdog_s)
                    self._log_interruption("recovered", "device answers again", self.sm.state.value)
                    if self._pause_requested or not self.auto_resume_after_fault:
                        self._set_state(AgentState.PAUSED, "device back; operator pause in force")
                    else:
                        self._set_state(AgentState.RUNNING, "device back")
                        return
                except Exception as exc:  # noqa: BLE001 - still down; try again later
                    log.info("device still unavailable: %r", exc)
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), timeout=self.retry_s)
                    except asyncio.TimeoutError:
                        pass
                    continue
            if self.sm.state == AgentState.PAUSED:
                if not self._pause_requested:
                    self._set_state(AgentState.RUNNING, "operator resume")
                    return
                self._wake.clear()
                await self._wake.wait()
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
                await asyncio.wait_for(self.driver.connect(), timeout=self.gate.config.watchdog_s)
                await self._blank("start")
                self._set_state(AgentState.RUNNING, "started")
            except Exception as exc:  # noqa: BLE001
                await self._fault(exc)
            cmd: BeamCommand = ScanRegion(self.initial_scan)
            refusals = 0
            while self.summary.frames < self.max_frames:
                if self._abort.is_set():
                    raise _Aborted("abort requested")
                if self._stop_requested:
                    reason = "operator stop"
                    break
                if self._pause_requested and self.sm.state == AgentState.RUNNING:
                    self.summary.pauses += 1
                    await self._blank("pause")
                    self._set_state(AgentState.PAUSED, "operator pause")
                if self.sm.state in (AgentState.PAUSED, AgentState.FAULTED):
                    await self._wait_while_held()
                    continue
                try:
                    refused_before = self.summary.commands_refused
                    frame = await self._execute(cmd)
                    if self.summary.commands_refused > refused_before:
                        refusals += 1
                        if refusals >= self.max_consecutive_refusals:
                            reason = f"{refusals} commands in a row refused by the safety gate"
                            break
                        if self._last_obs is None:
                            reason = "the initial scan was refused by the safety gate"
                            break
                        cmd = await self._ask_again()
                        if self._policy_done is not None:
                            reason = f"policy done: {self._policy_done}"
                            break
                        continue
                    refusals = 0
                    if frame is None:  # a park or a blank: look at the same field again
                        cmd = ScanRegion(self._last_geometry)
                        continue
                    cmd = await self._process(frame)
                    if self._policy_done is not None:  # the policy has nothing more to do
                        reason = f"policy done: {self._policy_done}"
                        break
                except _Aborted:
                    raise
                except EndOfData as exc:
                    reason = f"end of data: {exc}"
                    break
                except (DriverFault, asyncio.TimeoutError, ConnectionError) as exc:
                    await self._fault(exc)
                except StemAgentError as exc:  # bad input from a stage (e.g. an invalid frame)
                    self._log_interruption("bad_input", str(exc), self.sm.state.value)
                    self.telemetry.publish("error", {"error": str(exc)})
                    cmd = ScanRegion(self._last_geometry)
            else:
                reason = f"reached max_frames={self.max_frames}"
        except _Aborted as exc:
            exit_status, reason = "abort", f"aborted: {exc}"
        except Exception as exc:  # noqa: BLE001 - the agent never crashes out without blanking and closing
            log.exception("agent loop failed")
            exit_status, reason = "fail", f"unexpected error: {exc!r}"
        finally:
            blanked = await self._blank("end of run")
            self.summary.beam_blanked_at_end = blanked
            final = AgentState.ABORTED if exit_status != "success" else AgentState.STOPPED
            if final == AgentState.STOPPED:
                if self.sm.state != AgentState.STOPPING:
                    self._set_state(AgentState.STOPPING, reason or "stop")
            self._set_state(final, reason or final.value)
            self.summary.reason = reason
            self.summary.max_dose_e_per_A2 = self.gate.max_dose_e_per_A2
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
        return self.summary

    async def _ask_again(self) -> BeamCommand:
        """A command was refused: ask the policy again on the last observation, marked as such."""
        obs = self._last_obs
        assert obs is not None
        obs.features["refused"] = np.ones(1)
        decision: Decision = await self._analyse(self.policy.decide, obs)
        self.writer.write_decision(decision, obs.frame_index)
        self._policy_done = decision.reason if decision.stop else None
        return decision.command
