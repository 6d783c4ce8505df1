"""A run's results: typed objects, results.json built from public summaries, the outputs.

`build_results` reads only what the components publish: the methods' `SeedOutcome`s,
`PromptScorer.stats()`, `PackedTextEncoder.stats()`, the ledger's and the client's
summaries. `ExperimentResult` is the typed view the Python API returns (results.json's
dict stays in `.data`).
"""

from __future__ import annotations

import dataclasses
import pathlib
import platform
import statistics
import sys
from typing import Any, Mapping, Sequence

import orjson

from lmbbo_jax import io as io_lib
from lmbbo_jax import report
from lmbbo_jax.config import DESCRIPTION_LLM_METHODS
from lmbbo_jax.data.registry import lead_metric
from lmbbo_jax.evaluator.types import METRICS, Score
from lmbbo_jax.search.proposers import LLM_PROPOSERS
from lmbbo_jax.search.state import metric_values, selection_key

RESULTS_SCHEMA = 1
SPLITS = ("train", "val", "test")
# Metrics besides accuracy in each row: `<split>_<metric>`.
OTHER_METRICS = tuple(m for m in METRICS if m != "accuracy")


@dataclasses.dataclass(frozen=True)
class Entry:
  """One template's row: its text and accuracy per split (None where not scored)."""
  template: str | None
  train_acc: float | None = None
  val_acc: float | None = None
  test_acc: float | None = None
  extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  # The score it was made from (for CLIP_benchmark's layout); not in results.json.
  score: Score | None = dataclasses.field(default=None, compare=False, repr=False)

  @classmethod
  def of(cls, score: Score | None, **extra) -> "Entry":
    """A row of `score`: accuracy per split, and `<split>_acc5` and
    `<split>_mean_per_class_recall` (and the train log-probability) in `extra`."""
    if score is None:
      return cls(None, extra=extra)
    metrics = {f"{split}_{name}": value for name in OTHER_METRICS
               for split, value in score.metric(name).items()}
    if score.logprob:
      metrics["train_logprob"] = score.logprob.get("train")
    acc = score.accuracy
    return cls(score.template, acc.get("train"), acc.get("val"), acc.get("test"),
               {**metrics, **extra}, score)

  def value(self, metric: str, split: str) -> float | None:
    """`metric` (one of `types.METRICS`) on `split`."""
    key = f"{split}_acc" if metric == "accuracy" else f"{split}_{metric}"
    return self.to_json().get(key)

  @classmethod
  def from_json(cls, d: Mapping[str, Any] | None) -> "Entry":
    d = dict(d or {})
    return cls(d.pop("template", None), d.pop("train_acc", None), d.pop("val_acc", None),
               d.pop("test_acc", None), d)

  def to_json(self) -> dict[str, Any]:
    return {"template": self.template, "train_acc": self.train_acc, "val_acc": self.val_acc,
            "test_acc": self.test_acc, **self.extra}


@dataclasses.dataclass(frozen=True)
class SeedResult:
  seed: int
  best: Entry
  initial_best: Entry
  baselines: dict[str, Entry]
  stop_reason: str


@dataclasses.dataclass(frozen=True)
class ExperimentResult:
  """What `run_experiment` returns: the typed fields most callers read, and `data`, the
  whole results.json (schema `RESULTS_SCHEMA`; README, "Outputs")."""
  workdir: str
  dataset: str
  model: str
  best: Entry
  baselines: dict[str, Entry]
  per_seed: dict[int, SeedResult]
  templates_evaluated: int
  llm_calls: int
  cost_usd: float
  templates_per_s: float
  data: dict[str, Any]

  @classmethod
  def from_json(cls, data: Mapping[str, Any], workdir: str = "") -> "ExperimentResult":
    per_seed = {int(s): SeedResult(int(s), Entry.from_json(ps.get("best")),
                                   Entry.from_json(ps.get("initial_best")),
                                   {k: Entry.from_json(v) for k, v in ps["baselines"].items()},
                                   ps.get("stop_reason", ""))
                for s, ps in data.get("per_seed", {}).items()}
    return cls(workdir=workdir, dataset=data.get("dataset", ""),
               model=(data.get("model") or {}).get("name", ""),
               best=Entry.from_json(data.get("best")),
               baselines={k: Entry.from_json(v) for k, v in data.get("baselines", {}).items()},
               per_seed=per_seed, templates_evaluated=data.get("n_templates_evaluated", 0),
               llm_calls=(data.get("llm") or {}).get("calls", 0),
               cost_usd=(data.get("llm") or {}).get("cost_usd", 0.0),
               templates_per_s=(data.get("throughput") or {}).get("templates_per_s", 0.0),
               data=dict(data))

  @classmethod
  def load(cls, workdir: str | pathlib.Path) -> "ExperimentResult":
    path = pathlib.Path(workdir) / "results.json"
    return cls.from_json(orjson.loads(path.read_bytes()), str(workdir))


def aggregate(entries: Sequence[Mapping[str, Any]]) -> dict:
  """Mean and std over seeds of each split's metrics in `entries`."""
  vals = {}
  keys = [f"{s}_acc" for s in SPLITS] + [f"{s}_{m}" for m in OTHER_METRICS for s in SPLITS]
  for split in keys:
    xs = [e.get(split) for e in entries if e]
    xs = [x for x in xs if x is not None]
    if xs:
      vals[split] = {"mean": statistics.fmean(xs),
                     "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}
  return vals


def union_length(intervals) -> float:
  """Total time covered by possibly overlapping (start, end) intervals."""
  total, end = 0.0, float("-inf")
  for a, b in sorted(intervals):
    if b > end:
      total += b - max(a, end)
      end = b
  return total


def versions() -> dict:
  import flax
  import jax
  from lmbbo_jax import __version__
  dev = jax.devices()[0]
  return {"lmbbo_jax": __version__, "python": platform.python_version(),
          "jax": jax.__version__, "flax": flax.__version__,
          "device_kind": dev.device_kind, "platform": dev.platform,
          "device_count": jax.device_count(), "process_count": jax.process_count(),
          "git_commit": _git_commit()}


def _git_commit() -> str | None:
  head = pathlib.Path(__file__).resolve().parent.parent / ".git" / "HEAD"
  try:
    ref = head.read_text().strip()
    if ref.startswith("ref: "):
      return (head.parent / ref[5:]).read_text().strip()
    return ref
  except OSError:
    return None


def build_results(cfg, model: Mapping[str, Any], seeds, run, *, scorer_stats: Sequence[dict],
                  encoder_stats: Sequence[dict], wall_s: float) -> dict:
  """results.json's dict from the methods' outcomes and the components' summaries.

  Args:
    cfg: the `ExperimentConfig`.
    model: the model's summary (name, source, weights_hash, embed_dim, image_size).
    seeds: the `methods.SeedSetup`s, in seed order.
    run: the `methods.MethodRun`.
    scorer_stats / encoder_stats: `PromptScorer.stats()` per seed and
      `PackedTextEncoder.stats()` per encoder (each encoder once).
    wall_s: the whole run's wall time.
  """
  from lmbbo_jax.search.optimizer import sum_chain_counts
  rule = (cfg.search.select_by, cfg.search.tie_break)
  metric = cfg.search.select_metric
  per_seed, n_eval, counts_total = {}, 0, {}
  for s in seeds:
    out = run.outcomes[s.seed]
    baselines = {k: v.to_json() for k, v in s.baselines.items()}
    if "pool_best" in cfg.baselines and out.initial_best is not None:
      baselines["pool_best"] = Entry.of(out.initial_best).to_json()
    per_seed[str(s.seed)] = {
        "best": Entry.of(out.best, chain=out.best_chain).to_json(),
        "initial_best": Entry.of(out.initial_best).to_json(),
        "baselines": baselines,
        "stop_reason": out.stop_reason,
        "chain_stop_reasons": {str(c): v for c, v in sorted(out.chain_stop_reasons.items())},
        "counts": out.counts,
        "task": s.task.describe() if hasattr(s.task, "describe") else {},
    }
    n_eval += sum(1 for rec in out.records if rec.ok)
    for k, v in out.counts.items():
      if isinstance(v, (int, float)):
        counts_total[k] = counts_total.get(k, 0) + v

  # The overall best: the seeds' bests ranked by the selection rule (never test).
  with_best = [s.seed for s in seeds if run.outcomes[s.seed].best is not None]
  best_seed = str(min(with_best, key=lambda seed: selection_key(
      metric_values(run.outcomes[seed].best, metric), run.outcomes[seed].best.logprob, *rule))
      if with_best else seeds[0].seed)
  best_ps = per_seed[best_seed]

  def agg(getter) -> dict:
    return aggregate([getter(ps) for ps in per_seed.values()])

  names = sorted({b for ps in per_seed.values() for b in ps["baselines"]})
  agg_all = {"best": agg(lambda ps: ps["best"]),
             "initial_best": agg(lambda ps: ps["initial_best"]),
             "baselines": {b: agg(lambda ps, b=b: ps["baselines"].get(b) or {}) for b in names}}
  llm = run.llm
  templates_scored = sum(s.get("templates", 0) + s.get("ensembles", 0) for s in scorer_stats)
  busy = sum(s.get("seconds_busy", 0.0) for s in scorer_stats)
  # Scoring's share of compiling: compiles it ran or waited for (the rest ran in the
  # background while images were encoded).
  compile_s = sum(s.get("seconds_compile", 0.0) for s in scorer_stats)
  encode_s = sum(s.encode_s for s in seeds)
  images = sum(s.images_encoded for s in seeds)
  search_busy = union_length([i for s in scorer_stats for i in s.get("busy_intervals", [])])
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
      "device_busy_fraction": min(1.0, search_busy / run.wall_s) if run.wall_s else 0.0,
      "search_wall_s": run.wall_s,
      "wall_s": wall_s,
      "compiles": sum(e["compiles"] for e in encoder_stats),
      "compile_s_total": sum(e["compile_s"] for e in encoder_stats),
      "call_shapes": sorted({tuple(c) for e in encoder_stats for c in e["call_shapes"]}),
      "gflops_text": sum(s.get("gflops_text", 0.0) for s in scorer_stats),
  }
  uses_llm = cfg.proposer_kind in LLM_PROPOSERS or cfg.method in DESCRIPTION_LLM_METHODS
  llm_section = {
      "proposer": cfg.proposer_kind,
      "model": cfg.llm.model if uses_llm else None,
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
      "proposals": sum_chain_counts([c for o in run.outcomes.values()
                                     for c in (o.counts.get("per_chain") or {}).values()]),
      **run.client,
  }
  return {
      "schema": RESULTS_SCHEMA,
      "status": "finished",
      "config": cfg.to_json(),
      "command": " ".join(sys.argv),
      "versions": versions(),
      "model": dict(model, dtype=cfg.dtype),
      "dataset": cfg.dataset,
      # The metric the report leads with (the CLIP paper's per dataset).
      "lead_metric": lead_metric(cfg.dataset),
      "shots": cfg.shots,
      "seeds": list(cfg.seeds),
      "num_classes": len(seeds[0].task.class_names),
      "best": dict(best_ps["best"], seed=int(best_seed)),
      "initial_best": dict(best_ps["initial_best"], seed=int(best_seed)),
      "baselines": best_ps["baselines"],
      "aggregate": agg_all,
      "per_seed": per_seed,
      "n_templates_evaluated": n_eval,
      "llm": llm_section,
      "throughput": throughput,
  }


def write_outputs(workdir: pathlib.Path, results: dict, seeds, outcomes) -> None:
  """prompts.jsonl, transcript.jsonl, prompts.csv, the plots, summary.md, results.json."""
  records, transcript = [], []
  for s in seeds:
    out = outcomes[s.seed]
    records += [dict(rec.to_row(), seed=s.seed)
                for rec in sorted(out.records, key=lambda rec: rec.eval_index)]
    for row in io_lib.read_jsonl(workdir / f"seed_{s.seed}" / "transcript.jsonl"):
      transcript.append(dict(row, seed=s.seed))
  with io_lib.atomic_writer(workdir / "prompts.jsonl", "wb") as f:
    for row in records:
      f.write(orjson.dumps(row) + b"\n")
  with io_lib.atomic_writer(workdir / "transcript.jsonl", "wb") as f:
    for row in transcript:
      f.write(orjson.dumps(row) + b"\n")
  report.write_prompts_csv(records, workdir / "prompts.csv")
  ok = [r for r in records if not r.get("rejected")]
  # The scored templates and class names, one per line: the input of a side-by-side
  # run of another scorer on the same work (README, "Profiling prompt throughput").
  (workdir / "templates_scored.txt").write_text(
      "".join(r["template"].replace("\n", " ") + "\n" for r in ok), encoding="utf-8")
  (workdir / "class_names.txt").write_text(
      "".join(c + "\n" for c in seeds[0].task.class_names) if seeds else "", encoding="utf-8")
  cfg_search = results["config"]["search"]
  title = f"{results['dataset']} ({results['model']['name']}, {results['shots']}-shot)"
  curves = {s.seed: outcomes[s.seed].counts["coop"]["loss_curve"] for s in seeds
            if "coop" in outcomes[s.seed].counts}
  if curves:
    report.plot_loss_curves(curves, workdir / "coop_loss.png", title=f"CoOp, {title}")
  report.plot_accuracy(ok, workdir / "accuracy.png", title=title,
                       select_by=cfg_search["select_by"], tie_break=cfg_search["tie_break"],
                       select_metric=cfg_search.get("select_metric", "accuracy"))
  (workdir / "summary.md").write_text(report.summary_markdown(results), encoding="utf-8")
  write_clip_benchmark(workdir / "clip_benchmark", results, seeds, outcomes)
  io_lib.write_json(workdir / "results.json", results)


def write_clip_benchmark(out_dir: pathlib.Path, results: dict, seeds, outcomes) -> None:
  """Each seed's rows (the chosen template, the initial pool's best, each baseline) on the
  test split in CLIP_benchmark's result layout: `<out_dir>/seed_<s>/<row>.json`, to set
  beside its published tables."""
  from lmbbo_jax.evaluator.metrics import clip_benchmark_result
  from lmbbo_jax.templates import invalid_reason
  for s in seeds:
    out = outcomes[s.seed]
    rows = {"best": out.best, "initial_best": out.initial_best,
            **{f"baseline_{k}": e.score for k, e in s.baselines.items()}}
    for name, score in rows.items():
      if score is None or not score.ok or "test" not in score.accuracy:
        continue
      single = invalid_reason(score.template) is None
      (out_dir / f"seed_{s.seed}").mkdir(parents=True, exist_ok=True)
      io_lib.write_json(out_dir / f"seed_{s.seed}" / f"{name}.json", clip_benchmark_result(
          score, dataset=results["dataset"], model=results["model"]["name"],
          pretrained=results["model"]["source"],
          templates=[score.template] if single else None,
          class_names=list(s.task.class_names)))
