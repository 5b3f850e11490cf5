"""The operator's live page: an aiohttp app on the agent's own event loop.

Routes:

- ``GET /``, ``GET /view.js``, ``GET /view.css``: the page (package data, no build step);
- ``GET /api/snapshot?after=SEQ``: the newest document once its ``seq`` is above ``SEQ``
  (long poll, up to ``poll_s``); documents are built in a thread of the view's own, at most
  every ``min_interval_s`` and only while a page asks, and shared by every page;
- ``POST /api/control``: a control request, the JSON of an MQTT control message, validated the
  same way (:func:`~stemagent.agent.control.read_control`) and applied by the agent's own
  :meth:`~stemagent.agent.loop.Agent.control` (logged in the run's ``controls`` stream and
  acknowledged). It needs the token printed at start in the ``X-Stemagent-Token`` header: 401
  without one, 403 with a wrong one; an invalid request is answered 400 with a refusal;
- ``POST /api/step`` (run-log replay only): ``{"index": i}`` shows the log's observation ``i``.

How it fails: a snapshot that cannot be built is answered 500 with the error and logged (the
agent goes on); a port in use fails the start with a :class:`~stemagent.errors.InputError`
naming ``--view`` and the address. The page is plain HTTP: bound to loopback by default; on any
other address the token is the only guard.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import importlib.resources
import logging
import secrets
import time
from typing import Any, Protocol

from aiohttp import web

from stemagent.agent.control import MAX_CONTROL_BYTES, ControlAck, ControlMessage, InvalidControl, read_control
from stemagent.agent.telemetry import encode_document
from stemagent.errors import InputError

log = logging.getLogger("stemagent.agent.view")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
TOKEN_HEADER = "X-Stemagent-Token"
STATIC = {"/": ("index.html", "text/html"), "/view.js": ("view.js", "text/javascript"), "/view.css": ("view.css", "text/css")}


class ViewSource(Protocol):
    """What the page shows: a live agent (:class:`~stemagent.agent.view.live.LiveSource`) or a
    run log (:class:`~stemagent.agent.view.replay.ReplaySource`)."""

    mode: str
    seq: int
    changed: asyncio.Event

    def snapshot(self) -> dict[str, Any]: ...

    def control(self, msg: ControlMessage) -> ControlAck: ...


def parse_address(text: str | None, option: str = "--view") -> tuple[str, int]:
    """``HOST:PORT``, ``HOST``, ``:PORT`` or ``PORT`` (missing parts: 127.0.0.1 and 8765)."""
    raw = (text or "").strip()
    host, port_text = DEFAULT_HOST, ""
    if raw.isdigit():
        port_text = raw
    elif raw.startswith("[") and "]" in raw:  # [IPv6]:port
        host, _, rest = raw[1:].partition("]")
        port_text = rest.lstrip(":")
    elif raw.count(":") == 1:
        h, _, port_text = raw.partition(":")
        host = h or DEFAULT_HOST
    elif raw:
        host = raw
    try:
        port = int(port_text) if port_text else DEFAULT_PORT
    except ValueError:
        raise InputError(option, text, "must be HOST:PORT with PORT a number") from None
    if not 0 <= port <= 65535:
        raise InputError(option, text, "port must be in 0..65535")
    return host, port


class ViewServer:
    """Serve the page for ``source`` on ``host:port`` (port 0: any free one) from the running loop.

    ``async with ViewServer(source) as server:`` then open ``server.url`` (it carries the token in
    its fragment, which browsers never send to the server)."""

    def __init__(self, source: ViewSource, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *,
                 token: str | None = None, min_interval_s: float = 0.1, poll_s: float = 10.0) -> None:
        self.source = source
        self.host = host
        self.port = port
        self.token = token or secrets.token_urlsafe(18)
        self.min_interval_s = min_interval_s
        self.poll_s = poll_s
        self._runner: web.AppRunner | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="stemagent-view")
        self._cache: tuple[int, bytes] | None = None
        self._building: asyncio.Future[tuple[int, bytes]] | None = None
        self._last_build_s = 0.0
        self.stats = {"snapshots": 0, "controls": 0, "refused_token": 0, "invalid": 0}

    # --- lifetime ----------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_CONTROL_BYTES)
        for path in STATIC:
            app.router.add_get(path, self._static)
        app.router.add_get("/api/snapshot", self._snapshot)
        app.router.add_post("/api/control", self._control)
        app.router.add_post("/api/step", self._step)
        return app

    async def __aenter__(self) -> "ViewServer":
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise InputError("--view", f"{self.host}:{self.port}", f"cannot serve the page there ({exc.strerror or exc})") from None
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/#token={self.token}"

    # --- handlers ----------------------------------------------------------------------------
    async def _static(self, request: web.Request) -> web.Response:
        name, content_type = STATIC[request.path]
        body = importlib.resources.files("stemagent.agent.view").joinpath("static", name).read_bytes()
        return web.Response(body=body, content_type=content_type, headers={"Cache-Control": "no-cache"})

    async def _snapshot(self, request: web.Request) -> web.Response:
        try:
            after = int(request.query.get("after", "-1"))
        except ValueError:
            return web.json_response({"error": f"after={request.query.get('after')!r}: must be an integer"}, status=400)
        deadline = time.monotonic() + self.poll_s
        while self.source.seq <= after:
            left = deadline - time.monotonic()
            if left <= 0:
                return web.Response(status=204)
            self.source.changed.clear()
            if self.source.seq > after:
                break
            try:
                await asyncio.wait_for(self.source.changed.wait(), timeout=left)
            except TimeoutError:
                return web.Response(status=204)
        try:
            _, body = await self._newest()
        except Exception as exc:  # noqa: BLE001 - a bad snapshot must not reach the agent
            log.exception("view: snapshot failed")
            return web.json_response({"error": repr(exc)}, status=500)
        return web.Response(body=body, content_type="application/json", headers={"Cache-Control": "no-store"})

    async def _newest(self) -> tuple[int, bytes]:
        """The newest document: built once per change, at most every ``min_interval_s``, in the
        view's thread; pages asking meanwhile share it."""
        if self._cache is not None and self._cache[0] == self.source.seq:
            return self._cache
        if self._building is None or self._building.done():
            self._building = asyncio.ensure_future(self._build())
        return await asyncio.shield(self._building)

    async def _build(self) -> tuple[int, bytes]:
        wait_s = self._last_build_s + self.min_interval_s - time.monotonic()
        if wait_s > 0:
            await asyncio.sleep(wait_s)
        seq = self.source.seq
        loop = asyncio.get_running_loop()
        body = await loop.run_in_executor(self._executor, lambda: encode_document(self.source.snapshot()))
        self._last_build_s = time.monotonic()
        self.stats["snapshots"] += 1
        self._cache = (seq, body)
        return self._cache

    def _authorised(self, request: web.Request) -> web.Response | None:
        given = request.headers.get(TOKEN_HEADER)
        if given is None:
            self.stats["refused_token"] += 1
            log.warning("view: control request from %s refused: no token", request.remote)
            return web.json_response({"error": f"control needs the token printed at start in the {TOKEN_HEADER} header"}, status=401)
        # surrogateescape: header bytes that are not UTF-8 compare (unequal) instead of failing
        if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), self.token.encode()):
            self.stats["refused_token"] += 1
            log.warning("view: control request from %s refused: wrong token", request.remote)
            return web.json_response({"error": "wrong token"}, status=403)
        return None

    async def _control(self, request: web.Request) -> web.Response:
        refused = self._authorised(request)
        if refused is not None:
            return refused
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raw = b"x" * (MAX_CONTROL_BYTES + 1)
        self.stats["controls"] += 1
        try:
            msg = read_control(raw)
        except InvalidControl as exc:
            ack = ControlAck(id=exc.msg_id, command=exc.command, accepted=False, state=_state(self.source), detail=str(exc)[:500])
            self.stats["invalid"] += 1
            n = self.stats["invalid"]
            if n <= 10 or n % 1000 == 0:  # every refusal is answered; the log shows a few (a flood stays readable)
                log.warning("view: control request %s (%s) refused: %s", str(exc.msg_id)[:64], exc.command, exc.detail[:200])
            publish = getattr(self.source, "publish", None)
            if publish is not None:  # on the page's event list, as the agent's own acks are
                publish("ack", ack.model_dump())
            return web.json_response(ack.model_dump(), status=400)
        ack = self.source.control(msg)
        log.info("view: control %s (%s): %s", msg.command, msg.id, "accepted" if ack.accepted else f"refused: {ack.detail}")
        return web.json_response(ack.model_dump(), status=200 if ack.accepted else 409)

    async def _step(self, request: web.Request) -> web.Response:
        step = getattr(self.source, "step", None)
        if step is None:
            return web.json_response({"error": "stepping applies to a run log (stemagent view LOG)"}, status=404)
        try:
            data = await request.json()
            index = data["index"]
            if not isinstance(index, int) or isinstance(index, bool):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": "body must be {\"index\": <integer>}"}, status=400)
        try:
            shown = step(index)
        except IndexError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"index": shown})


def _state(source: ViewSource) -> str:
    agent = getattr(source, "agent", None)
    state = getattr(getattr(agent, "sm", None), "state", None)
    return str(getattr(state, "value", "unknown"))
