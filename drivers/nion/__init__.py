"""Nion Swift backend for the bridge: Nion's scan hardware source and STEM controller behind ``Driver``.

Select it in a bridge config (``drivers/ADAPTERS.md``, section Nion Swift)::

    adapter: stemagent.drivers.nion:make_driver
    adapter_options: {mode: usim}        # a headless simulated Nion microscope rendering the twin
    adapter_options: {mode: swift, scan_device_id: <your scan device>}   # inside Nion Swift

Importing this package imports no Nion package; :func:`make_driver` does, when the bridge selects
it. Modules: ``config`` (options), ``geometry`` (units and axes, the only conversion), ``backend``
(``NionDriver``), ``usim`` (a headless usim microscope), ``usim_twin`` (the twin as usim's
scan-data generator), ``swift`` (start the bridge from Swift's Python console).
"""

from __future__ import annotations

from typing import Any

from stemagent.config import validate_model
from stemagent.drivers.nion.config import NionConfig
from stemagent.errors import ConfigError

INSTALL_HINT = "pip install 'stemagent[nion]' (nionswift-instrumentation, nionswift-usim)"


def make_driver(**options: Any) -> Any:
    """The bridge's adapter factory: validate ``options`` (a :class:`NionConfig`) and build the backend."""
    cfg = validate_model(NionConfig, options, source="adapter_options")
    try:
        # Nion packages are an optional extra: imported only when this backend is selected
        from stemagent.drivers.nion.backend import NionDriver

        return NionDriver.from_config(cfg)
    except ImportError as exc:
        raise ConfigError("adapter_options", "mode", cfg.mode, f"needs Nion's packages ({exc.name} is missing): {INSTALL_HINT}") from None
