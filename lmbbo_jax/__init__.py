"""lmbbo_jax: a chat LLM as a black-box optimizer of CLIP prompt templates, in JAX."""

__version__ = "0.1.0"

# The wiring: the toy world fills the lower rooms' registries (imported on first use,
# so this costs nothing and the lower rooms never import the toy world).
from lmbbo_jax import extensions as _extensions  # noqa: E402

_extensions.register("tokenizer", "toy", "lmbbo_jax.toyworld.tokenizer:ToyTokenizer.from_file")
_extensions.register("checkpoint", "toyclip", "lmbbo_jax.toyworld.checkpoint:assets_dir")
_extensions.register("dataset", "toy:", "lmbbo_jax.toyworld.tasks:build_toy_task")
_extensions.register("hand_templates", "toy:", "lmbbo_jax.toyworld.captions:GENERIC_TEMPLATES")
