"""The Flax CLIP towers: shapes, prefix-sharing exactness, bfloat16 closeness."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from lmbbo_jax.models.clip import CLIPModel
from lmbbo_jax.models.loading import random_variables
from lmbbo_jax.models.configs import ARCHITECTURES, CLIPConfig, get_architecture


@pytest.fixture(scope="module", params=["tiny-vit", "tiny-rn"])
def tiny(request):
  cfg = ARCHITECTURES[request.param]
  return cfg, random_variables(cfg, 0)


def _run(model, variables, *args, method):
  """`model.apply` as one compiled program: op by op, each of the many small ops of a
  tower compiles on its own (4 s instead of 0.5 s for tiny-rn's image tower here)."""
  return jax.jit(lambda v, *a: model.apply(v, *a, method=method))(variables, *args)


def _plain_ids(prefix, suffix, length=77):
  ids = np.concatenate([prefix, suffix])
  return np.pad(ids, (0, length - len(ids)))


def test_image_and_text_shapes(tiny):
  cfg, variables = tiny
  model = CLIPModel(cfg)
  size = cfg.vision.image_size
  pixels = jax.random.normal(jax.random.key(1), (3, size, size, 3))
  img = _run(model, variables, pixels, method=CLIPModel.encode_image)
  assert img.shape == (3, cfg.embed_dim) and img.dtype == jnp.float32
  ids = jnp.array(np.stack([_plain_ids([49406, 5, 6], [7, 49407])] * 2), jnp.int32)
  txt = _run(model, variables, ids, jnp.array([4, 4]), method=CLIPModel.encode_text)
  assert txt.shape == (2, cfg.embed_dim)
  assert bool(jnp.all(jnp.isfinite(txt)))


def test_prefix_shared_encode_equals_plain_encode(tiny):
  cfg, variables = tiny
  model = CLIPModel(cfg)
  rng = np.random.default_rng(0)
  num_t, num_c, num_p, num_s = 3, 4, 6, 5
  prefix = rng.integers(1, 1000, (num_t, num_p))
  suffix = rng.integers(1, 1000, (num_t, num_c, num_s))
  prefix_len = np.array([6, 3, 1])  # padded prefixes of different lengths
  eot = np.array([[4, 2, 1, 0]] * num_t)
  shared = _run(model, variables, jnp.array(prefix), jnp.array(prefix_len),
                       jnp.array(suffix), jnp.array(eot),
                       method=CLIPModel.encode_text_prefixed)
  for t in range(num_t):
    ids = np.stack([_plain_ids(prefix[t, :prefix_len[t]], suffix[t, c]) for c in range(num_c)])
    plain = _run(model, variables, jnp.array(ids), jnp.array(prefix_len[t] + eot[t]),
                        method=CLIPModel.encode_text)
    np.testing.assert_allclose(np.asarray(shared[t]), np.asarray(plain), atol=1e-5, rtol=0)


def test_trailing_padding_does_not_change_text_features(tiny):
  cfg, variables = tiny
  model = CLIPModel(cfg)
  ids = _plain_ids([49406, 11, 12, 13], [49407])
  long = _run(model, variables, jnp.array([ids]), jnp.array([4]), method=CLIPModel.encode_text)
  short = _run(model, variables, jnp.array([ids[:8]]), jnp.array([4]), method=CLIPModel.encode_text)
  np.testing.assert_allclose(np.asarray(long), np.asarray(short), atol=1e-5)


def test_bfloat16_compute_is_close_to_float32(tiny):
  cfg, variables = tiny
  size = cfg.vision.image_size
  pixels = jax.random.normal(jax.random.key(2), (2, size, size, 3))
  f32 = _run(CLIPModel(cfg), variables, pixels, method=CLIPModel.encode_image)
  bf16 = _run(CLIPModel(cfg, jnp.bfloat16), variables, pixels, method=CLIPModel.encode_image)
  rel = float(jnp.abs(f32 - bf16).max() / jnp.abs(f32).max())
  assert 0 < rel < 2e-2  # bf16 really ran (not identical), and stayed close.


def _matmuls(jaxpr):
  """Every dot_general and conv of a jaxpr, nested ones (the layer scan) included."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
      yield eqn
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _matmuls(sub)


def _assert_bf16_in_f32_out(fn, variables, at_least):
  dots = list(_matmuls(jax.make_jaxpr(fn)(variables).jaxpr))
  assert len(dots) >= at_least
  for eqn in dots:
    assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16] * 2, eqn
    assert eqn.outvars[0].aval.dtype == jnp.float32, eqn


def test_bfloat16_matmuls_and_convs_take_bfloat16_and_return_float32(tiny):
  # bf16 inputs with float32 accumulation and output: what AMX / AVX512-BF16 CPUs and
  # GPUs run fast (XLA's CPU dot with a bf16 output is about 5x slower).
  cfg, variables = tiny
  model = CLIPModel(cfg, jnp.bfloat16)
  ids = jnp.array([_plain_ids([49406, 5, 6], [7, 49407])], jnp.int32)
  encode_text = lambda v: model.apply(v, ids, jnp.array([4]), method=CLIPModel.encode_text)
  # q, k, v, out, two MLP, attention scores and values, the projection
  _assert_bf16_in_f32_out(encode_text, variables, at_least=9)
  size = cfg.vision.image_size
  pixels = jnp.zeros((1, size, size, 3))
  _assert_bf16_in_f32_out(
      lambda v: model.apply(v, pixels, method=CLIPModel.encode_image), variables, at_least=4)
  f32 = _run(CLIPModel(cfg), variables, ids, jnp.array([4]), method=CLIPModel.encode_text)
  bf16 = encode_text(variables)
  rel = float(jnp.abs(f32 - bf16).max() / jnp.abs(f32).max())
  assert 0 < rel < 2e-2


def test_packed_encode_equals_plain_encode_and_prunes_the_last_layer(tiny):
  cfg, variables = tiny
  model = CLIPModel(cfg)
  width, ctx = cfg.text.width, cfg.text.context_length
  prefixes = [[49406, 11, 12], [49406, 13]]  # two prefix slots of different lengths
  # Row 0 continues slot 0 with two segments, row 1 continues slot 1 with one; each
  # segment ends with its EOT, the rest of a row is padding (its own segment id).
  rows = [(0, [[21, 22, 49407], [23, 49407]]), (1, [[24, 25, 26, 49407]])]
  prefix_ids = np.zeros((2, 4), np.int32)
  for i, p in enumerate(prefixes):
    prefix_ids[i, :len(p)] = p
  row_ids = np.zeros((2, ctx), np.int32)
  row_segment = np.full((2, ctx), -1, np.int32)
  row_pos = np.zeros((2, ctx), np.int32)
  eot_flat, sentences = [], []
  for r, (slot, segments) in enumerate(rows):
    at = 0
    for k, seg in enumerate(segments):
      row_ids[r, at:at + len(seg)] = seg
      row_segment[r, at:at + len(seg)] = k
      row_pos[r, at:at + len(seg)] = len(prefixes[slot]) + np.arange(len(seg))
      eot_flat.append(r * ctx + at + len(seg) - 1)
      sentences.append(prefixes[slot] + seg)
      at += len(seg)
  args = [jnp.array(a) for a in (prefix_ids, [3, 2], row_ids, [0, 1], row_segment, row_pos,
                                 eot_flat)]
  packed = _run(model, variables, *args, method=CLIPModel.encode_text_packed)
  ids = np.stack([np.pad(s, (0, ctx - len(s))) for s in sentences]).astype(np.int32)
  plain = _run(model, variables, jnp.array(ids), jnp.array([len(s) - 1 for s in sentences]),
                      method=CLIPModel.encode_text)
  np.testing.assert_allclose(np.asarray(packed), np.asarray(plain), atol=1e-5, rtol=0)
  # The last layer's MLP runs on the 3 pooled tokens, not on all 2 x 77 row tokens.
  jaxpr = jax.make_jaxpr(lambda v: model.apply(v, *args, method=CLIPModel.encode_text_packed))
  mlp_in = [e.invars[0].aval.shape for e in _matmuls(jaxpr(variables).jaxpr)
            if e.invars[1].aval.shape == (width, 4 * width)]
  assert (3, width) in mlp_in and any(np.prod(s) == 2 * ctx * width for s in mlp_in)


def test_flop_model_counts_a_pruned_last_layer():
  text = ARCHITECTURES["ViT-B/32"].text
  full = text.flops(1000, 0)
  assert text.flops(1000, 0, pooled=1000) == full
  # Per unpooled token the last layer keeps q, k, v (3 w^2) and drops out (w^2) + MLP (8 w^2).
  assert full - text.flops(1000, 0, pooled=100) == 2 * 900 * 9 * text.width ** 2


def test_config_round_trip_and_named_architectures():
  for name, cfg in ARCHITECTURES.items():
    assert CLIPConfig.from_dict(cfg.to_dict()) == cfg
    assert get_architecture(name.lower()) == cfg
  with pytest.raises(ValueError, match="unknown CLIP architecture"):
    get_architecture("ViT-Z/99")
