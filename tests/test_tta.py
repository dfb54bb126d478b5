"""Test-time augmentation: the mirror and back, both variants in the store, the choice on
validation, and predict applying it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ensemble_fixtures import make_store, noisy_probs
from test_predict import film, make_run

from spineseg.ensemble import tta
from spineseg.ensemble.evaluate import run_ensemble
from spineseg.ensemble.store import PredictionStore, StoreError
from spineseg.errors import ConfigError
from spineseg.predict import load_ensemble


def test_the_flip_is_mapped_back_before_averaging() -> None:
    x = torch.rand(2, 1, 8, 6)
    np.testing.assert_allclose(tta.apply(lambda z: z * 2, x, "flip"), x * 2)  # equivariant
    left = lambda z: torch.cumsum(z, dim=-1)  # noqa: E731  (not mirror-symmetric)
    expected = (left(x) + left(x.flip(-1)).flip(-1)) / 2
    np.testing.assert_allclose(tta.apply(left, x, "flip"), expected)
    assert torch.equal(tta.apply(left, x, "none"), left(x))
    with pytest.raises(ConfigError, match="valid choices: flip, none"):
        tta.check("rotate")


def _with_flip(root, sigma: float) -> PredictionStore:
    """A store whose models also have `+flip` predictions, `sigma` noisy."""
    store = make_store(root, models=("m0", "m1"), noise=[3.0, 3.5])
    rng = np.random.default_rng(1)
    for split in ("val", "test", "external"):
        truth = store.truth(split)
        for m in ("m0", "m1"):
            probs = noisy_probs(np.asarray(truth.masks), 1, sigma, rng)
            store.write_probs(m, split, probs, truth.ids.tolist(), tta="flip")
    return store


def test_validation_picks_the_variant_and_test_uses_it(tmp_path) -> None:
    _with_flip(tmp_path / "better", sigma=0.5)  # the flipped predictions are much better
    run_ensemble(tmp_path / "better", {"n_boot": 50, "top_k": 2, "figures": False})
    sel = json.loads((tmp_path / "better" / "ensemble" / "selection.json").read_text())
    assert sel["tta"] == "flip"
    assert sel["tta_scores"]["flip"]["soft"] > sel["tta_scores"]["none"]["soft"]
    run_ensemble(tmp_path / "better", {"n_boot": 50, "top_k": 2, "figures": False, "tta": "none"})
    forced = json.loads((tmp_path / "better" / "ensemble" / "results.json").read_text())
    assert forced["selection"]["tta"] == "none"  # every rule can be scored without it too

    make_store(tmp_path / "plain", models=("m0", "m1"))  # trained before variants were stored
    run_ensemble(tmp_path / "plain", {"n_boot": 50, "top_k": 2, "figures": False})
    sel = json.loads((tmp_path / "plain" / "ensemble" / "selection.json").read_text())
    assert sel["tta"] == "none" and set(sel["tta_scores"]) == {"none"}
    with pytest.raises(StoreError, match="no 'flip' predictions"):
        run_ensemble(tmp_path / "plain", {"n_boot": 50, "figures": False, "tta": "flip"})


def test_predict_applies_the_chosen_variant(tmp_path) -> None:
    run = make_run(tmp_path / "run")
    image = film(120, 60)
    plain = load_ensemble(run)
    path = run / "ensemble" / "selection.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "tta": "flip"}))
    ens = load_ensemble(run)
    assert ens.tta == "flip"
    x, _ = ens.to_input(image)
    mirrored = plain.model_probs(x[None].flip(-1)).flip(-1)
    np.testing.assert_allclose(ens.model_probs(x[None]), (plain.model_probs(x[None]) + mirrored) / 2,
                               atol=1e-6)  # fmt: skip
