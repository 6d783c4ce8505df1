"""Reading candidate templates out of LLM replies, and validating them.

LLM replies are untrusted text, in whatever style the model likes, and may be
hostile. `read_reply` takes what a careful reader would take as templates, in
worst-case time linear in the reply's length, and never raises:

1. Caps, each hit a rejection with its reason: a reply longer than
   `MAX_REPLY_CHARS` is not read; of what is left once reasoning is dropped,
   `MAX_ANSWER_CHARS`; lines longer than `MAX_LINE_CHARS` and past
   `MAX_LINES`, JSON past `MAX_JSON_NODES`, markup past `MAX_MARKUP` tags,
   candidates past `MAX_CANDIDATES` and pieces of text past `MAX_PIECES` are
   not read.
2. Terminal colour codes go, the text is NFC-normalised and its invisible
   characters removed (`templates.canonical`); reasoning is dropped: `<think>`,
   `<thinking>`, `<thought>`, `<reasoning>`, `<reflection>`, `[THINK]`,
   `◁think▷`, `<|begin_of_thought|>` blocks (an unclosed one hides the rest, a
   lone closing tag what precedes it), gpt-oss harmony channels (only `final`
   is read, also when the server stripped the tokens) and other special
   tokens (`<|im_end|>`, `</s>`, `[INST]`, `<end_of_turn>`, ...).
3. Structured replies: a reply that is, or holds (in a code fence or from a
   bracket), a JSON value or a Python literal (single quotes, trailing commas;
   read by a token scanner, never `eval`) gives its strings under
   template-like keys (`templates`, `prompts`, `candidates`, items'
   `template`/`prompt`/`text`, at any depth), or its list strings; fields such
   as `why` or `reasoning` are never read. Structured text is used only when
   it holds a slot or is the whole reply, so a stray `[]` or word list never
   empties or replaces a reply. Its strings are read as list items, without
   the prose filter (the structure says they are templates).
4. Otherwise line by line: HTML tags and entities (block tags break lines,
   cells become table pipes), tables (the template column, never a `why` one),
   headings, code comments, list markers of any style (bullets and emoji,
   check boxes, `1.`, `1)`, `(1)`, `i.`, `a)`, `#1`, `①`, `1️⃣`, `１．`,
   "Template 2:", "Step 1:"), Markdown emphasis and links. Text addressed to
   the reader never becomes a template: lead-ins ending in a colon, headings,
   labelled notes ("Why:", "Note:", "Rationale:"), remarks in parentheses, and
   prose about templates, scores, the reader or the writer ("This one keeps
   ...", "Shows the {} ...") in English, French, German, Spanish, Chinese,
   Japanese or Korean. A quoted span with a slot (straight, curly, guillemet,
   CJK corner, backtick quotes) is a template unless what precedes it on the
   line is a rationale; several quoted spans, parts split by ` | `, `; `,
   ` • `, or joined by ", ", " or " or inline numbers with a slot in each, are
   several templates, never one. An unquoted part with the slot is cut at an
   explanation (" - ", ": ", " → ", " // ", a new sentence, a trailing remark
   or gloss in parentheses). Score annotations (`(score: 0.85)`, `[acc=0.9]`,
   `- 85%`, `Score: 71.2`, `(new)`) are removed wherever they appear,
   structured strings included.

Unambiguous placeholder variants (`{class}`, `{classname}`, `{class_name}`,
`{object}`, `{label}`, `{category}`, `[CLASS]`, `<class>`, `{{}}`, `{ }`,
full-width `｛｝`, any case) become `{}`. A list item without a slot is kept, so
that `validate` reports it ("no {} slot") instead of dropping it silently.

Why the time is linear: every regular expression applied to the reply either
starts at a fixed position, or starts only at a distinctive character and reads
a bounded or possessive (`*+`, never given back) run that ends at the next such
character (a run of spaces is entered only at its start), so no character is
read more than a constant number of times; whole-text passes run only when a
fast literal search finds what they need; JSON is decoded by the standard C
decoder; and every Python-level step (a line, a quoted span, a split part, a
sentence, a tag, a JSON value) is counted against a cap. A reply longer than
`INLINE_PARSE_CHARS` is read in a worker thread (`read_reply_off_loop`), so
that even the bounded worst case never holds the event loop.

`validate` decides which candidates may be scored: at least one `{}`, no other
`{...}` field (`templates.invalid_reason`, so `{0.__class__}` or `{name}` never
reach `str.format` anywhere), writable as UTF-8, a length bound, the scorer's
context check, and no duplicate (by `templates.normalize`: canonical form,
whitespace and case) of anything the chain has already evaluated or of an
earlier candidate in the same reply.

Templates with several `{}` are accepted (the paper's own EuroSAT example has
two); every slot is filled with the class name.
"""

from __future__ import annotations

import asyncio
import dataclasses
import html
import itertools
import json
import re
import unicodedata
from typing import Any, Callable, Iterable, Iterator

from lmbbo_jax import templates as tpl

DEFAULT_MAX_CHARS = 300
# Caps on what one reply may cost to read (each hit is a rejection).
MAX_REPLY_CHARS = 1_000_000
# What is left once reasoning is dropped: more is never a list of templates.
MAX_ANSWER_CHARS = 65_536
MAX_LINE_CHARS = 2_000
MAX_LINES = 1_000
MAX_JSON_NODES = 5_000
MAX_CANDIDATES = 200
# Pieces of text (lines, quoted spans, separated parts, sentences, table cells)
# looked at one by one, and HTML tags and entities converted: the bound on the
# Python-level work of one reply whatever its shape.
MAX_PIECES = 5_000
MAX_MARKUP = 2_000
# A reply up to this long is parsed on the event loop; a longer one in a thread.
INLINE_PARSE_CHARS = 16_384
# The prefix of the rejection reason given when the parser itself fails.
INTERNAL_ERROR = "the reply could not be read"

_PREVIEW_CHARS = 80

# --- reasoning and special tokens ----------------------------------------------
_REASONING_RE = re.compile(
    r"<(/?)(?:think|thinking|thought|reasoning|reflection|seed:think)>"
    r"|\[(/?)think\]|◁(/?)think▷|<\|(begin|end)_of_thought\|>", re.I)
# Literals one of which every special token holds (searched for before the pattern runs).
_SPECIAL_TOKEN_HINTS = ("<|", "<s>", "</s>", "_of_turn>", "inst]", "<eos>", "<bos>", "<pad>",
                        "<unk>", "<end_of_utterance>")
_HARMONY_RE = re.compile(r"<\|(channel|message|end|start|return|call)\|>")
_SPECIAL_TOKEN_RE = re.compile(
    r"<\|[A-Za-z0-9_:.-]{1,40}+\|>|</?s>|<(?:start|end)_of_turn>|\[/?INST\]"
    r"|<(?:eos|bos|pad|unk|end_of_utterance)>", re.I)

# --- placeholders, HTML, emphasis ----------------------------------------------
_PLACEHOLDER_NAMES = (r"(?:class[ _-]?name|class|object[ _-]?name|object|label|category"
                      r"|class[ _-]?label)")
# Each alternative starts at a bracket and reads a possessive whitespace run
# and a bounded name: linear.
_PLACEHOLDER_RE = re.compile(
    r"\{\{\s*+\}\}|\{\s++\}|\{\{\s*+" + _PLACEHOLDER_NAMES + r"\s*+\}\}"
    r"|\{\s*+" + _PLACEHOLDER_NAMES + r"\s*+\}|\[\s*+" + _PLACEHOLDER_NAMES + r"\s*+\]"
    r"|<\s*+" + _PLACEHOLDER_NAMES + r"\s*+>", re.I)
# Something every placeholder variant holds: a double or spaced brace, or a name.
_PLACEHOLDER_HINT_RE = re.compile(r"\{\{|\{\s|class|object|label|category", re.I)
_TAG_RE = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9:-]{0,20}+)(?:\s[^<>]{0,300}+)?+/?>")
_BLOCK_TAGS = frozenset("br p div ul ol li h1 h2 h3 h4 h5 h6 table thead tbody tfoot "
                        "blockquote pre dl dt dd hr section article details summary "
                        "answer output".split())
_CELL_TAGS = frozenset(("td", "th"))
# A brace group with emphasis characters inside, such as `{0.__class__}`.
_BRACED_EMPHASIS_RE = re.compile(r"\{[^{}*_~]*+[*_~][^{}]*+\}")
_EMPHASIS_RE = re.compile(r"\*\*|__|~~|(?<![^\W_])[*_]|[*_](?![^\W_])")

# --- quotes ------------------------------------------------------------------------
# Opening quote -> its possible closing quotes.
_QUOTE_PAIRS = {'"': '"', "“": "”", "„": "“”", "‘": "’", "‚": "‘’", "«": "»",
                "»": "«", "‹": "›", "「": "」", "『": "』", "`": "`", "'": "'"}
_QUOTES = "\"'“”‘’`«»„‚‹›「」『』"
_QUOTE_CHAR_RE = re.compile("[" + re.escape("".join(_QUOTE_PAIRS)) + "]")

# --- list markers, labels, separators ----------------------------------------------
_NUMBERING_RE = re.compile(
    r"\(?\d{1,3}[.)\]:．）、](?!\d)"
    r"|\(?(?:[ivxlc]{1,6}|[a-z])[.)\]](?=\s)"
    r"|\(\s?(?:\d{1,3}|[ivxlc]{1,6}|[a-z])\s?\)"
    r"|[#№]\s?\d{1,3}[.):]?(?=\s|$)"
    r"|(?:no|nr)\.?\s?\d{1,3}[.):](?=\s)"
    r"|\d\ufe0f?\u20e3"
    r"|\[[ xX✓✔]\](?=\s)", re.I)
_LABEL_RE = re.compile(
    r"([^\W\d_]{1,20}+(?:[ \t][^\W\d_]{1,20}+){0,3})[ \t]?#?[ \t]?(?:\d{1,3}|[A-Za-z]\b)?"
    r"[ \t]?(?::|：|\)|\.(?=\s)| -| –| —)")
_BULLET_EXTRA = frozenset("\ufe0f\u20e3\u200d")
_NOT_BULLETS = frozenset("\"'`“”‘’«»„‚‹›「」『』([{<#%@&$\\")
# Between several templates on one line, and between a template and its explanation.
_LIST_SPLIT_RE = re.compile(r" \|\|? |; |；|\t| / | [•·] ")
_EXPLANATION_SPLIT_RE = re.compile(r" [-–—] | -- |: |： | [→←] | => | -> | <- | // | # ")
# Joins that split a part only when every piece holds a slot ("a {} or a {}").
# A number starts only after a non-space, so a run of spaces is read once.
_JOIN_SPLIT_RE = re.compile(r", (?:or |and )?| or |(?<!\s)\s++(?=\(?\d{1,2}[.)]\s)")
# A Markdown link: its text is kept.
_LINK_RE = re.compile(r"\[([^\[\]\n]{1,300}+)\]\([^()\s]{0,300}+\)")
_ENTITY_RE = re.compile(r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});?")
_ANSI_RE = re.compile(r"\x1b\[[0-9;?]{0,20}+[A-Za-z]")
_LINE_BREAK_RE = re.compile(r"\r\n?|[\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")
_NONBLANK_LINE_RE = re.compile(r"^[^\S\n]*+\S[^\n]*+", re.M)
_FENCE_LINE_RE = re.compile(r"^[^\S\n]*+(?:```|~~~)[^\n]*+", re.M)
_SENTENCE_END_RE = re.compile(r"[.!?]\s++(?=[A-Z(])|[。！？](?=.)")
_BRACKET_GROUP_RE = re.compile(r"[(\[]([^()\[\]{}\n]{0,80}+)[)\]]")
_WORD_RE = re.compile(r"[^\W_]+")
_NUMBER_RE = re.compile(r"[~≈±+-]?\d++(?:[.,]\d++)?+%?(?:/\d++)?")
_KEY_VALUE_RE = re.compile(r"[:=]")
_DECIMAL_RE = re.compile(r"\d[.,]\d")
# Words before a trailing number that make it part of the template ("at 50%").
_LINKING_WORDS = frozenset("at of in with by from to about over under than".split())

_TEMPLATE_LABELS = frozenset(
    "template templates prompt prompts option options candidate candidates suggestion "
    "suggestions idea ideas step version variant variation example alternative answer "
    "final output result proposal choice pick entry item new improved revised updated "
    "suggested proposed my another one two three four five number no modèle nouveau "
    "vorlage neue neuer plantilla nueva propuesta".split())
_TEMPLATE_LABELS_CJK = ("模板", "提示", "答案", "回答", "テンプレート", "プロンプト", "案", "템플릿")
_RATIONALE_LABELS = frozenset(
    "why reason reasons reasoning rationale because explanation explanations note notes "
    "nb tip tips justification comment comments analysis score scores accuracy expected "
    "estimated previous original baseline current best worst observation observations "
    "insight insights summary takeaway pros cons warning caveat remark pourquoi raison remarque "
    "explication begründung grund hinweis anmerkung warum erklärung razón nota "
    "explicación porque".split())
_RATIONALE_LABELS_CJK = ("原因", "理由", "说明", "注意", "备注", "解释", "分析", "説明",
                         "注", "ポイント", "解説", "为什么", "なぜ", "이유", "설명")
# Words that never occur in a caption template but do in text about templates,
# scores, the reader or the writer.
_META_WORDS = frozenset(
    "template templates prompt prompts placeholder placeholders slot slots accuracy "
    "score scores scored scoring candidate candidates suggestion suggestions because "
    "emphasizes emphasises emphasize emphasise emphasizing emphasising highlights "
    "rationale explanation reasoning classname you your yours i we let hope hopefully "
    "feel variations dataset datasets classifier classify classification modèle modèles "
    "gabarit gabarits vous votre vos je j espère nous vorlage vorlagen ihnen ich wir "
    "hoffe plantilla plantillas usted espero".split())
_META_CJK = ("模板", "提示", "以下是", "这些", "希望", "您", "テンプレート", "プロンプト",
             "以下は", "これらの", "템플릿", "프롬프트")
_OPENERS = frozenset(
    "here here's heres sure certainly okay ok note notes why these below following useful "
    "ideal helpful "
    "remember tip hint thanks voici voilà voila hier gerne natürlich folgende aquí claro "
    "estas".split())
# "This one ...", "It keeps ...": the writer describing a template.
_SUBJECTS = frozenset("this these that it they each both all".split())
_SUBJECT_NOUNS = frozenset("one ones version versions variant variation first second "
                           "third last option options idea".split())
_RATIONALE_VERBS = frozenset(
    "uses use places place keeps keep shows show adds add focuses focus emphasizes "
    "emphasises makes make gives give helps help works work captures capture highlights "
    "mirrors mirror removes remove avoids avoid targets target leans lean combines "
    "combine tests test tries try describes describe matches match puts put stresses "
    "stress should might may could will would".split())
_RATIONALE_WORDS = frozenset(
    "because since than unlike compared similar replace replaces replaced replacing "
    "keeps keep slot placeholder accuracy score scored emphasizes emphasises highlights "
    "focuses why reason rationale worked performed previous original earlier existing "
    "baseline".split())
_RATIONALE_OPENERS = frozenset("this these that it they why because since note each "
                               "both all".split())
_ANNOTATION_WORDS = frozenset(
    "score acc accuracy est estimated estimate expected predicted pred conf confidence "
    "val valid validation train test top p approx ca rating prob probability logprob "
    "guess".split())
# Bracketed remarks that tag a template rather than describe the image.
_TAG_REMARKS = frozenset(("new", "updated", "revised", "improved", "alt", "alternative",
                          "variant", "baseline", "best", "top pick", "my top pick",
                          "recommended", "favorite", "favourite", "original", "safe", "bold"))
# Words that mark a trailing number as a score (`Score: 71.2`).
_SCORE_KEYS = frozenset("score acc accuracy est estimated expected predicted conf "
                        "confidence rating prob probability logprob".split())
_TEMPLATE_KEYS = ("templates", "prompts", "new_templates", "new_prompts", "candidates",
                  "suggestions", "template", "prompt", "outputs", "output", "results",
                  "result", "answers", "answer", "items", "captions", "caption",
                  "variations", "variants", "text", "value", "content", "data", "response")
_SKIPPED_KEYS = frozenset(
    "why reason reasons reasoning rationale explanation explanations note notes analysis "
    "thoughts thinking thought comment comments justification description score scores "
    "accuracy confidence id index rank style category".split())


@dataclasses.dataclass
class Reading:
  """What a reply holds: candidate templates (still to validate) and rejections."""

  candidates: list[str] = dataclasses.field(default_factory=list)
  rejections: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def _preview(text: str) -> str:
  head = printable(text[:_PREVIEW_CHARS])
  return head + "…" if len(text) > _PREVIEW_CHARS else head


def printable(text: str) -> str:
  """`text` with lone surrogates replaced, so that it can be logged and sent."""
  return text.encode("utf-8", "replace").decode("utf-8") if _has_surrogate(text) else text


def _has_surrogate(text: str) -> bool:
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:
    return True
  return False


def normalize_placeholders(text: str) -> str:
  """`{class}`, `[CLASS]`, `<class>`, `{{}}`, `{ }`, `｛｝`, ... -> `{}`."""
  if "｛" in text or "｝" in text:
    text = text.replace("｛", "{").replace("｝", "}")
  return _PLACEHOLDER_RE.sub(tpl.SLOT, text) if _PLACEHOLDER_HINT_RE.search(text) else text


# --- reasoning ------------------------------------------------------------------------
def _drop_reasoning(text: str, reading: Reading) -> str:
  """Text outside reasoning blocks; an unclosed block hides the rest, a lone close what precedes it.

  Each pass runs only when a literal it needs is in the text (a fast search),
  and after `MAX_MARKUP` reasoning tags the rest counts as reasoning.
  """
  low = text.lower()  # only searched in: a length change does not matter
  if any(word in low for word in ("think", "reasoning", "reflection", "thought")):
    kept, keep_from, inside = [], 0, False
    for count, m in enumerate(_REASONING_RE.finditer(text)):
      if count >= MAX_MARKUP:
        reading.rejections.append((_preview(text[m.start():]), f"more than {MAX_MARKUP} "
                                   "reasoning tags; the rest was not read"))
        inside = True
        break
      closing = bool(m.group(1) or m.group(2) or m.group(3)) or m.group(4) == "end"
      if not inside and not closing:
        kept.append(text[keep_from:m.start()])
        inside = True
      elif closing:
        if not inside:
          kept = []  # a lone close: what precedes it was reasoning
        keep_from, inside = m.end(), False
    if not inside:
      kept.append(text[keep_from:])
    text = "\n".join(kept)
  if "<|" in text and any(f"<|{t}|>" in text for t in ("channel", "message")):
    text = _harmony_final(text)
  elif text.lstrip()[:8].lower() == "analysis" and "assistantfinal" in text:
    # harmony with its special tokens stripped by the server
    text = text[text.rfind("assistantfinal") + len("assistantfinal"):]
  if any(t in low for t in _SPECIAL_TOKEN_HINTS):
    text = _SPECIAL_TOKEN_RE.sub("\n", text)
  return text


def _harmony_final(text: str) -> str:
  """gpt-oss harmony: the `final` channel's messages, else the text outside any message."""
  finals, outside = [], []
  channel = channel_at = body_at = None
  last = 0
  for count, m in enumerate(_HARMONY_RE.finditer(text)):
    if count >= MAX_MARKUP:
      break  # the rest is not read
    kind = m.group(1)
    if body_at is not None:  # any token ends a message
      if channel is None or channel.startswith("final"):
        finals.append(text[body_at:m.start()])
      body_at = channel = None
    elif channel_at is None:
      outside.append(text[last:m.start()])
    if kind == "channel":
      channel_at = m.end()
    elif kind == "message":
      if channel_at is not None:
        channel = text[channel_at:m.start()].strip().lower()
      channel_at, body_at = None, m.end()
    else:
      channel_at = None
    last = m.end()
  if body_at is not None:
    if channel is None or channel.startswith("final"):
      finals.append(text[body_at:])
  elif channel_at is None:
    outside.append(text[last:])
  return "\n".join(finals) if finals else "\n".join(outside)


# --- structured replies (JSON, Python literals) -------------------------------------------
_JSON = json.JSONDecoder()
_LITERAL_TOKEN_RE = re.compile(
    r"\s*+(?:(?P<s>[rRuU]?(?:'(?:[^'\\\n]|\\.)*+'|\"(?:[^\"\\\n]|\\.)*+\"))"
    r"|(?P<p>[\[\]{}(),:])|(?P<n>[-+]?[0-9][0-9_.eE+-]*+)|(?P<w>[A-Za-z_]\w*+))", re.S)
_ESCAPE_RE = re.compile(r"\\(u[0-9a-fA-F]{4}|x[0-9a-fA-F]{2}|.)", re.S)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\n": ""}
_LITERAL_NAMES = frozenset(("True", "False", "None", "true", "false", "null"))
_CLOSE = object()


def _unescape(body: str, raw: bool) -> str:
  if raw or "\\" not in body:
    return body

  def one(m: re.Match) -> str:
    e = m.group(1)
    if len(e) > 1:
      return chr(int(e[1:], 16))
    return _ESCAPES.get(e, e)

  return _ESCAPE_RE.sub(one, body)


def _literal(text: str, start: int) -> tuple[Any, int] | None:
  """A Python/JSON literal (lists, tuples, dicts, strings, numbers) at `start`, or None.

  Each token is matched once at a known position, so this reads `text` once.
  """
  stack: list[list | dict] = []
  keys: list[Any] = []  # per dict on the stack: its pending key (or _CLOSE when none)
  pos, tokens = start, 0
  while True:
    tokens += 1
    if tokens > MAX_JSON_NODES or len(stack) > 64:
      return None
    m = _LITERAL_TOKEN_RE.match(text, pos)
    if m is None:
      return None
    pos = m.end()
    if m.group("p"):
      p = m.group("p")
      if p in "[({":
        stack.append({} if p == "{" else [])
        keys.append(_CLOSE)
        continue
      if p in "])}":
        if not stack or (p == "}") != isinstance(stack[-1], dict):
          return None
        keys.pop()
        value = stack.pop()
      else:
        if not stack:
          return None
        if p == ":" and (not isinstance(stack[-1], dict) or keys[-1] is _CLOSE):
          return None
        continue
    elif m.group("s"):
      s = m.group("s")
      raw = s[0] in "rR"
      if s[0] not in "'\"":
        s = s[1:]
      value = _unescape(s[1:-1], raw)
    elif m.group("w"):
      if m.group("w") not in _LITERAL_NAMES:
        return None
      value = None
    else:
      value = None  # a number: only strings matter here
    if not stack:
      return value, pos
    top = stack[-1]
    if isinstance(top, list):
      top.append(value)
    elif keys[-1] is _CLOSE:
      keys[-1] = value if isinstance(value, (str, type(None))) else str(value)
    else:
      top[keys[-1]] = value
      keys[-1] = _CLOSE


def _decode(text: str, start: int) -> tuple[Any, int] | None:
  try:
    return _JSON.raw_decode(text, start)
  except (ValueError, RecursionError):
    return _literal(text, start)


def _value_starts(text: str) -> list[int]:
  """Where a JSON value or literal may start: a few places, each tried once."""
  starts = {0} if text[:1] in "[{" else set()
  for marker in ("[", "{\"", "{'", "[\"", "['", "\n[", "\n{"):
    i = text.find(marker)
    if i >= 0:
      starts.add(i + (marker[0] == "\n"))
  return sorted(starts)


def _structured_strings(obj: Any, reading: Reading) -> list[str]:
  """Strings a structured reply offers as templates, in document order."""
  out: list[str] = []
  nodes = 0
  stack: list[tuple[Any, bool]] = [(obj, True)]
  while stack:
    node, any_string = stack.pop()
    nodes += 1
    if nodes > MAX_JSON_NODES:
      reading.rejections.append(
          ("(structured reply)", f"more than {MAX_JSON_NODES} JSON values; the rest was not read"))
      break
    if isinstance(node, str):
      if any_string or tpl.SLOT in normalize_placeholders(node):
        out.append(node)
    elif isinstance(node, list):
      stack.extend((item, any_string) for item in reversed(node))
    elif isinstance(node, dict):
      named = {str(k).strip().lower(): v for k, v in node.items()}
      chosen = next((k for k in _TEMPLATE_KEYS if k in named), None)
      if chosen is not None:
        stack.append((named[chosen], True))
      else:  # unknown fields: only strings that hold a slot
        stack.extend((v, False) for k, v in reversed(named.items())
                     if k not in _SKIPPED_KEYS)
  return out


def _structured(text: str, reading: Reading, budget: _Budget) -> list[str] | None:
  """Candidates of a structured reply, or None when the reply is not one."""
  whole = text.strip()
  for piece in [whole, *_fences(text)]:
    piece = piece.strip()
    read_to = -1
    for start in _value_starts(piece):
      if start < read_to:
        continue  # inside a value already read
      got = _decode(piece, start)
      if got is None:
        continue
      obj, end = got
      read_to = end
      strings = _structured_strings(obj, reading)[:MAX_CANDIDATES]
      is_whole = piece is whole and start == 0 and not piece[end:].strip()
      if not is_whole and not any(tpl.SLOT in normalize_placeholders(s) for s in strings):
        continue
      cands = [c for s in strings for c in _text_candidates(s, reading, budget)]
      if is_whole or any(tpl.SLOT in c for c in cands):
        return cands
  return None


# --- lines --------------------------------------------------------------------------------
class _Budget:
  """How many more pieces of one reply may be looked at (`MAX_PIECES` in all)."""

  def __init__(self):
    self.left = MAX_PIECES

  def spend(self, n: int = 1) -> bool:
    self.left -= n
    return self.left >= 0


@dataclasses.dataclass
class _Context:
  """What earlier lines tell about the next one."""

  budget: _Budget
  in_fence: bool = False
  table_column: int | None = None  # the template column of the current table
  table_skip: frozenset = frozenset()  # its rationale and number columns
  table_header: bool = False
  # A structured reply's string: the structure says it is a template, so it is
  # read without the prose filter (markers, labels and annotations still go).
  structured: bool = False

  def prose(self, text: str) -> bool:
    return not self.structured and _is_prose(text)

  def rationale(self, text: str) -> bool:
    return not self.structured and _is_rationale(text)


def _fences(text: str) -> list[str]:
  """Contents of the first fenced code blocks of `text`."""
  blocks, opened = [], None
  for m in _FENCE_LINE_RE.finditer(text):
    if m.group(0).count("```") > 1:
      continue  # a one-line code span
    if opened is None:
      opened = m.end()
    else:
      blocks.append(text[opened:m.start()])
      opened = None
      if len(blocks) >= 8:
        break
  return blocks


def _convert_html(text: str, reading: Reading) -> str:
  """HTML entities decoded; block tags become line breaks, table cells pipes, the rest goes.

  After `MAX_MARKUP` entities or tags the rest of the text is not read.
  """
  if "&" in text:
    text = normalize_placeholders(_replace_capped(_ENTITY_RE, text, html.unescape, reading))
  if "<" in text:
    text = _replace_capped(_TAG_RE, text, _tag_replacement, reading)
  return text


def _tag_replacement(tag: str) -> str:
  closing = tag[1:2] == "/"
  name = _TAG_RE.match(tag).group(2).lower()
  if name == "li" and not closing:
    return "\n- "
  if name in _BLOCK_TAGS:
    return "\n"
  if name == "tr":
    return "\n" if closing else "\n|"
  if name in _CELL_TAGS:
    return "|" if closing else ""
  return ""


def _replace_capped(pattern: re.Pattern, text: str, replace: Callable[[str], str],
                    reading: Reading) -> str:
  out, last = [], 0
  for count, m in enumerate(pattern.finditer(text)):
    if count >= MAX_MARKUP:
      reading.rejections.append((_preview(text[m.start():]), f"more than {MAX_MARKUP} HTML "
                                 "tags or entities; the rest was not read"))
      return "".join(out)
    out.append(text[last:m.start()])
    out.append(replace(m.group(0)))
    last = m.end()
  out.append(text[last:])
  return "".join(out)


def _strip_emphasis(text: str) -> str:
  """Markdown `**bold**`, `__bold__`, `*it*`, `~~struck~~` removed.

  A line with a brace group such as `{0.__class__}` is left as it is: it is
  rejected as a format field anyway, and its rejection must quote it intact.
  """
  if _BRACED_EMPHASIS_RE.search(text):
    return text
  return _EMPHASIS_RE.sub("", text)


def _words(text: str) -> list[str]:
  return _WORD_RE.findall(text.casefold())


def _is_prose(text: str) -> bool:
  """Whether `text` talks to the reader or about templates rather than being one."""
  words = _words(text)
  if not words:
    return False
  if words[0] in _OPENERS or not _META_WORDS.isdisjoint(words):
    return True
  if words[0] in _SUBJECTS and (len(words) > 1 and words[1] in _SUBJECT_NOUNS
                                or not _RATIONALE_VERBS.isdisjoint(words[1:3])):
    return True  # "This one uses ...", "It keeps ...", "These place ..."
  if words[0] in _RATIONALE_VERBS and words[0].endswith("s") or (
      len(words) > 1 and words[1] == "for" and words[0] in ("good", "great", "best", "ideal",
                                                            "useful")):
    return True  # "Shows the {} in low light", "Good for close-ups of a {}"
  low = text.casefold()
  return "e.g" in low or "i.e" in low or any(w in text for w in _META_CJK)


def _is_rationale(text: str) -> bool:
  """Whether the text before a quoted template makes it a rationale, not an offer."""
  words = _words(text)
  if not words:
    return False
  return (words[0] in _RATIONALE_OPENERS or not _RATIONALE_WORDS.isdisjoint(words)
          or any(w in text for w in _RATIONALE_LABELS_CJK))


def _is_bullet(ch: str) -> bool:
  if ch in _BULLET_EXTRA:
    return True
  if ch in _NOT_BULLETS or ch.isspace():
    return False
  category = unicodedata.category(ch)
  if ch.isalnum():
    return category == "No"  # ① ❶
  # punctuation, symbols, emoji; never an opening or closing bracket or quote
  return ch.isprintable() and category not in ("Ps", "Pe", "Pi", "Pf")


def _strip_marker(s: str) -> tuple[str, bool]:
  """`s` without one leading list marker, and whether there was one."""
  j = 0
  while j < len(s) and j < 8 and _is_bullet(s[j]):
    j += 1
  # ASCII bullets need a space after them ("-a" is no item); "・", "•", "①", emoji do not
  if j and (j == len(s) or s[j].isspace() or not s[:j].isascii()):
    return s[j:].lstrip(), True
  m = _NUMBERING_RE.match(s)
  if m:
    return s[m.end():].lstrip(), True
  return s, False


def _strip_label(s: str) -> tuple[str, str | None]:
  """`s` without a leading "Template 2:"-like label, and the label's kind."""
  head = s[:60]
  m = _LABEL_RE.match(head)
  if m:
    words = [w for w in _words(m.group(1)) if len(w) > 1]  # "Option B)": B is a number
    if words and all(w in _TEMPLATE_LABELS for w in words):
      return s[m.end():].lstrip(), "template"
  cut = min((i for i in (head.find(":"), head.find("："), head.find(" -"), head.find(")"))
             if i > 0), default=-1)
  if cut > 0:
    label = head[:cut]
    words = _words(label)
    if words and len(words) <= 4 and words[0] in _RATIONALE_LABELS:
      return s, "rationale"
    if any(w in label for w in _RATIONALE_LABELS_CJK) and len(label) <= 12:
      return s, "rationale"
    if any(w in label for w in _TEMPLATE_LABELS_CJK) and len(label) <= 12:
      return s[cut + 1:].lstrip(), "template"
  return s, None


def _quoted_spans(s: str, budget: _Budget) -> list[tuple[int, int]]:
  """(start, end) of the outermost quoted spans of `s`, quotes included.

  A straight single quote counts only where it is no apostrophe (no letter
  outside it). The closing positions are found with one forward pointer per
  quote character (a later search starts where the last one ended), so the
  scan is linear.
  """
  spans: list[tuple[int, int]] = []
  next_at: dict[str, int] = {}

  def close_after(c: str, after: int) -> int:
    at = next_at.get(c, -2)
    if at == -2 or (at != -1 and at <= after):
      at = s.find(c, after + 1)
      while c == "'" and at != -1 and at + 1 < len(s) and s[at + 1].isalnum():
        at = s.find(c, at + 1)  # an apostrophe
      next_at[c] = at
    return at

  m = _QUOTE_CHAR_RE.search(s)
  while m and budget.spend():
    i, ch = m.start(), m.group(0)
    if ch == "'" and i > 0 and s[i - 1].isalnum():
      m = _QUOTE_CHAR_RE.search(s, i + 1)
      continue
    ends = [e for e in (close_after(c, i) for c in _QUOTE_PAIRS[ch]) if e != -1]
    if not ends:
      m = _QUOTE_CHAR_RE.search(s, i + 1)
      continue
    end = min(ends)
    spans.append((i, end + 1))
    m = _QUOTE_CHAR_RE.search(s, end + 1)
  return spans


def _strip_annotations(s: str) -> str:
  """`s` without score annotations: bracketed anywhere, or trailing words."""
  if "(" in s or "[" in s:  # a template carries a few annotations at most
    s = _BRACKET_GROUP_RE.sub(lambda m: " " if _is_annotation(m.group(1)) else m.group(0), s,
                              count=8)
  # An annotation is short: only the last few words are read, from the end.
  words = s[-80:].split()[-12:]
  cut, seen_score = len(words), False
  while cut > 0:
    kind = _annotation_kind(words[cut - 1])
    if kind == "score" or (kind == "number" and cut > 1
                           and _annotation_kind(words[cut - 2]) == "key"):
      seen_score = True
    elif not (seen_score and kind in ("key", "sep")):
      break
    cut -= 1
  s = s.strip()
  if not seen_score or (cut > 0 and words[cut - 1].casefold() in _LINKING_WORDS):
    return s
  for word in reversed(words[cut:]):
    s = s[:len(s) - len(word)].rstrip()
  return s


def _annotation_kind(word: str) -> str | None:
  """'score' (`85%`, `0.85`, `acc=0.9`), 'number', 'key' (`Score:`), 'sep' or None."""
  w = word.strip("()[],;*").casefold()
  if w in ("-", "–", "—", ":", "=", "→", "|", "/", "~", "≈", "@"):
    return "sep"
  if w.rstrip(":=") not in _SCORE_KEYS and not any(c.isdigit() for c in w[:12]):
    return None
  parts = [p for p in _KEY_VALUE_RE.split(w) if p]
  if not parts:
    return None
  numbers = [p for p in parts if _NUMBER_RE.fullmatch(p)]
  keys = [p for p in parts if p in _SCORE_KEYS]
  if len(numbers) + len(keys) < len(parts):
    return None
  if numbers and (keys or any(c in p for p in numbers for c in "%./")):
    return "score"
  return "number" if numbers else "key"


def _is_annotation(inner: str) -> bool:
  low = inner.strip().casefold()
  if low in _TAG_REMARKS:
    return True  # "(new)", "[NEW]", "(top pick)"
  if not any(ch.isdigit() for ch in low):
    return False
  words = re.findall(r"[a-z]+", low)
  if words and words[0] in ("accuracy", "acc", "score"):
    return True
  if len(words) <= 4 and ("%" in low or _DECIMAL_RE.search(low)):
    return True  # "(↑ from 81%)", "(+2.3 pts)"
  if words:
    return all(w in _ANNOTATION_WORDS for w in words)
  return all(ch.isdigit() or ch in " .,%~≈±+-/:=" for ch in low)


def _strip_quotes(text: str) -> str:
  text = text.strip()
  for _ in range(4):  # nested quotes, a few deep at most
    if not (len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES):
      break
    text = text[1:-1].strip()
  # A lone leading/trailing quote left by e.g. `"a photo of a {}".`
  if text[:1] in _QUOTES and not any(q in text[1:] for q in _QUOTES):
    text = text[1:].strip()
  if text[-1:] in _QUOTES and not any(q in text[:-1] for q in _QUOTES):
    text = text[:-1].strip()
  return text


def _finish(text: str) -> str:
  """Final tidying of one candidate: annotations, quotes, list commas, trailing emoji."""
  text = _strip_annotations(text)
  text = _strip_quotes(text.rstrip(",;").strip())
  text = _strip_quotes(text.rstrip(",;")).strip()
  end = len(text)
  while end > 0 and end > len(text) - 8 and (
      text[end - 1] in _BULLET_EXTRA or unicodedata.category(text[end - 1]) == "So"):
    end -= 1  # a decorative emoji ("a photo of a {} 🐶")
  return text[:end].rstrip()


def _cut_remark(body: str) -> str:
  """`body` without a trailing remark in parentheses after the slot.

  A remark that holds a slot itself is a gloss ("une photo d'un {} (a photo of
  a {})"): it goes too, so that the two are never merged.
  """
  if not body.endswith(")"):
    return body
  open_at = body.rfind("(")
  inner = body[open_at + 1:-1]
  if open_at < 0 or "(" in inner or tpl.SLOT not in body[:open_at]:
    return body
  if tpl.SLOT in inner:
    return body[:open_at].rstrip()
  if "{" in inner or "}" in inner:
    return body
  inner = inner.strip()
  if inner[:1].isupper() or len(inner.split()) >= 4 or inner.casefold().startswith(
      ("e.g", "i.e", "this", "focus", "emphas", "more ", "less ")) or _is_prose(inner):
    return body[:open_at].rstrip()
  return body


def _sentences(body: str, budget: _Budget) -> list[str]:
  if not any(end in body for end in ".!?。！？"):
    return [body.strip()]
  parts, last = [], 0
  for m in _SENTENCE_END_RE.finditer(body):
    if not budget.spend():
      break
    parts.append(body[last:m.start() + 1])
    last = m.end()
  parts.append(body[last:])
  return [p.strip() for p in parts if p.strip()]


def _joined_templates(segments: list[str]) -> list[str]:
  """`segments`, each one that is several templates joined by ", " or " or " split."""
  out = []
  for seg in segments:
    pieces = _JOIN_SPLIT_RE.split(seg) if seg.count(tpl.SLOT) >= 2 else [seg]
    if len(pieces) > 1 and all(tpl.SLOT in p for p in pieces):
      out.extend(pieces)
    else:
      out.append(seg)
  return out


def _unquoted(body: str, context: _Context) -> list[str]:
  """Templates of an unquoted line with a slot: split, cut, filtered."""
  out = []
  # annotations and a trailing remark first, before "Score: 71.2" or "(why: ...)" is
  # taken for an explanation
  for part in _LIST_SPLIT_RE.split(_cut_remark(_strip_annotations(body))):
    for seg in _joined_templates(_EXPLANATION_SPLIT_RE.split(part)):
      if not context.budget.spend():
        return out
      if tpl.SLOT not in seg:
        continue
      seg = _cut_remark(_strip_marker(seg.strip())[0])  # "1) a {}, 2) a {}": inline numbers
      out.extend(_finish(p) for p in _sentences(seg, context.budget)
                 if tpl.SLOT in p and not context.prose(p))
  return [c for c in out if c]


def _line_candidates(line: str, context: _Context, item_context: bool) -> list[str]:
  """Candidate templates of one stripped, non-empty line."""
  if not context.budget.spend():
    return []
  if line.startswith("|") or (context.table_column is not None and line.count("|") >= 2):
    return _table_row(line, context)
  context.table_column, context.table_skip, context.table_header = None, frozenset(), False
  if line.startswith(("//", "/*", "*/")):
    return []  # a code comment
  if line.startswith("#"):
    hashes = len(line) - len(line.lstrip("#"))
    if hashes <= 6 and line[hashes:hashes + 1].isspace():
      return []  # a heading
  body, item = line, item_context
  for _ in range(3):
    before = body
    body, marked = _strip_marker(body)
    if "*" in body or "_" in body or "~" in body:
      body = _strip_emphasis(body).strip()
    body, label = _strip_label(body)
    if label == "rationale":
      return []
    item = item or marked or label == "template"
    if body == before:
      break
  body = body.strip()
  if "](" in body:
    body = _LINK_RE.sub(r"\1", body)
  if not body or (not context.structured and body.rstrip(" *").endswith((":", "："))):
    return []  # a lead-in or a heading
  if body.startswith("(") and body.endswith(")") and "(" not in body[1:]:
    body = body[1:-1].strip()  # a remark in parentheses: read inside, as prose
    item = False
    if context.prose(body):
      return []
  has_brace = "{" in body or "}" in body
  if not has_brace and not item:
    return []  # prose without a slot
  spans = _quoted_spans(body, context.budget) if has_brace or body[:1] in _QUOTES else []
  out, last = [], 0
  for start, end in spans:
    inner = body[start + 1:end - 1]
    if tpl.SLOT not in inner:
      continue
    if context.rationale(body[last:start]):
      break
    last = end
    cand = _finish(inner)
    if cand and not context.prose(cand):
      out.append(cand)
  if out or any(tpl.SLOT in body[a + 1:b - 1] for a, b in spans):
    return out
  if not has_brace:
    if not context.prose(body):
      head = spans[0] if spans and spans[0][0] == 0 else None
      cand = _finish(body[1:head[1] - 1] if head else body)
      return [cand] if cand else []
    return []
  if item and spans and spans[0][0] == 0:
    rest = body[spans[0][1]:].lstrip()
    if not rest or rest[0] in ":(|,–—-":
      # A list item whose quoted template forgot its slot: the quoted part (for
      # the rejection), never the remark after it.
      return [_finish(body[1:spans[0][1] - 1])]
  if tpl.SLOT not in body:
    if item and not context.prose(body):  # reported as a rejection: a bad brace
      cand = _finish(body)
      return [cand] if cand else []
    return []
  return _unquoted(body, context)


def _table_row(line: str, context: _Context) -> list[str]:
  cells = [c.strip() for c in line.strip().strip("|").split("|", 64)]
  if all(set(c) <= set("-: ") for c in cells):
    return []  # |---|:--:|
  if tpl.SLOT not in line and context.table_column is None and not context.table_header:
    names = [" ".join(_words(c)) for c in cells]
    template = next((i for i, n in enumerate(names)
                     if any(w in n for w in ("template", "prompt", "candidate", "modèle",
                                             "vorlage", "plantilla"))
                     or any(w in n for w in _TEMPLATE_LABELS_CJK)), None)
    context.table_column = template if template is not None else -1
    context.table_skip = frozenset(
        i for i, n in enumerate(names)
        if n in ("", "no", "number", "rank", "id") or (n.split() or [""])[0] in _RATIONALE_LABELS
        or any(w in n for w in _RATIONALE_LABELS_CJK))
    context.table_header = True
    return []
  if context.table_column is not None and 0 <= context.table_column < len(cells):
    chosen = [cells[context.table_column]]
  else:
    chosen = [c for i, c in enumerate(cells) if i not in context.table_skip and tpl.SLOT in c]
  if context.table_column is None:
    context.table_column = -1
  cell_context = _Context(context.budget, structured=context.structured)
  return [c for cell in chosen for c in _line_candidates(cell, cell_context, True)]


def _nonblank_lines(text: str) -> Iterator[str]:
  """The stripped non-blank lines of `text`, blank runs skipped without a Python step each."""
  for m in _NONBLANK_LINE_RE.finditer(_LINE_BREAK_RE.sub("\n", text)):
    yield m.group(0).strip()


def _text_candidates(text: str, reading: Reading, budget: _Budget) -> list[str]:
  """Candidates of a structured string (read as a list item, line by line)."""
  text = tpl.canonical(normalize_placeholders(text))
  if "<" in text or "&" in text:
    text = _convert_html(text, reading)
  context = _Context(budget, structured=True)
  out = []
  for s in itertools.islice(_nonblank_lines(text), MAX_LINES):
    if len(s) <= MAX_LINE_CHARS:
      out.extend(_line_candidates(s, context, True))
  return out


def _line_mode(text: str, reading: Reading, budget: _Budget) -> list[str]:
  out: list[str] = []
  context = _Context(budget)
  for read, s in enumerate(_nonblank_lines(text)):
    if read >= MAX_LINES:
      reading.rejections.append((_preview(s), f"more than {MAX_LINES} lines in the reply; "
                                 "the rest was not read"))
      break
    if len(s) > MAX_LINE_CHARS:
      if "{" in s:
        reading.rejections.append((_preview(s), f"line longer than {MAX_LINE_CHARS} "
                                   "characters"))
      continue
    if s.startswith(("```", "~~~")):
      if s[3:].find("```") < 0:
        context.in_fence = not context.in_fence
        continue
      s = s.strip("`~").strip()  # a one-line code block
      if not s:
        continue
    if s in ("[", "]", "{", "}", "],", "},", "(", ")"):
      continue
    # a JSON line that could not be decoded (a cut reply): its strings are still templates
    context.structured = s.startswith(('{"', '["', "['", "{'"))
    out.extend(_line_candidates(s, context, context.in_fence))
    if len(out) >= MAX_CANDIDATES:
      reading.rejections.append(("(reply)", f"more than {MAX_CANDIDATES} candidates; "
                                 "the rest was not read"))
      break
  return out


def _read(reply: Any) -> Reading:
  reading = Reading()
  if not isinstance(reply, str):
    reading.rejections.append((type(reply).__name__, "the reply is not text"))
    return reading
  if len(reply) > MAX_REPLY_CHARS:
    reading.rejections.append((_preview(reply), f"reply longer than {MAX_REPLY_CHARS} "
                               "characters (not read)"))
    return reading
  text = reply.replace("\x00", "")
  if "\x1b" in text:
    text = _ANSI_RE.sub("", text)  # terminal colours
  text = _drop_reasoning(tpl.canonical(text), reading)
  if len(text) > MAX_ANSWER_CHARS:
    reading.rejections.append((_preview(text[MAX_ANSWER_CHARS:]), "reply longer than "
                               f"{MAX_ANSWER_CHARS} characters without its reasoning; the "
                               "rest was not read"))
    text = text[:MAX_ANSWER_CHARS]
  budget = _Budget()
  found = _structured(text, reading, budget)
  if found is None:
    found = _line_mode(_convert_html(normalize_placeholders(text), reading), reading, budget)
  if budget.left < 0:
    reading.rejections.append(("(reply)", f"more than {MAX_PIECES} pieces of text to read; "
                               "the rest was not read"))
  reading.candidates = [tpl.canonical(c) for c in found[:MAX_CANDIDATES]]
  return reading


def read_reply(reply: str) -> Reading:
  """Candidate templates and rejections of one LLM reply; never raises."""
  try:
    return _read(reply)
  except Exception as e:  # a parser bug must cost one reply, never the run
    return Reading([], [(_preview(reply) if isinstance(reply, str) else "(reply)",
                         f"{INTERNAL_ERROR} ({type(e).__name__})")])


async def read_reply_off_loop(reply: str) -> Reading:
  """`read_reply`, in a worker thread when the reply is long, so that no reply holds the event loop."""
  if isinstance(reply, str) and len(reply) > INLINE_PARSE_CHARS:
    return await asyncio.to_thread(read_reply, reply)
  return read_reply(reply)


def read_object(reply: Any) -> dict | None:
  """The first JSON object (or Python dict literal) of an LLM reply, outside its reasoning
  and in or out of code fences, within the same caps as `read_reply`; None if there is
  none. Never raises; linear in the reply."""
  try:
    if not isinstance(reply, str) or len(reply) > MAX_REPLY_CHARS:
      return None
    text = _drop_reasoning(tpl.canonical(reply.replace("\x00", "")), Reading())
    text = text[:MAX_ANSWER_CHARS]
    for piece in [text.strip(), *_fences(text)]:
      piece = piece.strip()
      for start in _value_starts(piece):
        if piece[start:start + 1] != "{":
          continue
        got = _decode(piece, start)
        if got is not None and isinstance(got[0], dict):
          return got[0]
    return None
  except Exception:  # a parser bug must cost one reply, never the run
    return None


def extract_candidates(reply: str) -> list[str]:
  """Candidate templates in an LLM reply, in order, decoration removed."""
  return read_reply(reply).candidates


@dataclasses.dataclass
class Validation:
  """Outcome of validating one reply's candidates."""

  valid: list[str] = dataclasses.field(default_factory=list)
  rejections: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def validate(candidates: Iterable[str], *, seen: set[str],
             context_check: Callable[[str], str | None] | None = None,
             max_new: int | None = None,
             max_chars: int = DEFAULT_MAX_CHARS,
             instructions: str | None = None) -> Validation:
  """Splits candidates into scorable templates and (template, reason) pairs.

  Args:
    candidates: templates as extracted from a reply.
    seen: normalised templates the chain has already evaluated (not changed).
    context_check: the scorer's `rejection_reason(template) -> reason | None`.
    max_new: keep at most this many valid templates (the rest are rejected
      with reason "more than m_new templates").
    max_chars: longest accepted template.
    instructions: the request's own wording (its listed templates removed,
      see `instruction_text`); a candidate found in it is the model echoing
      the instructions ("Each template must contain {} where ..."), not a
      template.

  Returns:
    A `Validation`; rejected templates are `printable` (a lone surrogate is
    replaced), so that every rejection can be logged and sent back.
  """
  result = Validation()
  local: set[str] = set()
  echo_text = tpl.normalize(instructions) if instructions else ""
  for cand in candidates:
    reason = tpl.invalid_reason(cand)
    if reason is None and len(cand) > max_chars:
      reason = f"longer than {max_chars} characters"
    key = tpl.normalize(cand) if reason is None else None
    if reason is None and (key in seen or key in local):
      reason = "duplicate of an evaluated template"
    if reason is None and echo_text and len(key) > 8 and key in echo_text:
      reason = "copies the instructions"
    if reason is None and context_check is not None:
      reason = context_check(cand)
    if reason is None and max_new is not None and len(result.valid) >= max_new:
      reason = "more than m_new templates in the reply"
    if reason is None:
      result.valid.append(cand)
      local.add(key)
    else:
      result.rejections.append((printable(cand) if isinstance(cand, str) else repr(cand),
                                reason))
  return result


def instruction_text(messages: Iterable[dict], listed: Iterable[str]) -> str:
  """The system prompt and first user turn of a request, `listed` templates cut out.

  Later turns are left out: they quote the model's own templates (scores,
  rejections), and a corrected template may well be part of a rejected one.
  """
  text, users = [], 0
  for m in messages:
    if m.get("role") == "user":
      users += 1
      if users > 1:
        break
    if m.get("role") in ("system", "user"):
      text.append(m["content"])
  text = "\n".join(text)
  for t in sorted(set(listed), key=len, reverse=True):
    text = text.replace(t, " ")
  return text


def reason_kind(reason: str) -> str:
  """A short, countable category for a rejection reason."""
  if reason.startswith("copies the instructions"):
    return "echo"
  if reason.startswith("format field"):
    return "format_field"
  if reason.startswith("duplicate"):
    return "duplicate"
  if reason.startswith("no {}"):
    return "no_slot"
  if reason.startswith("unbalanced"):
    return "unbalanced_brace"
  if reason.startswith("longer than") or "context" in reason or "token" in reason:
    return "too_long"
  if reason.startswith("more than m_new"):
    return "extra"
  return "other"
