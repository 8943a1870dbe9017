"""Writing a scan as an MR DICOM series (one file per slice along the array's third axis),
and a label as DICOM SEG (:func:`write_dicom_seg`, pydicom-seg: no dcmqi).

Geometry: for voxel ``(i, j, k)`` with RAS affine ``A``, the LPS position is
``diag(-1, -1, 1) @ A @ (i, j, k, 1)``. Slice ``k`` stores ``array[:, :, k].T`` so that the
DICOM column index is ``i`` and the row index is ``j``; ``ImageOrientationPatient`` holds
the unit directions of ``i`` and ``j``, ``PixelSpacing`` is ``[|dj|, |di|]`` in mm.

    python -m lib.dicom INPUT.nii.gz OUTPUT_DIR [--patient-id ID]

A SEG holds one segment per structure present, numbered by our label value
(:mod:`lib.pipeline.labels`), so that reading it back (pydicom-seg ``MultiClassReader``, as MONAI
Label's DICOMweb datastore does) gives our values again; each segment carries our name
(``SegmentLabel``) and colour (``RecommendedDisplayCIELabValue``) and SNOMED CT codes
(vertebra 51282000, vertebral canal 61853006, the disc's level 243920003...).
"""

from __future__ import annotations

import argparse
import datetime
import os
from typing import Dict, Optional

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: SNOMED CT codes (as in pydicom's code dictionary) per kind of structure / disc level
_ANATOMICAL_STRUCTURE = {"CodeValue": "123037004", "CodingSchemeDesignator": "SCT",
                         "CodeMeaning": "Anatomical Structure"}
_VERTEBRA = ("51282000", "Vertebra")
_CANAL = ("61853006", "Vertebral canal")
_DISC_LEVELS = {  # codes.SCT.LevelOfL1L2IntervertebralDisc ...
    "L1-L2": ("243920003", "Level of L1/L2 intervertebral disc"),
    "L2-L3": ("243921004", "Level of L2/L3 intervertebral disc"),
    "L3-L4": ("243922006", "Level of L3/L4 intervertebral disc"),
    "L4-L5": ("243923001", "Level of L4/L5 intervertebral disc"),
    "L5-S1": ("243927000", "Level of L5/S1 intervertebral disc"),
}


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


def _segment_type(structure) -> Dict[str, str]:
    if structure.kind == "vertebra":
        value, meaning = _VERTEBRA
    elif structure.kind == "canal":
        value, meaning = _CANAL
    else:
        value, meaning = _DISC_LEVELS[structure.name]
    return {"CodeValue": value, "CodingSchemeDesignator": "SCT", "CodeMeaning": meaning}


def segment_attributes(values) -> list:
    """dcmqi-style segment descriptions for our label ``values`` (numbered by value)."""
    from lib.pipeline.labels import STRUCTURES

    by_value = {s.value: s for s in STRUCTURES}
    out = []
    for value in sorted(int(v) for v in values):
        structure = by_value[value]
        out.append({
            "labelID": value,
            "SegmentLabel": structure.name,
            "SegmentDescription": structure.name,
            "SegmentAlgorithmType": "SEMIAUTOMATIC",
            "SegmentAlgorithmName": "MONAI Label spine",
            "SegmentedPropertyCategoryCodeSequence": dict(_ANATOMICAL_STRUCTURE),
            "SegmentedPropertyTypeCodeSequence": _segment_type(structure),
            "recommendedDisplayRGBValue": [int(c) for c in structure.color],
        })
    return out


def write_dicom_seg(label_path: str, series_dir: str, out_path: Optional[str] = None,
                    series_description: str = "Spine segmentation"):
    """DICOM SEG of ``label_path`` (our label values, on the grid of the series in
    ``series_dir``) referencing that series; returns the ``pydicom`` dataset, saved to
    ``out_path`` when given.

    Raises ``ValueError`` for an empty label or values outside the label table.
    """
    import pydicom
    import pydicom_seg
    import SimpleITK as sitk

    from lib.pipeline.labels import NAMES

    mask = sitk.Cast(sitk.ReadImage(str(label_path)), sitk.sitkUInt16)
    values = [int(v) for v in np.unique(sitk.GetArrayViewFromImage(mask)) if v != 0]
    if not values:
        raise ValueError("the label is empty: nothing to write as DICOM SEG")
    unknown = [v for v in values if v not in NAMES]
    if unknown:
        raise ValueError(f"label values {unknown} are not in the label table")
    template = pydicom_seg.template.from_dcmqi_metainfo({
        "ContentCreatorName": "MONAI Label",
        "ClinicalTrialSeriesID": "Session1",
        "ClinicalTrialTimePointID": "1",
        "SeriesDescription": series_description,
        "SeriesNumber": "300",
        "InstanceNumber": "1",
        "ContentLabel": "SPINE",
        "ContentDescription": "Lumbar spine segmentation (MONAI Label)",
        "BodyPartExamined": "LSPINE",
        "segmentAttributes": [segment_attributes(values)],
    })
    writer = pydicom_seg.MultiClassWriter(template=template, inplane_cropping=False, skip_empty_slices=False,
                                          skip_missing_segment=False)
    sources = []
    for name in sorted(os.listdir(series_dir)):
        path = os.path.join(series_dir, name)
        if os.path.isfile(path):
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except pydicom.errors.InvalidDicomError:
                continue
            if "ImagePositionPatient" in ds:
                sources.append(ds)
    if not sources:
        raise ValueError(f"no DICOM images with a position found in {series_dir}")
    seg = writer.write(mask, sources)
    if out_path:
        seg.save_as(out_path)
    return seg


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write a scan (NIfTI, NRRD, MHA) as an MR DICOM series")
    parser.add_argument("input")
    parser.add_argument("output_dir")
    parser.add_argument("--patient-id", default="ANON")
    args = parser.parse_args(argv)
    from lib.pipeline.io import read_volume

    array, affine = read_volume(args.input)
    paths = write_dicom_series(array, affine, args.output_dir, patient_id=args.patient_id)
    print(f"{len(paths)} slices written to {args.output_dir}")


if __name__ == "__main__":
    main()
