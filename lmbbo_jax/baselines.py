"""Hand-made baselines scored in the same run as the method (pool_best comes from the search)."""

from __future__ import annotations

import dataclasses

from absl import logging

from lmbbo_jax import templates as templates_lib
from lmbbo_jax.results import Entry
from lmbbo_jax.search.state import metric_values, selection_key

SINGLES = {"empty": "{}", "photo": templates_lib.PHOTO}


def _chosen(cfg, scores):
  """The score the selection rule picks among `scores` (valid ones)."""
  return min(scores, key=lambda s: selection_key(
      metric_values(s, cfg.search.select_metric), s.logprob, cfg.search.select_by,
      cfg.search.tie_break))


def _ensemble(scorer, templates) -> Entry:
  return dataclasses.replace(
      Entry.of(scorer.score_ensemble([templates])[0], n_templates=len(templates)),
      template=f"ensemble of {len(templates)} templates")


def score_baselines(cfg, scorer, task=None) -> dict[str, Entry]:
  """The baselines of `cfg.baselines` on `scorer`: empty and photo as single templates;
  hand_best (picked by the selection split), hand_oracle (picked by test accuracy: an
  oracle, reported only) and hand_ensemble from CLIP's hand-engineered templates;
  dataset_best and dataset_ensemble from the templates `task` ships, if any."""
  from lmbbo_jax.data import hand_templates
  out: dict[str, Entry] = {}
  wanted = [b for b in SINGLES if b in cfg.baselines]
  for name, score in zip(wanted, scorer.score([SINGLES[b] for b in wanted])):
    out[name] = Entry.of(score)
  own = list(getattr(task, "dataset_templates", None) or [])
  if own and "dataset_best" in cfg.baselines:
    scores = [s for s in scorer.score(own) if s.ok]
    if scores:
      out["dataset_best"] = Entry.of(_chosen(cfg, scores), n_templates=len(own))
  if own and "dataset_ensemble" in cfg.baselines:
    out["dataset_ensemble"] = _ensemble(scorer, own)
  if not {"hand_best", "hand_oracle", "hand_ensemble"} & set(cfg.baselines):
    return out
  try:
    hand = hand_templates(cfg.dataset)
  except Exception as e:  # A dataset without CLIP's hand-engineered templates.
    logging.info("no hand-engineered templates for %s (%s); skipping those baselines",
                 cfg.dataset, e)
    return out
  scores = [s for s in scorer.score(hand) if s.ok]
  if "hand_best" in cfg.baselines and scores:
    out["hand_best"] = Entry.of(_chosen(cfg, scores), n_templates=len(hand))
  if "hand_oracle" in cfg.baselines and scores:
    oracle = max(scores, key=lambda s: s.accuracy.get("test", -1.0))
    out["hand_oracle"] = Entry.of(oracle, n_templates=len(hand), oracle="test")
  if "hand_ensemble" in cfg.baselines and hand:
    out["hand_ensemble"] = _ensemble(scorer, hand)
  return out
