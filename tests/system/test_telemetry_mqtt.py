"""MQTT telemetry and control through a real mosquitto broker."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from pydantic import SecretStr

from stemagent.agent.control import ControlAck, ControlMessage
from stemagent.agent.telemetry import MqttTelemetry
from stemagent.config import RunConfig, TelemetryConfig
from stemagent.errors import ConfigError

from mqtt_broker import run_mosquitto
from transport_fakes import free_port

pytestmark = pytest.mark.system


class Target:
    """Stands in for the agent: records control requests and acknowledges through the sink."""

    def __init__(self, sink: MqttTelemetry) -> None:
        self.sink = sink
        self.got: list[ControlMessage] = []

    def control(self, msg: ControlMessage) -> ControlAck:
        self.got.append(msg)
        ack = ControlAck(id=msg.id, command=msg.command, accepted=True, state="paused")
        self.sink.publish("ack", ack.model_dump())
        return ack


async def next_message(client: aiomqtt.Client, topic: str) -> dict[str, Any]:
    async def first() -> dict[str, Any]:
        async for m in client.messages:
            if m.topic.matches(topic):
                return json.loads(m.payload)  # type: ignore[arg-type]
        raise AssertionError("message stream ended")

    return await asyncio.wait_for(first(), timeout=10)


async def test_publish_and_control_round_trip(mosquitto: int) -> None:
    cfg = TelemetryConfig(host="127.0.0.1", port=mosquitto)
    async with aiomqtt.Client("127.0.0.1", mosquitto, identifier="observer") as obs:
        await obs.subscribe("stemagent/run1/id1/#", qos=1)
        async with MqttTelemetry(cfg, run_name="run1", run_id="id1") as sink:
            sink.publish("status", {"state": "running"})
            doc = await next_message(obs, "stemagent/run1/id1/status")
            assert doc == {"run": "run1", "run_id": "id1", "kind": "status", "state": "running"}
            sink.publish("frame", {"frame_index": 3, "n_atoms": 12, "score": float("nan")})
            doc = await next_message(obs, "stemagent/run1/id1/frame")
            assert doc["n_atoms"] == 12 and doc["score"] is None  # strict JSON

            # before attach: refused with an ack
            await obs.publish("stemagent/run1/id1/control", json.dumps({"command": "pause", "id": "c0"}), qos=1)
            ack = await next_message(obs, "stemagent/run1/id1/ack")
            assert ack["id"] == "c0" and ack["accepted"] is False and "not running" in ack["detail"]

            target = Target(sink)
            sink.attach(target)
            await obs.publish("stemagent/run1/id1/control", json.dumps({"command": "pause", "id": "c1"}), qos=1)
            ack = await next_message(obs, "stemagent/run1/id1/ack")
            assert ack["id"] == "c1" and ack["accepted"] is True
            assert [m.command for m in target.got] == ["pause"]

            for bad, why in [(b"\xff not json", "invalid control"), (json.dumps({"command": "explode", "id": "c2"}), "command"),
                             (json.dumps({"command": "pause", "id": "c3", "extra": 1}), "extra")]:
                await obs.publish("stemagent/run1/id1/control", bad, qos=1)
                ack = await next_message(obs, "stemagent/run1/id1/ack")
                assert ack["accepted"] is False and why in ack["detail"]
            assert [m.command for m in target.got] == ["pause"]  # nothing invalid reached the agent

            await obs.publish("stemagent/run1/id1/control", json.dumps({"command": "set_target", "target_A": [1, 2], "id": "c4"}), qos=1)
            ack = await next_message(obs, "stemagent/run1/id1/ack")
            assert ack["id"] == "c4" and target.got[-1].target_A == (1.0, 2.0)
            assert sink.stats["control_rejected"] == 4


async def test_unreachable_broker_is_a_clear_error() -> None:
    cfg = TelemetryConfig(host="127.0.0.1", port=free_port())
    with pytest.raises(ConfigError, match="telemetry.host"):
        async with MqttTelemetry(cfg, run_name="r", run_id="x", connect_timeout_s=1.0):
            pass


async def test_without_a_broker_telemetry_is_off() -> None:
    from stemagent.agent.app.telemetry_factory import open_telemetry

    async with open_telemetry(RunConfig(), "x") as sink:
        assert sink is None


def _tls_files(d: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1, made with the openssl tool."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=d, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=stemagent-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out", "server.crt",
        "-days", "2", "-extfile", "san.ext")
    return d / "ca.crt", d / "server.crt", d / "server.key"


async def test_username_password_and_tls(tmp_path: Path) -> None:
    passwd_tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    if not Path(passwd_tool).exists():
        pytest.skip("mosquitto_passwd is not installed")
    ca, cert, key = _tls_files(tmp_path)
    subprocess.run([passwd_tool, "-b", "-c", str(tmp_path / "passwd"), "agent", "s3cret"], check=True, timeout=30)
    settings = (f"cafile {ca}\ncertfile {cert}\nkeyfile {key}\n"
                f"allow_anonymous false\npassword_file {tmp_path / 'passwd'}\n")
    with run_mosquitto(tmp_path, settings) as port:
        good = TelemetryConfig(host="127.0.0.1", port=port, username="agent", password="s3cret", tls=True, tls_ca_file=ca)
        async with MqttTelemetry(good, run_name="secure", run_id="x", connect_timeout_s=10.0) as sink:
            sink.publish("status", {"state": "running"})
        assert sink.stats["published"] == 1
        wrong_password = good.model_copy(update={"password": SecretStr("nope")})
        with pytest.raises(ConfigError, match="telemetry.username.*refused"):  # at once, no retries
            async with MqttTelemetry(wrong_password, run_name="secure", run_id="x", connect_timeout_s=30.0):
                pass
        no_tls = good.model_copy(update={"tls": False})
        with pytest.raises(ConfigError, match="telemetry.host"):
            async with MqttTelemetry(no_tls, run_name="secure", run_id="x", connect_timeout_s=1.0):
                pass


async def test_telemetry_reconnects_after_the_broker_restarts(tmp_path: Path) -> None:
    with run_mosquitto(tmp_path) as port:
        cfg = TelemetryConfig(host="127.0.0.1", port=port)
        sink = MqttTelemetry(cfg, run_name="rb", run_id="id2", reconnect_max_s=0.5)
        await sink.__aenter__()
        target = Target(sink)
        sink.attach(target)
    try:
        # the broker is gone; publishing still never blocks or raises
        sink.publish("frame", {"frame_index": 1})
        with run_mosquitto(tmp_path, port=port):
            while sink.stats["reconnects"] < 1:
                await asyncio.sleep(0.05)  # the client's backoff is on wall time
            async with aiomqtt.Client("127.0.0.1", port, identifier="op2") as op:
                await op.subscribe("stemagent/rb/id2/#", qos=1)
                await op.publish("stemagent/rb/id2/control", json.dumps({"command": "resume", "id": "after"}), qos=1)
                ack = await next_message(op, "stemagent/rb/id2/ack")
                assert ack["id"] == "after" and [m.command for m in target.got] == ["resume"]
    finally:
        await sink.__aexit__(None, None, None)


async def test_a_thousand_controls_get_a_thousand_acks_through_the_broker(mosquitto: int) -> None:
    """Issue 10 defect 7: acks shared a 256-slot drop-oldest queue with telemetry; 1000 'resume'
    messages gave 452 acks."""
    cfg = TelemetryConfig(host="127.0.0.1", port=mosquitto)
    async with aiomqtt.Client("127.0.0.1", mosquitto, identifier="flood-op", max_queued_incoming_messages=0) as op:
        await op.subscribe("stemagent/flood/f1/ack", qos=1)
        async with MqttTelemetry(cfg, run_name="flood", run_id="f1") as sink:
            sink.attach(Target(sink))
            for i in range(1000):
                sink.publish("frame", {"frame_index": i})  # telemetry keeps flowing meanwhile
            await asyncio.gather(*(op.publish("stemagent/flood/f1/control", json.dumps({"command": "resume", "id": f"r{i}"}),
                                              qos=1) for i in range(1000)))
            got: set[str] = set()

            async def collect() -> None:
                async for m in op.messages:
                    got.add(json.loads(m.payload)["id"])  # type: ignore[arg-type]
                    if len(got) == 1000:
                        return

            await asyncio.wait_for(collect(), timeout=60)
    assert got == {f"r{i}" for i in range(1000)}
