"""`SegmentationModule`: one pretrained encoder-decoder, its loss, optimiser and metrics.

It knows nothing of ensembles: test and predict steps return probabilities that the
ensemble callback and the prediction store consume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torchmetrics import MetricCollection

from spineseg.config import instantiate_node
from spineseg.ensemble import tta as TTA
from spineseg.labels import check_target
from spineseg.models import levels as LV
from spineseg.models.factory import build_model
from spineseg.models.losses import SegmentationLoss
from spineseg.models.scores import OverlapScore
from spineseg.names import CHANNELS, STORED_TARGET, TARGET_VALUES


def probabilities(logits: torch.Tensor, target: str, encoding: str = "classes") -> torch.Tensor:
    """What is stored and voted on: sigmoid for the one-channel region, softmax over the 5
    vertebra classes, and for `levels` the region derived from the levels (`models.levels`),
    so that the store, voting and predict see a region model."""
    if target == "region":
        return torch.sigmoid(logits)
    if target == "levels":
        return LV.region_probabilities(logits, encoding)
    return torch.softmax(logits, dim=1)


def metric_truth(mask: torch.Tensor, target: str) -> torch.Tensor:
    """The labels a target's metrics compare with: the derived region for `levels`."""
    if target != "levels":
        return mask
    lo, hi = int(TARGET_VALUES[0]), int(TARGET_VALUES[-1])
    return ((mask >= lo) & (mask <= hi)).long()


def to_index(probs: torch.Tensor, target: str, threshold: float = 0.5) -> torch.Tensor:
    """Probabilities -> label index (B,H,W).

    torchmetrics 1.9 collapses single-channel float predictions to one class, so region
    predictions are thresholded into {0,1} indices before any metric sees them.
    """
    if probs.shape[1] == 1:
        return (probs[:, 0] > threshold).long()
    return probs.argmax(dim=1)


def make_metrics(target: str) -> MetricCollection:
    """Dice and IoU of what is stored (the region for region and levels, else the 4
    vertebrae), computed as the ensemble's evaluation computes them."""
    num_classes = max(2, CHANNELS[STORED_TARGET[target]])
    return MetricCollection({key: OverlapScore(key, num_classes) for key in ("dice", "iou")})


def _module_defaults() -> dict[str, Any]:
    """conf/module/default.yaml's plain values (its interpolations name the model preset)."""
    from spineseg import config

    raw = config.group("module/default")
    return {k: v for k, v in raw.items() if k != "_target_" and "${" not in str(v)}


class SegmentationModule(L.LightningModule):
    """Wraps `build_model(arch, encoder, weights)`; hyper-parameters are plain data so a
    checkpoint loads with `weights_only=True`."""

    def __init__(
        self,
        *,
        arch: str,
        encoder: str,
        weights: str | None,
        target: str,
        name: str | None,
        arch_kwargs: dict | None,
        optimizer: dict,
        scheduler: dict | None,
        dice_weight: float,
        ce_weight: float,
        threshold: float,
        channels_last: bool | str,
        levels_encoding: str,
        in_channels: int = 1,
    ) -> None:
        """Every option but `in_channels` is a key of conf/module/default.yaml (and the
        model preset), where its default is: `spineseg.config.build("module", [...])`
        builds one as a training run would."""
        super().__init__()
        check_target(target)
        LV.check_encoding(levels_encoding)
        self.save_hyperparameters()
        self.model_name = name or f"{arch}-{encoder}"
        self.target = target
        self.net = build_model(
            arch, encoder, weights, in_channels, self.channels, **(arch_kwargs or {})
        )
        self.loss: torch.nn.Module = (
            LV.LevelsLoss(levels_encoding, dice_weight, ce_weight)
            if target == "levels"
            else SegmentationLoss(target, dice_weight, ce_weight)
        )
        metrics = make_metrics(target)
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = torch.nn.ModuleList(
            [metrics.clone(prefix="test/"), metrics.clone(prefix="external/")]
        )
        self._channels_last = False
        self.tta = "none"  # what predict_step applies (spineseg.ensemble.tta); not a weight

    # ------------------------------------------------------------------ core
    @property
    def channels(self) -> int:
        """Network outputs: the target's channels, or the levels encoding's."""
        if self.target == "levels":
            return LV.channels(self.hparams.levels_encoding)
        return CHANNELS[self.target]

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits -> the stored probabilities (float32), for this model's target."""
        return probabilities(logits.float(), self.target, self.hparams.levels_encoding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def setup(self, stage: str) -> None:
        wanted = self.hparams.channels_last
        self._channels_last = bool(
            wanted is True or (wanted == "auto" and self.device.type == "cuda")
        )
        if self._channels_last:
            self.net.to(memory_format=torch.channels_last)

    def _shared(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(batch["image"])
        return logits, self.loss(logits, batch["mask"])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        _, loss = self._shared(batch)
        self.log(
            "train/loss",
            loss,
            on_step=False,
            on_epoch=True,
            prog_bar=True,
            batch_size=batch["image"].shape[0],
            sync_dist=True,  # the mean over every process under DDP; a no-op on one
        )
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits, loss = self._shared(batch)
        pred = to_index(self.probabilities(logits), self.target, self.hparams.threshold)
        self.val_metrics.update(pred, metric_truth(batch["mask"], self.target))
        self.log(
            "val/loss",
            loss,
            on_epoch=True,
            prog_bar=False,
            batch_size=batch["image"].shape[0],
            sync_dist=True,
        )

    def on_validation_epoch_end(self) -> None:
        # torchmetrics has already reduced the states over every process
        self.log_dict(self.val_metrics.compute(), prog_bar=True, sync_dist=False)
        self.val_metrics.reset()

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        probs = self.probabilities(self(batch["image"]))
        metrics = self.test_metrics[min(dataloader_idx, 1)]
        truth = metric_truth(batch["mask"], self.target)
        metrics.update(to_index(probs, self.target, self.hparams.threshold), truth)
        return {"probs": probs, "target": truth, "ids": list(batch["id"])}

    def on_test_epoch_end(self) -> None:
        for metrics in self.test_metrics:
            if any(m.update_called for m in metrics.values()):  # no external set: skip
                values = {k: v for k, v in metrics.compute().items() if torch.isfinite(v).all()}
                self.log_dict(values, add_dataloader_idx=False)
            metrics.reset()

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        probs = TTA.apply(lambda x: self.probabilities(self(x)), batch["image"], self.tta)
        return {"probs": probs.to(torch.float16).cpu(), "ids": list(batch["id"])}

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        opt_cfg = dict(self.hparams.optimizer)
        optimizer = instantiate_node(opt_cfg, "module.optimizer", params=self.parameters())
        sched_cfg = self.hparams.scheduler
        if not sched_cfg:
            return optimizer
        sched_cfg = dict(sched_cfg)
        interval = sched_cfg.pop("interval", "epoch")
        scheduler = instantiate_node(sched_cfg, "module.scheduler", optimizer=optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": interval},
        }

    # ------------------------------------------------------------------ safe reload
    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str = "cpu") -> SegmentationModule:
        """Rebuild from a checkpoint without fetching any encoder weights.

        `weights_only=True` refuses pickled code, so a checkpoint from elsewhere cannot run
        anything; the encoder is built with weights=None and filled from the state dict.
        """
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
        hparams = dict(ckpt.get("hyper_parameters", {}))
        hparams["weights"] = None
        # An option added since the checkpoint was written takes its config default (what
        # that checkpoint's training did before the option existed).
        for key, value in _module_defaults().items():
            hparams.setdefault(key, value)
        module = cls(**hparams)
        module.load_state_dict(ckpt["state_dict"])
        return module.eval()
