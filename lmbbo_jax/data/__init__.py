"""Few-shot image classification tasks (CoOp protocol) from TFDS, CoOp folders, plain
folders, CLIP_benchmark shards and registered sources; class names, OpenAI's templates
and CLIP preprocessing.

`build_task(dataset, shots, seed)` accepts:
- a benchmark name (`caltech101`, `oxford_pets`, ... or a TFDS/CoOp alias) -> TFDS;
- `coop:/path/to/DATA/<dataset dir>` -> CoOp's folders and split files (the reference
  protocol; `coop:<name>` with `data_dir=DATA` works too);
- `folder:/path` -> `path/<class name>/*.jpg`;
- `wds:/path` or `wds:hf:<owner>/<name>` -> CLIP_benchmark's webdataset shards (a folder,
  or a hub dataset repo such as `clip-benchmark/wds_cars`), with the dataset's templates;
- a prefix registered with `extensions.register("dataset", PREFIX, build)` ->
  `build(rest, shots, seed)`; the package registers the toy world's `toy:<task>`.
"""

from __future__ import annotations


from lmbbo_jax import extensions
from lmbbo_jax.data.classnames import class_names, hand_templates
from lmbbo_jax.data.registry import DATASETS, DatasetInfo
from lmbbo_jax.data.task import DatasetError, FewShotTask, ImageLoadError, Item

__all__ = [
    "DATASETS", "DatasetError", "DatasetInfo", "FewShotTask", "ImageLoadError", "Item",
    "build_task", "class_names", "hand_templates",
]

_PREFIXES = ("coop:", "folder:", "tfds:", "wds:")


def _check_int(name: str, value: object, minimum: int | None = None) -> int:
  if isinstance(value, bool) or not isinstance(value, int):
    raise DatasetError(f"{name} must be an integer, got {value!r}")
  if minimum is not None and value < minimum:
    raise DatasetError(f"{name} must be >= {minimum}, got {value}")
  return value


def build_task(dataset: str, shots: int, seed: int, *, data_dir: str | None = None,
               max_test_per_class: int | None = None) -> FewShotTask:
  """Builds the few-shot task that `dataset` names.

  Args:
    dataset: a benchmark name, `coop:PATH`, `folder:PATH`, `tfds:NAME`, `wds:PATH`,
      `wds:hf:OWNER/NAME` or `toy:TASK`.
    shots: train images per class (val gets min(4, shots)).
    seed: few-shot seed; the same (dataset, shots, seed) gives the same images anywhere.
    data_dir: the TFDS data dir for benchmark names, or CoOp's DATA root for `coop:NAME`.
    max_test_per_class: optional cap on test images per class (quick runs).

  Returns:
    The FewShotTask.

  Raises:
    DatasetError: a one-line message saying how to fix the source.
  """
  # Imported here so that `import lmbbo_jax.data` stays light (no TFDS import).
  # pylint: disable-next=g-import-not-at-top
  from lmbbo_jax.data import coop, folder, registry, sampling, tfds_source, wds
  if not isinstance(dataset, str) or not dataset.strip():
    raise DatasetError("--dataset is empty; give a benchmark name (e.g. caltech101), "
                       "coop:/path/to/DATA/<dir>, folder:/path, wds:/path, "
                       "wds:hf:<owner>/<name>"
                       + "".join(f" or {p}..." for p in extensions.names("dataset")))
  shots = _check_int("shots", shots, 1)
  seed = _check_int("seed", seed)
  if max_test_per_class is not None:
    _check_int("max_test_per_class", max_test_per_class, 1)
  spec = dataset.strip()
  kind, sep, rest = spec.partition(":")
  registered = extensions.names("dataset")  # e.g. the toy world's "toy:", from the wiring
  if sep and f"{kind}:" in (*_PREFIXES, *registered) and not rest.strip():
    raise DatasetError(f"--dataset={spec} needs a value after '{kind}:'")
  for prefix in registered:
    if spec.startswith(prefix):
      task = extensions.lookup("dataset", prefix)(spec[len(prefix):].strip(), shots, seed)
      if max_test_per_class is not None:
        task.test = sampling.cap_per_class(task.test, max_test_per_class, dataset=spec,
                                           key_fn=lambda it: it.ref)
      return task
  if spec.startswith("coop:"):
    return coop.build_coop_task(rest, shots, seed, data_dir=data_dir,
                                max_test_per_class=max_test_per_class)
  if spec.startswith("wds:"):
    return wds.build_wds_task(rest, shots, seed, max_test_per_class=max_test_per_class)
  if spec.startswith("folder:"):
    return folder.build_folder_task(rest, shots, seed,
                                    max_test_per_class=max_test_per_class)
  name = rest if spec.startswith("tfds:") else spec
  info = registry.lookup(name)
  if info is None:
    known = ", ".join(registry.DATASETS)
    hint = " (a path? use folder:PATH or coop:PATH)" if "/" in name else ""
    raise DatasetError(f"unknown dataset {name!r}{hint}; use one of {known}, "
                       "coop:/path/to/DATA/<dir>, folder:/path, wds:/path, "
                       "wds:hf:<owner>/<name>"
                       + "".join(f" or {p}..." for p in extensions.names("dataset")))
  return tfds_source.build_tfds_task(info, shots, seed, data_dir=data_dir,
                                     max_test_per_class=max_test_per_class)
