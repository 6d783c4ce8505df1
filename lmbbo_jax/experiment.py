"""One experiment end to end: tasks, model, image features, baselines, search, outputs.

`main.py` turns flags into an `ExperimentConfig` and calls `run_experiment`.
Layout of `workdir`:

  results.json        the machine-readable result (schema: `RESULTS_SCHEMA`)
  prompts.jsonl       every evaluated template of every seed (`seed` field added)
  transcript.jsonl    every LLM turn of every seed
  prompts.csv, accuracy.png, summary.md
  seed_<s>/           the durable per-seed search logs (resume reads these)
  llm_cache/, llm_usage.jsonl   LLM responses and usage (when an LLM is used)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import pathlib
import platform
import shutil
import statistics
import sys
import time
from typing import Any, Sequence

import orjson
from absl import logging

from lmbbo_jax import io as io_lib
from lmbbo_jax import report
from lmbbo_jax.coop import CoOpConfig
from lmbbo_jax.evaluator import multihost
from lmbbo_jax import templates as templates_lib
from lmbbo_jax.llm import LLMConfig, LLMFatalError, build_client
from lmbbo_jax.search import SearchConfig, make_proposer_factory, run_search
from lmbbo_jax.search import estimate as estimate_search
from lmbbo_jax.search.proposers import LLM_PROPOSERS
from lmbbo_jax.search.pool import builtin_corpus, load_caption_file, load_template_file
from lmbbo_jax.search.runlog import RunLog, install_signal_handlers
from lmbbo_jax.search.state import rank_key, selection_key

PHOTO = templates_lib.PHOTO
EMPTY = "{}"
RESULTS_SCHEMA = 1
# What a run does: the black-box search (with --proposer), or CoOp's white-box
# prompt learning on the same cached features (lmbbo_jax/coop.py).
METHODS = ("search", "coop")
# Baselines a run can score beside the search (`--baselines`).
# hand_best is picked by the selection split; hand_oracle by test accuracy, as the
# paper's hand-engineered row was (an oracle: reported, never used by the search).
BASELINES = ("empty", "photo", "hand_best", "hand_oracle", "hand_ensemble", "pool_best")
# Fields every per-template entry of results.json carries.
ENTRY_FIELDS = ("template", "train_acc", "val_acc", "test_acc")


class ExperimentError(RuntimeError):
  """A user-facing failure: one line that says what is wrong and what to do."""


@dataclasses.dataclass
class ExperimentConfig:
  """Everything one run needs (flags map onto this one-to-one)."""
  dataset: str
  workdir: str
  shots: int = 1
  seeds: tuple[int, ...] = (1, 2, 3)
  data_dir: str | None = None
  max_test_per_class: int | None = None
  model: str = "RN50"
  dtype: str = "float32"
  model_cache_dir: str | None = None
  image_batch_size: int = 64
  feature_cache_dir: str | None = None
  method: str = "search"
  coop: CoOpConfig = dataclasses.field(default_factory=CoOpConfig)
  proposer: str = "auto"
  search: SearchConfig = dataclasses.field(default_factory=SearchConfig)
  search_seed: int = 0
  init_pool: str = "builtin"
  replay_transcript: str | None = None
  llm: LLMConfig = dataclasses.field(default_factory=LLMConfig)
  baselines: tuple[str, ...] = BASELINES
  transfer_to: tuple[str, ...] = ()
  resume: bool = False
  overwrite: bool = False
  dry_run: bool = False
  profile_dir: str | None = None
  progress: bool = True

  @property
  def proposer_kind(self) -> str:
    if self.method == "coop":
      return "coop"
    if self.proposer != "auto":
      return self.proposer
    return "llm" if (self.llm.base_url or self.llm.local) else "edit"

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d["proposer_kind"] = self.proposer_kind
    d["seeds"] = list(self.seeds)
    d["baselines"] = list(self.baselines)
    d["transfer_to"] = list(self.transfer_to)
    d["select_by"] = self.search.select_by
    return d


# --------------------------------------------------------------------------------------
# Set-up: workdir, tasks and model, with failures reported as one line each.

def _prepare_workdir(cfg: ExperimentConfig) -> pathlib.Path:
  workdir = pathlib.Path(cfg.workdir)
  results = workdir / "results.json"
  if results.exists() and not (cfg.resume or cfg.overwrite):
    raise ExperimentError(
        f"{workdir} already holds a finished run (results.json); pass --resume to "
        "continue it, --overwrite to replace it, or choose another --workdir")
  has_logs = any(workdir.glob("seed_*/prompts.jsonl"))
  if has_logs and not (cfg.resume or cfg.overwrite):
    raise ExperimentError(
        f"{workdir} holds an unfinished run; pass --resume to continue it (no LLM call "
        "is repeated) or --overwrite to start again")
  if cfg.overwrite and workdir.exists():
    for child in workdir.iterdir():
      if child.name == "llm_cache":
        continue  # Paid-for replies stay reusable.
      shutil.rmtree(child) if child.is_dir() else child.unlink()
  workdir.mkdir(parents=True, exist_ok=True)
  return workdir


def _build_tasks(cfg: ExperimentConfig):
  from lmbbo_jax.data import DatasetError, build_task
  try:
    return {s: build_task(cfg.dataset, cfg.shots, s, data_dir=cfg.data_dir,
                          max_test_per_class=cfg.max_test_per_class) for s in cfg.seeds}, None
  except DatasetError as e:
    return None, f"data: {e}"


def _load_model(cfg: ExperimentConfig, source: str | None = None):
  """(CLIP, None) for `source` (default: --model) in the run's dtype, or (None, error)."""
  import jax.numpy as jnp
  from lmbbo_jax.models import CheckpointError, load_clip
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[cfg.dtype]
  try:
    return load_clip(source or cfg.model, dtype=dtype, cache_dir=cfg.model_cache_dir), None
  except CheckpointError as e:
    return None, f"weights: {e}"


def _text_encoders(clip, tasks, mesh=None) -> dict:
  """One text encoder per class list, shared by the seeds: its programs compile once,
  in a background thread while the images are encoded."""
  from lmbbo_jax.evaluator.text_encoder import PackedTextEncoder
  encoders = {}
  for task in tasks:
    names = tuple(task.class_names)
    if names not in encoders:
      encoders[names] = PackedTextEncoder(clip, names, mesh=mesh)
      encoders[names].precompile()
  return encoders


def _corpus(cfg: ExperimentConfig, class_names: Sequence[str]) -> list[str]:
  if cfg.init_pool == "builtin":
    return builtin_corpus()
  path = cfg.init_pool
  if not os.path.exists(path):
    raise ExperimentError(f"--init_pool={path!r} does not exist; pass builtin or a "
                          "caption/template file (one per line)")
  # A file of templates (with {}) is used as is; captions get a class word replaced.
  with open(path, encoding="utf-8", errors="replace") as f:
    head = f.read(65536)
  if "{}" in head:
    return load_template_file(path)
  return load_caption_file(path, class_words=list(class_names))


# --------------------------------------------------------------------------------------
# Scoring helpers.

def _entry(score, **extra) -> dict:
  acc = score.accuracy if score is not None else {}
  out = {"template": score.template if score is not None else None,
         "train_acc": acc.get("train"), "val_acc": acc.get("val"),
         "test_acc": acc.get("test")}
  if score is not None and score.logprob:
    out["train_logprob"] = score.logprob.get("train")
  out.update(extra)
  return out


def _baselines(cfg: ExperimentConfig, scorer, task) -> dict[str, dict]:
  """Hand-made baselines scored in the same run (pool_best comes from the search)."""
  from lmbbo_jax.data import hand_templates
  out: dict[str, dict] = {}
  singles = {"empty": EMPTY, "photo": PHOTO}
  wanted = [b for b in singles if b in cfg.baselines]
  for name, score in zip(wanted, scorer.score([singles[b] for b in wanted])):
    out[name] = _entry(score)
  if {"hand_best", "hand_oracle", "hand_ensemble"} & set(cfg.baselines):
    try:
      hand = hand_templates(cfg.dataset)
    except Exception as e:  # A dataset without CLIP's hand-engineered templates.
      hand = []
      logging.info("no hand-engineered templates for %s (%s); skipping those baselines",
                   cfg.dataset, e)
    if hand:
      scores = [s for s in scorer.score(hand) if s.ok]
      if "hand_best" in cfg.baselines and scores:
        best = min(scores, key=lambda s: selection_key(
            s.accuracy, s.logprob, cfg.search.select_by, cfg.search.tie_break))
        out["hand_best"] = _entry(best, n_templates=len(hand))
      if "hand_oracle" in cfg.baselines and scores:
        oracle = max(scores, key=lambda s: s.accuracy.get("test", -1.0))
        out["hand_oracle"] = _entry(oracle, n_templates=len(hand), oracle="test")
      if "hand_ensemble" in cfg.baselines:
        ens = scorer.score_ensemble([hand])[0]
        out["hand_ensemble"] = _entry(ens, template=f"ensemble of {len(hand)} templates",
                                      n_templates=len(hand))
  return out


# --------------------------------------------------------------------------------------
# The run.

@dataclasses.dataclass
class _SeedRun:
  seed: int
  task: Any
  scorer: Any
  baselines: dict
  images_encoded: int
  encode_s: float
  scorer_inputs: tuple = ()
  result: Any = None


def _versions(clip) -> dict:
  import flax
  import jax
  from lmbbo_jax import __version__
  dev = jax.devices()[0]
  return {"lmbbo_jax": __version__, "python": platform.python_version(),
          "jax": jax.__version__, "flax": flax.__version__,
          "device_kind": dev.device_kind, "platform": dev.platform,
          "device_count": jax.device_count(), "process_count": jax.process_count()}


def _git_commit() -> str | None:
  head = pathlib.Path(__file__).resolve().parent.parent / ".git" / "HEAD"
  try:
    ref = head.read_text().strip()
    if ref.startswith("ref: "):
      return (head.parent / ref[5:]).read_text().strip()
    return ref
  except OSError:
    return None


def run_experiment(cfg: ExperimentConfig) -> dict:
  """Runs (or resumes) the experiment and writes every output; returns results.json's dict."""
  cfg.search.validate()
  if cfg.method not in METHODS:
    raise ExperimentError(f"--method={cfg.method!r}: use one of {', '.join(METHODS)}")
  kind = cfg.proposer_kind
  if kind in LLM_PROPOSERS and not (cfg.llm.base_url or cfg.llm.local):
    raise ExperimentError(f"--proposer={kind} needs an LLM: --llm=local (embedded llama.cpp "
                          "server) or --llm_base_url (e.g. https://api.openai.com/v1 or a "
                          "vLLM/Ollama server); or use --proposer=edit offline")
  local, local_error = None, None
  if kind in LLM_PROPOSERS and cfg.llm.local and not cfg.dry_run and multihost.is_leader():
    try:
      local = _local_server(cfg)  # fails in seconds, before any heavy work
    except ExperimentError as e:
      if multihost.process_count() == 1:
        raise
      local_error = str(e)  # told to the other processes at the run's first check
  if kind == "replay" and not cfg.replay_transcript:
    raise ExperimentError("--proposer=replay needs --replay_transcript=<run>/transcript.jsonl")

  if cfg.dry_run:
    return _dry_run(cfg)
  with contextlib.ExitStack() as stack:
    if local is not None:
      stack.callback(local.stop)  # also on Ctrl-C and on any error
    return _run(cfg, kind, local, local_error)


# The paper's comparison (Table 1 and its ablations): each named method is the run's
# config with these changes, run into <workdir>/<name> on the same tasks, model,
# cached image features and call budget (`run_comparison`).
COMPARISON: dict[str, dict[str, Any]] = {
    "llm_no_feedback": {"proposer": "llm", "search": {"feedback": "none"}},
    "ape": {"proposer": "ape"},
    "iterative_ape": {"proposer": "iterative_ape"},
    "ours_p": {"proposer": "llm", "search": {"feedback": "pos"}},
    "ours_n": {"proposer": "llm", "search": {"feedback": "neg"}},
    "ours_pn": {"proposer": "llm", "search": {"feedback": "pos_neg"}},
    "coop": {"method": "coop"},
}


def comparison_config(cfg: ExperimentConfig, name: str) -> ExperimentConfig:
  """The config of method `name` of the comparison (see `COMPARISON`)."""
  if name not in COMPARISON:
    raise ExperimentError(f"--methods: unknown method {name!r}; use some of "
                          f"{','.join(COMPARISON)}")
  change = dict(COMPARISON[name])
  search = dataclasses.replace(cfg.search, **change.pop("search", {}))
  workdir = pathlib.Path(cfg.workdir)
  return dataclasses.replace(
      cfg, workdir=str(workdir / name), search=search,
      feature_cache_dir=cfg.feature_cache_dir or str(workdir / "feature_cache"), **change)


def run_comparison(cfg: ExperimentConfig, names: Sequence[str]) -> dict[str, dict]:
  """Runs each named method into <workdir>/<name>, then the comparison table and plot.

  With --resume a method whose run finished is read back, not run again.
  """
  configs = {name: comparison_config(cfg, name) for name in names}
  out = {}
  for name, sub in configs.items():
    done = pathlib.Path(sub.workdir) / "results.json"
    if cfg.resume and multihost.broadcast(done.exists()):
      logging.info("comparison: %s finished earlier; reading %s", name, done)
      out[name] = multihost.broadcast(orjson.loads(done.read_bytes())
                                      if multihost.is_leader() else None)
      continue
    logging.info("comparison: running %s into %s", name, sub.workdir)
    out[name] = run_experiment(sub)
  if not cfg.dry_run and multihost.is_leader():
    report.write_comparison([pathlib.Path(c.workdir) for c in configs.values()],
                            pathlib.Path(cfg.workdir))
  return out


def _local_server(cfg: ExperimentConfig):
  """The embedded llama.cpp server for --llm=local (not started yet)."""
  from lmbbo_jax.llm.local_server import LocalLLMError, LocalLLMServer
  try:
    return LocalLLMServer(cfg.llm.gguf, n_ctx=cfg.llm.n_ctx,
                          chat_format=cfg.llm.chat_format,
                          log_path=os.path.join(cfg.workdir, "llm_server.log"))
  except LocalLLMError as e:
    raise ExperimentError(str(e)) from None


def _run(cfg: ExperimentConfig, kind: str, local, local_error: str | None = None) -> dict:
  # Data and weights are both checked before any heavy work, and reported together.
  tasks, data_err = _build_tasks(cfg)
  clip, model_err = _load_model(cfg)
  if data_err or model_err:
    raise ExperimentError("; ".join(e for e in (data_err, model_err) if e))
  # A bad --init_pool or workdir fails here, before any image is encoded. With several
  # processes, process 0 holds the pool and the workdir and says so to the others.
  from lmbbo_jax.search.pool import PoolError
  corpora, workdir, error = {}, pathlib.Path(cfg.workdir), None
  started = time.time()
  if multihost.is_leader():
    from lmbbo_jax.llm.local_server import LocalLLMError
    try:
      if local_error:
        raise ExperimentError(local_error)
      corpora = {s: _corpus(cfg, t.class_names) for s, t in tasks.items()}
      workdir = _prepare_workdir(cfg)
      if local is not None:
        local.start()  # loads in about a second; serves while the images are encoded
    except (PoolError, ExperimentError, LocalLLMError) as e:
      error = str(e)
  error = multihost.broadcast(error)
  if error:
    raise ExperimentError(error)
  several = multihost.process_count() > 1
  logging.info("model %s (%s, weights %s), dataset %s, %d-shot, seeds %s, proposer %s",
               clip.name, cfg.dtype, clip.weights_hash[:12], cfg.dataset, cfg.shots,
               list(cfg.seeds), kind)

  from lmbbo_jax.evaluator import features as features_lib
  from lmbbo_jax.evaluator.scorer import PromptScorer
  from lmbbo_jax.evaluator.sharding import make_mesh
  mesh = make_mesh()
  cache_dir = cfg.feature_cache_dir or str(workdir / "feature_cache")
  encoders = _text_encoders(clip, tasks.values(), mesh)
  runs: list[_SeedRun] = []
  for seed, task in tasks.items():
    t0 = time.perf_counter()
    feats = features_lib.encode_task(clip, task, mesh=mesh, batch_size=cfg.image_batch_size,
                                     cache_dir=cache_dir, progress=cfg.progress)
    encode_s = time.perf_counter() - t0
    n_images = sum(f.num_valid for f in feats.values())
    fb, lb = features_lib.scorer_inputs(feats)
    scorer = PromptScorer(clip, fb, lb, task.class_names, mesh=mesh,
                          text_encoder=encoders[tuple(task.class_names)])
    logging.info("seed %d: %s images encoded in %.1fs (%s)", seed, n_images, encode_s,
                 {s: f.num_valid for s, f in feats.items()})
    runs.append(_SeedRun(seed, task, scorer, _baselines(cfg, scorer, task), n_images, encode_s,
                         scorer_inputs=(fb, lb)))

  profile = (_profile(cfg.profile_dir) if cfg.profile_dir else contextlib.nullcontext())
  t_search = time.perf_counter()
  with profile:
    if cfg.method == "coop":  # Every process trains the same context (the same calls).
      ledger, intervals, client_info = None, [], {}
      _train_coop(cfg, workdir, clip, runs)
    elif multihost.is_leader():
      ledger, intervals, client_info = _lead_search(cfg, workdir, runs, corpora, local,
                                                    several)
    else:  # Runs process 0's scoring calls until its search ends.
      try:
        multihost.serve({i: r.scorer for i, r in enumerate(runs)})
      except multihost.LeaderStopped as e:
        raise ExperimentError(str(e)) from None
  search_s = time.perf_counter() - t_search
  results = None
  if multihost.is_leader():
    results = _results(cfg, clip, runs, ledger, search_s, time.time() - started,
                       _union_length(intervals), client_info)
    tp = results["throughput"]
    logging.info("scoring: %d templates in %.1f s, %d programs compiled in %.1f s (%.1f s of "
                 "it while scoring, the rest in the background)", tp["templates_scored"],
                 tp["scoring_busy_s"], tp["compiles"], tp["compile_s_total"], tp["compile_s"])
    _write_outputs(workdir, results, runs)
  if cfg.transfer_to:  # After the run's own outputs are safe.
    chosen = multihost.broadcast(_chosen_templates(results) if results else None)
    transfer = _transfer(cfg, runs, chosen, cache_dir)
    if multihost.is_leader():
      results["transfer"] = transfer
      _write_outputs(workdir, results, runs)
  return results if multihost.is_leader() else {}


def _lead_search(cfg, workdir, runs, corpora, local, several: bool):
  """Process 0's search; with several processes each scoring call is announced first,
  and the others are told when it ends (with its error, if it failed)."""
  if several:
    for i, r in enumerate(runs):
      r.scorer.lockstep = multihost.Lockstep(i).call
  try:
    out = asyncio.run(_search_all(cfg, workdir, runs, corpora, local))
  except BaseException as e:
    if several:
      multihost.stop(error=f"{type(e).__name__}: {e}".splitlines()[0])
    raise
  finally:
    for r in runs:
      r.scorer.lockstep = None
  if several:
    multihost.stop()
  return out


def _train_coop(cfg: ExperimentConfig, workdir: pathlib.Path, clip, runs: list[_SeedRun]):
  """CoOp per seed on the seed's cached features; its result takes the search's place."""
  import numpy as np
  from tqdm.auto import tqdm

  from lmbbo_jax import coop
  from lmbbo_jax.search.optimizer import SearchResult
  from lmbbo_jax.search.state import EvalRecord
  for run in runs:
    bar = tqdm(total=cfg.coop.epochs or coop.epochs_for_shots(cfg.shots),
               desc=f"CoOp seed {run.seed}", unit="epoch", disable=not cfg.progress)

    def progress(epoch, epochs, loss, bar=bar):
      bar.update(1)
      bar.set_postfix_str(f"loss {loss:.3f}")

    t0 = time.perf_counter()
    try:
      out = coop.train(clip, run.task.class_names, run.scorer_inputs[0], run.scorer_inputs[1],
                       shots=cfg.shots, seed=cfg.search_seed * 1000 + run.seed,
                       config=cfg.coop, progress=progress)
    except coop.CoOpError as e:
      raise ExperimentError(f"CoOp: {e}") from None
    finally:
      bar.close()
    if multihost.is_leader():
      seed_dir = workdir / f"seed_{run.seed}"
      seed_dir.mkdir(parents=True, exist_ok=True)
      with io_lib.atomic_writer(seed_dir / "coop_ctx.npy", "wb") as f:
        np.save(f, out.ctx)
    record = EvalRecord(template=out.label, accuracy=out.accuracy, logprob={}, rejected=None,
                        chain=0, reset=None, iteration=None, step=0, seq=0, proposer="coop")
    run.result = SearchResult(
        best=record.score, best_record=record, initial_best=None, initial_best_record=None,
        best_per_chain={0: record}, records=[], stop_reason="completed",
        elapsed_s=time.perf_counter() - t0,
        counts={"coop": {"epochs": out.epochs, "steps": out.steps,
                         "loss_curve": [round(x, 5) for x in out.loss_curve],
                         "config": dataclasses.asdict(cfg.coop),
                         "context": "seed_%d/coop_ctx.npy" % run.seed}})
    logging.info("CoOp seed %d: loss %.3f -> %.3f in %d epochs; accuracy %s", run.seed,
                 out.loss_curve[0], out.loss_curve[-1], out.epochs,
                 {k: round(v, 4) for k, v in out.accuracy.items()})


_ENSEMBLE_ROW = "baseline:hand_ensemble"


def _chosen_templates(results: dict) -> dict[str, dict[str, str | None]]:
  """Per seed, what `--transfer_to` scores: the chosen template of each row (best, initial
  best, each baseline), and `_ENSEMBLE_ROW` (None) when the run scored that ensemble."""
  out = {}
  for seed, ps in results["per_seed"].items():
    rows = {"best": ps["best"], "initial_best": ps["initial_best"],
            **{f"baseline:{k}": v for k, v in ps["baselines"].items() if k != "hand_ensemble"}}
    out[seed] = {k: v["template"] for k, v in rows.items()
                 if v and v.get("template") and templates_lib.invalid_reason(v["template"]) is None}
    if "hand_ensemble" in ps["baselines"]:
      out[seed][_ENSEMBLE_ROW] = None
  return out


def _transfer(cfg: ExperimentConfig, runs: list[_SeedRun],
              chosen_by_seed: dict[str, dict[str, str | None]], cache_dir: str) -> dict:
  """Each seed's chosen templates and baselines scored on other backbones, as chosen.

  Nothing is re-selected: the template the search picked on the run's model (and each
  baseline's template) is scored on every `--transfer_to` model. CoOp's learned
  context lives in its own backbone's embedding space and does not transfer.
  """
  from lmbbo_jax.data import hand_templates
  from lmbbo_jax.evaluator import features as features_lib
  from lmbbo_jax.evaluator.scorer import PromptScorer
  out = {}
  for source in cfg.transfer_to:
    clip, error = _load_model(cfg, source)
    if error:
      raise ExperimentError(f"--transfer_to={source}: {error} (the run's own results are "
                            "written; rerun with --resume to add the transfer)")
    encoders = _text_encoders(clip, [r.task for r in runs])
    per_seed = {}
    for run in runs:
      feats = features_lib.encode_task(clip, run.task, batch_size=cfg.image_batch_size,
                                       cache_dir=cache_dir, progress=cfg.progress)
      fb, lb = features_lib.scorer_inputs(feats)
      scorer = PromptScorer(clip, fb, lb, run.task.class_names,
                            text_encoder=encoders[tuple(run.task.class_names)])
      chosen = dict(chosen_by_seed[str(run.seed)])
      ensemble = chosen.pop(_ENSEMBLE_ROW, "") is None
      entries = dict(zip(chosen, map(_entry, scorer.score(list(chosen.values())))))
      if ensemble:
        hand = hand_templates(cfg.dataset)
        entries[_ENSEMBLE_ROW] = _entry(
            scorer.score_ensemble([hand])[0], template=f"ensemble of {len(hand)} templates")
      scorer.close()
      per_seed[str(run.seed)] = entries
    names = sorted({k for e in per_seed.values() for k in e})
    out[source] = {
        "model": {"name": clip.name, "source": clip.source, "weights_hash": clip.weights_hash},
        "per_seed": per_seed,
        "aggregate": {k: _aggregate([e.get(k) or {} for e in per_seed.values()])
                      for k in names}}
    logging.info("transfer to %s: %s", source, {
        k: round(v.get("test_acc", {}).get("mean", float("nan")), 4)
        for k, v in out[source]["aggregate"].items()})
  return out


def _union_length(intervals) -> float:
  """Total time covered by possibly overlapping (start, end) intervals."""
  total, end = 0.0, float("-inf")
  for a, b in sorted(intervals):
    if b > end:
      total += b - max(a, end)
      end = b
  return total


def _profile(profile_dir: str):
  import jax
  os.makedirs(profile_dir, exist_ok=True)
  return jax.profiler.trace(profile_dir)


def _llm_client(cfg: ExperimentConfig, workdir: pathlib.Path, local):
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


async def _search_all(cfg: ExperimentConfig, workdir: pathlib.Path, runs: list[_SeedRun],
                      corpora: dict[int, list[str]], local=None):
  """All seeds' searches concurrently (LLM latency overlaps; each seed has its own scorer)."""
  kind = cfg.proposer_kind
  client = _llm_client(cfg, workdir, local) if kind in LLM_PROPOSERS else None
  ledger = client.ledger if client is not None else None
  stop = asyncio.Event()
  uninstall = install_signal_handlers(stop.set)
  from tqdm.auto import tqdm
  total = sum(cfg.search.n_restart * (cfg.search.init_pool_size
                                      + cfg.search.n_reset * cfg.search.n_iter * cfg.search.m_new)
              for _ in runs)
  bar = tqdm(total=total, desc="search", unit="tpl", disable=not cfg.progress)
  best = {"acc": -1.0}

  def progress(info: dict) -> None:
    if info.get("event") != "eval":
      return
    bar.update(1)
    acc = info.get("value")
    if acc is not None and acc > best["acc"]:
      best["acc"] = acc
      bar.set_postfix_str(f"best {cfg.search.select_by} {100 * acc:.1f}%")

  async def one(run: _SeedRun):
    search_cfg = dataclasses.replace(cfg.search, seed=cfg.search_seed * 1000 + run.seed)
    corpus = corpora[run.seed]
    factory = make_proposer_factory(kind, search_cfg, client=client,
                                    transcript=cfg.replay_transcript, replay_seed=run.seed)
    with RunLog(workdir / f"seed_{run.seed}", resume=cfg.resume) as log:
      run.result = await run_search(search_cfg, run.scorer, factory, log, corpus=corpus,
                                    progress=progress, stop_event=stop, ledger=ledger,
                                    label=f"seed {run.seed}")

  tasks = [asyncio.create_task(one(r)) for r in runs]
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
    intervals = []
    for r in runs:
      front = r.scorer.front
      if front is not None:
        intervals += front.intervals
        await front.aclose()
    info = {}
    if client is not None:
      await client.aclose()
      info = {"structured": client.structured if cfg.search.reply_format == "json" else None,
              "structured_refused": client.structured_refused,
              "max_concurrency": client.max_concurrency,
              "rate_limit": client.rate_limiter.summary() if client.rate_limiter else None}
      if local is not None:
        info["local"] = local.describe()
  return ledger, intervals, info


def _dry_run(cfg: ExperimentConfig) -> dict:
  from lmbbo_jax.llm import Ledger
  if cfg.proposer_kind not in LLM_PROPOSERS:  # CoOp, edits, replay: no LLM call at all.
    return {"dry_run": {"calls": 0, "cost_usd": 0.0, "seeds": len(cfg.seeds),
                        "proposer": cfg.proposer_kind}}
  if cfg.llm.local:  # the embedded model costs nothing
    ledger = Ledger("local", prices={"local": (0.0, 0.0)})
  else:
    ledger = Ledger(cfg.llm.model, prices=cfg.llm.prices)
  per_seed = estimate_search(cfg.search, ledger, max_tokens=cfg.llm.max_tokens)
  n = len(cfg.seeds)
  est = {k: (v * n if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
         for k, v in per_seed.items()}  # tokens_per_turn stays per turn
  est.update(seeds=n, model="local" if cfg.llm.local else cfg.llm.model,
             proposer=cfg.proposer_kind)
  return {"dry_run": est}


# --------------------------------------------------------------------------------------
# Results.

def _proposer_accounting(runs: list[_SeedRun]) -> dict:
  """Calls, valid new templates per call and per request, rejections, cut replies."""
  from lmbbo_jax.search.optimizer import sum_chain_counts
  return sum_chain_counts([c for r in runs
                           for c in (r.result.counts.get("per_chain") or {}).values()])


def _aggregate(entries: Sequence[dict]) -> dict:
  """Mean and std over seeds of each split's accuracy in `entries`."""
  vals = {}
  for split in ("train_acc", "val_acc", "test_acc"):
    xs = [e.get(split) for e in entries if e]
    xs = [x for x in xs if x is not None]
    if xs:
      vals[split] = {"mean": statistics.fmean(xs),
                     "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}
  return vals


def _results(cfg, clip, runs: list[_SeedRun], ledger, search_s: float, wall_s: float,
             search_busy_s: float, client_info: dict | None = None) -> dict:
  per_seed, n_eval = {}, 0
  counts_total: dict[str, Any] = {}
  for r in runs:
    res = r.result
    best = res.best_record
    init = res.initial_best_record
    baselines = dict(r.baselines)
    if "pool_best" in cfg.baselines and init is not None:
      baselines["pool_best"] = _entry(init.score)
    per_seed[str(r.seed)] = {
        "best": _entry(best.score if best else None, chain=best.chain if best else None),
        "initial_best": _entry(init.score if init else None),
        "baselines": baselines,
        "stop_reason": res.stop_reason,
        "chain_stop_reasons": {str(c): v for c, v in sorted(res.chain_stop_reasons.items())},
        "counts": res.counts,
        "task": r.task.describe() if hasattr(r.task, "describe") else {},
    }
    n_eval += sum(1 for rec in res.records if rec.ok)
    for k, v in res.counts.items():
      if isinstance(v, (int, float)):
        counts_total[k] = counts_total.get(k, 0) + v

  # The overall best: the seeds' bests ranked by the selection rule (never test).
  with_best = [r for r in runs if r.result.best_record is not None]
  rule = (cfg.search.select_by, cfg.search.tie_break)
  best_run = (min(with_best, key=lambda r: rank_key(r.result.best_record, *rule))
              if with_best else runs[0])
  best_seed, best_ps = str(best_run.seed), per_seed[str(best_run.seed)]

  def agg(getter) -> dict:
    return _aggregate([getter(ps) for ps in per_seed.values()])

  aggregate = {"best": agg(lambda ps: ps["best"]),
               "initial_best": agg(lambda ps: ps["initial_best"])}
  names = sorted({b for ps in per_seed.values() for b in ps["baselines"]})
  aggregate["baselines"] = {b: agg(lambda ps, b=b: ps["baselines"].get(b) or {}) for b in names}

  stats = [r.scorer.stats() for r in runs]
  templates_scored = sum(s.get("templates", 0) + s.get("ensembles", 0) for s in stats)
  busy = sum(s.get("seconds_busy", 0.0) for s in stats)
  # Scoring's share of compiling: compiles it ran or waited for (the rest ran in the
  # background while images were encoded); programs are counted once per encoder.
  compile_s = sum(s.get("seconds_compile", 0.0) for s in stats)
  programs = {id(r.scorer.text_encoder): r.scorer.text_encoder.programs for r in runs}
  encode_s = sum(r.encode_s for r in runs)
  images = sum(r.images_encoded for r in runs)
  llm = ledger.summary() if ledger is not None else {}
  throughput = {
      # Scoring throughput while scoring, one-time compilation excluded (see compile_s).
      "templates_per_s": templates_scored / max(busy - compile_s, 1e-9) if busy else 0.0,
      "templates_per_s_incl_compile": templates_scored / busy if busy else 0.0,
      "templates_scored": templates_scored,
      "scoring_busy_s": busy,
      "compile_s": compile_s,
      "images_per_s": images / encode_s if encode_s else 0.0,
      "images_encoded": images,
      "llm_latency_p50_s": llm.get("latency_p50_s"),
      "llm_latency_p95_s": llm.get("latency_p95_s"),
      "mean_concurrency": llm.get("mean_concurrency"),
      # Share of the search's wall time the device spent scoring (the rest: waiting on
      # the proposer/LLM, or host work).
      "device_busy_fraction": min(1.0, search_busy_s / search_s) if search_s else 0.0,
      "search_wall_s": search_s,
      "wall_s": wall_s,
      "compiles": sum(p.compiled for p in programs.values()),
      "compile_s_total": sum(p.compile_s for p in programs.values()),
      "call_shapes": sorted({dataclasses.astuple(shape) for r in runs
                             for shape in r.scorer.text_encoder.shapes}),
      "gflops_text": sum(s.get("gflops_text", 0.0) for s in stats),
  }
  llm_section = {
      "proposer": cfg.proposer_kind,
      "model": cfg.llm.model if cfg.proposer_kind in LLM_PROPOSERS else None,
      "calls": llm.get("calls", counts_total.get("llm_calls", 0)) if llm else
               counts_total.get("proposals", 0),
      "cached_calls": llm.get("cached_calls", 0),
      "failed_calls": llm.get("failed_calls", 0) if llm else counts_total.get("failed_attempts", 0),
      "prompt_tokens": llm.get("prompt_tokens", 0),
      "completion_tokens": llm.get("completion_tokens", 0),
      "cost_usd": llm.get("cost_usd", 0.0),
      "faults": llm.get("faults", {}),
      "truncated_replies": llm.get("truncated_replies", 0),
      "latency_p50_s": llm.get("latency_p50_s"),
      "queue_p50_s": llm.get("queue_p50_s"),
      "server_p50_s": llm.get("server_p50_s"),
      "queue_s_total": llm.get("queue_s_total"),
      "server_s_total": llm.get("server_s_total"),
      "proposals": _proposer_accounting(runs),
      **(client_info or {}),
  }
  best_entry = dict(best_ps["best"], seed=int(best_seed))
  return {
      "schema": RESULTS_SCHEMA,
      "status": "finished",
      "config": cfg.to_json(),
      "command": " ".join(sys.argv),
      "versions": dict(_versions(clip), git_commit=_git_commit()),
      "model": {"name": clip.name, "source": clip.source, "weights_hash": clip.weights_hash,
                "dtype": cfg.dtype, "embed_dim": clip.embed_dim, "image_size": clip.image_size},
      "dataset": cfg.dataset,
      "shots": cfg.shots,
      "seeds": list(cfg.seeds),
      "num_classes": len(runs[0].task.class_names),
      "best": best_entry,
      "initial_best": dict(best_ps["initial_best"], seed=int(best_seed)),
      "baselines": best_ps["baselines"],
      "aggregate": aggregate,
      "per_seed": per_seed,
      "n_templates_evaluated": n_eval,
      "llm": llm_section,
      "throughput": throughput,
  }


def _write_outputs(workdir: pathlib.Path, results: dict, runs: list[_SeedRun]) -> None:
  records, transcript = [], []
  for r in runs:
    records += [dict(rec.to_row(), seed=r.seed)
                for rec in sorted(r.result.records, key=lambda rec: rec.eval_index)]
    for row in io_lib.read_jsonl(workdir / f"seed_{r.seed}" / "transcript.jsonl"):
      transcript.append(dict(row, seed=r.seed))
  with open(workdir / "prompts.jsonl", "wb") as f:
    for row in records:
      f.write(orjson.dumps(row) + b"\n")
  with open(workdir / "transcript.jsonl", "wb") as f:
    for row in transcript:
      f.write(orjson.dumps(row) + b"\n")
  report.write_prompts_csv(records, workdir / "prompts.csv")
  ok = [r for r in records if not r.get("rejected")]
  # The scored templates and class names, one per line: the input of a side-by-side
  # run of another scorer on the same work (README, "Profiling prompt throughput").
  (workdir / "templates_scored.txt").write_text(
      "".join(r["template"].replace("\n", " ") + "\n" for r in ok), encoding="utf-8")
  (workdir / "class_names.txt").write_text(
      "".join(c + "\n" for c in runs[0].task.class_names) if runs else "", encoding="utf-8")
  cfg_search = results["config"]["search"]
  title = f"{results['dataset']} ({results['model']['name']}, {results['shots']}-shot)"
  curves = {r.seed: r.result.counts["coop"]["loss_curve"] for r in runs
            if "coop" in r.result.counts}
  if curves:
    report.plot_loss_curves(curves, workdir / "coop_loss.png", title=f"CoOp, {title}")
  report.plot_accuracy(ok, workdir / "accuracy.png", title=title,
                       select_by=cfg_search["select_by"], tie_break=cfg_search["tie_break"])
  (workdir / "summary.md").write_text(report.summary_markdown(results), encoding="utf-8")
  io_lib.write_json(workdir / "results.json", results)


