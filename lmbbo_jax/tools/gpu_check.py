"""The accelerator check: bf16 parity, steady and cold throughput, a profiler trace.

  python -m lmbbo_jax.tools.gpu_check --out=/tmp/gpu_check            (GPU/TPU host, < 8 min)
  python -m lmbbo_jax.tools.gpu_check --out=/tmp/gpu_check --small    (CPU, about 2 min; CI)

Needs nothing beyond the package (and its `[gpu]` extra on a GPU host). Writes to `--out`:
- `parity.json`: bf16 against fp32 on `--parity_templates` LLM-like templates with
  the same random weights and image features: Kendall tau of the template rankings
  by accuracy and by mean true-class log-probability, and the largest gaps;
- `bench.jsonl`: one line per bench run (`python -m lmbbo_jax.bench`, each in a
  fresh process): steady and cold, bf16, for each architecture and class count
  (full: ViT-B/32, ViT-L/14 and SigLIP B/16-224 at 100 and 1000 classes; small:
  tiny-vit and tiny-siglip at 10 and 100 classes);
- `trace/`: a `jax.profiler` trace of one extra, untimed repeat after the first
  steady run's timed ones (open it in TensorBoard or Perfetto);
- `summary.json`: the device, versions, every figure above and the wall time.
A failed bench run is recorded with its error and the check goes on; the exit
code is 1 if any part failed.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import time
from typing import Any

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags (defined when run, so that importing this module defines none)."""
  flags.DEFINE_string("out", None, "Folder for the results (created).")
  flags.DEFINE_bool("small", False, "CPU-sized: tiny-vit and tiny-siglip at 10 and 100 "
                    "classes.")
  flags.DEFINE_integer("parity_templates", 200, "Templates ranked by both dtypes.",
                       lower_bound=10)
  flags.DEFINE_list("classes", None, "Class counts of the bench runs (default: the mode's; "
                    "full 100,1000, small 10,100).")
  flags.DEFINE_integer("bench_timeout_s", 300, "Limit of one bench run.")


# One SigLIP beside the CLIPs: its text tower runs the scorer's plain rows (no prefix
# sharing, no packing), so its templates/s are the other regime.
FULL = {"archs": ("ViT-B/32", "ViT-L/14", "siglip-base-patch16-224"), "classes": (100, 1000),
        "parity_arch": "ViT-B/32", "parity_classes": 100}
SMALL = {"archs": ("tiny-vit", "tiny-siglip"), "classes": (10, 100), "parity_arch": "tiny-vit",
         "parity_classes": 10}


def kendall_tau(a: np.ndarray, b: np.ndarray) -> float:
  """Kendall's tau-b of two score vectors (ties handled), O(n^2)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  da = np.sign(a[:, None] - a[None, :])
  db = np.sign(b[:, None] - b[None, :])
  upper = np.triu_indices(len(a), 1)
  da, db = da[upper], db[upper]
  denom = np.sqrt(np.count_nonzero(da) * np.count_nonzero(db))
  return float((da * db).sum() / denom) if denom else float("nan")


def parity(arch: str, classes: int, n_templates: int) -> dict[str, Any]:
  """Ranks the same templates with fp32 and bf16 text towers (same weights, images)."""
  import jax.numpy as jnp
  from lmbbo_jax.bench import class_names_for, llm_like_stream, random_image_features
  from lmbbo_jax.evaluator.scorer import PromptScorer
  from lmbbo_jax.models.loading import load_clip
  clip = load_clip(f"random:{arch}", dtype=jnp.float32)
  names = class_names_for(classes)
  feats, labels = random_image_features(classes, 8, clip.embed_dim)
  templates = llm_like_stream(n_templates, seed=1)
  out: dict[str, Any] = {"arch": arch, "classes": classes, "templates": n_templates}
  scores = {}
  for dtype in ("float32", "bfloat16"):
    scorer = PromptScorer(clip, {"train": feats}, {"train": labels}, names,
                          dtype=jnp.dtype(dtype))
    got = scorer.score(templates)
    scorer.close()
    bad = [s.template for s in got if not s.ok]
    if bad:
      raise RuntimeError(f"{dtype}: {len(bad)} templates rejected, e.g. {bad[0]!r}")
    scores[dtype] = (np.array([s.accuracy["train"] for s in got]),
                     np.array([s.logprob["train"] for s in got]))
  (acc32, lp32), (acc16, lp16) = scores["float32"], scores["bfloat16"]
  out["kendall_tau_accuracy"] = round(kendall_tau(acc32, acc16), 4)
  out["kendall_tau_logprob"] = round(kendall_tau(lp32, lp16), 4)
  out["max_abs_accuracy_gap"] = round(float(np.abs(acc32 - acc16).max()), 4)
  out["max_abs_logprob_gap"] = round(float(np.abs(lp32 - lp16).max()), 4)
  out["same_best_template"] = bool(np.argmax(lp32) == np.argmax(lp16))
  return out


def bench_run(args: list[str], timeout_s: int) -> dict[str, Any]:
  """One `python -m lmbbo_jax.bench ... --json` in a fresh process; its JSON line."""
  cmd = [sys.executable, "-m", "lmbbo_jax.bench", "--json", *args]
  started = time.perf_counter()
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return {"args": args, "error": f"timed out after {timeout_s} s"}
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
  if proc.returncode != 0 or not lines:
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"args": args, "error": f"exit {proc.returncode}: {tail[:300]}"}
  record = json.loads(lines[-1])
  record["args"] = args
  record["process_s"] = round(time.perf_counter() - started, 1)
  return record


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS.out:
    print("error: --out=DIR is required", file=sys.stderr)
    return 2
  import jax
  out = pathlib.Path(FLAGS.out)
  out.mkdir(parents=True, exist_ok=True)
  plan = dict(SMALL if FLAGS.small else FULL)
  if FLAGS.classes:
    try:
      plan["classes"] = tuple(int(c) for c in FLAGS.classes)
    except ValueError:
      print(f"error: --classes takes whole numbers, got {','.join(FLAGS.classes)}",
            file=sys.stderr)
      return 2
  started = time.perf_counter()
  summary: dict[str, Any] = {
      "mode": "small" if FLAGS.small else "full", "backend": jax.default_backend(),
      "devices": [d.device_kind for d in jax.devices()], "jax": jax.__version__,
      "failures": []}
  print(f"gpu_check: {summary['mode']} mode on {jax.default_backend()} "
        f"{summary['devices']}", flush=True)
  try:
    summary["parity"] = parity(plan["parity_arch"], plan["parity_classes"],
                               FLAGS.parity_templates)
  except Exception as e:  # recorded, the check goes on
    summary["parity"] = {"error": f"{type(e).__name__}: {e}"}
    summary["failures"].append("parity")
  (out / "parity.json").write_text(json.dumps(summary["parity"], indent=1))
  print(f"gpu_check: parity {summary['parity']}", flush=True)

  records = []
  with open(out / "bench.jsonl", "w", encoding="utf-8") as f:
    for arch in plan["archs"]:
      for classes in plan["classes"]:
        common = [f"--arch={arch}", f"--classes={classes}", "--dtype=bfloat16"]
        steady = [*common, "--repeats=3"]
        if arch == plan["archs"][0] and classes == plan["classes"][0]:
          # The trace is of an extra repeat after the timed ones: no process of its own.
          steady.append(f"--profile_dir={out / 'trace'}")
        runs = [("cold", [*common, "--mode=cold"]), ("steady", steady)]
        for kind, args in runs:
          record = bench_run(args, FLAGS.bench_timeout_s)
          record["kind"] = kind
          records.append(record)
          f.write(json.dumps(record) + "\n")
          f.flush()
          if "error" in record:
            summary["failures"].append(f"{kind} {arch} {classes}")
          keys = ("templates_per_s", "templates_per_s_incl_compile", "first_template_s",
                  "compiles", "error")
          print(f"gpu_check: {kind} {arch} {classes} classes: "
                + ", ".join(f"{k}={record[k]}" for k in keys if k in record), flush=True)
  summary["bench"] = records
  summary["wall_s"] = round(time.perf_counter() - started, 1)
  (out / "summary.json").write_text(json.dumps(summary, indent=1))
  print(f"gpu_check: done in {summary['wall_s']} s; results in {out}"
        + (f"; failed: {summary['failures']}" if summary["failures"] else ""), flush=True)
  return 1 if summary["failures"] else 0


if __name__ == "__main__":
  define_flags()
  app.run(main)
