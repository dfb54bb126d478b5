"""`spineseg-score`: what predict delivers, scored at the films' own resolution, on a tiny run
laid out as training and ensembling write it (random-weight models, synthetic films)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_predict import make_run

from spineseg.cli.score import main as cli_main
from spineseg.data.level_check import FilmCheck, LevelCheck, write_offsets
from spineseg.data.sources import build_spec
from spineseg.ensemble import metrics
from spineseg.ensemble.store import PredictionStore
from spineseg.errors import DataError, StoreError
from spineseg.labels import region_mask, vertebra_labels
from spineseg.predict import load_ensemble
from spineseg.report.film_scores import against, score_films, write_film_scores
from spineseg.report.readme_table import main as table_main
from spineseg.report.report import build_report

SOURCE = {"source": "synthetic", "root": None, "split": None,
          "source_kwargs": {"n": 5, "height": 96, "width": 64, "seed": 3}}  # fmt: skip


def _with_source(run_dir: Path, spec: dict, val_ids: list[str]) -> Path:
    """Record the data source in each manifest, as training does, and the val truth's ids."""
    store = PredictionStore(run_dir)
    for name in store.models():
        manifest = store.read_manifest(name)
        manifest["config"]["data"].update(spec)
        store.write_manifest(name, manifest)
    n = len(val_ids)
    store.write_truth("val", np.zeros((n, 8, 8), np.uint8), val_ids)
    sel_path = run_dir / "ensemble" / "selection.json"
    sel = json.loads(sel_path.read_text())
    sel["postprocess"] = {"soft": "spine"}
    sel_path.write_text(json.dumps(sel))
    return run_dir


@pytest.fixture(scope="module")
def films():
    return build_spec(SOURCE)


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory, films):
    run = make_run(tmp_path_factory.mktemp("score") / "run")
    return _with_source(run, SOURCE, [s.id for s in films[1:4]])


@pytest.fixture(scope="module")
def scored(scored_run):
    return score_films(scored_run, "val", ["soft", "max"], "cpu")


def test_scores_are_those_of_predicts_output_against_the_full_resolution_truth(
    scored_run, scored, films
):
    per_image, results, meta = scored
    held = films[1:4]
    assert meta["n_images"] == {"val": 3} and meta["postprocess"] == ["spine"]
    assert set(per_image["method"]) == {
        "best_single", "soft", "max", "soft+spine", "max+spine", "best_single+spine"
    }  # fmt: skip
    ens = load_ensemble(scored_run, "soft", postprocess="none")
    single = load_ensemble(scored_run, "soft", postprocess="none")
    single.models, single.names, single.inputs, single.weights = (
        single.models[:1],
        ["m0"],
        [0],
        None,
    )
    for method, e in (("soft", ens), ("best_single", single)):
        rows = per_image[per_image["method"] == method].set_index("id")
        assert list(rows.index) == [s.id for s in held]  # the store's order
        for s in held:
            p = e.predict(s.image)
            assert p.labels.shape == s.image.shape
            truth = region_mask(s.label)[None]
            dice = metrics.overlap_metrics(p.labels[None], truth, 2)["dice"][0]
            axis = metrics.spine_axis(vertebra_labels(s.label)[None])
            level = metrics.level_metrics(p.labels[None], axis)["level_error"][0]
            assert rows.loc[s.id, "dice"] == pytest.approx(dice)
            assert rows.loc[s.id, "level_error"] == level
    soft = results.set_index("method").loc["soft"]
    assert soft["n"] == 3 and soft["distance_unit"] == "mm"  # the phantoms know their spacing
    diff = per_image.pivot(index="id", columns="method", values="dice")
    assert soft["dice_diff_vs_best"] == pytest.approx((diff["soft"] - diff["best_single"]).mean())


def test_the_set_is_written_whole_and_the_readme_table_reads_it(scored_run, scored, capsys):
    per_image, results, meta = scored
    out = write_film_scores(scored_run, per_image, results, meta)
    assert out == scored_run / "film_scores" / "val"
    assert {p.name for p in out.iterdir()} == {
        "results.csv", "results.md", "results.json", "per_image.csv"
    }  # fmt: skip
    assert json.loads((out / "results.json").read_text())["resolution"] == "film"
    saved = pd.read_csv(out / "results.csv")
    assert list(saved["method"]) == list(results["method"])
    assert table_main([str(out), "--levels", "--hd95", "--paired"]) == 0
    text = capsys.readouterr().out
    assert "| soft |" in text and "| max |" in text and "val level errors" in text


def test_the_cli_prints_the_table_and_bad_options_are_one_line(scored_run, capsys, restore_logging):
    assert cli_main([f"run_dir={scored_run}", "split=val", "device=cpu"]) == 0
    out = capsys.readouterr().out
    assert "| best single |" in out and "film_scores" in out
    for args, expected in (
        (["rules=[nope]"], "nope"),
        (["rules=soft"], "must be a list of rule names"),
        (["batch_size=0"], "batch_size must be a whole number >= 1, got 0"),
        (["split=train"], "split"),
        (["split=test"], "no 'test' split; there: val"),
        (["atlas=maybe"], "atlas='maybe' must be true or false"),
        (["data_root=/films"], "come from the synthetic source, which reads no folder"),
    ):
        with pytest.raises(SystemExit):
            cli_main([f"run_dir={scored_run}", "device=cpu", *args])
        err = capsys.readouterr().err.strip()
        assert expected in err and len(err.splitlines()) == 1, err


def test_label_offsets_split_each_rate_by_the_level_check(scored_run, films, tmp_path, capsys,
                                                         restore_logging):  # fmt: skip
    ids = [s.id for s in films[1:4]]
    check = LevelCheck({
        ids[0]: FilmCheck(ids[0], "p", 3, 0, True, True),
        ids[1]: FilmCheck(ids[1], "p", 3, 1, False, True),
    }, {}, 1)  # fmt: skip
    write_offsets(tmp_path / "offsets.csv", check)
    assert cli_main([f"run_dir={scored_run}", "device=cpu", f"label_offsets={tmp_path / 'offsets.csv'}"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "soft, 1 films whose labels agree with their patient's others: Dice" in out
    assert "soft, 1 films of patients with one film (not checked)" in out
    meta = json.loads((scored_run / "film_scores" / "val" / "results.json").read_text())
    rows = meta["label_agreement"]["rows"]
    assert {(r["method"], r["films"]) for r in rows} >= {("soft", "agree"), ("soft", "differ"),
                                                         ("best_single", "unchecked")}  # fmt: skip
    report = build_report(scored_run).read_text()  # Table 6 gains the split by agreement
    assert "val, by the labels' agreement" in report
    assert "whose labels differ from their patient's others" in report
    with pytest.raises(SystemExit):
        cli_main([f"run_dir={scored_run}", "device=cpu", f"label_offsets={tmp_path / 'none.csv'}"])
    err = capsys.readouterr().err.strip()
    assert "none.csv: not found: write it with spineseg-validate-data" in err
    assert len(err.splitlines()) == 1
    write_offsets(
        tmp_path / "other.csv", LevelCheck({"x": FilmCheck("x", "p", 2, 0, True, True)}, {}, 0)
    )
    with pytest.raises(SystemExit):  # before any film is scored
        cli_main([f"run_dir={scored_run}", "device=cpu", f"label_offsets={tmp_path / 'other.csv'}"])
    err = capsys.readouterr().err.strip()
    assert "other.csv: none of the run's 3 val films is in it" in err


def test_other_label_corrections_score_beside_the_runs_own(
    scored_run, films, tmp_path, capsys, restore_logging
):
    """A reader's answers rescore a finished run without training it again: the listed film's
    truth is renamed, the others' stay, and the run's own film scores are left as they were."""
    from spineseg.data.level_check import apply_corrections

    ids = [s.id for s in films[1:4]]
    fixes = tmp_path / "review.csv"
    fixes.write_text(f"id,expert_offset\n{ids[1]},1\n")
    own = scored_run / "film_scores" / "val"
    assert cli_main([f"run_dir={scored_run}", "device=cpu", "atlas=false"]) == 0
    before = {p.name: p.read_bytes() for p in own.iterdir()}
    args = [f"run_dir={scored_run}", "device=cpu", "atlas=false", f"level_corrections={fixes}"]
    assert cli_main(args) == 0
    assert {p.name: p.read_bytes() for p in own.iterdir()} == before
    rescored = scored_run / "film_scores" / "val+labels_review"
    assert json.loads((rescored / "results.json").read_text())["labels"] == str(fixes)

    def soft(folder: Path) -> pd.DataFrame:
        table = pd.read_csv(folder / "per_image.csv")
        return table[table["method"] == "soft"].set_index("id")

    assert soft(rescored).loc[ids[0]].equals(soft(own).loc[ids[0]])  # not listed: as it was
    (renamed,) = apply_corrections([films[2]], {ids[1]: 1}, fixes)
    pred = load_ensemble(scored_run, "soft", postprocess="none").predict(films[2].image)
    truth = region_mask(renamed.label)[None]
    assert (truth != region_mask(films[2].label)[None]).any()
    dice = metrics.overlap_metrics(pred.labels[None], truth, 2)["dice"][0]
    assert soft(rescored).loc[ids[1], "dice"] == pytest.approx(dice)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli_main([f"run_dir={scored_run}", "level_corrections=nowhere.csv"])
    assert "nowhere.csv: level corrections not found" in capsys.readouterr().err


def test_films_missing_from_the_source_are_named(tmp_path, films):
    run = _with_source(make_run(tmp_path / "run"), SOURCE, [films[0].id, "syn-internal-9999"])
    with pytest.raises(DataError, match=r"1 of the run's 2 val films.*'syn-internal-9999'"):
        score_films(run, "val")
    with pytest.raises(StoreError, match="no 'external' split"):
        score_films(run, "external")


def test_against_another_run_pairs_the_same_films_and_refuses_others(
    scored_run, scored, films, tmp_path
):
    per_image, results, meta = scored
    write_film_scores(scored_run, per_image, results, meta)
    (same,) = against(per_image, scored_run, "val", ["soft"])
    assert same["n"] == 3 and same["dice_diff"] == 0 and same["p_value"] == 1.0
    assert same["level_errors"] == same["other_level_errors"] == same["level_errors_both"]
    other = _with_source(make_run(tmp_path / "other"), SOURCE, [s.id for s in films[:2]])
    write_film_scores(other, *score_films(other, "val", ["soft"], "cpu"))
    with pytest.raises(StoreError, match="needs the same films"):
        against(per_image, other, "val", ["soft"])
    with pytest.raises(StoreError, match="no 'max'; there: best_single"):
        against(per_image, other, "val", ["max"])
    with pytest.raises(StoreError, match="run `spineseg-score run_dir="):
        against(per_image, tmp_path / "nowhere", "val", ["soft"])


def test_vertebrae_runs_and_the_external_split_are_scored_from_their_own_source(tmp_path, films):
    """Four classes against Th8..Th11 at full resolution; `external` films come from
    data.external, the internal source's films never stand in for them."""
    external = {"source": "synthetic", "root": None, "split": None,
                "source_kwargs": {"n": 2, "domain": "external", "height": 96, "width": 64}}  # fmt: skip
    run = make_run(tmp_path / "run", target="vertebrae")
    _with_source(run, {**SOURCE, "external": external}, [films[0].id])
    others = build_spec(external)
    truth = np.zeros((2, 8, 8), np.uint8)
    PredictionStore(run).write_truth("external", truth, [s.id for s in others])
    per_image, results, _ = score_films(run, "external", ["soft"], "cpu")
    ens = load_ensemble(run, "soft", postprocess="none")
    soft = per_image[per_image["method"] == "soft"].set_index("id")
    assert list(soft.index) == [s.id for s in others]
    for s in others:
        labels = ens.predict(s.image).labels
        want = metrics.overlap_metrics(labels[None], vertebra_labels(s.label)[None], 5)["dice"][0]
        assert soft.loc[s.id, "dice"] == pytest.approx(want)
    assert set(results["split"]) == {"external"}


def test_films_that_moved_are_read_where_data_root_says(tmp_path, films):
    """A folder dataset moved after training: named in one line, then scored from data_root."""
    import cv2

    old, new = tmp_path / "data", tmp_path / "moved"
    (old / "images").mkdir(parents=True)
    (old / "masks").mkdir()
    for s in films[:3]:
        cv2.imwrite(str(old / "images" / f"{s.id}.png"), s.image)
        cv2.imwrite(str(old / "masks" / f"{s.id}.png"), region_mask(s.label) * 255)
    spec = {"source": "folder", "root": str(old), "split": None, "source_kwargs": {}}
    ids = [s.id for s in films[:2]]
    run = _with_source(make_run(tmp_path / "run"), spec, ids)
    old.rename(new)
    with pytest.raises(DataError, match=str(old)):
        score_films(run, "val")
    per_image, _, _ = score_films(run, "val", data_root=str(new))
    assert list(per_image.loc[per_image["method"] == "soft", "id"]) == ids


def test_the_best_single_model_is_scored_at_the_threshold_selection_recorded(tmp_path, films):
    run = _with_source(make_run(tmp_path / "run"), SOURCE, [s.id for s in films[:2]])
    path = run / "ensemble" / "selection.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "model_threshold": 0.3}))
    per_image, results, _ = score_films(run, "val", ["soft"], "cpu")
    member = load_ensemble(run, "soft", postprocess="none").member("m0", 0.3)
    best = per_image[per_image["method"] == "best_single"].set_index("id")
    for s in films[:2]:
        labels = member.predict(s.image).labels
        want = metrics.overlap_metrics(labels[None], region_mask(s.label)[None], 2)["dice"][0]
        assert best.loc[s.id, "dice"] == pytest.approx(want)
    assert results.set_index("method").loc["best_single", "threshold"] == 0.3


def test_the_film_blind_atlas_of_the_training_films_is_scored_beside_the_models(tmp_path, films):
    """With the run's splits.csv, `atlas` is the training films' mean region placed on every
    held-out film at its own size, scored with the same metrics; without it, no such row."""
    from spineseg.data.splits import write_splits_csv
    from spineseg.ensemble.baseline import fit_atlas, on_grid

    held, train = films[1:4], [films[0], films[4]]
    run = _with_source(make_run(tmp_path / "run"), SOURCE, [s.id for s in held])
    assignment = {**{s.id: "train" for s in train}, **{s.id: "val" for s in held}}
    write_splits_csv(run / "splits.csv", assignment, {i: i for i in assignment})
    per_image, results, meta = score_films(run, "val", ["soft"], "cpu")
    atlas = fit_atlas([on_grid(region_mask(s.label)) for s in train], 2)
    assert meta["atlas"] == {"threshold": atlas.threshold, "n_training_films": 2}
    rows = per_image[per_image["method"] == "atlas"].set_index("id")
    assert list(rows.index) == [s.id for s in held]
    for s in held:
        placed = atlas.labels(s.image.shape)
        truth = region_mask(s.label)[None]
        want = metrics.overlap_metrics(placed[None], truth, 2)["dice"][0]
        axis = metrics.spine_axis(vertebra_labels(s.label)[None])
        assert rows.loc[s.id, "dice"] == pytest.approx(want)
        assert (
            rows.loc[s.id, "level_error"]
            == metrics.level_metrics(placed[None], axis)["level_error"][0]
        )
    row = results.set_index("method").loc["atlas"]
    assert row["k"] == 1 and row["threshold"] == atlas.threshold
    assert "atlas" not in set(score_films(run, "val", ["soft"], "cpu", atlas=False)[0]["method"])
