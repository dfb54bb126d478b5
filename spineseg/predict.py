"""Apply a run's selected ensemble to new films.

The ensemble is what `spineseg-ensemble` chose on validation (`<run_dir>/ensemble/
selection.json`): its models are rebuilt from their checkpoints (weights_only, nothing is
downloaded) and every film goes through exactly the training pipeline (to_uint8 -> working
resolution -> preprocessing -> normalisation), so the models see what they were trained on.
Rules fuse at working resolution, as they were evaluated; results are mapped back onto the
original film.
"""

from __future__ import annotations

import copy
import json
import pickle
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from spineseg.checks import require_cuda
from spineseg.data import geometry as G
from spineseg.data.cascade import Box, CropSpec, predicted_crop
from spineseg.ensemble import rules, voting
from spineseg.ensemble import tta as TTA
from spineseg.ensemble.calibration import scaled
from spineseg.ensemble.quality import Limits
from spineseg.errors import ConfigError, DataError, StoreError, choices_message
from spineseg.names import CALIBRATION, PREDICTIONS_DIR, QUALITY, SELECTION, STORED_TARGET
from spineseg.utils.paths import not_a_run, rebased

if TYPE_CHECKING:  # Lightning takes ~10 s to import: only once the run dir checks out
    from spineseg.models.module import SegmentationModule

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Pipeline:
    """The data settings a model was trained with; ensemble members share all but the
    preprocessing (`shared`)."""

    target: str
    image_size: tuple[int, int]
    resize: str
    preprocess: str
    crop: CropSpec | None = None  # the cascade's stage 2: films are cropped by stage 1 first

    def shared(self) -> Pipeline:
        """What every member of one ensemble must share: the grid they vote on and what they
        deliver. Members may differ in preprocessing, and a `levels` member delivers the
        region like a `region` one."""
        return replace(self, target=STORED_TARGET[self.target], preprocess="")

    @classmethod
    def from_config(cls, config: dict[str, Any], where: Path) -> Pipeline:
        data = config.get("data") if isinstance(config, dict) else None
        if not isinstance(data, dict):
            raise StoreError(f"{where}: manifest has no config.data (image_size, resize, ...)")
        try:
            return cls(
                str(data.get("target", "region")),
                G.check_size(data["image_size"]),
                str(data.get("resize", "stretch")),
                str(data.get("preprocess", "none")),
                CropSpec.from_config(data.get("crop")),
            )
        except KeyError as err:
            raise StoreError(f"{where}: config.data lacks {err.args[0]!r}") from None


@dataclass
class Prediction:
    """One film's result, at the film's original resolution."""

    probability: np.ndarray  # float32 HxW: P(region) or the top foreground class, calibrated
    labels: np.ndarray  # uint8 HxW: region 0/1, vertebrae 0..4
    uncertainty: np.ndarray  # float32 HxW: model disagreement in [0, 1]
    box: Box | None = None  # a cascade's crop: outside it everything is 0
    notes: tuple[str, ...] = ()  # what the quality flag should say (stage 1 found nothing)

    @property
    def shape(self) -> tuple[int, int]:
        return self.labels.shape[0], self.labels.shape[1]


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA without one is a config error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.split(":")[0] not in DEVICES[1:]:
        raise ConfigError(choices_message("device", device, list(DEVICES)))
    if device.startswith("cuda"):
        require_cuda(f"device={device}", "use device=cpu")
    return torch.device(device)


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A run's JSON file (`what` names it in the error) as a dict, or one StoreError line."""
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise StoreError(f"{path}: cannot read {what} ({err.strerror or err})") from None
    except ValueError as err:
        raise StoreError(f"{path}: unreadable {what} ({err})") from None
    if not isinstance(data, dict):
        raise StoreError(f"{path}: {what} is not a JSON object")
    return data


def _checkpoint_path(
    value: Any, run_dir: Path, manifest: Path, recorded_run_dir: str | None = None
) -> Path:
    """As written by training (absolute), taken inside the run directory where it is now (a
    run moved or copied keeps working); a relative path is tried under run_dir, then cwd."""
    if not value:
        raise StoreError(f"{manifest}: no checkpoint recorded for this model")
    path = Path(str(value))
    candidates = [rebased(path, recorded_run_dir, run_dir)]
    candidates += [path] if path.is_absolute() else [run_dir / path, path]
    for cand in candidates:
        if cand.is_file():
            return cand
    raise StoreError(f"{manifest}: checkpoint {path} does not exist")


def _load_module(path: Path, device: torch.device) -> SegmentationModule:
    from spineseg.models.module import SegmentationModule

    try:
        module = SegmentationModule.from_checkpoint(path, map_location="cpu")
    except pickle.UnpicklingError:
        raise StoreError(
            f"{path}: not a plain checkpoint: it holds pickled objects, which are never run "
            "(torch.load weights_only=True); use the checkpoint spineseg-train wrote"
        ) from None
    except (OSError, RuntimeError, KeyError, TypeError, ValueError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise StoreError(f"{path}: cannot load checkpoint ({msg})") from None
    return module.to(device).eval()


class Ensemble:
    """The selected models plus the voting rule and its validation-chosen threshold."""

    def __init__(
        self,
        models: Sequence[SegmentationModule],
        names: Sequence[str],
        pipeline: Pipeline,
        rule: str = "soft",
        weights: Sequence[float] | None = None,
        threshold: float = 0.5,
        device: torch.device | str = "cpu",
        postprocess: str = "none",
        preprocess: Sequence[str] | None = None,
    ) -> None:
        from spineseg.ensemble.postprocess import check_names

        check_names([postprocess])
        rules.get(rule)
        if not models:
            raise StoreError("the ensemble has no models")
        self.models = list(models)
        self.names = list(names)
        self.pipeline = pipeline
        self.rule = rule
        self.weights = None if weights is None else torch.tensor(list(weights), dtype=torch.float32)
        self.threshold = float(threshold)
        self.device = torch.device(device)
        self.postprocess = postprocess
        self.limits: Limits | None = None  # quality flags' normal ranges, from validation
        self.temperature: float | None = None  # the rule's, fitted on validation
        self.tta = "none"  # the test-time augmentation validation chose (selection.json)
        self.stage1: Ensemble | None = None  # a cascade's stage 1 (data.crop.stage1)
        # Each member's preprocessing (a sweep over data.preprocess gives several): the
        # distinct ones are the input's channels, and member k reads channel `inputs[k]`.
        own = list(preprocess) if preprocess is not None else [pipeline.preprocess] * len(models)
        if len(own) != len(self.models):
            raise StoreError(f"{len(own)} preprocessing names for {len(self.models)} models")
        self.variants = list(dict.fromkeys(own))
        self.inputs = [self.variants.index(v) for v in own]

    @property
    def target(self) -> str:
        """What the ensemble delivers: `levels` members deliver the Th8..Th11 region."""
        return STORED_TARGET[self.pipeline.target]

    @property
    def decision_threshold(self) -> float:
        """Vote-fraction / posterior rules decide at 0.5; `threshold` binarised each model."""
        return rules.get(self.rule).decision_threshold(self.threshold)

    def to_input(self, image: np.ndarray) -> tuple[torch.Tensor, G.Geometry]:
        """Film -> normalised (P, H, W) working tensor, exactly as `prepare` + `FilmDataset`,
        one channel per preprocessing the members use (P = 1 but for a preprocessing sweep)."""
        from spineseg.data import transforms as T
        from spineseg.data.datamodule import working_film

        image = np.asarray(image)
        if image.ndim != 2 or image.dtype not in (np.uint8, np.uint16):
            raise DataError(
                None,
                f"expected a HxW uint8/uint16 film, got {image.dtype} with shape {image.shape}",
            )
        p = self.pipeline
        channels = []
        for variant in self.variants:
            img, _, geom = working_film(image, None, p.image_size, p.resize, variant)
            channels.append(T.to_tensor(img))
        return torch.stack(channels), geom

    def model_probs(self, x: torch.Tensor) -> torch.Tensor:
        """(N, P, H, W) inputs (`to_input`'s channels) -> every model's probabilities
        (K, N, C, H, W) on the CPU."""
        x = x.to(self.device)
        with torch.inference_mode():
            out = [
                TTA.apply(lambda z, m=m: m.probabilities(m(z)), x[:, j : j + 1], self.tta)
                for m, j in zip(self.models, self.inputs, strict=True)
            ]
            return torch.stack(out).cpu()

    def fused(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 1, H, W) inputs -> the rule's scores (N, C, H, W) and the disagreement
        (N, H, W); the ONNX engine computes the same in one graph."""
        probs = self.model_probs(x)
        scores = rules.fuse(self.rule, probs, weights=self.weights, threshold=self.threshold)
        return scores, voting.disagreement(probs, self.threshold)

    def predict_batch(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        """Films of any sizes share the working resolution, so they run as one batch. A
        cascade's stage 2 first crops each film where its stage 1 finds the region."""
        if not images:
            return []
        if self.stage1 is not None:
            return self._cascade(images)
        inputs = [self.to_input(im) for im in images]
        scores, spread = self.fused(torch.stack([x for x, _ in inputs]))
        return [
            self._to_original(scores[i].numpy(), spread[i].numpy(), g)
            for i, (_, g) in enumerate(inputs)
        ]

    def predict(self, image: np.ndarray) -> Prediction:
        return self.predict_batch([image])[0]

    def _cascade(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        crops = [
            predicted_crop(p.labels, self.pipeline.crop) for p in self.stage1.predict_batch(images)
        ]
        plain = self._without_stage1()
        own = plain.predict_batch([c.box.crop(im) for c, im in zip(crops, images, strict=True)])
        out = []
        for c, im, p in zip(crops, images, own, strict=True):
            shape = im.shape[:2]
            notes = (
                ("stage 1 found no region: the whole film was used",) if c.source == "whole" else ()
            )
            out.append(
                Prediction(
                    c.box.paste(p.probability, shape),
                    c.box.paste(p.labels, shape),
                    c.box.paste(p.uncertainty, shape),
                    c.box,
                    notes,
                )
            )
        return out

    def member(self, name: str, threshold: float = 0.5) -> Ensemble:
        """One selected model alone, as the results score `best_single`: its own probability
        at the models' `threshold`, uncalibrated, no post-processing; the same input channel,
        test-time augmentation and (in a cascade) stage 1 as the ensemble."""
        if name not in self.names:
            raise ConfigError(choices_message("member", name, self.names))
        k = self.names.index(name)
        one = Ensemble(
            [self.models[k]],
            [name],
            self.pipeline,
            rule="soft",
            threshold=threshold,
            device=self.device,
            preprocess=[self.variants[self.inputs[k]]],
        )
        one.tta, one.stage1 = self.tta, self.stage1
        return one

    def _without_stage1(self) -> Ensemble:
        """This ensemble as a plain one (its own models on whatever films it is given)."""
        plain = copy.copy(self)
        plain.stage1 = None
        return plain

    def _to_original(self, scores: np.ndarray, spread: np.ndarray, g: G.Geometry) -> Prediction:
        """Scores are mapped back (bilinear) before deciding, so the labels are exactly the
        decision rule applied to the returned probability map (then post-processed)."""
        from spineseg.ensemble.postprocess import apply

        full = G.to_original(np.ascontiguousarray(scores, dtype=np.float32), g)
        full = full.reshape(-1, g.orig_h, g.orig_w)
        if full.shape[0] == 1:
            labels = (full[0] > self.decision_threshold).astype(np.uint8)
        else:
            labels = voting.to_labels(torch.from_numpy(full[None])).numpy()[0]
        if self.temperature is not None:  # calibrated on validation; the decision stays
            full = scaled(torch.from_numpy(full[None]), self.temperature).numpy()[0]
        probability = full[0] if full.shape[0] == 1 else full[1:].max(axis=0)
        labels = apply(self.postprocess, labels)
        uncertainty = G.to_original(np.ascontiguousarray(spread, dtype=np.float32), g)
        return Prediction(
            np.clip(probability, 0.0, 1.0).astype(np.float32),
            labels.astype(np.uint8),
            np.clip(uncertainty, 0.0, 1.0).astype(np.float32).reshape(g.orig_h, g.orig_w),
        )


def load_ensemble(
    run_dir: str | Path, rule: str = "soft", device: str = "cpu", postprocess: str | None = None
) -> Ensemble:
    """The ensemble `spineseg-ensemble` selected in `run_dir`, ready to predict.

    postprocess: None uses what validation chose for `rule` (`selection.json`), else a name
    from `spineseg.ensemble.postprocess.POSTPROCESS`."""
    run_dir = Path(run_dir)
    rules.get(rule)
    problem = not_a_run(run_dir)
    if problem:
        raise StoreError(problem)
    sel_path = run_dir / SELECTION
    if not sel_path.is_file():
        raise StoreError(
            f"{sel_path} does not exist: run `spineseg-ensemble run_dir={run_dir}` first"
        )
    selection = read_json_object(sel_path, "selection")
    names = selection.get("models")
    if not isinstance(names, list) or not names:
        raise StoreError(f"{sel_path}: no selected models")
    raw_w = selection.get("weights") or {}
    thresholds = selection.get("thresholds") or {}
    if postprocess is None:
        postprocess = str((selection.get("postprocess") or {}).get(rule, "none"))
    try:
        weights = [float(raw_w[m]) for m in names] if isinstance(raw_w, dict) else None
    except (KeyError, TypeError, ValueError):
        raise StoreError(f"{sel_path}: weights do not name every selected model") from None
    dev = resolve_device(device)
    pipelines: list[Pipeline] = []
    checkpoints = []
    recorded_run_dir = None
    for name in names:
        man_path = run_dir / PREDICTIONS_DIR / str(name) / "manifest.json"
        if not man_path.is_file():
            raise StoreError(f"{man_path} does not exist: selected model {name!r} has no manifest")
        manifest = read_json_object(man_path, "manifest")
        if manifest.get("status") != "complete":
            raise StoreError(f"{man_path}: model {name!r} is {manifest.get('status')!r}")
        pipelines.append(Pipeline.from_config(manifest.get("config") or {}, man_path))
        recorded_run_dir = manifest["config"].get("run_dir")
        checkpoints.append(
            _checkpoint_path(manifest.get("checkpoint"), run_dir, man_path, recorded_run_dir)
        )
    first = pipelines[0]
    for name, other in zip(names, pipelines, strict=True):
        if other.shared() != first.shared():
            a, b = asdict(first.shared()), asdict(other.shared())
            key = next(k for k in a if a[k] != b[k])
            raise StoreError(
                f"{sel_path}: selected models {names[0]!r} and {name!r} were trained with "
                f"different data.{key} ({a[key]} vs {b[key]}): they cannot vote on one grid"
            )
    pipeline = first
    modules = [_load_module(ckpt, dev) for ckpt in checkpoints]
    if any(m.target != p.target for m, p in zip(modules, pipelines, strict=True)):
        raise StoreError(f"{sel_path}: a checkpoint's target differs from its config's")
    ens = Ensemble(
        modules,
        names,
        pipeline,
        rule=rule,
        weights=weights,
        threshold=float(thresholds.get(rule, 0.5)),
        device=dev,
        postprocess=postprocess,
        preprocess=[p.preprocess for p in pipelines],
    )
    ens.tta = TTA.check(str(selection.get("tta", "none")))
    if pipeline.crop is not None:  # a cascade: stage 1 finds where to look
        from spineseg.data.cascade import stage1_ensemble, within_run

        ens.pipeline = replace(pipeline, crop=within_run(pipeline.crop, recorded_run_dir, run_dir))
        ens.stage1 = stage1_ensemble(ens.pipeline.crop, device)
    ens.limits = read_limits(run_dir, rule)
    ens.temperature = read_temperature(run_dir, rule)
    return ens


def read_temperature(run_dir: Path, rule: str) -> float | None:
    """The temperature `spineseg-ensemble` fitted on validation for `rule`, if any."""
    path = run_dir / CALIBRATION
    if not path.is_file():
        return None
    value = (read_json_object(path, "calibration").get("temperatures") or {}).get(rule)
    return None if value is None else float(value)


def read_limits(run_dir: Path, rule: str) -> Limits | None:
    """The quality flags' ranges `spineseg-ensemble` set on validation for `rule`, if any."""
    path = run_dir / QUALITY
    if not path.is_file():
        return None
    limits = (read_json_object(path, "quality flags").get("limits") or {}).get(rule)
    return None if limits is None else Limits.from_json(limits)
