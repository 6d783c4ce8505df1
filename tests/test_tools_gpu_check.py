"""The accelerator check in its CPU mode (`--small`), as CI runs it."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from lmbbo_jax.tools.gpu_check import kendall_tau

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_kendall_tau_known_answers():
  a = np.array([1.0, 2.0, 3.0, 4.0])
  assert kendall_tau(a, a * 10) == 1.0
  assert kendall_tau(a, -a) == -1.0
  # One discordant pair of six: (5 - 1) / 6.
  assert kendall_tau(a, np.array([1.0, 3.0, 2.0, 4.0])) == pytest.approx(4 / 6)
  # Ties (tau-b): x has one tied pair; 5 concordant of 5 untied pairs / sqrt(5 * 6).
  assert kendall_tau(np.array([1.0, 1.0, 2.0, 3.0]), a) == pytest.approx(5 / np.sqrt(30))


@pytest.mark.slow
def test_small_mode_runs_on_cpu_and_writes_every_part(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  proc = subprocess.run([sys.executable, "-m", "lmbbo_jax.tools.gpu_check", "--small",
                         f"--out={tmp_path}", "--parity_templates=60", "--classes=10"],
                        cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["mode"] == "small" and summary["failures"] == []
  parity = json.loads((tmp_path / "parity.json").read_text())
  assert parity["templates"] == 60
  assert parity["kendall_tau_logprob"] > 0.5  # bf16 ranks templates as fp32 does (0.99 seen)
  bench = [json.loads(line) for line in (tmp_path / "bench.jsonl").read_text().splitlines()]
  kinds = sorted((r["arch"], r["kind"], r["classes"]) for r in bench)
  # --classes=10: the bench at 100 classes is test_bench's (the same code, more rows).
  assert kinds == [("tiny-siglip", "cold", 10), ("tiny-siglip", "steady", 10),
                   ("tiny-vit", "cold", 10), ("tiny-vit", "steady", 10)]
  for r in bench:
    assert r["dtype"] == "bfloat16" and "error" not in r
  cold = [r for r in bench if r["kind"] == "cold"]
  assert all(r["first_template_s"] > 0 and r["compiles"] >= 1 for r in cold)
  assert list((tmp_path / "trace").rglob("*.xplane.pb")), "no profiler trace"
  traced = [r for r in bench if "profile_top_ops" in r]  # The first steady run's extra repeat.
  assert [(r["arch"], r["kind"]) for r in traced] == [("tiny-vit", "steady")]
  assert traced[0]["repeats"] == 3
