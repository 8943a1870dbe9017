"""Transform chains for every stage, composed declaratively from the plan.

Keys: ``image`` is a scan (any orientation, spacing and MR intensity range), ``label``
a label map with values 0..11, ``pred`` the network output. After loading, arrays are
channel-first ``(C, X, Y, Z)`` MetaTensors whose ``affine`` maps voxels to RAS world
coordinates in mm. The model works in RAS at ``plan.target_spacing``; everything the
user sees is inverted back to the scan's own grid.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Hashable, List, Mapping, Tuple

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    CastToTyped,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandomizableTransform,
    RandAdjustContrastd,
    RandAffined,
    RandBiasFieldd,
    RandCoarseDropoutd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandHistogramShiftd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRangePercentilesd,
    SpatialPadd,
    Spacingd,
)

from lib.pipeline.errors import InvalidInput
from lib.pipeline.grouping import StructureDecisiond
from lib.pipeline.io import LIMITS, check_file, check_volume, unreadable
from lib.pipeline.labels import IGNORE_VALUE, NUM_CLASSES
from lib.pipeline.plans import SpinePlan

# ITK reads every format we accept (NIfTI, NRRD, MHA/MHD, DICOM series folders) with one
# consistent RAS affine convention.
READER = "ITKReader"
MODEL_AXCODES = "RAS"


class LoadScand(LoadImaged):
    """``LoadImaged`` with ITK whose failures become a clear :class:`InvalidInput`."""

    def __init__(self, keys: KeysCollection):
        super().__init__(keys=keys, reader=READER)

    def __call__(self, data, reader=None):
        for key in self.key_iterator(dict(data)):
            check_file(str(data[key]))
        try:
            return super().__call__(data, reader)
        except Exception as e:
            key = next(iter(self.key_iterator(dict(data))), None)
            raise unreadable(str(data.get(key, "")) if key else "", e) from None


class ValidateScand(MapTransform):
    """Refuse inputs a segmentation cannot be trusted on, with a message that says why.

    Expects channel-first ``(1, X, Y, Z)`` after ``EnsureChannelFirstd``; trailing
    singleton dimensions are accepted (a 3D volume stored as 4D with one frame). The
    checks are :func:`lib.pipeline.io.check_volume` and the configured voxel limit
    (``--conf max_voxels``), the same as for uploads.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> Dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            while img.ndim > 4 and img.shape[-1] == 1:  # (1, X, Y, Z, 1): one frame
                img = img[..., 0]
            if img.shape[0] != 1:
                raise InvalidInput(f"{key}: expected one 3D volume, got {img.shape[0]} channels or frames")
            array = np.asarray(img[0])
            check_volume(array, key)
            if array.size > LIMITS.max_voxels:
                raise InvalidInput(f"{key}: volume {array.shape} exceeds the limit of {LIMITS.max_voxels} voxels")
            d[key] = img
        return d


class ValidateLabeld(MapTransform):
    """Check a reference label map: values must be 0..11, or 255 = ignore, which is mapped to 0
    unless ``keep_ignore`` (losses and metrics that exclude those voxels keep it)."""

    def __init__(self, keys: KeysCollection, keep_ignore: bool = False):
        super().__init__(keys)
        self.keep_ignore = keep_ignore

    def __call__(self, data: Mapping[Hashable, Any]) -> Dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            if not self.keep_ignore:
                label[label == IGNORE_VALUE] = 0  # in place: keeps the MetaTensor's affine
            array = torch.as_tensor(label)
            values = torch.unique(array[array != IGNORE_VALUE])
            bad = [float(v) for v in values if v < 0 or v >= NUM_CLASSES or v != torch.round(v)]
            if bad:
                raise InvalidInput(f"{key}: label values {bad} are outside 0..{NUM_CLASSES - 1}")
        return d


def load_and_resample(keys: List[str], plan: SpinePlan, label_key: str | None = None,
                      keep_ignore: bool = False) -> List[Any]:
    """Load, check, reorient to RAS, resample to the plan's spacing, normalise intensities.

    ``keep_ignore``: the label keeps its 255 (= ignore) voxels instead of making them background."""
    modes = ["nearest" if k == label_key else "bilinear" for k in keys]
    chain: List[Any] = [
        LoadScand(keys=keys),
        EnsureChannelFirstd(keys=keys),
        ValidateScand(keys="image"),
    ]
    if label_key:
        chain.append(ValidateLabeld(keys=label_key, keep_ignore=keep_ignore))
    chain += [
        Orientationd(keys=keys, axcodes=MODEL_AXCODES, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(keys=keys, pixdim=plan.target_spacing, mode=modes),
        ScaleIntensityRangePercentilesd(
            keys="image",
            lower=plan.intensity_percentiles[0],
            upper=plan.intensity_percentiles[1],
            b_min=0.0,
            b_max=1.0,
            clip=True,
        ),
        EnsureTyped(keys=keys, dtype=torch.float32),
    ]
    return chain


def body_mask(image: torch.Tensor, threshold: float, smoothing: int = 5) -> torch.Tensor:
    """Where the body is: ``image`` (1, X, Y, Z) normalised 0..1 -> bool mask of the same shape.

    A box mean over ``smoothing`` voxels first, so that noise in the air (single bright
    voxels of a magnitude image) does not stretch the bounding box.
    """
    smoothed = torch.nn.functional.avg_pool3d(
        torch.as_tensor(image, dtype=torch.float32)[None], smoothing, stride=1, padding=smoothing // 2,
        count_include_pad=False,
    )[0]
    return smoothed > threshold


def crop_to_body(plan: SpinePlan, keys: KeysCollection = "image") -> List[Any]:
    """Crop ``image`` (1, X, Y, Z) to the body's bounding box + ``plan.body_margin`` voxels.

    Invertible: the inverse pads back with zeros, which are background logits after argmax
    (every class 0 -> class 0). Empty when ``plan.crop_to_body`` is off.
    """
    if not plan.crop_to_body:
        return []
    return [
        CropForegroundd(
            keys=keys,
            source_key="image",
            select_fn=lambda img: body_mask(img, plan.body_threshold),
            margin=plan.body_margin,
            allow_smaller=True,
        )
    ]


class RandSliceStretchd(RandomizableTransform, MapTransform):
    """Imitate a per-slice normalised, clipped export: with probability ``prob``, every slice
    along ``slice_axis`` is rescaled on its own so that its minimum is 0 and its top
    ``saturation`` fraction of voxels (drawn per slice from the range) is clipped at 1.

    Why: some sites (in the dev data, SPIDER export group B) window every sagittal slice
    separately; vertebral marrow then comes out as bright as discs and the starter model lost
    whole levels there (spider_141). Values stay 0..1, shapes unchanged: ``slice_axis`` 1 for a
    volume ``(1, X, Y, Z)``, 0 for a slab of sagittal slices ``(S, Y, Z)``.
    """

    def __init__(self, keys: KeysCollection, prob: float = 0.2, slice_axis: int = 1,
                 saturation: tuple = (0.02, 0.06)):
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys)
        self.slice_axis, self.saturation = slice_axis, saturation

    def __call__(self, data: Mapping[Hashable, Any]) -> Dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            image = torch.as_tensor(d[key])
            slices = image.movedim(self.slice_axis, 0)
            flat = slices.reshape(slices.shape[0], -1).float()
            q = torch.as_tensor(1 - self.R.uniform(*self.saturation, size=flat.shape[0]), dtype=flat.dtype)
            top = torch.stack([torch.quantile(row, qi) for row, qi in zip(flat, q)])
            low = flat.min(1).values
            scale = (top - low).clamp_min(1e-6)
            shape = (-1,) + (1,) * (slices.ndim - 1)
            stretched = ((slices - low.view(shape)) / scale.view(shape)).clamp(0, 1)
            d[key] = stretched.movedim(0, self.slice_axis).to(image.dtype)
        return d


def thick_slice_slab(volume: np.ndarray, centre: int, half: int, window: Tuple[slice, ...],
                     spacing_factor: float, phase: float) -> np.ndarray:
    """The slab a thick-slice scan would give: the sagittal slices ``centre - half ..
    centre + half`` of ``volume`` ``(X, Y, Z)`` (cut to the in-plane ``window``), as they
    come out when the same anatomy is acquired as slices ``spacing_factor`` model slices
    apart and as thick (a box average over that width, first one at ``centre + phase``) and
    then resampled linearly back onto the model's grid. Returns ``(2 * half + 1, Y', Z')``
    float32; the scan's edge slices are repeated beyond it.

    Why: clinical sagittal T2 series have 3-4 mm slices, the development scans 1 mm; at the
    model's 2 mm a 4 mm series has every other slice interpolated and each one blurred over
    its thickness, which the starter model never saw in training (``python -m lib.evaluate
    --slice-mm 4`` measures what that costs; model card, *Thick slices*).
    """
    if spacing_factor < 1:
        raise ValueError(f"spacing_factor must be >= 1 model slice, got {spacing_factor}")
    last = volume.shape[0] - 1

    def at(positions: np.ndarray) -> np.ndarray:
        """Linear interpolation of ``volume`` along X at fractional ``positions`` (edges repeated)."""
        positions = np.clip(positions, 0, last)
        low = np.floor(positions).astype(int)
        high = np.minimum(low + 1, last)
        w = (positions - low).astype(np.float32)[:, None, None]
        return (1 - w) * volume[(low,) + window] + w * volume[(high,) + window]

    targets = np.arange(centre - half, centre + half + 1, dtype=float)
    first = np.floor((targets[0] - centre - phase) / spacing_factor) - 1
    count = int(np.ceil((targets[-1] - targets[0]) / spacing_factor)) + 3
    acquired = centre + phase + spacing_factor * (first + np.arange(count))  # slice centres
    offsets = np.linspace(-0.5, 0.5, 5) * spacing_factor  # the box each thick slice averages
    thick = np.stack([at(acquired + o) for o in offsets]).mean(0)
    # back onto the model's grid: linear between the two acquired slices around each target
    index = np.clip(np.searchsorted(acquired, targets) - 1, 0, count - 2)
    w = ((targets - acquired[index]) / spacing_factor).astype(np.float32)[:, None, None]
    return ((1 - w) * thick[index] + w * thick[index + 1]).astype(np.float32)


def intensity_augmentation(slice_axis: int) -> List[Any]:
    """MR-style intensity augmentation of ``image`` (values 0..1), one list for the server's
    train task and the CPU recipe: bias field, gamma, a monotonic non-linear remap
    (histogram shift), scale, shift, noise, bright or dark specks (small coarse
    dropout filled with random values, for speckled marrow such as spider_141's, whose L2
    and L3 the starter model largely missed), and :class:`RandSliceStretchd`
    (``slice_axis``: where the sagittal slices are)."""
    return [
        RandBiasFieldd(keys="image", prob=0.3, coeff_range=(0.0, 0.3)),
        RandSliceStretchd(keys="image", prob=0.2, slice_axis=slice_axis),
        RandAdjustContrastd(keys="image", prob=0.3, gamma=(0.5, 1.5)),
        RandHistogramShiftd(keys="image", prob=0.2, num_control_points=(5, 12)),
        RandCoarseDropoutd(keys="image", prob=0.2, holes=20, max_holes=80, spatial_size=2, max_spatial_size=6,
                           fill_value=(0.0, 1.0)),
        RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
        RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
        RandGaussianNoised(keys="image", prob=0.2, std=0.03),
    ]


def infer_pre_transforms(plan: SpinePlan) -> List[Any]:
    """Scan file/folder -> ``image`` (1, X, Y, Z) in RAS at the plan's spacing, values 0..1,
    cropped to the body (air removed) when ``plan.crop_to_body``."""
    return load_and_resample(["image"], plan) + crop_to_body(plan)


def train_pre_transforms(plan: SpinePlan) -> List[Any]:
    """Image + label -> ``plan.num_samples`` random ROI crops with MR-style augmentation.

    Flips only left-right: superior/inferior order is what defines the levels.
    """
    keys = ["image", "label"]
    return load_and_resample(keys, plan, label_key="label") + [
        SpatialPadd(keys=keys, spatial_size=plan.train_roi_size),
        RandCropByPosNegLabeld(
            keys=keys,
            label_key="label",
            spatial_size=plan.train_roi_size,
            pos=2,
            neg=1,
            num_samples=plan.num_samples,
            image_key="image",
            allow_smaller=False,
        ),
        RandAffined(
            keys=keys,
            prob=0.3,
            rotate_range=(math.radians(10),) * 3,
            scale_range=(0.1,) * 3,
            mode=("bilinear", "nearest"),
            padding_mode="zeros",
        ),
        RandFlipd(keys=keys, spatial_axis=0, prob=0.5),
        *intensity_augmentation(slice_axis=1),
        CastToTyped(keys=keys, dtype=(torch.float32, torch.uint8)),
    ]


def val_pre_transforms(plan: SpinePlan, keep_ignore: bool = False) -> List[Any]:
    """Whole validation volumes (sliding-window inference follows); ``keep_ignore`` keeps 255."""
    return load_and_resample(["image", "label"], plan, label_key="label", keep_ignore=keep_ignore)


def discrete_post_transforms(plan: SpinePlan) -> List[Any]:
    """Logits (12, X, Y, Z) -> label map (X, Y, Z) uint8 on the same grid, by the plan's
    ``label_decision`` (kind first, then level: :mod:`lib.pipeline.grouping`)."""
    return [StructureDecisiond(keys="pred", decision=plan.label_decision)]
