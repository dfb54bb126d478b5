"""Hydra callbacks of a sweep: before it, one job folder per job (or a refusal naming the
clash); after it, which models completed, which failed and why."""

from __future__ import annotations

import logging
import shutil
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, read_write

from spineseg.checks import check_device, check_run
from spineseg.ensemble.store import PredictionStore
from spineseg.errors import ConfigError
from spineseg.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


def summarize_sweep(run_dir: str | Path) -> list[dict[str, Any]]:
    """One row per model in the store, written to sweep_summary.{json,md}."""
    store = PredictionStore(run_dir)
    rows = []
    for name in store.models(status=None):
        m = store.read_manifest(name) or {}
        rows.append(
            {
                "model": name,
                "status": m.get("status", "unknown"),
                "val_dice": (m.get("val_metrics") or {}).get("dice"),
                "elapsed_s": m.get("elapsed_s"),
                "error": m.get("error"),
            }
        )
    lines = ["| model | status | val dice | time (s) | error |", "|---|---|---|---|---|"]
    for r in rows:
        dice = f"{r['val_dice']:.4f}" if isinstance(r["val_dice"], float) else "-"
        err = (r["error"] or "").replace("|", "/").replace("\n", " ")[:160]
        lines.append(f"| {r['model']} | {r['status']} | {dice} | {r['elapsed_s'] or '-'} | {err} |")
    atomic_write_json(Path(run_dir) / "sweep_summary.json", rows)
    atomic_write_text(Path(run_dir) / "sweep_summary.md", "\n".join(lines) + "\n")
    return rows


#: Keys that name the model itself; sweeping them gives distinct members already.
_MEMBER_KEYS = ("model", "member", "swept")


def _overrides(config: DictConfig) -> list[Any]:
    """The sweep's overrides as the basic sweeper sees them: its params, then the command's."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    task = OmegaConf.to_container(config.hydra.overrides.task, resolve=False)
    return OverridesParser.create().parse_overrides([*params, *task])


def swept_options(config: DictConfig) -> list[str]:
    """The options a multirun sweeps besides the model (`data.preprocess=none,clahe`)."""
    return [
        o.key_or_group
        for o in _overrides(config)
        if o.is_sweep_override()
        and o.key_or_group not in _MEMBER_KEYS
        and not o.key_or_group.startswith("hydra")
    ]


def job_members(config: DictConfig) -> list[tuple[str, str, list[str], DictConfig]]:
    """(member name, truth identity, overrides, config) of every job the sweep will launch,
    each composed as the basic sweeper composes it."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()
    jobs = BasicSweeper.split_arguments(_overrides(config), None)[0]
    out = []
    for overrides in jobs:
        job = loader.load_sweep_config(config, list(overrides))
        out.append((str(OmegaConf.select(job, "member")), _truth_of(job), list(overrides), job))
    return out


#: Data options that change how a model sees the films but not the films, their masks or
#: their split: jobs that differ only in these share the run's ground truth.
TRUTH_NEUTRAL_DATA = ("preprocess", "augment", "batch_size", "num_workers", "cache", "cache_dir")


def _truth_of(job: DictConfig) -> str:
    """What the job's stored ground truth depends on (films, split, size, stored target)."""
    import json

    from spineseg.names import STORED_TARGET

    data = OmegaConf.to_container(job.data, resolve=True)
    for key in TRUTH_NEUTRAL_DATA:
        data.pop(key, None)
    data["target"] = STORED_TARGET.get(data.get("target"), data.get("target"))
    return json.dumps(data, sort_keys=True, default=str)


class SweepGuard(Callback):
    """Before any job runs: a multirun that sweeps more than the model names each job after
    its swept values too (`swept`), and one whose jobs would still share a job folder and a
    store entry is refused, naming the clash, while nothing has been written."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        swept = swept_options(config)
        task = config.hydra.overrides.task
        if swept and not any(str(o).split("=", 1)[0].lstrip("+~") == "swept" for o in task):
            with read_write(config.hydra.overrides):
                task.append(f"swept=[{','.join(swept)}]")
        jobs = job_members(config)
        common = set.intersection(*(set(o) for _, _, o, _ in jobs)) if jobs else set()

        def shown(group: list[list[str]]) -> str:
            return " and ".join(
                "'" + " ".join(x for x in o if x not in common) + "'" for o in group[:2]
            )

        by_name: dict[str, list[list[str]]] = defaultdict(list)
        by_truth: dict[str, list[list[str]]] = defaultdict(list)
        for name, truth, overrides, _ in jobs:
            by_name[name].append(overrides)
            by_truth[truth].append(overrides)
        clashes = {n: o for n, o in by_name.items() if len(o) > 1}
        if clashes:
            name, same = next(iter(clashes.items()))
            _refuse(
                f"the sweep's jobs {shown(same)} would share jobs/{name} and its store entry; "
                "sweep the model or an option, or set member= per job"
            )
        if len(by_truth) > 1:
            _refuse(
                f"the sweep's jobs {shown([o[0] for o in by_truth.values()])} need different "
                "ground truths (films, split, size or target), which one run's store cannot "
                "hold; sweep them as separate runs (run=...)"
            )
        here = jobs_run_here(config)
        if not here and shutil.which("srun") is None:
            _refuse(
                "hydra/launcher=slurm submits to a SLURM cluster, and this machine has no srun: "
                "start the sweep on the cluster's login node, or run it here with "
                "hydra/launcher=basic (or local_parallel)"
            )
        for _, _, overrides, job in jobs:
            try:
                check_run(job)  # a typo in any job stops the sweep before the first one runs
                if here:
                    check_device(job)
            except ConfigError as err:
                _refuse(f"job '{' '.join(x for x in overrides if x not in common)}': {err}")


def jobs_run_here(config: DictConfig) -> bool:
    """Whether the launcher runs the jobs on this machine (basic, local_parallel, submitit's
    local) rather than on a cluster's nodes, whose GPUs a login node does not have."""
    launcher = str(OmegaConf.select(config, "hydra.launcher._target_", default=""))
    return not launcher.endswith("SlurmLauncher")


def _refuse(message: str) -> None:
    print(f"error: {message} (nothing was run)", file=sys.stderr)
    sys.exit(1)


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = config.hydra.sweep.dir
        rows = summarize_sweep(run_dir)
        failed = [r for r in rows if r["status"] != "complete"]
        done = len(rows) - len(failed)
        print(f"\nsweep {run_dir}: {done} of {len(rows)} models complete", flush=True)
        for r in failed:
            print(f"  {r['status'].upper()}: {r['model']}: {r['error']}", flush=True)
