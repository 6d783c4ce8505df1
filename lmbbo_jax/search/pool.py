"""Initial template pools: the built-in generic corpus, template files, captions.

The paper samples its initial templates from LAION-COCO captions with the
class name replaced by `{}`; the official code samples 80 of them with a fixed
seed. Here a corpus is a list of valid, de-duplicated templates in file order,
and `sample_initial_pool` draws from it with the chain's seeded RNG.

* `builtin_corpus()`: `data/generic_templates.txt` shipped with the package.
* `load_template_file(path)`: one template per line (`#` comments).
* `templates_from_captions(lines, class_words)`: captions (e.g. LAION-COCO, one
  per line) -> templates, by replacing the first whole-word occurrence of a
  class word (longest words first, case-insensitive) with `{}`. Captions with
  no class word, with braces of their own or otherwise invalid are skipped.
"""

from __future__ import annotations

import os
import random
import re
from typing import Iterable, Sequence

from lmbbo_jax import templates as tpl

_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
BUILTIN_CORPUS_PATH = os.path.join(_DATA_DIR, "generic_templates.txt")

# Common nouns of web captions, used when no class words are given.
DEFAULT_CLASS_WORDS = (
    "dog", "cat", "bird", "horse", "cow", "sheep", "elephant", "bear", "zebra",
    "giraffe", "car", "truck", "bus", "train", "airplane", "plane", "boat",
    "bicycle", "motorcycle", "man", "woman", "person", "child", "boy", "girl",
    "flower", "tree", "house", "building", "chair", "table", "bed", "sofa",
    "book", "bottle", "cup", "phone", "computer", "clock", "pizza", "cake",
    "sandwich", "fish", "butterfly", "mountain", "beach", "city", "street",
)


class PoolError(ValueError):
  """A template or caption source that cannot be used."""


def _clean(lines: Iterable[str]) -> list[str]:
  """Valid, de-duplicated (by normalize) templates in input order."""
  out: list[str] = []
  seen: set[str] = set()
  for line in lines:
    line = line.strip()
    if not line or line.startswith("#") or tpl.invalid_reason(line):
      continue
    key = tpl.normalize(line)
    if key not in seen:
      seen.add(key)
      out.append(line)
  return out


def _read_corpus(path: str | os.PathLike, kind: str, parse, empty_hint: str) -> list[str]:
  """`parse(open file)` with the one-line errors of a missing or fruitless file."""
  try:
    with open(path, encoding="utf-8", errors="replace") as f:
      corpus = parse(f)
  except OSError as e:
    raise PoolError(f"cannot read {kind} file {os.fspath(path)!r}: "
                    f"{e.strerror}; pass an existing file.") from None
  if not corpus:
    raise PoolError(f"{kind} file {os.fspath(path)!r} {empty_hint}")
  return corpus


def load_template_file(path: str | os.PathLike) -> list[str]:
  """Templates from a text file, one per line; invalid lines are skipped."""
  return _read_corpus(path, "template", _clean,
                      "has no valid template (each needs a {} slot and no other braces).")


def builtin_corpus() -> list[str]:
  """The generic pool shipped with the package."""
  return load_template_file(BUILTIN_CORPUS_PATH)


def caption_to_template(caption: str, class_words: Sequence[str]) -> str | None:
  """`caption` with its first class word replaced by `{}`, or None.

  Args:
    caption: one caption (untrusted text).
    class_words: candidate words/phrases; longer ones are tried first so that
      "golden retriever" wins over "retriever".
  """
  caption = " ".join(caption.split())
  if not caption or "{" in caption or "}" in caption:
    return None
  for word in sorted(class_words, key=lambda w: (-len(w), w)):
    word = word.strip()
    if not word:
      continue
    m = re.search(r"(?<!\w)" + re.escape(word) + r"(?!\w)", caption,
                  flags=re.IGNORECASE)
    if m:
      out = caption[:m.start()] + tpl.SLOT + caption[m.end():]
      return None if tpl.invalid_reason(out) else out
  return None


def templates_from_captions(lines: Iterable[str],
                            class_words: Sequence[str] = DEFAULT_CLASS_WORDS,
                            *, max_templates: int | None = None) -> list[str]:
  """Templates made from captions (see `caption_to_template`), de-duplicated."""
  made = (caption_to_template(line, class_words) for line in lines)
  out: list[str] = []
  seen: set[str] = set()
  for t in made:
    if t is None:
      continue
    key = tpl.normalize(t)
    if key in seen:
      continue
    seen.add(key)
    out.append(t)
    if max_templates is not None and len(out) >= max_templates:
      break
  return out


def load_caption_file(path: str | os.PathLike,
                      class_words: Sequence[str] = DEFAULT_CLASS_WORDS, *,
                      max_templates: int | None = None) -> list[str]:
  """Templates from a caption file (one caption per line, streamed)."""
  return _read_corpus(
      path, "caption",
      lambda f: templates_from_captions(f, class_words, max_templates=max_templates),
      "gave no template: no caption contains one of the class words.")


def sample_initial_pool(corpus: Sequence[str], size: int,
                        rng: random.Random) -> list[str]:
  """`size` distinct templates drawn from `corpus` with `rng` (all if fewer)."""
  if size <= 0:
    raise PoolError("init_pool_size must be positive.")
  corpus = _clean(corpus)
  if not corpus:
    raise PoolError("the initial template corpus is empty.")
  return rng.sample(corpus, min(size, len(corpus)))
