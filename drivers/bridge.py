"""Console-side bridge: serves any :class:`~stemagent.driver.Driver` over the wire protocol.

Run it next to the microscope software::

    stemagent bridge --config configs/bridge.yaml
    python -m stemagent.drivers.bridge --config configs/bridge.yaml   # adapters only, without the agent's deps

The bridge binds a ROUTER socket for commands and a PUB socket for frames (``drivers/PROTOCOL.md``).
Its import footprint is numpy, pyzmq, pydantic and the stemagent core types; a backend is either
an ``adapter`` import path ``"package.module:factory"`` returning a ``Driver`` (see
``drivers/ADAPTERS.md``) or a ``driver`` section (one of the agent's driver configs, e.g. the
twin), which the wiring room builds: ``stemagent bridge`` hands :func:`run_bridge` its builder,
so this module never imports the agent or a simulator.

Safety on the console side, independent of the agent:

- **Limits of its own** (``limits`` in its config, tightened by the device's capabilities):
  allowed area, field of view, pixels, frame size in memory, dwell, scan time and park time.
  A command outside them is refused (``Refused``) and never reaches the device.
- **One controlling client**: the first client (``client`` field of its requests, else its
  socket identity) to send a beam command controls the beam; beam commands of other clients
  are refused until the controller has been silent for ``client_timeout_s``. Anyone may blank.
- **Watchdog**: only valid requests from the controlling client feed it (not garbage, not
  another client's status polls); when the controller is silent for ``client_timeout_s`` with
  the beam possibly on, the bridge blanks and releases control.
- SIGTERM and SIGINT blank the beam first, then stop the bridge (a second signal exits at
  once); the bridge also blanks on a ``blank`` request (cancelling the running scan or park)
  and when it shuts down.

At start it prints its backend, endpoints and limits; rejected messages are logged at WARNING,
the first few one by one and then as a count every 10 s.

Lifetime: ``async with Bridge(...) as bridge: await bridge.serve()`` (or :meth:`run`). The
tasks that run device calls, streams and blanks live in an ``asyncio.TaskGroup`` for as long
as :meth:`serve` runs; when it returns they have been cancelled and awaited, and
:meth:`close` blanks and releases the backend. Every call to the backend has a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import signal
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import zmq
import zmq.asyncio
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stemagent.codec import encode_capabilities
from stemagent.driver import CommandRefused, Driver, DriverFault
from stemagent.errors import ConfigError, InputError, StemAgentError
from stemagent.drivers import wire
from stemagent.drivers.bridge_limits import BridgeLimits, RejectionLog
from stemagent.types import Capabilities

log = logging.getLogger("stemagent.drivers.bridge")


ENDPOINT = r"^(tcp|ipc|inproc)://\S+$"


class BridgeConfig(BaseModel):
    """The bridge's YAML file. ``driver`` or ``adapter`` names the backend (the minimal twin if neither)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    control_endpoint: str = Field("tcp://127.0.0.1:5555", pattern=ENDPOINT, description="ROUTER bind address for commands")
    frames_endpoint: str = Field("tcp://127.0.0.1:5556", pattern=ENDPOINT, description="PUB bind address for frames")
    driver: dict[str, Any] | None = Field(None, description="a driver config section, e.g. {kind: minimal-twin}")
    adapter: str | None = Field(None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", description="module:factory")
    adapter_options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the factory")
    frames_hwm: int = Field(4, ge=1, le=1000, description="frames queued per subscriber before the newest are dropped")
    control_hwm: int = Field(100, ge=1)
    client_timeout_s: float = Field(10.0, gt=0, description="blank the beam if the controlling client is silent this long")
    limits: BridgeLimits = Field(default_factory=BridgeLimits)
    seed: int = Field(0, ge=0, description="seed for a simulated backend")


class Bridge:
    """Serve ``driver`` on a ROUTER (commands) and a PUB (frames) socket.

    Endpoints may use port 0 (``tcp://127.0.0.1:0``); after :meth:`start` the bound
    addresses are in :attr:`control_endpoint` and :attr:`frames_endpoint`.
    """

    def __init__(
        self,
        driver: Driver,
        control_endpoint: str = "tcp://127.0.0.1:5555",
        frames_endpoint: str = "tcp://127.0.0.1:5556",
        *,
        frames_hwm: int = 4,
        control_hwm: int = 100,
        client_timeout_s: float = 10.0,
        limits: BridgeLimits | None = None,
        context: zmq.asyncio.Context | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.driver = driver
        #: the limits in force (after :meth:`start`, tightened by the device's capabilities)
        self.limits = limits or BridgeLimits()
        self.control_endpoint = control_endpoint
        self.frames_endpoint = frames_endpoint
        self.frames_hwm = frames_hwm
        self.control_hwm = control_hwm
        self.client_timeout_s = client_timeout_s
        self._ctx = context or zmq.asyncio.Context.instance()
        self._monotonic = monotonic
        self._router: zmq.asyncio.Socket | None = None
        self._pub: zmq.asyncio.Socket | None = None
        self._device_lock = asyncio.Lock()
        self._device_tasks: set[asyncio.Task[None]] = set()
        self._other_tasks: set[asyncio.Task[None]] = set()
        self._tasks: asyncio.TaskGroup | None = None  # while serve() runs
        self._streams: dict[str, asyncio.Task[None]] = {}
        self._seen_ids: OrderedDict[str, None] = OrderedDict()
        self._caps: Capabilities | None = None
        self._last_client_s = monotonic()
        self._controller: str | None = None  # the client whose beam commands run
        self._beam_maybe_on = False
        self._started_s = monotonic()
        self._stopping = asyncio.Event()
        self._blanking: asyncio.Task[None] | None = None
        self.stop_reason = ""
        self._rejections = RejectionLog(log)
        self.stats: dict[str, int] = {
            "requests": 0,
            "rejected": 0,
            "refused": 0,
            "duplicates": 0,
            "frames_published": 0,
            "watchdog_blanks": 0,
        }

    # --- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        await asyncio.wait_for(self.driver.connect(), timeout=60.0)
        self._caps = await asyncio.wait_for(self.driver.capabilities(), timeout=60.0)
        self.limits = self.limits.tightened(self._caps)
        router = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.SNDHWM, self.control_hwm)
        router.setsockopt(zmq.RCVHWM, self.control_hwm)
        # a peer sending a larger message is disconnected by ZeroMQ before we ever see it
        router.setsockopt(zmq.MAXMSGSIZE, wire.MAX_JSON_BYTES)
        router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        pub = self._ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.setsockopt(zmq.SNDHWM, self.frames_hwm)
        pub.copy_threshold = wire.ZERO_COPY_THRESHOLD_BYTES
        for sock, endpoint, name in ((router, self.control_endpoint, "control_endpoint"), (pub, self.frames_endpoint, "frames_endpoint")):
            try:
                sock.bind(endpoint)
            except zmq.ZMQError as exc:
                router.close(linger=0)
                pub.close(linger=0)
                raise InputError(name, endpoint, f"cannot be bound ({exc.strerror})") from None
        router.copy_threshold = wire.ZERO_COPY_THRESHOLD_BYTES
        self.control_endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.frames_endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self._router, self._pub = router, pub
        self._last_client_s = self._monotonic()
        log.info("%s", self.describe())

    def describe(self) -> str:
        """One line: backend, device, endpoints and limits (printed at start)."""
        caps = self._caps
        device = f"{caps.name}, {caps.beam_current_pA:g} pA" if caps is not None else "?"
        return (f"stemagent bridge: backend {type(self.driver).__name__} ({device}); control {self.control_endpoint}, "
                f"frames {self.frames_endpoint}; client timeout {self.client_timeout_s:g} s; limits: {self.limits.describe()}")

    def stop(self, reason: str = "") -> None:
        """Blank at once and ask :meth:`serve` to return (called from a signal handler on the loop)."""
        self.stop_reason = self.stop_reason or reason
        self._stopping.set()
        if self._blanking is None:
            self._blanking = self._task(self._blank_now(reason or "stop"), "bridge-blank")

    async def _blank_now(self, why: str) -> None:
        try:
            await asyncio.wait_for(self.driver.blank(), timeout=10.0)
            self._beam_maybe_on = False
            log.warning("bridge: beam blanked (%s)", why)
        except Exception:  # noqa: BLE001
            log.exception("bridge: blank (%s) failed", why)

    async def __aenter__(self) -> Bridge:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        await self._blank_now("shutting down")  # first: nothing below may delay it
        pending = list(self._streams.values()) + list(self._device_tasks) + list(self._other_tasks)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        try:
            await asyncio.wait_for(self.driver.blank(), timeout=10.0)  # again: a cancelled command may have unblanked
            await asyncio.wait_for(self.driver.close(), timeout=10.0)
        except Exception:  # noqa: BLE001 - shutting down: log and go on
            log.exception("bridge: blanking/closing the backend failed")
        for s in (self._router, self._pub):
            if s is not None:
                s.close(linger=0)
        self._router = self._pub = None

    async def serve(self) -> None:
        """Answer requests until :meth:`stop`; never raises on bad input. The tasks it starts are
        cancelled and awaited before it returns."""
        if self._router is None:
            await self.start()
        assert self._router is not None
        async with asyncio.TaskGroup() as tasks:
            self._tasks = tasks
            try:
                await self._serve_requests()
            finally:
                self._tasks = None
                for t in list(self._streams.values()) + list(self._device_tasks) + list(self._other_tasks):
                    if t is not self._blanking:
                        t.cancel()

    async def _serve_requests(self) -> None:
        assert self._router is not None
        poll_ms = int(max(10, min(200, self.client_timeout_s * 250)))
        while not self._stopping.is_set():
            try:
                ready = await self._router.poll(poll_ms, zmq.POLLIN)  # type: ignore[call-arg]  # the stubs give Socket the Poller's poll()
            except zmq.ZMQError:
                log.exception("bridge: polling the control socket failed")
                break
            if ready:
                try:
                    parts = await self._router.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    continue
                try:
                    await self._handle(parts)
                except Exception as exc:  # noqa: BLE001 - a message must never take the bridge down
                    self.stats["rejected"] += 1
                    self._rejections.note(f"unexpected error handling a message: {exc!r}")
            await self._watchdog()

    async def run(self) -> None:
        """start, serve, close."""
        await self.start()
        try:
            await self.serve()
        finally:
            await self.close()

    # --- requests -------------------------------------------------------------------------
    async def _handle(self, parts: list[Any]) -> None:
        if len(parts) < 2:
            self.stats["rejected"] += 1
            self._rejections.note(f"a message with no body ({len(parts)} parts)")
            return
        identity, body = parts[0].bytes, parts[1:]
        self.stats["requests"] += 1
        try:
            req = wire.decode_request(body)
        except wire.WireError as exc:
            self.stats["rejected"] += 1
            self._rejections.note(f"request: {exc}")
            rid = wire.request_id_of(body)
            if rid is not None:
                await self._reply(identity, rid, False, error=("WireError", str(exc)))
            return
        client = req.client or f"socket-{identity.hex()}"
        if client == self._controller:
            self._last_client_s = self._monotonic()  # only the controlling client feeds the watchdog
        if req.id in self._seen_ids:
            self.stats["duplicates"] += 1
            self._rejections.note(f"request id {req.id} seen before; not executed again")
            await self._reply(identity, req.id, False, error=("DuplicateRequest", f"request id {req.id} was already received"))
            return
        self._seen_ids[req.id] = None
        while len(self._seen_ids) > 4096:
            self._seen_ids.popitem(last=False)

        if req.op in ("acquire", "park", "stream_start"):
            why = self._take_control(client) or self._over_limits(req)
            if why is not None:
                self.stats["refused"] += 1
                self._rejections.note(f"{req.op} {req.id} refused: {why}")
                await self._reply(identity, req.id, False, error=("Refused", why))
                return
        if req.op == "heartbeat":
            await self._reply(identity, req.id, True, {"streams": sorted(self._streams)})
        elif req.op == "status":
            await self._reply(identity, req.id, True, self.status())
        elif req.op == "capabilities":
            self._spawn(self._capabilities(identity, req.id))
        elif req.op == "blank":
            self._spawn(self._blank(identity, req.id), device=False)
        elif req.op == "acquire":
            self._spawn(self._acquire(identity, req))
        elif req.op == "park":
            self._spawn(self._park(identity, req))
        elif req.op == "stream_start":
            await self._stream_start(identity, req)
        elif req.op == "stream_stop":
            task = self._streams.get(req.stream)
            if task is not None:
                task.cancel()
            await self._reply(identity, req.id, True, {"stopped": task is not None})

    def _take_control(self, client: str) -> str | None:
        """Give the beam to ``client`` unless another client holds it and has spoken recently."""
        now = self._monotonic()
        if self._controller not in (None, client) and now - self._last_client_s <= self.client_timeout_s:
            return f"another client ({self._controller}) controls the beam"
        if self._controller != client:
            log.warning("bridge: client %s now controls the beam", client)
        self._controller = client
        self._last_client_s = now
        return None

    def _over_limits(self, req: Any) -> str | None:
        if req.op == "park":
            return self.limits.check_park(req.position_A, req.dwell_s)
        try:
            g = wire.geometry_from_wire(req.geometry)
        except wire.WireError as exc:
            return str(exc)
        return self.limits.check_scan(g)

    def status(self) -> dict[str, Any]:
        return {
            "protocol": wire.PROTOCOL_VERSION,
            "backend": type(self.driver).__name__,
            "uptime_s": self._monotonic() - self._started_s,
            "streams": sorted(self._streams),
            "busy": self._device_lock.locked(),
            "beam_maybe_on": self._beam_maybe_on,
            "controller": self._controller,
            **self.stats,
        }

    def _task(self, coro: Any, name: str) -> asyncio.Task[Any]:
        """A task in serve()'s TaskGroup (outside serve, e.g. a signal before it started: a plain task
        that close() awaits)."""
        if self._tasks is not None:
            return self._tasks.create_task(coro, name=name)
        task = asyncio.ensure_future(coro)
        self._other_tasks.add(task)
        task.add_done_callback(self._other_tasks.discard)
        return task

    def _spawn(self, coro: Any, device: bool = True) -> None:
        task = self._task(coro, "bridge-device" if device else "bridge-other")
        if device:
            self._device_tasks.add(task)
            task.add_done_callback(self._device_tasks.discard)
        else:
            self._other_tasks.add(task)
            task.add_done_callback(self._other_tasks.discard)

    async def _reply(
        self,
        identity: bytes,
        rid: str,
        ok: bool,
        result: dict[str, Any] | None = None,
        error: tuple[str, str] | None = None,
        arrays: list[Any] = [],  # noqa: B006 - never mutated
    ) -> None:
        if self._router is None:
            return
        try:
            parts, _ = wire.encode_reply(rid, ok, result, error, arrays)
        except (wire.WireError, ValidationError, ValueError) as exc:
            log.error("bridge: cannot encode the reply to %s: %s", rid, exc)
            parts, _ = wire.encode_reply(rid, False, error=("EncodeError", str(exc)))
        try:
            await self._router.send_multipart([identity, *parts], flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:
            self._rejections.note(f"reply to {rid} not delivered ({exc})")

    async def _device(self, identity: bytes, rid: str, op: Callable[[], Any]) -> Any:
        """Run one device call under the device lock; errors become error replies."""
        try:
            async with self._device_lock:
                self._beam_maybe_on = True
                return await op()
        except asyncio.CancelledError:
            await self._reply(identity, rid, False, error=("Cancelled", "cancelled by a blank request or shutdown"))
            raise
        except CommandRefused as exc:
            await self._reply(identity, rid, False, error=("Refused", str(exc)))
        except (DriverFault, InputError, StemAgentError) as exc:
            await self._reply(identity, rid, False, error=(type(exc).__name__, str(exc)))
        except Exception as exc:  # noqa: BLE001 - the backend's bug must not kill the bridge
            log.exception("bridge: backend failed on %s", rid)
            await self._reply(identity, rid, False, error=("DriverFault", f"{type(exc).__name__}: {exc}"))
        return None

    async def _capabilities(self, identity: bytes, rid: str) -> None:
        try:
            if self._caps is None:
                self._caps = await self.driver.capabilities()
            await self._reply(identity, rid, True, encode_capabilities(self._caps))
        except Exception as exc:  # noqa: BLE001
            await self._reply(identity, rid, False, error=("DriverFault", f"{type(exc).__name__}: {exc}"))

    async def _acquire(self, identity: bytes, req: wire.AcquireRequest) -> None:
        try:
            geometry = wire.geometry_from_wire(req.geometry)
        except wire.WireError as exc:
            await self._reply(identity, req.id, False, error=("InputError", str(exc)))
            return

        async def op() -> Any:
            return await self.driver.acquire(geometry)

        frame = await self._device(identity, req.id, op)
        if frame is None:
            return
        try:
            header, image, _ = wire.frame_header(frame)
        except (wire.WireError, ValidationError) as exc:
            await self._reply(identity, req.id, False, error=("DriverFault", f"backend frame not sendable: {exc}"))
            return
        await self._reply(identity, req.id, True, {"frame": header.model_dump(mode="json")}, arrays=[image])

    async def _park(self, identity: bytes, req: wire.ParkRequest) -> None:
        async def op() -> Any:
            return await self.driver.park(req.position_A, req.dwell_s)

        result = await self._device(identity, req.id, op)
        if result is None:
            return
        fields, signal_ = wire.park_result_fields(result)
        await self._reply(identity, req.id, True, fields, arrays=[signal_])

    async def _blank(self, identity: bytes, rid: str) -> None:
        await self._cancel_device_work()
        try:
            await asyncio.wait_for(self.driver.blank(), timeout=10.0)
            self._beam_maybe_on = False
            await self._reply(identity, rid, True)
        except Exception as exc:  # noqa: BLE001
            log.exception("bridge: blank failed")
            await self._reply(identity, rid, False, error=("DriverFault", f"blank failed: {type(exc).__name__}: {exc}"))

    async def _cancel_device_work(self) -> None:
        tasks = list(self._streams.values()) + list(self._device_tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _stream_start(self, identity: bytes, req: wire.StreamStartRequest) -> None:
        if req.stream in self._streams:
            await self._reply(identity, req.id, False, error=("InputError", f"stream {req.stream} already running"))
            return
        try:
            geometry = wire.geometry_from_wire(req.geometry)
        except wire.WireError as exc:
            await self._reply(identity, req.id, False, error=("InputError", str(exc)))
            return
        task = self._task(self._run_stream(req.stream, geometry, req.n_frames), f"bridge-stream-{req.stream}")
        self._streams[req.stream] = task
        stream = req.stream
        task.add_done_callback(lambda _t: self._streams.pop(stream, None))
        await self._reply(identity, req.id, True, {"stream": req.stream})

    async def _run_stream(self, stream: str, geometry: Any, n_frames: int | None) -> None:
        sent = 0
        error: tuple[str, str] | None = None
        try:
            async with self._device_lock:
                self._beam_maybe_on = True
                async for frame in self.driver.stream(geometry, n_frames):
                    parts, _ = wire.encode_frame(frame, stream)
                    if self._pub is None:
                        break
                    # PUB never blocks: past the high-water mark ZeroMQ drops the message
                    await self._pub.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
                    sent += 1
                    self.stats["frames_published"] += 1
        except asyncio.CancelledError:
            error = ("Cancelled", "stream stopped")
        except Exception as exc:  # noqa: BLE001
            log.exception("bridge: stream %s failed", stream)
            error = ("DriverFault", f"{type(exc).__name__}: {exc}")
        if self._pub is not None:
            try:
                await self._pub.send_multipart(wire.encode_stream_end(stream, sent, error), flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    async def _watchdog(self) -> None:
        self._rejections.flush()
        if not self._beam_maybe_on:
            return
        if self._monotonic() - self._last_client_s <= self.client_timeout_s:
            return
        log.error("bridge: the controlling client %s said nothing for %.1f s; blanking the beam", self._controller,
                  self.client_timeout_s)
        await self._cancel_device_work()
        try:
            await asyncio.wait_for(self.driver.blank(), timeout=10.0)
            self._beam_maybe_on = False
            self._controller = None  # the next client to command the beam takes it
            # counted once the beam is blanked (a reader of the count may rely on it)
            self.stats["watchdog_blanks"] += 1
        except Exception:  # noqa: BLE001
            log.exception("bridge: watchdog blank failed")
            self._last_client_s = self._monotonic()  # try again after another timeout


# --- configuration and entry point ----------------------------------------------------------


def load_bridge_config(path: str | Path) -> BridgeConfig:
    from stemagent.config import load_model  # reads the YAML; errors name file, field and value

    p = Path(path)
    cfg = load_model(p, BridgeConfig)
    if cfg.driver is not None and cfg.adapter is not None:
        raise ConfigError(str(p), "driver/adapter", cfg.adapter, "give either 'driver' or 'adapter', not both")
    if cfg.driver is None and cfg.adapter is None:
        cfg = cfg.model_copy(update={"driver": {"kind": "minimal-twin"}})  # the twin by default
    return cfg


#: builds a backend from a ``driver`` section and a seed (the wiring room's
#: :func:`stemagent.agent.app.factory.bridge_backend`, handed in by ``stemagent bridge``)
DriverBuilder = Callable[[dict[str, Any], int], Driver]


def backend_from_config(cfg: BridgeConfig, build_driver: DriverBuilder | None = None) -> Driver:
    """Build the backend: an adapter factory, or (with ``build_driver``) a driver from one of the
    agent's driver configs. Without ``build_driver`` only adapters can be served."""
    if cfg.adapter is not None:
        module_name, _, attr = cfg.adapter.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError("<bridge config>", "adapter", cfg.adapter, f"cannot be imported ({exc})") from None
        driver = factory(**cfg.adapter_options)
    else:
        assert cfg.driver is not None
        if build_driver is None:
            raise ConfigError("<bridge config>", "driver.kind", cfg.driver.get("kind"),
                              "a 'driver' backend is built by `stemagent bridge`; `python -m stemagent.drivers.bridge` "
                              "serves adapters only")
        driver = build_driver(dict(cfg.driver), cfg.seed)
    if not isinstance(driver, Driver):
        raise ConfigError("<bridge config>", "adapter", cfg.adapter, "did not return an object implementing Driver")
    return driver


async def serve_config(cfg: BridgeConfig, build_driver: DriverBuilder | None = None) -> str:
    """Serve until SIGINT or SIGTERM (which blank first); returns what stopped it."""
    bridge = Bridge(
        backend_from_config(cfg, build_driver),
        cfg.control_endpoint,
        cfg.frames_endpoint,
        frames_hwm=cfg.frames_hwm,
        control_hwm=cfg.control_hwm,
        client_timeout_s=cfg.client_timeout_s,
        limits=cfg.limits,
    )
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if bridge.stop_reason:  # a second signal: do not wait any longer
            print(f"stemagent bridge: {sig.name} again; exiting now", file=sys.stderr, flush=True)
            os._exit(128 + int(sig))
        bridge.stop(sig.name)

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal, sig)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - not on the main thread / Windows
            pass
    await bridge.start()
    print(bridge.describe(), file=sys.stderr, flush=True)
    try:
        await bridge.serve()
    finally:
        await bridge.close()
    print(f"stemagent bridge: stopped ({bridge.stop_reason or 'stop'}); beam blanked", file=sys.stderr, flush=True)
    return bridge.stop_reason


def run_bridge(config_path: str | Path, build_driver: DriverBuilder | None = None) -> int:
    """Blocking entry point used by ``stemagent bridge`` (which passes ``build_driver``) and
    ``python -m stemagent.drivers.bridge`` (adapters only).

    Errors end in one line on stderr: exit 2 for a config or endpoint that cannot be used."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_bridge_config(config_path)
        asyncio.run(serve_config(cfg, build_driver))
    except (ConfigError, InputError) as exc:
        print(f"error: {config_path}: {exc}" if isinstance(exc, InputError) else f"error: {exc}", file=sys.stderr)
        return 2
    except (TimeoutError, StemAgentError, OSError) as exc:  # the backend would not start
        print(f"error: {config_path}: the backend could not start: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before the signal handlers were installed: nothing was running
        print("error: interrupted (SIGINT) while starting", file=sys.stderr)
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stemagent-bridge", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="bridge YAML file")
    args = parser.parse_args(argv)
    return run_bridge(args.config)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
