"""Procedural 16x16 images with spatial structure, quantised to a 16-colour palette.

A sequence is [class token, 256 pixel tokens in raster order]: pixel tokens are palette indices
0..15, class tokens 16..23. The prompt is the class token alone, so the grid starts at
position 1 (the prompt length) with row width 16.
"""

from __future__ import annotations

import numpy as np

SIZE = 16
PALETTE = np.array([
    [0, 0, 0], [255, 255, 255], [200, 30, 40], [240, 120, 30], [250, 210, 50], [60, 170, 70],
    [20, 100, 60], [50, 110, 210], [20, 40, 120], [140, 70, 190], [240, 130, 190], [120, 70, 40],
    [128, 128, 128], [190, 190, 190], [70, 200, 200], [60, 60, 60],
], np.float32) / 255.0
NUM_COLOURS = len(PALETTE)
CLASSES = ("h-stripes", "v-stripes", "checker", "rings", "diagonal", "rectangle", "gradient", "disk")
NUM_CLASSES = len(CLASSES)
VOCAB = NUM_COLOURS + NUM_CLASSES


def quantise(rgb_HxWx3: np.ndarray) -> np.ndarray:
  """Nearest palette colour per pixel: [H, W] int."""
  d = ((rgb_HxWx3[:, :, None, :] - PALETTE[None, None]) ** 2).sum(-1)
  return d.argmin(-1)


def render(cls: int, rng: np.random.Generator) -> np.ndarray:
  """One image of class `cls` as palette indices [16, 16]."""
  y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
  c = PALETTE[rng.choice(NUM_COLOURS, size=3, replace=False)]
  name = CLASSES[cls]
  if name in ("h-stripes", "v-stripes"):
    h, off = rng.integers(1, 5), rng.integers(0, 8)
    idx = (((y if name == "h-stripes" else x) + off) // h).astype(int) % 2
    rgb = c[idx]
  elif name == "checker":
    s = rng.integers(2, 5)
    rgb = c[((x // s) + (y // s)).astype(int) % 2]
  elif name == "rings":
    cy, cx = rng.uniform(3, 12, size=2)
    w = rng.uniform(1.5, 3.0)
    rgb = c[(np.hypot(y - cy, x - cx) // w).astype(int) % 3]
  elif name == "diagonal":
    w, d = rng.integers(2, 5), rng.choice([-1, 1])
    rgb = c[((x + d * y + 64) // w).astype(int) % 2]
  elif name == "rectangle":
    y0, x0 = rng.integers(0, 9, size=2)
    y1, x1 = y0 + rng.integers(4, 8), x0 + rng.integers(4, 8)
    inside = (y >= y0) & (y < y1) & (x >= x0) & (x < x1)
    rgb = np.where(inside[..., None], c[1], c[0])
  elif name == "gradient":  # a smooth blend between two colours: quantisation makes bands
    t = (y if rng.random() < 0.5 else x) / (SIZE - 1)
    rgb = (1 - t[..., None]) * c[0] + t[..., None] * c[1]
  else:  # disk with a soft edge
    cy, cx = rng.uniform(5, 11, size=2)
    r = rng.uniform(3, 6)
    a = np.clip(r + 0.5 - np.hypot(y - cy, x - cx), 0, 1)[..., None]
    rgb = a * c[1] + (1 - a) * c[0]
  return quantise(rgb)


def batch(rng: np.random.Generator, n: int) -> np.ndarray:
  """[n, 257] int32 sequences: class token then the raster-ordered pixels."""
  cls = rng.integers(0, NUM_CLASSES, size=n)
  pix = np.stack([render(int(k), rng).reshape(-1) for k in cls])
  return np.concatenate([NUM_COLOURS + cls[:, None], pix], axis=1).astype(np.int32)


def to_rgb(pixels_256: np.ndarray) -> np.ndarray:
  """[16, 16, 3] colours; a non-pixel token (a sampled class token) shows as black."""
  pix = np.asarray(pixels_256).reshape(SIZE, SIZE)
  return np.where((pix < NUM_COLOURS)[..., None], PALETTE[np.clip(pix, 0, NUM_COLOURS - 1)], 0.0)
