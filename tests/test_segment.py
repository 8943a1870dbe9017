"""``SpineSegmenter`` and ``python -m lib.segment`` on real scans in every input format.

The weights are a freshly initialised tiny network: these tests check the pipeline
(readers, geometry, outputs, errors), not accuracy.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, reliable_spider_ids, small_scan
from lib.pipeline.dicom import write_dicom_series
from lib.pipeline.errors import InvalidInput, ModelNotTrained
from lib.pipeline.io import read_volume
from lib.pipeline.networks import build_network
from lib.pipeline.plans import SpinePlan
from lib.segment import SpineSegmenter

TINY = {"preset": "tiny"}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "spine.pt"
    torch.save(build_network(SpinePlan.from_conf(TINY)).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """The same real scan as NIfTI (PIR), MHA and a DICOM series folder."""
    import itk

    root = tmp_path_factory.mktemp("scans")
    nifti, label = small_scan(reliable_spider_ids()[3], root / "nifti", axcodes="PIR")
    label.unlink()  # the folder holds scans only
    mha = root / "mha" / "scan.mha"
    mha.parent.mkdir()
    itk.imwrite(itk.imread(str(nifti)), str(mha))
    array, affine = read_volume(nifti)
    dicom = root / "dicom_series"
    write_dicom_series(array, affine, str(dicom))
    return {"nifti": nifti, "mha": mha, "dicom": dicom}


@pytest.mark.parametrize("kind", ["nifti", "mha", "dicom"])
def test_python_api_keeps_the_scan_grid(weights, scans, kind, tmp_path):
    segmenter = SpineSegmenter(weights, TINY)
    result = segmenter.segment(scans[kind], tmp_path / "seg.nii.gz")
    array, affine = read_volume(scans[kind])
    assert result.label.shape == array.shape
    assert np.allclose(result.affine, affine, atol=1e-3)
    assert result.label.dtype == np.uint8 and result.label.max() <= 11
    assert (tmp_path / "seg.nii.gz").exists()
    assert set(result.report["volumes_ml"]) >= {"L1", "L5-S1", "spinal canal"}


def test_missing_weights_and_bad_input_are_clear_errors(weights, tmp_path):
    with pytest.raises(ModelNotTrained):
        SpineSegmenter(tmp_path / "none.pt", TINY).segment(tmp_path / "x.nii.gz")
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"\x1f\x8b" + b"garbage" * 50)
    with pytest.raises(InvalidInput, match="bad.nii.gz"):
        SpineSegmenter(weights, TINY).segment(bad)


def test_command_line_on_files_and_folders(weights, scans, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lib.segment", str(scans["mha"]), str(scans["dicom"]), str(scans["nifti"].parent),
           "--output", str(out), "--model", str(weights), "--conf", "preset", "tiny"]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    produced = sorted(p.name for p in out.iterdir())
    nifti_stem = scans["nifti"].name[: -len(".nii.gz")]
    assert produced == sorted(
        [f"{stem}_seg.{ext}" for stem in ("scan", "dicom_series", nifti_stem) for ext in ("nii.gz", "json")]
    )
    report = json.loads((out / "scan_seg.json").read_text())
    assert "levels" in report and "model_version" in report
    assert "segmenting" in run.stderr  # progress bar for several scans


def test_command_line_reports_failures(weights, tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not an image")
    run = subprocess.run(
        [sys.executable, "-m", "lib.segment", str(bad), "--output", str(tmp_path / "o"), "--model", str(weights),
         "--conf", "preset", "tiny"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 1
    assert "broken.nii.gz" in run.stderr and "cannot read" in run.stderr


def segment_cli(*args: str, weights) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lib.segment", *map(str, args), "--model", str(weights),
                           "--conf", "preset", "tiny"], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_a_batch_from_a_list_resumes_where_it_stopped(weights, scans, tmp_path):
    """``@LIST`` inputs; a second run skips what this model already segmented; a scan whose
    report is missing (an interrupted run) is done again; ``--redo`` does them all."""
    listing = tmp_path / "scans.txt"
    listing.write_text(f"{scans['mha']}\n{scans['dicom']}\n")
    out = tmp_path / "out"
    first = segment_cli(f"@{listing}", "--output", out, weights=weights)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "2 scans in" in first.stderr and "scans/hour" in first.stderr
    reports = {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")}
    assert sorted(reports) == ["dicom_series_seg.json", "scan_seg.json"]
    again = segment_cli(f"@{listing}", "--output", out, weights=weights)
    assert again.returncode == 0 and "2 of 2 scans already segmented" in again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")} == reports
    (out / "scan_seg.json").unlink()  # as if the run had stopped before this report
    resumed = segment_cli(f"@{listing}", "--output", out, weights=weights)
    assert "1 of 2 scans already segmented" in resumed.stderr and (out / "scan_seg.json").exists()
    assert (out / "dicom_series_seg.json").stat().st_mtime_ns == reports["dicom_series_seg.json"]
    redo = segment_cli(f"@{listing}", "--output", out, "--redo", weights=weights)
    assert "already segmented" not in redo.stderr and "2 scans in" in redo.stderr


def test_two_worker_processes_give_the_same_labels(weights, scans, tmp_path):
    inputs = [scans["mha"], scans["dicom"], scans["nifti"]]
    one = segment_cli(*inputs, "--output", tmp_path / "one", weights=weights)
    two = segment_cli(*inputs, "--output", tmp_path / "two", "--workers", "2", "--threads", "2", weights=weights)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    assert "with 2 process(es)" in two.stderr
    for path in sorted((tmp_path / "one").glob("*.nii.gz")):
        assert np.array_equal(read_volume(path)[0], read_volume(tmp_path / "two" / path.name)[0]), path.name


def test_monai_label_batch_infer_pre_segments_the_unlabeled_images(weights, scans, tmp_path):
    """``POST /batch/infer/spine``: every unlabeled image gets an ``original`` label (the
    pre-segmentation annotators correct); nothing becomes ``final``."""
    import shutil

    import requests

    from conftest import Server

    studies, model_dir = tmp_path / "studies", tmp_path / "model"
    studies.mkdir()
    model_dir.mkdir()
    shutil.copy(scans["nifti"], studies / "scan_a.nii.gz")
    shutil.copy(scans["mha"], studies / "scan_b.mha")
    shutil.copy(weights, model_dir / "spine.pt")
    server = Server(studies, model_dir, workdir=tmp_path, conf={"auto_train": "false"})
    try:
        r = requests.post(f"{server.url}/batch/infer/spine", params={"images": "unlabeled", "run_sync": "true"},
                          timeout=600)
        assert r.status_code == 200, r.text
        listing = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=60).json()
        labels = {image: sorted(info.get("labels", {})) for image, info in listing["objects"].items()}
        assert labels == {"scan_a": ["original"], "scan_b": ["original"]}, (labels, server.log_text()[-3000:])
        for image, source in (("scan_a", scans["nifti"]), ("scan_b", scans["mha"])):
            saved = next((studies / "labels" / "original").glob(f"{image}.*"))
            assert read_volume(saved)[0].shape == read_volume(source)[0].shape
    finally:
        server.stop()
