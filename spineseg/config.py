"""The configs under `conf/` are the one source of every default; this is how code reaches them.

Python constructors take no default that a config sets: a training run builds its DataModule,
LightningModule and ensemble options from the composed config, and notebooks, tests and
benchmarks do the same through `build` and `group`, so they can never drift from the YAML.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

__all__ = ["APPS_DIR", "CONF_DIR", "build", "compose", "construct", "group", "instantiate_node"]


def _conf_dir() -> str:
    """The configs: `spineseg/conf` inside an installed wheel (it ships them there), else the
    repository's top-level `conf/`, their source, in a checkout or an editable install."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise RuntimeError(
        f"spineseg's configs are missing: neither {package / 'conf'} nor "
        f"{package.parent / 'conf'} holds train.yaml; reinstall the package"
    )


CONF_DIR = _conf_dir()


def group(path: str) -> dict[str, Any]:
    """A config group's file without interpolations, as plain Python (e.g. `ensemble/default`);
    a fresh copy each call, so a caller may change it."""
    return copy.deepcopy(_group(path))


@functools.cache
def _group(path: str) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / f"{path}.yaml"))  # type: ignore[return-value]


#: The configs of the apps that read a finished run (predict, export, report): a root of
#: their own, so that their options (`model=` of an ONNX file) are not read as the training
#: tree's config groups (`model=<preset>`).
APPS_DIR = str(Path(CONF_DIR) / "apps")


def compose(
    overrides: Sequence[str] = (), config_name: str = "train", config_dir: str = CONF_DIR
) -> DictConfig:
    """The composed config, as `spineseg-train <overrides>` would see it (without running)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import spineseg.utils.resolvers  # noqa: F401  (the ${member:...} and ${on_gpu:} resolvers)

    if GlobalHydra.instance().is_initialized():  # inside a Hydra app: compose beside it
        return hydra_compose(config_name, overrides=list(overrides))
    with initialize_config_dir(config_dir, version_base="1.3"):
        return hydra_compose(config_name, overrides=list(overrides))


def construct(node: DictConfig, **extra: Any) -> Any:
    """`_target_(**node)` with plain Python values.

    Unlike hydra.utils.instantiate this keeps our exceptions as they are (instantiate wraps
    them, which would turn a one-line ConfigError into a traceback) and passes no OmegaConf
    containers into hyper-parameters, so checkpoints stay loadable with weights_only=True.
    """
    import hydra

    kwargs = OmegaConf.to_container(node, resolve=True)
    cls = hydra.utils.get_class(kwargs.pop("_target_"))  # type: ignore[union-attr]
    return cls(**{**kwargs, **extra})  # type: ignore[arg-type]


def instantiate_node(node: DictConfig | Mapping[str, Any], key: str, **extra: Any) -> Any:
    """`hydra.utils.instantiate` for a node whose values the user sets (the trainer, its
    callbacks and loggers, the optimiser and scheduler): a value the target refuses
    (`trainer.precision=17`) is one line naming the node and the target's own reason, not
    Hydra's paragraph and a traceback."""
    import hydra
    from hydra.errors import InstantiationException

    from spineseg.errors import ConfigError, SpinesegError

    try:
        return hydra.utils.instantiate(node, **extra)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, SpinesegError):
            raise cause from None
        target = node.get("_target_", "?")
        reason = f"{type(cause).__name__}: {cause}" if cause is not None else str(err)
        raise ConfigError(
            f"{key} ({target}) refused its settings: {' '.join(reason.split())}"
        ) from err


def build(node: str, overrides: Sequence[str] = (), **extra: Any) -> Any:
    """The `data` or `module` a training run with `overrides` would build, with `extra`
    arguments over the config's: `build("module", ["model=fpn_lite0"], weights=None)`."""
    return construct(compose(overrides)[node], **extra)
