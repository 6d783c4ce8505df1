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


def _plain_ids(prefix, suffix, length=77):
  ids = np.concatenate([prefix, suffix])
  return np.pad(ids, (0, length - len(ids)))


def test_image_and_text_shapes(tiny):
  cfg, variables = tiny
  model = CLIPModel(cfg)
  size = cfg.vision.image_size
  pixels = jax.random.normal(jax.random.key(1), (3, size, size, 3))
  img = model.apply(variables, pixels, method=CLIPModel.encode_image)
  assert img.shape == (3, cfg.embed_dim) and img.dtype == jnp.float32
  ids = jnp.array(np.stack([_plain_ids([49406, 5, 6], [7, 49407])] * 2), jnp.int32)
  txt = model.apply(variables, ids, jnp.array([4, 4]), method=CLIPModel.encode_text)
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
  shared = model.apply(variables, jnp.array(prefix), jnp.array(prefix_len),
                       jnp.array(suffix), jnp.array(eot),
                       method=CLIPModel.encode_text_prefixed)
  for t in range(num_t):
    ids = np.stack([_plain_ids(prefix[t, :prefix_len[t]], suffix[t, c]) for c in range(num_c)])
    plain = model.apply(variables, jnp.array(ids), jnp.array(prefix_len[t] + eot[t]),
                        method=CLIPModel.encode_text)
    np.testing.assert_allclose(np.asarray(shared[t]), np.asarray(plain), atol=1e-5, rtol=0)


def test_trailing_padding_does_not_change_text_features(tiny):
  cfg, variables = tiny
  model = CLIPModel(cfg)
  ids = _plain_ids([49406, 11, 12, 13], [49407])
  long = model.apply(variables, jnp.array([ids]), jnp.array([4]), method=CLIPModel.encode_text)
  short = model.apply(variables, jnp.array([ids[:8]]), jnp.array([4]), method=CLIPModel.encode_text)
  np.testing.assert_allclose(np.asarray(long), np.asarray(short), atol=1e-5)


def test_bfloat16_compute_is_close_to_float32(tiny):
  cfg, variables = tiny
  size = cfg.vision.image_size
  pixels = jax.random.normal(jax.random.key(2), (2, size, size, 3))
  f32 = CLIPModel(cfg).apply(variables, pixels, method=CLIPModel.encode_image)
  bf16 = CLIPModel(cfg, jnp.bfloat16).apply(variables, pixels, method=CLIPModel.encode_image)
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
  f32 = CLIPModel(cfg).apply(variables, ids, jnp.array([4]), method=CLIPModel.encode_text)
  bf16 = encode_text(variables)
  rel = float(jnp.abs(f32 - bf16).max() / jnp.abs(f32).max())
  assert 0 < rel < 2e-2


def test_config_round_trip_and_named_architectures():
  for name, cfg in ARCHITECTURES.items():
    assert CLIPConfig.from_dict(cfg.to_dict()) == cfg
    assert get_architecture(name.lower()) == cfg
  with pytest.raises(ValueError, match="unknown CLIP architecture"):
    get_architecture("ViT-Z/99")
