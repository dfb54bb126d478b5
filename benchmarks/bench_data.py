"""Data loading must never be the bottleneck: loader throughput (images/s, with the
`strong` augmentation) beside the training-step throughput of a lite model, one process.

    uv run python benchmarks/bench_data.py [--size 256] [--workers 0]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from common import machine

from spineseg.config import build
from spineseg.data import datamodule as D


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--augment", default="strong")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        dm = build(
            "data",
            image_size=(args.size, args.size),
            augment=args.augment,
            num_workers=args.workers,
            cache_dir=cache,
            batch_size=8,
            source_kwargs={"n": 183, "height": args.size, "width": args.size},
        )
        dm.setup()
        first = time.perf_counter() - t0
        D._MEMORY_CACHE.clear()
        t0 = time.perf_counter()
        build(
            "data",
            image_size=(args.size, args.size),
            cache_dir=cache,
            source_kwargs={"n": 183, "height": args.size, "width": args.size},
        ).setup()
        cached = time.perf_counter() - t0
        loader = dm.train_dataloader()
        n = 0
        t0 = time.perf_counter()
        for _ in range(3):
            for batch in loader:
                n += batch["image"].shape[0]
        load_rate = n / (time.perf_counter() - t0)
        module = build("module")  # Unet / Lite0, offline weights
        opt = torch.optim.AdamW(module.parameters())
        batches = list(loader)
        t0 = time.perf_counter()
        for batch in batches:
            opt.zero_grad()
            module.loss(module(batch["image"]), batch["mask"]).backward()
            opt.step()
        step_rate = sum(b["image"].shape[0] for b in batches) / (time.perf_counter() - t0)
    print(machine())
    print(f"| {args.size}x{args.size}, augment={args.augment}, workers={args.workers} | value |")
    print("|---|---:|")
    print(
        f"| first setup: generate/decode + resize + preprocess 241 films, write cache | {first:.2f} s |"
    )
    print(f"| setup from the disk cache (new process in a sweep) | {cached:.2f} s |")
    print(f"| loader throughput (augmented) | {load_rate:.0f} img/s |")
    print(f"| Unet/lite0 training step throughput | {step_rate:.1f} img/s |")
    print(f"| loader / training ratio | {load_rate / step_rate:.1f}x |")


if __name__ == "__main__":
    main()
