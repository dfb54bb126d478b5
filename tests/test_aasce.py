"""`aasce` source on tiny fake AASCE trees: mask geometry vs the landmarks, .mat vs CSV,
patient keys, the internal/external benchmark subsets, and every bad input."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy.io import savemat

from spineseg.data.aasce import (
    aasce_source,
    patient_key,
    polygon_area,
    select_subset,
    vertebra_polygons,
)
from spineseg.data.sources import build_source
from spineseg.errors import ConfigError, DataError
from spineseg.labels import level_value, vertebra_labels

H, W = 260, 80


def spine(shift: float = 0.0) -> np.ndarray:
    """68 x 2 (x, y) corners of 17 tilted vertebrae, in the files' TL, TR, BL, BR order."""
    points = []
    for k in range(17):
        cx, cy = 40 + 6 * np.sin(k / 3) + shift, 12 + 14 * k
        angle = 0.15 * np.sin(k)
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        for dx, dy in ((-12, -5), (12, -5), (-12, 5), (12, 5)):
            points.append(rot @ [dx, dy] + [cx, cy])
    return np.array(points)


def make_tree(
    root: Path,
    films: dict[str, np.ndarray],
    fmt: str = "mat",
    split: str = "training",
    images: bool = True,
) -> Path:
    """data/<split>/<name> (noise JPEGs) + labels/<split>/ as .mat files or CSVs."""
    data, labels = root / "data" / split, root / "labels" / split
    data.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, points in films.items():
        if images:
            cv2.imwrite(str(data / name), rng.integers(0, 255, (H, W), dtype=np.uint8))
        if fmt == "mat":
            savemat(labels / f"{name}.mat", {"p2": points})
    if fmt == "csv":
        (labels / "filenames.csv").write_text("".join(f"{n}\n" for n in films))
        rows = [np.concatenate([p[:, 0] / W, p[:, 1] / H]) for p in films.values()]
        np.savetxt(labels / "landmarks.csv", np.array(rows), delimiter=",", fmt="%.10f")
    return root


NAMES = [
    "sunhl-1th-02-Jan-2017-162 A AP.jpg",
    "sunhl-1th-02-Jan-2017-162 B AP.jpg",
    "sunhl-1th-06-Jan-2017-192 A AP.jpg",
    "sunhl-1th-09-Jan-2017-192 B AP.jpg",
    "sunhl-1th-20-Jul-2016-coronal5.jpg",
]


@pytest.fixture
def tree(tmp_path) -> Path:
    return make_tree(tmp_path, {n: spine(i) for i, n in enumerate(NAMES)})


def test_loads_films_with_th8_to_th11_labels(tree):
    samples = {s.id: s for s in aasce_source(root=tree)}
    assert sorted(samples) == sorted(Path(n).stem for n in NAMES)
    sample = samples["sunhl-1th-02-Jan-2017-162 A AP"]
    assert sample.image.shape == sample.label.shape == (H, W)
    assert sample.label.dtype == np.uint8 and not sample.binary_label
    # every vertebra T1..L5 carries its level value; Th8..Th11 are 1..4 of the target
    assert set(np.unique(sample.label).tolist()) == {
        0,
        *range(level_value("Th1"), level_value("L5") + 1),
    }
    assert set(np.unique(vertebra_labels(sample.label)).tolist()) == {0, 1, 2, 3, 4}
    assert sample.source_path == str(tree / "data/training" / NAMES[0])
    assert sample.meta["landmarks"].shape == (68, 2)
    sample.check()


def test_mask_geometry_matches_the_landmark_polygons(tree):
    points = spine(0)
    (sample,) = [s for s in aasce_source(root=tree) if s.id.endswith("162 A AP")]
    for value, quad in enumerate(vertebra_polygons(points), start=1):
        k = 6 + value  # Th8 is vertebra k = 7
        np.testing.assert_allclose(quad.mean(0), points[4 * k : 4 * k + 4].mean(0))
        ys, xs = np.nonzero(vertebra_labels(sample.label) == value)
        expected = polygon_area(quad)
        perimeter = np.linalg.norm(quad - np.roll(quad, 1, axis=0), axis=1).sum()
        # cv2.fillPoly also sets the pixels the outline crosses: about half a pixel more
        # all round than the exact area, never less.
        assert 0 <= len(xs) - expected <= 0.6 * perimeter + 4, (value, len(xs), expected)
        assert np.hypot(xs.mean() - quad[:, 0].mean(), ys.mean() - quad[:, 1].mean()) < 0.5
    # Every vertebra T1..L5 is drawn with its level, top to bottom.
    levels = range(level_value("Th1"), level_value("L5") + 1)
    rows = [np.nonzero(sample.label == v)[0].mean() for v in levels]
    assert rows == sorted(rows)
    assert not sample.label[: int(points[:, 1].min()) - 1].any()


def test_corner_order_in_the_file_does_not_matter(tmp_path):
    points = spine()
    shuffled = points.copy()
    rng = np.random.default_rng(1)
    for k in range(17):
        shuffled[4 * k : 4 * k + 4] = points[4 * k + rng.permutation(4)]
    a = aasce_source(root=make_tree(tmp_path / "a", {"x.jpg": points}))[0]
    b = aasce_source(root=make_tree(tmp_path / "b", {"x.jpg": shuffled}))[0]
    np.testing.assert_array_equal(a.label, b.label)
    # Drawing the file order as-is would give bow-ties: the sorted quad is a proper polygon.
    quads = vertebra_polygons(shuffled)
    assert all(polygon_area(q) == pytest.approx(240, rel=1e-6) for q in quads)


def test_mat_and_csv_agree(tmp_path):
    films = {n: spine(i) for i, n in enumerate(NAMES[:3])}
    mat = {s.id: s for s in aasce_source(root=make_tree(tmp_path / "m", films))}
    csv = {s.id: s for s in aasce_source(root=make_tree(tmp_path / "c", films, fmt="csv"))}
    assert mat.keys() == csv.keys()
    for key in mat:
        np.testing.assert_array_equal(mat[key].label, csv[key].label)
        np.testing.assert_allclose(
            mat[key].meta["landmarks"], csv[key].meta["landmarks"], atol=1e-3
        )


def test_landmarks_option_picks_the_format(tmp_path):
    films = {"x.jpg": spine()}
    root = make_tree(tmp_path, films, fmt="csv")
    make_tree(tmp_path, films, fmt="mat", images=False)
    assert len(aasce_source(root=root, landmarks="csv")) == 1
    assert len(aasce_source(root=root, landmarks="mat")) == 1
    with pytest.raises(ConfigError, match="valid choices: auto, csv, mat"):
        aasce_source(root=root, landmarks="json")


def test_test_split_and_registry(tmp_path):
    root = make_tree(tmp_path, {"t.jpg": spine()}, split="test")
    assert [s.id for s in build_source("aasce", root=str(root), split="test")] == ["t"]
    with pytest.raises(DataError, match="data/training"):
        aasce_source(root=root)
    with pytest.raises(ConfigError, match="valid choices: test, training"):
        aasce_source(root=root, split="val")


@pytest.mark.parametrize(
    ("name", "patient", "recognised"),
    [
        ("sunhl-1th-02-Jan-2017-162 A AP.jpg", "162", True),
        ("sunhl-1th-02-Jan-2017-162 B AP.jpg", "162", True),
        ("sunhl-1th-06-Jan-2017-192 A AP.jpg", "192", True),
        ("sunhl-1th-09-Jan-2017-192 B AP.jpg", "192", True),
        ("sunhl-1th-21-Nov-2016-138 D AP2.jpg", "138", True),
        ("sunhl-1th-22-Nov-2016-142 A AP (2).jpg", "142", True),
        ("sunhl-1th-20-Jul-2016-7 A AP", "7", True),
        ("sunhl-1th-20-Jul-2016-coronal5.jpg", "sunhl-1th-20-Jul-2016-coronal5", False),
        ("film_0001.jpg", "film_0001", False),
    ],
)
def test_patient_key(name, patient, recognised):
    assert patient_key(name) == (patient, recognised)


def test_patient_ids_and_fallback_note(tree):
    samples = {s.id: s for s in aasce_source(root=tree)}
    patients = {k: s.patient_id for k, s in samples.items()}
    assert patients["sunhl-1th-06-Jan-2017-192 A AP"] == patients["sunhl-1th-09-Jan-2017-192 B AP"]
    coronal = samples["sunhl-1th-20-Jul-2016-coronal5"]
    assert coronal.patient_id == coronal.id and coronal.meta["patient_key"] == "stem"
    assert "not recognised" in coronal.meta["warnings"][0]
    assert samples["sunhl-1th-02-Jan-2017-162 A AP"].meta["patient_key"] == "file name"


def _names(n_patients: int) -> list[str]:
    """Patients 1..n with 1-3 films each, like the real data."""
    return [
        f"sunhl-1th-05-Jan-2017-{p} {'ABC'[f]} AP.jpg"
        for p in range(1, n_patients + 1)
        for f in range(1 + p % 3)
    ]


def test_subsets_are_sized_right_disjoint_and_deterministic():
    names = _names(40)
    internal = select_subset(names, "internal", 30, 12, seed=0)
    external = select_subset(names, "external", 30, 12, seed=0)
    assert (len(internal), len(external)) == (30, 12)
    patients_in = {patient_key(n)[0] for n in internal}
    patients_ex = {patient_key(n)[0] for n in external}
    assert not patients_in & patients_ex
    # Whole patients only: every film of a chosen patient is in the subset.
    assert {n for n in names if patient_key(n)[0] in patients_in} == internal
    assert select_subset(names, "internal", 30, 12, seed=0) == internal
    assert select_subset(names, "internal", 30, 12, seed=1) != internal
    with pytest.raises(ConfigError, match="subset external needs 100 films"):
        select_subset(names, "external", 30, 100, seed=0)


def test_subsets_through_the_source(tmp_path):
    names = _names(8)  # 16 films
    root = make_tree(tmp_path, {n: spine() for n in names})
    internal = aasce_source(root=root, subset="internal", n_internal=7, n_external=4)
    external = aasce_source(root=root, subset="external", n_internal=7, n_external=4)
    assert (len(internal), len(external)) == (7, 4)
    assert not {s.patient_id for s in internal} & {s.patient_id for s in external}
    everything = aasce_source(root=root, subset="all", max_images=3)
    assert [s.id for s in everything] == sorted(Path(n).stem for n in names)[:3]
    with pytest.raises(ConfigError, match="valid choices: all, external, internal"):
        aasce_source(root=root, subset="holdout")


# ----------------------------------------------------------------------------- bad input


def expect_error(root: Path, culprit: str, fragment: str) -> None:
    """on_error=raise names the culprit; on_error=skip records it and keeps the others."""
    with pytest.raises(DataError) as info:
        aasce_source(root=root)
    message = str(info.value)
    assert culprit in message and fragment.lower() in message.lower(), message
    skipped: list = []
    kept = aasce_source(root=root, on_error="skip", skipped=skipped)
    assert any(culprit in path and fragment.lower() in p.lower() for path, p in skipped), skipped
    assert kept, "the good films still load"


def test_wrong_shape_mat(tree):
    savemat(tree / "labels/training" / f"{NAMES[1]}.mat", {"p2": spine()[:67]})
    expect_error(tree, f"{NAMES[1]}.mat", "shape (67, 2)")


def test_mat_without_p2(tree):
    savemat(tree / "labels/training" / f"{NAMES[1]}.mat", {"pts": spine()})
    expect_error(tree, f"{NAMES[1]}.mat", "no 'p2'")


def test_nan_landmarks_in_csv(tmp_path):
    bad = spine()
    bad[30, 1] = np.nan
    root = make_tree(tmp_path, {"a.jpg": spine(), "b.jpg": bad}, fmt="csv")
    expect_error(root, "landmarks.csv (row of b.jpg)", "landmarks [30] are NaN")


def test_landmarks_outside_the_image(tree):
    points = spine()
    points[29, 0] = W + 3  # a Th8 corner: it would be drawn
    savemat(tree / "labels/training" / f"{NAMES[2]}.mat", {"p2": points})
    expect_error(tree, f"{NAMES[2]}.mat", "outside the 80x260 image")


def test_undrawn_landmark_slightly_outside_is_only_a_warning(tmp_path):
    points = spine()
    points[67, 1] = H + 5  # L5, 2% below the film: cropped lumbar spine, as on real films
    (sample,) = aasce_source(root=make_tree(tmp_path, {"a.jpg": points}))
    assert any("[67]" in w for w in sample.meta["warnings"])
    points[67, 1] = H * 1.5  # far outside: wrong image or wrong units
    savemat(tmp_path / "labels/training/a.jpg.mat", {"p2": points})
    with pytest.raises(DataError, match="outside"):
        aasce_source(root=tmp_path)


def test_unnormalised_csv_is_caught(tmp_path):
    root = make_tree(tmp_path, {"a.jpg": spine()}, fmt="csv")
    table = np.loadtxt(root / "labels/training/landmarks.csv", delimiter=",")
    table[:68] *= W  # pixels where fractions are expected
    np.savetxt(root / "labels/training/landmarks.csv", table[None], delimiter=",")
    with pytest.raises(DataError, match=r"landmarks\.csv .*outside"):
        aasce_source(root=root)


def test_missing_image_for_a_label(tree):
    (tree / "data/training" / NAMES[3]).unlink()
    expect_error(tree, f"{NAMES[3]}.mat", "missing image")


def test_image_without_landmarks(tree):
    (tree / "labels/training" / f"{NAMES[3]}.mat").unlink()
    expect_error(tree, NAMES[3], "has no landmarks")


def test_duplicate_ids(tmp_path):
    root = make_tree(tmp_path, {"a.jpg": spine(), "a.png": spine(), "b.jpg": spine()})
    expect_error(root, "a.jpg.mat", "duplicate id 'a': a.jpg, a.png")


def test_duplicate_rows_in_filenames_csv(tmp_path):
    root = make_tree(tmp_path, {"a.jpg": spine(), "b.jpg": spine()}, fmt="csv")
    labels = root / "labels/training"
    (labels / "filenames.csv").write_text("a.jpg\nb.jpg\na.jpg\n")
    table = np.loadtxt(labels / "landmarks.csv", delimiter=",")
    np.savetxt(labels / "landmarks.csv", np.vstack([table, table[:1]]), delimiter=",")
    expect_error(root, "landmarks.csv", "duplicate id 'a'")


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda t: t[:, :-1], "135 values per row, expected 136"),
        (lambda t: t[:1], "1 rows but filenames.csv lists 2 films"),
    ],
)
def test_malformed_landmarks_csv(tmp_path, edit, fragment):
    root = make_tree(tmp_path, {"a.jpg": spine(), "b.jpg": spine()}, fmt="csv")
    path = root / "labels/training/landmarks.csv"
    np.savetxt(path, edit(np.loadtxt(path, delimiter=",")), delimiter=",")
    with pytest.raises(DataError, match=r"landmarks\.csv") as info:
        aasce_source(root=root)
    assert fragment in str(info.value)
    skipped: list = []
    assert aasce_source(root=root, on_error="skip", skipped=skipped) == []
    assert fragment in skipped[0][1]


def test_bad_root(tmp_path):
    with pytest.raises(DataError, match="not an AASCE tree"):
        aasce_source(root=tmp_path)
    with pytest.raises(DataError, match=r"nowhere: folder not found; data\.root is the AASCE"):
        aasce_source(root=tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"data\.root"):
        aasce_source(root=None)
    (tmp_path / "data/training").mkdir(parents=True)
    (tmp_path / "labels/training").mkdir(parents=True)
    with pytest.raises(DataError, match=r"filenames\.csv"):
        aasce_source(root=tmp_path)


def test_a_vertebra_whose_landmarks_are_out_of_the_column_is_not_drawn(tmp_path):
    """Some AASCE files put an off-film vertebra's landmarks near the top (L5 above T1):
    it is left out with a warning instead of teaching a level where it is not."""
    points = spine()
    moved = points.copy()
    moved[64:68] = points[0:4] - [0, 2]  # L5's corners on top of T1
    sample = aasce_source(root=make_tree(tmp_path, {"x.jpg": moved}))[0]
    assert not (sample.label == level_value("L5")).any()
    assert (sample.label == level_value("L4")).any() and (sample.label == level_value("Th1")).any()
    assert any("['L5'] not drawn" in w for w in sample.meta["warnings"])
    reference = aasce_source(root=make_tree(tmp_path / "ref", {"x.jpg": points}))[0]
    np.testing.assert_array_equal(vertebra_labels(sample.label), vertebra_labels(reference.label))
