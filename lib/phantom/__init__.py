"""Synthetic sagittal T2 lumbar spine MRI phantoms with exact ``label12`` masks.

Why
---
Tests, demos and smoke-training need lumbar MRI whose ground truth is known exactly,
in every voxel orientation a scanner may write, without copying patient data. This
package draws such volumes from a seed: same seed, same bytes.

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

Layout
------
* ``lib/phantom/__init__.py``: this description, ``make_phantom`` (grid, image formation:
  partial volume, point-spread function, texture, bias, scale, noise; storage orientation),
  NIfTI writing (``to_nifti``, ``save_phantom``) and the command line (``main``);
* ``lib/phantom/__main__.py``: ``python -m lib.phantom``;
* ``lib/phantom/geometry.py``: presets and orientations, the acquisition grid, the nominal
  anatomical tables, the sagittal frames and the fine canvas the anatomy is painted on;
* ``lib/phantom/anatomy.py``: ``build_anatomy``, the anatomy in eight named parts
  (dimensions, chain, placement, tissue intensities, background soft tissue, canal curve,
  ligaments/discs/vertebrae, canal contents), in the order they draw from the generator.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from typing import Any, Dict, Optional, Sequence

import nibabel as nib
import numpy as np
from nibabel import orientations as nio
from scipy import ndimage

from lib.phantom.anatomy import build_anatomy
from lib.phantom.geometry import (
    DEFAULT_MAX_VOXELS,
    FINE_MM,
    MAX_FINE_VOXELS,
    ORIENTATIONS,
    PRESETS,
    _Canvas,
    _orient,
    _resolve_grid,
    _u,
    auto_supersample,
)

__all__ = [
    "DEFAULT_MAX_VOXELS",
    "FINE_MM",
    "MAX_FINE_VOXELS",
    "ORIENTATIONS",
    "PRESETS",
    "auto_supersample",
    "build_anatomy",
    "main",
    "make_phantom",
    "save_phantom",
    "to_nifti",
]


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
    geo = build_anatomy(r_anat, cv, fov_ras)
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
    ap.add_argument("--orientation", default=None, help=f"stored axcodes, default ORIENTATIONS[seed %% 7] = {ORIENTATIONS}")
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
