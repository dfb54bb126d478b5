"""The selected ensemble as one ONNX graph: normalised working-resolution films (dynamic
batch) -> every member (with the test-time augmentation validation chose) -> the voting
rule -> the fused probability and the disagreement map.

onnxruntime then runs it without PyTorch models (`spineseg-predict engine=onnx`). The graph
carries what it was built from (the pipeline, the rule and its threshold, the members, the
selection's set_id) in its metadata, so a file from another run is refused, not misused.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from spineseg.ensemble import rules, voting
from spineseg.ensemble import tta as TTA
from spineseg.ensemble.quality import Limits
from spineseg.errors import ConfigError, StoreError
from spineseg.names import SELECTION
from spineseg.predict import Ensemble, Pipeline, load_ensemble
from spineseg.utils.io import atomic_open

#: Rules that are a fixed computation (`Rule.traceable`).
EXPORTABLE = tuple(name for name, r in rules.RULES.items() if r.traceable)
METADATA_KEY = "spineseg"
INPUT, OUTPUTS = "image", ("probability", "disagreement")


class EnsembleGraph(nn.Module):
    """members -> rule -> (fused scores (N,C,H,W), disagreement (N,H,W)), as `Ensemble`."""

    def __init__(self, ens: Ensemble) -> None:
        super().__init__()
        self.members = nn.ModuleList(ens.models)
        self.rule, self.threshold, self.tta = ens.rule, ens.threshold, ens.tta
        if ens.rule == "weighted":  # checked here, once: a traced graph cannot branch on them
            self.register_buffer(
                "w", voting.normalised_weights(ens.weights, len(ens.models), "cpu")
            )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.stack(
            [TTA.apply(lambda z, m=m: m.probabilities(m(z)), x, self.tta) for m in self.members]
        )
        if self.rule == "weighted":
            fused = voting.weighted_mean(probs, self.w)
        else:
            fused = rules.fuse(self.rule, probs, threshold=self.threshold)
        return fused, voting.disagreement(probs, self.threshold)


def _exportable_activations(module: nn.Module) -> None:
    """Memory-efficient Swish (smp's EfficientNet encoders) is a custom autograd function
    that no exporter can trace; its plain form computes the same."""
    for sub in module.modules():
        if hasattr(sub, "set_swish"):
            sub.set_swish(memory_efficient=False)


def describe(ens: Ensemble, set_id: str | None = None) -> dict[str, Any]:
    """What the graph computes and from what; stored in its metadata."""
    return {
        "pipeline": asdict(ens.pipeline),
        "rule": ens.rule,
        "threshold": ens.threshold,
        "postprocess": ens.postprocess,
        "models": ens.names,
        "set_id": set_id,
        "quality": None if ens.limits is None else ens.limits.to_json(),
        "temperature": ens.temperature,
        "tta": ens.tta,
    }


def write_graph(ens: Ensemble, output: str | Path, meta: dict[str, Any], opset: int = 18) -> Path:
    """`ens` as one ONNX graph at `output` (atomically), `meta` in its metadata."""
    import onnx

    if ens.rule not in EXPORTABLE:
        raise ConfigError(
            f"rule {ens.rule!r} cannot be exported: STAPLE iterates until it converges; "
            f"valid choices: {', '.join(EXPORTABLE)}"
        )
    graph = EnsembleGraph(ens).eval()
    _exportable_activations(graph)
    h, w = ens.pipeline.image_size
    with torch.no_grad():
        program = torch.onnx.export(
            graph,
            (torch.zeros(2, 1, h, w),),
            input_names=[INPUT],
            output_names=list(OUTPUTS),
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
    model = program.model_proto
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)
    onnx.checker.check_model(model)
    output = Path(output)
    with atomic_open(output, "wb") as fh:
        fh.write(model.SerializeToString())
    return output


def export(run_dir: str | Path, output: str | Path, rule: str = "soft") -> Path:
    """The ensemble `spineseg-ensemble` selected in `run_dir`, as one ONNX file."""
    if rule not in EXPORTABLE:  # before any checkpoint is loaded
        raise ConfigError(
            f"rule {rule!r} cannot be exported: STAPLE iterates until it converges; "
            f"valid choices: {', '.join(EXPORTABLE)}"
        )
    run_dir = Path(run_dir)
    ens = load_ensemble(run_dir, rule=rule, device="cpu")
    if ens.stage1 is not None:
        raise ConfigError(
            f"{run_dir} is a cascade (data.crop): one graph cannot hold the crop between its "
            "two ensembles; predict it with engine=torch"
        )
    if len(ens.variants) > 1:
        raise ConfigError(
            f"{run_dir}: the selected models use different data.preprocess "
            f"({', '.join(ens.variants)}) and the graph takes one input; predict it with "
            "engine=torch"
        )
    selection = json.loads((run_dir / SELECTION).read_text())
    return write_graph(ens, output, describe(ens, selection.get("set_id")))


def read_metadata(path: str | Path) -> dict[str, Any]:
    """What an exported graph was built from; a StoreError for a file that is not one."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise StoreError(f"{path}: file not found (model= is the .onnx file spineseg-export wrote)")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # onnx raises DecodeError and friends
        raise StoreError(f"{path}: not an ONNX file ({type(err).__name__})") from None
    props = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in props:
        raise StoreError(f"{path}: not a spineseg ensemble (no {METADATA_KEY!r} metadata)")
    return json.loads(props[METADATA_KEY])


class OnnxEnsemble(Ensemble):
    """`Ensemble`'s pre- and post-processing around an onnxruntime session: the same
    inputs, the same mapping back onto the film, no PyTorch models."""

    def __init__(self, path: str | Path, run_dir: str | Path | None = None) -> None:
        import onnxruntime as ort

        from spineseg.ensemble.postprocess import check_names

        meta = read_metadata(path)
        if run_dir is not None:
            _check_same_run(Path(path), meta, Path(run_dir))
        p = meta["pipeline"]
        self.pipeline = Pipeline(p["target"], tuple(p["image_size"]), p["resize"], p["preprocess"])
        self.rule, self.threshold = meta["rule"], float(meta["threshold"])
        self.postprocess = check_names([meta.get("postprocess", "none")])[0]
        self.names, self.models, self.weights = list(meta["models"]), [], None
        self.device = torch.device("cpu")
        self.limits = Limits.from_json(meta["quality"]) if meta.get("quality") else None
        self.temperature = meta.get("temperature")
        self.tta = meta.get("tta", "none")  # inside the graph already
        self.stage1 = None  # a cascade is never exported (`export` refuses it)
        self.variants, self.inputs = [self.pipeline.preprocess], []  # one input (`export`)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def fused(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, spread = self.session.run(list(OUTPUTS), {INPUT: x.numpy().astype(np.float32)})
        return torch.from_numpy(scores), torch.from_numpy(spread)


def _check_same_run(path: Path, meta: dict[str, Any], run_dir: Path) -> None:
    selection = json.loads((run_dir / SELECTION).read_text())
    if meta.get("models") != selection.get("models") or meta.get("set_id") != selection.get(
        "set_id"
    ):
        raise StoreError(
            f"{path} was exported from another ensemble than {run_dir}'s (models "
            f"{meta.get('models')} vs {selection.get('models')}); export it again"
        )
