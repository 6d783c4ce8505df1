r"""Per-task template table of the toy CLIP: generic templates vs "a photo of a {}.".

  python -m lmbbo_jax.toyworld.evaluate --out=/tmp/toy_eval

For each toy task: test accuracy of every template in `GENERIC_TEMPLATES` on
the fixed test set (100 images per class); its paired difference to the photo
template with a standard error over test images; and, over few-shot seeds
1-3, the template picked by k-shot train accuracy (ties broken by mean
log-probability of the true class) and its test gain over the photo template
(mean and standard error over seeds). Writes template_table.json and
template_table.md.
"""

from __future__ import annotations

import json
import os

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from lmbbo_jax.models.clip import CLIPModel
from lmbbo_jax.templates import PHOTO as PHOTO_TEMPLATE
from lmbbo_jax.templates import fill
from lmbbo_jax.toyworld import scenes, tasks
from lmbbo_jax.toyworld.checkpoint import ASSETS_DIR, load_toy_checkpoint

FLAGS = flags.FLAGS
DEFAULT_TASKS = ("sketch_dark", "pixel_clutter", "blurry_noisy", "mix")


def _define_flags():
  # Defined only when run as a script, so importing this module next to train.py is safe.
  flags.DEFINE_string("ckpt", ASSETS_DIR, "Toy checkpoint directory.")
  flags.DEFINE_string("out", None, "Directory for template_table.json and template_table.md.")
  flags.DEFINE_list("tasks", list(DEFAULT_TASKS), "Toy tasks to evaluate.")
  flags.DEFINE_list("seeds", ["1", "2", "3"], "Few-shot seeds for the train-picked template.")
  flags.DEFINE_integer("shots", 16, "Train images per class for the train-picked template.")

PHOTO = PHOTO_TEMPLATE
# Generic templates, every word inside the caption grammar's vocabulary.
GENERIC_TEMPLATES: tuple[str, ...] = (
    PHOTO,
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


class ToyScorer:
  """Zero-shot scoring of templates with a toy CLIP params tree (plain, unbatched by length)."""

  def __init__(self, config, params, tokenizer):
    self.config, self.params, self.tok = config, params, tokenizer
    model = CLIPModel(config)
    self._img = jax.jit(lambda p, x: model.apply({"params": p}, x,
                                                 method=CLIPModel.encode_image))
    self._txt = jax.jit(lambda p, i, e: model.apply({"params": p}, i, e,
                                                    method=CLIPModel.encode_text))
    self.scale = float(np.exp(min(float(params["logit_scale"]), np.log(100.0))))

  def image_features(self, images: np.ndarray, chunk: int = 500) -> np.ndarray:
    feats = []
    for i in range(0, len(images), chunk):
      x = scenes.preprocess(images[i:i + chunk], self.config.image_mean, self.config.image_std)
      feats.append(np.asarray(self._img(self.params, x)))
    f = np.concatenate(feats)
    return f / np.linalg.norm(f, axis=-1, keepdims=True)

  def class_weights(self, templates, class_names) -> np.ndarray:
    """L2-normalised text features [T, C, D]."""
    texts = [fill(t, c) for t in templates for c in class_names]
    ids, eot = self.tok.tokenize(texts)
    f = np.asarray(self._txt(self.params, ids, eot))
    f = f / np.linalg.norm(f, axis=-1, keepdims=True)
    return f.reshape(len(templates), len(class_names), -1)

  def logits(self, feats, weights) -> np.ndarray:
    """[T, N, C] scaled cosine logits."""
    return self.scale * np.einsum("nd,tcd->tnc", feats, weights)


def _mean_se(x) -> tuple[float, float]:
  x = np.asarray(x, np.float64)
  se = float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")
  return float(x.mean()), se


def evaluate_task(scorer: ToyScorer, task_name: str, templates, seeds, shots) -> dict:
  task = tasks.build_toy_task(task_name, shots, seeds[0])
  labels = np.array([it.label for it in task.test])
  feats = scorer.image_features(task.load_images(task.test))
  weights = scorer.class_weights(templates, task.class_names)
  correct = (scorer.logits(feats, weights).argmax(-1) == labels[None]).astype(np.float64)
  acc = correct.mean(1)
  photo = templates.index(PHOTO)
  rows = []
  for t, template in enumerate(templates):
    diff, se = _mean_se(correct[t] - correct[photo])
    rows.append({"template": template, "test_acc": round(float(acc[t]), 4),
                 "diff_vs_photo": round(diff, 4), "diff_se": round(se, 4)})
  best = int(acc.argmax())
  picked = []
  for seed in seeds:
    st = tasks.build_toy_task(task_name, shots, seed)
    tl = np.array([it.label for it in st.train])
    lg = scorer.logits(scorer.image_features(st.load_images(st.train)), weights)
    train_acc = (lg.argmax(-1) == tl[None]).mean(1)
    logp = jax.nn.log_softmax(jnp.asarray(lg), -1)
    mean_logp = np.asarray(jnp.take_along_axis(logp, jnp.asarray(tl)[None, :, None], -1)).mean(
        (1, 2))
    order = np.lexsort((-mean_logp, -train_acc))  # Accuracy first, then log-probability.
    p = int(order[0])
    picked.append({"seed": seed, "template": templates[p],
                   "train_acc": round(float(train_acc[p]), 4),
                   "test_acc": round(float(acc[p]), 4),
                   "gain_vs_photo": round(float(acc[p] - acc[photo]), 4)})
  gain, gain_se = _mean_se([p["gain_vs_photo"] for p in picked])
  return {
      "task": task_name, "description": tasks.TOY_TASKS[task_name].description,
      "test_images": int(len(labels)), "photo_acc": round(float(acc[photo]), 4),
      "best": rows[best], "worst": rows[int(acc.argmin())],
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


def run(ckpt: str, task_names, seeds, shots, templates=GENERIC_TEMPLATES) -> list[dict]:
  config, params, tok = load_toy_checkpoint(ckpt)
  scorer = ToyScorer(config, params, tok)
  return [evaluate_task(scorer, t, list(templates), seeds, shots) for t in task_names]


def main(argv):
  del argv
  unknown = [t for t in FLAGS.tasks if t not in tasks.TOY_TASKS]
  if unknown:
    raise app.UsageError(f"unknown toy task(s) {unknown}; choose from {sorted(tasks.TOY_TASKS)}")
  seeds = [int(s) for s in FLAGS.seeds]
  results = run(FLAGS.ckpt, FLAGS.tasks, seeds, FLAGS.shots)
  md = markdown(results)
  print(md)
  if FLAGS.out:
    os.makedirs(FLAGS.out, exist_ok=True)
    with open(os.path.join(FLAGS.out, "template_table.json"), "w") as f:
      json.dump({"ckpt": FLAGS.ckpt, "seeds": seeds, "shots": FLAGS.shots,
                 "results": results}, f, indent=1)
    with open(os.path.join(FLAGS.out, "template_table.md"), "w") as f:
      f.write(md)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
