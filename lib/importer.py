"""Importing DICOM series for annotation, de-identified by the DICOM PS3.15 Basic Application
Level Confidentiality Profile (Annex E, Table E.1-1, no options).

    python -m lib.importer DICOM_DIR --studies STUDIES_DIR [--id IMAGE_ID]
    python -m lib.importer DICOM_DIR --orthanc http://127.0.0.1:8042 [--user U --password P]

Every DICOM file under ``DICOM_DIR`` is read; each series is de-identified and then
written as NIfTI into a local studies folder (``--studies``: what ``--studies DIR`` of the
server reads) or stored as DICOM in Orthanc (``--orthanc``, STOW-RS to ``/dicom-web``).
What was removed or replaced is printed (attribute names and counts, never values).

What happens to each attribute (top level and inside every sequence item):

- attributes of the profile's table: ``X`` removed, ``Z`` emptied, ``D`` replaced by a
  dummy (patient name and id become one pseudonym), ``U`` replaced by a new UID;
- any other UID that is not a registered DICOM UID (class UIDs, transfer syntaxes stay) is
  replaced too; the same original UID always gets the same new UID within one import (or
  with the same ``--key``), so that a series stays a series and references stay valid;
- every other person name (PN), age (AS), date, time and date-time (DA, TM, DT) anywhere
  is emptied or removed (the profile removes all of them without the "Retain Longitudinal
  Temporal Information" option);
- private attributes, curves (50xx) and overlay data/comments (60xx) are removed;
- ``PatientIdentityRemoved`` YES, ``DeidentificationMethod`` and its code (DCM 113100) and
  ``LongitudinalTemporalInformationModified`` REMOVED are set.

Pixel data is not examined: a series whose ``BurnedInAnnotation`` is YES is refused.
Attributes the profile keeps (e.g. geometry, ``Modality``, ``Manufacturer``,
``BodyPartExamined``) are kept.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import hmac
import os
import secrets
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Counter, Dict, List, Optional

import pydicom
from pydicom.dataset import Dataset
from pydicom.datadict import tag_for_keyword
from pydicom.sequence import Sequence
from pydicom.uid import UID_dictionary

PROFILE = "DICOM PS3.15 E.1 Basic Application Level Confidentiality Profile"
DEID_METHOD = "PS3.15 E.1 Basic Application Confidentiality Profile"  # LO: at most 64 characters

# --- the profile's table (Basic Profile column; where it offers a choice, the stricter) -----
_REMOVE = """
AccessionNumber:Z AcquisitionComments AcquisitionContextSequence AcquisitionDate:Z AcquisitionDateTime
AcquisitionDeviceProcessingDescription AcquisitionProtocolDescription AcquisitionTime ActualHumanPerformersSequence
AdditionalPatientHistory AdmissionID AdmittingDate AdmittingDiagnosesCodeSequence AdmittingDiagnosesDescription
AdmittingTime Allergies Arbitrary AuthorObserverSequence BranchOfService CassetteID
ConfidentialityConstraintOnPatientDataDescription ContentCreatorName:Z ContentCreatorIdentificationCodeSequence
ContentDate:Z ContentTime:Z ContributionDescription CountryOfResidence CurrentPatientLocation CurveDate CurveTime
CustodialOrganizationSequence DataSetTrailingPadding DateOfLastCalibration DateOfSecondaryCapture
DerivationDescription DetectorID DeviceSerialNumber DigitalSignaturesSequence DischargeDiagnosisDescription
DistributionAddress DistributionName EthnicGroup FillerOrderNumberImagingServiceRequest:Z FrameComments GantryID
GeneratorID IconImageSequence IdentifyingComments ImageComments ImagePresentationComments
ImagingServiceRequestComments Impressions InstanceCreationDate InstanceCreationTime InstitutionAddress
InstitutionCodeSequence InstitutionName InstitutionalDepartmentName InstitutionalDepartmentTypeCodeSequence
InsurancePlanIdentification IntendedRecipientsOfResultsIdentificationSequence InterpretationApproverSequence
InterpretationAuthor InterpretationDiagnosisDescription InterpretationIDIssuer InterpretationRecorder
InterpretationText InterpretationTranscriber IssuerOfAdmissionID IssuerOfPatientID IssuerOfServiceEpisodeID
LastMenstrualDate MAC MedicalAlerts MedicalRecordLocator MilitaryRank ModifiedAttributesSequence
ModifiedImageDescription ModifyingDeviceID ModifyingDeviceManufacturer NameOfPhysiciansReadingStudy
NamesOfIntendedRecipientsOfResults Occupation OperatorIdentificationSequence OperatorsName
OriginalAttributesSequence OrderCallbackPhoneNumber OrderEnteredBy OrderEntererLocation OtherPatientIDs
OtherPatientIDsSequence OtherPatientNames OverlayDate OverlayTime ParticipantSequence PatientAddress PatientAge
PatientBirthDate:Z PatientBirthName PatientBirthTime PatientBirthDateInAlternativeCalendar
PatientDeathDateInAlternativeCalendar PatientAlternativeCalendar PatientComments PatientID:D
PatientInsurancePlanCodeSequence PatientMotherBirthName PatientName:D PatientPrimaryLanguageCodeSequence
PatientPrimaryLanguageModifierCodeSequence PatientReligiousPreference PatientSex:Z PatientSexNeutered PatientSize
PatientState PatientTelephoneNumbers PatientTransportArrangements PatientWeight PerformedLocation
PerformedProcedureStepDescription PerformedProcedureStepEndDate PerformedProcedureStepEndTime
PerformedProcedureStepID PerformedProcedureStepStartDate PerformedProcedureStepStartTime PerformedStationAETitle
PerformedStationGeographicLocationCodeSequence PerformedStationName PerformedStationNameCodeSequence
PerformingPhysicianIdentificationSequence PerformingPhysicianName PersonAddress PersonIdentificationCodeSequence
PersonName:Z PersonTelephoneNumbers PhysicianApprovingInterpretation PhysiciansReadingStudyIdentificationSequence
PhysiciansOfRecord PhysiciansOfRecordIdentificationSequence PlacerOrderNumberImagingServiceRequest:Z PlateID
PreMedication PregnancyStatus ProtocolName ReasonForTheImagingServiceRequest ReasonForStudy
ReferencedDigitalSignatureSequence ReferencedPatientAliasSequence ReferencedPatientSequence
ReferencedPerformedProcedureStepSequence ReferencedSOPInstanceMACSequence ReferencedStudySequence
ReferringPhysicianAddress ReferringPhysicianIdentificationSequence ReferringPhysicianName:Z
ReferringPhysicianTelephoneNumbers RegionOfResidence RequestAttributesSequence RequestedContrastAgent
RequestedProcedureComments RequestedProcedureDescription RequestedProcedureID RequestedProcedureLocation
RequestingPhysician RequestingService ResponsibleOrganization ResponsiblePerson ResultsComments
ResultsDistributionListSequence ResultsIDIssuer ReviewerName ScheduledHumanPerformersSequence
ScheduledPatientInstitutionResidence ScheduledPerformingPhysicianIdentificationSequence
ScheduledPerformingPhysicianName ScheduledProcedureStepEndDate ScheduledProcedureStepEndTime
ScheduledProcedureStepStartDate ScheduledProcedureStepStartTime ScheduledStationAETitle
ScheduledStationGeographicLocationCodeSequence ScheduledStationName ScheduledStationNameCodeSequence
ScheduledStudyLocation ScheduledStudyLocationAETitle SeriesDate SeriesDescription SeriesTime
ServiceEpisodeDescription ServiceEpisodeID SmokingStatus SpecialNeeds StationName StudyComments StudyDate:Z
StudyDescription StudyID:Z StudyIDIssuer StudyTime:Z TextComments TextString TimeOfLastCalibration
TimeOfSecondaryCapture TimezoneOffsetFromUTC TopicAuthor TopicKeywords TopicSubject TopicTitle
VerifyingObserverIdentificationCodeSequence:Z VerifyingObserverName:Z VerifyingObserverSequence:Z
VerifyingOrganization VisitComments
"""
#: keyword -> "X" (remove), "Z" (empty), "D" (dummy: the pseudonym)
ACTIONS: Dict[str, str] = {}
for _item in _REMOVE.split():
    _keyword, _, _action = _item.partition(":")
    ACTIONS[_keyword] = _action or "X"
#: keywords of the table that this pydicom's dictionary does not know (kept for the record; tested empty)
UNKNOWN_KEYWORDS = sorted(k for k in ACTIONS if tag_for_keyword(k) is None)
_TAG_ACTIONS = {tag_for_keyword(k): a for k, a in ACTIONS.items() if tag_for_keyword(k) is not None}
#: dates/times/names/ages not in the table: Z for those a module requires (type 2), else X
_TYPE2_TEMPORAL = {"StudyDate", "StudyTime", "ContentDate", "ContentTime"}
_REGISTERED_UIDS = set(UID_dictionary)


class Refused(ValueError):
    """A series this importer must not import (e.g. identifiers burned into the pixels)."""


@dataclass
class Report:
    """What was done, attribute by attribute: ``counts[(action, name)]`` = elements affected."""

    files: int = 0
    series: Dict[str, str] = field(default_factory=dict)  # new series UID -> where it went
    counts: Counter = field(default_factory=collections.Counter)

    def add(self, action: str, name: str) -> None:
        self.counts[(action, name)] += 1

    def lines(self) -> List[str]:
        words = {"X": "removed", "Z": "emptied", "D": "replaced (pseudonym)", "U": "replaced (new UID)",
                 "P": "removed (private)", "S": "set"}
        out = [f"{self.files} files de-identified ({PROFILE})"]
        for (action, name), n in sorted(self.counts.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            out.append(f"  {words.get(action, action):22s} {name} ({n} elements)")
        for uid, where in self.series.items():
            out.append(f"series -> {where}")
        return out


class Deidentifier:
    """Applies the profile; UIDs and the pseudonym follow from ``key`` (random unless given)."""

    def __init__(self, key: Optional[bytes] = None, patient_pseudonym: Optional[str] = None):
        self.key = key or secrets.token_bytes(32)
        self.patient_pseudonym = patient_pseudonym
        self.report = Report()
        self._uids: Dict[str, str] = {}

    # --- replacements ------------------------------------------------------------------
    def _digest(self, text: str) -> bytes:
        return hmac.new(self.key, text.encode(), hashlib.sha256).digest()

    def new_uid(self, uid: str) -> str:
        uid = str(uid).strip().rstrip("\0")
        if uid not in self._uids:
            self._uids[uid] = "2.25." + str(int.from_bytes(self._digest("uid:" + uid)[:16], "big"))
        return self._uids[uid]

    def pseudonym(self, patient_id: str) -> str:
        return self.patient_pseudonym or "ANON-" + self._digest("patient:" + patient_id).hex()[:12].upper()

    # --- the profile ---------------------------------------------------------------------
    def dataset(self, ds: Dataset) -> Dataset:
        """De-identify ``ds`` (a file's dataset, with its file meta) in place; returns it."""
        if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
            raise Refused("BurnedInAnnotation is YES: identifiers in the pixels cannot be removed here")
        pseudonym = self.pseudonym(str(ds.get("PatientID", "")))
        self._walk(ds, pseudonym)
        meta = getattr(ds, "file_meta", None)
        if meta is not None and "MediaStorageSOPInstanceUID" in meta:
            meta.MediaStorageSOPInstanceUID = self.new_uid(meta.MediaStorageSOPInstanceUID)
            self.report.add("U", "MediaStorageSOPInstanceUID")
        if meta is not None:
            for keyword in ("SourceApplicationEntityTitle", "SendingApplicationEntityTitle",
                            "ReceivingApplicationEntityTitle"):
                if keyword in meta:
                    delattr(meta, keyword)
                    self.report.add("X", keyword)
        ds.PatientName, ds.PatientID = pseudonym, pseudonym
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = DEID_METHOD
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator = "113100", "DCM"
        code.CodeMeaning = "Basic Application Confidentiality Profile"
        ds.DeidentificationMethodCodeSequence = Sequence([code])
        ds.LongitudinalTemporalInformationModified = "REMOVED"
        self.report.add("S", "PatientIdentityRemoved, DeidentificationMethod(CodeSequence), "
                             "LongitudinalTemporalInformationModified")
        return ds

    def _walk(self, ds: Dataset, pseudonym: str) -> None:
        for elem in list(ds):
            tag = elem.tag
            name = elem.keyword or str(tag)
            if tag.is_private:
                del ds[tag]
                self.report.add("P", "private attributes")
                continue
            group = tag.group
            if 0x5000 <= group <= 0x50FF or (0x6000 <= group <= 0x60FF and tag.element in (0x3000, 0x4000)):
                del ds[tag]
                self.report.add("X", "curve/overlay data" if group < 0x6000 or tag.element == 0x3000
                                else "OverlayComments")
                continue
            action = _TAG_ACTIONS.get(tag)
            if action is None:
                action = self._generic_action(elem)
            if action == "X":
                del ds[tag]
            elif action == "Z":
                elem.value = None if elem.VR != "SQ" else Sequence([])
            elif action == "D":
                elem.value = pseudonym
            elif action == "U":
                if elem.value in (None, "", []):
                    continue
                elem.value = ([self.new_uid(v) for v in elem.value] if elem.VM > 1 else self.new_uid(elem.value))
            elif elem.VR == "SQ":
                for item in elem.value:
                    self._walk(item, pseudonym)
                continue
            else:
                continue
            self.report.add(action, name)

    @staticmethod
    def _generic_action(elem) -> Optional[str]:
        """Rules for attributes the table does not name (they may sit in any sequence)."""
        if elem.VR == "UI":
            values = elem.value if elem.VM > 1 else [elem.value]
            if elem.value is not None and any(str(v) and str(v) not in _REGISTERED_UIDS for v in values):
                return "U"
            return None
        if elem.VR in ("PN", "AS"):
            return "X" if elem.VR == "AS" else "Z"
        if elem.VR in ("DA", "DT", "TM"):
            return "Z" if elem.keyword in _TYPE2_TEMPORAL else "X"
        return None


# --- series in, series out ------------------------------------------------------------------
def read_series(folder: str) -> Dict[str, List[str]]:
    """DICOM image files under ``folder`` by SeriesInstanceUID (non-DICOM files are skipped)."""
    series: Dict[str, List[str]] = collections.defaultdict(list)
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            path = os.path.join(root, name)
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
            except (pydicom.errors.InvalidDicomError, OSError):
                continue
            if "SeriesInstanceUID" in ds:
                series[str(ds.SeriesInstanceUID)].append(path)
    return dict(series)


def deidentify_series(paths: List[str], out_dir: str, deid: Deidentifier) -> List[str]:
    """Write the de-identified files of one series into ``out_dir`` (names carry no identifiers)."""
    os.makedirs(out_dir, exist_ok=True)
    out = []
    for i, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        deid.dataset(ds)
        target = os.path.join(out_dir, f"{i:05d}.dcm")
        ds.save_as(target, write_like_original=False)
        out.append(target)
        deid.report.files += 1
    return out


def import_dicom(dicom_dir: str, studies: Optional[str] = None, orthanc: Optional[str] = None,
                 user: Optional[str] = None, password: Optional[str] = None, image_id: Optional[str] = None,
                 key: Optional[bytes] = None, echo: Callable[[str], None] = print) -> Report:
    """De-identify every series under ``dicom_dir``; write NIfTI into ``studies`` or DICOM to ``orthanc``."""
    if bool(studies) == bool(orthanc):
        raise ValueError("give exactly one of --studies DIR and --orthanc URL")
    series = read_series(dicom_dir)
    if not series:
        raise ValueError(f"no DICOM series found under {dicom_dir}")
    if image_id and len(series) > 1:
        raise ValueError(f"--id names one image, but {dicom_dir} holds {len(series)} series")
    deid = Deidentifier(key=key)
    for n, (original_uid, paths) in enumerate(sorted(series.items())):
        new_series_uid = deid.new_uid(original_uid)
        with tempfile.TemporaryDirectory(prefix="spine-import-") as tmp:
            out_paths = deidentify_series(paths, os.path.join(tmp, "series"), deid)
            if orthanc:
                from lib.pacs import upload_series

                url = orthanc.rstrip("/")
                url = url if url.endswith("/dicom-web") else url + "/dicom-web"
                upload_series(out_paths, url, user, password)
                deid.report.series[new_series_uid] = f"{url} series {new_series_uid} ({len(out_paths)} instances)"
            else:
                target = _write_nifti(os.path.join(tmp, "series"), studies,
                                      image_id or "anon-" + hashlib.sha256(new_series_uid.encode()).hexdigest()[:12])
                deid.report.series[new_series_uid] = target
    for line in deid.report.lines():
        echo(line)
    return deid.report


def _write_nifti(series_dir: str, studies: str, image_id: str) -> str:
    import nibabel as nib
    import numpy as np

    from lib.pipeline.io import atomic_output, read_volume
    from lib.server.datastore import check_name

    check_name(image_id, "image id")
    os.makedirs(studies, exist_ok=True)
    target = os.path.join(studies, f"{image_id}.nii.gz")
    if os.path.exists(target):
        raise ValueError(f"{target} exists already: choose another --id")
    array, affine = read_volume(series_dir)
    image = nib.Nifti1Image(np.asarray(array), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    with atomic_output(target) as tmp:
        nib.save(image, tmp)
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib.importer", description=__doc__.split("\n\n")[0])
    parser.add_argument("dicom_dir")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--studies", help="local studies folder: the series is written there as NIfTI")
    where.add_argument("--orthanc", help="Orthanc URL (or its /dicom-web): the series is stored there as DICOM")
    parser.add_argument("--id", help="image id in the studies folder (default: anon-<hash of the new series UID>)")
    parser.add_argument("--user", default=os.environ.get("ORTHANC_USER"))
    parser.add_argument("--password", default=os.environ.get("ORTHANC_PASSWORD"))
    parser.add_argument("--key-env", default="SPINE_DEID_KEY",
                        help="environment variable holding a secret that makes pseudonyms and UIDs repeatable "
                             "across imports (default SPINE_DEID_KEY; unset: random per import)")
    args = parser.parse_args(argv)
    from lib.pipeline.errors import SpineError

    key = os.environ.get(args.key_env)
    try:
        import_dicom(args.dicom_dir, studies=args.studies, orthanc=args.orthanc, user=args.user,
                     password=args.password, image_id=args.id, key=key.encode() if key else None)
    except (ValueError, Refused, SpineError) as e:
        print(f"error: {getattr(e, 'detail', None) or e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
