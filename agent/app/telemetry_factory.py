"""Open the run's telemetry: MQTT when a broker is configured, nothing otherwise.

``open_telemetry(cfg)`` is an async context manager yielding a
:class:`~stemagent.agent.loop.TelemetrySink` (with an optional ``attach(agent)`` method that
subscribes it to control messages) or ``None`` when ``telemetry.host`` is not set.
"""

from __future__ import annotations

import contextlib
from typing import Any, AsyncIterator

from stemagent.config import RunConfig


@contextlib.asynccontextmanager
async def open_telemetry(cfg: RunConfig, run_id: str) -> AsyncIterator[Any]:
    """Topics are ``<prefix>/<cfg.name>/<run_id>/...``."""
    if cfg.telemetry.host is None:
        yield None
        return
    from stemagent.agent.telemetry import MqttTelemetry  # the MQTT client (aiomqtt)

    async with MqttTelemetry(cfg.telemetry, run_name=cfg.name, run_id=run_id) as sink:
        yield sink
