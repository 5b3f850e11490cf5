"""The motif-learn side of ``bench_motifs.py``; runs in motif-learn's own virtual environment.

motif-learn (PyPI ``motif-learn`` 0.1.2, import name ``mtflearn``) is never installed into the
project's environment: ``bench_motifs.py`` calls this script with the Python of a separate venv
(``python3 -m venv /tmp/mlearn-venv && /tmp/mlearn-venv/bin/pip install motif-learn==0.1.2``).
It imports only numpy, scipy, scikit-learn and mtflearn, reads its inputs from an ``.npz`` file
and prints one JSON document. Usage::

    python motiflearn_worker.py zernike IN.npz ROUNDS
    python motiflearn_worker.py layout IN.npz OUT.npz
    python motiflearn_worker.py motifs IN.npz OUT.npz
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def zernike(path: str, rounds: int) -> dict:
    from mtflearn import ZPs
    from mtflearn.features import KeyPoints

    d = np.load(path)
    img = d["image"].astype(np.float64)
    pts = d["centres_xy"]
    size = int(d["patch_px"])
    z = ZPs(n_max=int(d["n_max"]), size=size)
    kp = KeyPoints(pts, img, size)
    patches = kp.extract_patches(size)
    z.transform(patches)  # warm-up
    incl, feat = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        kp = KeyPoints(pts, img, size)
        p = kp.extract_patches(size)
        t1 = time.perf_counter()
        z.transform(p)
        t2 = time.perf_counter()
        incl.append(len(p) / (t2 - t0))
        feat.append(len(p) / (t2 - t1))
    return {"patches": int(len(patches)), "incl_extraction_per_s": incl, "features_per_s": feat}


def layout(path: str, out: str) -> dict:
    from mtflearn.manifold.force_relaxed import ForceGraph8

    x = np.load(path)["x"]
    fg = ForceGraph8(n_neighbors=10, metric="euclidean", random_state=48, num_iterations=100)
    fg.fit_transform(x[:200])  # compile the numba kernels before timing
    t0 = time.perf_counter()
    y = ForceGraph8(n_neighbors=10, metric="euclidean", random_state=48, num_iterations=100).fit_transform(x)
    dt = time.perf_counter() - t0
    np.savez(out, layout=y)
    return {"n": int(len(x)), "seconds": dt}


def motifs(path: str, out: str) -> dict:
    """Per frame: motif-learn's published chain — integer-centred patches, Zernike magnitudes,
    its force-relaxed layout (default settings) and ``seg_lbs`` (connected components of the
    rasterised layout) for the labels."""
    from mtflearn import ZPs
    from mtflearn.clustering import seg_lbs
    from mtflearn.manifold.force_relaxed import ForceGraph8

    d = np.load(path)
    n_frames = int(d["n_frames"])
    size = int(d["patch_px"])
    z = ZPs(n_max=int(d["n_max"]), size=size)
    labels = {}
    seconds = []
    for i in range(n_frames):
        img = d[f"image_{i}"].astype(np.float64)
        pts = d[f"centres_xy_{i}"]
        t0 = time.perf_counter()
        half = size // 2
        xy = np.rint(pts).astype(int)
        patches = np.stack([img[y - half:y - half + size, x - half:x - half + size] for x, y in xy])
        mag = np.abs(z.transform(patches).to_complex().data)
        y = ForceGraph8(X=mag, n_neighbors=10, random_state=48).fit_transform(mag)
        labels[f"labels_{i}"] = seg_lbs(y)
        labels[f"layout_{i}"] = y
        seconds.append(time.perf_counter() - t0)
    np.savez(out, **labels)
    return {"frames": n_frames, "seconds": seconds}


def main() -> None:
    import contextlib

    task = sys.argv[1]
    with contextlib.redirect_stdout(sys.stderr):  # motif-learn prints progress; stdout carries the JSON
        res = run(task)
    import mtflearn

    res["mtflearn_version"] = getattr(mtflearn, "__version__", "?")
    print(json.dumps(res))


def run(task: str) -> dict:
    if task == "zernike":
        res = zernike(sys.argv[2], int(sys.argv[3]))
    elif task == "layout":
        res = layout(sys.argv[2], sys.argv[3])
    elif task == "motifs":
        res = motifs(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(f"task={task!r}: must be zernike, layout or motifs")
    return res


if __name__ == "__main__":
    main()
