"""CLIP and SigLIP architecture configs: named architectures and the tiny ones used by tests.

A config is plain data (frozen dataclasses, JSON round-trip), so a checkpoint
directory can carry its own `config.json` and named architectures are a table.
`CLIPConfig.family` picks the towers: "clip" (a causal text tower pooled at the
end-of-text token, softmax logits) or "siglip" (SigLIP and SigLIP 2 FixRes: a
bidirectional text tower over a fixed-length padded row pooled at its last
token, a ViT with an attention-pooling head, sigmoid logits with a bias).
"""

from __future__ import annotations

import dataclasses
from typing import Any

# OpenAI CLIP's image normalisation (also used by open_clip and HF for CLIP).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# SigLIP's: pixels scaled to [-1, 1].
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
FAMILIES = ("clip", "siglip")


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """A causal pre-LN transformer text tower, pooled at the end-of-text token."""
  vocab_size: int = 49408
  context_length: int = 77
  width: int = 512
  layers: int = 12
  heads: int = 8
  mlp_ratio: float = 4.0
  act: str = "quick_gelu"  # OpenAI weights use QuickGELU; "gelu", "gelu_tanh" for others.
  ln_eps: float = 1e-5  # LayerNorm epsilon (PyTorch's default; SigLIP's is 1e-6).

  def flops(self, tokens: float, attention_keys: float, pooled: float | None = None) -> float:
    """Forward FLOPs of the layers for `tokens` token positions whose queries see
    `attention_keys` keys in all (dense matmuls 2 x weights per token; attention
    scores and weighted values 4 x width per query-key pair per layer). `pooled`:
    how many tokens' outputs are read, when the last layer runs its output
    projection and MLP for those only (None: for every token)."""
    after_attention = self.width ** 2 + 2 * self.width * int(self.width * self.mlp_ratio)
    weights = self.layers * (3 * self.width ** 2 + after_attention)
    skipped = 0 if pooled is None else 2 * after_attention * (tokens - pooled)
    return 2 * weights * tokens - skipped + 4 * self.layers * self.width * attention_keys


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """An image tower: a ViT (`kind="vit"`) or OpenAI's ModifiedResNet."""
  kind: str = "vit"  # "vit" | "resnet"
  image_size: int = 224
  width: int = 768  # ViT width, or the ResNet stem width (64 for RN50).
  layers: Any = 12  # ViT depth, or ResNet blocks per stage, e.g. (3, 4, 6, 3).
  heads: int = 12  # ViT heads, or attention-pool heads for the ResNet.
  patch_size: int = 32
  mlp_ratio: float = 4.0
  act: str = "quick_gelu"
  ln_eps: float = 1e-5

  def __post_init__(self):
    if self.kind not in ("vit", "resnet"):
      raise ValueError(f"VisionConfig.kind must be 'vit' or 'resnet', got {self.kind!r}")
    if isinstance(self.layers, list):
      object.__setattr__(self, "layers", tuple(self.layers))


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """A whole model: both towers, the joint embedding size and token ids.

  `sot_token_id` / `eot_token_id` None: the tokenizer adds no such token
  (SigLIP has no start token).
  """
  embed_dim: int
  vision: VisionConfig
  text: TextConfig
  sot_token_id: int | None = 49406
  eot_token_id: int | None = 49407
  pad_token_id: int = 0
  image_mean: tuple[float, float, float] = CLIP_MEAN
  image_std: tuple[float, float, float] = CLIP_STD
  name: str = ""
  family: str = "clip"  # "clip" | "siglip" (see the module doc)
  # Images: True resizes the shorter side and center-crops (CLIP); False resizes the
  # whole image to the square (SigLIP's processor).
  image_crop: bool = True

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"CLIPConfig.family must be one of {FAMILIES}, got {self.family!r}")

  @property
  def text_causal(self) -> bool:
    """Whether the text tower is causal (prefix sharing and packing are exact then)."""
    return self.family == "clip"

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["vision"]["layers"] = (list(self.vision.layers)
                             if isinstance(self.vision.layers, tuple)
                             else self.vision.layers)
    d["image_mean"] = list(self.image_mean)
    d["image_std"] = list(self.image_std)
    return d

  @classmethod
  def from_dict(cls, d: dict) -> "CLIPConfig":
    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    d = {k: v for k, v in d.items() if k in known}
    d["vision"] = VisionConfig(**d["vision"])
    d["text"] = TextConfig(**d["text"])
    for key in ("image_mean", "image_std"):
      if key in d:
        d[key] = tuple(d[key])
    return cls(**d)

  def replace(self, **kw) -> "CLIPConfig":
    return dataclasses.replace(self, **kw)


def _openai_text(width: int = 512, heads: int = 8) -> TextConfig:
  return TextConfig(width=width, heads=heads, layers=12)


ARCHITECTURES: dict[str, CLIPConfig] = {
    "RN50": CLIPConfig(
        embed_dim=1024,
        vision=VisionConfig(kind="resnet", width=64, layers=(3, 4, 6, 3), heads=32),
        text=_openai_text(), name="RN50"),
    "RN101": CLIPConfig(
        embed_dim=512,
        vision=VisionConfig(kind="resnet", width=64, layers=(3, 4, 23, 3), heads=32),
        text=_openai_text(), name="RN101"),
    "ViT-B/32": CLIPConfig(
        embed_dim=512,
        vision=VisionConfig(width=768, layers=12, heads=12, patch_size=32),
        text=_openai_text(), name="ViT-B/32"),
    "ViT-B/16": CLIPConfig(
        embed_dim=512,
        vision=VisionConfig(width=768, layers=12, heads=12, patch_size=16),
        text=_openai_text(), name="ViT-B/16"),
    "ViT-L/14": CLIPConfig(
        embed_dim=768,
        vision=VisionConfig(width=1024, layers=24, heads=16, patch_size=14),
        text=_openai_text(width=768, heads=12), name="ViT-L/14"),
    # open_clip's ViT-H-14 (MetaCLIP H/14, DFN5B H/14): 80-wide heads.
    "ViT-H/14": CLIPConfig(
        embed_dim=1024,
        vision=VisionConfig(width=1280, layers=32, heads=16, patch_size=14),
        text=TextConfig(width=1024, layers=24, heads=16), name="ViT-H/14"),
    "ViT-H/14-378": CLIPConfig(
        embed_dim=1024,
        vision=VisionConfig(image_size=378, width=1280, layers=32, heads=16, patch_size=14),
        text=TextConfig(width=1024, layers=24, heads=16), name="ViT-H/14-378"),
    # Tiny variants for tests: same code paths, seconds to build on a CPU.
    "tiny-vit": CLIPConfig(
        embed_dim=32,
        vision=VisionConfig(image_size=32, width=48, layers=2, heads=4, patch_size=8),
        text=TextConfig(width=32, layers=2, heads=4), name="tiny-vit"),
    "tiny-rn": CLIPConfig(
        embed_dim=32,
        vision=VisionConfig(kind="resnet", image_size=64, width=16, layers=(1, 2, 1, 1),
                            heads=4),
        text=TextConfig(width=32, layers=2, heads=4), name="tiny-rn"),
}


def _siglip(name: str, *, width: int, layers: int, heads: int, mlp: int, image_size: int,
            patch_size: int, vocab_size: int = 32000, eot: int = 1, pad: int = 1,
            sot: int | None = None) -> CLIPConfig:
  """A SigLIP config: both towers of one shape (as every published SigLIP has), text
  length 64, GELU (tanh), LayerNorm epsilon 1e-6; token ids of its tokenizer."""
  ratio = mlp / width
  return CLIPConfig(
      embed_dim=width, family="siglip", name=name, sot_token_id=sot, eot_token_id=eot,
      pad_token_id=pad, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD, image_crop=False,
      vision=VisionConfig(image_size=image_size, width=width, layers=layers, heads=heads,
                          patch_size=patch_size, mlp_ratio=ratio, act="gelu_tanh",
                          ln_eps=1e-6),
      text=TextConfig(vocab_size=vocab_size, context_length=64, width=width, layers=layers,
                      heads=heads, mlp_ratio=ratio, act="gelu_tanh", ln_eps=1e-6))


# SigLIP (SentencePiece, 32k: no start token, "</s>" = 1 ends and pads) and SigLIP 2
# FixRes (Gemma's tokenizer, 256k), as transformers' SiglipModel checkpoints.
ARCHITECTURES.update({
    "siglip-base-patch16-224": _siglip("siglip-base-patch16-224", width=768, layers=12,
                                       heads=12, mlp=3072, image_size=224, patch_size=16),
    "siglip-base-patch16-256": _siglip("siglip-base-patch16-256", width=768, layers=12,
                                       heads=12, mlp=3072, image_size=256, patch_size=16),
    "siglip-large-patch16-256": _siglip("siglip-large-patch16-256", width=1024, layers=24,
                                        heads=16, mlp=4096, image_size=256, patch_size=16),
    "siglip-so400m-patch14-384": _siglip("siglip-so400m-patch14-384", width=1152, layers=27,
                                         heads=16, mlp=4304, image_size=384, patch_size=14),
    # Gemma: "<pad>" = 0, "<eos>" = 1; the tokenizer ends each text with "<eos>".
    "siglip2-base-patch16-224": _siglip("siglip2-base-patch16-224", width=768, layers=12,
                                        heads=12, mlp=3072, image_size=224, patch_size=16,
                                        vocab_size=256000, eot=1, pad=0),
    "tiny-siglip": _siglip("tiny-siglip", width=32, layers=2, heads=4, mlp=64, image_size=32,
                           patch_size=8, vocab_size=1000),
})


def get_architecture(name: str) -> CLIPConfig:
  """The named architecture config; raises ValueError listing the known names."""
  key = {k.lower(): k for k in ARCHITECTURES}.get(name.lower().replace("_", "-"))
  if key is None:
    raise ValueError(f"unknown CLIP architecture {name!r}; known: "
                     f"{', '.join(ARCHITECTURES)}")
  return ARCHITECTURES[key]
