"""Frame transport over loopback TCP: the stemagent wire protocol against a plain ``send_pyobj``.

For each frame size (float32) three measurements, each with the sender in a separate process:

- ``stream``: a PUSH socket sends ``n`` frames back to back to a PULL socket (high-water marks
  of 8 on both sides, so the sender is throttled by the receiver, nothing dropped); the receiver
  decodes every frame completely. Reported: messages/s and MB/s of image data.
- ``latency``: one frame at a time (the sender waits for a one-byte ack before the next); the
  one-way latency is the time from just before encoding on the sender to the end of decoding on
  the receiver (``time.perf_counter``: the system-wide monotonic clock on Linux). p50 and p95.
- ``acquire`` (wire only): the full path the agent uses, ``ZmqDriver.acquire`` against a
  ``Bridge`` in another process whose backend returns a precomputed frame. p50 and p95 round trip.

The baseline pickles a dict holding the same image, geometry and line times with
``send_pyobj``/``recv_pyobj`` (only here, between two processes of this benchmark: the product
never unpickles anything from a socket). Prints one JSON document.

    python benchmarks/bench_transport.py [--quick] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import sys
import time
from typing import Any

import numpy as np
import zmq

from stemagent.codec import encode_geometry
from stemagent.drivers import wire
from stemagent.types import Frame, ScanGeometry

HWM = 8


def make_frame(n: int, index: int = 0) -> Frame:
    g = ScanGeometry(fov_A=(0.1 * n, 0.1 * n), shape_px=(n, n), dwell_s=1e-6)
    img = np.random.default_rng(index).random((n, n), dtype=np.float32)
    return Frame(image=img, geometry=g, line_times_s=g.line_start_times_s(0.0), index=index, dose_e_per_A2=1.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- sender process ------------------------------------------------------------------------


def _send_one(sock: zmq.Socket, frame: Frame, method: str, i: int) -> None:
    t0 = time.perf_counter()
    if method == "wire":
        frame.meta["t_send"] = t0
        frame.index = i
        parts, _ = wire.encode_frame(frame)
        sock.send_multipart(parts, copy=False)
    else:
        sock.send_pyobj(
            {"t_send": t0, "index": i, "image": frame.image, "geometry": encode_geometry(frame.geometry),
             "line_times_s": frame.line_times_s, "dose_e_per_A2": frame.dose_e_per_A2}
        )


def sender(port: int, ack_port: int, method: str, n_px: int, count: int, mode: str) -> None:
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, HWM)
    push.copy_threshold = wire.ZERO_COPY_THRESHOLD_BYTES
    push.connect(f"tcp://127.0.0.1:{port}")
    ack = ctx.socket(zmq.PULL)
    ack.connect(f"tcp://127.0.0.1:{ack_port}")
    frame = make_frame(n_px)
    ack.recv()  # the receiver is ready
    for i in range(count):
        _send_one(push, frame, method, i)
        if mode == "latency":
            ack.recv()
    ack.recv()  # done
    push.close(linger=1000)
    ack.close()
    ctx.term()


# --- receiver (this process) ---------------------------------------------------------------


def _recv_one(sock: zmq.Socket, method: str) -> tuple[float, Frame | dict[str, Any]]:
    if method == "wire":
        parts = sock.recv_multipart(copy=False)
        _, frame = wire.decode_frame(parts)
        return float(frame.meta["t_send"]), frame
    obj = sock.recv_pyobj()  # baseline only: both ends are this benchmark
    return float(obj["t_send"]), obj


def measure(method: str, n_px: int, count: int, mode: str) -> dict[str, Any]:
    ctx = zmq.Context()
    port, ack_port = free_port(), free_port()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, HWM)
    pull.bind(f"tcp://127.0.0.1:{port}")
    ack = ctx.socket(zmq.PUSH)
    ack.bind(f"tcp://127.0.0.1:{ack_port}")
    proc = mp.get_context("spawn").Process(target=sender, args=(port, ack_port, method, n_px, count, mode))
    proc.start()
    ack.send(b"go")
    latencies = []
    t_first = t_last = 0.0
    for i in range(count):
        t_send, _ = _recv_one(pull, method)
        now = time.perf_counter()
        latencies.append(now - t_send)
        if i == 0:
            t_first = now
        t_last = now
        if mode == "latency":
            ack.send(b"k")
    ack.send(b"done")
    proc.join(timeout=60)
    pull.close(linger=0)
    ack.close(linger=0)
    ctx.term()
    nbytes = n_px * n_px * 4
    out: dict[str, Any] = {"method": method, "size": f"{n_px}x{n_px}", "mode": mode, "messages": count}
    if mode == "stream":
        rate = (count - 1) / (t_last - t_first)
        out.update(msgs_per_s=round(rate, 1), MB_per_s=round(rate * nbytes / 1e6, 1))
    else:
        lat = sorted(latencies)
        out.update(latency_ms_p50=round(1e3 * statistics.median(lat), 3),
                   latency_ms_p95=round(1e3 * lat[int(0.95 * (len(lat) - 1))], 3))
    return out


# --- full driver path ----------------------------------------------------------------------


class ConstantDriver:
    """A backend that returns one precomputed frame instantly."""

    def __init__(self, n_px: int) -> None:
        self.frame = make_frame(n_px)

    async def connect(self) -> None: ...
    async def close(self) -> None: ...
    async def blank(self) -> None: ...

    async def capabilities(self) -> Any:
        from stemagent.types import Capabilities

        return Capabilities(name="constant", max_fov_A=1e4, max_shape_px=(8192, 8192), min_dwell_s=1e-9, max_dwell_s=1.0)

    async def acquire(self, geometry: ScanGeometry) -> Frame:
        return self.frame

    async def park(self, position_A: Any, dwell_s: float) -> Any:
        raise NotImplementedError

    def stream(self, geometry: ScanGeometry, n_frames: int | None = None) -> Any:
        raise NotImplementedError


def bridge_process(control: str, frames: str, n_px: int) -> None:
    from stemagent.drivers.bridge import Bridge

    async def main() -> None:
        b = Bridge(ConstantDriver(n_px), control, frames, client_timeout_s=60)  # type: ignore[arg-type]
        await b.run()

    asyncio.run(main())


def measure_acquire(n_px: int, count: int) -> dict[str, Any]:
    from stemagent.drivers.zmq_driver import ZmqDriver

    control, frames = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    proc = mp.get_context("spawn").Process(target=bridge_process, args=(control, frames, n_px), daemon=True)
    proc.start()

    async def run() -> list[float]:
        drv = ZmqDriver(control, frames, connect_timeout_s=60, request_timeout_s=30, heartbeat_timeout_s=10)
        await drv.connect()
        g = make_frame(n_px).geometry
        await drv.acquire(g)  # warm up
        times = []
        for _ in range(count):
            t0 = time.perf_counter()
            await drv.acquire(g)
            times.append(time.perf_counter() - t0)
        await drv.close()
        return times

    try:
        times = sorted(asyncio.run(run()))
    finally:
        proc.terminate()
        proc.join(timeout=10)
    return {"method": "wire", "size": f"{n_px}x{n_px}", "mode": "acquire", "messages": count,
            "roundtrip_ms_p50": round(1e3 * statistics.median(times), 3),
            "roundtrip_ms_p95": round(1e3 * times[int(0.95 * (len(times) - 1))], 3)}


def median_of(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The run with the median ``key``, annotated with the spread over all runs."""
    ordered = sorted(runs, key=lambda r: r[key])
    best = dict(ordered[len(ordered) // 2])
    best["repeats"] = len(runs)
    best[f"{key}_range"] = [ordered[0][key], ordered[-1][key]]
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer messages (a smoke run)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement; the median is reported")
    args = ap.parse_args(argv)
    plan = {512: (400, 200), 2048: (60, 40)} if not args.quick else {512: (40, 20), 2048: (8, 6)}
    results: list[dict[str, Any]] = []
    ratios: dict[str, Any] = {}
    for n_px, (n_stream, n_lat) in plan.items():
        row: dict[str, dict[str, Any]] = {}
        for method in ("wire", "send_pyobj"):
            k = max(1, args.repeat)
            row[method + "_stream"] = median_of([measure(method, n_px, n_stream, "stream") for _ in range(k)], "msgs_per_s")
            row[method + "_latency"] = median_of([measure(method, n_px, n_lat, "latency") for _ in range(k)], "latency_ms_p50")
            results += [row[method + "_stream"], row[method + "_latency"]]
        results.append(measure_acquire(n_px, n_lat))
        ratios[f"{n_px}x{n_px}"] = {
            "throughput_wire_over_pyobj": round(row["wire_stream"]["msgs_per_s"] / row["send_pyobj_stream"]["msgs_per_s"], 3),
            "latency_p50_wire_over_pyobj": round(
                row["wire_latency"]["latency_ms_p50"] / row["send_pyobj_latency"]["latency_ms_p50"], 3
            ),
        }
    doc = {
        "benchmark": "transport",
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "processor": platform.processor() or platform.machine(), "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version()},
        "hwm": HWM,
        "zero_copy_threshold_bytes": wire.ZERO_COPY_THRESHOLD_BYTES,
        "results": results,
        "ratios": ratios,
    }
    print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
