"""The Python API: tasks, models, scorers, searches and whole experiments from a notebook.

    import lmbbo_jax as lb
    task = lb.build_task("toy:blurry_noisy", shots=1, seed=1)
    clip = lb.load_model("toyclip")
    scorer = lb.make_scorer(clip, task)
    scores = scorer.score(["a photo of a {}.", "a blurry photo of a {}."])
    result = lb.search_sync(scorer, "edit", workdir="runs/nb")   # or an LLM, or a function
    run = lb.run_experiment(lb.ExperimentConfig(dataset="toy:mix", workdir="runs/x"))

Every function returns typed objects (`FewShotTask`, `CLIP`, `Score`, `SearchResult`,
`ExperimentResult`); errors are `ExperimentError`, `DatasetError`, `SearchError` with
one line that says what to do. Exported from `lmbbo_jax` (`lmbbo_jax.__all__`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import pathlib
from typing import Any, Callable, Sequence

import numpy as np

from lmbbo_jax.config import ExperimentError
from lmbbo_jax.data import DatasetError, FewShotTask, Item, build_task  # noqa: F401
from lmbbo_jax.experiment import load_model as _load_model
from lmbbo_jax.experiment import scorer_for
from lmbbo_jax.llm import LLMConfig, build_client
from lmbbo_jax.search import SearchConfig, SearchResult, make_proposer_factory, run_search
from lmbbo_jax.search.custom import FunctionProposer
from lmbbo_jax.search.proposers import LLM_PROPOSERS
from lmbbo_jax.search.runlog import RunLog


def task_from_arrays(class_names: Sequence[str], train: tuple[Any, Any],
                     val: tuple[Any, Any] | None = None, test: tuple[Any, Any] | None = None,
                     *, name: str = "arrays", seed: int = 0) -> FewShotTask:
  """A task from a user's own images: each split is (uint8 images [N, H, W, 3], labels [N]).

  Items are named by a hash of their pixels, so the image-feature cache never confuses
  two arrays.
  """
  arrays: dict[str, np.ndarray] = {}

  def items(split: str, pair) -> list[Item]:
    if pair is None:
      return []
    images, labels = np.asarray(pair[0]), np.asarray(pair[1])
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) != len(labels):
      raise DatasetError(f"{split}: give (images [N, H, W, 3], labels [N]); got shapes "
                         f"{images.shape} and {labels.shape}")
    out = []
    for image, label in zip(images, labels):
      image = np.ascontiguousarray(image, dtype=np.uint8)
      ref = f"array:{hashlib.sha256(image.tobytes()).hexdigest()[:24]}:{image.shape}"
      arrays[ref] = image
      out.append(Item(ref, int(label)))
    return out

  train_items = items("train", train)
  counts = np.bincount([it.label for it in train_items], minlength=len(class_names))
  return FewShotTask(name, list(class_names), train_items, items("val", val),
                     items("test", test), shots=int(counts.max()) if len(counts) else 0,
                     seed=seed, loader=lambda item: arrays[item.ref], source="arrays")


def load_model(source: str, dtype: str = "float32", cache_dir: str | None = None):
  """A CLIP (`models.api.CLIP`) for `source` as `--model` takes it: a named architecture
  (RN50, ViT-B/32, ...), a hub id, a local checkpoint, `toyclip` or `random:<arch>`."""
  return _load_model(source, dtype, cache_dir)


def make_scorer(clip, task: FewShotTask, *, cache_dir: str | None = None,
                batch_size: int = 64, progress: bool = False):
  """A `PromptScorer` for `task` on `clip`: the images are encoded once (and cached in
  `cache_dir` when given); then `.score(templates)`, `.score_ensemble(groups)` and
  `await .score_async(templates)` cost one text encode each."""
  return scorer_for(clip, task, {}, cache_dir=cache_dir, batch_size=batch_size,
                    progress=progress)[0]


async def search(scorer, proposer: str | Any | Callable = "edit", *, workdir: str,
                 config: SearchConfig | None = None, llm: LLMConfig | None = None,
                 corpus: Sequence[str] | None = None, resume: bool = False) -> SearchResult:
  """Runs the paper's hill-climbing search on `scorer` and returns its `SearchResult`.

  Args:
    scorer: a `PromptScorer` (or anything with `score_async`).
    proposer: "llm" (the paper's), "ape", "iterative_ape" (these need `llm`), "edit"
      (offline edits), a `search.Proposer`, or a function `(ranked) -> templates` or
      `(ranked, state) -> templates`, plain or async.
    workdir: where the append-only logs go (`resume=True` continues them).
    config: the search's settings (default `SearchConfig()`, the official code's).
    llm: an OpenAI-compatible endpoint (`LLMConfig(base_url=..., model=...,
      api_key_env=...)`), for the LLM proposers.
    corpus: initial templates (default: the built-in generic pool).
  """
  config = config or SearchConfig()
  config.validate()
  client = None
  if isinstance(proposer, str):
    if proposer in LLM_PROPOSERS:
      if llm is None or not llm.base_url:
        raise ExperimentError(f"proposer {proposer!r} needs llm=LLMConfig(base_url=...)")
      llm = dataclasses.replace(llm, cache_dir=llm.cache_dir or f"{workdir}/llm_cache")
      client = build_client(llm, pathlib.Path(workdir))
    factory = make_proposer_factory(proposer, config, client=client)
  elif hasattr(proposer, "propose"):
    factory = lambda chain: proposer  # noqa: E731
  elif callable(proposer):
    wrapped = FunctionProposer(proposer)
    factory = lambda chain: wrapped  # noqa: E731
  else:
    raise ExperimentError("proposer: give a name, a Proposer or a function")
  try:
    with RunLog(pathlib.Path(workdir), resume=resume) as log:
      return await run_search(config, scorer, factory, log, corpus=corpus,
                              ledger=client.ledger if client is not None else None)
  finally:
    if client is not None:
      await client.aclose()
    close = getattr(scorer, "aclose", None)
    if close is not None:
      await close()


def search_sync(scorer, proposer: str | Any | Callable = "edit", **kwargs) -> SearchResult:
  """`search` outside an event loop (scripts); in a notebook, `await search(...)`."""
  return asyncio.run(search(scorer, proposer, **kwargs))
