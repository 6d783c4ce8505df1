"""lmbbo_jax: a chat LLM as a black-box optimizer of CLIP prompt templates, in JAX.

The Python API (README, "Python API"; `lmbbo_jax/api.py`): names are imported on first
use, so `import lmbbo_jax` (and the command line's `--help`) loads no JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    # Configuration (JAX-free).
    "ExperimentConfig": "lmbbo_jax.config", "RuntimeConfig": "lmbbo_jax.config",
    "CoOpConfig": "lmbbo_jax.config", "ExperimentError": "lmbbo_jax.config",
    "COMPARISON": "lmbbo_jax.config",
    "SearchConfig": "lmbbo_jax.search", "SearchResult": "lmbbo_jax.search",
    "SearchError": "lmbbo_jax.search", "Proposal": "lmbbo_jax.search",
    "ChainState": "lmbbo_jax.search", "EvalRecord": "lmbbo_jax.search",
    "LLMConfig": "lmbbo_jax.llm",
    "Score": "lmbbo_jax.evaluator.types",
    "FewShotTask": "lmbbo_jax.data", "DatasetError": "lmbbo_jax.data",
    "FunctionProposer": "lmbbo_jax.search.custom",
    # Results.
    "ExperimentResult": "lmbbo_jax.results", "Entry": "lmbbo_jax.results",
    # Building blocks and runs.
    "build_task": "lmbbo_jax.api", "task_from_arrays": "lmbbo_jax.api",
    "load_model": "lmbbo_jax.api", "make_scorer": "lmbbo_jax.api",
    "search": "lmbbo_jax.api", "search_sync": "lmbbo_jax.api",
    "run_experiment": "lmbbo_jax.experiment", "run_comparison": "lmbbo_jax.experiment",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
  if name not in _EXPORTS:
    raise AttributeError(f"module 'lmbbo_jax' has no attribute {name!r}")
  value = getattr(importlib.import_module(_EXPORTS[name]), name)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))


# The wiring: the toy world fills the lower rooms' registries (imported on first use,
# so this costs nothing and the lower rooms never import the toy world).
from lmbbo_jax import extensions as _extensions  # noqa: E402

_extensions.register("tokenizer", "toy", "lmbbo_jax.toyworld.tokenizer:ToyTokenizer.from_file")
_extensions.register("checkpoint", "toyclip", "lmbbo_jax.toyworld.checkpoint:assets_dir")
_extensions.register("dataset", "toy:", "lmbbo_jax.toyworld.tasks:build_toy_task")
_extensions.register("hand_templates", "toy:", "lmbbo_jax.toyworld.captions:GENERIC_TEMPLATES")
