"""The app's DICOMweb datastore (``--studies http(s)://.../dicom-web``): MONAI Label's, made to fit.

- the studies listed are MR series unless ``--conf dicomweb_search_filter JSON`` or
  ``MONAI_LABEL_DICOMWEB_SEARCH_FILTER`` says otherwise (MONAI Label's default is CT);
- credentials come from ``MONAI_LABEL_DICOMWEB_USERNAME``/``PASSWORD`` (or the newer
  ``MONAI_LABEL_DATASTORE_USERNAME``/``PASSWORD``);
- a pre-segmentation stored by ``python -m lib.segment URL`` is an ``original`` SEG
  (:data:`ORIGINAL_SEG_DESCRIPTION`): its series stays unlabelled for the server;
- dcmqi is neither needed nor downloaded: a ``final`` label is written as DICOM SEG by
  :func:`lib.pipeline.dicom.write_dicom_seg` (pydicom-seg), one segment per structure with our
  names and colours, referencing the source series, and stored in the PACS (STOW-RS);
- every label is first checked and remapped like a label saved to the local studies
  folder (:func:`lib.pipeline.io.conform_label`): on the image's grid, names mapped to our table.

Listing (``list_images``) and labelled series (``get_labeled_images``) are cached by MONAI
Label for ``MONAI_LABEL_DICOMWEB_CACHE_EXPIRY`` seconds (default 7200): series added to the
PACS, and SEGs stored, show in ``/datastore`` after that time or a server restart.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Any, Dict, Optional

import requests
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag

from lib.pipeline.dicom import write_dicom_seg
from lib.pipeline.errors import InvalidInput
from lib.pipeline.io import check_upload, conform_label
from lib.server.datastore import TAG_PATTERN, check_name

logger = logging.getLogger(__name__)

#: SeriesDescription of the SEGs the app stores: a ``final`` label (an annotator's), and an
#: ``original`` one (a pre-segmentation by ``python -m lib.segment URL``, for annotators to
#: correct): only final SEGs make a series count as labelled
FINAL_SEG_DESCRIPTION = "Spine segmentation"
ORIGINAL_SEG_DESCRIPTION = "Spine pre-segmentation (original)"

#: what the app lists from a PACS unless MONAI_LABEL_DICOMWEB_SEARCH_FILTER is set
DEFAULT_SEARCH_FILTER = {"Modality": "MR"}
MONAI_LABEL_DEFAULT_FILTER = {"Modality": "CT"}


def _settings_value(*names: str) -> str:
    for name in names:
        value = getattr(settings, name, "") or ""
        if value:
            return value
    return ""


def search_filter(conf: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Which series the app lists: ``--conf dicomweb_search_filter JSON``, else
    ``MONAI_LABEL_DICOMWEB_SEARCH_FILTER`` when it differs from MONAI Label's default
    (``{"Modality": "CT"}``), else MR series.

    MONAI Label's ``start_server`` copies every setting into the environment, so a value
    equal to its default cannot be told from no value: to list CT series only, use the
    ``--conf`` key.
    """
    text = (conf or {}).get("dicomweb_search_filter")
    if text:
        try:
            value = json.loads(text) if isinstance(text, str) else dict(text)
        except ValueError as e:
            raise ValueError(f"dicomweb_search_filter must be a JSON object ({e})") from None
        if not isinstance(value, dict):
            raise ValueError("dicomweb_search_filter must be a JSON object such as {\"Modality\": \"MR\"}")
        return value
    configured = dict(settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER or {})
    if configured and configured != MONAI_LABEL_DEFAULT_FILTER:
        return configured
    return dict(DEFAULT_SEARCH_FILTER)


def init_dicomweb_datastore(studies: str, conf: Optional[Dict[str, Any]] = None):
    """MONAI Label's ``_init_dicomweb_datastore`` without the dcmqi download, MR by default,
    saving labels as :class:`SpineDICOMwebDatastore` does."""
    url = studies.rstrip("/").strip()
    user = _settings_value("MONAI_LABEL_DATASTORE_USERNAME", "MONAI_LABEL_DICOMWEB_USERNAME")
    password = _settings_value("MONAI_LABEL_DATASTORE_PASSWORD", "MONAI_LABEL_DICOMWEB_PASSWORD")
    session = None
    if "googleapis.com" in url:
        from dicomweb_client.ext.gcp.session_utils import create_session_from_gcp_credentials

        session = create_session_from_gcp_credentials()
    elif user:
        session = requests.Session()
        session.auth = (user, password)
    client = SpineDICOMwebClient(url=url, session=session, qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
                             wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
                             stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX)
    cache_path = (_settings_value("MONAI_LABEL_DATASTORE_CACHE_PATH", "MONAI_LABEL_DICOMWEB_CACHE_PATH") or "").strip()
    store = SpineDICOMwebDatastore(
        client=client,
        search_filter=search_filter(conf),
        cache_path=cache_path or None,
        fetch_by_frame=settings.MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME,
        convert_to_nifti=settings.MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI,
    )
    logger.info(f"DICOMweb datastore {url}: search filter {store._search_filter}, "
                f"{'with' if user else 'without'} credentials")
    return store


class SpineDICOMwebClient(DICOMwebClientX):
    """MONAI Label's client, but its query for labels (``{"Modality": "SEG"}``, made by the
    datastore's labelled/unlabelled lists and training datalist) sees the final SEGs only:
    a pre-segmentation stored as ``original`` leaves its series unlabelled."""

    def search_for_series(self, *args, **kwargs):
        if kwargs.get("search_filters") != {"Modality": "SEG"}:
            return super().search_for_series(*args, **kwargs)
        kwargs["fields"] = list(kwargs.get("fields") or []) + ["SeriesDescription"]
        return [ds for ds in super().search_for_series(*args, **kwargs) if not is_original_seg(ds)]


def is_original_seg(series_json: Dict[str, Any]) -> bool:
    """Whether a QIDO series answer (DICOM JSON) is a pre-segmentation SEG of this app."""
    values = (series_json.get("0008103E") or {}).get("Value") or [""]
    return str(values[0]) == ORIGINAL_SEG_DESCRIPTION


def segmented_series(client) -> Dict[str, str]:
    """{image series UID: ``final`` or ``original``} of the series a SEG of this PACS refers
    to (final wins), read from each SEG's metadata."""
    import pydicom

    tags: Dict[str, str] = {}
    for series in DICOMwebClientX.search_for_series(client, search_filters={"Modality": "SEG"},
                                                     fields=["SeriesDescription"]):
        seg = pydicom.Dataset.from_json(series)
        meta = pydicom.Dataset.from_json(client.retrieve_series_metadata(str(seg.StudyInstanceUID),
                                                                         str(seg.SeriesInstanceUID))[0])
        for ref in meta.get("ReferencedSeriesSequence") or []:
            tag = "original" if is_original_seg(series) else "final"
            if tags.get(str(ref.SeriesInstanceUID)) != "final":
                tags[str(ref.SeriesInstanceUID)] = tag
    return tags


def store_original_seg(store: "SpineDICOMwebDatastore", image_id: str, label_path: str):
    """Store ``label_path`` (our values, on the grid of series ``image_id``) in the PACS as an
    ``original`` SEG referencing that series; returns the SEG dataset."""
    series_dir = os.path.realpath(os.path.join(store._datastore.image_path(), image_id))
    with tempfile.TemporaryDirectory(prefix="spine-seg-") as tmp:
        seg = write_dicom_seg(label_path, series_dir, os.path.join(tmp, "seg.dcm"),
                              series_description=ORIGINAL_SEG_DESCRIPTION)
    store._client.store_instances([seg])
    return seg


class SpineDICOMwebDatastore(DICOMWebDatastore):
    """Labels checked and remapped like local ones; ``final`` ones stored as DICOM SEG without dcmqi."""

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any],
                   label_id: str = "") -> str:
        tag = label_tag or DefaultLabelTag.FINAL.value
        check_name(tag, "label tag", TAG_PATTERN)
        check_name(image_id, "image id")
        check_upload(label_filename, "label")
        label_info = dict(label_info or {})
        image_uri = self.get_image_uri(image_id)  # downloads the series when not cached yet
        with tempfile.TemporaryDirectory(prefix="spine-label-") as tmp:
            conformed = os.path.join(tmp, "label.nii.gz")
            summary = conform_label(label_filename, image_uri, label_info.get("label_info"), conformed)
            label_info.update(summary)
            if tag == DefaultLabelTag.FINAL.value:
                if not summary["structures"]:
                    raise InvalidInput("the label is empty: a final label must contain at least one structure")
                series_dir = os.path.realpath(os.path.join(self._datastore.image_path(), image_id))
                seg_path = os.path.join(tmp, "seg.dcm")
                seg = write_dicom_seg(conformed, series_dir, seg_path, series_description=FINAL_SEG_DESCRIPTION)
                self._client.store_instances([seg])
                image_info = self.get_image_info(image_id)
                label_info.update({
                    "SeriesInstanceUID": str(seg.SeriesInstanceUID),
                    "Modality": image_info.get("Modality"),
                    "PatientID": image_info.get("PatientID"),
                    "StudyInstanceUID": image_info.get("StudyInstanceUID"),
                })
                logger.info(f"Stored DICOM SEG {seg.SeriesInstanceUID} for series {image_id}: {summary['structures']}")
            return LocalDatastore.save_label(self, image_id, conformed, tag, label_info)
