"""Geometry of the phantoms: the acquisition grid, the anatomical tables and the drawing surface.

* acquisition: the voxel orientations and presets offered, the automatic supersampling,
  ``_resolve_grid`` (shape and spacing of a draw, RAS order, mm) and ``_orient`` (re-storing a
  RAS-ordered array in another voxel orientation);
* anatomy tables: nominal vertebral, sacral and disc sizes (mm) and the share of the
  lordosis each lumbar segment takes;
* drawing: ``_Segment`` (one body or disc of the chain along the centre line), ``_Frame``
  (a vertebra's rigid sagittal frame), ``_height_above`` (signed distance to an endplate
  plane) and ``_Canvas`` (the fine RAS grid holding the tissue and label maps);
* ``_u``: one uniform draw as a Python float.

All lengths in mm, angles in radians, coordinates FOV-local RAS (0 at the outer face of voxel 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from nibabel import orientations as nio

from lib.pipeline.labels import DISCS, VERTEBRAE

# ----------------------------------------------------------------------------- acquisition set-ups
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


# ----------------------------------------------------------------------------- anatomy tables
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


# ----------------------------------------------------------------------------- drawing
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


# ----------------------------------------------------------------------------- acquisition grid
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
