"""Writes a generated image folder for a shipped class list (offline stand-in for a dataset).

  python -m lmbbo_jax.tools.image_folder --class_names=caltech101 --per_class=8 \
      --out=/tmp/caltech101_images

Leaves `OUT/<class name>/<i>.png` (a seeded colour field per class plus noise, so the
folder is the same on every machine) and `OUT/classes.txt` (one class name per line),
the input of `python -m lmbbo_jax.main --dataset=folder:OUT` and of
a PyTorch peer run on the same classes (README, "Profiling prompt throughput"). It measures speed, not
accuracy: the images carry no meaning for a real CLIP.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags (defined when run, so that importing this module defines none)."""
  flags.DEFINE_string("class_names", "caltech101",
                      "a shipped class list (lmbbo_jax.data.classnames)")
  flags.DEFINE_integer("per_class", 8, "images per class")
  flags.DEFINE_integer("size", 64, "image side in pixels")
  flags.DEFINE_integer("seed", 0, "seed of the generated pixels")
  flags.DEFINE_string("out", None, "output folder (created; must be empty or absent)")


def write_folder(out: pathlib.Path, names: list[str], per_class: int, size: int,
                 seed: int) -> None:
  from PIL import Image
  bad = [n for n in names if "/" in n or n in ("", ".", "..")]
  if bad:
    raise ValueError(f"class names {bad[:3]} cannot be folder names")
  rng = np.random.default_rng(seed)
  out.mkdir(parents=True, exist_ok=True)
  for name in names:
    folder = out / name
    folder.mkdir(exist_ok=True)
    colour = rng.uniform(0, 255, 3)
    for i in range(per_class):
      pixels = np.clip(colour + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
      Image.fromarray(pixels).save(folder / f"{i}.png")
  (out / "classes.txt").write_text("".join(n + "\n" for n in names), encoding="utf-8")


def main(argv):
  del argv
  from lmbbo_jax.data.classnames import class_names
  if not FLAGS.out:
    print("error: --out=DIR is required", file=sys.stderr)
    return 2
  out = pathlib.Path(FLAGS.out)
  if out.exists() and any(out.iterdir()):
    print(f"error: {out} is not empty; pass a new folder", file=sys.stderr)
    return 2
  try:
    names = class_names(FLAGS.class_names)
    write_folder(out, names, FLAGS.per_class, FLAGS.size, FLAGS.seed)
  except (KeyError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"{len(names)} classes x {FLAGS.per_class} images in {out}")
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main)
