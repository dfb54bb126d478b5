"""Data validation: the report's contents (pure functions), and the CLI end to end: exit code,
every bad file named, mask export, external set and patient-leak cross-check."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from scipy.io import savemat

from spineseg.cli.validate_data import validate
from spineseg.data.sample import Sample
from spineseg.data.validate import build_report, cross_check, format_report
from spineseg.names import FIRST_TARGET_VALUE

REPO = Path(__file__).resolve().parents[1]
H, W = 24, 16


def mask(values=(1, 2, 3, 4)) -> np.ndarray:
    """A mask file's Th8..Th11 as 1..4 (the folder convention, and what export writes)."""
    out = np.zeros((H, W), np.uint8)
    for value in values:
        out[value * 4 : value * 4 + 3, 4:12] = value
    return out


def label(values=(1, 2, 3, 4)) -> np.ndarray:
    """The same vertebrae as the level values a Sample carries (Th8 = 15)."""
    out = mask(values)
    return np.where(out > 0, out + FIRST_TARGET_VALUE - 1, 0).astype(np.uint8)


def sample(sid: str, patient: str | None = None, seed: int = 0, **kwargs) -> Sample:
    image = np.random.default_rng(seed).integers(0, 255, (H, W)).astype(np.uint8)
    kwargs.setdefault("label", label())
    return Sample(
        id=sid, patient_id=patient or sid, image=image, source_path=f"/d/{sid}.png", **kwargs
    )


# ----------------------------------------------------------------------------- report


def test_report_counts_sizes_depths_and_labels():
    tall = sample("c", seed=2)
    tall.image = np.zeros((40, 20), np.uint16)
    tall.label = np.zeros((40, 20), np.uint8)
    tall.label[5:9, 5:9] = 1
    tall.binary_label = True
    report = build_report([sample("a"), sample("b", seed=1), tall], skipped=[])
    assert (report.n_films, report.n_patients, report.n_skipped) == (3, 3, 0)
    assert report.heights == (24, 24, 40) and report.widths == (16, 16, 20)
    assert report.bit_depths == {"uint8": 2, "uint16": 1}
    assert report.label_values == {
        "background": 3, "region": 1, "Th8": 2, "Th9": 2, "Th10": 2, "Th11": 2
    }  # fmt: skip
    assert report.label_modes == {"vertebrae": 2, "binary": 1}
    assert report.ok and any("mixed masks" in str(w) for w in report.warnings)
    text = format_report(report)
    for line in (
        "films: 3   patients: 3   skipped: 0",
        "height 24 / 24 / 40, width 16 / 16 / 20",
        "bit depths: uint16: 1, uint8: 2",
        "Th11 (2)",
        "errors: 0",
    ):
        assert line in text, text


def test_report_errors_name_the_files():
    empty = sample("empty", label=np.zeros((H, W), np.uint8))
    mismatch = sample("mismatch", label=np.zeros((H + 2, W), np.uint8))
    twin_a, twin_b = sample("twin-a", "p1", seed=7), sample("twin-b", "p2", seed=7)
    dup1, dup2 = sample("dup", seed=3), sample("dup", seed=4)
    skipped = [("/d/broken.png", "cannot decode: corrupt")]
    report = build_report([empty, mismatch, twin_a, twin_b, dup1, dup2], skipped)
    errors = "\n".join(str(e) for e in report.errors)
    assert "/d/broken.png: skipped: cannot decode" in errors
    assert "/d/empty.png: empty mask" in errors
    assert "/d/mismatch.png: mask size (26, 16) differs from image size (24, 16)" in errors
    assert "/d/twin-a.png, /d/twin-b.png: identical images of different patients" in errors
    assert "duplicate id 'dup'" in errors
    assert not report.ok and f"errors: {len(report.errors)}" in format_report(report)


def test_same_patient_duplicates_and_missing_vertebrae_are_warnings():
    films = [sample("a", "p", seed=1), sample("b", "p", seed=1), sample("c", label=label((1, 2)))]
    report = build_report(films)
    warnings = [str(w) for w in report.warnings]
    assert any("identical images (same patient)" in w for w in warnings)
    assert any(w.startswith("/d/c.png: vertebrae missing") and "Th10" in w for w in warnings)
    assert report.ok


def test_forced_splits_and_patients_in_several_splits():
    films = [
        sample("a1", "A", split="train"),
        sample("a2", "A", seed=1, split="test"),
        sample("b", "B", seed=2, split="test"),
        sample("c", "C", seed=3),
    ]
    report = build_report(films)
    assert report.splits == {"test": (2, 2), "train": (1, 1)}
    assert [str(e) for e in report.errors] == [
        "patient 'A' has films in several forced splits: ['test', 'train']"
    ]
    assert "forced splits: test: 2 films / 2 patients" in format_report(report)


def test_unordered_vertebrae_are_flagged():
    swapped = mask()
    swapped[swapped == 1], swapped[swapped == 4] = 9, 1
    swapped[swapped == 9] = 4
    swapped = np.where(swapped > 0, swapped + FIRST_TARGET_VALUE - 1, 0).astype(np.uint8)
    report = build_report([sample("s", label=swapped)])
    assert any("not ordered top to bottom" in str(w) for w in report.warnings)


def test_cross_check_finds_shared_patients_and_films():
    main = [sample("a", "P1"), sample("b", "P2", seed=1)]
    external = [sample("x", "P2", seed=5), sample("y", "P9", seed=0)]
    issues = [str(i) for i in cross_check(main, external)]
    assert "1 patient(s) in both data and external: P2" in issues[0]
    assert "/d/y.png: identical pixels to /d/a.png" in issues[1]
    assert cross_check(main, [sample("z", "P3", seed=9)]) == []


# ----------------------------------------------------------------------------- CLI


def folder_dataset(root: Path, bad: bool = False) -> Path:
    for i, sid in enumerate(("a", "b")):
        image = np.random.default_rng(i).integers(0, 255, (H, W)).astype(np.uint8)
        cv2.imwrite(str(_mk(root / "images" / f"{sid}.png")), image)
        cv2.imwrite(str(_mk(root / "masks" / f"{sid}.png")), mask())
    if bad:
        (root / "images/c.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
        cv2.imwrite(str(root / "masks/c.png"), mask())
        cv2.imwrite(str(root / "images/d.png"), np.zeros((H, W), np.uint8))
        cv2.imwrite(str(root / "masks/d.png"), np.zeros((H, W), np.uint8))
    return root


def _mk(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "spineseg.cli.validate_data", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_passes_and_exports_masks(tmp_path):
    root = folder_dataset(tmp_path / "data")
    out = tmp_path / "masks_out"
    result = run_cli("data=folder", f"data.root={root}", f"export_masks={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "films: 2   patients: 2   skipped: 0" in result.stdout
    assert "OK: no errors" in result.stdout
    exported = cv2.imread(str(out / "a.png"), cv2.IMREAD_UNCHANGED)
    assert exported.dtype == np.uint8
    np.testing.assert_array_equal(exported, mask())
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "masks_out"]  # no clutter


def test_cli_fails_and_names_every_bad_file(tmp_path):
    root = folder_dataset(tmp_path / "data", bad=True)
    result = run_cli("data=folder", f"data.root={root}", cwd=tmp_path)
    assert result.returncode == 1
    assert f"ERROR {root / 'images/c.png'}: skipped: truncated PNG" in result.stdout
    assert f"ERROR {root / 'masks/d.png'}: skipped: empty mask" in result.stdout
    assert "films: 2   patients: 2   skipped: 2" in result.stdout
    assert "FAILED: 2 error(s)" in result.stderr


def test_cli_user_error_is_one_line(tmp_path):
    result = run_cli("data=folder", f"data.root={tmp_path / 'nowhere'}", cwd=tmp_path)
    assert result.returncode == 1
    assert (
        result.stderr.strip() == f"error: {tmp_path / 'nowhere'}: data folder not found "
        "(expected images/ and masks/ inside)"
    )
    assert "Traceback" not in result.stderr + result.stdout


def compose_cfg(*overrides: str):
    import spineseg  # noqa: F401  (resolvers)

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("validate_data", overrides=list(overrides))


def test_external_is_validated_cross_checked_and_exported(tmp_path):
    main = folder_dataset(tmp_path / "main")
    out = tmp_path / "out"
    ext = "{source: folder, root: " + str(main) + "}"
    reports = validate(
        compose_cfg(
            "data=folder", f"data.root={main}", f"data.external={ext}", f"export_masks={out}"
        )
    )
    assert [r.name.split(":")[0] for r in reports] == ["data", "external"]
    assert reports[0].ok
    assert any("2 patient(s) in both data and external" in str(e) for e in reports[1].errors)
    assert (out / "a.png").exists() and (out / "external" / "a.png").exists()


def test_aasce_paper_preset_shares_one_draw(tmp_path):
    """aasce_paper: external inherits root, split and the subset draw from the data keys."""
    (tmp_path / "data/training").mkdir(parents=True)
    (tmp_path / "labels/training").mkdir(parents=True)
    points = np.array(
        [[30 + 10 * (c % 2), 10 + 14 * k + 6 * (c // 2)] for k in range(17) for c in range(4)],
        np.float64,
    )
    rng = np.random.default_rng(0)
    for p in range(1, 9):
        for film in "AB"[: 1 + p % 2]:
            name = f"sunhl-1th-05-Jan-2017-{p} {film} AP.jpg"
            image = rng.integers(0, 255, (260, 80), dtype=np.uint8)
            cv2.imwrite(str(tmp_path / "data/training" / name), image)
            savemat(tmp_path / "labels/training" / f"{name}.mat", {"p2": points})
    cfg = compose_cfg(
        "data=aasce_paper",
        f"data.root={tmp_path}",
        "data.source_kwargs.n_internal=5",
        "data.source_kwargs.n_external=3",
        "data.source_kwargs.subset_seed=3",
    )
    assert cfg.data.external.root == str(tmp_path) and cfg.data.external.split == "training"
    assert cfg.data.external.source_kwargs.subset_seed == 3
    assert tuple(cfg.data.image_size) == (256, 256) and cfg.data.resize == "stretch"
    data, external = validate(cfg)
    assert (data.n_films, external.n_films) == (5, 3)
    assert data.ok and external.ok  # includes the patient-disjointness cross-check


def test_aasce_preset_geometry():
    cfg = compose_cfg("data=aasce")
    assert (cfg.data.source, cfg.data.split, cfg.data.external) == ("aasce", "training", None)
    assert tuple(cfg.data.image_size) == (512, 256) and cfg.data.resize == "letterbox"
    assert cfg.data.root.endswith("aasce-train")


@pytest.mark.parametrize("preset", ["folder", "aasce", "aasce_paper"])
def test_presets_keep_the_base_schema(preset):
    base = compose_cfg("data=synthetic").data
    cfg = compose_cfg(f"data={preset}").data
    assert set(base) <= set(cfg)
