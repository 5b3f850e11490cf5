"""Fixtures for the transport and telemetry system tests: a real mosquitto broker on a free
loopback port, and a small in-process fake microscope implementing ``Driver``."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
from mqtt_broker import run_mosquitto
from transport_fakes import FakeMicroscope


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[int]:
    """A real mosquitto on 127.0.0.1:<free port>, anonymous; yields the port."""
    with run_mosquitto(tmp_path) as port:
        yield port


@pytest.fixture
def fake_microscope() -> FakeMicroscope:
    return FakeMicroscope()
