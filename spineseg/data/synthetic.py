"""Procedural AP thoracolumbar X-ray phantoms with exact Th8..Th11 labels: the embedded dataset.

Why procedural: the framework must train, test and demo end to end with no download. The
films must still pose the real problem: Th8..Th11 look like every other vertebra (sizes grow
smoothly down the whole column, same density and texture) and sit anywhere in the field of
view, so a model has to find them from context - counting from the first rib-bearing vertebra
or up from the lowest rib pair (Th12), as on real films.

One film = `sample_anatomy` (patient geometry and pose, in image pixels) then
`render_film` (attenuation -> blur -> scatter -> quantum noise -> log -> window -> gamma).
Labels are rasterised from the same polygons that are rendered, so they align exactly.
Film i depends only on (seed, domain, i), so a smaller n is a prefix of a larger one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from spineseg.data.sample import Sample
from spineseg.data.sources import register_source
from spineseg.errors import ConfigError, choices_message
from spineseg.labels import level_value
from spineseg.names import TARGET_LEVELS

#: Every vertebra the generator knows, top to bottom; ribs attach to Th1..Th12 only.
LEVELS: tuple[str, ...] = (
    "C5",
    "C6",
    "C7",
    *(f"Th{i}" for i in range(1, 13)),
    *(f"L{i}" for i in range(1, 6)),
)
#: Label value of every vertebra (`spineseg.labels` level values); all are labelled, so a
#: model can learn every level (target=levels) and the region is Th8..Th11 among them.
LABELS: dict[str, int] = {name: level_value(name) for name in LEVELS}
RIB_LEVELS: tuple[str, ...] = tuple(f"Th{i}" for i in range(1, 13))
_SHIFT = 4  # fractional bits for sub-pixel cv2 drawing
_ONE = float(1 << _SHIFT)


@dataclass(frozen=True)
class Acquisition:
    """Ranges that one domain's films are drawn from (uniform within each range).

    A domain is a scanner + protocol: what changes between hospitals is the physics of the
    acquisition, not the anatomy, so only these parameters differ between domains.
    """

    name: str
    fov_mm: tuple[float, float]  # film height covered; pixel spacing = fov / height
    rotation_deg: float  # max |in-plane patient rotation|
    shift: float  # max lateral patient shift, fraction of the film width
    resolution: float  # detector sampling as a fraction of the output grid (1 = native)
    blur_mm: tuple[float, float]  # focal spot + detector blur, Gaussian sigma
    photons: tuple[float, float]  # quanta per output pixel through air: quantum noise
    scatter: tuple[float, float]  # scattered fraction: a low-pass veil, lowers contrast
    contrast: tuple[float, float]  # slope of the film's S-shaped characteristic curve
    gamma: tuple[float, float]  # display gamma after the characteristic curve
    exposure: tuple[float, float]  # where the curve is centred in the window (low = bright)
    heel: float  # max exposure gradient across the film (anode heel effect)
    marker_prob: float  # chance of an L/R lead marker
    line_prob: float  # chance of wires / tubes / ECG leads


DOMAINS: dict[str, Acquisition] = {
    # The paper's first dataset: sharp, fine spacing, good dose.
    "internal": Acquisition(
        name="internal",
        fov_mm=(330.0, 420.0),
        rotation_deg=6.0,
        shift=0.08,
        resolution=1.0,
        blur_mm=(0.4, 0.8),
        photons=(3000.0, 8000.0),
        scatter=(0.08, 0.18),
        contrast=(5.5, 7.5),
        gamma=(0.9, 1.1),
        exposure=(0.6, 0.7),
        heel=0.15,
        marker_prob=0.5,
        line_prob=0.25,
    ),
    # The second dataset: another scanner - coarser detector, wider field, more blur and
    # noise, more scatter, a brighter flatter tone curve. Same anatomy, so still learnable.
    "external": Acquisition(
        name="external",
        fov_mm=(360.0, 450.0),
        rotation_deg=8.0,
        shift=0.10,
        resolution=0.8,
        blur_mm=(0.7, 1.2),
        photons=(1000.0, 2500.0),
        scatter=(0.15, 0.3),
        contrast=(4.5, 6.0),
        gamma=(0.85, 1.0),
        exposure=(0.6, 0.7),
        heel=0.25,
        marker_prob=0.7,
        line_prob=0.45,
    ),
}
DOMAIN_CODES: dict[str, int] = {"internal": 0, "external": 1}


@dataclass(frozen=True, eq=False)  # holds arrays: compare by identity
class Vertebra:
    """One vertebral body as a polygon in image pixels (x = column, y = row)."""

    name: str
    polygon: np.ndarray  # (K, 2) float
    label: int  # level value (Th8 = 15)
    has_ribs: bool

    @property
    def centroid(self) -> np.ndarray:
        return self.polygon.mean(axis=0)


@dataclass(frozen=True, eq=False)  # holds arrays: compare by identity
class Anatomy:
    """Everything a film shows, after the pose transform, in image pixels."""

    height: int
    width: int
    spacing: float  # mm per pixel (square pixels)
    vertebrae: tuple[Vertebra, ...]
    ribs: tuple[tuple[str, np.ndarray], ...]  # (vertebra name, posterior rib polyline)
    extras: dict[str, Any] = field(default_factory=dict, repr=False)

    def vertebra(self, name: str) -> Vertebra:
        for v in self.vertebrae:
            if v.name == name:
                return v
        raise KeyError(name)

    def label_map(self) -> np.ndarray:
        """Rasterise every vertebra (its level value) exactly as the bodies are rendered;
        Th8..Th11 last, so a neighbour's overlap never changes the region."""
        label = np.zeros((self.height, self.width), np.uint8)
        target = [v for v in self.vertebrae if v.name in TARGET_LEVELS]
        for v in [*(v for v in self.vertebrae if v.name not in TARGET_LEVELS), *target]:
            fill_polygon(label, v.polygon, v.label)
        return label


def fill_polygon(canvas: np.ndarray, polygon: np.ndarray, value: float) -> None:
    """cv2.fillPoly with sub-pixel vertices; the one rasteriser for films and labels."""
    pts = np.round(np.asarray(polygon) * _ONE).astype(np.int32)[None]
    cv2.fillPoly(canvas, pts, value, lineType=cv2.LINE_8, shift=_SHIFT)


def _line(canvas: np.ndarray, polyline: np.ndarray, value: float, thickness: float) -> None:
    pts = np.round(np.asarray(polyline) * _ONE).astype(np.int32)[None]
    cv2.polylines(canvas, pts, False, value, max(1, round(thickness)), cv2.LINE_AA, _SHIFT)


def _bezier(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, n: int = 14) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


def _ellipse(cx: float, cy: float, a: float, b: float, angle: float, n: int = 20) -> np.ndarray:
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    c, s = np.cos(angle), np.sin(angle)
    u, v = a * np.cos(t), b * np.sin(t)
    return np.stack([cx + c * u - s * v, cy + s * u + c * v], axis=1)


# ---------------------------------------------------------------------------------------
# Anatomy: vertebral column, ribs and the soft-tissue landmarks, in patient millimetres
# (x lateral, + = patient's left = image right; y caudal, 0 = top of Th1), then posed.
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pose:
    """Patient mm -> image px: p_img = scale * R(angle) (p - centre) + origin."""

    scale: float  # px per mm
    angle: float
    centre: np.ndarray
    origin: np.ndarray

    @property
    def matrix(self) -> np.ndarray:
        c, s = np.cos(self.angle), np.sin(self.angle)
        return self.scale * np.array([[c, -s], [s, c]])

    def apply(self, pts: np.ndarray) -> np.ndarray:
        return (np.asarray(pts) - self.centre) @ self.matrix.T + self.origin


def _body_shape(w: float, h: float, p: float, taper: float, waist: float) -> np.ndarray:
    """Rounded trapezoid (superellipse, wider below, concave waist) centred at 0."""
    t = np.linspace(0.0, 2 * np.pi, 36, endpoint=False)
    c, s = np.cos(t), np.sin(t)
    u = (w / 2) * np.sign(c) * np.abs(c) ** (2 / p)
    v = (h / 2) * np.sign(s) * np.abs(s) ** (2 / p)
    vn = v / (h / 2)
    u = u * (1 + taper * vn) * (1 - waist * (1 - vn**2))
    return np.stack([u, v], axis=1)


def _local(pts: np.ndarray, centre: np.ndarray, tilt: float) -> np.ndarray:
    """Vertebra frame -> patient mm: the local v axis follows the centreline (dx/dy)."""
    c, s = np.cos(tilt), np.sin(tilt)
    return pts @ np.array([[c, -s], [s, c]]) + centre


def _column(rng: np.random.Generator, size: float) -> dict[str, Any]:
    """Vertebral centres, sizes and tilts along a smooth (possibly scoliotic) centreline."""
    n = len(LEVELS)
    j = np.arange(n, dtype=float) / (n - 1)
    # Smooth growth down the whole column (no level is special), plus small jitter.
    heights = size * (13.0 + 14.0 * j**1.1) * rng.normal(1.0, 0.03, n)
    widths = size * (22.0 + 30.0 * j**1.3) * rng.normal(1.0, 0.03, n)
    gaps = size * (3.8 + 6.0 * j**2) * rng.normal(1.0, 0.08, n)
    # Centreline x(y): lean + up to two sinusoids; curvature kept below ~0.005/mm.
    severe = rng.random() < 0.4
    lean = rng.normal(0.0, 0.03)
    waves = []
    for _ in range(2):
        lam = rng.uniform(260.0, 520.0)
        amp = rng.uniform(8.0, 30.0) if severe else rng.uniform(0.0, 7.0)
        amp = min(amp, 0.005 * (lam / (2 * np.pi)) ** 2)
        waves.append((amp * rng.choice([-1.0, 1.0]), lam, rng.uniform(0, 2 * np.pi)))
        severe = severe and rng.random() < 0.5

    def x_at(y: float) -> tuple[float, float]:
        x, dx = lean * y, lean
        for a, lam, ph in waves:
            k = 2 * np.pi / lam
            x += a * np.sin(k * y + ph)
            dx += a * k * np.cos(k * y + ph)
        return x, dx

    top_th1 = LEVELS.index("Th1")
    y = -float(np.sum(heights[:top_th1] + gaps[:top_th1]))
    centres, tilts = np.zeros((n, 2)), np.zeros(n)
    x0 = x_at(0.0)[0]
    for i in range(n):
        # Step along the arc so tilted vertebrae keep their disc gap.
        _, dx = x_at(y)
        tilt = np.arctan(dx)
        cy = y + 0.5 * heights[i] * np.cos(tilt)
        x, dx = x_at(cy)
        tilts[i] = np.arctan(dx)
        centres[i] = (x - x0, cy)
        y = cy + (0.5 * heights[i] + gaps[i]) * np.cos(tilts[i])
    return {"heights": heights, "widths": widths, "gaps": gaps, "centres": centres, "tilts": tilts}


def _ribs(rng: np.random.Generator, col: dict[str, Any], half_width: float) -> list[tuple]:
    """Posterior and anterior rib polylines (patient mm) for Th1..Th12, both sides."""
    # Lateral reach, drop to the lateral turn, arch above the chord and anterior drop,
    # by rib number 1..12; ribs 11-12 are short, straight and point down (floating).
    reach = np.array([0.45, 0.66, 0.8, 0.88, 0.94, 0.98, 1.0, 1.0, 0.97, 0.9, 0.68, 0.45])
    drop = np.array([8, 22, 32, 38, 42, 44, 46, 50, 54, 58, 58, 52], float)
    bulge = np.array([14, 24, 28, 29, 28, 26, 23, 19, 14, 9, 4, 2], float)
    ant_drop = np.array([14, 30, 40, 48, 52, 56, 58, 0, 0, 0, 0, 0], float)
    out = []
    jitter = rng.normal(1.0, 0.04, (12, 2))
    for k in range(12):
        i = LEVELS.index(f"Th{k + 1}")
        (cx, cy), w, h = col["centres"][i], col["widths"][i], col["heights"][i]
        thick = (7.0 + 4.0 * np.sin(np.pi * (k + 1) / 13)) * col["size"]
        for side in (-1.0, 1.0):
            f = jitter[k, 0 if side < 0 else 1]
            head = np.array([cx + side * (0.5 * w + 2.0), cy - 0.25 * h])
            lat_x = side * half_width * reach[k] * f + 0.5 * cx
            p2 = np.array([lat_x, head[1] + drop[k] * f])
            p1 = head + 0.55 * (p2 - head) - [0.0, bulge[k]]
            post = _bezier(head, p1, p2)
            out.append((LEVELS[i], "posterior", post, thick))
            if ant_drop[k] > 0:
                tangent = (p2 - p1) / np.linalg.norm(p2 - p1)
                p3 = p2 + 22.0 * tangent + np.array([0.0, 0.3 * ant_drop[k]])
                p4 = np.array([side * half_width * 0.38, p2[1] + ant_drop[k] * f])
                out.append((LEVELS[i], "anterior", _bezier(p2, p3, p4), 0.8 * thick))
    return out


def sample_anatomy(
    rng: np.random.Generator, acquisition: Acquisition, height: int, width: int
) -> Anatomy:
    """Draw one patient and pose; return every structure in image pixels."""
    size = rng.uniform(0.9, 1.1)
    col = _column(rng, size)
    col["size"] = size
    half_width = 135.0 * size * rng.uniform(0.93, 1.07)
    p_shape = rng.uniform(3.2, 5.0)
    taper, waist = rng.uniform(0.02, 0.07), rng.uniform(0.03, 0.08)
    idx = {name: i for i, name in enumerate(LEVELS)}

    # Field of view: Th8 top .. L1 bottom always inside (the lowest rib and the first
    # rib-free vertebra give the count), otherwise anywhere: Th8's row is not a cue. It
    # stays between C5 and just below L5, where the phantom has anatomy to show.
    fov = rng.uniform(*acquisition.fov_mm)
    scale = height / fov
    fov_w = width / scale
    angle = np.deg2rad(rng.uniform(-acquisition.rotation_deg, acquisition.rotation_deg))
    c, h = col["centres"], col["heights"]
    top = c[idx["Th8"], 1] - 0.6 * h[idx["Th8"]]
    bottom = c[idx["L1"], 1] + 0.6 * h[idx["L1"]]
    margin = 0.05 * fov
    first, last = c[0, 1] - 0.5 * h[0], c[-1, 1] + 0.5 * h[-1] + 60.0
    lo = max(bottom - fov / 2 + margin, first + fov / 2)
    hi = min(top + fov / 2 - margin, last - fov / 2)
    cy = rng.uniform(lo, hi) if hi > lo else 0.5 * (top + bottom)
    near = int(np.argmin(np.abs(c[:, 1] - cy)))
    cx = c[near, 0] + rng.uniform(-1, 1) * acquisition.shift * fov_w
    pose = _Pose(scale, angle, np.array([cx, cy]), np.array([(width - 1) / 2, (height - 1) / 2]))

    vertebrae, parts = [], []
    for i, name in enumerate(LEVELS):
        w, hh, tilt, ctr = col["widths"][i], h[i], col["tilts"][i], c[i]
        body = pose.apply(_local(_body_shape(w, hh, p_shape, taper, waist), ctr, tilt))
        vertebrae.append(Vertebra(name, body, LABELS.get(name, 0), name in RIB_LEVELS))
        # Axial rotation (scoliosis) moves pedicles and the spinous process sideways.
        rot = np.clip((ctr[0] - c[near, 0]) / 40.0, -1, 1) * 0.25 * w
        for side in (-1, 1):
            ped = _ellipse(side * 0.31 * w + rot * 0.5, -0.14 * hh, 0.085 * w, 0.2 * hh, 0, 14)
            parts.append(("pedicle", pose.apply(_local(ped, ctr, tilt)), 0.0))
            lumbar = name.startswith("L")
            reach = 0.42 * w if lumbar else 0.18 * w
            tp = np.array([[side * 0.4 * w, -0.2 * hh], [side * (0.42 * w + reach), -0.3 * hh]])
            parts.append(("process", pose.apply(_local(tp, ctr, tilt)), 0.2 * hh * scale))
        sp = _ellipse(-rot * 0.6, 0.45 * hh, 0.06 * w, 0.32 * hh, 0, 12)
        parts.append(("spinous", pose.apply(_local(sp, ctr, tilt)), 0.0))

    ribs = []
    for name, kind, line, thick in _ribs(rng, col, half_width):
        parts.append((f"rib_{kind}", pose.apply(line), thick * scale))
        if kind == "posterior":
            ribs.append((name, pose.apply(line)))

    # Soft-tissue landmarks (patient mm), evaluated per pixel at render time.
    y_th10 = c[idx["Th10"], 1]
    pitch = h[idx["Th10"]] + col["gaps"][idx["Th10"]]
    dome_r = y_th10 + rng.uniform(-1.5, 1.5) * pitch
    extras = {
        "pose": pose,
        "half_width": half_width,
        "levels_y": c[:, 1].copy(),
        "th1_top": c[idx["Th1"], 1] - 0.5 * h[idx["Th1"]],
        "l4_y": c[idx["L4"], 1],
        "l5_bottom": c[idx["L5"], 1] + 0.5 * h[idx["L5"]],
        "spine_x": c[:, 0].copy(),
        "size": size,
        "dome": (dome_r, dome_r + rng.uniform(8.0, 25.0)),
        "mediastinum": rng.uniform(26.0, 36.0) * size,
        "fat": rng.uniform(12.0, 40.0),
        "air": rng.uniform(0.9, 1.3),
        "heart": (rng.uniform(0.15, 0.3), rng.uniform(35.0, 55.0), rng.uniform(0.48, 0.58)),
        "parts": parts,
        "bone": rng.uniform(0.85, 1.15),
        "bone_jitter": rng.normal(1.0, 0.05, len(LEVELS)),
        "clavicle_y": c[idx["Th2"], 1] + rng.uniform(-12.0, 8.0),
        "gas": rng.integers(2, 7),
    }
    return Anatomy(height, width, 1.0 / scale, tuple(vertebrae), tuple(ribs), extras)


# ---------------------------------------------------------------------------------------
# Rendering: attenuation map (soft tissue - lung air + bone) -> detector -> display.
# ---------------------------------------------------------------------------------------


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _soft_tissue(anat: Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Body thickness, lungs, heart, diaphragm, liver and gas (line integrals).

    All smooth, so evaluated on a half-resolution grid and interpolated: half the cost.
    """
    e, pose = anat.extras, anat.extras["pose"]
    inv = np.linalg.inv(pose.matrix)
    hh, hw = (anat.height + 1) // 2, (anat.width + 1) // 2
    # Half-res pixel i covers full-res 2i, 2i+1: its centre is at 2i + 0.5 (cv2.resize).
    u = 2 * np.arange(hw, dtype=np.float32) + 0.5 - pose.origin[0]
    v = 2 * np.arange(hh, dtype=np.float32)[:, None] + 0.5 - pose.origin[1]
    X = (inv[0, 0] * u + inv[0, 1] * v + pose.centre[0]).astype(np.float32)
    Y = (inv[1, 0] * u + inv[1, 1] * v + pose.centre[1]).astype(np.float32)
    R, t1 = e["half_width"], e["th1_top"]
    spine_x = np.interp(Y, e["levels_y"], e["spine_x"]).astype(np.float32)
    # Body outline: neck, shoulders, chest, waist, hips.
    ky = [t1 - 110, t1 - 70, t1 - 45, t1 - 20, t1 + 30, t1 + 90, e["l4_y"] - 60, e["l4_y"]]
    kb = [50, 62, 0.6 * R + 40, R + 40, R + 48, R + e["fat"], R + 0.6 * e["fat"], R + e["fat"]]
    ky, kb = np.array([*ky, e["l5_bottom"]]), np.array([*kb, R + 45])
    B = np.interp(Y, ky, kb).astype(np.float32)
    depth = np.sqrt(np.clip(1 - (X / B) ** 2, 0, 1))
    dome_r, dome_l = e["dome"]
    right = X - spine_x < 0  # patient's right = image left
    dome = np.where(right, dome_r, dome_l).astype(np.float32)
    # Diaphragm: domes peak mid-lung, fall ~35 mm to the costophrenic angles.
    xa = np.abs(X - spine_x * 0.5)
    dia = dome + 35.0 * ((xa - 0.45 * R) / (0.55 * R)) ** 2
    below = _smoothstep((Y - dia) / 15.0 + 0.5)
    xm = np.abs(X - spine_x)
    med = e["mediastinum"]
    # The midline is as dense above the diaphragm (heart, vessels) as below: no step there.
    lateral = _smoothstep((xm - med) / (1.5 * med))
    mu = depth * (2.1 + 0.25 * below * lateral)
    # Lungs: between mediastinum and rib cage, from the apex to the diaphragm.
    cage = R * (0.3 + 0.7 * np.sqrt(np.clip((Y - (t1 - 40)) / 170.0, 0, 1)))
    across = (xm - med) * (cage - 8 - xm) / np.maximum(((cage - 8 - med) / 2) ** 2, 1.0)
    lung = np.sqrt(np.clip(across, 0, 1)) * _smoothstep((Y - (t1 - 35)) / 40.0)
    lung *= 1 - below
    # Heart (patient's left = image right) displaces the left lower lung.
    hx, hy, ha = e["heart"]
    hcx, hcy = spine_x + hx * R, dome_l - hy + 20.0
    ang = np.deg2rad(-28.0)
    du, dv = X - hcx, Y - hcy
    hu = (np.cos(ang) * du + np.sin(ang) * dv) / (ha * R)
    hv = (-np.sin(ang) * du + np.cos(ang) * dv) / 48.0
    heart = _smoothstep((1 - (hu**2 + hv**2)) / 0.25)
    lung *= 1 - heart
    mu += (0.15 * heart * lateral - e["air"] * lung) * depth
    # Liver under the right dome: slightly denser; stomach bubble and bowel gas: air.
    mu += 0.08 * below * lateral * right * depth
    gas = np.zeros_like(mu)
    bubble = ((X - spine_x - 0.5 * R) / 30.0) ** 2 + ((Y - dome_l - 25) / 18.0) ** 2
    gas += 0.5 * _smoothstep(1 - bubble) * (rng.random() < 0.7)
    for _ in range(int(e["gas"])):
        gx = rng.uniform(-0.7, 0.7) * R
        gy = rng.uniform(dome_l + 60, e["l5_bottom"] + 40)
        ga, gb = rng.uniform(8, 25), rng.uniform(6, 16)
        gas += 0.35 * _smoothstep(1 - ((X - gx) / ga) ** 2 - ((Y - gy) / gb) ** 2)
    mu -= gas * below
    mu = np.clip(mu, 0, None).astype(np.float32)
    full = cv2.resize(mu, (2 * hw, 2 * hh), interpolation=cv2.INTER_LINEAR)
    return full[: anat.height, : anat.width]


def _bones(anat: Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Vertebral bodies with cortical rims, pedicles, processes, ribs, clavicles, pelvis."""
    e, pose = anat.extras, anat.extras["pose"]
    shape, scale = (anat.height, anat.width), pose.scale
    bodies, rims, small, ribs_p, ribs_a, other = (np.zeros(shape, np.float32) for _ in range(6))
    rim_px = max(1.0, 1.2 * scale)
    for i, v in enumerate(anat.vertebrae):
        # A body is a short cylinder: thinner towards its edges, denser shell (the rim).
        centre, density = v.polygon.mean(axis=0), float(e["bone_jitter"][i])
        fill_polygon(bodies, v.polygon, 0.7 * density)
        fill_polygon(bodies, centre + 0.7 * (v.polygon - centre), density)
        _line(rims, np.vstack([v.polygon, v.polygon[:1]]), 1.0, rim_px)
    for kind, pts, thick in e["parts"]:
        if kind == "pedicle":
            fill_polygon(small, pts, 0.3)
            _line(small, np.vstack([pts, pts[:1]]), 1.2, rim_px)
        elif kind == "spinous":
            fill_polygon(small, pts, 0.6)
        elif kind == "process":
            _line(small, pts, 0.6, thick)
        else:
            layer = ribs_p if kind == "rib_posterior" else ribs_a
            _line(layer, pts, 1.0, thick)
            if thick > 3 * rim_px:
                _line(layer, pts, 0.5, thick - 2 * rim_px)
    # Clavicles and pelvis, in patient mm then posed (often outside the field).
    R, yc, y5 = e["half_width"], e["clavicle_y"], e["l5_bottom"]
    for side in (-1.0, 1.0):
        clav = _bezier(
            np.array([side * 32.0, yc + 6]),
            np.array([side * 75.0, yc + 6]),
            np.array([side * R * 1.05, yc - 22]),
        )
        _line(other, pose.apply(clav), 1.0, 13.0 * scale)
        crest = _bezier(
            np.array([side * 40.0, y5 + 5]),
            np.array([side * 0.75 * R, y5 - 75]),
            np.array([side * 0.95 * R, y5 + 30]),
        )
        down = np.array(
            [[side * 0.8 * R, y5 + 90], [side * 0.45 * R, y5 + 120], [side * 45.0, y5 + 70]]
        )
        wing = pose.apply(np.vstack([crest, down]))
        fill_polygon(other, wing, 0.2)
        _line(other, wing[: len(crest)], 1.0, 3 * scale)
    sacrum = np.array([[-38, 0], [38, 0], [14, 95], [-14, 95]], float) * e["size"]
    fill_polygon(other, pose.apply(sacrum + np.array([e["spine_x"][-1], y5 + 8])), 0.7)
    # Trabecular texture: one random field for the whole film, so no level is special.
    tex = cv2.resize(
        rng.normal(0, 1, (max(4, anat.height // 6), max(4, anat.width // 6))).astype(np.float32),
        (anat.width, anat.height),
        interpolation=cv2.INTER_CUBIC,
    )
    bone = 0.4 * bodies * (1 + 0.12 * tex) + 0.25 * rims + 0.3 * small
    bone += 0.3 * ribs_p + 0.1 * ribs_a + 0.4 * other
    return bone * float(e["bone"])


def _artefacts(rng: np.random.Generator, acq: Acquisition, height: int, width: int) -> np.ndarray:
    """Lead L/R marker, wires, tubes and ECG electrodes, on the detector (not posed)."""
    art = np.zeros((height, width), np.float32)
    if rng.random() < acq.marker_prob:
        letter = str(rng.choice(["L", "R"]))
        fs = height / 256 * rng.uniform(0.5, 0.8)
        (tw, th), _ = cv2.getTextSize(letter, cv2.FONT_HERSHEY_SIMPLEX, fs, 2)
        right = (letter == "L") ^ (rng.random() < 0.15)
        x = int(rng.uniform(0.72, 0.9) * width) if right else int(rng.uniform(0.04, 0.2) * width)
        y = int(rng.uniform(0.05, 0.3) * height) + th
        pad = max(2, th // 3)
        cv2.rectangle(art, (x - pad, y - th - pad), (x + tw + pad, y + pad), 0.35, -1)
        glyph = np.zeros((height, width), np.uint8)
        cv2.putText(glyph, letter, (x, y), cv2.FONT_HERSHEY_SIMPLEX, fs, 255, 2, cv2.LINE_AA)
        art += glyph.astype(np.float32) * (4.0 / 255)
    if rng.random() < acq.line_prob:
        size = np.array([width, height], float)
        for _ in range(rng.integers(1, 4)):  # wires / tubes entering from an edge
            p = rng.uniform(0, 1, (3, 2)) * size
            axis = int(rng.integers(0, 2))
            p[0, axis] = rng.choice([0.0, 1.0]) * size[axis]
            _line(art, _bezier(p[0], p[1], p[2], 24), rng.uniform(0.5, 1.2), rng.uniform(1, 2))
        if rng.random() < 0.5:
            for _ in range(rng.integers(2, 5)):  # ECG electrodes: small metal rings
                c = rng.uniform(0.15, 0.85, 2) * size
                r = max(2.0, width * rng.uniform(0.012, 0.02))
                ring = _ellipse(c[0], c[1], r, r, 0, 16)
                _line(art, np.vstack([ring, ring[:1]]), 1.2, 1)
    return art


def render_film(
    seed_or_rng: int | np.random.Generator,
    acquisition: Acquisition,
    height: int = 256,
    width: int = 256,
    return_anatomy: bool = False,
    ideal: bool = False,
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, Anatomy]:
    """One film and its label (uint8 HxW each), plus the Anatomy if asked.

    `ideal=True` skips blur, scatter, noise and artefacts (same anatomy and window): the
    geometry-only image, for tests and figures.
    """
    rng = (
        seed_or_rng
        if isinstance(seed_or_rng, np.random.Generator)
        else np.random.default_rng(seed_or_rng)
    )
    anat = sample_anatomy(rng, acquisition, height, width)
    label = anat.label_map()
    a = acquisition
    blur_mm, photons = rng.uniform(*a.blur_mm), rng.uniform(*a.photons)
    scatter, contrast = rng.uniform(*a.scatter), rng.uniform(*a.contrast)
    gamma, exposure = rng.uniform(*a.gamma), rng.uniform(*a.exposure)
    heel_dir, heel = rng.uniform(0, 2 * np.pi), rng.uniform(0, a.heel)
    mu = _soft_tissue(anat, rng) + _bones(anat, rng)
    art = _artefacts(rng, a, height, width)
    noise_seed = int(rng.integers(2**63))
    if not ideal:
        mu += art
        sigma = blur_mm * anat.extras["pose"].scale
        if sigma > 0.3:
            mu = cv2.GaussianBlur(mu, (0, 0), sigma)
        dh, dw = max(8, round(height * a.resolution)), max(8, round(width * a.resolution))
        if (dh, dw) != (height, width):
            mu = cv2.resize(mu, (dw, dh), interpolation=cv2.INTER_AREA)
        trans = np.exp(-mu)
        veil = cv2.resize(cv2.resize(trans, (8, 8), interpolation=cv2.INTER_AREA), (dw, dh))
        trans = (1 - scatter) * trans + scatter * veil
        yy, xx = np.mgrid[0:dh, 0:dw].astype(np.float32)
        ramp = (np.cos(heel_dir) * (xx / dw - 0.5) + np.sin(heel_dir) * (yy / dh - 0.5)) * 2
        counts = photons / a.resolution**2 * (1 + heel * ramp) * trans
        noise = np.random.default_rng(noise_seed).standard_normal((dh, dw), np.float32)
        counts = np.maximum(counts + np.sqrt(counts) * noise, 0.5)
        mu = -np.log(counts / (photons / a.resolution**2))
        if (dh, dw) != (height, width):
            mu = cv2.resize(mu, (width, height), interpolation=cv2.INTER_LINEAR)
    # Auto-window like a modality LUT, then the domain's tone curve.
    sub = mu[::3, ::3].ravel()
    lo, hi = np.quantile(sub, [0.01, 0.998])
    x = np.clip((mu - lo) / max(hi - lo, 1e-6), 0, 1)
    ends = 1 / (1 + np.exp(-contrast * (np.array([0.0, 1.0]) - exposure)))
    curve = 1 / (1 + np.exp(-contrast * (x - exposure)))
    disp = np.clip((curve - ends[0]) / (ends[1] - ends[0]), 0, 1) ** gamma
    image = np.clip(disp * 255 + 0.5, 0, 255).astype(np.uint8)
    return (image, label, anat) if return_anatomy else (image, label)


def _whole(key: str, value: Any, least: int) -> int:
    """`value` as an int >= least, else a ConfigError naming the option."""
    try:
        ok = int(value) == value and int(value) >= least and not isinstance(value, bool)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"synthetic {key}={value!r} is invalid: need an integer >= {least}")
    return int(value)


def film_rng(seed: int, domain: str, index: int) -> np.random.Generator:
    """The generator of film `index`: depends on (seed, domain, index) only."""
    return np.random.default_rng(np.random.SeedSequence([seed, DOMAIN_CODES[domain], index]))


@register_source("synthetic")
def synthetic_source(
    n: int = 183,
    domain: str = "internal",
    seed: int = 0,
    height: int = 256,
    width: int = 256,
    on_error: str = "raise",
    skipped: list | None = None,
) -> list[Sample]:
    """`n` films of `domain` (paper: 183 internal, 58 external). Generated data cannot be
    bad, so `on_error` / `skipped` are accepted for the common source signature only."""
    del on_error, skipped
    if domain not in DOMAINS:
        raise ConfigError(choices_message("synthetic domain", domain, list(DOMAINS)))
    n, seed = _whole("n", n, 0), _whole("seed", seed, 0)
    height, width = _whole("height", height, 32), _whole("width", width, 32)
    out = []
    for i in range(n):
        image, label, anat = render_film(
            film_rng(seed, domain, i), DOMAINS[domain], height, width, True
        )
        sid = f"syn-{domain}-{i:04d}"
        out.append(
            Sample(
                id=sid,
                patient_id=sid,
                image=image,
                label=label,
                spacing=(anat.spacing, anat.spacing),
                meta={"domain": domain},
            )
        )
    return out
