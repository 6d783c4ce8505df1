"""Loopback HTTP servers that misbehave on purpose, for the LLM client's tests.

`HostileServer` answers each request on a raw socket with the next behaviour
of its script (the last one repeats), so a test can send what no well-behaved
HTTP library would: trickled bodies, silence, compression bombs, streams that
never end, invalid UTF-8. It binds 127.0.0.1 only, serves at most
`max_requests` requests, gives every connection a socket timeout, and `stop()`
(or leaving the `with` block) closes it and ends every behaviour still
running (their loops watch the stop event).

A behaviour is `fn(conn, request, server)`; the builders below make them.
Every request is recorded (`server.requests`): its path, headers (lower-case
names) and body.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import socket
import threading
import zlib
from typing import Any, Callable

Behaviour = Callable[[socket.socket, "Request", "HostileServer"], None]


@dataclasses.dataclass
class Request:
  path: str
  headers: dict[str, str]
  body: bytes

  @property
  def json(self) -> Any:
    return json.loads(self.body)


# --- responses ----------------------------------------------------------------
def head(status: int, headers: dict[str, str] | None = None,
         reason: str = "X") -> bytes:
  lines = [f"HTTP/1.1 {status} {reason}"]
  lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
  return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def completion(content: Any = '- "a photo of a {}."', *, usage: dict | None = None,
               finish_reason: str = "stop", **message) -> dict:
  """A chat.completion object (`message` adds fields such as refusal)."""
  body = {"id": "chatcmpl-hostile", "object": "chat.completion",
          "choices": [{"index": 0, "finish_reason": finish_reason,
                       "message": {"role": "assistant", "content": content,
                                   **message}}]}
  if usage is not None:
    body["usage"] = usage
  return body


def raw(status: int, body: bytes, headers: dict[str, str] | None = None
        ) -> Behaviour:
  """A whole answer: status, headers (Content-Length added) and body bytes."""
  def send(conn, request, server):
    conn.sendall(head(status, {"Content-Length": str(len(body)),
                               "Connection": "close", **(headers or {})})
                 + body)
  return send


def json_answer(obj: Any, status: int = 200,
                headers: dict[str, str] | None = None) -> Behaviour:
  return raw(status, json.dumps(obj).encode(),
             {"Content-Type": "application/json", **(headers or {})})


def dynamic(fn: Callable[[Request], Behaviour]) -> Behaviour:
  """A behaviour chosen from the request (e.g. to echo its Authorization)."""
  def send(conn, request, server):
    fn(request)(conn, request, server)
  return send


@functools.lru_cache(maxsize=None)
def bomb(encoding: str, size: int = 50 * 1024 * 1024) -> bytes:
  """`size` zero bytes compressed with gzip or deflate (about 1000:1)."""
  z = zlib.compressobj(9, zlib.DEFLATED, 16 + 15 if encoding == "gzip" else 15)
  block = b"\0" * (1024 * 1024)
  out = [z.compress(block) for _ in range(size // len(block))]
  return b"".join(out) + z.flush()


def compressed(encoding: str, body: bytes) -> Behaviour:
  return raw(200, body, {"Content-Type": "application/json",
                         "Content-Encoding": encoding})


def trickle(every_s: float = 0.1, total: int = 10 ** 6) -> Behaviour:
  """A 200 whose body comes one byte every `every_s` (for ever, in effect)."""
  def send(conn, request, server):
    conn.sendall(head(200, {"Content-Type": "application/json",
                            "Content-Length": str(total)}))
    for _ in range(total):
      if server.stopped.wait(every_s):
        return
      conn.sendall(b" ")
  return send


def trickle_headers(every_s: float = 0.1) -> Behaviour:
  """A status line and headers sent one byte at a time, never finished."""
  def send(conn, request, server):
    for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 10 ** 6:
      if server.stopped.wait(every_s):
        return
      conn.sendall(bytes([byte]))
  return send


def silent() -> Behaviour:
  """Reads the request and never answers."""
  def send(conn, request, server):
    server.stopped.wait(60.0)
  return send


def sse(pieces: list[str], *, done: bool = True, usage: dict | None = None,
        endless_every_s: float | None = None) -> Behaviour:
  """A streamed (SSE) answer although `stream` was not asked for.

  `endless_every_s`: after the pieces, a chunk every so often, never done.
  """
  def chunk(delta: dict, finish: str | None = None, **extra) -> bytes:
    return b"data: " + json.dumps({
        "id": "chatcmpl-sse", "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra}).encode() + b"\n\n"

  def send(conn, request, server):
    conn.sendall(head(200, {"Content-Type": "text/event-stream",
                            "Transfer-Encoding": "chunked"}))

    def out(data: bytes) -> None:
      conn.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n")

    out(chunk({"role": "assistant"}))
    for piece in pieces:
      out(chunk({"content": piece}))
    if endless_every_s is not None:
      while not server.stopped.wait(endless_every_s):
        out(chunk({"content": " more"}))
      return
    out(chunk({}, "stop", **({"usage": usage} if usage else {})))
    if done:
      out(b"data: [DONE]\n\n")
    conn.sendall(b"0\r\n\r\n")
  return send


class HostileServer:
  """See module docstring.

  Args:
    script: behaviours for requests 0, 1, ...; the last one repeats.
    max_requests: requests served at most (later connections are closed).
  """

  def __init__(self, script: list[Behaviour], *, max_requests: int = 50):
    self.script = list(script)
    self.max_requests = max_requests
    self.requests: list[Request] = []
    self.stopped = threading.Event()
    self._lock = threading.Lock()
    self._sock: socket.socket | None = None
    self._threads: list[threading.Thread] = []

  @property
  def port(self) -> int:
    assert self._sock is not None
    return self._sock.getsockname()[1]

  @property
  def base_url(self) -> str:
    return f"http://127.0.0.1:{self.port}/v1"

  def start(self) -> "HostileServer":
    self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    self._sock.bind(("127.0.0.1", 0))
    self._sock.listen(64)
    self._sock.settimeout(0.05)
    self._spawn(self._accept_loop)
    return self

  def stop(self) -> None:
    self.stopped.set()
    for t in list(self._threads):
      t.join(timeout=5.0)
    if self._sock is not None:
      self._sock.close()
      self._sock = None

  def __enter__(self) -> "HostileServer":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()

  def _spawn(self, target, *args) -> None:
    t = threading.Thread(target=target, args=args, daemon=True)
    with self._lock:
      self._threads.append(t)
    t.start()

  def _accept_loop(self) -> None:
    while not self.stopped.is_set():
      try:
        conn, _ = self._sock.accept()
      except (socket.timeout, OSError):
        continue
      self._spawn(self._serve, conn)

  def _serve(self, conn: socket.socket) -> None:
    conn.settimeout(10.0)
    try:
      request = _read_request(conn)
      if request is None:
        return
      with self._lock:
        index = len(self.requests)
        if index >= self.max_requests:
          return
        self.requests.append(request)
      behaviour = self.script[min(index, len(self.script) - 1)]
      behaviour(conn, request, self)
    except OSError:
      pass  # the client went away: nothing to answer
    finally:
      try:
        conn.shutdown(socket.SHUT_RDWR)
      except OSError:
        pass
      conn.close()


def _read_request(conn: socket.socket) -> Request | None:
  data = b""
  while b"\r\n\r\n" not in data:
    chunk = conn.recv(65536)
    if not chunk:
      return None
    data += chunk
  header_blob, body = data.split(b"\r\n\r\n", 1)
  lines = header_blob.decode("latin-1").split("\r\n")
  path = lines[0].split(" ")[1]
  headers = {}
  for line in lines[1:]:
    name, _, value = line.partition(":")
    headers[name.strip().lower()] = value.strip()
  length = int(headers.get("content-length", "0"))
  while len(body) < length:
    chunk = conn.recv(65536)
    if not chunk:
      break
    body += chunk
  return Request(path=path, headers=headers, body=body)
