"""Procedural 64x64 scenes: shapes with nuisance attributes, pure numpy and vectorised.

A scene has one object class (drawn 1-3 times), a colour, a size, a position
layout, a rendering style and a background. Everything is drawn from a
`SceneDistribution`, so a task is just a different distribution over the same
nuisances. Generation is deterministic given a `numpy.random.Generator`.

Look-alike confounds are kept on purpose: an outlined ("sketch") circle
resembles a ring, pixelation merges round shapes, blur turns a star into a
blob. They are what makes the wording of a prompt matter.
"""

from __future__ import annotations

import dataclasses

import numpy as np

IMAGE_SIZE = 64

CLASS_NAMES: tuple[str, ...] = (
    "circle", "square", "triangle", "diamond", "plus sign",
    "x mark", "ring", "star", "heart", "arrow",
)
PLURALS: dict[str, str] = {name: name + "s" for name in CLASS_NAMES}

COLOURS: tuple[str, ...] = (
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "gray")
_COLOUR_RGB = np.array([
    (0.86, 0.10, 0.10), (1.00, 0.55, 0.00), (0.95, 0.85, 0.10),
    (0.10, 0.65, 0.20), (0.15, 0.35, 0.95), (0.58, 0.20, 0.78),
    (1.00, 0.50, 0.75), (0.60, 0.36, 0.16), (0.55, 0.55, 0.55)], np.float32)

SIZES: tuple[str, ...] = ("small", "medium", "large")
# Radius range [lo, hi] (pixels) by count (rows: 1, 2, 3 objects) and size.
_RADIUS = np.array([
    [(8, 10), (11, 12), (13, 15)],
    [(8, 9), (10, 11), (12, 13)],
    [(8, 8), (9, 10), (11, 12)]], np.float32)

COUNTS: tuple[int, ...] = (1, 2, 3)
STYLES: tuple[str, ...] = ("photo", "sketch", "pixelated", "blurry", "noisy")
BACKGROUNDS: tuple[str, ...] = ("white", "dark", "striped", "dotted", "checkered")
# Position words for a single object: (column third, row third) of its centre.
HORIZONTAL: tuple[str, ...] = ("left", "center", "right")
VERTICAL: tuple[str, ...] = ("top", "middle", "bottom")

ATTRIBUTES: dict[str, tuple] = {
    "colour": COLOURS, "size": SIZES, "count": COUNTS, "style": STYLES,
    "background": BACKGROUNDS,
}


def _uniform(n: int) -> tuple[float, ...]:
  return (1.0,) * n


@dataclasses.dataclass(frozen=True)
class SceneDistribution:
  """Unnormalised weights over each attribute's values (same order as the tuples above)."""
  classes: tuple[float, ...] = _uniform(len(CLASS_NAMES))
  colour: tuple[float, ...] = _uniform(len(COLOURS))
  size: tuple[float, ...] = _uniform(len(SIZES))
  count: tuple[float, ...] = _uniform(len(COUNTS))
  style: tuple[float, ...] = _uniform(len(STYLES))
  background: tuple[float, ...] = _uniform(len(BACKGROUNDS))

  def __post_init__(self):
    for field in dataclasses.fields(self):
      w = getattr(self, field.name)
      expected = len(CLASS_NAMES) if field.name == "classes" else len(ATTRIBUTES[field.name])
      if len(w) != expected or min(w) < 0 or sum(w) <= 0:
        raise ValueError(f"SceneDistribution.{field.name} needs {expected} non-negative "
                         f"weights with a positive sum, got {w!r}")


def one_hot_weights(values: tuple, chosen: dict) -> tuple[float, ...]:
  """Weights for `values` from a {value: weight} dict (missing values weigh 0)."""
  return tuple(float(chosen.get(v, 0.0)) for v in values)


MIX = SceneDistribution()
# The curriculum's easy world: solid shapes, plain background, one object.
EASY = SceneDistribution(
    style=one_hot_weights(STYLES, {"photo": 1}),
    background=one_hot_weights(BACKGROUNDS, {"white": 1}),
    count=one_hot_weights(COUNTS, {1: 1}))


@dataclasses.dataclass
class SceneBatch:
  """Attributes (int indices into the tuples above) and the rendered images."""
  label: np.ndarray  # [N] class index
  colour: np.ndarray
  size: np.ndarray
  count: np.ndarray  # [N] index into COUNTS (count - 1)
  style: np.ndarray
  background: np.ndarray
  hpos: np.ndarray  # [N] index into HORIZONTAL for single objects, else -1
  vpos: np.ndarray  # [N] index into VERTICAL for single objects, else -1
  images: np.ndarray  # uint8 [N, 64, 64, 3]

  def __len__(self) -> int:
    return len(self.label)

  def take(self, idx) -> "SceneBatch":
    return SceneBatch(**{f.name: getattr(self, f.name)[idx]
                         for f in dataclasses.fields(self)})


def _choice(rng: np.random.Generator, weights, n: int) -> np.ndarray:
  p = np.asarray(weights, np.float64)
  return rng.choice(len(p), size=n, p=p / p.sum()).astype(np.int32)


# ---------------------------------------------------------------------------
# Shapes: boolean masks in object coordinates (u right, v down, radius 1).


def _star(u, v):
  theta = np.arctan2(u, -v)  # 0 = pointing up.
  sector = 2 * np.pi / 5
  phi = np.abs(np.mod(theta + sector / 2, sector) - sector / 2)
  rho = np.hypot(u, v)
  inner = 0.42
  p1 = np.array([1.0, 0.0])
  p2 = np.array([inner * np.cos(sector / 2), inner * np.sin(sector / 2)])
  normal = np.array([p2[1] - p1[1], -(p2[0] - p1[0])])
  if normal @ p1 < 0:
    normal = -normal
  return rho * (np.cos(phi) * normal[0] + np.sin(phi) * normal[1]) <= normal @ p1


def _heart(u, v):
  x = u * 1.14
  y = -v * 1.1 + 0.12
  return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0


def _arrow(u, v):
  shaft = (np.abs(v) <= 0.22) & (u >= -0.95) & (u <= 0.15)
  head = (u >= 0.05) & (u <= 0.95) & (np.abs(v) <= 0.85 * (0.95 - u) / 0.9)
  return shaft | head


def _x_mark(u, v):
  a, b = (u + v) / np.sqrt(2), (u - v) / np.sqrt(2)
  return ((np.abs(a) <= 0.22) & (np.abs(b) <= 1.0)) | ((np.abs(b) <= 0.22) & (np.abs(a) <= 1.0))


_SHAPES = {
    "circle": lambda u, v: u * u + v * v <= 1.0,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.82,
    "triangle": lambda u, v: (v <= 0.75) & (np.abs(u) <= (v + 0.95) * (1.0 / 1.7)),
    "diamond": lambda u, v: np.abs(u) + np.abs(v) <= 1.0,
    "plus sign": lambda u, v: (((np.abs(u) <= 0.28) & (np.abs(v) <= 0.95))
                               | ((np.abs(v) <= 0.28) & (np.abs(u) <= 0.95))),
    "x mark": _x_mark,
    "ring": lambda u, v: (u * u + v * v <= 1.0) & (u * u + v * v >= 0.55 ** 2),
    "star": _star,
    "heart": _heart,
    "arrow": _arrow,
}
assert tuple(_SHAPES) == CLASS_NAMES


def _outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
  """Pixels of `mask` [N, H, W] within `width` 4-neighbour steps of its border."""
  inner = mask
  for _ in range(width):
    padded = np.pad(inner, ((0, 0), (1, 1), (1, 1)))
    inner = (inner & padded[:, :-2, 1:-1] & padded[:, 2:, 1:-1]
             & padded[:, 1:-1, :-2] & padded[:, 1:-1, 2:])
  return mask & ~inner


# ---------------------------------------------------------------------------
# Layout: centres and radii of up to three objects.


def _layout(rng, count_idx, size_idx):
  """Centres [N, 3, 2] (x, y), radii [N] and single-object position words."""
  n = len(count_idx)
  lo = _RADIUS[count_idx, size_idx, 0]
  hi = _RADIUS[count_idx, size_idx, 1]
  radius = lo + rng.random(n).astype(np.float32) * (hi - lo)
  s = float(IMAGE_SIZE)
  margin = radius + 1.0
  centres = np.zeros((n, 3, 2), np.float32)
  # One object: anywhere it fits.
  span = s - 2 * margin
  one = margin[:, None] + rng.random((n, 2)).astype(np.float32) * span[:, None]
  centres[:, 0] = one
  # Two objects: side by side, horizontally or vertically, with jitter.
  jitter = rng.uniform(-3, 3, (n, 3, 2)).astype(np.float32)
  vertical = rng.random(n) < 0.5
  across = margin + rng.random(n).astype(np.float32) * span
  two = np.stack([np.stack([np.full(n, s * 0.27), across], -1),
                  np.stack([np.full(n, s * 0.73), across], -1)], 1)
  two[vertical] = two[vertical][..., ::-1]
  two = np.concatenate([two, two[:, :1]], 1)  # Unused third slot.
  # Three objects: a triangle or a diagonal.
  tri = np.array([[s * 0.5, s * 0.25], [s * 0.24, s * 0.74], [s * 0.76, s * 0.74]], np.float32)
  diag = np.array([[s * 0.22, s * 0.22], [s * 0.5, s * 0.5], [s * 0.78, s * 0.78]], np.float32)
  flip = rng.random(n) < 0.5
  three = np.where((rng.random(n) < 0.5)[:, None, None], tri[None], diag[None]).copy()
  three[flip, :, 0] = s - three[flip, :, 0]
  centres = np.where((count_idx == 1)[:, None, None], two + jitter, centres)
  centres = np.where((count_idx == 2)[:, None, None], three + jitter, centres)
  centres = np.clip(centres, margin[:, None, None], s - margin[:, None, None])
  hpos = np.minimum((centres[:, 0, 0] / (s / 3)).astype(np.int32), 2)
  vpos = np.minimum((centres[:, 0, 1] / (s / 3)).astype(np.int32), 2)
  single = count_idx == 0
  return centres, radius, np.where(single, hpos, -1), np.where(single, vpos, -1)


# ---------------------------------------------------------------------------
# Backgrounds and styles.


def _backgrounds(rng, bg_idx):
  n = len(bg_idx)
  s = IMAGE_SIZE
  yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
  img = np.empty((n, s, s, 3), np.float32)
  tint = rng.uniform(-0.04, 0.04, (n, 1, 1, 3)).astype(np.float32)
  # white / plain
  img[:] = 0.95
  dark = bg_idx == 1
  img[dark] = 0.08
  pattern_a = rng.uniform(0.80, 0.95, (n, 1, 1, 3)).astype(np.float32)
  pattern_b = pattern_a - rng.uniform(0.2, 0.35, (n, 1, 1, 1)).astype(np.float32)
  period = rng.integers(6, 11, n).astype(np.float32)[:, None, None]
  phase = rng.uniform(0, 20, n).astype(np.float32)[:, None, None]
  orient = rng.integers(0, 3, n)[:, None, None]
  coord = np.where(orient == 0, yy[None], np.where(orient == 1, xx[None], xx[None] + yy[None]))
  stripes = np.mod(coord + phase, period) < period / 2
  dots = (np.hypot(np.mod(xx[None] + phase, period) - period / 2,
                   np.mod(yy[None] + phase, period) - period / 2) < period * 0.22)
  checks = (np.mod(np.floor((xx[None] + phase) / period) + np.floor((yy[None] + phase) / period),
                   2) == 0)
  for k, pat in ((2, stripes), (3, dots), (4, checks)):
    sel = bg_idx == k
    img[sel] = np.where(pat[sel][..., None], pattern_b[sel], pattern_a[sel])
  return np.clip(img + tint, 0, 1)


def _box_blur(img, radius):
  """Separable box blur of [N, H, W, C] with edge padding."""
  k = 2 * radius + 1
  for axis in (1, 2):
    pad = [(0, 0)] * 4
    pad[axis] = (radius + 1, radius)
    c = np.cumsum(np.pad(img, pad, mode="edge"), axis=axis)
    hi = np.take(c, np.arange(k, k + img.shape[axis]), axis=axis)
    lo = np.take(c, np.arange(0, img.shape[axis]), axis=axis)
    img = (hi - lo) / k
  return img


def _apply_styles(rng, img, style_idx):
  s = img.shape[1]
  pix = style_idx == 2
  if pix.any():
    b = 4
    blocks = img[pix].reshape(-1, s // b, b, s // b, b, 3).mean(axis=(2, 4))
    img[pix] = np.repeat(np.repeat(blocks, b, axis=1), b, axis=2)
  blur = style_idx == 3
  if blur.any():
    img[blur] = _box_blur(_box_blur(img[blur], 2), 1)
  noisy = style_idx == 4
  if noisy.any():
    img[noisy] = img[noisy] + rng.normal(0, 0.22, img[noisy].shape).astype(np.float32)
  # A little sensor noise everywhere, so no style is pixel-perfect.
  img += rng.normal(0, 0.015, img.shape).astype(np.float32)
  return img


# ---------------------------------------------------------------------------


def sample_scenes(rng: np.random.Generator, n: int,
                  dist: SceneDistribution = MIX,
                  labels: np.ndarray | None = None, render: bool = True) -> SceneBatch:
  """Draws and renders `n` scenes.

  Args:
    rng: the random generator (the only source of randomness).
    n: number of scenes.
    dist: the attribute distribution.
    labels: optional fixed class indices [n] (e.g. balanced test sets);
      drawn from `dist.classes` when None.
    render: False draws the attributes only (the same ones: every rendering draw
      comes after them) and leaves `images` empty [n, 0, 0, 3]; captions need no pixels.

  Returns:
    A `SceneBatch` with uint8 images [n, 64, 64, 3].
  """
  label = (_choice(rng, dist.classes, n) if labels is None
           else np.asarray(labels, np.int32).reshape(n))
  colour = _choice(rng, dist.colour, n)
  size = _choice(rng, dist.size, n)
  count = _choice(rng, dist.count, n)
  style = _choice(rng, dist.style, n)
  background = _choice(rng, dist.background, n)
  centres, radius, hpos, vpos = _layout(rng, count, size)
  images = (_render(rng, label, colour, count, style, background, centres, radius) if render
            else np.zeros((n, 0, 0, 3), np.uint8))
  return SceneBatch(label=label, colour=colour, size=size, count=count, style=style,
                    background=background, hpos=hpos.astype(np.int32),
                    vpos=vpos.astype(np.int32), images=images)


def _render(rng, label, colour, count, style, background, centres, radius) -> np.ndarray:
  """uint8 [N, 64, 64, 3] of drawn attributes; its draws from `rng` come after theirs."""
  n = len(label)
  img = _backgrounds(rng, background)
  # Object colour: a slightly jittered palette colour.
  rgb = np.clip(_COLOUR_RGB[colour] + rng.uniform(-0.05, 0.05, (n, 3)).astype(np.float32), 0, 1)
  s = IMAGE_SIZE
  grid = np.arange(s, dtype=np.float32) + 0.5
  sketch = style == 1
  line_width = rng.integers(1, 3, n)  # 1-2 px outlines for sketches.
  for slot in range(3):
    present = count >= slot
    for c, name in enumerate(CLASS_NAMES):
      idx = np.nonzero(present & (label == c))[0]
      if idx.size == 0:
        continue
      r = radius[idx][:, None, None]
      u = (grid[None, None, :] - centres[idx, slot, 0][:, None, None]) / r
      v = (grid[None, :, None] - centres[idx, slot, 1][:, None, None]) / r
      mask = _SHAPES[name](u, v)
      sk = sketch[idx]
      if sk.any():
        thin = _outline(mask[sk], 1)
        thick = _outline(mask[sk], 2)
        mask[sk] = np.where((line_width[idx][sk] == 2)[:, None, None], thick, thin)
      img[idx] = np.where(mask[..., None], rgb[idx][:, None, None, :], img[idx])
  img = _apply_styles(rng, img, style)
  return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def preprocess(images: np.ndarray,
               mean=(0.48145466, 0.4578275, 0.40821073),
               std=(0.26862954, 0.26130258, 0.27577711)) -> np.ndarray:
  """uint8 [N, H, W, 3] -> CLIP-normalised float32 (the model's input)."""
  x = images.astype(np.float32) / 255.0
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
