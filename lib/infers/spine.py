"""The ``spine`` infer task: scan -> L1-L5, discs and canal, on the scan's own grid.

Stages (one code path for the server, ``SpineSegmenter`` and ``python -m lib.segment``):
1. pre: load (NIfTI, NRRD, MHA/MHD, DICOM folder), validate, RAS, plan spacing, normalise;
2. sliding-window SwinUNETR, logits ``(12, X, Y, Z)``;
3. invert orientation + spacing on the logits (bilinear), so the argmax happens on the
   scan's grid: the label has exactly the input's shape and affine;
4. post: the plan's label decision (argmax, or kind first: :mod:`lib.pipeline.grouping`), clean-up
   per structure, level assignment; the result JSON carries label names, volumes (mL) and
   the level-consistency report.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from typing import Any, Callable, Dict, Sequence, Tuple

import numpy as np
import torch
from monai.inferers import Inferer
from monai.transforms import MapTransform
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from lib.lifecycle.model_store import model_version
from lib.pipeline.errors import ModelNotTrained
from lib.pipeline.io import unpack_dicom_zip
from lib.pipeline.labels import COLORS, LABELS
from lib.pipeline.levels import finish_label
from lib.pipeline.networks import check_plan, sliding_window_inferer, weights_do_not_fit
from lib.pipeline.plans import SpinePlan
from lib.pipeline.postprocess import structure_volumes_ml
from lib.pipeline.transforms import discrete_post_transforms, infer_pre_transforms

logger = logging.getLogger(__name__)


class SpinePostprocessd(MapTransform):
    """Clean-up + level assignment on ``pred`` (X, Y, Z) uint8 in the scan's own grid.

    Writes ``result``: ``volumes_ml`` per structure and ``levels`` (the report of
    :func:`lib.pipeline.levels.assign_levels`, through :func:`lib.pipeline.levels.finish_label`).
    """

    def __init__(self, plan: SpinePlan, key: str = "pred", result_key: str = "result"):
        super().__init__(key)
        self.plan = plan
        self.key = key
        self.result_key = result_key

    def __call__(self, data):
        d = dict(data)
        pred = d[self.key]
        affine = np.asarray(pred.affine if hasattr(pred, "affine") else d[f"{self.key}_meta_dict"]["affine"])
        array = np.asarray(pred.cpu().numpy() if torch.is_tensor(pred) else pred).astype(np.uint8)
        array, report = finish_label(array, affine, self.plan.min_island_ml, self.plan.midline_prior)
        result = dict(d.get(self.result_key) or {})
        result["volumes_ml"] = structure_volumes_ml(array, np.linalg.norm(affine[:3, :3], axis=0))
        result["levels"] = report
        d[self.result_key] = result
        if hasattr(pred, "set_array"):
            pred.set_array(torch.from_numpy(array))  # keeps the affine and metadata the writer needs
        else:
            d[self.key] = array
        return d


class SpineInferTask(BasicInferTask):
    """MONAI Label infer task for the lumbar spine (type ``segmentation``, 3D)."""

    def __init__(self, path: str, plan: SpinePlan, network: torch.nn.Module, **kwargs):
        super().__init__(
            path=path,
            network=network,
            type=InferType.SEGMENTATION,
            labels=LABELS,
            dimension=3,
            description="Lumbar spine MRI: L1-L5 vertebrae, discs L1-L2..L5-S1 and spinal canal (SwinUNETR)",
            roi_size=plan.roi_size,
            load_strict=True,
            **kwargs,
        )
        self.plan = plan
        self._request_state = threading.local()  # per request thread: was the network loaded for it?
        # Slicer shows these colours; OHIF reads them from the DICOM SEG.
        self._config.update({"label_colors": {k: list(v) for k, v in COLORS.items()}})

    # --- state ---------------------------------------------------------------------
    def is_valid(self) -> bool:
        return True  # listed in /info even before training (bootstrap), infer then explains

    def is_trained(self) -> bool:
        return self.get_path() is not None

    def info(self) -> Dict[str, Any]:
        info = super().info()
        path = self.get_path()
        info.update(
            {
                "trained": path is not None,
                "model_version": model_version(path) if path else None,
                "plan": self.plan.to_dict(),
            }
        )
        if not path:
            info["description"] += " (untrained: save labels and run training first)"
        return info

    def _get_network(self, device, data):
        """MONAI Label's per-device network cache; records whether this request had to load it."""
        cached = self._networks.get(device)
        path = self.get_path()
        reload = path and (cached is None or cached[1] != os.stat(path).st_mtime)  # MONAI Label's own rule
        if reload:
            check_plan(path, self.plan)
        try:
            network = super()._get_network(device, data)
        except RuntimeError as e:  # a strict load of weights without a recorded plan
            if not reload or "state_dict" not in str(e):
                raise
            raise weights_do_not_fit(path, self.plan, e) from None
        self._request_state.loaded = cached is None or self._networks.get(device) is not cached
        return network

    # --- pipeline ------------------------------------------------------------------
    def pre_transforms(self, data=None) -> Sequence[Callable]:
        return infer_pre_transforms(self.plan)

    def inferer(self, data=None) -> Inferer:
        return sliding_window_inferer(self.plan)

    def inverse_transforms(self, data=None):
        return []  # invert every invertible pre-transform (orientation, spacing) on the logits

    def post_transforms(self, data=None) -> Sequence[Callable]:
        return discrete_post_transforms(self.plan) + [SpinePostprocessd(self.plan)]

    def writer(self, data: Dict[str, Any], extension=None, dtype=None) -> Tuple[Any, Any]:
        # a DICOM folder has no extension to copy: answer NIfTI unless the client asked
        if not data.get("result_extension") and os.path.isdir(str(data.get("image_path", ""))):
            extension = ".nii.gz"
        return super().writer(data, extension=extension, dtype=dtype or data.get("result_dtype") or "uint8")

    def __call__(self, request, callbacks=None):
        path = self.get_path()
        if path is None:
            raise ModelNotTrained(
                "model 'spine' has no trained weights yet: save 'final' labels and run training "
                "(POST /train/spine) before asking for a pre-segmentation"
            )
        request = dict(request)
        unpacked = None
        image = request.get("image")
        if isinstance(image, str) and image.lower().endswith(".zip"):
            unpacked = request["image"] = unpack_dicom_zip(image)  # an uploaded DICOM series
        try:
            label, result = super().__call__(request, callbacks)
        finally:
            if unpacked:
                shutil.rmtree(unpacked, ignore_errors=True)
        result["model_version"] = model_version(path)
        # False when the network stayed loaded from an earlier request (a warm server)
        result["model_loaded"] = bool(getattr(self._request_state, "loaded", True))
        return label, result
