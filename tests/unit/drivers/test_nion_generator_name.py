"""The usim twin generator is loaded by the name in the config; a bad name is a one-line config error."""

from __future__ import annotations

import pytest

pytest.importorskip("nion.usim_device")

from stemagent.drivers.nion.config import UsimConfig  # noqa: E402
from stemagent.drivers.nion.usim import build_generator  # noqa: E402
from stemagent.errors import ConfigError  # noqa: E402


def test_nion_unknown_twin_generator_names_the_field() -> None:
    cfg = UsimConfig(twin_generator="stemagent.simulators.no_such_module:make")
    with pytest.raises(ConfigError) as err:
        build_generator(cfg)
    assert "usim.twin_generator" in str(err.value) and "no_such_module" in str(err.value)


def test_nion_default_twin_generator_is_the_twin() -> None:
    gen = build_generator(UsimConfig())
    assert type(gen).__module__ == "stemagent.simulators.nion_twin"
    assert gen.probe_fwhm_A > 0
