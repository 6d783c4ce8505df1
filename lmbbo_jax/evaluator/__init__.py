"""Scoring prompt templates by few-shot CLIP accuracy (image features encoded once)."""

from lmbbo_jax.evaluator.types import Score

__all__ = ["Score"]
