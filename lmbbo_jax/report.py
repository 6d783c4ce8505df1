"""Run outputs a person reads: prompts.csv, accuracy.png and summary.md; and the
paper's comparison over several runs (`--table`: comparison.md/.csv, efficiency.png).

Everything here is computed from the machine-readable results (results.json and
the per-seed prompts.jsonl records), so a plot can be redrawn from a finished
or resumed workdir with `python -m lmbbo_jax.report WORKDIR`.
"""

from __future__ import annotations

import csv
import math
import pathlib
import statistics
from typing import Iterable, Sequence

import orjson

from lmbbo_jax import io as io_lib
from lmbbo_jax.config import DESCRIPTION_METHODS
from lmbbo_jax.search.state import EvalRecord, rank_key

SPLITS = ("train", "val", "test")
# How a baseline's row reads in summary.md.
METHOD_LABELS = {
    "empty": "{} (the class name alone)", "photo": "a photo of a {}.",
    "hand_best": "hand-engineered, picked by the selection split",
    "hand_oracle": "hand-engineered, picked by test accuracy (oracle, as the paper's row)",
    "hand_ensemble": "hand-engineered ensemble", "pool_best": "initial pool's best",
    "initial_best": "initial pool's best",
    "dataset_best": "the dataset's templates, picked by the selection split",
    "dataset_ensemble": "the dataset's templates, ensembled (CLIP_benchmark's protocol)",
}


def write_prompts_csv(records: Iterable[dict], path: str | pathlib.Path) -> None:
  """One row per evaluated template; text is quoted by the csv module, never formatted."""
  fields = ["seed", "eval_index", "chain", "reset", "iteration", "proposer",
            "call_id", "template", "train_acc", "val_acc", "test_acc", "train_logprob"]
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for r in records:
      acc = r.get("accuracy") or {}
      row = {k: r.get(k) for k in fields}
      row.update(train_acc=acc.get("train"), val_acc=acc.get("val"),
                 test_acc=acc.get("test"),
                 train_logprob=(r.get("logprob") or {}).get("train"))
      writer.writerow(row)


def _best_so_far(records: Sequence[dict], select_by: str, tie_break: str = "logprob",
                 select_metric: str = "accuracy"):
  """Per record (in order), the template chosen so far by the search's selection rule
  (a candidate successive halving kept out of the pool, `pooled: false`, is never it)."""
  best, best_key, out = None, None, []
  for r in records:
    key = rank_key(EvalRecord.from_row(r), select_by, tie_break, select_metric)
    if r.get("pooled", True) and (best is None or key < best_key):
      best, best_key = r, key
    out.append(best)
  return out


def plot_accuracy(records: Sequence[dict], path: str | pathlib.Path, *,
                  title: str = "", select_by: str = "train",
                  tie_break: str = "logprob", select_metric: str = "accuracy") -> None:
  """accuracy.png: train and test accuracy of each new template and the best-so-far.

  x = proposer (LLM) calls made by that chain so far (its `step`: 0 is the
  initial pool, then one step per call); one colour per chain, one line style
  per seed. Points: every template the proposer returned; line: the chain's
  best-so-far template (picked by the selection split, never test), starting
  from the initial pool's best at x = 0.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
  chains = sorted({(r.get("seed", 0), r.get("chain", 0)) for r in records})
  seeds = sorted({s for s, _ in chains})
  styles = ["-", "--", ":", "-."]
  cmap = plt.get_cmap("tab10")
  for seed, chain in chains:
    rs = sorted((r for r in records if (r.get("seed", 0), r.get("chain", 0)) == (seed, chain)),
                key=lambda r: (r.get("step", 0), r.get("seq", 0)))
    if not rs:
      continue
    colour = cmap(chain % 10)
    style = styles[seeds.index(seed) % len(styles)]
    best = _best_so_far(rs, select_by, tie_break, select_metric)
    # Best-so-far after each step (the last record of each step).
    steps, best_at = [], []
    for r, b in zip(rs, best):
      if steps and steps[-1] == r.get("step", 0):
        best_at[-1] = b
      else:
        steps.append(r.get("step", 0))
        best_at.append(b)
    new = [r for r in rs if r.get("step", 0) > 0]
    for ax, split in zip(axes, ("train", "test")):
      if new:
        ax.scatter([r.get("step", 0) for r in new],
                   [100 * (r.get("accuracy") or {}).get(split, float("nan")) for r in new],
                   s=9, color=colour, alpha=0.3)
      ax.step(steps, [100 * (b.get("accuracy") or {}).get(split, float("nan")) for b in best_at],
              where="post", color=colour, ls=style, lw=1.6,
              label=f"seed {seed} chain {chain}")
  for ax, split in zip(axes, ("train", "test")):
    ax.set_title(f"{split} accuracy: points = new templates, line = best so far "
                 f"(chosen by {select_by})", fontsize=9)
    ax.set_xlabel("proposer (LLM) calls in the chain (0 = initial pool)")
    ax.set_ylabel(f"{split} accuracy (%)")
    ax.grid(alpha=0.3)
  from matplotlib.ticker import MaxNLocator
  for ax in axes:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  if chains:
    axes[0].legend(fontsize=7, loc="lower right", ncol=max(1, len(chains) // 8))
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_loss_curves(curves: dict, path: str | pathlib.Path, *, title: str = "") -> None:
  """A training loss curve per seed (CoOp's mean loss per epoch)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for seed, curve in sorted(curves.items()):
    ax.plot(range(1, len(curve) + 1), curve, label=f"seed {seed}")
  ax.set_xlabel("epoch")
  ax.set_ylabel("mean training loss")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  if title:
    ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _fmt(x) -> str:
  return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  vals = [v for v in values if v is not None]
  if not vals:
    return float("nan"), float("nan")
  return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summary_markdown(results: dict) -> str:
  """A paper-style table: method x seed (test accuracy %), mean and std; pasteable."""
  seeds = results.get("seeds", [])
  per_seed = results.get("per_seed", {})
  methods: dict[str, dict] = {}
  for seed in seeds:
    ps = per_seed.get(str(seed), {})
    for name, entry in (ps.get("baselines") or {}).items():
      methods.setdefault(METHOD_LABELS.get(name, name), {})[seed] = entry
    if ps.get("initial_best") and "pool_best" not in (ps.get("baselines") or {}):
      methods.setdefault(METHOD_LABELS["pool_best"], {})[seed] = ps["initial_best"]
    if ps.get("best"):
      config = results.get("config", {})
      kind = config.get("proposer_kind", "ours")
      label = ("CoOp (white box, learned context)" if kind == "coop" else
               next(r[0] for r in TABLE_ROWS if r[2] == kind) if kind in DESCRIPTION_METHODS
               else f"optimized ({kind}, by {config.get('select_by', 'train')})")
      methods.setdefault(label, {})[seed] = ps["best"]
  head = "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | std |"
  title = (f"{results.get('dataset', '')}, {results.get('shots', '?')}-shot, model "
           f"{results.get('model', {}).get('name', '')}")
  lines = []
  for split, key, what in _tables(results, methods):
    lines += [f"## {title}: {what}", "", head, "|" + "---|" * (len(seeds) + 3)]
    for name, by_seed in methods.items():
      vals = [(by_seed.get(s) or {}).get(key) for s in seeds]
      m, sd = mean_std(vals)
      lines.append(f"| {name} | " + " | ".join(_fmt(v) for v in vals)
                   + f" | {_fmt(m)} | {_fmt(sd)} |")
    lines.append("")
  best = results.get("best") or {}
  if best:
    select_by = (results.get("config") or {}).get("select_by", "train")
    split = "train+val" if select_by == "train_val" else "train"
    lines.append(f"Best template (seed {best.get('seed')}, chosen by {split} accuracy): "
                 f"`{best.get('template', '')}` — train {_fmt(best.get('train_acc'))}, "
                 f"val {_fmt(best.get('val_acc'))}, test {_fmt(best.get('test_acc'))}.")
  llm = results.get("llm") or {}
  tp = results.get("throughput") or {}
  lines.append("")
  lines.append(f"{results.get('n_templates_evaluated', 0)} templates evaluated; "
               f"{llm.get('calls', 0)} proposer calls ({llm.get('failed_calls', 0)} failed), "
               f"cost ${llm.get('cost_usd', 0.0):.4f}; "
               f"{tp.get('templates_per_s', 0.0):.2f} templates/s scored.")
  lines += _proposer_section(results)
  lines += _transfer_section(results)
  return "\n".join(lines) + "\n"


METRIC_NAMES = {"accuracy": "accuracy", "acc5": "top-5 accuracy",
                "mean_per_class_recall": "mean per-class recall"}


def _tables(results: dict, methods: dict) -> list[tuple[str, str, str]]:
  """(split, row key, title) of summary.md's tables: the test split in the dataset's lead
  metric first (the CLIP paper's convention: mean per-class recall for Aircraft, Pets,
  Caltech101 and Flowers), the test split's other metrics the rows have, then the
  selection split's accuracy."""
  lead = results.get("lead_metric") or "accuracy"
  order = [lead] + [m for m in METRIC_NAMES if m != lead]
  out = []
  for metric in order:
    key = "test_acc" if metric == "accuracy" else f"test_{metric}"
    if metric != "accuracy" and not any(key in (e or {}) for by in methods.values()
                                         for e in by.values()):
      continue
    what = f"test {METRIC_NAMES[metric]} (%)"
    if metric == "accuracy":
      what += ", the paper's metric"
    if metric == lead and lead != "accuracy":
      what += ", the CLIP paper's metric for this dataset"
    out.append(("test", key, what))
  out.append(("train", "train_acc", "train accuracy (%), the selection split"))
  return out


def _transfer_section(results: dict) -> list[str]:
  """Test accuracy of the chosen templates on other backbones (not re-selected)."""
  transfer = results.get("transfer") or {}
  if not transfer:
    return []
  names = list(dict.fromkeys(k for t in transfer.values() for k in t.get("aggregate", {})))
  out = ["", "## Transfer: the chosen templates on other backbones, as chosen (test accuracy "
             "%, mean ± std over seeds)", "",
         "| template | " + " | ".join(transfer) + " |", "|---|" + "---|" * len(transfer)]
  for name in names:
    label = METHOD_LABELS.get(name.removeprefix("baseline:"), name)
    if name == "best":
      label = "optimized (this run's pick)"
    cells = []
    for t in transfer.values():
      test = (t.get("aggregate", {}).get(name) or {}).get("test_acc") or {}
      cells.append(f"{_fmt(test.get('mean'))} ± {_fmt(test.get('std'))}" if test else "-")
    out.append(f"| {label} | " + " | ".join(cells) + " |")
  return out


def _proposer_section(results: dict) -> list[str]:
  """What the LLM calls gave: valid new templates, rejections, cut replies, latency."""
  llm = results.get("llm") or {}
  total = llm.get("proposals") or {}
  if not total.get("llm_calls"):
    return []
  local = llm.get("local") or {}
  model = llm.get("model") or ""
  if local:
    model = f"{local.get('gguf')} (local {local.get('backend')}, sha256 " \
            f"{str(local.get('gguf_sha256', ''))[:12]})"
  out = ["", f"## LLM proposer: {model}", "",
         "| seed | chain | stop reason | calls | valid new / requested | valid per call "
         "| rejections | cut at max_tokens | queue s | server s (retry waits incl.) |",
         "|---|---|---|---|---|---|---|---|---|---|"]

  def row(seed, chain, stop, c):
    frac = c.get("valid_new_fraction")
    rej = ", ".join(f"{k} {v}" for k, v in sorted((c.get("rejections") or {}).items()))
    queue = c.get("queue_s") or 0.0
    latency = c.get("latency_s") or 0.0
    per_call = c.get("valid_new_per_call")
    return (f"| {seed} | {chain} | {stop} | {c.get('llm_calls', 0)} | "
            f"{c.get('valid_new', 0)} / {c.get('templates_requested', 0)}"
            f"{f' ({100 * frac:.0f}%)' if frac is not None else ''} | "
            f"{'-' if per_call is None else f'{per_call:.2f}'} | {rej or '-'} | "
            f"{c.get('truncated', 0)} | {queue:.1f} | {latency - queue:.1f} |")

  for seed in results.get("seeds", []):
    ps = (results.get("per_seed") or {}).get(str(seed)) or {}
    stops = ps.get("chain_stop_reasons") or {}
    for chain, c in sorted(((ps.get("counts") or {}).get("per_chain") or {}).items(),
                           key=lambda kv: int(kv[0])):
      out.append(row(seed, chain, stops.get(chain, "?"), c))
  out.append(row("all", "all", "", total))
  notes = []
  if llm.get("structured"):
    notes.append(f"replies requested as JSON ({llm['structured']}"
                 + (f"; {llm['structured_refused']}" if llm.get("structured_refused") else "")
                 + ")")
  if llm.get("server_p50_s") is not None:
    notes.append(f"latency per call p50 {llm.get('latency_p50_s') or 0:.2f} s: queueing "
                 f"{llm.get('queue_p50_s') or 0:.2f} s, server {llm['server_p50_s']:.2f} s")
  if notes:
    out += ["", "; ".join(notes) + "."]
  return out


# --------------------------------------------------------------------------------------
# The paper's comparison over several runs: Table 1's layout and an efficiency plot.

# Rows in the paper's order: (label, where the per-seed entries come from): a
# baseline every run scores, or the best of the run of a named method.
TABLE_ROWS = (
    *((METHOD_LABELS[name], "baseline", name)
      for name in ("empty", "photo", "hand_best", "hand_oracle", "pool_best")),
    ("LLM-written, no feedback", "method", "llm_no_feedback"),
    ("APE", "method", "ape"),
    ("iterative APE", "method", "iterative_ape"),
    ("ours, positive feedback (P)", "method", "ours_p"),
    ("ours, negative feedback (N)", "method", "ours_n"),
    ("ours, P+N (the paper's method)", "method", "ours_pn"),
    ("CuPL (LLM-written class descriptions, mean embedding)", "method", "cupl"),
    ("DCLIP (LLM-listed descriptors, mean logit)", "method", "dclip"),
    ("WaffleCLIP (random word and character descriptors, no LLM)", "method", "waffle"),
    ("ours P+N template + DCLIP descriptors", "method", "ours_pn+descriptions"),
    ("ours, P+N + confusion feedback", "method", "ours_confusion"),
    ("ours, P+N + merge of per-class Pareto front", "method", "ours_pareto"),
    ("ours, P+N, 12 per call, successive halving", "method", "ours_many"),
    ("CoOp (white box, learned context)", "method", "coop"),
)
_FEEDBACK_METHODS = {"none": "llm_no_feedback", "pos": "ours_p", "neg": "ours_n",
                     "pos_neg": "ours_pn", "confusion": "ours_confusion"}


def method_name(results: dict) -> str:
  """The comparison's name of a run (`experiment.COMPARISON`), read from its config."""
  config = results.get("config") or {}
  kind = config.get("proposer_kind", "")
  if kind == "llm":
    search = config.get("search") or {}
    if search.get("selection") == "halving":
      return "ours_many"
    if search.get("merge_every"):
      return "ours_pareto"
    return _FEEDBACK_METHODS.get(search.get("feedback"), "llm")
  return kind


def _run_dirs(paths: Sequence[str | pathlib.Path]) -> list[pathlib.Path]:
  """Run folders: each path that holds results.json, or its subfolders that do."""
  out = []
  for p in map(pathlib.Path, paths):
    if (p / "results.json").exists():
      out.append(p)
    else:
      out += sorted(d for d in p.iterdir() if (d / "results.json").exists()) if p.is_dir() else []
  return out


def _per_seed_test(results: dict, kind: str, name: str) -> dict[int, float]:
  out = {}
  for seed, ps in (results.get("per_seed") or {}).items():
    entry = (ps.get("baselines") or {}).get(name) if kind == "baseline" else ps.get("best")
    if entry and entry.get("test_acc") is not None:
      out[int(seed)] = entry["test_acc"]
  return out


def _load_runs(paths: Sequence[str | pathlib.Path]) -> dict[str, list]:
  """dataset -> [(run folder, its results.json)] of the runs in `paths` (`_run_dirs`)."""
  by_dataset: dict[str, list] = {}
  for d in _run_dirs(paths):
    results = orjson.loads((d / "results.json").read_bytes())
    by_dataset.setdefault(results.get("dataset", "?"), []).append((d, results))
  return by_dataset


def comparison_rows(loaded: dict[str, list]) -> tuple[list[str], list[dict]]:
  """(datasets, one row per (dataset, table row) with per-seed test accuracies)."""
  runs = {dataset: {method_name(r): r for _, r in found} for dataset, found in loaded.items()}
  rows = []
  for dataset, by_method in runs.items():
    for label, kind, name in TABLE_ROWS:
      sources = list(by_method.values()) if kind == "baseline" else [by_method.get(name)]
      per_seed = next((v for v in (_per_seed_test(r, kind, name) for r in sources if r) if v),
                      {})
      if not per_seed:
        continue
      vals = [per_seed[s] for s in sorted(per_seed)]
      mean, std = mean_std(vals)
      rows.append({"dataset": dataset, "method": name, "label": label,
                   "seeds": sorted(per_seed), "test_acc": vals, "mean": mean, "std": std,
                   "se": std / math.sqrt(len(vals)) if len(vals) > 1 else float("nan")})
  return list(runs), rows


def comparison_markdown(datasets: Sequence[str], rows: Sequence[dict]) -> str:
  """Table 1's layout: method x dataset, test accuracy mean ± std over seeds (%)."""
  labels = list(dict.fromkeys(r["label"] for r in rows))
  cell = {(r["label"], r["dataset"]): r for r in rows}
  lines = ["| method | " + " | ".join(datasets) + (" | average |" if len(datasets) > 1 else " |"),
           "|---|" + "---|" * (len(datasets) + (len(datasets) > 1))]
  for label in labels:
    cells, means = [], []
    for d in datasets:
      r = cell.get((label, d))
      cells.append("-" if r is None else f"{_fmt(r['mean'])} ± {_fmt(r['std'])}")
      if r is not None:
        means.append(r["mean"])
    avg = ([_fmt(statistics.fmean(means)) if len(means) == len(datasets) else "-"]
           if len(datasets) > 1 else [])
    lines.append(f"| {label} | " + " | ".join(cells + avg) + " |")
  seeds = sorted({s for r in rows for s in r["seeds"]})
  lines += ["", f"Test accuracy (%), mean ± std over few-shot seeds {seeds}; every method "
                "on the same tasks, model and cached image features; the LLM methods with "
                "the same call budget."]
  return "\n".join(lines) + "\n"


def plot_efficiency(loaded: dict[str, list], path: str | pathlib.Path) -> None:
  """Test accuracy of the best-so-far template (chosen by the selection rule), mean over
  seeds, one line per method and one row of panels per dataset: against the LLM calls
  that gave a scored template (left) and against the templates the search scored (right;
  the initial pool and candidates successive halving kept out of the pool included). CoOp (no LLM) is a horizontal line at its mean test accuracy."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = max(1, len(loaded))
  fig, axes = plt.subplots(rows, 2, figsize=(12, 4.5 * rows), squeeze=False)
  labels = {name: label for label, _, name in TABLE_ROWS}
  cmap = plt.get_cmap("tab10")
  for (by_calls, by_scored), (dataset, runs) in zip(axes, loaded.items()):
    for i, (d, results) in enumerate(runs):
      name = method_name(results)
      label = labels.get(name, name)
      if name == "coop":
        vals = list(_per_seed_test(results, "method", "coop").values())
        if vals:
          for ax in (by_calls, by_scored):
            ax.axhline(100 * statistics.fmean(vals), ls="--", color="k", lw=1, label=label)
        continue
      if name in DESCRIPTION_METHODS:  # one classifier per seed: a point per panel
        vals = list(_per_seed_test(results, "method", name).values())
        seeds = max(1, len(vals))
        calls = (results.get("llm") or {}).get("calls") or 0
        scored = (results.get("throughput") or {}).get("templates_scored") or 0
        for ax, x in ((by_calls, calls / seeds), (by_scored, scored / seeds)):
          if vals:
            ax.plot([x], [100 * statistics.fmean(vals)], "o", color=cmap(i % 10), label=label)
        continue
      curves = _efficiency_curves(d, results)
      if not curves:
        continue
      # Colour and dash per method: equal curves (same initial pool) stay visible.
      style = {"color": cmap(i % 10), "ls": ("-", "--", ":", "-.")[i % 4]}
      n = max(len(c) for c, _ in curves)
      mean = [100 * statistics.fmean(c[min(i, len(c) - 1)] for c, _ in curves)
              for i in range(n)]
      by_calls.step(range(n), mean, where="post", lw=1.6, label=label, **style)
      xs, ys = _mean_step([points for _, points in curves])
      by_scored.step(xs, [100 * y for y in ys], where="post", lw=1.6, label=label, **style)
    for ax, what in ((by_calls, "LLM calls that gave a scored template (0 = initial pool)"),
                     (by_scored, "templates the search scored (initial pool included)")):
      ax.set_title(f"{dataset}: test accuracy of the best so far", fontsize=9)
      ax.set_xlabel(what)
      ax.set_ylabel("test accuracy (%)")
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _mean_step(series: Sequence[Sequence[tuple[int, float]]]) -> tuple[list[int], list[float]]:
  """The mean of step functions given as (x, y) points (y holds until the next x), at
  every x from the last series' start on."""
  series = [s for s in series if s]
  if not series:
    return [], []
  start = max(s[0][0] for s in series)
  xs = sorted({x for s in series for x, _ in s if x >= start})
  at = [0] * len(series)
  ys = []
  for x in xs:
    vals = []
    for k, s in enumerate(series):
      while at[k] + 1 < len(s) and s[at[k] + 1][0] <= x:
        at[k] += 1
      vals.append(s[at[k]][1])
    ys.append(statistics.fmean(vals))
  return xs, ys


def _efficiency_curves(workdir: pathlib.Path, results: dict
                       ) -> list[tuple[list[float], list[tuple[int, float]]]]:
  """Per seed: (test accuracy of the best so far after 0, 1, 2, ... calls; (templates
  scored, test accuracy of the best so far) after each scored template)."""
  config = results.get("config") or {}
  select_by = config.get("select_by", "train")
  tie_break = (config.get("search") or {}).get("tie_break", "logprob")
  select_metric = (config.get("search") or {}).get("select_metric", "accuracy")
  records = [r for r in io_lib.read_jsonl(workdir / "prompts.jsonl") if not r.get("rejected")]
  curves = []
  for seed in sorted({r.get("seed") for r in records}, key=str):
    # The initial pool first, then the proposals in the order they were scored.
    rs = sorted((r for r in records if r.get("seed") == seed),
                key=lambda r: (r.get("step", 0) > 0, r.get("eval_index", 0)))
    best = _best_so_far(rs, select_by, tie_break, select_metric)
    calls, curve = set(), []
    for i, r in enumerate(rs):
      call = r.get("call_id") if r.get("step", 0) > 0 else None
      if call is not None and call not in calls:
        if i:  # The best after the calls before this one.
          curve.append(best[i - 1]["accuracy"].get("test", math.nan))
        calls.add(call)
    if rs:
      scored = [(i + 1, b["accuracy"].get("test", math.nan)) for i, b in enumerate(best)]
      curves.append((curve + [best[-1]["accuracy"].get("test", math.nan)], scored))
  return curves


def efficiency_rows(loaded: dict[str, list]) -> list[dict]:
  """Per (dataset, method): LLM calls, templates scored, templates scored per call, per
  second of scoring and per second of the search's wall time, from results.json alone
  (llm.calls, throughput.templates_scored, .scoring_busy_s, .search_wall_s)."""
  labels = {name: label for label, _, name in TABLE_ROWS}
  out = []
  for dataset, runs in loaded.items():
    for _, results in runs:
      name = method_name(results)
      tp = results.get("throughput") or {}
      calls = (results.get("llm") or {}).get("calls") or 0
      scored = tp.get("templates_scored") or 0
      busy, wall = tp.get("scoring_busy_s") or 0.0, tp.get("search_wall_s") or 0.0
      out.append({"dataset": dataset, "method": name, "label": labels.get(name, name),
                  "llm_calls": calls, "templates_scored": scored,
                  "per_call": scored / calls if calls else math.nan,
                  "per_scoring_s": scored / busy if busy else math.nan,
                  "per_wall_s": scored / wall if wall else math.nan})
  order = {name: i for i, (_, _, name) in enumerate(TABLE_ROWS)}
  return sorted(out, key=lambda r: (r["dataset"], order.get(r["method"], len(order))))


def efficiency_markdown(rows: Sequence[dict]) -> str:
  """comparison.md's efficiency table (`efficiency_rows`)."""
  def num(x, digits):
    return "-" if isinstance(x, float) and math.isnan(x) else f"{x:.{digits}f}"
  lines = ["## Efficiency: templates scored per LLM call and per second", "",
           "| dataset | method | LLM calls | templates scored | templates / call "
           "| templates / s of scoring | templates / s of search wall time |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['dataset']} | {r['label']} | {r['llm_calls']} | "
                 f"{r['templates_scored']} | {num(r['per_call'], 2)} | "
                 f"{num(r['per_scoring_s'], 1)} | {num(r['per_wall_s'], 2)} |")
  lines += ["", "Templates scored: every template a method's scorer scored (initial pools, "
                "baselines and every candidate, also those successive halving kept out of "
                "the pool); seconds of scoring: the scorer's busy time; wall time: the "
                "search's, LLM waits included. efficiency.png plots test accuracy against "
                "both LLM calls and templates scored."]
  return "\n".join(lines) + "\n"


def write_comparison(paths: Sequence[str | pathlib.Path], out: str | pathlib.Path) -> None:
  """comparison.md, comparison.csv and efficiency.png in `out`."""
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  loaded = _load_runs(paths)
  datasets, rows = comparison_rows(loaded)
  io_lib.atomic_write(out / "comparison.md", comparison_markdown(datasets, rows) + "\n"
                      + efficiency_markdown(efficiency_rows(loaded)))
  with io_lib.atomic_writer(out / "comparison.csv", "w") as f:
    writer = csv.writer(f)
    writer.writerow(["dataset", "method", "label", "seeds", "test_acc", "mean", "std", "se"])
    for r in rows:
      writer.writerow([r["dataset"], r["method"], r["label"],
                       " ".join(map(str, r["seeds"])), " ".join(f"{v:.4f}" for v in r["test_acc"]),
                       f"{r['mean']:.4f}", f"{r['std']:.4f}", f"{r['se']:.4f}"])
  plot_efficiency(loaded, out / "efficiency.png")


def main(argv=None):
  import sys
  args = sys.argv[1:] if argv is None else argv
  if args[:1] == ["--table"]:
    dirs, out = args[1:], None
    if "--out" in dirs:
      i = dirs.index("--out")
      dirs, out = dirs[:i], (dirs[i + 1:] or [None])[0]
    if not dirs or not out:
      print("usage: python -m lmbbo_jax.report --table RUN_OR_COMPARISON_DIR... --out DIR",
            file=sys.stderr)
      return 2
    if not _run_dirs(dirs):
      print(f"no results.json in {' '.join(dirs)} or their subfolders; run the main job first",
            file=sys.stderr)
      return 1
    write_comparison(dirs, out)
    print((pathlib.Path(out) / "comparison.md").read_text(encoding="utf-8"))
    print(f"wrote comparison.md, comparison.csv, efficiency.png in {out}")
    return 0
  if len(args) != 1:
    print("usage: python -m lmbbo_jax.report WORKDIR  |  python -m lmbbo_jax.report "
          "--table DIR... --out DIR", file=sys.stderr)
    return 2
  workdir = pathlib.Path(args[0])
  results_path = workdir / "results.json"
  if not results_path.exists():
    print(f"no results.json in {workdir}; run the main job first", file=sys.stderr)
    return 1
  results = orjson.loads(results_path.read_bytes())
  records = io_lib.read_jsonl(workdir / "prompts.jsonl")
  write_prompts_csv(records, workdir / "prompts.csv")
  config = results.get("config") or {}
  plot_accuracy([r for r in records if not r.get("rejected")], workdir / "accuracy.png",
                title=results.get("dataset", ""), select_by=config.get("select_by", "train"),
                tie_break=(config.get("search") or {}).get("tie_break", "logprob"),
                select_metric=(config.get("search") or {}).get("select_metric", "accuracy"))
  (workdir / "summary.md").write_text(summary_markdown(results), encoding="utf-8")
  print(f"wrote prompts.csv, accuracy.png, summary.md in {workdir}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
