"""Procedural chest radiographs: a per-patient anatomy drawn with the findings of one study.

Everything is drawn analytically in *anatomy coordinates* ``(u, v)`` in [-1, 1] (``u`` from the
image's left, which is the patient's right, ``v`` from the top), then seen through a
:class:`Pose` (shift, rotation, scale, inspiration) so that one patient's follow-up films are
the same body slightly repositioned. Per-patient textures (lung vessels, parenchyma) are fixed
noise fields sampled at the posed coordinates, so they move with the body.

The image is composed in a brightness domain (0 = air, about 0.6 = soft tissue, higher = bone
and metal) from: the body outline with shoulders and neck; two lungs (dark) with apices,
costophrenic angles and diaphragm domes; the heart and mediastinum with trachea and aortic knob;
the spine; posterior and anterior ribs; clavicles, scapulae and humeral heads; hila and vessel
markings; a gastric bubble; breast shadows for women. Findings (effusion, cardiomegaly,
consolidation, atelectasis, edema, pneumothorax, nodule, granuloma) and support devices (ETT,
enteric tube, central lines, PICC, pacemaker with leads, sternotomy wires, chest tube, ECG
leads on portable films) are drawn from a :class:`~diffmem.data.synth.findings.Findings`.
PA views are upright outpatient films; AP views are supine/semi-upright portable ICU films
with magnified heart, lower lung volumes, overlapping scapulae, more noise and a
``PORTABLE`` marker.

Nothing here needs torch: numpy and scipy.ndimage only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from diffmem.data.synth.findings import Findings

# Texture fields are drawn once per patient at this resolution (independent of output size).
_TEX = 160


@dataclass(frozen=True)
class Anatomy:
    """One patient's fixed body: shapes in anatomy coordinates and texture seeds."""

    sex: str
    body_w: float          # half-width scale of the torso
    lung_top: float        # apex height (v)
    lung_lat_r: float      # lateral extent of the right lung (image left)
    lung_lat_l: float      # lateral extent of the left lung (image right)
    dome_r: float          # right hemidiaphragm peak (v); the left one sits lower
    dome_l: float
    med_w: float           # mediastinal half-width
    heart_x: float
    heart_y: float
    heart_a: float         # heart semi-axes (a: transverse)
    heart_b: float
    heart_rot: float       # degrees
    aorta: float           # aortic knob prominence
    rib_gap: float         # vertical spacing of posterior ribs
    rib_w: float           # rib thickness
    rib_tilt: float        # how steeply ribs rise from the spine
    clav_v: float          # clavicle height
    clav_tilt: float
    spine_x: float
    bone: float            # bone density factor
    tissue: float          # soft-tissue thickness factor
    texture_seed: int


@dataclass(frozen=True)
class Pose:
    """How one film sees the anatomy: position, inspiration and exposure."""

    dx: float = 0.0
    dy: float = 0.0
    rot: float = 0.0        # degrees
    scale: float = 1.0
    inspiration: float = 0.0  # >0 deeper breath: domes lower
    exposure: float = 1.0
    gamma: float = 1.0


def random_anatomy(rng: np.random.Generator, *, sex: str) -> Anatomy:
    """Draw a patient's anatomy (a few percent of variation around an average adult)."""
    n = rng.normal
    f = 0.96 if sex == "F" else 1.0
    return Anatomy(
        sex=sex,
        body_w=float(f * (1.0 + 0.04 * n())),
        lung_top=float(-0.74 + 0.03 * n()),
        lung_lat_r=float(f * (0.76 + 0.03 * n())),
        lung_lat_l=float(f * (0.74 + 0.03 * n())),
        dome_r=float(0.36 + 0.04 * n()),
        dome_l=float(0.41 + 0.04 * n()),
        med_w=float(0.105 + 0.01 * n()),
        heart_x=float(0.125 + 0.02 * n()),
        heart_y=float(0.26 + 0.03 * n()),
        heart_a=float(0.27 + 0.02 * n()),
        heart_b=float(0.20 + 0.015 * n()),
        heart_rot=float(22 + 5 * n()),
        aorta=float(np.clip(0.6 + 0.3 * n(), 0.1, 1.2)),
        rib_gap=float(0.128 + 0.006 * n()),
        rib_w=float(0.046 + 0.004 * n()),
        rib_tilt=float(0.30 + 0.05 * n()),
        clav_v=float(-0.66 + 0.03 * n()),
        clav_tilt=float(0.16 + 0.04 * n()),
        spine_x=float(0.01 * n()),
        bone=float(np.clip(1.0 + 0.12 * n(), 0.7, 1.3)),
        tissue=float(np.clip(1.0 + 0.1 * n(), 0.75, 1.3)),
        texture_seed=int(rng.integers(0, 2**31 - 1)),
    )


def random_pose(rng: np.random.Generator, *, view: str, jitter: float = 1.0) -> Pose:
    """A film's positioning: PA films are steady, portable AP films vary more.

    ``jitter`` scales every deviation (near-duplicate series use a small one).
    """
    ap = view == "AP"
    n = rng.normal
    j = jitter
    return Pose(dx=float(j * (0.035 if ap else 0.02) * n()),
                dy=float(j * (0.04 if ap else 0.02) * n()),
                rot=float(j * (2.5 if ap else 1.0) * n()),
                scale=float(1.0 + j * (0.035 if ap else 0.02) * n()),
                inspiration=float(j * (0.05 if ap else 0.03) * n()),
                exposure=float(1.0 + j * (0.07 if ap else 0.04) * n()),
                gamma=float(1.0 + j * (0.06 if ap else 0.03) * n()))


# -- small drawing helpers ---------------------------------------------------------------------
def _step(x, eps):
    """Smooth step from 0 (x << 0) to 1 (x >> 0) of width ``eps``."""
    return 0.5 * (1.0 + np.tanh(x / eps))


def _gauss(x, y, cx, cy, sx, sy):
    return np.exp(-0.5 * (((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2))


def _ellipse(x, y, cx, cy, a, b, rot_deg, eps):
    t = np.deg2rad(rot_deg)
    xr = (x - cx) * np.cos(t) + (y - cy) * np.sin(t)
    yr = -(x - cx) * np.sin(t) + (y - cy) * np.cos(t)
    r = np.sqrt((xr / a) ** 2 + (yr / b) ** 2)
    return _step(1.0 - r, eps / max(min(a, b), 1e-3))


@dataclass
class _Frame:
    """Pixel grid of one film and the pose's maps between pixels and anatomy."""

    size: int
    pose: Pose

    def __post_init__(self):
        q = (np.arange(self.size, dtype=np.float64) + 0.5) / self.size * 2.0 - 1.0
        qv, qu = np.meshgrid(q, q, indexing="ij")
        p = self.pose
        t = np.deg2rad(p.rot)
        c, s = np.cos(t), np.sin(t)
        x, y = (qu - p.dx) / p.scale, (qv - p.dy) / p.scale
        # float64 throughout: float32 is twice as fast, but its exp/pow/sin results depend on
        # the CPU's SIMD level (AVX2 vs AVX-512), which changed the rendered bytes from one
        # machine to the next; float64 differences stay far below the 8-bit output's steps
        self.u = c * x + s * y
        self.v = -s * x + c * y
        # softness of edges: at least about one pixel
        self.eps = max(0.012, 2.4 / self.size)

    def to_pixels(self, u, v):
        """Anatomy coordinates to (row, col) pixel coordinates."""
        p = self.pose
        t = np.deg2rad(p.rot)
        c, s = np.cos(t), np.sin(t)
        qu = (c * u - s * v) * p.scale + p.dx
        qv = (s * u + c * v) * p.scale + p.dy
        return (qv + 1.0) / 2.0 * self.size - 0.5, (qu + 1.0) / 2.0 * self.size - 0.5


def _curve(points, n=200):
    """A smooth curve through ``points`` (Catmull-Rom), as arrays (u, v) of ``n`` samples."""
    pts = np.asarray(points, dtype=np.float64)
    pts = np.vstack([2 * pts[0] - pts[1], pts, 2 * pts[-1] - pts[-2]])
    segs = len(pts) - 3
    ts = np.linspace(0, segs, n, endpoint=False)
    i = np.minimum(ts.astype(int), segs - 1)
    t = (ts - i)[:, None]
    p0, p1, p2, p3 = pts[i], pts[i + 1], pts[i + 2], pts[i + 3]
    out = 0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t ** 2
                 + (-p0 + 3 * p1 - 3 * p2 + p3) * t ** 3)
    out = np.vstack([out, pts[-2]])
    return out[:, 0], out[:, 1]


def _stroke(frame, u, v, width_px, *, offset=0.0):
    """Rasterize a polyline (anatomy coords) as an antialiased line of ``width_px`` pixels.

    ``offset`` shifts the line sideways (in anatomy units) to draw tube walls.
    """
    if offset:
        du, dv = np.gradient(u), np.gradient(v)
        norm = np.hypot(du, dv) + 1e-12
        u, v = u - offset * dv / norm, v + offset * du / norm
    rows, cols = frame.to_pixels(u, v)
    # resample to about 3 samples per pixel
    seg = np.hypot(np.diff(rows), np.diff(cols))
    length = np.concatenate([[0.0], np.cumsum(seg)])
    m = max(int(length[-1] * 3), 2)
    s = np.linspace(0, length[-1], m)
    rows, cols = np.interp(s, length, rows), np.interp(s, length, cols)
    n = frame.size
    img = np.zeros((n + 2, n + 2))
    r0, c0 = np.floor(rows).astype(int), np.floor(cols).astype(int)
    fr, fc = rows - r0, cols - c0
    w_each = 1.0 / 3.0
    for dr, dc, w in ((0, 0, (1 - fr) * (1 - fc)), (1, 0, fr * (1 - fc)),
                      (0, 1, (1 - fr) * fc), (1, 1, fr * fc)):
        rr, cc = r0 + dr + 1, c0 + dc + 1
        ok = (rr >= 0) & (rr < n + 2) & (cc >= 0) & (cc < n + 2)
        np.add.at(img, (rr[ok], cc[ok]), w[ok] * w_each)
    img = img[1:-1, 1:-1]
    sigma = max(width_px / 2.5, 0.55)
    img = ndimage.gaussian_filter(img, sigma, mode="constant")
    # a line of unit density whatever its width: peak ~1 on the line
    peak = 1.0 / (np.sqrt(2 * np.pi) * sigma)
    return np.clip(img / peak, 0.0, 1.2)


def _blob(frame, u, v, r):
    """A round opacity of radius ``r`` at (u, v)."""
    return _step(r - np.hypot(frame.u - u, frame.v - v), frame.eps)


# -- textures ----------------------------------------------------------------------------------
def _vessel_tree(rng: np.random.Generator, n: int) -> np.ndarray:
    """Branching pulmonary vessels from both hila, rasterized on an ``n`` x ``n`` texture grid
    laid over anatomy coordinates [-1.25, 1.25] (tapering, forking, slightly curved)."""
    by_width: dict[int, list[np.ndarray]] = {}
    scale = (n - 1) / 2.5

    def grow(x, y, ang, length, gen):
        pts = [(x, y)]
        for _ in range(4):
            ang += rng.normal(0, 0.12)
            x, y = x + np.cos(ang) * length / 4, y + np.sin(ang) * length / 4
            pts.append((x, y))
        by_width.setdefault(gen, []).append(np.array(pts))
        if gen < 5:
            spread = rng.uniform(0.3, 0.6)
            for sgn in (-1, 1):
                if gen >= 3 and rng.random() < 0.2:
                    continue
                grow(x, y, ang + sgn * spread * rng.uniform(0.6, 1.0),
                     length * rng.uniform(0.62, 0.8), gen + 1)

    for s in (-1.0, 1.0):
        hx, hy = s * 0.19, -0.05
        for base in (-1.35, -0.6, 0.1, 0.75, 1.15):  # up, up-lateral, lateral, down, down-medial
            ang = base + rng.normal(0, 0.12)
            ang = ang if s > 0 else np.pi - ang
            grow(hx + rng.normal(0, 0.02), hy + rng.normal(0, 0.03), ang,
                 rng.uniform(0.16, 0.22), 0)
    out = np.zeros((n, n))
    for gen, lines in by_width.items():
        buf = np.zeros((n, n))
        for pts in lines:
            seg = np.hypot(*np.diff(pts, axis=0).T).sum()
            m = max(int(seg * scale * 3), 2)
            t = np.linspace(0, len(pts) - 1, m)
            xs = np.interp(t, np.arange(len(pts)), pts[:, 0])
            ys = np.interp(t, np.arange(len(pts)), pts[:, 1])
            cols = np.clip(np.round((xs + 1.25) * scale).astype(int), 0, n - 1)
            rows = np.clip(np.round((ys + 1.25) * scale).astype(int), 0, n - 1)
            np.add.at(buf, (rows, cols), 1.0 / 3.0)
        width_px = 0.02 * 0.72 ** gen * scale
        sigma = max(width_px / 1.6, 0.8)
        buf = ndimage.gaussian_filter(buf, sigma) * np.sqrt(2 * np.pi) * sigma
        out += buf * (0.85 ** gen)
    return np.clip(out, 0, 1.5)


def anatomy_textures(anatomy: Anatomy) -> dict[str, np.ndarray]:
    """The patient's fixed textures: vessel trees, parenchyma and soft-tissue noise.

    Computed once per patient and reused for every film, so textures move with the body.
    """
    rng = np.random.default_rng(anatomy.texture_seed)
    vessels = _vessel_tree(rng, 2 * _TEX)
    fine = ndimage.gaussian_filter(rng.standard_normal((_TEX, _TEX)), 1.2)
    coarse = ndimage.gaussian_filter(rng.standard_normal((_TEX, _TEX)), 6.0)
    blotch = ndimage.gaussian_filter(rng.standard_normal((_TEX, _TEX)), 3.0)
    return {"vessels": vessels.astype(np.float64),
            "fine": fine / fine.std(),
            "coarse": coarse / coarse.std(),
            "blotch": blotch / blotch.std()}


def _sample(field, u, v):
    """Sample a square texture field laid over anatomy coordinates [-1.25, 1.25]."""
    n = field.shape[0]
    rows = (v + 1.25) / 2.5 * (n - 1)
    cols = (u + 1.25) / 2.5 * (n - 1)
    return ndimage.map_coordinates(field, [rows, cols], order=1, mode="reflect")


# -- the film ----------------------------------------------------------------------------------
# Bitmap glyphs (5 x 7) for the film markers, so text looks the same everywhere.
_GLYPHS = {
    "A": ["01110", "10001", "10001", "11111", "10001", "10001", "10001"],
    "B": ["11110", "10001", "10001", "11110", "10001", "10001", "11110"],
    "E": ["11111", "10000", "10000", "11110", "10000", "10000", "11111"],
    "I": ["01110", "00100", "00100", "00100", "00100", "00100", "01110"],
    "L": ["10000", "10000", "10000", "10000", "10000", "10000", "11111"],
    "O": ["01110", "10001", "10001", "10001", "10001", "10001", "01110"],
    "P": ["11110", "10001", "10001", "11110", "10000", "10000", "10000"],
    "R": ["11110", "10001", "10001", "11110", "10100", "10010", "10001"],
    "S": ["01111", "10000", "10000", "01110", "00001", "00001", "11110"],
    "T": ["11111", "00100", "00100", "00100", "00100", "00100", "00100"],
    "U": ["10001", "10001", "10001", "10001", "10001", "10001", "01110"],
    "N": ["10001", "11001", "10101", "10011", "10001", "10001", "10001"],
    "G": ["01110", "10001", "10000", "10111", "10001", "10001", "01111"],
    "H": ["10001", "10001", "10001", "11111", "10001", "10001", "10001"],
    " ": ["00000"] * 7,
}


def _text(img, text, row, col, height):
    """Burn ``text`` (capital letters from :data:`_GLYPHS`) into ``img`` at (row, col)."""
    glyph = np.hstack([np.hstack([np.array([[c == "1" for c in line] for line in _GLYPHS[ch]],
                                           dtype=float), np.zeros((7, 1))]) for ch in text])
    zoom = height / 7.0
    mark = ndimage.zoom(glyph, zoom, order=1, mode="nearest", grid_mode=True)
    h, w = mark.shape
    r1, c1 = min(row + h, img.shape[0]), min(col + w, img.shape[1])
    if r1 <= row or c1 <= col:
        return
    region = img[row:r1, col:c1]
    img[row:r1, col:c1] = np.maximum(region, np.clip(mark[:r1 - row, :c1 - col], 0, 1) * 1.05)


def render_chest(anatomy: Anatomy, findings: Findings, *, view: str, pose: Pose, size: int,
                 noise_seed: int, device_seed: int | None = None,
                 textures: dict[str, np.ndarray] | None = None,
                 marker: bool = True) -> np.ndarray:
    """Draw one frontal chest radiograph.

    Parameters
    ----------
    anatomy : Anatomy
        The patient's body (:func:`random_anatomy`).
    findings : Findings
        What the film shows.
    view : {"PA", "AP"}
        Upright PA (outpatient) or portable AP (ICU) geometry.
    pose : Pose
        Positioning and exposure of this film (:func:`random_pose`).
    size : int
        Side of the square output in pixels.
    noise_seed : int
        Seed of the film's quantum noise.
    device_seed : int, optional
        Seed of the placement of external objects (ECG leads on portable films); defaults to
        ``noise_seed``. Keep it fixed to redraw one film with fresh noise only.
    textures : dict, optional
        :func:`anatomy_textures` of this patient (computed when omitted; pass it to reuse).
    marker : bool
        Burn the ``PORTABLE`` / side marker into AP films.

    Returns
    -------
    numpy.ndarray
        float32 (size, size) in [0, 1]; bright = dense, as a radiograph is displayed.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> a = random_anatomy(rng, sex="M")
    >>> img = render_chest(a, Findings(), view="PA", pose=Pose(), size=64, noise_seed=1)
    >>> img.shape, img.dtype, float(img.min()) >= 0.0, float(img.max()) <= 1.0
    ((64, 64), dtype('float32'), True, True)
    """
    if view not in ("PA", "AP"):
        raise ValueError(f"view must be 'PA' or 'AP', got {view!r}")
    tex = textures if textures is not None else anatomy_textures(anatomy)
    rng = np.random.default_rng(noise_seed)
    dev_rng = np.random.default_rng(noise_seed if device_seed is None else device_seed)
    # 1. geometry of this film (AP: magnified heart, lower volumes, higher clavicles)
    film = _film(anatomy, findings, pose, ap=view == "AP", size=size)
    img = _draw_body(film, tex)  # 2.
    _draw_lungs(img, film)  # 3.
    _draw_mediastinum(img, film, tex)  # 4.
    _draw_bones(img, film)  # 5.-9. (and the gastric bubble, breasts, heart density)
    # 10. findings
    img, no_markings = _draw_findings(img, film, tex, rng)
    img += film.vessels * (1.0 - no_markings)
    # 11. devices and external objects
    img = _draw_devices(img, film, dev_rng)
    # 12. exposure, noise, markers
    return _expose(img, pose, film.ap, size=size, marker=marker, rng=rng)


@dataclass
class _Film:
    """One film's geometry and the anatomy masks the drawing steps share."""

    fr: _Frame
    a: Anatomy
    f: Findings
    ap: bool
    ha: float
    hb: float
    dome: dict
    lat: dict
    top: float
    lung: np.ndarray | None = None
    lung_masks: dict | None = None
    heart: np.ndarray | None = None
    lung_vis: np.ndarray | None = None
    lung_open: dict | None = None
    carina_v: float = 0.0
    tx: float = 0.0
    hilum: dict | None = None
    vessels: np.ndarray | None = None
    body: np.ndarray | None = None


def _film(a: Anatomy, f: Findings, pose: Pose, *, ap: bool, size: int) -> _Film:
    heart_scale = {None: 1.0, "mild": 1.16, "moderate": 1.3, "severe": 1.45}[f.cardiomegaly]
    ha = a.heart_a * heart_scale * (1.1 if ap else 1.0)
    hb = a.heart_b * (1.0 + 0.6 * (heart_scale - 1.0)) * (1.08 if ap else 1.0)
    insp = pose.inspiration - (0.07 if ap else 0.0)
    dome = {"right": a.dome_r + insp, "left": a.dome_l + insp}
    lat = {"right": a.lung_lat_r, "left": a.lung_lat_l}
    top = a.lung_top + (0.02 if ap else 0.0)
    return _Film(fr=_Frame(size, pose), a=a, f=f, ap=ap, ha=ha, hb=hb, dome=dome, lat=lat,
                 top=top)


def _draw_body(film: _Film, tex: dict[str, np.ndarray]) -> np.ndarray:
    """2. body: neck, shoulders, chest wall, abdomen (a new image)."""
    a, ap, dome = film.a, film.ap, film.dome
    u, v, eps = film.fr.u, film.fr.v, film.fr.eps
    knots_v = [-1.3, -1.0, -0.92, -0.84, -0.72, -0.3, 0.3, 1.3]
    knots_w = [0.26, 0.28, 0.6, 0.9, 1.03, 0.97, 0.94, 0.88]
    wb = np.interp(v, knots_v, knots_w) * a.body_w * (1.04 if ap else 1.0)
    body = _step(wb - np.abs(u), eps * 1.5)
    film.body = body
    thick = np.sqrt(np.clip(1.0 - (u / wb) ** 2, 0.0, 1.0))
    img = body * (0.34 + 0.30 * thick ** 0.6) * a.tissue
    img += body * 0.05 * _sample(tex["coarse"], u, v)
    # abdomen below the domes is denser (liver on the right)
    sx = np.abs(u)
    dome_line = np.where(u < 0, dome["right"], dome["left"]) + 0.25 * (sx / 0.75) ** 2
    img += body * _step(v - dome_line, 0.05) * (0.08 + 0.05 * (u < 0))
    return img


def _draw_lungs(img: np.ndarray, film: _Film) -> None:
    """3. lungs: rounded apex, lateral wall, dome with deep costophrenic recess; the heart."""
    a, ap, dome, lat, top = film.a, film.ap, film.dome, film.lat, film.top
    u, v, eps = film.fr.u, film.fr.v, film.fr.eps
    lung = np.zeros_like(u)
    lung_masks = {}
    for side, s in (("right", -1.0), ("left", 1.0)):
        t = s * u
        L = lat[side]
        med = a.med_w + 0.03 * _gauss(t, v, 0.0, 0.25, 1.0, 0.2)
        if side == "left":  # aortic knob
            med = med + 0.06 * a.aorta * _gauss(t, v, 0.0, -0.33, 1.0, 0.06)
        span = L - a.med_w
        x_lat = med + (L - med) * np.clip((v - top) / 0.6, 0.0, 1.0) ** 0.4
        x_lat = x_lat + 0.05 * np.clip(v, 0.0, 1.0)
        y_top = top + 0.5 * ((t - (a.med_w + 0.38 * span)) / span) ** 2
        tc = a.med_w + 0.42 * span
        y_d = dome[side] + 0.34 * ((t - tc) / span) ** 2
        y_d = y_d + 0.35 * np.clip((t - (L - 0.16)) / 0.16, 0.0, None) ** 2 * 0.45
        m = (_step(x_lat - t, eps) * _step(t - med, eps) * _step(y_d - v, eps)
             * _step(v - y_top, eps * 1.5))
        lung_masks[side] = m
        lung = lung + m
    hy = a.heart_y + (0.03 if ap else 0.0)
    heart = np.maximum(_ellipse(u, v, a.heart_x, hy, film.ha, film.hb, a.heart_rot, eps),
                       _ellipse(u, v, a.heart_x + 0.03, hy + 0.13, film.ha * 0.9, film.hb * 0.85,
                                a.heart_rot, eps))
    # the heart hides the lung in front of it; the left lower lobe still shows faintly
    lung_vis = lung * (1.0 - 0.9 * heart)
    film.lung, film.lung_masks, film.heart, film.lung_vis = lung, lung_masks, heart, lung_vis
    film.lung_open = {k: m * (1.0 - 0.9 * heart) for k, m in lung_masks.items()}
    # lungs are darkest at mid height, greyer at the apices (muscle, bone) and bases (soft
    # tissue, breasts), and a little greyer medially
    height = np.clip((v - top) / (max(dome["right"], dome["left"]) - top), 0, 1)
    depth = 0.72 + 0.28 * np.clip(np.sin(height * np.pi), 0.0, 1.0) ** 0.7
    img -= 0.38 * lung_vis * depth * (0.9 if ap else 1.0)


def _draw_mediastinum(img: np.ndarray, film: _Film, tex: dict[str, np.ndarray]) -> None:
    """4. mediastinum details: trachea and bronchi (air), hila, vessels (kept for step 10)."""
    a, ap, lung, heart = film.a, film.ap, film.lung, film.heart
    u, v, eps = film.fr.u, film.fr.v, film.fr.eps
    carina_v = -0.16 + (0.02 if ap else 0.0)
    tx = a.spine_x + 0.01
    film.carina_v, film.tx = carina_v, tx
    trachea = (_step(0.028 - np.abs(u - tx), eps) * _step(carina_v - v, eps)
               * _step(v + 1.05, eps))
    for s in (-1.0, 1.0):
        bu = tx + s * np.clip(v - carina_v, 0, 0.16) * (0.9 if s < 0 else 1.3)
        trachea = trachea + (_step(0.02 - np.abs(u - bu), eps) * _step(v - carina_v, eps)
                             * _step(carina_v + 0.14 - v, eps))
    img -= 0.09 * np.clip(trachea, 0, 1)
    hilum = {}
    for side, s in (("right", -1.0), ("left", 1.0)):
        hu, hv = s * 0.19 + 0.01, -0.04 if side == "right" else -0.08
        hilum[side] = (hu, hv)
        img += 0.07 * _gauss(u, v, hu, hv, 0.05, 0.08)
    film.hilum = hilum
    film.vessels = 0.09 * lung * (1.0 - 0.7 * heart) * _sample(tex["vessels"], u, v)
    img += lung * 0.018 * _sample(tex["fine"], u, v)


def _draw_bones(img: np.ndarray, film: _Film) -> None:
    """5.-9. spine, ribs, clavicles, scapulae and humeral heads; gastric bubble and breast
    shadows; heart and great vessels."""
    a, ap, dome, lat, top, body = film.a, film.ap, film.dome, film.lat, film.top, film.body
    u, v, eps = film.fr.u, film.fr.v, film.fr.eps
    # 5. spine (through the mediastinum), vertebral bodies and pedicles
    su = u - a.spine_x
    spine = _step(0.07 - np.abs(su), eps)
    period = 0.092
    phase = np.mod(v + 0.03, period) / period
    disc = np.exp(-((phase - 0.5) / 0.09) ** 2)
    pedicle = (_gauss(np.abs(su), phase, 0.05, 0.3, 0.012, 0.12)
               + 0.7 * _gauss(su, phase, 0.0, 0.65, 0.012, 0.15))
    img += a.bone * spine * (0.07 - 0.03 * disc)
    img += a.bone * 0.035 * pedicle * spine

    # 6. ribs: posterior (arching up from the spine, turning down at the chest wall) and
    # anterior (fainter, sloping down toward the sternum); faint below the domes
    ribs = np.zeros_like(u)
    for s in (-1.0, 1.0):
        t = s * su
        side = "right" if s < 0 else "left"
        L = lat[side]
        cage = _step(L + 0.08 - t, eps) * _step(t - 0.04, eps) * body
        below = _step(v - (dome[side] + 0.05), 0.05)
        for k in range(10):
            v0 = top + 0.06 + k * a.rib_gap * (1.0 + 0.025 * k)
            tt = t - 0.06
            yc = (v0 - (a.rib_tilt + 0.2) * tt + 0.6 * tt ** 2
                  + 2.6 * np.clip(t - (L - 0.2), 0, None) ** 2)
            w = a.rib_w * (1.0 + 0.05 * k)
            d = np.abs(v - yc) / w
            band = _step(0.5 - d, 0.06)
            cortex = np.exp(-((d - 0.42) / 0.1) ** 2) * band
            post = band * (0.5 + 0.5 * _step(t - 0.12, 0.04))
            ribs += cage * (1.0 - 0.6 * below) * (0.05 * post + 0.025 * cortex)
            if 1 <= k <= 6:  # anterior rib k
                va = v0 + 0.12 + 0.03 * k
                ya = va + 0.55 * np.clip(L + 0.04 - t, 0, None) ** 1.1
                da = np.abs(v - ya) / (w * 1.2)
                ant = _step(0.5 - da, 0.08) * _step(t - 0.28, 0.04) * cage
                ribs += 0.03 * ant * (1.0 - below)
    img += a.bone * ribs

    # 7. clavicles (S-shaped, lateral end higher), scapulae, humeral heads
    cv = a.clav_v - (0.08 if ap else 0.0)
    for s in (-1.0, 1.0):
        t = s * su
        tt = np.clip(t, 0.0, 0.8)
        yc = cv + 0.05 - a.clav_tilt * tt - 0.05 * np.sin(tt / 0.75 * 2 * np.pi)
        d = np.abs(v - yc) / 0.06
        clav = _step(0.5 - d, 0.06) * _step(t - 0.06, eps) * _step(0.74 - t, 0.02)
        img += a.bone * (0.10 * clav + 0.05 * np.exp(-((d - 0.42) / 0.1) ** 2) * clav)
        head = _ellipse(t, v, 0.98, cv - 0.1, 0.15, 0.16, 0, eps)
        img += a.bone * 0.12 * head * body
        sc_med = (0.5 if ap else 0.7) + 0.18 * (v + 0.6)
        scap = (_step(t - sc_med, eps) * _step(v - cv - 0.02, eps)
                * _step(-0.05 - v + 0.1 * (t - 0.6), 0.06) * body)
        img += a.bone * 0.045 * scap

    # 8. gastric bubble under the left dome; breast shadows
    img -= 0.10 * _ellipse(u, v, 0.34, dome["left"] + 0.16, 0.11, 0.05, -10, eps) * body
    if a.sex == "F":
        for s in (-1.0, 1.0):
            img += 0.06 * _ellipse(u, v, s * 0.5, 0.42, 0.36, 0.24, s * 10, 0.05) * body

    # 9. heart and great vessels
    img += 0.025 * film.heart * body
    img += 0.04 * a.aorta * _gauss(u, v, 0.14, -0.33, 0.05, 0.05)


def _expose(img: np.ndarray, pose: Pose, ap: bool, *, size: int, marker: bool,
            rng: np.random.Generator) -> np.ndarray:
    """12. exposure, quantum noise and burned-in film markers; float32 in [0, 1]."""
    img = np.clip(img, 0.0, None) * pose.exposure
    img = np.clip(img / 0.95, 0.0, 1.0) ** (1.15 * pose.gamma)
    noise = rng.standard_normal(img.shape)
    noise = ndimage.gaussian_filter(noise, 0.6) * 2.0
    # quantum noise of a full-size film averages down with the pixel size (256 px reference)
    amp = (0.03 if ap else 0.02) * min(1.0, size / 256.0) ** 0.75
    img = img + amp * noise * (0.5 + 0.5 * np.sqrt(img + 0.02))
    if ap and marker:  # burned-in film markers (just "AP" where "PORTABLE" would not fit)
        h = max(int(round(size * 0.035)), 7)
        word = "PORTABLE" if size >= 112 else "AP"
        _text(img, word, int(size * 0.03), size - int(len(word) * 6 * h / 7) - int(size * 0.06), h)
        _text(img, "L", int(size * 0.03) + h + 3, int(size * 0.9), h)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def _lobe_center(lobe, dome, lat, top):
    """Centre (u, v) and radii of a lobe's typical opacity."""
    right = lobe.startswith("right")
    s = -1.0 if right else 1.0
    L = lat["right" if right else "left"]
    d = dome["right" if right else "left"]
    if "upper" in lobe:
        return s * 0.42 * L / 0.75, top + 0.3, 0.2, 0.16
    if "middle" in lobe or "lingula" in lobe:
        return s * 0.33, d - 0.2, 0.18, 0.12
    return s * 0.45 * L / 0.75, d - 0.1, 0.2, 0.14


def _draw_findings(img, film: _Film, tex: dict[str, np.ndarray], rng):
    """10. findings; returns the image and where a pneumothorax hides lung markings."""
    fr, f, a, ap = film.fr, film.f, film.a, film.ap
    lung_masks, lung, heart = film.lung_open, film.lung_vis, film.heart
    dome, lat, top, hilum = film.dome, film.lat, film.top, film.hilum
    u, v, eps = fr.u, fr.v, fr.eps
    blotch = _sample(tex["blotch"], u, v)
    # edema: perihilar haze and indistinct vessels, Kerley lines when worse
    if f.edema:
        k = {"mild": 0.06, "moderate": 0.12, "severe": 0.2}[f.edema]
        haze = sum(_gauss(u, v, hu, hv, 0.28, 0.32) for hu, hv in hilum.values())
        img += k * lung * (0.6 * haze + 0.35) * (1.0 + 0.25 * blotch)
        if f.edema != "mild":
            for s in (-1.0, 1.0):
                t = s * u
                side = "right" if s < 0 else "left"
                lines = np.exp(-((np.mod(v * 28, 1.0) - 0.5) / 0.12) ** 2)
                img += 0.03 * lines * lung_masks[side] * _step(t - lat[side] + 0.1, 0.02) * \
                    _step(v - dome[side] + 0.3, 0.05)
    # consolidation: patchy airspace opacity inside a lobe
    for lobe in f.consolidation:
        cu, cv, ru, rv = _lobe_center(lobe, dome, lat, top)
        region = _gauss(u, v, cu, cv, ru, rv)
        fluffy = region ** 0.8 * (0.55 + 0.45 * np.tanh(1.5 * blotch + 0.6))
        img += 0.32 * lung * fluffy
    # atelectasis: band-like basal opacity
    for side in f.atelectasis:
        s = -1.0 if side == "right" else 1.0
        d = dome[side]
        line_v = d - 0.1 + 0.05 * s * u
        band = np.exp(-((v - line_v) / 0.025) ** 2) * _gauss(u, v, s * 0.42, d - 0.1, 0.2, 1.0)
        img += 0.14 * band * lung_masks[side]
    # nodule and granuloma
    if f.nodule:
        lobe, mm = f.nodule
        cu, cv, _, _ = _lobe_center(lobe, dome, lat, top)
        r = 0.006 + mm * 0.0022
        img += 0.22 * _blob(fr, cu + 0.06, cv - 0.03, r) * lung
    if f.granuloma:
        img += 0.35 * _blob(fr, -0.42, top + 0.42, 0.013) * lung
    # pleural effusion: meniscus rising along the lateral wall (upright), veil (supine AP)
    for side, size in f.effusion.items():
        s = -1.0 if side == "right" else 1.0
        t = s * u
        L = lat[side]
        d = dome[side]
        level = d + {"small": 0.09, "moderate": -0.12, "large": -0.38}[size]
        rel = np.clip((t - a.med_w) / (L - a.med_w), 0, 1.2)
        side_mask = _step(t - 0.05, eps) * _step(L + 0.06 - t, eps) * _step(v - top, eps)
        if ap:  # layering fluid: a veil over the hemithorax, densest at the base
            veil = {"small": 0.09, "moderate": 0.16, "large": 0.26}[size]
            img += veil * _step(v - level + 0.2, 0.25) * (lung_masks[side] + 0.3 * side_mask
                                                           * _step(v - d + 0.05, 0.05)
                                                           * _step(d + 0.3 - v, 0.05))
            cap = level + 0.15 - 0.25 * rel ** 2  # blunted costophrenic angle
            img += 0.2 * _step(v - cap, 0.03) * lung_masks[side] * _step(rel - 0.55, 0.05)
        else:
            meniscus = level - 0.22 * rel ** 2
            fluid = _step(v - meniscus, 0.02) * side_mask
            # fluid fills the lung base and hides the dome and costophrenic angle
            dome_hidden = _step(rel - 0.3, 0.05) * _step(d + 0.16 - v, 0.03) * (1.0 - heart)
            img += 0.34 * fluid * np.maximum(lung_masks[side], 0.3 * dome_hidden)
    # pneumothorax: a lucent rim without markings outside a thin visceral pleural line
    no_markings = np.zeros_like(u)
    for side, size in f.pneumothorax.items():
        s = -1.0 if side == "right" else 1.0
        t = s * u
        L = lat[side]
        gap = {"small": 0.07, "moderate": 0.14, "large": 0.26}[size]
        span = L - a.med_w
        x_lat = a.med_w + (L - a.med_w) * np.clip((v - top) / 0.6, 0.0, 1.0) ** 0.4
        x_lat = x_lat + 0.05 * np.clip(v, 0.0, 1.0)
        inner_x = x_lat - gap * (1.0 - 0.4 * np.clip(v, 0, 1))
        inner_top = top + 0.5 * ((t - (a.med_w + 0.38 * span)) / span) ** 2 + gap * 1.2
        extent = _step(dome[side] - (0.3 if size != "large" else -0.05) - v, 0.08)
        collapsed = _step(inner_x - t, eps) * _step(v - inner_top, eps)
        rim = lung_masks[side] * (1.0 - collapsed) * extent
        no_markings = np.maximum(no_markings, rim)
        img -= 0.06 * rim
        line = np.minimum(np.exp(-((t - inner_x) / 0.009) ** 2) * _step(v - inner_top, eps)
                          + np.exp(-((v - inner_top) / 0.009) ** 2) * _step(inner_x - t, eps), 1)
        img += 0.13 * line * lung_masks[side] * extent
        img += 0.06 * collapsed * lung_masks[side] * extent
    return img, no_markings


def _draw_devices(img, film: _Film, rng):
    """11. tubes, lines, pacemaker, sternotomy wires and (portable films) ECG leads."""
    fr, a, carina_v, tx, dome, lat, ap = (film.fr, film.a, film.carina_v, film.tx, film.dome,
                                         film.lat, film.ap)
    dev = film.f.devices
    px = fr.size / 2.0  # pixels per anatomy unit
    metal = np.zeros_like(img)
    tube_w = max(0.9, 0.006 * px)
    if "ett" in dev:
        tip = carina_v - 0.05 * float(dev["ett"])
        u_, v_ = _curve([(tx - 0.02, -1.3), (tx - 0.005, -0.8), (tx, tip)], n=80)
        for off in (-0.016, 0.016):
            metal += 0.55 * _stroke(fr, u_, v_, tube_w, offset=off)
        metal += 0.35 * _stroke(fr, u_, v_, tube_w)
    if "ng" in dev:
        end = ([(0.14, dome["left"] + 0.1), (0.3, dome["left"] + 0.2), (0.24, dome["left"] + 0.3)]
               if dev["ng"] == "stomach" else [(0.02, -0.3)])
        u_, v_ = _curve([(tx + 0.03, -1.3), (0.02, -0.7), (0.03, -0.2), (0.06, 0.2)] + end
                        if dev["ng"] == "stomach" else [(tx + 0.03, -1.3), (0.02, -0.7)] + end,
                        n=160)
        metal += 0.6 * _stroke(fr, u_, v_, tube_w * 1.2)
    if "cvl" in dev:
        entry, tip = str(dev["cvl"]).split(":")
        tip_v = {"svc": -0.12, "cavoatrial": 0.0, "right_atrium": 0.1}.get(tip, -0.1)
        if entry == "right_ij":
            pts = [(-0.22, -1.3), (-0.16, -0.8), (-0.08, -0.45), (-0.055, tip_v)]
        elif entry == "left_ij":
            pts = [(0.22, -1.3), (0.16, -0.8), (0.05, -0.45), (-0.04, -0.3), (-0.055, tip_v)]
        else:
            pts = [(0.75, -0.72), (0.45, -0.66), (0.15, -0.55), (-0.03, -0.4), (-0.055, tip_v)]
        u_, v_ = _curve(pts, n=160)
        metal += 0.6 * _stroke(fr, u_, v_, tube_w)
    if "picc" in dev:
        s = -1.0 if dev["picc"] == "right" else 1.0
        u_, v_ = _curve([(s * 1.3, -0.5), (s * 0.8, -0.66), (s * 0.4, -0.62), (s * 0.12, -0.5),
                         (-0.05, -0.15)], n=160)
        metal += 0.5 * _stroke(fr, u_, v_, tube_w * 0.8)
    if "chest_tube" in dev:
        side = dev["chest_tube"]
        s = -1.0 if side == "right" else 1.0
        L = lat.get(side, 0.75)
        u_, v_ = _curve([(s * (L + 0.35), 0.45), (s * (L - 0.02), 0.25), (s * (L - 0.15), -0.2),
                         (s * (L - 0.3), -0.55)], n=160)
        for off in (-0.014, 0.014):
            metal += 0.45 * _stroke(fr, u_, v_, tube_w, offset=off)
    if "pacemaker" in dev:
        gu, gv = 0.52, -0.6
        box = _ellipse(fr.u, fr.v, gu, gv, 0.085, 0.06, 8, fr.eps * 0.6)
        metal += 1.0 * box
        metal -= 0.3 * _ellipse(fr.u, fr.v, gu - 0.02, gv + 0.01, 0.04, 0.022, 8, fr.eps * 0.6)
        leads = [[(gu - 0.05, gv + 0.04), (0.3, -0.5), (0.05, -0.3), (-0.05, -0.05),
                  (-0.07, 0.1)]]
        if dev["pacemaker"] == "dual":
            leads.append([(gu - 0.05, gv + 0.05), (0.3, -0.45), (0.02, -0.2), (0.05, 0.15),
                          (a.heart_x + 0.12, a.heart_y + 0.12)])
        for pts in leads:
            u_, v_ = _curve(pts, n=160)
            metal += 0.55 * _stroke(fr, u_, v_, tube_w * 1.1)
    if "sternotomy" in dev:
        for k in range(6):
            wv = -0.5 + k * 0.13
            wu = a.spine_x + 0.01
            ring = np.hypot((fr.u - wu) / 0.035, (fr.v - wv) / 0.022)
            metal += 0.7 * np.exp(-((ring - 1.0) / 0.3) ** 2)
    if ap:  # ECG leads on the skin: small rings with wires running off the film
        for _ in range(int(rng.integers(2, 5))):
            eu, ev = rng.uniform(-0.7, 0.7), rng.uniform(-0.75, 0.35)
            ring = np.hypot(fr.u - eu, fr.v - ev) / 0.03
            metal += 0.45 * np.exp(-((ring - 1.0) / 0.3) ** 2)
            end_u = np.sign(eu) * 1.3 if abs(eu) > 0.2 else rng.uniform(-0.4, 0.4)
            u_, v_ = _curve([(eu, ev), ((eu + end_u) / 2 + rng.normal(0, 0.1),
                                        ev + rng.normal(0, 0.2)), (end_u, -1.3)], n=120)
            metal += 0.3 * _stroke(fr, u_, v_, max(0.7, tube_w * 0.7))
    return img + metal
