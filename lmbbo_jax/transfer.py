"""`--transfer_to`: each seed's chosen templates scored on other backbones, as chosen.

Nothing is re-selected: the template the search picked on the run's model (and each
baseline's template) is scored on every other model. CoOp's learned context lives in its
own backbone's embedding space and does not transfer.
"""

from __future__ import annotations

from typing import Any, Callable

from absl import logging

from lmbbo_jax import templates as templates_lib
from lmbbo_jax.config import ExperimentError
from lmbbo_jax.results import Entry, aggregate

ENSEMBLE_ROW = "baseline:hand_ensemble"


def chosen_templates(results: dict) -> dict[str, dict[str, str | None]]:
  """Per seed, what is transferred: the chosen template of each row (best, initial best,
  each baseline), and `ENSEMBLE_ROW` (None) when the run scored that ensemble."""
  out = {}
  for seed, ps in results["per_seed"].items():
    rows = {"best": ps["best"], "initial_best": ps["initial_best"],
            **{f"baseline:{k}": v for k, v in ps["baselines"].items() if k != "hand_ensemble"}}
    out[seed] = {k: v["template"] for k, v in rows.items()
                 if v and v.get("template") and templates_lib.invalid_reason(v["template"]) is None}
    if "hand_ensemble" in ps["baselines"]:
      out[seed][ENSEMBLE_ROW] = None
  return out


def transfer(cfg, tasks: dict[int, Any], chosen_by_seed: dict[str, dict[str, str | None]],
             load_model: Callable[[str], Any], make_scorer: Callable[..., Any]) -> dict:
  """The transfer section of results.json.

  Args:
    cfg: the `ExperimentConfig` (`transfer_to`, `dataset`).
    tasks: seed -> its few-shot task.
    chosen_by_seed: `chosen_templates` of the run's results.
    load_model: source -> CLIP (raises `ExperimentError`).
    make_scorer: (clip, task, encoders) -> a `PromptScorer` on the task's features.
  """
  from lmbbo_jax.data import hand_templates
  out = {}
  for source in cfg.transfer_to:
    try:
      clip = load_model(source)
    except ExperimentError as e:
      raise ExperimentError(f"--transfer_to={source}: {e} (the run's own results are "
                            "written; rerun with --resume to add the transfer)") from None
    encoders: dict = {}
    per_seed = {}
    for seed, task in tasks.items():
      scorer = make_scorer(clip, task, encoders)
      chosen = dict(chosen_by_seed[str(seed)])
      ensemble = chosen.pop(ENSEMBLE_ROW, "") is None
      entries = {k: Entry.of(s).to_json()
                 for k, s in zip(chosen, scorer.score(list(chosen.values())))}
      if ensemble:
        hand = hand_templates(cfg.dataset)
        entries[ENSEMBLE_ROW] = dict(Entry.of(scorer.score_ensemble([hand])[0]).to_json(),
                                     template=f"ensemble of {len(hand)} templates")
      scorer.close()
      per_seed[str(seed)] = entries
    names = sorted({k for e in per_seed.values() for k in e})
    out[source] = {
        "model": {"name": clip.name, "source": clip.source, "weights_hash": clip.weights_hash},
        "per_seed": per_seed,
        "aggregate": {k: aggregate([e.get(k) or {} for e in per_seed.values()])
                      for k in names}}
    logging.info("transfer to %s: %s", source, {
        k: round(v.get("test_acc", {}).get("mean", float("nan")), 4)
        for k, v in out[source]["aggregate"].items()})
  return out
