"""Run an agent on its configuration and record what its policy saw per decision: the per-atom
features of each observation (copied) and its atom count, for the loop tests of the stages."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from stemagent.agent.app.factory import build_agent, build_clock
from stemagent.config import RunConfig


def run_recording_policy_inputs(cfg: RunConfig, run_dir: Path) -> tuple[str, list[dict]]:
    """The run's log path and, per decision, ``{feature: array, ..., "n": atoms}``; the run must succeed."""
    seen: list[dict] = []

    async def go() -> str:
        agent = await build_agent(cfg, run_dir=run_dir, clock=build_clock(cfg))
        decide = agent.policy.decide

        def spy(obs):
            seen.append({k: np.asarray(v).copy() for k, v in obs.atom_features.items()} | {"n": len(obs.atoms)})
            return decide(obs)

        agent.policy.decide = spy
        summary = await agent.run()
        assert summary.exit_status == "success", summary.reason
        return summary.log_path

    return asyncio.run(go()), seen
