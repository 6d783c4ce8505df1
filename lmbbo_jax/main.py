"""Entry point: `python -m lmbbo_jax.main --flagfile=experiments/caltech.flags`.

Flags (generated from the config dataclasses: `flags.py`) -> configs -> `job.run_job`.
Nothing here imports JAX: `--help` and flag errors answer at once. `run_command(argv)`
is the same command in-process (tests, notebooks).
"""

import sys

from absl import app
from absl import flags

from lmbbo_jax import flags as lmbbo_flags
from lmbbo_jax.config import ConfigError

FLAGS = flags.FLAGS
lmbbo_flags.define_flags(FLAGS)
flags.adopt_module_key_flags(lmbbo_flags)  # --help lists them


def _run_parsed(fv: flags.FlagValues) -> int:
  try:
    config, runtime = lmbbo_flags.configs_from_flags(fv)
  except ConfigError as e:
    print(f"error: --{e.field}: {e.message}", file=sys.stderr)
    return 1
  from lmbbo_jax.job import run_job
  return run_job(config, runtime)


def _flag_error(e: flags.Error) -> int:
  print(f"error: {str(e).replace('ERROR:: ', '')}", file=sys.stderr)
  return 1


def run_command(argv: list[str]) -> int:
  """The main job for `argv` (argv[0] is the program) in this process; the exit code."""
  fv = flags.FlagValues()
  lmbbo_flags.define_flags(fv)
  try:
    fv(argv)
  except flags.Error as e:
    return _flag_error(e)
  return _run_parsed(fv)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  return _run_parsed(FLAGS)


def _parse_flags(argv):
  """absl's parser, with flag errors (bad value, unreadable flagfile) as one line."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    sys.exit(_flag_error(e))


def run():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
