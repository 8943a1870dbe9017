"""Writing a scan as an MR DICOM series (one file per slice along the array's third axis).

Geometry: for voxel ``(i, j, k)`` with RAS affine ``A``, the LPS position is
``diag(-1, -1, 1) @ A @ (i, j, k, 1)``. Slice ``k`` stores ``array[:, :, k].T`` so that the
DICOM column index is ``i`` and the row index is ``j``; ``ImageOrientationPatient`` holds
the unit directions of ``i`` and ``j``, ``PixelSpacing`` is ``[|dj|, |di|]`` in mm.

    python -m lib.dicom INPUT.nii.gz OUTPUT_DIR [--patient-id ID]
"""

from __future__ import annotations

import argparse
import datetime
import os
from typing import Optional

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def write_dicom_series(
    array: np.ndarray,
    affine: np.ndarray,
    out_dir: str,
    patient_id: str = "ANON",
    patient_name: str = "Anonymous",
    series_description: str = "T2 SAG",
    study_uid: Optional[str] = None,
) -> list[str]:
    """Write ``array`` (X, Y, Z) with RAS ``affine`` as an MR series; returns the file paths.

    Intensities are rescaled to int16 with ``RescaleSlope``/``RescaleIntercept`` so that
    readers recover the original values (to about 1/30000 of the range).
    """
    if array.ndim != 3:
        raise ValueError(f"expected a 3D array, got shape {array.shape}")
    os.makedirs(out_dir, exist_ok=True)
    lps = RAS_TO_LPS @ np.asarray(affine, dtype=np.float64)
    di, dj, dk = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    spacing_i, spacing_j, spacing_k = (float(np.linalg.norm(v)) for v in (di, dj, dk))
    row_dir, col_dir = di / spacing_i, dj / spacing_j

    data = np.asarray(array, dtype=np.float64)
    lo, hi = float(data.min()), float(data.max())
    slope = (hi - lo) / 30000.0 if hi > lo else 1.0
    stored = np.round((data - lo) / slope).astype(np.int16)

    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    frame_uid = generate_uid()
    now = datetime.datetime.now()
    paths = []
    for k in range(array.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = os.path.join(out_dir, f"slice_{k:04d}.dcm")
        ds = FileDataset(path, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality = "MR"
        ds.PatientID, ds.PatientName = patient_id, patient_name
        ds.StudyDate = ds.SeriesDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = now.strftime("%H%M%S")
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, k + 1
        ds.SeriesDescription = series_description
        ds.ImagePositionPatient = [float(v) for v in (lps @ np.array([0, 0, k, 1.0]))[:3]]
        ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [spacing_j, spacing_i]
        ds.SliceThickness = spacing_k
        ds.SpacingBetweenSlices = spacing_k
        ds.Rows, ds.Columns = array.shape[1], array.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, lo, "US"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(path, write_like_original=False)
        paths.append(path)
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write a scan (NIfTI, NRRD, MHA) as an MR DICOM series")
    parser.add_argument("input")
    parser.add_argument("output_dir")
    parser.add_argument("--patient-id", default="ANON")
    args = parser.parse_args(argv)
    from lib.io import read_volume

    array, affine = read_volume(args.input)
    paths = write_dicom_series(array, affine, args.output_dir, patient_id=args.patient_id)
    print(f"{len(paths)} slices written to {args.output_dir}")


if __name__ == "__main__":
    main()
