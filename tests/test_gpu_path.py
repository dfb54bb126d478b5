"""The GPU preset's code paths, exercised on the CPU so a GPU run cannot fail on something CI
could catch: the precision resolver, bf16-mixed autocast, channels_last, float16 store
writes from reduced-precision outputs, and the loader settings a GPU needs."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from spineseg.config import build, construct
from spineseg.data import datamodule as D
from spineseg.errors import ConfigError
from spineseg.train import build_trainer
from spineseg.utils import resolvers


def test_precision_resolver(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolvers.amp_precision() == "32-true"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolvers.amp_precision() == "bf16-mixed"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolvers.amp_precision() == "16-mixed"
    assert resolvers.on_gpu("gpu") and not resolvers.on_gpu("cpu")


class _Batches(TensorDataset):
    def __getitem__(self, i: int) -> dict:
        x, y = super().__getitem__(i)
        return {"image": x, "mask": y, "id": f"f{i}"}


def test_bf16_mixed_and_channels_last_train_and_store_float16_on_cpu(tmp_path) -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 1, 64, 64)
    y = (torch.rand(8, 64, 64) > 0.7).long()
    loader = DataLoader(_Batches(x, y), batch_size=4)
    module = build("module", weights=None, channels_last=True)
    seen: list[tuple[torch.dtype, bool]] = []
    module.net.register_forward_hook(
        lambda m, i, out: seen.append(
            (out.dtype, i[0].is_contiguous(memory_format=torch.channels_last))
        )
    )
    trainer = L.Trainer(
        accelerator="cpu", precision="bf16-mixed", max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, loader, loader)
    assert module._channels_last  # channels_last=true is honoured on any device
    assert (torch.bfloat16, True) in seen  # autocast ran the network in bf16, NHWC input
    out = trainer.predict(module, loader)
    probs = torch.cat([b["probs"] for b in out])
    assert probs.dtype == torch.float16 and probs.shape == (8, 1, 64, 64)
    assert torch.isfinite(probs).all() and probs.min() >= 0 and probs.max() <= 1


def test_gpu_and_ddp_presets_compose_and_build_on_a_cpu_machine(compose_train) -> None:
    cfg = compose_train("experiment=tiny", "trainer=gpu")
    assert cfg.trainer.precision == "32-true"  # no CUDA here: the resolver's fallback
    assert cfg.trainer.accelerator == "gpu" and cfg.data.num_workers == "auto"
    ddp = compose_train("experiment=tiny", "trainer=ddp", "trainer.accelerator=cpu")
    assert ddp.trainer.sync_batchnorm is False and ddp.trainer.strategy == "ddp"
    trainer = build_trainer(ddp)
    assert type(trainer.strategy).__name__ == "DDPStrategy"
    assert trainer.strategy.cluster_environment is not None


def test_loader_workers_follow_the_hardware(monkeypatch, compose_train) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert D.resolve_workers("auto") == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(D.os, "sched_getaffinity", lambda _: set(range(16)), raising=False)
    assert D.resolve_workers("auto") == 7  # 16 CPUs for 2 GPUs, one left to the trainer
    monkeypatch.setattr(D.os, "sched_getaffinity", lambda _: set(range(64)), raising=False)
    assert D.resolve_workers("auto") == 8
    cfg = compose_train("experiment=tiny", "trainer=gpu")
    dm = construct(cfg.data)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.num_workers == 8 and loader.persistent_workers and loader.pin_memory
    assert D.resolve_workers(3) == 3 and D.resolve_workers("2") == 2
    for bad in (-1, "many", 1.5, True):
        with pytest.raises(ConfigError, match=r"data\.num_workers must be auto or a whole number"):
            D.resolve_workers(bad)
    np.testing.assert_equal(len(loader.dataset), len(dm.parts["train"].ids))
