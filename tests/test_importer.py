"""De-identified import (``python -m lib.importer``): the Basic Application Level Confidentiality Profile.

A phantom MR series is written as DICOM carrying known identifiers in many places: patient,
institution, physicians, dates, free text, nested sequences, private tags (also inside a
sequence item), an overlay comment and the file meta. After the import, every byte of every
output file (and the NIfTI written into a studies folder, and the instances Orthanc holds)
is searched for each original value and each original UID: none may survive. The series
must stay one series with consistent new UIDs and the same voxels and geometry.
"""

from __future__ import annotations

import gzip
import os
import secrets
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from conftest import REPO, free_port, missing_dependency
from lib import importer, pacs

IDENTIFIERS = {
    "PatientName": "Doe^Jane^Quinn",
    "PatientID": "MRN-774411",
    "PatientBirthDate": "19610203",
    "PatientAddress": "12 Harbour Street, Springfield",
    "PatientTelephoneNumbers": "+44 20 7946 0958",
    "OtherPatientIDs": "NHS-9434765919",
    "PatientMotherBirthName": "Smithson^Maryanne",
    "PatientAge": "063Y",
    "InstitutionName": "St Elsewhere Hospital",
    "InstitutionAddress": "1 Hospital Road, Springfield",
    "InstitutionalDepartmentName": "Radiology Dept Nine",
    "ReferringPhysicianName": "House^Gregory",
    "PerformingPhysicianName": "Cuddy^Lisa",
    "OperatorsName": "Wilson^James",
    "NameOfPhysiciansReadingStudy": "Foreman^Eric",
    "ConsultingPhysicianName": "Chase^Robert",  # a PN the profile's table does not name
    "AccessionNumber": "ACC-20240102-77",
    "StudyID": "STUDY-4242",
    "StudyDescription": "MRI L-spine Jane Doe",
    "SeriesDescription": "T2 SAG for Doe",
    "StudyDate": "20240102",
    "SeriesDate": "20240103",
    "AcquisitionDate": "20240104",
    "ContentDate": "20240105",
    "InstanceCreationDate": "20240106",
    "StudyVerifiedDate": "20240107",  # a date the table does not name
    "StudyTime": "101112.123",
    "StationName": "MRSCANNER-SPRINGFIELD",
    "DeviceSerialNumber": "SN-99887766",
    "AdmissionID": "ADM-123987",
    "ImageComments": "patient Jane Doe anxious",
    "ProtocolName": "Doe lumbar protocol",
}
NESTED = {
    "other id": "ALT-55667788",
    "issuer": "Springfield General Issuer",
    "requested procedure": "RP-5550123",
    "scheduled step": "SPS-5550124",
    "reviewer in sequence": "Kutner^Lawrence",
    "private": "PRIVATE-SECRET-42",
    "private in sequence": "SEQ-PRIVATE-SECRET-43",
    "overlay comment": "overlay of Jane Doe",
    "source AE": "SPRINGFIELD_PACS",
}


def identified_series(out_dir: Path):
    """A phantom series with identifiers everywhere; returns (paths, original UIDs, image, affine)."""
    from lib.phantom import make_phantom
    from lib.pipeline.dicom import write_dicom_series

    image, _, affine = make_phantom(5, shape=(20, 40, 40), spacing=(4.0, 4.0, 4.0), orientation="LPS")
    paths = write_dicom_series(image, affine, str(out_dir))
    uids = set()
    previous = None
    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword, value in IDENTIFIERS.items():
            setattr(ds, keyword, value)
        ds.PatientWeight = 71.5
        ds.file_meta.SourceApplicationEntityTitle = NESTED["source AE"]
        other = Dataset()
        other.PatientID, other.IssuerOfPatientID = NESTED["other id"], NESTED["issuer"]
        ds.OtherPatientIDsSequence = Sequence([other])
        request = Dataset()
        request.RequestedProcedureID, request.ScheduledProcedureStepID = NESTED["requested procedure"], NESTED["scheduled step"]
        ds.RequestAttributesSequence = Sequence([request])
        study_ref = Dataset()
        study_ref.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
        study_ref.ReferencedSOPInstanceUID = ds.StudyInstanceUID
        ds.ReferencedStudySequence = Sequence([study_ref])
        if previous is not None:  # a reference that must follow the new UIDs
            ref = Dataset()
            ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = previous.SOPClassUID, previous.SOPInstanceUID
            ref.ConsultingPhysicianName = NESTED["reviewer in sequence"]
            ref.add_new(0x00290010, "LO", "ACME SEQ 1.0")
            ref.add_new(0x00291001, "LO", NESTED["private in sequence"])
            ds.ReferencedImageSequence = Sequence([ref])
        ds.add_new(0x00190010, "LO", "ACME 1.0")
        ds.add_new(0x00191001, "LO", NESTED["private"])
        ds.add_new(0x00191002, "OB", IDENTIFIERS["PatientName"].encode())
        ds.add_new(0x60004000, "LT", NESTED["overlay comment"])
        ds.BurnedInAnnotation = "NO"
        ds.save_as(path, write_like_original=False)
        uids |= {str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.FrameOfReferenceUID),
                 str(ds.SOPInstanceUID)}
        previous = ds
    return paths, uids, image, affine


def secrets_of(uids, short=False):
    """Every original value and UID; ``short`` adds pieces too short to search binary data for."""
    return [*IDENTIFIERS.values(), *NESTED.values(), *uids, "Springfield", "Elsewhere",
            *(["Doe", "Jane", "Gregory"] if short else [])]


def assert_clean(data: bytes, uids, where: str):
    for secret in secrets_of(uids):
        assert secret.encode() not in data, f"{secret!r} survives in {where}"


def walk(ds: Dataset):
    for elem in ds:
        yield elem
        if elem.VR == "SQ":
            for item in elem.value:
                yield from walk(item)


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    root = tmp_path_factory.mktemp("identified")
    paths, uids, image, affine = identified_series(root / "series")
    (root / "series" / "README.txt").write_text("not DICOM: skipped")
    return {"dir": root / "series", "paths": paths, "uids": uids, "image": image, "affine": affine}


def test_the_profile_table_uses_known_attribute_names():
    assert importer.UNKNOWN_KEYWORDS == []
    assert importer.ACTIONS["PatientName"] == "D" and importer.ACTIONS["PatientBirthDate"] == "Z"


def test_deidentified_files_hold_no_original_value(original, tmp_path):
    deid = importer.Deidentifier()
    out = importer.deidentify_series(original["paths"], str(tmp_path / "out"), deid)
    assert len(out) == len(original["paths"])
    for path in out:
        assert_clean(Path(path).read_bytes(), original["uids"], path)
        ds = pydicom.dcmread(path)
        elements = list(walk(ds)) + list(ds.file_meta)
        assert not [e for e in elements if e.tag.is_private]
        assert not [e for e in elements if e.VR in ("DA", "DT", "TM", "AS") and e.value]
        assert [e.keyword for e in elements if e.VR == "PN" and e.value] == ["PatientName"]
        for elem in elements:
            if isinstance(elem.value, (str, bytes)) and elem.tag != 0x7FE00010:
                text = elem.value.decode(errors="replace") if isinstance(elem.value, bytes) else elem.value
                for secret in secrets_of(original["uids"], short=True):
                    assert secret not in text, (elem.keyword, secret)
        assert ds.PatientName == ds.PatientID and str(ds.PatientID).startswith("ANON-")
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
        assert len(ds.DeidentificationMethod) <= 64  # LO
        assert ds.LongitudinalTemporalInformationModified == "REMOVED"
        assert "PatientWeight" not in ds and "OtherPatientIDsSequence" not in ds and "RequestAttributesSequence" not in ds
        assert "StudyDate" in ds and not ds.StudyDate  # type 2: present, empty
        assert ds.Modality == "MR" and ds.ImageOrientationPatient and ds.PixelSpacing  # kept


def test_the_series_stays_one_series_with_consistent_new_uids(original, tmp_path):
    from lib.pipeline.io import read_volume

    out = importer.deidentify_series(original["paths"], str(tmp_path / "out"), importer.Deidentifier())
    datasets = sorted((pydicom.dcmread(p) for p in out), key=lambda d: int(d.InstanceNumber))
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        values = {str(getattr(d, keyword)) for d in datasets}
        assert len(values) == 1 and values.pop().startswith("2.25."), keyword
    sops = [str(d.SOPInstanceUID) for d in datasets]
    assert len(set(sops)) == len(sops) == len(original["paths"])
    assert all(d.file_meta.MediaStorageSOPInstanceUID == d.SOPInstanceUID for d in datasets)
    assert not set(sops) & original["uids"]
    for before, after in zip(datasets, datasets[1:]):  # references follow the replaced UIDs
        assert after.ReferencedImageSequence[0].ReferencedSOPInstanceUID == before.SOPInstanceUID
        assert after.ReferencedImageSequence[0].ReferencedSOPClassUID == before.SOPClassUID  # class UIDs kept
    array, affine = read_volume(str(tmp_path / "out"))
    before, before_affine = read_volume(str(original["dir"]))
    assert np.array_equal(array, before) and np.allclose(affine, before_affine)


def test_the_same_key_gives_the_same_uids_and_pseudonym():
    a, b, c = importer.Deidentifier(key=b"k" * 32), importer.Deidentifier(key=b"k" * 32), importer.Deidentifier()
    assert a.new_uid("1.2.3") == b.new_uid("1.2.3") != c.new_uid("1.2.3")
    assert a.pseudonym("MRN-1") == b.pseudonym("MRN-1") != c.pseudonym("MRN-1")
    assert len(a.new_uid("1.2.3")) <= 64


def test_burned_in_annotation_is_refused(original, tmp_path):
    ds = pydicom.dcmread(original["paths"][0])
    ds.BurnedInAnnotation = "YES"
    with pytest.raises(importer.Refused, match="BurnedInAnnotation"):
        importer.Deidentifier().dataset(ds)


def run_cli(*args, env=None):
    env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "lib.importer", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_cli_imports_into_a_studies_folder_as_nifti(original, tmp_path):
    import nibabel as nib

    studies = tmp_path / "studies"
    result = run_cli(original["dir"], "--studies", studies)
    assert result.returncode == 0, result.stderr
    files = list(studies.glob("*.nii.gz"))
    assert len(files) == 1 and files[0].name.startswith("anon-")
    assert_clean(gzip.decompress(files[0].read_bytes()), original["uids"], files[0].name)
    assert_clean(files[0].name.encode(), original["uids"], "the file name")
    img = nib.load(files[0])
    assert np.allclose(np.asanyarray(img.dataobj), original["image"], atol=abs(original["image"]).max() / 20000)
    assert np.allclose(img.affine, original["affine"], atol=1e-3)
    # the report names what was done, never a value
    out = result.stdout
    for name in ("PatientName", "PatientBirthDate", "PatientAddress", "InstitutionName", "OtherPatientIDsSequence",
                 "private attributes", "SeriesInstanceUID", "ConsultingPhysicianName", "StudyVerifiedDate"):
        assert name in out, name
    assert f"{len(original['paths'])} files de-identified" in out
    assert_clean(out.encode(), original["uids"], "the printed report")
    # importing again does not overwrite silently
    again = run_cli(original["dir"], "--studies", studies, "--id", files[0].name[:-7])
    assert again.returncode == 1 and "exists already" in again.stderr


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    try:
        pacs.install_orthanc()
    except RuntimeError as e:
        missing_dependency(f"Orthanc cannot be installed here: {e}")
    folder = tmp_path_factory.mktemp("orthanc-import")
    password = secrets.token_hex(8)
    url = pacs.start_orthanc(str(folder), port=free_port(), user="importer", password=password)
    yield {"url": url, "auth": ("importer", password)}
    pacs.stop_orthanc(str(folder))


def test_cli_imports_into_orthanc_as_dicom(original, orthanc, tmp_path):
    result = run_cli(original["dir"], "--orthanc", orthanc["url"], "--user", orthanc["auth"][0],
                     env={"ORTHANC_PASSWORD": orthanc["auth"][1]})
    assert result.returncode == 0, result.stderr
    assert_clean(result.stdout.encode(), original["uids"], "the printed report")
    auth = orthanc["auth"]
    instances = requests.get(f"{orthanc['url']}/instances", auth=auth, timeout=30).json()
    assert len(instances) == len(original["paths"])
    for instance in instances:
        data = requests.get(f"{orthanc['url']}/instances/{instance}/file", auth=auth, timeout=30).content
        assert_clean(data, original["uids"], f"Orthanc instance {instance}")
    client = pacs.dicomweb_client(f"{orthanc['url']}/dicom-web", *auth)
    series = client.search_for_series()
    assert len(series) == 1
    assert client.search_for_series(search_filters={"PatientID": IDENTIFIERS["PatientID"]}) == []
    meta = Dataset.from_json(series[0])
    assert str(meta.SeriesInstanceUID) not in original["uids"] and meta.Modality == "MR"
