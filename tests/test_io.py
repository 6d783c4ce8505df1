"""`lmbbo_jax.io`: atomic writes and the torn-line-safe JSONL reader."""

import os

import pytest

from lmbbo_jax import io as io_lib


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
  path = tmp_path / "sub" / "f.json"
  io_lib.atomic_write(path, "old")
  assert path.read_text() == "old"
  with pytest.raises(RuntimeError):
    with io_lib.atomic_writer(path, "w") as f:
      f.write("half of the new")
      raise RuntimeError("killed mid-write")
  assert path.read_text() == "old"
  assert os.listdir(path.parent) == ["f.json"]  # no temporary file left
  io_lib.atomic_write(path, b"new", fsync=True)
  assert path.read_bytes() == b"new"


def test_write_json_takes_numpy_values(tmp_path):
  import numpy as np
  io_lib.write_json(tmp_path / "r.json", {"a": np.float32(0.5), "b": np.arange(2), 3: "x"})
  assert (tmp_path / "r.json").read_text().replace(" ", "").replace("\n", "") == \
      '{"a":0.5,"b":[0,1],"3":"x"}'


def test_read_jsonl_skips_torn_and_damaged_lines(tmp_path):
  path = tmp_path / "log.jsonl"
  assert io_lib.read_jsonl(path) == []
  path.write_bytes(b'{"a": 1}\n{not json}\n\n{"a": 2}\n{"a": 3, "b"')
  assert io_lib.read_jsonl(path) == [{"a": 1}, {"a": 2}]
  assert path.read_bytes().endswith(b'"b"')  # read only: the file is untouched
  assert io_lib.read_jsonl(path, repair=True) == [{"a": 1}, {"a": 2}]
  assert path.read_bytes() == b'{"a": 1}\n{not json}\n\n{"a": 2}\n'  # appends go on cleanly


def test_read_jsonl_keeps_a_whole_last_record_without_its_newline(tmp_path):
  path = tmp_path / "log.jsonl"
  path.write_bytes(b'{"a": 1}\n{"a": 2}')
  assert io_lib.read_jsonl(path) == [{"a": 1}, {"a": 2}]
  assert io_lib.read_jsonl(path, repair=True) == [{"a": 1}, {"a": 2}]
  with open(path, "ab") as f:
    f.write(b'{"a": 3}\n')
  assert io_lib.read_jsonl(path) == [{"a": 1}, {"a": 2}, {"a": 3}]
