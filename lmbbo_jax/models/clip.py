"""CLIP towers in Flax linen: a causal text transformer, a ViT and OpenAI's ModifiedResNet.

Conventions
- Parameters are float32; `dtype` is the compute dtype of matmuls and convs
  (float32 or bfloat16). LayerNorm, softmax and the residual stream stay in
  float32, so bfloat16 changes only the GEMM inputs: every matmul and conv
  accumulates and returns float32 (`_f32_dot`, `_f32_einsum`, `_f32_conv`), which
  is also what CPUs with AMX or AVX512-BF16 run fast (XLA's bf16-output dot is
  about 5x slower there).
- Transformer layers are one `nn.scan` over stacked weights (leading axis =
  layer): one compiled layer body, fast to compile, and the checkpoint key maps
  stack per-layer tensors once.
- The residual blocks take two streams so the text tower can share a template's
  prefix across classes: a *prefix* stream [T, P, D] (the tokens before the
  class name, once per template) and a *main* stream [T, C, S, D] (each class's
  suffix). Main tokens attend to the valid prefix keys of their template and,
  causally, to their own earlier tokens. Because attention is causal and
  positions are absolute, this is exactly the plain encode of the full sentence.
  The plain encode is the same code with an empty prefix (P = 0, C = 1).
- The scorer's *packed* encode (`TextTransformer.encode_packed`) uses the same
  blocks with rows as the main stream: each row continues the prefix of one
  template (`prefix_index`) and holds several class segments end to end; a
  block-diagonal causal mask (`main_mask`) keeps each segment to itself.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmbbo_jax.models.configs import CLIPConfig, TextConfig, VisionConfig

Dtype = Any
_NEG_INF = -1e30  # Finite, so a fully masked row cannot produce NaNs.
# Matmuls in the compute dtype, accumulated and returned in float32.
_f32_dot = functools.partial(jax.lax.dot_general, preferred_element_type=jnp.float32)
_f32_einsum = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
_f32_conv = functools.partial(jax.lax.conv_general_dilated, preferred_element_type=jnp.float32)


def _heads_first(x, heads: int, dtype):
  """[..., S, D] -> [..., H, S, D // H] in the compute dtype."""
  x = x.astype(dtype).reshape(x.shape[:-1] + (heads, x.shape[-1] // heads))
  return jnp.swapaxes(x, -2, -3)


def _attend(q, k, v, valid, dtype):
  """Multi-head attention on heads-first q [..., H, Sq, d], k and v [..., H, Sk, d].

  `valid` (bool, broadcast to the scores [..., H, Sq, Sk]; None: every key) masks keys.
  Returns float32 [..., Sq, H * d]. The softmax is normalised after the value matmul
  (one fewer pass over the scores).
  """
  s = _f32_einsum("...qd,...kd->...qk", q, k)
  if valid is not None:
    s = jnp.where(valid, s, _NEG_INF)
  e = jnp.exp(s - s.max(-1, keepdims=True, initial=_NEG_INF))  # initial: Sk may be 0
  o = _f32_einsum("...qk,...kd->...qd", e.astype(dtype), v) / e.sum(-1, keepdims=True)
  o = jnp.swapaxes(o, -2, -3)
  return o.reshape(o.shape[:-2] + (o.shape[-2] * o.shape[-1],))


def activation(name: str):
  if name == "quick_gelu":
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  if name == "gelu":
    return functools.partial(jax.nn.gelu, approximate=False)
  if name == "gelu_tanh":  # transformers' "gelu_pytorch_tanh" (SigLIP)
    return functools.partial(jax.nn.gelu, approximate=True)
  raise ValueError(f"unknown activation {name!r} (use 'quick_gelu', 'gelu' or 'gelu_tanh')")


def layer_norm(name: str, eps: float = 1e-5) -> nn.LayerNorm:
  # Default: PyTorch's epsilon; computed in float32 whatever the compute dtype.
  return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, name=name)


class ResidualAttentionBlock(nn.Module):
  """Pre-LN transformer block over a prefix stream and a main stream (see module doc)."""
  width: int
  heads: int
  mlp_ratio: float = 4.0
  act: str = "quick_gelu"
  causal: bool = True
  ln_eps: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, carry, context):
    """One layer.

    Args:
      carry: (xp [Tp, P, D], xs [T, C, S, D]) float32 residual streams.
      context: (prefix_valid, prefix_index, main_mask[, keep]). prefix_valid:
        bool [T, P], which prefix keys main group t may see. prefix_index: int32
        [T], the prefix slot each main group continues (None: slot t, Tp == T).
        main_mask: bool [T, C, S, S], which main keys each main token may see
        (None: causal, or everything when the block is not causal). keep: int32
        [M], flat indices into the main tokens [T * C * S] whose outputs are
        wanted (a last layer): attention runs for every main token, the output
        projection and MLP only for these, and the prefix stream not at all.

    Returns:
      ((xp, xs), None), the scan convention; with `keep`, xs is float32 [M, D]
      and xp is returned unchanged.
    """
    prefix_valid, prefix_index, main_mask, *keep = context
    keep = keep[0] if keep else None
    xp, xs = carry
    heads, width = self.heads, self.width
    head_dim = width // heads
    dense = functools.partial(nn.Dense, dtype=self.dtype, dot_general=_f32_dot)

    ln_1 = layer_norm("ln_1", self.ln_eps)
    hp, hs = ln_1(xp), ln_1(xs)
    attn_q = dense(width, name="attn_q")
    attn_k = dense(width, name="attn_k")
    attn_v = dense(width, name="attn_v")
    attn_out = dense(width, name="attn_out")

    heads_first = functools.partial(_heads_first, heads=heads, dtype=self.dtype)
    attend = functools.partial(_attend, dtype=self.dtype)

    scale = 1.0 / math.sqrt(head_dim)
    kp, vp = heads_first(attn_k(hp)), heads_first(attn_v(hp))
    ks, vs = heads_first(attn_k(hs)), heads_first(attn_v(hs))
    num_t, num_c, num_p, num_s = xs.shape[0], xs.shape[1], xp.shape[1], xs.shape[2]

    if keep is None:
      # Prefix stream: causal self-attention (rows past a template's prefix length
      # are junk but never seen by the main stream). A last layer skips it.
      qp = heads_first(attn_q(hp) * scale)
      op = attend(qp, kp, vp, jnp.tril(jnp.ones((num_p, num_p), bool)))

    # Main stream: keys = [valid prefix keys of its template | its own tokens].
    if prefix_index is not None:
      kp, vp = kp[prefix_index], vp[prefix_index]
    prefix_shape = (num_t, num_c) + kp.shape[1:]
    k_all = jnp.concatenate([jnp.broadcast_to(kp[:, None], prefix_shape), ks], axis=-2)
    v_all = jnp.concatenate([jnp.broadcast_to(vp[:, None], prefix_shape), vs], axis=-2)
    if main_mask is None:
      main_mask = jnp.tril(jnp.ones((num_s, num_s), bool)) if self.causal else \
          jnp.ones((num_s, num_s), bool)
      main_mask = jnp.broadcast_to(main_mask, (num_t, num_c, num_s, num_s))
    valid = jnp.concatenate(
        [jnp.broadcast_to(prefix_valid[:, None, None, :], (num_t, num_c, num_s, num_p)),
         main_mask], axis=-1)

    ln_2 = layer_norm("ln_2", self.ln_eps)
    mlp_fc = dense(int(width * self.mlp_ratio), name="mlp_fc")
    mlp_proj = dense(width, name="mlp_proj")
    act = activation(self.act)

    def mlp(x):
      return mlp_proj(act(mlp_fc(ln_2(x)))).astype(jnp.float32)

    qs = heads_first(attn_q(hs) * scale)
    os = attend(qs, k_all, v_all, valid[:, :, None])
    if keep is not None:
      # Attention is a few percent of a layer: it runs for every token (no per-token
      # key copies); the output projection and the MLP only for the kept ones.
      x_keep = xs.reshape(-1, width)[keep]
      x_keep = x_keep + attn_out(os.reshape(-1, width)[keep]).astype(jnp.float32)
      return (xp, x_keep + mlp(x_keep)), None

    xp = xp + attn_out(op).astype(jnp.float32)
    xs = xs + attn_out(os).astype(jnp.float32)
    return (xp + mlp(xp), xs + mlp(xs)), None


def _transformer(width, layers, heads, mlp_ratio, act, causal, dtype, name, ln_eps=1e-5):
  """`layers` residual blocks as one scan over stacked parameters."""
  scanned = nn.scan(
      ResidualAttentionBlock,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      in_axes=nn.broadcast,
      length=layers,
  )
  return scanned(width=width, heads=heads, mlp_ratio=mlp_ratio, act=act,
                 causal=causal, ln_eps=ln_eps, dtype=dtype, name=name)


class TextTransformer(nn.Module):
  """CLIP's text tower: embeddings, causal transformer, final LN, EOT pooling, projection."""
  cfg: TextConfig
  embed_dim: int
  dtype: Dtype = jnp.float32

  def setup(self):
    cfg = self.cfg
    self.token_embedding = nn.Embed(
        cfg.vocab_size, cfg.width, embedding_init=nn.initializers.normal(0.02),
        dtype=jnp.float32)
    self.positional_embedding = self.param(
        "positional_embedding", nn.initializers.normal(0.01),
        (cfg.context_length, cfg.width))
    self.blocks = _transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio,
                               cfg.act, True, self.dtype, "blocks")
    self.ln_final = layer_norm("ln_final")
    self.text_projection = self.param(
        "text_projection", nn.initializers.normal(cfg.width ** -0.5),
        (cfg.width, self.embed_dim))

  def __call__(self, ids: jax.Array, eot_index: jax.Array) -> jax.Array:
    """Plain encode: ids int32 [N, L] (L <= context), eot_index int32 [N] -> [N, E]."""
    return self.encode_embedded(self.token_embedding(ids), eot_index)

  def encode_embedded(self, embedded: jax.Array, eot_index: jax.Array) -> jax.Array:
    """The plain encode from token embeddings [N, L, width] (learned prompts: CoOp)."""
    n, length = embedded.shape[:2]
    xp = jnp.zeros((n, 0, embedded.shape[-1]), jnp.float32)
    xs = (embedded + self.positional_embedding[:length][None])[:, None]
    (_, xs), _ = self.blocks((xp, xs), (jnp.zeros((n, 0), bool), None, None))
    pooled = jnp.take_along_axis(xs[:, 0], eot_index[:, None, None], axis=1)[:, 0]
    return self._project(pooled)

  def encode_prefixed(self, prefix_ids, prefix_len, suffix_ids, eot_index):
    """Encodes T templates x C classes, sharing each template's prefix.

    Args:
      prefix_ids: int32 [T, P], the tokens before the class name (from the start
        token on), padded past `prefix_len`.
      prefix_len: int32 [T], valid prefix tokens per template.
      suffix_ids: int32 [T, C, S], each class's remaining tokens; suffix token j
        sits at position prefix_len + j. Padding after the EOT is ignored.
      eot_index: int32 [T, C], index of the end-of-text token inside the suffix.

    Returns:
      float32 [T, C, embed_dim] projected, un-normalised text features.
    """
    ctx = self.cfg.context_length
    num_p, num_s = prefix_ids.shape[1], suffix_ids.shape[2]
    pos = self.positional_embedding
    xp = self.token_embedding(prefix_ids) + pos[:num_p][None]
    # Positions past the context only occur in padding after the EOT.
    spos = jnp.minimum(prefix_len[:, None] + jnp.arange(num_s)[None], ctx - 1)
    xs = self.token_embedding(suffix_ids) + pos[spos][:, None]
    prefix_valid = jnp.arange(num_p)[None, :] < prefix_len[:, None]
    (_, xs), _ = self.blocks((xp, xs), (prefix_valid, None, None))
    pooled = jnp.take_along_axis(xs, eot_index[:, :, None, None], axis=2)[:, :, 0]
    return self._project(pooled)

  def encode_packed(self, prefix_ids, prefix_len, row_ids, row_prefix, row_segment,
                    row_pos, eot_flat):
    """Encodes class segments packed into rows, each row continuing one prefix.

    Args:
      prefix_ids: int32 [Tp, P], prefix tokens (from the start token on) per slot.
      prefix_len: int32 [Tp], valid prefix tokens per slot.
      row_ids: int32 [R, L], segments end to end (a segment: a class's tokens after
        its template's prefix, EOT included), padding after the last one.
      row_prefix: int32 [R], the prefix slot each row continues.
      row_segment: int32 [R, L], segment id of each token within its row (equal ids
        attend to each other causally; padding has its own id).
      row_pos: int32 [R, L], absolute position of each token (prefix_len + offset).
      eot_flat: int32 [M], flat index r * L + j of each segment's EOT token.

    Returns:
      float32 [M, embed_dim] projected, un-normalised features, equal to the plain
      encode of each segment's full sentence.
    """
    num_p, width = prefix_ids.shape[1], row_ids.shape[1]
    pos = self.positional_embedding
    xp = self.token_embedding(prefix_ids) + pos[:num_p][None]
    xs = (self.token_embedding(row_ids) + pos[row_pos])[:, None]
    prefix_valid = (jnp.arange(num_p)[None, :] < prefix_len[:, None])[row_prefix]
    causal = jnp.tril(jnp.ones((width, width), bool))
    mask = (row_segment[:, :, None] == row_segment[:, None, :]) & causal
    pooled = blocks_keeping(self.variables["params"]["blocks"], self.cfg, True, self.dtype,
                            (xp, xs), (prefix_valid, row_prefix, mask[:, None]), eot_flat)
    return self._project(pooled)

  def _project(self, pooled):
    pooled = self.ln_final(pooled)
    return jnp.einsum("...d,de->...e", pooled.astype(self.dtype),
                      self.text_projection.astype(self.dtype),
                      preferred_element_type=jnp.float32)


def blocks_keeping(params, cfg: TextConfig, causal: bool, dtype, carry, context, keep):
  """The stacked blocks' main-stream outputs at flat indices `keep` only, float32 [M, D].

  Exact, and cheaper than running the blocks' scan: all layers but the last run
  as a loop over the same stacked parameters `params` (one compiled body, no
  copy of them); the last one runs its output projection and MLP for the kept
  tokens only (what the pooling reads), which saves most of a layer for every
  other token.
  """
  block = ResidualAttentionBlock(width=cfg.width, heads=cfg.heads, mlp_ratio=cfg.mlp_ratio,
                                 act=cfg.act, causal=causal, ln_eps=cfg.ln_eps, dtype=dtype,
                                 parent=None)

  def layer(i):
    return {"params": jax.tree.map(
        lambda p: jax.lax.dynamic_index_in_dim(p, i, keepdims=False), params)}

  def body(i, carry):
    return block.apply(layer(i), carry, context)[0]

  carry = jax.lax.fori_loop(0, cfg.layers - 1, body, carry)
  (_, kept), _ = block.apply(layer(cfg.layers - 1), carry, (*context, keep))
  return kept


class _VisionTower(nn.Module):
  """What both image towers are built from: their config, output width and compute dtype."""
  cfg: VisionConfig
  embed_dim: int
  dtype: Dtype = jnp.float32


class VisionTransformer(_VisionTower):
  """CLIP's ViT: patch conv, class token, pre-LN transformer, LN on the class token, projection."""

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    cfg = self.cfg
    p = cfg.patch_size
    x = nn.Conv(cfg.width, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                dtype=self.dtype, conv_general_dilated=_f32_conv,
                name="conv1")(pixels.astype(self.dtype))
    n, h, w, d = x.shape
    x = x.reshape(n, h * w, d).astype(jnp.float32)
    scale = cfg.width ** -0.5
    cls = self.param("class_embedding", nn.initializers.normal(scale), (cfg.width,))
    pos = self.param("positional_embedding", nn.initializers.normal(scale),
                     (h * w + 1, cfg.width))
    x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, d)), x], axis=1) + pos[None]
    x = layer_norm("ln_pre")(x)
    blocks = _transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, cfg.act,
                          False, self.dtype, "blocks")
    empty = jnp.zeros((n, 0, d), jnp.float32)
    (_, xs), _ = blocks((empty, x[:, None]), (jnp.zeros((n, 0), bool), None, None))
    x = layer_norm("ln_post")(xs[:, 0, 0])
    proj = self.param("proj", nn.initializers.normal(scale), (cfg.width, self.embed_dim))
    return jnp.dot(x.astype(self.dtype), proj.astype(self.dtype),
                   preferred_element_type=jnp.float32)


def _batch_norm(name: str) -> nn.BatchNorm:
  # Inference mode: running statistics from the checkpoint (collection "batch_stats").
  return nn.BatchNorm(use_running_average=True, momentum=0.9, epsilon=1e-5,
                      dtype=jnp.float32, name=name)


def _avg_pool(x, k):
  return nn.avg_pool(x, (k, k), strides=(k, k), padding="VALID")


class Bottleneck(nn.Module):
  """OpenAI's anti-aliased bottleneck: strides become average pooling after conv2."""
  planes: int
  stride: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                             conv_general_dilated=_f32_conv)
    out = conv(self.planes, (1, 1), name="conv1")(x)
    out = nn.relu(_batch_norm("bn1")(out))
    out = conv(self.planes, (3, 3), padding=((1, 1), (1, 1)), name="conv2")(out)
    out = nn.relu(_batch_norm("bn2")(out))
    if self.stride > 1:
      out = _avg_pool(out, self.stride)
    out = _batch_norm("bn3")(conv(self.planes * 4, (1, 1), name="conv3")(out))
    identity = x
    if self.stride > 1 or x.shape[-1] != self.planes * 4:
      if self.stride > 1:
        identity = _avg_pool(identity, self.stride)
      identity = conv(self.planes * 4, (1, 1), name="downsample_conv")(identity)
      identity = _batch_norm("downsample_bn")(identity)
    return nn.relu(out + identity)


class AttentionPool2d(nn.Module):
  """Multi-head attention of the mean token over the spatial grid (OpenAI's attnpool)."""
  spatial: int
  heads: int
  output_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    n, h, w, c = x.shape
    x = x.reshape(n, h * w, c).astype(jnp.float32)
    x = jnp.concatenate([x.mean(axis=1, keepdims=True), x], axis=1)
    pos = self.param("positional_embedding", nn.initializers.normal(c ** -0.5),
                     (self.spatial ** 2 + 1, c))
    x = x + pos[None]
    dense = functools.partial(nn.Dense, dtype=self.dtype, dot_general=_f32_dot)
    head_dim = c // self.heads
    heads_first = functools.partial(_heads_first, heads=self.heads, dtype=self.dtype)
    q = heads_first(dense(c, name="q_proj")(x[:, :1]) * (head_dim ** -0.5))
    k = heads_first(dense(c, name="k_proj")(x))
    v = heads_first(dense(c, name="v_proj")(x))
    o = _attend(q, k, v, None, self.dtype)[:, 0]
    return dense(self.output_dim, name="c_proj")(o).astype(jnp.float32)


class ModifiedResNet(_VisionTower):
  """OpenAI's CLIP ResNet: 3-conv stem, anti-aliased bottlenecks, attention pooling."""

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    cfg = self.cfg
    width = cfg.width
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                             conv_general_dilated=_f32_conv, padding=((1, 1), (1, 1)))
    x = pixels.astype(self.dtype)
    x = nn.relu(_batch_norm("bn1")(conv(width // 2, (3, 3), strides=(2, 2),
                                        name="conv1")(x)))
    x = nn.relu(_batch_norm("bn2")(conv(width // 2, (3, 3), name="conv2")(x)))
    x = nn.relu(_batch_norm("bn3")(conv(width, (3, 3), name="conv3")(x)))
    x = _avg_pool(x, 2)
    for stage, blocks in enumerate(cfg.layers):
      planes = width * (2 ** stage)
      for b in range(blocks):
        stride = 2 if (stage > 0 and b == 0) else 1
        x = Bottleneck(planes, stride, self.dtype,
                       name=f"layer{stage + 1}_{b}")(x)
    return AttentionPool2d(cfg.image_size // 32, cfg.heads, self.embed_dim,
                           self.dtype, name="attnpool")(x)


class CLIPModel(nn.Module):
  """Both towers plus the learned logit scale.

  Variables: {"params": {"visual", "text", "logit_scale"}} and, for ResNets,
  {"batch_stats": {"visual": ...}}.
  """
  config: CLIPConfig
  dtype: Dtype = jnp.float32

  def setup(self):
    cfg = self.config
    tower = VisionTransformer if cfg.vision.kind == "vit" else ModifiedResNet
    self.visual = tower(cfg.vision, cfg.embed_dim, self.dtype)
    self.text = TextTransformer(cfg.text, cfg.embed_dim, self.dtype)
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(math.log(1 / 0.07)), ())

  def __call__(self, pixels, ids, eot_index):
    return self.encode_image(pixels), self.encode_text(ids, eot_index), self.logit_scale

  def encode_image(self, pixels):
    return self.visual(pixels)

  def encode_text(self, ids, eot_index):
    return self.text(ids, eot_index)

  def encode_text_embedded(self, embedded, eot_index):
    return self.text.encode_embedded(embedded, eot_index)

  def encode_text_prefixed(self, prefix_ids, prefix_len, suffix_ids, eot_index):
    return self.text.encode_prefixed(prefix_ids, prefix_len, suffix_ids, eot_index)

  def encode_text_packed(self, *args):
    return self.text.encode_packed(*args)

  def get_logit_scale(self):
    return self.logit_scale


def build_model(config: CLIPConfig, dtype: Dtype = jnp.float32) -> nn.Module:
  """The linen model of `config`'s family: `CLIPModel` or `siglip.SiglipModel`."""
  if config.family == "siglip":
    from lmbbo_jax.models.siglip import SiglipModel  # siglip.py builds on this module
    return SiglipModel(config, dtype)
  return CLIPModel(config, dtype)


def init_variables(config: CLIPConfig, rng: jax.Array, dtype: Dtype = jnp.float32):
  """Random variables of `config` (float32 params) for tests and training."""
  model = build_model(config, dtype)
  size = config.vision.image_size
  pixels = jnp.zeros((1, size, size, 3), jnp.float32)
  ids = jnp.zeros((1, config.text.context_length), jnp.int32)
  if config.family == "siglip":  # pooled at the last token: no end-of-text index
    return jax.jit(model.init)(rng, pixels, ids)
  return jax.jit(model.init)(rng, pixels, ids, jnp.zeros((1,), jnp.int32))


def abstract_variables(config: CLIPConfig):
  """Shapes and dtypes of the variables, without allocating (for strict loading)."""
  return jax.eval_shape(lambda r: init_variables(config, r), jax.random.key(0))
