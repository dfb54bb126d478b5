"""`EnsembleCallback`: an in-process ensemble of every model tested with one instance.

Useful in notebooks and single-process studies, where models are tested one after another
by `trainer.test`: after each, the rules are re-scored over all models collected so far with
the evaluator's in-memory path. It sees no validation split, so weights come from each
model's `val/dice` at test time (equal if unknown) and nothing is selected; the study's
numbers come from `run_ensemble` on the prediction store.

Contract with the LightningModule: `test_step` returns `{"probs": (B,C,H,W) in [0,1],
"target": (B,H,W) long, "ids": list[str]}`, `pl_module.model_name` names the model, and
dataloader 0 is the test split, 1 the external one.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch

from spineseg.ensemble.evaluate import (
    DEFAULTS,
    EnsembleSpec,
    evaluate_arrays,
    summarize_results,
)
from spineseg.names import EXTERNAL, MODEL_PREFIX, TEST

log = logging.getLogger(__name__)

SPLIT_OF_LOADER = {0: TEST, 1: EXTERNAL}


class EnsembleCallback(L.Callback):
    """Collects test predictions per model and split; scores every rule on `on_test_end`."""

    def __init__(
        self,
        rules: Sequence[str] | None = None,
        threshold: float | None = None,
        chunk_size: int | None = None,
        distances: bool | None = None,
        n_boot: int | None = None,
        seed: int | None = None,
        verbose: bool = True,
    ) -> None:
        """Unset options are the ensemble's defaults (`conf/ensemble/default.yaml`, which
        `conf/callbacks/ensemble.yaml` passes through), so the two paths agree."""
        super().__init__()
        self.rules = list(rules or DEFAULTS["rules"])
        self.threshold = DEFAULTS["threshold"] if threshold is None else threshold
        self.chunk_size = DEFAULTS["chunk_size"] if chunk_size is None else chunk_size
        self.distances = DEFAULTS["distances"] if distances is None else distances
        self.n_boot = DEFAULTS["n_boot"] if n_boot is None else n_boot
        self.seed = DEFAULTS["seed"] if seed is None else seed
        self.verbose = verbose
        self._preds: dict[str, dict[str, dict[str, list[Any]]]] = {}
        self.val_scores: dict[str, float] = {}
        self.results: pd.DataFrame | None = None
        self.per_image: pd.DataFrame | None = None

    @property
    def models(self) -> list[str]:
        return list(self._preds)

    # ------------------------------------------------------------------ collection
    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        name = _model_name(pl_module)
        self._preds[name] = {}  # testing a model again replaces its predictions
        score = trainer.callback_metrics.get("val/dice")
        self.val_scores[name] = math.nan if score is None else float(score)

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not isinstance(outputs, dict) or "probs" not in outputs:
            return
        split = SPLIT_OF_LOADER.get(dataloader_idx, f"loader{dataloader_idx}")
        buf = self._preds.setdefault(_model_name(pl_module), {}).setdefault(
            split, {"probs": [], "target": [], "ids": []}
        )
        probs = outputs["probs"].detach().float().clamp(0, 1).to(torch.float16).cpu().numpy()
        buf["probs"].append(probs)
        buf["target"].append(outputs["target"].detach().cpu().numpy().astype(np.uint8))
        buf["ids"].extend(str(i) for i in outputs["ids"])

    # ------------------------------------------------------------------ scoring
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._preds:
            return
        self.results = self.compute()
        if self.results is None or self.results.empty:
            return
        if trainer.logger is not None:
            trainer.logger.log_metrics(self.flat_metrics(), step=trainer.global_step)
        if self.verbose and trainer.is_global_zero:
            from spineseg.report.tables import console_table

            print(console_table(self.results))

    def flat_metrics(self) -> dict[str, float]:
        """`ensemble/<split>/<method>/<metric>` of the rules and best_single, for a logger."""
        out: dict[str, float] = {}
        if self.results is None:
            return out
        for row in self.results.to_dict(orient="records"):
            if row["method"].startswith(MODEL_PREFIX):
                continue
            for key in ("dice_mean", "iou_mean", "hd95_mean", "assd_mean"):
                value = float(row[key])
                if math.isfinite(value):
                    out[f"ensemble/{row['split']}/{row['method']}/{key.removesuffix('_mean')}"] = (
                        value
                    )
        return out

    def compute(self) -> pd.DataFrame:
        """Rules, models and best_single on every split collected so far."""
        frames, specs = [], []
        for split in dict.fromkeys(s for per in self._preds.values() for s in per):
            arrays, masks, ids, models = self._aligned(split)
            if not models:
                continue
            spec = self._spec(models)
            specs.append(spec)
            frames.append(
                evaluate_arrays(
                    split, arrays, masks, ids, spec, None, self.chunk_size, self.distances
                )
            )
        if not frames:
            return pd.DataFrame()
        self.per_image = pd.concat(frames, ignore_index=True)
        parts = [
            summarize_results(frame, spec, self.n_boot, self.seed)
            for frame, spec in zip(frames, specs, strict=True)
        ]
        return pd.concat(parts, ignore_index=True)

    def _spec(self, models: list[str]) -> EnsembleSpec:
        scores = np.array([self.val_scores.get(m, math.nan) for m in models])
        if np.isfinite(scores).all() and (scores > 0).all():
            weights = scores / scores.sum()
            best = models[int(np.argmax(scores))]
        else:
            weights = np.full(len(models), 1 / len(models))
            best = models[0]
        return EnsembleSpec(
            models,
            weights.tolist(),
            self.rules,
            dict.fromkeys(self.rules, self.threshold),
            best,
            self.threshold,
        )

    def _aligned(self, split: str) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, list[str]]:
        """Every model's predictions in the first model's image order; a model that saw a
        different set of images is left out of this split with a warning."""
        have = [m for m in self._preds if split in self._preds[m]]
        if not have:
            return [], np.empty(0), np.empty(0), []
        ref = self._preds[have[0]][split]
        ids = np.asarray(ref["ids"])
        masks = np.concatenate(ref["target"])
        where = {i: k for k, i in enumerate(ids.tolist())}
        arrays, models = [], []
        for model in have:
            buf = self._preds[model][split]
            if sorted(buf["ids"]) != sorted(where) or len(buf["ids"]) != len(ids):
                warnings.warn(
                    f"EnsembleCallback: model {model!r} saw other {split!r} images "
                    f"than {have[0]!r}; left out of the {split} ensemble",
                    stacklevel=2,
                )
                continue
            order = np.argsort([where[i] for i in buf["ids"]])
            arrays.append(np.concatenate(buf["probs"])[order])
            models.append(model)
        return arrays, masks, ids, models


def _model_name(pl_module: L.LightningModule) -> str:
    name = getattr(pl_module, "model_name", None)
    return str(name) if name else type(pl_module).__name__
