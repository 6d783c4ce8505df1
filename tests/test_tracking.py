"""Run tracking backends: TensorBoard event files read back with TensorBoard's own
reader; wandb and MLflow when installed; clear errors when they are not."""

import asyncio
import glob
import sys

import pytest

from search_helpers import WordScorer
from lmbbo_jax import tracking
from lmbbo_jax.search import RunLog, SearchConfig, make_proposer_factory, run_search
from lmbbo_jax.search.tracking import NullWriter, PrefixedWriter

SECRET = "sk-test-SECRET-abcdef123456"
CONFIG = {"dataset": "toy:pixel_shapes", "seeds": [0, 1],
          "search": {"n_restart": 2, "n_iter": 4},
          "llm": {"model": "gpt-4o-mini", "max_tokens": 400, "api_key": SECRET,
                  "base_url": f"http://user:{SECRET}@example.invalid/v1"},
          "hf_token": SECRET}


def two_seeds(tmp_path, writer):
  """Two seeds' searches at once, sharing one writer (as a run does)."""
  async def one(seed):
    cfg = SearchConfig(n_restart=2, n_reset=1, n_iter=4, init_pool_size=8, seed=seed)
    with RunLog(tmp_path / f"seed_{seed}", fsync=False) as log:
      return await run_search(cfg, WordScorer(), make_proposer_factory("edit", cfg), log,
                              writer=PrefixedWriter(writer, f"seed_{seed}/"))

  async def both():
    return await asyncio.gather(one(0), one(1))
  return asyncio.run(both())


def test_tensorboard_event_files_hold_the_best_so_far_series(tmp_path):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  logdir = tmp_path / "tb"
  writer = tracking.open_writer("tensorboard", logdir, "test", CONFIG)
  results = two_seeds(tmp_path, writer)
  writer.write_summary({"seeds": {str(i): r.summary()["best"] for i, r in enumerate(results)}})
  writer.close()
  events = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
  events.Reload()
  for seed, result in enumerate(results):
    series = events.Scalars(f"seed_{seed}/search/best_train")
    calls = result.counts["proposals"]
    assert [e.step for e in series] == list(range(1, calls + 1))
    values = [e.value for e in series]
    assert values == sorted(values)
    assert values[-1] == pytest.approx(result.best.accuracy["train"])
    for chain, best in result.best_per_chain.items():
      chain_series = events.Scalars(f"seed_{seed}/chain_{chain}/best_train")
      assert [e.step for e in chain_series] == list(range(5))
      assert chain_series[-1].value == pytest.approx(best.accuracy["train"])
    final = events.Scalars(f"final/seeds/{seed}/accuracy/train")
    assert final[-1].value == pytest.approx(result.best.accuracy["train"])
  assert "config/text_summary" in events.Tags()["tensors"]
  # The config went in, without its secrets.
  written = b"".join(p.read_bytes() for p in logdir.iterdir())
  assert b"llm.model" in written and b"llm.max_tokens" in written
  assert SECRET.encode() not in written and b"user:" not in written


def test_secret_keys_are_dropped_and_urls_redacted():
  flat = tracking.public_flat(CONFIG)
  assert flat["llm.model"] == "gpt-4o-mini" and flat["llm.max_tokens"] == 400
  assert flat["llm.base_url"] == "http://example.invalid/v1"
  assert "llm.api_key" not in flat and "hf_token" not in flat
  assert SECRET not in repr(flat)
  for name in ("api_key", "OPENAI_API_KEY", "hf_token", "client_secret", "db-password"):
    assert tracking.is_secret_key(name), name
  for name in ("max_tokens", "model", "keyword_count", "prompt_tokens"):
    assert not tracking.is_secret_key(name), name


@pytest.mark.parametrize("kind", ["wandb", "mlflow"])
def test_a_missing_backend_is_a_one_line_error_and_opens_nothing(tmp_path, monkeypatch, kind):
  monkeypatch.setitem(sys.modules, kind, None)  # import fails as if not installed
  with pytest.raises(tracking.TrackingError) as err:
    tracking.open_writer(["tensorboard", kind], tmp_path / "t", "run", CONFIG)
  message = str(err.value)
  assert "\n" not in message and f"pip install {kind}" in message
  assert f"--tracking={kind}" in message
  assert not (tmp_path / "t").exists()  # checked before any backend was opened


def test_none_and_bad_kinds():
  assert isinstance(tracking.open_writer("none", "unused", "run", CONFIG), NullWriter)
  assert isinstance(tracking.open_writer([], "unused", "run", CONFIG), NullWriter)
  with pytest.raises(tracking.TrackingError, match="tensorbord is not a backend"):
    tracking.parse_kinds("tensorbord")
  with pytest.raises(tracking.TrackingError, match="none turns tracking off"):
    tracking.parse_kinds("none,wandb")
  assert tracking.parse_kinds(" tensorboard , mlflow ") == ["tensorboard", "mlflow"]


def test_mlflow_receives_the_series(tmp_path, monkeypatch):
  pytest.importorskip("mlflow")
  from mlflow.tracking import MlflowClient
  uri = (tmp_path / "mlruns").as_uri()  # a file store: no database package needed
  monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
  monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
  writer = tracking.open_writer("mlflow", tmp_path / "t", "mlflow-run", CONFIG)
  results = two_seeds(tmp_path, writer)
  writer.write_summary({"best_train": results[0].best.accuracy["train"], "note": "done"})
  writer.close()
  client = MlflowClient(uri)
  run = client.get_run(writer.run_id)
  assert run.info.status == "FINISHED" and run.info.run_name == "mlflow-run"
  assert run.data.params["llm.model"] == "gpt-4o-mini"
  assert SECRET not in repr(run.data.params)
  history = client.get_metric_history(writer.run_id, "seed_0/search/best_train")
  steps = sorted((m.step, m.value) for m in history)
  assert [s for s, _ in steps] == list(range(1, results[0].counts["proposals"] + 1))
  assert steps[-1][1] == pytest.approx(results[0].best.accuracy["train"])
  assert run.data.tags["final/note"] == "done"


def test_wandb_receives_the_series_offline(tmp_path, monkeypatch):
  wandb = pytest.importorskip("wandb")
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  writer = tracking.open_writer("wandb", tmp_path / "t", "wandb-run", CONFIG)
  results = two_seeds(tmp_path, writer)
  writer.write_summary({"best_train": results[0].best.accuracy["train"]})
  run = writer.run
  assert run.config["llm.model"] == "gpt-4o-mini" and "llm.api_key" not in run.config
  for seed, result in enumerate(results):
    assert run.summary[f"seed_{seed}/search/best_train"] == pytest.approx(
        result.best.accuracy["train"])
    assert run.summary[f"seed_{seed}/search/step"] == result.counts["proposals"]
  assert run.summary["final/best_train"] == pytest.approx(results[0].best.accuracy["train"])
  writer.close()
  wandb.teardown()  # waits for wandb's service to finish writing the run file
  # The offline run file holds the series and the config, and no secret.
  [log] = glob.glob(str(tmp_path / "t" / "wandb" / "offline-run-*" / "*.wandb"))
  data = open(log, "rb").read()
  assert b"seed_1/chain_1/best_train" in data and b"llm.model" in data
  assert SECRET.encode() not in data
