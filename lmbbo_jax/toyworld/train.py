r"""Trains the tiny toy-world CLIP (LiT-style, two stages) and writes a loadable checkpoint.

  python -m lmbbo_jax.toyworld.train --out=/tmp/toyclip --seed=0

Stage 0: a byte-level BPE tokenizer trained on the caption grammar.
Stage 1: the image tower (the project's `VisionTransformer`) trained supervised
  with class heads plus attribute heads (colour, size, count, style,
  background) on the L2-normalised embedding, with a curriculum (easy scenes
  first) and one warmup + cosine schedule. Plain contrastive training from
  scratch does not learn shape on a CPU budget; class supervision does. Each
  style group has its own fixed class directions (`--class_head_groups`,
  `--class_head_cos`), with look-alike confounds built in (`--class_confounds`:
  a pixelated circle leans toward "ring"); the class loss is a softmax over
  every group's directions, plus a pull of the embedding onto its own direction
  and a cross-reading loss (other groups read the image as the design says), so
  the designed geometry reaches the embedding instead of the tower reusing the
  photo directions for every style. The attribute heads keep the nuisances
  in the embedding. Prompts that name the style can then matter, and prompts
  that do not misread the confounded classes.
Stage 2: the image tower is frozen, a set of generated images is embedded once,
  and the text tower (`TextTransformer`) is trained contrastively against those
  embeddings with freshly sampled captions each step.
Then the towers are put into one `CLIPModel` params tree and written with
config.json, tokenizer.json and train_log.json. Every schedule is a fixed
number of steps and all data come from the seed, so a rerun reproduces the
checkpoint. Stage 1 checkpoints periodically and resumes after a crash.
"""

from __future__ import annotations

import json
import math
import os
import queue
import shlex
import threading
import time

from absl import app, flags, logging
import flax.linen as nn
from flax import serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lmbbo_jax import io as io_lib
from lmbbo_jax.models.clip import (CLIPModel, TextTransformer, VisionTransformer,
                                   abstract_variables)
from lmbbo_jax.models.configs import CLIP_MEAN, CLIP_STD, CLIPConfig, TextConfig, VisionConfig
from lmbbo_jax.templates import PHOTO as PHOTO_TEMPLATE
from lmbbo_jax.templates import fill
from lmbbo_jax.toyworld import captions, scenes
from lmbbo_jax.toyworld.tokenizer import CONTEXT_LENGTH, ToyTokenizer, train_tokenizer

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output directory (checkpoint files and logs).")
flags.DEFINE_integer("seed", 0, "Seed for initialisation and all generated data.")
flags.DEFINE_integer("steps", 3000, "Image-tower steps (one warmup + cosine schedule).")
flags.DEFINE_integer("batch", 128, "Image-tower batch size.")
flags.DEFINE_float("lr", 1e-3, "Image-tower peak learning rate.")
flags.DEFINE_float("easy_frac", 0.2, "Fraction of steps on easy scenes only.")
flags.DEFINE_float("ramp_frac", 0.1, "Fraction of steps over which easy scenes fade out.")
flags.DEFINE_float("label_smoothing", 0.1, "Label smoothing of the class head.")
flags.DEFINE_float("attr_weight", 0.3, "Weight of each attribute head's loss.")
flags.DEFINE_list("class_free_styles", [],
                  "Styles whose images get no class-head loss in stage 1 (attribute heads "
                  "only), so their class must come from the text side. Empty in the shipped "
                  "recipe.")
flags.DEFINE_float("class_head_cos", 0.4,
                   "Class heads are fixed directions per style group with this cosine "
                   "between groups for the same class (1: one shared direction; 0: "
                   "unrelated). Negative: learned heads, which align with the features "
                   "the tower already has, so only styles that look different (sketches) "
                   "get their own directions.")
flags.DEFINE_list("class_head_groups", ["photo", "sketch", "pixelated", "blurry+noisy"],
                  "Style groups with their own class head ('+' joins styles into one group; "
                  "every style in exactly one group). One group 'photo+sketch+pixelated+"
                  "blurry+noisy' is a single shared head. Separate heads let each rendering "
                  "style keep its class directions apart, as a sketch and a photo of a dog "
                  "differ for real CLIP; a shared head collapses every style onto one class "
                  "direction, and then no prompt wording can matter.")
flags.DEFINE_list("class_confounds",
                  ["sketch:circle>ring", "pixelated:circle>ring", "pixelated:ring>circle",
                   "blurry+noisy:square>diamond", "blurry+noisy:diamond>square"],
                  "Look-alike confounds built into the class directions, GROUP:CLASS>LOOKALIKE: "
                  "in that style group the class's shared part leans toward the look-alike's "
                  "(an outlined circle resembles a ring; pixelation merges round shapes; blur "
                  "rounds corners), so a prompt that does not name the style misreads it, as "
                  "real CLIP misreads a sketch read as a photo.")
flags.DEFINE_float("confound_mix", 0.7,
                   "Weight of the look-alike in a confounded direction's shared part "
                   "(> 0.5: a photo reading picks the look-alike).")
flags.DEFINE_bool("class_joint_softmax", True,
                  "Fixed directions: the class loss is a softmax over every group's class "
                  "directions (style group and class), not only the image's own group's. "
                  "Within one group the loss is met by embeddings that keep the photo "
                  "class's direction, so photo prompts read every style the same way.")
flags.DEFINE_float("cross_reading_weight", 1.0,
                   "Fixed directions: weight of a loss that reads each image with every other "
                   "group's class directions and asks for what the design says that group "
                   "sees (its own class; the look-alike for a confound). Without it the tower "
                   "reuses the photo directions for styles that look like photos (blurry), "
                   "and their confounds never show.")
flags.DEFINE_float("class_align_weight", 1.0,
                   "Weight of a loss 1 - cos(embedding, own class direction) in stage 1 (fixed "
                   "directions only). Without it the class head is satisfied by embeddings "
                   "near the directions every group shares, and the designed geometry "
                   "(style-specific parts, confounds) never reaches the embedding.")
flags.DEFINE_integer("eval_every", 250, "Image-tower steps between evaluations/checkpoints.")
flags.DEFINE_integer("embed_images", 30000, "Images embedded for the text stage.")
flags.DEFINE_integer("text_steps", 500, "Text-tower steps.")
flags.DEFINE_integer("text_batch", 256, "Text-tower batch size.")
flags.DEFINE_float("text_lr", 1e-3, "Text-tower peak learning rate.")
flags.DEFINE_float("text_head_weight", 0.0,
                   "Weight of an auxiliary loss: the caption's text embedding classified along "
                   "the stage-1 class directions of its image's style group (with learned "
                   "heads: the first group's head). Off in the shipped recipe: at 1.0 the "
                   "template table moved by under 1 point on every task.")
flags.DEFINE_integer("text_eval_every", 50, "Text steps between zero-shot evaluations.")
flags.DEFINE_integer("eval_images", 1000, "Held-out training-mix images for evaluation.")
flags.DEFINE_integer("gate_images", 2000, "Held-out mix images of the final zero-shot gate "
                     "(the shipped checkpoint's figure is on 2000).", lower_bound=1)

# Data streams: every generated batch is a pure function of (seed, stream, index).
_TOKENIZER, _TRAIN, _EMBED, _CAPTION, _INIT = 1, 2, 3, 4, 5
EVAL_SEED = 987654  # Held-out sets do not depend on the training seed.
HEAD_SCALE = 16.0
ARCH_NAME = "toyclip"
HEADS = {"label": len(scenes.CLASS_NAMES), "colour": len(scenes.COLOURS),
         "size": len(scenes.SIZES), "count": len(scenes.COUNTS),
         "style": len(scenes.STYLES), "background": len(scenes.BACKGROUNDS)}


def toy_config(vocab_size: int, sot: int, eot: int, pad: int) -> CLIPConfig:
  """The toy CLIP: ViT patch 8 / width 128 / 4 layers; text width 128 / 3 layers."""
  return CLIPConfig(
      embed_dim=128,
      vision=VisionConfig(kind="vit", image_size=scenes.IMAGE_SIZE, width=128, layers=4,
                          heads=4, patch_size=8, act="gelu"),
      text=TextConfig(vocab_size=vocab_size, context_length=CONTEXT_LENGTH, width=128,
                      layers=3, heads=4, act="gelu"),
      sot_token_id=sot, eot_token_id=eot, pad_token_id=pad,
      image_mean=CLIP_MEAN, image_std=CLIP_STD, name=ARCH_NAME)


def class_targets(groups: int, classes: int, dim: int, cos: float,
                  confounds: tuple[tuple[int, int, int], ...] = (),
                  confound_mix: float = 0.7) -> jnp.ndarray:
  """Fixed unit class directions [groups, classes, dim]; same class, two groups: cosine `cos`.

  Each direction is sqrt(cos) * shared[c] + sqrt(1 - cos) * own[g, c] (both random
  unit vectors from a fixed key), so a style group reads a class partly along
  the direction every group shares and partly along its own.

  A confound (g, c, p) says "in group g, class c looks like class p": its shared
  part becomes unit((1 - confound_mix) * shared[c] + confound_mix * shared[p]).
  With confound_mix > 0.5 a reader of another group's directions (a photo
  prompt) takes such an image for a p, while group g's own directions (a prompt
  that names the style) still tell c from p.
  """
  k1, k2 = jax.random.split(jax.random.key(20260), 2)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  shared = unit(jax.random.normal(k1, (classes, dim)))
  own = unit(jax.random.normal(k2, (groups, classes, dim)))
  shared_g = jnp.broadcast_to(shared, (groups, classes, dim))
  for g, c, p in confounds:
    mixed = unit((1.0 - confound_mix) * shared[c] + confound_mix * shared[p])
    shared_g = shared_g.at[g, c].set(mixed)
  return unit(jnp.sqrt(cos) * shared_g + jnp.sqrt(1.0 - cos) * own)


def cross_readings(targets) -> np.ndarray:
  """[h, g, c]: the class group h's directions pick for group g's class-c direction."""
  t = np.asarray(targets)
  return np.einsum("hkd,gcd->hgck", t, t).argmax(-1)


class TowerWithHeads(nn.Module):
  """The image tower plus heads on its L2-normalised embedding.

  `style_group[s]` is the class head used for images of style `s` (one head when
  every entry is 0). With `class_cos` in [0, 1] the class heads are fixed
  directions (`class_targets`), so the tower must place each group's classes
  where the world's design says; with `class_cos` < 0 they are learned. The
  attribute heads are learned and shared.
  """
  config: CLIPConfig
  style_group: tuple[int, ...] = (0,) * len(scenes.STYLES)
  class_cos: float = -1.0
  confounds: tuple[tuple[int, int, int], ...] = ()
  confound_mix: float = 0.7

  @nn.compact
  def __call__(self, pixels, style=None):
    emb = VisionTransformer(self.config.vision, self.config.embed_dim, name="visual")(pixels)
    z = emb * jax.lax.rsqrt(jnp.sum(emb * emb, -1, keepdims=True) + 1e-12) * HEAD_SCALE
    out = {k: nn.Dense(n, name=f"head_{k}")(z) for k, n in HEADS.items() if k != "label"}
    groups, classes = max(self.style_group) + 1, HEADS["label"]
    if style is None:
      style = jnp.zeros(z.shape[:1], jnp.int32)
    if self.class_cos >= 0:
      targets = class_targets(groups, classes, z.shape[-1], self.class_cos, self.confounds,
                              self.confound_mix)
      per_group = jnp.einsum("bd,gcd->bgc", z, targets)
    else:
      kernel = self.param("head_label_kernel", nn.initializers.lecun_normal(batch_axis=(0,)),
                          (groups, z.shape[-1], classes))
      bias = self.param("head_label_bias", nn.initializers.zeros, (groups, classes))
      per_group = jnp.einsum("bd,gdc->bgc", z, kernel) + bias
    # Every group's reading at once ("which style group and which class"); the
    # class head proper is the image's own group's.
    out["group_label"] = per_group.reshape(per_group.shape[0], -1)
    g = jnp.asarray(self.style_group)[style]
    out["label"] = jnp.take_along_axis(per_group, g[:, None, None], 1)[:, 0]
    return out


def parse_head_groups(spec: list[str]) -> tuple[int, ...]:
  """["photo", "blurry+noisy", ...] -> the head index of every style in `scenes.STYLES`."""
  group_of = {}
  for g, entry in enumerate(spec):
    for style in entry.split("+"):
      if style not in scenes.STYLES:
        raise ValueError(f"--class_head_groups: unknown style {style!r}; choose from "
                         f"{', '.join(scenes.STYLES)}")
      if style in group_of:
        raise ValueError(f"--class_head_groups: style {style!r} is in two groups")
      group_of[style] = g
  missing = [s for s in scenes.STYLES if s not in group_of]
  if missing:
    raise ValueError(f"--class_head_groups: no group for style(s) {', '.join(missing)}")
  return tuple(group_of[s] for s in scenes.STYLES)


def parse_confounds(spec: list[str], groups: list[str]) -> tuple[tuple[int, int, int], ...]:
  """["pixelated:circle>ring", ...] -> ((group index, class, look-alike class), ...)."""
  out = []
  for entry in spec:
    group, sep, pair = entry.partition(":")
    c, arrow, p = pair.partition(">")
    if not (sep and arrow):
      raise ValueError(f"--class_confounds: {entry!r} is not GROUP:CLASS>LOOKALIKE "
                       "(e.g. pixelated:circle>ring)")
    if group not in groups:
      raise ValueError(f"--class_confounds: {group!r} is not one of --class_head_groups "
                       f"({', '.join(groups)})")
    for name in (c, p):
      if name not in scenes.CLASS_NAMES:
        raise ValueError(f"--class_confounds: unknown class {name!r}; choose from "
                         f"{', '.join(scenes.CLASS_NAMES)}")
    if c == p:
      raise ValueError(f"--class_confounds: {entry!r} names the same class twice")
    key = (groups.index(group), scenes.CLASS_NAMES.index(c))
    if key in [o[:2] for o in out]:
      raise ValueError(f"--class_confounds: {group}:{c} has two look-alikes")
    out.append(key + (scenes.CLASS_NAMES.index(p),))
  return tuple(out)


def _rng(*key) -> np.random.Generator:
  return np.random.default_rng([int(k) for k in key])


def easy_fraction(step: int, steps: int, easy_frac: float, ramp_frac: float) -> float:
  """Share of easy scenes in batch `step`: 1 for the first `easy_frac`, then a linear fade."""
  start, ramp = easy_frac * steps, max(ramp_frac * steps, 1)
  return float(np.clip(1.0 - (step - start) / ramp, 0.0, 1.0))


def train_batch(seed: int, step: int, steps: int, batch: int, easy_frac: float,
                ramp_frac: float) -> scenes.SceneBatch:
  """Image-tower batch `step`: a pure function of its arguments (curriculum included)."""
  rng = _rng(seed, _TRAIN, step)
  n_easy = int(round(easy_fraction(step, steps, easy_frac, ramp_frac) * batch))
  parts = []
  if n_easy:
    parts.append(scenes.sample_scenes(rng, n_easy, scenes.EASY))
  if batch - n_easy:
    parts.append(scenes.sample_scenes(rng, batch - n_easy, scenes.MIX))
  return concat(parts)


def concat(parts: list[scenes.SceneBatch]) -> scenes.SceneBatch:
  if len(parts) == 1:
    return parts[0]
  return scenes.SceneBatch(**{k: np.concatenate([getattr(p, k) for p in parts])
                              for k in vars(parts[0])})


def eval_set(n: int, dist=scenes.MIX, stream: int = 0) -> scenes.SceneBatch:
  """A fixed, class-balanced held-out set (independent of the training seed)."""
  labels = np.arange(n) % len(scenes.CLASS_NAMES)
  return scenes.sample_scenes(_rng(EVAL_SEED, stream), n, dist, labels=labels)


def labels_of(b: scenes.SceneBatch) -> dict[str, np.ndarray]:
  return {k: getattr(b, k) for k in HEADS}


class Prefetcher:
  """Builds batches 0..n-1 in a background thread (numpy releases the GIL in its kernels)."""

  def __init__(self, fn, start: int, stop: int, depth: int = 3):
    self._q = queue.Queue(depth)
    self._t = threading.Thread(target=self._run, args=(fn, start, stop), daemon=True)
    self._t.start()

  def _run(self, fn, start, stop):
    for i in range(start, stop):
      self._q.put(fn(i))

  def get(self):
    return self._q.get()


def _save(path: str, obj) -> None:
  io_lib.atomic_write(path, serialization.msgpack_serialize(serialization.to_state_dict(obj)))


def _write_json(path: str, obj) -> None:
  io_lib.atomic_write(path, json.dumps(obj, indent=1))


def _decay_mask(params):
  return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


def _schedule(lr, steps, warmup):
  return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr * 0.01)


# ---------------------------------------------------------------------------
# Stage 1: the image tower.


def train_image_tower(config: CLIPConfig, out: str, seed: int, log: dict,
                      style_group: tuple[int, ...], confounds=()):
  steps, batch = FLAGS.steps, FLAGS.batch
  model = TowerWithHeads(config, style_group, FLAGS.class_head_cos, confounds,
                         FLAGS.confound_mix)
  align_weight = FLAGS.class_align_weight if FLAGS.class_head_cos >= 0 else 0.0
  mean, std = config.image_mean, config.image_std
  tx = optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.adamw(_schedule(FLAGS.lr, steps, max(steps // 25, 1)), b2=0.98,
                  weight_decay=0.05, mask=_decay_mask))

  unknown = set(FLAGS.class_free_styles) - set(scenes.STYLES)
  if unknown:
    raise app.UsageError(f"--class_free_styles: unknown style(s) {sorted(unknown)}; "
                         f"choose from {scenes.STYLES}")
  class_free = jnp.asarray([s in FLAGS.class_free_styles for s in scenes.STYLES])

  group_of = jnp.asarray(style_group)
  joint = FLAGS.class_joint_softmax and FLAGS.class_head_cos >= 0
  n_groups = max(style_group) + 1
  cross_weight = FLAGS.cross_reading_weight if FLAGS.class_head_cos >= 0 else 0.0
  if cross_weight:
    reading = jnp.asarray(cross_readings(class_targets(
        n_groups, HEADS["label"], config.embed_dim, FLAGS.class_head_cos, confounds,
        FLAGS.confound_mix)))

  def loss_fn(params, pixels, labels):
    logits = model.apply({"params": params}, pixels, labels["style"])
    group_logits = logits.pop("group_label")
    total, metrics = 0.0, {}
    if joint:
      # The class loss over every group's directions: an image must sit nearer its own
      # group's class direction than any other group's, so the designed geometry
      # (style-specific parts, look-alike confounds) reaches the embedding.
      target = group_of[labels["style"]] * HEADS["label"] + labels["label"]
      onehot = optax.smooth_labels(jax.nn.one_hot(target, group_logits.shape[-1]),
                                   FLAGS.label_smoothing)
      total = total + optax.softmax_cross_entropy(group_logits, onehot).mean()
    if cross_weight:
      # Read with another group's directions, an image is what the design says that
      # group sees (its own class, or the look-alike of a confound).
      per_group = group_logits.reshape(group_logits.shape[0], n_groups, HEADS["label"])
      g = group_of[labels["style"]]
      read = reading[:, g, labels["label"]].T  # [batch, groups]
      onehot = optax.smooth_labels(jax.nn.one_hot(read, HEADS["label"]), FLAGS.label_smoothing)
      ce = optax.softmax_cross_entropy(per_group, onehot)  # [batch, groups]
      other = 1.0 - jax.nn.one_hot(g, n_groups)
      total = total + cross_weight * (ce * other).sum() / jnp.maximum(other.sum(), 1.0)
    for k, lg in logits.items():
      metrics[f"acc_{k}"] = (lg.argmax(-1) == labels[k]).mean()
      if k == "label" and joint:
        continue
      onehot = jax.nn.one_hot(labels[k], lg.shape[-1])
      if k == "label":
        onehot = optax.smooth_labels(onehot, FLAGS.label_smoothing)
      if k == "label" and FLAGS.class_free_styles:
        w = 1.0 - class_free[labels["style"]].astype(jnp.float32)
        ce = (w * optax.softmax_cross_entropy(lg, onehot)).sum() / jnp.maximum(w.sum(), 1.0)
      else:
        ce = optax.softmax_cross_entropy(lg, onehot).mean()
      total = total + (1.0 if k == "label" else FLAGS.attr_weight) * ce
    if align_weight:
      # Fixed unit directions: the true class's logit / HEAD_SCALE is the cosine.
      cos = jnp.take_along_axis(logits["label"], labels["label"][:, None], 1)[:, 0] / HEAD_SCALE
      total = total + align_weight * (1.0 - cos).mean()
      metrics["align_cos"] = cos.mean()
    metrics["loss"] = total
    return total, metrics

  @jax.jit
  def step_fn(params, opt_state, images, labels):
    pixels = (images.astype(jnp.float32) / 255.0 - jnp.asarray(mean)) / jnp.asarray(std)
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, pixels, labels)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  photo_group = style_group[scenes.STYLES.index("photo")]

  @jax.jit
  def predict(params, images, style):
    pixels = (images.astype(jnp.float32) / 255.0 - jnp.asarray(mean)) / jnp.asarray(std)
    out = model.apply({"params": params}, pixels, style)
    preds = {k: out[k].argmax(-1) for k in HEADS}
    per_group = out["group_label"].reshape(len(images), n_groups, HEADS["label"])
    preds["photo_label"] = per_group[:, photo_group].argmax(-1)
    return preds

  def evaluate(params, b):
    # The class head of each image's own style group (the style is known here).
    preds = [predict(params, b.images[i:i + 250], b.style[i:i + 250])
             for i in range(0, len(b), 250)]
    acc = {k: float(np.mean(np.concatenate([p[k] for p in preds]) == getattr(b, k)))
           for k in HEADS}
    hit = np.concatenate([p["label"] for p in preds]) == b.label
    acc["label_by_style"] = {s: float(np.mean(hit[b.style == i]))
                             for i, s in enumerate(scenes.STYLES)}
    # Every image read with the photo group's class directions: what a photo
    # prompt will see (the gate's image side).
    hit = np.concatenate([p["photo_label"] for p in preds]) == b.label
    acc["photo_reading"] = float(np.mean(hit))
    acc["photo_reading_by_style"] = {s: float(np.mean(hit[b.style == i]))
                                     for i, s in enumerate(scenes.STYLES)}
    return acc

  held_out = eval_set(FLAGS.eval_images)
  ckpt = os.path.join(out, "stage1.msgpack")
  # Compiled whole (op by op, the init compiles each small op on its own: 8 s vs 2 s).
  params = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 64, 64, 3)),
                               jnp.zeros((1,), jnp.int32))["params"]
  opt_state = tx.init(params)
  start = 0
  if os.path.exists(ckpt):
    with open(ckpt, "rb") as f:
      state = serialization.msgpack_restore(f.read())
    params = serialization.from_state_dict(params, state["params"])
    opt_state = serialization.from_state_dict(opt_state, state["opt_state"])
    start = int(state["step"])
    log["stage1"] = state.get("log", log["stage1"])
    if isinstance(log["stage1"], (str, bytes)):
      log["stage1"] = json.loads(log["stage1"])
    logging.info("resumed stage 1 at step %d", start)
  curve = log["stage1"]["curve"]
  t0 = time.time() - log["stage1"].get("seconds", 0.0)
  curriculum = (FLAGS.easy_frac, FLAGS.ramp_frac)
  prefetch = Prefetcher(lambda i: train_batch(seed, i, steps, batch, *curriculum), start, steps)
  running = []
  for step in range(start, steps):
    b = prefetch.get()
    params, opt_state, metrics = step_fn(params, opt_state, b.images, labels_of(b))
    running.append(metrics)
    done = step + 1
    if done % FLAGS.eval_every == 0 or done == steps:
      train_m = {k: float(np.mean([m[k] for m in running])) for k in running[0]}
      running = []
      acc = evaluate(params, held_out)
      log["stage1"]["seconds"] = time.time() - t0
      curve.append({"step": done, "seconds": round(time.time() - t0, 1),
                    "easy_fraction": easy_fraction(step, steps, *curriculum),
                    "train": {k: round(v, 4) for k, v in train_m.items()},
                    "held_out_head_acc": {k: round(acc[k], 4) for k in HEADS},
                    "held_out_class_acc_by_style": {
                        k: round(v, 4) for k, v in acc["label_by_style"].items()},
                    "held_out_photo_reading_by_style": {
                        k: round(v, 4) for k, v in acc["photo_reading_by_style"].items()}})
      logging.info("stage1 step %d/%d %.0fs loss %.3f train_acc %.3f held-out class acc %.3f "
                   "(style %.2f bg %.2f count %.2f colour %.2f size %.2f) by style %s", done, steps,
                   time.time() - t0, train_m["loss"], train_m["acc_label"], acc["label"],
                   acc["style"], acc["background"], acc["count"], acc["colour"], acc["size"],
                   {k: round(v, 2) for k, v in acc["label_by_style"].items()})
      logging.info("stage1 photo reading %.3f by style %s (align cos %.3f)", acc["photo_reading"],
                   {k: round(v, 2) for k, v in acc["photo_reading_by_style"].items()},
                   train_m.get("align_cos", float("nan")))
      _save(ckpt, {"params": params, "opt_state": opt_state, "step": done,
                   "log": json.dumps(log["stage1"])})
      _write_json(os.path.join(out, "train_log.partial.json"), log)
  log["stage1"]["seconds"] = round(time.time() - t0, 1)
  return params


# ---------------------------------------------------------------------------
# Stage 2: the text tower on frozen image embeddings.


def embed_images(config, visual_params, b_images, chunk=250):
  vt = VisionTransformer(config.vision, config.embed_dim)
  mean, std = config.image_mean, config.image_std

  @jax.jit
  def enc(images):
    pixels = (images.astype(jnp.float32) / 255.0 - jnp.asarray(mean)) / jnp.asarray(std)
    e = vt.apply({"params": visual_params}, pixels)
    return e / jnp.linalg.norm(e, axis=-1, keepdims=True)

  return np.concatenate([np.asarray(enc(b_images[i:i + chunk]))
                         for i in range(0, len(b_images), chunk)])


def train_text_tower(config, tok: ToyTokenizer, visual_params, seed: int, log: dict,
                     class_head=None, class_dirs=None, style_group=None):
  t0 = time.time()
  n = FLAGS.embed_images
  chunk = 2000
  attrs, embs = [], []
  for c in range(0, n, chunk):
    b = scenes.sample_scenes(_rng(seed, _EMBED, c), min(chunk, n - c), scenes.MIX)
    embs.append(embed_images(config, visual_params, b.images))
    b.images = np.zeros((len(b), 0), np.uint8)  # Keep only the attributes.
    attrs.append(b)
  attrs = concat(attrs)
  embs = np.concatenate(embs).astype(np.float32)
  held_out = eval_set(FLAGS.eval_images)
  held_emb = embed_images(config, visual_params, held_out.images)
  log["stage2"]["embed_seconds"] = round(time.time() - t0, 1)
  logging.info("embedded %d images in %.0fs", n, time.time() - t0)

  text = TextTransformer(config.text, config.embed_dim)
  steps, bs = FLAGS.text_steps, FLAGS.text_batch
  ids0 = jnp.zeros((2, config.text.context_length), jnp.int32)
  tparams = jax.jit(text.init)(jax.random.key(seed + 1), ids0,
                              jnp.zeros((2,), jnp.int32))["params"]
  params = {"text": tparams, "logit_scale": jnp.asarray(math.log(10.0), jnp.float32)}
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(_schedule(FLAGS.text_lr, steps, max(steps // 20, 1)), b2=0.98,
                               weight_decay=0.05, mask=_decay_mask))
  opt_state = tx.init(params)

  head_weight = FLAGS.text_head_weight

  group_of = jnp.asarray(style_group or (0,) * len(scenes.STYLES))

  def loss_fn(params, ids, eot, img, label, style):
    t = text.apply({"params": params["text"]}, ids, eot)
    t = t / jnp.linalg.norm(t, axis=-1, keepdims=True)
    scale = jnp.exp(jnp.minimum(params["logit_scale"], math.log(100.0)))
    logits = scale * t @ img.T
    target = jnp.arange(ids.shape[0])
    loss = 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, target).mean()
                  + optax.softmax_cross_entropy_with_integer_labels(logits.T, target).mean())
    head_logits = None
    if head_weight and class_dirs is not None:
      head_logits = jnp.einsum("bd,bcd->bc", HEAD_SCALE * t, class_dirs[group_of[style]])
    elif head_weight and class_head is not None:
      head_logits = (HEAD_SCALE * t) @ class_head["kernel"][0] + class_head["bias"][0]
    if head_logits is not None:
      loss = loss + head_weight * optax.softmax_cross_entropy_with_integer_labels(
          head_logits, label).mean()
    return loss, (logits.argmax(-1) == target).mean()

  @jax.jit
  def step_fn(params, opt_state, ids, eot, img, label, style):
    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, ids, eot, img,
                                                                   label, style)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, acc

  @jax.jit
  def encode_text(tparams, ids, eot):
    t = text.apply({"params": tparams}, ids, eot)
    return t / jnp.linalg.norm(t, axis=-1, keepdims=True)

  prompts = [fill(PHOTO_TEMPLATE, c) for c in scenes.CLASS_NAMES]
  p_ids, p_eot = tok.tokenize(prompts)

  def zero_shot(tparams):
    w = np.asarray(encode_text(tparams, p_ids, p_eot))
    return float(np.mean((held_emb @ w.T).argmax(-1) == held_out.label))

  curve = log["stage2"]["curve"]
  losses, accs = [], []

  def make_batch(i):
    rng = _rng(seed, _CAPTION, i)
    idx = rng.choice(n, size=bs, replace=False)
    sub = attrs.take(idx)
    ids, eot = tok.tokenize(captions.captions(rng, sub))
    # Trim padding to a length bucket: fewer FLOPs, only a few compiled shapes.
    length = next(b for b in (16, 24, ids.shape[1]) if b > eot.max())
    return ids[:, :length], eot, idx

  prefetch = Prefetcher(make_batch, 0, steps)
  for step in range(steps):
    ids, eot, idx = prefetch.get()
    params, opt_state, loss, acc = step_fn(params, opt_state, ids, eot, embs[idx],
                                           attrs.label[idx], attrs.style[idx])
    losses.append(float(loss))
    accs.append(float(acc))
    done = step + 1
    if done % FLAGS.text_eval_every == 0 or done == steps:
      zs = zero_shot(params["text"])
      curve.append({"step": done, "seconds": round(time.time() - t0, 1),
                    "loss": round(float(np.mean(losses)), 4),
                    "in_batch_acc": round(float(np.mean(accs)), 4),
                    "zero_shot_photo_acc": round(zs, 4)})
      logging.info("stage2 step %d/%d loss %.3f in-batch %.3f zero-shot '%s' %.3f", done,
                   steps, np.mean(losses), np.mean(accs), PHOTO_TEMPLATE, zs)
      losses, accs = [], []
  log["stage2"]["seconds"] = round(time.time() - t0, 1)
  return params


# ---------------------------------------------------------------------------


def build_tokenizer(seed: int) -> ToyTokenizer:
  b = scenes.sample_scenes(_rng(seed, _TOKENIZER), 8000, scenes.MIX, render=False)
  rng = _rng(seed, _TOKENIZER, 1)
  texts = captions.captions(rng, b) + captions.captions(rng, b) + captions.captions(rng, b)
  return ToyTokenizer(train_tokenizer(texts))


def gate_accuracy(config: CLIPConfig, params, tok: ToyTokenizer, n: int,
                  template: str = PHOTO_TEMPLATE) -> float:
  """Zero-shot class accuracy of a full CLIPModel params tree on a held-out mix set."""
  model = CLIPModel(config)
  # Compiled whole: op by op, each small op of the towers compiles on its own.
  encode_image = jax.jit(lambda p, x: model.apply({"params": p}, x,
                                                  method=CLIPModel.encode_image))
  encode_text = jax.jit(lambda p, ids, eot: model.apply({"params": p}, ids, eot,
                                                        method=CLIPModel.encode_text))
  b = eval_set(n, stream=1)
  pixels = scenes.preprocess(b.images, config.image_mean, config.image_std)
  img = np.concatenate([np.asarray(encode_image(params, pixels[i:i + 500]))
                        for i in range(0, n, 500)])
  ids, eot = tok.tokenize([fill(template, c) for c in scenes.CLASS_NAMES])
  txt = np.array(encode_text(params, ids, eot))
  img = img / np.linalg.norm(img, axis=-1, keepdims=True)
  txt = txt / np.linalg.norm(txt, axis=-1, keepdims=True)
  return float(np.mean((img @ txt.T).argmax(-1) == b.label))


def recipe_command(recipe: dict) -> str:
  """The training command for `recipe`, quoted for a POSIX shell ('>' in confounds)."""
  return "python -m lmbbo_jax.toyworld.train " + " ".join(
      shlex.quote(f"--{k}={','.join(v) if isinstance(v, list) else v}")
      for k, v in recipe.items())


def main(argv):
  del argv
  if not FLAGS.out:
    raise app.UsageError("--out=DIR is required (where the checkpoint is written)")
  out, seed = FLAGS.out, FLAGS.seed
  try:
    style_group = parse_head_groups(FLAGS.class_head_groups)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if FLAGS.class_head_cos > 1:
    raise app.UsageError("--class_head_cos must be <= 1 (negative: learned heads)")
  try:
    confounds = parse_confounds(FLAGS.class_confounds, FLAGS.class_head_groups)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if confounds and FLAGS.class_head_cos < 0:
    raise app.UsageError("--class_confounds needs fixed directions (--class_head_cos >= 0); "
                         "pass --class_confounds= to train learned heads")
  if not 0.0 <= FLAGS.confound_mix <= 1.0:
    raise app.UsageError("--confound_mix must be in [0, 1]")
  os.makedirs(out, exist_ok=True)
  t_start = time.time()
  tok = build_tokenizer(seed)
  tok.save(os.path.join(out, "tokenizer.json"))
  config = toy_config(tok.vocab_size, tok.sot_token_id, tok.eot_token_id, tok.pad_token_id)
  recipe = {k: FLAGS[k].value for k in (
      "seed", "steps", "batch", "lr", "easy_frac", "ramp_frac", "label_smoothing",
      "attr_weight", "class_free_styles", "class_head_groups", "class_head_cos",
      "class_confounds", "confound_mix", "class_align_weight", "class_joint_softmax",
      "cross_reading_weight",
      "embed_images", "text_steps", "text_batch", "text_lr",
      "text_head_weight", "eval_images")}
  log = {"command": recipe_command(recipe),
         "recipe": recipe, "head_scale": HEAD_SCALE, "heads": list(HEADS),
         "jax_version": jax.__version__, "cpu_count": os.cpu_count(),
         "stage1": {"curve": []}, "stage2": {"curve": []}}
  logging.info("tokenizer: %d tokens", tok.vocab_size)
  s1 = train_image_tower(config, out, seed, log, style_group, confounds)
  head = ({"kernel": s1["head_label_kernel"], "bias": s1["head_label_bias"]}
          if "head_label_kernel" in s1 else None)
  dirs = (class_targets(max(style_group) + 1, HEADS["label"], config.embed_dim,
                        FLAGS.class_head_cos, confounds, FLAGS.confound_mix)
          if FLAGS.class_head_cos >= 0 else None)
  s2 = train_text_tower(config, tok, s1["visual"], seed, log, class_head=head,
                        class_dirs=dirs, style_group=style_group)
  params = {"visual": s1["visual"], "text": s2["text"], "logit_scale": s2["logit_scale"]}
  ref = abstract_variables(config)["params"]  # Shapes only: nothing is computed.
  ref_shapes = jax.tree_util.tree_map(lambda x: x.shape, ref)
  got_shapes = jax.tree_util.tree_map(lambda x: jnp.shape(x), params)
  if ref_shapes != got_shapes:
    raise RuntimeError("assembled params do not match CLIPModel's tree")
  params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)
  gate = gate_accuracy(config, params, tok, FLAGS.gate_images)
  log["gate"] = {"template": PHOTO_TEMPLATE, "held_out_images": FLAGS.gate_images,
                 "zero_shot_accuracy": round(gate, 4), "chance": 1 / len(scenes.CLASS_NAMES)}
  log["total_seconds"] = round(time.time() - t_start, 1)
  cfg = config.to_dict()
  cfg["tokenizer"] = {"kind": "toy", "file": "tokenizer.json"}
  _write_json(os.path.join(out, "config.json"), cfg)
  _save(os.path.join(out, "params.msgpack"), params)
  _write_json(os.path.join(out, "train_log.json"), log)
  logging.info("gate: zero-shot '%s' %.3f on %d held-out mix images; total %.0fs",
               PHOTO_TEMPLATE, gate, FLAGS.gate_images, log["total_seconds"])


if __name__ == "__main__":
  flags.mark_flag_as_required("out")
  app.run(main)
