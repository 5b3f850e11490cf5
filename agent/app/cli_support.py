"""What every ``stemagent`` command shares: one-line errors, exit codes, signals.

Exit codes: 0 success; 1 a run that failed (a device that cannot be reached, a run that ended
in ``fail`` or ``abort``, a replay that differs, an unexpected error); 2 bad input (a config,
an option, a file or a log that cannot be used); ``128 + signal`` when SIGINT or SIGTERM ended
the run (130, 143).

Every error ends in one line on stderr, ``error: <what and where>: <field>=<value>: <problem>``;
``stemagent -v ...`` prints the traceback above it.
"""

from __future__ import annotations

import asyncio
import functools
import signal
import sys
import traceback
from typing import Any, Awaitable, Callable, NoReturn, TypeVar

import typer
from pydantic import ValidationError
import rich.markup
from rich.console import Console

from stemagent.driver import DriverFault
from stemagent.errors import ConfigError, InputError, StemAgentError, shown

console = Console()
err_console = Console(stderr=True)

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2

_state = {"verbose": False}

F = TypeVar("F", bound=Callable[..., Any])


def set_verbose(verbose: bool) -> None:
    _state["verbose"] = verbose


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived before the run had started (nothing to stop yet)."""

    def __init__(self, signal_name: str) -> None:
        self.signal_name = signal_name
        super().__init__(f"interrupted by {signal_name} before the run started")


def signal_exit_code(signal_name: str | None) -> int:
    return 128 + int(getattr(signal, signal_name)) if signal_name else 0


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    if _state["verbose"]:
        exc = sys.exc_info()[1]
        if exc is not None:
            traceback.print_exc()
    # the message is the user's text (paths, values, "[name, document]"): never read as markup
    err_console.print(f"[bold red]error:[/] {rich.markup.escape(message)}", highlight=False, soft_wrap=True, markup=True)
    raise typer.Exit(code)


def describe(exc: BaseException) -> tuple[str, int]:
    """The one-line message and exit code for an exception that ends a command."""
    if isinstance(exc, (ConfigError, InputError)):
        return str(exc), EXIT_BAD_INPUT
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err.get("loc", ())) or "<input>"
        return f"{loc}={shown(err.get('input'))}: {err.get('msg')}", EXIT_BAD_INPUT
    if isinstance(exc, Interrupted):
        return str(exc), signal_exit_code(exc.signal_name)
    if isinstance(exc, DriverFault):
        return f"device: {exc}", EXIT_FAILED
    if isinstance(exc, StemAgentError):
        return str(exc), EXIT_FAILED
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror or exc}", EXIT_FAILED
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (SIGINT)", signal_exit_code("SIGINT")
    return f"unexpected error: {type(exc).__name__}: {shown(str(exc), 300)} (run with -v for the traceback)", EXIT_FAILED


def one_line_errors(command: F) -> F:
    """Turn every exception out of ``command`` into one line on stderr and an exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - the CLI's one exit point
            message, code = describe(exc)
            fail(message, code)

    return wrapper  # type: ignore[return-value]


T = TypeVar("T")


async def run_with_signals(build: Callable[[], Awaitable[Any]], attach: Callable[[Any], None] | None = None) -> tuple[Any, Any, str | None]:
    """Build an agent and run it, SIGINT and SIGTERM acting as stop (a second one: abort).

    Returns ``(agent, summary, signal name or None)``. A signal before the agent exists cancels the
    build (which undoes itself) and raises :class:`Interrupted`.
    """
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    holder: dict[str, Any] = {"agent": None, "signal": None, "done": False}

    def on_signal(name: str) -> None:
        agent = holder["agent"]
        if holder["done"]:
            return  # the run has ended and its log is closed: nothing left to stop
        if agent is not None:
            holder["signal"] = holder["signal"] or name
            agent.interrupt(name)
        elif holder["signal"] is None:
            holder["signal"] = name
            if main is not None:
                main.cancel()

    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal, sig.name)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - not the main thread / Windows
            pass
    try:
        try:
            agent = await build()
        except asyncio.CancelledError:
            if holder["signal"] is not None:
                raise Interrupted(holder["signal"]) from None
            raise
        holder["agent"] = agent
        if attach is not None:
            attach(agent)
        summary = await agent.run()
        return agent, summary, holder["signal"]
    finally:
        # the handlers stay until the loop closes (a late signal must not kill the process while
        # it prints the summary); then :func:`ignore_late_signals` takes over
        holder["done"] = True


def ignore_late_signals() -> None:
    """After the run: SIGINT and SIGTERM no longer interrupt printing the summary and exiting."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
