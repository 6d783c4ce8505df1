"""Benchmark and profile the evaluator: templates/s of the scorer, images/s of the image tower.

  python -m lmbbo_jax.bench --arch=ViT-B/32 --weights=random --classes=100 --dtype=float32 --json
  python -m lmbbo_jax.bench --arch=ViT-B/32 --classes=1000 --repeats=3 --json
  python -m lmbbo_jax.bench --what=images --arch=ViT-B/32 --batch_size=64 --json
  python -m lmbbo_jax.bench ... --profile_dir=/tmp/trace   (one extra, untimed jax.profiler trace)

Text: `--classes=1000` uses ImageNet's class names, `--classes=100` Caltech101's
(CoOp's lists shipped in third_party), other counts the first N ImageNet names.
Templates are realistic and of mixed length (OpenAI's short ones and long
LLM-style ones). Image features are random unit vectors, `--images_per_class`
per class. Every repeat scores all templates with cold tokenization caches;
the warm-up pass (compiles) is excluded; medians are reported.

Output: one JSON object per line with `--json` (else a readable line), with
arch, classes, templates, dtype, devices, templates_per_s (median),
ms_per_template, tokens_per_template (executed, padded), gflops_per_template
(text tower, executed, FLOP model of shared/reference/performance.md),
achieved_gflops (text + image matmul over time), the per-repeat figures, and
CPU contention measured from /proc/stat during the timed repeats: own_cores
(this process) and other_cores (everything else), out of `cpus`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from typing import Any

import numpy as np

# Short OpenAI-style and long LLM-style templates, interleaved so that any
# `--templates=N` prefix of the list is mixed too.
TEMPLATES = [
    "a photo of a {}.",
    "An image of a {} with a blurred background that emphasizes the subject",
    "a bad photo of a {}.",
    "A high-quality photograph of a {}, taken in natural daylight with sharp focus.",
    "a low resolution photo of the {}.",
    "A close-up shot of a {} showing its distinctive shape, texture and colours.",
    "itap of a {}.",
    "a centered photo of a single {} on a plain background",
    "a sculpture of a {}.",
    "A {} in its typical environment, photographed by a professional wildlife photographer.",
    "a rendering of the {}.",
    "a blurry, low-light snapshot of a {} taken with an old phone camera",
    "a photo of the large {}.",
    "a photo of a {}, a type of object.",
    "a black and white photo of the {}.",
    "This is a picture of a {}.",
    "art of the {}.",
    "{} in the wild.",
    "A detailed studio photo of a {} against a white backdrop, with soft shadows.",
    "a cropped photo of the {}.",
    "Identify the {} in this photograph.",
    "a bright photo of a {}.",
    "a photo of my {}.",
    "a close-up photo of the {}.",
]
# The eight 6-word templates of shared/tools/peer_bench.py (the PyTorch anchors).
SHORT_TEMPLATES = [
    "a low resolution photo of the {}.",
    "a bright photo of the small {}.",
    "a dark photo of the large {}.",
    "a cropped photo of a clean {}.",
    "a jpeg corrupted photo of the {}.",
    "a pixelated photo of a dirty {}.",
    "a close-up photo of the nice {}.",
    "a good photo of the weird {}.",
]


class BenchError(ValueError):
  """Bad benchmark flags (the message says what to change)."""


# ----------------------------------------------------------------------------- CPU accounting
class CpuMeter:
  """Own vs other CPU time between `start()` and `stop()`, from /proc/stat and os.times()."""

  def __init__(self):
    self.cpus = os.cpu_count() or 1

  @staticmethod
  def _system() -> tuple[float, float] | None:
    try:
      with open("/proc/stat") as f:
        fields = [float(x) for x in f.readline().split()[1:]]
    except OSError:
      return None
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / tick, idle / tick

  @staticmethod
  def _own() -> float:
    t = os.times()
    return t.user + t.system

  def start(self) -> None:
    self._t0, self._sys0, self._own0 = time.perf_counter(), self._system(), self._own()

  def stop(self) -> dict[str, float]:
    wall = time.perf_counter() - self._t0
    own = self._own() - self._own0
    out = {"wall_s": wall, "own_cores": own / wall, "cpus": self.cpus}
    sys1 = self._system()
    if sys1 is not None and self._sys0 is not None:
      busy = sys1[0] - self._sys0[0]
      idle = sys1[1] - self._sys0[1]
      out["other_cores"] = max(0.0, busy - own) / wall
      out["idle_cores"] = idle / wall
    return out


def _loadavg() -> list[float]:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return []


def _median_cpu(cpus: list[dict[str, float]]) -> dict[str, float]:
  keys = set().union(*cpus) if cpus else set()
  return {k: round(statistics.median(c[k] for c in cpus if k in c), 3) for k in sorted(keys)}


# ----------------------------------------------------------------------------- setup
def class_names_for(n: int) -> list[str]:
  from lmbbo_jax.data.classnames import class_names
  if n == 100:
    return class_names("caltech101")
  names = class_names("imagenet")
  if n > len(names):
    raise BenchError(f"--classes={n}: at most {len(names)} realistic class names are shipped")
  return names[:n]


def load_model(arch: str, weights: str, dtype: str):
  import jax.numpy as jnp
  from lmbbo_jax.models.loading import load_clip
  source = f"random:{arch}" if weights == "random" else weights
  return load_clip(source, dtype=jnp.dtype(dtype))


def _profile(profile_dir: str | None):
  if not profile_dir:
    return contextlib.nullcontext()
  import jax
  return jax.profiler.trace(profile_dir)


def profile_summary(profile_dir: str, top: int = 12) -> list[list]:
  """Busiest XLA ops of the newest trace in `profile_dir`: [name, ms, share of op time]."""
  import collections
  import glob
  import jax
  paths = sorted(glob.glob(os.path.join(profile_dir, "**", "*.xplane.pb"), recursive=True),
                 key=os.path.getmtime)
  if not paths:
    return []
  data = jax.profiler.ProfileData.from_file(paths[-1])
  totals: collections.Counter = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      if line.name == "python" or "Steps" in line.name:
        continue
      for event in line.events:
        name = event.name
        if name.startswith(("ThreadpoolListener", "ThunkExecutor", "end: ")):
          continue
        totals[name] += event.duration_ns / 1e6
  total = sum(totals.values()) or 1.0
  return [[name, round(ms, 1), round(ms / total, 3)] for name, ms in totals.most_common(top)]


def _emit(record: dict[str, Any], as_json: bool) -> None:
  if as_json:
    print(json.dumps(record), flush=True)
  else:
    keys = ("what", "arch", "classes", "templates", "dtype", "templates_per_s", "images_per_s",
            "ms_per_template", "achieved_gflops", "own_cores", "other_cores")
    print("  ".join(f"{k}={record[k]}" for k in keys if k in record), flush=True)


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- text
def bench_text(args, clip) -> dict[str, Any]:
  import jax
  from lmbbo_jax.evaluator.scorer import PromptScorer
  names = class_names_for(args.classes)
  rng = np.random.default_rng(0)
  n_img = args.classes * args.images_per_class
  feats = rng.normal(size=(n_img, clip.embed_dim)).astype(np.float32)
  labels = np.repeat(np.arange(args.classes), args.images_per_class).astype(np.int32)
  base = TEMPLATES if args.template_set == "mixed" else SHORT_TEMPLATES
  num = args.templates or len(base)
  templates = [base[i % len(base)] for i in range(num)]
  if num > len(base):  # Distinct texts, so nothing is deduplicated.
    templates = [t if i < len(base) else f"{t} ({i // len(base)})"
                 for i, t in enumerate(templates)]
  if args.layout == "trimmed":
    return bench_trimmed(args, clip, names, feats, labels, templates)
  kwargs = {k: getattr(args, k) for k in ("class_chunk", "max_templates_per_call",
                                          "max_rows_per_call") if getattr(args, k)}
  scorer = PromptScorer(clip, {"train": feats}, {"train": labels}, names, **kwargs)

  _log(f"bench: warm-up ({len(templates)} templates, {args.classes} classes; compiles)")
  t0 = time.perf_counter()
  warm = scorer.score(templates)
  compile_s = time.perf_counter() - t0
  rejected = [s.template for s in warm if not s.ok]
  if rejected:
    raise BenchError(f"templates rejected: {rejected}")
  compiles = scorer.stats()["compiles"]

  runs, cpus, stats = [], [], []
  meter = CpuMeter()
  for r in range(args.repeats):
    scorer.clear_caches()  # New templates pay for tokenization, as in a real search.
    scorer.reset_stats()
    meter.start()
    scorer.score(templates)
    cpu = meter.stop()
    runs.append(len(templates) / cpu["wall_s"])
    cpus.append(cpu)
    stats.append(scorer.stats())
    _log(f"bench: repeat {r + 1}/{args.repeats}: {runs[-1]:.3f} templates/s, "
         f"own {cpu['own_cores']:.2f} / other {cpu.get('other_cores', float('nan')):.2f} cores")
  profile = None
  if args.profile_dir:
    scorer.clear_caches()
    with _profile(args.profile_dir):
      scorer.score(templates)
    profile = profile_summary(args.profile_dir)
  if scorer.stats()["compiles"] != compiles and not args.profile_dir:
    _log("bench: warning: timed repeats compiled new shapes")

  n = len(templates)
  med = statistics.median(runs)
  last = stats[-1]
  gflops_text = last["gflops_text"] / n
  gflops_img = last["gflops_images"] / n
  return {
      "what": "text", "layout": "prefix", "template_set": args.template_set,
      "arch": args.arch, "weights": args.weights, "classes": args.classes, "templates": n, "dtype": args.dtype, "devices": jax.device_count(),
      "backend": jax.default_backend(), "templates_per_s": round(med, 4),
      "ms_per_template": round(1000 / med, 2),
      "tokens_per_template": round(last["token_rows"] / n, 1),
      "tokens_real_per_template": round(last["token_rows_real"] / n, 1),
      "gflops_per_template": round(gflops_text, 2),
      "gflops_images_per_template": round(gflops_img, 3),
      "achieved_gflops": round((gflops_text + gflops_img) * med, 1),
      "runs_templates_per_s": [round(x, 4) for x in runs],
      "repeats": args.repeats, "warmup_s": round(compile_s, 1), "compiles": compiles,
      "calls_per_repeat": last["calls"], "class_chunk": scorer.class_chunk,
      "time_split": {k: round(statistics.median(st[f"seconds_{k}"] for st in stats)
                              / statistics.median(st["seconds_busy"] for st in stats), 3)
                     for k in ("prepare", "device", "merge")},
      "max_units": scorer.max_units, "max_rows": scorer.max_rows,
      "images": n_img, **_median_cpu(cpus), "loadavg": _loadavg(),
      "jax": jax.__version__, **({"profile_top_ops": profile} if profile else {}),
  }


def bench_trimmed(args, clip, names, feats, labels, templates) -> dict[str, Any]:
  """Baseline without prefix sharing: each template's C sentences, one trimmed encode."""
  import jax
  from lmbbo_jax import templates as templates_lib
  from lmbbo_jax.models.api import bucket_length
  images = feats / np.linalg.norm(feats, axis=-1, keepdims=True)
  scale = clip.logit_scale
  tokens = []

  def score(template):
    ids = clip.tokenize([templates_lib.fill(template, n) for n in names])
    tokens.append(bucket_length(int((clip.eot_index(ids) + 1).max()), clip.context_length))
    text = np.array(clip.encode_text(ids))
    text /= np.linalg.norm(text, axis=-1, keepdims=True)
    pred = (scale * images @ text.T).argmax(axis=1)
    return float((pred == labels).mean())

  _log(f"bench: trimmed baseline warm-up ({len(templates)} templates)")
  t0 = time.perf_counter()
  for t in templates:
    score(t)
  compile_s = time.perf_counter() - t0
  runs, cpus = [], []
  meter = CpuMeter()
  for r in range(args.repeats):
    tokens.clear()
    meter.start()
    for t in templates:
      score(t)
    cpu = meter.stop()
    runs.append(len(templates) / cpu["wall_s"])
    cpus.append(cpu)
    _log(f"bench: repeat {r + 1}/{args.repeats}: {runs[-1]:.3f} templates/s")
  cfg = clip.config.text
  params = cfg.layers * (4 * cfg.width ** 2 + 2 * cfg.width * int(cfg.width * cfg.mlp_ratio))
  # `tokens` holds each call's executed (bucketed) length.
  flops = [len(names) * (2 * params * L + 4 * cfg.layers * cfg.width * L * L) for L in tokens]
  gflop = sum(flops) / len(flops) / 1e9
  med = statistics.median(runs)
  return {
      "what": "text", "layout": "trimmed", "template_set": args.template_set,
      "arch": args.arch, "weights": args.weights, "classes": args.classes,
      "templates": len(templates), "dtype": args.dtype, "devices": jax.device_count(),
      "backend": jax.default_backend(), "templates_per_s": round(med, 4),
      "ms_per_template": round(1000 / med, 2),
      "tokens_per_template": round(len(names) * sum(tokens) / len(tokens), 1),
      "gflops_per_template": round(gflop, 2), "achieved_gflops": round(gflop * med, 1),
      "runs_templates_per_s": [round(x, 4) for x in runs], "repeats": args.repeats,
      "warmup_s": round(compile_s, 1), **_median_cpu(cpus), "loadavg": _loadavg(),
      "jax": jax.__version__,
  }


# ----------------------------------------------------------------------------- images
def bench_images(args, clip) -> dict[str, Any]:
  import jax
  from lmbbo_jax.data.preprocess import Batch
  from lmbbo_jax.evaluator import features as features_lib, sharding
  mesh = sharding.make_mesh()
  bsz = features_lib.image_batch_size(args.batch_size, mesh)
  size = clip.image_size
  rng = np.random.default_rng(0)
  pixels = rng.normal(size=(bsz, size, size, 3)).astype(np.float32)
  batch = Batch(pixels, np.zeros((bsz,), np.int32), np.ones((bsz,), bool), [""] * bsz)
  variables = sharding.put_replicated(features_lib._visual_variables(clip), mesh)

  def run(k):
    feats, _ = features_lib.encode_batches(clip, [batch] * k, mesh=mesh, variables=variables)
    jax.block_until_ready(feats)

  _log(f"bench: image warm-up (batch {bsz}; compiles)")
  t0 = time.perf_counter()
  run(1)
  compile_s = time.perf_counter() - t0
  runs, cpus = [], []
  meter = CpuMeter()
  for r in range(args.repeats):
    meter.start()
    run(args.batches)
    cpu = meter.stop()
    runs.append(args.batches * bsz / cpu["wall_s"])
    cpus.append(cpu)
    _log(f"bench: repeat {r + 1}/{args.repeats}: {runs[-1]:.2f} images/s")
  profile = None
  if args.profile_dir:
    with _profile(args.profile_dir):
      run(1)
    profile = profile_summary(args.profile_dir)
  med = statistics.median(runs)
  v = clip.config.vision
  gflop = None
  if v.kind == "vit":
    tokens = (size // v.patch_size) ** 2 + 1
    mlp = int(v.width * v.mlp_ratio)
    params = v.layers * (4 * v.width ** 2 + 2 * v.width * mlp)
    gflop = (2 * params * tokens + 4 * v.layers * v.width * tokens ** 2
             + 2 * tokens * 3 * v.patch_size ** 2 * v.width) / 1e9
  return {
      "what": "images", "arch": args.arch, "weights": args.weights, "dtype": args.dtype,
      "devices": jax.device_count(), "backend": jax.default_backend(), "batch_size": bsz,
      "images_per_s": round(med, 2), "ms_per_image": round(1000 / med, 2),
      "gflops_per_image": gflop and round(gflop, 2),
      "achieved_gflops": gflop and round(gflop * med, 1),
      "runs_images_per_s": [round(x, 2) for x in runs], "repeats": args.repeats,
      "warmup_s": round(compile_s, 1), **_median_cpu(cpus), "loadavg": _loadavg(),
      "jax": jax.__version__, **({"profile_top_ops": profile} if profile else {}),
  }


# ----------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m lmbbo_jax.bench", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--what", choices=("text", "images"), default="text")
  p.add_argument("--arch", default="ViT-B/32")
  p.add_argument("--weights", default="random",
                 help="'random' (random init of --arch) or a load_clip source")
  p.add_argument("--classes", type=int, default=100)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--templates", type=int, default=0,
                 help="how many templates (default: the whole set)")
  p.add_argument("--template_set", choices=("mixed", "short"), default="mixed",
                 help="mixed: short and long LLM-style; short: peer_bench's 6-word ones")
  p.add_argument("--layout", choices=("prefix", "trimmed"), default="prefix",
                 help="prefix: the PromptScorer; trimmed: a plain JAX baseline (one "
                      "CLIP.encode_text call per template, trimmed to a length bucket)")
  p.add_argument("--images_per_class", type=int, default=16)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--batch_size", type=int, default=64, help="images per step (--what=images)")
  p.add_argument("--batches", type=int, default=4, help="batches per repeat (--what=images)")
  p.add_argument("--class_chunk", type=int, default=None)
  p.add_argument("--max_templates_per_call", type=int, default=None)
  p.add_argument("--max_rows_per_call", type=int, default=None)
  p.add_argument("--profile_dir", default=None, help="write a jax.profiler trace here")
  p.add_argument("--json", action="store_true", help="one JSON object per line")
  args = p.parse_args(argv)
  if args.classes < 1 or args.templates < 0 or args.repeats < 1:
    p.error("--classes and --repeats must be >= 1")
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    _log(f"bench: loading {args.weights} {args.arch} ({args.dtype})")
    clip = load_model(args.arch, args.weights, args.dtype)
    record = bench_text(args, clip) if args.what == "text" else bench_images(args, clip)
  except BenchError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  _emit(record, args.json)
  return 0


if __name__ == "__main__":
  sys.exit(main())
