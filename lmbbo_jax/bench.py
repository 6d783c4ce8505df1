"""Benchmark and profile the evaluator: templates/s of the scorer, images/s of the image tower.

  python -m lmbbo_jax.bench --arch=ViT-B/32 --weights=random --classes=100 --dtype=float32 --json
  python -m lmbbo_jax.bench --arch=ViT-B/32 --classes=1000 --repeats=3 --json
  python -m lmbbo_jax.bench --what=images --arch=ViT-B/32 --batch_size=64 --json
  python -m lmbbo_jax.bench ... --profile_dir=/tmp/trace   (one extra, untimed jax.profiler trace)
  python -m lmbbo_jax.bench --mode=cold --arch=ViT-B/32 --classes=100 --json

Steady mode (the default) excludes warm-up: it compiles first, then times
repeats. Cold mode measures what a run sees from its first template: this
process starts with an empty persistent compilation cache (a new temporary
directory, unless --jax_cache_dir names one), builds the scorer (its programs
compile in a background thread, as in a run) and scores a stream of LLM-like
templates of mixed lengths in small batches (`--stream_batch`, as proposals
arrive), or the templates of `--stream_file` (one per line, e.g. a run's
`templates_scored.txt`). It reports the time to the first scored template,
templates/s including every compile, how many programs compiled and for how
long, and then the same stream's steady templates/s in the same process.

Text: `--classes=1000` uses ImageNet's class names, `--classes=100` Caltech101's
(CoOp's lists shipped in third_party), other counts the first N ImageNet names.
Templates are realistic and of mixed length (OpenAI's short ones and long
LLM-style ones). Image features are random unit vectors, `--images_per_class`
per class. Every repeat scores all templates with cold tokenization caches;
the warm-up pass (compiles) is excluded; medians are reported.

Output: one JSON object per line with `--json` (else a readable line), with
arch, classes, templates, dtype, devices, templates_per_s (median),
ms_per_template, tokens_per_template (executed, padded), gflops_per_template
(text tower, executed, `TextConfig.flops`),
achieved_gflops (text + image matmul over time), the text tower's work beside
the peer's (`work_bound`: tokens_peer_per_template, peer_stream.py's layout;
tokens_distinct_per_template, the least any exact method runs; their ratios),
the per-repeat figures, and
CPU contention measured from /proc/stat during the timed repeats: own_cores
(this process) and other_cores (everything else), out of `cpus`.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import types
from typing import Any

import numpy as np
from absl import app, flags

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
# Eight 6-word templates, the same as the PyTorch peer benchmark's (README, "Profiling
# prompt throughput"), so that figures compare on the same work.
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
def random_image_features(classes: int, per_class: int, dim: int):
  """Seeded random image features [classes * per_class, dim] and their labels (the
  scorer's work does not depend on what the images show)."""
  feats = np.random.default_rng(0).normal(size=(classes * per_class, dim)).astype(np.float32)
  return feats, np.repeat(np.arange(classes), per_class).astype(np.int32)


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
  feats, labels = random_image_features(args.classes, args.images_per_class, clip.embed_dim)
  n_img = len(labels)
  base = TEMPLATES if args.template_set == "mixed" else SHORT_TEMPLATES
  num = args.templates or len(base)
  templates = [base[i % len(base)] for i in range(num)]
  if num > len(base):  # Distinct texts, so nothing is deduplicated.
    templates = [t if i < len(base) else f"{t} ({i // len(base)})"
                 for i, t in enumerate(templates)]
  if args.layout == "trimmed":
    if not clip.config.text_causal:
      raise BenchError("--layout=trimmed trims rows at the end-of-text token, which a "
                       "bidirectional (SigLIP) tower does not allow; use --layout=prefix")
    return bench_trimmed(args, clip, names, feats, labels, templates)
  scorer = PromptScorer(clip, {"train": feats}, {"train": labels}, names,
                        rows_per_call=args.rows_per_call or None)

  _log(f"bench: warm-up ({len(templates)} templates, {args.classes} classes; compiles)")
  t0 = time.perf_counter()
  scorer.wait_compiled()
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
  work = work_bound(clip, templates, names)
  return {
      "what": "text", "layout": "prefix", "template_set": args.template_set,
      "arch": args.arch, "weights": args.weights, "classes": args.classes, "templates": n, "dtype": args.dtype, "devices": jax.device_count(),
      "backend": jax.default_backend(), "templates_per_s": round(med, 4),
      "ms_per_template": round(1000 / med, 2),
      "tokens_per_template": round(last["token_rows"] / n, 1),
      "tokens_real_per_template": round(last["token_rows_real"] / n, 1),
      **work, "token_ratio_peer_over_executed": round(
          work["tokens_peer_per_template"] * n / last["token_rows"], 3),
      "gflops_per_template": round(gflops_text, 2),
      "gflops_images_per_template": round(gflops_img, 3),
      "achieved_gflops": round((gflops_text + gflops_img) * med, 1),
      "runs_templates_per_s": [round(x, 4) for x in runs],
      "repeats": args.repeats, "warmup_s": round(compile_s, 1), "compiles": compiles,
      "calls_per_repeat": last["calls"],
      "time_split": {k: round(statistics.median(st[f"seconds_{k}"] for st in stats)
                              / statistics.median(st["seconds_busy"] for st in stats), 3)
                     for k in ("prepare", "device", "merge")},
      "call_shapes": scorer.stats()["call_shapes"],
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
  # `tokens` holds each call's executed (bucketed) length; causal rows of L see L keys each.
  flops = [len(names) * clip.config.text.flops(L, L * L) for L in tokens]
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


# ----------------------------------------------------------------------------- work
# peer_stream.py's layout: each template's sentences sorted by length, cut into calls
# of this many, each trimmed to its longest.
PEER_CHUNK = 32


def work_bound(clip, templates: list[str], names: list[str],
               chunk: int = PEER_CHUNK) -> dict[str, Any]:
  """Text-tower tokens per template: the plain-PyTorch peer's, and the least any exact method can run.

  Both towers are matmul-bound on a CPU, so a speed-up over the peer beyond its
  token ratio has to come from faster matmuls. `tokens_distinct_per_template`
  counts the distinct token prefixes of all the stream's class sentences: a
  token's output depends on it and the tokens before it only (causal), so no
  exact encoder, even one that kept every state of the whole stream, runs fewer
  through all layers but the last (which only the end-of-text tokens need whole).
  A bidirectional tower (SigLIP) reads every sentence as a full padded row: the
  peer and the least are its distinct sentences times the text length.
  """
  from lmbbo_jax import templates as templates_lib
  peer = 0
  distinct: set[int] = set()
  for template in templates:
    rows = clip.token_ids([templates_lib.fill(template, n) for n in names])
    if not clip.config.text_causal:
      peer += len(rows) * clip.context_length
      distinct.update((hash(tuple(r)), i) for r in rows for i in range(clip.context_length))
      continue
    lengths = sorted(len(r) for r in rows)
    calls = (lengths[i:i + chunk] for i in range(0, len(lengths), chunk))
    peer += sum(len(call) * call[-1] for call in calls)  # each call trimmed to its longest
    for row in rows:
      node = 0
      for token in row:  # one hash per prefix (collisions only undercount: a lower bound)
        node = hash((node, token))
        distinct.add(node)
  n = len(templates)
  return {"tokens_peer_per_template": round(peer / n, 1),
          "tokens_distinct_per_template": round(len(distinct) / n, 1),
          "peer_chunk": chunk,
          "token_ratio_peer_over_distinct": round(peer / max(1, len(distinct)), 3)}


# ----------------------------------------------------------------------------- cold
# Words of LLM-written templates: a stream drawn from them has the mixed lengths and
# slot positions of real proposals (1-9 words before the slot, 0-11 after).
_STREAM_HEADS = ("a photo of a", "a blurry photo of the", "an image of a", "a close-up of a",
                 "a high-quality photograph of a", "a picture showing a",
                 "a low resolution snapshot of the", "art of the", "a drawing of a",
                 "a detailed studio photo of a", "this is a", "a cropped image of my")
_STREAM_WORDS = ("small large bright dark vivid natural daylight sharp focus soft shadows "
                 "background white backdrop wild outdoor indoor typical environment "
                 "professional camera lens texture colours shape detailed centered "
                 "single plain old new clean dirty weird nice").split()


def llm_like_stream(n: int, seed: int) -> list[str]:
  """`n` distinct templates shaped like an LLM's proposals (seeded)."""
  rng = np.random.default_rng(seed)
  out: list[str] = []
  seen = set()
  while len(out) < n:
    head = _STREAM_HEADS[rng.integers(len(_STREAM_HEADS))]
    extra = " ".join(rng.choice(_STREAM_WORDS, rng.integers(0, 4)))
    tail = " ".join(rng.choice(_STREAM_WORDS, rng.integers(0, 12)))
    before = f"{head} {extra}".strip() if rng.random() < 0.5 else head
    t = f"{before} {{}}" + (f", {tail}." if tail else ".")
    if t not in seen:
      seen.add(t)
      out.append(t)
  return out


def _cold_cache_dir(cache_dir: str | None) -> str:
  """Points JAX's persistent compilation cache at `cache_dir` (default: new and empty)."""
  import jax
  path = os.path.expanduser(cache_dir) if cache_dir else tempfile.mkdtemp(prefix="lmbbo_cold_")
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  return path


def _stream(args) -> list[str]:
  if args.stream_file:
    with open(args.stream_file, encoding="utf-8") as f:
      found = [line.rstrip("\n") for line in f if "{}" in line]
    if not found:
      raise BenchError(f"--stream_file={args.stream_file}: no line holds a {{}} slot; "
                       "pass one template per line")
    return found[:args.templates] if args.templates else found
  return llm_like_stream(args.templates or 96, args.stream_seed)


def bench_cold(args, clip, cache_dir: str) -> dict[str, Any]:
  """Time to the first template and templates/s from the first template (module doc)."""
  import jax
  from lmbbo_jax.evaluator.scorer import PromptScorer
  names = class_names_for(args.classes)
  feats, labels = random_image_features(args.classes, args.images_per_class, clip.embed_dim)
  n_img = len(labels)
  stream = _stream(args)
  batches = [stream[i:i + args.stream_batch] for i in range(0, len(stream), args.stream_batch)]
  cache_files = len(os.listdir(cache_dir))
  _log(f"bench: cold stream of {len(stream)} templates in batches of {args.stream_batch}, "
       f"{args.classes} classes (compilation cache {cache_dir}: {cache_files} files)")
  meter = CpuMeter()
  meter.start()
  t0 = time.perf_counter()
  scorer = PromptScorer(clip, {"train": feats}, {"train": labels}, names,
                        rows_per_call=args.rows_per_call or None)
  first_s = None
  rejected = []
  for i, batch in enumerate(batches):
    scores = scorer.score(batch)
    rejected += [s.template for s in scores if not s.ok]
    if first_s is None:
      first_s = time.perf_counter() - t0
    if (i + 1) % max(1, len(batches) // 4) == 0:
      _log(f"bench: {min(len(stream), (i + 1) * args.stream_batch)}/{len(stream)} templates "
           f"at {time.perf_counter() - t0:.1f} s")
  total_s = time.perf_counter() - t0
  cpu = meter.stop()
  cold = scorer.stats()
  scored = len(stream) - len(rejected)
  # The same stream again, programs compiled: the steady rate of this stream.
  scorer.clear_caches()
  scorer.reset_stats()
  t1 = time.perf_counter()
  for batch in batches:
    scorer.score(batch)
  steady_s = time.perf_counter() - t1
  steady = scorer.stats()
  rejected_set = set(rejected)
  work = work_bound(clip, [t for t in stream if t not in rejected_set], names)
  return {
      "what": "text", "mode": "cold", "arch": args.arch, "weights": args.weights,
      "classes": args.classes, "templates": len(stream), "templates_scored": scored,
      "rejected": len(rejected), "stream": args.stream_file or f"generated (seed "
      f"{args.stream_seed})", "stream_batch": args.stream_batch, "dtype": args.dtype,
      "devices": jax.device_count(), "backend": jax.default_backend(),
      "first_template_s": round(first_s or 0.0, 2), "stream_s": round(total_s, 2),
      "templates_per_s_incl_compile": round(scored / total_s, 4),
      "templates_per_s_steady": round(scored / steady_s, 4),
      "compiles": cold["compiles"], "compile_s_total": round(cold["compile_s_total"], 2),
      "compile_s_waited": round(cold["seconds_compile"], 2),
      "compile_share": round(cold["seconds_compile"] / total_s, 3),
      "calls": cold["calls"], "cache_files_before": cache_files,
      "tokens_per_template": round(steady["token_rows"] / scored, 1),
      **work, "token_ratio_peer_over_executed": round(
          work["tokens_peer_per_template"] * scored / steady["token_rows"], 3),
      "call_shapes": scorer.stats()["call_shapes"],
      "images": n_img, **{k: round(v, 2) for k, v in cpu.items()}, "loadavg": _loadavg(),
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
  variables = sharding.put_replicated(features_lib.visual_variables(clip), mesh)

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
_DEFINED: list[str] = []


def define_flags() -> None:
  """The command line's flags (defined when run, so that importing this module defines none)."""
  before = set(flags.FLAGS)
  flags.DEFINE_enum("what", "text", ["text", "images"], "What to measure.")
  flags.DEFINE_enum(
      "mode", "steady", ["steady", "cold"],
      "steady: warm-up excluded, medians of repeats; cold (text only): from the first "
      "template, compiles included, empty compilation cache (see the module doc).")
  flags.DEFINE_string("arch", "ViT-B/32", "A named architecture (CLIP or SigLIP, e.g. siglip-base-patch16-224).")
  flags.DEFINE_string("weights", "random",
                      "'random' (random init of --arch) or a load_clip source.")
  flags.DEFINE_integer("classes", 100, "Class names (100: Caltech101's, else the first N "
                       "of ImageNet's).", lower_bound=1)
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
  flags.DEFINE_integer("templates", 0, "How many templates (0: the whole set; cold mode: "
                       "the generated stream's length, default 96).", lower_bound=0)
  flags.DEFINE_enum("template_set", "mixed", ["mixed", "short"],
                    "mixed: short and long LLM-style; short: peer_bench's eight 6-word ones.")
  flags.DEFINE_enum("layout", "prefix", ["prefix", "trimmed"],
                    "prefix: the PromptScorer; trimmed: a plain JAX baseline (one "
                    "CLIP.encode_text call per template, trimmed to a length bucket).")
  flags.DEFINE_integer("images_per_class", 16, "Random image features per class.",
                       lower_bound=1)
  flags.DEFINE_integer("repeats", 3, "Timed repeats (steady mode).", lower_bound=1)
  flags.DEFINE_integer("batch_size", 64, "Images per step (--what=images).")
  flags.DEFINE_integer("batches", 4, "Batches per repeat (--what=images).")
  flags.DEFINE_integer("rows_per_call", 0, "Token rows of the largest call (0: 32 on CPU, "
                       "1024 on accelerators).")
  flags.DEFINE_string("stream_file", None, "Cold mode: templates to score in order, one per "
                      "line (lines without {} are skipped); default: a generated LLM-like "
                      "stream.")
  flags.DEFINE_integer("stream_batch", 4, "Cold mode: templates per score call.",
                       lower_bound=1)
  flags.DEFINE_integer("stream_seed", 0, "Cold mode: seed of the generated stream.")
  flags.DEFINE_string("jax_cache_dir", None, "Cold mode: persistent compilation cache to use "
                      "(default: a new empty temporary directory, so the figure is a first "
                      "run's).")
  flags.DEFINE_string("profile_dir", None, "Write a jax.profiler trace here.")
  flags.DEFINE_bool("json", False, "One JSON object per line.")
  _DEFINED[:] = sorted(set(flags.FLAGS) - before)


def _args() -> types.SimpleNamespace:
  """The flags `define_flags` made, as one namespace (the bench functions take it)."""
  return types.SimpleNamespace(**{n: flags.FLAGS[n].value for n in _DEFINED})


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  args = _args()
  try:
    if args.mode == "cold":
      if args.what != "text" or args.layout != "prefix":
        raise BenchError("--mode=cold measures the scorer: use --what=text --layout=prefix")
      cache_dir = _cold_cache_dir(args.jax_cache_dir)
    _log(f"bench: loading {args.weights} {args.arch} ({args.dtype})")
    clip = load_model(args.arch, args.weights, args.dtype)
    if args.what == "images":
      record = bench_images(args, clip)
    elif args.mode == "cold":
      record = bench_cold(args, clip, cache_dir)
    else:
      record = bench_text(args, clip)
  except (BenchError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  _emit(record, args.json)
  return 0


def run():
  define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
