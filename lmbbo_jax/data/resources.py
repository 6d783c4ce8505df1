"""Locates data shipped under `third_party/` (packaged as `lmbbo_jax.third_party`)."""

from __future__ import annotations

import importlib.resources
import pathlib


def third_party_path(*parts: str) -> pathlib.Path:
  """Path of a file or folder under `third_party/`.

  Works from a source checkout (editable install: `<repo>/third_party`) and from an
  installed package (`lmbbo_jax.third_party`).

  Args:
    *parts: path components below `third_party/`, e.g. ("coop_classnames", "classnames.json").

  Returns:
    The path (it may not exist; callers check).
  """
  candidate = pathlib.Path(__file__).resolve().parents[2] / "third_party"
  # A source checkout; the marker keeps an unrelated site-packages/third_party out.
  if (candidate / "coop_classnames").is_dir():
    return candidate.joinpath(*parts)
  try:
    root = importlib.resources.files("lmbbo_jax.third_party")
  except ModuleNotFoundError:
    return candidate.joinpath(*parts)
  return pathlib.Path(str(root)).joinpath(*parts)
