"""rVAE (issue 18, "Targets"): ours side by side with AtomAI 0.8.1's rVAE, a plain VAE and PCA, on
the same twin HAADF patches in the same run.

Patches: 16 x 16 at 0.2 Å/px around every atom of twin sequences of Si-doped graphene at
1e4 e/Å² per frame (random scan rotations, beam-induced Si hops, knock-on vacancies), every
patch on a grid turned by a random angle. To have the "Si at a vacancy" class at all (the twin's
specimen builder keeps dopants and vacancies >= 6 Å apart), ``--si-at-vacancy`` of the Si
dopants lose one C neighbour before the sequence starts (``data.si_vacancy_fraction``). Classes (twin truth, never seen in
training): C in the lattice, Si substitutional, C next to a vacancy, Si next to a vacancy. No
edge is in these frames (the field of view stays inside the specimen).

Training patches come from ``--train-sequences`` sequences, test patches from sequences with
other seeds. Ours: the shipped weights (``--weights``; trained by ``configs/train-rvae.yaml`` on
its own twin data, doses 3e3-1e5). AtomAI's rVAE, the plain VAE and PCA are fitted here on the
training patches, all with ``latent_dim`` content dimensions (ours' ``latent_dim``).

Measured on the test patches: k-NN balanced accuracy of the true classes from the content
latents (5-NN, 5-fold stratified CV), the rotation error (a patch against the same atom on an
unturned grid, circular RMS modulo 120°), encode and decode (with angle and shift) rates on one
thread (wall and thread CPU time, medians). Also what the data holds: supervised classifiers on
rotation-invariant features of the noisy patches and of the noiseless ones.

AtomAI runs in its own venv (``benchmarks/atomai_rvae_worker.py``, see its docstring for the
install); without ``--atomai-python`` (or if it fails) its columns are left out, with the reason.

::

    .venv/bin/python benchmarks/bench_rvae_compare.py --atomai-python /tmp/atomai-venv/bin/python \\
        --json benchmarks/results/rvae_compare.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import stemagent.agent.app.rvae_training as rt
import stemagent.encoding.rvae as rvae_mod
from stemagent.encoding.rvae import RVAE, default_rvae_weights, load_rvae, wrap_angle

ROOT = Path(__file__).resolve().parent


def make_patches(args: argparse.Namespace) -> dict[str, np.ndarray]:
    cfg = rt.load_rvae_train_config(args.config)
    d = rt.data_config(cfg).model_copy(update={"doses_e_per_A2": [args.dose], "n_si": args.n_si, "vacancy_per_nm2": args.vacancy_per_nm2,
                                               "frames_per_sequence": args.frames, "si_vacancy_fraction": args.si_at_vacancy})
    tr = rt.twin_patches(cfg, d, seed=args.seed + 101, sequences=args.train_sequences)
    te = rt.twin_patches(cfg, d, seed=args.seed + 202, sequences=args.test_sequences, upright=True)
    assert te.upright is not None and te.clean is not None
    return {"train": tr.patches, "train_classes": tr.classes, "test": te.patches, "test_classes": te.classes, "rotation_rad": te.rotation_rad,
            "upright": te.upright, "clean": te.clean}


def knn_bacc(z: np.ndarray, classes: np.ndarray) -> float | None:
    acc = rt.knn_balanced_accuracy(np.asarray(z, dtype=np.float64), classes)
    return None if acc is None else round(acc, 4)


def confusion(z: np.ndarray, classes: np.ndarray) -> list[list[int]]:
    from sklearn.metrics import confusion_matrix
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier

    cv = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    pred = cross_val_predict(KNeighborsClassifier(n_neighbors=5), z, classes, cv=cv)
    return confusion_matrix(classes, pred).tolist()


def supervised_bounds(model: RVAE, data: dict[str, np.ndarray]) -> dict[str, float]:
    """What the patches hold: supervised classifiers (5-fold CV, balanced accuracy), on the
    rotation-invariant harmonic moduli of ours' encoder (noisy and noiseless patches) and on the
    raw pixels of the unturned patches."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def moduli(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            re, im = model._harmonics(torch.from_numpy(x))
            return torch.sqrt(re * re + im * im).reshape(len(x), -1).numpy()

    c = data["test_classes"]
    cv = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)

    def score(f: np.ndarray, clf: Any) -> float:
        return round(float(np.mean(cross_val_score(clf, f, c, cv=cv, scoring="balanced_accuracy"))), 4)

    def logreg() -> Any:
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, class_weight="balanced"))

    return {"logreg_harmonic_moduli_noisy": score(moduli(data["test"]), logreg()),
            "logreg_harmonic_moduli_noiseless": score(moduli(data["clean"]), logreg()),
            "logreg_unturned_pixels_noisy": score(data["upright"].reshape(len(c), -1), logreg()),
            "knn5_unturned_pixels_noisy": score(data["upright"].reshape(len(c), -1), KNeighborsClassifier(n_neighbors=5))}


def rates(encode: Any, decode: Any | None, x: np.ndarray, rounds: int) -> dict[str, float]:
    """Medians over ``rounds`` of patches/s, wall and thread CPU time, one thread."""
    def timed(fn: Any, arg: Any) -> tuple[float, float, Any]:
        t0, c0 = time.perf_counter(), time.thread_time()
        out = fn(arg)
        return len(x) / (time.perf_counter() - t0), len(x) / max(time.thread_time() - c0, 1e-9), out

    lat = encode(x)
    if decode is not None:
        decode(lat)
    ew, ec, dw, dc = [], [], [], []
    for _ in range(rounds):
        w, c, lat = timed(encode, x)
        ew.append(w)
        ec.append(c)
        if decode is not None:
            w, c, _ = timed(decode, lat)
            dw.append(w)
            dc.append(c)
    out = {"encode_wall_per_s": float(np.median(ew)), "encode_cpu_per_s": float(np.median(ec))}
    if decode is not None:
        out |= {"decode_wall_per_s": float(np.median(dw)), "decode_cpu_per_s": float(np.median(dc))}
    return {k: round(v, 0) for k, v in out.items()}


def decode_via_training_path(model: RVAE, lat: Any) -> torch.Tensor:
    """``decode`` as it was before session 7: :meth:`RVAE.decode_logits` (a turned and shifted grid
    through the first layer) in chunks of ``DECODE_CHUNK_PX`` pixels under ``inference_mode``."""
    p = model.spec.patch_px
    step = max(1, rvae_mod.DECODE_CHUNK_PX // (p * p))
    with torch.inference_mode():
        out = torch.empty((len(lat), p, p))
        for i in range(0, len(lat), step):
            out[i:i + step] = model.decode_logits(lat.angle_rad[i:i + step], lat.shift_px[i:i + step], lat.z[i:i + step])
        return out


def rotation_error_deg(angle_turned: np.ndarray, angle_upright: np.ndarray, rotation_rad: np.ndarray, sign: float) -> float:
    """Circular RMS (modulo 120°) of the angle latent's change against the known turn (``sign``:
    the model's angle convention, +1 when turning the grid by +r moves the angle by -r)."""
    diff = wrap_angle(angle_turned - angle_upright + sign * rotation_rad, 3)
    return round(float(np.degrees(np.sqrt(np.mean(diff ** 2)))), 3)


class PlainVAE(nn.Module):
    """An MLP VAE on the flattened patch (no rotation or shift latents)."""

    def __init__(self, pixels: int, k: int, hidden: int = 128) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(pixels, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2 * k))
        self.dec = nn.Sequential(nn.Linear(k, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, pixels))
        self.k = k

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc(x.reshape(len(x), -1))[:, : self.k]


def fit_plain_vae(x: np.ndarray, k: int, steps: int, noise_sigma: float, seed: int) -> tuple[PlainVAE, float]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    xt = torch.from_numpy(x.reshape(len(x), -1))
    model = PlainVAE(xt.shape[1], k)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    c0 = time.process_time()
    for _ in range(steps):
        b = xt[torch.randint(0, len(xt), (256,), generator=gen)]
        out = model.enc(b)
        mu, lv = out[:, :k], out[:, k:].clamp(-12, 6)
        zs = mu + torch.randn(mu.shape, generator=gen) * torch.exp(0.5 * lv)
        rec = ((model.dec(zs) - b) ** 2).sum(1) / (2 * noise_sigma ** 2)
        kl = 0.5 * (mu * mu + lv.exp() - 1 - lv).sum(1)
        loss = (rec + kl).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval(), time.process_time() - c0


def run_atomai(python: str, data: dict[str, np.ndarray], k: int, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        np.savez(inp, train=data["train"], test=data["test"], upright=data["upright"], latent_dim=k, epochs=args.atomai_epochs,
                 batch_size=128, rotation_prior=math.pi / 3, translation_prior=0.1, seed=args.seed, rate_patches=args.decode_patches,
                 rounds=args.rounds)
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        proc = subprocess.run([python, str(ROOT / "atomai_rvae_worker.py"), str(inp), str(out)], capture_output=True, text=True, env=env,
                              timeout=args.atomai_timeout_s, cwd=tmp)  # AtomAI saves model.tar into its working directory every epoch
        if proc.returncode != 0:
            return {"error": proc.stderr.strip().splitlines()[-1][:300] if proc.stderr.strip() else f"exit {proc.returncode}"}
        doc = json.loads(proc.stdout.strip().splitlines()[-1])
        lat = dict(np.load(out))
    z, zu = lat["z_test"], lat["z_upright"]
    c = data["test_classes"]
    rot = data["rotation_rad"]
    signs = {s: rotation_error_deg(z[:, 0], zu[:, 0], rot, s) for s in (1.0, -1.0)}
    best = min(signs, key=lambda s: signs[s])
    doc.update(knn_balanced_accuracy=knn_bacc(z[:, 3:], c), confusion=confusion(z[:, 3:], c), rotation_error_deg_rms=signs[best],
               rotation_sign=best, clean_reconstruction_ratio=_recon_ratio(lat["recon"], data["clean"]))
    return doc


def _recon_ratio(rec: np.ndarray, clean: np.ndarray) -> float:
    return round(float(((rec - clean) ** 2).mean() / ((clean - clean.mean(0)) ** 2).mean()), 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/train-rvae.yaml")
    ap.add_argument("--weights", type=Path, default=None, help="ours (default: the shipped weights)")
    ap.add_argument("--dose", type=float, default=1e4, help="e/Å² per frame")
    ap.add_argument("--n-si", type=int, default=16)
    ap.add_argument("--vacancy-per-nm2", type=float, default=0.3)
    ap.add_argument("--si-at-vacancy", type=float, default=0.4, help="fraction of Si dopants given a vacancy neighbour")
    ap.add_argument("--frames", type=int, default=8, help="frames per sequence")
    ap.add_argument("--train-sequences", type=int, default=8)
    ap.add_argument("--test-sequences", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-steps", type=int, default=1500)
    ap.add_argument("--atomai-python", default=None, help="python of a venv with atomai 0.8.1 (see atomai_rvae_worker.py)")
    ap.add_argument("--atomai-epochs", type=int, default=8)
    ap.add_argument("--atomai-timeout-s", type=float, default=3600.0)
    ap.add_argument("--rate-patches", type=int, default=20000, help="patches per encode round")
    ap.add_argument("--decode-patches", type=int, default=5000, help="patches per decode round (and per AtomAI round)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out: dict[str, Any] = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 thread",
                           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_average_before": os.getloadavg()}
    t0 = time.perf_counter()
    data = make_patches(args)
    c = data["test_classes"]
    out["patches"] = {"train": int(len(data["train"])), "test": int(len(c)), "data_s": round(time.perf_counter() - t0, 1),
                      "test_class_counts": {rt.CLASS_NAMES[int(i)]: int((c == i).sum()) for i in np.unique(c)},
                      "train_class_counts": {rt.CLASS_NAMES[int(i)]: int((data["train_classes"] == i).sum()) for i in np.unique(data["train_classes"])}}
    model = load_rvae(args.weights or default_rvae_weights(), device="cpu", patch_px=16)
    k = model.spec.latent_dim
    out["latent_dim"] = k

    # ours
    lat = model.encode(data["test"])
    up = model.encode(data["upright"])
    xr = data["test"][np.arange(args.rate_patches) % len(c)]
    r_enc = rates(lambda x: model.encode(x), None, xr, args.rounds)
    xd = data["test"][np.arange(args.decode_patches) % len(c)]
    r_dec = rates(lambda x: model.encode(x), lambda la: model.decode(la), xd, args.rounds)
    # the decode before session 7 (the training path's turned grid, in the same chunks, no autograd), same run
    r_old = rates(lambda x: model.encode(x), lambda la: decode_via_training_path(model, la), xd, args.rounds)
    rec = model.decode(lat).numpy()
    out["ours"] = {"weights": str(args.weights or default_rvae_weights().name), "knn_balanced_accuracy": knn_bacc(lat.z.numpy(), c),
                   "confusion": confusion(lat.z.numpy(), c),
                   "rotation_error_deg_rms": rotation_error_deg(lat.angle_rad.numpy(), up.angle_rad.numpy(), data["rotation_rad"], 1.0),
                   "clean_reconstruction_ratio": _recon_ratio(rec, data["clean"]),
                   "rates": {**r_enc, **{k_: v for k_, v in r_dec.items() if k_.startswith("decode")},
                             **{f"{k_}_training_path": v for k_, v in r_old.items() if k_.startswith("decode")}}}
    out["supervised_bounds"] = supervised_bounds(model, data)

    # PCA
    from sklearn.decomposition import PCA

    pca = PCA(n_components=k, random_state=args.seed).fit(data["train"].reshape(len(data["train"]), -1))
    zp = pca.transform(data["test"].reshape(len(c), -1))
    out["pca"] = {"knn_balanced_accuracy": knn_bacc(zp, c), "confusion": confusion(zp, c),
                  "rates": rates(lambda x: pca.transform(x.reshape(len(x), -1)), None, xr, args.rounds)}

    # plain VAE
    vae, vae_cpu_s = fit_plain_vae(data["train"], k, args.vae_steps, model.spec.noise_sigma, args.seed)
    with torch.inference_mode():
        zv = vae.encode(torch.from_numpy(data["test"])).numpy()

    def vae_encode(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return vae.encode(torch.from_numpy(x)).numpy()

    out["plain_vae"] = {"steps": args.vae_steps, "train_cpu_s": round(vae_cpu_s, 1), "knn_balanced_accuracy": knn_bacc(zv, c),
                        "confusion": confusion(zv, c), "rates": rates(vae_encode, None, xr, args.rounds)}

    # AtomAI
    if args.atomai_python:
        try:
            out["atomai"] = run_atomai(args.atomai_python, data, k, args)
        except (subprocess.TimeoutExpired, OSError, ValueError) as exc:
            out["atomai"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    else:
        out["atomai"] = {"error": "not run (no --atomai-python)"}
    out["load_average_after"] = os.getloadavg()
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")



if __name__ == "__main__":
    main()
