"""A small caption grammar for toy scenes: the class plus a random subset of attributes.

Conventions (shared with the template lists, so prompts stay in-vocabulary):
- The article before a noun phrase is always "a" ("a arrow", "a orange star"),
  so "a photo of a {}." fills to the same form the model was trained on.
- Plurals come from `scenes.PLURALS` ("two x marks", "three plus signs").
- Style words are what make prompts matter: a sketch is captioned "a sketch
  of", "a drawing of", "a line drawing of", "an outline of"; a pixelated scene
  "a pixelated image of", "pixel art of"; and so on.
"""

from __future__ import annotations

import numpy as np

from lmbbo_jax.toyworld import scenes

# Caption prefixes by style, when the style is mentioned.
STYLE_PREFIXES: dict[str, tuple[str, ...]] = {
    "photo": ("a photo of", "a clean photo of", "a sharp photo of", "a bright photo of"),
    "sketch": ("a sketch of", "a drawing of", "a line drawing of", "an outline of",
               "a doodle of"),
    "pixelated": ("a pixelated image of", "a pixelated photo of", "pixel art of",
                  "a low resolution image of", "a low resolution photo of"),
    "blurry": ("a blurry photo of", "a blurred image of", "an out of focus photo of",
               "a blurry image of"),
    "noisy": ("a noisy photo of", "a grainy photo of", "a grainy image of",
              "a noisy image of"),
}
# Style tags for the tag form ("two red stars, sketch, dark background").
STYLE_TAGS: dict[str, tuple[str, ...]] = {
    "photo": ("photo", "clean photo"),
    "sketch": ("sketch", "drawing", "outline"),
    "pixelated": ("pixelated", "pixel art", "low resolution"),
    "blurry": ("blurry", "out of focus"),
    "noisy": ("noisy", "grainy"),
}
# Prefixes that say nothing about the style.
NEUTRAL_PREFIXES: tuple[str, ...] = ("an image of", "a picture of", "")
BACKGROUND_WORDS: dict[str, tuple[str, ...]] = {
    "white": ("white", "plain", "light"),
    "dark": ("dark", "black"),
    "striped": ("striped",),
    "dotted": ("dotted", "spotted"),
    "checkered": ("checkered",),
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "tiny"),
    "medium": ("medium",),
    "large": ("large", "big"),
}
COUNT_WORDS = {1: ("a", "a", "a", "one"), 2: ("two",), 3: ("three",)}
POSITION_PHRASES = {
    ("left", "top"): "in the top left", ("center", "top"): "at the top",
    ("right", "top"): "in the top right", ("left", "middle"): "on the left",
    ("center", "middle"): "in the center", ("right", "middle"): "on the right",
    ("left", "bottom"): "in the bottom left", ("center", "bottom"): "at the bottom",
    ("right", "bottom"): "in the bottom right",
}

# How often each attribute is mentioned.
P_STYLE, P_COLOUR, P_SIZE, P_BACKGROUND, P_POSITION = 0.75, 0.5, 0.35, 0.5, 0.3
P_COUNT_MULTI = 0.85  # Mention "two"/"three" (else the plural alone).


def _pick(rng: np.random.Generator, options):
  return options[int(rng.integers(len(options)))]


def noun_phrase(rng, label: int, colour: int, size: int, count_idx: int,
                with_count: bool = True) -> str:
  """E.g. "two small red stars" (attributes mentioned at random)."""
  name = scenes.CLASS_NAMES[label]
  count = scenes.COUNTS[count_idx]
  words = []
  if rng.random() < P_SIZE:
    words.append(_pick(rng, SIZE_WORDS[scenes.SIZES[size]]))
  if rng.random() < P_COLOUR:
    words.append(scenes.COLOURS[colour])
  noun = name if count == 1 else scenes.PLURALS[name]
  if with_count:
    if count == 1:
      words.insert(0, _pick(rng, COUNT_WORDS[1]))
    elif rng.random() < P_COUNT_MULTI:
      words.insert(0, COUNT_WORDS[count][0])
  return " ".join(words + [noun])


def caption(rng: np.random.Generator, batch: scenes.SceneBatch, i: int) -> str:
  """One caption of scene `i` of `batch`."""
  style = scenes.STYLES[batch.style[i]]
  np_text = noun_phrase(rng, batch.label[i], batch.colour[i], batch.size[i], batch.count[i])
  mods = []
  if rng.random() < P_BACKGROUND:
    bg = _pick(rng, BACKGROUND_WORDS[scenes.BACKGROUNDS[batch.background[i]]])
    mods.append(f"on a {bg} background")
  if batch.hpos[i] >= 0 and rng.random() < P_POSITION:
    key = (scenes.HORIZONTAL[batch.hpos[i]], scenes.VERTICAL[batch.vpos[i]])
    mods.append(POSITION_PHRASES[key])
  rng.shuffle(mods)
  mention_style = rng.random() < P_STYLE
  form = rng.random()
  if form < 0.2:
    # Tag form: "two red stars, sketch, dark background".
    tags = [np_text]
    if mention_style:
      tags.append(_pick(rng, STYLE_TAGS[style]))
    tags += [m.replace("on a ", "") for m in mods]
    text = ", ".join(tags)
  else:
    prefix = (_pick(rng, STYLE_PREFIXES[style]) if mention_style
              else _pick(rng, NEUTRAL_PREFIXES))
    head = f"{prefix} {np_text}".strip()
    if mods and form < 0.35:
      # Modifiers first: "on a dark background, a sketch of a ring".
      text = f"{' '.join(mods)}, {head}"
    else:
      text = " ".join([head] + mods)
  if rng.random() < 0.5:
    text += "."
  return text


def captions(rng: np.random.Generator, batch: scenes.SceneBatch) -> list[str]:
  """One caption per scene."""
  return [caption(rng, batch, i) for i in range(len(batch))]


def vocabulary() -> set[str]:
  """Every word the grammar can produce (for in-vocabulary template checks)."""
  words: set[str] = set()
  phrases = [*NEUTRAL_PREFIXES, *POSITION_PHRASES.values(), "on a background"]
  for group in (STYLE_PREFIXES, STYLE_TAGS, BACKGROUND_WORDS, SIZE_WORDS, COUNT_WORDS):
    for options in group.values():
      phrases += list(options)
  phrases += list(scenes.CLASS_NAMES) + list(scenes.PLURALS.values()) + list(scenes.COLOURS)
  for p in phrases:
    words.update(p.replace(",", " ").replace(".", " ").split())
  return words


# Generic templates, every word inside the caption grammar's vocabulary.
GENERIC_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a {}.",
    "a clean photo of a {}.",
    "a sharp photo of a {}.",
    "a sketch of a {}.",
    "a drawing of a {}.",
    "a line drawing of a {}.",
    "an outline of a {}.",
    "a doodle of a {}.",
    "a pixelated image of a {}.",
    "a pixelated photo of a {}.",
    "pixel art of a {}.",
    "a low resolution image of a {}.",
    "a blurry photo of a {}.",
    "a blurred image of a {}.",
    "an out of focus photo of a {}.",
    "a noisy photo of a {}.",
    "a grainy photo of a {}.",
    "a {} on a dark background.",
    "a {} on a white background.",
    "a {} on a striped background.",
    "a small {}.",
    "a large {}.",
)
