"""The manipulation policy: plain observations in, a park or a small scan out.

It is a :class:`~stemagent.stages.Policy` of the ordinary agent loop (``policy.kind:
manipulation``), driven by two calls, both pure and deterministic given the seed and the inputs:

- :meth:`ManipulationPolicy.decide` with an :class:`~stemagent.stages.Observation` of a frame
  (the survey first, then each confirmation scan): reads the outcome of the last park off the
  atoms, updates the hop model, re-plans the path, checks its stopping rules and returns the
  next :class:`~stemagent.types.Park` (or a :class:`~stemagent.types.Blank` when it is done);
- :meth:`ManipulationPolicy.observe_park` with the park observation (``observation.park``, a
  :class:`~stemagent.types.ParkResult`; a bare ParkResult is taken too): looks for steps in the
  signal; when something moved (or every ``confirm.every_parks`` parks) it asks for a small
  confirmation :class:`~stemagent.types.ScanRegion` around the dopant, otherwise it learns "no
  hop for the whole dwell" and returns the next park straight away.

A loop without the park hook may call :meth:`decide` after every park with a re-scanned frame:
the outcome is then read from the frame alone and hop times are unknown (spread over the dwell).

The target comes from the config (``target_A``) or from the operator (``set_target`` over MQTT
or the console: the agent checks it is inside the allowed area and passes it as the
observation feature ``target_A``); a target the lattice cannot use (off-lattice, outside the
field, occupied, no path) is refused with its reason in the ``plans`` stream and the old target
is kept. When the policy has finished it says so in :attr:`stop_reason` and the run ends.

Strategies: ``bo`` (the hop model and its acquisition), ``greedy`` (beam on the target carbon at
a fixed offset along the bond, fixed dwell) and ``random`` (a uniformly random candidate offset,
the greedy dwell). The safety gate stays the last word: a refused command ends the policy's run.
Every park seen, outcome and re-plan is queued for :meth:`drain_events` (the run log streams
``parks_seen``, ``outcomes`` and ``plans``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.special import gammainc

from stemagent.errors import InputError
from stemagent.policies.manipulation.acquisition import ParkChoice, beam_at, candidate_offsets, choose_park, offsets_in_bond
from stemagent.policies.manipulation.changepoint import Step, scan_steps
from stemagent.policies.manipulation.config import ManipulationConfig
from stemagent.policies.manipulation.hopmodel import HopModel
from stemagent.policies.manipulation.lattice import DOPANT, LatticeGraph, PlanRefused
from stemagent.policies.manipulation.outcome import Outcome, classify_outcome, trajectory
from stemagent.stages import Observation
from stemagent.types import Blank, Decision, Park, ParkResult, ScanGeometry, ScanRegion


@dataclass
class _PendingPark:
    index: int
    from_node: int
    intended_node: int
    position_A: tuple[float, float]
    dwell_s: float
    positions_A: np.ndarray  # node positions when the park was chosen
    steps: tuple[Step, ...] | None = None  # None until the park signal is seen
    rechecks: int = 0
    ambiguous: bool = False  # no step, but evidence enough to confirm with a scan


@dataclass
class ManipulationStats:
    parks: int = 0
    hops: int = 0  # intended hops observed
    wrong_hops: int = 0  # hops to other sites observed
    back_and_forth: int = 0  # parks with a hop and a hop back
    confirm_scans: int = 0
    damage: int = 0
    dose_e_per_A2: float = 0.0  # parks (at the probe centre) + confirmation scans
    park_s: float = 0.0
    scan_s: float = 0.0
    steps_detected: int = 0
    parks_with_steps: int = 0
    ambiguous_parks: int = 0  # no step but enough evidence for a confirmation scan
    ambiguous_moves: int = 0  # ... whose scan showed the dopant moved

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.__dict__.items()}


class ManipulationPolicy:
    """Move the dopant to the target site, one bond at a time (see the module docstring)."""

    name = "manipulation"

    def __init__(self, config: ManipulationConfig | None = None, seed: int = 0) -> None:
        self.cfg = config or ManipulationConfig()
        self.name = f"manipulation-{self.cfg.strategy}"
        self.rng = np.random.default_rng(seed)
        dev = self.cfg.device
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = HopModel(self.cfg.model, device=dev)
        self.graph: LatticeGraph | None = None
        self.dopant: int | None = None
        self.target: int | None = None
        self.target_A: tuple[float, float] | None = self.cfg.target_A
        self.path: list[int] = []
        self.done = False
        self.stop_reason = ""
        self.goal_reached: bool | None = None  # set when the policy finishes: True only on the target
        self.stats = ManipulationStats()
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.last_outcome: Outcome | None = None
        self._pending: _PendingPark | None = None
        self._parks_since_confirm = 0
        self._unchecked: list[_PendingPark] = []  # parks learned as "no move" since the last confirmation
        self._park_log: list[tuple[float, float, float]] = []  # (x, y, dose) of every park
        self._dose_per_s: float | None = None
        self._operator_target_A: tuple[float, float] | None = None  # the last set_target seen
        self.moved_parks: set[int] = set()  # parks in which something moved: a step, or an ambiguous park the scan confirmed
        self.fallback_at_park: int | None = None  # the park count when the hop model left the physics prior

    # --- public entry points ------------------------------------------------------------------
    def decide(self, observation: Observation) -> Decision:
        """After a frame: outcome of the last park (if any), model update, re-plan, next command."""
        if self.done:
            return self._stop_decision()
        if "refused" in observation.features:
            return self._finish("the safety gate refused the last command")
        p = self._pending
        if "replaced" in observation.features and p is not None and p.steps is None:
            # the park never ran (a stage replaced it, e.g. drift could not place the beam): no
            # exposure to learn, no park to count; choose again from what this frame shows
            self._pending = None
            self._event("plans", {"event": "park_not_run", "park": p.index, "position_A": list(p.position_A),
                                  "dwell_s": p.dwell_s, "reason": "the loop replaced the park (feature 'replaced')"})
        if observation.frame is not None:
            self.stats.dose_e_per_A2 += float(observation.frame.dose_e_per_A2)
        self._take_target(observation)
        if self.graph is None:
            return self._start(observation)
        if self.target is None:
            return self._wait_for_target()
        p = self._pending
        if p is None:
            return self._next()
        if p.steps is None and p.rechecks == 0:  # the loop parked without showing the policy the result
            self.stats.parks += 1
            self.stats.park_s += p.dwell_s
        outcome = classify_outcome(
            self.graph, p.from_node, p.intended_node, observation.atoms, observation.geometry, p.steps or (),
            dopant_class=self.cfg.lattice.dopant_class, vacancy_class=self.cfg.lattice.vacancy_class,
            match_A=self.cfg.lattice.match_A,
        )
        if outcome.kind == "damage" and self.cfg.confirm.recheck_damage and p.rechecks == 0:
            p.rechecks += 1  # believe a vacancy or a lost dopant only when a second look agrees
            self._restore_after_false_alarm(outcome)
            return self._confirm(p, recheck=True, why=f"re-check before stopping: {outcome.detail}")
        return self._learn(p, outcome)

    def observe_park(self, observation: Observation | ParkResult) -> Decision:
        """After a park: steps in the signal; a confirmation scan if something moved, else the next park.

        ``observation``: the loop's park observation (``observation.park`` the result; its
        ``features`` may carry the operator's ``target_A``), or a bare :class:`ParkResult`."""
        if self.done:
            return self._stop_decision()
        if isinstance(observation, ParkResult):
            result = observation
        else:
            if observation.park is None:
                raise InputError("observation.park", None, "a park observation must carry its ParkResult")
            result = observation.park
            self._take_target(observation)
        p = self._pending
        if p is None:
            raise InputError("park", result.position_A, "no park was asked for")
        self.stats.parks += 1
        self.stats.dose_e_per_A2 += float(result.dose_e_per_A2)
        self.stats.park_s += float(result.dwell_s)
        if result.dwell_s > 0:
            self._dose_per_s = float(result.dose_e_per_A2) / float(result.dwell_s)
        self._park_log.append((float(result.position_A[0]), float(result.position_A[1]), float(result.dose_e_per_A2)))
        cp = self.cfg.changepoint
        found, evidence = scan_steps(result.signal, result.sample_interval_s, z_threshold=cp.z_threshold,
                                     windows=cp.windows, min_segment=cp.min_segment, long_windows=cp.long_windows,
                                     long_z_threshold=cp.long_z_threshold)
        steps = tuple(found)
        p.steps = steps
        p.ambiguous = not steps and evidence >= cp.ambiguous_evidence
        if steps:
            self.stats.parks_with_steps += 1
            self.stats.steps_detected += len(steps)
            self.moved_parks.add(p.index)
        if p.ambiguous:
            self.stats.ambiguous_parks += 1
        self._event("parks_seen", {"park": p.index, "steps": [s.to_dict() for s in steps], "dwell_s": result.dwell_s,
                                   "dose_e_per_A2": result.dose_e_per_A2, "evidence": evidence})
        self._parks_since_confirm += 1
        if steps or p.ambiguous or self._parks_since_confirm >= self.cfg.confirm.every_parks:
            why = (f"{len(steps)} step(s) in the park signal, first at {steps[0].time_s:.3f} s" if steps else
                   f"ambiguous park signal (evidence {evidence:.2f} of a step)" if p.ambiguous else
                   f"routine check after {self._parks_since_confirm} parks")
            return self._confirm(p, recheck=False, why=why)
        return self._learn(p, None)

    def set_target(self, target_A: tuple[float, float]) -> list[int]:
        """Aim at a new target site and re-plan; :class:`PlanRefused` (naming the reason) if it cannot be used."""
        if self.graph is None or self.dopant is None:
            self.target_A = (float(target_A[0]), float(target_A[1]))
            return []
        node = self.graph.locate_target(target_A, self.dopant, self.cfg.lattice.site_tolerance_A)
        path = self.graph.plan(self.dopant, node)
        self.target, self.target_A, self.path = node, (float(target_A[0]), float(target_A[1])), path
        self._event("plans", self._plan_doc("new target"))
        return path

    def _take_target(self, observation: Observation) -> None:
        """The operator's target (feature ``target_A``), once per new value: re-plan, or log why not."""
        if "target_A" not in observation.features:
            return
        raw = np.asarray(observation.features["target_A"], dtype=float).reshape(-1)
        if raw.size < 2 or not np.all(np.isfinite(raw[:2])):
            self._event("plans", {"event": "target_refused", "target_A": [str(v) for v in raw[:2]],
                                  "reason": "target_A must be two finite numbers (x, y in Å)"})
            return
        t = (float(raw[0]), float(raw[1]))
        if t == self._operator_target_A:
            return  # already taken (or refused): the loop repeats it on every observation
        self._operator_target_A = t
        if self.graph is None:
            self.target_A = t
            return
        try:
            self.set_target(t)
        except PlanRefused as exc:
            self._event("plans", {"event": "target_refused", "target_A": list(t), "reason": exc.reason,
                                  "kept_target_A": None if self.target is None else list(self.target_A or ())})

    def _wait_for_target(self) -> Decision:
        return Decision(Blank(), self.name, "waiting for a target (config target_A or the operator's set_target)")

    def drain_events(self) -> list[tuple[str, dict[str, Any]]]:
        out, self.events = self.events, []
        return out

    # --- steps ------------------------------------------------------------------------------------
    def _start(self, obs: Observation) -> Decision:
        lc = self.cfg.lattice
        try:
            g = LatticeGraph.from_atoms(obs.atoms, obs.geometry, dopant_class=lc.dopant_class, vacancy_class=lc.vacancy_class,
                                        bond_A=lc.bond_A, bond_tolerance_A=lc.bond_tolerance_A, edge_margin_A=lc.edge_margin_A)
        except InputError as exc:
            return self._finish(f"no lattice in the survey: {exc}")
        dops = g.dopants()
        if len(dops) == 0:
            return self._finish("no dopant in the survey frame")
        ref = self.cfg.dopant_A if self.cfg.dopant_A is not None else obs.geometry.center_A
        d = np.linalg.norm(g.positions_A[dops] - np.asarray(ref, float), axis=1)
        if self.cfg.dopant_A is not None and d.min() > lc.site_tolerance_A + 0.6:
            return self._finish(f"no dopant within {lc.site_tolerance_A + 0.6} Å of dopant_A={self.cfg.dopant_A}")
        self.graph, self.dopant = g, int(dops[np.argmin(d)])
        if self.target_A is None:
            self._event("plans", {"event": "no_target", "dopant_node": self.dopant})
            return self._wait_for_target()
        try:
            self.set_target(self.target_A)
        except PlanRefused as exc:
            if self.target_A == self._operator_target_A:  # the operator's: keep waiting for a usable one
                self._event("plans", {"event": "target_refused", "target_A": list(self.target_A), "reason": exc.reason})
                self.target_A = None
                return self._wait_for_target()
            return self._finish(f"target refused: {exc.reason}")
        return self._next()

    def _learn(self, p: _PendingPark, outcome: Outcome | None) -> Decision:
        """Feed one park to the model, move the dopant, re-plan, stop or go on."""
        assert self.graph is not None
        steps = p.steps or ()
        segs = trajectory(self.graph, outcome, p.from_node, p.intended_node, p.dwell_s, steps)
        moved = outcome is not None and not steps and len(segs) == 2 and segs[0][3] is not None
        if moved and p.ambiguous:  # the ambiguous signal was a move: this park's (its time unknown)
            self.stats.ambiguous_moves += 1
            self.moved_parks.add(p.index)
        unseen = moved and not p.ambiguous
        if unseen:
            # a move no park signal showed (the beam far from both atoms): it happened in this park or
            # in one of the unchecked ones before it; learn this park as "no move" and share the hop out
            segs = [(p.from_node, 0.0, p.dwell_s, None)]
        for node, t0, t1, moved_to in segs:
            self._add_exposure(p, node, t1 - t0, moved_to)
        damaged = outcome is not None and outcome.kind == "damage"
        self.model.add_damage_exposure(p.dwell_s, int(damaged))
        self._pending = None
        self._unchecked.append(p)
        if unseen:
            assert outcome is not None and outcome.dopant_node is not None
            self._share_unseen_hop(p.from_node, outcome.dopant_node)
            segs = [(p.from_node, 0.0, -1.0, outcome.dopant_node)]  # -1: when is not known
        if outcome is not None:
            self._parks_since_confirm = 0
            self._unchecked = []
        if outcome is not None:
            self.last_outcome = outcome
            self._event("outcomes", {"park": p.index, **outcome.to_dict(),
                                     "moves": [[a, t0, t1, -1 if b is None else b] for a, t0, t1, b in segs]})
            if outcome.kind == "intended":
                self.stats.hops += 1
            elif outcome.kind == "other_site":
                self.stats.wrong_hops += 1
            elif outcome.kind == "none" and len(segs) > 1:
                self.stats.back_and_forth += 1
            if outcome.kind == "damage":
                self.stats.damage += 1
                return self._finish(f"damage: {outcome.detail}")
            if outcome.dopant_node is not None and outcome.dopant_node != self.dopant:
                self.dopant = outcome.dopant_node
                self.graph.occupant[self.dopant] = DOPANT
                if self.dopant == self.target:
                    self.path = [self.dopant]
                    self._event("plans", self._plan_doc("target reached"))
                    return self._finish("target reached", reached=True)
                try:
                    assert self.target is not None
                    self.path = self.graph.plan(self.dopant, self.target)
                except PlanRefused as exc:
                    return self._finish(f"no path any more: {exc.reason}")
                self._event("plans", self._plan_doc(f"re-planned after a {outcome.kind} hop"))
        return self._next()

    def _add_exposure(self, p: _PendingPark, node: int, exposure_s: float, moved_to: int | None, hops: float = 1.0) -> None:
        """The dopant sat on ``node`` for ``exposure_s`` with the beam of park ``p``: one exposure per bond."""
        assert self.graph is not None
        pos = p.positions_A
        for k in self.graph.neighbours[node]:
            off = offsets_in_bond(np.asarray(p.position_A), pos[node], pos[k])[0]
            self.model.add(int(k), tuple(self.graph.site_A[k]), float(off[0]), float(off[1]), exposure_s,
                           hops if k == moved_to else 0)

    def _share_unseen_hop(self, node: int, moved_to: int) -> None:
        """One hop ``node → moved_to`` in one of the unchecked parks, which: shared out in proportion to
        each park's predicted probability of that hop (fractional counts in the Poisson likelihood)."""
        assert self.graph is not None
        parks = [q for q in self._unchecked if q.from_node == node] or self._unchecked[-1:]
        x = []
        for q in parks:
            off = offsets_in_bond(np.asarray(q.position_A), q.positions_A[node], q.positions_A[moved_to])[0]
            x.append([off[0], off[1], *self.graph.site_A[moved_to]])
        mu, _ = self.model.predict(np.asarray(x), with_sd=False, sweep=False)
        p_hop = -np.expm1(-np.exp(mu) * np.array([q.dwell_s for q in parks]))
        w = p_hop / p_hop.sum() if p_hop.sum() > 0 else np.full(len(parks), 1.0 / len(parks))
        for q, wq in zip(parks, w):
            off = offsets_in_bond(np.asarray(q.position_A), q.positions_A[node], q.positions_A[moved_to])[0]
            self.model.add(int(moved_to), tuple(self.graph.site_A[moved_to]), float(off[0]), float(off[1]), 0.0, float(wq))

    def _next(self) -> Decision:
        """The next park on the path (or a stop)."""
        assert self.graph is not None and self.dopant is not None
        if self.dopant == self.target:
            return self._finish("target reached", reached=True)
        if len(self.path) < 2 or self.path[0] != self.dopant:
            assert self.target is not None
            try:
                self.path = self.graph.plan(self.dopant, self.target)
            except PlanRefused as exc:
                return self._finish(f"no path: {exc.reason}")
        st = self.cfg.stop
        if self.stats.parks >= st.max_parks:
            return self._finish(f"max_parks={st.max_parks} reached")
        s, j = self.path[0], self.path[1]
        near = np.flatnonzero(np.linalg.norm(self.graph.positions_A - self.graph.positions_A[s], axis=1) < 4.0)
        self.model.compact(set(near.tolist()), self.cfg.model.max_cells)
        if self.cfg.strategy == "bo":
            self._check_fallback()
        choice = self._choose(s, j)
        j = int(choice.scores.get("aim_node", j))  # with acquisition.any_closer_site: the closer site aimed at
        if self._dose_per_s is not None:
            add = self._dose_per_s * choice.dwell_s
            if self.stats.dose_e_per_A2 + add > st.dose_budget_e_per_A2:
                return self._finish(f"run dose budget {st.dose_budget_e_per_A2:.3g} e/Å² would be passed")
            here = np.asarray(choice.position_A)
            local = sum(dd for x, y, dd in self._park_log if math.hypot(x - here[0], y - here[1]) <= st.local_radius_A)
            if local + add > st.local_dose_budget_e_per_A2:
                return self._finish(f"local dose budget {st.local_dose_budget_e_per_A2:.3g} e/Å² within {st.local_radius_A} Å would be passed")
        index = len(self._park_log)
        self._pending = _PendingPark(index, s, j, choice.position_A, choice.dwell_s, self.graph.positions_A.copy())
        remaining = len(self.path) - 1
        reason = (f"hop {s}->{j} ({remaining} to go): beam {choice.offset_A[0]:+.2f} Å along, {choice.offset_A[1]:+.2f} Å "
                  f"across the bond from site {j}, dwell {choice.dwell_s:.3g} s ({self.cfg.strategy})")
        scores = dict(choice.scores)
        scores.update({"offset_along_A": choice.offset_A[0], "offset_across_A": choice.offset_A[1], "dwell_s": choice.dwell_s,
                       "from_node": float(s), "to_node": float(j), "hops_to_go": float(remaining), "park_index": float(index)})
        return Decision(Park(choice.position_A, choice.dwell_s), self.name, reason, scores)

    def _check_fallback(self) -> None:
        """Rebuild the hop model without the physics prior's confidence on the carbon once the hops
        seen with the beam on the carbon say its rate is well below the prior's (config ``fallback``)."""
        fb, mc = self.cfg.fallback, self.cfg.model
        if not fb.enabled or self.fallback_at_park is not None:
            return
        hops, exposure = self.model.near_carbon_counts(fb.carbon_radius_A)
        shape, rate = fb.prior_shape + hops, fb.prior_shape / mc.prior_peak_rate_per_s + exposure
        p_bad = float(gammainc(shape, rate * fb.below_fraction * mc.prior_peak_rate_per_s))
        if p_bad < fb.confidence:
            return
        new_cfg = mc.model_copy(update={"near_sd_fraction": fb.near_sd_fraction,
                                        **({} if fb.level_sd is None else {"level_sd": fb.level_sd})})
        self.model = self.model.with_config(new_cfg)
        self.model.fit()
        self.fallback_at_park = self.stats.parks
        self._event("plans", {"event": "fallback", "park": self.stats.parks, "carbon_hops": hops,
                              "carbon_exposure_s": exposure, "p_rate_below": p_bad,
                              "near_sd_fraction": new_cfg.near_sd_fraction, "level_sd": new_cfg.level_sd})

    def _choose(self, s: int, j: int) -> ParkChoice:
        assert self.graph is not None
        pos = self.graph.positions_A
        acq = self.cfg.acquisition
        base = self.cfg.baseline
        if self.cfg.strategy == "bo":
            if not acq.any_closer_site or self.target is None:
                return choose_park(self.graph, self.model, s, j, acq, hops_to_go=len(self.path) - 1)
            closer = self.graph.closer_neighbours(s, self.target) or [j]
            best: ParkChoice | None = None
            for k in closer:  # aim at each closer site in turn, the others' hops counted as progress too
                c = choose_park(self.graph, self.model, s, k, acq, hops_to_go=len(self.path) - 1,
                                also_good=tuple(o for o in closer if o != k))
                c.scores["aim_node"] = float(k)
                if best is None or c.scores["acquisition"] > best.scores["acquisition"]:
                    best = c
            assert best is not None
            return best
        if self.cfg.strategy == "greedy":
            off = np.array([[base.offset_along_A, 0.0]])
        else:
            cands = candidate_offsets(acq)
            off = cands[int(self.rng.integers(len(cands)))][None, :]
        b = beam_at(off, pos[s], pos[j])[0]
        return ParkChoice((float(b[0]), float(b[1])), float(base.dwell_s), (float(off[0, 0]), float(off[0, 1])), {})

    def _confirm(self, p: _PendingPark, *, recheck: bool, why: str) -> Decision:
        assert self.graph is not None
        c = self.cfg.confirm
        centre = self.graph.positions_A[p.from_node]
        dwell = c.dwell_s * (2.0 if recheck else 1.0)
        g = ScanGeometry(center_A=(float(centre[0]), float(centre[1])), fov_A=(c.fov_A, c.fov_A),
                         shape_px=(c.shape_px, c.shape_px), dwell_s=dwell)
        self.stats.confirm_scans += 1
        self.stats.scan_s += g.frame_time_s
        return Decision(ScanRegion(g), self.name, f"confirmation scan: {why}", {"park_index": float(p.index), "recheck": float(recheck)})

    def _restore_after_false_alarm(self, outcome: Outcome) -> None:
        """Undo a suspicious refresh (a vacancy or a lost dopant) until the re-check confirms it."""
        assert self.graph is not None
        for node, (old, _new) in outcome.changed.items():
            self.graph.occupant[node] = old

    def _finish(self, reason: str, *, reached: bool = False) -> Decision:
        self.done = True
        self.stop_reason = reason
        self.goal_reached = reached
        self._pending = None
        self._event("plans", {"event": "stop", "reason": reason, **self.stats.to_dict()})
        return self._stop_decision()

    def _stop_decision(self) -> Decision:
        return Decision(Blank(), self.name, f"done: {self.stop_reason}", {"done": 1.0, **self.stats.to_dict()})

    def _plan_doc(self, why: str) -> dict[str, Any]:
        assert self.graph is not None
        return {
            "event": "plan",
            "why": why,
            "dopant_node": self.dopant,
            "target_node": self.target,
            "path": list(self.path),
            "path_A": [[float(v) for v in self.graph.positions_A[n]] for n in self.path],
        }

    def _event(self, stream: str, doc: dict[str, Any]) -> None:
        self.events.append((stream, doc))

    # --- introspection ----------------------------------------------------------------------------
    @property
    def pending_park(self) -> _PendingPark | None:
        """The park the policy asked for and has not learned from yet (its nodes, beam and dwell)."""
        return self._pending

