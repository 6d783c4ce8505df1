"""CoOp (Zhou et al., "Learning to Prompt for Vision-Language Models", IJCV 2022) in JAX.

The white-box reference of the paper's comparison: instead of a written template,
`n_ctx` context vectors in the text tower's token-embedding space are learned by
gradient descent on the few-shot training images, and the class name follows
them: "[V]_1 ... [V]_16 {class}." (CoOp's default: one context shared by all
classes, the class token at the end).

CoOp's recipe for few-shot classification, kept here:
  * 16 context tokens, initialised from N(0, 0.02) (no initial words);
  * the prompt "X X ... X {class}." tokenised as CoOp does, the X embeddings
    replaced by the context;
  * SGD, lr 0.002, momentum 0.9, weight decay 5e-4, batch 32 (one smaller
    batch when there are fewer images), cosine schedule over the epochs with one
    warm-up epoch at a constant 1e-5;
  * epochs by shots as CoOp's configs: 50 at 1 shot, 100 at 2 and 4, 200 at 8
    and 16;
  * cross-entropy on the CLIP's logit scale times the cosine similarity.
One deviation: training reads the cached image features (the images are encoded
once, as for every method of this project), so CoOp's random-resized-crop and
flip augmentation are not applied.

The forward pass is the project's text tower (`TextTransformer.encode_embedded`):
with the context set to the X tokens' own embeddings it equals the scorer's
encode of the template "X X ... X {}." (tests/test_coop.py, to 1e-5).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lmbbo_jax.config import CoOpConfig
from lmbbo_jax.evaluator import sharding
from lmbbo_jax.models.clip import CLIPModel

# The label of CoOp's learned prompt in tables (it is no written template).
LABEL = "CoOp: {n_ctx} learned context tokens + class name"


class CoOpError(ValueError):
  """CoOp cannot run as configured (one line that says what to do)."""


def epochs_for_shots(shots: int) -> int:
  """CoOp's epochs: rn50_ep50 (1 shot), rn50_ep100 (2, 4 shots), rn50 (8, 16 shots)."""
  return 50 if shots <= 1 else 100 if shots <= 4 else 200


def learning_rate(config: CoOpConfig, epoch: int, epochs: int) -> float:
  """The rate of an epoch: constant warm-up, then the cosine over all epochs (Dassl's)."""
  if epoch < config.warmup_epochs:
    return config.warmup_lr
  return config.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


@dataclasses.dataclass
class CoOpPrompts:
  """Token ids of "X X ... X {class}." per class and where the context goes."""

  ids: np.ndarray  # int32 [C, L]
  eot_index: np.ndarray  # int32 [C]
  n_ctx: int

  @classmethod
  def build(cls, clip: Any, class_names: Sequence[str], n_ctx: int) -> "CoOpPrompts":
    prefix = " ".join(["X"] * n_ctx)
    try:
      (prefix_ids,) = clip.token_ids([prefix])
      rows = clip.token_ids([f"{prefix} {name}." for name in class_names])
    except ValueError as e:  # ContextOverflowError: the context and a class name too long.
      raise CoOpError(f"{str(e).splitlines()[0]}; use a smaller --coop_n_ctx") from None
    if len(prefix_ids) != n_ctx + 2:
      raise CoOpError(f"the tokenizer reads {n_ctx} X's as {len(prefix_ids) - 2} tokens; "
                      "CoOp needs one token per context slot")
    for name, row in zip(class_names, rows):
      if row[:n_ctx + 1] != prefix_ids[:n_ctx + 1]:
        raise CoOpError(f"the context tokens merge with the class name {name!r}")
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), clip.tokenizer.pad_token_id, np.int32)
    for i, r in enumerate(rows):
      ids[i, :len(r)] = r
    return cls(ids=ids, eot_index=np.array([len(r) - 1 for r in rows], np.int32), n_ctx=n_ctx)

  @property
  def template(self) -> str:
    """The written template whose X embeddings the context replaces."""
    return " ".join(["X"] * self.n_ctx) + " {}."


def class_features(model: CLIPModel, variables: Mapping[str, Any], prompts: CoOpPrompts,
                   ctx: jax.Array) -> jax.Array:
  """float32 [C, E] normalised class features with the context `ctx` [n_ctx, width]."""
  table = variables["params"]["text"]["token_embedding"]["embedding"]
  embedded = jnp.asarray(table)[jnp.asarray(prompts.ids)]
  embedded = embedded.at[:, 1:1 + prompts.n_ctx].set(ctx.astype(embedded.dtype)[None])
  feats = model.apply(variables, embedded, jnp.asarray(prompts.eot_index),
                      method=CLIPModel.encode_text_embedded)
  return feats / jnp.maximum(jnp.linalg.norm(feats, axis=-1, keepdims=True), 1e-12)


@dataclasses.dataclass
class CoOpResult:
  """A trained context and what it gave."""

  ctx: np.ndarray  # float32 [n_ctx, width]
  accuracy: dict[str, float]
  loss_curve: list[float]  # mean training loss per epoch
  epochs: int
  steps: int
  label: str


def _split(features: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
  """Valid rows of a split on the host, normalised (padding and unreadable images dropped)."""
  y = np.asarray(labels, np.int32).reshape(-1)
  x = sharding.to_host(features).astype(np.float32)[y >= 0]
  x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  return x, y[y >= 0]


def train(clip: Any, class_names: Sequence[str], features_by_split: Mapping[str, Any],
          labels_by_split: Mapping[str, Any], *, shots: int, seed: int,
          config: CoOpConfig = CoOpConfig(), progress=None) -> CoOpResult:
  """Learns CoOp's context on the "train" split and reports accuracy on every split.

  Args:
    clip: a `lmbbo_jax.models.api.CLIP` (frozen: only the context is learned).
    class_names: the task's class names in label order.
    features_by_split / labels_by_split: image features and labels per split (as
      `evaluator.features.scorer_inputs` gives them; label -1 rows are ignored).
    shots: training images per class (picks the epochs when `config.epochs` is 0).
    seed: seeds the context's initialisation and the batch order.
    progress: called with (epoch, epochs, mean loss) after each epoch.
  """
  if "train" not in features_by_split:
    raise CoOpError("CoOp learns from the train split; the task has none")
  if not clip.config.text_causal:
    raise CoOpError(f"CoOp here learns a context for CLIP's causal text tower; "
                    f"{clip.name} is a {clip.config.family} model (use a CLIP model)")
  prompts = CoOpPrompts.build(clip, class_names, config.n_ctx)
  model, variables = clip.model, clip.variables
  x_train, y_train = _split(features_by_split["train"], labels_by_split["train"])
  if not len(y_train):
    raise CoOpError("the train split has no readable image")
  epochs = config.epochs or epochs_for_shots(shots)
  batch = min(config.batch_size, len(y_train))
  steps_per_epoch = max(1, len(y_train) // batch)  # Dassl drops the last partial batch.
  scale = clip.logit_scale
  width = clip.config.text.width
  rng = np.random.default_rng([seed, 0xC00B])
  ctx = jnp.asarray(rng.normal(0.0, config.init_std, (config.n_ctx, width)), jnp.float32)

  def loss_fn(ctx, images, labels):
    text = class_features(model, variables, prompts, ctx)
    logits = scale * images @ text.T
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  rates = jnp.asarray([learning_rate(config, e, epochs) for e in range(epochs)], jnp.float32)
  schedule = lambda step: rates[jnp.minimum(step // steps_per_epoch, epochs - 1)]
  optimizer = optax.chain(optax.add_decayed_weights(config.weight_decay),
                          optax.sgd(schedule, momentum=config.momentum))
  opt_state = optimizer.init(ctx)

  @jax.jit
  def step(ctx, opt_state, images, labels):
    loss, grads = jax.value_and_grad(loss_fn)(ctx, images, labels)
    updates, opt_state = optimizer.update(grads, opt_state, ctx)
    return optax.apply_updates(ctx, updates), opt_state, loss

  curve = []
  for epoch in range(epochs):
    order = rng.permutation(len(y_train))
    losses = []
    for s in range(steps_per_epoch):
      idx = order[s * batch:(s + 1) * batch]
      ctx, opt_state, loss = step(ctx, opt_state, jnp.asarray(x_train[idx]),
                                  jnp.asarray(y_train[idx]))
      losses.append(loss)
    curve.append(float(np.mean(jax.device_get(losses))))
    if progress is not None:
      progress(epoch + 1, epochs, curve[-1])

  text = np.asarray(jax.jit(lambda c: class_features(model, variables, prompts, c))(ctx))
  accuracy = {}
  for split in features_by_split:
    x, y = _split(features_by_split[split], labels_by_split[split])
    if len(y):
      accuracy[split] = float(np.mean((x @ text.T).argmax(-1) == y))
  return CoOpResult(ctx=np.asarray(ctx), accuracy=accuracy, loss_curve=curve, epochs=epochs,
                    steps=epochs * steps_per_epoch, label=LABEL.format(n_ctx=config.n_ctx))
