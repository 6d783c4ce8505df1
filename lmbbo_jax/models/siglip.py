"""SigLIP towers in Flax linen (SigLIP, and SigLIP 2 FixRes: the same model, another tokenizer).

The same conventions as `clip.py` (float32 parameters, matmuls in the compute
dtype accumulated in float32, layers as one `nn.scan`), and the same residual
block, run without a causal mask:
- text: token + learned position embeddings over a row padded with the pad
  token to the trained text length (64) and NO attention mask, so the pads are
  real inputs; a bidirectional transformer, the final LayerNorm, the *last*
  token's output, a linear head (with bias). Prefix sharing and packing are not
  exact for such a tower, so the scorer encodes one full row per sentence
  (`encode_text_rows`).
- image: a patch conv (with bias), learned position embeddings (no class
  token), the transformer, a LayerNorm, and the attention-pooling (MAP) head: a
  learned probe attends over the tokens (torch's `nn.MultiheadAttention`), then
  LayerNorm + MLP with a residual.
- logits: exp(logit_scale) * cosine + logit_bias, read through a sigmoid in
  training (`CLIP.logits`).

Variables: {"params": {"visual", "text", "logit_scale", "logit_bias"}}; parity
with transformers' `SiglipModel` is tested in tests/test_models_siglip.py.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmbbo_jax.models.clip import (Dtype, _attend, _f32_conv, _f32_dot, _heads_first,
                                   _transformer, activation, blocks_keeping, layer_norm)
from lmbbo_jax.models.configs import CLIPConfig, TextConfig, VisionConfig


def _dense(dtype, features: int, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, dot_general=_f32_dot, name=name)


class SiglipTextTransformer(nn.Module):
  """SigLIP's text tower (see module doc); rows are always the full text length."""
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
    self.blocks = _transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, cfg.act,
                               False, self.dtype, "blocks", cfg.ln_eps)
    self.ln_final = layer_norm("ln_final", cfg.ln_eps)
    self.head = _dense(self.dtype, self.embed_dim, "head")

  def _embed(self, ids):
    return self.token_embedding(ids) + self.positional_embedding[None]

  def __call__(self, ids: jax.Array) -> jax.Array:
    """ids int32 [N, context] (padded with the pad token) -> float32 [N, E]."""
    n = ids.shape[0]
    xp = jnp.zeros((n, 0, self.cfg.width), jnp.float32)
    (_, xs), _ = self.blocks((xp, self._embed(ids)[:, None]),
                             (jnp.zeros((n, 0), bool), None, None))
    return self._project(xs[:, 0, -1])

  def encode_rows(self, row_ids: jax.Array, keep: jax.Array) -> jax.Array:
    """The features of the rows `keep` names, float32 [M, E].

    row_ids: int32 [R, context], one padded sentence per row. keep: int32 [M],
    flat indices r * context + context - 1 (each row's last token; a padding slot
    may repeat one). Equal to `__call__` on those rows; the last layer's output
    projection and MLP run for the kept tokens only.
    """
    n = row_ids.shape[0]
    carry = (jnp.zeros((n, 0, self.cfg.width), jnp.float32), self._embed(row_ids)[:, None])
    pooled = blocks_keeping(self.variables["params"]["blocks"], self.cfg, False, self.dtype,
                            carry, (jnp.zeros((n, 0), bool), None, None), keep)
    return self._project(pooled)

  def _project(self, pooled):
    return self.head(self.ln_final(pooled)).astype(jnp.float32)


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned probe attends over the tokens, then LN + MLP."""
  cfg: VisionConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    n, _, width = x.shape
    dense = functools.partial(_dense, self.dtype)
    heads_first = functools.partial(_heads_first, heads=cfg.heads, dtype=self.dtype)
    probe = self.param("probe", nn.initializers.normal(0.02), (width,))
    q = dense(width, "attn_q")(jnp.broadcast_to(probe, (n, 1, width)))
    q = heads_first(q * (1.0 / math.sqrt(width // cfg.heads)))
    k, v = heads_first(dense(width, "attn_k")(x)), heads_first(dense(width, "attn_v")(x))
    h = dense(width, "attn_out")(_attend(q, k, v, None, self.dtype)[:, 0]).astype(jnp.float32)
    mlp = dense(width, "mlp_proj")(activation(cfg.act)(
        dense(int(width * cfg.mlp_ratio), "mlp_fc")(layer_norm("ln", cfg.ln_eps)(h))))
    return h + mlp.astype(jnp.float32)


class SiglipVisionTransformer(nn.Module):
  """SigLIP's ViT: patch conv with bias, position embeddings, transformer, LN, MAP head."""
  cfg: VisionConfig
  embed_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    cfg = self.cfg
    if cfg.width != self.embed_dim:
      raise ValueError(f"a SigLIP image tower outputs its width ({cfg.width}); the config's "
                       f"embed_dim is {self.embed_dim}")
    p = cfg.patch_size
    x = nn.Conv(cfg.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                conv_general_dilated=_f32_conv, name="conv1")(pixels.astype(self.dtype))
    n, h, w, d = x.shape
    pos = self.param("positional_embedding", nn.initializers.normal(d ** -0.5), (h * w, d))
    x = x.reshape(n, h * w, d).astype(jnp.float32) + pos[None]
    blocks = _transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, cfg.act, False,
                          self.dtype, "blocks", cfg.ln_eps)
    (_, xs), _ = blocks((jnp.zeros((n, 0, d), jnp.float32), x[:, None]),
                        (jnp.zeros((n, 0), bool), None, None))
    x = layer_norm("ln_post", cfg.ln_eps)(xs[:, 0])
    return MAPHead(cfg, self.dtype, name="head")(x)


class SiglipModel(nn.Module):
  """Both SigLIP towers, the learned logit scale (log) and bias."""
  config: CLIPConfig
  dtype: Dtype = jnp.float32

  def setup(self):
    cfg = self.config
    if cfg.vision.kind != "vit":
      raise ValueError("SigLIP image towers are ViTs")
    self.visual = SiglipVisionTransformer(cfg.vision, cfg.embed_dim, self.dtype)
    self.text = SiglipTextTransformer(cfg.text, cfg.embed_dim, self.dtype)
    # SigLIP's initial values: t' = log 10, b = -10.
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(math.log(10.0)), ())
    self.logit_bias = self.param("logit_bias", nn.initializers.constant(-10.0), ())

  def __call__(self, pixels, ids):
    return self.encode_image(pixels), self.encode_text(ids), self.logit_scale, self.logit_bias

  def encode_image(self, pixels):
    return self.visual(pixels)

  def encode_text(self, ids):
    return self.text(ids)

  def encode_text_rows(self, row_ids, keep):
    return self.text.encode_rows(row_ids, keep)
