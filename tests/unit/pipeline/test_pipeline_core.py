"""The pipeline: stage order, stages off by config, errors skipped or stopping, timings, parks, conversions."""

from __future__ import annotations

import numpy as np
import pytest

from stemagent.config import StageOptions
from stemagent.pipeline import Pipeline, StageFailed
from stemagent.stages import Observation, no_atoms
from stemagent.types import Park, ScanGeometry, ScanRegion

G = ScanGeometry(fov_A=(10.0, 10.0), shape_px=(8, 8))


def obs(kind: str = "frame") -> Observation:
    return Observation(frame_index=0, time_s=0.0, geometry=G, atoms=no_atoms(0), kind=kind)  # type: ignore[arg-type]


class Mark:
    """Appends its name to ``records['order']``; optionally fails, handles parks, converts commands."""

    def __init__(self, name: str, fail: bool = False, parks: bool = False, shift_A: float = 0.0) -> None:
        self.name = name
        self.fail = fail
        self.shift_A = shift_A
        if parks:
            self.process_park = self._park

    def process(self, o: Observation) -> Observation:
        if self.fail:
            raise RuntimeError(f"{self.name} broke")
        o.records.setdefault("order", []).append(self.name)
        return o

    def _park(self, o: Observation) -> Observation:
        o.records.setdefault("parks", []).append(self.name)
        return o

    def to_device(self, cmd, start_s):  # type: ignore[no-untyped-def]
        if not self.shift_A or not isinstance(cmd, Park):
            return cmd, {}
        return Park((cmd.position_A[0] + self.shift_A, cmd.position_A[1]), cmd.dwell_s), {"shift_A": self.shift_A, "t_s": start_s}


def ticking() -> object:
    t = iter(np.arange(0.0, 100.0, 0.002))
    return lambda: float(next(t))


def test_stages_run_in_order_and_each_is_timed():
    p = Pipeline([Mark("segment"), Mark("drift"), Mark("encode"), Mark("policy")], wall=ticking())
    out = p.run(obs())
    assert out.records["order"] == ["segment", "drift", "encode", "policy"]
    assert set(out.timings_ms) == {"segment", "drift", "encode", "policy"}
    assert all(v == pytest.approx(2.0) for v in out.timings_ms.values()) and not out.errors


def test_a_stage_off_by_config_is_left_out():
    p = Pipeline([Mark("segment"), Mark("drift"), Mark("policy")], {"drift": StageOptions(enabled=False)})
    assert p.names == ["segment", "policy"] and p.disabled == ["drift"]
    assert p.run(obs()).records["order"] == ["segment", "policy"]
    assert p.describe()["disabled"] == ["drift"] and p.describe()["stages"] == ["segment", "policy"]
    with pytest.raises(ValueError, match="nothing"):
        Pipeline([Mark("segment")], {"nothing": StageOptions()})
    with pytest.raises(ValueError, match="unique"):
        Pipeline([Mark("a"), Mark("a")])


def test_a_failing_stage_is_skipped_or_stops_as_configured():
    p = Pipeline([Mark("segment"), Mark("drift", fail=True), Mark("policy")])
    out = p.run(obs())
    assert out.records["order"] == ["segment", "policy"] and out.errors == {"drift": "RuntimeError: drift broke"}
    assert "drift" in out.timings_ms
    stop = Pipeline([Mark("segment"), Mark("drift", fail=True), Mark("policy")], {"drift": StageOptions(on_error="stop")})
    with pytest.raises(StageFailed, match="drift") as err:
        stop.run(obs())
    assert err.value.stage == "drift" and isinstance(err.value.error, RuntimeError)


def test_parks_go_only_to_stages_that_take_them_and_commands_are_converted_in_order():
    p = Pipeline([Mark("segment"), Mark("drift", parks=True, shift_A=0.5), Mark("policy", parks=True, shift_A=0.25)])
    out = p.run(obs("park"))
    assert out.records == {"parks": ["drift", "policy"]}
    dev = p.to_device(Park((1.0, 2.0), 0.1), start_s=7.0)
    assert dev.command == Park((1.75, 2.0), 0.1)
    assert dev.records == {"drift": {"shift_A": 0.5, "t_s": 7.0}, "policy": {"shift_A": 0.25, "t_s": 7.0}}
    assert p.to_device(ScanRegion(G), 0.0).records == {}
    assert p.run(obs(), only=("policy",)).records["order"] == ["policy"]


class FakeDrift:
    """A drift stage as the drift branch shapes it: update(frame, atoms) -> estimate (atoms, to_dict)."""

    def __init__(self, d_A: tuple[float, float]) -> None:
        self.d_A = np.asarray(d_A)

    def update(self, frame, atoms):  # type: ignore[no-untyped-def]
        shifted = type(atoms)(atoms.positions_A - self.d_A, atoms.classes, atoms.confidence, atoms.frame_index,
                              atoms.class_names)
        est = type("Estimate", (), {})()
        est.atoms = shifted
        est.to_dict = lambda: {"displacement_A": self.d_A.tolist()}
        return est


def test_the_drift_adapter_puts_atoms_in_the_sample_frame_and_converts_commands():
    from stemagent.pipeline import DriftAdapter
    from stemagent.types import Atoms, Frame

    drift = FakeDrift((0.5, -0.25))

    def to_beam(cmd, start_s):  # type: ignore[no-untyped-def]
        if isinstance(cmd, Park):
            return Park((cmd.position_A[0] + 0.5, cmd.position_A[1] - 0.25), cmd.dwell_s), {"offset_A": [0.5, -0.25]}
        return cmd, {}

    p = Pipeline([Mark("segment"), DriftAdapter(drift, to_beam), Mark("policy")])
    frame = Frame(np.zeros(G.shape_px, np.float32), G, G.line_start_times_s(0.0), 0, 1.0)
    o = obs()
    o.frame = frame
    o.atoms = Atoms(np.array([[1.0, 1.0]]), [0], [1.0], 0)
    out = p.run(o)
    assert np.allclose(out.atoms.positions_A, [[0.5, 1.25]]) and out.records["drift"] == {"displacement_A": [0.5, -0.25]}
    assert out.drift is not None and "drift" in out.timings_ms
    dev = p.to_device(Park((0.5, 1.25), 0.1), 1.0)
    assert dev.command == Park((1.0, 1.0), 0.1) and dev.records == {"drift": {"offset_A": [0.5, -0.25]}}
