r"""Per-task template table of a toy-world CLIP: generic templates vs "a photo of a {}.".

  python -m lmbbo_jax.studies.template_table --out=lmbbo_jax/studies/results

For each toy task: test accuracy of every template in
`toyworld.captions.GENERIC_TEMPLATES` on the fixed test set (100 images per
class), scored by the project's `PromptScorer` on features from
`evaluator.features.encode_task`; its paired difference to the photo template
with a standard error over test images; and, over few-shot seeds 1-3, the
template the search's selection rule picks by k-shot train accuracy (ties by
the true class's log-probability: `search.state.selection_key`) and its test
gain over the photo template (mean and standard error over seeds). Writes
template_table.json and template_table.md.
"""

from __future__ import annotations

import os

from absl import app, flags
import numpy as np

from lmbbo_jax import io as io_lib
from lmbbo_jax.templates import PHOTO
from lmbbo_jax.toyworld import tasks
from lmbbo_jax.toyworld.captions import GENERIC_TEMPLATES

FLAGS = flags.FLAGS
DEFAULT_TASKS = ("sketch_dark", "pixel_clutter", "blurry_noisy", "mix")


def _define_flags():
  flags.DEFINE_string("model", "toyclip", "The CLIP (a load_clip source).")
  flags.DEFINE_string("out", None, "Directory for template_table.json and template_table.md.")
  flags.DEFINE_list("tasks", list(DEFAULT_TASKS), "Toy tasks to evaluate.")
  flags.DEFINE_list("seeds", ["1", "2", "3"], "Few-shot seeds for the train-picked template.")
  flags.DEFINE_integer("shots", 16, "Train images per class for the train-picked template.")


def mean_se(x) -> tuple[float, float]:
  """Mean and standard error of the mean (nan with one value)."""
  x = np.asarray(x, np.float64)
  se = float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")
  return float(x.mean()), se


def _scorer(clip, task, splits, text_encoder):
  from lmbbo_jax.evaluator import features as features_lib
  from lmbbo_jax.evaluator.scorer import PromptScorer
  feats = features_lib.encode_task(clip, task, splits=splits, progress=False)
  fb, lb = features_lib.scorer_inputs(feats)
  return PromptScorer(clip, fb, lb, task.class_names, text_encoder=text_encoder), feats


def evaluate_task(clip, task_name: str, templates, seeds, shots, text_encoder=None) -> dict:
  from lmbbo_jax.evaluator.text_encoder import PackedTextEncoder
  from lmbbo_jax.search.state import selection_key

  templates = list(templates)
  if PHOTO not in templates:
    raise ValueError(f"the templates must include the photo template {PHOTO!r}")
  test_task = tasks.build_toy_task(task_name, shots, seeds[0])
  text_encoder = text_encoder or PackedTextEncoder(clip, test_task.class_names)
  scorer, feats = _scorer(clip, test_task, ["test"], text_encoder)
  acc = np.array([s.accuracy["test"] for s in scorer.score(templates)])
  # Per-image correctness for the paired differences (the scorer's own text features).
  labels = feats["test"].labels
  image = np.asarray(feats["test"].features)[labels >= 0]
  labels = labels[labels >= 0]
  logits = np.einsum("nd,tcd->tnc", image, scorer.text_features(templates))
  correct = (logits.argmax(-1) == labels[None]).astype(np.float64)
  scorer.close()
  photo = templates.index(PHOTO)
  rows = []
  for t, template in enumerate(templates):
    _, se = mean_se(correct[t] - correct[photo])
    rows.append({"template": template, "test_acc": round(float(acc[t]), 4),
                 "diff_vs_photo": round(float(acc[t] - acc[photo]), 4),
                 "diff_se": round(se, 4)})
  picked = []
  for seed in seeds:
    seed_scorer, _ = _scorer(clip, tasks.build_toy_task(task_name, shots, seed), ["train"],
                             text_encoder)
    scores = seed_scorer.score(templates)
    seed_scorer.close()
    p = min(range(len(templates)), key=lambda i: (
        selection_key(scores[i].accuracy, scores[i].logprob, "train", "logprob"), i))
    picked.append({"seed": seed, "template": templates[p],
                   "train_acc": round(float(scores[p].accuracy["train"]), 4),
                   "test_acc": round(float(acc[p]), 4),
                   "gain_vs_photo": round(float(acc[p] - acc[photo]), 4)})
  gain, gain_se = mean_se([p["gain_vs_photo"] for p in picked])
  return {
      "task": task_name, "description": tasks.TOY_TASKS[task_name].description,
      "test_images": int(len(labels)), "photo_acc": round(float(acc[photo]), 4),
      "best": rows[int(acc.argmax())], "worst": rows[int(acc.argmin())],
      "spread": round(float(acc.max() - acc.min()), 4),
      "train_picked": {"shots": shots, "per_seed": picked, "mean_gain": round(gain, 4),
                       "gain_se": round(gain_se, 4)},
      "templates": rows,
  }


def markdown(results: list[dict]) -> str:
  lines = [
      "| task | photo acc | best template | best acc | best - photo (paired, SE) | spread "
      "| train-picked gain, seeds 1-3 (SE) |",
      "|---|---|---|---|---|---|---|",
  ]
  for r in results:
    b, tp = r["best"], r["train_picked"]
    lines.append(
        f"| {r['task']} | {100 * r['photo_acc']:.1f} | \"{b['template']}\" | "
        f"{100 * b['test_acc']:.1f} | {100 * b['diff_vs_photo']:+.1f} ({100 * b['diff_se']:.1f}) "
        f"| {100 * r['spread']:.1f} | {100 * tp['mean_gain']:+.1f} ({100 * tp['gain_se']:.1f}) |")
  for r in results:
    lines += ["", f"### {r['task']}: {r['description']}", "",
              "| template | test acc | diff vs photo (SE) |", "|---|---|---|"]
    for row in sorted(r["templates"], key=lambda x: -x["test_acc"]):
      lines.append(f"| \"{row['template']}\" | {100 * row['test_acc']:.1f} | "
                   f"{100 * row['diff_vs_photo']:+.1f} ({100 * row['diff_se']:.1f}) |")
  return "\n".join(lines) + "\n"


def run(model: str, task_names, seeds, shots, templates=GENERIC_TEMPLATES) -> list[dict]:
  from lmbbo_jax.evaluator.text_encoder import PackedTextEncoder
  from lmbbo_jax.models import load_clip
  clip = load_clip(model)
  encoders: dict[tuple, PackedTextEncoder] = {}  # One per class list: programs compile once.
  out = []
  for name in task_names:
    names = tuple(tasks.build_toy_task(name, shots, seeds[0]).class_names)
    encoder = encoders.setdefault(names, PackedTextEncoder(clip, list(names)))
    out.append(evaluate_task(clip, name, templates, seeds, shots, text_encoder=encoder))
  return out


def main(argv):
  del argv
  unknown = [t for t in FLAGS.tasks if t not in tasks.TOY_TASKS]
  if unknown:
    raise app.UsageError(f"unknown toy task(s) {unknown}; choose from {sorted(tasks.TOY_TASKS)}")
  seeds = [int(s) for s in FLAGS.seeds]
  results = run(FLAGS.model, FLAGS.tasks, seeds, FLAGS.shots)
  md = markdown(results)
  print(md)
  if FLAGS.out:
    os.makedirs(FLAGS.out, exist_ok=True)
    io_lib.write_json(os.path.join(FLAGS.out, "template_table.json"),
                      {"model": FLAGS.model, "seeds": seeds, "shots": FLAGS.shots,
                       "results": results})
    io_lib.atomic_write(os.path.join(FLAGS.out, "template_table.md"), md)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
