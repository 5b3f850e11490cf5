"""The agent-side ZeroMQ client: a :class:`~stemagent.driver.Driver` talking to a bridge.

Link supervision: a background task sends ``heartbeat`` requests every
``heartbeat_interval_s``; a heartbeat unanswered for ``heartbeat_timeout_s`` marks the link
lost, so a dead bridge is noticed within ``heartbeat_interval_s + heartbeat_timeout_s``.
On loss the driver

- fails every request in flight with :class:`DriverFault` (the command may or may not have
  executed on the console; it is **never resent**),
- closes its command socket with ``linger=0``, so nothing queued in ZeroMQ is delivered later,
- fails running streams, records :attr:`fault` and calls ``on_fault(reason)``,
- keeps trying to reconnect with a fresh socket, backing off exponentially with jitter.

While the link is down every call raises :class:`DriverFault` at once; :meth:`connect` waits
(up to ``connect_timeout_s``) for the link to come back. Each request carries a fresh id; the
bridge refuses an id it has seen, so a request can never run twice.

Lifetime: ``async with ZmqDriver(...) as driver:`` (or :meth:`connect` ... :meth:`close`). The
driver's background tasks (supervisor, reply reader, frame reader) live in one
``asyncio.TaskGroup`` inside a service task started by :meth:`connect` and ended by
:meth:`close`; none outlives the driver. Every wait on the bridge has a timeout.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import numpy as np
import zmq
import zmq.asyncio
from pydantic import ValidationError

from stemagent.clock import Clock, SystemClock
from stemagent.codec import encode_geometry
from stemagent.driver import CommandRefused, DriverFault
from stemagent.drivers import wire
from stemagent.errors import InputError
from stemagent.types import Capabilities, Frame, ParkResult, ScanGeometry

log = logging.getLogger("stemagent.drivers.zmq")


@dataclass
class _Stream:
    frames: deque[Frame]
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    started: bool = False
    ended: bool = False
    error: str | None = None
    last_index: int = -1
    missing_beats: int = 0


class ZmqDriver:
    """Connects to a bridge at ``control_endpoint`` (commands) and ``frames_endpoint`` (frames)."""

    def __init__(
        self,
        control_endpoint: str,
        frames_endpoint: str,
        *,
        request_timeout_s: float = 5.0,
        connect_timeout_s: float = 10.0,
        heartbeat_interval_s: float = 0.5,
        heartbeat_timeout_s: float = 2.0,
        reconnect_min_s: float = 0.1,
        reconnect_max_s: float = 5.0,
        frame_queue: int = 2,
        frames_hwm: int = 4,
        max_frame_bytes: int = wire.DEFAULT_MAX_ARRAY_BYTES,
        seed: int | None = None,
        clock: Clock | None = None,
        context: zmq.asyncio.Context | None = None,
        on_fault: Callable[[str], None] | None = None,
    ) -> None:
        if heartbeat_interval_s <= 0 or heartbeat_timeout_s <= 0 or request_timeout_s <= 0:
            raise InputError("heartbeat/request timeouts", (heartbeat_interval_s, heartbeat_timeout_s), "must be positive")
        if frame_queue < 1:
            raise InputError("frame_queue", frame_queue, "must be at least 1")
        self.control_endpoint = control_endpoint
        self.frames_endpoint = frames_endpoint
        self.request_timeout_s = request_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        self.frame_queue = frame_queue
        self.frames_hwm = frames_hwm
        self.max_frame_bytes = max_frame_bytes
        self.on_fault = on_fault
        self._rng = np.random.default_rng(seed)
        self._clock: Clock = clock or SystemClock()
        self._ctx = context or zmq.asyncio.Context.instance()
        self._session = secrets.token_hex(4)
        self._ids = itertools.count(1)
        self._dealer: zmq.asyncio.Socket | None = None
        self._sub: zmq.asyncio.Socket | None = None
        self._pending: dict[str, tuple[str, asyncio.Future[tuple[wire.Reply, list[np.ndarray]]]]] = {}
        self._streams: dict[str, _Stream] = {}
        self._link_up = asyncio.Event()
        self._closed = False
        self._service: asyncio.Task[None] | None = None  # owns the TaskGroup of the tasks below
        self._tasks: asyncio.TaskGroup | None = None
        self._reader: asyncio.Task[None] | None = None
        self._caps: Capabilities | None = None
        #: why the link was last lost (None while it has never failed)
        self.fault: str | None = None
        self.stats: dict[str, int] = {
            "requests": 0,
            "faults": 0,
            "reconnects": 0,
            "rejected_messages": 0,
            "late_replies": 0,
            "unconfirmed_commands": 0,
            "frames_received": 0,
            "frames_dropped_local": 0,
            "frames_dropped_upstream": 0,
        }

    @classmethod
    def from_config(cls, cfg: Any, *, seed: int | None = None, clock: Clock | None = None, **kw: Any) -> "ZmqDriver":
        """Build from a :class:`~stemagent.config.ZmqDriverConfig`."""
        return cls(
            cfg.control_endpoint,
            cfg.frames_endpoint,
            request_timeout_s=cfg.request_timeout_s,
            connect_timeout_s=cfg.connect_timeout_s,
            heartbeat_interval_s=cfg.heartbeat_interval_s,
            heartbeat_timeout_s=cfg.heartbeat_timeout_s,
            reconnect_min_s=cfg.reconnect_min_s,
            reconnect_max_s=cfg.reconnect_max_s,
            frame_queue=cfg.frame_queue,
            frames_hwm=cfg.frames_hwm,
            max_frame_bytes=int(cfg.max_frame_mb * 1e6),
            seed=seed,
            clock=clock,
            **kw,
        )

    # --- Driver protocol ------------------------------------------------------------------
    @property
    def link_up(self) -> bool:
        return self._link_up.is_set()

    async def connect(self) -> None:
        """Start link supervision (once) and wait until the bridge answers."""
        if self._closed:
            raise DriverFault("the ZeroMQ driver is closed")
        if self._service is None or self._service.done():
            started = asyncio.Event()
            self._service = asyncio.ensure_future(self._serve(started))
            await started.wait()
        try:
            await asyncio.wait_for(self._link_up.wait(), timeout=self.connect_timeout_s)
        except TimeoutError:
            raise DriverFault(
                f"no bridge answered at {self.control_endpoint} within {self.connect_timeout_s} s"
                + (f" (last fault: {self.fault})" if self.fault else "")
            ) from None

    async def close(self) -> None:
        if self._closed:
            return
        if self.link_up:
            try:
                await self._request("blank", timeout_s=min(self.request_timeout_s, 2.0))
            except (DriverFault, InputError) as exc:
                log.warning("zmq driver: blank on close failed: %s", exc)
        self._closed = True
        if self._service is not None:
            self._service.cancel()
            await asyncio.gather(self._service, return_exceptions=True)
        self._drop_link("driver closed", report=False)
        if self._sub is not None:
            self._sub.close(linger=0)
            self._sub = None

    async def __aenter__(self) -> ZmqDriver:
        await self.connect()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def _serve(self, started: asyncio.Event) -> None:
        """The service task: the driver's tasks in one TaskGroup, until :meth:`close` cancels it."""
        try:
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                self._open_sub()
                tasks.create_task(self._supervise(), name="zmq-supervisor")
                started.set()
        except* Exception as group:  # pragma: no cover - every task catches its own errors; a bug ends the link
            log.error("zmq driver: a background task failed: %r", group.exceptions)
            self._drop_link(f"driver task failed: {group.exceptions[0]!r}", report=True)
        finally:
            self._tasks = None
            started.set()

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[None]:
        assert self._tasks is not None, "the driver is not connected"
        return self._tasks.create_task(coro, name=name)

    async def capabilities(self) -> Capabilities:
        if self._caps is None:
            reply, _ = await self._request("capabilities")
            self._caps = wire.capabilities_from(reply.result)
        return self._caps

    async def acquire(self, geometry: ScanGeometry) -> Frame:
        reply, arrays = await self._request(
            "acquire",
            timeout_s=self.request_timeout_s + 2.0 * geometry.frame_time_s,
            geometry=encode_geometry(geometry),
        )
        try:
            header = wire.frame_header_from_dict(reply.result.get("frame"))
            if len(arrays) != 1:
                raise wire.WireError("reply.arrays", len(arrays), "an acquire reply carries one image")
            return wire.build_frame(header, arrays[0])
        except wire.WireError as exc:
            self.stats["rejected_messages"] += 1
            log.error("zmq driver: rejected acquire reply: %s", exc)
            raise DriverFault(f"bridge sent an invalid frame: {exc}") from None

    async def park(self, position_A: tuple[float, float], dwell_s: float) -> ParkResult:
        reply, arrays = await self._request(
            "park",
            timeout_s=self.request_timeout_s + 2.0 * float(dwell_s),
            position_A=[float(position_A[0]), float(position_A[1])],
            dwell_s=float(dwell_s),
        )
        try:
            return wire.park_result_from(reply, arrays)
        except wire.WireError as exc:
            self.stats["rejected_messages"] += 1
            log.error("zmq driver: rejected park reply: %s", exc)
            raise DriverFault(f"bridge sent an invalid park result: {exc}") from None

    async def blank(self) -> None:
        """Blank the beam. With the link down, one try on a fresh socket (blanking is always safe
        to send), then :class:`DriverFault`; the bridge's own watchdog blanks a silent client's beam."""
        if self.link_up or self._closed:
            await self._request("blank")
            return
        await self._blank_out_of_band(timeout_s=min(self.request_timeout_s, 1.0))

    async def _blank_out_of_band(self, timeout_s: float) -> None:
        rid = f"{self._session}-{next(self._ids)}"
        req = wire.BlankRequest(v=wire.PROTOCOL_VERSION, id=rid, client=self._session, op="blank")
        s = self._open_dealer()
        try:
            if not await s.poll(int(1000 * timeout_s), zmq.POLLOUT):  # type: ignore[call-arg]  # the stubs give Socket the Poller's poll()
                raise DriverFault(f"blank: bridge unreachable at {self.control_endpoint} ({self.fault or 'link down'})")
            await s.send_multipart(wire.encode_request(req), flags=zmq.NOBLOCK)
            if not await s.poll(int(1000 * timeout_s), zmq.POLLIN):  # type: ignore[call-arg]  # the stubs give Socket the Poller's poll()
                raise DriverFault(f"blank {rid}: no reply within {timeout_s:.2f} s while the link is down")
            reply, _ = wire.decode_reply(await s.recv_multipart(flags=zmq.NOBLOCK), self.max_frame_bytes)
        except (zmq.ZMQError, wire.WireError) as exc:
            raise DriverFault(f"blank {rid}: failed while the link is down ({exc})") from None
        finally:
            s.close(linger=0)
        if reply.id != rid or not reply.ok:
            raise DriverFault(f"blank {rid}: not confirmed by the bridge ({reply.error})")
        log.warning("zmq driver: beam blanked through a fresh socket while the link was down")

    async def status(self) -> dict[str, Any]:
        """The bridge's status and this driver's counters (not part of the Driver protocol)."""
        reply, _ = await self._request("status")
        return {"bridge": reply.result, "client": dict(self.stats), "link_up": self.link_up, "fault": self.fault}

    async def stream(self, geometry: ScanGeometry, n_frames: int | None = None) -> AsyncIterator[Frame]:
        """Frames of a bridge-side stream; the newest ``frame_queue`` are kept when we fall behind."""
        sid = f"{self._session}-s{next(self._ids)}"
        state = _Stream(frames=deque(maxlen=self.frame_queue))
        self._streams[sid] = state
        frame_timeout_s = self.request_timeout_s + 2.0 * geometry.frame_time_s
        try:
            await self._request("stream_start", stream=sid, geometry=encode_geometry(geometry), n_frames=n_frames)
            state.started = True
            while True:
                if state.frames:
                    yield state.frames.popleft()
                    continue
                if state.error is not None:
                    raise DriverFault(state.error)
                if state.ended:
                    return
                state.wake.clear()
                try:
                    await asyncio.wait_for(state.wake.wait(), timeout=frame_timeout_s)
                except TimeoutError:
                    raise DriverFault(f"stream {sid}: no frame within {frame_timeout_s:.1f} s") from None
        finally:
            self._streams.pop(sid, None)
            if state.started and not state.ended and state.error is None and self.link_up and not self._closed:
                try:
                    await self._request("stream_stop", timeout_s=min(self.request_timeout_s, 2.0), stream=sid)
                except (DriverFault, InputError) as exc:
                    log.warning("zmq driver: stopping stream %s failed: %s", sid, exc)

    # --- requests -------------------------------------------------------------------------
    async def _request(
        self, op: str, *, timeout_s: float | None = None, require_link: bool = True, **fields: Any
    ) -> tuple[wire.Reply, list[np.ndarray]]:
        if self._closed:
            raise DriverFault(f"{op}: the ZeroMQ driver is closed")
        if require_link and not self.link_up:
            raise DriverFault(f"{op}: bridge link is down ({self.fault or 'not connected'})")
        dealer = self._dealer
        if dealer is None:
            raise DriverFault(f"{op}: no connection to the bridge")
        rid = f"{self._session}-{next(self._ids)}"
        try:
            req = wire._request_adapter.validate_python(
                {"v": wire.PROTOCOL_VERSION, "id": rid, "client": self._session, "op": op, **fields})
        except ValidationError as exc:
            raise wire._validation_error(f"{op} request", fields, exc) from None
        fut: asyncio.Future[tuple[wire.Reply, list[np.ndarray]]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = (op, fut)
        self.stats["requests"] += 1
        try:
            await dealer.send_multipart(wire.encode_request(req), flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            self._pending.pop(rid, None)
            raise DriverFault(f"{op}: cannot send to the bridge ({exc})") from None
        timeout = self.request_timeout_s if timeout_s is None else timeout_s
        try:
            reply, arrays = await asyncio.wait_for(fut, timeout=timeout)
        except TimeoutError:
            self._pending.pop(rid, None)
            if op != "heartbeat":
                self.stats["unconfirmed_commands"] += 1
            raise DriverFault(
                f"{op} {rid}: no reply within {timeout:.2f} s; it may have run on the console and is not resent"
            ) from None
        if not reply.ok:
            err = reply.error or wire.ErrorInfo(type="DriverFault", message="no error details")
            if err.type in ("InputError", "WireError"):
                raise InputError(op, rid, f"rejected by the bridge: {err.message}")
            if err.type == "Refused":
                raise CommandRefused(f"{op} {rid} refused by the bridge: {err.message}")
            raise DriverFault(f"{op} {rid} failed on the bridge: {err.type}: {err.message}")
        return reply, arrays

    async def _read_replies(self, dealer: zmq.asyncio.Socket) -> None:
        while True:
            try:
                parts = await dealer.recv_multipart(copy=False)
            except zmq.ZMQError:
                return  # socket closed under us: the supervisor handles the link
            try:
                reply, arrays = wire.decode_reply(parts, self.max_frame_bytes)
            except Exception as exc:  # noqa: BLE001 - WireError, or anything else: nothing from the socket may kill the reader
                self.stats["rejected_messages"] += 1
                log.error("zmq driver: rejected reply: %s", exc)
                rid = wire.request_id_of(parts[:1])
                entry = self._pending.pop(rid, None) if rid else None
                if entry is not None and not entry[1].done():
                    entry[1].set_exception(DriverFault(f"{entry[0]} {rid}: malformed reply from the bridge: {exc}"))
                continue
            entry = self._pending.pop(reply.id, None)
            if entry is None:
                self.stats["late_replies"] += 1
                log.warning("zmq driver: discarded a reply to %s (timed out or unknown)", reply.id)
                continue
            if not entry[1].done():
                entry[1].set_result((reply, arrays))

    # --- link supervision -----------------------------------------------------------------
    def _open_dealer(self) -> zmq.asyncio.Socket:
        s = self._ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.IMMEDIATE, 1)  # queue only on live connections
        s.setsockopt(zmq.SNDHWM, 100)
        s.setsockopt(zmq.RCVHWM, 100)
        s.setsockopt(zmq.MAXMSGSIZE, max(self.max_frame_bytes, wire.MAX_JSON_BYTES))
        s.setsockopt(zmq.RECONNECT_IVL, max(1, int(1000 * self.reconnect_min_s)))
        s.setsockopt(zmq.RECONNECT_IVL_MAX, max(1, int(1000 * self.reconnect_max_s)))
        s.connect(self.control_endpoint)
        return s

    def _open_sub(self) -> None:
        if self._sub is not None:
            return
        s = self._ctx.socket(zmq.SUB)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVHWM, self.frames_hwm)
        s.setsockopt(zmq.MAXMSGSIZE, max(self.max_frame_bytes, wire.MAX_JSON_BYTES))
        s.setsockopt(zmq.SUBSCRIBE, b"")
        s.connect(self.frames_endpoint)
        self._sub = s
        self._spawn(self._read_frames(s), "zmq-frames")

    async def _supervise(self) -> None:
        while not self._closed:
            try:
                await self._supervise_link()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - supervision must outlive any bug or socket error
                log.exception("zmq driver: link supervision failed; starting over")
                self._drop_link(f"link supervision failed: {exc!r}", report=True)
                await self._clock.sleep(self._backoff(0))

    async def _supervise_link(self) -> None:
        attempt = 0
        while not self._closed:
            if self._dealer is None:
                self._dealer = self._open_dealer()
                self._reader = self._spawn(self._read_replies(self._dealer), "zmq-replies")
            # with IMMEDIATE set, POLLOUT means a connection to the bridge is established
            wait_ms = int(1000 * self._backoff(attempt))
            if not await self._dealer.poll(wait_ms, zmq.POLLOUT):  # type: ignore[call-arg]  # the stubs give Socket the Poller's poll()
                attempt += 1
                continue
            try:
                await self._request("heartbeat", timeout_s=self.heartbeat_timeout_s, require_link=False)
            except (DriverFault, InputError) as exc:
                self._drop_link(f"bridge not answering at {self.control_endpoint}: {exc}", report=False)
                await self._clock.sleep(self._backoff(attempt))
                attempt += 1
                continue
            if self.stats["faults"]:
                self.stats["reconnects"] += 1
            attempt = 0
            self._caps = None
            self._link_up.set()
            log.info("zmq driver: link to %s up", self.control_endpoint)
            reason = await self._beat()
            if self._closed:
                return
            self._drop_link(reason, report=True)
            await self._clock.sleep(self._backoff(0))

    async def _beat(self) -> str:
        """Heartbeat until one goes unanswered; returns why the link is considered lost."""
        while not self._closed:
            await self._clock.sleep(self.heartbeat_interval_s)
            try:
                reply, _ = await self._request("heartbeat", timeout_s=self.heartbeat_timeout_s)
            except (DriverFault, InputError) as exc:
                return f"bridge lost: heartbeat unanswered for {self.heartbeat_timeout_s} s ({exc})"
            active = set(reply.result.get("streams", [])) if isinstance(reply.result.get("streams"), list) else set()
            for sid, st in list(self._streams.items()):
                if st.started and not st.ended and sid not in active:
                    st.missing_beats += 1
                    if st.missing_beats >= 2:  # its end message was dropped: finish it
                        st.ended = True
                        st.wake.set()
        return "driver closed"

    def _backoff(self, attempt: int) -> float:
        base = min(self.reconnect_max_s, self.reconnect_min_s * (2.0 ** min(attempt, 30)))
        return float(base * (0.5 + self._rng.random()))  # jitter: 0.5x .. 1.5x

    def _drop_link(self, reason: str, report: bool) -> None:
        was_up = self._link_up.is_set()
        self._link_up.clear()
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        if self._dealer is not None:
            self._dealer.close(linger=0)  # queued requests die with the socket: never resent
            self._dealer = None
        for rid, (op, fut) in list(self._pending.items()):
            if not fut.done():
                if op != "heartbeat":
                    self.stats["unconfirmed_commands"] += 1
                fut.set_exception(
                    DriverFault(f"{op} {rid}: {reason}; it may have run on the console and is not resent")
                )
        self._pending.clear()
        for st in self._streams.values():
            if not st.ended:
                st.error = f"stream interrupted: {reason}"
                st.wake.set()
        if report and was_up:
            self.fault = reason
            self.stats["faults"] += 1
            log.error("zmq driver: %s", reason)
            if self.on_fault is not None:
                try:
                    self.on_fault(reason)
                except Exception:  # noqa: BLE001 - a callback must not break supervision
                    log.exception("zmq driver: on_fault callback failed")

    async def _read_frames(self, sub: zmq.asyncio.Socket) -> None:
        while True:
            try:
                parts = await sub.recv_multipart(copy=False)
            except zmq.ZMQError:
                return
            try:
                msg = wire.decode_stream_message(parts, self.max_frame_bytes)
            except Exception as exc:  # noqa: BLE001 - WireError, or anything else: nothing from the socket may kill the reader
                self.stats["rejected_messages"] += 1
                log.error("zmq driver: rejected frame message: %s", exc)
                continue
            if isinstance(msg, wire.StreamEnd):
                st = self._streams.get(msg.stream)
                if st is not None:
                    st.ended = True
                    if msg.error is not None and msg.error.type != "Cancelled":
                        st.error = f"stream failed on the bridge: {msg.error.type}: {msg.error.message}"
                    st.wake.set()
                continue
            header, frame = msg
            st = self._streams.get(header.stream)
            if st is None:
                continue  # another client's stream, or one we stopped
            self.stats["frames_received"] += 1
            if st.last_index >= 0 and header.index > st.last_index + 1:
                self.stats["frames_dropped_upstream"] += header.index - st.last_index - 1
            st.last_index = header.index
            if len(st.frames) == st.frames.maxlen:
                self.stats["frames_dropped_local"] += 1
                n = self.stats["frames_dropped_local"]
                if n == 1 or n % 100 == 0:  # count every drop, log a few
                    log.warning("zmq driver: consumer behind; dropped frame %d (%d dropped so far)", st.frames[0].index, n)
            st.frames.append(frame)  # newest wins: the deque drops the oldest
            st.wake.set()
