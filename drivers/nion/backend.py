"""``NionDriver``: the bridge's backend on Nion Swift's scan hardware source and STEM controller.

The ``Driver`` protocol (``src/driver.py``) over Nion's instrumentation kit
(nionswift-instrumentation): a frame is ``record_immediate`` of the scan hardware source, a park
puts the probe at Nion's normalised ``probe_position`` in the scan context, a blank sets the STEM
controller's blanker control (``C_Blank``). Units and axes are converted once, in
:mod:`stemagent.drivers.nion.geometry`; frames come back with the geometry Nion reports
(calibrations and scan metadata), not the one asked for, and the request is kept in
``meta["requested_geometry"]`` when they differ.

How it fails:

- Every Nion call runs in one worker thread (Nion's scan calls block; one device, one thing at a
  time) under a timeout of the command's own duration plus ``call_timeout_s``. A timeout aborts
  the recording, abandons the worker (a fresh one takes over) and raises ``DriverFault``.
- A scan device that is not registered (Swift's instrument stopped, usim stopped) is a
  ``DriverFault`` on every call, ``blank`` included; once it is registered again calls work again
  (the hardware source is looked up on each call), so the agent's fault-and-retry resumes by itself.
- A scan that ends without data or with fewer rows than asked (aborted, device stopped) is a
  ``DriverFault``; a request Nion cannot express (non-square pixels, a park outside the last
  scanned field, which Nion would clamp) is an ``InputError`` before anything reaches the console.
- ``blank`` runs on its own thread, never behind a scan: it sets the blanker, confirms it reads
  back as blanked, then aborts a recording in flight. A cancelled ``acquire``/``park`` (the bridge
  cancels them on a blank request or shutdown) aborts the recording too.

The console's own fail-safes stay in charge: nothing here overrides Swift's interlocks, and the
scan device's own limits (field of view) are read from it and reported in ``capabilities()``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import time
from typing import Any, AsyncIterator, Callable, TypeVar

import numpy as np
from nion.instrumentation import HardwareSource
from nion.utils import Geometry

from stemagent import dose as dose_model
from stemagent.codec import encode_geometry
from stemagent.driver import CommandRefused, DriverFault
from stemagent.drivers.nion import geometry as ng
from stemagent.drivers.nion.config import NionConfig
from stemagent.errors import InputError
from stemagent.types import Capabilities, Frame, ParkResult, ScanGeometry

log = logging.getLogger("stemagent.drivers.nion")
T = TypeVar("T")

#: the probe FWHM used for a park's reported dose when neither the device nor the options know it
#: (the agent's SafetyConfig default, so reported and predicted park doses agree)
DEFAULT_PROBE_FWHM_A = 0.8


class NionDriver:
    """The ``Driver`` protocol on a Nion scan hardware source (``cfg.scan_device_id``).

    ``microscope``: a :class:`~stemagent.drivers.nion.usim.UsimMicroscope` this driver starts on
    :meth:`connect` and (if ``own_microscope``) stops on :meth:`close` (``mode: usim``), or None to
    use the instrument Swift already runs (``mode: swift``).
    """

    def __init__(self, cfg: NionConfig, microscope: Any = None, *, own_microscope: bool = True) -> None:
        self.cfg = cfg
        self.microscope = microscope
        self.own_microscope = own_microscope
        self.generator = getattr(microscope, "generator", None)
        self._scan_pool = self._new_pool("nion-scan")
        self._blank_pool = self._new_pool("nion-blank")
        self._index = 0
        self._context: ScanGeometry | None = None  # the last frame: Nion's scan context for parks
        self._context_fp: Any = None
        self._closed = False
        self._started = False
        self.name = "nion-usim" if microscope is not None else f"nion:{cfg.scan_device_id}"

    @staticmethod
    def _new_pool(prefix: str) -> concurrent.futures.ThreadPoolExecutor:
        return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=prefix)

    # --- calling Nion ------------------------------------------------------------------------
    async def _call(self, fn: Callable[..., T], *args: Any, extra_s: float = 0.0, blank_path: bool = False) -> T:
        """Run a blocking Nion call in its worker under a timeout; foreign errors become DriverFault."""
        if self._closed:
            raise DriverFault("the Nion backend is closed")
        pool = self._blank_pool if blank_path else self._scan_pool
        timeout = self.cfg.call_timeout_s + extra_s
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.run_in_executor(pool, fn, *args), timeout=timeout)
        except TimeoutError:
            if not blank_path:  # the worker may be stuck in Nion: abort, and let a fresh one take over
                self._abort_soon()
                self._scan_pool.shutdown(wait=False, cancel_futures=True)
                self._scan_pool = self._new_pool("nion-scan")
            raise DriverFault(f"Nion call {fn.__name__} did not return within {timeout:.1f} s") from None
        except asyncio.CancelledError:
            if not blank_path:
                self._abort_soon()
            raise
        except (DriverFault, InputError, CommandRefused):
            raise
        except Exception as exc:  # noqa: BLE001 - Nion raises AssertionError, Exception, ...
            raise DriverFault(f"Nion {fn.__name__.strip('_')} failed: {type(exc).__name__}: {exc}") from None

    def _abort_soon(self) -> None:
        """Abort a recording in flight (on the blank thread: it must not wait behind the scan)."""
        if not self._closed:
            self._blank_pool.submit(self._abort_sync)

    def _hardware_source(self) -> Any:
        hs = HardwareSource.HardwareSourceManager().get_hardware_source_for_hardware_source_id(self.cfg.scan_device_id)
        if hs is None:
            raise DriverFault(f"Nion scan device {self.cfg.scan_device_id!r} is not registered "
                              "(is the instrument running in Swift?)")
        return hs

    def _channel_index(self, hs: Any) -> int:
        names = [hs.get_channel_name(i) for i in range(hs.channel_count)]
        if self.cfg.channel not in names:
            raise DriverFault(f"scan device {self.cfg.scan_device_id!r} has no channel {self.cfg.channel!r} (it has {names})")
        return names.index(self.cfg.channel)

    def _read_control(self, sc: Any, name: str, override: float | None, scale: float, what: str) -> float:
        if override is not None:
            return float(override)
        ok, value = sc.TryGetVal(name)
        if not ok or value is None or not math.isfinite(float(value)) or float(value) <= 0:
            raise DriverFault(f"the STEM controller has no usable {name!r} ({what}); set it in adapter_options")
        return float(value) * scale

    def _current_pA(self, sc: Any) -> float:
        return self._read_control(sc, self.cfg.beam_current_control, self.cfg.beam_current_pA, 1e12, "beam current, A")

    @property
    def probe_fwhm_A(self) -> float | None:
        return self.cfg.probe_fwhm_A or getattr(self.generator, "probe_fwhm_A", None)

    # --- blocking work (worker threads) -------------------------------------------------------
    def _check_sync(self) -> None:
        hs = self._hardware_source()
        self._channel_index(hs)

    def _capabilities_sync(self) -> Capabilities:
        hs = self._hardware_source()
        sc = hs.stem_controller
        fp = hs.get_frame_parameters_from_dict(ng.frame_parameters(ScanGeometry()))
        max_fov_A = float(hs.scan_device.calculate_max_field_of_view(fp)) * 10.0  # nm -> Å
        max_shape = (self.cfg.max_shape_px, self.cfg.max_shape_px)
        min_dwell, max_dwell = self.cfg.min_dwell_s, self.cfg.max_dwell_s
        limits = getattr(self.generator, "limits", None)  # what the twin behind usim can render
        if limits is not None:
            max_fov_A = min(max_fov_A, limits[0])
            max_shape = (min(max_shape[0], limits[1][0]), min(max_shape[1], limits[1][1]))
            min_dwell, max_dwell = max(min_dwell, limits[2]), min(max_dwell, limits[3])
        if self.cfg.max_fov_A is not None:
            max_fov_A = min(max_fov_A, self.cfg.max_fov_A)
        return Capabilities(
            name=self.name,
            max_fov_A=max_fov_A,
            max_shape_px=max_shape,
            min_dwell_s=min_dwell,
            max_dwell_s=max_dwell,
            can_park=True,
            detectors=(self.cfg.channel,),
            beam_energy_keV=self._read_control(sc, self.cfg.energy_control, self.cfg.beam_energy_keV, 1e-3, "high tension, V"),
            beam_current_pA=self._current_pA(sc),
            probe_fwhm_A=self.probe_fwhm_A,
        )

    def _prepare_scan(self, hs: Any) -> None:
        """Stop Swift's live view (once asked to) and record only from our channel where it matters."""
        if self.cfg.stop_view and hs.is_playing:
            log.warning("Nion backend: stopping the live view of %s for the agent's scans", self.cfg.scan_device_id)
            hs.stop_playing(sync_timeout=5.0)
        idx = self._channel_index(hs)
        if not hs.get_channel_enabled(idx):
            hs.set_channel_enabled(idx, True)
        if self.microscope is not None:  # usim renders once per enabled channel: one channel, one dose
            for i in range(hs.channel_count):
                if i != idx and hs.get_channel_enabled(i):
                    hs.set_channel_enabled(i, False)

    def _unblank(self, sc: Any) -> None:
        sc.SetVal(self.cfg.blank_control, 0.0)

    def _record_sync(self, fp_dict: dict[str, Any]) -> dict[str, Any]:
        hs = self._hardware_source()
        sc = hs.stem_controller
        self._prepare_scan(hs)
        fp = hs.get_frame_parameters_from_dict(fp_dict)
        current_pA = self._current_pA(sc)
        self._unblank(sc)
        called_s = time.monotonic()
        xdatas = hs.record_immediate(fp)
        now_s, now_epoch = time.monotonic(), time.time()
        xd = next((x for x in xdatas or () if x is not None
                   and x.metadata.get("hardware_source", {}).get("channel_name") == self.cfg.channel), None)
        if xd is None:
            raise DriverFault("the scan ended without data (the scan was aborted or the scan device stopped)")
        meta = xd.metadata
        rows = int(fp_dict["pixel_size"][0])
        valid = int(meta.get("scan", {}).get("valid_rows", rows))
        if xd.data_shape != tuple(fp_dict["pixel_size"]) or valid < rows:
            raise DriverFault(f"the scan ended early: {valid} of {rows} rows, shape {xd.data_shape}")
        return {
            # Nion keeps its buffers; the bridge sends frames zero-copy, so the frame owns a copy
            "image": np.array(xd.data, dtype=np.float32, copy=True),
            "calibrations": [(c.scale, c.units) for c in xd.dimensional_calibrations],
            "scan": dict(meta.get("scan", {})),
            "detector": dict(meta.get("hardware_source", {})),
            "end_s": ng.monotonic_of(xd.timestamp, now_s, now_epoch),
            "called_s": called_s,
            "current_pA": current_pA,
            "fp": fp,
        }

    def _park_sync(self, fraction_yx: tuple[float, float], dwell_s: float) -> dict[str, Any]:
        hs = self._hardware_source()
        sc = hs.stem_controller
        ctx, fp = sc.scan_context, self._context_fp
        if (ctx.size, ctx.center_nm, ctx.fov_nm, ctx.rotation_rad or 0.0) != (fp.pixel_size, fp.center_nm, fp.fov_nm, fp.rotation_rad):
            hs.set_current_frame_parameters(fp)  # Nion measures the probe position in the scan context
        current_pA = self._current_pA(sc)
        self._unblank(sc)
        hs.probe_position = Geometry.FloatPoint(y=fraction_yx[0], x=fraction_yx[1])
        pos = sc.probe_position
        if sc.probe_state != "parked" or pos is None or abs(pos.y - fraction_yx[0]) > 1e-9 or abs(pos.x - fraction_yx[1]) > 1e-9:
            raise DriverFault(f"the probe did not park at {fraction_yx} (state {sc.probe_state!r}, position {pos!r})")
        sampler = getattr(self.generator, "sample_park", None)
        if sampler is not None:  # the usim twin samples its ADF signal while parked
            r = sampler(sc, dwell_s)
            return {"start_s": r.start_time_s, "interval_s": r.sample_interval_s, "signal": np.asarray(r.signal), "current_pA": current_pA}
        start = time.monotonic()  # Nion offers no ADF read-out of a parked probe: hold it there
        time.sleep(dwell_s)
        return {"start_s": start, "interval_s": dwell_s, "signal": np.zeros(0), "current_pA": current_pA}

    def _blank_sync(self) -> None:
        hs = self._hardware_source()
        sc = hs.stem_controller
        sc.SetVal(self.cfg.blank_control, 1.0)
        ok, value = sc.TryGetVal(self.cfg.blank_control)
        if not ok or not value:
            raise DriverFault(f"the blanker ({self.cfg.blank_control!r}) did not confirm: reads {value!r}")
        self._abort_sync()

    def _abort_sync(self) -> None:
        try:
            hs = self._hardware_source()
            if hs.is_recording:
                hs.abort_recording()
        except Exception:  # noqa: BLE001 - best effort; the blank already happened or will be reported
            log.exception("Nion backend: aborting the recording failed")

    # --- Driver protocol ------------------------------------------------------------------------
    async def connect(self) -> None:
        if self.microscope is not None and not self._started:
            await self._call(self.microscope.start)  # once: a usim stopped later stays stopped until restarted
            self._started = True
        await self._call(self._check_sync)

    async def close(self) -> None:
        if self._closed:
            return
        try:
            await self.blank()
        except Exception as exc:  # noqa: BLE001 - closing: report and go on
            log.warning("Nion backend: blank on close failed: %s", exc)
        self._closed = True
        self._scan_pool.shutdown(wait=False, cancel_futures=True)
        self._blank_pool.shutdown(wait=True, cancel_futures=False)
        if self.microscope is not None and self.own_microscope:
            self.microscope.stop()

    async def capabilities(self) -> Capabilities:
        return await self._call(self._capabilities_sync)

    async def acquire(self, geometry: ScanGeometry) -> Frame:
        fp_dict = ng.frame_parameters(geometry)  # InputError before anything reaches Nion
        r = await self._call(self._record_sync, fp_dict, extra_s=geometry.frame_time_s)
        got = ng.geometry_from_scan(r["image"].shape, r["calibrations"], r["scan"], r["detector"])
        meta: dict[str, Any] = {"nion_scan_id": r["scan"].get("scan_id"), "nion_pixel_time_us": r["detector"].get("pixel_time_us")}
        if ng.same_geometry(geometry, got):
            got = geometry  # the same up to the nm/µs round trip: keep the caller's numbers
        else:
            meta["requested_geometry"] = encode_geometry(geometry)
        start = ng.frame_start_s(r["end_s"], got, r["called_s"])
        frame = Frame(
            image=r["image"],
            geometry=got,
            line_times_s=got.line_start_times_s(start),
            index=self._index,
            dose_e_per_A2=dose_model.scan_dose_e_per_A2(r["current_pA"], got),
            source=self.name,
            detector=self.cfg.channel,
            meta=meta,
        )
        self._index += 1
        self._context, self._context_fp = got, r["fp"]
        return frame

    async def stream(self, geometry: ScanGeometry, n_frames: int | None = None) -> AsyncIterator[Frame]:
        i = 0
        while n_frames is None or i < n_frames:
            yield await self.acquire(geometry)
            i += 1

    async def park(self, position_A: tuple[float, float], dwell_s: float) -> ParkResult:
        if not (math.isfinite(dwell_s) and dwell_s > 0):
            raise InputError("dwell_s", dwell_s, "must be a positive time in s")
        if self._context is None:
            raise InputError("position_A", tuple(position_A),
                             "no frame acquired yet: Nion places a parked probe in the last scanned field")
        fraction = ng.probe_fraction(self._context, (float(position_A[0]), float(position_A[1])))
        r = await self._call(self._park_sync, fraction, float(dwell_s), extra_s=dwell_s)
        fwhm = self.probe_fwhm_A or DEFAULT_PROBE_FWHM_A
        return ParkResult(
            position_A=(float(position_A[0]), float(position_A[1])),
            dwell_s=float(dwell_s),
            start_time_s=float(r["start_s"]),
            sample_interval_s=float(r["interval_s"]),
            signal=r["signal"],
            dose_e_per_A2=dose_model.park_dose_e_per_A2(r["current_pA"], float(dwell_s), fwhm),
        )

    async def blank(self) -> None:
        await self._call(self._blank_sync, blank_path=True)

    # --- construction -----------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: NionConfig) -> "NionDriver":
        if cfg.mode == "swift":
            return cls(cfg)
        # usim (Nion's simulated microscope) is imported only in usim mode
        from stemagent.drivers.nion.usim import UsimMicroscope, build_generator

        generator = build_generator(cfg.usim, cfg.blank_control)
        twin = cfg.usim.generator == "twin"
        microscope = UsimMicroscope(
            generator,
            beam_current_pA=generator.beam_current_pA if twin else None,
            energy_keV=generator.energy_keV if twin else None,
        )
        return cls(cfg, microscope)
