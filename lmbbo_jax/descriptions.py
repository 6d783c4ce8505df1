"""Class descriptions: written by an LLM (CuPL, DCLIP) or drawn at random (WaffleCLIP).

Each method gives every class a list of sentences, scored by
`PromptScorer.score_descriptions` (evaluator/scorer.py):

- CuPL (Pratt et al., ICCV 2023, github.com/sarahpratt/CuPL `generate_image_prompts.py`):
  CuPL's five questions per class ("Describe what a {} looks like", ...); the answers are
  the sentences; the class embedding is the normalised mean of their normalised embeddings
  (`mean_embedding`).
- DCLIP (Menon & Vondrick, ICLR 2023): its few-shot question ("What are useful features for
  distinguishing a {} in a photo?", with the lemur and television examples) lists visual
  descriptors; each becomes "{class}, which (is/has/...) {descriptor}" (DCLIP's
  `make_descriptor_sentence`, category name prepended, ", " between) and the class score is
  the mean of the sentences' logits (`mean_logit`).
- WaffleCLIP (Roth et al., ICCV 2023, github.com/ExplainableML/WaffleCLIP `waffle_tools.py`,
  mode `waffle`): `count` pairs of a random-word and a random-character descriptor, the same
  for every class, in "A photo of a {class}, which (is/has) {descriptor}.", mean logit; no LLM.

Deviations, for a batched LLM under one call budget: one request asks one question for
several classes at once and wants a JSON object {class name: [sentences]} back (CuPL and
DCLIP send one completion request per class and question); CuPL's "a"/"an" is chosen by any
vowel (CuPL checks upper-case vowels only); WaffleCLIP's random characters are drawn from
letters and digits (it takes the characters of its GPT descriptor files, which this run does
not have).

Every reply is untrusted text: it is read by `search.parsing.read_object` (linear, capped),
its strings are cleaned and capped, and never formatted or evaluated.
"""

from __future__ import annotations

import json
import math
import string
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lmbbo_jax import templates as templates_lib
from lmbbo_jax.search import parsing

# Per-class caps on what a reply may give (a bigger reply is read up to them).
MAX_PER_CLASS = 50
MAX_DESCRIPTION_CHARS = 300

CUPL_QUESTIONS = (
    "Describe what {article} {} looks like",
    "How can you identify {article} {}?",
    "What does {article} {} look like?",
    "Describe an image from the internet of {article} {}",
    "A caption of an image of {article} {}:",
)

DCLIP_EXAMPLES = """Q: What are useful visual features for distinguishing a lemur in a photo?
A: There are several useful visual features to tell there is a lemur in a photo:
- four-limbed primate
- black, grey, white, brown, or red-brown
- wet and hairless nose with curved nostrils
- long tail
- large eyes
- furry bodies
- clawed hands and feet
Q: What are useful visual features for distinguishing a television in a photo?
A: There are several useful visual features to tell there is a television in a photo:
- electronic device
- black or grey
- a large, rectangular screen
- a stand or mount to support the screen
- one or more speakers
- a power cord
- input ports for connecting to other devices
- a remote control
"""
DCLIP_QUESTION = "Q: What are useful features for distinguishing a {} in a photo?"

_CUPL_REQUEST = (
    "Answer each request below with {n} different short sentences, each one naming what "
    "it describes.\nReply with only a JSON object that maps each class name, exactly as "
    "given, to its list of sentences.\n\n{requests}")
_DCLIP_REQUEST = (
    "{examples}\nAnswer the same question for each class below: list its useful visual "
    "features as short phrases, as in the examples.\nReply with only a JSON object that "
    "maps each class name, exactly as given, to its list of features.\n\n{requests}")

# WaffleCLIP's defaults (base_main.py): label_before_text, descriptor_separator,
# label_after_text; and the characters its random strings are drawn from (see module doc).
WAFFLE_BEFORE, WAFFLE_SEPARATOR, WAFFLE_AFTER = "A photo of a ", ", ", "."
WAFFLE_CHARACTERS = tuple(string.ascii_lowercase + string.digits)


def _fill(text: str, **slots: str) -> str:
  """Plain substitution of named slots ({name}); the class name goes last into `{}`."""
  for name, value in slots.items():
    if name != "cls":
      text = text.replace("{" + name + "}", value)
  return text.replace("{}", slots.get("cls", "{}"))


def article(name: str) -> str:
  return "an" if name[:1].lower() in "aeiou" else "a"


def wordify(name: str) -> str:
  """WaffleCLIP's and DCLIP's class name in a sentence: underscores as spaces."""
  return name.replace("_", " ")


def descriptor_sentence(descriptor: str) -> str:
  """DCLIP's `make_descriptor_sentence` (as in WaffleCLIP's waffle_tools.py), verbatim rules."""
  if descriptor.startswith("a") or descriptor.startswith("an"):
    return f"which is {descriptor}"
  if descriptor.startswith(("has", "often", "typically", "may", "can")):
    return f"which {descriptor}"
  if descriptor.startswith("used"):
    return f"which is {descriptor}"
  return f"which has {descriptor}"


def dclip_sentence(name: str, descriptor: str) -> str:
  """DCLIP's sentence: the category name prepended, ", " between."""
  return f"{wordify(name)}, {descriptor_sentence(descriptor)}"


def template_sentence(template: str, name: str, descriptor: str) -> str:
  """A template's class slot filled with DCLIP's "{class}, which ..." (ours_pn+descriptions)."""
  return templates_lib.fill(template, dclip_sentence(name, descriptor))


# -- requests ----------------------------------------------------------------------------
def cupl_prompt(question: str, names: Sequence[str], n: int) -> str:
  lines = [f"{json.dumps(name, ensure_ascii=False)}: "
           f"{_fill(question, article=article(name), cls=name)}" for name in names]
  return _fill(_CUPL_REQUEST, n=str(n), requests="\n".join(lines))


def dclip_prompt(names: Sequence[str]) -> str:
  lines = [f"{json.dumps(name, ensure_ascii=False)}: {_fill(DCLIP_QUESTION, cls=name)}"
           for name in names]
  return _fill(_DCLIP_REQUEST, examples=DCLIP_EXAMPLES, requests="\n".join(lines))


def batches(num_classes: int, questions: int, calls: int,
            classes_per_call: int = 0) -> list[tuple[int, list[int]]]:
  """(question index, classes) per LLM call: `questions` questions (fewer if the budget is
  smaller) over every class, in at most `calls` calls (classes_per_call: at least this
  many classes in one call)."""
  if calls < 1 or num_classes < 1:
    return []
  questions = min(questions, calls)
  per_question = calls // questions
  k = max(classes_per_call, math.ceil(num_classes / per_question))
  return [(q, list(range(lo, min(lo + k, num_classes))))
          for q in range(questions) for lo in range(0, num_classes, k)]


# -- replies -------------------------------------------------------------------------------
def _clean(text: Any) -> str | None:
  if not isinstance(text, str):
    return None
  text = " ".join(parsing.printable(text).split())
  if not text or len(text) > MAX_DESCRIPTION_CHARS:
    return None
  return text


def _key(name: Any) -> str:
  return " ".join(str(name).split()).strip("\"'`*").lower()


def _bullets(reply: str) -> list[str]:
  out = []
  for line in reply.splitlines()[:parsing.MAX_LINES]:
    line = line.strip()
    if line[:1] in "-*•" and len(line) > 1:
      out.append(line[1:])
  return out


def read_descriptions(reply: str, names: Sequence[str]) -> dict[int, list[str]]:
  """Descriptions per class index (into `names`) found in one reply; never raises.

  A JSON object {class name: [sentences] or "sentence"} (keys matched to the names without
  case or spacing; a wrapper object with one value is looked into); for a request about
  one class, bullet lines also count. Cleaned (one line, printable), capped per class.
  """
  by_key = {}
  for i, name in enumerate(names):
    by_key.setdefault(_key(name), i)
  found: dict[int, list[str]] = {}
  obj = parsing.read_object(reply)
  if isinstance(obj, dict) and not any(_key(k) in by_key for k in obj) and len(obj) == 1:
    inner = next(iter(obj.values()))
    obj = inner if isinstance(inner, dict) else obj
  items: list[tuple[int, Any]] = []
  if isinstance(obj, dict):
    for k, v in obj.items():
      c = by_key.get(_key(k))
      if c is not None:
        items += [(c, x) for x in (v if isinstance(v, list) else [v])]
  elif len(names) == 1 and isinstance(reply, str) and len(reply) <= parsing.MAX_ANSWER_CHARS:
    items = [(0, x) for x in _bullets(reply)]
  for c, x in items:
    text = _clean(x)
    if text is not None and len(found.setdefault(c, [])) < MAX_PER_CLASS:
      found[c].append(text)
  return found


# -- WaffleCLIP ----------------------------------------------------------------------------
def waffle_words() -> list[str]:
  """WaffleCLIP's word list (third_party/waffleclip/words.txt, in its order)."""
  from lmbbo_jax.data.resources import third_party_path
  return third_party_path("waffleclip", "words.txt").read_text(encoding="utf-8").split("\n")[:-1]


def waffle_descriptors(class_names: Sequence[str], count: int, seed: int) -> list[str]:
  """WaffleCLIP's `waffle` mode: `count` pairs (random words, random characters), shared by
  every class, sized by the class names as waffle_tools.py sizes them."""
  rng = np.random.default_rng(seed)
  names = [wordify(n) for n in class_names]
  words_per = max(int(np.round(np.mean([len(n.split(" ")) for n in names]))), 1)
  word_len = int(np.round(np.mean([np.mean([len(w) for w in n.split(" ")]) for n in names])))
  words = [w[:word_len] for w in waffle_words()]
  spaces = int(np.round(np.mean([n.count(" ") for n in names]))) + 1
  chars = int(np.ceil(np.mean([max(len(w) for w in n.split(" ")) for n in names])))
  chars += spaces - chars % spaces
  out = []
  for _ in range(count):
    out.append(" ".join(words[i] for i in rng.integers(0, len(words), size=words_per)))
    groups = ["".join(rng.choice(WAFFLE_CHARACTERS, size=chars // spaces))
              for _ in range(spaces)]
    out.append(", ".join(groups))
  return out


def waffle_sentence(name: str, descriptor: str) -> str:
  return (f"{WAFFLE_BEFORE}{wordify(name)}{WAFFLE_SEPARATOR}"
          f"{descriptor_sentence(descriptor)}{WAFFLE_AFTER}")


def artifact(class_names: Sequence[str], per_class: Sequence[Sequence[str]]) -> dict[str, list[str]]:
  """{class name: [sentences]}: the layout CuPL's prompt files and CLIP_benchmark's
  `--cupl` read. Classes with the same name (ImageNet's two cranes) merge their lists."""
  out: dict[str, list[str]] = {}
  for name, sentences in zip(class_names, per_class):
    out.setdefault(name, []).extend(s for s in sentences if s not in out.get(name, []))
  return out


def load_artifact(data: Mapping[str, Any], class_names: Sequence[str]) -> list[list[str]]:
  """Per class, the sentences of a {class name: [sentences]} file (a class it lacks: none)."""
  return [[s for s in data.get(name, []) if isinstance(s, str)] for name in class_names]
