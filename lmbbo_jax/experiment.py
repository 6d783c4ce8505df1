"""One experiment end to end: tasks, model, image features, baselines, method, outputs.

`run_experiment(ExperimentConfig) -> ExperimentResult`; `run_comparison` runs the
paper's comparison. Layout of `workdir`:

  results.json        the machine-readable result (schema: `results.RESULTS_SCHEMA`)
  prompts.jsonl       every evaluated template of every seed (`seed` field added)
  transcript.jsonl    every LLM turn of every seed
  prompts.csv, accuracy.png, summary.md, tracking/ (TensorBoard event files: --tracking)
  seed_<s>/           the durable per-seed search logs (resume reads these)
  feature_cache/      the image features (unless --feature_cache_dir)
  llm_cache/, llm_usage.jsonl   LLM responses and usage (when an LLM is used)
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import time
from typing import Sequence

import orjson
from absl import logging

from lmbbo_jax import methods as methods_lib
from lmbbo_jax import report
from lmbbo_jax import results as results_lib
from lmbbo_jax import transfer as transfer_lib
from lmbbo_jax.baselines import score_baselines
from lmbbo_jax.config import (DESCRIPTION_LLM_METHODS, ExperimentConfig, ExperimentError,
                              comparison_config)
from lmbbo_jax.evaluator import multihost
from lmbbo_jax.results import ExperimentResult
from lmbbo_jax.search.pool import builtin_corpus, load_caption_file, load_template_file
from lmbbo_jax.search.proposers import LLM_PROPOSERS


def load_model(source: str, dtype: str = "float32", cache_dir: str | None = None):
  """A CLIP for `source` (as --model takes it) in `dtype`; `ExperimentError` if it fails."""
  import jax.numpy as jnp
  from lmbbo_jax.models import CheckpointError, load_clip
  try:
    return load_clip(source, dtype={"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype],
                     cache_dir=cache_dir)
  except CheckpointError as e:
    raise ExperimentError(f"weights: {e}") from None


def text_encoders(clip, tasks, mesh=None, encoders: dict | None = None) -> dict:
  """One text encoder per class list, shared by the seeds: its programs compile once,
  in a background thread while the images are encoded."""
  from lmbbo_jax.evaluator.text_encoder import PackedTextEncoder
  encoders = {} if encoders is None else encoders
  for task in tasks:
    names = tuple(task.class_names)
    if names not in encoders:
      encoders[names] = PackedTextEncoder(clip, names, mesh=mesh)
      encoders[names].precompile()
  return encoders


def scorer_for(clip, task, encoders: dict, *, mesh=None, cache_dir=None, batch_size=64,
               progress=False, per_class=False):
  """(PromptScorer, scorer inputs, images encoded, seconds) for `task`'s images on `clip`;
  `per_class`: the scorer also reports per-class accuracy (the merge step's front)."""
  from lmbbo_jax.evaluator import features as features_lib
  from lmbbo_jax.evaluator.scorer import PromptScorer
  t0 = time.perf_counter()
  feats = features_lib.encode_task(clip, task, mesh=mesh, batch_size=batch_size,
                                   cache_dir=cache_dir, progress=progress)
  seconds = time.perf_counter() - t0
  inputs = features_lib.scorer_inputs(feats)
  encoder = text_encoders(clip, [task], mesh, encoders)[tuple(task.class_names)]
  scorer = PromptScorer(clip, *inputs, task.class_names, mesh=mesh, text_encoder=encoder,
                        per_class=per_class)
  return scorer, inputs, sum(f.num_valid for f in feats.values()), seconds


def _prepare_workdir(cfg: ExperimentConfig) -> pathlib.Path:
  workdir = pathlib.Path(cfg.workdir)
  if (workdir / "results.json").exists() and not (cfg.resume or cfg.overwrite):
    raise ExperimentError(
        f"{workdir} already holds a finished run (results.json); pass --resume to "
        "continue it, --overwrite to replace it, or choose another --workdir")
  if any(workdir.glob("seed_*/prompts.jsonl")) and not (cfg.resume or cfg.overwrite):
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


def _local_server(cfg: ExperimentConfig):
  """The embedded llama.cpp server for --llm=local (not started yet)."""
  from lmbbo_jax.llm.local_server import LocalLLMError, LocalLLMServer
  try:
    return LocalLLMServer(cfg.llm.gguf, n_ctx=cfg.llm.n_ctx, chat_format=cfg.llm.chat_format,
                          n_threads=cfg.llm.local_threads or None,
                          log_path=os.path.join(cfg.workdir, "llm_server.log"))
  except LocalLLMError as e:
    raise ExperimentError(str(e)) from None


def run_experiment(cfg: ExperimentConfig) -> ExperimentResult:
  """Runs (or resumes) the experiment, writes every output and returns the result (on
  processes other than 0 of several, a result without data: process 0 reports)."""
  cfg.validate()
  kind = cfg.proposer_kind
  uses_llm = kind in LLM_PROPOSERS or kind in DESCRIPTION_LLM_METHODS
  if uses_llm and not (cfg.llm.base_url or cfg.llm.local):
    what = f"--method={kind}" if kind in DESCRIPTION_LLM_METHODS else f"--proposer={kind}"
    raise ExperimentError(f"{what} needs an LLM: --llm=local (embedded llama.cpp "
                          "server) or --llm_base_url (e.g. https://api.openai.com/v1 or a "
                          "vLLM/Ollama server); or use --proposer=edit offline")
  if kind == "replay" and not cfg.replay_transcript:
    raise ExperimentError("--proposer=replay needs --replay_transcript=<run>/transcript.jsonl")
  if cfg.dry_run:
    return ExperimentResult.from_json({"dry_run": methods_lib.dry_run(cfg)}, cfg.workdir)
  local, local_error = None, None
  if uses_llm and cfg.llm.local and multihost.is_leader():
    try:
      local = _local_server(cfg)  # fails in seconds, before any heavy work
    except ExperimentError as e:
      if multihost.process_count() == 1:
        raise
      local_error = str(e)  # told to the other processes at the run's first check
  with contextlib.ExitStack() as stack:
    if local is not None:
      stack.callback(local.stop)  # also on Ctrl-C and on any error
    data = _run(cfg, local, local_error)
  return ExperimentResult.from_json(data or {}, cfg.workdir)


def _run(cfg: ExperimentConfig, local, local_error: str | None) -> dict | None:
  from lmbbo_jax.data import DatasetError, build_task
  from lmbbo_jax.search.pool import PoolError
  started = time.time()
  # Data and weights are both checked before any heavy work, and reported together.
  errors, tasks, clip = [], {}, None
  try:
    tasks = {s: build_task(cfg.dataset, cfg.shots, s, data_dir=cfg.data_dir,
                           max_test_per_class=cfg.max_test_per_class) for s in cfg.seeds}
  except DatasetError as e:
    errors.append(f"data: {e}")
  try:
    clip = load_model(cfg.model, cfg.dtype, cfg.model_cache_dir)
  except ExperimentError as e:
    errors.append(str(e))
  if errors:
    raise ExperimentError("; ".join(errors))
  # A bad --init_pool or workdir fails here, before any image is encoded. With several
  # processes, process 0 holds the pool and the workdir and says so to the others.
  corpora, workdir, error = {}, pathlib.Path(cfg.workdir), None
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
  logging.info("model %s (%s, weights %s), dataset %s, %d-shot, seeds %s, proposer %s",
               clip.name, cfg.dtype, clip.weights_hash[:12], cfg.dataset, cfg.shots,
               list(cfg.seeds), cfg.proposer_kind)

  from lmbbo_jax.evaluator.sharding import make_mesh
  mesh = make_mesh()
  cache_dir = cfg.feature_cache_dir or str(workdir / "feature_cache")
  encoders = text_encoders(clip, tasks.values(), mesh)
  seeds = []
  for seed, task in tasks.items():
    scorer, inputs, n_images, encode_s = scorer_for(
        clip, task, encoders, mesh=mesh, cache_dir=cache_dir,
        batch_size=cfg.image_batch_size, progress=cfg.progress,
        per_class=cfg.search.merge_every > 0)
    logging.info("seed %d: %d images encoded in %.1fs", seed, n_images, encode_s)
    seeds.append(methods_lib.SeedSetup(seed, task, scorer, corpora.get(seed, []), inputs,
                                       score_baselines(cfg, scorer, task), n_images, encode_s))

  tracker = _tracker(cfg, workdir) if multihost.is_leader() else None
  try:
    with (_profile(cfg.profile_dir) if cfg.profile_dir else contextlib.nullcontext()):
      run = methods_lib.run_method(cfg, workdir, seeds, local, tracker)
    results = None
    if multihost.is_leader():
      model = {"name": clip.name, "source": clip.source, "weights_hash": clip.weights_hash,
               "embed_dim": clip.embed_dim, "image_size": clip.image_size}
      results = results_lib.build_results(
          cfg, model, seeds, run, scorer_stats=[s.scorer.stats() for s in seeds],
          encoder_stats=[e.stats() for e in encoders.values()], wall_s=time.time() - started)
      tp = results["throughput"]
      logging.info("scoring: %d templates in %.1f s, %d programs compiled in %.1f s (%.1f s "
                   "of it while scoring, the rest in the background)", tp["templates_scored"],
                   tp["scoring_busy_s"], tp["compiles"], tp["compile_s_total"], tp["compile_s"])
      results_lib.write_outputs(workdir, results, seeds, run.outcomes)
      if tracker is not None:
        tracker.write_summary(_final_metrics(results))
    if cfg.transfer_to:  # After the run's own outputs are safe.
      chosen = multihost.broadcast(transfer_lib.chosen_templates(results) if results else None)
      moved = transfer_lib.transfer(
          cfg, tasks, chosen, lambda source: load_model(source, cfg.dtype, cfg.model_cache_dir),
          lambda clip, task, encs: scorer_for(clip, task, encs, cache_dir=cache_dir,
                                              batch_size=cfg.image_batch_size,
                                              progress=cfg.progress)[0])
      if multihost.is_leader():
        results["transfer"] = moved
        results_lib.write_outputs(workdir, results, seeds, run.outcomes)
  finally:
    if tracker is not None:
      tracker.close()
  return results


def _final_metrics(results: dict) -> dict[str, float]:
  """The scalars a tracker gets at the end (as final/<name>): the chosen template's
  accuracies, the calls and cost, the scoring throughput."""
  best, llm, tp = results["best"], results["llm"], results["throughput"]
  out = {f"best_{split}": best.get(f"{split}_acc") for split in ("train", "val", "test")}
  out.update({"llm_calls": llm.get("calls"), "cost_usd": llm.get("cost_usd"),
              "templates_scored": tp.get("templates_scored"),
              "templates_per_s": tp.get("templates_per_s")})
  return {k: float(v) for k, v in out.items() if isinstance(v, (int, float))}


def _tracker(cfg: ExperimentConfig, workdir: pathlib.Path):
  from lmbbo_jax import tracking
  try:
    return tracking.open_writer(cfg.tracking, str(workdir / "tracking"), run_name=workdir.name,
                                config=cfg.to_json())
  except tracking.TrackingError as e:
    raise ExperimentError(str(e)) from None


def run_comparison(cfg: ExperimentConfig, names: Sequence[str] | None = None
                   ) -> dict[str, ExperimentResult]:
  """Runs each named method (default `cfg.compare`) into <workdir>/<name> on the same tasks,
  model and cached image features, then the comparison table and plot. With `resume` a
  method whose run finished is read back, not run again."""
  configs = {name: comparison_config(cfg, name) for name in (names or cfg.compare)}
  out = {}
  for name, sub in configs.items():
    done = pathlib.Path(sub.workdir) / "results.json"
    if cfg.resume and not cfg.dry_run and multihost.broadcast(done.exists()):
      logging.info("comparison: %s finished earlier; reading %s", name, done)
      data = multihost.broadcast(orjson.loads(done.read_bytes())
                                 if multihost.is_leader() else None)
      out[name] = ExperimentResult.from_json(data, sub.workdir)
      continue
    logging.info("comparison: running %s into %s", name, sub.workdir)
    out[name] = run_experiment(sub)
  if not cfg.dry_run and multihost.is_leader():
    report.write_comparison([pathlib.Path(c.workdir) for c in configs.values()],
                            pathlib.Path(cfg.workdir))
  return out


def _profile(profile_dir: str):
  import jax
  os.makedirs(profile_dir, exist_ok=True)
  return jax.profiler.trace(profile_dir)

