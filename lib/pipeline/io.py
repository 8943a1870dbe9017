"""Reading scans and label maps, and making a client's label fit our label table.

Arrays are returned in the file's own voxel order ``(X, Y, Z)`` with a 4x4 affine that
maps voxel indices to RAS world coordinates in mm (MONAI/ITK convention, as nibabel).
"""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import shutil
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import nibabel as nib
import numpy as np
from monai.transforms import LoadImage

from lib.pipeline.errors import InvalidInput, TooLarge
from lib.pipeline.labels import BACKGROUND, IGNORE_VALUE, NAMES, NUM_CLASSES, value_of

#: what the local datastore lists as scans (a DICOM series is a folder or a .zip of one)
SCAN_PATTERNS: List[str] = ["*.nii.gz", "*.nii", "*.nrrd", "*.mha", "*.mhd"]

AFFINE_TOLERANCE_MM = 1e-2  # label and image grids must agree to this precision


MAX_VOXELS = 512**3  # default for refusing headers that claim more (memory bomb)
MAX_UPLOAD_MB = 1024.0  # default for refusing larger uploads
UNPACK_FACTOR = 8  # a zipped DICOM series may unpack to this many times max_upload_mb
PARTIAL_PREFIX = ".partial-"  # hidden folders of atomic writes in progress (never listed as scans)

#: what a client may upload (``.mhd`` needs its separate ``.raw``: not one file)
UPLOAD_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha", ".zip")


@dataclass
class Limits:
    """Server-wide input limits, from ``--conf max_voxels N`` and ``--conf max_upload_mb N``.

    Module-level because the transform chains that read files are built without the
    app's ``conf``; the server sets them once at start-up with :func:`configure_limits`.
    """

    max_voxels: int = MAX_VOXELS
    max_upload_mb: float = MAX_UPLOAD_MB

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


LIMITS = Limits()


def configure_limits(conf: Optional[Dict[str, Any]]) -> Limits:
    """Set :data:`LIMITS` from ``--conf`` strings; refuse nonsense at start-up, not per request."""
    conf = conf or {}
    try:
        max_voxels = int(float(conf.get("max_voxels", MAX_VOXELS)))
        max_upload_mb = float(conf.get("max_upload_mb", MAX_UPLOAD_MB))
    except (TypeError, ValueError) as e:
        raise ValueError(f"max_voxels and max_upload_mb must be numbers ({e})") from None
    if max_voxels <= 0 or max_upload_mb <= 0:
        raise ValueError(f"max_voxels ({max_voxels}) and max_upload_mb ({max_upload_mb}) must be positive")
    LIMITS.max_voxels, LIMITS.max_upload_mb = max_voxels, max_upload_mb
    return LIMITS


def scan_extension(name: str) -> str:
    """The file's scan extension (``.nii.gz`` counts as one), lower case; ``""`` if none known."""
    lower = name.lower()
    for ext in sorted({p.lstrip("*") for p in SCAN_PATTERNS} | set(UPLOAD_EXTENSIONS), key=len, reverse=True):
        if lower.endswith(ext):
            return ext
    return ""


def image_id(name: str) -> str:
    """The id of a scan or label file or DICOM folder: its base name without the scan
    extension (``.nii.gz`` counts as one, case kept). One rule for the datastore records of
    the train task, ``lib.segment``'s output names and ``lib.evaluate``'s case ids."""
    base = os.path.basename(str(name).rstrip("/"))
    ext = scan_extension(base)
    return base[: -len(ext)] if ext else base


def _text_header(path: str, end: bytes, limit: int = 1 << 16) -> List[str]:
    """Lines of a text header (NRRD, MetaImage) up to ``end``, at most ``limit`` bytes."""
    with open(path, "rb") as f:
        head = f.read(limit)
    cut = head.find(end)
    head = head if cut < 0 else head[:cut]
    return head.decode("latin-1").splitlines()


def header_info(path: str) -> Tuple[Optional[Tuple[int, ...]], Optional[str]]:
    """``(shape the header claims, external data file or None)`` without reading voxels.

    Shape is ``None`` for formats without a cheap header (DICOM). NRRD and MetaImage can
    name a separate data file, which an uploaded file must not do (it could point
    anywhere on the server).
    """
    ext = scan_extension(path)
    try:
        if ext in (".nii", ".nii.gz"):
            return tuple(int(n) for n in nib.load(path).header.get_data_shape()), None
        if ext == ".nrrd":
            return _nrrd_header(path)
        if ext in (".mha", ".mhd"):
            return _meta_header(path)
    except InvalidInput:
        raise
    except Exception as e:
        raise unreadable(path, e) from None
    return None, None


def _nrrd_header(path: str) -> Tuple[Tuple[int, ...], Optional[str]]:
    lines = _text_header(path, b"\n\n")
    if not lines or not lines[0].startswith("NRRD000"):
        raise InvalidInput(f"{os.path.basename(path)}: not an NRRD file (no NRRD magic line)")
    fields = {}
    for line in lines[1:]:
        if ":" in line and not line.startswith("#"):
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip().lstrip("=").strip()
    if "sizes" not in fields:
        raise InvalidInput(f"{os.path.basename(path)}: NRRD header has no 'sizes' field")
    shape = tuple(int(n) for n in fields["sizes"].split())
    external = fields.get("data file") or fields.get("datafile")
    return shape, external


def _meta_header(path: str) -> Tuple[Tuple[int, ...], Optional[str]]:
    fields = {}
    for line in _text_header(path, b"\n\n"):  # ElementDataFile is the last header line
        key, _, value = line.partition("=")
        fields[key.strip().lower()] = value.strip()
        if key.strip().lower() == "elementdatafile":
            break
    if "dimsize" not in fields:
        raise InvalidInput(f"{os.path.basename(path)}: MetaImage header has no DimSize")
    shape = tuple(int(n) for n in fields["dimsize"].split())
    data_file = fields.get("elementdatafile", "")
    return shape, (None if data_file.upper() == "LOCAL" else data_file or "(none)")


def check_header(path: str, max_voxels: Optional[int] = None) -> Optional[str]:
    """Header-only checks: the file exists and is not empty, and its header does not claim
    more than ``max_voxels`` (default :data:`LIMITS`). Returns the external data file the
    header names (NRRD, MetaImage), if any. A folder is a DICOM series: the sum of what its
    slices' headers claim is checked (:func:`dicom_series_voxels`).
    """
    max_voxels = max_voxels or LIMITS.max_voxels
    name = os.path.basename(path.rstrip("/"))
    if not os.path.exists(path):
        raise InvalidInput(f"{name}: file not found")
    if os.path.isdir(path):
        slices, voxels, largest = dicom_series_voxels(path)
        if voxels > max_voxels:
            raise InvalidInput(f"{name}: the DICOM headers claim {voxels} voxels in {slices} slices (largest slice "
                               f"{largest[0]} x {largest[1]} x {largest[2]} frames), over the limit of {max_voxels}")
        return None
    if os.path.getsize(path) == 0:
        raise InvalidInput(f"{name}: the file is empty")
    shape, external = header_info(path)
    if shape is not None and math.prod(shape) > max_voxels:
        raise InvalidInput(f"{name}: header claims {shape} = {math.prod(shape)} voxels, over the limit of {max_voxels}")
    return external


def dicom_series_voxels(folder: str) -> Tuple[int, int, Tuple[int, int, int]]:
    """``(image files, voxels claimed in all, largest (rows, columns, frames))`` of the DICOM
    files directly in ``folder``, from headers only (pixel data is never read).

    ITK allocates what the headers claim before it reads a pixel, so a slice claiming
    65535 x 65535 in a few hundred bytes would cost gigabytes. Files that are not DICOM
    images (no Rows/Columns) are skipped, as ITK skips them; the sum over every file is an
    upper bound of the one series ITK reads.
    """
    import pydicom

    slices, voxels, largest = 0, 0, (0, 0, 0)
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not entry.is_file():
            continue
        try:
            ds = pydicom.dcmread(entry.path, stop_before_pixels=True, force=True,
                                 specific_tags=["Rows", "Columns", "NumberOfFrames"])
            size = (int(ds.Rows), int(ds.Columns), int(ds.get("NumberOfFrames") or 1))
        except Exception:  # not DICOM, or no image in it: ITK ignores it too
            continue
        slices += 1
        voxels += math.prod(size)
        largest = max(largest, size, key=math.prod)
    return slices, voxels, largest


def check_file(path: str, max_voxels: Optional[int] = None) -> None:
    """Checks before a full read: :func:`check_header`, and a NIfTI is complete.

    ITK silently returns zeros for a truncated ``.nii.gz``, so for NIfTI the header's
    claimed size is compared with the (decompressed) byte count, chunk by chunk.
    """
    check_header(path, max_voxels)
    if not os.path.isdir(path) and scan_extension(path) in (".nii", ".nii.gz"):
        _check_nifti_complete(path)


def _check_nifti_complete(path: str) -> None:
    """Refuse a NIfTI with fewer (decompressed) bytes than its header promises, or with
    NaN/infinite intensities (ITK silently reads those as 0), in one streaming pass."""
    name = os.path.basename(path)
    try:
        header = nib.load(path).header
        dtype, offset = header.get_data_dtype(), int(header.get_data_offset())
        expected = offset + math.prod(header.get_data_shape()) * dtype.itemsize
    except Exception as e:
        raise unreadable(path, e) from None
    finite = _FiniteCheck(dtype, offset, expected) if dtype.kind in "fc" else None
    size = 0
    try:
        with (gzip.open if path.lower().endswith(".gz") else open)(path, "rb") as f:
            while chunk := f.read(1 << 22):
                if finite is not None and not finite.feed(chunk):
                    raise InvalidInput(f"{name}: the volume contains NaN or infinite intensities")
                size += len(chunk)
                if size >= expected:
                    break
    except (EOFError, OSError, zlib.error) as e:
        raise InvalidInput(f"{name}: the file is truncated or corrupt ({e})") from None
    if size < expected:
        raise InvalidInput(f"{name}: the file is truncated ({size} of {expected} bytes)")


class _FiniteCheck:
    """Feed a file's bytes in order; tells whether the voxel values seen so far are finite."""

    def __init__(self, dtype: np.dtype, start: int, end: int):
        self.dtype, self.start, self.end = dtype, start, end
        self.pos, self.rest = 0, b""  # file position; bytes of a voxel split across chunks

    def feed(self, chunk: bytes) -> bool:
        lo, hi = max(self.start - self.pos, 0), min(self.end - self.pos, len(chunk))
        self.pos += len(chunk)
        if hi <= lo:
            return True
        data = self.rest + chunk[lo:hi]
        whole = len(data) - len(data) % self.dtype.itemsize
        self.rest = data[whole:]
        return bool(np.isfinite(np.frombuffer(data[:whole], dtype=self.dtype)).all())


def check_upload(path: str, what: str = "upload") -> str:
    """Checks for a file a client sent, before anything reads its voxels.

    Size within ``max_upload_mb`` (413 otherwise), a known extension, and the header checks
    including no reference to a separate data file. The streaming completeness check is
    left to :func:`check_file`, which every reader runs before it reads the voxels.
    Returns the scan extension.
    """
    size = os.path.getsize(path) if os.path.isfile(path) else 0
    if size > LIMITS.max_upload_bytes:
        raise TooLarge(f"{what} of {size / 2**20:.1f} MB is over the limit of {LIMITS.max_upload_mb:g} MB (max_upload_mb)")
    ext = scan_extension(path)
    if ext not in UPLOAD_EXTENSIONS:
        raise InvalidInput(f"{what}: file type {''.join(Path(path).suffixes) or '(none)'} is not accepted; "
                           f"send one of {', '.join(UPLOAD_EXTENSIONS)}")
    if ext == ".zip":
        return ext  # unpack_dicom_zip checks the archive
    external = check_header(path)
    if external:
        raise InvalidInput(f"{what}: the header refers to a separate data file ({external[:100]!r}); "
                           "send the image as one file (.nrrd with inline data, .mha, .nii.gz)")
    return ext


def check_volume(array: np.ndarray, name: str, min_size: int = 3) -> None:
    """Refuse an array that is not one finite 3D volume of at least ``min_size`` slices per axis."""
    if array.ndim != 3:
        raise InvalidInput(f"{name}: expected one 3D volume, got array of shape {tuple(array.shape)} "
                           "(2D images, time series and multi-channel volumes are not supported)")
    if min(array.shape) < min_size:
        raise InvalidInput(f"{name}: volume {tuple(array.shape)} has fewer than {min_size} slices along an axis: "
                           "a 3D scan is needed")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise InvalidInput(f"{name}: the volume contains NaN or infinite intensities")


# --- atomic writes ------------------------------------------------------------------


@contextlib.contextmanager
def atomic_output(dest: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path to write; on success it replaces ``dest`` in one step.

    The temporary file sits in a hidden folder next to ``dest`` (same file system, so
    ``os.replace`` is atomic; hidden, so datastore scans never list it) and keeps
    ``dest``'s name, so writers that pick the format by suffix still work. It is
    fsynced before the rename and the folder after it: a crash at any point leaves
    either the old file or the new one, never a torn file.
    """
    dest = os.path.abspath(str(dest))
    folder = os.path.dirname(dest)
    tmp_dir = tempfile.mkdtemp(prefix=PARTIAL_PREFIX, dir=folder)
    tmp = os.path.join(tmp_dir, os.path.basename(dest))
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, dest)
        _fsync(folder)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _fsync(path: str) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_copy(src: str, dest: str | os.PathLike) -> str:
    """Copy ``src`` to ``dest`` atomically (see :func:`atomic_output`)."""
    with atomic_output(dest) as tmp, open(src, "rb") as fin, open(tmp, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
    return str(dest)


def atomic_write_text(dest: str | os.PathLike, text: str) -> str:
    """Write ``text`` to ``dest`` atomically (see :func:`atomic_output`)."""
    with atomic_output(dest) as tmp, open(tmp, "w") as f:
        f.write(text)
    return str(dest)


def remove_stale_partials(folder: str, max_age_s: float = 3600) -> List[str]:
    """Remove atomic-write folders left by a crash (older than ``max_age_s``: not one in progress)."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    now = time.time()
    for entry in os.scandir(folder):
        if entry.name.startswith(PARTIAL_PREFIX) and entry.is_dir() and now - entry.stat().st_mtime >= max_age_s:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
    return removed


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
    img = nib.Nifti1Image(np.asarray(array, dtype=np.uint8), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_output(path) as tmp:
        nib.save(img, tmp)
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
            _check_unpacked_size(zf, os.path.basename(zip_path))
            for member in zf.infolist():
                if member.is_dir():
                    continue
                name = os.path.basename(member.filename)  # flatten: no '../', no absolute paths
                if not name or name.startswith("."):
                    continue
                with zf.open(member) as src, open(os.path.join(target, name), "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except InvalidInput:
        shutil.rmtree(target, ignore_errors=True)
        raise
    except zipfile.BadZipFile:
        shutil.rmtree(target, ignore_errors=True)
        raise InvalidInput(f"{os.path.basename(zip_path)}: not a valid zip archive of a DICOM series") from None
    if not os.listdir(target):
        shutil.rmtree(target, ignore_errors=True)
        raise InvalidInput(f"{os.path.basename(zip_path)}: the archive holds no files")
    return target


def _check_unpacked_size(zf: zipfile.ZipFile, name: str) -> None:
    """Refuse a zip bomb: the declared unpacked size is bounded (zipfile never reads past it)."""
    total = sum(m.file_size for m in zf.infolist())
    limit = LIMITS.max_upload_bytes * UNPACK_FACTOR
    if total > limit:
        raise TooLarge(f"{name}: unpacks to {total / 2**20:.0f} MB, over {limit / 2**20:.0f} MB "
                       f"({UNPACK_FACTOR} x max_upload_mb)")
