"""Checks of the synthetic lumbar phantoms (lib/phantom/), derived from the generated data.

Everything is measured in world (RAS, mm) coordinates through the affine, so the same
assertions hold whatever voxel orientation the phantom was stored in.
"""

from __future__ import annotations

import functools

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from lib import phantom
from lib.pipeline.labels import CANAL, DISCS, NAMES, VERTEBRAE, disc_between

FULL = np.ones((3, 3, 3), bool)  # 26-connectivity


@functools.lru_cache(maxsize=None)
def _make(seed: int, preset: str = "small", orientation=None, spacing=None):
    img, lab, aff, info = phantom.make_phantom(
        seed, preset=preset, orientation=orientation, spacing=spacing, return_info=True
    )
    for a in (img, lab, aff):
        a.setflags(write=False)
    return img, lab, aff, info


def _world(aff: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """World (RAS mm) coordinates of the voxels of ``mask``, shape (N, 3)."""
    idx = np.argwhere(mask)
    return idx @ aff[:3, :3].T + aff[:3, 3]


def _voxel_ml(aff: np.ndarray) -> float:
    return abs(float(np.linalg.det(aff[:3, :3]))) / 1000.0


def _centroids(lab, aff):
    return {v: _world(aff, lab == v).mean(axis=0) for v in (*VERTEBRAE, *DISCS, CANAL)}


# --------------------------------------------------------------------------- labels / anatomy
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_all_structures_present_single_plausible_objects(seed):
    _, lab, aff, _ = _make(seed)
    assert lab.dtype == np.uint8
    assert set(np.unique(lab).tolist()) == set(range(12))
    ml = _voxel_ml(aff)
    for v in (*VERTEBRAE, *DISCS, CANAL):
        m = lab == v
        n = ndimage.label(m, FULL)[1]
        assert n == 1, f"{NAMES[v]} has {n} connected pieces"
        vol = m.sum() * ml
        lo, hi = (15, 90) if v in VERTEBRAE else (4, 30) if v in DISCS else (20, 150)
        assert lo <= vol <= hi, f"{NAMES[v]} volume {vol:.1f} mL outside [{lo}, {hi}]"
    # discs are smaller than the vertebrae they separate
    for v in VERTEBRAE:
        d = disc_between(v)
        assert (lab == d).sum() < (lab == v).sum()


@pytest.mark.parametrize("code", phantom.ORIENTATIONS)
def test_craniocaudal_order_and_axcodes_in_every_orientation(code):
    img, lab, aff, info = _make(3, orientation=code)
    assert info["orientation"] == code
    assert "".join(nib.aff2axcodes(aff)) == code
    c = _centroids(lab, aff)
    z = {v: c[v][2] for v in c}  # superior (+) coordinate
    for a, b in zip(VERTEBRAE[:-1], VERTEBRAE[1:]):
        assert z[a] > z[b], f"{NAMES[a]} not above {NAMES[b]} in {code}"
    for v in VERTEBRAE:
        d = disc_between(v)
        assert z[v] > z[d], f"{NAMES[d]} not below {NAMES[v]} in {code}"
        if v != VERTEBRAE[-1]:
            assert z[d] > z[v + 1], f"{NAMES[d]} not above {NAMES[v + 1]} in {code}"
    # the canal spans L1..L5
    zc = _world(aff, lab == CANAL)[:, 2]
    assert zc.max() > z[VERTEBRAE[0]] and zc.min() < z[VERTEBRAE[-1]]


def test_orientation_changes_storage_only():
    """Any stored orientation, brought back to RAS, is the RAS phantom voxel for voxel."""
    ref_img, ref_lab, ref_aff, _ = _make(4, orientation="RAS")
    for code in phantom.ORIENTATIONS:
        img, lab, aff, _ = _make(4, orientation=code)
        back_img = nib.as_closest_canonical(nib.Nifti1Image(img, aff))
        back_lab = nib.as_closest_canonical(nib.Nifti1Image(lab, aff))
        np.testing.assert_allclose(back_img.affine, ref_aff, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(back_lab.dataobj), ref_lab)
        np.testing.assert_array_equal(np.asarray(back_img.dataobj), ref_img)


def test_default_orientation_cycles_with_seed():
    n = len(phantom.ORIENTATIONS)
    seen = set()
    for seed in range(n):
        _, _, aff, info = _make(seed, preset="tiny")
        assert info["orientation"] == phantom.ORIENTATIONS[seed % n]
        seen.add("".join(nib.aff2axcodes(aff)))
    assert seen == set(phantom.ORIENTATIONS)


def test_canal_posterior_to_bodies_inside_arches():
    _, lab, aff, _ = _make(5)
    canal = _world(aff, lab == CANAL)
    for v in VERTEBRAE:
        d = _world(aff, lab == disc_between(v))
        zc = d[:, 2].mean()
        near = canal[np.abs(canal[:, 2] - zc) < 3.0]
        assert len(near) > 0, f"no canal at the level of {NAMES[disc_between(v)]}"
        # anterior is +y: the canal lies behind the disc
        assert near[:, 1].mean() < d[:, 1].mean() - 10.0
    # in RAS voxel order, look along each antero-posterior line (fixed x, z) that crosses the canal:
    # every vertebra has bone in front of the canal (body, pedicles) and behind it (lamina, spinous)
    ras = nib.as_closest_canonical(nib.Nifti1Image(lab, aff))
    L = np.asarray(ras.dataobj)
    ml = _voxel_ml(ras.affine)
    C = L == CANAL
    has = C.any(axis=1)[:, None, :]
    yidx = np.arange(L.shape[1])[None, :, None]
    first = C.argmax(axis=1)[:, None, :]
    last = (L.shape[1] - 1 - C[:, ::-1, :].argmax(axis=1))[:, None, :]
    for v in VERTEBRAE:
        V = L == v
        behind = (V & has & (yidx < first)).sum() * ml
        front = (V & has & (yidx > last)).sum() * ml
        assert behind > 1.5, f"{NAMES[v]}: only {behind:.2f} mL of arch behind the canal"
        assert front > 5.0, f"{NAMES[v]}: only {front:.2f} mL of body in front of the canal"
    # the canal is one tube
    assert ndimage.label(C, FULL)[1] == 1


def test_vertebra_and_disc_dimensions():
    """Heights along the superior axis and widths left-right in plausible ranges (mm)."""
    _, lab, aff, info = _make(6, preset="default")
    for v in VERTEBRAE:
        w = _world(aff, lab == v)
        width = np.ptp(w[:, 0])  # includes processes, clipped by the FOV left-right
        assert 30 <= width <= info["fov_ras"][0] + 1
        # posterior elements make the vertebra deep in AP
        assert 60 <= np.ptp(w[:, 1]) <= 110
    for d in DISCS:
        w = _world(aff, lab == d)
        assert 28 <= np.ptp(w[:, 0]) <= info["fov_ras"][0] + 1
        assert 24 <= np.ptp(w[:, 1]) <= 45


# --------------------------------------------------------------------------- image
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_t2_contrast(seed):
    img, lab, _, info = _make(seed)
    vert = np.isin(lab, VERTEBRAE)
    disc = np.isin(lab, DISCS)
    canal = lab == CANAL
    mv, md, mc = img[vert].mean(), img[disc].mean(), img[canal].mean()
    assert md > mv, "discs should be brighter than vertebrae on T2"
    assert mc > 1.5 * mv, "CSF should be bright"
    assert mc > np.percentile(img[lab == 0], 75)
    # air outside the body is near zero: the darkest 2% of the volume is at noise level
    assert np.percentile(img, 2) < 0.1 * info["intensity_max"]
    # nucleus brighter than annulus: the brightest disc voxels are in the disc's middle
    for d in DISCS:
        m = lab == d
        inner = ndimage.binary_erosion(m, iterations=2)
        assert img[inner].mean() > img[m & ~inner].mean()


def test_intensity_scale_and_dtype():
    maxima = []
    for seed in range(6):
        img, _, _, info = _make(seed, preset="tiny")
        assert img.dtype == np.float32 and np.isfinite(img).all() and img.min() >= 0
        assert 300 * 0.99 <= img.max() <= 3000 * 1.01
        if info["dtype"] == "int16":
            np.testing.assert_array_equal(img, np.rint(img))
        maxima.append(float(img.max()))
    assert len(set(round(m) for m in maxima)) > 3  # the scale varies with the seed


# --------------------------------------------------------------------------- geometry / determinism
def test_requested_spacing_and_shape():
    sp = (3.5, 0.7, 0.8)
    for code in ("PIR", "LPS"):
        img, lab, aff, info = _make(7, preset="small", orientation=code, spacing=sp)
        zooms = np.linalg.norm(aff[:3, :3], axis=0)
        # the world axis each voxel axis runs along, and the size there
        world_axis = np.abs(aff[:3, :3]).argmax(axis=0)
        for ax in range(3):
            assert zooms[ax] == pytest.approx(sp[world_axis[ax]])
        assert info["spacing_ras"] == pytest.approx(sp)
        assert img.shape == lab.shape == info["shape"]
    img, _, aff, info = phantom.make_phantom(0, preset="tiny", orientation="RAS", return_info=True)
    assert img.shape == (32, 32, 32)
    assert np.diag(aff)[:3] == pytest.approx(np.asarray(info["fov_ras"]) / 32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_preset_acquisition_ranges(seed):
    img, lab, aff, info = _make(seed, preset="default")
    sx, sy, sz = info["spacing_ras"]
    assert 3.3 <= sx <= 4.0 and sy == sz and 0.6 <= sy <= 0.9
    assert img.size <= phantom.DEFAULT_MAX_VOXELS * 1.01
    assert set(np.unique(lab).tolist()) == set(range(12))


def test_same_seed_same_output_different_seed_different():
    a = phantom.make_phantom(11, preset="small")
    b = phantom.make_phantom(11, preset="small")
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    c = phantom.make_phantom(12, preset="small")
    assert a[0].shape != c[0].shape or not np.array_equal(a[0], c[0])
    assert a[1].shape != c[1].shape or not np.array_equal(a[1], c[1])
    _, _, _, ia = phantom.make_phantom(11, preset="tiny", return_info=True)
    _, _, _, ic = phantom.make_phantom(12, preset="tiny", return_info=True)
    assert ia["lordosis_deg"] != ic["lordosis_deg"]


def test_anatomy_and_look_do_not_depend_on_the_grid():
    _, _, _, a = _make(9, preset="tiny")
    _, _, _, b = _make(9, preset="small")
    for k in ("lordosis_deg", "sacral_slope_deg", "conus_level", "dtype", "intensity_max", "orientation"):
        assert a[k] == b[k]
    assert a["shape"] != b["shape"]


def test_tiny_preset_has_every_structure():
    for seed in range(3):
        img, lab, _, _ = _make(seed, preset="tiny")
        assert img.shape == (32, 32, 32) or sorted(img.shape) == [32, 32, 32]
        assert set(np.unique(lab).tolist()) == set(range(12))


def test_bad_arguments():
    with pytest.raises(ValueError):
        phantom.make_phantom(0, preset="nope")
    with pytest.raises(ValueError):
        phantom.make_phantom(0, preset="tiny", supersample=(2, 1, 1))
    with pytest.raises(ValueError):
        phantom.make_phantom(0, preset="tiny", orientation="RRS")


# --------------------------------------------------------------------------- I/O
def test_nifti_round_trip(tmp_path):
    pi, pl = tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz"
    dtypes = set()
    for seed in (1, 8):  # both PIR; seed 1 is stored as int16, seed 8 as float32
        info = phantom.save_phantom(str(pi), str(pl), seed=seed, preset="small")
        dtypes.add(info["dtype"])
        img, lab, aff, _ = _make(seed)
        li, ll = nib.load(str(pi)), nib.load(str(pl))
        assert li.shape == img.shape == ll.shape
        np.testing.assert_allclose(li.affine, aff, atol=1e-4)
        np.testing.assert_allclose(ll.affine, aff, atol=1e-4)
        assert "".join(nib.aff2axcodes(li.affine)) == info["orientation"]
        assert li.get_data_dtype() == np.dtype(info["dtype"])
        assert ll.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(np.asarray(ll.dataobj), lab)
        np.testing.assert_allclose(np.asarray(li.dataobj, dtype=np.float32), img, rtol=1e-6)
        assert li.header.get_zooms() == pytest.approx(np.linalg.norm(aff[:3, :3], axis=0), rel=1e-5)
    assert dtypes == {"int16", "float32"}


def test_cli_writes_images_and_optional_labels(tmp_path, capsys):
    out, labels = tmp_path / "studies", tmp_path / "labels"
    assert phantom.main(["--out", str(out), "--count", "2", "--seed", "5", "--preset", "tiny"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["phantom_5.nii.gz", "phantom_6.nii.gz"]
    assert not labels.exists()
    assert phantom.main(["--out", str(out), "--count", "1", "--seed", "5", "--preset", "tiny",
                         "--label-dir", str(labels), "--orientation", "ASL"]) == 0
    lab = nib.load(str(labels / "phantom_5.nii.gz"))
    img = nib.load(str(out / "phantom_5.nii.gz"))
    assert "".join(nib.aff2axcodes(img.affine)) == "ASL"
    np.testing.assert_allclose(lab.affine, img.affine)
    assert set(np.unique(np.asarray(lab.dataobj)).tolist()) == set(range(12))
    assert "phantom_5.nii.gz" in capsys.readouterr().out
