"""Async OpenAI-compatible chat client, usage ledger and response cache.

This room knows nothing about CLIP, JAX or how templates are scored.
"""

from lmbbo_jax.llm.cache import ResponseCache
from lmbbo_jax.llm.client import ChatResult, LLMClient, LLMConfig, build_client
from lmbbo_jax.llm.errors import (LLMBudgetExceeded, LLMError, LLMFatalError,
                                  LLMRetriesExhausted)
from lmbbo_jax.llm.ledger import DEFAULT_PRICES, Ledger

__all__ = [
    "ChatResult", "DEFAULT_PRICES", "LLMBudgetExceeded", "LLMClient",
    "LLMConfig", "LLMError", "LLMFatalError", "LLMRetriesExhausted", "Ledger",
    "ResponseCache", "build_client",
]
