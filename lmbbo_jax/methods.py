"""The methods a run can use, behind one interface: each returns a typed `MethodRun`.

`run_method(cfg, setup)` picks the runner for `cfg.method`: the black-box search
(`search_method`: every seed's search at once under asyncio, with the LLM client when the
proposer needs one) or CoOp (`coop_method`: white-box context learning on the same cached
features). Outputs read only the `SeedOutcome`s and the public summaries they carry.
"""

from __future__ import annotations

import asyncio
import dataclasses
import pathlib
import time
from typing import Any, Sequence

from absl import logging

from lmbbo_jax import io as io_lib
from lmbbo_jax import descriptions as desc
from lmbbo_jax import templates as templates_lib
from lmbbo_jax.config import (DESCRIPTION_LLM_METHODS, DESCRIPTION_METHODS, ExperimentConfig,
                              ExperimentError)
from lmbbo_jax.evaluator import multihost
from lmbbo_jax.evaluator.types import Score
from lmbbo_jax.llm import LLMBudgetExceeded, LLMFatalError, LLMRetriesExhausted, build_client
from lmbbo_jax.search import estimate as estimate_search
from lmbbo_jax.search import make_proposer_factory, run_search
from lmbbo_jax.search.proposers import LLM_PROPOSERS
from lmbbo_jax.search.runlog import RunLog, install_signal_handlers
from lmbbo_jax.search.state import EvalRecord
from lmbbo_jax.search.tracking import PrefixedWriter


@dataclasses.dataclass
class SeedSetup:
  """One seed's inputs, built once by the experiment and shared by the methods."""
  seed: int
  task: Any
  scorer: Any
  corpus: list[str]
  features: tuple  # (features by split, labels by split): the scorer's inputs
  baselines: dict[str, Any]  # name -> results.Entry, scored before the method runs
  images_encoded: int
  encode_s: float


@dataclasses.dataclass
class SeedOutcome:
  """What a method gives for one seed.

  Attributes:
    best / initial_best: the chosen template's score and the initial pool's best (None
      for CoOp, which has no pool).
    best_chain: the chain that found the best (search only).
    records: every evaluation, in the search's deterministic order (search only).
    stop_reason / chain_stop_reasons: why the search, and each chain, stopped.
    counts: calls, rejections, ... (search: `SearchResult.counts`; CoOp: {"coop": ...}).
  """
  best: Score | None
  initial_best: Score | None = None
  best_chain: int | None = None
  records: list[EvalRecord] = dataclasses.field(default_factory=list)
  stop_reason: str = "completed"
  chain_stop_reasons: dict[int, str] = dataclasses.field(default_factory=dict)
  counts: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class MethodRun:
  """A method's outcome over every seed, with the public summaries of what it used."""
  outcomes: dict[int, SeedOutcome]
  llm: dict[str, Any]            # the ledger's summary (empty without an LLM)
  client: dict[str, Any]         # the client's (and local server's) summary
  wall_s: float


def run_method(cfg: ExperimentConfig, workdir: pathlib.Path, seeds: Sequence[SeedSetup],
               local=None, tracker=None) -> MethodRun:
  """Runs `cfg.method` on every seed (all processes call it; see `multihost`)."""
  started = time.perf_counter()
  if cfg.method == "coop":
    outcomes = coop_method(cfg, workdir, seeds)
    return MethodRun(outcomes, {}, {}, time.perf_counter() - started)
  if cfg.method in DESCRIPTION_METHODS:
    return descriptions_method(cfg, workdir, seeds, local)
  return search_method(cfg, workdir, seeds, local, tracker)


# --------------------------------------------------------------------------------------
# The black-box search.

def dry_run(cfg: ExperimentConfig) -> dict:
  """The estimated LLM calls, tokens and cost of `cfg` (nothing runs, nothing is written)."""
  from lmbbo_jax.llm import Ledger
  uses_llm = cfg.proposer_kind in LLM_PROPOSERS or cfg.method in DESCRIPTION_LLM_METHODS
  if not uses_llm:  # CoOp, edits, replay, waffle, reused descriptions: no LLM call at all.
    return {"calls": 0, "cost_usd": 0.0, "seeds": len(cfg.seeds), "proposer": cfg.proposer_kind}
  if cfg.llm.local:  # the embedded model costs nothing
    ledger = Ledger("local", prices={"local": (0.0, 0.0)})
  else:
    ledger = Ledger(cfg.llm.model, prices=cfg.llm.prices)
  if cfg.method in DESCRIPTION_LLM_METHODS:
    # At most the search's calls per seed, each at most its prompt (a few hundred tokens per
    # class batch: bounded here by the reply) and the reply's max_tokens.
    s, tokens = cfg.search, cfg.descriptions.max_tokens
    calls = len(cfg.seeds) * s.n_restart * s.n_reset * s.n_iter
    return {"calls": calls, "cost_usd": calls * ledger.cost_of(tokens, tokens),
            "seeds": len(cfg.seeds), "proposer": cfg.proposer_kind,
            "model": "local" if cfg.llm.local else cfg.llm.model}
  per_seed = estimate_search(cfg.search, ledger, max_tokens=cfg.llm.max_tokens)
  n = len(cfg.seeds)
  est = {k: (v * n if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
         for k, v in per_seed.items()}  # tokens_per_turn stays per turn
  est.update(seeds=n, model="local" if cfg.llm.local else cfg.llm.model,
             proposer=cfg.proposer_kind)
  return est


def search_method(cfg, workdir, seeds, local=None, tracker=None) -> MethodRun:
  """Process 0 searches; with several processes each scoring call is announced first and
  the others serve it until told the search ended (with its error, if it failed)."""
  return _on_leader(seeds, lambda: asyncio.run(_search_all(cfg, workdir, seeds, local, tracker)))


def _on_leader(seeds: Sequence[SeedSetup], run) -> MethodRun:
  """`run()` -> (outcomes, llm, client) on process 0; the other processes serve its
  announced scoring calls until it ends (with its error, if it failed)."""
  started = time.perf_counter()
  if not multihost.is_leader():
    try:
      multihost.serve({i: s.scorer for i, s in enumerate(seeds)})
    except multihost.LeaderStopped as e:
      raise ExperimentError(str(e)) from None
    return MethodRun({}, {}, {}, time.perf_counter() - started)
  several = multihost.process_count() > 1
  if several:
    for i, s in enumerate(seeds):
      s.scorer.lockstep = multihost.Lockstep(i).call
  try:
    outcomes, llm, client = run()
  except BaseException as e:
    if several:
      multihost.stop(error=f"{type(e).__name__}: {e}".splitlines()[0])
    raise
  finally:
    for s in seeds:
      s.scorer.lockstep = None
  if several:
    multihost.stop()
  return MethodRun(outcomes, llm, client, time.perf_counter() - started)


def llm_client(cfg: ExperimentConfig, workdir: pathlib.Path, local=None):
  """The run's LLM client: the remote endpoint, or the embedded server."""
  llm = dataclasses.replace(cfg.llm, cache_dir=cfg.llm.cache_dir or str(workdir / "llm_cache"))
  if local is None:
    return build_client(llm, workdir)
  # The local model: free, one request at a time (more would only queue inside the
  # server), and cached by the model's hash rather than by the port of this run.
  llm = dataclasses.replace(llm, base_url=local.base_url, model=local.model_alias,
                            prices={**(llm.prices or {}), local.model_alias: (0.0, 0.0)})
  if cfg.llm.max_concurrency != local.capacity:
    logging.info("--llm=local: %d request(s) in flight (the server's capacity), not %d",
                 local.capacity, cfg.llm.max_concurrency)
  # The chat format changes what the model reads, so it is part of the identity.
  identity = f"local-gguf:{local.gguf.sha256}:chat-format:{local.chat_format or 'gguf'}"
  return build_client(llm, workdir, cache_identity=identity,
                      max_concurrency=local.capacity, server_alive=local.exit_reason)


def _outcome(result) -> SeedOutcome:
  best = result.best_record
  init = result.initial_best_record
  return SeedOutcome(best=best.score if best else None,
                     initial_best=init.score if init else None,
                     best_chain=best.chain if best else None, records=list(result.records),
                     stop_reason=result.stop_reason,
                     chain_stop_reasons=dict(result.chain_stop_reasons), counts=result.counts)


async def _search_all(cfg: ExperimentConfig, workdir: pathlib.Path, seeds: Sequence[SeedSetup],
                      local=None, tracker=None):
  """All seeds' searches concurrently (LLM latency overlaps; each seed has its own scorer)."""
  kind = cfg.proposer_kind
  client = llm_client(cfg, workdir, local) if kind in LLM_PROPOSERS else None
  ledger = client.ledger if client is not None else None
  stop = asyncio.Event()
  uninstall = install_signal_handlers(stop.set)
  from tqdm.auto import tqdm
  s = cfg.search
  total = len(seeds) * s.n_restart * (s.init_pool_size + s.n_reset * s.n_iter * s.m_new)
  bar = tqdm(total=total, desc="search", unit="tpl", disable=not cfg.progress)
  best = {"acc": -1.0}

  def progress(info: dict) -> None:
    if info.get("event") != "eval":
      return
    bar.update(1)
    acc = info.get("value")
    if acc is not None and acc > best["acc"]:
      best["acc"] = acc
      bar.set_postfix_str(f"best {s.select_by} {100 * acc:.1f}%")

  outcomes: dict[int, SeedOutcome] = {}

  async def one(setup: SeedSetup):
    search_cfg = dataclasses.replace(s, seed=cfg.search_seed * 1000 + setup.seed)
    factory = make_proposer_factory(kind, search_cfg, client=client,
                                    transcript=cfg.replay_transcript, replay_seed=setup.seed)
    writer = PrefixedWriter(tracker, f"seed_{setup.seed}/") if tracker is not None else None
    with RunLog(workdir / f"seed_{setup.seed}", resume=cfg.resume) as log:
      result = await run_search(search_cfg, setup.scorer, factory, log, corpus=setup.corpus,
                                progress=progress, stop_event=stop, ledger=ledger,
                                label=f"seed {setup.seed}", writer=writer)
    outcomes[setup.seed] = _outcome(result)

  tasks = [asyncio.create_task(one(x)) for x in seeds]
  info: dict[str, Any] = {}
  try:
    await asyncio.gather(*tasks)
  except LLMFatalError as e:
    raise ExperimentError(f"the LLM endpoint refused for good: {e} (everything evaluated so "
                          "far is in the workdir; fix the cause and rerun with --resume)") from e
  finally:
    # One seed's fatal error stops the others before the client is closed.
    for t in tasks:
      t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    bar.close()
    uninstall()
    for x in seeds:
      await x.scorer.aclose()
    if client is not None:
      await client.aclose()
      info = client.summary()
      if cfg.search.reply_format != "json":
        info["structured"] = None
      if local is not None:
        info["local"] = local.describe()
  return ({x.seed: outcomes[x.seed] for x in seeds},
          ledger.summary() if ledger is not None else {}, info)


# --------------------------------------------------------------------------------------
# CoOp, the white-box comparison.

def coop_method(cfg: ExperimentConfig, workdir: pathlib.Path,
                seeds: Sequence[SeedSetup]) -> dict[int, SeedOutcome]:
  """CoOp per seed on the seed's cached features; every process trains the same context."""
  import numpy as np
  from tqdm.auto import tqdm

  from lmbbo_jax import coop
  outcomes = {}
  for setup in seeds:
    bar = tqdm(total=cfg.coop.epochs or coop.epochs_for_shots(cfg.shots),
               desc=f"CoOp seed {setup.seed}", unit="epoch", disable=not cfg.progress)

    def progress(epoch, epochs, loss, bar=bar):
      bar.update(1)
      bar.set_postfix_str(f"loss {loss:.3f}")

    try:
      out = coop.train(setup.scorer.clip, setup.task.class_names, setup.features[0],
                       setup.features[1], shots=cfg.shots,
                       seed=cfg.search_seed * 1000 + setup.seed, config=cfg.coop,
                       progress=progress)
    except coop.CoOpError as e:
      raise ExperimentError(f"CoOp: {e}") from None
    finally:
      bar.close()
    context = f"seed_{setup.seed}/coop_ctx.npy"
    if multihost.is_leader():
      (workdir / f"seed_{setup.seed}").mkdir(parents=True, exist_ok=True)
      with io_lib.atomic_writer(workdir / context, "wb") as f:
        np.save(f, out.ctx)
    outcomes[setup.seed] = SeedOutcome(
        best=Score(template=out.label, accuracy=out.accuracy, logprob={}), best_chain=0,
        counts={"coop": {"epochs": out.epochs, "steps": out.steps,
                         "loss_curve": [round(x, 5) for x in out.loss_curve],
                         "config": dataclasses.asdict(cfg.coop), "context": context}})
    logging.info("CoOp seed %d: loss %.3f -> %.3f in %d epochs; accuracy %s", setup.seed,
                 out.loss_curve[0], out.loss_curve[-1], out.epochs,
                 {k: round(v, 4) for k, v in out.accuracy.items()})
  return outcomes


# --------------------------------------------------------------------------------------
# Class descriptions: CuPL, DCLIP, WaffleCLIP and the optimized template with descriptors.

# How each method scores a class's sentences (`PromptScorer.score_descriptions`).
DESCRIPTION_MODES = {"cupl": "mean_embedding", "dclip": "mean_logit", "waffle": "mean_logit",
                     "ours_pn+descriptions": "mean_logit"}


def descriptions_method(cfg: ExperimentConfig, workdir: pathlib.Path,
                        seeds: Sequence[SeedSetup], local=None) -> MethodRun:
  """Per seed one classifier of class descriptions (lmbbo_jax/descriptions.py): LLM-written
  (cupl, dclip: at most the search's n_restart x n_reset x n_iter calls per seed), random
  (waffle: no LLM) or another run's chosen template filled with dclip's descriptors; the
  sentences are saved as seed_<s>/descriptions.json ({class name: [sentences]})."""
  def run():
    written, llm, info = ({}, {}, {})
    if cfg.method in DESCRIPTION_LLM_METHODS:
      written, llm, info = asyncio.run(_write_all(cfg, workdir, seeds, local))
    return ({s.seed: _describe(cfg, workdir, s, written.get(s.seed)) for s in seeds}, llm, info)
  return _on_leader(seeds, run)


def _describe(cfg: ExperimentConfig, workdir: pathlib.Path, setup: SeedSetup,
              written: tuple[list[list[str]], dict] | None) -> SeedOutcome:
  names = list(setup.task.class_names)
  kind = cfg.method
  counts: dict[str, Any] = {"mode": DESCRIPTION_MODES[kind]}
  seed_dir = workdir / f"seed_{setup.seed}"
  seed_dir.mkdir(parents=True, exist_ok=True)
  fallback = [desc.wordify(n) for n in names]  # a class with no description: its name
  if kind == "waffle":
    words = desc.waffle_descriptors(names, cfg.descriptions.waffle_count,
                                    seed=cfg.search_seed * 1000 + setup.seed)
    per_class = [[desc.waffle_sentence(n, d) for d in words] for n in names]
    counts["descriptors"] = words
  elif kind == "cupl":
    per_class, info = written
    counts.update(info)
  elif kind == "dclip":
    raw, info = written
    counts.update(info)
    io_lib.write_json(seed_dir / "descriptors.json", desc.artifact(names, raw))
    per_class = [[desc.dclip_sentence(n, d) for d in ds] for n, ds in zip(names, raw)]
  else:  # ours_pn+descriptions
    template, raw = _reused(cfg, workdir, setup.seed, names)
    per_class = [[desc.template_sentence(template, n, d) for d in ds] for n, ds in zip(names, raw)]
    fallback = [templates_lib.fill(template, n) for n in names]
    counts.update(template=template, reuses=[cfg.descriptions.template_from,
                                             cfg.descriptions.descriptors_from])
  # Sentences too long for the text context are left out (never truncated).
  reasons = iter(setup.scorer.sentence_reasons([s for c in per_class for s in c]))
  fits = [[s for s in sentences if next(reasons) is None] for sentences in per_class]
  counts["too_long"] = sum(len(c) for c in per_class) - sum(len(c) for c in fits)
  counts["fallback_classes"] = [names[c] for c, ok in enumerate(fits) if not ok]
  kept = [ok or [fallback[c]] for c, ok in enumerate(fits)]
  counts["sentences"] = sum(len(c) for c in kept)
  counts["artifact"] = f"seed_{setup.seed}/descriptions.json"
  io_lib.write_json(workdir / counts["artifact"], desc.artifact(names, kept))
  score = setup.scorer.score_descriptions([kept], mode=DESCRIPTION_MODES[kind],
                                          names=[f"{kind} descriptions"])[0]
  if not score.ok:
    raise ExperimentError(f"{kind}: the descriptions could not be scored: {score.rejected}")
  logging.info("%s seed %d: %d sentences, %d classes without descriptions; accuracy %s", kind,
               setup.seed, counts["sentences"], len(counts["fallback_classes"]),
               {k: round(v, 4) for k, v in score.accuracy.items()})
  return SeedOutcome(best=score, best_chain=0, counts={"descriptions": counts})


def _reused(cfg: ExperimentConfig, workdir: pathlib.Path, seed: int, names: Sequence[str]):
  """ours_pn+descriptions: (the chosen template of --descriptions_template_from's run,
  the descriptors of --descriptions_descriptors_from's run) for this seed."""
  import orjson
  d = cfg.descriptions
  results = workdir.parent / d.template_from / "results.json"
  descriptors = workdir.parent / d.descriptors_from / f"seed_{seed}" / "descriptors.json"
  try:
    best = orjson.loads(results.read_bytes())["per_seed"][str(seed)]["best"]["template"]
    raw = desc.load_artifact(orjson.loads(descriptors.read_bytes()), names)
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ExperimentError(
        f"ours_pn+descriptions reads {results} and {descriptors} ({type(e).__name__}: {e}); "
        f"run {d.template_from} and {d.descriptors_from} first in the same --methods") from None
  if not isinstance(best, str) or templates_lib.invalid_reason(best):
    raise ExperimentError(f"{results}: seed {seed} has no valid chosen template")
  return best, raw


async def _write_all(cfg: ExperimentConfig, workdir: pathlib.Path, seeds: Sequence[SeedSetup],
                     local=None):
  """Every seed's LLM-written descriptions (cupl: sentences, dclip: descriptors) per class,
  with what the calls gave; the replies are cached by the client."""
  llm_cfg = dataclasses.replace(cfg.llm, max_tokens=cfg.descriptions.max_tokens)
  client = llm_client(dataclasses.replace(cfg, llm=llm_cfg), workdir, local)
  s, d = cfg.search, cfg.descriptions
  budget = s.n_restart * s.n_reset * s.n_iter
  cupl = cfg.method == "cupl"

  async def one(setup: SeedSetup):
    names = list(setup.task.class_names)
    plan = desc.batches(len(names), len(desc.CUPL_QUESTIONS) if cupl else 1, budget,
                        d.classes_per_call)
    found: list[list[str]] = [[] for _ in names]
    failed = []

    async def ask(question: int, classes: list[int]):
      sub = [names[c] for c in classes]
      prompt = (desc.cupl_prompt(desc.CUPL_QUESTIONS[question], sub, d.per_question) if cupl
                else desc.dclip_prompt(sub))
      try:
        result = await client.chat([{"role": "user", "content": prompt}],
                                   chain_id=f"{cfg.method}-seed{setup.seed}",
                                   call_key=f"q{question}-c{classes[0]}")
      except (LLMRetriesExhausted, LLMBudgetExceeded) as e:
        failed.append(f"{type(e).__name__}: {e}")
        return
      if result.outcome != "text":
        failed.append(result.reason or result.outcome)
        return
      for j, items in desc.read_descriptions(result.text, sub).items():
        found[classes[j]].extend(items[:d.per_question] if cupl else items)

    await asyncio.gather(*(ask(q, classes) for q, classes in plan))
    return setup.seed, ([list(dict.fromkeys(f)) for f in found],
                        {"llm_calls": len(plan), "classes_per_call": max(len(c) for _, c in plan),
                         "failed_calls": failed[:20]})

  try:
    written = dict(await asyncio.gather(*(one(x) for x in seeds)))
  except LLMFatalError as e:
    raise ExperimentError(f"the LLM endpoint refused for good: {e} (the replies so far are "
                          "cached; fix the cause and rerun with --resume)") from e
  finally:
    await client.aclose()
  return written, client.ledger.summary(), client.summary()
