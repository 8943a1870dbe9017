"""The phantoms are pinned: their anatomy builder was split into named parts
(``lib/phantom/``), and a refactoring there must not change a single phantom.

The digests below are of the phantoms the builder made before the split (commit bbbc4d3,
``lib/phantom.py``); a change of the phantoms on purpose updates them in the same commit,
saying why. The image is rounded to 1e-3 of its range before hashing so that the last bit
of a float (which numpy's vectorised maths may set differently on another CPU) does not
count; the label, the affine and the draw's facts count exactly.
"""

import hashlib
import json

import numpy as np
import pytest

from lib.phantom import make_phantom

PINNED = {
    ("tiny", 0): "1cd33aaf8a5725a0",
    ("tiny", 1): "d75928a0df920f09",
    ("tiny", 5): "4d04f154de8c490a",
    ("small", 2): "d8ff289c57ccf1bb",
    ("default", 3): "6dc77856c660dbf5",
}


def phantom_digest(preset: str, seed: int) -> str:
    image, label, affine, info = make_phantom(seed, preset=preset, return_info=True)
    scale = float(image.max() - image.min()) or 1.0
    h = hashlib.sha256()
    h.update(np.round((image - image.min()) / scale * 1000).astype(np.int32).tobytes())
    h.update(np.ascontiguousarray(label).tobytes())
    h.update(np.round(affine, 6).tobytes())
    h.update(json.dumps(info, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("preset,seed", sorted(PINNED))
def test_phantom_is_unchanged(preset, seed):
    assert phantom_digest(preset, seed) == PINNED[(preset, seed)]
