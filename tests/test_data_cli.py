"""`python -m lmbbo_jax.data` and the dataset-string dispatch."""

import json
import pathlib
import subprocess
import sys
import types

import pytest

from lmbbo_jax import data, extensions
from lmbbo_jax.data import DatasetError, FewShotTask, Item

import data_helpers

REPO = pathlib.Path(__file__).resolve().parents[1]


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "lmbbo_jax.data", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=120)


def test_cli_json_on_a_folder(tmp_path):
  data_helpers.make_class_tree(tmp_path / "imgs", ["b class", "a {} class", "ç"], per_class=10)
  result = _cli(f"--dataset=folder:{tmp_path / 'imgs'}", "--shots=2", "--seed=1", "--json")
  assert result.returncode == 0, result.stderr
  summary = json.loads(result.stdout)
  assert summary["num_classes"] == 3
  assert summary["splits"] == {"train": 6, "val": 6, "test": 9}
  assert summary["class_names_head"] == ["a {} class", "b class", "ç"]
  text = _cli(f"--dataset=folder:{tmp_path / 'imgs'}")
  assert text.returncode == 0 and "3 classes" in text.stdout


@pytest.mark.parametrize("args, code", [
    (["--dataset=folder:/nope/nothing", "--json"], 1),
    (["--dataset=not_a_dataset"], 1),
    (["--dataset=fgvc_aircraft"], 1),
    ([], 2),
])
def test_cli_bad_source_one_line(args, code):
  result = _cli(*args)
  assert result.returncode == code
  assert result.stdout == ""
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ")


def _fake_toy_module(calls):
  module = types.ModuleType("lmbbo_jax.toyworld.tasks")

  def build_toy_task(task_name, shots, seed):
    calls.append((task_name, shots, seed))
    test = [Item(f"{task_name}/test/{i}", i % 2) for i in range(10)]
    return FewShotTask(f"toy:{task_name}", ["red", "blue"], [Item("t0", 0)], [], test,
                       shots=shots, seed=seed, loader=lambda item: None, source="toy")

  module.build_toy_task = build_toy_task
  return module


def test_toy_dispatch(monkeypatch):
  calls = []
  # `toy:` reaches whatever the package's wiring registered for it.
  monkeypatch.setitem(extensions._ENTRIES, ("dataset", "toy:"),
                      _fake_toy_module(calls).build_toy_task)
  task = data.build_task("toy:shapes", 2, 7, max_test_per_class=3)
  assert calls == [("shapes", 2, 7)]
  assert task.name == "toy:shapes" and len(task.test) == 6
  assert task.splits().keys() == {"train", "test"}


def test_a_prefix_registered_from_outside_is_found_and_listed(monkeypatch):
  """The registry is general: the data room names no source it does not own."""
  calls = []
  monkeypatch.setitem(extensions._ENTRIES, ("dataset", "mine:"),
                      _fake_toy_module(calls).build_toy_task)
  task = data.build_task("mine:anything", 1, 3)
  assert calls == [("anything", 1, 3)] and task.splits()
  with pytest.raises(DatasetError, match="needs a value after 'mine:'"):
    data.build_task("mine:", 1, 1)
  with pytest.raises(DatasetError, match=r"or mine:\.\.\."):
    data.build_task("no_such_benchmark", 1, 1)


def test_an_unregistered_prefix_is_an_unknown_dataset(monkeypatch):
  monkeypatch.delitem(extensions._ENTRIES, ("dataset", "toy:"))
  with pytest.raises(DatasetError, match="unknown dataset 'toy:shapes'"):
    data.build_task("toy:shapes", 1, 1)


def test_empty_dataset_string():
  with pytest.raises(DatasetError, match="empty"):
    data.build_task("  ", 1, 1)
