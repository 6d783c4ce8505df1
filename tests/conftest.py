"""Test-wide hooks, and the environment every test and its subprocesses run in."""

import atexit
import os
import shutil
import sys
import tempfile

import pytest

# The tests' programs are tiny and many: compiling them, not running them, is most of
# the suite's time. Set before any test imports JAX, and inherited by subprocesses:
# - one persistent compilation cache for the whole session, so a program compiled by
#   one test (or process) is loaded by the next that builds the same one (the cold
#   bench still starts from an empty cache of its own);
# - XLA's CPU backend at optimisation level 0: it compiles these programs faster than
#   the default and runs them fast enough. Numerics stay within every tolerance; the
#   product itself never sets it. LMBBO_TEST_XLA_DEFAULTS=1 leaves both as they are.
if os.environ.get("LMBBO_TEST_XLA_DEFAULTS") != "1":
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="lmbbo_tests_jax_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    atexit.register(shutil.rmtree, _CACHE, True)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
  os.environ["XLA_FLAGS"] = " ".join(filter(None, (
      os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0",
      "--xla_llvm_disable_expensive_passes=true")))



def pytest_collection_modifyitems(config, items):
  """Modules with a `slow` test run first, each still whole (their module fixtures are
  built once), so that parallel workers (`-n`, pytest-xdist) start on the long ones
  and the many short tests fill in around them."""
  has_slow = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
  items.sort(key=lambda item: item.module.__name__ not in has_slow)  # Stable.


@pytest.fixture(autouse=True)
def _no_background_compiles_leak_into_the_next_test():
  """A scorer compiles ahead of time in a background thread; a test that ends before it
  finishes must not leave that work (CPU, the GIL) to the tests after it."""
  yield
  encoder = sys.modules.get("lmbbo_jax.evaluator.text_encoder")
  if encoder is not None:
    encoder.stop_background_compiles()
