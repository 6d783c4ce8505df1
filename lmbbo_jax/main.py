"""Entry point: `python -m lmbbo_jax.main --flagfile=experiments/caltech.flags`.

Thin on purpose: flags -> ExperimentConfig -> run_experiment (lmbbo_jax/experiment.py).
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging

from lmbbo_jax import flags as lmbbo_flags

FLAGS = flags.FLAGS
flags.mark_flags_as_required(["dataset", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  import logging as std_logging
  # One INFO line per HTTP request would bury the progress bars; details at -v 1.
  std_logging.getLogger("httpx").setLevel(
      std_logging.DEBUG if logging.get_verbosity() >= 1 else std_logging.WARNING)
  if lmbbo_flags.DISTRIBUTED.value:
    import jax  # Must be initialised before any other JAX call.
    # CPU devices of several processes talk through gloo (GPUs and TPUs have their own).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # Unset flags: jax.distributed reads the cluster (TPU pod, SLURM, Kubernetes, ...).
    try:
      jax.distributed.initialize(lmbbo_flags.COORDINATOR_ADDRESS.value,
                                 lmbbo_flags.NUM_PROCESSES.value, lmbbo_flags.PROCESS_ID.value,
                                 heartbeat_timeout_seconds=lmbbo_flags.HEARTBEAT_S.value)
    except (ValueError, RuntimeError) as e:  # No cluster found, coordinator unreachable, ...
      print(f"error: --distributed: {str(e).splitlines()[0]} (give --coordinator_address, "
            "--num_processes and --process_id, or run under a cluster that sets them)",
            file=sys.stderr)
      return 1
    if jax.process_index() > 0:  # Process 0 reports; the others only warn.
      logging.set_verbosity(logging.WARNING)
  from lmbbo_jax.experiment import ExperimentError, run_comparison, run_experiment
  from lmbbo_jax.search import RunLogError, SearchError
  try:
    config = lmbbo_flags.experiment_config()
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  from lmbbo_jax.evaluator import multihost
  leader = multihost.is_leader() if lmbbo_flags.DISTRIBUTED.value else True
  if not leader:
    import dataclasses
    config = dataclasses.replace(config, progress=False)
  if not config.dry_run:
    import jax
    if lmbbo_flags.JAX_CACHE_DIR.value and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
      jax.config.update("jax_compilation_cache_dir",
                        os.path.expanduser(lmbbo_flags.JAX_CACHE_DIR.value))
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    logging.info("JAX %s: %d device(s) %s, process %d of %d", jax.__version__,
                 jax.device_count(), [d.device_kind for d in jax.local_devices()],
                 jax.process_index(), jax.process_count())
  methods = lmbbo_flags.COMPARE.value
  prefix = "" if leader else f"process {multihost.process_index()}: "
  try:
    if methods:
      by_method = run_comparison(config, methods)
    else:
      results = run_experiment(config)
  except (ExperimentError, SearchError, RunLogError) as e:  # One line, never a traceback.
    print(f"error: {prefix}{e}", file=sys.stderr)
    return 1
  if not leader:  # Process 0 writes and prints the results.
    return 0
  if methods:
    if config.dry_run:
      import json
      print(json.dumps({m: r.get("dry_run") for m, r in by_method.items()}, indent=2))
      return 0
    print(open(os.path.join(config.workdir, "comparison.md"), encoding="utf-8").read())
    print(f"outputs in {config.workdir}: comparison.md, comparison.csv, efficiency.png, and "
          f"one run folder per method ({', '.join(methods)})")
    return 0
  if config.dry_run:
    import json
    print(json.dumps(results["dry_run"], indent=2))
    return 0
  from lmbbo_jax import report
  print(report.summary_markdown(results))
  print(f"outputs in {config.workdir}: results.json, summary.md, accuracy.png, prompts.csv, "
        "prompts.jsonl, transcript.jsonl")
  return 0


def _parse_flags(argv):
  """absl's parser, with flag errors (bad value, unreadable flagfile) as one line."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    print(f"error: {str(e).replace('ERROR:: ', '')}", file=sys.stderr)
    sys.exit(1)


def run():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
