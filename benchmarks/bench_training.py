"""Training throughput per lite preset, and the LightningModule's overhead over a bare
PyTorch loop on the same model and batches (target: <= 5%).

    uv run python benchmarks/bench_training.py [--size 128] [--steps 16] [--epochs 2] [--models ...]

Both loops run interleaved in one process (bare, lightning, bare, lightning, ...) so machine
noise hits both alike; the ratio is the median over repeats. Each loop trains `--epochs`
epochs of `--steps` batches, the Lightning one in a single `fit` as a real job does, so the
Trainer's one-off start-up is spread over epochs as in the demo (2 epochs of 16 batches of 8).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import lightning as L
import torch
from common import machine, peak_rss_mib
from torch.utils.data import DataLoader, TensorDataset

from spineseg.config import build
from spineseg.models.module import SegmentationModule

#: The lite20 sweep (conf/sweep/lite20.yaml) as arch:lite-index.
LITE20 = [
    "Unet:0",
    "Unet:1",
    "Unet:2",
    "UnetPlusPlus:0",
    "UnetPlusPlus:1",
    "UnetPlusPlus:2",
    "FPN:0",
    "FPN:1",
    "FPN:2",
    "Linknet:0",
    "Linknet:2",
    "MAnet:0",
    "MAnet:1",
    "PAN:1",
    "PAN:2",
    "DeepLabV3Plus:0",
    "DeepLabV3Plus:2",
    "PSPNet:1",
    "UPerNet:1",
    "Segformer:2",
]


class _Batches(TensorDataset):
    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return {"image": x, "mask": y, "id": str(i)}


def _data(n: int, size: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, size, size, generator=g)
    y = (torch.rand(n, size, size, generator=g) > 0.8).long()
    return DataLoader(_Batches(x, y), batch_size=8, shuffle=False)


def bare_loop(module: SegmentationModule, loader: DataLoader, epochs: int = 1) -> float:
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    module.train()
    start = time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            opt.zero_grad(set_to_none=True)
            loss = module.loss(module.net(batch["image"]), batch["mask"])
            loss.backward()
            opt.step()
    return time.perf_counter() - start


def lightning_loop(module: SegmentationModule, loader: DataLoader, epochs: int = 1) -> float:
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    return time.perf_counter() - start


def print_table(rows: list[dict]) -> None:
    """Markdown table; the peak RSS column appears when each row has its own process."""
    rss = all("peak_rss_mib" in r for r in rows)
    print(
        "| model | train img/s |"
        + (" peak RSS (MiB) |" if rss else "")
        + " bare loop (s) | Lightning (s) | overhead |"
    )
    print("|---|---:|" + ("---:|" if rss else "") + "---:|---:|---:|")
    for r in rows:
        mem = f" {r['peak_rss_mib']} |" if rss else ""
        print(
            f"| {r['model']} | {r['img_per_s']} |{mem} {r['bare_s']} | {r['lightning_s']} | "
            f"{r['overhead_pct']:+.1f}% |"
        )


def finish(args: argparse.Namespace, result: dict) -> None:
    """Print the setting and the table; write `result` to `--out`."""
    rss = f"; peak RSS {result['peak_rss_mib']} MiB" if "peak_rss_mib" in result else ""
    print(
        f"\n{result['machine']}; {args.size}x{args.size}, batch 8, "
        f"{result['images']} images/epoch, {args.epochs} epochs{rss}\n"
    )
    print_table(result["rows"])
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)


def _per_process(args: argparse.Namespace) -> None:
    """One process per preset, so each row's peak RSS is that preset's own."""
    import subprocess
    import sys

    rows = []
    for spec in args.models:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                "--models",
                spec,
                "--size",
                str(args.size),
                "--steps",
                str(args.steps),
                "--epochs",
                str(args.epochs),
                "--repeats",
                str(args.repeats),
                "--out",
                "/dev/stdout",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        child, _ = json.JSONDecoder().raw_decode(out[out.index("{\n") :])  # prints may follow
        rows.append({**child["rows"][0], "peak_rss_mib": child["peak_rss_mib"]})
        print(rows[-1], flush=True)
    finish(args, {"machine": child["machine"], "images": child["images"], "rows": rows})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=16, help="batches of 8 per epoch")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--models",
        nargs="*",
        default=LITE20,
    )
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.child and len(args.models) > 1:
        return _per_process(args)
    loader = _data(args.steps * 8, args.size)
    rows = []
    for spec in args.models:
        arch, lite = spec.split(":")
        module = build(
            "module", arch=arch, encoder=f"tu-efficientnet_lite{lite}", weights="offline",
            scheduler=None,
        )  # fmt: skip
        bare_loop(module, loader)  # warm-up (allocator, kernels)
        bare, light = [], []
        for _ in range(args.repeats):
            bare.append(bare_loop(module, loader, args.epochs))
            light.append(lightning_loop(module, loader, args.epochs))
        b, lt = statistics.median(bare), statistics.median(light)
        rows.append(
            {
                "model": f"{arch}/lite{lite}",
                "img_per_s": round(args.epochs * len(loader.dataset) / b, 1),
                "bare_s": round(b, 3),
                "lightning_s": round(lt, 3),
                "overhead_pct": round(100 * (lt - b) / b, 1),
            }
        )
        print(rows[-1], flush=True)
    result = {
        "machine": machine(),
        "size": args.size,
        "batch": 8,
        "images": len(loader.dataset),
        "epochs": args.epochs,
        "peak_rss_mib": round(peak_rss_mib()),
        "rows": rows,
    }
    finish(args, result)


if __name__ == "__main__":
    main()
