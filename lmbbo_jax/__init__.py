"""lmbbo_jax: a chat LLM as a black-box optimizer of CLIP prompt templates, in JAX."""

__version__ = "0.1.0"
