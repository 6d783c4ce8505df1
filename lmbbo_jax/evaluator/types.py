"""The result type shared by the scorer and the search (kept free of JAX)."""

from __future__ import annotations

import dataclasses

# The per-split metrics a `Score` reports, by field name: top-1 accuracy, top-5 accuracy
# (CLIP_benchmark's acc5) and mean per-class recall (CLIP_benchmark's
# mean_per_class_recall, the CLIP paper's metric for some benchmarks).
METRICS = ("accuracy", "acc5", "mean_per_class_recall")
# How many (true class, predicted class, count) pairs `Score.confusions` keeps per split.
TOP_CONFUSIONS = 5


@dataclasses.dataclass(frozen=True)
class Score:
  """How one template (or one ensemble of templates) classifies the few-shot task.

  Attributes:
    template: the template text as given (for an ensemble, its templates joined
      by " | ").
    accuracy: split name ("train", "val", "test"; and "train_val", the joined train
      and val images, when the task has both) -> top-1 accuracy in [0, 1]. The other
      metrics and `logprob` have the same keys.
    logprob: split name -> mean log-probability of the true class under a
      softmax over classes at CLIP's logit scale; a finer tie-break than
      accuracy when a 1-shot train set gives coarse accuracies.
    per_class: split name -> per-class accuracy (class order of the task), when
      asked for.
    rejected: why the template could not be scored (then `accuracy` is empty).
    acc5: split name -> top-5 accuracy (the true class among the 5 highest logits,
      equal logits ordered by class index as for top-1); absent for tasks of fewer
      than 5 classes (CLIP_benchmark reports NaN there).
    mean_per_class_recall: split name -> the mean over the split's classes of the
      fraction of their images classified correctly (classes without images left out,
      as sklearn's balanced accuracy, which CLIP_benchmark uses).
    confusions: split name (every split but "test", which no feedback may read) -> the
      `TOP_CONFUSIONS` most frequent errors of the argmax
      predictions, as (true class, predicted class, count) triples, most frequent
      first (equal counts: lower true class, then lower predicted class, first); from
      the predictions alone (no logits), so the strict black box may read them.
  """

  template: str
  accuracy: dict[str, float] = dataclasses.field(default_factory=dict)
  logprob: dict[str, float] = dataclasses.field(default_factory=dict)
  per_class: dict[str, list[float]] | None = None
  rejected: str | None = None
  acc5: dict[str, float] = dataclasses.field(default_factory=dict)
  mean_per_class_recall: dict[str, float] = dataclasses.field(default_factory=dict)
  confusions: dict[str, list[tuple[int, int, int]]] = dataclasses.field(default_factory=dict)

  @property
  def ok(self) -> bool:
    return self.rejected is None

  def metric(self, name: str) -> dict[str, float]:
    """Split -> value of the metric called `name` (one of `METRICS`)."""
    if name not in METRICS:
      raise ValueError(f"unknown metric {name!r}; use one of {', '.join(METRICS)}")
    return getattr(self, name)

  def to_json(self) -> dict:
    out = {"template": self.template, "accuracy": dict(self.accuracy),
           "logprob": dict(self.logprob)}
    if self.acc5:
      out["acc5"] = dict(self.acc5)
    if self.mean_per_class_recall:
      out["mean_per_class_recall"] = dict(self.mean_per_class_recall)
    if self.confusions:
      out["confusions"] = {k: [list(c) for c in v] for k, v in self.confusions.items()}
    if self.per_class is not None:
      out["per_class"] = {k: list(v) for k, v in self.per_class.items()}
    if self.rejected is not None:
      out["rejected"] = self.rejected
    return out
