"""The result type shared by the scorer and the search (kept free of JAX)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Score:
  """How one template (or one ensemble of templates) classifies the few-shot task.

  Attributes:
    template: the template text as given (for an ensemble, its templates joined
      by " | ").
    accuracy: split name ("train", "val", "test") -> top-1 accuracy in [0, 1].
    logprob: split name -> mean log-probability of the true class under a
      softmax over classes at CLIP's logit scale; a finer tie-break than
      accuracy when a 1-shot train set gives coarse accuracies.
    per_class: split name -> per-class accuracy (class order of the task), when
      asked for.
    rejected: why the template could not be scored (then `accuracy` is empty).
  """

  template: str
  accuracy: dict[str, float] = dataclasses.field(default_factory=dict)
  logprob: dict[str, float] = dataclasses.field(default_factory=dict)
  per_class: dict[str, list[float]] | None = None
  rejected: str | None = None

  @property
  def ok(self) -> bool:
    return self.rejected is None

  def to_json(self) -> dict:
    out = {"template": self.template, "accuracy": dict(self.accuracy),
           "logprob": dict(self.logprob)}
    if self.per_class is not None:
      out["per_class"] = {k: list(v) for k, v in self.per_class.items()}
    if self.rejected is not None:
      out["rejected"] = self.rejected
    return out
