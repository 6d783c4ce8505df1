"""`load_clip(source)`: hub ids, local directories and files, short names, random inits.

Sources, in the order they are tried:
  "random:<arch>"      seeded random init of a named architecture (benchmarks, tests);
  "random:<name>"      a registered checkpoint's shape and tokenizer, random weights (a control);
  a short name          RN50, RN101, ViT-B/32, ViT-B/16, ViT-L/14 -> OpenAI's public weights;
                        MetaCLIP-*, DFN*-*, siglip-*, siglip2-* -> theirs (see SHORT_NAMES);
  a registered name     a checkpoint registered with `extensions.register("checkpoint", NAME,
                        dir_fn)` (our format in `dir_fn()`; the package registers the toy
                        world's `toyclip`);
  a local path          a directory (our format: config.json + params.msgpack; Hugging Face:
                        config.json + model.safetensors / pytorch_model.bin, a CLIPModel or a
                        SiglipModel (SigLIP, SigLIP 2 FixRes) with its tokenizer files; open_clip:
                        open_clip_config.json + open_clip_model.safetensors /
                        open_clip_pytorch_model.bin) or a checkpoint file (.safetensors,
                        .bin/.pt/.pth state dict, OpenAI's TorchScript archive);
  a hub id              "owner/name" on the Hugging Face hub (HF_HOME, HF_HUB_OFFLINE apply).

Converted checkpoints are cached on disk in our own format (a directory with
config.json and params.msgpack), keyed by the source and the content hashes of
the checkpoint files, so a second load reads msgpack and needs no torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
import zipfile
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from lmbbo_jax import io as io_lib
from lmbbo_jax import extensions
from lmbbo_jax.models import tokenizer as tokenizer_lib
from lmbbo_jax.models.api import CLIP
from lmbbo_jax.models.clip import abstract_variables
from lmbbo_jax.models.configs import ARCHITECTURES, CLIPConfig, get_architecture
from lmbbo_jax.models.convert import (
    CheckpointError, check_variables, config_from_hf, config_from_hf_siglip,
    config_from_open_clip, config_from_openai_state, convert_state_dict, detect_family,
    flatten, named, strip_prefix, unflatten)

# Bump when conversion output changes, so stale cache entries are not reused.
CONVERTER_VERSION = 1

# Short names -> public checkpoints on the hub.
SHORT_NAMES: dict[str, str] = {
    # OpenAI's weights (RN* only exist in open_clip format).
    "RN50": "timm/resnet50_clip.openai",
    "RN101": "timm/resnet101_clip.openai",
    "ViT-B/32": "openai/clip-vit-base-patch32",
    "ViT-B/16": "openai/clip-vit-base-patch16",
    "ViT-L/14": "openai/clip-vit-large-patch14",
    # MetaCLIP (transformers CLIPModel format), OpenAI's tower shapes.
    "MetaCLIP-B/32": "facebook/metaclip-b32-400m",
    "MetaCLIP-B/16": "facebook/metaclip-b16-fullcc2.5b",
    "MetaCLIP-L/14": "facebook/metaclip-l14-fullcc2.5b",
    "MetaCLIP-H/14": "facebook/metaclip-h14-fullcc2.5b",
    # DFN (open_clip format).
    "DFN2B-B/16": "apple/DFN2B-CLIP-ViT-B-16",
    "DFN2B-L/14": "apple/DFN2B-CLIP-ViT-L-14",
    "DFN5B-H/14": "apple/DFN5B-CLIP-ViT-H-14",
    "DFN5B-H/14-378": "apple/DFN5B-CLIP-ViT-H-14-378",
    # SigLIP and SigLIP 2 FixRes (transformers SiglipModel format); their named
    # architectures (configs.py) carry the same names.
    "siglip-base-patch16-224": "google/siglip-base-patch16-224",
    "siglip-base-patch16-256": "google/siglip-base-patch16-256",
    "siglip-large-patch16-256": "google/siglip-large-patch16-256",
    "siglip-so400m-patch14-384": "google/siglip-so400m-patch14-384",
    "siglip2-base-patch16-224": "google/siglip2-base-patch16-224",
}
# Short names whose weights were trained with QuickGELU, whatever a config file says.
_QUICK_GELU = frozenset(n for n in SHORT_NAMES if not n.startswith("siglip"))
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# Sharded checkpoints: an index naming the shard files (transformers' save_pretrained).
_HF_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt",
                    # transformers tokenizers (SigLIP's SentencePiece model, Gemma's settings)
                    "spiece.model", "tokenizer_config.json", "special_tokens_map.json")


def _short_key(name: str) -> str:
  return name.lower().replace("/", "-")  # "ViT-B/32", "vit-b-32" and "VIT-B/32" are one name.


def default_cache_dir() -> str:
  return os.environ.get("LMBBO_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "lmbbo_jax", "clip")


def registered_dir(name: str) -> str | None:
  """The directory of the checkpoint registered as `name` (`extensions`), or None."""
  where = extensions.lookup("checkpoint", name)
  return where() if where is not None else None


def load_clip(source: str, *, dtype: Any = jnp.float32, cache_dir: str | None = None,
              weights: str | None = None, config: CLIPConfig | None = None) -> CLIP:
  """Loads a CLIP model (see the module doc for `source`).

  Args:
    source: hub id, local directory or file, short name, a registered name (e.g.
      "toyclip") or "random:<arch>".
    dtype: compute dtype (float32 or bfloat16); parameters stay float32.
    cache_dir: where converted checkpoints are cached (default $LMBBO_CACHE or
      ~/.cache/lmbbo_jax/clip).
    weights: None (the source's weights) or "random" (seeded random init of the
      architecture `source` names, like "random:<arch>").
    config: the architecture, for bare state dicts whose attention heads are not
      64 wide (heads cannot be read from tensor shapes); normally inferred.

  Returns:
    A `CLIP` with `.source` the resolved source and `.weights_hash` the sha256 of
    its parameters.

  Raises:
    CheckpointError: one line saying what is wrong and how to provide the model.
  """
  if isinstance(source, os.PathLike):
    source = os.fspath(source)
  if weights not in (None, "random"):
    raise CheckpointError(f"weights={weights!r}: use None (the checkpoint's) or 'random'")
  if not isinstance(source, str) or not source.strip():
    raise CheckpointError("load_clip needs a source: a hub id, a local path, a short name "
                          f"({', '.join(SHORT_NAMES)}), a registered name "
                          f"({', '.join(extensions.names('checkpoint')) or 'none'}) or 'random:<arch>'")
  source = source.strip()
  cache_dir = cache_dir or default_cache_dir()
  registered = extensions.names("checkpoint")
  if source.startswith("random:") and source[len("random:"):] in registered:
    # An untrained control of a registered model: its shape and tokenizer.
    trained = load_clip(source[len("random:"):], dtype=dtype)
    return _make_clip(trained.config, random_variables(trained.config, seed=0),
                      trained.tokenizer, dtype, source)
  if source.startswith("random:") or weights == "random":
    return _random_clip(source.removeprefix("random:"), dtype, config)
  short = {_short_key(k): k for k in SHORT_NAMES}.get(_short_key(source))
  if short is not None:
    return _load_hub(SHORT_NAMES[short], dtype, cache_dir, config,
                     act="quick_gelu" if short in _QUICK_GELU else None, name=short)
  if source in registered:
    path = registered_dir(source)
    if not os.path.isfile(os.path.join(path, "params.msgpack")):
      raise CheckpointError(f"the checkpoint registered as {source!r} is not in {path} "
                            "(no params.msgpack); put it there or register another directory")
    return _load_own(path, dtype, source=source)
  path = os.path.expanduser(source)
  if os.path.isdir(path):
    return _load_directory(os.path.abspath(path), dtype, cache_dir, config)
  if os.path.isfile(path):
    return _load_file(os.path.abspath(path), dtype, cache_dir, config)
  if _HUB_ID.match(source) and not os.path.isabs(source) and not source.startswith("."):
    return _load_hub(source, dtype, cache_dir, config)
  raise CheckpointError(
      f"unknown CLIP source {source!r}: not a local path, a hub id (owner/name), a short "
      f"name ({', '.join(SHORT_NAMES)}), a registered name "
      f"({', '.join(extensions.names('checkpoint')) or 'none'}) or 'random:<arch>' "
      f"(archs: {', '.join(ARCHITECTURES)})")


# -- random ----------------------------------------------------------------------------

def _random_clip(arch: str, dtype, config: CLIPConfig | None) -> CLIP:
  if config is None:
    try:
      config = get_architecture(arch)
    except ValueError as e:
      raise CheckpointError(f"random weights need an architecture name: {e}") from None
  variables = random_variables(config, seed=0)
  if config.family == "siglip":  # its own tokenizer is not shipped
    tok = tokenizer_lib.StandInTokenizer(
        vocab_size=config.text.vocab_size, sot_token_id=config.sot_token_id,
        eot_token_id=config.eot_token_id, pad_token_id=config.pad_token_id,
        context_length=config.text.context_length)
  else:
    tok = tokenizer_lib.ClipBPETokenizer.from_bpe_file(
        context_length=config.text.context_length, pad_token_id=config.pad_token_id)
  _check_tokenizer(tok, config, f"random:{config.name or arch}")
  return _make_clip(config, variables, tok, dtype, f"random:{config.name or arch}")


def random_variables(config: CLIPConfig, seed: int = 0) -> dict:
  """Seeded random variables of `config`, from the shapes alone (no model compile).

  `clip.init_variables` runs (and compiles) a forward pass, which takes 10-15 s on
  a CPU; this takes about a second for ViT-B/32. Scales follow CLIP's init:
  LayerNorm/BatchNorm identity, zero biases, embeddings N(0, 0.02^2), kernels
  N(0, 1/fan_in), the logit scale log(1/0.07).
  """
  rng = np.random.default_rng(seed)
  out = {}
  for path, leaf in sorted(flatten(abstract_variables(config)).items()):
    shape, name = tuple(leaf.shape), path.rsplit("/", 1)[-1]
    stacked = "/blocks/" in path  # Leading layer axis.
    if name in ("scale", "var"):
      x = np.ones(shape, np.float32)
    elif name in ("bias", "mean"):
      x = np.zeros(shape, np.float32)
    elif name == "logit_scale":  # CLIP's init; SigLIP's own (log 10, bias -10)
      x = np.full(shape, np.log(10.0 if config.family == "siglip" else 1 / 0.07), np.float32)
    elif name == "logit_bias":
      x = np.full(shape, -10.0, np.float32)
    else:
      if name in ("embedding", "positional_embedding"):
        std = 0.02
      elif name == "class_embedding":
        std = shape[-1] ** -0.5
      else:  # Dense/conv kernels [..., in, out] and projections [width, embed].
        std = float(np.prod(shape[1 if stacked else 0:-1])) ** -0.5
      x = std * rng.standard_normal(shape, dtype=np.float32)
    out[path] = x
  return unflatten(out)


# -- our own format --------------------------------------------------------------------

def _read_json(path: str, what: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"cannot read {what} {path!r}: {e}") from None
  if not isinstance(data, dict):
    raise CheckpointError(f"{what} {path!r} is not a JSON object")
  return data


def is_own_format(directory: str) -> bool:
  path = os.path.join(directory, "config.json")
  if not (os.path.isfile(path) and os.path.isfile(os.path.join(directory, "params.msgpack"))):
    return False
  try:
    cfg = _read_json(path, "config")
  except CheckpointError:
    return False
  return all(k in cfg for k in ("embed_dim", "vision", "text"))


def _load_own(directory: str, dtype, *, source: str, cached: bool = False) -> CLIP:
  """A directory in our format: config.json (CLIPConfig + "tokenizer") + params.msgpack.

  `cached`: an entry this module wrote after a strict conversion; its variables
  are not checked against the model again (tracing the model takes seconds, and
  `apply` still refuses mis-shaped parameters).
  """
  meta = _read_json(os.path.join(directory, "config.json"), "config")
  try:
    config = CLIPConfig.from_dict(meta)
  except (KeyError, TypeError, ValueError) as e:
    raise CheckpointError(f"{directory}/config.json is not a CLIP config: {e}") from None
  path = os.path.join(directory, "params.msgpack")
  try:
    with open(path, "rb") as f:
      tree = serialization.msgpack_restore(f.read())
  except (OSError, ValueError, TypeError) as e:
    raise CheckpointError(f"cannot read {path!r}: {e}") from None
  if not isinstance(tree, dict):
    raise CheckpointError(f"{path!r} does not hold a variable tree")
  variables = tree if "params" in tree else {"params": tree}
  if not (cached and meta.get("converter_version") == CONVERTER_VERSION):
    check_variables(variables, abstract_variables(config), what=path)
  try:
    tok = tokenizer_lib.tokenizer_from_config(
        meta.get("tokenizer"), directory, context_length=config.text.context_length,
        pad_token_id=config.pad_token_id)
  except ValueError as e:
    raise CheckpointError(f"tokenizer of {directory}: {e}") from None
  _check_tokenizer(tok, config, directory)
  return _make_clip(config, variables, tok, dtype, meta.get("source") or source,
                    meta.get("weights_hash") if cached else None)


def _check_tokenizer(tok, config: CLIPConfig, what: str) -> None:
  if tok.eot_token_id != config.eot_token_id or tok.sot_token_id != config.sot_token_id:
    raise CheckpointError(
        f"{what}: tokenizer start/end ids ({tok.sot_token_id}, {tok.eot_token_id}) differ from "
        f"the config's ({config.sot_token_id}, {config.eot_token_id})")
  if tok.vocab_size > config.text.vocab_size:
    raise CheckpointError(f"{what}: tokenizer has {tok.vocab_size} tokens, the model's "
                          f"embedding only {config.text.vocab_size}")


def weights_hash(variables: Mapping) -> str:
  """sha256 over (path, dtype, shape, bytes) of every variable, in path order."""
  h = hashlib.sha256()
  for path, x in sorted(flatten(variables).items()):
    x = np.asarray(x, order="C")
    h.update(f"{path}|{x.dtype.str}|{x.shape}\n".encode())
    h.update(x.tobytes())
  return h.hexdigest()


def _make_clip(config, variables, tok, dtype, source, whash=None) -> CLIP:
  variables = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), variables)
  whash = whash or weights_hash(variables)
  return CLIP(config, jax.device_put(variables), tok, dtype, source=source, weights_hash=whash)


# -- reading PyTorch checkpoints ------------------------------------------------------------

def _import_torch(path: str):
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise CheckpointError(
        f"reading {os.path.basename(path)} needs PyTorch: pip install 'lmbbo_jax[convert]' "
        "(or use a .safetensors checkpoint; converted checkpoints are cached)") from None
  return torch


def _is_torchscript(path: str) -> bool:
  try:
    with zipfile.ZipFile(path) as z:
      return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())
  except (zipfile.BadZipFile, OSError):
    return False


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Tensors of a .safetensors file (no torch) or a torch .bin/.pt/.pth / TorchScript file."""
  if path.endswith(".safetensors"):
    from safetensors import SafetensorError, safe_open  # pylint: disable=import-outside-toplevel
    out = {}
    try:
      with safe_open(path, framework="numpy") as f:
        for k in f.keys():
          try:
            out[k] = f.get_tensor(k)
          except TypeError:  # bfloat16 has no numpy dtype: read through JAX.
            with safe_open(path, framework="flax") as g:
              out[k] = np.asarray(g.get_tensor(k), np.float32)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
      raise CheckpointError(f"cannot read {path!r}: {e}") from None
    return out
  torch = _import_torch(path)
  try:
    if _is_torchscript(path):
      with warnings.catch_warnings():  # torch.jit is deprecated, and still what OpenAI ships.
        warnings.simplefilter("ignore", DeprecationWarning)
        state = torch.jit.load(path, map_location="cpu").state_dict()
    else:
      state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many kinds for corrupt files.
    raise CheckpointError(f"cannot read {path!r} with torch: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from None
  if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
    state = state["state_dict"]  # open_clip training checkpoints.
  if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
    raise CheckpointError(f"{path!r} is not a state dict of tensors")
  return {k: v.detach().float().numpy() for k, v in state.items()}


# -- content hashes and the cache ---------------------------------------------------------------

def _file_digest(path: str, cache_dir: str) -> str:
  """sha256 of a file's content, memoised by (path, size, mtime) in the cache directory.

  Hugging Face hub blobs are named by their sha256 (LFS files) or git sha1: the
  name is used as the digest, so hub files are never re-read.
  """
  real = os.path.realpath(path)
  name = os.path.basename(real)
  if re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", name):
    return name
  st = os.stat(real)
  memo_path = os.path.join(cache_dir, "digests.json")
  memo_key = f"{real}|{st.st_size}|{st.st_mtime_ns}"
  memo = {}
  if os.path.isfile(memo_path):
    try:
      with open(memo_path, encoding="utf-8") as f:
        memo = json.load(f)
    except (OSError, ValueError):
      memo = {}
  if memo_key in memo:
    return memo[memo_key]
  h = hashlib.sha256()
  with open(real, "rb") as f:
    for block in iter(lambda: f.read(1 << 24), b""):
      h.update(block)
  memo = {k: v for k, v in memo.items() if not k.startswith(real + "|")}
  memo[memo_key] = h.hexdigest()
  _write_atomic(memo_path, json.dumps(memo).encode())
  return memo[memo_key]


def _write_atomic(path: str, data: bytes) -> None:
  """Best effort: the model cache only saves time."""
  try:
    io_lib.atomic_write(path, data)
  except OSError as e:
    logging.warning("could not write %s (%s); continuing without it", path, e)


def _source_pointer(cache_dir: str, source: str, variant: dict | None = None) -> str:
  """Where the name of `source`'s latest converted entry is kept (for offline loads)."""
  key = json.dumps([source, variant or {}], sort_keys=True)
  return os.path.join(cache_dir, "sources", hashlib.sha256(key.encode()).hexdigest() + ".json")


def _save_entry(entry: str, config: CLIPConfig, variables, whash: str, source: str,
                tokenizer_entry: dict, tokenizer_dir: str | None, pointer: str,
                tok: tokenizer_lib.ClipBPETokenizer) -> None:
  """Writes a cache entry (our own format) atomically; failure only logs a warning.

  The entry is self-contained: the tokenizer is saved as tokenizer.json, which
  also loads faster than converting OpenAI's merge list again.
  """
  parent, tmp = os.path.dirname(entry), None
  try:
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
    meta = {**config.to_dict(), "tokenizer": tokenizer_entry, "source": source,
            "weights_hash": whash, "converter_version": CONVERTER_VERSION}
    if tokenizer_dir is not None:
      for name in _TOKENIZER_FILES:
        if os.path.isfile(os.path.join(tokenizer_dir, name)):
          shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(tmp, name))
    else:
      tok.save(os.path.join(tmp, "tokenizer.json"))
      meta["tokenizer"] = {"kind": "clip_bpe", "file": "tokenizer.json"}
    with open(os.path.join(tmp, "params.msgpack"), "wb") as f:
      f.write(serialization.msgpack_serialize(variables))
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
      json.dump(meta, f, indent=1)
    if is_own_format(entry):  # Another process finished the same conversion first.
      shutil.rmtree(tmp, ignore_errors=True)
    else:
      shutil.rmtree(entry, ignore_errors=True)  # A broken leftover, if any.
      os.replace(tmp, entry)
  except OSError as e:
    logging.warning("could not cache the converted checkpoint in %s (%s)", entry, e)
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)
    return
  _write_atomic(pointer,
                json.dumps({"source": source, "entry": os.path.basename(entry)}).encode())


def _convert_cached(*, source: str, weights_files: list[str], conf_files: list[str], dtype,
                    cache_dir: str, build_config, tokenizer_dir: str | None,
                    config: CLIPConfig | None, what: str, variant: dict | None = None,
                    tokenizer_entry: dict | None = None) -> CLIP:
  """Converts `weights_files` (or reuses the cache entry keyed by source + content hashes).

  `variant` holds whatever else changes the result (a short name's overrides).
  `tokenizer_entry`: the tokenizer's config entry (default: the CLIP BPE files
  found in `tokenizer_dir`, else OpenAI's). A SigLIP config takes its start, end
  and pad ids from its tokenizer.
  """
  key_src = {"v": CONVERTER_VERSION, "source": source, "variant": variant or {},
             "files": [_file_digest(p, cache_dir) for p in [*weights_files, *conf_files]],
             "config": config.to_dict() if config else None,
             "tokenizer": ([_file_digest(os.path.join(tokenizer_dir, n), cache_dir)
                            for n in _TOKENIZER_FILES
                            if os.path.isfile(os.path.join(tokenizer_dir, n))]
                           if tokenizer_dir else [])}
  key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()
  entry = os.path.join(cache_dir, "converted", key)
  if is_own_format(entry):
    return _load_own(entry, dtype, source=source, cached=True)
  pointer = _source_pointer(cache_dir, source, variant)
  state = {}
  for path in weights_files:
    state.update(read_state_dict(path))
  state = strip_prefix(state)
  family = detect_family(state, what)
  cfg = config or build_config(state, family)
  variables = convert_state_dict(state, cfg, abstract_variables(cfg), family=family, what=what)
  del state
  tokenizer_entry = tokenizer_entry or (tokenizer_lib.directory_tokenizer_entry(tokenizer_dir)
                                        if tokenizer_dir else None) or {"kind": "clip_bpe"}
  try:
    tok = tokenizer_lib.tokenizer_from_config(
        tokenizer_entry, tokenizer_dir or "", context_length=cfg.text.context_length,
        pad_token_id=cfg.pad_token_id)
  except ValueError as e:
    raise CheckpointError(f"tokenizer of {what}: {e}") from None
  if cfg.family == "siglip" and config is None:
    cfg = cfg.replace(sot_token_id=tok.sot_token_id, eot_token_id=tok.eot_token_id,
                      pad_token_id=tok.pad_token_id)
    cfg = cfg if cfg.name else named(cfg)
  _check_tokenizer(tok, cfg, what)
  whash = weights_hash(variables)
  _save_entry(entry, cfg, variables, whash, source, tokenizer_entry, tokenizer_dir, pointer, tok)
  return _make_clip(cfg, variables, tok, dtype, source, whash)


# -- directories, files, hub ----------------------------------------------------------------

def _first_file(directory: str, names) -> str | None:
  for n in names:
    if os.path.isfile(os.path.join(directory, n)):
      return os.path.join(directory, n)
  return None


def _with_act(config: CLIPConfig, act: str | None) -> CLIPConfig:
  if act is None:
    return config
  return config.replace(text=dataclasses.replace(config.text, act=act),
                        vision=dataclasses.replace(config.vision, act=act))


def _load_directory(directory: str, dtype, cache_dir: str, config: CLIPConfig | None, *,
                    source: str | None = None, act: str | None = None,
                    name: str = "") -> CLIP:
  source = source or directory
  if is_own_format(directory):
    return _load_own(directory, dtype, source=source)
  tokenizer_dir = directory if tokenizer_lib.directory_tokenizer_entry(directory) else None
  oc_path = os.path.join(directory, "open_clip_config.json")
  oc_weights = _first_file(directory, _OPEN_CLIP_WEIGHTS)
  if os.path.isfile(oc_path) and oc_weights:
    oc = _read_json(oc_path, "open_clip config")

    def build(state, family):
      if family != "openai":
        raise CheckpointError(f"{oc_weights} is not an open_clip state dict")
      return _renamed(_with_act(config_from_open_clip(oc, state), act), name)

    return _convert_cached(source=source, weights_files=[oc_weights], conf_files=[oc_path],
                           dtype=dtype, cache_dir=cache_dir, build_config=build,
                           tokenizer_dir=None, config=config, what=source,
                           variant=_variant(act, name))
  hf_path = os.path.join(directory, "config.json")
  hf_weights = _first_file(directory, _HF_WEIGHTS)
  hf_files, hf_conf = ([hf_weights], [hf_path]) if hf_weights else ([], [])
  index = None if hf_weights else _first_file(directory, _HF_INDEXES)
  if index:
    hf_files, hf_conf = _shards(directory, index), [hf_path, index]
    hf_weights = index
  if os.path.isfile(hf_path) and hf_files:
    hf = _read_json(hf_path, "Hugging Face config")
    if hf.get("model_type") == "siglip":
      return _load_hf_siglip(directory, hf, hf_files, hf_conf, dtype, cache_dir, config,
                             source=source, name=name)

    def build_hf(state, family):
      if family != "hf":
        raise CheckpointError(f"{hf_weights} is not a Hugging Face CLIPModel state dict")
      return _renamed(_with_act(config_from_hf(hf), act), name)

    return _convert_cached(source=source, weights_files=hf_files, conf_files=hf_conf,
                           dtype=dtype, cache_dir=cache_dir, build_config=build_hf,
                           tokenizer_dir=tokenizer_dir, config=config, what=source,
                           variant=_variant(act, name))
  raise CheckpointError(
      f"{directory} holds no CLIP checkpoint: expected config.json + params.msgpack (lmbbo_jax), "
      f"config.json + {' / '.join(_HF_WEIGHTS)} (Hugging Face), or open_clip_config.json + "
      f"{' / '.join(_OPEN_CLIP_WEIGHTS)} (open_clip)")


def _load_hf_siglip(directory: str, hf: dict, hf_files: list[str], hf_conf: list[str], dtype,
                    cache_dir: str, config: CLIPConfig | None, *, source: str,
                    name: str) -> CLIP:
  """A transformers SiglipModel directory (SigLIP, or SigLIP 2 FixRes with Gemma's tokenizer)."""
  if not any(os.path.isfile(os.path.join(directory, f))
             for f in ("spiece.model", "tokenizer.json")):
    raise CheckpointError(f"{source}: a SigLIP checkpoint needs its tokenizer files "
                          "(spiece.model or tokenizer.json) beside config.json")
  tok_conf = os.path.join(directory, "tokenizer_config.json")
  tok_class = (_read_json(tok_conf, "tokenizer config").get("tokenizer_class") or ""
               if os.path.isfile(tok_conf) else "")
  # SigLIP 2 (Gemma's tokenizer) was trained on lower-cased text and its tokenizer
  # does not lower-case; SiglipTokenizer canonicalises by itself.
  entry = {"kind": "hf", "lowercase": str(tok_class).startswith("Gemma")}

  def build(state, family):
    if family != "hf_siglip":
      raise CheckpointError(f"{source} has a SigLIP config.json but not a SiglipModel "
                            "state dict")
    return _renamed(config_from_hf_siglip(hf), name)

  return _convert_cached(source=source, weights_files=hf_files, conf_files=hf_conf, dtype=dtype,
                         cache_dir=cache_dir, build_config=build, tokenizer_dir=directory,
                         config=config, what=source, variant=_variant(None, name),
                         tokenizer_entry=entry)


def _shards(directory: str, index: str) -> list[str]:
  """The shard files an index json names, all of which must be present."""
  weight_map = _read_json(index, "checkpoint index").get("weight_map")
  if not isinstance(weight_map, dict) or not weight_map:
    raise CheckpointError(f"{index} has no weight_map")
  files = []
  for name in sorted(set(weight_map.values())):
    path = os.path.join(directory, str(name))
    if os.path.basename(name) != name or not os.path.isfile(path):
      raise CheckpointError(f"{index} names shard {name!r}, which is not in {directory}")
    files.append(path)
  return files


def _variant(act: str | None, name: str) -> dict:
  return {k: v for k, v in (("act", act), ("name", name)) if v}


def _renamed(config: CLIPConfig, name: str) -> CLIPConfig:
  return config.replace(name=name) if name else config


def _load_file(path: str, dtype, cache_dir: str, config: CLIPConfig | None) -> CLIP:
  if not path.endswith((".safetensors", ".bin", ".pt", ".pth")):
    raise CheckpointError(f"{path}: unknown checkpoint file type (use .safetensors, .bin, "
                          ".pt or .pth, or a checkpoint directory)")

  def build(state, family):
    if family == "hf_siglip":
      raise CheckpointError(f"{path} is a SiglipModel state dict; load its directory (with "
                            "config.json and the tokenizer files) instead")
    if family == "hf":
      hf_path = os.path.join(os.path.dirname(path), "config.json")
      if os.path.isfile(hf_path):
        return config_from_hf(_read_json(hf_path, "Hugging Face config"))
      raise CheckpointError(f"{path} is a Hugging Face CLIPModel state dict; load its "
                            "directory (with config.json) instead")
    return config_from_openai_state(state)

  return _convert_cached(source=path, weights_files=[path], conf_files=[], dtype=dtype,
                         cache_dir=cache_dir, build_config=build, tokenizer_dir=None,
                         config=config, what=path)


def _env_flag(name: str) -> bool:
  return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _hub_cache() -> str:
  if os.environ.get("HF_HUB_CACHE"):
    return os.environ["HF_HUB_CACHE"]
  home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache",
                                                    "huggingface")
  return os.path.join(home, "hub")


def _hub_reachable(timeout_s: float = 3.0) -> bool:
  """Whether the hub endpoint accepts a TCP connection (one quick probe per process).

  Without it an unreachable hub costs ~10 s of client retries per file, and the
  "weights are missing" error should come within seconds.
  """
  global _HUB_REACHABLE
  if _HUB_REACHABLE is None:
    import socket  # pylint: disable=import-outside-toplevel
    import urllib.parse  # pylint: disable=import-outside-toplevel
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
      with socket.create_connection((url.hostname, port), timeout=timeout_s):
        _HUB_REACHABLE = True
    except OSError:
      _HUB_REACHABLE = False
  return _HUB_REACHABLE


_HUB_REACHABLE: bool | None = None


def _load_hub(repo_id: str, dtype, cache_dir: str, config: CLIPConfig | None, *,
              act: str | None = None, name: str = "") -> CLIP:
  from huggingface_hub import hf_hub_download  # pylint: disable=import-outside-toplevel
  from huggingface_hub import errors as hf_errors  # pylint: disable=import-outside-toplevel
  offline, hub_cache = _env_flag("HF_HUB_OFFLINE"), _hub_cache()
  unreachable: list[str] = []
  # An unreachable hub is treated like HF_HUB_OFFLINE: local files only.
  no_network = not offline and not _hub_reachable()
  offline = offline or no_network

  def fetch(filename: str) -> str | None:
    try:
      return hf_hub_download(repo_id, filename, cache_dir=hub_cache, local_files_only=offline)
    except hf_errors.RemoteEntryNotFoundError:
      return None
    except hf_errors.LocalEntryNotFoundError:
      unreachable.append(filename)
      return None
    except (hf_errors.RepositoryNotFoundError, hf_errors.GatedRepoError) as e:
      raise CheckpointError(f"hub repo {repo_id!r} is not available ({type(e).__name__}); "
                            "check the id, or log in with HF_TOKEN for gated repos") from None
    except (hf_errors.HfHubHTTPError, OSError, ValueError) as e:
      raise CheckpointError(f"downloading {repo_id}/{filename} failed: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None

  weights = None
  if fetch("open_clip_config.json"):
    weights = next(filter(None, map(fetch, _OPEN_CLIP_WEIGHTS)), None)
  if weights is None and fetch("config.json"):
    weights = next(filter(None, map(fetch, _HF_WEIGHTS)), None)
    for index in _HF_INDEXES if weights is None else ():
      weights = fetch(index)
      if weights:
        shard_map = _read_json(weights, "checkpoint index").get("weight_map") or {}
        if not all(fetch(str(n)) for n in sorted(set(shard_map.values()))):
          weights = None
        break
    if weights is not None:
      # SigLIP's: its SentencePiece model or Gemma's tokenizer.json, and their settings.
      for extra in ("tokenizer_config.json", "special_tokens_map.json", "spiece.model"):
        fetch(extra)
    if weights is not None and not fetch("tokenizer.json"):
      if fetch("vocab.json"):
        fetch("merges.txt")
  if weights is None:
    cached = _cached_by_source(cache_dir, repo_id, _variant(act, name))
    if cached is not None:
      return _load_own(cached, dtype, source=repo_id, cached=True)
    if unreachable:
      raise CheckpointError(
          f"CLIP {repo_id!r} is not available offline: it is not in the Hugging Face cache "
          f"{hub_cache} nor converted in {cache_dir}, and the hub "
          f"{'is unreachable' if no_network else 'is disabled (HF_HUB_OFFLINE=1)'}. Provide it as "
          "a local path (checkpoint directory or file), set HF_HOME to a cache that holds it, "
          "or download it once with network access and HF_HUB_OFFLINE unset")
    raise CheckpointError(
        f"hub repo {repo_id!r} has no CLIP checkpoint (expected config.json + "
        f"{' / '.join(_HF_WEIGHTS)}, or open_clip_config.json + {' / '.join(_OPEN_CLIP_WEIGHTS)})")
  return _load_directory(os.path.dirname(weights), dtype, cache_dir, config, source=repo_id,
                         act=act, name=name)


def _cached_by_source(cache_dir: str, source: str, variant: dict) -> str | None:
  """The last converted entry of `source`, for loading offline without the raw files."""
  pointer = _source_pointer(cache_dir, source, variant)
  if not os.path.isfile(pointer):
    return None
  try:
    with open(pointer, encoding="utf-8") as f:
      entry = os.path.join(cache_dir, "converted", json.load(f)["entry"])
  except (OSError, ValueError, KeyError, TypeError):
    return None
  return entry if is_own_format(entry) else None
