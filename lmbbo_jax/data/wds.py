"""CLIP_benchmark's webdataset shards: `wds:DIR` or `wds:hf:<owner>/<repo>` (the hub).

The layout (CLIP_benchmark's `build_wds_dataset` / `webdataset_builder.py`):

    DIR/classnames.txt                           one class name per line, in label order
    DIR/zeroshot_classification_templates.txt    templates with `{c}` slots (optional)
    DIR/dataset_type.txt                         "classification" when present
    DIR/<split>/nshards.txt                      N
    DIR/<split>/0.tar ... <N-1>.tar              members <key>.webp|png|jpg|jpeg + <key>.cls

`<key>.cls` holds the integer label as text. Splits: `train` and `test` (and `val` when
present; otherwise val shots come from the train pool, disjoint from the train shots).
Few-shot train and val are drawn from the train pool with `sampling.sample_few_shot`
(CoOp's protocol and seeds); test is the test split.

Shards are read with `tarfile` (headers only, seeking over the image data; the `.cls`
members are read), with a progress bar. An unusable sample (no image, no `.cls`, a label
that is not an integer or outside the class list, image bytes PIL cannot read) is counted
and skipped, and one warning line per split sums them up. An index is built once per
process and split (keyed by the shard files' sizes and mtimes): one task per seed reads
the shards once. Images are read back by offset when the task's images are loaded.

`wds:hf:<owner>/<repo>` downloads the dataset repo's needed files with `huggingface_hub`
(`repo_type="dataset"`, the HF cache; `HF_ENDPOINT`, `HF_HOME`, `HF_HUB_OFFLINE` apply);
once cached it works offline.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import pathlib
import re
import tarfile
import threading
from collections import Counter

from PIL import Image

from lmbbo_jax import templates as templates_lib
from lmbbo_jax.data import sampling
from lmbbo_jax.data.task import SPLITS, DatasetError, FewShotTask, Item, decode_image

HUB_PREFIX = "hf:"
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
TYPE_FILE = "dataset_type.txt"
NSHARDS_FILE = "nshards.txt"
# CLIP_benchmark's slot; ours is `templates.SLOT`.
WDS_SLOT = "{c}"
# Image extensions in CLIP_benchmark's preference order (`to_tuple(["webp", "png", ...])`).
IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")
LABEL_EXTENSION = "cls"
_DIGITS_RE = re.compile(r"[0-9]{1,9}")
_MAX_LABEL_BYTES = 64
# Files a hub download fetches (everything else in the repo is left on the hub).
HUB_PATTERNS = (CLASSNAMES_FILE, TEMPLATES_FILE, TYPE_FILE,
                *(f"{split}/*" for split in SPLITS))

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Sample:
  """One indexed sample: where its image bytes lie inside a shard."""
  ref: str      # "<split>/<shard>.tar/<key>": stable and machine independent
  label: int
  shard: str    # the shard file path
  offset: int
  size: int


@dataclasses.dataclass
class _SplitIndex:
  samples: list[_Sample]
  skipped: Counter
  # (ref, fully decoded?) -> whether PIL read the image: each is checked once per process.
  readable: dict[tuple[str, bool], bool] = dataclasses.field(default_factory=dict)


_INDEX_CACHE: dict[tuple, _SplitIndex] = {}
_INDEX_LOCK = threading.Lock()
_HUB_DIRS: dict[str, pathlib.Path] = {}


# -- metadata files --------------------------------------------------------------------
def _read_text(path: pathlib.Path, what: str) -> str:
  try:
    return path.read_text(encoding="utf-8")
  except OSError as e:
    raise DatasetError(f"cannot read the {what} {path} ({e.strerror or e}); a CLIP_benchmark "
                       "wds folder needs classnames.txt and <split>/nshards.txt") from e
  except UnicodeDecodeError as e:
    raise DatasetError(f"the {what} {path} is not UTF-8 text; re-download it") from e


def read_class_names(root: pathlib.Path) -> list[str]:
  """classnames.txt: one name per line, stripped, in label order (as CLIP_benchmark)."""
  lines = [line.strip() for line in _read_text(root / CLASSNAMES_FILE, "class list").splitlines()]
  while lines and not lines[-1]:
    lines.pop()
  if not lines:
    raise DatasetError(f"{root / CLASSNAMES_FILE} lists no classes")
  return lines


def read_templates(root: pathlib.Path) -> tuple[list[str], list[str]]:
  """The dataset's zero-shot templates with `{}` slots, and the lines that were dropped.

  `{c}` becomes `{}` by plain replacement (templates are data, never formatted); a line
  that is then not a valid template (`templates.invalid_reason`) is dropped. No file: [].
  """
  path = root / TEMPLATES_FILE
  if not path.is_file():
    return [], []
  kept, dropped = [], []
  for line in _read_text(path, "template list").splitlines():
    line = line.strip()
    if not line:
      continue
    template = line.replace(WDS_SLOT, templates_lib.SLOT)
    if templates_lib.invalid_reason(template) or template in kept:
      dropped.append(line)
    else:
      kept.append(template)
  return kept, dropped


def _check_type(root: pathlib.Path) -> None:
  path = root / TYPE_FILE
  if path.is_file():
    kind = _read_text(path, "dataset type").strip().lower()
    if kind != "classification":
      raise DatasetError(f"{root} is a {kind[:40]!r} dataset (dataset_type.txt); wds: reads "
                         "single-label classification datasets only")


def _shard_paths(root: pathlib.Path, split: str) -> list[pathlib.Path] | None:
  """The split's shard files, or None when the split is absent."""
  folder = root / split
  if not (folder / NSHARDS_FILE).is_file():
    return None
  text = _read_text(folder / NSHARDS_FILE, "shard count").strip()
  if not _DIGITS_RE.fullmatch(text) or int(text) < 1:
    raise DatasetError(f"{folder / NSHARDS_FILE} holds {text[:20]!r}, not a shard count "
                       ">= 1; re-download the dataset")
  shards = [folder / f"{i}.tar" for i in range(int(text))]
  missing = [s.name for s in shards if not s.is_file()]
  if missing:
    raise DatasetError(f"{folder} lacks {len(missing)} of its {len(shards)} shards "
                       f"({', '.join(missing[:3])}); the download is incomplete, fetch them again")
  return shards


# -- shard index -------------------------------------------------------------------------
def _parse_label(raw: bytes, num_classes: int) -> int | str:
  """The label, or why it cannot be used."""
  text = raw.decode("ascii", errors="replace").strip()
  if not _DIGITS_RE.fullmatch(text):
    return "unparsable label"
  label = int(text)
  return label if label < num_classes else "label out of range"


def _split_key(name: str) -> tuple[str, str]:
  """webdataset's (key, extension): the extension starts at the basename's first dot."""
  directory, _, base = name.rpartition("/")
  stem, dot, ext = base.partition(".")
  return (f"{directory}/{stem}" if directory else stem), (ext.lower() if dot else "")


def _index_shard(shard: pathlib.Path, ref_prefix: str, num_classes: int,
                 skipped: Counter) -> list[_Sample]:
  """The shard's usable samples; what is unusable is counted in `skipped` by reason."""
  size = shard.stat().st_size
  labels: dict[str, int | str] = {}
  images: dict[str, tuple[str, int, int]] = {}
  truncated: set[str] = set()
  order: dict[str, None] = {}  # keys in shard order
  try:
    tar = tarfile.open(shard, mode="r:")
  except tarfile.TarError as e:
    raise DatasetError(f"{shard} is not a tar archive ({e}); re-download it") from e
  with tar:
    while True:
      try:
        member = tar.next()
      except (tarfile.TarError, EOFError, OSError):  # the shard ends inside a member
        if not truncated:
          skipped["truncated shard"] += 1
        break
      if member is None:
        break
      key, ext = _split_key(member.name)
      if not member.isfile() or (ext not in IMAGE_EXTENSIONS and ext != LABEL_EXTENSION):
        continue
      order.setdefault(key)
      if member.offset_data + member.size > size:
        truncated.add(key)
      elif ext == LABEL_EXTENSION:
        data = tar.extractfile(member) if member.size <= _MAX_LABEL_BYTES else None
        labels[key] = _parse_label(data.read(), num_classes) if data else "unparsable label"
      else:
        known = images.get(key)
        if known is None or IMAGE_EXTENSIONS.index(ext) < IMAGE_EXTENSIONS.index(known[0]):
          images[key] = (ext, member.offset_data, member.size)
  samples = []
  for key in order:
    label, image = labels.get(key), images.get(key)
    if key in truncated:
      skipped["truncated member"] += 1
    elif image is None:
      skipped["no image"] += 1
    elif label is None:
      skipped["no .cls label"] += 1
    elif isinstance(label, str):
      skipped[label] += 1
    else:
      samples.append(_Sample(f"{ref_prefix}/{key}", label, str(shard), image[1], image[2]))
  return samples


def _index_split(shards: list[pathlib.Path], split: str, num_classes: int,
                 progress: bool | None) -> _SplitIndex:
  """Every usable sample of a split (cached per process by the shards' size and mtime)."""
  stats = tuple((str(s), s.stat().st_size, s.stat().st_mtime_ns) for s in shards)
  cache_key = (stats, num_classes)
  with _INDEX_LOCK:
    found = _INDEX_CACHE.get(cache_key)
    if found is not None:
      return found
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    skipped: Counter = Counter()
    samples: list[_Sample] = []
    with tqdm(shards, desc=f"wds {split} shards", unit="shard", leave=False,
              disable=None if progress is None else not progress) as bar:
      for shard in bar:
        samples.extend(_index_shard(shard, f"{split}/{shard.name}", num_classes, skipped))
        bar.set_postfix(samples=len(samples), refresh=False)
    index = _INDEX_CACHE[cache_key] = _SplitIndex(samples, skipped)
    return index


def _read_image_bytes(sample: _Sample) -> bytes:
  with open(sample.shard, "rb") as f:
    f.seek(sample.offset)
    data = f.read(sample.size)
  if len(data) != sample.size:
    raise OSError(f"shard {sample.shard} ends inside image {sample.ref!r}")
  return data


def _readable(sample: _Sample, *, full: bool) -> bool:
  """Whether PIL reads the image: fully decoded (`full`) or its header identified."""
  try:
    data = _read_image_bytes(sample)
    if full:
      decode_image(data)
    else:
      with Image.open(io.BytesIO(data)) as image:
        image.verify()
    return True
  except Exception:  # pylint: disable=broad-except  # Any decoder failure: a bad image.
    return False


def _checked(index: _SplitIndex, sample: _Sample, *, full: bool) -> bool:
  """`_readable`, remembered in the split's index (one task per seed checks once)."""
  key = (sample.ref, full)
  if key not in index.readable:
    index.readable[key] = _readable(sample, full=full)
  return index.readable[key]


# -- sources ------------------------------------------------------------------------------
def hub_snapshot(repo_id: str) -> pathlib.Path:
  """The local folder of a hub dataset repo's needed files (downloaded once, then cached).

  With the hub unreachable or `HF_HUB_OFFLINE=1` the cached copy is used.
  """
  if repo_id in _HUB_DIRS:
    return _HUB_DIRS[repo_id]
  if repo_id.count("/") != 1 or not all(repo_id.split("/")):
    raise DatasetError(f"wds:hf:{repo_id} is not a hub dataset id; use "
                       "wds:hf:<owner>/<name>, e.g. wds:hf:clip-benchmark/wds_cars")
  try:
    from huggingface_hub import snapshot_download  # pylint: disable=import-outside-toplevel
    from huggingface_hub import errors as hf_errors  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise DatasetError("wds:hf: needs huggingface_hub: pip install huggingface-hub") from e
  try:
    folder = snapshot_download(repo_id, repo_type="dataset",
                               allow_patterns=list(HUB_PATTERNS))
  except hf_errors.LocalEntryNotFoundError as e:
    raise DatasetError(
        f"hub dataset {repo_id!r} is not in the Hugging Face cache and the hub is "
        "unreachable or disabled (HF_HUB_OFFLINE=1); download it once with network access, "
        "or pass a local copy as wds:DIR") from e
  except (hf_errors.RepositoryNotFoundError, hf_errors.GatedRepoError) as e:
    raise DatasetError(f"hub dataset {repo_id!r} is not available ({type(e).__name__}); "
                       "check the id (e.g. clip-benchmark/wds_cars) or log in with HF_TOKEN"
                       ) from e
  except (hf_errors.HfHubHTTPError, OSError, ValueError) as e:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise DatasetError(f"downloading hub dataset {repo_id!r} failed: {first[:200]}") from e
  _HUB_DIRS[repo_id] = pathlib.Path(folder)
  return _HUB_DIRS[repo_id]


def _resolve(spec: str) -> tuple[pathlib.Path, str, str]:
  """(local root, canonical task name, sampling key) of a `wds:` value.

  The sampling key is the folder's (or hub repo's) base name, so a local copy of a hub
  dataset draws the same images.
  """
  if spec.startswith(HUB_PREFIX):
    repo_id = spec[len(HUB_PREFIX):].strip()
    root = hub_snapshot(repo_id)
    return root, f"wds:{HUB_PREFIX}{repo_id}", f"wds:{repo_id.rsplit('/', 1)[-1]}"
  root = pathlib.Path(spec).expanduser()
  if not root.is_dir():
    raise DatasetError(f"wds:{spec} is not a directory; pass a CLIP_benchmark wds folder "
                       "(classnames.txt, train/ and test/ shards) or wds:hf:<owner>/<name>")
  root = root.resolve()
  return root, f"wds:{root}", f"wds:{root.name}"


def build_wds_task(spec: str, shots: int, seed: int, *,
                   max_test_per_class: int | None = None,
                   progress: bool | None = None) -> FewShotTask:
  """A task from CLIP_benchmark wds shards (see the module doc).

  Args:
    spec: a folder, or `hf:<owner>/<name>` for a hub dataset repo.
    shots: train images per class.
    seed: few-shot seed.
    max_test_per_class: optional cap on test images per class.
    progress: show the shard progress bar (None: when stderr is a terminal).

  Returns:
    The FewShotTask named `wds:<absolute folder>` or `wds:hf:<owner>/<name>`, with
    the dataset's templates as `dataset_templates`.
  """
  root, name, dataset_key = _resolve(spec.strip())
  _check_type(root)
  classes = read_class_names(root)
  templates, dropped = read_templates(root)
  if dropped:
    log.warning("%s: dropped %d template line(s) that are not valid templates, e.g. %r",
                name, len(dropped), dropped[0][:80])
  shards = {split: _shard_paths(root, split) for split in SPLITS}
  for split in ("train", "test"):
    if shards[split] is None:
      raise DatasetError(f"{name} has no {split} split ({root / split / NSHARDS_FILE}); "
                         "few-shot runs need train and test shards")
  key_fn = lambda item: item.ref
  indexes = {split: _index_split(paths, split, len(classes), progress)
             for split, paths in shards.items() if paths is not None}
  by_ref = {s.ref: s for index in indexes.values() for s in index.samples}
  skipped = Counter()
  for index in indexes.values():
    skipped.update(index.skipped)

  def pool(split: str) -> list[Item] | None:
    return ([Item(s.ref, s.label) for s in indexes[split].samples]
            if split in indexes else None)

  train_pool, val_pool, test_pool = pool("train"), pool("val"), pool("test")
  pool_sizes = {"train": len(train_pool), "val": len(val_pool) if val_pool is not None else None,
                "test": len(test_pool)}
  # Draw the shots; an unreadable drawn image leaves the pool and the class draws again
  # (the remaining candidates keep their seeded order).
  while True:
    train, val = sampling.sample_few_shot(train_pool, val_pool, dataset=dataset_key,
                                          shots=shots, seed=seed, key_fn=key_fn)
    bad = {it.ref for it in train + val
           if not _checked(indexes[it.ref.split("/", 1)[0]], by_ref[it.ref], full=True)}
    if not bad:
      break
    skipped["unreadable image"] += len(bad)
    for sample in bad:
      by_ref.pop(sample)
    train_pool = [it for it in train_pool if it.ref not in bad]
    if val_pool is not None:
      val_pool = [it for it in val_pool if it.ref not in bad]
  test = sampling.cap_per_class(test_pool, max_test_per_class, dataset=dataset_key,
                                key_fn=key_fn)
  readable = [it for it in test if _checked(indexes["test"], by_ref[it.ref], full=False)]
  if len(readable) < len(test):
    skipped["unreadable image"] += len(test) - len(readable)
    test = readable
  if skipped:
    log.warning("%s: skipped %d unusable sample(s): %s", name, sum(skipped.values()),
                ", ".join(f"{reason} x{count}" for reason, count in sorted(skipped.items())))
  if not train:
    raise DatasetError(f"{name}: the train split has no usable samples; re-download it")
  needed = {it.ref: by_ref[it.ref] for it in train + val + test}

  def loader(item: Item) -> bytes:
    return _read_image_bytes(needed[item.ref])

  return FewShotTask(
      name, classes, train, val, test, shots=shots, seed=seed, loader=loader, source="wds",
      templates=templates,
      info={"root": str(root), "dataset_templates": len(templates),
            "skipped": dict(sorted(skipped.items())), "pool_sizes": pool_sizes})
