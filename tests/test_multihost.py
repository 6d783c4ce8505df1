"""Several processes, one search: jax.distributed on 127.0.0.1 with simulated CPU devices."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from lmbbo_jax.llm.local_server import free_port
from lmbbo_jax.tools.multihost_bench import with_devices

pytestmark = pytest.mark.slow  # Every test here starts main jobs.

REPO = pathlib.Path(__file__).resolve().parent.parent


def _env(devices: int) -> dict:
  return with_devices(dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
                           PYTHONUNBUFFERED="1"), devices)


def _start(args, tmp_path, devices, log):
  return subprocess.Popen([sys.executable, "-m", "lmbbo_jax.main", *args], cwd=REPO,
                          env=_env(devices), stdout=log, stderr=subprocess.STDOUT)


def _distributed(args, tmp_path, name, processes=2, devices=2):
  port = free_port()
  logs = [open(tmp_path / f"{name}_{i}.log", "w") for i in range(processes)]
  procs = [_start([*args, "--distributed", f"--coordinator_address=127.0.0.1:{port}",
                   f"--num_processes={processes}", f"--process_id={i}"], tmp_path, devices,
                  logs[i]) for i in range(processes)]
  return procs, logs


def _wait_all(procs, logs, timeout=600):
  """Exit codes of every process; any still running after `timeout` is killed."""
  try:
    deadline = time.monotonic() + timeout
    return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    for f in logs:
      f.close()


def _rows(workdir):
  rows = [json.loads(l) for l in (workdir / "prompts.jsonl").read_text().splitlines()]
  return {(r.get("seed"), r["chain"], r["seq"]): r for r in rows}  # seed_N/ rows have none


SMOKE = ["--flagfile=experiments/smoke.flags", "--noprogress", "--seeds=1,2"]
ONE_SEED = ["--flagfile=experiments/smoke.flags", "--noprogress"]


def test_a_killed_peer_stops_the_others_within_the_heartbeat(tmp_path):
  workdir = tmp_path / "k"
  # Long enough to be killed mid-search (a peer's death shows at once as a broken link).
  args = [*ONE_SEED, f"--workdir={workdir}", "--n_iter=40"]
  procs, logs = _distributed([*args, "--distributed_heartbeat_s=5"], tmp_path, "kill")
  try:
    deadline = time.time() + 300
    log0 = workdir / "seed_1" / "prompts.jsonl"
    while time.time() < deadline and not (log0.exists() and log0.stat().st_size > 2000):
      assert procs[0].poll() is None, (tmp_path / "kill_0.log").read_text()[-3000:]
      time.sleep(0.1)
    assert log0.exists(), "the search never started"
    procs[1].send_signal(signal.SIGKILL)
    killed = time.time()
    code = procs[0].wait(timeout=120)
    waited = time.time() - killed
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
    for f in logs:
      f.close()
  assert code != 0
  assert waited < 60, waited  # Heartbeat 5 s, plus detection.
  text = (tmp_path / "kill_0.log").read_text()
  assert "another task died" in text or "stopped sending heartbeats" in text, text[-3000:]
  # Our own words come first, in one line, and no Python traceback of ours.
  errors = [l for l in text.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "--resume" in errors[0], text[-3000:]
  assert "Traceback (most recent call last)" not in text, text[-3000:]
  assert not (workdir / "results.json").exists(), "the search ended before the kill"
  # What process 0 scored survived: a resume on one process continues from it.
  kept = _rows(workdir / "seed_1")
  with open(tmp_path / "resume.log", "w") as log:
    proc = _start([*args, "--resume"], tmp_path, 4, log)
    assert proc.wait(timeout=600) == 0, (tmp_path / "resume.log").read_text()[-3000:]
  final = _rows(workdir / "seed_1")
  assert kept and all(final[k]["template"] == row["template"] for k, row in kept.items())
  assert len(final) > len(kept)


def test_a_failing_leader_tells_the_others_why(tmp_path):
  import fake_llm_server as fake
  workdir = tmp_path / "f"
  with fake.FakeLLMServer() as server:
    server.fault_fn = lambda index, body: fake.unauthorized()  # The key is refused for good.
    env_key = {"LMBBO_TEST_KEY": "k"}
    os.environ.update(env_key)
    try:
      codes = _wait_all(*_distributed([*ONE_SEED, f"--workdir={workdir}", "--proposer=llm",
                                       f"--llm_base_url={server.base_url}",
                                       "--llm_api_key_env=LMBBO_TEST_KEY"], tmp_path, "fail"))
    finally:
      os.environ.pop("LMBBO_TEST_KEY")
  assert codes == [1, 1]
  leader = (tmp_path / "fail_0.log").read_text()
  follower = (tmp_path / "fail_1.log").read_text()
  errors = [l for l in follower.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "process 1: process 0 stopped" in errors[0], follower[-3000:]
  assert "refused" in errors[0] and "refused" in leader


def test_the_multihost_bench_runs_both_layouts_and_they_give_the_same_search(tmp_path):
  """One process with 4 devices and two processes with 2 each: the bench's two runs are
  the same search, row for row."""
  # In a session of its own: a timeout kills the bench's main jobs with it.
  bench = subprocess.Popen(
      [sys.executable, "-m", "lmbbo_jax.tools.multihost_bench", f"--out={tmp_path}",
       f"--main_args={','.join(ONE_SEED)}"],
      cwd=REPO, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True, start_new_session=True)
  try:
    stdout, stderr = bench.communicate(timeout=600)
  finally:
    if bench.poll() is None:
      os.killpg(bench.pid, signal.SIGKILL)
      bench.communicate()
  assert bench.returncode == 0, stderr[-3000:]
  one_summary, several_summary, ratio = (json.loads(l) for l in stdout.strip().splitlines()[-3:])
  assert (one_summary["processes"], one_summary["devices"]) == (1, 4)
  assert (several_summary["processes"], several_summary["devices"]) == (2, 4)
  assert one_summary["templates"] == several_summary["templates"] > 0
  assert ratio["ratio_templates_per_s"] > 0

  one, two = tmp_path / "one", tmp_path / "several"
  a, b = _rows(one), _rows(two)
  assert a.keys() == b.keys() and len(a) > 10
  for key in a:  # The same templates, in the same order, with the same accuracies.
    assert a[key]["template"] == b[key]["template"], key
    assert a[key]["accuracy"] == b[key]["accuracy"], key
    for split, lp in a[key]["logprob"].items():
      assert b[key]["logprob"][split] == pytest.approx(lp, abs=1e-5)
  ra, rb = (json.loads((w / "results.json").read_text()) for w in (one, two))
  def exact(entry):  # Log-probabilities agree to float32 rounding (checked above).
    return {k: v for k, v in entry.items() if not k.endswith("logprob")}
  assert exact(ra["best"]) == exact(rb["best"])
  assert ra["best"]["train_logprob"] == pytest.approx(rb["best"]["train_logprob"], abs=1e-5)
  assert {k: exact(v) for k, v in ra["baselines"].items()} == {
      k: exact(v) for k, v in rb["baselines"].items()}
  assert rb["versions"]["process_count"] == 2 and rb["versions"]["device_count"] == 4
  # Only process 0 wrote: the others printed nothing but warnings.
  assert "outputs in" in (tmp_path / "several_0.log").read_text()
  assert "outputs in" not in (tmp_path / "several_1.log").read_text()


def test_distributed_without_a_cluster_is_one_clear_line(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "lmbbo_jax.main", *ONE_SEED,
                         f"--workdir={tmp_path / 'x'}", "--distributed"], cwd=REPO,
                        env=_env(1), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "--coordinator_address" in errors[0], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr


def test_a_leader_whose_local_server_cannot_start_tells_the_others_at_once(tmp_path):
  # Only process 0 starts the local LLM server; its failure reaches the others at the
  # run's first check, not after the heartbeat.
  missing = tmp_path / "missing.gguf"
  codes = _wait_all(*_distributed([*ONE_SEED, f"--workdir={tmp_path / 'g'}", "--proposer=llm",
                                   "--llm=local", f"--llm_gguf={missing}"], tmp_path, "gguf"),
                    timeout=300)
  assert codes == [1, 1]
  for i in (0, 1):
    log = (tmp_path / f"gguf_{i}.log").read_text()
    errors = [l for l in log.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "missing.gguf" in errors[0], log[-3000:]
    assert "Traceback" not in log
