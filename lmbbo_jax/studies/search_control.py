r"""Does the search find prompts that generalise? The edit search vs its untrained control.

  python -m lmbbo_jax.studies.search_control --out=lmbbo_jax/studies/results

For each toy task and few-shot seed, the project's own pipeline (features once,
`PromptScorer`, `run_search` with the offline `EditProposer`, selection by train
accuracy) runs twice with the same budget and the same initial pools.

As in the paper, the search starts from generic wording: the initial pools come
from `PHOTO_POOL` (`--pool=photo`, the default: CLIP-style "a photo of ..."
templates) or `STYLE_FREE_POOL` (`--pool=style_free`: photo, picture, image and
plain wordings), neither naming a rendering style other than photo, and the
proposer's vocabulary is every word of the generic template list
(`toyworld.captions.GENERIC_TEMPLATES`), style words included: it plays the part of an
LLM that knows the domain's words but not which of them fit this task. The two
models:

  trained: the shipped toy CLIP ("toyclip");
  control: a randomly initialised CLIP of the same shape and tokenizer.

Reported per task: test accuracy of the initial pool's template picked by
train accuracy, of the search's pick, and their paired gain (mean and
standard error over seeds). A gain on the trained model that the control does
not show means the search found wording the model understands, not noise that
fits a few training images. Writes search_control_<pool>.json and .md.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time

from absl import app, flags, logging

from lmbbo_jax import io as io_lib
from lmbbo_jax.studies.template_table import mean_se
from lmbbo_jax.templates import PHOTO
from lmbbo_jax.toyworld.captions import GENERIC_TEMPLATES
from lmbbo_jax.toyworld.checkpoint import ASSETS_DIR

FLAGS = flags.FLAGS
DEFAULT_TASKS = ("sketch_dark", "pixel_clutter", "blurry_noisy")
# Initial pools: in-vocabulary templates that name no rendering style other than photo.
STYLE_FREE_POOL: tuple[str, ...] = (
    PHOTO,
    "a picture of a {}.",
    "an image of a {}.",
    "a {}.",
    "a photo of one {}.",
    "a picture of a small {}.",
    "a photo of a large {}.",
    "an image of a big {}.",
    "a {} on a dark background.",
    "a {} on a white background.",
    "a {} on a striped background.",
    "a {} on a dotted background.",
    "a photo of a {} in the center.",
    "a small {}.",
    "a large {}.",
    "a picture of a {} on a plain background.",
)


# CLIP's usual starting point: photo templates (as in CLIP's ImageNet prompt
# ensemble), no other style word. In this world "photo" ties the text to the
# photo group's reading, which misreads the confounded classes of other styles.
# The file is also the initial pool of the LLM demo (experiments/demo.flags).
PHOTO_POOL_FILE = os.path.join(ASSETS_DIR, "photo_pool.txt")
with open(PHOTO_POOL_FILE, encoding="utf-8") as _f:
  PHOTO_POOL: tuple[str, ...] = tuple(line.strip() for line in _f if line.strip())
POOLS = {"photo": PHOTO_POOL, "style_free": STYLE_FREE_POOL}


def proposer_vocabulary() -> list[str]:
  """Every word of the generic template list (the edit proposer's extra words)."""
  words = set()
  for t in GENERIC_TEMPLATES:
    words.update(t.replace("{}", " ").replace(".", " ").split())
  return sorted(words)


def _define_flags():
  flags.DEFINE_string("out", None, "Directory for search_control_<pool>.json / .md.")
  flags.DEFINE_string("model", "toyclip", "The trained model (load_clip source).")
  flags.DEFINE_enum("pool", "photo", sorted(POOLS),
                    "Initial pool: 'photo' (CLIP-style photo templates) or 'style_free' "
                    "(photo, picture, image and plain wordings).")
  flags.DEFINE_list("tasks", list(DEFAULT_TASKS), "Toy tasks.")
  flags.DEFINE_list("seeds", ["1", "2", "3"], "Few-shot seeds.")
  flags.DEFINE_integer("shots", 16, "Train images per class (val: min(4, shots)).")
  flags.DEFINE_integer("n_restart", 2, "Chains per seed.")
  flags.DEFINE_integer("n_iter", 8, "Proposer calls per chain.")
  flags.DEFINE_integer("m_new", 4, "Templates per call.")
  flags.DEFINE_integer("init_pool_size", 12, "Initial templates per chain.")
  flags.DEFINE_integer("control_seed", 1234, "Seed of the control's random weights.")


def run_one(clip, task, *, corpus, vocabulary, n_restart, n_iter, m_new, init_pool_size,
            seed) -> dict:
  """One search on one task: pool pick vs search pick, by train accuracy."""
  from lmbbo_jax.evaluator import features as features_lib
  from lmbbo_jax.evaluator.scorer import PromptScorer
  from lmbbo_jax.search import RunLog, SearchConfig, run_search
  from lmbbo_jax.search.proposers import EditProposer

  feats = features_lib.encode_task(clip, task, progress=False)
  fb, lb = features_lib.scorer_inputs(feats)
  scorer = PromptScorer(clip, fb, lb, task.class_names)
  config = SearchConfig(n_restart=n_restart, n_reset=1, n_iter=n_iter, m_new=m_new,
                        k_pos=5, k_neg=5, init_pool_size=init_pool_size, seed=seed,
                        select_by="train")
  with tempfile.TemporaryDirectory() as tmp, RunLog(tmp, fsync=False) as log:
    result = asyncio.run(run_search(
        config, scorer, lambda chain: EditProposer(config, vocabulary=vocabulary), log,
        corpus=corpus))
  pool, best = result.initial_best, result.best
  return {"pool_template": pool.template, "pool_train": pool.accuracy["train"],
          "pool_test": pool.accuracy["test"], "search_template": best.template,
          "search_train": best.accuracy["train"], "search_test": best.accuracy["test"],
          "gain": best.accuracy["test"] - pool.accuracy["test"],
          "evaluated": sum(1 for r in result.records if r.ok)}


def run(model: str, task_names, seeds, shots, *, n_restart=2, n_iter=8, m_new=4,
        init_pool_size=12, control_seed=1234, pool: str = "photo") -> list[dict]:
  from lmbbo_jax.models import CLIP, load_clip
  from lmbbo_jax.models.loading import random_variables
  from lmbbo_jax.toyworld.tasks import build_toy_task

  trained = load_clip(model)
  control = CLIP(trained.config, random_variables(trained.config, control_seed),
                 trained.tokenizer, source=f"random:{model}")
  corpus, vocabulary = list(POOLS[pool]), proposer_vocabulary()
  rows = []
  for name in task_names:
    for seed in seeds:
      task = build_toy_task(name, shots, seed)
      for label, clip in (("trained", trained), ("control", control)):
        t0 = time.perf_counter()
        out = run_one(clip, task, corpus=corpus, vocabulary=vocabulary,
                      n_restart=n_restart, n_iter=n_iter,
                      m_new=m_new, init_pool_size=init_pool_size, seed=seed)
        out.update(task=name, seed=seed, model=label, seconds=time.perf_counter() - t0)
        logging.info("%s seed %d %s: pool %.3f -> search %.3f (gain %+.3f) %r", name, seed,
                     label, out["pool_test"], out["search_test"], out["gain"],
                     out["search_template"])
        rows.append(out)
  return rows


def summarize(rows: list[dict]) -> list[dict]:
  out = []
  for name in dict.fromkeys(r["task"] for r in rows):
    entry = {"task": name}
    for label in ("trained", "control"):
      rs = [r for r in rows if r["task"] == name and r["model"] == label]
      for key in ("pool_test", "search_test", "gain"):
        values = [r[key] for r in rs if r[key] is not None]
        m, se = mean_se(values) if values else (float("nan"), float("nan"))
        entry[f"{label}_{key}"], entry[f"{label}_{key}_se"] = m, se
    entry["gain_beats_control"] = entry["trained_gain"] > entry["control_gain"]
    out.append(entry)
  return out


def markdown(summary: list[dict], rows: list[dict]) -> str:
  lines = ["| task | trained: pool pick | trained: search pick | gain (SE) | "
           "control: pool pick | control: search pick | control gain (SE) |",
           "|---|---|---|---|---|---|---|"]
  for s in summary:
    lines.append(
        f"| {s['task']} | {100 * s['trained_pool_test']:.1f} | "
        f"{100 * s['trained_search_test']:.1f} | {100 * s['trained_gain']:+.1f} "
        f"({100 * s['trained_gain_se']:.1f}) | {100 * s['control_pool_test']:.1f} | "
        f"{100 * s['control_search_test']:.1f} | {100 * s['control_gain']:+.1f} "
        f"({100 * s['control_gain_se']:.1f}) |")
  lines += ["", "Test accuracy (%), mean over few-shot seeds; picks by train accuracy.", "",
            "| task | seed | model | pool pick | search pick |", "|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['task']} | {r['seed']} | {r['model']} | `{r['pool_template']}` "
                 f"{100 * r['pool_test']:.1f} | `{r['search_template']}` "
                 f"{100 * r['search_test']:.1f} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  rows = run(FLAGS.model, FLAGS.tasks, [int(s) for s in FLAGS.seeds], FLAGS.shots,
             n_restart=FLAGS.n_restart, n_iter=FLAGS.n_iter, m_new=FLAGS.m_new,
             init_pool_size=FLAGS.init_pool_size, control_seed=FLAGS.control_seed,
             pool=FLAGS.pool)
  summary = summarize(rows)
  text = markdown(summary, rows)
  print(text)
  if FLAGS.out:
    os.makedirs(FLAGS.out, exist_ok=True)
    stem = os.path.join(FLAGS.out, f"search_control_{FLAGS.pool}")
    io_lib.write_json(stem + ".json", {
        "summary": summary, "rows": rows,
        "settings": {k: getattr(FLAGS, k) for k in (
            "model", "pool", "tasks", "seeds", "shots", "n_restart", "n_iter",
            "m_new", "init_pool_size", "control_seed")}})
    io_lib.atomic_write(stem + ".md", text)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
