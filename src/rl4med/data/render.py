"""The picture of one synthetic dermoscopy image, from its labels and its scene parameters.

``rl4med.data.synthetic`` draws the labels and writes the data set; this module draws the
pixels. Skin with texture and vignetting, one lesion (nevus: small, round, symmetric, uniform
brown, sharp border; melanoma: larger, asymmetric, irregular fuzzy border, dark brown / black /
blue-grey), then the four artifacts on top (hair strokes, gel bubbles with specular rims,
violet/magenta ink marks in a hue no lesion has, a ruler with ticks along one edge).

Every random draw is made for every image whatever its labels (``sample_scene``), so a label
only switches drawing on or off: ``render`` with one attribute forced off gives the
counterfactual image, which the tests use to measure each artifact on pixels. Vectorised numpy
over chunks of images; sizes are fractions of the image size, so 32 px and 512 px images look
alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from rl4med.attributes import ARTIFACTS, ATTRIBUTES

MAX_HAIRS, MAX_BUBBLES, MAX_INK = 10, 6, 3
INK_VIOLET, INK_MAGENTA = (0.55, 0.06, 0.78), (0.82, 0.08, 0.62)  # marker ink colours (RGB)
ARTIFACT_PARAMS: dict[str, tuple[str, ...]] = {
    # the scene parameters each artifact draws with (and nothing else does)
    "hair": ("hair_n", "hair_pts", "hair_width", "hair_colour"),
    "gel_bubbles": ("gel_n", "gel_centre", "gel_radius"),
    "ink": ("ink_n", "ink_angle", "ink_dist", "ink_dir", "ink_len", "ink_width", "ink_colour"),
    "ruler": (
        "ruler_side",
        "ruler_depth",
        "ruler_offset",
        "ruler_period",
        "ruler_shift",
        "ruler_colour",
    ),
}
CURVE_POINTS_PER_PX = 2.5


# --------------------------------------------------------------------------- drawing helpers


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.meshgrid(c, c, indexing="ij")  # yy, xx in [0, 1]


def _waves(rng: np.random.Generator, b: int, k: int, fmin: float, fmax: float) -> dict:
    """Random plane waves: a cheap smooth noise field, sampled per image."""
    f = rng.uniform(fmin, fmax, (b, k)).astype(np.float32)
    ang = rng.uniform(0, 2 * np.pi, (b, k)).astype(np.float32)
    return {
        "fy": f * np.sin(ang),
        "fx": f * np.cos(ang),
        "phase": rng.uniform(0, 2 * np.pi, (b, k)).astype(np.float32),
        "amp": rng.uniform(0.5, 1.0, (b, k)).astype(np.float32),
    }


def _eval_waves(w: dict, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    arg = (
        2 * np.pi * (w["fy"][:, :, None, None] * yy + w["fx"][:, :, None, None] * xx)
        + w["phase"][:, :, None, None]
    )
    field_ = (w["amp"][:, :, None, None] * np.cos(arg)).sum(1)
    return field_ / np.sqrt((w["amp"] ** 2).sum(1) / 2)[:, None, None]  # ~unit variance


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur over the last two axes (sigma in pixels)."""
    radius = max(1, int(np.ceil(3 * sigma)))
    t = np.arange(-radius, radius + 1, dtype=np.float32)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    k /= k.sum()
    for axis in (-1, -2):
        pad = [(0, 0)] * x.ndim
        pad[axis] = (radius, radius)
        xp = np.pad(x, pad)
        n = x.shape[axis]
        x = sum(w * np.take(xp, np.arange(i, i + n), axis=axis) for i, w in enumerate(k))
    return x.astype(np.float32)


def _stroke_coverage(
    p0: np.ndarray,
    p1: np.ndarray,
    p2: np.ndarray,
    width_px: np.ndarray,
    valid: np.ndarray,
    size: int,
) -> np.ndarray:
    """Anti-aliased coverage (B, S, S) of quadratic Bezier strokes.

    p0, p1, p2: (B, K, 2) control points in [0, 1] image units (y, x); width_px: (B, K);
    valid: (B, K) which strokes exist. The curve is splatted as dense points (bilinear), then
    blurred to the stroke width; coverage saturates inside the stroke and falls off at edges.
    """
    b, k, _ = p0.shape
    length = (np.linalg.norm(p1 - p0, axis=-1) + np.linalg.norm(p2 - p1, axis=-1)) * size
    n_pts = int(np.ceil(length.max() * CURVE_POINTS_PER_PX)) + 2
    t = np.linspace(0, 1, n_pts, dtype=np.float32)[None, None, :, None]
    pts = (
        (1 - t) ** 2 * p0[:, :, None] + 2 * (1 - t) * t * p1[:, :, None] + t**2 * p2[:, :, None]
    ) * size - 0.5  # (B, K, N, 2) pixel coordinates
    # each point carries its share of the arc length, so density integrates to 1 across a line
    weight = np.broadcast_to((length / (n_pts - 1))[:, :, None], pts.shape[:3])
    out = np.zeros((b, size, size), np.float32)
    # strokes of similar width are drawn together; widths are binned to keep one blur per bin
    sigma = np.maximum(width_px / 2.5, 0.4)
    bins = np.round(sigma * 4) / 4
    for s in np.unique(bins[valid]):
        sel = valid & (bins == s)
        dens = _splat(pts, weight * sel[:, :, None], size)
        dens = _blur(dens, float(s))
        # value at the stroke edge (distance w/2) reaches 1: saturated core, soft border
        half = np.clip(2.5 * s / 2, 0.5, None)
        gain = np.sqrt(2 * np.pi) * s * np.exp(half**2 / (2 * s**2))
        out = np.maximum(out, np.clip(dens * gain, 0, 1))
    return out


def _splat(pts: np.ndarray, weight: np.ndarray, size: int) -> np.ndarray:
    """Bilinear splat of points (B, K, N, 2) with weights (B, K, N) into (B, S, S)."""
    b = pts.shape[0]
    y, x = pts[..., 0], pts[..., 1]
    y0, x0 = np.floor(y), np.floor(x)
    fy, fx = y - y0, x - x0
    img_idx = np.broadcast_to(np.arange(b)[:, None, None], y.shape)
    out = np.zeros(b * size * size, np.float64)
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            yi, xi = (y0 + dy).astype(np.int64), (x0 + dx).astype(np.int64)
            ok = (yi >= 0) & (yi < size) & (xi >= 0) & (xi < size) & (weight > 0)
            flat = (img_idx[ok] * size + yi[ok]) * size + xi[ok]
            out += np.bincount(flat, weights=(weight * wy * wx)[ok], minlength=out.size)
    return out.reshape(b, size, size).astype(np.float32)


def _over(img: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Alpha-composite ``colour`` (B, 3) or (B, 3, S, S) onto img (B, 3, S, S)."""
    if colour.ndim == 2:
        colour = colour[:, :, None, None]
    a = alpha[:, None]
    return img * (1 - a) + colour * a


# --------------------------------------------------------------------------- the renderer


@dataclass
class SceneParams:
    """Every random draw for a chunk of images, made whatever the labels are."""

    arrays: dict[str, Any]

    def __len__(self) -> int:
        return len(self.arrays["skin"])

    def take(self, index: slice) -> SceneParams:
        """The parameters of a sub-range of images."""

        def cut(v: Any) -> Any:
            if isinstance(v, dict):
                return {k: cut(x) for k, x in v.items()}
            if isinstance(v, tuple):
                return tuple(cut(x) for x in v)
            return v[index]

        return SceneParams(cut(self.arrays))


def sample_scene(rng: np.random.Generator, b: int) -> SceneParams:
    """Draw skin, lesion and artifact parameters for ``b`` images."""
    u = lambda lo, hi, shape=(b,): rng.uniform(lo, hi, shape).astype(np.float32)  # noqa: E731
    p: dict[str, Any] = {}
    tone = u(0, 1)[:, None]
    light, tan = np.array([0.93, 0.76, 0.68], np.float32), np.array([0.76, 0.55, 0.42], np.float32)
    p["skin"] = (light * (1 - tone) + tan * tone + u(-0.03, 0.03, (b, 3))).astype(np.float32)
    p["skin_waves"] = _waves(rng, b, 6, 1.0, 5.0)
    p["vignette"] = u(0.35, 0.7)
    p["speckle_seed"] = rng.integers(0, 2**31, b)
    # lesion: both disease variants are drawn, the label picks one
    p["centre"] = np.clip(0.5 + rng.normal(0, 0.05, (b, 2)), 0.38, 0.62).astype(np.float32)
    p["orient"] = u(0, np.pi)
    p["nv_radius"], p["mel_radius"] = u(0.13, 0.19), u(0.22, 0.30)
    p["nv_aspect"], p["mel_aspect"] = u(0.78, 1.0), u(0.6, 0.95)
    p["nv_harm"] = u(0.0, 0.025, (b, 4)) / np.arange(2, 6, dtype=np.float32)
    p["mel_harm"] = u(0.07, 0.18, (b, 4)) / np.sqrt(np.arange(2, 6, dtype=np.float32))
    p["harm_phase"] = u(0, 2 * np.pi, (b, 4))
    p["nv_colour"] = np.array([0.52, 0.33, 0.21], np.float32) * u(0.8, 1.1)[:, None]
    p["mel_waves_a"], p["mel_waves_b"] = _waves(rng, b, 4, 2, 6), _waves(rng, b, 4, 2, 6)
    p["mel_border"] = u(0.025, 0.045)
    # hair: dark curved strokes across the image
    p["hair_n"] = rng.integers(4, MAX_HAIRS + 1, b)
    start = rng.uniform(-0.1, 1.1, (b, MAX_HAIRS, 2)).astype(np.float32)
    ang = u(0, 2 * np.pi, (b, MAX_HAIRS))
    length = u(0.5, 1.1, (b, MAX_HAIRS))
    direction = np.stack([np.sin(ang), np.cos(ang)], -1)
    end = start + direction * length[..., None]
    normal = np.stack([-direction[..., 1], direction[..., 0]], -1)
    bend = rng.normal(0, 0.18, (b, MAX_HAIRS, 1)).astype(np.float32) * length[..., None]
    p["hair_pts"] = (start, (start + end) / 2 + normal * bend, end)
    p["hair_width"] = u(0.018, 0.028, (b, MAX_HAIRS))
    p["hair_colour"] = u(0.05, 0.2)[:, None] * np.array([1.0, 0.85, 0.75], np.float32)
    # gel bubbles: bright discs with specular rims
    p["gel_n"] = rng.integers(1, MAX_BUBBLES + 1, b)
    p["gel_centre"] = u(0.1, 0.9, (b, MAX_BUBBLES, 2))
    p["gel_radius"] = u(0.045, 0.085, (b, MAX_BUBBLES))
    # ink: violet/magenta marker marks around the lesion
    p["ink_n"] = rng.integers(1, MAX_INK + 1, b)
    p["ink_angle"] = u(0, 2 * np.pi, (b, MAX_INK))
    p["ink_dist"] = u(0.08, 0.14, (b, MAX_INK))
    p["ink_dir"] = u(0, np.pi, (b, MAX_INK))
    p["ink_len"] = u(0.08, 0.2, (b, MAX_INK))
    p["ink_width"] = u(0.05, 0.075, (b, MAX_INK))
    # saturated violet-to-magenta marker ink: red and blue far above green, a hue no lesion
    # has (melanoma's blue-grey has green ~ red, its brown and black have blue <= green), so a
    # classifier cannot read a lesion's colour as ink
    mix = u(0, 1)[:, None]
    p["ink_colour"] = (
        np.array(INK_VIOLET, np.float32) * (1 - mix) + np.array(INK_MAGENTA, np.float32) * mix
    )
    # ruler: a light bar with dark ticks along one edge
    p["ruler_side"] = rng.integers(0, 4, b)
    p["ruler_depth"] = u(0.10, 0.14)
    p["ruler_offset"] = u(0.0, 0.03)
    p["ruler_period"] = u(0.05, 0.07)
    p["ruler_shift"] = u(0, 1)
    p["ruler_colour"] = np.where(
        u(0, 1)[:, None] < 0.7, np.array([0.95, 0.95, 0.92]), np.array([0.95, 0.88, 0.45])
    ).astype(np.float32)
    return SceneParams(p)


def render(labels: np.ndarray, scene: SceneParams, size: int) -> np.ndarray:
    """Render images (B, S, S, 3) uint8 for labels (B, 6) in ``ATTRIBUTES`` order."""
    p = scene.arrays
    labels = np.asarray(labels).astype(bool)
    b = labels.shape[0]
    mel = labels[:, ATTRIBUTES.index("MEL")]
    on = {a: labels[:, ATTRIBUTES.index(a)] for a in ARTIFACTS}
    yy, xx = _grid(size)
    px = 1.0 / size

    # skin: tone, low-frequency texture, fine speckle
    tex = _eval_waves(p["skin_waves"], yy, xx)
    img = p["skin"][:, :, None, None] * (1 + 0.05 * tex[:, None])
    speckle = np.stack(
        [np.random.default_rng(int(s)).normal(0, 1, (size, size)) for s in p["speckle_seed"]]
    ).astype(np.float32)
    img = img * (1 + 0.025 * speckle[:, None])

    # lesion in rotated elliptical polar coordinates, border radius R(phi) with harmonics
    dy, dx = yy - p["centre"][:, 0, None, None], xx - p["centre"][:, 1, None, None]
    c, s = np.cos(p["orient"])[:, None, None], np.sin(p["orient"])[:, None, None]
    uu, vv = c * dx + s * dy, -s * dx + c * dy
    aspect = np.where(mel, p["mel_aspect"], p["nv_aspect"])[:, None, None]
    rho = np.sqrt((uu / aspect) ** 2 + vv**2)
    phi = np.arctan2(vv, uu / aspect)
    harm = np.where(mel[:, None], p["mel_harm"], p["nv_harm"])
    k = np.arange(2, 6, dtype=np.float32)[None, :, None, None]
    wobble = (
        harm[:, :, None, None] * np.cos(k * phi[:, None] + p["harm_phase"][:, :, None, None])
    ).sum(1)
    radius = np.where(mel, p["mel_radius"], p["nv_radius"])[:, None, None] * (1 + wobble)
    border = np.where(mel, p["mel_border"], np.float32(max(0.006, 0.6 * px)))[:, None, None]
    lesion = 1 / (1 + np.exp(-np.clip((radius - rho) / border, -30, 30)))
    # nevus: uniform brown, a touch darker in the centre
    nv_col = p["nv_colour"][:, :, None, None] * (0.9 + 0.1 * np.clip(rho / radius, 0, 1))[:, None]
    # melanoma: dark brown with black and blue-grey regions
    fa, fb = _eval_waves(p["mel_waves_a"], yy, xx), _eval_waves(p["mel_waves_b"], yy, xx)
    brown = np.array([0.38, 0.22, 0.13], np.float32)[None, :, None, None]
    black = np.array([0.10, 0.07, 0.06], np.float32)[None, :, None, None]
    blue = np.array([0.42, 0.47, 0.58], np.float32)[None, :, None, None]
    w_black = (1 / (1 + np.exp(-3 * (fa - 0.3))))[:, None]
    w_blue = (1 / (1 + np.exp(-3 * (fb - 0.6))))[:, None]
    mel_col = brown * (1 - w_black) + black * w_black
    mel_col = mel_col * (1 - 0.8 * w_blue) + blue * 0.8 * w_blue
    lesion_col = np.where(mel[:, None, None, None], mel_col, nv_col)
    img = img * (1 - lesion[:, None]) + lesion_col * lesion[:, None]

    # dermoscope vignetting: dark circular corners
    r_c = np.sqrt((yy - 0.5) ** 2 + (xx - 0.5) ** 2)
    vig = np.clip((r_c - 0.38) / 0.32, 0, 1) ** 1.5
    img = img * (1 - p["vignette"][:, None, None, None] * vig)

    # hair
    if on["hair"].any():
        valid = (np.arange(MAX_HAIRS)[None] < p["hair_n"][:, None]) & on["hair"][:, None]
        cov = _stroke_coverage(*p["hair_pts"], np.maximum(p["hair_width"] * size, 1.0), valid, size)
        img = _over(img, p["hair_colour"], 0.9 * cov)

    # gel bubbles: faint bright disc, dark outer edge, bright rim, specular highlight
    if on["gel_bubbles"].any():
        valid = (np.arange(MAX_BUBBLES)[None] < p["gel_n"][:, None]) & on["gel_bubbles"][:, None]
        cy = p["gel_centre"][:, :, 0, None, None]
        cx = p["gel_centre"][:, :, 1, None, None]
        r = p["gel_radius"][:, :, None, None]
        d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)  # (B, K, S, S)
        ring_w = max(0.012, 0.8 * px)
        soft = lambda x: np.clip(0.5 + x / max(0.6 * px, 1e-6), 0, 1)  # noqa: E731
        disc = soft(r - d)
        rim = np.exp(-0.5 * ((d - r + ring_w) / ring_w) ** 2)
        edge = np.exp(-0.5 * ((d - r - 0.6 * ring_w) / (0.6 * ring_w)) ** 2)
        hl = soft(0.3 * r - np.sqrt((yy - cy + 0.4 * r) ** 2 + (xx - cx + 0.4 * r) ** 2))
        v = valid[:, :, None, None]
        white = np.ones((b, 3), np.float32)
        img = _over(img, white, (0.25 * disc * v).max(1))
        img = _over(img, np.full((b, 3), 0.15, np.float32), (0.55 * edge * v).max(1))
        img = _over(img, white, (0.9 * rim * v).max(1))
        img = _over(img, white, (0.95 * hl * v).max(1))

    # ink: thick violet/magenta marks just outside the lesion
    if on["ink"].any():
        valid = (np.arange(MAX_INK)[None] < p["ink_n"][:, None]) & on["ink"][:, None]
        base_r = np.where(mel, p["mel_radius"], p["nv_radius"])[:, None]
        mid = p["centre"][:, None, :] + (base_r + p["ink_dist"])[..., None] * np.stack(
            [np.sin(p["ink_angle"]), np.cos(p["ink_angle"])], -1
        )
        mid = np.clip(mid, 0.18, 0.82)  # centre clear of a ruler band (depth <= 0.17)
        half = (
            0.5
            * p["ink_len"][..., None]
            * np.stack([np.sin(p["ink_dir"]), np.cos(p["ink_dir"])], -1)
        )
        cov = _stroke_coverage(
            mid - half, mid, mid + half, np.maximum(p["ink_width"] * size, 2.0), valid, size
        )
        img = _over(img, p["ink_colour"], 0.92 * cov)

    # ruler: bar along one edge with ticks every period, every 5th one long
    if on["ruler"].any():
        side = p["ruler_side"][:, None, None]
        along = np.where(side < 2, xx, yy)
        depth = np.select([side == 0, side == 1, side == 2], [yy, 1 - yy, xx], 1 - xx)
        depth = depth - p["ruler_offset"][:, None, None]
        bar_d = p["ruler_depth"][:, None, None]
        bar = ((depth >= 0) & (depth < bar_d)).astype(np.float32)
        period = p["ruler_period"][:, None, None]
        pos = along / period + p["ruler_shift"][:, None, None]
        tick_w = np.maximum(0.22, 1.0 / (period * size))  # at least one pixel wide
        tick = np.mod(pos, 1.0) < tick_w
        long_tick = np.mod(np.floor(pos), 5) == 0
        tick_len = np.where(long_tick, 0.75, 0.45) * bar_d
        tick = tick & (depth >= 0) & (depth < tick_len)
        edge_line = (depth >= bar_d - max(0.015, px)) & (depth < bar_d)
        bar = bar * on["ruler"][:, None, None]
        img = _over(img, p["ruler_colour"], 0.92 * bar)
        dark = (tick | edge_line) * bar
        img = _over(img, np.full((b, 3), 0.08, np.float32), 0.95 * dark)

    return (np.clip(img, 0, 1).transpose(0, 2, 3, 1) * 255 + 0.5).astype(np.uint8)
