"""PyTorch CLIP state dicts -> our Flax variables, through declarative key maps.

A key map is a table of `Rule(target, source, hook)`:
  target  our flat variable path, "<collection>/<module>/.../<leaf>", e.g.
          "params/text/blocks/attn_q/kernel";
  source  the checkpoint tensor; "{i}" marks a per-layer tensor, and those are
          stacked on a leading axis (our transformer layers are one nn.scan);
  hook    a named transform (see HOOKS): transpose a Linear, OIHW->HWIO a conv,
          take q/k/v out of a fused in_proj, ...
BatchNorm entries ("bn" hook) expand to scale/bias in "params" and the running
statistics in "batch_stats".

`apply_key_map` fills an `eval_shape`d variable tree strictly: every model
variable exactly once with the right shape, and every checkpoint tensor used
(apart from a few known buffers, IGNORED). Anything else raises
`CheckpointError` naming the tensor. Scenic's CLIP `_convert_vars` was the
reference for which tensors need transposing.

Families: "hf" (transformers `CLIPModel`, ViT only), "hf_siglip" (transformers
`SiglipModel`: SigLIP and SigLIP 2 FixRes) and "openai" (OpenAI's `model.py` /
TorchScript archives and open_clip's OpenAI-style towers, ViT and ModifiedResNet).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Mapping

import numpy as np

from lmbbo_jax.models.configs import (ARCHITECTURES, CLIP_MEAN, CLIP_STD, SIGLIP_MEAN,
                                      SIGLIP_STD, CLIPConfig, TextConfig, VisionConfig)


class CheckpointError(ValueError):
  """A checkpoint cannot be found, read or mapped onto the model; the message says why."""


@dataclasses.dataclass(frozen=True)
class Rule:
  target: str
  source: str
  hook: str = "copy"


def _third(x: np.ndarray, k: int) -> np.ndarray:
  n = x.shape[0]
  if n % 3:
    raise ValueError(f"fused in_proj has {n} rows, not a multiple of 3")
  return x[k * n // 3:(k + 1) * n // 3]


HOOKS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "copy": lambda x: x,
    "linear": lambda x: x.T,  # torch Linear weight [out, in] -> Dense kernel [in, out].
    "conv": lambda x: x.transpose(2, 3, 1, 0),  # torch OIHW -> flax HWIO.
    "scalar": lambda x: x.reshape(()),
    "flat": lambda x: x.reshape(-1),  # SigLIP's probe [1, 1, D] -> [D].
    "q_kernel": lambda x: _third(x, 0).T,  # nn.MultiheadAttention's in_proj = [q; k; v].
    "k_kernel": lambda x: _third(x, 1).T,
    "v_kernel": lambda x: _third(x, 2).T,
    "q_bias": lambda x: _third(x, 0),
    "k_bias": lambda x: _third(x, 1),
    "v_bias": lambda x: _third(x, 2),
}

# Checkpoint entries that carry no weights: buffers and the metadata of
# OpenAI's TorchScript archives.
IGNORED = re.compile(r"(^|\.)(num_batches_tracked|position_ids|attn_mask)$"
                     r"|^(input_resolution|context_length|vocab_size)$")

# -- the tables ------------------------------------------------------------------

# One transformer layer: (our path under blocks/, source suffix, hook).
OPENAI_BLOCK = (
    ("ln_1/scale", "ln_1.weight", "copy"),
    ("ln_1/bias", "ln_1.bias", "copy"),
    ("attn_q/kernel", "attn.in_proj_weight", "q_kernel"),
    ("attn_k/kernel", "attn.in_proj_weight", "k_kernel"),
    ("attn_v/kernel", "attn.in_proj_weight", "v_kernel"),
    ("attn_q/bias", "attn.in_proj_bias", "q_bias"),
    ("attn_k/bias", "attn.in_proj_bias", "k_bias"),
    ("attn_v/bias", "attn.in_proj_bias", "v_bias"),
    ("attn_out/kernel", "attn.out_proj.weight", "linear"),
    ("attn_out/bias", "attn.out_proj.bias", "copy"),
    ("ln_2/scale", "ln_2.weight", "copy"),
    ("ln_2/bias", "ln_2.bias", "copy"),
    ("mlp_fc/kernel", "mlp.c_fc.weight", "linear"),
    ("mlp_fc/bias", "mlp.c_fc.bias", "copy"),
    ("mlp_proj/kernel", "mlp.c_proj.weight", "linear"),
    ("mlp_proj/bias", "mlp.c_proj.bias", "copy"),
)

HF_BLOCK = (
    ("ln_1/scale", "layer_norm1.weight", "copy"),
    ("ln_1/bias", "layer_norm1.bias", "copy"),
    ("attn_q/kernel", "self_attn.q_proj.weight", "linear"),
    ("attn_k/kernel", "self_attn.k_proj.weight", "linear"),
    ("attn_v/kernel", "self_attn.v_proj.weight", "linear"),
    ("attn_q/bias", "self_attn.q_proj.bias", "copy"),
    ("attn_k/bias", "self_attn.k_proj.bias", "copy"),
    ("attn_v/bias", "self_attn.v_proj.bias", "copy"),
    ("attn_out/kernel", "self_attn.out_proj.weight", "linear"),
    ("attn_out/bias", "self_attn.out_proj.bias", "copy"),
    ("ln_2/scale", "layer_norm2.weight", "copy"),
    ("ln_2/bias", "layer_norm2.bias", "copy"),
    ("mlp_fc/kernel", "mlp.fc1.weight", "linear"),
    ("mlp_fc/bias", "mlp.fc1.bias", "copy"),
    ("mlp_proj/kernel", "mlp.fc2.weight", "linear"),
    ("mlp_proj/bias", "mlp.fc2.bias", "copy"),
)

OPENAI_TEXT = (
    ("params/text/token_embedding/embedding", "token_embedding.weight", "copy"),
    ("params/text/positional_embedding", "positional_embedding", "copy"),
    ("params/text/ln_final", "ln_final", "ln"),
    ("params/text/text_projection", "text_projection", "copy"),  # Already [width, embed].
    ("params/logit_scale", "logit_scale", "scalar"),
)

OPENAI_VIT = (
    ("params/visual/conv1/kernel", "visual.conv1.weight", "conv"),
    ("params/visual/class_embedding", "visual.class_embedding", "copy"),
    ("params/visual/positional_embedding", "visual.positional_embedding", "copy"),
    ("params/visual/ln_pre", "visual.ln_pre", "ln"),
    ("params/visual/ln_post", "visual.ln_post", "ln"),
    ("params/visual/proj", "visual.proj", "copy"),  # Already [width, embed].
)

OPENAI_RESNET_STEM = (
    ("conv1/kernel", "conv1.weight", "conv"),
    ("bn1", "bn1", "bn"),
    ("conv2/kernel", "conv2.weight", "conv"),
    ("bn2", "bn2", "bn"),
    ("conv3/kernel", "conv3.weight", "conv"),
    ("bn3", "bn3", "bn"),
)

# One Bottleneck; the downsample entries exist in the first block of each stage.
OPENAI_BOTTLENECK = OPENAI_RESNET_STEM
OPENAI_DOWNSAMPLE = (
    ("downsample_conv/kernel", "downsample.0.weight", "conv"),
    ("downsample_bn", "downsample.1", "bn"),
)

OPENAI_ATTNPOOL = (
    ("positional_embedding", "positional_embedding", "copy"),
    ("q_proj/kernel", "q_proj.weight", "linear"),
    ("q_proj/bias", "q_proj.bias", "copy"),
    ("k_proj/kernel", "k_proj.weight", "linear"),
    ("k_proj/bias", "k_proj.bias", "copy"),
    ("v_proj/kernel", "v_proj.weight", "linear"),
    ("v_proj/bias", "v_proj.bias", "copy"),
    ("c_proj/kernel", "c_proj.weight", "linear"),
    ("c_proj/bias", "c_proj.bias", "copy"),
)

HF_TOP = (
    ("params/text/token_embedding/embedding", "text_model.embeddings.token_embedding.weight",
     "copy"),
    ("params/text/positional_embedding", "text_model.embeddings.position_embedding.weight",
     "copy"),
    ("params/text/ln_final", "text_model.final_layer_norm", "ln"),
    ("params/text/text_projection", "text_projection.weight", "linear"),
    ("params/visual/conv1/kernel", "vision_model.embeddings.patch_embedding.weight", "conv"),
    ("params/visual/class_embedding", "vision_model.embeddings.class_embedding", "copy"),
    ("params/visual/positional_embedding", "vision_model.embeddings.position_embedding.weight",
     "copy"),
    ("params/visual/ln_pre", "vision_model.pre_layrnorm", "ln"),  # sic: HF's spelling.
    ("params/visual/ln_post", "vision_model.post_layernorm", "ln"),
    ("params/visual/proj", "visual_projection.weight", "linear"),
    ("params/logit_scale", "logit_scale", "scalar"),
)


HF_SIGLIP_TOP = (
    ("params/text/token_embedding/embedding", "text_model.embeddings.token_embedding.weight",
     "copy"),
    ("params/text/positional_embedding", "text_model.embeddings.position_embedding.weight",
     "copy"),
    ("params/text/ln_final", "text_model.final_layer_norm", "ln"),
    ("params/text/head/kernel", "text_model.head.weight", "linear"),
    ("params/text/head/bias", "text_model.head.bias", "copy"),
    ("params/visual/conv1/kernel", "vision_model.embeddings.patch_embedding.weight", "conv"),
    ("params/visual/conv1/bias", "vision_model.embeddings.patch_embedding.bias", "copy"),
    ("params/visual/positional_embedding", "vision_model.embeddings.position_embedding.weight",
     "copy"),
    ("params/visual/ln_post", "vision_model.post_layernorm", "ln"),
    ("params/logit_scale", "logit_scale", "scalar"),
    ("params/logit_bias", "logit_bias", "scalar"),
)

# The attention-pooling head: torch's nn.MultiheadAttention (fused in_proj) + LN + MLP.
HF_SIGLIP_HEAD = (
    ("probe", "probe", "flat"),
    ("attn_q/kernel", "attention.in_proj_weight", "q_kernel"),
    ("attn_k/kernel", "attention.in_proj_weight", "k_kernel"),
    ("attn_v/kernel", "attention.in_proj_weight", "v_kernel"),
    ("attn_q/bias", "attention.in_proj_bias", "q_bias"),
    ("attn_k/bias", "attention.in_proj_bias", "k_bias"),
    ("attn_v/bias", "attention.in_proj_bias", "v_bias"),
    ("attn_out/kernel", "attention.out_proj.weight", "linear"),
    ("attn_out/bias", "attention.out_proj.bias", "copy"),
    ("ln", "layernorm", "ln"),
    ("mlp_fc/kernel", "mlp.fc1.weight", "linear"),
    ("mlp_fc/bias", "mlp.fc1.bias", "copy"),
    ("mlp_proj/kernel", "mlp.fc2.weight", "linear"),
    ("mlp_proj/bias", "mlp.fc2.bias", "copy"),
)


def _expand(entries, target_prefix: str = "", source_prefix: str = "") -> list[Rule]:
  """Table rows -> rules; "ln" and "bn" rows expand to their parameter/statistic leaves."""
  rules = []
  for target, source, hook in entries:
    t, s = target_prefix + target, source_prefix + source
    if hook == "ln":
      rules += [Rule(f"{t}/scale", f"{s}.weight"), Rule(f"{t}/bias", f"{s}.bias")]
    elif hook == "bn":
      stats = "batch_stats" + t[len("params"):]
      rules += [Rule(f"{t}/scale", f"{s}.weight"), Rule(f"{t}/bias", f"{s}.bias"),
                Rule(f"{stats}/mean", f"{s}.running_mean"),
                Rule(f"{stats}/var", f"{s}.running_var")]
    else:
      rules.append(Rule(t, s, hook))
  return rules


def key_map(family: str, config: CLIPConfig) -> list[Rule]:
  """The rules that fill every variable of `config`'s model from a `family` state dict."""
  if (family == "hf_siglip") != (config.family == "siglip"):
    raise CheckpointError(f"a {family!r} checkpoint does not fit a {config.family!r} model")
  if family == "hf_siglip":
    # SigLIP's encoder layers have the names of transformers' CLIP layers.
    return (_expand(HF_SIGLIP_TOP)
            + _expand(HF_SIGLIP_HEAD, "params/visual/head/", "vision_model.head.")
            + _expand(HF_BLOCK, "params/text/blocks/", "text_model.encoder.layers.{i}.")
            + _expand(HF_BLOCK, "params/visual/blocks/", "vision_model.encoder.layers.{i}."))
  if family == "hf":
    if config.vision.kind != "vit":
      raise CheckpointError("Hugging Face CLIPModel checkpoints are ViT only")
    return (_expand(HF_TOP)
            + _expand(HF_BLOCK, "params/text/blocks/", "text_model.encoder.layers.{i}.")
            + _expand(HF_BLOCK, "params/visual/blocks/", "vision_model.encoder.layers.{i}."))
  if family != "openai":
    raise ValueError(f"unknown checkpoint family {family!r}")
  rules = (_expand(OPENAI_TEXT)
           + _expand(OPENAI_BLOCK, "params/text/blocks/", "transformer.resblocks.{i}."))
  if config.vision.kind == "vit":
    return (rules + _expand(OPENAI_VIT)
            + _expand(OPENAI_BLOCK, "params/visual/blocks/", "visual.transformer.resblocks.{i}."))
  rules += _expand(OPENAI_RESNET_STEM, "params/visual/", "visual.")
  for stage, blocks in enumerate(config.vision.layers, start=1):
    for b in range(blocks):
      rows = OPENAI_BOTTLENECK + (OPENAI_DOWNSAMPLE if b == 0 else ())
      rules += _expand(rows, f"params/visual/layer{stage}_{b}/", f"visual.layer{stage}.{b}.")
  return rules + _expand(OPENAI_ATTNPOOL, "params/visual/attnpool/", "visual.attnpool.")


# -- strict application ------------------------------------------------------------

def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  """Nested dicts -> {"a/b/c": leaf}."""
  out = {}
  for k, v in tree.items():
    path = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(flatten(v, path + "/"))
    else:
      out[path] = v
  return out


def unflatten(flat: Mapping[str, Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return out


def _names(keys, limit: int = 6) -> str:
  keys = sorted(keys)
  more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
  return ", ".join(repr(k) for k in keys[:limit]) + more


def apply_key_map(state: Mapping[str, Any], rules: list[Rule], abstract: Mapping,
                  *, what: str = "checkpoint") -> dict:
  """Fills the variable tree `abstract` (shapes) from `state` through `rules`, strictly.

  Args:
    state: checkpoint tensors by name (numpy arrays or anything np.asarray takes).
    rules: the key map.
    abstract: nested {collection: {...: ShapeDtypeStruct}} of the model.
    what: the checkpoint's name for error messages.

  Returns:
    Nested float32 numpy variables with the structure of `abstract`.

  Raises:
    CheckpointError: a tensor is missing, unmapped, or of the wrong shape.
  """
  wanted = flatten(abstract)
  out: dict[str, np.ndarray] = {}
  used: set[str] = set()
  missing: list[str] = []
  for rule in rules:
    if rule.target not in wanted:
      raise CheckpointError(f"key map names {rule.target!r}, which the model does not have "
                            "(a bug in lmbbo_jax.models.convert)")
    if rule.target in out:
      raise CheckpointError(f"key map fills {rule.target!r} twice (a bug in "
                            "lmbbo_jax.models.convert)")
    shape = tuple(wanted[rule.target].shape)
    per_layer = "{i}" in rule.source
    keys = ([rule.source.replace("{i}", str(i)) for i in range(shape[0])] if per_layer
            else [rule.source])
    absent = [k for k in keys if k not in state]
    if absent:
      missing += absent
      continue
    parts = []
    for k in keys:
      x = np.asarray(state[k])
      try:
        y = HOOKS[rule.hook](x)
      except ValueError as e:
        raise CheckpointError(f"{what}: tensor {k!r} of shape {x.shape} does not fit "
                              f"{rule.target!r}: {e}") from None
      want = shape[1:] if per_layer else shape
      if y.shape != want:
        raise CheckpointError(
            f"{what}: tensor {k!r} has shape {tuple(x.shape)}, but the model's "
            f"{rule.target!r} needs {want} (after {rule.hook}); the config does not match "
            "the checkpoint")
      parts.append(y)
      used.add(k)
    value = np.stack(parts) if per_layer else parts[0]
    out[rule.target] = np.array(value, dtype=np.float32, order="C")  # Also 0-d.
  if missing:
    raise CheckpointError(f"{what}: missing tensor(s) {_names(missing)}")
  unfilled = set(wanted) - set(out)
  if unfilled:
    raise CheckpointError(f"key map leaves {_names(unfilled)} unfilled (a bug in "
                          "lmbbo_jax.models.convert)")
  extra = [k for k in state if k not in used and not IGNORED.search(k)]
  if extra:
    raise CheckpointError(f"{what}: unmapped tensor(s) {_names(extra)}; the checkpoint has "
                          "weights this model would not use")
  return unflatten(out)


def check_variables(variables: Mapping, abstract: Mapping, *, what: str) -> None:
  """Raises CheckpointError unless `variables` has exactly the paths and shapes of `abstract`."""
  got, wanted = flatten(variables), flatten(abstract)
  if set(got) - set(wanted):
    raise CheckpointError(f"{what}: unexpected variable(s) {_names(set(got) - set(wanted))}")
  if set(wanted) - set(got):
    raise CheckpointError(f"{what}: missing variable(s) {_names(set(wanted) - set(got))}")
  for k, v in got.items():
    if tuple(np.shape(v)) != tuple(wanted[k].shape):
      raise CheckpointError(f"{what}: variable {k!r} has shape {tuple(np.shape(v))}, the "
                            f"config needs {tuple(wanted[k].shape)}")


# -- families and configs ------------------------------------------------------------

def strip_prefix(state: dict) -> dict:
  """Drops a "module." (DDP) prefix shared by all keys."""
  if state and all(k.startswith("module.") for k in state):
    return {k[len("module."):]: v for k, v in state.items()}
  return state


def detect_family(state: Mapping[str, Any], what: str = "checkpoint") -> str:
  if "logit_bias" in state and "vision_model.head.probe" in state:
    return "hf_siglip"
  if "text_model.embeddings.token_embedding.weight" in state:
    if "vision_model.embeddings.patch_embedding.weight" not in state:
      raise CheckpointError(f"{what} is a Hugging Face CLIP without a ViT vision tower; only "
                            "CLIPModel checkpoints with both towers are supported")
    return "hf"
  if "token_embedding.weight" in state and ("visual.proj" in state
                                            or "visual.attnpool.c_proj.weight" in state):
    return "openai"
  raise CheckpointError(
      f"{what} is neither a Hugging Face CLIPModel nor an OpenAI/open_clip CLIP state dict "
      f"(first keys: {_names(list(state)[:4], 4)})")


def _count(state, pattern: str) -> int:
  rx = re.compile(pattern)
  return len({m.group(1) for k in state if (m := rx.match(k))})


def _shape(state, key) -> tuple[int, ...]:
  return tuple(np.shape(state[key]))


def _heads(width: int, head_width: int, what: str) -> int:
  if width % head_width:
    raise CheckpointError(f"cannot infer attention heads of a width-{width} tower (not a "
                          f"multiple of {head_width}); pass config= to load_clip")
  return width // head_width


def config_from_openai_state(state: Mapping[str, Any], *, text_heads: int | None = None,
                             vision_heads: int | None = None, act: str = "quick_gelu",
                             image_mean=CLIP_MEAN, image_std=CLIP_STD) -> CLIPConfig:
  """OpenAI's `build_model` inference from tensor shapes; heads default to 64 wide."""
  try:
    embed_dim = _shape(state, "text_projection")[1]
    ctx, twidth = _shape(state, "positional_embedding")
    vocab = _shape(state, "token_embedding.weight")[0]
    tlayers = _count(state, r"transformer\.resblocks\.(\d+)\.")
    tmlp = _shape(state, "transformer.resblocks.0.mlp.c_fc.weight")[0] / twidth
    text = TextConfig(vocab_size=vocab, context_length=ctx, width=twidth, layers=tlayers,
                      heads=text_heads or _heads(twidth, 64, "text"), mlp_ratio=tmlp, act=act)
    if "visual.proj" in state:
      vwidth, _, patch, _ = _shape(state, "visual.conv1.weight")
      grid = round(math.sqrt(_shape(state, "visual.positional_embedding")[0] - 1))
      vmlp = _shape(state, "visual.transformer.resblocks.0.mlp.c_fc.weight")[0] / vwidth
      vision = VisionConfig(
          kind="vit", image_size=patch * grid, width=vwidth, patch_size=patch, mlp_ratio=vmlp,
          layers=_count(state, r"visual\.transformer\.resblocks\.(\d+)\."),
          heads=vision_heads or _heads(vwidth, 64, "vision"), act=act)
    else:
      layers = tuple(_count(state, rf"visual\.layer{s}\.(\d+)\.") for s in (1, 2, 3, 4))
      vwidth = _shape(state, "visual.layer1.0.conv1.weight")[0]
      grid = round(math.sqrt(_shape(state, "visual.attnpool.positional_embedding")[0] - 1))
      vision = VisionConfig(kind="resnet", image_size=grid * 32, width=vwidth, layers=layers,
                            heads=vision_heads or _heads(vwidth * 32, 64, "vision"), act=act)
  except (KeyError, IndexError, ValueError) as e:
    raise CheckpointError(f"cannot infer the CLIP architecture from the state dict ({e!r} "
                          "missing or malformed)") from None
  return named(CLIPConfig(embed_dim=embed_dim, vision=vision, text=text,
                           image_mean=tuple(image_mean), image_std=tuple(image_std)))


# transformers' CLIPTextConfig / CLIPVisionConfig defaults: save_pretrained writes
# only the fields that differ from them.
_HF_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                         num_hidden_layers=12, num_attention_heads=8,
                         max_position_embeddings=77, hidden_act="quick_gelu",
                         layer_norm_eps=1e-5)
_HF_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                           num_attention_heads=12, image_size=224, patch_size=32,
                           hidden_act="quick_gelu", layer_norm_eps=1e-5, num_channels=3)


def _hf_act(name: str) -> str:
  if name == "quick_gelu":
    return "quick_gelu"
  if name == "gelu":
    return "gelu"
  raise CheckpointError(f"unsupported hidden_act {name!r} in the Hugging Face config "
                        "(supported: quick_gelu, gelu)")


def config_from_hf(hf: Mapping[str, Any]) -> CLIPConfig:
  """Our config from a Hugging Face CLIPModel `config.json` (dict)."""
  if hf.get("model_type", "clip") != "clip":
    raise CheckpointError(f"config.json has model_type {hf.get('model_type')!r}; only "
                          "Hugging Face 'clip' (CLIPModel) checkpoints are supported")
  t = {**_HF_TEXT_DEFAULTS, **(hf.get("text_config") or {})}
  v = {**_HF_VISION_DEFAULTS, **(hf.get("vision_config") or {})}
  for name, d in (("text", t), ("vision", v)):
    if float(d["layer_norm_eps"]) != 1e-5:
      raise CheckpointError(f"{name} layer_norm_eps {d['layer_norm_eps']} is not supported "
                            "(the model uses 1e-5)")
  if v["num_channels"] != 3:
    raise CheckpointError("only 3-channel (RGB) vision towers are supported")
  text = TextConfig(vocab_size=t["vocab_size"], context_length=t["max_position_embeddings"],
                    width=t["hidden_size"], layers=t["num_hidden_layers"],
                    heads=t["num_attention_heads"],
                    mlp_ratio=t["intermediate_size"] / t["hidden_size"],
                    act=_hf_act(t["hidden_act"]))
  vision = VisionConfig(kind="vit", image_size=v["image_size"], width=v["hidden_size"],
                        layers=v["num_hidden_layers"], heads=v["num_attention_heads"],
                        patch_size=v["patch_size"],
                        mlp_ratio=v["intermediate_size"] / v["hidden_size"],
                        act=_hf_act(v["hidden_act"]))
  return named(CLIPConfig(embed_dim=hf.get("projection_dim", 512), vision=vision, text=text))


# transformers' SiglipTextConfig / SiglipVisionConfig defaults (the base model's).
_HF_SIGLIP_TEXT_DEFAULTS = dict(vocab_size=32000, hidden_size=768, intermediate_size=3072,
                                num_hidden_layers=12, num_attention_heads=12,
                                max_position_embeddings=64, hidden_act="gelu_pytorch_tanh",
                                layer_norm_eps=1e-6, projection_size=None)
_HF_SIGLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                  num_attention_heads=12, image_size=224, patch_size=16,
                                  hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                                  num_channels=3, vision_use_head=True)
_HF_SIGLIP_ACTS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def config_from_hf_siglip(hf: Mapping[str, Any]) -> CLIPConfig:
  """Our config from a transformers SiglipModel `config.json` (dict), without token ids
  (they are the tokenizer's: the loader sets them)."""
  if hf.get("model_type") != "siglip":
    raise CheckpointError(f"config.json has model_type {hf.get('model_type')!r}, not 'siglip'"
                          + (" (SigLIP 2 NaFlex, Siglip2Model, is not supported: use a FixRes "
                             "SigLIP 2 checkpoint)" if hf.get("model_type") == "siglip2" else ""))
  t = {**_HF_SIGLIP_TEXT_DEFAULTS, **(hf.get("text_config") or {})}
  v = {**_HF_SIGLIP_VISION_DEFAULTS, **(hf.get("vision_config") or {})}
  if not v["vision_use_head"] or v["num_channels"] != 3:
    raise CheckpointError("only SigLIP image towers with the attention-pooling head and 3 "
                          "channels are supported")
  embed = t["projection_size"] or t["hidden_size"]
  if embed != v["hidden_size"]:
    raise CheckpointError(f"SigLIP text head size {embed} differs from the image width "
                          f"{v['hidden_size']}; the towers cannot be compared")

  def act(name):
    if name not in _HF_SIGLIP_ACTS:
      raise CheckpointError(f"unsupported hidden_act {name!r} in the SigLIP config "
                            f"(supported: {', '.join(_HF_SIGLIP_ACTS)})")
    return _HF_SIGLIP_ACTS[name]

  text = TextConfig(vocab_size=t["vocab_size"], context_length=t["max_position_embeddings"],
                    width=t["hidden_size"], layers=t["num_hidden_layers"],
                    heads=t["num_attention_heads"],
                    mlp_ratio=t["intermediate_size"] / t["hidden_size"],
                    act=act(t["hidden_act"]), ln_eps=float(t["layer_norm_eps"]))
  vision = VisionConfig(kind="vit", image_size=v["image_size"], width=v["hidden_size"],
                        layers=v["num_hidden_layers"], heads=v["num_attention_heads"],
                        patch_size=v["patch_size"],
                        mlp_ratio=v["intermediate_size"] / v["hidden_size"],
                        act=act(v["hidden_act"]), ln_eps=float(v["layer_norm_eps"]))
  return CLIPConfig(embed_dim=embed, vision=vision, text=text, family="siglip",
                    image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD, image_crop=False)


# open_clip model_cfg options that change the computation without changing the
# tensors (so the strict key map cannot catch them): value that we support.
_OPEN_CLIP_VISION_OK = {"pool_type": ("tok", None), "final_ln_after_pool": (False, None),
                        "attentional_pool": (False, None), "no_ln_pre": (False, None),
                        "ls_init_value": (None,), "timm_model_name": (None,),
                        "act_kwargs": (None, {}), "norm_kwargs": (None, {})}
_OPEN_CLIP_TEXT_OK = {"pool_type": ("argmax", None), "no_causal_mask": (False, None),
                      "final_ln_after_pool": (False, None), "ls_init_value": (None,),
                      "hf_model_name": (None,), "embed_cls": (False, None),
                      "act_kwargs": (None, {}), "norm_kwargs": (None, {})}


def config_from_open_clip(oc: Mapping[str, Any], state: Mapping[str, Any]) -> CLIPConfig:
  """Our config from open_clip_config.json (dict) plus the state dict's shapes."""
  cfg = oc.get("model_cfg", oc)
  vc, tc = cfg.get("vision_cfg") or {}, cfg.get("text_cfg") or {}
  for part, d, ok in (("vision_cfg", vc, _OPEN_CLIP_VISION_OK), ("text_cfg", tc,
                                                                  _OPEN_CLIP_TEXT_OK)):
    for key, allowed in ok.items():
      if d.get(key) not in allowed:
        raise CheckpointError(f"open_clip {part}.{key}={d.get(key)!r} is not supported by "
                              "lmbbo_jax's CLIP (OpenAI-style towers only)")
  if cfg.get("custom_text") and tc.get("hf_model_name"):
    raise CheckpointError("open_clip models with a Hugging Face text tower are not supported")
  head_width = vc.get("head_width", 64)
  is_vit = "visual.proj" in state
  vwidth = vc.get("width", 768)
  pre = oc.get("preprocess_cfg") or {}
  act = "quick_gelu" if cfg.get("quick_gelu") else "gelu"
  return config_from_openai_state(
      state, text_heads=tc.get("heads", 8),
      vision_heads=_heads(vwidth if is_vit else vwidth * 32, head_width, "vision"),
      act=act, image_mean=pre.get("mean", CLIP_MEAN), image_std=pre.get("std", CLIP_STD))


def named(config: CLIPConfig) -> CLIPConfig:
  """Gives an inferred config the name of the named architecture it equals, if any."""
  for name, arch in ARCHITECTURES.items():
    if arch.replace(name="") == config.replace(name=""):
      return config.replace(name=name)
  return config


def convert_state_dict(state: Mapping[str, Any], config: CLIPConfig, abstract: Mapping,
                       *, family: str | None = None, what: str = "checkpoint") -> dict:
  """State dict -> our variables for `config` (strict; see module doc)."""
  state = strip_prefix(dict(state))
  family = family or detect_family(state, what)
  return apply_key_map(state, key_map(family, config), abstract, what=what)
