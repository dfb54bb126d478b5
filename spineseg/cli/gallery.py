"""`spineseg-gallery`: a PNG grid of films with coloured Th8..Th11 overlays.

    spineseg-gallery [data=<preset>] [n=8] [out=docs/images/synthetic_gallery.png]

Works for any data source: it loads the data (and `data.external` when set and
`include_external=true`) the way the DataModule does, and shows the first `n` films of each,
to check at a glance that images and masks line up and look like X-rays.
"""

from __future__ import annotations

import io
import math
import sys
from pathlib import Path

import matplotlib
import numpy as np
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import spineseg  # noqa: F401  (registers the OmegaConf resolvers)
from spineseg.cli.common import hydra_app
from spineseg.data.sample import Sample
from spineseg.data.sources import build_spec
from spineseg.errors import ConfigError
from spineseg.labels import vertebra_labels
from spineseg.names import TARGET_LEVELS
from spineseg.utils.io import atomic_open

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import Patch
from PIL import Image

#: Overlay colours of Th8..Th11 (value 1..4); binary masks use the first.
COLOURS = np.array([[230, 50, 50], [50, 200, 80], [60, 120, 255], [250, 210, 40]], np.uint8)
COLS = 4
ALPHA = 0.45
GREYS = 192  # palette: GREYS grey levels, then per class SHADES blends and the pure colour
SHADES = 15


def load(spec: dict, n: int) -> list[Sample]:
    """The first n samples of one data spec ({source, root, split, source_kwargs}), with its
    level corrections applied, as training sees them."""
    kwargs = dict(spec.get("source_kwargs") or {})
    if "n" in kwargs:  # a generator need not make films that are not shown
        kwargs["n"] = min(int(kwargs["n"]), n)
    return build_spec({**spec, "source_kwargs": kwargs}, on_error="skip", skipped=[])[:n]


def overlay(sample: Sample) -> np.ndarray:
    """RGB film (8-bit, stretched) with the label blended in its class colours."""
    img = sample.image.astype(np.float32)
    lo, hi = float(img.min()), float(img.max())
    grey = ((img - lo) / max(hi - lo, 1.0) * 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    lab = sample.label if sample.binary_label else vertebra_labels(sample.label)
    lab = np.minimum(lab, len(COLOURS)).astype(int)
    mask = lab > 0
    rgb[mask] = (1 - ALPHA) * rgb[mask] + ALPHA * COLOURS[lab[mask] - 1]
    return rgb.astype(np.uint8)


def draw(groups: list[tuple[str, list[Sample]]]) -> bytes:
    """One figure: a block of rows per dataset, each tile titled by domain and id."""
    rows = [math.ceil(len(s) / COLS) for _, s in groups]
    fig, axes = plt.subplots(
        sum(rows), COLS, figsize=(2.3 * COLS, 2.5 * sum(rows) + 0.5), squeeze=False
    )
    for ax in axes.ravel():
        ax.axis("off")
    r0 = 0
    for (title, samples), nrow in zip(groups, rows, strict=True):
        for i, sample in enumerate(samples):
            ax = axes[r0 + i // COLS, i % COLS]
            ax.imshow(overlay(sample), interpolation="nearest")
            domain = sample.meta.get("domain", title)
            ax.set_title(f"{domain}: {sample.id}", fontsize=7)
        r0 += nrow
    handles = [Patch(color=COLOURS[k] / 255, label=name) for k, name in enumerate(TARGET_LEVELS)]
    fig.legend(handles=handles, loc="upper center", ncol=len(TARGET_LEVELS), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    # A fixed 256-colour palette keeps a grid of noisy films small (< 600 KB) with no
    # visible loss; an adaptive one would spend it all on greys and shift the class colours.
    buf.seek(0)
    rgb = Image.open(buf).convert("RGB")
    out = io.BytesIO()
    rgb.quantize(palette=_palette(), dither=Image.Dither.NONE).save(out, "png", optimize=True)
    return out.getvalue()


def _palette() -> Image.Image:
    greys = np.linspace(0, 255, GREYS)[:, None].repeat(3, axis=1)
    levels = np.linspace(0, 255, SHADES)[:, None]
    blends = [(1 - ALPHA) * levels + ALPHA * c[None].astype(float) for c in COLOURS]
    colours = np.vstack(
        [greys, *[np.vstack([b, c[None]]) for b, c in zip(blends, COLOURS, strict=True)]]
    )
    pal = Image.new("P", (1, 1))
    pal.putpalette(np.round(colours).astype(np.uint8).ravel().tolist())
    return pal


def gallery(cfg: DictConfig) -> Path:
    """Build the samples named by cfg.data (and cfg.data.external) and write the PNG."""
    try:
        data = OmegaConf.to_container(cfg.data, resolve=True)
        n, out = int(cfg.n), Path(str(cfg.out))
    except (OmegaConfBaseException, ValueError) as err:
        raise ConfigError(f"invalid configuration: {err}".splitlines()[0]) from None
    if n < 1:
        raise ConfigError(f"gallery n={n} is invalid: need at least 1 film")
    groups = [("data", load(data, n))]
    if cfg.include_external and data.get("external"):
        groups.append(("external", load(data["external"], n)))
    groups = [g for g in groups if g[1]]
    if not groups:
        raise ConfigError(f"data source {data.get('source')!r} yielded no films to show")
    png = draw(groups)
    with atomic_open(out) as fh:
        fh.write(png)
    return out


def _gallery(cfg: DictConfig) -> None:
    out = gallery(cfg)
    print(f"wrote {out} ({out.stat().st_size // 1024} KB)")


main = hydra_app(
    "gallery",
    _gallery,
    "usage: spineseg-gallery [data=<preset>] [n=8] [out=PNG] [include_external=true]",
)


if __name__ == "__main__":
    sys.exit(main())
