"""The main job as a process: logging, devices, several hosts, one-line errors, printing.

`main.py` parses the flags into configs and calls `run_job`; JAX is imported here, when
a run starts, never for `--help` or a flag error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging as std_logging
import os
import sys

from absl import logging

from lmbbo_jax.config import ExperimentConfig, ExperimentError, RuntimeConfig

# Third-party loggers whose routine INFO lines (one per HTTP request, JAX's backend
# probing, matplotlib's font cache) would bury the progress bars; shown at -v 1.
QUIET_LOGGERS = ("httpx", "httpcore", "jax._src.xla_bridge", "jax._src.compiler",
                 "matplotlib", "matplotlib.font_manager", "absl_tensorboard")


@contextlib.contextmanager
def quiet_third_party():
  """Those loggers at WARNING (DEBUG at -v 1) while a job runs; their levels come back
  after it, so an in-process job (`main.run_command`) leaves the caller's logging alone."""
  level = std_logging.DEBUG if logging.get_verbosity() >= 1 else std_logging.WARNING
  loggers = [std_logging.getLogger(name) for name in QUIET_LOGGERS]
  before = [lg.level for lg in loggers]
  for lg in loggers:
    lg.setLevel(level)
  try:
    yield
  finally:
    for lg, old in zip(loggers, before):
      lg.setLevel(old)


def _start_distributed(runtime: RuntimeConfig) -> str | None:
  """Joins the process group (before any other JAX call); an error line, or None."""
  import jax
  # CPU devices of several processes talk through gloo (GPUs and TPUs have their own).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # Unset values: jax.distributed reads the cluster (TPU pod, SLURM, Kubernetes, ...).
  try:
    jax.distributed.initialize(runtime.coordinator_address, runtime.num_processes,
                               runtime.process_id,
                               heartbeat_timeout_seconds=runtime.distributed_heartbeat_s)
  except (ValueError, RuntimeError) as e:  # No cluster found, coordinator unreachable, ...
    return (f"--distributed: {str(e).splitlines()[0]} (give --coordinator_address, "
            "--num_processes and --process_id, or run under a cluster that sets them)")
  if jax.process_index() > 0:  # Process 0 reports; the others only warn.
    logging.set_verbosity(logging.WARNING)
  return None


def run_job(config: ExperimentConfig, runtime: RuntimeConfig) -> int:
  """Runs the experiment (or the comparison) and prints its summary; the exit code."""
  with quiet_third_party():
    return _run_job(config, runtime)


def _run_job(config: ExperimentConfig, runtime: RuntimeConfig) -> int:
  if runtime.distributed:
    error = _start_distributed(runtime)
    if error:
      print(f"error: {error}", file=sys.stderr)
      return 1
  from lmbbo_jax.evaluator import multihost
  from lmbbo_jax.experiment import run_comparison, run_experiment
  from lmbbo_jax.search import RunLogError, SearchError
  leader = multihost.is_leader()
  if not leader:
    config = dataclasses.replace(config, progress=False)
  if not config.dry_run:
    import jax
    if runtime.jax_cache_dir and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
      jax.config.update("jax_compilation_cache_dir", os.path.expanduser(runtime.jax_cache_dir))
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    logging.info("JAX %s: %d device(s) %s, process %d of %d", jax.__version__,
                 jax.device_count(), [d.device_kind for d in jax.local_devices()],
                 jax.process_index(), jax.process_count())
  try:
    if config.compare:
      by_method = run_comparison(config)
    else:
      result = run_experiment(config)
  except (ExperimentError, SearchError, RunLogError) as e:  # One line, never a traceback.
    prefix = "" if leader else f"process {multihost.process_index()}: "
    print(f"error: {prefix}{e}", file=sys.stderr)
    return 1
  except Exception as e:  # A peer that died breaks the collectives' links mid-call.
    import jax
    if multihost.process_count() == 1 or not isinstance(e, jax.errors.JaxRuntimeError):
      raise
    first = (str(e).strip().splitlines() or [""])[0][:300]
    print(f"error: process {multihost.process_index()}: a collective with the other "
          f"processes failed ({first}); a peer has likely died: what was scored is kept "
          f"in {config.workdir}, rerun with --resume", file=sys.stderr)
    return 1
  if not leader:  # Process 0 writes and prints the results.
    return 0
  if config.dry_run:
    estimate = ({m: r.data.get("dry_run") for m, r in by_method.items()} if config.compare
                else result.data["dry_run"])
    print(json.dumps(estimate, indent=2))
    return 0
  if config.compare:
    print(open(os.path.join(config.workdir, "comparison.md"), encoding="utf-8").read())
    print(f"outputs in {config.workdir}: comparison.md, comparison.csv, efficiency.png, and "
          f"one run folder per method ({', '.join(config.compare)})")
    return 0
  from lmbbo_jax import report
  print(report.summary_markdown(result.data))
  print(f"outputs in {config.workdir}: results.json, summary.md, accuracy.png, prompts.csv, "
        "prompts.jsonl, transcript.jsonl")
  return 0
