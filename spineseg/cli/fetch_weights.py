"""`spineseg-fetch-weights sweep=paper20 | model=<preset>`: download every hub weight a sweep
needs into the local cache, on a machine with internet, for air-gapped clusters.

Then copy ~/.cache/huggingface (or set HF_HOME to a shared path) and run jobs with
HF_HUB_OFFLINE=1: they load from the cache and never touch the network.
"""

from __future__ import annotations

import sys
import time

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import spineseg  # noqa: F401
from spineseg.cli.common import hydra_app
from spineseg.config import compose
from spineseg.errors import SpinesegError
from spineseg.models import weights as W
from spineseg.models.factory import build_model

USAGE = "usage: spineseg-fetch-weights sweep=<preset> | model=<preset>"


def presets(cfg: DictConfig, overrides: list[str]) -> list[dict]:
    """The model presets selected by `sweep=...` (all of its models) or `model=...`."""
    params = HydraConfig.get().sweeper.get("params") or {}
    names = [cfg.model.name]
    if "model" in params:
        names = [n.strip() for n in str(params["model"]).split(",")]
    out = []
    for name in names:
        m = compose([*overrides, f"model={name}"], "fetch_weights").model
        out.append({"name": name, "arch": m.arch, "encoder": m.encoder, "weights": m.weights})
    return out


def _fetch(cfg: DictConfig) -> None:
    todo = presets(cfg, list(HydraConfig.get().overrides.task))
    hub = [p for p in todo if W.weights_kind(p["weights"]) == "hub"]
    print(f"{len(todo)} presets, {len(hub)} with hub weights")
    if hub and not W.hub_reachable():
        raise SpinesegError(
            "the model hub is not reachable from this machine: run spineseg-fetch-weights "
            "where there is internet, then copy ~/.cache/huggingface here and set "
            "HF_HUB_OFFLINE=1"
        )
    for p in todo:
        start = time.monotonic()
        build_model(p["arch"], p["encoder"], p["weights"])
        print(
            f"  ok  {p['name']:<24} {p['encoder']:<28} {p['weights']} "
            f"({time.monotonic() - start:.1f}s)"
        )


main = hydra_app("fetch_weights", _fetch, USAGE)


if __name__ == "__main__":
    sys.exit(main())
