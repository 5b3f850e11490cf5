"""A real mosquitto broker for tests, started on a free loopback port with a temporary config."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest
from transport_fakes import free_port

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)  # polling a port that a child process is opening
    raise RuntimeError(f"mosquitto did not open port {port} within {timeout_s} s")


@contextlib.contextmanager
def run_mosquitto(workdir: Path, settings: str = "allow_anonymous true\n", port: int | None = None) -> Iterator[int]:
    """Start mosquitto on 127.0.0.1:<port> (a free one by default) with ``settings``; yield the port."""
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    port = port or free_port()
    conf = workdir / f"mosquitto-{port}.conf"
    # 'user root' keeps a broker started as root from dropping to a user that cannot read tmp files
    user = "user root\n" if os.geteuid() == 0 else ""
    conf.write_text(f"{user}persistence false\nper_listener_settings false\nlistener {port} 127.0.0.1\n{settings}")
    log = open(workdir / f"mosquitto-{port}.log", "ab")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_port(port, proc)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
