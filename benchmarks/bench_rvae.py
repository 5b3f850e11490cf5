"""rVAE (issue 18): encode and decode rates of the shipped model on one thread, its held-out
metrics on fresh twin patches, and (``--train``) the wall time of the shipped training recipe.

Issue 18's other targets have benchmarks of their own: ``bench_rvae_compare.py`` (AtomAI's rVAE,
a plain VAE and PCA side by side on the same patches: k-NN, rotation, encode and decode rates) and
``bench_rvae_events.py`` (events from latent jumps against the twin's event log).

::

    .venv/bin/python benchmarks/bench_rvae.py                # rates and held-out metrics (about a minute)
    .venv/bin/python benchmarks/bench_rvae.py --train        # also trains configs/train-rvae.yaml to a temp dir

Prints one JSON document (also written to ``--json``). Rates are medians of ``--rounds`` rounds;
on a shared machine they include waiting for a core (the load average is printed with them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from stemagent.agent.app.rvae_training import data_config, evaluate, load_rvae_train_config, run_training, twin_patches
from stemagent.encoding.rvae import default_rvae_weights, load_rvae


def rates(model, x: np.ndarray, rounds: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    xt = torch.from_numpy(x)
    enc, dec = [], []
    with torch.no_grad():
        lat = model.encode(xt[:256])
        model.decode(lat)
        for _ in range(rounds):
            t0 = time.perf_counter()
            lat = model.encode(xt)
            t1 = time.perf_counter()
            model.decode(lat)
            t2 = time.perf_counter()
            enc.append(len(x) / (t1 - t0))
            dec.append(len(x) / (t2 - t1))
    return {"encode_patches_per_s": round(float(np.median(enc)), 0), "decode_patches_per_s": round(float(np.median(dec)), 0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/train-rvae.yaml")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--patches", type=int, default=20000)
    ap.add_argument("--train", action="store_true", help="time the shipped training recipe (writes to a temp dir)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_rvae_train_config(args.config)
    d = data_config(cfg).model_copy(update={"frames_per_sequence": 4})
    held = twin_patches(cfg, d, seed=cfg.seed + 20_000, sequences=4, upright=True)
    model = load_rvae(default_rvae_weights(), device="cpu", patch_px=cfg.patch_px)
    x = held.patches[np.arange(args.patches) % len(held.patches)]
    out: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 thread",
                 "load_average_before": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "rates": rates(model, x, args.rounds), "held_out": evaluate(model, held)}
    if args.train:
        with tempfile.TemporaryDirectory() as tmp:
            tcfg = cfg.model_copy(update={"out": Path(tmp) / "rvae.pt", "checkpoint_dir": None, "max_minutes": None})
            t0 = time.perf_counter()
            card = run_training(tcfg, show_progress=False)
            out["train"] = {"wall_s": round(time.perf_counter() - t0, 1), "fit_s": card["trained"]["seconds"],
                            "steps": card["trained"]["steps"], "metrics": card["metrics"]}
    out["load_average_after"] = os.getloadavg()[0]
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
