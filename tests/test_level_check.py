"""The level check across a patient's films (spineseg/data/level_check.py): compared body by
body, the films find a known renaming of one film's labels, the offsets explain every pair,
spineseg-validate-data warns of the odd film and writes its verdicts, and spineseg-score
splits the level-error rate by them."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from spineseg.cli.validate_data import validate
from spineseg.data.level_check import (
    FilmCheck,
    apply_corrections,
    body_corners,
    body_patches,
    check_levels,
    check_patient,
    read_corrections,
    read_offsets,
    settled,
    shift_scores,
)
from spineseg.data.sources import build_source
from spineseg.errors import ConfigError, DataError
from spineseg.labels import level_value
from spineseg.report.film_scores import agreement_text, by_label_agreement

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from label_consistency import closure, compare_runs, patient_clustering  # noqa: E402


@pytest.fixture(scope="module")
def film():
    return build_source("synthetic", n=1, seed=3, height=512, width=256)[0]


def _rename(patches: dict, by: int) -> dict:
    """The same bodies, each named `by` levels higher up the column (a film whose labels
    sit `by` levels lower than the truth)."""
    return {v - by: p for v, p in patches.items() if v - by >= 1}


def _noisy(patches: dict, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {v: p + rng.normal(0, 0.5, p.shape) for v, p in patches.items()}


def test_corners_of_a_tilted_body_come_top_left_first() -> None:
    mask = np.zeros((200, 200), np.uint8)
    box = cv2.boxPoints(((100, 100), (80, 40), 20)).astype(np.int32)
    cv2.fillPoly(mask, [box], 1)
    tl, tr, bl, br = body_corners(mask.astype(bool))
    assert tl[0] < tr[0] and bl[0] < br[0]  # left before right
    assert tl[1] < bl[1] and tr[1] < br[1]  # top before bottom
    width, height = np.linalg.norm(tr - tl), np.linalg.norm(bl - tl)
    assert width == pytest.approx(80, abs=3) and height == pytest.approx(40, abs=3)
    assert np.degrees(np.arctan2(*(tr - tl)[::-1])) == pytest.approx(20, abs=3)
    assert body_corners(np.zeros((5, 5), bool)) is None


def test_a_film_renamed_by_one_level_is_found_one_level_off(film) -> None:
    patches = body_patches(film.image, film.label)
    assert sorted(patches) == sorted(set(np.unique(film.label)) - {0})
    other = _noisy(patches, 0)
    assert max(shift_scores(patches, other).items(), key=lambda kv: kv[1])[0] == 0
    scores = shift_scores(patches, _rename(other, 1))
    assert max(scores, key=scores.get) == 1
    scores = shift_scores(_rename(patches, 1), other)
    assert max(scores, key=scores.get) == -1


def test_offsets_explain_every_pair_and_name_the_odd_films(film) -> None:
    patches = body_patches(film.image, film.label)
    truth = np.array([0, 1, 0, 0, -1])
    films = [_rename(_noisy(patches, k), int(o)) for k, o in enumerate(truth)]
    offsets, scores = check_patient(films)
    np.testing.assert_array_equal(offsets, truth)  # the majority sits at 0
    assert set(scores) == {(i, j) for i in range(5) for j in range(i + 1, 5)}
    # with the majority renamed, the odd film is the other one
    offsets, _ = check_patient([films[1], films[1], films[0]])
    np.testing.assert_array_equal(offsets, [0, 0, -1])


def test_closure_counts_triples_whose_shifts_add_up() -> None:
    # patient 0: offsets 0, 1, 3 -> every triple closes; patient 1: one inconsistent shift
    consistent = {(0, 0, 1): 1, (0, 1, 2): 2, (0, 0, 2): 3}
    broken = {(1, 0, 1): 1, (1, 1, 2): 0, (1, 0, 2): 0}
    flat = {(2, 0, 1): 0, (2, 1, 2): 0, (2, 0, 2): 0}  # no shift: not counted
    assert closure({**consistent, **broken, **flat}, {0: 3, 1: 3, 2: 3}) == 0.5
    assert np.isnan(closure(flat, {2: 3}))


# ----------------------------------------------------------------------------- a dataset

SPINE = [f"Th{i}" for i in range(1, 13)] + [f"L{i}" for i in range(1, 6)]  # AASCE's 17


def _follow_ups(film, n: int, renamed: int | None = None, patient: str = "p") -> list:
    """`n` films of one patient: the same anatomy, each with its own noise; film `renamed`'s
    bodies each named one level higher up (its labels sit one level lower)."""
    out = []
    for k in range(n):
        noise = np.random.default_rng([k, ord(patient[0])]).normal(0, 6, film.image.shape)
        image = np.clip(film.image.astype(float) + noise, 0, 255).astype(np.uint8)
        label = film.label
        if k == renamed:
            label = np.where(label > 1, label - 1, 0).astype(label.dtype)
        out.append(replace(film, id=f"{patient}-{k}", patient_id=patient, image=image,
                           label=label, source_path=f"/d/{patient}-{k}.png"))  # fmt: skip
    return out


def test_check_levels_names_the_renamed_film_and_counts_the_unchecked(film) -> None:
    samples = [*_follow_ups(film, 3, renamed=2), *_follow_ups(film, 2, patient="q"),
               replace(film, id="single", patient_id="single")]  # fmt: skip
    check = check_levels(samples)
    assert check.unchecked == 1
    assert {f.id: (f.offset, f.agrees) for f in check.films.values()} == {
        "p-0": (0, True), "p-1": (0, True), "p-2": (1, False),
        "q-0": (0, True), "q-1": (0, True),
    }  # fmt: skip
    assert check.pair_shift["p", 0, 2] == 1 and check.pair_shift["p", 0, 1] == 0


def test_only_a_majority_says_which_films_are_off() -> None:
    assert settled(np.array([0, 0])) and settled(np.array([0, 0, 1]))
    assert not settled(np.array([0, 1]))  # two films that differ: either may be off
    assert not settled(np.array([0, 0, 1, 1]))  # a tie
    assert not settled(np.array([0, 1, 2]))  # no two agree


def test_check_levels_says_why_it_cannot_run(film) -> None:
    with pytest.raises(DataError, match="no patient has two films"):
        check_levels([film])
    four = np.where(np.isin(film.label, [level_value(v) for v in ("Th8", "Th9", "Th10", "Th11")]),
                    film.label, 0).astype(film.label.dtype)  # fmt: skip
    with pytest.raises(DataError, match="label at most 4 vertebrae"):
        check_levels(_follow_ups(replace(film, label=four), 2))


def _folder(root: Path, film, levels: list[str] = SPINE, solos: int = 1) -> Path:
    """A folder dataset labelling `levels` (T1..L5) as 1..n, with a manifest naming the
    patients: one with three films (the second renamed a level), `solos` with one each."""
    lut = np.zeros(256, np.uint8)
    for value, name in enumerate(levels, start=1):
        lut[level_value(name)] = value
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = []
    singles = [s for k in range(solos) for s in _follow_ups(film, 1, patient=f"solo{k or ''}")]
    for s in [*_follow_ups(film, 3, renamed=1), *singles]:
        cv2.imwrite(str(root / "images" / f"{s.id}.png"), s.image)
        cv2.imwrite(str(root / "masks" / f"{s.id}.png"), lut[s.label])
        rows.append({"id": s.id, "image": f"images/{s.id}.png", "mask": f"masks/{s.id}.png",
                     "patient_id": s.patient_id})  # fmt: skip
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root


def _compose(*overrides: str):
    import spineseg  # noqa: F401  (resolvers)

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("validate_data", overrides=list(overrides))


def test_validate_data_warns_of_the_odd_film_and_writes_the_verdicts(tmp_path, film) -> None:
    root = _folder(tmp_path / "data", film)
    out = tmp_path / "offsets.csv"
    levels = "[" + ",".join(SPINE) + "]"
    (report,) = validate(_compose("data=folder", f"data.root={root}",
                                  f"data.source_kwargs.levels={levels}", f"level_offsets={out}"))  # fmt: skip
    odd = [i for i in report.warnings if "than the patient's other films" in i.problem]
    assert [(Path(i.path).name, i.problem) for i in odd] == [
        ("p-1.png", "labels 1 level lower than the patient's other films")
    ]
    assert report.ok  # a disagreement is a warning: the labels may be right
    assert "1 of 1 patients with several films" in report.notes[0]
    assert "1 films of patients with one film cannot be checked" in report.notes[0]
    verdicts = read_offsets(out)
    assert {k: (v.offset, v.agrees, v.films) for k, v in verdicts.items()} == {
        "p-0": (0, True, 3), "p-1": (1, False, 3), "p-2": (0, True, 3),
    }  # fmt: skip
    with pytest.raises(ConfigError, match="level_offsets=True must be a file name"):
        validate(_compose("data=folder", f"data.root={root}", "level_offsets=true"))
    # masks of the four target vertebrae only: one line saying why, and nothing written
    four = _folder(tmp_path / "four", film, ["Th8", "Th9", "Th10", "Th11"])
    (plain,) = validate(_compose("data=folder", f"data.root={four}", "check_levels=true"))
    assert plain.ok and plain.n_films == 4
    assert plain.notes == [
        "level check not run: the films label at most 4 vertebrae; checking levels across "
        "films needs 8 or more (a source that labels the column, e.g. AASCE, or a folder "
        "dataset declaring data.source_kwargs.levels)"
    ]


def test_review_sheets_show_the_odd_films_bodies_named_as_labelled(tmp_path, film) -> None:
    """One sheet per patient whose films disagree (none for a patient whose films agree), the
    films side by side under their verdicts, and review.csv for the reader's answers; on the
    film renamed one level, the body outlined as Th8 is the one the others call Th9."""
    from spineseg.data import level_review as R

    samples = [*_follow_ups(film, 3, renamed=1), *_follow_ups(film, 2, patient="q")]
    root = _folder(tmp_path / "data", film)
    levels = "[" + ",".join(SPINE) + "]"
    (report,) = validate(_compose("data=folder", f"data.root={root}",
                                  f"data.source_kwargs.levels={levels}", f"review={tmp_path / 'r'}"))  # fmt: skip
    assert any("review sheets of 1 patients" in n for n in report.notes)
    rows = pd.read_csv(tmp_path / "r" / "review.csv", keep_default_na=False)
    assert rows["id"].tolist() == ["p-0", "p-1", "p-2"] and set(rows["sheet"]) == {"p.png"}
    assert rows["verdict"][1] == "labels 1 level lower than the patient's other films"
    assert rows["offset"].tolist() == [0, 1, 0] and rows["expert_offset"].tolist() == [""] * 3
    sheet = cv2.imread(str(tmp_path / "r" / "p.png"))
    assert sheet.shape[0] == R.TITLE_HEIGHT + R.PANEL_HEIGHT
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["p.png", "review.csv"]

    def outline_row(sample, level: int) -> float:  # where Th8 (0) or Th9 (1) is outlined
        drawn = R.panel(sample, "t", "c")[R.TITLE_HEIGHT :]
        return np.nonzero((drawn == R.TARGET_COLOURS[level]).all(axis=2))[0].mean()

    assert R.write_review(samples, check_levels(samples), tmp_path / "pq") == 1  # not q's
    assert sorted(p.name for p in (tmp_path / "pq").iterdir()) == ["p.png", "review.csv"]
    ok, renamed = samples[0], samples[1]
    assert outline_row(ok, 1) - outline_row(ok, 0) > 20  # Th9 is drawn a body below Th8
    assert outline_row(renamed, 0) == pytest.approx(outline_row(ok, 1), abs=3)


def test_score_splits_the_level_error_rate_by_the_verdicts(tmp_path) -> None:
    films = {
        "a": FilmCheck("a", "p", 3, 0, True, True), "b": FilmCheck("b", "p", 3, 0, True, True),
        "c": FilmCheck("c", "p", 3, 1, False, True),
    }  # fmt: skip
    per_image = pd.DataFrame({
        "method": ["soft"] * 4, "id": ["a", "b", "c", "d"],
        "dice": [0.9, 0.8, 0.5, 0.7], "level_error": [0.0, 1.0, 1.0, 0.0],
    })  # fmt: skip
    rows = by_label_agreement(per_image, films)
    got = {r["films"]: (r["n"], r["dice"], r["level_error_rate"]) for r in rows}
    assert got == {"agree": (2, pytest.approx(0.85), 0.5), "differ": (1, 0.5, 1.0),
                   "unchecked": (1, 0.7, 0.0)}  # fmt: skip
    assert all(0 <= r["level_error_ci_low"] <= r["level_error_rate"] <= r["level_error_ci_high"]
               for r in rows)  # fmt: skip
    assert (
        "soft, 2 films whose labels agree with their patient's others: Dice 0.850, level "
        "errors 50.0%" in agreement_text(rows)
    )


def test_read_offsets_names_a_missing_or_foreign_file(tmp_path) -> None:
    with pytest.raises(
        DataError, match="not found: write it with spineseg-validate-data level_offsets"
    ):
        read_offsets(tmp_path / "none.csv")
    (tmp_path / "other.csv").write_text("id,dice\na,0.5\n")
    with pytest.raises(DataError, match="not a level-offsets CSV: no column 'patient'"):
        read_offsets(tmp_path / "other.csv")


def test_corrections_rename_the_odd_film_back_everywhere_the_labels_are_read(
    tmp_path, film
) -> None:
    """The check's verdicts (or a reader's) as data.level_corrections: the renamed film gets
    its labels back, so the check finds every film agreeing and the DataModule's truth of
    that film is its patient's."""
    from spineseg.config import build

    root = _folder(tmp_path / "data", film, solos=3)
    levels = "[" + ",".join(SPINE) + "]"
    data = ["data=folder", f"data.root={root}", f"data.source_kwargs.levels={levels}"]
    offsets = tmp_path / "offsets.csv"
    validate(_compose(*data, f"level_offsets={offsets}"))
    assert read_corrections(offsets) == {"p-0": 0, "p-1": 1, "p-2": 0}
    (fixed,) = validate(_compose(*data, f"data.level_corrections={offsets}", "check_levels=true"))
    assert "0 of 1 patients with several films" in fixed.notes[0] and not fixed.warnings

    def region(*extra: str):
        dm = build("data", [*data, "data.image_size=[128,64]", "data.cache=memory",
                            "data.fractions=[0.5,0.25,0.25]", "data.split_seed=0", *extra])  # fmt: skip
        dm.setup("fit")
        return {i: m for p in dm.parts.values() for i, m in zip(p.ids, p.masks("region"), strict=True)}  # fmt: skip

    before, after = region(), region(f"data.level_corrections={offsets}")
    assert (before["p-1"] != before["p-0"]).mean() > 0.01  # one body off the others
    np.testing.assert_array_equal(after["p-1"], after["p-0"])
    np.testing.assert_array_equal(after["p-0"], before["p-0"])


def test_read_corrections_takes_a_readers_answers_and_names_bad_ones(tmp_path, film) -> None:
    review = tmp_path / "review.csv"
    review.write_text("patient,id,offset,expert_offset\np,a,1,\np,b,-1,1\np,c,0,0\n")
    assert read_corrections(review) == {"b": 1, "c": 0}  # blank: left as labelled
    checked = tmp_path / "offsets.csv"
    checked.write_text("id,patient,films,offset,agrees,settled\na,p,2,1,0,0\nb,q,3,-1,0,1\n")
    assert read_corrections(checked) == {"b": -1}  # without a majority, no film is known off
    (tmp_path / "bad.csv").write_text("id,expert_offset\na,one\n")
    with pytest.raises(DataError, match="line 2: expert_offset='one' is not a whole number"):
        read_corrections(tmp_path / "bad.csv")
    (tmp_path / "foreign.csv").write_text("id,dice\na,0.5\n")
    with pytest.raises(DataError, match="need an id and an expert_offset or offset column"):
        read_corrections(tmp_path / "foreign.csv")
    with pytest.raises(DataError, match="level corrections not found"):
        read_corrections(tmp_path / "none.csv")
    with pytest.raises(DataError, match="none of its 1 films is in this source"):
        apply_corrections([film], {"elsewhere": 1}, review)
    region_only = replace(film, label=(film.label > 0).astype(np.uint8), binary_label=True)
    with pytest.raises(DataError, match="a region-only mask cannot be renamed by level"):
        apply_corrections([region_only], {film.id: 1}, review)
    (same,) = apply_corrections([film], {film.id: 0}, review)
    assert same is film


def test_patient_clustering_counts_pairs_of_one_patients_errors() -> None:
    films = {f"{p}{k}": FilmCheck(f"{p}{k}", p, 3, 0, True, True) for p in "abc" for k in range(3)}
    films["c9"] = FilmCheck("c9", "c", 3, 1, False, True)  # labels off: not counted
    run = {"a0": -1.0, "a1": -0.9, "a2": 1.1, "b0": 0.0, "b1": 0.1, "b2": -0.2,
           "c0": 0.0, "c1": -1.0, "c2": 0.2, "c9": -1.0}  # fmt: skip
    pairs, direction = patient_clustering(run, films, n_shuffles=200)
    assert "(3 patients, 9 films, 4 level errors): 3 pairs both wrong (1 the same way)" in pairs
    assert "patients all right 1, all wrong 1, mixed 1" in pairs
    assert direction.endswith("3 of 4 put the region above the labels' (negative offset)")


def test_compare_runs_pairs_the_same_films_less_the_left_out(tmp_path) -> None:
    def scored(name: str, dice: list[float], errors: list[int]) -> Path:
        folder = tmp_path / name / "film_scores" / "val"
        folder.mkdir(parents=True)
        pd.DataFrame({
            "method": ["soft"] * 4 + ["best_single"] * 4, "id": list("abcd") * 2,
            "dice": dice * 2, "level_error": errors * 2, "level_offset": [0.0] * 8,
        }).to_csv(folder / "per_image.csv", index=False)  # fmt: skip
        return tmp_path / name

    a = scored("a", [0.9, 0.8, 0.7, 0.1], [0, 1, 1, 1])
    b = scored("b", [0.8, 0.7, 0.6, 0.9], [0, 0, 1, 0])
    line = compare_runs(a, b, ["val"], {"d"})
    assert "on 3 films: level errors 2 against 1 (1 in both); Dice 0.800 against 0.700" in line
    assert "paired +0.100 [+0.100, +0.100]" in line
