"""`spineseg-export run_dir=<dir> output=<file.onnx> [rule=soft] [check=true]`: the selected
ensemble as one ONNX graph, then (check=true) onnxruntime against PyTorch on the run's
stored test films, with the largest probability difference and the labels that differ."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from spineseg.cli.common import flag, hydra_app
from spineseg.config import APPS_DIR
from spineseg.errors import StoreError

USAGE = "usage: spineseg-export run_dir=<dir> output=<file.onnx> [rule=soft] [check=true]"
#: onnxruntime against PyTorch: the largest |difference| of fused probabilities accepted.
TOLERANCE = 1e-4


def compare(run_dir: Path, onnx_path: Path, rule: str, split: str = "test") -> dict[str, float]:
    """PyTorch and onnxruntime on the stored films of `split` (the working-resolution
    films the store keeps for overlays): max |Δp| and the share of labels that differ,
    and of those, how many sit within TOLERANCE of the decision threshold."""

    from spineseg.data import transforms as T
    from spineseg.ensemble import voting
    from spineseg.ensemble.store import PredictionStore
    from spineseg.onnx_export import OnnxEnsemble
    from spineseg.predict import load_ensemble

    truth = PredictionStore(run_dir).truth(split)
    if truth.images is None:
        raise StoreError(f"{run_dir}: the {split!r} truth keeps no films to compare on")
    ref, onx = load_ensemble(run_dir, rule=rule), OnnxEnsemble(onnx_path, run_dir)
    worst, differ, near, pixels = 0.0, 0, 0, 0
    t = ref.decision_threshold
    for start in range(0, truth.n, 8):
        x = T.to_tensor(np.array(truth.images[start : start + 8]))[:, None]
        a, b = ref.fused(x)[0], onx.fused(x)[0]
        worst = max(worst, float((a - b).abs().max()))
        la, lb = voting.to_labels(a, t), voting.to_labels(b, t)
        odd = la != lb
        differ += int(odd.sum())
        if a.shape[1] == 1:
            near += int((odd & ((a[:, 0] - t).abs() <= TOLERANCE)).sum())
        pixels += la.numel()
    return {"films": truth.n, "max_abs_diff": worst, "labels_differ": differ,
            "differ_at_threshold": near, "pixels": pixels}  # fmt: skip


def _export(cfg: DictConfig) -> None:
    from spineseg.onnx_export import export

    run_dir, rule = Path(str(cfg.run_dir)), str(cfg.rule)
    check = flag(cfg, "check")
    out = export(run_dir, str(cfg.output), rule=rule)
    print(f"exported the {rule} ensemble of {run_dir} -> {out}")
    if check:
        c = compare(run_dir, out, rule)
        print(
            f"onnxruntime vs PyTorch on {c['films']} stored test films: max |dp| = "
            f"{c['max_abs_diff']:.2e} (tolerance {TOLERANCE:g}); labels differ on "
            f"{c['labels_differ']} of {c['pixels']} pixels"
        )
        if c["max_abs_diff"] > TOLERANCE:
            raise StoreError(f"{out}: onnxruntime differs from PyTorch by {c['max_abs_diff']:.2e}")


main = hydra_app("export", _export, USAGE, APPS_DIR)


if __name__ == "__main__":
    sys.exit(main())
