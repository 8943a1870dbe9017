"""The anatomy of a phantom: ``build_anatomy`` paints tissues and labels onto a fine canvas.

It runs eight named parts in order, each drawing from the same random generator in turn
(so the order of the parts and of the draws inside them fixes every phantom):

1. ``draw_dimensions``: vertebra, disc and canal sizes of the seed;
2. ``build_chain``: the chain of bodies and discs, its tangent angles and centre line;
3. ``place_chain``: the chain placed in the field of view, with a lateral sway;
4. ``draw_tissues``: the relative T2 intensity of each tissue class;
5. ``paint_background``: soft tissue around the spine (muscle, fat, skin, vessels, bowel);
6. ``trace_canal``: the curve of the spinal canal and the epidural fat around it;
7. ``paint_column``: ligaments, discs and vertebrae (bodies and posterior elements);
8. ``paint_canal``: the thecal sac (label), CSF, the cord and the cauda equina roots.

Lengths in mm, angles in radians (degrees only where a name says so), coordinates
FOV-local RAS: x left-right, y posterior-anterior, z inferior-superior, 0 at the outer face
of voxel 0. The model is described in the package docstring (``lib/phantom/__init__.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from lib.phantom.geometry import (
    _DISC_H,
    _DISC_LABEL,
    _LORDOSIS_W,
    _LUMBAR,
    _LUMBAR_LABEL,
    _SACRUM,
    _VERT,
    _Canvas,
    _Frame,
    _height_above,
    _Segment,
    _u,
)
from lib.pipeline.labels import CANAL

DEG = math.pi / 180.0  # radians per degree


def build_anatomy(rng: np.random.Generator, cv: _Canvas, fov: Sequence[float]) -> Dict[str, Any]:
    """Paint tissues and labels onto ``cv``; returns a few geometric facts.

    ``fov`` is the field of view (mm, RAS order). Returns ``y_back`` (z mm -> y mm of the
    skin of the back at the midline), ``marrow_ids`` (the tissue ids of bone marrow),
    ``lordosis_deg``, ``sacral_slope_deg`` and ``conus_level`` (the segment holding the
    conus tip, e.g. "L1" or "L1-disc").
    """
    dims = draw_dimensions(rng)
    chain = build_chain(rng, dims)
    spine = place_chain(rng, chain, fov)
    tissues = draw_tissues(rng, cv)
    y_back = paint_background(rng, cv, fov, dims, chain, spine, tissues)
    canal = trace_canal(rng, cv, dims, chain, spine, tissues)
    marrow_ids = paint_column(rng, cv, dims, chain, spine, tissues)
    cname = paint_canal(rng, cv, dims, chain, canal, tissues)
    return {
        "y_back": y_back,
        "marrow_ids": marrow_ids,
        "lordosis_deg": chain.lord,
        "sacral_slope_deg": chain.ssl,
        "conus_level": cname.replace("/", "-disc"),
    }


# ----------------------------------------------------------------------------- 1. vertebra / disc dimensions
@dataclass
class Dimensions:
    """Sizes of one seed's spine (mm; ``psi`` in radians).

    ``vert[name]`` for T10..L5: W, D, H (body width LR, depth AP, height SI), pw, ph (pedicle
    width, height), Lt (transverse process length), Lsp, hsp (spinous process length, SI
    height), psi (spinous process inferior tilt, rad); for S1..S4 only W, D, H; for all of
    them ac, wc (spinal canal AP diameter and width at that level).
    ``disc_h[name]``: height at the centre line of the disc below vertebra ``name``.
    ``ac_base``: the seed's canal AP diameter before the per-level jitter.
    ``gap``: posterior body wall to the canal (posterior longitudinal ligament + epidural space).
    """

    vert: Dict[str, Dict[str, float]]
    disc_h: Dict[str, float]
    ac_base: float
    gap: float


def draw_dimensions(rng: np.random.Generator) -> Dimensions:
    """Draw the vertebral body, posterior element, disc and canal sizes (mm, tilt in rad).

    The nominal tables (``_VERT``, ``_SACRUM``, ``_DISC_H``) are scaled by one size factor
    of the seed (0.93-1.07) and jittered per dimension; lumbar bodies are kept 25-28 mm
    tall and lumbar discs 8-12 mm. Draws nothing on the canvas.
    """
    scale = _u(rng, 0.93, 1.07)
    vert: Dict[str, Dict[str, float]] = {}
    for name, (W, D, H, pw, ph, Lt, Lsp, hsp, psi) in _VERT.items():
        j = lambda: _u(rng, 0.97, 1.03)  # noqa: E731
        h = H * scale * j()
        if name in _LUMBAR:
            h = float(np.clip(h, 25.0, 28.0))
        vert[name] = dict(W=W * scale * j(), D=D * scale * j(), H=h, pw=pw, ph=ph * scale, Lt=Lt * scale * j(),
                          Lsp=Lsp * scale * j(), hsp=hsp * scale, psi=(psi + _u(rng, -5, 5)) * DEG)
    for name, (W, D, H) in _SACRUM.items():
        vert[name] = dict(W=W * scale, D=D * scale, H=H * scale * _u(rng, 0.95, 1.05))
    disc_h = {}
    for name, h in _DISC_H.items():
        h = h * _u(rng, 0.88, 1.12)
        if name in _LUMBAR:
            h = float(np.clip(h, 8.0, 12.0))
        disc_h[name] = h
    ac_base = _u(rng, 13.0, 17.0)  # canal AP diameter
    gap = _u(rng, 0.5, 1.5)  # posterior body wall -> canal (PLL + epidural)
    for name in vert:
        vert[name]["ac"] = ac_base * _u(rng, 0.95, 1.05)
        vert[name]["wc"] = vert[name]["ac"] * _u(rng, 1.3, 1.5)
    return Dimensions(vert, disc_h, ac_base, gap)


# ----------------------------------------------------------------------------- 2. the chain and its angles
@dataclass
class Chain:
    """The spine as a chain of segments along its centre line, before placement.

    ``order``: vertebra names top to bottom (T10 .. S4); ``segs``: bodies and discs
    (``_Segment``: arc lengths in mm, tangent angles in rad), ``by``: the same by name
    ("L3", "L3/" for the disc below L3); ``lord``, ``ssl``: lordosis and sacral slope
    (degrees). The centre line is sampled every ``ds`` mm of arc length ``sgrid`` (from
    90 mm above T10's top to 60 mm below S4): tangent angle ``phig`` (rad, 0 = straight
    down, > 0 = heading anteriorly) and position ``yc``, ``zc`` (mm, 0 at T10's top).
    """

    order: List[str]
    segs: List[_Segment]
    by: Dict[str, _Segment]
    lord: float
    ssl: float
    sgrid: np.ndarray
    ds: float
    phig: np.ndarray
    yc: np.ndarray
    zc: np.ndarray


def build_chain(rng: np.random.Generator, dims: Dimensions) -> Chain:
    """Draw the sacral slope (28-46 deg) and lordosis (35-62 deg), share the lordosis out
    over the lumbar bodies and discs, chain T10..S4 with their tangent-angle increments
    (rad) and integrate the centre line (mm). Draws nothing on the canvas.
    """
    vert, disc_h = dims.vert, dims.disc_h
    ssl = _u(rng, 28.0, 46.0)  # sacral slope
    lord = _u(rng, max(35.0, ssl - 8.0), min(62.0, ssl + 22.0))
    wts = {k: (a * _u(rng, 0.8, 1.2), b * _u(rng, 0.8, 1.2)) for k, (a, b) in _LORDOSIS_W.items()}
    wsum = sum(a + b for a, b in wts.values())
    order = ["T10", "T11", "T12", *_LUMBAR, "S1", "S2", "S3", "S4"]
    kyph = _u(rng, 0.7, 1.2)
    sac_dphi = {"S1": (3, 4), "S2": (8, 6), "S3": (12, 8), "S4": (15, 0)}
    segs: List[_Segment] = []
    for name in order:
        if name in _LUMBAR:
            db, dd = (-lord * w / wsum * DEG for w in wts[name])
        elif name.startswith("T"):
            db, dd = 1.0 * DEG, 1.0 * DEG
        else:
            db, dd = (v * kyph * DEG for v in sac_dphi[name])
        segs.append(_Segment(name, "body", vert[name]["H"], db))
        if name in disc_h:
            segs.append(_Segment(name + "/", "disc", disc_h[name], dd))
    # phi at the L1 top = lordosis - sacral slope; integrate the rest from there
    phi_l1 = (lord - ssl) * DEG
    i_l1 = next(i for i, g in enumerate(segs) if g.name == "L1")
    phi_top = phi_l1 - sum(g.dphi for g in segs[:i_l1])
    s = 0.0
    phi = phi_top
    for g in segs:
        g.s0, g.phi0 = s, phi
        s, phi = s + g.h, phi + g.dphi
    s_end = s
    by = {g.name: g for g in segs}

    # centre line samples (extended above and below with straight pieces)
    ext_top, ext_bot, ds = 90.0, 60.0, 0.25
    sgrid = np.arange(-ext_top, s_end + ext_bot + ds, ds)
    knots_s = [segs[0].s0] + [g.s1 for g in segs]
    knots_p = [segs[0].phi0] + [g.phi1 for g in segs]
    phig = np.interp(sgrid, knots_s, knots_p)
    ymid = np.sin(phig)
    zmid = -np.cos(phig)
    yc = np.cumsum(ymid) * ds
    zc = np.cumsum(zmid) * ds
    i0 = int(np.argmin(np.abs(sgrid)))
    yc -= yc[i0]
    zc -= zc[i0]
    return Chain(order, segs, by, lord, ssl, sgrid, ds, phig, yc, zc)


# ----------------------------------------------------------------------------- 3. place the chain in the FOV
@dataclass
class Spine:
    """The centre line placed in the field of view (FOV-local mm), with its lateral sway.

    ``sgrid``, ``phig`` as in ``Chain``; ``yc``, ``zc``: the centre line in FOV coordinates;
    ``x_mid``: the mean midline x; the midline sways by ``sway_a`` mm with wavelength
    ``sway_l`` mm of arc length and phase ``sway_p`` (rad); ``zc_s``, ``yc_s``: the centre
    line sorted by height (for ``y_spine``).
    """

    sgrid: np.ndarray
    phig: np.ndarray
    yc: np.ndarray
    zc: np.ndarray
    x_mid: float
    sway_a: float
    sway_l: float
    sway_p: float
    zc_s: np.ndarray
    yc_s: np.ndarray

    def x0_of(self, sv):
        """Midline x (mm) at arc length(s) ``sv`` (mm)."""
        return self.x_mid + self.sway_a * np.sin(2 * math.pi * np.asarray(sv) / self.sway_l + self.sway_p)

    def frame(self, sv: float) -> _Frame:
        """The sagittal frame of the centre line at arc length ``sv`` (mm)."""
        sgrid, yc, zc, phig = self.sgrid, self.yc, self.zc, self.phig
        y, z, p = float(np.interp(sv, sgrid, yc)), float(np.interp(sv, sgrid, zc)), float(np.interp(sv, sgrid, phig))
        return _Frame(y, z, p, float(self.x0_of(sv)))

    def y_spine(self, zq):
        """Body-centre y (mm) as a function of height ``zq`` (mm), for the soft-tissue layers."""
        return np.interp(zq, self.zc_s, self.yc_s)

    def plane_pts(self, g: _Segment):
        """(top point, bottom point, phi top, phi bottom) of segment ``g``: the points (y, z)
        in FOV coordinates (mm) where its end planes cross the centre line, and their
        tangent angles (rad)."""
        sgrid, yc, zc = self.sgrid, self.yc, self.zc
        yt, zt = float(np.interp(g.s0, sgrid, yc)), float(np.interp(g.s0, sgrid, zc))
        yb2, zb2 = float(np.interp(g.s1, sgrid, yc)), float(np.interp(g.s1, sgrid, zc))
        return (yt, zt), (yb2, zb2), g.phi0, g.phi1


def place_chain(rng: np.random.Generator, chain: Chain, fov: Sequence[float]) -> Spine:
    """Place the chain in the field of view ``fov`` (mm, RAS): L1..S1 roughly centred in
    height with T12's body and some sacrum inside, L3 in the front half, the midline near
    the middle with a lateral sway (scoliosis <= 3 mm). Draws nothing on the canvas.
    """
    by, sgrid, phig, yc, zc = chain.by, chain.sgrid, chain.phig, chain.yc, chain.zc

    def at(sv: float) -> Tuple[float, float, float]:
        return float(np.interp(sv, sgrid, yc)), float(np.interp(sv, sgrid, zc)), float(np.interp(sv, sgrid, phig))

    FX, FY, FZ = fov
    x_mid = FX / 2 + _u(rng, -4, 4)
    sway_a, sway_l, sway_p = _u(rng, 0, 3), _u(rng, 250, 500), _u(rng, 0, 2 * math.pi)
    z_l1 = at(by["L1"].s0)[1]
    z_s1 = at(by["S1"].s0)[1]
    z_t12 = at(by["T12"].s0 + by["T12"].h / 2)[1]
    dz = FZ / 2 + _u(rng, -10, 15) - (z_l1 + z_s1) / 2
    dz = min(dz, FZ - 8 - z_t12)  # T12 body centre inside the FOV
    dz = max(dz, 18 - z_s1)  # some sacrum below S1's top
    y_l3 = at(by["L3"].s0 + by["L3"].h / 2)[0]
    dy = FY / 2 + _u(rng, 0, 20) - y_l3
    yc = yc + dy
    zc = zc + dz

    # body-centre curve as a function of height (for soft-tissue layers)
    zs_sorted = np.argsort(zc)
    zc_s, yc_s = zc[zs_sorted], yc[zs_sorted]
    return Spine(sgrid, phig, yc, zc, x_mid, sway_a, sway_l, sway_p, zc_s, yc_s)


# ----------------------------------------------------------------------------- 4. tissue intensities
@dataclass
class Tissues:
    """Tissue ids on the canvas (``cv.lut`` holds their intensities); ``marrow``: the
    seed's vertebral marrow intensity, the reference (~1) of the others."""

    marrow: float
    FAT: int
    MUSCLE: int
    SKIN: int
    LIG: int
    ISL: int
    CORTEX: int
    PE_MARROW: int
    CSF: int
    CORD: int
    ROOT: int
    EPI: int
    FLOW: int
    BOWEL: int
    GAS: int
    FLUID: int
    VEIN: int
    SAC_DISC: int


def draw_tissues(rng: np.random.Generator, cv: _Canvas) -> Tissues:
    """Draw the relative T2 intensity of each tissue class (vertebral marrow 0.8-1.3 = the
    reference, fat, muscle, skin, ligament, cortex, CSF, cord, roots, flow voids, bowel
    content, veins, sacral remnant discs) and register them as tissues of ``cv``. Disc and
    vertebral marrow tissues are added later, per disc and per vertebra.
    """
    J = lambda a, b: _u(rng, a, b)  # noqa: E731
    marrow = J(0.8, 1.3)
    T = cv.new_tissue
    FAT = T(marrow * J(1.4, 1.8) if marrow < 1.1 else J(1.6, 2.1))
    MUSCLE = T(J(0.42, 0.58))
    SKIN = T(J(0.6, 0.8))
    LIG = T(J(0.08, 0.16))
    ISL = T(J(0.35, 0.55))  # interspinous ligament
    CORTEX = T(J(0.08, 0.15))
    PE_MARROW = T(marrow * J(0.8, 0.95))
    CSF = T(J(2.6, 3.2))
    CORD = T(J(0.9, 1.1))
    ROOT = T(J(0.8, 1.0))
    EPI = T(J(1.4, 1.8))
    FLOW = T(J(0.03, 0.1))
    BOWEL = T(J(0.7, 1.0))
    GAS = T(J(0.0, 0.05))
    FLUID = T(J(2.2, 2.8))
    VEIN = T(J(1.8, 2.4))
    SAC_DISC = T(J(0.8, 1.3))
    return Tissues(marrow=marrow, FAT=FAT, MUSCLE=MUSCLE, SKIN=SKIN, LIG=LIG, ISL=ISL, CORTEX=CORTEX,
                   PE_MARROW=PE_MARROW, CSF=CSF, CORD=CORD, ROOT=ROOT, EPI=EPI, FLOW=FLOW, BOWEL=BOWEL, GAS=GAS,
                   FLUID=FLUID, VEIN=VEIN, SAC_DISC=SAC_DISC)


# ----------------------------------------------------------------------------- 5. background soft tissue
def paint_background(rng: np.random.Generator, cv: _Canvas, fov: Sequence[float], dims: Dimensions, chain: Chain,
                     spine: Spine, tissues: Tissues) -> Callable[[Any], np.ndarray]:
    """Fill the whole canvas with the soft tissue around the spine (tissue only, label 0).

    A sagittal map broadcast along x, by distance (mm) in front of or behind the body
    centres: perivertebral and retroperitoneal fat, paraspinal muscle behind, the anterior
    abdominal wall (muscle, fat, skin, air); psoas / quadratus lumborum lateral to the
    bodies; behind the spinous tips thoracolumbar fascia, subcutaneous fat (6-26 mm), skin
    and air, with a midline groove; the psoas muscles (L1 to the pelvis), aorta and IVC
    (flow voids) and 150-199 bowel loops (8-20 mm radius; bowel, fluid or gas) in the fat in front.
    Returns ``y_back``: z (mm) -> y (mm) of the skin of the back at the midline.
    """
    vert, gap = dims.vert, dims.gap
    order, by = chain.order, chain.by
    sgrid, zc, x_mid = spine.sgrid, spine.zc, spine.x_mid
    frame, y_spine = spine.frame, spine.y_spine
    FAT, MUSCLE, SKIN, LIG = tissues.FAT, tissues.MUSCLE, tissues.SKIN, tissues.LIG
    FLOW, BOWEL, FLUID, GAS = tissues.FLOW, tissues.BOWEL, tissues.FLUID, tissues.GAS
    Yf, Zf = cv.y[:, None], cv.z[None, :]
    n_bg = Yf - y_spine(Zf)
    # back: the spinous tips as a function of height
    tips_y, tips_z = [], []
    for name in order[:-3]:
        g = by[name]
        v = vert[name]
        fr = frame(g.s0 + g.h / 2)
        if name.startswith("S"):
            n_tip = -v["D"] / 2 - gap - v["ac"] - 12.0
            s_tip = 0.0
        else:
            n_cw_post = -v["D"] / 2 - gap - v["ac"]
            bn = n_cw_post - 2.0 - 6.0 + 2.0
            n_tip = bn - v["Lsp"] * math.cos(v["psi"])
            s_tip = -2.0 - v["Lsp"] * math.sin(v["psi"])
        ty, tz = fr.world(s_tip, n_tip)
        tips_y.append(ty)
        tips_z.append(tz)
    o = np.argsort(tips_z)
    tz_a, ty_a = np.asarray(tips_z)[o], np.asarray(tips_y)[o]

    def y_tip(zq):
        return np.interp(zq, tz_a, ty_a)

    groove = _u(rng, 8, 22)  # erector spinae bulge behind the tips, laterally
    subcut = _u(rng, 6, 26)
    ant_wall = _u(rng, 110, 190)  # body centre -> anterior skin
    ant_fat = _u(rng, 8, 30)
    D_ref = vert["L3"]["D"]
    bg = np.full(n_bg.shape, FAT, np.uint8)  # retroperitoneal / mesenteric fat; bowel loops painted below
    bg[n_bg < D_ref / 2] = FAT  # foramina and perivertebral fat (bones painted later)
    bg[n_bg < -D_ref / 2 - gap - vert["L3"]["ac"] - 4] = MUSCLE
    bg[n_bg > ant_wall - ant_fat - 10] = MUSCLE
    bg[n_bg > ant_wall - ant_fat] = FAT
    bg[n_bg > ant_wall] = SKIN
    bg[n_bg > ant_wall + 2.5] = 0
    cv.tissue[:] = bg[None]
    # lateral to the bodies and foramina: psoas / quadratus lumborum instead of fat
    band = (n_bg >= -D_ref / 2 - gap - vert["L3"]["ac"] - 4) & (n_bg < D_ref / 2 + 4)
    for i in np.nonzero(np.abs(cv.x - x_mid) > vert["L3"]["W"] / 2 + 6)[0]:
        cv.tissue[i][band] = MUSCLE
    # posterior surface: fascia, subcutaneous fat, skin, air (x-dependent midline groove)
    xl_ = cv.x - x_mid
    bulge = groove * (1 - np.exp(-(xl_ ** 2) / (2 * 14.0 ** 2)))
    ytip2 = y_tip(Zf)  # (1, nz)
    d_back = (Yf - ytip2)[None] + bulge[:, None, None] + 2.0  # < 0 behind the fascia
    t3 = cv.tissue
    t3[(d_back < 0) & (d_back > -1.5)] = LIG
    t3[d_back <= -1.5] = FAT
    t3[d_back <= -1.5 - subcut] = SKIN
    t3[d_back <= -1.5 - subcut - 2.0] = 0
    del d_back

    def y_back(zq):  # skin behind the back at the midline (for the coil profile)
        return y_tip(np.asarray(zq)) - 2.0 - 1.5 - subcut - 2.0

    # psoas (L1 -> pelvis), both sides
    s_l1, s_s1 = by["L1"].s0, by["S1"].s0
    for side in (-1, 1):
        zz = cv.z
        ssamp = np.linspace(s_l1, s_s1 + 30, 40)
        zsamp = np.interp(ssamp, sgrid, zc)
        frac = (ssamp - s_l1) / (s_s1 + 30 - s_l1)
        r = 4 + 20 * np.sin(np.clip(frac, 0, 1) * math.pi * 0.85)
        o2 = np.argsort(zsamp)
        rz = np.interp(zz, zsamp[o2], r[o2], left=0, right=0)
        yz = y_spine(zz) + 0.2 * rz
        wz = np.interp(zz, zsamp[o2], [vert["L3"]["W"] / 2] * len(o2))
        xcz = x_mid + side * (wz + 0.6 * rz)
        ok = rz > 1
        if not ok.any():
            continue
        kz = np.nonzero(ok)[0]
        sz = slice(kz[0], kz[-1] + 1)
        m = ((cv.x[:, None, None] - xcz[None, None, sz]) / np.maximum(rz[sz], 1e-3)) ** 2 + (
            (cv.y[None, :, None] - yz[None, None, sz]) / (1.2 * np.maximum(rz[sz], 1e-3))
        ) ** 2 <= 1
        cv.tissue[:, :, sz][m] = MUSCLE
    # aorta (left) to L4, IVC (right) to L5
    for xs, rx, ry, s_stop, tis in ((-11.0, 10.0, 10.0, by["L4"].s0 + 10, FLOW), (18.0, 12.0, 8.0, by["L5"].s0 + 8, FLOW)):
        zstop = float(np.interp(s_stop, sgrid, zc))
        for_z = cv.z >= zstop
        if not for_z.any():
            continue
        sz = slice(int(np.nonzero(for_z)[0][0]), len(cv.z))
        yz = y_spine(cv.z[sz]) + D_ref / 2 + 4 + ry
        m = ((cv.x[:, None, None] - (x_mid + xs)) / rx) ** 2 + ((cv.y[None, :, None] - yz[None, None, :]) / ry) ** 2 <= 1
        cv.tissue[:, :, sz][m] = tis
    # bowel loops in front: wall + content (bowel, fluid or gas), only into fat
    for _ in range(int(rng.integers(150, 200))):
        zb = _u(rng, -10, fov[2] + 10)
        nb = _u(rng, D_ref / 2 + 22, ant_wall - 12)
        yb_ = float(y_spine(zb)) + nb
        xb = _u(rng, -10, fov[0] + 10)
        r = _u(rng, 8, 20)
        el = _u(rng, 0.7, 1.5)
        content = [BOWEL, BOWEL, BOWEL, BOWEL, FLUID, GAS][int(rng.integers(0, 6))]
        rin = r - _u(rng, 1.5, 3.0)
        sx = cv._span(cv.x, xb - r, xb + r)
        sy = cv._span(cv.y, yb_ - r, yb_ + r)
        sz = cv._span(cv.z, zb - r * el, zb + r * el)
        if sx.stop <= sx.start or sy.stop <= sy.start or sz.stop <= sz.start:
            continue
        d2 = (cv.x[sx, None, None] - xb) ** 2 + (cv.y[None, sy, None] - yb_) ** 2 + ((cv.z[None, None, sz] - zb) / el) ** 2
        free = cv.tissue[sx, sy, sz] == FAT
        cv.tissue[sx, sy, sz][free & (d2 <= r * r)] = BOWEL
        if content != BOWEL and rin > 1:
            cv.tissue[sx, sy, sz][free & (d2 <= rin * rin)] = content

    return y_back


# ----------------------------------------------------------------------------- 6. spinal canal curve
@dataclass
class Canal:
    """The spinal canal's curve, as seen from every (y, z) point of the canvas (mm).

    ``nC``: signed distance (anterior +) from the canal curve (inf farther than the canal
    radius + 8 mm); ``sC``: arc length of the nearest curve point; ``acC``, ``wcC``: canal
    AP diameter and width there; ``x0C``: midline x there; ``wck``: canal width at each
    vertebra's centre (T10..S4, narrowing in the sacrum); ``s_sac_end``: arc length of the
    thecal sac's tip (S2); ``x_mid``: the mean midline x.
    """

    nC: np.ndarray
    sC: np.ndarray
    acC: np.ndarray
    wcC: np.ndarray
    x0C: np.ndarray
    wck: np.ndarray
    s_sac_end: float
    x_mid: float

    def tube(self, cv: _Canvas, nmap, a_half, w_half, shift, smax, pad_x):
        """An elliptic tube around the canal curve: half-axes ``a_half`` (AP) and ``w_half``
        (LR) mm, centre shifted ``shift`` mm anteriorly, down to arc length ``smax``, within
        ``pad_x`` mm of the midline. Returns (slices, mask) on ``cv``, or None if empty."""
        sC, x0C, x_mid = self.sC, self.x0C, self.x_mid
        m2 = np.isfinite(nmap) & (np.abs(nmap - shift) <= a_half) & (sC <= smax)
        if not m2.any():
            return None
        jj, kk = np.nonzero(m2)
        sy = slice(jj.min(), jj.max() + 1)
        sz = slice(kk.min(), kk.max() + 1)
        sx = cv._span(cv.x, x_mid - pad_x, x_mid + pad_x)
        nn = ((nmap[sy, sz] - shift) / a_half[sy, sz]) ** 2
        nn = np.where(m2[sy, sz], nn, np.inf)
        xx = ((cv.x[sx, None, None] - x0C[None, sy, sz]) / w_half[None, sy, sz]) ** 2
        return (sx, sy, sz), xx + nn[None] <= 1.0


def trace_canal(rng: np.random.Generator, cv: _Canvas, dims: Dimensions, chain: Chain, spine: Spine,
                tissues: Tissues) -> Canal:
    """Trace the spinal canal and paint the epidural fat around it (tissue only).

    The canal's centre is an offset of the centre line just behind the bodies (half the
    body depth + ``gap`` + half the canal diameter, mm), smoothed over 4 mm, its diameter
    and width interpolated between the vertebrae and narrowing in the sacrum; the thecal
    sac ends at S2 (26-36 mm below S1's top). Every (y, z) point of the canvas is located
    relative to it (``Canal``). The epidural fat is a bigger tube (+2.5 mm AP, +4 mm LR
    half-axes, 1.5 mm posterior) down to S4.
    """
    vert, gap = dims.vert, dims.gap
    order, by, ds = chain.order, chain.by, chain.ds
    sgrid, phig, yc, zc, x_mid, x0_of = spine.sgrid, spine.phig, spine.yc, spine.zc, spine.x_mid, spine.x0_of
    EPI = tissues.EPI
    Yf, Zf = cv.y[:, None], cv.z[None, :]
    body_names = list(order)
    s_cent = np.array([by[n].s0 + by[n].h / 2 for n in body_names])
    Dk = np.array([vert[n]["D"] for n in body_names])
    ack = np.array([vert[n]["ac"] for n in body_names])
    wck = np.array([vert[n]["wc"] for n in body_names])
    s_sac_end = by["S1"].s0 + _u(rng, 26, 36)  # thecal sac tip (S2)
    # sacral canal narrows
    for i, n in enumerate(body_names):
        if n.startswith("S") and n != "S1":
            k = int(n[1]) - 1
            ack[i] = ack[i] * (1 - 0.22 * k)
            wck[i] = wck[i] * (1 - 0.18 * k)
    D_s = np.interp(sgrid, s_cent, Dk)
    ac_s = np.interp(sgrid, s_cent, ack)
    wc_s = np.interp(sgrid, s_cent, wck)
    noff = -(D_s / 2 + gap + ac_s / 2)
    Cy = yc + noff * np.cos(phig)
    Cz = zc + noff * np.sin(phig)
    sm = 4.0 / ds
    Cy = ndimage.gaussian_filter1d(Cy, sm, mode="nearest")
    Cz = ndimage.gaussian_filter1d(Cz, sm, mode="nearest")
    ty_, tz_ = np.gradient(Cy), np.gradient(Cz)
    tn = np.hypot(ty_, tz_)
    ty_, tz_ = ty_ / tn, tz_ / tn
    ay_, az_ = -tz_, ty_  # anterior normal
    tree = cKDTree(np.c_[Cy, Cz])
    YY, ZZ = np.broadcast_arrays(Yf, Zf)
    q = np.c_[YY.ravel(), ZZ.ravel()]
    reach = float(ac_s.max()) / 2 + 8.0
    dist, idx = tree.query(q, distance_upper_bound=reach)
    ok = np.isfinite(dist)
    idx_ok = np.where(ok, idx, 0)
    dq_y = q[:, 0] - Cy[idx_ok]
    dq_z = q[:, 1] - Cz[idx_ok]
    nC = np.where(ok, dq_y * ay_[idx_ok] + dq_z * az_[idx_ok], np.inf).reshape(YY.shape)
    sC = (sgrid[idx_ok] + dq_y * ty_[idx_ok] + dq_z * tz_[idx_ok]).reshape(YY.shape)
    acC = np.interp(sC, sgrid, ac_s)
    wcC = np.interp(sC, sgrid, wc_s)
    x0C = x0_of(sC)
    canal = Canal(nC, sC, acC, wcC, x0C, wck, s_sac_end, x_mid)

    # epidural fat: bigger tube, shifted posteriorly, down to the sacral hiatus
    epi_end = by["S4"].s0 + 4
    r = canal.tube(cv, nC, acC / 2 + 2.5, wcC / 2 + 4.0, -1.5, epi_end, 40.0)
    if r is not None:
        cv.paint(r[0], r[1], tissue=EPI)
    return canal


# ----------------------------------------------------------------------------- 7. per-vertebra ligaments, discs, bones
def paint_column(rng: np.random.Generator, cv: _Canvas, dims: Dimensions, chain: Chain, spine: Spine,
                 tissues: Tissues) -> List[int]:
    """Paint the spinal column, each part in its vertebra's sagittal frame: the posterior
    ligaments (``_paint_ligaments``), then the discs (``_paint_discs``), then the vertebrae
    (``_paint_vertebrae``), so that bone paints over ligament. Returns the marrow tissue ids.
    """
    seg_frames = {g.name: spine.frame(g.s0 + g.h / 2) for g in chain.segs}
    _paint_ligaments(cv, dims, chain, seg_frames, tissues)
    _paint_discs(rng, cv, dims, chain, spine, seg_frames, tissues)
    return _paint_vertebrae(rng, cv, dims, chain, spine, seg_frames, tissues)


def _paint_ligaments(cv: _Canvas, dims: Dimensions, chain: Chain, seg_frames: Dict[str, _Frame],
                     tissues: Tissues):
    """Paint the ligamenta flava (3-4 mm plates in front of the laminae, spanning the gap
    below) and the interspinous ligaments (4 mm wide) of T10..L5 (tissue only, label 0)."""
    vert, gap, disc_h = dims.vert, dims.gap, dims.disc_h
    order = chain.order
    LIG, ISL = tissues.LIG, tissues.ISL
    # posterior ligaments first (bones paint over them)
    for name in order[:8]:
        v = vert[name]
        fr = seg_frames[name]
        H, D, ac, wc, pw = v["H"], v["D"], v["ac"], v["wc"], v["pw"]
        n_cw_post = -D / 2 - gap - ac
        xl = wc / 2 + 1.5 + pw
        hd_below = disc_h.get(name, 8.0)
        # ligamentum flavum: plate just in front of the laminae, spanning the gap below
        bx = cv.box(fr, (-xl, xl), (-H / 2 - hd_below - 4, H / 2 - 3), (n_cw_post - 8, n_cw_post + 0.55 * ac + 1))
        if bx is not None:
            sl, X, S, N, _, _ = bx
            nf = n_cw_post - 2.0 + (np.abs(X) / xl) * 0.55 * ac
            m = (N <= nf + 0.5) & (N >= nf - 3.5) & (np.abs(X) <= xl - 3) & (S <= H / 2 - 3) & (S >= -H / 2 - hd_below - 4)
            cv.paint(sl, m, tissue=LIG)
        # interspinous ligament
        bn = n_cw_post - 2.0 - 6.0 + 2.0
        bx = cv.box(fr, (-3.5, 3.5), (-H / 2 - hd_below - 12, 0), (bn - v["Lsp"], bn + 1))
        if bx is not None:
            sl, X, S, N, _, _ = bx
            m = np.broadcast_to(np.abs(X) <= 2.0, np.broadcast_shapes(X.shape, S.shape))
            cv.paint(sl, m, tissue=ISL)


def _paint_discs(rng: np.random.Generator, cv: _Canvas, dims: Dimensions, chain: Chain, spine: Spine,
                 seg_frames: Dict[str, _Frame], tissues: Tissues):
    """Paint the discs T10-T11 .. L5-S1 (labels for L1-L2 .. L5-S1) between the end planes
    of the bodies above and below, 1.6 mm into them, bulging 2-6 % at mid-height: outer
    annulus, inner annulus, transition zone and nucleus (shifted posteriorly), sometimes
    an intranuclear cleft, sometimes degenerated (darker) at L2-L5. Each disc draws its
    own tissue intensities. The sacral remnant discs (S1-S2 .. S3-S4) only draw their bulge
    here; ``_paint_vertebrae`` paints them as lines inside the fused sacrum.
    """
    vert = dims.vert
    segs, order, by = chain.segs, chain.order, chain.by
    T = cv.new_tissue
    J = lambda a, b: _u(rng, a, b)  # noqa: E731
    for g in segs:
        if g.kind != "disc":
            continue
        up = g.name[:-1]
        low = order[order.index(up) + 1]
        lab = _DISC_LABEL.get(up, 0)
        vu, vl = vert[up], vert[low]
        W = (vu["W"] + vl["W"]) / 2
        D = (vu["D"] + vl["D"]) / 2
        if low.startswith("S") and up.startswith("S"):
            W, D = vl["W"] * 1.02, vl["D"] * 1.02
        fr = seg_frames[g.name]
        (ytop, ztop), _, _, _ = spine.plane_pts(by[low])
        _, (ybot, zbot), _, _ = spine.plane_pts(by[up])
        phi_u, phi_l = g.phi0, g.phi1
        e = 1.6
        bulge = _u(rng, 0.02, 0.06)
        if up.startswith("S"):
            continue  # remnant sacral discs are drawn inside the fused sacrum
        degen = 1.0
        u_deg = rng.random()
        if up in ("L4", "L5") and u_deg < 0.35:
            degen = 0.45 + 0.3 * u_deg / 0.35
        elif up in ("L2", "L3") and u_deg < 0.1:
            degen = 0.6 + 0.25 * u_deg / 0.1
        nuc = J(2.0, 2.8)
        ann_o = T(J(0.38, 0.55))
        ann_i = T(1.0 + (J(1.1, 1.35) - 1.0) * degen)
        trans = T(max(0.7, (nuc * 0.75) * degen))
        nucl = T(max(0.75, nuc * degen))
        cleft = T(max(0.7, nuc * 0.55 * degen)) if rng.random() < 0.5 else None
        hmax = g.h + abs(g.dphi) * D + 6
        bx = cv.box(fr, (-W / 2 * 1.1, W / 2 * 1.1), (-hmax / 2 - 3, hmax / 2 + 3), (-D / 2 * 1.1, D / 2 * 1.1))
        if bx is None:
            continue
        sl, X, S, N, Yb, Zb = bx
        d1 = -_height_above(Yb, Zb, ybot, zbot, phi_u)  # below the upper body's inferior plane
        d2 = _height_above(Yb, Zb, ytop, ztop, phi_l)  # above the lower body's superior plane
        t = np.clip(d1 / np.maximum(d1 + d2, 1e-3), 0, 1)[None]
        xn2 = (X / (W / 2)) ** 2
        nn2 = (N / (D / 2)) ** 2
        r2 = xn2 + nn2
        within = ((d1 >= -e) & (d2 >= -e))[None]
        outer = within & (r2 <= (1 + bulge * 4 * t * (1 - t)) ** 2)
        cv.paint(sl, outer, tissue=ann_o, label=lab)
        Np = (N + 0.08 * D / 2) / (D / 2)
        rr2 = xn2 + Np ** 2
        cv.paint(sl, within & (rr2 <= 0.80 ** 2), tissue=ann_i)
        lens = np.abs(t - 0.5)
        cv.paint(sl, within & (rr2 <= 0.66 ** 2) & (lens <= 0.46 * np.sqrt(np.clip(1 - rr2 / 0.66 ** 2, 0, 1))), tissue=trans)
        cv.paint(sl, within & (rr2 <= 0.52 ** 2) & (lens <= 0.40 * np.sqrt(np.clip(1 - rr2 / 0.52 ** 2, 0, 1))), tissue=nucl)
        if cleft is not None:
            cv.paint(sl, within & (rr2 <= 0.45 ** 2) & (lens <= 0.045), tissue=cleft)


def _paint_vertebrae(rng: np.random.Generator, cv: _Canvas, dims: Dimensions, chain: Chain, spine: Spine,
                     seg_frames: Dict[str, _Frame], tissues: Tissues) -> List[int]:
    """Paint the vertebrae, label-0 ones first (T10-T12, sacrum S4..S1), then L5 .. L1.

    Body: elliptic cross-section W x D mm between its end planes, 0.7-1.2 mm cortex,
    rounded rims, a waist, a flattened posterior wall, 0.8-1.6 mm concave endplates and a
    basivertebral vein; the sacral bodies fuse into one bone with remnant disc lines.
    Then the posterior elements (``_paint_posterior``). Each vertebra draws its own marrow
    intensity. Returns the marrow tissue ids (posterior elements' first).
    """
    vert, gap, disc_h = dims.vert, dims.gap, dims.disc_h
    order, by = chain.order, chain.by
    marrow, CORTEX, PE_MARROW = tissues.marrow, tissues.CORTEX, tissues.PE_MARROW
    VEIN, SAC_DISC = tissues.VEIN, tissues.SAC_DISC
    T = cv.new_tissue
    J = lambda a, b: _u(rng, a, b)  # noqa: E731
    # vertebrae: label-0 ones first (T10-T12, sacrum), then L5 .. L1
    marrow_ids = [PE_MARROW]
    paint_order = ["T10", "T11", "T12", "S4", "S3", "S2", "S1", "L5", "L4", "L3", "L2", "L1"]
    for name in paint_order:
        lab = _LUMBAR_LABEL.get(name, 0)
        v = vert[name]
        fr = seg_frames[name]
        (yt, zt), (yb2, zb2), phit, phib = spine.plane_pts(by[name])
        W, D, H = v["W"], v["D"], v["H"]
        mar = T(marrow * J(0.9, 1.1)) if not name.startswith("S") else T(marrow * J(1.0, 1.15))
        marrow_ids.append(mar)
        cort = _u(rng, 0.7, 1.2)
        conc = _u(rng, 0.8, 1.6)
        sacral = name.startswith("S")
        # --- body
        bx = cv.box(fr, (-W / 2 - 1, W / 2 + 1), (-H / 2 - 6, H / 2 + 6), (-D / 2 - 1, D / 2 + 1))
        if bx is not None:
            sl, X, S, N, Yb, Zb = bx
            dtop = -_height_above(Yb, Zb, yt, zt, phit)
            dbot = _height_above(Yb, Zb, yb2, zb2, phib)
            # the sacrum is one fused bone: its segments reach halfway into the remnant discs,
            # with cortex, rounding and endplate concavity only at S1's top and S4's bottom
            i_o = order.index(name)
            top_end = (not sacral) or name == "S1"
            bot_end = (not sacral) or name == "S4"
            dt = dtop + (0.0 if top_end else disc_h[order[i_o - 1]] / 2 + 0.4)
            db = dbot + (0.0 if bot_end else disc_h[name] / 2 + 0.4)
            dmin = np.minimum(dt if top_end else np.inf, db if bot_end else np.inf)
            tpos = np.clip(dt / np.maximum(dt + db, 1e-3), 0, 1)
            ralw = 1 - 0.13 * np.clip(1 - dmin / 3.0, 0, 1) ** 2 - 0.06 * np.sin(math.pi * tpos)
            m = None
            for shrink, tis, lb in ((0.0, CORTEX, lab), (cort, mar, None)):
                hw, hd = W / 2 - shrink, D / 2 - shrink
                xn2 = (X / hw) ** 2
                r2 = xn2 + (N / hd) ** 2
                ct = conc * np.clip(1 - r2, 0, 1)
                top_ok = (dt - (shrink if top_end else 0.0))[None] >= (ct if top_end else 0.0)
                bot_ok = (db - (shrink if bot_end else 0.0))[None] >= (ct if bot_end else 0.0)
                post = N >= -hd * 0.96 + 1.0 * np.clip(1 - (X / (0.6 * hw)) ** 2, 0, None)
                m = (r2 <= (ralw ** 2)[None]) & top_ok & bot_ok & post
                cv.paint(sl, m, tissue=tis, label=lb)
            if not sacral:  # basivertebral vein, inside the marrow
                vein = (np.abs(S) <= 1.0) & (N <= -D / 2 + 7) & (np.abs(X) <= 3.5)
                cv.paint(sl, m & vein, tissue=VEIN)
            elif not bot_end:  # remnant disc line inside the fused sacrum
                dd = dbot[None]
                line = m & (np.abs(dd + disc_h[name] / 2) <= disc_h[name] / 2) & (r2 <= 0.8 ** 2)
                cv.paint(sl, line, tissue=SAC_DISC)
        # --- posterior elements
        _paint_posterior(cv, name, v, fr, gap, disc_h, CORTEX, PE_MARROW, lab, sacral, mar)
    return marrow_ids


# ----------------------------------------------------------------------------- 8. canal: label, CSF, cord, roots
def paint_canal(rng: np.random.Generator, cv: _Canvas, dims: Dimensions, chain: Chain, canal: Canal,
                tissues: Tissues) -> str:
    """Paint the thecal sac: the canal label and CSF in an elliptic tube (the canal's AP
    diameter and width, mm) tapering over its last 14 mm to the tip at S2; inside, the cord
    (9 x 7.2 mm) tapering to the conus tip (T12 .. L2) and ten cauda equina roots (0.7-1.1 mm
    radius) leaving at successive levels. Returns the name of the segment holding the conus
    tip ("L1", or "L1/" for the disc below L1).
    """
    by, ac_base = chain.by, dims.ac_base
    nC, sC, acC, wcC, x0C = canal.nC, canal.sC, canal.acC, canal.wcC, canal.x0C
    wck, s_sac_end = canal.wck, canal.s_sac_end
    CSF, CORD, ROOT = tissues.CSF, tissues.CORD, tissues.ROOT
    cname = ("T12", "T12/", "L1", "L1/", "L2")[int(rng.integers(0, 5))]  # conus medullaris tip
    s_conus = by[cname].s0 + by[cname].h * _u(rng, 0.2, 0.8)
    taper = 14.0
    fac = np.sqrt(np.clip((s_sac_end - sC) / taper, 0, 1) * (2 - np.clip((s_sac_end - sC) / taper, 0, 1)))
    exits = [by[n].s0 + by[n].h * 0.3 for n in ("L1/", "L2/", "L3/", "L4/", "L5/", "S1", "S1")]
    roots = [(_u(rng, -0.55, 0.55) * wck.mean() / 2, _u(rng, -0.6, 0.1) * ac_base / 2,
              exits[int(rng.integers(0, len(exits)))], _u(rng, 0.7, 1.1)) for _ in range(10)]
    r = canal.tube(cv, nC, np.maximum(acC / 2 * fac, 1e-3), np.maximum(wcC / 2 * fac, 1e-3), 0.0, s_sac_end, 30.0)
    if r is not None:
        sl, m = r
        cv.paint(sl, m, tissue=CSF, label=CANAL)
        sx, sy, sz = sl
        Xc = cv.x[sx, None, None] - x0C[None, sy, sz]
        nc = nC[sy, sz][None]
        scc = sC[sy, sz][None]
        # cord with conus taper
        cf = np.clip((s_conus - scc) / 15.0, 0, 1)
        cord = m & ((Xc / (4.5 * cf + 1e-3)) ** 2 + ((nc - 0.5) / (3.6 * cf + 1e-3)) ** 2 <= 1) & (scc <= s_conus)
        cv.paint(sl, cord, tissue=CORD)
        # cauda equina roots: layered posteriorly, leaving at successive levels
        for xo, no, se, rad in roots:
            mr = m & ((Xc - xo) ** 2 + (nc - no) ** 2 <= rad * rad) & (scc > s_conus - 5) & (scc <= se)
            cv.paint(sl, mr, tissue=ROOT)
    return cname


# ----------------------------------------------------------------------------- posterior elements (part of 7.)
def _paint_primitives(cv, fr, prims, label, cortex_mm, cortex, marrow):
    """Paint each (x, s, n ranges, shape function) primitive: cortical shell, then marrow inside."""
    for xr, sr, nr, f in prims:
        bx = cv.box(fr, xr, sr, nr)
        if bx is None:
            continue
        sl, X, S, N, _, _ = bx
        cv.paint(sl, f(X, S, N, 0.0), tissue=cortex, label=label)
        cv.paint(sl, f(X, S, N, cortex_mm), tissue=marrow)


def _paint_posterior(cv: _Canvas, name, v, fr: _Frame, gap, disc_h, CORTEX, PE_MARROW, lab, sacral, mar):
    """Pedicles, lamina, articular, transverse and spinous processes of one vertebra."""
    D, H, ac, wc = v["D"], v["H"], v["ac"], v["wc"]
    n_cw_ant = -D / 2 - gap
    n_cw_post = n_cw_ant - ac
    hd_below = disc_h.get(name, 3.0)
    cort = 1.1
    if sacral:
        k = int(name[1]) - 1
        ac_k, wc_k = ac * (1 - 0.22 * k), wc * (1 - 0.18 * k)
        n_cw_post = n_cw_ant - ac_k
        th = 7.0 - k
        xw = wc_k / 2 + 1.0 + 9.0 - k
        hb = H / 2 + (disc_h[name] / 2 + 4.0 if name in disc_h else 0.0)
        ht = H / 2 + (2.0 if k == 0 else 5.0)
        prims = []

        def ring(X, S, N, sh):
            inside_box = (N <= -D / 2 + 3 - sh) & (N >= n_cw_post - th + sh) & (np.abs(X) <= xw - sh) & (S <= ht - sh) & (S >= -hb + sh)
            hole = ((X / (wc_k / 2 + 0.8)) ** 2 + ((N - (n_cw_ant - ac_k / 2)) / (ac_k / 2 + 0.6)) ** 2) <= 1 + 0.0 * sh
            return inside_box & ~hole

        prims.append(((-xw, xw), (-hb, ht), (n_cw_post - th, -D / 2 + 3), ring))

        def crest(X, S, N, sh):
            return (np.abs(X) <= 3.0 - sh) & (N <= n_cw_post - th + 1) & (N >= n_cw_post - th - 7 + sh) & (np.abs(S) <= H / 2 - 2 - sh)

        prims.append(((-3, 3), (-H / 2, H / 2), (n_cw_post - th - 8, n_cw_post - th + 1), crest))
        if k <= 1:  # alae
            aw = (26.0 if k == 0 else 16.0)

            def ala(X, S, N, sh, aw=aw):
                return (np.abs(X) >= v["W"] / 2 - 6) & (np.abs(X) <= v["W"] / 2 + aw - sh) & (N <= D / 2 - 6 - sh) & (
                    N >= n_cw_post + sh) & (S <= H / 2 - 1 - sh) & (S >= -H / 2 - 1 + sh)

            prims.append(((-(v["W"] / 2 + aw), v["W"] / 2 + aw), (-H / 2 - 1, H / 2), (n_cw_post, D / 2 - 6), ala))
        if k == 0:  # superior articular processes of S1
            xsa = wc / 2 + 1.5 + 8.0 - 0.5

            def sap(X, S, N, sh):
                return (np.abs(np.abs(X) - xsa) <= 3.5 - sh) & (np.abs(N - (n_cw_post + 0.35 * ac)) <= 5 - sh) & (
                    S >= 0 + sh) & (S <= H / 2 + 7 - sh)

            prims.append(((-xsa - 4, xsa + 4), (0, H / 2 + 7), (n_cw_post + 0.35 * ac - 5, n_cw_post + 0.35 * ac + 5), sap))
        _paint_primitives(cv, fr, prims, lab, cort, CORTEX, mar)
        return

    pw, ph, Lt, Lsp, hsp, psi = v["pw"], v["ph"], v["Lt"], v["Lsp"], v["hsp"], v["psi"]
    thoracic = name.startswith("T")
    xp = wc / 2 + 1.5 + pw / 2
    xl = wc / 2 + 1.5 + pw
    sp = H / 2 - ph / 2 - 1.5
    tl = 6.0
    ef = 2.0
    s_lt, s_lb = H / 2 - 3.0, -H / 2 - 5.0
    lean = 0.15
    s_lc = (s_lt + s_lb) / 2
    sup_ext = 7.0
    inf_ext = 0.75 * hd_below + 2.0

    def nf(X, S):  # anterior surface of the lamina
        return n_cw_post - ef + (np.abs(X) / xl) * 0.55 * ac + lean * (S - s_lc)

    prims = []

    def pedicle(X, S, N, sh):
        return (((np.abs(X) - xp) / (pw / 2 - sh)) ** 2 + ((S - sp) / (ph / 2 - sh)) ** 2 <= 1) & (N >= n_cw_post + 3 + sh) & (
            N <= -D / 2 + 4)

    prims.append(((-xl, xl), (sp - ph / 2, sp + ph / 2), (n_cw_post + 3, -D / 2 + 4), pedicle))

    def lamina(X, S, N, sh):
        f = nf(X, S)
        return (N <= f - sh) & (N >= f - tl + sh) & (np.abs(X) <= xl - sh) & (S <= s_lt - sh) & (S >= s_lb + sh)

    prims.append(((-xl, xl), (s_lb, s_lt), (n_cw_post - ef - tl - 3, n_cw_post - ef + 0.55 * ac + 3), lamina))
    xsa, nsa = xl - 0.5, n_cw_post + 0.35 * ac

    def sap(X, S, N, sh):
        return (np.abs(np.abs(X) - xsa) <= 3.5 - sh) & (np.abs(N - nsa) <= 5 - sh) & (S >= sp - ph / 2 + sh) & (
            S <= H / 2 + sup_ext - sh)

    prims.append(((-xsa - 4, xsa + 4), (sp - ph / 2, H / 2 + sup_ext), (nsa - 5, nsa + 5), sap))
    xia, nia = xl - 6.5, n_cw_post - 1.0

    def iap(X, S, N, sh):
        return (np.abs(np.abs(X) - xia) <= 3.0 - sh) & (np.abs(N - nia) <= 4.5 - sh) & (S >= -H / 2 - inf_ext + sh) & (
            S <= s_lb + 6 - sh)

    prims.append(((-xia - 3, xia + 3), (-H / 2 - inf_ext, s_lb + 6), (nia - 4.5, nia + 4.5), iap))
    nt, st = n_cw_ant - 0.45 * ac, sp
    rtn, rts = (6.0, 8.0) if name == "L5" else (3.5, 4.5) if thoracic else (4.0, 5.0)
    if thoracic:  # thoracic transverse processes point posteriorly
        nt = n_cw_post + 2

    def tp(X, S, N, sh):
        ax = np.abs(X)
        frac = np.clip((ax - xl) / max(Lt, 1.0), 0, 1)
        back = 0.15 * np.clip(ax - xl, 0, None)
        return (((N - nt + back) / (rtn - sh)) ** 2 + ((S - st) / (rts - sh)) ** 2 <= (1 - 0.3 * frac) ** 2) & (
            ax >= xl - 3) & (ax <= xl + Lt - sh)

    prims.append(((-xl - Lt, xl + Lt), (st - rts, st + rts), (nt - rtn - 0.15 * Lt, nt + rtn), tp))
    bn, bs = n_cw_post - ef - tl + 2.0, s_lc - 2.0
    cps, sps = math.cos(psi), math.sin(psi)
    hb, htip = hsp, hsp * 0.8
    tt = 7.0 if not thoracic else 6.0

    def spinous(X, S, N, sh):
        dn, dsv = N - bn, S - bs
        ell = -dn * cps - dsv * sps
        m_ = -dn * sps + dsv * cps
        h = hb + (htip - hb) * np.clip(ell / Lsp, 0, 1)
        tip_round = Lsp - sh - 3.0 * (2 * m_ / h) ** 2
        return (ell >= 0) & (ell <= tip_round) & (np.abs(m_) <= h / 2 - sh) & (
            np.abs(X) <= tt / 2 * (1 + 0.3 * np.clip(ell / Lsp, 0, 1)) - sh)

    cs = []
    for ell in (0.0, Lsp):
        for mm in (-hb / 2, hb / 2):
            cs.append((bn - ell * cps - mm * sps, bs - ell * sps + mm * cps))
    prims.append(((-tt, tt), (min(c[1] for c in cs), max(c[1] for c in cs)), (min(c[0] for c in cs), max(c[0] for c in cs)),
                  spinous))
    _paint_primitives(cv, fr, prims, lab, cort, CORTEX, PE_MARROW)
