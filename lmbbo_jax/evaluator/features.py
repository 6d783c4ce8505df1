"""Image features, encoded once per (model, task split) and cached on disk.

`encode_split` runs the image tower data-parallel over the device mesh on
fixed-size batches (padding rows masked, so one compiled shape), L2-normalises
on the device and keeps the result there. The cache is an `.npz` (features,
labels, item indices) plus a JSON manifest with the key and a sha256 of the
arrays; it is keyed by (model weights hash, task fingerprint, split, shots,
seed, preprocessing) and validated on load (key, shapes, hash, labels against
the task), and rebuilt whenever anything does not match.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lmbbo_jax import io as io_lib
from lmbbo_jax.evaluator import multihost, sharding
from lmbbo_jax.models import loading

log = logging.getLogger(__name__)

CACHE_VERSION = 1
# How `lmbbo_jax.data.preprocess` prepares pixels (the model's `image_crop` picks one);
# part of the cache key.
PREPROCESSING = "resize-shorter-bicubic+center-crop+normalize"
PREPROCESSING_SQUARE = "resize-square-bicubic+normalize"


class FeatureCacheError(ValueError):
  """A feature cache that cannot be used (the caller rebuilds it)."""


@dataclasses.dataclass
class SplitFeatures:
  """Normalised image features of one split.

  Attributes:
    features: float32 [N, E] on the mesh, split over the data axis; N is padded
      to a multiple of the device count.
    labels: int32 [N]; -1 marks padding and images that could not be read.
    split: the split name.
    num_items: images in the split (readable or not).
    from_cache: whether the features were loaded from disk.
  """
  features: jax.Array
  labels: np.ndarray
  split: str
  num_items: int
  from_cache: bool = False

  @property
  def num_valid(self) -> int:
    return int((self.labels >= 0).sum())


def clip_weights_hash(clip: Any) -> str:
  """The CLIP's weights hash, or `models.loading.weights_hash` of its variables when it has none."""
  return getattr(clip, "weights_hash", "") or loading.weights_hash(clip.variables)


def cache_key(clip: Any, task: Any, split: str) -> dict:
  """Everything the features of `split` depend on (JSON-serialisable)."""
  cfg = clip.config
  return {
      "version": CACHE_VERSION,
      "model": clip_weights_hash(clip),
      "arch": clip.name,
      "dtype": jnp.dtype(clip.dtype).name,
      "task": getattr(task, "name", ""),
      "fingerprint": task.fingerprint(split),
      "split": split,
      "shots": getattr(task, "shots", None),
      "seed": getattr(task, "seed", None),
      "preprocessing": {"method": PREPROCESSING if cfg.image_crop else PREPROCESSING_SQUARE,
                        "size": clip.image_size,
                        "mean": [float(x) for x in cfg.image_mean],
                        "std": [float(x) for x in cfg.image_std]},
  }


def _key_digest(key: dict) -> str:
  return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _arrays_digest(arrays: dict[str, np.ndarray]) -> str:
  digest = hashlib.sha256()
  for name in sorted(arrays):
    a = np.ascontiguousarray(arrays[name])
    digest.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
    digest.update(a.tobytes())
  return digest.hexdigest()


def cache_paths(cache_dir: str, key: dict) -> tuple[str, str]:
  """(npz path, manifest path) of `key` inside `cache_dir`."""
  task = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(key.get("task") or "task"))[:40]
  stem = os.path.join(cache_dir, f"{task}-{key['split']}-{_key_digest(key)[:16]}")
  return stem + ".npz", stem + ".json"


def save_cache(cache_dir: str, key: dict, features: np.ndarray, labels: np.ndarray,
               index: np.ndarray) -> str:
  """Writes the arrays, then the manifest (so a crash never leaves a valid-looking pair)."""
  os.makedirs(cache_dir, exist_ok=True)
  npz_path, manifest_path = cache_paths(cache_dir, key)
  arrays = {"features": np.asarray(features, np.float32), "labels": np.asarray(labels, np.int32),
            "index": np.asarray(index, np.int64)}
  with io_lib.atomic_writer(npz_path) as f:
    np.savez(f, **arrays)
  manifest = {"key": key, "shapes": {k: list(v.shape) for k, v in arrays.items()},
              "sha256": _arrays_digest(arrays), "file": os.path.basename(npz_path)}
  io_lib.atomic_write(manifest_path, json.dumps(manifest, indent=1, sort_keys=True))
  return npz_path


def load_cache(cache_dir: str, key: dict, item_labels: Sequence[int],
               embed_dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(features [n, E], labels [n], index [n]) for `key`; raises FeatureCacheError if unusable."""
  npz_path, manifest_path = cache_paths(cache_dir, key)
  if not os.path.exists(manifest_path):
    raise FeatureCacheError("no cache entry")
  try:
    with open(manifest_path, encoding="utf-8") as f:
      manifest = json.load(f)
    with np.load(npz_path, allow_pickle=False) as data:
      arrays = {k: data[k] for k in ("features", "labels", "index")}
  except (OSError, ValueError, KeyError) as e:
    raise FeatureCacheError(f"unreadable ({type(e).__name__}: {e})") from None
  if manifest.get("key") != key:
    raise FeatureCacheError("key mismatch (model, data or preprocessing changed)")
  feats, labels, index = arrays["features"], arrays["labels"], arrays["index"]
  n = len(labels)
  if feats.shape != (n, embed_dim) or index.shape != (n,):
    raise FeatureCacheError(f"shape mismatch: features {feats.shape}, labels {labels.shape}, "
                            f"index {index.shape}, expected [n, {embed_dim}]")
  if manifest.get("shapes") != {k: list(v.shape) for k, v in arrays.items()}:
    raise FeatureCacheError("shapes differ from the manifest")
  if manifest.get("sha256") != _arrays_digest(arrays):
    raise FeatureCacheError("content hash mismatch (file changed or truncated)")
  item_labels = np.asarray(item_labels, np.int64)
  if n > len(item_labels) or (n and (index.min() < 0 or index.max() >= len(item_labels)
                                     or np.any(np.diff(index) <= 0))):
    raise FeatureCacheError("item indices do not fit the split")
  if not np.array_equal(item_labels[index], labels):
    raise FeatureCacheError("labels differ from the task's split")
  return feats, labels, index


@functools.lru_cache(maxsize=8)
def _image_step(model: Any, mesh: jax.sharding.Mesh):
  def step(variables, pixels):
    feats = model.apply(variables, pixels, method="encode_image")
    feats = feats.astype(jnp.float32)
    return feats / jnp.maximum(jnp.linalg.norm(feats, axis=-1, keepdims=True), 1e-12)
  return jax.jit(step, out_shardings=sharding.sharded_along(mesh, 2))


def visual_variables(clip: Any) -> dict:
  # The model's setup declares every top-level parameter (the logit scale, SigLIP's bias).
  variables = {"params": {k: v for k, v in clip.variables["params"].items() if k != "text"}}
  if "batch_stats" in clip.variables:
    variables["batch_stats"] = clip.variables["batch_stats"]
  return variables


def image_batch_size(batch_size: int, mesh: jax.sharding.Mesh) -> int:
  """`batch_size` rounded up to a multiple of the device count."""
  return sharding.round_up(max(1, batch_size), sharding.num_shards(mesh))


def encode_batches(clip: Any, batches: Iterable[Any], *, mesh: jax.sharding.Mesh,
                   variables: Any = None, num_batches: int | None = None,
                   global_batch: int | None = None) -> tuple[jax.Array, np.ndarray]:
  """Encodes fixed-size `Batch`es (pixels, labels, mask); returns (features, labels).

  Features stay on the device mesh, float32 [num_batches * B, E]; labels are
  -1 where the batch mask is False. With several processes each passes the
  batches of its own rows (`sharding.process_rows` of each `global_batch`), and
  `num_batches` global batches are encoded (a process out of rows sends masked
  zeros), so that every process runs the same calls.
  """
  step = _image_step(clip.model, mesh)
  if variables is None:
    variables = sharding.put_replicated(visual_variables(clip), mesh)
  several = jax.process_count() > 1
  if several:
    lo, hi = sharding.process_rows(mesh, global_batch)
    blank_pixels = np.zeros((hi - lo, clip.image_size, clip.image_size, 3), np.float32)
  outs, labels = [], []
  batches = iter(batches)
  while True:
    batch = next(batches, None)
    if batch is None and several and len(outs) < num_batches:
      pixels, label = blank_pixels, np.full((hi - lo,), -1, np.int32)
    elif batch is None:
      break
    else:
      pixels = np.asarray(batch.pixels, np.float32)
      label = np.where(np.asarray(batch.mask, bool), np.asarray(batch.labels, np.int32), -1)
    if several:
      outs.append(step(variables, sharding.put_process_rows(pixels, mesh, global_batch)))
      labels.append(sharding.put_process_rows(label.astype(np.int32), mesh, global_batch))
    else:
      outs.append(step(variables, sharding.put_sharded(pixels, mesh)))
      labels.append(label)
  if not outs:
    return (sharding.put_sharded(np.zeros((0, clip.embed_dim), np.float32), mesh),
            np.zeros((0,), np.int32))
  feats = jax.jit(lambda xs: jnp.concatenate(xs),
                  out_shardings=sharding.sharded_along(mesh, 2))(outs)
  if several:
    labels = [sharding.to_host(jax.jit(lambda ys: jnp.concatenate(ys),
                                       out_shardings=sharding.sharded_along(mesh, 1))(labels))]
  return feats, np.concatenate(labels).astype(np.int32)


class _ProcessShare:
  """A task whose `split` lists only this process's rows of each global batch."""

  def __init__(self, task: Any, split: str, items: list):
    self._task, self._split, self._items = task, split, items

  def __getattr__(self, name: str) -> Any:
    if name == self._split:
      return self._items
    return getattr(self._task, name)


def encode_split(clip: Any, task: Any, split: str, *, mesh: jax.sharding.Mesh | None = None,
                 batch_size: int = 64, cache_dir: str | None = None, num_threads: int = 4,
                 prefetch: int = 2, progress: bool = True,
                 batch_iter: Callable[..., Iterable[Any]] | None = None) -> SplitFeatures:
  """Normalised image features of `task`'s `split`, from the cache or the image tower.

  Args:
    clip: a `lmbbo_jax.models.api.CLIP`.
    task: a `FewShotTask` (class_names, <split> items, fingerprint(split), shots, seed).
    split: "train", "val" or "test".
    mesh: device mesh (default: all devices).
    batch_size: images per step (rounded up to a multiple of the device count).
    cache_dir: where to cache; None disables caching.
    num_threads, prefetch: host decoding threads and batches decoded ahead.
    progress: show a progress bar.
    batch_iter: replaces `lmbbo_jax.data.preprocess.iter_batches` (same keywords).

  Returns:
    SplitFeatures on the mesh.
  """
  mesh = mesh if mesh is not None else sharding.make_mesh()
  items = list(getattr(task, split))
  item_labels = [it.label for it in items]
  key = cache_key(clip, task, split) if cache_dir else None
  if key is not None:
    # Process 0's cache decides; the others receive its features.
    cached, error = None, "no cache entry"
    if multihost.is_leader():
      try:
        cached = load_cache(cache_dir, key, item_labels, clip.embed_dim)[:2]
      except FeatureCacheError as e:
        error = str(e)
    if multihost.broadcast(cached is not None):
      feats, labels = (multihost.broadcast_array(a) for a in (cached or (None, None)))
      log.info("image features of %s/%s loaded from cache (%d images)", key["task"], split,
               len(labels))
      return _on_mesh(feats, labels, split, len(items), mesh, from_cache=True)
    if error != "no cache entry":
      log.warning("image feature cache for %s/%s is invalid (%s); rebuilding",
                  key["task"], split, error)

  if batch_iter is None:
    from lmbbo_jax.data.preprocess import iter_batches as batch_iter  # Lazy: data room.
  from tqdm.auto import tqdm
  bar = tqdm(total=len(items), desc=f"image features {split}", unit="img",
             disable=not progress, leave=False)
  state = {"done": 0}

  def on_progress(done: int, total: int) -> None:
    bar.update(done - state["done"])
    state["done"] = done

  global_batch = image_batch_size(batch_size, mesh)
  num_batches = -(-len(items) // global_batch)
  source, local_batch = task, global_batch
  if jax.process_count() > 1:  # Each process decodes only its own rows of each batch.
    lo, hi = sharding.process_rows(mesh, global_batch)
    source = _ProcessShare(task, split, [it for g in range(num_batches)
                                         for it in items[g * global_batch + lo:
                                                         g * global_batch + hi]])
    local_batch = hi - lo
  batches = batch_iter(source, split, size=clip.image_size, batch_size=local_batch,
                       mean=clip.config.image_mean, std=clip.config.image_std,
                       crop=clip.config.image_crop, num_threads=num_threads, prefetch=prefetch, progress=on_progress)
  try:
    feats_dev, labels = encode_batches(clip, batches, mesh=mesh, num_batches=num_batches,
                                       global_batch=global_batch)
  finally:
    bar.close()
  labels = labels[:len(items)] if len(labels) >= len(items) else labels
  feats_host = sharding.to_host(feats_dev)[:len(labels)]
  valid = np.flatnonzero(labels >= 0)
  if key is not None and multihost.is_leader():
    save_cache(cache_dir, key, feats_host[valid], labels[valid], valid)
  return _on_mesh(feats_host[valid], labels[valid], split, len(items), mesh)


def _on_mesh(feats: np.ndarray, labels: np.ndarray, split: str, num_items: int,
             mesh: jax.sharding.Mesh, from_cache: bool = False) -> SplitFeatures:
  n = sharding.round_up(max(1, len(labels)), sharding.num_shards(mesh))
  padded = np.zeros((n, feats.shape[1]), np.float32)
  padded[:len(labels)] = feats
  y = np.full((n,), -1, np.int32)
  y[:len(labels)] = labels
  return SplitFeatures(sharding.put_sharded(padded, mesh), y, split, num_items, from_cache)


def encode_task(clip: Any, task: Any, *, splits: Sequence[str] | None = None,
                **kwargs) -> dict[str, SplitFeatures]:
  """`encode_split` for each split (default: the task's non-empty splits)."""
  names = list(splits) if splits is not None else list(task.splits())
  return {s: encode_split(clip, task, s, **kwargs) for s in names}


def scorer_inputs(features: dict[str, SplitFeatures]) -> tuple[dict, dict]:
  """(features_by_split, labels_by_split) for `PromptScorer` from `encode_task`'s result."""
  return ({s: f.features for s, f in features.items()},
          {s: f.labels for s, f in features.items()})
