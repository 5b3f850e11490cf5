"""A headless Nion simulated microscope (nionswift-usim) in this process, without Swift or Qt.

What Nion Swift does at start-up for the usim plug-in, reduced to what the bridge needs: the
hardware-source manager and the scan-module listener (``HardwareSource.run()``,
``scan_base.run()``, once per process), then usim's STEM controller (``InstrumentDevice.Instrument``)
with a scan-data generator of our choice and its scan module (``ScanDevice.ScanModule``),
registered in Nion's ``Registry``; the listener turns the module into the scan hardware source
``usim_scan_device``. usim's cameras are left out (their threads would keep the process alive
and the bridge does not use them).

:meth:`UsimMicroscope.stop` unregisters the instrument and its scan device, as Swift does when the
plug-in stops: a scan in flight ends without data and the device is gone until :meth:`start`.
One usim microscope runs per process at a time (Nion's registry is process-wide).
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
from pathlib import Path
from typing import Any, ClassVar

from nion.instrumentation import HardwareSource, scan_base
from nion.usim_device import InstrumentDevice, ScanDevice
from nion.utils import Registry

from stemagent.driver import DriverFault

INSTRUMENT_ID = "usim_stem_controller"
SCAN_DEVICE_ID = "usim_scan_device"

_platform_lock = threading.Lock()
_platform_started = False


def ensure_nion_platform() -> None:
    """Start Nion's hardware-source manager and scan-module listener once per process (Swift does this itself)."""
    global _platform_started
    with _platform_lock:
        if _platform_started:
            return
        if Registry.get_component("hardware_source_manager") is None:
            HardwareSource.run()
        if getattr(scan_base, "_component_registered_listener", None) is None:
            scan_base.run(Path(tempfile.mkdtemp(prefix="stemagent-nion-")))
        _platform_started = True


def _ensure_event_loop() -> None:
    """Nion's scan hardware source asks for the thread's event loop when it is built (and does not use it)."""
    try:
        asyncio.get_event_loop()
    except RuntimeError:  # a worker thread without one
        asyncio.set_event_loop(asyncio.new_event_loop())


class UsimMicroscope:
    """usim's instrument and scan device around ``generator`` (a usim ``ScanDataGeneratorLike``)."""

    _live: ClassVar["UsimMicroscope | None"] = None
    _live_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, generator: Any, *, beam_current_pA: float | None = None, energy_keV: float | None = None) -> None:
        self.generator = generator
        self.beam_current_pA = beam_current_pA
        self.energy_keV = energy_keV
        self.instrument: Any = None
        self.scan_module: Any = None

    @property
    def running(self) -> bool:
        return self.instrument is not None

    def start(self) -> None:
        """Register the instrument and its scan device (idempotent)."""
        with UsimMicroscope._live_lock:
            if self.running:
                return
            if UsimMicroscope._live is not None:
                raise DriverFault("another usim microscope runs in this process; stop it first")
            ensure_nion_platform()
            _ensure_event_loop()
            instrument = InstrumentDevice.Instrument(INSTRUMENT_ID, InstrumentDevice.ValueManager(),
                                                     InstrumentDevice.AxisManager(), self.generator)
            if self.beam_current_pA is not None:
                instrument.SetVal("BeamCurrent", self.beam_current_pA * 1e-12)  # A
            if self.energy_keV is not None:
                instrument.SetVal("EHT", self.energy_keV * 1e3)  # V
            attach = getattr(self.generator, "attach", None)
            if attach is not None:  # before anything can blank or scan
                attach(instrument)
            instrument.SetVal("C_Blank", 1.0)  # a microscope starts blanked
            scan_module = ScanDevice.ScanModule(instrument)
            Registry.register_component(instrument, {"instrument_controller", "stem_controller"})
            Registry.register_component(scan_module, {"scan_module"})
            self.instrument, self.scan_module = instrument, scan_module
            UsimMicroscope._live = self

    def stop(self) -> None:
        """Unregister the scan device and the instrument (idempotent)."""
        with UsimMicroscope._live_lock:
            if not self.running:
                return
            detach = getattr(self.generator, "detach", None)
            if detach is not None:
                detach()
            Registry.unregister_component(self.scan_module, {"scan_module"})
            Registry.unregister_component(self.instrument, {"instrument_controller", "stem_controller"})
            self.instrument = self.scan_module = None
            if UsimMicroscope._live is self:
                UsimMicroscope._live = None


def build_generator(cfg: Any, blank_control: str = "C_Blank") -> Any:
    """The scan-data generator a :class:`~stemagent.drivers.nion.config.UsimConfig` asks for."""
    if cfg.generator == "sample":
        return InstrumentDevice.ScanDataGenerator(sample_index=cfg.sample_index)
    # the twin generator needs the simulators (a test and demo path only, never on a real console)
    from stemagent.clock import SystemClock
    from stemagent.drivers.nion.usim_twin import TwinScanDataGenerator
    from stemagent.simulators.factory import twin_from_config

    twin = twin_from_config(cfg.twin, clock=SystemClock(), seed=cfg.seed)
    return TwinScanDataGenerator(twin, blank_control=blank_control)
