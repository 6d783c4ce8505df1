"""Tokenizers for `CLIP`: OpenAI's CLIP BPE, and a factory for checkpoint directories.

`ClipBPETokenizer` runs the `tokenizers` backend of transformers' `CLIPTokenizer`
(fast, batched) with OpenAI's text cleaning in front, so ids equal OpenAI's
`SimpleTokenizer` (checked in tests/test_models_tokenizer.py). Its vocabulary
comes from a model directory (HF `tokenizer.json`, or `vocab.json` + `merges.txt`)
or from OpenAI's `bpe_simple_vocab_16e6.txt.gz`, shipped under
`third_party/openai_clip/` and converted in memory on first use.

A checkpoint directory names its tokenizer in `config.json` under "tokenizer":
  {"kind": "clip_bpe"}                                   OpenAI's vocabulary
  {"kind": "clip_bpe", "file": "tokenizer.json"}         HF tokenizer file in the directory
  {"kind": "clip_bpe", "vocab": "vocab.json", "merges": "merges.txt"}
  {"kind": "toy", "file": "tokenizer.json"}              the toy world's byte-level BPE
  {"kind": "hf", "lowercase": false}                     the directory's transformers
                                                         tokenizer (SigLIP's SentencePiece,
                                                         SigLIP 2's Gemma); see HFTokenizer
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.resources
import json
import os
import re
from typing import Any, Sequence

import tokenizers

from lmbbo_jax import extensions

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
# OpenAI's SimpleTokenizer keeps the first 49152 - 256 - 2 merges of the file.
NUM_MERGES = 49152 - 256 - 2
DEFAULT_BPE = ("openai_clip", "bpe_simple_vocab_16e6.txt.gz")
_WHITESPACE = re.compile(r"\s+")


class TokenizerError(ValueError):
  """A tokenizer file or config entry is missing or malformed."""


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2/CLIP's reversible map from the 256 bytes to printable unicode symbols."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1)))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, (chr(c) for c in cs)))


def default_bpe_path() -> str:
  """Path of the shipped `bpe_simple_vocab_16e6.txt.gz`."""
  return str(importlib.resources.files("lmbbo_jax.third_party").joinpath(*DEFAULT_BPE))


def vocab_and_merges_from_bpe(path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """OpenAI's vocabulary construction (simple_tokenizer.py) from the gzipped merge list."""
  try:
    with gzip.open(path, "rt", encoding="utf-8") as f:
      lines = f.read().split("\n")
  except OSError as e:
    raise TokenizerError(f"cannot read the CLIP BPE file {path!r} ({e}); reinstall lmbbo_jax "
                         "or pass a model directory with tokenizer.json") from None
  merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
  if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
    raise TokenizerError(f"{path!r} is not a CLIP BPE merge list ({NUM_MERGES} 'a b' lines "
                         "after a header)")
  symbols = list(bytes_to_unicode().values())
  tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
  return {t: i for i, t in enumerate(tokens)}, merges


def _clean(text: str) -> str:
  """OpenAI's `basic_clean` + `whitespace_clean` (the lower-casing is the backend's).

  Plain printable ASCII without '&' is unchanged by ftfy and html.unescape, so
  it skips them (the common case, and ftfy is slow).
  """
  if not (text.isascii() and text.isprintable() and "&" not in text):
    import ftfy  # Only for non-trivial text; a hard dependency of the package.
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
  return _WHITESPACE.sub(" ", text).strip()


class ClipBPETokenizer:
  """CLIP's BPE tokenizer (the `Tokenizer` protocol of `lmbbo_jax.models.api`).

  Attributes:
    sot_token_id, eot_token_id, pad_token_id: special ids (pad 0, as OpenAI pads).
    vocab_size: rows of the token embedding it needs.
    context_length: the text context it is meant for (77).
    source: where the vocabulary came from.
  """

  def __init__(self, backend: tokenizers.Tokenizer, *, context_length: int = 77,
               pad_token_id: int = 0, source: str = ""):
    self._backend = backend
    ids = [backend.token_to_id(t) for t in (SOT, EOT)]
    if any(i is None for i in ids):
      raise TokenizerError(f"tokenizer from {source or 'memory'} lacks {SOT} / {EOT}; "
                           "it is not a CLIP tokenizer")
    self.sot_token_id, self.eot_token_id = ids
    self.pad_token_id = pad_token_id
    self.vocab_size = backend.get_vocab_size()
    self.context_length = context_length
    self.source = source

  # -- constructors -----------------------------------------------------------
  @classmethod
  def from_bpe_file(cls, path: str | None = None, **kw) -> "ClipBPETokenizer":
    """From OpenAI's gzipped merge list (default: the shipped copy); cached per path."""
    path = os.path.abspath(path or default_bpe_path())
    return cls(_backend_from_bpe(path), source=path, **kw)

  @classmethod
  def from_vocab_merges(cls, vocab: dict[str, int] | str,
                        merges: list[tuple[str, str]] | str, **kw) -> "ClipBPETokenizer":
    """From a vocab dict / vocab.json path and merge pairs / merges.txt path."""
    source = ""
    if isinstance(vocab, str):
      source = os.path.dirname(os.path.abspath(vocab))
      vocab = _read_json(vocab)
    if isinstance(merges, str):
      merges = _read_merges_txt(merges)
    return cls(_clip_backend(vocab, merges), source=source, **kw)

  @classmethod
  def from_tokenizer_json(cls, path: str, **kw) -> "ClipBPETokenizer":
    """From a saved `tokenizers` file (a Hugging Face CLIP repo's tokenizer.json)."""
    try:
      backend = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises plain Exceptions for bad files.
      raise TokenizerError(f"cannot read tokenizer file {path!r}: {e}") from None
    backend.no_truncation()
    backend.no_padding()
    return cls(backend, source=os.path.abspath(path), **kw)

  @classmethod
  def from_directory(cls, directory: str, **kw) -> "ClipBPETokenizer":
    """From HF tokenizer files in `directory` (tokenizer.json, else vocab.json + merges.txt)."""
    entry = directory_tokenizer_entry(directory)
    if entry is None:
      raise TokenizerError(f"no tokenizer.json or vocab.json + merges.txt in {directory!r}")
    return tokenizer_from_config(entry, directory, **kw)

  # -- the Tokenizer protocol --------------------------------------------------
  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without start/end tokens (never truncated)."""
    texts = [_clean(t) for t in texts]
    return [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=False)]

  def encode(self, text: str) -> list[int]:
    return self.encode_batch([text])[0]

  def save(self, path: str) -> None:
    """Writes the vocabulary and pipeline as a `tokenizers` tokenizer.json."""
    self._backend.save(path)

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids` (special tokens dropped); for inspection only."""
    return self._backend.decode(list(ids), skip_special_tokens=True)

  def __repr__(self) -> str:
    return f"ClipBPETokenizer(vocab_size={self.vocab_size}, source={self.source!r})"


def _clip_backend(vocab: dict[str, int], merges: list[tuple[str, str]]) -> tokenizers.Tokenizer:
  # transformers 5 names these `vocab=`/`merges=`; `vocab_file=` would be silently ignored.
  from transformers import CLIPTokenizer
  backend = CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m) for m in merges]).backend_tokenizer
  backend.no_truncation()
  backend.no_padding()
  return backend


@functools.lru_cache(maxsize=4)
def _backend_from_bpe(path: str) -> tokenizers.Tokenizer:
  vocab, merges = vocab_and_merges_from_bpe(path)
  return _clip_backend(vocab, merges)


def _read_json(path: str) -> Any:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise TokenizerError(f"cannot read {path!r}: {e}") from None


def _read_merges_txt(path: str) -> list[tuple[str, str]]:
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().split("\n")
  except OSError as e:
    raise TokenizerError(f"cannot read {path!r}: {e}") from None
  merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
  if any(len(m) != 2 for m in merges):
    raise TokenizerError(f"{path!r} is not a merges.txt (one 'a b' pair per line)")
  return merges


def directory_tokenizer_entry(directory: str) -> dict | None:
  """The config entry for HF tokenizer files found in `directory`, or None."""
  if os.path.isfile(os.path.join(directory, "tokenizer.json")):
    return {"kind": "clip_bpe", "file": "tokenizer.json"}
  if all(os.path.isfile(os.path.join(directory, f)) for f in ("vocab.json", "merges.txt")):
    return {"kind": "clip_bpe", "vocab": "vocab.json", "merges": "merges.txt"}
  return None


def _inside(directory: str, name: Any, what: str) -> str:
  """`directory/name`, refusing names that are not plain relative paths inside it."""
  if not isinstance(name, str) or not name or os.path.isabs(name) or ".." in name.split("/"):
    raise TokenizerError(f"tokenizer entry {what}={name!r} must be a file name inside "
                         f"{directory!r}")
  return os.path.join(directory, name)


def tokenizer_from_config(entry: dict | None, directory: str, *, context_length: int = 77,
                          pad_token_id: int | None = None):
  """The tokenizer a checkpoint directory's config.json names (see module doc).

  Args:
    entry: the "tokenizer" value of config.json; None means OpenAI's CLIP BPE.
    directory: the checkpoint directory that file names are relative to.
    context_length: the model's text context.
    pad_token_id: the model config's pad id (CLIP BPE only; default 0).

  Returns:
    An object with the `Tokenizer` protocol (`ClipBPETokenizer`, or a registered kind's).
  """
  entry = {"kind": "clip_bpe"} if entry is None else entry
  if not isinstance(entry, dict):
    raise TokenizerError(f"config 'tokenizer' must be an object, got {entry!r}")
  kind = entry.get("kind")
  loader = extensions.lookup("tokenizer", kind) if isinstance(kind, str) else None
  if loader is not None:  # a registered kind, e.g. the toy world's
    return loader(_inside(directory, entry.get("file", "tokenizer.json"), "file"),
                  context_length=context_length)
  if kind == "hf":
    return HFTokenizer.from_directory(directory, lowercase=bool(entry.get("lowercase")))
  if kind != "clip_bpe":
    known = ", ".join(repr(k) for k in ["clip_bpe", "hf", *extensions.names("tokenizer")])
    raise TokenizerError(f"unknown tokenizer kind {kind!r} in {directory!r}/config.json "
                         f"(use {known})")
  kw = {"context_length": context_length}
  if pad_token_id is not None:
    kw["pad_token_id"] = pad_token_id
  if "file" in entry:
    return ClipBPETokenizer.from_tokenizer_json(_inside(directory, entry["file"], "file"), **kw)
  if "vocab" in entry or "merges" in entry:
    return ClipBPETokenizer.from_vocab_merges(
        _inside(directory, entry.get("vocab"), "vocab"),
        _inside(directory, entry.get("merges"), "merges"), **kw)
  if "bpe" in entry:
    return ClipBPETokenizer.from_bpe_file(_inside(directory, entry["bpe"], "bpe"), **kw)
  return ClipBPETokenizer.from_bpe_file(**kw)


class HFTokenizer:
  """A transformers tokenizer of a checkpoint directory (SigLIP's), in the `Tokenizer` protocol.

  SigLIP's `SiglipTokenizer` (SentencePiece, needs `sentencepiece`) applies
  big_vision's canonicalisation itself (lower-case, punctuation removed,
  whitespace collapsed); SigLIP 2's Gemma tokenizer does not, and SigLIP 2 was
  trained on lower-cased text, so its entry sets `lowercase`. The start and end
  tokens are the ones the tokenizer's own special-token template adds (read from
  one probe encoding); padding is its pad token. Never truncates.
  """

  def __init__(self, backend: Any, *, lowercase: bool = False, source: str = ""):
    self._backend = backend
    self.lowercase = lowercase
    self.source = source
    plain = backend("x", add_special_tokens=False)["input_ids"]
    framed = backend("x", add_special_tokens=True)["input_ids"]
    at = next((i for i in range(len(framed) - len(plain) + 1)
               if framed[i:i + len(plain)] == plain), None)
    start, end = (framed[:at], framed[at + len(plain):]) if at is not None else (None, None)
    if start is None or len(start) > 1 or len(end) > 1:
      raise TokenizerError(f"tokenizer of {source or 'memory'} frames a text as {framed} "
                           f"(plain: {plain}); expected at most one start and one end token")
    self.sot_token_id = start[0] if start else None
    self.eot_token_id = end[0] if end else None
    if backend.pad_token_id is None:
      raise TokenizerError(f"tokenizer of {source or 'memory'} has no pad token")
    self.pad_token_id = int(backend.pad_token_id)
    self.vocab_size = len(backend)

  @classmethod
  def from_directory(cls, directory: str, *, lowercase: bool = False) -> "HFTokenizer":
    from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
    try:
      backend = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except ImportError as e:
      raise TokenizerError(f"the tokenizer in {directory!r} needs a package: {e}; "
                           "pip install sentencepiece") from None
    except (OSError, ValueError, TypeError) as e:
      raise TokenizerError(f"cannot load the transformers tokenizer in {directory!r}: "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return cls(backend, lowercase=lowercase, source=os.path.abspath(directory))

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without start/end tokens (never truncated)."""
    texts = [t.lower() if self.lowercase else t for t in texts]
    if not texts:
      return []
    return self._backend(list(texts), add_special_tokens=False)["input_ids"]

  def encode(self, text: str) -> list[int]:
    return self.encode_batch([text])[0]

  def __repr__(self) -> str:
    return (f"HFTokenizer({type(self._backend).__name__}, vocab_size={self.vocab_size}, "
            f"lowercase={self.lowercase}, source={self.source!r})")


class StandInTokenizer:
  """CLIP's BPE with its ids folded into a smaller model's vocabulary and that model's
  special ids: text for random-weight models whose own tokenizer is not shipped
  (`random:siglip-*`, for benchmarks and tests; token counts are CLIP's)."""

  def __init__(self, *, vocab_size: int, sot_token_id: int | None, eot_token_id: int | None,
               pad_token_id: int, context_length: int):
    self._clip = ClipBPETokenizer.from_bpe_file(context_length=context_length)
    self.sot_token_id, self.eot_token_id = sot_token_id, eot_token_id
    self.pad_token_id = pad_token_id
    self.vocab_size = vocab_size
    specials = [i for i in (sot_token_id, eot_token_id, pad_token_id) if i is not None]
    self._first = max(specials) + 1  # ordinary tokens start after the special ids
    self.boundary_rule = "clip"  # the scorer may assemble ids as for CLIP's BPE

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    span = self.vocab_size - self._first
    return [[self._first + i % span for i in ids] for ids in self._clip.encode_batch(texts)]
