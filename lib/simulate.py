"""Proof that the annotation loop works: replay an annotator against the real server.

    python -m lib.simulate [--pool DIR] [--test DIR] --strategies epistemic random --seeds 0 1
                           --out work/simulation [--conf KEY VALUE ...] [--max-labels N]
                           [--pool-size P] [--test-size K] [--real-size | --site PREFIX]

For each strategy and seed: a fresh studies folder and ``model_dir`` under
``OUT/runs/<strategy>-seed<seed>/``, the pool's *images* copied into the studies folder
(never their labels, never a test image), and a real ``monailabel start_server`` for
``apps/spine`` on a free loopback port (``--conf preset tiny`` plus the simulation's
settings, see :data:`DEFAULT_CONF`). Then the annotator loop:

1. ask the strategy for the next image (``POST /activelearning/<strategy>``);
2. save that image's ground-truth mask as its ``final`` label (``PUT /datastore/label``):
   the annotator's perfect correction;
3. let the automatic retraining (``lib/lifecycle/autotrain.py``) do what it decides: when the save
   started a run, wait for it to end, then for the epistemic scoring of the new model;
4. after every training, evaluate the *serving* weights (the version folder's copy of
   ``model_dir/spine.pt``, through :class:`lib.segment.SpineSegmenter` and
   :func:`lib.evaluate.evaluate_case`) on a fixed held-out test set and write one CSV row:
   strategy, seed, number of labels, serving version (and the run's candidate, promoted or
   not, with its own overall Dice), mean Dice of the vertebrae, discs, canal and of all 11 structures.

Once every pool image is labelled, a last training on all of them is requested (if the
automatic one did not already cover them): that row is the run's *all-labels* point, the
model that serves at the end (the promotion gate may have kept an older one: the row's
``candidate_dice_overall`` then gives the Dice of the candidate trained on every label).
Their mean over runs is the reference of "labels needed to reach 90 % of the all-labels
Dice". Without any all-labels point (``--max-labels`` below the pool size), one extra
run labels the whole pool at once and trains once (``strategy`` ``all`` in the CSV).

Seeding. MONAI Label 0.8.5's ``random`` strategy draws with Python's global ``random``
(weighted by time since last pick) and cannot be seeded over HTTP, and the ``epistemic``
strategies (``epistemic``, ``epistemic_diverse``) pick at random too while no model exists.
So the simulation picks those client-side: ``random.Random(seed)`` chooses among the
unlabeled ids (sorted), for the ``random`` strategy always and for the others until the
server ranks by scores (its answer then has no ``fallback``). With the same seed, the
strategies therefore start from
the same first images, which makes the comparison paired. The seed is also the runs'
``train_seed`` (unless ``--conf train_seed`` is given), so that seeds show training noise too. The server is still asked
(``POST /activelearning/random``) so that the request path is exercised.

Outputs in ``OUT``: ``simulation.csv`` (one row per evaluation, written as it goes),
``learning_curve.png`` (overall mean Dice vs labels, one line per strategy, mean over
seeds with a min/max band, dashed 90 % line), ``summary.json`` (all-labels Dice, labels to
90 % per strategy and per seed), and per run ``run.json`` (pick order) and ``server.log``.

Data. ``--pool DIR`` / ``--test DIR`` are folders with ``images/<id>.nii.gz`` and
``labels/<id>.nii.gz`` (our label values; 255 = ignore, allowed in test labels only). By
default both are made from the reliable SPIDER cases in ``../shared/data`` by
:func:`prepare_data`: every 3rd sagittal slice and every 3rd in-plane voxel, so that the
``tiny`` preset (4 mm grid) trains an epoch in seconds; a fixed, seed-independent
shuffle puts ``--test-size`` cases in the test set and the next ``--pool-size`` in the pool.
``--phantoms N`` adds N synthetic phantoms (:mod:`lib.phantom`) to the pool.

``--real-size``: the shipped model's own setting instead. Full-resolution reliable SPIDER
scans; the test set is the starter recipe's validation split (:func:`lib.train_recipe.choose_cases`,
the model card's dev validation scans), the pool its training scans; the server runs the
``default`` plan with :data:`REAL_SIZE_CONF`, so an empty ``model_dir`` starts from the shipped
starter model (``--conf starter_model false``: from scratch), and a row at 0 labels evaluates
the model that serves before any label.

``--site PREFIX``: a site whose scans the starter never saw, with ``--real-size``'s settings.
Pool and test set are that site's cases of ``--data`` (:func:`prepare_site_data`: a fixed
shuffle, ``--test-size`` for the test set, the rest, or ``--pool-size`` of it, the pool), at
full resolution with the data's manifest entries. Where a reference draws only some
structures (the ``fcs_VB*`` sets: vertebral bodies), the annotator corrects the server's own
pre-segmentation instead of saving the reference (:class:`Annotator`), and where every test
reference draws bodies only the curve is the vertebral body sensitivity at the right level
(:data:`METRICS`; the CSV also has the levels right and the predicted vertebra volume).
Its point: in ``--real-size`` the pool is the starter's own training data, so the starter's
uncertainty has little to find there; a site's unseen scans are where active learning is
meant to pay.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import requests
from scipy import ndimage as ndi

from lib.pipeline.labels import DISCS, IGNORE_VALUE, VERTEBRAE

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
DEFAULT_OUT = REPO / "work" / "simulation"
STRATEGIES = ("epistemic", "epistemic_diverse", "random", "first")
#: the strategies that rank by the serving model's scores: each evaluation waits for them
SCORED_STRATEGIES = ("epistemic", "epistemic_diverse")

#: server settings of every run (``--conf`` adds or overrides); ``preset tiny`` always
DEFAULT_CONF: Dict[str, str] = {
    "max_epochs": "6",  # tiny's 1 epoch learns next to nothing; each run fine-tunes the serving model
    "warmup_epochs": "1",
    "learning_rate": "0.0005",  # 2.5x the recipe's: few epochs per run on a CPU
    "auto_train_min_labels": "3",
    "auto_train_new_labels": "3",
}
#: --real-size: the default plan, each automatic training a short fine-tuning of the serving model
#: (2 crops of 4 slices a step, 20 epochs: 20-60 steps up to 6 labels, about 1.5 s a step on 2 cores)
REAL_SIZE_CONF: Dict[str, str] = {
    "preset": "default",
    "max_epochs": "20",
    "warmup_epochs": "1",
    "val_interval": "5",
    "learning_rate": "0.0001",  # the starter ended its cosine schedule near 0: fine-tune gently
    "num_samples": "1",
    "train_slices": "4",
    "auto_train_min_labels": "2",
    "auto_train_new_labels": "2",
}
GROUPS = ("vertebrae", "discs", "canal")
CSV_COLUMNS = ("strategy", "seed", "n_labels", "train_images", "val_images", "model_version", "candidate_version",
               "promoted", "version_changed", "all_labels", "dice_vertebrae", "dice_discs", "dice_canal",
               "dice_overall", "candidate_dice_overall", "body_sensitivity", "candidate_body_sensitivity",
               "levels_correct", "levels_scored", "vertebra_ml", "test_cases", "train_seconds", "eval_seconds",
               "elapsed_seconds")
#: the curve's figure (``--site`` of a set with body-only references: ``body_sensitivity``), its CSV column;
#: ``candidate_`` + it is the same figure of each training's candidate
METRICS = {"dice_overall": "mean Dice on the test set (annotated structures)",
           "body_sensitivity": "vertebral body sensitivity, right level (test set)"}
ACTIVE = ("SUBMITTED", "RUNNING")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- data ------------------------------------------------------------------------------


def small_scan(data: Path, case_id: str, out_images: Path, out_labels: Path, keep_ignore: bool,
               lr_step: int = 3, inplane_step: int = 3, axcodes: str = "LPS") -> Tuple[Path, Path]:
    """A real SPIDER scan made small (every ``lr_step``-th sagittal slice, every
    ``inplane_step``-th in-plane voxel) in ``axcodes`` orientation, and its mask on the same grid.

    ``keep_ignore``: keep 255 (not annotated) in the mask, for evaluation; else 255 -> 0, since
    the server accepts label values 0..11 only (as ``tests/conftest.py``'s ``small_scan``).
    """
    import nibabel as nib

    img = nib.load(data / "images" / f"{case_id}.nii.gz")
    lab = nib.load(data / "labels" / f"{case_id}.nii.gz")
    slicer = (slice(None, None, lr_step), slice(None, None, inplane_step), slice(None, None, inplane_step))
    img_small, lab_small = img.slicer[slicer], lab.slicer[slicer]
    transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(img_small.affine),
                                                nib.orientations.axcodes2ornt(tuple(axcodes)))

    def reorient(im, dtype):
        arr = nib.orientations.apply_orientation(np.asanyarray(im.dataobj), transform).astype(dtype)
        out = nib.Nifti1Image(arr, im.affine @ nib.orientations.inv_ornt_aff(transform, im.shape))
        out.set_qform(out.affine, code=1)
        out.set_sform(out.affine, code=1)
        return out

    label_arr = np.asanyarray(lab_small.dataobj).copy()
    if not keep_ignore:
        label_arr[label_arr == 255] = 0
    out_images.mkdir(parents=True, exist_ok=True)
    out_labels.mkdir(parents=True, exist_ok=True)
    image_path, label_path = out_images / f"{case_id}.nii.gz", out_labels / f"{case_id}.nii.gz"
    nib.save(reorient(img_small, np.int16), image_path)
    nib.save(reorient(nib.Nifti1Image(label_arr, lab_small.affine), np.uint8), label_path)
    return image_path, label_path


def prepare_data(out: Path, pool_size: Optional[int], test_size: int, data: Path = DEFAULT_DATA, phantoms: int = 0,
                 real_size: bool = False) -> Tuple[Path, Path]:
    """``out/pool`` and ``out/test`` (``images/``, ``labels/``) from the reliable SPIDER cases.

    Small scans (every 3rd slice and in-plane voxel): the split is a fixed shuffle (seed 2024)
    of the sorted ids, the first ``test_size`` are the test set, the next ``pool_size`` (default
    12) the pool. ``real_size``: full-resolution scans, the starter recipe's validation split as
    the test set and the first ``pool_size`` (default all) of its training scans as the pool.
    Files already there are kept (same inputs, same bytes). Returns ``(pool_dir, test_dir)``.
    """
    if not (data / "manifest.json").exists():
        raise SystemExit(f"no development data at {data} (manifest.json): pass --pool and --test")
    if real_size:
        from lib.train_recipe import VAL_COUNT, choose_cases

        train_ids, test_ids = choose_cases(data, VAL_COUNT)
        pool_ids = train_ids[:pool_size]
        step = 1
    else:
        from lib.evaluate import reliable_ids

        ids = reliable_ids(data)
        random.Random(2024).shuffle(ids)
        pool_size = 12 if pool_size is None else pool_size
        if test_size + pool_size > len(ids):
            raise SystemExit(f"{len(ids)} reliable SPIDER cases: cannot take {test_size} test + {pool_size} pool")
        test_ids, pool_ids = ids[:test_size], ids[test_size:test_size + pool_size]
        step = 3
    pool, test = out / "pool", out / "test"
    for folder, chosen, keep_ignore in ((test, test_ids, True), (pool, pool_ids, False)):
        for stale in sorted((folder / "images").glob("*.nii.gz")) if (folder / "images").exists() else []:
            if stale.name[:-7] not in chosen:  # another --pool-size / --test-size before
                stale.unlink()
                (folder / "labels" / stale.name).unlink(missing_ok=True)
        for case_id in chosen:
            if not (folder / "labels" / f"{case_id}.nii.gz").exists():
                small_scan(data, case_id, folder / "images", folder / "labels", keep_ignore, step, step)
    for i in range(phantoms):
        name = f"phantom_{i:03d}"
        if not (pool / "labels" / f"{name}.nii.gz").exists():
            from lib.phantom import save_phantom

            save_phantom(str(pool / "images" / f"{name}.nii.gz"), str(pool / "labels" / f"{name}.nii.gz"),
                         seed=1000 + i)
    return pool, test


def prepare_site_data(out: Path, data: Path, site: str, test_size: int,
                      pool_size: Optional[int] = None) -> Tuple[Path, Path]:
    """``out/pool`` and ``out/test`` from one site's cases of ``data`` (ids starting with ``site``):
    a fixed, seed-independent shuffle (seed 2024) of the sorted ids puts ``test_size`` of them in
    the test set and the next ``pool_size`` (default: the rest) in the pool. Files are copied as
    they are (full resolution, 255 kept: the simulated annotator and the evaluation both read
    it), and each folder gets the site's ``manifest.json`` entries, which say what a reference
    draws (``annotated_labels``, ``vertebra_extent``). Returns ``(pool_dir, test_dir)``."""
    from lib.evaluate import load_manifest

    manifest = load_manifest(data / "manifest.json") if (data / "manifest.json").exists() else {}
    ids = sorted(i for i in manifest if i.startswith(site) and (data / "images" / f"{i}.nii.gz").exists()
                 and (data / "labels" / f"{i}.nii.gz").exists())
    if len(ids) <= test_size:
        raise SystemExit(f"--site {site}: {len(ids)} case(s) with image and label in {data}: "
                         f"need more than --test-size {test_size}")
    random.Random(2024).shuffle(ids)
    test_ids = ids[:test_size]
    pool_ids = ids[test_size:] if pool_size is None else ids[test_size:test_size + pool_size]
    pool, test = out / "pool", out / "test"
    for folder, chosen in ((test, test_ids), (pool, pool_ids)):
        if folder.exists():
            shutil.rmtree(folder)
        for kind in ("images", "labels"):
            (folder / kind).mkdir(parents=True)
            for case_id in chosen:
                shutil.copyfile(data / kind / f"{case_id}.nii.gz", folder / kind / f"{case_id}.nii.gz")
        (folder / "manifest.json").write_text(json.dumps({"cases": [manifest[i] for i in chosen]}, indent=1))
    return pool, test


def list_cases(folder: Path) -> List[str]:
    """Ids with both ``images/<id>.nii.gz`` and ``labels/<id>.nii.gz``."""
    return sorted(p.name[:-7] for p in (folder / "images").glob("*.nii.gz")
                  if (folder / "labels" / p.name).exists())


def case_infos(folder: Path) -> Dict[str, Any]:
    """``{id: lib.evaluate.CaseInfo}`` of a pool or test folder: what each reference draws, from
    the folder's ``manifest.json`` (:func:`prepare_site_data`); every structure where it has none."""
    from lib.evaluate import CaseInfo, case_info_from_entry, find_manifest, load_manifest

    entries = load_manifest(find_manifest(folder / "labels"))
    return {case: case_info_from_entry(entries[case]) if case in entries else CaseInfo() for case in list_cases(folder)}


# --- the annotator -----------------------------------------------------------------------


def simulated_correction(prediction: np.ndarray, reference: np.ndarray, affine: np.ndarray,
                         annotated: Sequence[int]) -> np.ndarray:
    """The label an annotator saves after correcting ``prediction`` where ``reference`` draws.

    ``prediction`` and ``reference`` (X, Y, Z) label maps on one grid (``affine``: voxel ->
    RAS mm); ``reference`` draws the vertebra values in ``annotated`` (whole vertebrae, or
    only their bodies as the ``fcs_VB*`` sets do) and 255 where a structure is outside the
    label table (T12 and above). Returns uint8.

    - each predicted vertebra (connected piece) that overlaps drawn bone takes the level of
      the reference vertebra it overlaps most (the annotator renames a wrong level,
      posterior elements included), or becomes background when that is T12 or above;
    - a predicted vertebra that overlaps none (a posterior piece, the sacrum) takes the
      level of the nearest drawn vertebra in height when it lies between the highest and
      the lowest of them, and becomes background above or below them;
    - the reference's drawn voxels take the reference's value (missed parts added), also where
      the model painted a disc over them;
    - each predicted disc takes its level from the drawn vertebrae it touches
      (``L(k)-L(k+1)`` touches L(k) and L(k+1)), else from its height between them; a disc
      above L1 becomes background;
    - everything else (canal, structures the reference does not draw) stays as predicted.
    """
    corrected = prediction.astype(np.uint8).copy()
    drawn = [v for v in VERTEBRAE if v in set(annotated) and np.any(reference == v)]
    if not drawn:
        return corrected
    structure = np.ones((3, 3, 3), dtype=bool)

    def heights(mask: np.ndarray, offset=(0, 0, 0)) -> np.ndarray:  # RAS z (mm, superior +) of a mask's voxels
        ijk = np.argwhere(mask) + np.asarray(offset)
        return ijk @ affine[2, :3] + affine[2, 3]

    span = {v: heights(reference == v) for v in drawn}
    centre = {v: float(z.mean()) for v, z in span.items()}
    top, bottom = max(z.max() for z in span.values()), min(z.min() for z in span.values())

    def nearest(z: float) -> int:
        return min(drawn, key=lambda v: abs(centre[v] - z))

    for v in VERTEBRAE:
        pieces, _ = ndi.label(prediction == v, structure=structure)
        for piece, box in enumerate(ndi.find_objects(pieces), start=1):
            inside = pieces[box] == piece
            under = reference[box][inside]
            candidates = [u for u in drawn + [IGNORE_VALUE] if np.any(under == u)]
            if candidates:
                best = max(candidates, key=lambda u: int(np.sum(under == u)))
                corrected[box][inside] = 0 if best == IGNORE_VALUE else best
                continue
            z = float(heights(inside, [b.start for b in box]).mean())
            corrected[box][inside] = nearest(z) if bottom <= z <= top else 0
    for v in drawn:
        corrected[reference == v] = v
    corrected[(reference == IGNORE_VALUE) & np.isin(corrected, VERTEBRAE)] = 0

    pieces, _ = ndi.label(np.isin(prediction, DISCS), structure=structure)
    for piece, box in enumerate(ndi.find_objects(pieces), start=1):
        box = tuple(slice(max(b.start - 2, 0), b.stop + 2) for b in box)
        disc = pieces[box] == piece
        ring = ndi.binary_dilation(disc, structure=structure, iterations=2) & ~disc
        touched = sorted(set(np.unique(reference[box][ring]).tolist()) & set(drawn))
        z = float(heights(disc, [b.start for b in box]).mean())
        if len(touched) >= 2:
            upper = touched[0]
        elif touched:  # one neighbour drawn: the disc lies above or below it
            upper = touched[0] - 1 if z > centre[touched[0]] else touched[0]
        else:  # touching no drawn bone: from its height among the vertebrae
            above = [v for v in drawn if centre[v] > z]
            upper = max(above) if above else VERTEBRAE[0] - 1
        disc &= ~np.isin(reference[box], drawn)  # drawn bone stays bone: the annotator drew it
        corrected[box][disc] = 0 if upper < VERTEBRAE[0] else DISCS[0] + upper - VERTEBRAE[0]
    return corrected


class Annotator:
    """What the simulated annotator saves as a pool image's ``final`` label.

    Where the pool's reference draws every structure: the reference itself (a perfect
    correction). Where it draws only some (a site's partially annotated set, its
    ``manifest.json``): the server's own pre-segmentation of the image (``POST /infer/spine``,
    the model serving then) corrected where the reference draws (:func:`simulated_correction`),
    as an annotator who corrects what the model shows would save it; nothing the reference
    does not draw is taught as background.
    """

    def __init__(self, pool: Path, work: Path):
        from lib.evaluate import STRUCTURE_VALUES

        self.pool, self.work = pool, work
        self.partial = {case: sorted(info.annotated) for case, info in case_infos(pool).items()
                        if set(info.annotated) != set(STRUCTURE_VALUES)}

    def label(self, client: "Client", case: str) -> Path:
        from lib.pipeline.io import read_volume, write_label

        reference_path = self.pool / "labels" / f"{case}.nii.gz"
        if case not in self.partial:
            return reference_path
        self.work.mkdir(parents=True, exist_ok=True)
        shown = self.work / f"{case}_preseg.nii.gz"
        try:
            client.infer(case, shown)
        except RuntimeError as e:
            raise RuntimeError(f"{case}: its reference draws only {self.partial[case]}, so the annotator corrects "
                               f"the serving model's pre-segmentation, and none came: {e}") from None
        prediction, _ = read_volume(shown)
        reference, affine = read_volume(reference_path)
        if prediction.shape != reference.shape:
            raise RuntimeError(f"{case}: the server's result {prediction.shape} is not on the reference's grid "
                               f"{reference.shape}")
        saved = self.work / f"{case}.nii.gz"
        write_label(simulated_correction(prediction, reference, affine, self.partial[case]), affine, saved)
        return saved


# --- the server --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real ``monailabel start_server`` for ``apps/spine`` (as ``tests/conftest.py``'s)."""

    def __init__(self, studies: Path, model_dir: Path, workdir: Path, conf: Dict[str, Any],
                 ready_timeout: float = 300):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(REPO / "apps" / "spine"),
                "--studies", str(studies), "--host", "127.0.0.1", "--port", str(self.port)]
        for key, value in {"preset": "tiny", **conf, "model_dir": str(model_dir)}.items():
            args += ["--conf", key, str(value)]
        self.log_path = workdir / "server.log"
        self.log = open(self.log_path, "w")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(args, cwd=workdir, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        try:
            self._wait_ready(ready_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if requests.get(f"{self.url}/info/", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.tail()}")

    def tail(self, chars: int = 4000) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server and its train/scoring processes
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class Client:
    """The annotator's HTTP calls."""

    def __init__(self, server: Server, timeout: float):
        self.server, self.url, self.timeout = server, server.url, timeout

    def info(self) -> Dict[str, Any]:
        r = requests.get(f"{self.url}/info/", timeout=30)
        r.raise_for_status()
        return r.json()

    def objects(self) -> Dict[str, Any]:
        r = requests.get(f"{self.url}/datastore/", params={"output": "all"}, timeout=30)
        r.raise_for_status()
        return r.json()["objects"]

    def unlabeled(self) -> List[str]:
        return sorted(i for i, o in self.objects().items() if "final" not in (o.get("labels") or {}))

    def next_image(self, strategy: str) -> Dict[str, Any]:
        r = requests.post(f"{self.url}/activelearning/{strategy}", json={}, timeout=60)
        r.raise_for_status()
        return r.json() or {}

    def save_label(self, image_id: str, path: Path) -> None:
        with open(path, "rb") as f:
            r = requests.put(f"{self.url}/datastore/label", params={"image": image_id, "tag": "final"},
                             data={"params": "{}"}, files={"label": (path.name, f)}, timeout=120)
        if r.status_code != 200:
            raise RuntimeError(f"label of {image_id} refused ({r.status_code}): {r.text[:500]}")

    def infer(self, image_id: str, path: Path) -> None:
        """The serving model's label of ``image_id`` (on the image's grid) into ``path``."""
        r = requests.post(f"{self.url}/infer/spine", params={"image": image_id, "output": "image"}, json={},
                          timeout=self.timeout)
        if r.status_code != 200:
            raise RuntimeError(f"infer of {image_id} refused ({r.status_code}): {r.text[:500]}")
        path.write_bytes(r.content)

    def versions(self) -> Dict[str, Any]:
        r = requests.get(f"{self.url}/model/spine/versions", timeout=30)
        r.raise_for_status()
        return r.json()

    def task(self, kind: str) -> Optional[Dict[str, Any]]:
        r = requests.get(f"{self.url}/{kind}/", params={"check_if_running": "false"}, timeout=30)
        return r.json() if r.status_code == 200 and r.content else None

    def wait_task(self, kind: str) -> Optional[Dict[str, Any]]:
        """Wait until the last ``kind`` task (train, scoring) is no longer submitted or running."""
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            status = self.task(kind)
            if not status or status.get("status") not in ACTIVE:
                return status
            if self.server.proc.poll() is not None:
                raise RuntimeError(f"server died during {kind}:\n{self.server.tail()}")
            time.sleep(1)
        raise TimeoutError(f"{kind} still running after {self.timeout} s:\n{self.server.tail()}")

    def train(self) -> None:
        r = requests.post(f"{self.url}/train/spine", json={}, timeout=60)
        if r.status_code not in (200, 429):
            raise RuntimeError(f"train request refused ({r.status_code}): {r.text[:500]}")

    def wait_scored(self, version: Optional[str], settle: float = 10.0) -> None:
        """Wait until every unlabeled image carries an epistemic score of ``version``.

        The version watcher notices a new model within seconds and starts the scoring;
        images it cannot score (none left) end the wait once no scoring task runs.
        """
        from lib.scoring.epistemic import SCORE_KEY

        if not version:
            return
        deadline, idle_since = time.time() + self.timeout, None
        while time.time() < deadline:
            objects = self.objects()
            pending = [i for i, o in objects.items() if "final" not in (o.get("labels") or {})
                       and ((o.get("image") or {}).get("info", {}).get(SCORE_KEY) or {}).get("model_version")
                       != version]
            if not pending:
                return
            status = self.task("scoring")
            if status and status.get("status") in ACTIVE:
                idle_since = None
            else:
                idle_since = idle_since or time.time()
                if time.time() - idle_since > settle:
                    log(f"  scoring left {len(pending)} image(s) without a score of {version}: going on")
                    return
            time.sleep(1)
        raise TimeoutError(f"scoring of {version} not done after {self.timeout} s")


# --- evaluation --------------------------------------------------------------------------


class Evaluator:
    """A version's weights on the fixed test set (cached per version): mean Dice per group and
    overall over the structures each reference draws (``lib.evaluate``; NaN where none is
    scored by Dice), and for body-only references (``vertebra_extent: body_only`` in the test
    folder's manifest) the mean sensitivity of the vertebral bodies at the right level, the
    levels right and the predicted vertebra volume (mL per scan: the check that sensitivity
    was not bought by painting bone everywhere)."""

    def __init__(self, test_dir: Path, conf: Dict[str, str]):
        self.test_dir, self.conf = test_dir, {"preset": "tiny", **conf}
        self.infos = case_infos(test_dir)
        self.cases = list(self.infos)
        if not self.cases:
            raise SystemExit(f"no test cases in {test_dir} (images/<id>.nii.gz + labels/<id>.nii.gz)")
        self.cache: Dict[str, Dict[str, float]] = {}

    @property
    def metric(self) -> str:
        """The curve's figure: vertebral body sensitivity where every reference draws bodies only."""
        return "body_sensitivity" if all(i.body_only for i in self.infos.values()) else "dice_overall"

    def __call__(self, weights: Path, key: str) -> Dict[str, float]:
        if key in self.cache:
            return {**self.cache[key], "eval_seconds": 0.0}
        from lib.evaluate import GROUPS as EVAL_GROUPS, evaluate_case
        from lib.pipeline.io import read_volume
        from lib.segment import SpineSegmenter

        start = time.perf_counter()
        segmenter = SpineSegmenter(str(weights), conf=self.conf, device="cpu")
        dice: Dict[str, List[float]] = {g: [] for g in (*GROUPS, "overall")}
        body, volumes, levels_correct, levels_scored = [], [], 0, 0
        for case in self.cases:
            result = segmenter.segment(self.test_dir / "images" / f"{case}.nii.gz")
            reference, affine = read_volume(str(self.test_dir / "labels" / f"{case}.nii.gz"))
            rows, summary = evaluate_case(reference.astype(np.int64), result.label, affine, self.infos[case],
                                          case=case, prediction_affine=result.affine)
            for group in GROUPS:
                dice[group] += [r["dice"] for r in rows if r["value"] in EVAL_GROUPS[group]]
            dice["overall"] += [r["dice"] for r in rows]
            body += [r["sensitivity"] for r in rows if r["body_only"]]
            volumes.append(sum(r["pred_ml"] for r in rows if r["value"] in VERTEBRAE))
            levels_correct += summary["level_correct"]
            levels_scored += summary["level_total"]
        out = {g: _nanmean(v) for g, v in dice.items()}
        out.update({"body_sensitivity": _nanmean(body), "levels_correct": levels_correct,
                    "levels_scored": levels_scored, "vertebra_ml": _nanmean(volumes)})
        self.cache[key] = out
        return {**out, "eval_seconds": round(time.perf_counter() - start, 1)}


def _nanmean(values: Sequence[float]) -> float:
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    return float(arr.mean()) if arr.size else float("nan")


# --- one run -------------------------------------------------------------------------------


class CsvLog:
    def __init__(self, path: Path):
        self.path = path
        if not path.exists():
            with open(path, "w", newline="") as f:
                csv.writer(f).writerow(CSV_COLUMNS)

    def write(self, row: Dict[str, Any]) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore").writerow(row)


def run_one(strategy: str, seed: int, pool: Path, evaluate: Evaluator, out: Path, conf: Dict[str, str],
            max_labels: Optional[int], csv_log: CsvLog, timeout: float) -> List[Dict[str, Any]]:
    """One annotator session (see the module docstring); returns its CSV rows."""
    run_dir = out / "runs" / f"{strategy}-seed{seed}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    studies, model_dir = run_dir / "studies", run_dir / "model"
    studies.mkdir(parents=True)
    pool_ids = list_cases(pool)
    for case in pool_ids:
        shutil.copyfile(pool / "images" / f"{case}.nii.gz", studies / f"{case}.nii.gz")
    rng = random.Random(seed)
    annotator = Annotator(pool, run_dir / "labels")
    conf = {"train_seed": str(seed), **conf}  # the seed also varies the training (crops, augmentation)
    limit = len(pool_ids) if max_labels is None else min(max_labels, len(pool_ids))
    if strategy == "all":  # the reference: every label at once, one training
        conf = {**conf, "auto_train": "false"}
    rows: List[Dict[str, Any]] = []
    picks: List[Dict[str, Any]] = []
    start = time.time()
    log(f"run {strategy} seed {seed}: {len(pool_ids)} pool images, up to {limit} labels, {len(evaluate.cases)} test")
    with Server(studies, model_dir, run_dir, conf) as server:
        client = Client(server, timeout)
        serving: Optional[str] = None

        def after_training(n: int, train_seconds: float) -> None:
            nonlocal serving
            listing = client.versions()
            every = listing.get("versions") or []
            newest = every[0] if every else {}
            current = listing.get("serving")
            if strategy in SCORED_STRATEGIES:
                client.wait_scored(current)
            if not current:
                log(f"  n={n}: no model serves yet")
                return
            metrics = next((m for m in every if m["version"] == current), {})
            weights = model_dir / "versions" / current / "spine.pt"
            if not weights.exists():  # not registered (yet): a private copy of what serves
                weights = run_dir / "serving-copy.pt"
                shutil.copyfile(model_dir / "spine.pt", weights)
            dice = evaluate(weights, current)
            candidate = newest.get("version")
            candidate_figures: Optional[Dict[str, float]] = dice if candidate == current else None
            candidate_weights = model_dir / "versions" / str(candidate) / "spine.pt"
            if candidate_figures is None and candidate_weights.exists():  # what the labels bought, served or not
                candidate_figures = evaluate(candidate_weights, candidate)

            def of_candidate(key: str) -> Any:
                return "" if candidate_figures is None else round(candidate_figures[key], 5)

            row = {"strategy": strategy, "seed": seed, "n_labels": n,
                   "train_images": metrics.get("train_images"),
                   "val_images": len(metrics.get("validation_ids") or []),
                   "model_version": current, "candidate_version": newest.get("version"),
                   "promoted": bool(newest.get("promoted")), "version_changed": current != serving,
                   "all_labels": n == len(pool_ids),
                   **{f"dice_{g}": round(dice[g], 5) for g in (*GROUPS, "overall")},
                   "candidate_dice_overall": of_candidate("overall"),
                   "body_sensitivity": round(dice["body_sensitivity"], 5),
                   "candidate_body_sensitivity": of_candidate("body_sensitivity"),
                   "levels_correct": dice["levels_correct"], "levels_scored": dice["levels_scored"],
                   "vertebra_ml": round(dice["vertebra_ml"], 1),
                   "test_cases": len(evaluate.cases), "train_seconds": round(train_seconds, 1),
                   "eval_seconds": dice["eval_seconds"], "elapsed_seconds": round(time.time() - start, 1)}
            serving = current
            rows.append(row)
            csv_log.write(row)
            log(f"  n={n}: version {current} ({'new' if row['version_changed'] else 'unchanged'}; candidate "
                f"{'promoted' if row['promoted'] else 'rejected'}) Dice overall {row['dice_overall']:.3f} "
                f"(vert {row['dice_vertebrae']:.3f}, discs {row['dice_discs']:.3f}, canal {row['dice_canal']:.3f})"
                + (f"; body sensitivity {row['body_sensitivity']:.3f} (candidate {row['candidate_body_sensitivity']}),"
                   f" levels {row['levels_correct']}/{row['levels_scored']}, vertebrae {row['vertebra_ml']} mL"
                   if not math.isnan(dice["body_sensitivity"]) else ""))

        def train_and_wait(n: int, request: bool) -> None:
            t0 = time.time()
            if request:
                client.train()
            status = client.wait_task("train") or {}
            if status.get("status") != "DONE":
                raise RuntimeError(f"training at n={n} ended {status.get('status')}:\n"
                                   + "\n".join(status.get("details", [])[-20:]))
            after_training(n, time.time() - t0)

        if client.versions().get("serving"):  # a starter model: the curve starts before any label
            after_training(0, 0.0)
        n = 0
        while n < limit:
            unlabeled = client.unlabeled()
            if not unlabeled:
                break
            if strategy == "all":
                image_id, how = unlabeled[0], "all"
            else:
                try:
                    answer = client.next_image(strategy)
                except requests.HTTPError:
                    if strategy != "random":
                        raise
                    # MONAI Label 0.8.5's random strategy answers 500 when every unlabeled image was
                    # offered within the current second (its weights are seconds since: all 0)
                    answer = {}
                if strategy == "random" or answer.get("fallback") or not answer.get("id"):
                    image_id, how = rng.choice(unlabeled), "seeded client-side"
                else:
                    image_id, how = answer["id"], "server"
            runs_before = client.info()["auto_train"]["runs_started"]
            client.save_label(image_id, annotator.label(client, image_id))
            n += 1
            picks.append({"n": n, "image": image_id, "how": how})
            started = client.info()["auto_train"]["runs_started"] > runs_before
            log(f"  label {n}: {image_id} ({how}){'; auto-training started' if started else ''}")
            if started:
                train_and_wait(n, request=False)
        auto = client.info()["auto_train"]
        if n == len(pool_ids) and (auto["new_final_labels"] > 0 or auto["runs_started"] == 0):
            log(f"  every pool image labelled: one more training on all {n}")
            train_and_wait(n, request=True)
    (run_dir / "run.json").write_text(json.dumps({"strategy": strategy, "seed": seed, "picks": picks,
                                                  "conf": conf, "seconds": round(time.time() - start, 1)},
                                                 indent=1))
    log(f"run {strategy} seed {seed} done in {time.time() - start:.0f} s")
    return rows


# --- results -------------------------------------------------------------------------------


def read_rows(path: Path) -> List[Dict[str, Any]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["seed"], r["n_labels"] = int(r["seed"]), int(r["n_labels"])
        r["all_labels"] = r["all_labels"] == "True"
        for key in ("dice_vertebrae", "dice_discs", "dice_canal", *METRICS, *(f"candidate_{m}" for m in METRICS)):
            r[key] = float(r[key]) if r.get(key) else float("nan")  # CSVs of before body_sensitivity: NaN
    return rows


def curves(rows: Sequence[Dict[str, Any]], key: str = "dice_overall") -> Dict[str, Dict[str, Any]]:
    """Per strategy: label counts and, per seed, the serving model's ``key`` (a :data:`METRICS` column, or
    ``candidate_`` + one) at each count (carried forward)."""
    out: Dict[str, Dict[str, Any]] = {}
    for strategy in sorted({r["strategy"] for r in rows if r["strategy"] != "all"}):
        mine = [r for r in rows if r["strategy"] == strategy]
        xs = sorted({r["n_labels"] for r in mine})
        per_seed = {}
        for seed in sorted({r["seed"] for r in mine}):
            points = {r["n_labels"]: r[key] for r in mine if r["seed"] == seed}
            ys, last = [], float("nan")
            for x in xs:
                last = points.get(x, last)
                ys.append(last)
            per_seed[seed] = ys
        arr = np.asarray(list(per_seed.values()), dtype=np.float64)
        out[strategy] = {"n_labels": xs, "per_seed": per_seed, "mean": np.nanmean(arr, 0).tolist(),
                         "min": np.nanmin(arr, 0).tolist(), "max": np.nanmax(arr, 0).tolist()}
    return out


def labels_to_reach(xs: Sequence[int], ys: Sequence[float], threshold: float) -> Optional[int]:
    return next((x for x, y in zip(xs, ys) if not math.isnan(y) and y >= threshold), None)


def summarize(rows: Sequence[Dict[str, Any]], fraction: float = 0.9, metric: str = "dice_overall") -> Dict[str, Any]:
    """The all-labels figure and labels needed to reach ``fraction`` of it.

    The all-labels figure is ``metric`` (a :data:`METRICS` column) of the model trained on every
    pool label: the mean over the runs' all-labels points of their candidate's figure, served or
    not (the promotion gate may have kept an older model; where a point has no candidate figure,
    what serves). ``all_labels_serving`` is what served then, ``all_labels_dice`` its Dice per group."""
    full = [r for r in rows if r["all_labels"]]
    reference = {g: _nanmean([r[f"dice_{g}"] for r in full]) for g in (*GROUPS, "overall")} if full else None
    trained_on_all = [r[f"candidate_{metric}"] if not math.isnan(r[f"candidate_{metric}"]) else r[metric] for r in full]
    summary: Dict[str, Any] = {"metric": metric, "metric_name": METRICS[metric],
                               "all_labels_dice": reference, "all_labels_points": len(full), "fraction": fraction,
                               "all_labels": _nanmean(trained_on_all) if full else None,
                               "all_labels_serving": _nanmean([r[metric] for r in full]) if full else None,
                               "strategies": {}}
    if not full or math.isnan(summary["all_labels"]):
        return summary
    threshold = fraction * summary["all_labels"]
    summary["threshold"] = threshold
    candidates = curves(rows, f"candidate_{metric}")
    for strategy, c in curves(rows, metric).items():
        summary["strategies"][strategy] = {
            "labels_to_threshold": labels_to_reach(c["n_labels"], c["mean"], threshold),
            "per_seed": {str(s): labels_to_reach(c["n_labels"], ys, threshold) for s, ys in c["per_seed"].items()},
            "n_labels": c["n_labels"], "mean": c["mean"],
            # each training's candidate, served or not: what the labels bought
            "candidate_mean": candidates[strategy]["mean"],
            "candidate_labels_to_threshold": labels_to_reach(c["n_labels"], candidates[strategy]["mean"], threshold),
        }
    return summary


def plot(rows: Sequence[Dict[str, Any]], summary: Dict[str, Any], path: Path) -> None:
    """The learning curves of ``summary["metric"]`` (serving model, and each training's candidate)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    metric = summary.get("metric", "dice_overall")
    candidates = curves(rows, f"candidate_{metric}")
    for strategy, c in curves(rows, metric).items():
        seeds = len(c["per_seed"])
        line, = ax.plot(c["n_labels"], c["mean"], marker="o", label=f"{strategy}: serving model (mean of {seeds} seed"
                                                                      f"{'s' if seeds > 1 else ''})")
        ax.fill_between(c["n_labels"], c["min"], c["max"], color=line.get_color(), alpha=0.2, linewidth=0)
        if any(not math.isnan(a) and a != b for a, b in zip(candidates[strategy]["mean"], c["mean"])):
            ax.plot(c["n_labels"], candidates[strategy]["mean"], marker="x", linestyle=":", color=line.get_color(),
                    label=f"{strategy}: each training's candidate, served or not")
    if summary.get("threshold") is not None:
        ax.axhline(summary["all_labels"], color="grey", linewidth=1, label="all pool labels")
        ax.axhline(summary["threshold"], color="grey", linestyle="--", linewidth=1,
                   label=f"{summary['fraction']:.0%} of the all-labels figure")
    ax.set_xlabel("final labels saved (images)")
    ax.set_ylabel(METRICS[metric])
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Annotation simulation against the real server (band: min-max over seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _json_safe(obj: Any) -> Any:
    """NaN -> null, so that summary.json is strict JSON."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def report(out: Path) -> Dict[str, Any]:
    """CSV -> ``summary.json`` + ``learning_curve.png`` of the run's metric (``config.json``); printed."""
    rows = read_rows(out / "simulation.csv")
    config = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else {}
    summary = summarize(rows, metric=config.get("metric", "dice_overall"))
    (out / "summary.json").write_text(json.dumps(_json_safe(summary), indent=1))
    plot(rows, summary, out / "learning_curve.png")
    reference = summary.get("all_labels_dice")
    if reference:
        log(f"all-labels Dice (mean of {summary['all_labels_points']} point(s)): overall {reference['overall']:.3f}, "
            f"vertebrae {reference['vertebrae']:.3f}, discs {reference['discs']:.3f}, canal {reference['canal']:.3f}")
    if summary["all_labels"] is not None:
        log(f"all-labels {summary['metric_name']} (the model trained on every label): {summary['all_labels']:.3f}; "
            f"serving then: {summary['all_labels_serving']:.3f}")
    for strategy, s in summary["strategies"].items():
        n = s["labels_to_threshold"]
        log(f"{strategy}: {'never reached' if n is None else n} labels to reach {summary['fraction']:.0%} "
            f"({summary['threshold']:.3f}); per seed {s['per_seed']}; by the trainings' candidates: "
            f"{s['candidate_labels_to_threshold']}")
    return summary


# --- command line ----------------------------------------------------------------------------


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through Server.__exit__: no server left behind


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lib.simulate", description=__doc__.split("\n")[0])
    p.add_argument("--pool", type=Path, help="images/ + labels/ to label (default: made from ../shared/data)")
    p.add_argument("--test", type=Path, help="images/ + labels/ held out (default: made with the pool)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="development data for the default pool")
    p.add_argument("--pool-size", type=int, help="default pool: SPIDER cases (default 12; --real-size: all)")
    p.add_argument("--test-size", type=int, default=3,
                   help="default test set: SPIDER cases (default 3; --real-size: the recipe's validation split)")
    p.add_argument("--real-size", action="store_true",
                   help="full-resolution scans, the shipped model's plan and starter (see the module help)")
    p.add_argument("--site", metavar="PREFIX",
                   help="pool and test from one site's cases of --data (e.g. fcs_VB3), with --real-size's "
                        "settings and a correcting annotator (see the module help)")
    p.add_argument("--phantoms", type=int, default=0, help="synthetic phantoms added to the default pool")
    p.add_argument("--strategies", nargs="+", default=["epistemic", "random"], choices=STRATEGIES)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help=f"server setting (over the simulation's {DEFAULT_CONF} and preset tiny)")
    p.add_argument("--max-labels", type=int, help="stop each run after this many labels (default: whole pool)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds to wait for one training or scoring")
    p.add_argument("--report-only", action="store_true", help="redo summary.json and the plot from the CSV")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():  # kill PID stops the servers too
        signal.signal(signal.SIGTERM, _terminate)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        report(out)
        return 0
    real_size = args.real_size or args.site is not None
    conf = {**DEFAULT_CONF, **(REAL_SIZE_CONF if real_size else {}), **dict(args.conf)}
    conf.pop("model_dir", None)  # each run has its own
    if args.site is not None:
        if args.pool is not None or args.test is not None:
            raise SystemExit("--site makes the pool and the test set: no --pool/--test with it")
        pool, test = prepare_site_data(out / f"data-{args.site}", args.data, args.site, args.test_size, args.pool_size)
    elif args.pool is None:
        pool, test = prepare_data(out / ("data-real" if args.real_size else "data"), args.pool_size, args.test_size,
                                  args.data, args.phantoms, args.real_size)
        if args.test is not None:
            test = args.test
    else:
        if args.test is None:
            raise SystemExit("--pool needs --test (a held-out set that never goes into the studies)")
        pool, test = args.pool, args.test
    pool, test = pool.resolve(), test.resolve()
    overlap = set(list_cases(pool)) & set(list_cases(test))
    if overlap:
        raise SystemExit(f"test cases also in the pool: {sorted(overlap)}")
    if not list_cases(pool):
        raise SystemExit(f"no pool cases in {pool}")
    evaluate = Evaluator(test, {k: v for k, v in conf.items() if not k.startswith("auto_train")})
    csv_path = out / "simulation.csv"
    csv_path.unlink(missing_ok=True)
    csv_log = CsvLog(csv_path)
    (out / "config.json").write_text(json.dumps({"argv": list(argv) if argv is not None else sys.argv[1:],
                                                 "conf": conf, "metric": evaluate.metric,
                                                 "pool": str(pool), "test": str(test),
                                                 "pool_cases": list_cases(pool), "test_cases": list_cases(test)},
                                                indent=1))
    all_rows: List[Dict[str, Any]] = []
    for seed in args.seeds:
        for strategy in args.strategies:
            all_rows += run_one(strategy, seed, pool, evaluate, out, conf, args.max_labels, csv_log, args.timeout)
            report(out)
    if not any(r["all_labels"] for r in all_rows):
        log("no run labelled the whole pool: one reference run with every label and one training")
        run_one("all", 0, pool, evaluate, out, conf, None, csv_log, args.timeout)
    report(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
