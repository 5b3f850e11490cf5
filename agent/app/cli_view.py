"""``stemagent run --view`` and ``stemagent view LOG``: the operator's live page.

:func:`open_live_view` serves a :class:`~stemagent.agent.view.live.LiveSource` on the running
loop and prints its address (with the control token) on stderr; the run adds the source to its
telemetry sinks and attaches the agent to it once built.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator, Optional

import typer

from stemagent.agent.app.cli_support import err_console

if TYPE_CHECKING:
    from stemagent.agent.view.live import LiveSource
    from stemagent.agent.view.server import ViewServer

#: ``--view`` given without a value
VIEW_DEFAULT = "127.0.0.1:8765"


def say_where(server: "ViewServer", what: str) -> None:
    url, host = server.url, server.host
    err_console.print(f"{what}: [bold]{url}[/] (the token after #token= is needed for pause/stop/abort/target)",
                      highlight=False, soft_wrap=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        err_console.print(f"view: serving on {host}, not only this machine: plain HTTP, the token is the only guard",
                          highlight=False)


@contextlib.asynccontextmanager
async def open_live_view(address: str | None) -> AsyncIterator["LiveSource | None"]:
    """Yields the :class:`~stemagent.agent.view.live.LiveSource` (a telemetry sink with
    ``attach(agent)``), or None when ``address`` is None (no --view)."""
    if address is None:
        yield None
        return
    from stemagent.agent.view.live import LiveSource  # aiohttp and the page only when --view or view is used
    from stemagent.agent.view.server import ViewServer, parse_address  # aiohttp and the page only when --view or view is used

    host, port = parse_address(address)
    source = LiveSource()
    async with ViewServer(source, host, port) as server:
        say_where(server, "live view")
        yield source


def view(
    log: Path = typer.Argument(..., help="a run log folder (or its documents.jsonl)"),
    at: str = typer.Option(VIEW_DEFAULT, "--at", help="HOST:PORT to serve the page on (default: this machine only)"),
    seconds: Optional[float] = typer.Option(None, "--seconds", help="serve this long, then exit (default: until Ctrl-C)"),
) -> None:
    """Serve the live page on a run log, stepping through it observation by observation."""
    from stemagent.agent.view.replay import ReplaySource  # aiohttp and the page only when --view or view is used
    from stemagent.agent.view.server import ViewServer, parse_address  # aiohttp and the page only when --view or view is used

    host, port = parse_address(at, "--at")
    source = ReplaySource.open(log)

    async def serve() -> None:
        async with ViewServer(source, host, port) as server:
            say_where(server, f"run log {log} ({source.count} observations)")
            if seconds is not None:
                await asyncio.sleep(seconds)
            else:
                await asyncio.Event().wait()  # until Ctrl-C

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
