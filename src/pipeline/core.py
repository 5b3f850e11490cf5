"""The pipeline: an ordered composition of stages, each a pure step on an :class:`Observation`.

A :class:`Stage` has a ``name`` and ``process(obs) -> obs``: it reads what earlier stages put
into the observation and adds its own results (atoms, a drift estimate, per-atom features, a
decision). Stages never touch a driver, a clock or a file; the agent runs the whole pipeline in
an executor (:meth:`Pipeline.run`) and does only I/O, control and safety itself.

A stage may also implement

- ``process_park(obs) -> obs``: called for a park observation (``obs.kind == "park"``); stages
  without it are skipped for parks;
- ``to_device(command, start_s) -> (command, record)``: called by the agent on the command it is
  about to send, at the time it will act (a drift stage converts sample-frame positions to beam
  positions); ``record`` is a JSON-able document logged with the command;
- ``close()``: release what it holds (called once when the run ends);
- ``stream`` and ``log_document(obs) -> dict | None``: a run-log stream of the stage's own
  (e.g. ``motifs``: per-atom labels); the agent writes each observation's document there
  (:meth:`Pipeline.documents`).

Each stage is switched and guarded by its :class:`StageOptions` (``pipeline.stages.<name>`` in
the run config): ``enabled: false`` leaves it out without a code change; ``on_error`` says what
a stage that raises does to the run: ``skip`` (the default) records the error in ``obs.errors``
and goes on without that stage's output for this observation; ``stop`` raises
:class:`StageFailed`, which ends the run. Every stage's wall time goes into ``obs.timings_ms``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from stemagent.config import StageOptions
from stemagent.errors import StemAgentError
from stemagent.stages import Observation
from stemagent.types import BeamCommand


@runtime_checkable
class Stage(Protocol):
    """One step of the pipeline. ``process`` is pure and synchronous (no I/O, no clock)."""

    name: str

    def process(self, obs: Observation) -> Observation: ...


class StageFailed(StemAgentError):
    """A stage with ``on_error: stop`` raised; the run ends (the beam is blanked, the log closed)."""

    def __init__(self, stage: str, error: BaseException) -> None:
        self.stage = stage
        self.error = error
        super().__init__(f"stage {stage!r} failed: {type(error).__name__}: {error}")


@dataclass(frozen=True)
class DeviceCommand:
    """A command as it goes to the device, with what each converting stage did to it."""

    command: BeamCommand
    records: dict[str, Any]


class Pipeline:
    """Run ``stages`` in order on every observation (see the module docstring).

    ``options``: per stage name; a stage without an entry is on with ``on_error: skip``.
    ``wall``: the clock of the stage timings (``time.perf_counter``; injected in tests).
    """

    def __init__(
        self,
        stages: Sequence[Stage],
        options: dict[str, StageOptions] | None = None,
        *,
        wall: Callable[[], float] = time.perf_counter,
    ) -> None:
        opts = dict(options or {})
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique: {names}")
        unknown = sorted(set(opts) - set(names))
        if unknown:
            raise ValueError(f"{unknown} name no stage of this pipeline (its stages: {names})")
        self.options = {n: opts.get(n, StageOptions()) for n in names}
        self.stages = [s for s in stages if self.options[s.name].enabled]
        self.disabled = [n for n in names if not self.options[n].enabled]
        self._wall = wall

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def stage(self, name: str) -> Any:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def run(self, obs: Observation, only: Sequence[str] | None = None) -> Observation:
        """Every enabled stage (or those named in ``only``) on ``obs`` in order (``process_park``
        for a park observation)."""
        for stage in self.stages:
            if only is not None and stage.name not in only:
                continue
            step = stage.process if obs.kind == "frame" else getattr(stage, "process_park", None)
            if step is None:
                continue
            t0 = self._wall()
            try:
                obs = step(obs)
            except Exception as exc:  # noqa: BLE001 - a stage's bug is reported, never crashes the agent
                obs.timings_ms[stage.name] = 1e3 * (self._wall() - t0)
                if self.options[stage.name].on_error == "stop":
                    raise StageFailed(stage.name, exc) from exc
                obs.errors[stage.name] = f"{type(exc).__name__}: {exc}"[:1000]
                continue
            obs.timings_ms[stage.name] = 1e3 * (self._wall() - t0)
        return obs

    def to_device(self, command: BeamCommand, start_s: float) -> DeviceCommand:
        """``command`` through every enabled stage's ``to_device`` (in pipeline order)."""
        records: dict[str, Any] = {}
        for stage in self.stages:
            convert = getattr(stage, "to_device", None)
            if convert is None:
                continue
            command, record = convert(command, start_s)
            if record:
                records[stage.name] = record
        return DeviceCommand(command, records)

    def documents(self, obs: Observation) -> list[tuple[str, dict[str, Any]]]:
        """``(stream, document)`` of every enabled stage with a stream of its own, for ``obs``."""
        out = []
        for stage in self.stages:
            document = getattr(stage, "log_document", None)
            if document is None:
                continue
            doc = document(obs)
            if doc is not None:
                out.append((str(getattr(stage, "stream", stage.name)), doc))
        return out

    def document_streams(self) -> tuple[str, ...]:
        """The run-log streams of the enabled stages that write documents of their own."""
        return tuple(str(getattr(s, "stream", s.name)) for s in self.stages if getattr(s, "log_document", None) is not None)

    def close(self) -> None:
        for stage in self.stages:
            closer = getattr(stage, "close", None)
            if closer is not None:
                closer()

    def describe(self) -> dict[str, Any]:
        """What the run log's start document records about the pipeline (for ``replay --verify``)."""
        return self.plan([s.name for s in self.stages] + self.disabled, self.options)

    @staticmethod
    def plan(names: Sequence[str], options: dict[str, StageOptions] | None = None) -> dict[str, Any]:
        """:meth:`describe` of a pipeline of stages ``names`` before it is built."""
        opts = {n: (options or {}).get(n, StageOptions()) for n in names}
        return {
            "stages": [n for n in names if opts[n].enabled],
            "disabled": [n for n in names if not opts[n].enabled],
            "options": {n: o.model_dump() for n, o in opts.items()},
        }
