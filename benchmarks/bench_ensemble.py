#!/usr/bin/env python
"""Benchmark of the ensemble engine on a synthetic prediction store.

In one run on one machine it
  1. writes a store: K models x N images x HxW float16 probabilities, noisy versions of
     random blob masks (streamed to disk, so the writer never holds a model in memory);
  2. times reading every probability once (memmap + np.asarray per chunk) against the full
     streaming evaluation (every rule, every overlap metric, per model and per rule) and
     reports the ratio (target <= 2x); the distance metrics (HD95, ASSD) are timed apart;
  3. measures the peak RSS of the streaming evaluation in a fresh process for several N
     (it must not grow with N; naive stacking needs K*N*C*H*W*4 bytes);
  4. compares soft/hard voting Dice and HD95 with MONAI (MeanEnsemble, VoteEnsemble,
     DiceMetric, HausdorffDistanceMetric(percentile=95)) on the same store: agreement and
     our time over theirs.

Defaults take about two minutes on 2 cores. The large case (10 GB of probabilities):
    python benchmarks/bench_ensemble.py --models 10 --images 2000 --height 512 --width 512 \
        --rss-n 500,1000,2000 --rss-size 512 --out bench_big.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from spineseg.ensemble import agreement, metrics, rules, scoring, voting  # noqa: E402
from spineseg.ensemble.evaluate import (  # noqa: E402
    EnsembleSpec,
    evaluate_arrays,
    scored_methods,
)
from spineseg.ensemble.store import (  # noqa: E402
    PredictionStore,
    iter_chunks,
    iter_raw_chunks,
    load_chunk,
    read_rows,
)
from spineseg.utils.io import atomic_open  # noqa: E402

RULES = list(rules.RULES)
SPLIT = "test"


# ---------------------------------------------------------------------- synthetic store
def blob_masks(n: int, h: int, w: int, classes: int, rng: np.random.Generator) -> np.ndarray:
    """An ellipse per image (cut into `classes` bands in vertebrae mode)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.zeros((n, h, w), dtype=np.uint8)
    for i in range(n):
        cy, cx = rng.uniform(0.35, 0.65) * h, rng.uniform(0.4, 0.6) * w
        ry, rx = rng.uniform(0.2, 0.35) * h, rng.uniform(0.08, 0.15) * w
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        band = np.clip(((yy - (cy - ry)) / (2 * ry) * classes).astype(int), 0, classes - 1)
        out[i][inside] = (band[inside] + 1) if classes > 1 else 1
    return out


def network_probs(masks: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Region-mode probabilities shaped like a trained network's: confident away from the
    boundary (logit = signed distance / (H/128) px, capped at +-8) plus smooth per-model
    errors (noise at 1/32 resolution, bicubically upsampled) that move the boundary and
    now and then add a blob. sigma 1.5..3.75 gives Dice 0.85-0.95 per model."""
    n, h, w = masks.shape
    inside = np.stack([ndimage.distance_transform_edt(m) for m in masks])
    outside = np.stack([ndimage.distance_transform_edt(1 - m) for m in masks])
    lo = rng.standard_normal((n, 1, -(-h // 32) + 1, -(-w // 32) + 1), dtype=np.float32)
    smooth = F.interpolate(torch.from_numpy(lo), size=(h, w), mode="bicubic")[:, 0].numpy()
    logits = np.clip((inside - outside) / (h / 128), -8, 8) + sigma * smooth
    return (1.0 / (1.0 + np.exp(-logits)))[:, None].astype(np.float32)


def noisy_probs(
    masks: np.ndarray, channels: int, sigma: float, rng: np.random.Generator
) -> np.ndarray:
    """A worst case for the agreement path: the truth's logits (+-4) plus blocky (1/8
    resolution) and per-pixel noise, so models disagree all over the image (about 36% of
    the pixels in region mode) and far more than trained networks do."""
    n, h, w = masks.shape
    c = max(channels, 2)
    lo = rng.standard_normal((n, c, -(-h // 8), -(-w // 8)), dtype=np.float32)
    smooth = lo.repeat(8, axis=2).repeat(8, axis=3)[:, :, :h, :w]
    pixel = rng.standard_normal((n, c, h, w), dtype=np.float32)
    if channels == 1:
        logits = 4.0 * (2.0 * masks[:, None].astype(np.float32) - 1.0)
        logits += sigma * smooth[:, :1] + 0.5 * pixel[:, :1]
        return 1.0 / (1.0 + np.exp(-logits))
    onehot = np.eye(channels, dtype=np.float32)[masks].transpose(0, 3, 1, 2)
    logits = 4.0 * onehot + sigma * smooth[:, :channels] + 0.5 * pixel[:, :channels]
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def write_store(
    run_dir: Path,
    k: int,
    n: int,
    h: int,
    w: int,
    channels: int,
    seed: int,
    block: int = 32,
    style: str = "network",
    distinct: int | None = None,
) -> PredictionStore:
    """The store layout, each model's npz streamed block by block (same bytes as np.savez).

    With `distinct` < n, only that many different images are generated and then repeated
    (truth and probabilities alike): the RSS runs need a store of the full size on disk, not
    2000 freshly simulated films."""
    rng = np.random.default_rng(seed)
    store = PredictionStore(run_dir)
    distinct = min(n, distinct or n)
    base = blob_masks(distinct, h, w, 1 if channels == 1 else channels - 1, rng)
    masks = np.resize(base, (n, h, w))  # repeats the distinct images in order
    ids = np.array([f"img{i:05d}" for i in range(n)])
    film = (masks > 0).astype(np.uint8) * 60 + rng.integers(60, 160, masks.shape, np.uint8)
    store.write_truth(SPLIT, masks, ids, images=film, spacing=(0.5, 0.5))
    for m in range(k):
        sigma = (1.5 if style == "network" else 1.0) + 0.25 * m
        path = store.probs_path(f"model{m:02d}", SPLIT)
        header = {
            "descr": np.lib.format.dtype_to_descr(np.dtype("<f2")),
            "fortran_order": False,
            "shape": (n, channels, h, w),
        }
        pool: list[bytes] = []
        with atomic_open(path, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED) as zf:
            with zf.open("probs.npy", "w", force_zip64=True) as out:
                np.lib.format.write_array_header_1_0(out, header)
                for s in range(0, n, block):
                    if s < distinct:
                        part = base[s : min(s + block, distinct)]
                        if style == "network" and channels == 1:
                            probs = network_probs(part, sigma, rng)
                        else:
                            probs = noisy_probs(part, channels, sigma, rng)
                        pool.extend(p.astype("<f2").tobytes() for p in probs)
                    out.write(b"".join(pool[i % distinct] for i in range(s, min(s + block, n))))
            with zf.open("ids.npy", "w") as out:
                np.lib.format.write_array(out, ids)
        store.write_manifest(f"model{m:02d}", {"status": "complete", "splits": [SPLIT]})
        assert store.probs(f"model{m:02d}", SPLIT).shape == (n, channels, h, w)
    return store


def open_store(run_dir: Path) -> tuple[list[str], Any]:
    store = PredictionStore(run_dir)
    models = store.models()
    return models, store.open_split(models, SPLIT)


def spec_for(models: list[str]) -> EnsembleSpec:
    return EnsembleSpec(
        models, [1 / len(models)] * len(models), RULES, dict.fromkeys(RULES, 0.5), models[0]
    )


def evaluate_store(data: Any, models: list[str], chunk: int, distances: bool) -> Any:
    """The evaluator's full pass over the synthetic split, as `spineseg-ensemble` runs it."""
    return evaluate_arrays(
        SPLIT,
        [data.probs[m] for m in models],
        data.truth.masks,
        data.truth.ids,
        spec_for(models),
        data.truth.distance_spacing,
        chunk,
        distances,
    )


# ---------------------------------------------------------------------- measurements
@contextlib.contextmanager
def timer(bucket: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    bucket[key] += time.perf_counter() - start


def evict(run_dir: Path) -> bool:
    """Drop this store's files (only those) from the page cache, so the next read comes from
    disk: posix_fadvise(DONTNEED) needs no privileges and leaves other processes alone."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in run_dir.rglob("*.npz"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def read_all(run_dir: Path, chunk: int) -> float:
    """The spec's reference: every probability once, memmap + np.asarray per chunk. The
    store is opened afresh and its maps closed after, or the pages touched through them
    would stay mapped and could not be evicted for the next disk read."""
    models, data = open_store(run_dir)
    arrays = [data.probs[m] for m in models]
    t0 = time.perf_counter()
    for sl in iter_chunks(data.truth.n, chunk):
        for arr in arrays:
            np.asarray(arr[sl], dtype=np.float32)
    elapsed = time.perf_counter() - t0
    del arrays, data
    gc.collect()
    return elapsed


def time_reads(run_dir: Path, chunk: int, repeat: int) -> dict[str, float]:
    """Best-of-`repeat` read times from disk (page cache dropped for the store) and from the
    page cache, and of the evaluator's chunk reader (pread into reused buffers, float16 as
    stored, no prefetch thread)."""
    out: dict[str, float] = defaultdict(lambda: float("inf"))
    for _ in range(repeat):
        if evict(run_dir):
            out["read_disk_s"] = min(out["read_disk_s"], read_all(run_dir, chunk))
        out["read_cached_s"] = min(out["read_cached_s"], read_all(run_dir, chunk))
        models, data = open_store(run_dir)
        arrays = [data.probs[m] for m in models]
        t0 = time.perf_counter()
        for _ in iter_raw_chunks(arrays, chunk, prefetch=False):
            pass
        out["read_store_reader_cached_s"] = min(
            out["read_store_reader_cached_s"], time.perf_counter() - t0
        )
    return dict(out)


def time_evaluation(
    data: Any,
    models: list[str],
    chunk: int,
    distances: bool,
    repeat: int = 1,
    run_dir: Path | None = None,
) -> float:
    """Best of `repeat` evaluations; with `run_dir` the store is evicted before each."""
    best = float("inf")
    for _ in range(repeat):
        if run_dir is not None:
            evict(run_dir)
        t0 = time.perf_counter()
        frame = evaluate_store(data, models, chunk, distances)
        best = min(best, time.perf_counter() - t0)
        assert len(frame) == (len(RULES) + len(models) + 1) * data.truth.n
    return best


def profile(data: Any, models: list[str], chunk: int) -> dict[str, float]:
    """Where the time goes, and the agreement path against fusing every pixel (the dense path
    the evaluator keeps for vertebrae mode) on the same chunks, all methods, overlap metrics
    included; plus the fraction of pixels where the models' votes disagree."""
    arrays = [data.probs[m] for m in models]
    spec = spec_for(models)
    methods = scored_methods(spec)
    w = torch.tensor(spec.weights)
    t: dict[str, float] = defaultdict(float)
    split_px = total_px = 0
    with timer(t, "read_raw_chunks"):
        for _ in iter_raw_chunks(arrays, chunk, prefetch=False):
            pass
    for sl, raw in iter_raw_chunks(arrays, chunk):
        truth = read_rows(data.truth.masks, sl)
        keys = torch.from_numpy(raw).view(agreement.KEY_DTYPES[raw.dtype])
        keys = keys.reshape(len(models), len(truth), -1)
        with timer(t, "agreement_path"):  # the scorer takes it for float16 region chunks
            scoring.score_chunk(raw, truth, methods, w, models=models, split=SPLIT, ids=[])
        lo, hi = keys.amin(0), keys.amax(0)
        tk = agreement.threshold_key(0.5, raw.dtype)
        split_px += int(((lo <= tk) & (hi > tk)).sum())
        total_px += lo.numel()
        with timer(t, "dense_path"):
            probs = torch.from_numpy(raw).to(torch.float32)
            for m in methods:
                metrics.overlap_metrics(scoring.dense_labels(probs, m, w), truth, 2)
        with timer(t, "surface_metrics_one_method"):
            metrics.surface_metrics(voting.to_labels(rules.fuse("soft", probs)), truth, 2)
    out = {k: round(v, 3) for k, v in sorted(t.items())}
    out["dense_over_agreement"] = round(t["dense_path"] / t["agreement_path"], 1)
    out["disagreement_fraction"] = round(split_px / total_px, 4)
    return out


def compare_monai(data: Any, models: list[str], chunk: int) -> dict[str, Any]:
    """Soft / hard Dice and soft HD95 (pixels), ours vs MONAI on the same chunks."""
    from monai.metrics import DiceMetric, HausdorffDistanceMetric
    from monai.transforms import MeanEnsemble, VoteEnsemble

    if data.channels != 1:
        return {"skipped": "region mode (C=1) only"}
    arrays = [data.probs[m] for m in models]
    ours: dict[str, list[np.ndarray]] = defaultdict(list)
    theirs: dict[str, list[np.ndarray]] = defaultdict(list)
    t: dict[str, float] = defaultdict(float)
    mean_ens, vote_ens = MeanEnsemble(), VoteEnsemble(num_classes=None)
    dice_m = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
    hd_m = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")

    def onehot(labels: torch.Tensor) -> torch.Tensor:  # (n,H,W) {0,1} -> (n,2,H,W)
        fg = labels.float()[:, None]
        return torch.cat([1 - fg, fg], dim=1)

    methods = [scoring.Method(name, 0.5, rule=name) for name in ("soft", "hard")]
    for sl in iter_chunks(data.truth.n, chunk):
        probs = torch.from_numpy(load_chunk(arrays, models, SPLIT, data.truth.ids, sl))
        truth = torch.from_numpy(read_rows(data.truth.masks, sl).astype(np.int64))
        with timer(t, "ours_vote_dice"):  # the evaluator's scorer, on the same float32 chunk
            got = scoring.score_chunk(
                probs.numpy(), truth.numpy(), methods, None,
                models=models, split=SPLIT, ids=data.truth.ids[sl], want_labels=True,
            )  # fmt: skip
            for name in ("soft", "hard"):
                ours[f"{name}_dice"].append(got[name].overlap["dice"])
            soft = torch.from_numpy(got["soft"].labels.astype(np.uint8))
        with timer(t, "ours_hd95"):
            ours["soft_hd95"].append(metrics.surface_metrics(soft, truth, 2)["hd95"])
        with timer(t, "monai_vote_dice"):
            m_soft = (mean_ens(list(probs)) > 0.5).long()[:, 0]
            m_hard = vote_ens([(p > 0.5).float() for p in probs]).long()[:, 0]
            y = onehot(truth)
            theirs["soft_dice"].append(dice_m(onehot(m_soft), y)[:, 0].numpy())
            theirs["hard_dice"].append(dice_m(onehot(m_hard), y)[:, 0].numpy())
        with timer(t, "monai_hd95"):
            theirs["soft_hd95"].append(hd_m(onehot(m_soft), y)[:, 0].numpy())
    out: dict[str, Any] = {}
    for key in ours:
        a, b = np.concatenate(ours[key]).astype(float), np.concatenate(theirs[key]).astype(float)
        both = np.isfinite(a) & np.isfinite(b)
        out[f"{key}_max_abs_diff"] = (
            float(np.max(np.abs(a[both] - b[both]))) if both.any() else None
        )
        out[f"{key}_agree_1e-4"] = bool(both.any() and np.allclose(a[both], b[both], atol=1e-4))
        out[f"{key}_mean_ours"] = float(np.nanmean(a))
        out[f"{key}_mean_monai"] = float(np.nanmean(b))
    out.update({f"{k}_s": round(v, 3) for k, v in t.items()})
    out["vote_dice_time_ratio_ours_over_monai"] = t["ours_vote_dice"] / t["monai_vote_dice"]
    out["hd95_time_ratio_ours_over_monai"] = t["ours_hd95"] / t["monai_hd95"]
    return out


# ---------------------------------------------------------------------- RSS in a child
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def rss_child(run_dir: Path, chunk: int, distances: bool) -> None:
    """Runs in a fresh process: RSS after imports + opening, and the peak during evaluation.

    The peak is VmHWM of /proc/self/status, reset just before evaluating (clear_refs 5);
    ru_maxrss would not do: Linux carries the parent's RSS at fork into it."""
    models, data = open_store(run_dir)
    reset = True
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        reset = False
    before = _status_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    evaluate_store(data, models, chunk, distances)
    elapsed = time.perf_counter() - t0
    peak = _status_kib("VmHWM") * 1024
    print(
        json.dumps(
            {
                "rss_before_eval_bytes": before,
                "peak_rss_bytes": peak,
                "peak_reset_before_eval": reset,
                "eval_s": elapsed,
            }
        )
    )


def measure_rss(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    rows = []
    for n in [int(v) for v in args.rss_n.split(",") if v]:
        run_dir = work / f"rss_{n}"
        t0 = time.perf_counter()
        write_store(
            run_dir,
            args.models,
            n,
            args.rss_size,
            args.rss_size,
            args.channels,
            args.seed,
            style=args.style,
            distinct=args.rss_distinct,
        )
        written = time.perf_counter() - t0
        cmd = [
            sys.executable,
            __file__,
            "--rss-child",
            str(run_dir),
            "--chunk-size",
            str(args.chunk_size),
            "--threads",
            str(args.threads),
        ]
        if args.rss_distances:
            cmd.append("--rss-distances")
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        child = json.loads(proc.stdout.strip().splitlines()[-1])
        naive = args.models * n * args.channels * args.rss_size**2 * 4
        rows.append(
            {
                "K": args.models,
                "N": n,
                "HxW": f"{args.rss_size}x{args.rss_size}",
                "peak_rss_MiB": round(child["peak_rss_bytes"] / 2**20, 1),
                "rss_before_eval_MiB": round(child["rss_before_eval_bytes"] / 2**20, 1),
                "eval_added_MiB": round(
                    (child["peak_rss_bytes"] - child["rss_before_eval_bytes"]) / 2**20, 1
                ),
                "naive_stack_float32_MiB": round(naive / 2**20, 1),
                "store_GiB": round(
                    sum(p.stat().st_size for p in run_dir.rglob("*.npz")) / 2**30, 3
                ),
                "eval_s": round(child["eval_s"], 2),
                "write_s": round(written, 1),
            }
        )
        shutil.rmtree(run_dir)
    return rows


# ---------------------------------------------------------------------- report
def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
        ram = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:  # pragma: no cover
        physical, ram = None, None
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "physical_cores": physical,
        "ram_GiB": ram,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
    }


def markdown(result: dict[str, Any]) -> str:
    m, cfg, s = result["machine"], result["config"], result["speed"]
    lines = [
        f"### Ensemble benchmark: {m['cpu']}, {m['logical_cores']} logical cores "
        f"({m['physical_cores']} physical), torch threads {m['torch_threads']}",
        "",
        f"Store: K={cfg['models']} models x N={cfg['images']} images x "
        f"{cfg['height']}x{cfg['width']}, C={cfg['channels']}, chunk {cfg['chunk_size']}, "
        f"{cfg['style']} probabilities"
        + (
            f" (models disagree on {100 * result['profile']['disagreement_fraction']:.1f}% "
            "of the pixels)"
            if result.get("profile")
            else ""
        ),
        "",
        "| measurement | seconds | x disk read |",
        "|:--|--:|--:|",
    ]
    read = s.get("read_disk_s", s["read_cached_s"])
    for key in (
        "read_disk_s",
        "read_cached_s",
        "read_store_reader_cached_s",
        "eval_disk_s",
        "eval_cached_s",
        "distances_only_s",
        "eval_with_distances_cached_s",
    ):
        if key in s:
            lines.append(f"| {key.removesuffix('_s')} | {s[key]:.2f} | {s[key] / read:.2f} |")
    lines.append("")
    disk = s.get("eval_over_read_disk")
    lines.append(
        "Evaluation (no distances) / read (target <= 2): "
        + (f"both from disk {disk:.2f}, " if disk is not None else "")
        + f"both from the page cache {s['eval_over_read_cached']:.2f}."
    )
    if result.get("profile"):
        lines += ["", "| component | seconds |", "|:--|--:|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in result["profile"].items()]
    if result.get("rss"):
        lines += [
            "",
            "| K | N | HxW | peak RSS MiB | RSS before eval MiB | added by eval MiB "
            "| naive stack MiB | eval s |",
            "|--:|--:|:--|--:|--:|--:|--:|--:|",
        ]
        lines += [
            f"| {r['K']} | {r['N']} | {r['HxW']} | {r['peak_rss_MiB']} | "
            f"{r['rss_before_eval_MiB']} | {r['eval_added_MiB']} | "
            f"{r['naive_stack_float32_MiB']} | {r['eval_s']} |"
            for r in result["rss"]
        ]
    mon = result.get("monai") or {}
    if "soft_dice_agree_1e-4" in mon:
        lines += [
            "",
            "| vs MONAI | max abs diff | agree 1e-4 | ours s | MONAI s |",
            "|:--|--:|:--|--:|--:|",
        ]
        for key, tk in (
            ("soft_dice", "vote_dice"),
            ("hard_dice", "vote_dice"),
            ("soft_hd95", "hd95"),
        ):
            lines.append(
                f"| {key} | {mon[f'{key}_max_abs_diff']} | {mon[f'{key}_agree_1e-4']} "
                f"| {mon[f'ours_{tk}_s']} | {mon[f'monai_{tk}_s']} |"
            )
        lines.append(
            f"\nours/MONAI time: voting+Dice "
            f"{mon['vote_dice_time_ratio_ours_over_monai']:.2f}, HD95 "
            f"{mon['hd95_time_ratio_ours_over_monai']:.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", type=int, default=10, help="K")
    p.add_argument("--images", type=int, default=64, help="N of the speed/MONAI runs")
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--channels", type=int, default=1, choices=(1, 5))
    p.add_argument(
        "--style",
        default="network",
        choices=("network", "noisy"),
        help="synthetic probabilities: network-like (default) or the noisy worst case",
    )
    p.add_argument("--chunk-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=3, help="timings are the best of this many")
    p.add_argument("--no-distances", action="store_true", help="skip timing HD95/ASSD")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--no-monai", action="store_true")
    p.add_argument("--rss-n", default="32,64,128", help="N values of the RSS runs ('' skips)")
    p.add_argument("--rss-size", type=int, default=256, help="H = W of the RSS runs")
    p.add_argument("--rss-distances", action="store_true", help="RSS runs with HD95/ASSD")
    p.add_argument(
        "--rss-distinct",
        type=int,
        default=64,
        help="distinct images in the RSS stores (repeated up to N; generating is the slow part)",
    )
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    p.add_argument("--keep", action="store_true", help="keep the synthetic stores")
    p.add_argument("--out", type=Path, default=Path("bench_ensemble.json"))
    p.add_argument("--rss-child", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child(args.rss_child, args.chunk_size, args.rss_distances)
        return 0

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_ensemble_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        write_store(
            work / "speed",
            args.models,
            args.images,
            args.height,
            args.width,
            args.channels,
            args.seed,
            style=args.style,
        )
        write_s = time.perf_counter() - t0
        models, data = open_store(work / "speed")
        speed: dict[str, float] = {
            "write_store_s": write_s,
            **time_reads(work / "speed", args.chunk_size, args.repeat),
        }
        r, c = args.repeat, args.chunk_size
        if "read_disk_s" in speed:
            speed["eval_disk_s"] = time_evaluation(data, models, c, False, r, work / "speed")
            speed["eval_over_read_disk"] = speed["eval_disk_s"] / speed["read_disk_s"]
        speed["eval_cached_s"] = time_evaluation(data, models, c, False, r)
        speed["eval_over_read_cached"] = speed["eval_cached_s"] / speed["read_cached_s"]
        if not args.no_distances:
            speed["eval_with_distances_cached_s"] = time_evaluation(data, models, c, True, r)
            speed["distances_only_s"] = (
                speed["eval_with_distances_cached_s"] - speed["eval_cached_s"]
            )
        result: dict[str, Any] = {
            "machine": machine(),
            "config": {
                k: (str(v) if isinstance(v, Path) else v)
                for k, v in vars(args).items()
                if k != "rss_child"
            },
            "speed": {k: round(v, 4) for k, v in speed.items()},
            "profile": None if args.no_profile else profile(data, models, args.chunk_size),
            "monai": None if args.no_monai else compare_monai(data, models, args.chunk_size),
            "rss": measure_rss(args, work),
        }
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    text = markdown(result)
    print(text)
    result["markdown"] = text
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
