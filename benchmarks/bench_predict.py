"""Prediction throughput: films/s of a 4-model ensemble (`spineseg.predict.Ensemble`) at the
demo's working size, one film at a time and in batches, beside a bare PyTorch loop over the
same models on already-resized tensors (the floor: no decoding, resizing, voting or mapping
back), and the same ensemble exported to one ONNX graph run by onnxruntime
(`spineseg-predict engine=onnx`). Interleaved repeats in one process; the median is reported.

    python benchmarks/bench_predict.py [--size 128] [--films 32] [--batch 1,8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import machine

from spineseg.config import build
from spineseg.data.geometry import check_size
from spineseg.onnx_export import OnnxEnsemble, describe, write_graph
from spineseg.predict import Ensemble, Pipeline

PRESETS = [
    ("Unet", "tu-efficientnet_lite0"),
    ("FPN", "tu-efficientnet_lite0"),
    ("UnetPlusPlus", "tu-efficientnet_lite0"),
    ("MAnet", "tu-efficientnet_lite0"),
]


def films(n: int, seed: int = 0) -> list[np.ndarray]:
    """Film-sized 8-bit images (AP spine films are ~2.5:1), content irrelevant to timing."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (1000, 400), dtype=np.uint8) for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--films", type=int, default=32)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    size = check_size([args.size, args.size])
    torch.manual_seed(0)
    models = [build("module", arch=a, encoder=e, weights=None).eval() for a, e in PRESETS]
    ensemble = Ensemble(
        models, [a for a, _ in PRESETS], Pipeline("region", size, "stretch", "none")
    )
    images = films(args.films)
    batches = [int(b) for b in args.batch.split(",")]
    x = torch.randn(args.films, 1, *size)

    def bare(bs: int) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(x), bs):
                torch.stack([torch.sigmoid(m(x[i : i + bs])) for m in models]).mean(0)
        return time.perf_counter() - t0

    def ours(bs: int) -> float:
        t0 = time.perf_counter()
        for i in range(0, len(images), bs):
            ensemble.predict_batch(images[i : i + bs])
        return time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        path = write_graph(ensemble, Path(tmp) / "ensemble.onnx", describe(ensemble))
        onnx_ensemble = OnnxEnsemble(path)

    def onnx(bs: int) -> float:
        t0 = time.perf_counter()
        for i in range(0, len(images), bs):
            onnx_ensemble.predict_batch(images[i : i + bs])
        return time.perf_counter() - t0

    times: dict[tuple[str, int], list[float]] = {}
    ours(max(batches))  # warm-up
    onnx(max(batches))
    for _ in range(args.repeats):
        for bs in batches:
            times.setdefault(("bare", bs), []).append(bare(bs))
            times.setdefault(("spineseg", bs), []).append(ours(bs))
            times.setdefault(("onnx", bs), []).append(onnx(bs))
    print(f"# {machine()}")
    print(f"# 4-model ensemble {'/'.join(a for a, _ in PRESETS)} on Lite0, {size[0]}x{size[1]}")
    print(f"# {args.films} films of 1000x400, median of {args.repeats} interleaved repeats\n")
    print(
        "| batch | bare loop films/s | spineseg-predict films/s | overhead | onnxruntime films/s |"
    )
    print("|---:|---:|---:|---:|---:|")
    for bs in batches:
        b = statistics.median(times[("bare", bs)])
        o = statistics.median(times[("spineseg", bs)])
        x = statistics.median(times[("onnx", bs)])
        print(
            f"| {bs} | {args.films / b:.1f} | {args.films / o:.1f} | {100 * (o / b - 1):+.0f}% "
            f"| {args.films / x:.1f} ({o / x:.2f}x) |"
        )


if __name__ == "__main__":
    main()
