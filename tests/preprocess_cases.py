"""Image sizes that cover every branch of Step3p7ImageProcessor's crop plan, and the deterministic
synthetic images used for them.  Shared by ``scripts/record_preprocess_fixtures.py`` (which runs the
transformers processor, needing torchvision) and ``tests/test_preprocess.py`` (which does not)."""

from __future__ import annotations

import numpy as np

# (width, height, branch)
CASES = [
    (1, 1, "tiny"),
    (10, 10, "tiny"),
    (20, 31, "tiny"),
    (31, 31, "tiny"),
    (30, 100, "tiny, elongated within 728 (window = short side)"),
    (200, 20, "extreme aspect: square pad"),
    (20, 300, "extreme aspect: square pad"),
    (8, 40, "extreme aspect: square pad"),
    (1, 500, "extreme aspect: square pad"),
    (3100, 25, "extreme aspect: square pad, then over max size"),
    (500, 400, "fits the global view, not elongated"),
    (728, 728, "exactly the global view"),
    (700, 500, "fits, aspect 1.4"),
    (700, 300, "elongated within 728"),
    (720, 200, "elongated within 728"),
    (100, 720, "elongated within 728, portrait"),
    (729, 729, "just over 728"),
    (3000, 500, "very elongated, > 728"),
    (2000, 300, "very elongated, short side < 504"),
    (400, 2400, "very elongated, portrait"),
    (1000, 800, "standard"),
    (1512, 1008, "exact multiples of 504"),
    (1008, 1008, "exact multiples of 504"),
    (504, 1008, "exact multiple, 1x2"),
    (1100, 900, "snap down (remainder < 20%)"),
    (1120, 1200, "snap up (remainder > 20%)"),
    (605, 800, "snap up at the edge (101 > 100.8)"),
    (604, 800, "snap down at the edge (100 < 100.8)"),
    (4000, 3000, "over the max size"),
    (6048, 2016, "over the max size, exact ratio"),
    (3500, 3500, "over the max size, square"),
    (3025, 1000, "just over the max size"),
    (2900, 700, "very elongated? ratio 4.14, standard window"),
    (1300, 320, "ratio 4.06 > 4: window = short side 320"),
]


def synthetic_image(width: int, height: int) -> np.ndarray:
    """A deterministic uint8 RGB image with gradients, edges and texture (resampling differences show)."""
    rng = np.random.default_rng(width * 7919 + height)
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    r = 255 * x * np.ones_like(y)
    g = 255 * y * np.ones_like(x)
    b = 127 + 120 * np.sin(12 * x + 7 * y) * np.cos(9 * y)
    img = np.stack([r, g, b], -1)
    img += rng.normal(0, 12, size=img.shape).astype(np.float32)
    img[(np.arange(height) // 16 % 2 == 0)[:, None] & (np.arange(width) // 16 % 2 == 0)[None, :]] *= 0.7
    return np.clip(img, 0, 255).astype(np.uint8)
