"""One codec per core type: round trips, and errors that name the field and the value."""

from __future__ import annotations

import numpy as np
import pytest

from stemagent.codec import (
    decode_atoms,
    decode_capabilities,
    decode_command,
    decode_decision,
    decode_frame_meta,
    decode_geometry,
    decode_park_result,
    encode_atoms,
    encode_capabilities,
    encode_command,
    encode_decision,
    encode_frame_meta,
    encode_geometry,
    encode_park_result,
)
from stemagent.config import config_from_dict
from stemagent.errors import InputError
from stemagent.types import Atoms, Blank, Capabilities, Decision, Frame, Park, ParkResult, ScanGeometry, ScanRegion

G = ScanGeometry(center_A=(1.5, -2.0), fov_A=(20.0, 10.0), shape_px=(16, 32), rotation_rad=0.3, dwell_s=2e-6, flyback_s=1e-5)


def test_geometry_round_trip_and_field_named_errors():
    doc = encode_geometry(G)
    assert doc == {"center_A": [1.5, -2.0], "fov_A": [20.0, 10.0], "shape_px": [16, 32], "rotation_rad": 0.3,
                   "dwell_s": 2e-6, "flyback_s": 1e-5}
    assert decode_geometry(doc) == G
    with pytest.raises(InputError) as err:
        decode_geometry({**doc, "dwell_s": -1.0}, "frames[3].geometry")
    assert err.value.field == "frames[3].geometry.dwell_s" and err.value.value == -1.0
    with pytest.raises(InputError, match="shape_px"):
        decode_geometry({**doc, "shape_px": [0, 5]})
    with pytest.raises(InputError, match="zoom.*not permitted"):
        decode_geometry({**doc, "zoom": 2})


def test_the_config_scan_section_is_the_geometry_codec():
    cfg = config_from_dict({"scan": {"fov_A": 12.8, "shape_px": 64, "dwell_s": 1e-5}})
    assert cfg.scan.fov_A == (12.8, 12.8) and cfg.scan.shape_px == (64, 64)  # one number: a square
    g = cfg.scan.geometry(center_A=(3.0, 4.0))
    assert g.center_A == (3.0, 4.0) and decode_geometry(encode_geometry(g)) == g
    # a logged config (pairs) reads back as the same scan
    assert config_from_dict({"scan": cfg.scan.model_dump(mode="json")}).scan == cfg.scan


def test_capabilities_round_trip_and_old_documents():
    caps = Capabilities(name="dev", max_fov_A=100.0, max_shape_px=(512, 1024), min_dwell_s=1e-7, max_dwell_s=1e-3,
                        can_park=False, probe_fwhm_A=0.7, max_park_s=2.0)
    assert decode_capabilities(encode_capabilities(caps)) == caps
    plain = Capabilities(name="dev", max_fov_A=100.0, max_shape_px=(512, 512), min_dwell_s=1e-7, max_dwell_s=1e-3)
    assert "max_park_s" not in encode_capabilities(plain)  # what version 2 peers and logs already read
    old = {k: v for k, v in encode_capabilities(plain).items() if k != "probe_fwhm_A"}  # a log before probe_fwhm_A
    assert decode_capabilities(old) == plain
    with pytest.raises(InputError, match=r"start.capabilities.max_fov_A"):
        decode_capabilities({**old, "max_fov_A": 0}, "start.capabilities")


def test_park_result_round_trip_keeps_the_signal():
    p = ParkResult(position_A=(1.0, 2.0), dwell_s=0.01, start_time_s=5.0, sample_interval_s=1e-3,
                   signal=np.arange(10, dtype=np.float32), dose_e_per_A2=3.5)
    fields, signal = encode_park_result(p)
    back = decode_park_result(fields, signal)
    assert back.position_A == p.position_A and back.dose_e_per_A2 == 3.5 and np.array_equal(back.signal, p.signal)
    logged = {**fields, "predicted_dose_e_per_A2": 3.4, "signal": signal.tolist()}
    assert decode_park_result(logged, logged["signal"], besides=("signal", "predicted_dose_e_per_A2")).dwell_s == 0.01
    with pytest.raises(InputError, match="predicted_dose"):
        decode_park_result(logged, signal)
    with pytest.raises(InputError, match=r"park.signal"):
        decode_park_result(fields, np.zeros((2, 2)))


def test_commands_and_decisions():
    for cmd in (ScanRegion(G), Park((1.0, -1.0), 0.5), Blank()):
        assert decode_command(encode_command(cmd)) == cmd
    d = encode_decision(Decision(Park((1.0, 2.0), 0.1), policy="p", reason="r", scores={"a": np.float32(1.5)}))
    assert d == {"command": {"kind": "park", "position_A": [1.0, 2.0], "dwell_s": 0.1}, "policy": "p", "reason": "r",
                 "scores": {"a": 1.5}}
    with pytest.raises(InputError, match=r"command.dwell_s"):
        decode_command({"kind": "park", "position_A": [0, 0], "dwell_s": -1})
    with pytest.raises(InputError, match=r"command.geometry.fov_A"):
        decode_command({"kind": "scan", "geometry": {**encode_geometry(G), "fov_A": [1.0]}})


def test_atoms_and_decisions_round_trip():
    atoms = Atoms(np.array([[1.0, 2.0], [3.0, 4.5]]), [0, 1], [0.9, 0.5], 3, class_names=("C", "Si"),
                  uncertainty_A=[0.01, 0.02])
    back = decode_atoms(encode_atoms(atoms))
    assert np.array_equal(back.positions_A, atoms.positions_A) and back.class_names == ("C", "Si")
    assert np.array_equal(back.uncertainty_A, [0.01, 0.02]) and back.times_s is None and back.frame_index == 3
    with pytest.raises(InputError, match=r"atoms\[2\].classes"):
        decode_atoms({**encode_atoms(atoms), "classes": [0, 5]}, "atoms[2]")
    with pytest.raises(InputError, match=r"atoms.n_atoms"):
        decode_atoms({k: v for k, v in encode_atoms(atoms).items() if k != "n_atoms"})
    d = Decision(ScanRegion(G), policy="raster", reason="field 2", scores={"field": 2.0})
    assert decode_decision(encode_decision(d)) == d


def test_frame_metadata_round_trip():
    img = np.ones(G.shape_px, dtype=np.float32)
    f = Frame(image=img, geometry=G, line_times_s=G.line_start_times_s(2.0), index=7, dose_e_per_A2=12.0, source="twin",
              meta={"n": np.int64(3), "big": np.zeros(1000), "obj": object()})
    doc = encode_frame_meta(f)
    assert doc["meta"] == {"n": 3}  # only what survives JSON
    back = decode_frame_meta(doc, img)
    assert back.index == 7 and back.geometry == G and np.array_equal(back.line_times_s, f.line_times_s)
    with pytest.raises(InputError, match=r"frame.image.shape"):
        decode_frame_meta(doc, np.ones((3, 3), dtype=np.float32))
