"""MQTT telemetry and operator control (aiomqtt).

Topics, with ``<p>`` the configured ``topic_prefix`` (default ``stemagent``), ``<run>`` the
run name and ``<id>`` the run id (the UTC start time and a random suffix, as in the log folder's
name), so two agents started from the same configuration never share a topic:

- ``<p>/<run>/<id>/<kind>``: JSON documents the agent publishes: ``status`` (retained, every
  state change; ``{"state": "offline"}`` as the last will), ``frame`` (a per-frame summary),
  ``decision``, ``safety``, ``fault``, ``error``, ``summary`` and ``ack``; subscribe to
  ``<p>/<run>/+/status`` to find the id of a running agent;
- ``<p>/<run>/<id>/control``: operator requests, JSON validated strictly as
  :class:`~stemagent.agent.control.ControlMessage` (``pause``, ``resume``, ``stop``, ``abort``,
  ``set_target``, ``set_dose_budget``); every request, valid or not, is answered on
  ``<p>/<run>/<id>/ack`` with a :class:`~stemagent.agent.control.ControlAck` carrying its ``id``.

:meth:`MqttTelemetry.publish` never blocks and never raises. Acknowledgements have a queue of
their own that never drops and is sent first; other documents go into a bounded queue (the
oldest is dropped and counted when it is full). A background task sends both. If the broker
goes away mid-run the client reconnects with backoff; the run goes on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import ssl
from collections import deque
from typing import Any, Protocol

import aiomqtt
import numpy as np

from stemagent.agent.control import ControlAck, ControlMessage, InvalidControl, read_control
from stemagent.config import TelemetryConfig
from stemagent.errors import ConfigError

log = logging.getLogger("stemagent.agent.telemetry")

#: kinds sent with QoS 1 (and ``status`` retained); the rest go QoS 0
_RELIABLE = frozenset({"status", "ack", "fault", "summary", "safety", "error"})


class ControlTarget(Protocol):
    def control(self, msg: ControlMessage) -> ControlAck: ...


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    return str(obj)


def _clean(v: Any) -> Any:
    """Non-finite floats become null so every document is strict JSON."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def encode_document(payload: dict[str, Any]) -> bytes:
    text = json.dumps(payload, default=_jsonable)
    if "NaN" in text or "Infinity" in text:
        text = json.dumps(_clean(json.loads(text)), allow_nan=False)
    return text.encode("utf-8")


class MqttTelemetry:
    """A :class:`~stemagent.agent.loop.TelemetrySink` over MQTT that also takes control requests.

    Use as ``async with MqttTelemetry(cfg.telemetry, run_name=cfg.name) as sink:``; call
    :meth:`attach` with the agent to start obeying control messages (before that they are
    refused with an ack saying the agent is not ready).
    """

    def __init__(
        self,
        cfg: TelemetryConfig,
        run_name: str,
        *,
        run_id: str,
        queue_size: int = 256,
        connect_timeout_s: float = 10.0,
        publish_timeout_s: float = 5.0,
        reconnect_max_s: float = 10.0,
        identifier: str | None = None,
    ) -> None:
        if cfg.host is None:
            raise ConfigError("<config>", "telemetry.host", None, "is required for MQTT telemetry")
        self.cfg = cfg
        self.run_name = run_name
        self.run_id = run_id
        self.base = f"{cfg.topic_prefix}/{run_name}/{run_id}"
        self.control_topic = f"{self.base}/control"
        self.connect_timeout_s = connect_timeout_s
        self.publish_timeout_s = publish_timeout_s
        self.reconnect_max_s = reconnect_max_s
        self.identifier = identifier
        self._queue: deque[tuple[str, bytes, int, bool]] = deque(maxlen=queue_size)
        self._acks: deque[tuple[str, bytes, int, bool]] = deque()  # never dropped
        self._have_output = asyncio.Event()
        self._connected = asyncio.Event()
        self._closing = False
        self._target: ControlTarget | None = None
        self._refused: str | None = None
        self._task: asyncio.Task[None] | None = None
        self.stats: dict[str, int] = {
            "published": 0,
            "dropped": 0,
            "control_received": 0,
            "control_rejected": 0,
            "reconnects": 0,
        }

    # --- TelemetrySink --------------------------------------------------------------------
    def publish(self, kind: str, payload: dict[str, Any]) -> None:
        """Queue a document for ``<p>/<run>/<kind>``; never blocks, never raises."""
        try:
            body = encode_document({"run": self.run_name, "run_id": self.run_id, "kind": kind, **payload})
        except (TypeError, ValueError) as exc:
            log.error("telemetry: cannot encode a %s document: %s", kind, exc)
            return
        item = (f"{self.base}/{kind}", body, 1 if kind in _RELIABLE else 0, kind == "status")
        if kind == "ack":
            self._acks.append(item)
        else:
            if len(self._queue) == self._queue.maxlen:
                self.stats["dropped"] += 1
            self._queue.append(item)
        self._have_output.set()

    def attach(self, target: ControlTarget) -> None:
        """Send control requests to ``target`` (the agent) from now on."""
        self._target = target

    # --- lifecycle ------------------------------------------------------------------------
    async def __aenter__(self) -> "MqttTelemetry":
        self._task = asyncio.ensure_future(self._run())
        waiter = asyncio.ensure_future(self._connected.wait())
        done, _ = await asyncio.wait({waiter, self._task}, timeout=self.connect_timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if waiter not in done:
            waiter.cancel()
            self._closing = True
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            if self._refused is not None:
                raise ConfigError("<config>", "telemetry.username", self.cfg.username, f"refused by the broker ({self._refused})")
            raise ConfigError(
                "<config>",
                "telemetry.host",
                f"{self.cfg.host}:{self.cfg.port}",
                f"no MQTT broker accepted a connection within {self.connect_timeout_s} s",
            )
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self._closing = True
        self._have_output.set()
        if self._task is not None:
            # flush what is queued (bounded by the publish timeout), then give up on the rest
            done, _ = await asyncio.wait({self._task}, timeout=self.publish_timeout_s + 1.0)
            if not done:
                log.warning("telemetry: %d documents not delivered at exit", len(self._queue) + len(self._acks))
                self._task.cancel()
            results = await asyncio.gather(self._task, return_exceptions=True)
            if results and isinstance(results[0], Exception):
                log.error("telemetry: closing failed: %r", results[0])

    def _client(self) -> aiomqtt.Client:
        tls_context = None
        if self.cfg.tls:
            tls_context = ssl.create_default_context(cafile=str(self.cfg.tls_ca_file) if self.cfg.tls_ca_file else None)
        will = aiomqtt.Will(
            f"{self.base}/status", encode_document({"run": self.run_name, "run_id": self.run_id, "kind": "status", "state": "offline"}),
            qos=1, retain=True
        )
        return aiomqtt.Client(
            self.cfg.host or "",
            self.cfg.port,
            username=self.cfg.username,
            password=None if self.cfg.password is None else self.cfg.password.get_secret_value(),
            tls_context=tls_context,
            identifier=self.identifier,
            will=will,
            timeout=self.publish_timeout_s,
            keepalive=10,
        )

    async def _run(self) -> None:
        delay = 0.2
        first = True
        while not self._closing:
            try:
                async with self._client() as client:
                    await client.subscribe(self.control_topic, qos=1, timeout=self.publish_timeout_s)
                    if not first:
                        self.stats["reconnects"] += 1
                        log.warning("telemetry: reconnected to %s:%s", self.cfg.host, self.cfg.port)
                    first = False
                    delay = 0.2
                    self._connected.set()
                    sender = asyncio.ensure_future(self._send_loop(client))
                    listener = asyncio.ensure_future(self._listen(client))
                    try:
                        # whichever ends first decides: the sender ends only when closing; a
                        # listener that ends or fails means the connection is gone
                        done, _ = await asyncio.wait({sender, listener}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        for t in (sender, listener):
                            t.cancel()
                        await asyncio.gather(sender, listener, return_exceptions=True)
                    for t in done:
                        if t.exception() is not None:
                            raise t.exception()  # type: ignore[misc]
                    if sender in done:
                        return
                    raise aiomqtt.MqttError("the broker closed the control subscription")
            except aiomqtt.MqttError as exc:
                if self._closing:
                    return
                log.error("telemetry: MQTT connection to %s:%s failed: %s", self.cfg.host, self.cfg.port, exc)
                if first and _refused_credentials(exc):
                    self._refused = str(exc)  # retrying cannot help: fail the start at once
                    return
            await asyncio.sleep(delay)
            delay = min(self.reconnect_max_s, delay * 2)

    async def _send_loop(self, client: aiomqtt.Client) -> None:
        while True:
            while self._acks or self._queue:
                q = self._acks if self._acks else self._queue  # acknowledgements first
                topic, body, qos, retain = q[0]
                await client.publish(topic, body, qos=qos, retain=retain, timeout=self.publish_timeout_s)
                if q and q[0][1] is body:
                    q.popleft()
                self.stats["published"] += 1
            if self._closing:
                return
            self._have_output.clear()
            try:
                await asyncio.wait_for(self._have_output.wait(), timeout=1.0)
            except TimeoutError:
                pass

    async def _listen(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            if not message.topic.matches(self.control_topic):
                continue
            self.handle_control(message.payload)

    # --- control --------------------------------------------------------------------------
    def handle_control(self, payload: Any) -> ControlAck:
        """Validate one control payload, hand it to the agent, and make sure it is acknowledged."""
        self.stats["control_received"] += 1
        try:
            msg = read_control(payload)
        except InvalidControl as exc:
            return self._reject(exc.msg_id, exc.command, str(exc))
        if self._target is None:
            return self._reject(msg.id, msg.command, "the agent is not running yet")
        try:
            ack = self._target.control(msg)  # the agent publishes the ack itself
        except Exception as exc:  # noqa: BLE001 - a control bug must not kill telemetry
            log.exception("telemetry: control %s failed", msg.command)
            return self._reject(msg.id, msg.command, f"failed: {exc!r}")
        if not ack.accepted:
            self.stats["control_rejected"] += 1
        return ack

    def _reject(self, msg_id: str | None, command: str, detail: str) -> ControlAck:
        self.stats["control_rejected"] += 1
        n = self.stats["control_rejected"]
        if n <= 10 or n % 1000 == 0:  # every refusal is acknowledged; the log shows a few
            log.warning("telemetry: control request %s (%s) refused: %s%s", msg_id, command, detail,
                        "" if n < 10 else f" ({n} refused so far; logging every 1000th)")
        state = getattr(getattr(getattr(self._target, "sm", None), "state", None), "value", "unknown")
        ack = ControlAck(id=msg_id, command=command, accepted=False, state=str(state), detail=detail[:500])
        self.publish("ack", ack.model_dump())
        return ack


def _refused_credentials(exc: Exception) -> bool:
    """CONNACK refusals that retrying cannot fix: bad user name or password, not authorised."""
    rc = getattr(exc, "rc", None)
    value = getattr(rc, "value", rc)
    return value in (4, 5, 134, 135)  # MQTT 3.1.1 return codes, MQTT 5 reason codes

