"""Inspect a few-shot task: `python -m lmbbo_jax.data --dataset=... --shots=1 --seed=1 --json`.

Prints the class count, per-split image counts and the first class names; exits non-zero
with one line on a bad source.
"""

from __future__ import annotations

import json
import sys

from absl import app
from absl import flags
from absl import logging

_DATASET = flags.DEFINE_string(
    "dataset", None,
    "Benchmark name, coop:/path/to/DATA/<dir>, folder:/path, wds:/path, wds:hf:<owner>/<name> "
    "or toy:<task>.")
_SHOTS = flags.DEFINE_integer("shots", 1, "Train images per class.")
_SEED = flags.DEFINE_integer("seed", 1, "Few-shot seed.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "TFDS data dir (benchmark names) or CoOp DATA root (coop:<name>).")
_MAX_TEST = flags.DEFINE_integer("max_test_per_class", None, "Cap test images per class.")
_NUM_NAMES = flags.DEFINE_integer("num_names", 5, "How many class names to print.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object.")


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    return 2
  # TFDS logs warnings about missing metadata; the CLI's answer is its own one line.
  logging.set_verbosity(logging.ERROR)
  from lmbbo_jax import data  # pylint: disable=g-import-not-at-top
  if not _DATASET.value:
    print("error: --dataset is required (e.g. --dataset=caltech101)", file=sys.stderr)
    return 2
  try:
    task = data.build_task(_DATASET.value, _SHOTS.value, _SEED.value,
                           data_dir=_DATA_DIR.value, max_test_per_class=_MAX_TEST.value)
  except data.DatasetError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  summary = task.describe(num_names=_NUM_NAMES.value)
  if _JSON.value:
    print(json.dumps(summary, ensure_ascii=False))
  else:
    print(f"{summary['name']}: {summary['num_classes']} classes, shots={summary['shots']}, "
          f"seed={summary['seed']}")
    for split, count in summary["splits"].items():
      print(f"  {split}: {count} images")
    print("  classes: " + ", ".join(repr(c) for c in summary["class_names_head"]))
  return 0


def run() -> None:
  app.run(main)


if __name__ == "__main__":
  run()
