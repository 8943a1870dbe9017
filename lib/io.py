"""Reading scans and label maps, and making a client's label fit our label table.

Arrays are returned in the file's own voxel order ``(X, Y, Z)`` with a 4x4 affine that
maps voxel indices to RAS world coordinates in mm (MONAI/ITK convention, as nibabel).
"""

from __future__ import annotations

import gzip
import math
import os
import shutil
import zlib
import tempfile
import zipfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

import nibabel as nib
import numpy as np
from monai.transforms import LoadImage

from lib.errors import InvalidInput
from lib.labels import BACKGROUND, IGNORE_VALUE, NAMES, NUM_CLASSES, value_of

#: what the local datastore lists as scans (a DICOM series is a folder or a .zip of one)
SCAN_PATTERNS: List[str] = ["*.nii.gz", "*.nii", "*.nrrd", "*.mha", "*.mhd"]

AFFINE_TOLERANCE_MM = 1e-2  # label and image grids must agree to this precision


MAX_VOXELS = 512 * 1024 * 1024  # refuse headers that claim more (memory bomb); 512^3


def check_file(path: str, max_voxels: int = MAX_VOXELS) -> None:
    """Cheap checks before a full read: the file exists, and a NIfTI is complete.

    ITK silently returns zeros for a truncated ``.nii.gz``, so for NIfTI the header's
    claimed size is compared with the (decompressed) byte count, chunk by chunk.
    """
    if not os.path.exists(path):
        raise InvalidInput(f"{os.path.basename(path)}: file not found")
    if not path.lower().endswith((".nii", ".nii.gz")):
        return
    name = os.path.basename(path)
    try:
        header = nib.load(path).header
        shape = tuple(int(n) for n in header.get_data_shape())
        expected = int(header.get_data_offset()) + math.prod(shape) * header.get_data_dtype().itemsize
    except Exception as e:
        raise unreadable(path, e) from None
    if math.prod(shape) > max_voxels:
        raise InvalidInput(f"{name}: header claims {shape} = {math.prod(shape)} voxels, over the limit of {max_voxels}")
    size = 0
    try:
        with (gzip.open if path.lower().endswith(".gz") else open)(path, "rb") as f:
            while chunk := f.read(1 << 22):
                size += len(chunk)
                if size >= expected:
                    break
    except (EOFError, OSError, zlib.error) as e:
        raise InvalidInput(f"{name}: the file is truncated or corrupt ({e})") from None
    if size < expected:
        raise InvalidInput(f"{name}: the file is truncated ({size} of {expected} bytes)")


def read_volume(path: str | os.PathLike) -> Tuple[np.ndarray, np.ndarray]:
    """Read any supported scan or label map -> ``(array (X, Y, Z), affine 4x4 RAS)``.

    Raises :class:`InvalidInput` with the reader's reason for unreadable files.
    """
    path = str(path)
    check_file(path)
    try:
        img = LoadImage(reader="ITKReader", image_only=True)(path)
    except Exception as e:
        raise unreadable(path, e) from None
    array = np.asarray(img)
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return array, np.asarray(img.affine, dtype=np.float64)


def unreadable(path: str, error: Exception) -> InvalidInput:
    """The error for a file no reader accepts (ITK's message is a long C++ trace: keep one line)."""
    text = str(error).strip()
    reason = text.splitlines()[-1][:300] if text else type(error).__name__
    return InvalidInput(f"{os.path.basename(str(path).rstrip('/'))}: cannot read as an image ({reason})")


def write_label(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> str:
    """Write a uint8 label map as NIfTI with the given RAS affine (atomically)."""
    path = str(path)
    tmp = path + (".partial.nii.gz" if path.endswith(".nii.gz") else ".partial.nii")  # nibabel picks the format by suffix
    img = nib.Nifti1Image(np.asarray(array, dtype=np.uint8), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, tmp)
    os.replace(tmp, path)
    return path


def check_same_grid(label_shape, label_affine, image_shape, image_affine, what: str = "label") -> None:
    """Refuse a label that does not lie on the image's voxel grid."""
    if tuple(label_shape) != tuple(image_shape):
        raise InvalidInput(f"{what} shape {tuple(label_shape)} does not match the image shape {tuple(image_shape)}")
    if not np.allclose(label_affine, image_affine, atol=AFFINE_TOLERANCE_MM):
        raise InvalidInput(
            f"{what} geometry (origin, spacing or direction) does not match the image: "
            f"label affine {np.round(label_affine, 3).tolist()} vs image {np.round(image_affine, 3).tolist()}"
        )


def remap_to_label_table(label: np.ndarray, segment_names: Optional[Sequence[str]]) -> np.ndarray:
    """Map a client's label values to ours.

    ``segment_names``: names in the order of the file's values 1..N, as 3D Slicer sends
    them in ``label_info`` (its ``idx`` counts the dropped background segment, so the
    order is what is reliable, not ``idx``). ``None`` means the file already uses our
    values 0..11 (255 = ignore becomes 0).
    """
    values = np.unique(label)
    if values.size and (values.min() < 0 or np.any(values != np.round(values))):
        raise InvalidInput(f"label values must be non-negative integers, got {values[:10].tolist()}")
    values = values.astype(np.int64)
    if segment_names is None:
        bad = [int(v) for v in values if v >= NUM_CLASSES and v != IGNORE_VALUE]
        if bad:
            raise InvalidInput(f"label values {bad} are outside 0..{NUM_CLASSES - 1} ({', '.join(NAMES.values())})")
        out = label.astype(np.uint8)
        out[out == IGNORE_VALUE] = BACKGROUND
        return out
    lut = np.zeros(max(int(values.max(initial=0)), len(segment_names)) + 1, dtype=np.uint8)
    unknown = []
    for file_value, name in enumerate(segment_names, start=1):
        try:
            lut[file_value] = value_of(name)
        except KeyError:
            unknown.append(name)
    if unknown:
        raise InvalidInput(f"unknown segment names {unknown}; expected names from {list(NAMES.values())[1:]}")
    extra = [int(v) for v in values if v > len(segment_names)]
    if extra:
        raise InvalidInput(f"label values {extra} have no segment name in label_info ({len(segment_names)} names sent)")
    return lut[label.astype(np.int64)]


def conform_label(
    label_path: str, image_path: str, label_info: Optional[Sequence[Dict[str, Any]]], out_path: str
) -> Dict[str, Any]:
    """Check a client's label against its image, remap it to our table and write NIfTI.

    Returns a summary (present structure names). Raises :class:`InvalidInput` and writes
    nothing when the label cannot be trusted.
    """
    label, label_affine = read_volume(label_path)
    image_shape, image_affine = volume_geometry(image_path)
    check_same_grid(label.shape, label_affine, image_shape, image_affine)
    names = None
    if label_info:
        try:
            names = [str(item["name"]) for item in label_info if str(item["name"]).lower() != "background"]
        except (TypeError, KeyError):
            raise InvalidInput("label_info must be a list of {name, idx} objects") from None
    remapped = remap_to_label_table(label, names)
    write_label(remapped, image_affine, out_path)
    present = [NAMES[int(v)] for v in np.unique(remapped) if v != BACKGROUND]
    return {"structures": present}


def volume_geometry(path: str) -> Tuple[Tuple[int, ...], np.ndarray]:
    """Shape and affine of a scan (reads it: ITK gives no cheaper consistent header path)."""
    array, affine = read_volume(path)
    return array.shape, affine


def unpack_dicom_zip(zip_path: str) -> str:
    """Extract a zipped DICOM series into a fresh temporary folder, refusing path tricks."""
    target = tempfile.mkdtemp(prefix="spine-dicom-")
    try:
        with zipfile.ZipFile(zip_path) as zf:
            for member in zf.infolist():
                if member.is_dir():
                    continue
                name = os.path.basename(member.filename)  # flatten: no '../', no absolute paths
                if not name or name.startswith("."):
                    continue
                with zf.open(member) as src, open(os.path.join(target, name), "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except zipfile.BadZipFile:
        shutil.rmtree(target, ignore_errors=True)
        raise InvalidInput(f"{os.path.basename(zip_path)}: not a valid zip archive of a DICOM series") from None
    if not os.listdir(target):
        shutil.rmtree(target, ignore_errors=True)
        raise InvalidInput(f"{os.path.basename(zip_path)}: the archive holds no files")
    return target
