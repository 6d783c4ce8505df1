r"""The cost of going multi-process: one search on 1 process x N devices, then P x N/P.

  python -m lmbbo_jax.tools.multihost_bench --devices=4 --processes=2 --out=/tmp/mhb

Runs the main job twice on simulated CPU devices (`--xla_force_host_platform_device_count`),
one after the other, with the same flags (default: the smoke task, 1 seed, 2 chains x 150
turns of the edit proposer, 100 test images per class): once as one process with all
devices, once as `--processes` processes on 127.0.0.1 under `--distributed`. Prints one JSON
line per run (templates/s excluding and including compilation, wall time) and the ratio.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from absl import app, flags

from lmbbo_jax.llm.local_server import free_port

FLAGS = flags.FLAGS
DEFAULT_ARGS = ["--flagfile=experiments/smoke.flags", "--noprogress", "--seeds=1",
                "--n_restart=2", "--n_iter=150", "--max_test_per_class=100"]


def define_flags():
  flags.DEFINE_integer("devices", 4, "Devices in all.")
  flags.DEFINE_integer("processes", 2, "Processes of the several-process run.")
  flags.DEFINE_string("out", None, "Folder for the two runs' workdirs and logs.")
  flags.DEFINE_list("main_args", DEFAULT_ARGS, "Flags of the main job (both runs).")


def with_devices(env: dict, devices: int) -> dict:
  """`env` with `devices` simulated CPU devices added to its own XLA flags (kept)."""
  flags = " ".join(filter(None, (env.get("XLA_FLAGS"),
                                 f"--xla_force_host_platform_device_count={devices}")))
  return dict(env, XLA_FLAGS=flags)


def _run_all(runs: list[tuple[list[str], int, pathlib.Path]]) -> bool:
  """Runs the main job once per (args, devices, log) at the same time; whether all exited 0.
  A process still running when the call ends (one failed, or Ctrl-C) is killed."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  procs = []
  try:
    for args, devices, log in runs:
      with open(log, "w") as out:  # The child keeps its own copy of the handle.
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "lmbbo_jax.main", *args], stdout=out,
            stderr=subprocess.STDOUT,
            env=with_devices(env, devices)))
    return all([p.wait() == 0 for p in procs])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def _summary(workdir: pathlib.Path) -> dict:
  r = json.loads((workdir / "results.json").read_text())
  t = r["throughput"]
  return {"processes": r["versions"]["process_count"], "devices": r["versions"]["device_count"],
          "templates": t["templates_scored"], "templates_per_s": round(t["templates_per_s"], 2),
          "templates_per_s_incl_compile": round(t.get("templates_per_s_incl_compile", 0.0), 2),
          "wall_s": round(t.get("wall_s", 0.0), 2)}


def main(argv):
  del argv
  if not FLAGS.out:
    raise app.UsageError("--out=DIR is required")
  if FLAGS.devices % FLAGS.processes:
    raise app.UsageError("--devices must divide over --processes")
  out = pathlib.Path(FLAGS.out)
  out.mkdir(parents=True, exist_ok=True)
  args = list(FLAGS.main_args)
  if not _run_all([([*args, f"--workdir={out / 'one'}", "--overwrite"], FLAGS.devices,
                     out / "one.log")]):
    sys.exit(f"error: the one-process run failed; see {out / 'one.log'}")
  port = free_port()
  if not _run_all([([*args, f"--workdir={out / 'several'}", "--overwrite", "--distributed",
                     f"--coordinator_address=127.0.0.1:{port}",
                     f"--num_processes={FLAGS.processes}", f"--process_id={i}"],
                    FLAGS.devices // FLAGS.processes, out / f"several_{i}.log")
                   for i in range(FLAGS.processes)]):
    sys.exit(f"error: the several-process run failed; see {out}/several_*.log")
  a, b = _summary(out / "one"), _summary(out / "several")
  print(json.dumps(a))
  print(json.dumps(b))
  print(json.dumps({"ratio_templates_per_s": round(b["templates_per_s"] / a["templates_per_s"], 3),
                    "ratio_wall": round(a["wall_s"] / b["wall_s"], 3)}))


if __name__ == "__main__":
  define_flags()
  app.run(main)
