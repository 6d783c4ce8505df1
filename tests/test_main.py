"""The main job end to end: every flagfile, the offline smoke run, resume after kill -9, errors."""

import glob
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
from absl import flags

REPO = pathlib.Path(__file__).resolve().parent.parent
FLAGFILES = sorted(glob.glob(str(REPO / "experiments" / "*.flags")))


def _env(**extra):
  env = dict(os.environ)
  env.update({
      "HF_HUB_OFFLINE": "1",
      "PYTHONUNBUFFERED": "1",
  })
  env.update(extra)
  return env


def _main(args, tmp_path, timeout=600, **env):
  return subprocess.run([sys.executable, "-m", "lmbbo_jax.main", *args], cwd=REPO,
                        env=_env(**env), capture_output=True, text=True,
                        timeout=timeout)


def _error_lines(stderr: str) -> list[str]:
  return [l for l in stderr.splitlines() if l.startswith("error:")]


def test_there_is_a_flagfile_per_paper_dataset_plus_demo_and_smoke():
  names = {pathlib.Path(f).stem for f in FLAGFILES}
  assert {"caltech", "imagenet", "aircraft", "food", "pets", "cars", "sun", "ucf", "dtd",
          "eurosat", "flowers", "demo", "demo_edit", "smoke"} <= names


def _parse(argv):
  from lmbbo_jax import flags as lmbbo_flags
  return lmbbo_flags.parse(["prog", "--dataset=toy:mix", "--workdir=w", *argv])[0]


@pytest.mark.parametrize("flagfile", FLAGFILES, ids=lambda f: pathlib.Path(f).stem)
def test_every_flagfile_parses_into_a_valid_config(flagfile):
  from lmbbo_jax import flags as lmbbo_flags
  from lmbbo_jax.data import registry
  text = pathlib.Path(flagfile).read_text()
  assert text.startswith("#"), "each flagfile starts with a header comment"
  assert "Command" in text and "runtime" in text
  fv = flags.FlagValues()
  lmbbo_flags.define_flags(fv)
  for line in text.splitlines():
    if line.startswith("--"):
      name = line[2:].split("=", 1)[0]
      known = name in fv or (name.startswith("no") and name[2:] in fv)
      assert known, f"{flagfile}: unknown flag --{name}"
  cfg, _ = lmbbo_flags.parse(["prog", f"--flagfile={flagfile}"])
  assert cfg.workdir and cfg.dataset
  if not pathlib.Path(flagfile).stem.startswith(("demo", "smoke")):
    assert cfg.shots == 1 and cfg.seeds == (1, 2, 3) and cfg.model == "RN50"
    assert cfg.search.select_by == "train" and cfg.search.feedback == "pos_neg"
    # The strict black-box protocol: accuracy only, no scores in Fig. 1's first turn.
    assert cfg.search.tie_break == "none" and not cfg.search.show_scores
    assert cfg.search.conversation == "multi_turn"
    # A benchmark name or a source that reads one (coop:NAME, wds:hf:clip-benchmark/wds_cars).
    assert registry.for_dataset(cfg.dataset), f"{flagfile}: {cfg.dataset} is not a paper dataset"
    assert "Paper" in text


def test_flag_defaults_are_the_config_defaults_and_presets_yield_to_explicit_flags():
  import dataclasses
  from lmbbo_jax.config import ExperimentConfig
  from lmbbo_jax.llm import LLMConfig
  from lmbbo_jax.search import PRESETS, SearchConfig
  cfg = _parse([])
  assert cfg.search == SearchConfig()  # One source: the dataclass defaults.
  assert cfg.llm == LLMConfig()
  assert cfg == ExperimentConfig(dataset="toy:mix", workdir="w")
  fig1 = _parse(["--preset=paper_fig1"]).search
  assert fig1 == SearchConfig(**PRESETS["paper_fig1"])
  mixed = _parse(["--preset=paper_fig1", "--n_iter=3", "--tie_break=logprob"]).search
  assert mixed == dataclasses.replace(fig1, n_iter=3, tie_break="logprob")
  # A flag given at its default value still wins over the preset.
  assert _parse(["--preset=paper_fig1", "--conversation=single_turn"]).search.conversation == (
      "single_turn")
  assert _parse(["--preset=iclr"]).search.k_pos == 15


def test_every_config_field_is_one_flag_with_its_docstring_help():
  """One definition per option: the field, its default and its help line."""
  import dataclasses
  from lmbbo_jax import flags as lmbbo_flags
  from lmbbo_jax.config import CoOpConfig, DescriptionsConfig, ExperimentConfig, RuntimeConfig
  from lmbbo_jax.llm import LLMConfig
  from lmbbo_jax.search import SearchConfig
  fv = flags.FlagValues()
  lmbbo_flags.define_flags(fv)
  for cls, prefix, skip in ((ExperimentConfig, "", {"search", "llm", "coop", "descriptions"}),
                            (SearchConfig, "", {"seed"}), (LLMConfig, "llm_", {"local"}),
                            (CoOpConfig, "coop_", set()),
                            (DescriptionsConfig, "descriptions_", set()),
                            (RuntimeConfig, "", set())):
    helps = lmbbo_flags.field_help(cls)
    for field in dataclasses.fields(cls):
      if field.name in skip:
        continue
      assert prefix + field.name in fv, f"{cls.__name__}.{field.name} has no flag"
      assert helps.get(field.name), f"{cls.__name__}.{field.name} has no help line"
      assert fv[prefix + field.name].help.startswith(helps[field.name][:20])
  # The old names keep working.
  cfg = _parse(["--methods=ape,coop", "--llm=local", "--llm_prices=m=1:2",
                "--llm_extra_params={\"min_p\": 0.1}"])
  assert cfg.compare == ("ape", "coop") and cfg.llm.local
  assert cfg.llm.prices == {"m": (1.0, 2.0)} and cfg.llm.extra_params == {"min_p": 0.1}


def test_help_and_flag_errors_import_no_jax():
  code = ("import sys\n"
          "from lmbbo_jax import main\n"
          "sys.argv = ['m', '--helpfull']\n"
          "try:\n"
          "  main.run()\n"
          "except SystemExit as e:\n"
          "  print('help exit', e.code)\n"
          "print('error exit', main.run_command(['m', '--dataset=toy:mix', '--workdir=w', "
          "'--shots=0']))\n"
          "print('jax loaded:', 'jax' in sys.modules, 'flax' in sys.modules)\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                        timeout=60)
  assert "--n_restart" in proc.stdout and "help exit" in proc.stdout, proc.stdout[-2000:]
  assert "error exit 1" in proc.stdout and "error: --shots:" in proc.stderr
  assert "jax loaded: False False" in proc.stdout, proc.stdout[-2000:]


def test_hand_engineered_rows_are_picked_by_train_and_by_test_apart(monkeypatch):
  from lmbbo_jax.baselines import score_baselines
  from lmbbo_jax.config import ExperimentConfig
  from lmbbo_jax.evaluator.types import Score
  import lmbbo_jax.data as data_lib

  accs = {"a {}": (0.9, 0.2), "b {}": (0.5, 0.8), "c {}": (0.7, 0.5)}  # train, test

  class Scorer:
    def score(self, templates):
      return [Score(template=t, accuracy={"train": accs[t][0], "test": accs[t][1]},
                    logprob={"train": -1.0}) for t in templates]

    def score_ensemble(self, groups):
      return [Score(template="ens", accuracy={"train": 0.6, "test": 0.6})]

  monkeypatch.setattr(data_lib, "hand_templates", lambda dataset: list(accs))
  cfg = ExperimentConfig(dataset="x", workdir="w",
                         baselines=("hand_best", "hand_oracle", "hand_ensemble"))
  out = {k: v.to_json() for k, v in score_baselines(cfg, Scorer()).items()}
  assert out["hand_best"]["template"] == "a {}" and "oracle" not in out["hand_best"]
  assert out["hand_oracle"]["template"] == "b {}" and out["hand_oracle"]["oracle"] == "test"
  assert out["hand_ensemble"]["template"] == "ensemble of 3 templates"
  assert out["hand_ensemble"]["test_acc"] == 0.6
  from lmbbo_jax import report
  md = report.summary_markdown({"seeds": [1], "per_seed": {"1": {"baselines": out}}})
  assert "picked by test accuracy (oracle" in md and "picked by the selection split" in md


@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory):
  return tmp_path_factory.mktemp("jax_cache")


def _command(args, jax_cache, capsys=None):
  """The main job in this process: (exit code, stdout, stderr)."""
  from lmbbo_jax.main import run_command
  if capsys is not None:
    capsys.readouterr()
  quiet = [] if any(a.startswith("--tracking") for a in args) else ["--tracking=none"]
  code = run_command(["prog", *args, "--noprogress", f"--jax_cache_dir={jax_cache}", *quiet])
  out, err = capsys.readouterr() if capsys is not None else ("", "")
  return code, out, err


def _compare(methods, workdir, server, jax_cache, capsys, *flags):
  """`--methods` on the smoke task against the fake LLM `server` (key LMBBO_TEST_KEY)."""
  return _command(["--flagfile=experiments/smoke.flags", f"--workdir={workdir}", *flags,
                   f"--llm_base_url={server.base_url}", "--llm_model=gpt-4o-mini",
                   "--llm_api_key_env=LMBBO_TEST_KEY", f"--methods={','.join(methods)}"],
                  jax_cache, capsys)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, jax_cache):
  tmp = tmp_path_factory.mktemp("smoke")
  workdir = tmp / "run"
  code, _, _ = _command(["--flagfile=experiments/smoke.flags", f"--workdir={workdir}"],
                        jax_cache)
  assert code == 0
  return tmp, workdir


def test_smoke_run_writes_every_output_with_the_schema(smoke_run):
  from lmbbo_jax import ExperimentResult
  _, workdir = smoke_run
  results = json.loads((workdir / "results.json").read_text())
  for key in ("config", "versions", "model", "dataset", "seeds", "best", "initial_best",
              "baselines", "n_templates_evaluated", "llm", "throughput"):
    assert key in results, key
  for entry in [results["best"], results["initial_best"], *results["baselines"].values()]:
    for field in ("template", "train_acc", "val_acc", "test_acc"):
      assert field in entry
  assert set(results["baselines"]) == {"empty", "photo", "pool_best"}
  assert results["baselines"]["photo"]["template"] == "a photo of a {}."
  for field in ("calls", "failed_calls", "prompt_tokens", "completion_tokens", "cost_usd"):
    assert field in results["llm"]
  for field in ("templates_per_s", "images_per_s", "llm_latency_p50_s", "llm_latency_p95_s",
                "mean_concurrency", "device_busy_fraction", "compiles", "call_shapes"):
    assert field in results["throughput"]
  assert results["throughput"]["templates_per_s"] > 0
  assert 1 <= results["throughput"]["compiles"] <= 8
  assert results["model"]["weights_hash"] and results["versions"]["jax"]
  # The best is chosen by train accuracy: nothing evaluated beats it there.
  rows = [json.loads(l) for l in (workdir / "prompts.jsonl").read_text().splitlines()]
  ok = [r for r in rows if not r.get("rejected")]
  assert len(ok) == results["n_templates_evaluated"] > 0
  assert max(r["accuracy"]["train"] for r in ok) == results["best"]["train_acc"]
  assert all("chain" in r and "restart" not in r for r in rows)
  assert (workdir / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  summary = (workdir / "summary.md").read_text()
  assert "| method |" in summary and "a photo of a {}." not in summary.split("|")[0]
  csv_lines = (workdir / "prompts.csv").read_text().splitlines()
  assert len(csv_lines) == len(rows) + 1
  # The typed view reads the same file.
  typed = ExperimentResult.load(workdir)
  assert typed.best.template == results["best"]["template"]
  assert typed.per_seed[1].baselines["photo"].test_acc == results["baselines"]["photo"]["test_acc"]
  assert typed.templates_evaluated == results["n_templates_evaluated"]


def test_a_finished_run_is_not_overwritten_and_resume_replays_it(smoke_run, jax_cache, capsys):
  tmp, workdir = smoke_run
  before = (workdir / "results.json").read_text()
  args = ["--flagfile=experiments/smoke.flags", f"--workdir={workdir}"]
  code, _, err = _command(args, jax_cache, capsys)
  assert code == 1
  assert len(_error_lines(err)) == 1 and "--resume" in err
  assert (workdir / "results.json").read_text() == before
  code, _, err = _command(args + ["--resume"], jax_cache, capsys)
  assert code == 0, err[-3000:]
  again = json.loads((workdir / "results.json").read_text())
  first = json.loads(before)
  assert again["best"] == first["best"]
  assert again["n_templates_evaluated"] == first["n_templates_evaluated"]


@pytest.mark.slow
def test_kill_minus_nine_then_resume_matches_an_uninterrupted_run(smoke_run, jax_cache):
  tmp, _ = smoke_run
  args = ["--flagfile=experiments/smoke.flags", "--noprogress", "--seeds=1,2",
          "--n_iter=4", "--n_reset=2", f"--feature_cache_dir={tmp / 'features'}",
          "--tracking=none"]
  full = tmp / "full"
  # A fresh matplotlib cache, as on a new machine: its font-cache lines stay quiet too.
  proc = _main(args + [f"--workdir={full}"], tmp, MPLCONFIGDIR=str(tmp / "mpl"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (tmp / "mpl").exists()
  for noise in ("fontManager", "Unable to initialize backend", "HTTP Request"):
    assert noise not in proc.stderr, noise

  # Killed a third of the way through seed 1's evaluations, far from the end.
  kill_at = max(1, len((full / "seed_1" / "prompts.jsonl").read_text().splitlines()) // 3)
  killed = tmp / "killed"
  child = subprocess.Popen([sys.executable, "-m", "lmbbo_jax.main", *args,
                            f"--workdir={killed}"], cwd=REPO, env=_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  log = killed / "seed_1" / "prompts.jsonl"
  while time.time() < deadline and child.poll() is None:
    if log.exists() and len(log.read_text().splitlines()) >= kill_at:
      break
    time.sleep(0.05)
  assert child.poll() is None, "the run finished before it could be killed; enlarge it"
  child.send_signal(signal.SIGKILL)
  child.wait()
  assert not (killed / "results.json").exists()

  # The resume reads what the killed process left: no process behaviour, so in-process.
  code, _, _ = _command(args + [f"--workdir={killed}", "--resume"], jax_cache)
  assert code == 0

  def evaluated(workdir):
    rows = [json.loads(l) for l in (workdir / "prompts.jsonl").read_text().splitlines()]
    keys = [(r["seed"], r["chain"], r["seq"], r["template"]) for r in rows]
    assert len(keys) == len(set(keys)), "an evaluation was logged twice"
    return set(keys)

  assert evaluated(killed) == evaluated(full)
  a = json.loads((killed / "results.json").read_text())
  b = json.loads((full / "results.json").read_text())
  assert a["best"]["template"] == b["best"]["template"]


def test_unknown_dataset_is_one_line(tmp_path, jax_cache, capsys):
  code, _, err = _command(["--dataset=nonsense_set", f"--workdir={tmp_path / 'w'}",
                           "--model=toyclip"], jax_cache, capsys)
  assert code == 1
  lines = _error_lines(err)
  assert len(lines) == 1 and "nonsense_set" in lines[0]
  assert "Traceback" not in err


@pytest.mark.parametrize("args,needle", [
    (["--shots=0"], "--shots"),
    (["--seeds=1,x"], "--seeds"),
    (["--flagfile=experiments/does_not_exist.flags"], "does_not_exist"),
    (["--baselines=photo,oracle"], "--baselines"),
    (["--methods=ape,nonsense"], "--compare"),
    (["--n_restart=0"], "--n_restart"),
    (["--llm_extra_params=[1]"], "--llm_extra_params"),
    (["--tracking=tensorboard,nope"], "--tracking"),
    (["--llm_local_threads=-1"], "--llm_local_threads"),
])
def test_bad_flags_are_one_line(tmp_path, jax_cache, capsys, args, needle):
  code, _, err = _command(["--dataset=toy:mix", f"--workdir={tmp_path / 'w'}", *args],
                          jax_cache, capsys)
  assert code == 1
  lines = _error_lines(err)
  assert len(lines) == 1 and needle in lines[0], err[-2000:]
  assert "Traceback" not in err
  assert not (tmp_path / "w").exists()


def test_paper_flagfile_offline_fails_fast_naming_weights_and_data(tmp_path):
  proc = _main(["--flagfile=experiments/caltech.flags", f"--workdir={tmp_path / 'w'}",
                f"--data_dir={tmp_path / 'tfds'}", f"--model_cache_dir={tmp_path / 'mc'}"],
               tmp_path, timeout=120, HF_HOME=str(tmp_path / "hf"))
  assert proc.returncode == 1
  lines = _error_lines(proc.stderr)
  assert len(lines) == 1, proc.stderr[-2000:]
  assert "data:" in lines[0] and "weights:" in lines[0]
  assert "resnet50_clip" in lines[0] and "caltech" in lines[0]
  assert not (tmp_path / "w" / "results.json").exists()


def test_missing_init_pool_file_is_one_line_before_any_work(tmp_path, jax_cache, capsys):
  code, _, err = _command(["--flagfile=experiments/smoke.flags", f"--workdir={tmp_path / 'w'}",
                           f"--init_pool={tmp_path / 'no_such_captions.txt'}"], jax_cache,
                          capsys)
  assert code == 1
  lines = _error_lines(err)
  assert len(lines) == 1 and "no_such_captions.txt" in lines[0], err[-2000:]
  assert "Traceback" not in err
  assert not (tmp_path / "w" / "feature_cache").exists()


def test_resume_with_a_changed_search_config_is_one_line(smoke_run, jax_cache, capsys):
  _, workdir = smoke_run
  code, _, err = _command(["--flagfile=experiments/smoke.flags", f"--workdir={workdir}",
                           "--resume", "--n_iter=5"], jax_cache, capsys)
  assert code == 1
  lines = _error_lines(err)
  assert len(lines) == 1 and "n_iter" in lines[0], err[-2000:]
  assert "Traceback" not in err


@pytest.mark.slow
def test_the_comparison_runs_every_method_on_the_same_tasks_and_writes_the_table(
    tmp_path, jax_cache, capsys, monkeypatch):
  import fake_llm_server as fake
  from lmbbo_jax import report
  workdir = tmp_path / "cmp"
  methods = ["llm_no_feedback", "ape", "iterative_ape", "ours_pn", "coop"]
  monkeypatch.setenv("LMBBO_TEST_KEY", "k")
  with fake.FakeLLMServer(n_templates=2) as server:
    code, out, err = _compare(methods, workdir, server, jax_cache, capsys, "--seeds=1,2",
                              "--n_restart=1", "--n_reset=2", "--n_iter=1", "--coop_epochs=3")
  assert code == 0, err[-3000:]
  for name in methods:
    results = json.loads((workdir / name / "results.json").read_text())
    assert sorted(results["per_seed"]) == ["1", "2"]
    assert results["config"]["proposer_kind"] == ("coop" if name == "coop" else
                                                  "llm" if name.startswith(("llm", "ours"))
                                                  else name)
    if name != "coop":  # The same call budget for every LLM method.
      assert results["llm"]["calls"] == 2 * 1 * 2 * 1, name
  coop = json.loads((workdir / "coop" / "results.json").read_text())
  assert len(coop["per_seed"]["1"]["counts"]["coop"]["loss_curve"]) == 3
  assert (workdir / "coop" / "coop_loss.png").stat().st_size > 0
  assert (workdir / "coop" / "seed_1" / "coop_ctx.npy").exists()
  # The images were encoded once, for all methods.
  assert len(list((workdir / "feature_cache").glob("*.npz"))) >= 1
  table = (workdir / "comparison.md").read_text()
  for label in ("a photo of a {}.", "initial pool's best", "LLM-written, no feedback", "APE",
                "iterative APE", "ours, P+N", "CoOp"):
    assert label in table, label
  rows = (workdir / "comparison.csv").read_text().splitlines()
  assert rows[0].startswith("dataset,method,label,seeds")
  ape = next(r for r in rows if ",ape," in r)
  tests = json.loads((workdir / "ape" / "results.json").read_text())["per_seed"]
  assert f"{tests['1']['best']['test_acc']:.4f} {tests['2']['best']['test_acc']:.4f}" in ape
  assert (workdir / "efficiency.png").stat().st_size > 0
  assert "comparison.md" in out
  # The report redraws it from the folders.
  assert report.main(["--table", str(workdir), "--out", str(tmp_path / "again")]) == 0
  assert (tmp_path / "again" / "comparison.md").read_text() == table


@pytest.mark.slow
def test_the_comparison_of_the_new_methods_at_the_same_calls_reports_efficiency(
    tmp_path, jax_cache, capsys, monkeypatch):
  """ours_confusion, ours_pareto (merge every 3rd call) and ours_many (12 candidates per
  call, successive halving) beside ours_pn, at the same calls; comparison.md gives
  templates scored per call and per second, efficiency.png has two panels."""
  import fake_llm_server as fake
  from matplotlib import image
  workdir = tmp_path / "cmp"
  methods = ["ours_pn", "ours_confusion", "ours_pareto", "ours_many"]
  monkeypatch.setenv("LMBBO_TEST_KEY", "k")
  with fake.FakeLLMServer(n_templates=12) as server:
    code, _, err = _compare(methods, workdir, server, jax_cache, capsys, "--seeds=1",
                            "--n_restart=1", "--n_reset=1", "--n_iter=3", "--init_pool_size=12")
  assert code == 0, err[-3000:]
  results = {m: json.loads((workdir / m / "results.json").read_text()) for m in methods}
  assert {m: r["llm"]["calls"] for m, r in results.items()} == dict.fromkeys(methods, 3)
  scored = {m: r["throughput"]["templates_scored"] for m, r in results.items()}
  assert scored["ours_many"] > scored["ours_pn"]
  # Confusion feedback's request names train-split class pairs.
  transcript = (workdir / "ours_confusion" / "transcript.jsonl").read_text()
  assert "Classes CLIP most often mixes up" in transcript or "classifies every" in transcript
  # The records carry per-class accuracy for the front (never test), and the 3rd call merges.
  rows = [json.loads(line) for line in
          (workdir / "ours_pareto" / "prompts.jsonl").read_text().splitlines()]
  assert all(set(r["per_class"]) == {"train", "val", "train_val"} for r in rows)
  entries = [json.loads(line) for line in transcript_lines(workdir / "ours_pareto")]
  merges = [e for e in entries if e.get("merge_parents")]
  assert all(e["iteration"] == 2 for e in merges)
  # It merges exactly when the front before that call has two members (on this toy task
  # one template is often best on every class: then the call is an ordinary one).
  from lmbbo_jax.search.state import EvalRecord, pareto_front
  before = [EvalRecord.from_row(r) for r in rows if r["step"] < 3]
  front = pareto_front(before, "train", results["ours_pareto"]["config"]["search"]["tie_break"])
  assert bool(merges) == (len(front) >= 2)
  if merges:
    assert merges[0]["merge_parents"][0] == front[0].template
  # ours_many: halving kept some candidates out of the pool.
  many = (workdir / "ours_many" / "prompts.jsonl").read_text()
  assert '"pooled":false' in many.replace(" ", "")
  table = (workdir / "comparison.md").read_text()
  assert "templates / call" in table
  for m in methods:
    r = results[m]
    tp = r["throughput"]
    line = next(line for line in table.splitlines()
                if line.startswith("| ") and f"| {r['llm']['calls']} | {tp['templates_scored']} |"
                in line and report_label(m) in line)
    assert f"{tp['templates_scored'] / 3:.2f}" in line
    assert f"{tp['templates_scored'] / tp['scoring_busy_s']:.1f}" in line
  png = image.imread(str(workdir / "efficiency.png"))
  assert png.shape[1] > 1.8 * png.shape[0]  # two panels side by side, one dataset


def transcript_lines(workdir):
  return [line for line in (workdir / "transcript.jsonl").read_text().splitlines() if line]


def report_label(method):
  from lmbbo_jax import report
  return next(label for label, _, name in report.TABLE_ROWS if name == method)


@pytest.mark.slow
def test_transfer_scores_the_chosen_templates_on_other_backbones_without_reselecting(
    tmp_path, jax_cache, capsys):
  workdir = tmp_path / "t"
  code, _, err = _command(["--flagfile=experiments/smoke.flags", f"--workdir={workdir}",
                           "--model=random:tiny-vit",
                           "--transfer_to=random:tiny-rn,toyclip,random:tiny-siglip"],
                          jax_cache, capsys)
  assert code == 0, err[-3000:]
  results = json.loads((workdir / "results.json").read_text())
  # Across families too: a CLIP's choices scored on a SigLIP.
  assert list(results["transfer"]) == ["random:tiny-rn", "toyclip", "random:tiny-siglip"]
  for source, t in results["transfer"].items():
    for seed, entries in t["per_seed"].items():
      ps = results["per_seed"][seed]
      # The same templates as chosen on the run's model, scored on another one.
      assert entries["best"]["template"] == ps["best"]["template"]
      assert entries["initial_best"]["template"] == ps["initial_best"]["template"]
      assert entries["baseline:photo"]["template"] == "a photo of a {}."
      assert 0.0 <= entries["best"]["test_acc"] <= 1.0
  toy, own = results["transfer"]["toyclip"]["per_seed"]["1"], results["per_seed"]["1"]
  assert toy["baseline:photo"]["test_acc"] != own["baselines"]["photo"]["test_acc"]
  assert toy["baseline:photo"]["test_acc"] > 0.3  # The trained toy CLIP reads its own world.
  assert "Transfer" in (workdir / "summary.md").read_text()


@pytest.mark.slow
def test_replay_of_a_three_seed_run_gives_each_seed_its_own_templates(
    tmp_path, jax_cache, capsys, monkeypatch):
  import fake_llm_server as fake
  args = ["--flagfile=experiments/smoke.flags", "--seeds=1,2,3",
          "--n_restart=1", "--n_iter=2", "--proposer=llm", "--llm_model=gpt-4o-mini",
          "--llm_api_key_env=LMBBO_TEST_KEY"]
  monkeypatch.setenv("LMBBO_TEST_KEY", "k")
  with fake.FakeLLMServer(n_templates=2) as server:
    code, _, err = _command(args + [f"--workdir={tmp_path / 'rec'}",
                                    f"--llm_base_url={server.base_url}"], jax_cache, capsys)
  assert code == 0, err[-3000:]
  code, _, err = _command(args + [f"--workdir={tmp_path / 'rep'}", "--proposer=replay",
                                  f"--replay_transcript={tmp_path / 'rec' / 'transcript.jsonl'}"],
                          jax_cache, capsys)
  assert code == 0, err[-3000:]

  def proposed(run):
    rows = [json.loads(l) for l in (tmp_path / run / "prompts.jsonl").read_text().splitlines()]
    return {s: sorted(r["template"] for r in rows if r["seed"] == s and r["step"] > 0)
            for s in (1, 2, 3)}
  recorded, replayed = proposed("rec"), proposed("rep")
  assert replayed == recorded and all(recorded.values())
  assert len({tuple(v) for v in recorded.values()}) == 3  # The seeds proposed different ones.


def test_dry_run_of_the_comparison_estimates_each_method_and_writes_nothing(
    tmp_path, jax_cache, capsys):
  workdir = tmp_path / "dry"
  code, out, err = _command(["--flagfile=experiments/paper_methods.flags",
                             f"--workdir={workdir}", "--dry_run"], jax_cache, capsys)
  assert code == 0, err[-3000:]
  estimate = json.loads(out[out.index("{"):])
  assert list(estimate) == ["llm_no_feedback", "ape", "iterative_ape", "ours_p", "ours_n",
                            "ours_pn", "cupl", "dclip", "waffle", "ours_pn+descriptions",
                            "ours_confusion", "ours_pareto", "ours_many", "coop"]
  for name, est in estimate.items():  # 3 seeds x 4 chains x 2 conversations x 8 turns.
    no_llm = name in ("coop", "waffle", "ours_pn+descriptions")
    assert est["calls"] == (0 if no_llm else 192), name
  assert estimate["cupl"]["cost_usd"] > 0
  assert estimate["coop"]["cost_usd"] == 0.0 and estimate["ours_pn"]["cost_usd"] > 0
  assert not workdir.exists()


def test_demo_edit_writes_tensorboard_events_with_the_best_so_far_series(tmp_path, jax_cache,
                                                                         capsys):
  """demo_edit.flags (one seed and a capped test split, to stay quick) with the default
  --tracking=tensorboard: TensorBoard's own reader finds each seed's best-so-far series."""
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  workdir = tmp_path / "demo"
  code, _, err = _command(["--flagfile=experiments/demo_edit.flags", f"--workdir={workdir}",
                           "--seeds=2", "--max_test_per_class=10", "--tracking=tensorboard"],
                          jax_cache, capsys)
  assert code == 0, err[-3000:]
  results = json.loads((workdir / "results.json").read_text())
  events = EventAccumulator(str(workdir / "tracking"), size_guidance={"scalars": 0})
  events.Reload()
  series = events.Scalars("seed_2/search/best_train")
  calls = results["per_seed"]["2"]["counts"]["proposals"]
  assert [e.step for e in series] == list(range(1, calls + 1))
  values = [e.value for e in series]
  assert values == sorted(values)
  assert values[-1] == pytest.approx(results["best"]["train_acc"])
  assert events.Scalars("final/best_test")[-1].value == pytest.approx(results["best"]["test_acc"])


@pytest.mark.slow
def test_a_canary_key_reaches_no_file_log_line_or_error_at_v2(tmp_path):
  """The real command at -v 2 (the HTTP libraries' DEBUG lines included) against a server
  that echoes the key in headers, 200 replies and error texts, one cut mid-key."""
  import urllib.parse
  import hostile_servers as hs
  canary = "sk-canary-5e1d7b93c0a24f68ee17"
  usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}

  def echo(req):
    auth = req.headers.get("authorization", "")
    key = auth.removeprefix("Bearer ")
    n = len(server.requests)
    if n % 3 == 1:
      return hs.json_answer({"error": {"message": "x" * 190 + key}}, 503)
    return hs.json_answer(hs.completion(
        f'- "a photo of a {{}} seen {n}." {auth} {urllib.parse.quote(key)}', usage=usage),
        headers={"X-Echo": auth, "X-Request-Id": key})

  with hs.HostileServer([hs.dynamic(echo)], max_requests=60) as server:
    proc = _main(["--flagfile=experiments/smoke.flags", f"--workdir={tmp_path / 'w'}",
                  "--noprogress", "-v", "2", "--proposer=llm", "--n_iter=2", "--n_restart=1",
                  f"--llm_base_url={server.base_url}", "--llm_api_key_env=LMBBO_CANARY",
                  "--llm_max_retries=2", "--tracking=tensorboard"], tmp_path,
                 LMBBO_CANARY=canary + "\r\n")
    sent = [r.headers.get("authorization") for r in server.requests]
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sent and all(a == f"Bearer {canary}" for a in sent)  # stripped, then sent
  # -v 2 shows the HTTP libraries' own DEBUG lines (headers included), redacted.
  assert "httpcore" in proc.stderr and "***" in proc.stderr
  texts = [proc.stdout, proc.stderr]
  texts += [p.read_bytes().decode("utf-8", "replace") for p in (tmp_path / "w").rglob("*")
            if p.is_file()]
  for text in texts:
    assert canary not in text and canary[:12] not in text


def test_a_run_on_clip_benchmark_shards_reports_every_metric_in_both_layouts(
    tmp_path, jax_cache, capsys):
  """--dataset=wds:DIR on generated CLIP_benchmark shards (a corrupt sample among them): the
  rows carry acc@1, acc@5 and mean per-class recall, the shards' own templates are
  baselines, selection can use another metric, and CLIP_benchmark's JSON is written."""
  from data_helpers import WDS_CLASSES, make_wds
  root = tmp_path / "wds_cars"
  make_wds(root, {"train": 3, "test": 4})
  workdir = tmp_path / "w"
  code, out, err = _command([f"--dataset=wds:{root}", "--model=random:tiny-vit",
                             f"--workdir={workdir}", "--seeds=1", "--proposer=edit",
                             "--n_iter=2", "--init_pool_size=6",
                             "--select_metric=mean_per_class_recall",
                             "--baselines=photo,dataset_best,dataset_ensemble,pool_best"],
                            jax_cache, capsys)
  assert code == 0, err[-3000:]
  results = json.loads((workdir / "results.json").read_text())
  assert results["num_classes"] == len(WDS_CLASSES) >= 5
  assert results["config"]["search"]["select_metric"] == "mean_per_class_recall"
  rows = [results["best"], *results["baselines"].values()]
  assert set(results["baselines"]) == {"photo", "dataset_best", "dataset_ensemble", "pool_best"}
  for row in rows:
    for split in ("train", "test"):
      for key in (f"{split}_acc", f"{split}_acc5", f"{split}_mean_per_class_recall"):
        assert 0.0 <= row[key] <= 1.0, (row["template"], key)
    assert row["test_acc5"] >= row["test_acc"]
  assert "test_acc5" in results["aggregate"]["best"]
  # The best is the one the chosen metric picks: nothing logged beats it there.
  logged = [json.loads(l) for l in (workdir / "prompts.jsonl").read_text().splitlines()]
  assert max(r["mean_per_class_recall"]["train"] for r in logged if not r.get("rejected")) == (
      results["best"]["train_mean_per_class_recall"])
  bench = json.loads((workdir / "clip_benchmark" / "seed_1" / "best.json").read_text())
  assert bench["task"] == "zeroshot_classification" and bench["dataset"] == f"wds:{root}"
  assert bench["metrics"] == pytest.approx({
      "acc1": results["best"]["test_acc"], "acc5": results["best"]["test_acc5"],
      "mean_per_class_recall": results["best"]["test_mean_per_class_recall"]})
  assert (workdir / "clip_benchmark" / "seed_1" / "baseline_dataset_ensemble.json").exists()
  assert "test top-5 accuracy" in (workdir / "summary.md").read_text()


def test_the_summary_leads_with_the_clip_papers_metric_for_the_dataset():
  from lmbbo_jax import report
  from lmbbo_jax.data.registry import lead_metric
  assert lead_metric("fgvc_aircraft") == "mean_per_class_recall"
  assert lead_metric("caltech101") == "mean_per_class_recall"
  assert lead_metric("dtd") == "accuracy" and lead_metric("toy:mix") == "accuracy"
  row = {"template": "a {}", "test_acc": 0.5, "test_mean_per_class_recall": 0.25,
         "train_acc": 0.75}
  results = {"seeds": [1], "per_seed": {"1": {"baselines": {"photo": row}}},
             "dataset": "fgvc_aircraft", "lead_metric": "mean_per_class_recall"}
  titles = [l for l in report.summary_markdown(results).splitlines() if l.startswith("## ")]
  assert "test mean per-class recall" in titles[0] and "CLIP paper's metric" in titles[0]
  assert "test accuracy" in titles[1] and "train accuracy" in titles[-1]
  assert "top-5" not in " ".join(titles)  # no acc5 in the rows: no table
  assert "| 25.0 |" in report.summary_markdown(results).split("## ")[1]
