"""The search: hill-climbing chains, meta-prompts, reply parsing, proposers, logs.

This room does not know how templates are scored: the scorer is injected.
"""

from lmbbo_jax.search.optimizer import (PRESETS, SearchConfig, SearchResult,
                                        estimate, make_proposer_factory,
                                        run_search)
from lmbbo_jax.search.proposers import EditProposer, LLMProposer, ReplayProposer
from lmbbo_jax.search.runlog import RunLog, RunLogError, install_signal_handlers
from lmbbo_jax.search.state import (ChainState, EvalRecord, Proposal, Proposer,
                                    SearchError)
from lmbbo_jax.search.tracking import MetricWriter, MultiWriter, NullWriter, PrefixedWriter

__all__ = [
    "ChainState", "EditProposer", "EvalRecord", "LLMProposer", "MetricWriter",
    "MultiWriter", "NullWriter", "PRESETS", "PrefixedWriter", "Proposal", "Proposer",
    "ReplayProposer", "RunLog", "RunLogError", "SearchConfig", "SearchError",
    "SearchResult", "estimate",
    "install_signal_handlers", "make_proposer_factory", "run_search",
]
