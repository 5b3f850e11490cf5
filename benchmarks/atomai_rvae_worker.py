"""The AtomAI side of ``bench_rvae_compare.py``; runs in AtomAI's own virtual environment.

AtomAI 0.8.1 is never installed into the project's environment (its pins pull a CUDA torch):
``bench_rvae_compare.py`` calls this script with the Python of a separate venv::

    python3 -m venv /tmp/atomai-venv
    /tmp/atomai-venv/bin/pip install torch==2.13.0
    /tmp/atomai-venv/bin/pip install --no-deps atomai==0.8.1
    /tmp/atomai-venv/bin/pip install numpy scipy scikit-learn scikit-image matplotlib networkx \
        progressbar2 pandas six gpytorch "mendeleev<=0.6.1"

``torchvision`` is imported by AtomAI's module tree but not used by ``rVAE``; a torchvision that
does not match the installed torch fails at import (``operator torchvision::nms does not
exist``), so this worker puts an empty stand-in module in its place before importing AtomAI.

Usage::

    python atomai_rvae_worker.py IN.npz OUT.npz

``IN.npz``: ``train`` (N, P, P), ``test`` (M, P, P), ``upright`` (M, P, P), ``latent_dim``,
``epochs``, ``batch_size``, ``rotation_prior``, ``translation_prior``, ``seed``, ``rate_patches``,
``rounds``. ``OUT.npz``: the posterior means of ``test`` and ``upright`` (``z_test``,
``z_upright``: angle, dx, dy, content...) and the decoded ``test`` patches. Prints one JSON
document: training seconds, encode and decode rates (one thread, wall and CPU time) and what
``decode`` does with a full latent vector (AtomAI issue #89).
"""

from __future__ import annotations

import json
import sys
import time
import types

import numpy as np


def _stub_torchvision() -> None:
    tv = types.ModuleType("torchvision")
    models = types.ModuleType("torchvision.models")
    utils = types.ModuleType("torchvision.utils")

    def _absent(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("torchvision is stubbed in this worker")

    models.mobilenet_v2 = models.resnet50 = models.vgg16 = _absent  # type: ignore[attr-defined]
    utils.make_grid = _absent  # type: ignore[attr-defined]
    tv.models, tv.utils = models, utils  # type: ignore[attr-defined]
    sys.modules.update({"torchvision": tv, "torchvision.models": models, "torchvision.utils": utils})


def _rate(fn, n: int, rounds: int) -> dict:  # type: ignore[no-untyped-def]
    fn()
    wall, cpu = [], []
    for _ in range(rounds):
        t0, c0 = time.perf_counter(), time.thread_time()
        fn()
        wall.append(n / (time.perf_counter() - t0))
        cpu.append(n / max(time.thread_time() - c0, 1e-9))
    return {"wall_per_s": float(np.median(wall)), "cpu_per_s": float(np.median(cpu))}


def main(inp: str, out: str) -> dict:
    _stub_torchvision()
    import torch

    torch.set_num_threads(1)
    import atomai
    from atomai.models import rVAE
    from atomai.utils import transform_coordinates

    d = np.load(inp)
    train, test, upright = d["train"].astype(np.float32), d["test"].astype(np.float32), d["upright"].astype(np.float32)
    k = int(d["latent_dim"])
    p = train.shape[1]
    model = rVAE((p, p), latent_dim=k, translation=True, seed=int(d["seed"]))
    t0, c0 = time.perf_counter(), time.process_time()
    model.fit(train, training_cycles=int(d["epochs"]), batch_size=int(d["batch_size"]), rotation_prior=float(d["rotation_prior"]),
              translation_prior=float(d["translation_prior"]), loss="mse")
    train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    z_test, _ = model.encode(test)
    z_up, _ = model.encode(upright)

    # issue #89: decode() hands the whole latent vector (angle, dx, dy, content) to the decoder net
    try:
        model.decode(z_test[:8])
        full_vector = "worked"
    except Exception as exc:  # noqa: BLE001 (we report whatever it raises)
        full_vector = f"{type(exc).__name__}: {str(exc)[:160]}"

    dx_prior = model.dx_prior

    def decode_rotated(z: np.ndarray) -> np.ndarray:
        """The workaround: the rotation and shift that rVAE's own forward pass applies
        (``transform_coordinates`` of the decoder's grid by angle and dx * translation_prior),
        then the decoder net on the content latents only."""
        zt = torch.from_numpy(z).float()
        with torch.no_grad():
            grid = model.x_coord.expand(len(zt), *model.x_coord.size())
            grid = transform_coordinates(grid, zt[:, 0], (zt[:, 1:3] * dx_prior).unsqueeze(1))
            return model.decoder_net(grid, zt[:, 3:]).cpu().numpy().reshape(len(zt), p, p)

    rec = decode_rotated(z_test)
    n = int(d["rate_patches"])
    rounds = int(d["rounds"])
    xr = test[np.arange(n) % len(test)]
    zr = z_test[np.arange(n) % len(test)]
    rates = {"encode": _rate(lambda: model.encode(xr), n, rounds),
             "decode_content_only": _rate(lambda: model.decode(zr[:, 3:]), n, rounds),
             "decode_angle_shift_workaround": _rate(lambda: decode_rotated(zr), n, rounds)}
    np.savez(out, z_test=z_test, z_upright=z_up, recon=rec)
    return {"atomai": atomai.__version__, "torch": torch.__version__, "train_s": train_s, "train_cpu_s": train_cpu_s,
            "decode_full_vector": full_vector, "rates": rates}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
