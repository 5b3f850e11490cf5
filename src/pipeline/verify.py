"""Verified replay: run a log's observations through a pipeline again and compare every output.

:func:`verify_log` walks the run log in the order it was written and re-runs the pipeline on
each observation the run analysed (the ``pipeline`` stream says which: a ``frame``, a ``park``,
or a ``refused`` re-ask of the policy on the last frame), with what the stages saw then: the
logged frame (image from the store), the park results since the last frame, the operator's
target (``controls``: ``set_target``), ``refused`` on a re-ask, ``replaced`` after a command a
stage replaced (``commands``: a ``converted`` record with ``replaced``). It compares what the run logged
with what the pipeline gives now:

- ``atoms``: the segmenter's atoms (positions, classes, confidence, ...);
- ``records.<stage>``: every stage's record (drift estimate, motif counts, boundary traces,
  policy events), and ``errors`` (which stages failed);
- ``decision``: the policy's command, reason, scores and details;
- ``<stream>`` (``drift``, ``motifs``, ``latents``: every stream of the pipeline's stages): the
  documents of the stages' own streams (the drift estimate and its band, per-atom labels, rVAE
  latents), less their wall-clock timings (top-level fields ending in ``_ms``), which no re-run
  reproduces.

Frames the run did not analyse (dropped by the newest-wins slot, bad input) have no pipeline
event and are skipped, exactly as the run skipped them; so are their parks' missing decisions.
Logs written before the ``pipeline`` stream existed (format 1 and 2) are verified on what they
hold: each ``atoms`` event is a frame observation, and its decision the one that follows.

Numbers are compared exactly unless ``rtol`` is given (a log replayed on another device: GPU
against CPU). Every comparison goes through the run log's own JSON encoding, so a value
compares equal to itself written and read back. Nothing here touches a driver or a clock.

Segmenting ahead (``overlap``, on by default): the first stage, when it is the segmenter, is a
function of the frame alone, so a worker thread reads the next frames the log analysed and
segments them, in log order and one at a time (the segmenter's own state evolves as in the
run), while the main thread runs the later stages of the frame before and compares. Every
stage still runs on every observation and every output is still compared; torch and the
frame store's decoding release the GIL, so on two cores the segmenter's time mostly hides the
rest. (torch's thread count is per thread: the worker keeps the one the segmenter was built
with, whatever a later stage sets for itself on the main thread.) A segmenter that declares
``per_frame`` (its atoms depend on the frame alone: the U-Net) is run on two workers, each with
its own copy of the segment stage, on two frames at once; the results are still handed over
and compared in the log's order. A segmenter without it keeps one worker and the log's order.

The later stages ahead (``staged``; with ``overlap``, by default where each thread has a core): the stages after the segmenter and
before the policy (drift, encoding, rVAE: :func:`ahead_chain`) run each on one thread of its
own, in the log's order, frame n + 1 in drift while frame n is in encoding and frame n - 1 in
the rVAE, a few frames ahead of the walk (bounded); the policy, which alone sees parks, refusals
and the walk's inputs (target, replaced commands, parks since the frame before), stays on the
main thread with the comparisons. A stage's conversions of the commands logged before a frame
are handed back to it on its own thread right before that frame, as the serial walk hands them
back. Note: a stage that limits the BLAS/OpenMP pools (the encoding stage's ``threadpoolctl``
limit) limits them for the whole process while it runs, so the drift and rVAE stages' numpy calls
may then run on fewer BLAS threads than in the run (as they do in the run while a background
recluster holds the limit); every replay below compared equal, and a difference would be reported, not hidden.
"""

from __future__ import annotations

import copy
import json
import math
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from stemagent.codec import encode_atoms, encode_decision
from stemagent.errors import InputError
from stemagent.pipeline.core import Pipeline
from stemagent.pipeline.stages import SegmentStage
from stemagent.runlog import RunLog
from stemagent.runlog.writer import jsonable
from stemagent.stages import Observation, no_atoms
from stemagent.types import Frame, ParkResult

#: what an atoms event holds besides the atoms (not compared)
_ATOMS_META = ("n_atoms",)


@dataclass
class Divergence:
    """One difference: observation number ``index`` (0-based, in log order), what it was, the frame
    it belongs to, the field (a dotted path, list positions in brackets) and both values."""

    index: int
    observation: str
    frame_index: int
    field: str
    logged: Any
    replayed: Any

    def describe(self) -> str:
        return (f"observation {self.index} ({self.observation} of frame {self.frame_index}): {self.field}: "
                f"logged {_short(self.logged)}, replayed {_short(self.replayed)}")


@dataclass
class VerifyReport:
    """What :func:`verify_log` found. ``divergences``: the first difference of each observation
    that differs (at most ``max_divergences``); ``skipped``: frames the run did not analyse, with why."""

    observations: int = 0
    frames: int = 0
    parks: int = 0
    refused: int = 0
    differing: int = 0
    divergences: list[Divergence] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    compared: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    run_span_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    #: CPU time (s) of the main thread, of the workers that segment ahead (0 without them) and of
    #: each stage's own thread when the later stages run ahead too (keyed by stage name)
    cpu_s: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.differing == 0 and not self.unreadable

    @property
    def speed(self) -> float:
        """The run's acquisition time span over the verification's wall time (``x real time``)."""
        return self.run_span_s / self.elapsed_s if self.elapsed_s > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "observations": self.observations, "frames": self.frames, "parks": self.parks,
            "refused": self.refused, "differing_observations": self.differing,
            "first_divergence": self.divergences[0].describe() if self.divergences else "",
            "divergences": [d.describe() for d in self.divergences], "frames_skipped": len(self.skipped),
            "skipped": self.skipped[:20], "frames_unreadable": len(self.unreadable), "unreadable": self.unreadable[:20],
            "compared": dict(self.compared), "elapsed_s": self.elapsed_s, "run_span_s": self.run_span_s,
            "x_real_time": self.speed if math.isfinite(self.speed) else None, "notes": self.notes, "cpu_s": dict(self.cpu_s),
        }


def _short(value: Any, limit: int = 120) -> str:
    text = json.dumps(value, separators=(",", ":")) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def plain(value: Any) -> Any:
    """``value`` as the run log writes and reads it (JSON types; non-finite floats as strings)."""
    return json.loads(json.dumps(jsonable(value), allow_nan=False))


def _numpy_plain(value: Any) -> Any:
    """``json.dumps``'s ``default`` for :func:`same_text`: numpy values as :func:`jsonable` converts them."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def _text(value: Any) -> str:
    return json.dumps(value, allow_nan=False, default=_numpy_plain, separators=(",", ":"))


def same_text(logged: Any, replayed: Any) -> bool:
    """True when both values have the same JSON text, which implies :func:`first_difference` of
    their :func:`plain` forms finds nothing (for any ``rtol``); False says nothing (non-finite
    floats, key order, ``1`` against ``1.0``, ...): the caller then compares field by field.

    The fast path of :meth:`_Verifier.compare`: ``json.dumps`` walks large lists in C, where
    :func:`plain` walks them element by element in Python (most of a replay's time on 1000-atom
    frames before it existed)."""
    try:
        return _text(logged) == _text(replayed)
    except (TypeError, ValueError):  # NaN or infinity (jsonable writes them as strings), or not JSON
        return False


#: numbers above this magnitude (2**53) are not all exact as float64: :func:`same_values` leaves them to the walk
_EXACT_FLOAT = 2.0**53


def _number_array(value: Any) -> np.ndarray | None:
    """``value`` (a list, tuple or array of numbers, nested) as one numeric array, or None when it is
    not one (strings, dicts, None, ragged nesting, integers too large for exact float64)."""
    if isinstance(value, np.ndarray):
        arr = value
    else:
        first = value[0]
        while isinstance(first, (list, tuple)) and first:
            first = first[0]
        if not isinstance(first, (int, float, np.number)):  # a list of dicts or strings: not numeric
            return None
        try:
            arr = np.asarray(value)
        except (ValueError, TypeError):  # ragged
            return None
    if arr.dtype.kind not in "biuf":
        return None
    if arr.dtype.kind == "f" and arr.size and not np.all(np.abs(arr) < _EXACT_FLOAT):
        return None  # non-finite (written as strings), or beyond exact integers: the walk decides
    return arr


#: element types :func:`_plain_array` compares with Python's ``==`` (the walk's own comparison of them)
_PLAIN_LEAVES = frozenset({float, int, str, bool, type(None)})


def _plain_array(value: Any) -> np.ndarray | None:
    """``value`` (a list or tuple, nested, of Python floats, ints, strings, booleans and None: the
    latents with ``null`` where not encoded) as an object array, or None when it holds anything
    else (numpy scalars compare in their own precision; dicts and lists need the walk)."""
    if isinstance(value, np.ndarray):
        return None
    try:
        arr = np.array(value, dtype=object)
    except ValueError:  # ragged
        return None
    return arr if _PLAIN_LEAVES.issuperset(map(type, arr.ravel())) else None


def _scalar_array(value: Any) -> bool:
    return isinstance(value, np.ndarray) and value.ndim == 0


def same_values(logged: Any, replayed: Any) -> bool:
    """True when ``first_difference(plain(logged), plain(replayed))`` certainly finds nothing (for
    any ``rtol``): the same keys (str) and, leaf by leaf, equal numbers, strings, booleans and
    None; lists of numbers (nested) are compared as numpy arrays, exactly (a float64 read back from
    the log equals the value written, and a float32 equals its float64). False says nothing: the
    caller then tries :func:`same_text` and compares field by field.

    The fast path of :meth:`_Verifier.compare`: a 1000-atom frame's atoms, motifs and latents
    compare in ~1 ms, where writing both sides as JSON text (:func:`same_text`) took ~35 ms."""
    if isinstance(logged, dict):
        if not isinstance(replayed, dict) or len(logged) != len(replayed):
            return False
        for key, value in logged.items():
            if not isinstance(key, str) or key not in replayed or not same_values(value, replayed[key]):
                return False
        return True
    if isinstance(logged, (list, tuple, np.ndarray)):
        if (not isinstance(replayed, (list, tuple, np.ndarray)) or _scalar_array(logged) or _scalar_array(replayed)
                or len(logged) != len(replayed)):
            return False  # a 0-d array is a number to the log: the walk decides
        if len(logged) == 0:
            return True
        a = _number_array(logged)
        b = _number_array(replayed) if a is not None else None
        if a is not None and b is not None:
            if a.shape != b.shape or (a.dtype.kind in "biu") != (b.dtype.kind in "biu"):
                return False  # int against float: the walk decides (exactness)
            return bool(np.array_equal(a, b))
        a, b = _plain_array(logged), _plain_array(replayed)
        if a is not None and b is not None and a.shape == b.shape:
            return bool((a == b).all())
        return all(same_values(x, y) for x, y in zip(logged, replayed))
    if isinstance(logged, (str, type(None))) or isinstance(replayed, (str, type(None))):
        return type(logged) is type(replayed) and logged == replayed
    if isinstance(logged, (bool, np.bool_)) or isinstance(replayed, (bool, np.bool_)):
        return isinstance(logged, (bool, np.bool_)) and isinstance(replayed, (bool, np.bool_)) and bool(logged) == bool(replayed)
    if isinstance(logged, (int, np.integer)) and isinstance(replayed, (int, np.integer)):
        return int(logged) == int(replayed)
    real = (int, float, np.integer, np.floating)
    if isinstance(logged, real) and isinstance(replayed, real):
        x, y = float(logged), float(replayed)  # an int beside a float: exact only below 2**53
        return abs(x) < _EXACT_FLOAT and abs(y) < _EXACT_FLOAT and x == y
    return False


def first_difference(logged: Any, replayed: Any, path: str = "", rtol: float = 0.0) -> tuple[str, Any, Any] | None:
    """The first place where two plain JSON values differ: ``(path, logged, replayed)``, or None."""
    if isinstance(logged, dict) and isinstance(replayed, dict):
        for key in list(logged) + [k for k in replayed if k not in logged]:
            where = f"{path}.{key}" if path else str(key)
            if key not in logged or key not in replayed:
                return where, logged.get(key, "<absent>"), replayed.get(key, "<absent>")
            found = first_difference(logged[key], replayed[key], where, rtol)
            if found is not None:
                return found
        return None
    if isinstance(logged, list) and isinstance(replayed, list):
        if len(logged) != len(replayed):
            return f"{path} (length)", len(logged), len(replayed)
        for i, (a, b) in enumerate(zip(logged, replayed)):
            found = first_difference(a, b, f"{path}[{i}]", rtol)
            if found is not None:
                return found
        return None
    numbers = (int, float)
    if (isinstance(logged, numbers) and isinstance(replayed, numbers) and not isinstance(logged, bool)
            and not isinstance(replayed, bool)):
        if logged == replayed or (rtol > 0 and math.isclose(logged, replayed, rel_tol=rtol, abs_tol=rtol)):
            return None
        return path, logged, replayed
    return None if logged == replayed else (path, logged, replayed)


@dataclass
class _Expected:
    """What the replay of one observation produced, waiting for the logged events that follow it."""

    index: int
    obs: Observation
    seen: str
    decision: dict[str, Any] | None
    documents: dict[str, dict[str, Any]]


#: what one frame's analysis ahead of the walk hands over: the frame, its observation so far, or why it could not be read
_Ahead = tuple[Frame | None, Observation | None, InputError | None]


class _SegmentAhead:
    """The pipeline's segment stage, and then each stage of ``chain`` on its own thread, on the
    frames ``order`` lists (:class:`_Frame`: in the order the replay will observe them), ``depth``
    frames ahead.

    :meth:`take` hands over the next one: ``(frame, observation after the segment stage and the
    chain)``, or the frame store's :class:`InputError` for a frame that could not be read (the
    chain's stages skip it). With one segmenting worker the frames are segmented in the log's
    order, so a segmenter with state sees its frames as in the run. More workers only for a
    segmenter that declares ``per_frame`` (its atoms depend on the frame alone): each worker
    thread then runs its own copy of the segment stage (so no worker reads another's
    ``last_report``), frames are segmented out of order, and handed over in the log's order.

    ``chain`` (the stages after the segmenter and before the first stage that sees parks: drift,
    encoding, rVAE): each on one thread of its own, so each sees every frame in the log's order,
    as in the run; frame n is in the encoding stage while frame n + 1 is in the drift stage. A
    stage's conversions of the commands logged before a frame (:attr:`_Frame.conversions`) are
    handed back to it on its thread right before that frame, where the serial replay hands them
    back (the walk does not hand them to a chain stage again)."""

    def __init__(self, log: RunLog, pipeline: Pipeline, order: list[_Frame], depth: int = 2,
                 workers: int = 1, chain: tuple[str, ...] = ()) -> None:
        self.log = log
        self.todo = deque(order)
        self.workers = max(1, int(workers))
        self.chain = tuple(chain)
        self.depth = max(1, int(depth), self.workers + 1 if self.workers > 1 else 1, self.workers + len(self.chain) + 1 if self.chain else 1)
        self.pipeline = pipeline
        first = pipeline.stages[0]
        name = first.name
        # one pipeline per worker: the first is the replay's own, the others the segment stage alone, copied
        self._copies = [Pipeline([copy.deepcopy(first)], {name: pipeline.options[name]}) for _ in range(self.workers - 1)]
        self._spare: deque[Pipeline] = deque([pipeline, *self._copies])
        self._name = name
        self._local = threading.local()
        self._lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="verify-segment")
        # one thread per chain stage: a stage's frames run one at a time, in the order submitted
        self.stage_pools = {n: ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"verify-{n}") for n in self.chain}
        self.cpu_s = 0.0  # the segmenting workers' CPU time, together
        self.stage_cpu_s = {n: 0.0 for n in self.chain}  # each chain stage's thread's CPU time
        self.running: deque[tuple[int, list[Future[_Ahead]]]] = deque()
        self._fill()

    def _fill(self) -> None:
        while self.todo and len(self.running) < self.depth:
            item = self.todo.popleft()
            futures = [self.pool.submit(self._segment, item.data)]
            for n in self.chain:
                futures.append(self.stage_pools[n].submit(self._stage, n, futures[-1], item.conversions.get(n, [])))
            self.running.append((item.frame_index, futures))

    def _pipeline(self) -> Pipeline:
        """This worker thread's pipeline (taken from the spares on its first frame)."""
        mine = getattr(self._local, "pipeline", None)
        if mine is None:
            with self._lock:
                mine = self._local.pipeline = self._spare.popleft()
        return mine

    def _segment(self, data: dict[str, Any]) -> _Ahead:
        c0 = time.thread_time()
        try:
            frame = self.log.frame_from_data(data)
        except InputError as exc:
            return None, None, exc
        obs = Observation(frame_index=frame.index, time_s=frame.end_time_s, geometry=frame.geometry,
                          atoms=no_atoms(frame.index), frame=frame)
        try:
            return frame, self._pipeline().run(obs, (self._name,)), None
        finally:
            with self._lock:
                self.cpu_s += time.thread_time() - c0

    def _stage(self, name: str, before: Future[_Ahead], conversions: list[dict[str, Any]]) -> _Ahead:
        """Chain stage ``name`` on the frame ``before`` hands over (on that stage's own thread)."""
        c0 = time.thread_time()
        try:
            replay = getattr(self.pipeline.stage(name), "replay_conversion", None)
            if replay is not None:
                for record in conversions:
                    replay(record)
            frame, obs, error = before.result()  # the stage before raised (StageFailed): so does this frame here
            if obs is None:
                return frame, obs, error
            return frame, self.pipeline.run(obs, (name,)), error
        finally:
            self.stage_cpu_s[name] += time.thread_time() - c0

    def take(self, frame_index: int) -> _Ahead | None:
        """The next analysed frame if it is ``frame_index`` (else None: the caller goes serial);
        a stage's :class:`StageFailed` raises here, as it would have in the serial replay."""
        if not self.running or self.running[0][0] != frame_index:
            return None
        _, futures = self.running.popleft()
        self._fill()
        return futures[-1].result()

    def close(self) -> None:
        for _, futures in self.running:
            for fut in reversed(futures):
                fut.cancel()
        self.pool.shutdown(wait=True)
        for pool in self.stage_pools.values():
            pool.shutdown(wait=True)
        for mine in self._copies:
            mine.close()


@dataclass
class _Frame:
    """A frame observation :func:`verify_log` will make: its frames event, and the conversions
    (stage name -> records, in log order) of the commands logged since the observation before."""

    frame_index: int
    data: dict[str, Any]
    conversions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def _frame_order(events: list[tuple[str, dict[str, Any]]], has_pipeline: bool) -> list[_Frame]:
    """The frames :func:`verify_log` will analyse, in order: the frames event of each frame
    observation whose frame the log had written before it (what :meth:`_Verifier.frame` finds),
    with the commands' conversions logged before it (what :meth:`_Verifier.converted` hands back)."""
    frames: dict[int, dict[str, Any]] = {}
    order = []
    conversions: dict[str, list[dict[str, Any]]] = {}
    for stream, data in events:
        if stream == "frames":
            frames[int(data["frame_index"])] = data
        elif stream == "commands":
            converted = data.get("converted")
            for name, record in (converted.items() if isinstance(converted, dict) else ()):
                if isinstance(record, dict):
                    conversions.setdefault(str(name), []).append(record)
        elif (stream == "pipeline" and has_pipeline and str(data.get("observation", "frame")) == "frame") or (stream == "atoms" and not has_pipeline):
            fi = int(data.get("frame_index", -1))
            if fi in frames:
                order.append(_Frame(fi, frames[fi], conversions))
                conversions = {}
    return order


class _Verifier:
    def __init__(self, log: RunLog, pipeline: Pipeline, rtol: float, max_divergences: int) -> None:
        self.log = log
        self.pipeline = pipeline
        self.rtol = rtol
        self.max_divergences = max_divergences
        self.report = VerifyReport()
        self.frames: dict[int, dict[str, Any]] = {}
        self.analysed: set[int] = set()
        self.unreadable_frames: set[int] = set()
        self.all_frames: list[tuple[int, int]] = []  # (log_index, frame_index)
        self.parks: list[ParkResult] = log.park_results() if "parks" in log.streams() else []
        self.park_count = 0
        self.parks_since: list[ParkResult] = []
        self.target_A: tuple[float, float] | None = None
        self.replaced = False  # a logged command a stage replaced, not yet seen by an observation
        self.atoms: dict[int, dict[str, Any]] = {}
        self.last: Observation | None = None
        self.pending: _Expected | None = None
        self._differs: set[int] = set()
        self.ahead: _SegmentAhead | None = None
        self.ahead_chain: tuple[str, ...] = ()  # stages that ran on the frames ahead, after the segmenter

    def converted(self, records: dict[str, Any]) -> None:
        """A sent command's conversions, handed back to the stages that made them (a stage that
        remembers its conversions, e.g. drift mapping a frame back to the sample-frame scan it
        asked for, must see the same ones in the replay as in the run)."""
        for name, record in records.items():
            if self.ahead is not None and name in self.ahead.chain:
                continue  # handed back on the stage's own thread, before the frame it precedes (_SegmentAhead)
            try:
                stage = self.pipeline.stage(name)
            except KeyError:
                continue
            replay = getattr(stage, "replay_conversion", None)
            if replay is not None and isinstance(record, dict):
                replay(record)

    # --- differences ------------------------------------------------------------------------
    def differ(self, index: int, seen: str, frame_index: int, where: str, logged: Any, replayed: Any) -> None:
        if index not in self._differs:
            self._differs.add(index)
            self.report.differing += 1
            if len(self.report.divergences) < self.max_divergences:
                self.report.divergences.append(Divergence(index, seen, frame_index, where, logged, replayed))

    def compare(self, exp: _Expected, what: str, logged: Any, replayed: Any) -> None:
        self.report.compared[what.split(".")[0]] = self.report.compared.get(what.split(".")[0], 0) + 1
        if same_values(logged, replayed) or same_text(logged, replayed):
            return
        found = first_difference(plain(logged), plain(replayed), "", self.rtol)
        if found is not None:
            where, a, b = found
            self.differ(exp.index, exp.seen, exp.obs.frame_index, f"{what}.{where}" if where else what, a, b)

    # --- observations -----------------------------------------------------------------------
    def features(self) -> dict[str, np.ndarray]:
        """As the agent's: ``target_A``, and ``replaced`` once after a logged command a stage replaced."""
        out = {"target_A": np.asarray(self.target_A)} if self.target_A is not None else {}
        if self.replaced:
            out["replaced"] = np.ones(1)
            self.replaced = False
        return out

    def frame(self, frame_index: int) -> Frame | None:
        data = self.frames.get(frame_index)
        if data is None:
            return None
        try:
            return self.log.frame_from_data(data)
        except InputError as exc:
            self.report.unreadable.append(str(exc))
            self.unreadable_frames.add(frame_index)
            return None

    def run(self, obs: Observation, only: tuple[str, ...] | None = None) -> Observation:
        return self.pipeline.run(obs, only)

    def observe(self, seen: str, data: dict[str, Any]) -> None:
        """One logged pipeline event: re-run its observation, compare records and errors now and
        keep the decision and documents for the events that follow."""
        self.settle()
        index = self.report.observations
        self.report.observations += 1
        frame_index = int(data.get("frame_index", -1))
        if seen == "frame":
            self.report.frames += 1
            ahead = self.ahead.take(frame_index) if self.ahead is not None and frame_index in self.frames else None
            if ahead is None and self.ahead is not None and frame_index in self.frames:
                # not the frame the worker expected (cannot happen for a log read in order): serial from here
                self.ahead.close()
                self.ahead = None
                if self.ahead_chain:  # the chain's stages have seen frames beyond this one: no serial fallback
                    raise RuntimeError(f"frame {frame_index}: the replay's stages ran out of step with the log")
                self.report.notes.append(f"frame {frame_index}: segmenting ahead stopped (out of step with the log)")
            if ahead is not None:  # read and segmented by the worker (see _SegmentAhead)
                frame, segmented, error = ahead
                if error is not None:
                    self.report.unreadable.append(str(error))
                    self.unreadable_frames.add(frame_index)
            else:
                segmented = None
                frame = self.frame(frame_index)
            if frame is None:
                return
            self.analysed.add(frame_index)
            if segmented is None:
                obs = Observation(frame_index=frame.index, time_s=frame.end_time_s, geometry=frame.geometry,
                                  atoms=no_atoms(frame.index), features=self.features(), frame=frame, parks=self.parks_since)
                obs = self.run(obs)
            else:
                # the walk's features first, then what the chain's stages added (the serial order)
                obs = segmented
                obs.features, obs.parks = {**self.features(), **obs.features}, self.parks_since
                done = {self.pipeline.names[0], *self.ahead_chain}
                obs = self.run(obs, tuple(n for n in self.pipeline.names if n not in done))
            self.parks_since = []
            self.last = obs
        elif seen == "park":
            self.report.parks += 1
            k = int(data.get("park_index", -1))
            if not 0 <= k < len(self.parks):
                self.differ(index, seen, frame_index, "park_index", k, f"the log holds {len(self.parks)} parks")
                return
            last = self.last
            park = self.parks[k]
            obs = Observation(
                frame_index=last.frame_index if last is not None else -1, time_s=park.start_time_s + park.dwell_s,
                geometry=last.geometry if last is not None else _no_geometry(self.log), atoms=last.atoms if last is not None else no_atoms(),
                features=self.features(), kind="park", park=park, drift=last.drift if last is not None else None,
                atom_features=dict(last.atom_features) if last is not None else {},
            )
            obs = self.run(obs)
        else:  # refused: the policy again on the last frame's observation
            self.report.refused += 1
            last = self.last
            if last is None:
                self.differ(index, seen, frame_index, "observation", "refused", "no frame analysed before it")
                return
            obs = replace(last, features={**last.features, "refused": np.ones(1)}, decision=None, records={},
                          timings_ms={}, errors={})
            obs = self.run(obs, ("policy",))
        exp = _Expected(index, obs, seen, plain(encode_decision(obs.decision)) if obs.decision is not None else None,
                        {s: d for s, d in self.pipeline.documents(obs)} if seen != "refused" else {})
        if "records" in data:
            self.compare(exp, "records", data.get("records") or {}, obs.records)
            self.compare(exp, "errors", data.get("errors") or {}, obs.errors)
        if seen == "frame":
            logged = self.atoms.pop(frame_index, None)
            if logged is not None:
                self.compare(exp, "atoms", {k: v for k, v in logged.items() if k not in _ATOMS_META},
                             {k: v for k, v in encode_atoms(obs.atoms).items() if k not in _ATOMS_META})
            elif len(obs.atoms):
                self.differ(index, seen, frame_index, "atoms", "<no atoms event>", f"{len(obs.atoms)} atoms")
        self.pending = exp

    def decision(self, data: dict[str, Any]) -> None:
        seen = str(data.get("observation", "frame"))
        exp = self.pending
        if seen == "refused" and self.last is not None and (exp is None or exp.seen != "refused" or exp.decision is None):
            # a log from before re-asks had pipeline events of their own: the decision marks the re-ask
            self.observe("refused", {"frame_index": data.get("frame_index", -1)})
            exp = self.pending
        if exp is None or exp.decision is None:
            self.differ(exp.index if exp is not None else -1, seen, int(data.get("frame_index", -1)), "decision",
                        {k: data.get(k) for k in ("command", "policy", "reason")}, None)
            return
        logged = {k: data.get(k) for k in ("command", "policy", "reason", "scores")}
        if "details" in data:  # a policy's record of how it chose (the survey's): compared too
            logged["details"] = data["details"]
        self.compare(exp, "decision", logged, exp.decision)
        exp.decision = None  # matched

    def document(self, stream: str, data: dict[str, Any]) -> None:
        exp = self.pending
        if exp is None or stream not in exp.documents:
            self.differ(exp.index if exp else -1, exp.seen if exp else "?", int(data.get("frame_index", -1)), stream,
                        "<logged>", None)
            return
        self.compare(exp, stream, _untimed(data), _untimed(exp.documents.pop(stream)))

    def settle(self) -> None:
        """The observation before is complete: what it produced and the log did not hold differs."""
        exp = self.pending
        self.pending = None
        if exp is None:
            return
        if exp.decision is not None:
            self.differ(exp.index, exp.seen, exp.obs.frame_index, "decision", None, exp.decision)
        for stream, doc in exp.documents.items():
            self.differ(exp.index, exp.seen, exp.obs.frame_index, stream, None, f"{len(doc)} fields")


def _untimed(doc: dict[str, Any]) -> dict[str, Any]:
    """A stage document less its wall-clock timings (top-level ``*_ms`` fields)."""
    return {k: v for k, v in doc.items() if not str(k).endswith("_ms")}


def _no_geometry(log: RunLog) -> Any:
    raise InputError("pipeline", "park", f"{log.path}: a park observation comes before any frame")


def run_span_s(log: RunLog) -> float:
    """The acquisition time the run covered: first frame's start to the last frame's or park's end (s)."""
    starts, ends = [], []
    for d in log.event_data("frames"):
        times = d.get("line_times_s") or []
        if times:
            starts.append(float(times[0]))
            ends.append(float(times[-1]) + float(d.get("line_time_s", 0.0) or 0.0))
    for d in log.event_data("parks"):
        if "start_time_s" in d:
            ends.append(float(d["start_time_s"]) + float(d.get("dwell_s", 0.0)))
    return max(ends) - min(starts) if starts and ends else 0.0


def _walk(v: _Verifier, events: list[tuple[str, dict[str, Any]]], has_pipeline: bool) -> None:
    """Every logged event, in log order, through the verifier."""
    for stream, data in events:
        if stream == "frames":
            fi = int(data["frame_index"])
            v.frames[fi] = data
            v.all_frames.append((int(data.get("log_index", len(v.all_frames))), fi))
        elif stream == "atoms":
            fi = int(data.get("frame_index", -1))
            v.atoms[fi] = data
            if not has_pipeline:
                v.observe("frame", {"frame_index": fi})
        elif stream == "parks":
            if v.park_count < len(v.parks):
                v.parks_since.append(v.parks[v.park_count])
            v.park_count += 1
        elif stream == "commands":
            converted = data.get("converted")
            if isinstance(converted, dict) and any(isinstance(r, dict) and r.get("replaced") for r in converted.values()):
                v.replaced = True
            if isinstance(converted, dict):
                v.converted(converted)
        elif stream == "controls":
            if data.get("accepted") and data.get("command") == "set_target":
                target = (data.get("arguments") or {}).get("target_A")
                if isinstance(target, list) and len(target) == 2:
                    v.target_A = (float(target[0]), float(target[1]))
        elif stream == "pipeline":
            v.observe(str(data.get("observation", "frame")), data)
        elif stream == "decisions":
            v.decision(data)
        else:
            v.document(stream, data)


def ahead_chain(pipeline: Pipeline) -> tuple[str, ...]:
    """The stages :func:`verify_log` runs ahead of the walk, each on its own thread: those after the
    segmenter up to the first stage that sees park observations (``process_park``: the policy).
    They see the frame's observation alone; the walk's own inputs (the operator's target, a
    replaced command: ``obs.features``; the parks since the frame before: ``obs.parks``) are
    set after them, for the policy, which is the only stage that reads them."""
    out = []
    for stage in pipeline.stages[1:]:
        if getattr(stage, "process_park", None) is not None:
            break
        out.append(stage.name)
    return tuple(out)


def verify_log(log: RunLog, pipeline: Pipeline, *, rtol: float = 0.0, max_divergences: int = 50,
               streams: tuple[str, ...] | None = None, overlap: bool = True, segment_workers: int | None = None,
               staged: bool | None = None) -> VerifyReport:
    """Re-run ``pipeline`` (built from the log's own configuration, fresh) on every observation of
    ``log`` and compare (see the module docstring). ``streams``: the stages' own streams compared
    (default: every stream the pipeline's stages write). ``overlap``: segment the next frames in
    a worker thread while the later stages run (the same outputs; False: one thread).
    ``segment_workers``: threads that segment ahead; more than one only for a segmenter that
    declares ``per_frame`` (None: two for such a segmenter on a machine with two cores or more, else one).
    ``staged`` (with ``overlap``): the stages after the segmenter and before the policy (drift,
    encoding, rVAE: :func:`ahead_chain`) run ahead too, each on a thread of its own (the same
    outputs); False: they run on the main thread; None: staged only where every thread can have a
    core of its own (segmenting workers + chain stages + the main thread <= ``os.cpu_count()``): on
    2 cores the extra threads gave no consistent gain on the every-stage replay in four runs and
    cost ~8 % more CPU (BENCHMARKS.md, 2026-12-02 15:21-15:59)."""
    if segment_workers is not None and segment_workers < 1:
        raise InputError("segment_workers", segment_workers, "must be at least 1 thread")
    if streams is None:
        streams = pipeline.document_streams()
    if rtol < 0 or not math.isfinite(rtol):
        raise InputError("rtol", rtol, "must be a finite number >= 0")
    v = _Verifier(log, pipeline, rtol, max_divergences)
    has_pipeline = "pipeline" in log.streams()
    if not has_pipeline:
        v.report.notes.append(f"log version {log.start.get('stemagent_log_version')} has no pipeline stream: each atoms "
                              "event is taken as a frame observation, and only atoms and decisions are compared")
    logged_plan = log.start.get("pipeline")
    if isinstance(logged_plan, dict):
        mine = pipeline.describe()
        for key in ("stages", "disabled"):
            if key in logged_plan and list(logged_plan[key]) != list(mine[key]):
                v.differ(-1, "start", -1, f"pipeline.{key}", logged_plan[key], mine[key])
    t0, c0 = time.perf_counter(), time.thread_time()
    events = log.ordered_event_data(*("frames", "atoms", "parks", "controls", "commands", "pipeline", "decisions", *streams))
    if overlap and pipeline.stages and isinstance(pipeline.stages[0], SegmentStage):
        per_frame = bool(getattr(pipeline.stages[0].segmenter, "per_frame", False))
        workers = segment_workers if segment_workers is not None else min(2, os.cpu_count() or 1)
        workers = workers if per_frame else 1
        chain = ahead_chain(pipeline)
        if staged is None:
            staged = workers + len(chain) + 1 <= (os.cpu_count() or 1)
        v.ahead_chain = chain if staged else ()
        v.ahead = _SegmentAhead(log, pipeline, _frame_order(events, has_pipeline), workers=workers, chain=v.ahead_chain)
    try:
        _walk(v, events, has_pipeline)
    finally:
        if v.ahead is not None:
            v.ahead.close()
    v.report.cpu_s = {"main": time.thread_time() - c0, "segment_ahead": v.ahead.cpu_s if v.ahead is not None else 0.0,
                      **(v.ahead.stage_cpu_s if v.ahead is not None else {})}
    if log.stop is None and v.pending is not None:
        # a run killed outright: its last observation's outputs may never have reached the log
        v.report.notes.append("the log ends without a stop document (the run was killed): what its last observation "
                              "would have logged after its last event is not compared")
        v.pending = None
    v.settle()
    v.report.elapsed_s = time.perf_counter() - t0
    v.report.run_span_s = run_span_s(log)
    drops = {int(d.get("frame_index", -1)): str(d.get("reason", "")) for d in log.event_data("drops")} if "drops" in log.streams() else {}
    for log_index, fi in v.all_frames:
        if fi not in v.analysed and fi not in v.unreadable_frames:
            v.report.skipped.append(f"frame {fi} (log_index {log_index}): {drops.get(fi) or 'not analysed (see the interruptions stream)'}")
    return v.report
