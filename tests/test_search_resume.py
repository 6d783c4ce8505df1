"""kill -9 mid-run, then --resume: same evaluations, no answered request repeated.

The search runs in a subprocess (`tests/search_helpers.py`) against the
loopback fake server in this process. The server holds every request from the
5th on, so the client is frozen at a known point (both chains waiting on the
LLM, every earlier answer received and cached) when it is killed.
"""

import collections
import json
import os
import signal
import subprocess
import sys

import orjson
import pytest

import fake_llm_server as fake

HELPER = os.path.join(os.path.dirname(__file__), "search_helpers.py")


def cmd(server, workdir, cache_dir, *extra):
  return [sys.executable, HELPER, "--base_url", server.base_url, "--workdir",
          str(workdir), "--cache_dir", str(cache_dir), "--n_restart", "2",
          "--n_reset", "2", "--n_iter", "3", *extra]


def rows(workdir):
  with open(os.path.join(workdir, "prompts.jsonl"), "rb") as f:
    return [orjson.loads(l) for l in f.read().splitlines() if l.strip()]


def evaluated(workdir):
  return sorted((r["chain"], r["seq"], r["template"]) for r in rows(workdir))


def start_frozen(server, argv):
  """Starts the helper and waits until both chains block on held requests."""
  first_held = len(server.requests) + 4
  server.hold_from(first_held)
  proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  frozen = server.wait_for(lambda: server.held_waiting() >= 2, timeout_s=60)
  if not frozen:
    proc.kill()
    out, err = proc.communicate()
    raise AssertionError(f"client never froze: {err[-2000:]}")
  return proc


def finish(argv):
  out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_kill9_then_resume_matches_an_uninterrupted_run(tmp_path):
  with fake.FakeLLMServer(delay_s=0.01) as server:
    a, ca = tmp_path / "a", tmp_path / "cache_a"
    proc = start_frozen(server, cmd(server, a, ca))
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    killed_rows = len(rows(a))
    server.release()
    n_killed_run = len(server.requests)

    resumed = finish(cmd(server, a, ca, "--resume"))
    first_two = list(server.requests)
    reference = finish(cmd(server, tmp_path / "b", tmp_path / "cache_b"))
    reference_requests = server.requests[len(first_two):]

    again = finish(cmd(server, a, ca, "--resume"))  # a finished run
    assert len(server.requests) == len(first_two) + len(reference_requests)

  # The kill happened mid-run: initial pools (2 x 10) and some iterations.
  assert 20 < killed_rows < len(rows(tmp_path / "b"))
  assert resumed["stop_reason"] == "completed"
  assert resumed["counts"]["replayed"] == killed_rows
  # Same evaluated set as the uninterrupted run, each evaluation logged once.
  assert evaluated(a) == evaluated(tmp_path / "b")
  keys = [(r["chain"], r["seq"]) for r in rows(a)]
  assert len(keys) == len(set(keys))
  assert resumed["best"]["template"] == reference["best"]["template"]
  # No request whose answer reached the client was sent twice; only the
  # requests frozen at kill time (never answered to it) were sent again.
  held = [r for r in first_two if r.held]
  assert len(held) == 2 and all(r.index < n_killed_run for r in held)
  answered = collections.Counter(r.body_sha for r in first_two if not r.held)
  assert max(answered.values()) == 1
  assert {r.body_sha for r in held} <= set(answered)
  assert len(answered) == len(reference_requests)
  assert again["llm"]["calls"] == 0 and again["counts"]["scored_templates"] == 0


def test_sigterm_stops_cleanly(tmp_path):
  with fake.FakeLLMServer() as server:
    proc = start_frozen(server, cmd(server, tmp_path / "w", tmp_path / "c"))
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    server.release()
  assert proc.returncode == 0, err[-3000:]
  summary = json.loads(out.strip().splitlines()[-1])
  assert summary["stop_reason"] == "signal"
  assert len(rows(tmp_path / "w")) > 20
  assert "SIGTERM received" in err


def test_a_run_stored_before_new_settings_existed_still_resumes(tmp_path):
  """Keys missing from an older search_config.json compare to their defaults."""
  import json
  from lmbbo_jax.search import SearchConfig
  from lmbbo_jax.search.runlog import RunLog
  cfg = SearchConfig().to_dict()
  old = {k: v for k, v in cfg.items() if k not in ("m_ask", "reply_format",
                                                 "rejection_feedback",
                                                 "max_template_words")}
  (tmp_path / "search_config.json").write_text(json.dumps(old))
  with RunLog(tmp_path, resume=True, fsync=False) as log:
    log.check_config(cfg, defaults=SearchConfig().to_dict())
    changed = dict(cfg, reply_format="json")
    with pytest.raises(Exception, match="reply_format"):
      log.check_config(changed, defaults=SearchConfig().to_dict())


@pytest.mark.parametrize("old_fields", ["chain_and_restart", "restart_only"])
def test_a_log_that_names_the_chain_restart_still_resumes_and_replays(tmp_path, old_fields):
  """Older versions wrote `restart` (the chain again) in every record: such logs
  resume and replay; new records name the chain `chain` only."""
  import asyncio
  from search_helpers import WordScorer
  from lmbbo_jax.search import RunLog, SearchConfig, make_proposer_factory, run_search

  cfg = SearchConfig(n_restart=2, n_reset=2, n_iter=3, init_pool_size=6)

  def search(workdir, kind="edit", resume=False, transcript=None):
    async def go():
      with RunLog(workdir, resume=resume, fsync=False) as log:
        return await run_search(cfg, WordScorer(),
                                make_proposer_factory(kind, cfg, transcript=transcript), log)
    return asyncio.run(go())

  def jsonl(path):
    return [orjson.loads(l) for l in path.read_bytes().splitlines() if l.strip()]

  def aged(row):
    row = dict(row, restart=row["chain"])
    if old_fields == "restart_only":
      del row["chain"]
    return row

  def write(path, rows_):
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows_))

  full = search(tmp_path / "full")
  full_rows = jsonl(tmp_path / "full" / "prompts.jsonl")
  full_transcript = jsonl(tmp_path / "full" / "transcript.jsonl")
  assert not any("restart" in r for r in full_rows + full_transcript)
  old = tmp_path / "old"
  old.mkdir()
  (old / "search_config.json").write_bytes((tmp_path / "full" / "search_config.json").read_bytes())
  write(old / "prompts.jsonl", [aged(r) for r in full_rows[:14]])
  write(old / "transcript.jsonl", [aged(r) for r in full_transcript[:3]])
  resumed = search(old, resume=True)
  assert resumed.counts["replayed"] == 14
  assert sorted((r.chain, r.seq, r.template) for r in resumed.records) == sorted(
      (r.chain, r.seq, r.template) for r in full.records)
  assert resumed.best.template == full.best.template
  new_rows = jsonl(old / "prompts.jsonl")[14:]
  assert len(new_rows) == len(full_rows) - 14
  assert all("chain" in r and "restart" not in r for r in new_rows)
  # The transcript's old entries are recognised: none is written twice.
  assert len(jsonl(old / "transcript.jsonl")) == len(full_transcript)
  # An old transcript replays.
  write(tmp_path / "old_transcript.jsonl", [aged(r) for r in full_transcript])
  replayed = search(tmp_path / "replay", kind="replay",
                    transcript=str(tmp_path / "old_transcript.jsonl"))
  assert sorted((r.chain, r.seq, r.template) for r in replayed.records) == sorted(
      (r.chain, r.seq, r.template) for r in full.records)
