"""The paper-style report of one run directory: Markdown + self-contained HTML + PNG figures.

Everything is read back from files the sweep and the ensemble step wrote (manifests,
selection.json, results.csv/json, per_image.csv), so the report can be rebuilt at any time
without touching a model, and a missing step (no ensemble, no ablation) becomes a note
instead of an error.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from spineseg.ensemble.store import PredictionStore
from spineseg.errors import SpinesegError, StoreError
from spineseg.names import ENSEMBLE_DIR, PREDICTIONS_DIR, SELECTION, STORED_SPLITS
from spineseg.report import figures as figs
from spineseg.report.tables import fmt, level_text, num, rule_rows, rules_table
from spineseg.utils.io import atomic_open, atomic_write_text, staged_dir
from spineseg.utils.paths import not_a_run

SELECTED_COLOR = "#d62728"
OTHER_COLOR = "#c6dbef"
CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.85em; }
th, td { border: 1px solid #bbb; padding: 3px 7px; text-align: right; }
th { background: #eef2f7; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
.note { color: #555; font-style: italic; }
"""


class ReportError(SpinesegError):
    """The run directory cannot be reported on (missing, or no predictions in it)."""


@dataclass
class RunData:
    """Everything the report reads from one run directory; None where a step did not run."""

    run_dir: Path
    models: pd.DataFrame
    selection: dict[str, Any] | None = None
    results: pd.DataFrame | None = None
    per_image: pd.DataFrame | None = None
    results_json: dict[str, Any] = field(default_factory=dict)
    ablation: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)
    #: split -> `spineseg-score`'s results (film_scores/<split>/) for this very selection
    film_results: dict[str, pd.DataFrame] = field(default_factory=dict)
    #: split -> its rates by the level check of the labels (`spineseg-score label_offsets=`)
    film_agreement: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


# ---------------------------------------------------------------------- loading
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise StoreError(f"{path}: unreadable JSON ({err})") from err


def load_models(run_dir: str | Path, selection: dict[str, Any] | None = None) -> pd.DataFrame:
    """One row per model folder in the store (any status), with val/test/external Dice/IoU
    from its manifest; `selected` marks the top-k of `selection`, `sel_val_dice` is the
    validation Dice the selection ranked by (recomputed from the stored probabilities)."""
    store = PredictionStore(run_dir)
    chosen = set((selection or {}).get("models") or [])
    scores = (selection or {}).get("scores") or {}
    rows = []
    for name in store.models(status=None):
        try:
            m = store.read_manifest(name) or {}
            status = m.get("status", "no manifest")
        except StoreError as err:
            m, status = {"error": str(err)}, "unreadable"
        val, test = m.get("val_metrics") or {}, m.get("test_metrics") or {}
        preset = m.get("preset") or {}
        rows.append(
            {
                "model": name,
                "arch": preset.get("arch"),
                "encoder": preset.get("encoder"),
                "status": status,
                "selected": name in chosen,
                "val_dice": num(val.get("dice")),
                "val_iou": num(val.get("iou")),
                "sel_val_dice": num(scores.get(name)),
                "test_dice": num(test.get("test/dice")),
                "test_iou": num(test.get("test/iou")),
                "external_dice": num(test.get("external/dice")),
                "external_iou": num(test.get("external/iou")),
                "elapsed_s": num(m.get("elapsed_s")),
                "error": m.get("error"),
            }
        )
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    rank_by = df["sel_val_dice"].where(df["sel_val_dice"].notna(), df["val_dice"])
    df["rank_score"] = rank_by
    return df.sort_values(["rank_score", "model"], ascending=[False, True]).reset_index(drop=True)


def load_ablation(run_dir: str | Path, main_models: pd.DataFrame | None = None) -> pd.DataFrame:
    """Val/test/external Dice of every model in `<run_dir>/ablation/augment-<v>/`, plus the
    main sweep's row for the same models (its own augment setting) for reference."""
    root = Path(run_dir) / "ablation"
    rows: list[dict[str, Any]] = []
    subs = [p for p in root.glob("augment-*") if p.is_dir()]
    for sub in sorted(subs, key=lambda p: (p.name != "augment-none", p.name)):  # off first
        value = sub.name.removeprefix("augment-")
        if not (sub / PREDICTIONS_DIR).is_dir():
            rows.append({"augment": value, "model": "-", "status": "no predictions"})
            continue
        for _, r in load_models(sub).iterrows():
            rows.append({"augment": value, **_ablation_cols(r)})
    if rows and main_models is not None and not main_models.empty:
        names = {r["model"] for r in rows}
        setting = _config_value(Path(run_dir), ("data", "augment"))
        for _, r in main_models[main_models["model"].isin(names)].iterrows():
            rows.append({"augment": f"{setting} (main sweep)", **_ablation_cols(r)})
    return pd.DataFrame(rows)


def _ablation_cols(r: pd.Series) -> dict[str, Any]:
    return {
        "model": r["model"],
        "status": r["status"],
        "val_dice": r["val_dice"],
        "test_dice": r["test_dice"],
        "external_dice": r["external_dice"],
    }


def _first_config(run_dir: Path) -> dict[str, Any]:
    """The resolved training config of the first complete model (they share data/trainer)."""
    store = PredictionStore(run_dir)
    for name in store.models(status="complete"):
        try:
            cfg = (store.read_manifest(name) or {}).get("config")
        except StoreError:
            continue
        if isinstance(cfg, dict) and cfg:
            return cfg
    return {}


def _config_value(run_dir: Path, keys: tuple[str, ...]) -> Any:
    node: Any = _first_config(run_dir)
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    return node


def _check_one_set(ens: Path, selection: dict | None, results: dict) -> None:
    """selection.json and results.json must come from one `spineseg-ensemble` run: a report
    that pairs one set's models with another's numbers would be wrong without a word."""
    ids = {(selection or {}).get("set_id"), results.get("set_id")}
    if len(ids) > 1:
        raise ReportError(
            f"{ens}: selection.json and results.json come from different ensemble runs "
            f"(set_id {(selection or {}).get('set_id')} vs {results.get('set_id')}); "
            f"rerun `spineseg-ensemble run_dir={ens.parent}`"
        )


def load_run(run_dir: str | Path) -> RunData:
    """Read a run directory; raises ReportError when there is nothing to report."""
    run_dir = Path(run_dir)
    problem = not_a_run(run_dir)
    if problem:
        raise ReportError(problem)
    notes: list[str] = []
    ens = run_dir / ENSEMBLE_DIR
    selection = _read_json(run_dir / SELECTION) if (run_dir / SELECTION).is_file() else None
    models = load_models(run_dir, selection)
    if models.empty:
        raise ReportError(f"{run_dir / 'predictions'}: no model folders")
    data = RunData(run_dir, models, selection, notes=notes)
    if (ens / "results.csv").is_file():
        data.results = pd.read_csv(ens / "results.csv")
        if (ens / "per_image.csv").is_file():
            data.per_image = pd.read_csv(ens / "per_image.csv")
        if (ens / "results.json").is_file():
            data.results_json = _read_json(ens / "results.json")
        _check_one_set(ens, selection, data.results_json)
    else:
        notes.append(
            "The ensemble step has not run yet (no ensemble/results.csv): run "
            f"`spineseg-ensemble run_dir={run_dir}` and rebuild the report."
        )
    if (run_dir / "ablation").is_dir():
        data.ablation = load_ablation(run_dir, models)
    load_film_scores(data)
    return data


def load_film_scores(data: RunData) -> None:
    """`spineseg-score`'s sets of this run, where they belong to its current selection; one
    scored before the ensemble was chosen again becomes a note, never a silent table."""
    from spineseg.report.film_scores import film_scores_dir, scored_for

    current = (data.selection or {}).get("set_id")
    for split in STORED_SPLITS:
        folder = film_scores_dir(data.run_dir, split)
        if not (folder / "results.csv").is_file():
            continue
        if not scored_for(data.run_dir, split, current):
            data.notes.append(
                f"{folder} scores an earlier selection of the ensemble: run "
                f"`spineseg-score run_dir={data.run_dir} split={split}` again."
            )
            continue
        data.film_results[split] = pd.read_csv(folder / "results.csv")
        agreement = (_read_json(folder / "results.json") or {}).get("label_agreement") or {}
        if agreement.get("rows"):
            data.film_agreement[split] = agreement["rows"]


# ---------------------------------------------------------------------- tables
def models_table(models: pd.DataFrame) -> pd.DataFrame:
    """Table (a): every model of the sweep, best validation Dice first, selected marked."""
    has_sel = models["sel_val_dice"].notna().any()
    out = pd.DataFrame(
        {
            "rank": np.arange(1, len(models) + 1),
            "model": models["model"],
            "arch / encoder": [
                f"{a} / {e}" for a, e in zip(models["arch"], models["encoder"], strict=True)
            ],
            "status": models["status"],
            "selected": ["✓" if s else "" for s in models["selected"]],
        }
    )
    if has_sel:
        out["val Dice (selection)"] = [fmt(v) for v in models["sel_val_dice"]]
    for col, label in (
        ("val_dice", "val Dice"),
        ("val_iou", "val IoU"),
        ("test_dice", "test Dice"),
        ("test_iou", "test IoU"),
        ("external_dice", "external Dice"),
        ("external_iou", "external IoU"),
    ):
        out[label] = [fmt(v) for v in models[col]]
    out["time (s)"] = [fmt(v, 1) for v in models["elapsed_s"]]
    return out


def failures_table(models: pd.DataFrame) -> pd.DataFrame:
    """Models that did not complete, with the error their manifest recorded."""
    bad = models[models["status"] != "complete"]
    errors = [
        re.sub(r"\s+", " ", str(e or "")).replace("|", "/")[:200] or "-" for e in bad["error"]
    ]
    return pd.DataFrame({"model": bad["model"], "status": bad["status"], "error": errors})


def ablation_table(ablation: pd.DataFrame) -> pd.DataFrame:
    """Table (b): augmentation setting x model, val/test/external Dice."""
    out = ablation.reindex(columns=["augment", "model", "status"]).fillna("-")
    for col, label in (
        ("val_dice", "val Dice"),
        ("test_dice", "test Dice"),
        ("external_dice", "external Dice"),
    ):
        out[label] = [fmt(v) for v in ablation.get(col, pd.Series([math.nan] * len(ablation)))]
    return out


def distance_unit(data: RunData) -> str | None:
    """The HD95/ASSD unit from results.json ("mm" or "px"; joined when splits differ)."""
    units = data.results_json.get("distance_unit") or {}
    return "/".join(dict.fromkeys(str(u) for u in units.values())) or None


def key_config(data: RunData) -> dict[str, Any]:
    """The settings a reader needs to interpret the numbers."""
    cfg = _first_config(data.run_dir)
    dcfg, tcfg = cfg.get("data") or {}, cfg.get("trainer") or {}
    ens = data.results_json.get("config") or {}
    sel = data.selection or {}
    external = dcfg.get("external") or {}
    return {
        "run directory": str(data.run_dir),
        "data source": dcfg.get("source", "n/a"),
        "external source": external.get("source", "none") if external else "none",
        "target": dcfg.get("target", "n/a"),
        "image size (H×W)": "×".join(map(str, dcfg.get("image_size") or [])) or "n/a",
        "augmentation": dcfg.get("augment", "n/a"),
        "max epochs": tcfg.get("max_epochs", "n/a"),
        "models in sweep": len(data.models),
        "complete models": int((data.models["status"] == "complete").sum()),
        "k (selected)": sel.get("k", ens.get("top_k", "n/a")),
        "selection method": sel.get("method", ens.get("selection", "n/a")),
        "validation images": sel.get("n_val", "n/a"),
        "bootstrap resamples": ens.get("n_boot", "n/a"),
    }


# ---------------------------------------------------------------------- figures
def plot_model_ranking(models: pd.DataFrame, path: str | Path, title: str | None = None) -> Path:
    """Horizontal bars of validation Dice, best at the top, the selected models highlighted."""
    m = models[np.isfinite(models["rank_score"].astype(float))]
    fig = Figure(figsize=(7, max(2.5, 0.32 * len(m) + 1.2)))
    ax = fig.add_subplot()
    y = np.arange(len(m))[::-1]
    colors = [SELECTED_COLOR if s else OTHER_COLOR for s in m["selected"]]
    ax.barh(y, m["rank_score"].astype(float), color=colors, edgecolor="black", linewidth=0.5)
    ax.set_yticks(y, list(m["model"]), fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("validation Dice")
    ax.set_title(title or "models ranked by validation Dice (selected in red)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return figs.save_figure(fig, path)


def _copy(src: Path, dst: Path) -> Path:
    with atomic_open(dst, "wb") as fh:
        fh.write(src.read_bytes())
    return dst


def make_figures(data: RunData, out_dir: Path) -> dict[str, Path]:
    """Every report figure that the available data allows; keys are captions."""
    out: dict[str, Path] = {}
    if data.models["rank_score"].notna().any():
        out["Models ranked by validation Dice (selected top-k in red)"] = plot_model_ranking(
            data.models, out_dir / "model_ranking.png"
        )
    if data.results is not None and not data.results.empty:
        rules = rule_rows(data.results)
        out["Voting rules vs best single model: mean Dice with 95% bootstrap CI"] = (
            figs.plot_dice_bars(rules, out_dir / "rules_dice_ci.png", title="Dice")
        )
    if data.per_image is not None and not data.per_image.empty:
        for split in dict.fromkeys(data.per_image["split"]):
            part = data.per_image[data.per_image["split"] == split]
            order = list(dict.fromkeys(part["method"]))
            out[f"Per-image Dice, {split}"] = figs.plot_dice_boxes(
                part,
                out_dir / f"per_image_{split}.png",
                title=f"per-image Dice, {split}",
                order=order,
            )
    for src in sorted((data.run_dir / ENSEMBLE_DIR / "figures").glob("reliability_*.png")):
        split = src.stem.removeprefix("reliability_")
        out[f"Reliability, {split}: before and after temperature scaling"] = _copy(
            src, out_dir / src.name
        )
    for src in sorted((data.run_dir / ENSEMBLE_DIR / "figures").glob("gallery_*.png")):
        split = src.stem.removeprefix("gallery_")
        out[f"Best and worst {split} images (soft vote): truth, prediction, disagreement"] = _copy(
            src, out_dir / src.name
        )
    return out


# ---------------------------------------------------------------------- assembly
@dataclass
class Section:
    """One heading with optional prose, tables and notes; rendered to Markdown and HTML."""

    title: str
    text: list[str] = field(default_factory=list)
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)


def _sections(data: RunData) -> list[Section]:
    cfg = key_config(data)
    setup = Section(
        "Setup",
        [
            "Model selection (top-k and, where tuned, thresholds) used the **validation split "
            "only**; test and external images were never seen before the final evaluation.",
            *data.notes,
        ],
        [("", pd.DataFrame({"setting": list(cfg), "value": [str(v) for v in cfg.values()]}))],
    )
    a = Section(
        "Table 1. Individual models",
        [
            "All models of the sweep, ranked by validation Dice; ✓ marks the models selected "
            "for the ensemble." + ("" if data.selection else " (No selection.json: no ensemble.)")
        ],
        [("", models_table(data.models))],
    )
    fails = failures_table(data.models)
    failed = Section("Failed or incomplete models")
    if len(fails):
        failed.text.append("Excluded from selection; the error each manifest recorded:")
        failed.tables.append(("", fails))
    else:
        failed.text.append("Every model of the sweep completed.")
    b = Section("Table 2. Augmentation ablation")
    if data.ablation is None or data.ablation.empty:
        b.text.append("The augmentation ablation was not run (no ablation/ folder).")
    else:
        b.text.append("The reference model trained with each augmentation setting.")
        b.tables.append(("", ablation_table(data.ablation)))
    c = Section("Table 3. Ensemble voting rules")
    if data.results is None:
        c.text.append("Not available: the ensemble step has not run.")
    else:
        unit = distance_unit(data)
        c.text.append(
            f"Per-image metrics averaged over each split; distances in {unit or 'px'}. "
            "Δ is the relative Dice change over the best single model (chosen on validation); "
            "p is the paired Wilcoxon signed-rank test against it."
        )
        c.tables += split_tables(rules_table(data.results, unit))
    return [
        setup, a, failed, b, c, quality_section(data), calibration_section(data),
        film_section(data),
    ]  # fmt: skip


def film_section(data: RunData) -> Section:
    """Table 6: what predict delivers, at the films' own resolution (`spineseg-score`)."""
    section = Section("Table 6. At the films' resolution")
    if not data.film_results:
        section.text.append(
            "Not computed: `spineseg-score run_dir=<run> split=val` scores what predict "
            "delivers against the full-resolution truth (Table 3 is at the working resolution)."
        )
        return section
    section.text.append(
        "The best single model and the voting rules as `spineseg-predict` delivers them: "
        "mapped back onto each film and scored against its truth at full resolution, so that "
        "runs at different working sizes, or a cascade and a whole-film run, compare. "
        "`atlas` never looks at the film: the training films' mean region placed unchanged "
        "on each (spineseg/ensemble/baseline.py); a level-error rate means something only "
        "beside its."
    )
    for results in data.film_results.values():
        section.tables += split_tables(rules_table(results, str(results["distance_unit"].iloc[0])))
    if data.film_agreement:
        section.text.append(
            "By the level check of the labels (`spineseg-validate-data level_offsets=`, "
            "spineseg/data/level_check.py): where a film's labels sit a level off its "
            "patient's other films, a level error scored against them may be the label's."
        )
    for split, rows in data.film_agreement.items():
        section.tables.append((f"{split}, by the labels' agreement", agreement_table(rows)))
    return section


def agreement_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per method and group of films: n, Dice and level errors with their CI."""
    from spineseg.data.level_check import AGREEMENT

    return pd.DataFrame(
        [
            {"method": r["method"], "films": AGREEMENT[r["films"]], "n": r["n"],
             "Dice": fmt(r["dice"], 3),
             "level errors [95% CI]": level_text(r["level_error_rate"], r["level_error_ci_low"],
                                                 r["level_error_ci_high"])}
            for r in rows
        ]
    )  # fmt: skip


def split_tables(table: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """A rules table as one captioned table per split, `<split> (n = N)`."""
    out = []
    for split in dict.fromkeys(table["split"]):
        part = table[table["split"] == split].drop(columns="split")
        out.append((f"{split} (n = {part['n'].iloc[0]})", part.drop(columns="n")))
    return out


def calibration_table(splits: dict[str, dict[str, dict[str, Any]]]) -> pd.DataFrame:
    """One row per split and model or rule: its temperature and ECE before and after."""
    return pd.DataFrame(
        [
            {"split": split, "model or rule": name, "T": fmt(c["temperature"], 3),
             "ECE": fmt(c["ece"], 4), "ECE calibrated": fmt(c["ece_calibrated"], 4)}
            for split, names in splits.items()
            for name, c in names.items()
        ]
    )  # fmt: skip


def _results_section(title: str, payload: Any, text: str, table: Any) -> Section:
    """A section drawn from one entry of results.json, or a line saying it is not there."""
    section = Section(title)
    if not payload:
        section.text.append("Not available: the ensemble step has not run (or predates it).")
        return section
    section.text.append(text)
    section.tables.append(("", table(payload)))
    return section


def calibration_section(data: RunData) -> Section:
    return _results_section(
        "Table 5. Calibration",
        data.results_json.get("calibration"),
        "Expected calibration error (15 bins, every pixel) before and after temperature "
        "scaling; one temperature per model and per rule, fitted on validation only "
        "(the val rows show the fit itself). Scaling keeps each decision at 0.5.",
        calibration_table,
    )


def quality_table(detection: dict[str, dict[str, dict[str, Any]]]) -> pd.DataFrame:
    """One row per rule and split: how many films are poor and flagged, and how well the
    flags catch the poor ones."""
    rows = []
    for rule, splits in detection.items():
        for split, d in splits.items():
            rows.append(
                {"split": split, "rule": rule, "films": d["n"], "poor": d["n_poor"],
                 "flagged": d["n_flagged"], "sensitivity": fmt(d["sensitivity"], 3),
                 "specificity": fmt(d["specificity"], 3), "AUROC": fmt(d["auroc"], 3)}
            )  # fmt: skip
    return pd.DataFrame(rows)


def quality_section(data: RunData) -> Section:
    return _results_section(
        "Table 4. Quality flags",
        data.results_json.get("quality"),
        "A film is flagged, without its truth, when the members disagree, or its region's area "
        "or position lies outside the validation truth's 95% range, or it comes in several "
        "pieces (ranges in ensemble/quality.json, set on validation only). Poor: Dice < 0.7. "
        "AUROC is that of the flag score for poor films.",
        quality_table,
    )


def _markdown(data: RunData, sections: list[Section], figures: dict[str, Path]) -> str:
    lines = [f"# Th8–Th11 segmentation ensemble: {data.run_dir.name}", ""]
    for s in sections:
        lines += [f"## {s.title}", ""]
        for t in s.text:
            lines += [t, ""]
        for caption, df in s.tables:
            if caption:
                lines += [f"**{caption}**", ""]
            lines += [df.to_markdown(index=False), ""]
    lines += ["## Figures", ""]
    if not figures:
        lines += ["No figures: nothing to plot yet.", ""]
    for caption, path in figures.items():
        lines += [f"**{caption}**", "", f"![{caption}](figures/{path.name})", ""]
    return "\n".join(lines)


def _img_tag(path: Path, caption: str) -> str:
    b64 = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{b64}'>"
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _html(data: RunData, sections: list[Section], figures: dict[str, Path]) -> str:
    title = html.escape(f"Th8–Th11 segmentation ensemble: {data.run_dir.name}")
    body = [f"<h1>{title}</h1>"]
    for s in sections:
        body.append(f"<h2>{html.escape(s.title)}</h2>")
        for t in s.text:
            bold = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(t))
            body.append(f"<p>{bold}</p>")
        for caption, df in s.tables:
            if caption:
                body.append(f"<h3>{html.escape(caption)}</h3>")
            body.append(df.to_html(index=False, border=0, na_rep="n/a"))
    body.append("<h2>Figures</h2>")
    body += [_img_tag(p, c) for c, p in figures.items()] or ["<p class='note'>No figures.</p>"]
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{title}</title><style>{CSS}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def build_report(run_dir: str | Path) -> Path:
    """Write `<run_dir>/report/` (report.md, report.html, figures/*.png); returns report.md.

    Raises ReportError when run_dir or its predictions do not exist."""
    data = load_run(run_dir)
    final = data.run_dir / "report"
    with staged_dir(final) as out:  # a kill leaves the old complete report, or the new one
        figures = make_figures(data, out / "figures")
        sections = _sections(data)
        atomic_write_text(out / "report.md", _markdown(data, sections, figures))
        atomic_write_text(out / "report.html", _html(data, sections, figures))
    return final / "report.md"
