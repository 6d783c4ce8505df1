"""`python -m lmbbo_jax.tools.image_folder`: a seeded image folder for a shipped class list."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from lmbbo_jax.data import build_task
from lmbbo_jax.tools.image_folder import write_folder

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_the_folder_is_seeded_and_reads_as_a_folder_dataset(tmp_path):
  names = ["cat", "dog", "sea turtle"]
  write_folder(tmp_path / "a", names, per_class=2, size=16, seed=0)
  write_folder(tmp_path / "b", names, per_class=2, size=16, seed=0)
  for name in names:
    for i in range(2):
      a = np.asarray(Image.open(tmp_path / "a" / name / f"{i}.png"))
      b = np.asarray(Image.open(tmp_path / "b" / name / f"{i}.png"))
      assert a.shape == (16, 16, 3) and (a == b).all()
  assert (tmp_path / "a" / "classes.txt").read_text().splitlines() == names
  task = build_task(f"folder:{tmp_path / 'a'}", shots=1, seed=1)
  assert sorted(task.class_names) == sorted(names)


def test_bad_names_and_a_used_folder_are_refused(tmp_path):
  with pytest.raises(ValueError, match="cannot be folder names"):
    write_folder(tmp_path / "x", ["a/b"], per_class=1, size=8, seed=0)
  (tmp_path / "used").mkdir()
  (tmp_path / "used" / "f").write_text("x")
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  proc = subprocess.run([sys.executable, "-m", "lmbbo_jax.tools.image_folder",
                         f"--out={tmp_path / 'used'}"], env=env, capture_output=True, text=True)
  assert proc.returncode == 2 and "is not empty" in proc.stderr
