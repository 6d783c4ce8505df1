"""The model room: Flax CLIP towers, checkpoint conversion, tokenizers and `load_clip`.

  from lmbbo_jax.models import load_clip
  clip = load_clip("ViT-B/32")            # or a hub id, a local path, "toyclip", "random:RN50"
  ids = clip.tokenize(["a photo of a dog."])
  text = clip.encode_text(ids)            # [N, embed_dim], projected, un-normalised
  image = clip.encode_image(pixels)       # pixels NHWC float, CLIP-normalised
"""

from lmbbo_jax.models.api import CLIP, ContextOverflowError, Tokenizer
from lmbbo_jax.models.configs import ARCHITECTURES, CLIPConfig, TextConfig, VisionConfig
from lmbbo_jax.models.convert import CheckpointError
from lmbbo_jax.models.loading import SHORT_NAMES, load_clip
from lmbbo_jax.models.tokenizer import ClipBPETokenizer, TokenizerError

__all__ = [
    "ARCHITECTURES", "CLIP", "CLIPConfig", "CheckpointError", "ClipBPETokenizer",
    "ContextOverflowError", "SHORT_NAMES", "TextConfig", "Tokenizer", "TokenizerError",
    "VisionConfig", "load_clip",
]
