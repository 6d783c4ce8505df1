"""Files that survive a kill: atomic writes and a torn-line-safe JSONL reader.

The one definition of each, for every file that must survive a kill (the feature
cache, the LLM response cache, run logs, results, checkpoints, the model cache). Imports nothing of the
package, so any room may use it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import IO, Any

import orjson
from absl import logging


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "wb", *,
                  fsync: bool = False) -> Iterator[IO[Any]]:
  """Opens a temporary file beside `path` that replaces it when the block ends cleanly.

  Readers see the old file or the whole new one, never a part; on an exception
  the temporary file is removed and `path` is untouched. `fsync=True` also makes
  the content durable before the rename (logs that resume must not lose it).
  """
  path = os.fspath(path)
  directory = os.path.dirname(path) or "."
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix="-" + os.path.basename(path))
  try:
    with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
      yield f
      f.flush()
      if fsync:
        os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


def atomic_write(path: str | os.PathLike, data: bytes | str, *, fsync: bool = False) -> None:
  """Writes `data` to `path` atomically (see `atomic_writer`)."""
  with atomic_writer(path, "wb" if isinstance(data, bytes) else "w", fsync=fsync) as f:
    f.write(data)


def write_json(path: str | os.PathLike, obj: Any, *, fsync: bool = False) -> None:
  """`obj` as indented JSON (numpy values allowed), written atomically."""
  atomic_write(path, orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY
                                  | orjson.OPT_NON_STR_KEYS), fsync=fsync)


def read_jsonl(path: str | os.PathLike, *, repair: bool = False) -> list[dict]:
  """The complete records of a JSONL file ([] if it does not exist).

  A last line that does not parse was torn by a kill during the write and is
  skipped; `repair=True` also truncates it away (or adds the missing newline of
  a whole last record), so that appending goes on cleanly. A damaged complete
  line is skipped with a warning.
  """
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    return []
  end = data.rfind(b"\n") + 1  # bytes up to the last complete line
  rows = []
  for line in data[:end].splitlines():
    if not line.strip():
      continue
    try:
      rows.append(orjson.loads(line))
    except orjson.JSONDecodeError:
      logging.warning("Skipping a damaged line in %s.", path)
  tail = data[end:]
  if tail.strip():
    try:  # a whole record that only lacks its newline
      rows.append(orjson.loads(tail))
      if repair:
        with open(path, "ab") as f:
          f.write(b"\n")
    except orjson.JSONDecodeError:
      logging.warning("Ignoring a torn last line of %s (interrupted write).", path)
      if repair:
        with open(path, "r+b") as f:
          f.truncate(end)
  return rows
