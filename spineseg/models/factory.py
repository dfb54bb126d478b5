"""Build any smp architecture x encoder with its pretrained weights resolved."""

from __future__ import annotations

import logging
import os
from typing import Any

import segmentation_models_pytorch as smp
from torch import nn

from spineseg.errors import ConfigError, WeightsError, choices_message
from spineseg.models import weights as W

log = logging.getLogger(__name__)

ARCHITECTURES: dict[str, type[nn.Module]] = dict(smp.MODEL_ARCHITECTURES_MAPPING)


def check_arch(arch: str) -> str:
    key = arch.lower().replace("_", "").replace("-", "")
    if key not in ARCHITECTURES:
        names = [cls.__name__ for cls in ARCHITECTURES.values()]
        raise ConfigError(choices_message("architecture", arch, names))
    return key


def check_encoder(encoder: str) -> None:
    if encoder.startswith("tu-"):
        import timm

        if not timm.is_model(encoder.removeprefix("tu-")):
            raise ConfigError(
                f"unknown encoder {encoder!r}: {encoder.removeprefix('tu-')!r} is not a timm "
                "model (see timm.list_models())"
            )
        return
    names = smp.encoders.get_encoder_names()
    if encoder not in names:
        raise ConfigError(choices_message("encoder", encoder, [*names, "tu-<timm model>"]))


def build_model(
    arch: str,
    encoder: str,
    weights: str | None = "offline",
    in_channels: int = 1,
    classes: int = 1,
    **arch_kwargs: Any,
) -> nn.Module:
    """An smp model whose encoder carries the weights named by `weights` (see weights.py)."""
    key = check_arch(arch)
    check_encoder(encoder)
    kind = W.weights_kind(weights)

    def create(encoder_weights: str | None) -> nn.Module:
        try:
            return smp.create_model(
                key,
                encoder_name=encoder,
                encoder_weights=encoder_weights,
                in_channels=in_channels,
                classes=classes,
                **arch_kwargs,
            )
        except (KeyError, ValueError, TypeError, AssertionError) as err:
            if encoder_weights is not None:
                raise
            raise ConfigError(f"cannot build {arch} with encoder {encoder!r}: {err}") from err

    if kind != "hub":
        model = create(None)
        if kind == "offline":
            n = W.load_encoder_state(model.encoder, W.load_offline_state(encoder), "offline")
            log.info("loaded %d offline ImageNet tensors into %s", n, encoder)
        elif kind == "file":
            n = W.load_encoder_state(model.encoder, W.load_file_state(str(weights)), str(weights))
            log.info("loaded %d tensors from %s into %s", n, weights, encoder)
        return model

    # Hub weights: try the local cache first, touch the network only when it answers fast.
    offline_env = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}
    try:
        with W.hub_offline():
            return create(str(weights))
    except ConfigError:
        raise
    except Exception as cached_err:
        if offline_env or not W.hub_reachable():
            raise WeightsError(W.hub_help(encoder, str(weights))) from cached_err
    try:
        return create(str(weights))
    except Exception as err:
        raise WeightsError(f"{W.hub_help(encoder, str(weights))} ({type(err).__name__})") from err
