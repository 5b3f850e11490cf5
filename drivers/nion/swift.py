"""Start the bridge inside a running Nion Swift, from its Python console (or File > Run Script).

Swift already runs its instruments; the bridge only needs to find them. In Swift's console::

    from stemagent.drivers.nion.swift import start_bridge
    bridge = start_bridge("/path/to/nion-swift.yaml")   # serves until bridge.stop()
    bridge.status()                                     # the bridge's counters
    bridge.stop()                                       # blanks, then stops

The config is an ordinary bridge config (``drivers/PROTOCOL.md``) whose backend is
``adapter: stemagent.drivers.nion:make_driver`` with ``adapter_options: {mode: swift,
scan_device_id: ...}`` (``configs/bridge/nion-swift.yaml``). The bridge gets its own thread and
event loop, so Swift's UI thread never waits on the network; Nion calls go through the backend's
worker threads, as Swift's own acquisition panels do. Then, from any machine that reaches the
console PC: ``stemagent run --config <a zmq run config pointing at it>``.

Swift's own fail-safes stay in charge: stopping the instrument or the scan in Swift ends the
agent's scan (the agent faults, blanks and waits), and :meth:`BridgeInSwift.stop` (or closing
Swift) blanks the beam first.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any

from stemagent.drivers.bridge import Bridge, BridgeConfig, backend_from_config, load_bridge_config

log = logging.getLogger("stemagent.drivers.nion.swift")


class BridgeInSwift:
    """A bridge on its own thread and event loop, serving the backend its config names."""

    def __init__(self, cfg: BridgeConfig) -> None:
        self.cfg = cfg
        self.bridge: Bridge | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout_s: float = 120.0) -> "BridgeInSwift":
        """Start serving; returns once the sockets are bound (raises what stopped it from starting)."""
        if self.running:
            return self
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, name="stemagent-bridge", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"the bridge did not start within {timeout_s:g} s")
        if self._error is not None:
            self._thread.join(timeout=5.0)
            raise self._error
        print(self.describe())  # noqa: T201 - Swift's console is where the operator reads it
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported to start() or logged
            if not self._ready.is_set():
                self._error = exc
                self._ready.set()
            else:
                log.exception("stemagent bridge stopped on an error")

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        cfg = self.cfg
        bridge = Bridge(backend_from_config(cfg), cfg.control_endpoint, cfg.frames_endpoint, frames_hwm=cfg.frames_hwm,
                        control_hwm=cfg.control_hwm, client_timeout_s=cfg.client_timeout_s, limits=cfg.limits)
        await bridge.start()
        self.bridge = bridge
        self._ready.set()
        try:
            await bridge.serve()
        finally:
            await bridge.close()

    def describe(self) -> str:
        return self.bridge.describe() if self.bridge is not None else "stemagent bridge: not started"

    def status(self) -> dict[str, Any]:
        """The bridge's counters (as its ``status`` request answers)."""
        return {} if self.bridge is None else self.bridge.status()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Blank, stop serving and wait for the bridge's thread to end."""
        if not self.running or self._loop is None or self.bridge is None:
            return
        self._loop.call_soon_threadsafe(self.bridge.stop, "stopped from Swift")
        assert self._thread is not None
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError(f"the bridge did not stop within {timeout_s:g} s")


def start_bridge(config: str | Path | BridgeConfig) -> BridgeInSwift:
    """Start a bridge on the instrument Swift runs (``config``: a bridge YAML file or a :class:`BridgeConfig`)."""
    cfg = config if isinstance(config, BridgeConfig) else load_bridge_config(config)
    return BridgeInSwift(cfg).start()
