"""The plan: every number that shapes preprocessing, the network, inference and training.

Like nnU-Net's plans, configuration lives here as data, in one place. A plan starts
from a *preset* (``default`` for real lumbar MRI, ``tiny`` for tests) and any field
can be overridden with ``--conf KEY VALUE`` on ``monailabel start_server`` or with
the same keys in Python (``SpinePlan.from_conf({...})``).

Axis order of every spatial tuple is the model's: RAS (axis 0 = right->left,
axis 1 = posterior->anterior, axis 2 = inferior->superior); spacing is in mm.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Tuple

#: the label decisions a plan can name (``label_decision``; computed in lib/pipeline/grouping.py)
LABEL_DECISIONS: Tuple[str, ...] = ("kind_first", "argmax")
#: the network modes a plan can name (``network_mode``; built in lib/pipeline/networks.py)
NETWORK_MODES: Tuple[str, ...] = ("2.5d", "3d")
#: epistemic scoring computations (``score_method``; lib/scoring/epistemic.py)
SCORE_METHODS: Tuple[str, ...] = ("auto", "full", "fast", "slices")

PRESETS: Dict[str, Dict[str, Any]] = {
    # Real sagittal lumbar MRI on hospital CPUs, 2.5D: a 2D SwinUNETR on each sagittal slice
    # with its two neighbours. 2 mm left-right (clinical sagittal slices are 3-4 mm thick
    # anyway); 1 mm in-plane in windows of 160 x 256 mm (AP x SI): the whole lumbar spine
    # with the sacrum in one view, so the network sees which level it is looking at.
    "default": {},
    # The 3D network for GPU sites: a 32x96x96 ROI = 64x144x144 mm holds about three
    # vertebrae with their discs; 1.5 mm in-plane keeps a disc (8-12 mm) at 5-8 voxels.
    "3d": {
        "network_mode": "3d",
        "target_spacing": (2.0, 1.5, 1.5),
        "roi_size": (32, 96, 96),
    },
    # Seconds per epoch on a 2-core CPU: used by the test-suite.
    "tiny": {
        "feature_size": 12,
        "depths": (1, 1, 1, 1),
        "target_spacing": (4.0, 4.0, 4.0),
        "roi_size": (-1, 64, 64),
        "train_slices": 4,
        "train_patch": (64, 64),
        "max_epochs": 1,
        "val_interval": 1,
        "num_samples": 1,
        "mc_samples": 2,
        "train_batch_size": 1,
        "min_island_ml": 0.0,
    },
}


@dataclass(frozen=True)
class SpinePlan:
    # --- preprocessing -------------------------------------------------------------
    target_spacing: Tuple[float, float, float] = (2.0, 1.0, 1.0)  # mm, RAS
    intensity_percentiles: Tuple[float, float] = (0.5, 99.5)  # MR has no absolute scale: robust min/max
    # Infer and scoring skip the air around the body: a full field of view is mostly air or
    # soft tissue far from the spine, and every 96-voxel window saved is about a second on a CPU.
    crop_to_body: bool = True
    body_threshold: float = 0.05  # normalised intensity (0..1) above which a smoothed voxel is body
    body_margin: int = 4  # voxels kept around the body's bounding box
    # --- network (SwinUNETR) -------------------------------------------------------
    network_mode: str = "2.5d"  # 2.5d: 2D network over sagittal slabs | 3d (lib/pipeline/networks.py)
    slab_size: int = 3  # 2.5d: sagittal slices a slice is segmented from (itself + neighbours), odd
    slice_batch_size: int = 16  # 2.5d: slices per pass of the 2D network (bounds memory)
    feature_size: int = 12  # must be a multiple of 12; 12 keeps CPU training and infer fast
    depths: Tuple[int, int, int, int] = (2, 2, 2, 2)
    dropout: float = 0.1  # also drives MC-dropout epistemic scoring
    fused_attention: bool = True  # PyTorch's fused attention kernel outside training (lib/pipeline/networks.py)
    # --- sliding-window inference --------------------------------------------------
    # voxels; 3d: each a multiple of 32; 2.5d: X = -1 (every slice in one window: a slice is
    # computed once, and only the scan's own edges lack a neighbour), Y and Z multiples of 32
    # or -1 (the whole in-plane extent in one window, padded to multiples of 32 inside the
    # network: the network sees the whole spine wherever the scan's field of view puts it)
    roi_size: Tuple[int, int, int] = (-1, 160, 256)
    sw_overlap: float = 0.25
    # windows per forward pass; 2+ also puts PyTorch's CPU 3D convolutions on oneDNN (a single
    # small window takes a slower fallback kernel): 15-20 % less time per window on 2 cores
    sw_batch_size: int = 2
    # --- post-processing -----------------------------------------------------------
    # argmax over the 12 channels; kind_first: vertebra/disc/canal/background by their summed
    # probabilities, then the level (lib/pipeline/grouping.py). argmax stays the default: on the starter
    # recipe's weights kind_first merged the vertebrae into one column (see model/README.md)
    label_decision: str = "argmax"
    min_island_ml: float = 0.1  # pieces smaller than this are noise
    # structures further left or right of the spine's midline than anatomy allows are removed
    # (lib/pipeline/postprocess.py restrict_to_midline): the network has seen no lateral slice
    midline_prior: bool = True
    # --- training ------------------------------------------------------------------
    max_epochs: int = 300
    val_interval: int = 5
    train_batch_size: int = 2
    num_samples: int = 2  # random crops per image per iteration
    train_slices: int = 8  # 2.5d: sagittal slices of a training crop (its X extent)
    train_patch: Tuple[int, int] = (160, 256)  # 2.5d: voxels (Y, Z) of a training crop, multiples of 32
    learning_rate: float = 2e-4
    weight_decay: float = 1e-5
    warmup_epochs: int = 5
    early_stop_patience: int = 10  # validations without improvement
    loss: str = "dice_ce"  # dice_ce | dice_focal
    train_seed: int = 0  # seeds a run's initialisation, crops and augmentation: same data, same model
    kind_loss_weight: float = 1.0  # + this x the same loss on the 4 kinds (lib/pipeline/grouping.py); 0 = off
    class_weights: Tuple[float, ...] = ()  # per class incl. background, empty = uniform
    val_fraction: float = 0.2
    # processes of the server's train task: GPUs with CUDA (NCCL), else CPU processes (gloo),
    # each with its share of the training images and of the CPU threads; rank 0 validates
    train_processes: int = 1
    # --- active learning -----------------------------------------------------------
    mc_samples: int = 5
    # auto: slices for the 2.5d network (every score_slice_step-th sagittal slice, exactly;
    # measured on 12 real scans with the starter model, python -m lib.benchmark --skip-infer:
    # 5.4x cheaper than the full computation, same ranking, Spearman 0.972 where two full runs
    # give 0.993), full for the 3d network. auto | full | fast | slices
    score_method: str = "auto"
    score_spacing: Tuple[float, float, float] = (2.0, 3.0, 3.0)  # mm, RAS: the fast scorer's coarser grid
    score_slice_step: int = 5  # slices method: every this many sagittal slices are scored
    # --- bookkeeping ---------------------------------------------------------------
    preset: str = "default"
    extra: Dict[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.feature_size % 12:
            raise ValueError(f"feature_size must be a multiple of 12, got {self.feature_size}")
        if self.network_mode not in NETWORK_MODES:
            raise ValueError(f"network_mode must be one of {NETWORK_MODES}, got {self.network_mode!r}")
        if self.network_mode == "3d":
            if any(r <= 0 or r % 32 for r in self.roi_size):
                raise ValueError(f"every roi_size entry must be a multiple of 32 (3D SwinUNETR), got {self.roi_size}")
            if all(r == 32 for r in self.roi_size):
                raise ValueError("roi_size 32x32x32 leaves SwinUNETR's bottleneck a single voxel: make one side 64+")
        else:
            if any(r != -1 and (r <= 0 or r % 32) for r in self.roi_size[1:]):
                raise ValueError(f"roi_size Y and Z must be multiples of 32 (2D SwinUNETR) or -1, got {self.roi_size}")
            if len(self.train_patch) != 2 or any(r <= 0 or r % 32 for r in self.train_patch):
                raise ValueError(f"train_patch must be two multiples of 32, got {self.train_patch}")
            if self.roi_size[0] == 0 or self.roi_size[0] < -1:
                raise ValueError(f"roi_size X is a slice count, or -1 for every slice; got {self.roi_size}")
            if self.slab_size < 1 or self.slab_size % 2 == 0:
                raise ValueError(f"slab_size must be odd and positive, got {self.slab_size}")
            if self.train_slices < 1:
                raise ValueError(f"train_slices must be positive, got {self.train_slices}")
        if any(s <= 0 for s in self.target_spacing):
            raise ValueError(f"target_spacing must be positive, got {self.target_spacing}")
        if not 0 <= self.sw_overlap < 1:
            raise ValueError(f"sw_overlap must lie in [0, 1), got {self.sw_overlap}")
        if self.score_method not in SCORE_METHODS:
            raise ValueError(f"score_method must be one of {SCORE_METHODS}, got {self.score_method!r}")
        if self.score_method == "slices" and self.network_mode != "2.5d":
            raise ValueError("score_method slices needs the 2.5d network (it scores single sagittal slices)")
        if self.score_slice_step < 1:
            raise ValueError(f"score_slice_step must be at least 1, got {self.score_slice_step}")
        if self.label_decision not in LABEL_DECISIONS:
            raise ValueError(f"label_decision must be one of {LABEL_DECISIONS}, got {self.label_decision!r}")
        if self.kind_loss_weight < 0:
            raise ValueError(f"kind_loss_weight must be >= 0, got {self.kind_loss_weight}")
        if self.train_processes < 1:
            raise ValueError(f"train_processes must be at least 1, got {self.train_processes}")
        if self.loss not in ("dice_ce", "dice_focal"):
            raise ValueError(f"loss must be dice_ce or dice_focal, got {self.loss!r}")

    @classmethod
    def from_conf(cls, conf: Mapping[str, Any] | None = None) -> "SpinePlan":
        """Build a plan from a preset and string overrides (``--conf`` values are strings).

        Unknown keys are kept in ``extra`` so that other settings (``model_dir`` ...)
        can travel in the same mapping.
        """
        conf = dict(conf or {})
        preset = str(conf.get("preset", "default"))
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        values: Dict[str, Any] = dict(PRESETS[preset])
        fields = {f.name: f for f in dataclasses.fields(cls)}
        extra = {}
        for key, raw in conf.items():
            if key == "preset":
                continue
            if key in fields and key != "extra":
                values[key] = _parse(raw, cls.__dataclass_fields__[key].default)
            else:
                extra[key] = raw
        return cls(preset=preset, extra=extra, **values)

    @property
    def train_roi_size(self) -> Tuple[int, int, int]:
        """Voxels of a training crop: the ROI in 3d mode; ``train_slices`` x ``train_patch`` in 2.5d."""
        if self.network_mode == "2.5d":
            return (self.train_slices, *self.train_patch)
        return tuple(self.roi_size)

    @property
    def score_computation(self) -> str:
        """The epistemic scoring computation ``score_method`` names (``auto`` resolved)."""
        if self.score_method == "auto":
            return "slices" if self.network_mode == "2.5d" else "full"
        return self.score_method

    def network_signature(self) -> Dict[str, Any]:
        """The fields that shape the weights and what they mean: weights built under one
        signature are refused by a plan of another (:func:`lib.lifecycle.model_store.check_plan`)."""
        keys = ("network_mode", "slab_size", "feature_size", "depths", "target_spacing", "intensity_percentiles")
        d = self.to_dict()
        return {k: list(d[k]) if isinstance(d[k], tuple) else d[k] for k in keys}

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("extra")
        return d


def _parse(raw: Any, default: Any) -> Any:
    """Parse a ``--conf`` string into the type of the field's default value."""
    if not isinstance(raw, str):
        return tuple(raw) if isinstance(default, tuple) else raw
    text = raw.strip()
    if isinstance(default, tuple):
        items = json.loads(text) if text.startswith("[") else [t for t in text.replace("x", ",").split(",") if t]
        kind = type(default[0]) if default else float
        return tuple(kind(i) for i in items)
    if isinstance(default, bool):
        return text.lower() in ("1", "true", "yes", "on")
    if isinstance(default, int):
        return int(text)
    if isinstance(default, float):
        return float(text)
    return text
