"""A manipulation experiment: survey, then park → signal → (confirmation scan) → next park.

This is the park-observation hook the agent loop does not have yet: after a park it hands the
:class:`~stemagent.types.ParkResult` to :meth:`ManipulationPolicy.observe_park`, and after a
(confirmation) frame it hands the segmented atoms to :meth:`ManipulationPolicy.decide`; every
command goes through the :class:`~stemagent.agent.safety.SafetyGate` first, and a refusal ends
the experiment, and so does a driver fault, a timeout (expected duration plus ``watchdog_s``) or a
bad frame (there is no reconnect here). Whatever ends it, the beam is blanked and the log closed
with the reason. When the loop gains
a pipeline with a park hook this module's body folds into it; until then it is how
``configs/twin-manipulation.yaml`` runs::

    python -m stemagent.agent.manipulation --config configs/twin-manipulation.yaml

Run log streams (besides frames, atoms, decisions, commands, parks, safety): ``parks_seen``
(steps found in each park signal), ``outcomes`` (what each checked park did, with the moves and
their times), ``plans`` (every path, re-plan, target refusal and the stop with its counters).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from stemagent.agent.safety import SafetyGate
from stemagent.clock import Clock
from stemagent.config import RunConfig, load_config
from stemagent.driver import Driver, DriverFault
from stemagent.errors import ConfigError, StemAgentError
from stemagent.policies.manipulation.policy import ManipulationPolicy
from stemagent.runlog import RunLogWriter
from stemagent.stages import Observation, Segmenter
from stemagent.types import Blank, BeamCommand, Decision, Park, ScanGeometry, ScanRegion


@dataclass
class ManipulationResult:
    stop_reason: str
    stats: dict[str, float]
    decision_times_s: list[float] = field(default_factory=list)  # wall time of each policy call
    decision_cpu_s: list[float] = field(default_factory=list)  # CPU time of the same calls (this thread)
    commands: int = 0
    refused: bool = False
    failed: bool = False  # a driver fault, a timeout or bad input ended it
    beam_blanked_at_end: bool = True
    log_path: str = ""
    sim_time_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        t = np.asarray(self.decision_times_s) if self.decision_times_s else np.zeros(1)
        c = np.asarray(self.decision_cpu_s) if self.decision_cpu_s else np.zeros(1)
        return {
            "stop_reason": self.stop_reason,
            "stats": self.stats,
            "commands": self.commands,
            "refused": self.refused,
            "failed": self.failed,
            "beam_blanked_at_end": self.beam_blanked_at_end,
            "decision_ms_p50": float(np.percentile(t, 50) * 1e3),
            "decision_ms_p95": float(np.percentile(t, 95) * 1e3),
            "decision_cpu_ms_p50": float(np.percentile(c, 50) * 1e3),
            "decision_cpu_ms_p95": float(np.percentile(c, 95) * 1e3),
            "log_path": self.log_path,
            "sim_time_s": self.sim_time_s,
        }


async def run_manipulation(
    *,
    driver: Driver,
    segmenter: Segmenter,
    policy: ManipulationPolicy,
    gate: SafetyGate,
    clock: Clock,
    survey: ScanGeometry,
    writer: RunLogWriter | None = None,
    max_commands: int = 100000,
    watchdog_s: float = 30.0,
    on_command: Any = None,
) -> ManipulationResult:
    """Drive ``driver`` through ``policy`` until it is done (see the module docstring).

    ``on_command(cmd, result)`` (optional) sees every executed command and what came back
    (a Frame, a ParkResult or None), e.g. for a benchmark's ground-truth bookkeeping."""
    result = ManipulationResult(stop_reason="", stats={})
    t_sim0 = clock.monotonic()
    cmd: BeamCommand = ScanRegion(survey)
    last_obs: Observation | None = None
    try:
        await asyncio.wait_for(driver.connect(), timeout=watchdog_s)
        await asyncio.wait_for(driver.blank(), timeout=watchdog_s)
        while result.commands < max_commands:
            now = clock.monotonic()
            verdict = gate.check(cmd, now)
            if not verdict.allowed:
                result.refused = True
                if writer is not None:
                    writer.write_safety(verdict="refused", rule=verdict.rule, detail=verdict.detail, t_s=now)
                    writer.write_command(cmd, outcome="refused", t_s=now, detail=verdict.detail)
                obs = last_obs or Observation(0, now, survey, _no_atoms())
                obs.features["refused"] = np.ones(1)
                _log_decision(writer, policy.decide(obs), -1)
                result.stop_reason = f"safety gate refused ({verdict.rule}): {verdict.detail}"
                break
            gate.record(cmd, now)
            result.commands += 1
            if writer is not None:
                writer.write_command(cmd, outcome="sent", t_s=now)
            if isinstance(cmd, Blank):
                await asyncio.wait_for(driver.blank(), timeout=watchdog_s)
                result.stop_reason = policy.stop_reason or "policy blanked"
                break
            if isinstance(cmd, ScanRegion):
                frame = await asyncio.wait_for(driver.acquire(cmd.geometry), timeout=cmd.geometry.frame_time_s + watchdog_s)
                if on_command is not None:
                    on_command(cmd, frame)
                atoms = segmenter.find(frame)
                obs = Observation(frame.index, frame.end_time_s, frame.geometry, atoms,
                                  features={"frame_dose_e_per_A2": np.asarray([frame.dose_e_per_A2])})
                last_obs = Observation(frame.index, frame.end_time_s, frame.geometry, atoms)
                t0, c0 = time.perf_counter(), time.thread_time()
                decision = policy.decide(obs)
                dt, dc = time.perf_counter() - t0, time.thread_time() - c0
                if writer is not None:
                    writer.write_frame(frame)
                    writer.write_atoms(atoms)
                frame_index = frame.index
            elif isinstance(cmd, Park):
                park = await asyncio.wait_for(driver.park(cmd.position_A, cmd.dwell_s), timeout=cmd.dwell_s + watchdog_s)
                if on_command is not None:
                    on_command(cmd, park)
                t0, c0 = time.perf_counter(), time.thread_time()
                decision = policy.observe_park(park)
                dt, dc = time.perf_counter() - t0, time.thread_time() - c0
                if writer is not None:
                    writer.write_event("parks", {
                        "position_A": list(park.position_A), "dwell_s": park.dwell_s, "start_time_s": park.start_time_s,
                        "sample_interval_s": park.sample_interval_s, "dose_e_per_A2": park.dose_e_per_A2,
                        "signal": np.asarray(park.signal, dtype=np.float64)}, sync=True)
                frame_index = -1
            else:  # pragma: no cover - BeamCommand is a closed union
                raise TypeError(f"unknown command {cmd!r}")
            result.decision_times_s.append(dt)
            result.decision_cpu_s.append(dc)
            _log_decision(writer, decision, frame_index)
            for stream, doc in policy.drain_events():
                if writer is not None:
                    writer.write_event(stream, doc)
            cmd = decision.command
        else:
            result.stop_reason = f"max_commands={max_commands} reached"
    except (DriverFault, asyncio.TimeoutError, ConnectionError, StemAgentError) as exc:
        # a lost device or a bad frame ends the experiment (no reconnect here: the agent loop has that)
        result.failed = True
        result.stop_reason = f"fault: {exc!r}"
    except BaseException as exc:
        result.failed = True
        result.stop_reason = f"unexpected error: {exc!r}"
        raise
    finally:
        try:
            await asyncio.wait_for(driver.blank(), timeout=watchdog_s)
        except Exception as exc:  # noqa: BLE001 - report, never hide the original error
            result.beam_blanked_at_end = False
            result.stop_reason = (result.stop_reason + f"; blank failed: {exc!r}").strip("; ")
        result.stats = policy.stats.to_dict()
        result.sim_time_s = clock.monotonic() - t_sim0
        if writer is not None:
            for stream, doc in policy.drain_events():
                writer.write_event(stream, doc)
            result.log_path = str(writer.path)
            writer.close("fail" if (result.refused or result.failed) else "success", result.stop_reason or policy.stop_reason)
    return result


def _no_atoms() -> Any:
    from stemagent.types import Atoms

    return Atoms(np.zeros((0, 2)), np.zeros(0, int), np.zeros(0), 0)


def _log_decision(writer: RunLogWriter | None, decision: Decision, frame_index: int) -> None:
    if writer is not None:
        writer.write_decision(decision, frame_index)


async def run_from_config(cfg: RunConfig, run_dir: Path | None = None, *, driver: Driver | None = None,
                          clock: Clock | None = None) -> ManipulationResult:
    """Build the driver (unless given, with its clock), segmenter, gate and policy of ``cfg`` and
    run one experiment with a run log. ``cfg.policy`` must be ``kind: manipulation``."""
    from stemagent.agent.factory import build_clock, build_driver, build_segmenter, new_run_dir, run_metadata

    if cfg.policy.kind != "manipulation":
        raise ConfigError("<config>", "policy.kind", cfg.policy.kind, "must be 'manipulation' for a manipulation experiment")
    clock = clock or build_clock(cfg)
    driver = driver or build_driver(cfg, clock)
    await driver.connect()
    caps = await driver.capabilities()
    writer = RunLogWriter(run_dir or new_run_dir(cfg), run_metadata(cfg, caps.beam_current_pA, {"experiment": "manipulation"}),
                          fsync=cfg.log.fsync)
    try:
        return await run_manipulation(
            driver=driver, segmenter=build_segmenter(cfg), policy=ManipulationPolicy(cfg.policy, seed=cfg.seed),  # type: ignore[arg-type]
            gate=SafetyGate(cfg.safety, beam_current_pA=caps.beam_current_pA), clock=clock, survey=cfg.scan.geometry(),
            writer=writer, watchdog_s=cfg.safety.watchdog_s,
        )
    finally:
        if not writer.closed:
            writer.close("fail", "experiment did not finish")
        await driver.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stemagent.agent.manipulation", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, type=Path)
    ap.add_argument("--out", type=Path, default=None, help="run log folder (default: log.directory/<name>-<time>-<id>)")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config)
        if cfg.policy.kind != "manipulation":
            raise ConfigError(str(args.config), "policy.kind", cfg.policy.kind, "must be 'manipulation'")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    res = asyncio.run(run_from_config(cfg, args.out))
    print(json.dumps(res.to_dict(), indent=1))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
