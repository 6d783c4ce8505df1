"""Ledger prices, limits, estimates; cache keys and atomic entries; no JAX."""

import dataclasses
import subprocess
import sys

import pytest

from lmbbo_jax.llm import Ledger, LLMBudgetExceeded, ResponseCache
from lmbbo_jax.llm import cache as cache_lib
from lmbbo_jax.llm import ledger as ledger_lib


def test_price_lookup_prefers_exact_then_longest_prefix():
  prices = ledger_lib.DEFAULT_PRICES
  assert ledger_lib.price_for("gpt-4o-mini-2024-07-18", prices) == (0.15, 0.60)
  assert ledger_lib.price_for("gpt-4o-2024-08-06", prices) == (2.50, 10.00)
  assert ledger_lib.price_for("gpt-3.5-turbo-0301", prices) == (2.00, 2.00)
  assert ledger_lib.price_for("gpt-3.5-turbo-0125", prices) == (0.50, 1.50)
  assert ledger_lib.price_for("llama3:8b", prices) is None


def test_unknown_model_costs_zero_and_warns(caplog):
  with caplog.at_level("WARNING"):
    ledger = Ledger("my-local-llama")
  assert "my-local-llama" in caplog.text
  ledger.reserve()
  assert ledger.record_call(call_id="a", chain_id="c",
                            usage={"prompt_tokens": 1000,
                                   "completion_tokens": 10},
                            latency_s=0.1) == 0.0
  assert ledger.summary()["price_known"] is False


def test_price_override_and_cost():
  ledger = Ledger("gpt-4o", prices={"gpt-4o": (1.0, 2.0)})
  ledger.reserve()
  cost = ledger.record_call(call_id="a", chain_id="c",
                            usage={"prompt_tokens": 500_000,
                                   "completion_tokens": 250_000},
                            latency_s=1.0)
  assert cost == pytest.approx(0.5 + 0.5)


def test_max_calls_counts_reservations():
  ledger = Ledger("m", max_calls=2)
  ledger.reserve()
  ledger.reserve()  # two in flight
  with pytest.raises(LLMBudgetExceeded) as err:
    ledger.reserve()
  assert err.value.reason == "max_calls"
  ledger.release()  # one ended without a paid answer (e.g. cancelled)
  ledger.reserve()


def test_nearest_rank_percentiles():
  assert ledger_lib._percentile([], 50) is None
  vals = [float(i) for i in range(1, 101)]
  assert ledger_lib._percentile(vals, 50) == 50.0
  assert ledger_lib._percentile(vals, 95) == 95.0


@dataclasses.dataclass
class Cfg:
  n_restart: int = 2
  n_reset: int = 3
  n_iter: int = 4
  m_new: int = 1
  k_pos: int = 3
  k_neg: int = 3
  conversation: str = "single_turn"
  max_failed_attempts: int = 5


def test_estimate_single_and_multi_turn():
  ledger = Ledger("gpt-4o-mini")
  single = ledger.estimate(Cfg(), first_prompt_tokens=100, reply_tokens=10)
  assert single["calls"] == 24
  assert single["max_calls_with_retries"] == 120
  assert single["prompt_tokens"] == 2400
  assert single["completion_tokens"] == 240
  assert single["cost_usd"] == pytest.approx((2400 * 0.15 + 240 * 0.6) / 1e6)
  multi = ledger.estimate(Cfg(conversation="multi_turn"),
                          first_prompt_tokens=100, reply_tokens=10,
                          feedback_tokens=20)
  # Per conversation: 4 turns resending 100 + i * 30 tokens.
  assert multi["prompt_tokens"] == 6 * (400 + 30 * (0 + 1 + 2 + 3))


def test_cache_key_depends_on_every_part():
  base = dict(base_url="http://h/v1", model="m",
              messages=[{"role": "user", "content": "x"}],
              params={"temperature": 1.0}, chain_id="s0-c0", call_key="r0-i0-a0")
  k0 = cache_lib.cache_key(**base)
  assert k0 == cache_lib.cache_key(**dict(base, base_url="http://h/v1/"))
  for change in (dict(model="m2"),
                 dict(messages=[{"role": "user", "content": "y"}]),
                 dict(params={"temperature": 0.5}), dict(chain_id="s1-c0"),
                 dict(call_key="r0-i0-a1")):
    assert cache_lib.cache_key(**dict(base, **change)) != k0


def test_cache_entries_are_atomic_and_damage_is_a_miss(tmp_path):
  cache = ResponseCache(tmp_path, "readwrite")
  key = "ab" * 32
  cache.put(key, {"text": "hello", "usage": {}})
  assert cache.get(key)["text"] == "hello"
  path = tmp_path / key[:2] / f"{key}.json"
  assert not list(tmp_path.glob("*/*.tmp"))
  path.write_bytes(b'{"text": "hel')  # torn
  assert cache.get(key) is None
  with pytest.raises(cache_lib.CacheError):
    ResponseCache(tmp_path, "sometimes")


def test_redact_url():
  assert cache_lib.redact_url("http://u:p@host:8000/v1") == "http://host:8000/v1"
  assert cache_lib.redact_url("https://api.openai.com/v1") == (
      "https://api.openai.com/v1")


def test_llm_and_search_rooms_do_not_import_jax():
  code = ("import sys, lmbbo_jax.llm, lmbbo_jax.search, lmbbo_jax.search.pool;"
          "bad=[m for m in ('jax','flax','torch','openai') if m in sys.modules];"
          "print(bad); sys.exit(1 if bad else 0)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, timeout=60)
  assert out.returncode == 0, out.stdout + out.stderr
