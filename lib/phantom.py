"""Synthetic sagittal T2 lumbar spine MRI phantoms with exact ``label12`` masks.

Why
---
Tests, demos and smoke-training need lumbar MRI whose ground truth is known exactly,
in every voxel orientation a scanner may write, without copying patient data. This
module draws such volumes from a seed: same seed, same bytes.

Model (all lengths in mm, angles in degrees, world = RAS+ patient coordinates)
----------------------------------------------------------------------------------
*Geometry.* The spine is a chain of segments along a centre line in the sagittal
plane (y = anterior, z = superior): T10, T11, T12, L1..L5, S1..S4 bodies with the
discs between them. Walking down the chain, the tangent angle ``phi`` (0 = straight
down, > 0 = heading anteriorly) changes by a per-segment increment with constant
curvature inside the segment. The lumbar increments add up to the lordosis angle
(L1 superior endplate to S1 superior endplate, 35-62 deg per seed) and are weighted
towards the lower discs (L5-S1 takes ~30 %), so the discs (and L5) are wedge-shaped;
S1's endplate makes the sacral slope (28-46 deg) with the horizontal; the sacrum
curves forward again (sacral kyphosis). A small lateral sway (scoliosis <= 3 mm)
moves the midline left-right.

Each vertebra is a rigid local frame at the middle of its body: ``s`` along the
spine (superior +), ``n`` anterior +, ``x`` left-right. Its endplates are the planes
normal to the centre line at the body's top and bottom, which gives the wedge.

* body: elliptic cross-section (width ~40-48 mm L1->L5, depth ~28-32 mm, scaled per
  seed), 25-28 mm tall, flattened/concave posterior wall, rounded rims, a waist,
  concave endplates (0.8-1.6 mm), 0.7-1.2 mm dark cortex, a basivertebral vein;
* posterior elements (same label as the body): pedicles from the upper body to
  the lamina, a lamina roof behind the canal, superior and inferior articular
  processes (facet joints with the neighbour), transverse processes, and a spinous
  process pointing posteriorly-inferiorly;
* disc between two bodies: the space between the upper body's inferior and the
  lower body's superior endplate planes (so 8-12 mm tall at the centre line, L5-S1
  strongly wedged), bulging 2-6 % at mid-height, with outer annulus, inner annulus,
  transition zone and nucleus (shifted posteriorly, sometimes with an intranuclear
  cleft, sometimes degenerated at L4-L5/L5-S1);
* spinal canal (label 11): the thecal sac, an elliptic tube (13-17 mm AP, ~1.4x as
  wide) following a smoothed offset of the centre line just behind the bodies,
  inside the arches, from the top of the volume down to its tapered end at S2;
  inside: CSF, the cord ending in the conus (T12-L2) and cauda equina roots;
  around it epidural fat, behind it ligamenta flava and interspinous ligaments;
* label 0 but visible: T10-T12 with their discs (so "topmost vertebra = L1" cannot
  be learned), the sacrum S1-S4 with alae, remnant discs and sacral canal;
* soft tissue: paraspinal muscle with a midline groove, thoracolumbar fascia,
  subcutaneous fat, skin, air behind the back; psoas / quadratus lumborum lateral to
  the bodies; aorta and IVC (flow voids), retroperitoneal fat and bowel loops
  (intermediate, fluid- or gas-filled) in front.

*Acquisition.* A sagittal slab: field of view ~50-62 (LR) x 190-220 (AP) x 255-285
(SI) mm, slices 3.3-4.0 mm thick, in-plane 0.62-0.85 mm (coarsened if needed so the
volume stays under ``max_voxels``, 1.5 M by default). The phantom is rendered on a
fine grid (``supersample`` sub-voxels per voxel: odd factors, by default the odd
number giving ~0.8 mm sub-voxels, at most 5, i.e. 5 across a 3.3-4 mm slice and 1
in plane) whose tissue map is turned into intensities and averaged per voxel (partial
volume); the label is the fine label at each voxel centre (nearest sampling, exact
because the factors are odd). Then an in-plane Gaussian point-spread function,
smooth multiplicative texture, a multiplicative bias field (posterior surface-coil
fall-off x a random smooth field), a random intensity scale (image maximum
300..3000, log-uniform) and Rician noise (sigma 0.8-2.5 % of the maximum).

*Contrast (T2 TSE, relative to vertebral marrow = 1).* Air 0, cortex and ligament
~0.1, outer annulus ~0.45, muscle ~0.5, marrow 0.8-1.3 (age), inner annulus ~1.2,
nucleus 2-2.8, fat 1.5-2.1, CSF 2.6-3.2, flow voids ~0.06; each factor jittered per
seed.

*Storage.* Everything is built on a RAS-ordered grid and then written in the voxel
orientation asked for (or ``ORIENTATIONS[seed % 7]``) with
``nibabel.orientations`` (``ornt_transform`` / ``apply_orientation`` /
``inv_ornt_aff``), so image, label and affine always agree in world space. The
affine is diagonal up to that axis permutation/flip, with a random table offset.
Images are stored as int16 (70 % of seeds) or float32, labels as uint8.

Independent random streams drive the grid, the anatomy, the look (contrast, bias,
scale, dtype, table offset) and the noise fields. As a result, a seed shows the same
patient with the same look under every preset, shape, spacing and orientation; only
the noise realisation depends on the grid.

Use
---
>>> image, label, affine = make_phantom(3)                 # doctest: +SKIP
>>> image, label, affine, info = make_phantom(3, preset="tiny", orientation="PIR",
...                                           return_info=True)  # doctest: +SKIP
>>> save_phantom("img.nii.gz", "lab.nii.gz", seed=3)       # doctest: +SKIP

CLI::

    python -m lib.phantom --out sample-data --count 3 --seed 0 [--label-dir DIR]
        [--preset default|small|tiny] [--shape X Y Z] [--spacing SX SY SZ]
        [--orientation CODE]

``--shape`` and ``--spacing`` are in RAS axis order (left-right, posterior-anterior,
inferior-superior) whatever the stored orientation. Images are written as
``phantom_<seed>.nii.gz`` in ``--out``; labels (same file name) only when
``--label-dir`` is given.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import nibabel as nib
import numpy as np
from nibabel import orientations as nio
from scipy import ndimage
from scipy.spatial import cKDTree

from lib.labels import CANAL, DISCS, VERTEBRAE

#: voxel orientations offered; the default one of a seed is ``ORIENTATIONS[seed % 7]``
ORIENTATIONS: Tuple[str, ...] = ("LPS", "PIR", "RAS", "ASL", "LIP", "RIP", "SPL")

#: named acquisition set-ups. ``spacing``/``fov``/``shape`` are RAS-ordered; None = random per seed
PRESETS: Dict[str, Dict[str, Any]] = {
    # clinical-like sagittal T2: 3.3-4.0 mm slices, 0.62-0.85 mm in plane, <= 1.5 M voxels
    "default": {"spacing": None, "fov": None, "shape": None},
    # quick tests that still resolve posterior elements (~0.35 M voxels)
    "small": {"spacing": (4.0, 1.5, 1.5), "fov": None, "shape": None},
    # 32^3 smoke-test volumes (2 x 6.5 x 8.25 mm voxels covering T12..S1)
    "tiny": {"spacing": None, "fov": (64.0, 208.0, 264.0), "shape": (32, 32, 32)},
}

DEFAULT_MAX_VOXELS = 1_500_000
FINE_MM = 0.8  # target sub-voxel size of the automatic supersampling
MAX_FINE_VOXELS = 80_000_000  # refuse grids whose fine rendering would not fit in memory


def auto_supersample(spacing: Sequence[float]) -> Tuple[int, int, int]:
    """Odd sub-voxel factors giving sub-voxels of about ``FINE_MM`` (1..5 per axis)."""
    return tuple(int(min(5, 2 * math.floor(float(v) / FINE_MM / 2) + 1)) for v in spacing)

_LUMBAR = ("L1", "L2", "L3", "L4", "L5")
_LUMBAR_LABEL = dict(zip(_LUMBAR, VERTEBRAE))
# disc below each vertebra -> label (L1 -> L1-L2 ... L5 -> L5-S1); everything else is 0
_DISC_LABEL = dict(zip(_LUMBAR, DISCS))

# nominal vertebral dimensions: width (LR), depth (AP), height (SI) of the body, pedicle
# width/height, transverse process length, spinous length / SI height / inferior tilt
_VERT = {
    #      W     D     H    pw   ph   Lt   Lsp  hsp  psi
    "T10": (32.0, 25.0, 21.0, 5.5, 12.0, 16.0, 30.0, 9.0, 50.0),
    "T11": (34.0, 26.0, 22.0, 6.0, 12.5, 9.0, 28.0, 10.0, 40.0),
    "T12": (36.0, 27.0, 23.5, 7.0, 13.0, 7.0, 27.0, 13.0, 25.0),
    "L1": (40.0, 28.0, 25.5, 7.0, 13.5, 14.0, 27.0, 17.0, 14.0),
    "L2": (42.0, 29.0, 26.5, 8.0, 14.0, 20.0, 29.0, 18.0, 12.0),
    "L3": (44.0, 30.0, 27.0, 9.0, 14.5, 26.0, 30.0, 18.0, 12.0),
    "L4": (46.0, 31.0, 27.5, 10.0, 15.0, 22.0, 28.0, 17.0, 14.0),
    "L5": (48.0, 32.0, 26.5, 12.0, 15.0, 18.0, 22.0, 14.0, 18.0),
}
# sacral segments: width, depth, height
_SACRUM = {"S1": (46.0, 34.0, 24.0), "S2": (38.0, 27.0, 20.0), "S3": (30.0, 21.0, 16.0), "S4": (22.0, 15.0, 13.0)}
# nominal disc heights at the centre line, by the vertebra above
_DISC_H = {"T10": 5.5, "T11": 6.0, "T12": 7.5, "L1": 8.5, "L2": 9.5, "L3": 10.5, "L4": 11.0, "L5": 10.5,
           "S1": 2.5, "S2": 2.0, "S3": 1.5}
# share of the lordosis taken by each lumbar segment (body, disc below), L1 .. L5
_LORDOSIS_W = {"L1": (0.03, 0.07), "L2": (0.03, 0.09), "L3": (0.04, 0.13), "L4": (0.05, 0.17), "L5": (0.10, 0.29)}


# ----------------------------------------------------------------------------- geometry
@dataclass
class _Segment:
    name: str  # "L3" for a body, "L3/" for the disc below L3
    kind: str  # "body" | "disc"
    h: float  # length along the centre line
    dphi: float  # tangent-angle increment over the segment (rad)
    s0: float = 0.0  # start (top) arc length
    phi0: float = 0.0  # tangent angle at the top

    @property
    def s1(self) -> float:
        return self.s0 + self.h

    @property
    def phi1(self) -> float:
        return self.phi0 + self.dphi


@dataclass
class _Frame:
    """Rigid sagittal frame: centre (cy, cz), tangent angle phi, midline x0."""

    cy: float
    cz: float
    phi: float
    x0: float

    def local(self, Y: np.ndarray, Z: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        c, s = math.cos(self.phi), math.sin(self.phi)
        dy, dz = Y - self.cy, Z - self.cz
        return -dy * s + dz * c, dy * c + dz * s  # (s' superior, n' anterior)

    def world(self, s: float, n: float) -> Tuple[float, float]:
        c, sn = math.cos(self.phi), math.sin(self.phi)
        return self.cy - s * sn + n * c, self.cz + s * c + n * sn


def _height_above(Y, Z, py, pz, phi):
    """Signed distance above the plane through (py, pz) whose superior normal is u(phi)."""
    return -(Y - py) * math.sin(phi) + (Z - pz) * math.cos(phi)


class _Canvas:
    """Fine RAS grid holding a tissue-class map and the label map."""

    def __init__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray):
        self.x, self.y, self.z = x, y, z
        self.tissue = np.zeros((len(x), len(y), len(z)), np.uint8)
        self.label = np.zeros((len(x), len(y), len(z)), np.uint8)
        self.lut: List[float] = [0.0]  # tissue id -> relative intensity (0 = air)

    def new_tissue(self, value: float) -> int:
        self.lut.append(float(value))
        if len(self.lut) > 255:
            raise RuntimeError("too many tissue classes")
        return len(self.lut) - 1

    @staticmethod
    def _span(coords: np.ndarray, lo: float, hi: float) -> slice:
        return slice(int(np.searchsorted(coords, lo, "left")), int(np.searchsorted(coords, hi, "right")))

    def box(self, fr: _Frame, xr, sr, nr):
        """Sub-grid covering local ranges xr (x - x0), sr, nr of frame ``fr``.

        Returns (slices, X (nx,1,1), S (1,ny,nz), N (1,ny,nz), Y (ny,1), Z (1,nz)) or None.
        """
        pts = [fr.world(s, n) for s in sr for n in nr]
        ys, zs = [p[0] for p in pts], [p[1] for p in pts]
        sx = self._span(self.x, fr.x0 + xr[0], fr.x0 + xr[1])
        sy = self._span(self.y, min(ys), max(ys))
        sz = self._span(self.z, min(zs), max(zs))
        if sx.stop <= sx.start or sy.stop <= sy.start or sz.stop <= sz.start:
            return None
        Y = self.y[sy][:, None]
        Z = self.z[sz][None, :]
        S, N = fr.local(Y, Z)
        X = (self.x[sx] - fr.x0)[:, None, None]
        return (sx, sy, sz), X, S[None], N[None], Y, Z

    def paint(self, sl, mask, tissue: Optional[int] = None, label: Optional[int] = None):
        if tissue is not None:
            self.tissue[sl][mask] = tissue
        if label is not None:
            self.label[sl][mask] = label


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


# ----------------------------------------------------------------------------- acquisition
def _resolve_grid(rng, preset: str, shape, spacing, fov, max_voxels: int):
    p = PRESETS[preset]
    shape = tuple(shape) if shape is not None else p["shape"]
    spacing = tuple(spacing) if spacing is not None else p["spacing"]
    fov_given = tuple(fov) if fov is not None else p["fov"]
    # always draw the random FOV/spacing so the rng stream does not depend on the arguments
    fov_r = (_u(rng, 50, 62), _u(rng, 190, 220), _u(rng, 255, 285))
    sp_r = (_u(rng, 3.3, 4.0), _u(rng, 0.62, 0.85))
    if shape is not None and spacing is not None:
        shape = tuple(int(v) for v in shape)
        spacing = tuple(float(v) for v in spacing)
    elif shape is not None:
        f = fov_given or fov_r
        shape = tuple(int(v) for v in shape)
        spacing = tuple(float(f[i]) / shape[i] for i in range(3))
    else:
        f = fov_given or fov_r
        if spacing is None:
            sx, ip = sp_r
            nx = max(1, round(f[0] / sx))
            ip = max(ip, math.sqrt(f[1] * f[2] * nx / max_voxels))  # respect the voxel budget
            spacing = (sx, ip, ip)
        spacing = tuple(float(v) for v in spacing)
        shape = tuple(max(1, int(round(f[i] / spacing[i]))) for i in range(3))
    if len(shape) != 3 or len(spacing) != 3 or min(shape) < 1 or min(spacing) <= 0:
        raise ValueError(f"bad shape/spacing {shape} {spacing}")
    return shape, spacing


def _orient(arr: np.ndarray, ras_affine: np.ndarray, code: str):
    """Re-store a RAS-ordered array in voxel orientation ``code``; returns (array, affine)."""
    ornt = nio.ornt_transform(nio.axcodes2ornt(("R", "A", "S")), nio.axcodes2ornt(tuple(code)))
    out = nio.apply_orientation(arr, ornt)
    aff = ras_affine @ nio.inv_ornt_aff(ornt, arr.shape)
    return np.ascontiguousarray(out), aff


# ----------------------------------------------------------------------------- main
def make_phantom(
    seed: int,
    *,
    preset: str = "default",
    shape: Optional[Sequence[int]] = None,
    spacing: Optional[Sequence[float]] = None,
    fov: Optional[Sequence[float]] = None,
    orientation: Optional[str] = None,
    supersample: Optional[Sequence[int]] = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    return_info: bool = False,
):
    """Draw one phantom.

    Args:
        seed: everything (anatomy, contrast, geometry, noise, storage dtype) follows from it.
        preset: a key of ``PRESETS``.
        shape, spacing, fov: RAS-ordered overrides of the acquisition grid (voxels, mm, mm).
        orientation: three-letter nibabel axcodes of the stored array, e.g. "LPS", "PIR";
            default ``ORIENTATIONS[seed % len(ORIENTATIONS)]``. It changes only how the
            same world-space volume is stored.
        supersample: odd sub-voxel factors per RAS axis for partial-volume rendering;
            default ``auto_supersample(spacing)`` (sub-voxels of ~0.8 mm, at most 5 per axis).
        max_voxels: budget used when the in-plane spacing is drawn at random.
        return_info: also return a dict describing the draw.

    Returns:
        ``(image float32, label uint8, affine 4x4 float64)`` and optionally ``info``.
        The image holds integer values when ``info["dtype"] == "int16"``.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    seed = int(seed)
    code = (orientation or ORIENTATIONS[seed % len(ORIENTATIONS)]).upper()
    if len(code) != 3 or sorted(nio.axcodes2ornt(tuple(code))[:, 0].tolist()) != [0, 1, 2]:
        raise ValueError(f"bad orientation {code!r}")
    if supersample is not None:
        ss = tuple(int(v) for v in supersample)
        if len(ss) != 3 or any(v < 1 or v % 2 == 0 for v in ss):
            raise ValueError(f"supersample factors must be odd positive integers, got {ss}")

    # independent streams, so the anatomy and the look of a seed do not depend on the grid
    r_grid, r_anat, r_look, r_noise = (np.random.default_rng(c) for c in np.random.SeedSequence([0x5B1E, seed]).spawn(4))
    shape_ras, sp = _resolve_grid(r_grid, preset, shape, spacing, fov, max_voxels)
    fov_ras = tuple(shape_ras[i] * sp[i] for i in range(3))
    if supersample is None:
        ss = auto_supersample(sp)
    if math.prod(shape_ras) * math.prod(ss) > MAX_FINE_VOXELS:
        raise ValueError(f"grid {shape_ras} x supersample {ss} is too large to render; "
                         "use a smaller shape, coarser spacing or smaller supersample factors")

    # fine grid (FOV-local coordinates, 0 at the outer face of voxel 0)
    fine = [(np.arange(shape_ras[i] * ss[i]) + 0.5) * (sp[i] / ss[i]) for i in range(3)]
    cv = _Canvas(*fine)
    geo = _build_anatomy(r_anat, cv, fov_ras)
    # acquisition look: scalars only, drawn up front
    het_amp, tex_amp = _u(r_look, 0.06, 0.14), _u(r_look, 0.03, 0.06)
    coil = _u(r_look, 0.15, 0.45)
    c = r_look.normal(0, 0.12, 6)
    vmax = float(math.exp(_u(r_look, math.log(300), math.log(3000))))
    sigma = vmax * _u(r_look, 0.008, 0.025)
    dtype = "int16" if r_look.random() < 0.7 else "float32"
    origin = np.array([_u(r_look, -40, 40) - fov_ras[0] / 2, _u(r_look, -60, 20) - fov_ras[1] / 2, _u(r_look, -250, 150)])

    # ---- image formation on the acquisition grid
    lut = np.asarray(cv.lut, np.float32)
    inten = lut[cv.tissue]
    nx, ny, nz = shape_ras
    img = inten.reshape(nx, ss[0], ny, ss[1], nz, ss[2]).mean(axis=(1, 3, 5), dtype=np.float32)
    del inten
    lab = cv.label[ss[0] // 2 :: ss[0], ss[1] // 2 :: ss[1], ss[2] // 2 :: ss[2]].copy()
    assert lab.shape == img.shape
    psf = [0.0, 0.5 if ss[1] == 1 else 0.25, 0.5 if ss[2] == 1 else 0.25]
    # marrow heterogeneity (fatty/red marrow patches), weighted by the marrow fraction per voxel
    is_marrow = np.zeros(len(lut), np.float32)
    is_marrow[geo["marrow_ids"]] = 1.0
    frac = is_marrow[cv.tissue].reshape(nx, ss[0], ny, ss[1], nz, ss[2]).mean(axis=(1, 3, 5), dtype=np.float32)
    het = ndimage.gaussian_filter(r_noise.standard_normal(img.shape, dtype=np.float32), (0.5, 3.0, 3.0))
    het /= max(float(het.std()), 1e-6)
    img *= 1.0 + het_amp * het * frac
    del frac, het
    img = ndimage.gaussian_filter(img, psf, mode="nearest")
    tex = ndimage.gaussian_filter(r_noise.standard_normal(img.shape, dtype=np.float32), (0.6, 1.5, 1.5))
    tex /= max(float(tex.std()), 1e-6)
    img *= 1.0 + tex_amp * tex
    # bias: posterior receive coil fall-off times a smooth random field
    xc = [((np.arange(shape_ras[i]) + 0.5) * sp[i]) for i in range(3)]
    X, Y, Z = np.meshgrid(*[(c - c.mean()) / 150.0 for c in xc], indexing="ij", sparse=True)
    yb = (xc[1][:, None] - geo["y_back"](xc[2])[None, :]) / 100.0  # mm in front of the back skin, /100
    logb = -coil * np.clip(yb, 0, None)[None]
    logb = logb + c[0] * X + c[1] * Y + c[2] * Z + c[3] * Y * Z + c[4] * Z * Z + c[5] * X * X
    img *= np.exp(logb).astype(np.float32)
    img *= vmax / max(float(np.percentile(img, 99.8)), 1e-6)
    n1 = r_noise.standard_normal(img.shape, dtype=np.float32)
    n2 = r_noise.standard_normal(img.shape, dtype=np.float32)
    img = np.sqrt((img + sigma * n1) ** 2 + (sigma * n2) ** 2)
    k = vmax / max(float(img.max()), 1e-6)  # exact maximum; the noise scales along
    img *= k
    sigma *= k
    if dtype == "int16":
        img = np.clip(np.rint(img), 0, 32767)
    img = img.astype(np.float32)

    # ---- world placement and storage orientation
    ras_aff = np.diag([sp[0], sp[1], sp[2], 1.0])
    ras_aff[:3, 3] = origin + 0.5 * np.asarray(sp)
    img_o, aff = _orient(img, ras_aff, code)
    lab_o, aff_l = _orient(lab, ras_aff, code)
    assert np.allclose(aff, aff_l)
    if not return_info:
        return img_o, lab_o, aff
    info = {
        "seed": seed,
        "preset": preset,
        "orientation": code,
        "shape": tuple(int(v) for v in img_o.shape),
        "shape_ras": tuple(int(v) for v in shape_ras),
        "spacing_ras": tuple(float(v) for v in sp),
        "fov_ras": tuple(float(v) for v in fov_ras),
        "supersample": ss,
        "dtype": dtype,
        "intensity_max": vmax,
        "noise_sigma": sigma,
        "lordosis_deg": geo["lordosis_deg"],
        "sacral_slope_deg": geo["sacral_slope_deg"],
        "conus_level": geo["conus_level"],
    }
    return img_o, lab_o, aff, info


def _build_anatomy(rng: np.random.Generator, cv: _Canvas, fov) -> Dict[str, Any]:
    """Paint tissues and labels onto ``cv``; returns a few geometric facts."""
    deg = math.pi / 180.0
    scale = _u(rng, 0.93, 1.07)
    # ---------------- vertebra / disc dimensions
    vert: Dict[str, Dict[str, float]] = {}
    for name, (W, D, H, pw, ph, Lt, Lsp, hsp, psi) in _VERT.items():
        j = lambda: _u(rng, 0.97, 1.03)  # noqa: E731
        h = H * scale * j()
        if name in _LUMBAR:
            h = float(np.clip(h, 25.0, 28.0))
        vert[name] = dict(W=W * scale * j(), D=D * scale * j(), H=h, pw=pw, ph=ph * scale, Lt=Lt * scale * j(),
                          Lsp=Lsp * scale * j(), hsp=hsp * scale, psi=(psi + _u(rng, -5, 5)) * deg)
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

    # ---------------- the chain and its angles
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
            db, dd = (-lord * w / wsum * deg for w in wts[name])
        elif name.startswith("T"):
            db, dd = 1.0 * deg, 1.0 * deg
        else:
            db, dd = (v * kyph * deg for v in sac_dphi[name])
        segs.append(_Segment(name, "body", vert[name]["H"], db))
        if name in disc_h:
            segs.append(_Segment(name + "/", "disc", disc_h[name], dd))
    # phi at the L1 top = lordosis - sacral slope; integrate the rest from there
    phi_l1 = (lord - ssl) * deg
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

    def at(sv: float) -> Tuple[float, float, float]:
        return float(np.interp(sv, sgrid, yc)), float(np.interp(sv, sgrid, zc)), float(np.interp(sv, sgrid, phig))

    # ---------------- place the chain in the FOV
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

    def x0_of(sv):
        return x_mid + sway_a * np.sin(2 * math.pi * np.asarray(sv) / sway_l + sway_p)

    def frame(sv: float) -> _Frame:
        y, z, p = float(np.interp(sv, sgrid, yc)), float(np.interp(sv, sgrid, zc)), float(np.interp(sv, sgrid, phig))
        return _Frame(y, z, p, float(x0_of(sv)))

    # body-centre curve as a function of height (for soft-tissue layers)
    zs_sorted = np.argsort(zc)
    zc_s, yc_s = zc[zs_sorted], yc[zs_sorted]

    def y_spine(zq):
        return np.interp(zq, zc_s, yc_s)

    # ---------------- tissue intensities (relative to marrow ~1)
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

    # ---------------- background soft tissue (2D sagittal map, broadcast along x)
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

    # ---------------- spinal canal curve (smoothed offset of the centre line)
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

    # epidural fat: bigger tube, shifted posteriorly, down to the sacral hiatus
    def tube(nmap, a_half, w_half, shift, smax, pad_x):
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

    epi_end = by["S4"].s0 + 4
    r = tube(nC, acC / 2 + 2.5, wcC / 2 + 4.0, -1.5, epi_end, 40.0)
    if r is not None:
        cv.paint(r[0], r[1], tissue=EPI)

    # ---------------- per-vertebra ligaments, discs, bones
    seg_frames = {g.name: frame(g.s0 + g.h / 2) for g in segs}

    def plane_pts(name):  # (top point, bottom point, phi top, phi bottom) in FOV coords
        g = by[name]
        yt, zt = float(np.interp(g.s0, sgrid, yc)), float(np.interp(g.s0, sgrid, zc))
        yb2, zb2 = float(np.interp(g.s1, sgrid, yc)), float(np.interp(g.s1, sgrid, zc))
        return (yt, zt), (yb2, zb2), g.phi0, g.phi1

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

    # discs
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
        (ytop, ztop), _, _, _ = plane_pts(low)
        _, (ybot, zbot), _, _ = plane_pts(up)
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

    # vertebrae: label-0 ones first (T10-T12, sacrum), then L5 .. L1
    marrow_ids = [PE_MARROW]
    paint_order = ["T10", "T11", "T12", "S4", "S3", "S2", "S1", "L5", "L4", "L3", "L2", "L1"]
    for name in paint_order:
        lab = _LUMBAR_LABEL.get(name, 0)
        v = vert[name]
        fr = seg_frames[name]
        (yt, zt), (yb2, zb2), phit, phib = plane_pts(name)
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

    # ---------------- canal: label, CSF, cord, roots
    cname = ("T12", "T12/", "L1", "L1/", "L2")[int(rng.integers(0, 5))]  # conus medullaris tip
    s_conus = by[cname].s0 + by[cname].h * _u(rng, 0.2, 0.8)
    taper = 14.0
    fac = np.sqrt(np.clip((s_sac_end - sC) / taper, 0, 1) * (2 - np.clip((s_sac_end - sC) / taper, 0, 1)))
    exits = [by[n].s0 + by[n].h * 0.3 for n in ("L1/", "L2/", "L3/", "L4/", "L5/", "S1", "S1")]
    roots = [(_u(rng, -0.55, 0.55) * wck.mean() / 2, _u(rng, -0.6, 0.1) * ac_base / 2,
              exits[int(rng.integers(0, len(exits)))], _u(rng, 0.7, 1.1)) for _ in range(10)]
    r = tube(nC, np.maximum(acC / 2 * fac, 1e-3), np.maximum(wcC / 2 * fac, 1e-3), 0.0, s_sac_end, 30.0)
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

    return {
        "y_back": y_back,
        "marrow_ids": marrow_ids,
        "lordosis_deg": lord,
        "sacral_slope_deg": ssl,
        "conus_level": cname.replace("/", "-disc"),
    }



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


# ----------------------------------------------------------------------------- I/O
def to_nifti(image: np.ndarray, label: Optional[np.ndarray], affine: np.ndarray, dtype: str = "float32"):
    """NIfTI images (image, label or None) with sform = qform = ``affine`` in mm."""
    data = image.astype(np.int16) if dtype == "int16" else image.astype(np.float32)
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    lab = None
    if label is not None:
        lab = nib.Nifti1Image(label.astype(np.uint8), affine)
        lab.set_qform(affine, code=1)
        lab.set_sform(affine, code=1)
        lab.header.set_xyzt_units("mm")
    return img, lab


def save_phantom(path_image: str, path_label: Optional[str] = None, seed: int = 0, **kwargs) -> Dict[str, Any]:
    """Generate phantom ``seed`` (``make_phantom`` keyword arguments) and write it as NIfTI.

    The label is written only when ``path_label`` is given. Returns the info dict.
    """
    kwargs["return_info"] = True
    image, label, affine, info = make_phantom(seed, **kwargs)
    img, lab = to_nifti(image, label if path_label else None, affine, info["dtype"])
    for p in (path_image, path_label):
        if p:
            os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
    nib.save(img, path_image)
    if path_label:
        nib.save(lab, path_label)
    info["path_image"], info["path_label"] = path_image, path_label
    return info


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lib.phantom", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for the images phantom_<seed>.nii.gz")
    ap.add_argument("--count", type=int, default=1, help="number of phantoms (seeds seed .. seed+count-1)")
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--label-dir", default=None, help="also write the label maps here (same file names)")
    ap.add_argument("--preset", default="default", choices=sorted(PRESETS))
    ap.add_argument("--shape", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"), help="voxels, RAS order")
    ap.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("SX", "SY", "SZ"), help="mm, RAS order")
    ap.add_argument("--orientation", default=None, help=f"stored axcodes, default ORIENTATIONS[seed % 7] = {ORIENTATIONS}")
    args = ap.parse_args(argv)
    for seed in range(args.seed, args.seed + args.count):
        t0 = time.time()
        fname = f"phantom_{seed}.nii.gz"
        info = save_phantom(
            os.path.join(args.out, fname),
            os.path.join(args.label_dir, fname) if args.label_dir else None,
            seed=seed, preset=args.preset, shape=args.shape, spacing=args.spacing, orientation=args.orientation,
        )
        print(f"{info['path_image']}: {info['orientation']} shape {info['shape']} spacing(RAS) "
              f"{tuple(round(v, 3) for v in info['spacing_ras'])} {info['dtype']} lordosis {info['lordosis_deg']:.0f} deg "
              f"({time.time() - t0:.1f} s)" + (f", label {info['path_label']}" if info["path_label"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
