"""Quality flags: each sign on constructed masks, the ranges from validation only, the
detection numbers, and the flags in per_image.csv, quality.json, the report and predict."""

from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pandas as pd
import pytest
from ensemble_fixtures import make_store
from test_predict import film, make_run

from spineseg.cli.predict import main as predict
from spineseg.ensemble.evaluate import run_ensemble
from spineseg.ensemble.quality import Limits, detection, film_features, fit_limits, flag
from spineseg.report.report import build_report

LIMITS = Limits(disagreement=0.5, area=(0.05, 0.15), position=(0.4, 0.6))


def _region(top: int, height: int = 10, size: int = 100) -> np.ndarray:
    labels = np.zeros((size, size), np.uint8)
    labels[top : top + height, 40:60] = 1
    return labels


def test_a_normal_film_is_not_flagged_and_each_sign_is_named() -> None:
    calm = np.zeros((100, 100), np.float32)
    score, reasons = flag(film_features(_region(25, 50), calm), LIMITS)
    assert reasons == [] and score <= 1
    two = _region(30, 25) | _region(60, 25)
    assert flag(film_features(two, calm), LIMITS)[1] == ["several pieces"]
    assert flag(film_features(_region(5, 50), calm), LIMITS)[1] == ["unusual position"]
    assert flag(film_features(_region(45, 5), calm), LIMITS)[1] == ["unusual area"]
    empty = np.zeros((100, 100), np.uint8)
    assert flag(film_features(empty, calm), LIMITS)[1] == ["nothing found", "unusual position"]
    loud = np.ones((100, 100), np.float32)  # every pixel disputed
    assert flag(film_features(_region(25, 50), loud), LIMITS)[1] == ["members disagree"]


def test_ranges_come_from_the_validation_truth_and_prediction() -> None:
    truth = [film_features(_region(40 + i, 50), np.zeros((100, 100))) for i in range(11)]
    pred = [{**t, "disagreement": 0.1 * i} for i, t in enumerate(truth)]
    lim = fit_limits(pred, truth)
    assert lim.area == pytest.approx((0.1, 0.1)) and lim.n_val == 11
    assert lim.position[0] == pytest.approx(np.quantile([f["position"] for f in truth], 0.025))
    assert lim.disagreement == pytest.approx(np.quantile([0.1 * i for i in range(11)], 0.975))


def test_detection_counts_sensitivity_specificity_and_auroc() -> None:
    d = detection(scores=[0.5, 2.0, 3.0, 0.2, 1.5], dice=[0.9, 0.5, 0.6, 0.8, 0.85])
    assert d["n_poor"] == 2 and d["n_flagged"] == 3
    assert d["sensitivity"] == 1.0 and d["specificity"] == pytest.approx(2 / 3)
    assert d["auroc"] == pytest.approx(1.0)  # both poor films score above every good one


def test_flags_reach_the_outputs_the_report_and_predict(tmp_path) -> None:
    make_store(tmp_path, models=("m0", "m1", "m2"), noise=[1.5, 2.0, 2.5])
    run_ensemble(tmp_path, {"n_boot": 50, "top_k": 3, "figures": False})
    q = json.loads((tmp_path / "ensemble" / "quality.json").read_text())
    assert set(q["limits"]) >= {"soft", "hard"} and q["limits"]["soft"]["n_val"] == 4
    assert set(q["detection"]["soft"]) == {"test", "external"}
    per_image = pd.read_csv(tmp_path / "ensemble" / "per_image.csv")
    soft = per_image[per_image["method"].isin(["soft", "soft+spine"])].dropna(subset=["flag_score"])
    assert len(soft) == 5 + 3  # every test and external film of the rule predict would use
    report = build_report(tmp_path).read_text()
    assert "Table 4. Quality flags" in report and "AUROC" in report

    run = make_run(tmp_path / "run")  # predict: the flags of the validation ranges
    limits = {"disagreement": 0.5, "area": [0.0, 1.0], "position": [0.0, 1.0]}
    (run / "ensemble" / "quality.json").write_text(json.dumps({"limits": {"soft": limits}}))
    src = tmp_path / "films"
    src.mkdir()
    cv2.imwrite(str(src / "a.png"), film(120, 60))
    out = tmp_path / "out"
    assert predict([f"run_dir={run}", f"input={src}", f"output={out}", "progress=false"]) == 0
    with open(out / "predictions.csv") as fh:
        row = next(csv.DictReader(fh))
    assert float(row["flag_score"]) >= 0 and "flag" in row
