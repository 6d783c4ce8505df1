"""Few-shot toy tasks: the object class is the label, nuisances follow a task's distribution.

`build_toy_task(name, shots, seed)` gives a `FewShotTask` whose images are
rendered on demand from their reference `toy:<task>:<split>:<index>`. Image
`index` of a split has class `index % num_classes` and is rendered in chunks
of `CHUNK` scenes from a generator keyed by (task, split, chunk), so every ref
always shows the same image. The test set (100 images per class) does not
depend on the few-shot seed; train and val items do.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib

import numpy as np

from lmbbo_jax.data.task import DatasetError, FewShotTask, Item
from lmbbo_jax.toyworld import scenes
from lmbbo_jax.toyworld.scenes import BACKGROUNDS, COUNTS, SIZES, STYLES, one_hot_weights

CHUNK = 250
TEST_PER_CLASS = 100
MAX_SHOTS = 64
_SPLIT_IDS = {"train": 1, "val": 2, "test": 3}


@dataclasses.dataclass(frozen=True)
class ToyTaskSpec:
  """A named scene distribution and what it is for."""
  distribution: scenes.SceneDistribution
  description: str


TOY_TASKS: dict[str, ToyTaskSpec] = {
    "mix": ToyTaskSpec(
        scenes.MIX,
        "the training mix: every style, background, size, count and colour, uniformly"),
    "sketch_dark": ToyTaskSpec(
        scenes.SceneDistribution(
            style=one_hot_weights(STYLES, {"sketch": 1}),
            background=one_hot_weights(BACKGROUNDS, {"dark": 3, "striped": 1}),
            count=one_hot_weights(COUNTS, {1: 2, 2: 1})),
        "1-2 px outline sketches on dark (or striped) backgrounds; an outlined circle "
        "looks like a ring"),
    "pixel_clutter": ToyTaskSpec(
        scenes.SceneDistribution(
            style=one_hot_weights(STYLES, {"pixelated": 1}),
            background=one_hot_weights(BACKGROUNDS, {"striped": 1, "dotted": 1,
                                                     "checkered": 1}),
            count=one_hot_weights(COUNTS, {3: 1}),
            size=one_hot_weights(SIZES, {"medium": 1, "large": 1})),
        "three pixelated objects (4x4 blocks) on patterned backgrounds; round shapes merge"),
    "blurry_noisy": ToyTaskSpec(
        scenes.SceneDistribution(
            style=one_hot_weights(STYLES, {"blurry": 1, "noisy": 1})),
        "blurred or grainy scenes, any background and count; a blurry star looks like a blob"),
    "easy": ToyTaskSpec(
        scenes.EASY,
        "the curriculum's easy world: one solid object on a plain background (a sanity check)"),
}


def _task_key(task: str) -> int:
  return zlib.crc32(task.encode("utf-8"))


@functools.lru_cache(maxsize=16)
def render_chunk(task: str, split: str, chunk: int) -> np.ndarray:
  """uint8 [CHUNK, 64, 64, 3]: images chunk*CHUNK .. (chunk+1)*CHUNK-1 of a task split."""
  spec = TOY_TASKS[task]
  num = len(scenes.CLASS_NAMES)
  labels = (chunk * CHUNK + np.arange(CHUNK)) % num
  rng = np.random.default_rng([_task_key(task), _SPLIT_IDS[split], chunk])
  images = scenes.sample_scenes(rng, CHUNK, spec.distribution, labels=labels).images
  images.setflags(write=False)
  return images


def parse_ref(ref: str) -> tuple[str, str, int]:
  """`toy:<task>:<split>:<index>` -> (task, split, index); raises DatasetError."""
  parts = ref.split(":")
  if (len(parts) != 4 or parts[0] != "toy" or parts[1] not in TOY_TASKS
      or parts[2] not in _SPLIT_IDS or not parts[3].isdigit()):
    raise DatasetError(f"bad toy image reference {ref!r}; expected toy:<task>:<split>:<index> "
                       f"with task in {sorted(TOY_TASKS)}")
  return parts[1], parts[2], int(parts[3])


def render_ref(ref: str) -> np.ndarray:
  """The uint8 [64, 64, 3] image of a toy reference."""
  task, split, index = parse_ref(ref)
  return render_chunk(task, split, index // CHUNK)[index % CHUNK]


def render_refs(refs: list[str]) -> np.ndarray:
  """uint8 [N, 64, 64, 3] for many references (chunk-cached, fast for whole splits)."""
  return np.stack([render_ref(r) for r in refs]) if refs else np.zeros((0, 64, 64, 3), np.uint8)


class ToyTask(FewShotTask):
  """A `FewShotTask` whose images are rendered from their references."""

  def _load(self, item: Item) -> np.ndarray:
    return render_ref(item.ref)

  def load_images(self, items) -> np.ndarray:
    """uint8 [N, 64, 64, 3] for `items`, without per-image decoding."""
    return render_refs([it.ref for it in items])


def _shot_items(task: str, split: str, shots: int, seed: int) -> list[Item]:
  num = len(scenes.CLASS_NAMES)
  return [Item(f"toy:{task}:{split}:{(seed * MAX_SHOTS + j) * num + c}", c)
          for j in range(shots) for c in range(num)]


def build_toy_task(task_name: str, shots: int, seed: int) -> ToyTask:
  """The few-shot task `task_name` with `shots` train and min(4, shots) val images per class.

  Args:
    task_name: a key of `TOY_TASKS`.
    shots: train images per class (1..64).
    seed: few-shot seed (>= 0); picks which train/val images are drawn.

  Returns:
    A `ToyTask` with a fixed test set of 100 images per class.
  """
  if task_name not in TOY_TASKS:
    raise DatasetError(f"unknown toy task {task_name!r}; choose one of "
                       f"{', '.join(sorted(TOY_TASKS))}")
  if not 1 <= int(shots) <= MAX_SHOTS:
    raise DatasetError(f"toy tasks support 1..{MAX_SHOTS} shots, got {shots}")
  if int(seed) < 0:
    raise DatasetError(f"toy task seed must be >= 0, got {seed}")
  shots, seed = int(shots), int(seed)
  num = len(scenes.CLASS_NAMES)
  test = [Item(f"toy:{task_name}:test:{i}", i % num) for i in range(TEST_PER_CLASS * num)]
  spec = TOY_TASKS[task_name]
  return ToyTask(
      f"toy:{task_name}", scenes.CLASS_NAMES,
      _shot_items(task_name, "train", shots, seed),
      _shot_items(task_name, "val", min(4, shots), seed), test,
      shots=shots, seed=seed, source="toy",
      info={"description": spec.description, "image_size": scenes.IMAGE_SIZE})
