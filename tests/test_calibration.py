"""Temperature scaling: it recovers a known over-confidence, lowers the ECE, keeps every
decision, and reaches results.csv, the report and predict."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from ensemble_fixtures import make_store
from test_predict import film, make_run

from spineseg.ensemble.calibration import Reliability, fit_temperature, scaled
from spineseg.ensemble.evaluate import run_ensemble
from spineseg.predict import load_ensemble
from spineseg.report.report import build_report


def _overconfident(t: float, n: int = 200_000, seed: int = 0):
    """Labels drawn from sigmoid(z); the model reports sigmoid(t z): t times too sure."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=g) * 2
    y = (torch.rand(n, generator=g) < torch.sigmoid(z)).long()
    return torch.sigmoid(t * z)[:, None], y


def test_a_known_overconfidence_is_recovered_and_the_ece_drops() -> None:
    p, y = _overconfident(3.0)
    t = fit_temperature(p, y)
    assert t == pytest.approx(3.0, rel=0.05)
    before, after = Reliability(), Reliability()
    before.update(p[:, :, None, None], y[:, None, None])
    after.update(scaled(p[:, :, None, None], t), y[:, None, None])
    assert after.ece < 0.01 < before.ece


def test_scaling_keeps_every_decision() -> None:
    p = torch.rand(2, 1, 32, 32)
    for t in (0.3, 1.0, 4.0):
        np.testing.assert_array_equal((scaled(p, t) > 0.5).numpy(), (p > 0.5).numpy())
    multi = torch.softmax(torch.randn(2, 5, 16, 16), dim=1)
    np.testing.assert_array_equal(scaled(multi, 2.5).argmax(1), multi.argmax(1))


def test_calibration_reaches_results_the_report_and_predict(tmp_path) -> None:
    make_store(tmp_path, models=("m0", "m1"), noise=[1.5, 2.0])
    results = run_ensemble(tmp_path, {"n_boot": 50, "top_k": 2, "figures": True, "gallery_n": 0})
    cal = json.loads((tmp_path / "ensemble" / "calibration.json").read_text())
    assert set(cal["temperatures"]) >= {"soft", "model:m0", "model:m1"}
    assert set(cal["splits"]) == {"val", "test", "external"}
    soft = results[(results["split"] == "test") & (results["method"] == "soft")].iloc[0]
    assert soft["temperature"] == pytest.approx(cal["temperatures"]["soft"])
    assert np.isfinite(soft["ece"]) and np.isfinite(soft["ece_calibrated"])
    assert (tmp_path / "ensemble" / "figures" / "reliability_test.png").is_file()
    csv = pd.read_csv(tmp_path / "ensemble" / "results.csv")
    assert {"temperature", "ece", "ece_calibrated"} <= set(csv.columns)
    report = build_report(tmp_path).read_text()
    assert "Table 5. Calibration" in report and "reliability_test.png" in report

    run = make_run(tmp_path / "run")
    plain = load_ensemble(run).predict(film(120, 60))
    (run / "ensemble" / "calibration.json").write_text(json.dumps({"temperatures": {"soft": 2.0}}))
    calibrated = load_ensemble(run).predict(film(120, 60))
    np.testing.assert_array_equal(calibrated.labels, plain.labels)  # the decision stays
    expected = scaled(torch.from_numpy(plain.probability)[None, None], 2.0)[0, 0].numpy()
    np.testing.assert_allclose(calibrated.probability, expected, atol=1e-5)
