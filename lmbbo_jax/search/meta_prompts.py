"""Meta-prompt wording as data, filled by plain single-pass substitution.

Every text the LLM sees lives in `DEFAULT_META_PROMPTS`; control flow in
`proposers.py` only picks a named piece and fills its slots. A slot is written
`<<name>>`. `render` replaces all slots in one regex pass, so a template that
itself contains `<<positives>>` or `{0.__class__}` is inserted verbatim and
never expanded or formatted.

Wording follows the paper's Figure 1 (greeting, "prompts that work well" /
"prompts that don't work well" lists, then numeric feedback turns "Great! The
performance now improves to X%. ..." / "Unfortunately, the performance of this
prompt drops to Y%. ...") and the requirements of the official code's
`method_1` (reply only templates, under 15 words, similar structure, one per
line starting with "- "). The exact wording of the paper is paraphrased
(from the paper's Fig. 1), not copied.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping

_SLOT_RE = re.compile(r"<<([a-z_]+)>>")


class MetaPromptError(KeyError):
  """A meta-prompt names a slot that was not given a value."""


def render(text: str, values: Mapping[str, str]) -> str:
  """Fills `<<name>>` slots of `text` from `values` in a single pass.

  Raises:
    MetaPromptError: a slot has no value (a bug in the meta-prompt data).
  """

  def sub(match: re.Match) -> str:
    name = match.group(1)
    if name not in values:
      raise MetaPromptError(f"meta-prompt slot <<{name}>> has no value")
    return str(values[name])

  return _SLOT_RE.sub(sub, text)


@dataclasses.dataclass(frozen=True)
class MetaPrompts:
  """The wording of every message the LLM proposer sends.

  Slots available: intro/task pieces get <<n_new>> (a number), <<templates_word>>
  ("template" or "templates"), <<score_note>>; lists get <<positives>>,
  <<negatives>>; items get <<template>>, <<score>>; feedback gets <<score>>,
  <<reason>>, <<scored_list>>; requirements get <<max_words>>; rejection feedback gets <<rejected_list>> (of
  `rejected_item`s with <<template>> and <<reason>>) and <<requirements>>.
  """

  system: str | None = None
  # First user turn, one per feedback mode (blocks are rendered first).
  first_turn: Mapping[str, str] = dataclasses.field(default_factory=dict)
  positives_block: str = ""
  negatives_block: str = ""
  requirements: str = ""
  item: str = ""
  item_with_score: str = ""
  score_note: str = ""
  # Multi-turn follow-ups.
  feedback_improved: str = ""
  feedback_dropped: str = ""
  feedback_rejected: str = ""
  feedback_scores_header: str = ""
  feedback_no_scores: str = ""
  # The JSON reply format (`reply_format="json"`), replacing `requirements`.
  requirements_json: str = ""
  # Rejection feedback: what was wrong with the templates of the last reply.
  rejected_item: str = ""
  rejected_block: str = ""
  retry_rejected: str = ""
  retry_unreadable: str = ""
  # Short, model-facing words for each rejection kind (`parsing.reason_kind`).
  rejection_words: Mapping[str, str] = dataclasses.field(default_factory=dict)
  # APE baselines (`proposers.APEProposer`): generation from unranked examples
  # (<<examples>>), and iterative APE's resampling of the current top templates.
  ape_generate: str = ""
  ape_resample: str = ""
  # Confusion feedback (`feedback="confusion"`): the class pairs the templates that
  # work well confuse most on the selection split, in the first turn's
  # <<confusions_block>> and after each multi-turn feedback. Items get <<true>>,
  # <<predicted>>, <<count>>, <<times_word>>; the block gets <<confusions>>.
  confusions_block: str = ""
  confusion_item: str = ""
  no_confusions: str = ""
  # The merge step (`SearchConfig.merge_every`): two members of the per-class Pareto
  # front (<<first>>, <<second>>: `merge_item`s with <<template>> and <<classes>>).
  merge: str = ""
  merge_item: str = ""


DEFAULT_META_PROMPTS = MetaPrompts(
    system=None,  # the official code sends a single user message, no system
    first_turn={
        "pos_neg": (
            "Hi! I need your help writing prompt templates for CLIP image "
            "classification. A template is a short text with {} where the "
            "class name goes, like \"a photo of a {}.\"\n\n"
            "Below is a list of templates that work well and a list of "
            "templates that don't work well<<score_note>>. Please find the "
            "pattern and write <<n_new>> new <<templates_word>> that should "
            "work even better than the good ones.\n\n"
            "<<positives_block>>\n\n<<negatives_block>>\n\n<<requirements>>"),
        "pos": (
            "Hi! I need your help writing prompt templates for CLIP image "
            "classification. A template is a short text with {} where the "
            "class name goes, like \"a photo of a {}.\"\n\n"
            "Below is a list of templates that work well<<score_note>>. Please "
            "find the pattern and write <<n_new>> new <<templates_word>> that "
            "should work even better.\n\n"
            "<<positives_block>>\n\n<<requirements>>"),
        "neg": (
            "Hi! I need your help writing prompt templates for CLIP image "
            "classification. A template is a short text with {} where the "
            "class name goes, like \"a photo of a {}.\"\n\n"
            "Below is a list of templates that don't work well<<score_note>>. "
            "Please find what they do wrong and write <<n_new>> new "
            "<<templates_word>> that avoid it and work better.\n\n"
            "<<negatives_block>>\n\n<<requirements>>"),
        "confusion": (
            "Hi! I need your help writing prompt templates for CLIP image "
            "classification. A template is a short text with {} where the "
            "class name goes, like \"a photo of a {}.\"\n\n"
            "Below is a list of templates that work well and a list of "
            "templates that don't work well<<score_note>>, and the classes that "
            "CLIP still mixes up with the good ones. Please write <<n_new>> new "
            "<<templates_word>> that should work even better than the good ones "
            "and help CLIP tell those classes apart.\n\n"
            "<<positives_block>>\n\n<<negatives_block>>\n\n<<confusions_block>>\n\n"
            "<<requirements>>"),
        "none": (
            "Hi! I need your help writing prompt templates for CLIP image "
            "classification. A template is a short text with {} where the "
            "class name goes, like \"a photo of a {}.\"\n\n"
            "Please write <<n_new>> new <<templates_word>> that should make "
            "CLIP classify images accurately.\n\n<<requirements>>"),
    },
    positives_block="Templates that work well:\n<<positives>>",
    negatives_block="Templates that don't work well:\n<<negatives>>",
    requirements=(
        "Requirements:\n"
        "- Reply with the <<templates_word>> only, each on its own line "
        "starting with \"- \".\n"
        "- Each template must contain {} where the class name goes and no "
        "other curly braces.\n"
        "- Keep each template under <<max_words>> words and similar in structure to the "
        "examples."),
    item="- \"<<template>>\"",
    item_with_score="- \"<<template>>\" (accuracy <<score>>)",
    score_note=", each with its accuracy",
    feedback_improved=(
        "Great! The performance now improves to <<score>>. Could you suggest "
        "<<n_new>> even better <<templates_word>>?"),
    feedback_dropped=(
        "Unfortunately, the performance of this prompt drops to <<score>>. "
        "Could you give it another shot?"),
    feedback_rejected=(
        "That template could not be used (<<reason>>). Could you give it "
        "another shot?"),
    feedback_scores_header="Accuracy of each template you suggested:\n"
                           "<<scored_list>>",
    feedback_no_scores="Thanks! Could you suggest <<n_new>> different "
                       "<<templates_word>>?",
    requirements_json=(
        "Requirements:\n"
        "- Reply with JSON only, in the form {\"templates\": [\"...\"]}, holding "
        "<<n_new>> new <<templates_word>>.\n"
        "- Each template must contain {} where the class name goes and no "
        "other curly braces.\n"
        "- Keep each template under <<max_words>> words and similar in structure to the "
        "examples."),
    rejected_item="- \"<<template>>\": <<reason>>",
    rejected_block=("Some templates of your last reply could not be used:\n"
                    "<<rejected_list>>"),
    retry_rejected=("None of those templates could be used:\n<<rejected_list>>\n\n"
                    "Please try again.\n<<requirements>>"),
    retry_unreadable=("I could not find any template in your reply. Please try "
                      "again.\n<<requirements>>"),
    rejection_words={
        "duplicate": "already tried, write a new one",
        "no_slot": "the class-name slot is missing",
        "format_field": "has braces with something inside",
        "echo": "copies my instructions, not a template",
        "unbalanced_brace": "unbalanced braces",
        "too_long": "too long",
        "other": "not a usable template",
    },
    ape_generate=(
        "I need prompt templates for CLIP image classification. A template is "
        "a short text with {} where the class name goes. Here are some "
        "templates written for this task:\n<<examples>>\n\n"
        "Write <<n_new>> new <<templates_word>> for this task.\n\n<<requirements>>"),
    # APE's resampling prompt ("Generate a variation of the following instruction
    # while keeping the semantic meaning"), for templates.
    ape_resample=(
        "Generate <<n_new>> <<variations_word>> of the following prompt templates "
        "while keeping their semantic meaning. A template is a short text with {} "
        "where the class name goes.\n<<examples>>\n\n<<requirements>>"),
    confusions_block=("Classes CLIP most often mixes up on the training images with the "
                      "templates that work well:\n<<confusions>>"),
    confusion_item="- a \"<<true>>\" taken for a \"<<predicted>>\" (<<count>> <<times_word>>)",
    no_confusions="With the templates that work well, CLIP classifies every training "
                  "image correctly.",
    merge=(
        "Hi! I need your help writing prompt templates for CLIP image "
        "classification. A template is a short text with {} where the "
        "class name goes, like \"a photo of a {}.\"\n\n"
        "The two templates below each work better on different classes:\n"
        "<<first>>\n<<second>>\n\n"
        "Please write <<n_new>> new <<templates_word>> that combine the strengths of "
        "both, so that they work well on all of these classes.\n\n<<requirements>>"),
    merge_item="- \"<<template>>\" (better on <<classes>>)",
)


def percent(value: float) -> str:
  """Accuracy as the paper prints it: 0.8669 -> "86.69%"."""
  return f"{100.0 * value:.2f}%"
