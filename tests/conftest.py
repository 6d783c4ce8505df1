"""Test-wide hooks."""

import sys

import pytest


@pytest.fixture(autouse=True)
def _no_background_compiles_leak_into_the_next_test():
  """A scorer compiles ahead of time in a background thread; a test that ends before it
  finishes must not leave that work (CPU, the GIL) to the tests after it."""
  yield
  encoder = sys.modules.get("lmbbo_jax.evaluator.text_encoder")
  if encoder is not None:
    encoder.stop_background_compiles()
