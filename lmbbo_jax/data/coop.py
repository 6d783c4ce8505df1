"""CoOp's dataset layout: `DATA/<dataset dir>/` with images plus `split_zhou_<Name>.json`.

A split file is `{"train": [[relpath, label, classname], ...], "val": [...], "test": [...]}`
with paths relative to the dataset's image folder. The paper's benchmarks use the shipped
class names (see `classnames.py`); any other folder with one `split_zhou_*.json` works too,
with its class names taken from the file (`_` -> space, as CoOp does).

Special layouts:
- ImageNet: `imagenet/images/{train,val}/<wnid>/*.JPEG`; labels are the sorted wnids, the
  val folder is the test set and val shots come from train (disjoint from the train
  shots). A `split_ImageNet.json` (cross_modal_adaptation) is used when present.
- FGVC-Aircraft: `fgvc_aircraft/{variants.txt, images_variant_{train,val,test}.txt,
  images/}` as CoOp reads it.

Optional few-shot index files replace the seeded sampling: `<dataset dir>/split_fewshot/
shot_{k}-seed_{s}.json` or `<dataset dir>/indices/shot_{k}-seed_{s}.json` in
cross_modal_adaptation's JSON form `{"train": {"indices": [...]}, "val": {"indices":
[...]}}` (indices into the split file's train/val lists). CoOp's own `.pkl` few-shot files
are pickles and are never loaded (unpickling runs code); convert them to the JSON form.
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

from lmbbo_jax.data import classnames, paths, registry, sampling
from lmbbo_jax.data.task import DatasetError, FewShotTask, Item

_SPLITS = ("train", "val", "test")


def _read_json(path: pathlib.Path) -> Any:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise DatasetError(f"cannot read {path}: {e}; fix or re-download the file") from e


def _parse_split(data: Any, path: pathlib.Path) -> dict[str, list[tuple[str, int, str]]]:
  if not isinstance(data, dict) or "train" not in data or "test" not in data:
    raise DatasetError(f"{path} is not a CoOp split file (needs 'train', 'val', 'test' "
                       "lists of [relative_path, label, classname])")
  out = {}
  for split in _SPLITS:
    rows = data.get(split) or []
    parsed = []
    for i, row in enumerate(rows):
      ok = (isinstance(row, (list, tuple)) and len(row) >= 2 and isinstance(row[0], str)
            and isinstance(row[1], int) and not isinstance(row[1], bool))
      if not ok:
        raise DatasetError(f"{path}: {split}[{i}] = {str(row)[:80]} is not "
                           "[relative_path, label, classname]")
      name = row[2] if len(row) > 2 and isinstance(row[2], str) else ""
      parsed.append((row[0], row[1], name))
    out[split] = parsed
  return out


def _find_image_root(dataset_dir: pathlib.Path, preferred: str | None,
                     first_rel: str | None) -> pathlib.Path:
  """The folder that split paths are relative to."""
  candidates = []
  if preferred is not None:
    candidates.append(dataset_dir / preferred)
  candidates.append(dataset_dir)
  candidates.extend(dataset_dir / d for d in paths.subdirs(dataset_dir))
  if first_rel is None:
    return candidates[0]
  for root in candidates:
    if (root / first_rel).is_file():
      return root
  raise DatasetError(f"coop:{dataset_dir}: image {first_rel!r} from the split file is not "
                     f"under {candidates[0]} or its sub-folders; put the images there")


def _fewshot_indices(dataset_dir: pathlib.Path, shots: int, seed: int,
                     sizes: dict[str, int]) -> tuple[dict[str, list[int]] | None, str]:
  stem = f"shot_{shots}-seed_{seed}"
  for folder in ("split_fewshot", "indices"):
    path = dataset_dir / folder / f"{stem}.json"
    if path.is_file():
      data = _read_json(path)
      out = {}
      for split in ("train", "val"):
        entry = data.get(split) if isinstance(data, dict) else None
        idx = entry.get("indices") if isinstance(entry, dict) else entry
        if not isinstance(idx, list) or not all(
            isinstance(i, int) and 0 <= i < sizes[split] for i in idx):
          raise DatasetError(f"{path}: '{split}' needs 'indices', a list of ints in "
                             f"0..{sizes[split] - 1} (cross_modal_adaptation format)")
        out[split] = idx
      return out, str(path)
    pkl = path.with_suffix(".pkl")
    if pkl.is_file():
      logging.warning("ignoring %s: pickled few-shot files are not loaded (unsafe); "
                      "convert it to %s.json with 'indices' lists, or rely on the seeded "
                      "sampling", pkl, stem)
  return None, "seeded"


def _imagenet_items(dataset_dir: pathlib.Path) -> tuple[list[Item], list[Item]]:
  """Train and val (= test) items of CoOp's ImageNet folders, labelled by synset id."""
  image_dir = dataset_dir / "images"
  train_dir, val_dir = image_dir / "train", image_dir / "val"
  if not train_dir.is_dir() or not val_dir.is_dir():
    raise DatasetError(f"coop:{dataset_dir}: expected images/train/<wnid>/ and "
                       "images/val/<wnid>/ (CoOp's ImageNet layout)")
  label_of = {w: i for i, w in enumerate(classnames.imagenet_wnids())}
  out = []
  for folder in (train_dir, val_dir):
    items = []
    for wnid in paths.subdirs(folder):
      if wnid not in label_of:
        raise DatasetError(f"coop:{dataset_dir}: {folder.name}/{wnid} is not an ImageNet-1k "
                           "synset id; folders must be named like n01440764")
      items.extend(Item(str(p), label_of[wnid]) for p in paths.list_images(folder / wnid))
    out.append(items)
  return out[0], out[1]


def _aircraft_rows(dataset_dir: pathlib.Path) -> tuple[list[str], dict[str, list]]:
  variants_file = dataset_dir / "variants.txt"
  if not variants_file.is_file():
    raise DatasetError(f"coop:{dataset_dir}: variants.txt is missing (FGVC-Aircraft "
                       "2013b data/ folder as CoOp expects)")
  variants = [l.strip() for l in variants_file.read_text(encoding="utf-8").splitlines()
              if l.strip()]
  index = {v: i for i, v in enumerate(variants)}
  rows = {}
  for split in _SPLITS:
    split_file = dataset_dir / f"images_variant_{split}.txt"
    if not split_file.is_file():
      raise DatasetError(f"coop:{dataset_dir}: {split_file.name} is missing")
    parsed = []
    for line in split_file.read_text(encoding="utf-8").splitlines():
      parts = line.strip().split(" ")
      if len(parts) < 2:
        continue
      variant = " ".join(parts[1:])
      if variant not in index:
        raise DatasetError(f"{split_file}: variant {variant!r} is not in variants.txt")
      parsed.append((parts[0] + ".jpg", index[variant], variant))
    rows[split] = parsed
  return variants, rows


def _split_file(dataset_dir: pathlib.Path, info: registry.DatasetInfo | None,
                split_files: list[pathlib.Path]) -> pathlib.Path | None:
  """The split json to read, or None for ImageNet's plain folders."""
  if info is not None and info.name == "imagenet":
    path = dataset_dir / "split_ImageNet.json"
    return path if path.is_file() else None
  if info is not None and info.coop_split_file:
    path = dataset_dir / info.coop_split_file
    if path.is_file():
      return path
    if len(split_files) != 1:
      raise DatasetError(f"coop:{dataset_dir}: {info.coop_split_file} is missing; get "
                         "CoOp's split file (CoOp DATASETS.md) and put it there")
  if len(split_files) != 1:
    raise DatasetError(f"coop:{dataset_dir}: found {len(split_files)} split_zhou_*.json "
                       "files; keep exactly one")
  return split_files[0]


def resolve_dir(path: str, data_dir: str | None) -> pathlib.Path:
  """The dataset folder for `coop:<path>` (a name is looked up under `data_dir`)."""
  p = pathlib.Path(path).expanduser()
  if not p.exists() and data_dir:
    info = registry.lookup(path)
    p = pathlib.Path(data_dir).expanduser() / (info.coop_dir if info else path)
  if not p.is_dir():
    raise DatasetError(f"coop:{path} is not a directory; pass the CoOp dataset folder, "
                       "e.g. --dataset=coop:/path/to/DATA/caltech-101")
  return p.resolve()


def build_coop_task(path: str, shots: int, seed: int, *, data_dir: str | None = None,
                    max_test_per_class: int | None = None) -> FewShotTask:
  """A task from a CoOp dataset folder (see the module docstring for layouts)."""
  dataset_dir = resolve_dir(path, data_dir)
  info = registry.lookup(dataset_dir.name)
  split_files = sorted(dataset_dir.glob("split_zhou_*.json"))
  if info is None and not split_files:
    known = [d for d in paths.subdirs(dataset_dir) if registry.lookup(d)]
    hint = (f"; it looks like CoOp's DATA root, append one of {known}" if known else
            "; expected a folder with a split_zhou_<Name>.json")
    raise DatasetError(f"coop:{dataset_dir} is not a CoOp dataset folder{hint}")
  name = f"coop:{dataset_dir}"
  dataset_key = info.name if info else f"coop:{dataset_dir.name}"
  label_names: dict[int, str] = {}
  preferred_root = info.coop_image_dir if info else None
  if info and info.name == "fgvc_aircraft" and not split_files:
    _, rows = _aircraft_rows(dataset_dir)
    preferred_root = "images"
  else:
    split_path = _split_file(dataset_dir, info, split_files)
    rows = _parse_split(_read_json(split_path), split_path) if split_path else None

  if rows is None:  # ImageNet folders.
    train_pool, test = _imagenet_items(dataset_dir)
    val_pool = None
    key_fn = paths.relative_key(dataset_dir / "images")
    fewshot, fewshot_source = None, "seeded"
  else:
    first = next((r[0] for s in _SPLITS for r in rows[s]), None)
    image_root = _find_image_root(dataset_dir, preferred_root, first)
    key_fn = paths.relative_key(image_root)
    pools = {}
    for split in _SPLITS:
      pools[split] = [Item(str(image_root / rel), label) for rel, label, _ in rows[split]]
      for _, label, cname in rows[split]:
        label_names.setdefault(label, cname)
    train_pool, test = pools["train"], pools["test"]
    val_pool = pools["val"] or None
    fewshot, fewshot_source = _fewshot_indices(
        dataset_dir, shots, seed, {s: len(pools[s]) for s in ("train", "val")})

  if info is not None:
    class_list = classnames.class_names(info.name)
  else:
    num = max(label_names) + 1 if label_names else 0
    missing = [i for i in range(num) if i not in label_names]
    if missing:
      raise DatasetError(f"{name}: labels {missing[:5]} never appear in the split file; "
                         "labels must be 0..N-1")
    class_list = [label_names[i].replace("_", " ") for i in range(num)]
  all_labels = {it.label for it in train_pool} | {it.label for it in test}
  if all_labels and max(all_labels) >= len(class_list):
    raise DatasetError(f"{name}: split labels go up to {max(all_labels)} but "
                       f"{len(class_list)} class names are known; is this the right folder?")

  if fewshot is not None:
    train = [train_pool[i] for i in fewshot["train"]]
    val = [val_pool[i] for i in fewshot["val"]] if val_pool else []
  else:
    train, val = sampling.sample_few_shot(
        train_pool, val_pool, dataset=dataset_key, shots=shots, seed=seed, key_fn=key_fn)
  test = sampling.cap_per_class(test, max_test_per_class, dataset=dataset_key,
                                key_fn=key_fn)
  return FewShotTask(
      name, class_list, train, val, test, shots=shots, seed=seed, source="coop",
      info={"dataset_dir": str(dataset_dir), "benchmark": info.name if info else None,
            "fewshot": fewshot_source,
            "pool_sizes": {"train": len(train_pool),
                           "val": len(val_pool) if val_pool else None}})
