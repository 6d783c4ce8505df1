"""A loopback fake of an OpenAI-compatible chat-completions server, for tests.

Runs `ThreadingHTTPServer` in a background thread on 127.0.0.1 (a free port),
so concurrent requests are answered concurrently (each may sleep `delay_s`).

Programmable faults, consumed one per request in arrival order from a script
(`server.script([...])`) or chosen by `server.fault_fn(index, body)`:
`rate_limit` (429 with retry-after / retry-after-ms), `quota` (429
insufficient_quota), `status` (401, 500, 503, ...), `timeout` (sleep before
answering), `drop` (close the connection without an answer), `non_json`,
`empty_choices`, `null_content`, `reply` (a given assistant text), `echo` (repeat the first
listed template: a duplicate).

Without a scripted action the answer is `default_reply(body)`: deterministic
in the request body, it takes the templates quoted in the user messages
(positives first), inserts one word into one of them and returns `n_templates`
lines `- "..."`; the body's `seed` varies it between attempts.

Every request is recorded (`server.requests`): index, parsed body, its sha256,
Authorization header, times, action, and whether it was held by `hold_from`.
`hold_from(n)` makes request n and later ones wait until `release()` (used to
freeze a client at a known point before killing it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import json
import random
import re
import socket
import threading
import time
from typing import Any, Callable

WORDS = ("clear", "bright", "photo", "natural", "detailed", "blurry", "dark",
         "old", "tiny", "sketch", "close-up", "cartoon")
_QUOTED_TEMPLATE_RE = re.compile(r'^- "(.*\{\}.*)"(?: \(accuracy [^)]*\))?$')


@dataclasses.dataclass
class RequestRecord:
  index: int
  path: str
  body: Any
  body_sha: str
  authorization: str | None
  t_start: float
  t_end: float | None = None
  action: str = "reply"
  answered: bool = False
  held: bool = False


# --- actions ------------------------------------------------------------------
def reply(text: str, **kw) -> dict:
  return {"kind": "reply", "text": text, **kw}


def rate_limit(retry_after: float | None = None,
               retry_after_ms: float | None = None) -> dict:
  headers = {}
  if retry_after is not None:
    headers["retry-after"] = str(retry_after)
  if retry_after_ms is not None:
    headers["retry-after-ms"] = str(retry_after_ms)
  return {"kind": "status", "status": 429, "headers": headers,
          "body": {"error": {"message": "Rate limit reached for requests",
                             "type": "requests", "code": "rate_limit_exceeded"}}}


def quota() -> dict:
  return {"kind": "status", "status": 429,
          "body": {"error": {"message": "You exceeded your current quota.",
                             "type": "insufficient_quota",
                             "code": "insufficient_quota"}}}


def status(code: int, message: str = "error") -> dict:
  return {"kind": "status", "status": code,
          "body": {"error": {"message": message, "type": "server_error",
                             "code": None}}}


def unauthorized() -> dict:
  return {"kind": "status", "status": 401,
          "body": {"error": {"message": "Incorrect API key provided.",
                             "type": "invalid_request_error",
                             "code": "invalid_api_key"}}}


def timeout(sleep_s: float) -> dict:
  return {"kind": "timeout", "sleep_s": sleep_s}


def drop() -> dict:
  return {"kind": "drop"}


def non_json() -> dict:
  return {"kind": "raw", "status": 200, "raw": b"<html>Bad gateway</html>"}


def empty_choices() -> dict:
  return {"kind": "completion", "choices": []}


def null_content() -> dict:
  return {"kind": "completion",
          "choices": [{"index": 0, "finish_reason": "stop",
                       "message": {"role": "assistant", "content": None}}]}


def echo() -> dict:
  """Replies with the first template listed in the request (a duplicate)."""
  return {"kind": "echo"}


def templates_in(body: Any) -> list[str]:
  """Templates listed as `- "..."` lines in the request's user messages."""
  out = []
  for m in body.get("messages", []):
    if m.get("role") != "user":
      continue
    for line in str(m.get("content", "")).splitlines():
      match = _QUOTED_TEMPLATE_RE.match(line.strip())
      if match:
        out.append(match.group(1))
  return out


def default_reply(body: Any, n_templates: int = 1) -> str:
  """A deterministic, usually valid reply that mutates a listed positive."""
  digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).digest()
  rng = random.Random(digest)
  listed = templates_in(body)
  parents = listed[:3] or ["a photo of a {}."]
  lines = []
  for _ in range(n_templates):
    toks = rng.choice(parents).split()
    toks.insert(rng.randint(0, len(toks)), rng.choice(WORDS))
    lines.append(f'- "{" ".join(toks)}"')
  return "Here you go:\n" + "\n".join(lines)


def word_count(body: Any) -> int:
  """Prompt 'tokens' of a request: its words (never more than its bytes)."""
  if not isinstance(body, dict):
    return 1
  return max(1, sum(len(str(m.get("content", "")).split())
                    for m in body.get("messages", [])))


def completion(text: str | None, *, prompt_tokens: int = 100,
               completion_tokens: int = 20,
               finish_reason: str = "stop") -> dict:
  return {"id": "chatcmpl-fake", "object": "chat.completion",
          "created": int(time.time()), "model": "fake",
          "choices": [{"index": 0, "finish_reason": finish_reason,
                       "message": {"role": "assistant", "content": text}}],
          "usage": {"prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens}}


class FakeLLMServer:
  """See module docstring. Use as a context manager or start()/stop()."""

  def __init__(self, *, delay_s: float = 0.0, n_templates: int = 1,
               reply_fn: Callable[[Any], str] | None = None,
               realistic_usage: bool = False,
               response_headers: dict | None = None,
               refuse_response_format: str | None = None):
    # realistic_usage: usage = the words of the request and reply (a reply
    # longer than max_tokens words is cut, finish_reason "length");
    # response_headers: sent with every 200 answer (e.g. x-ratelimit-*);
    # refuse_response_format: "json_schema" answers a request with that
    # response_format type as llama-cpp-python's server does (HTTP 500).
    self.realistic_usage = realistic_usage
    self.response_headers = dict(response_headers or {})
    self.refuse_response_format = refuse_response_format
    self.delay_s = delay_s
    self.n_templates = n_templates
    self.reply_fn = reply_fn
    self.fault_fn: Callable[[int, Any], dict | None] | None = None
    self.requests: list[RequestRecord] = []
    self._script: list[dict] = []
    self._lock = threading.Lock()
    self._inflight = 0
    self.max_concurrency = 0
    self._hold_from: int | None = None
    self._gate = threading.Event()
    self._gate.set()
    self._httpd: http.server.ThreadingHTTPServer | None = None
    self._thread: threading.Thread | None = None

  # --- control ----------------------------------------------------------------
  @property
  def base_url(self) -> str:
    assert self._httpd is not None
    return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

  def script(self, actions: list[dict]) -> None:
    with self._lock:
      self._script.extend(actions)

  def hold_from(self, n: int) -> None:
    """Requests with index >= n wait until `release()`."""
    with self._lock:
      self._hold_from = n
      self._gate.clear()

  def release(self) -> None:
    with self._lock:
      self._hold_from = None
      self._gate.set()

  def held_waiting(self) -> int:
    with self._lock:
      return sum(1 for r in self.requests if r.held and r.t_end is None)

  def wait_for(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
      if predicate():
        return True
      time.sleep(0.02)
    return predicate()

  def start(self) -> "FakeLLMServer":
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, *args):  # quiet
        pass

      def do_POST(self):  # noqa: N802
        server._handle(self)

    class Server(http.server.ThreadingHTTPServer):
      # The default backlog of 5 drops SYNs when 8+ clients connect at once
      # under load, and the client's SYN retry then adds a whole second.
      request_queue_size = 128

    self._httpd = Server(("127.0.0.1", 0), Handler)
    self._httpd.daemon_threads = True
    self._thread = threading.Thread(target=self._httpd.serve_forever,
                                    kwargs={"poll_interval": 0.02},
                                    daemon=True)
    self._thread.start()
    return self

  def stop(self) -> None:
    self.release()
    if self._httpd is not None:
      self._httpd.shutdown()
      self._httpd.server_close()
      self._httpd = None

  def __enter__(self) -> "FakeLLMServer":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()

  # --- queries ----------------------------------------------------------------
  def count(self, action: str | None = None) -> int:
    with self._lock:
      return sum(1 for r in self.requests if action is None or
                 r.action == action)

  # --- handling ---------------------------------------------------------------
  def _next_action(self, index: int, body: Any) -> dict | None:
    with self._lock:
      if self._script:
        return self._script.pop(0)
    if self.fault_fn is not None:
      return self.fault_fn(index, body)
    return None

  def _handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
    length = int(h.headers.get("Content-Length") or 0)
    raw = h.rfile.read(length)
    try:
      body = json.loads(raw)
    except ValueError:
      body = None
    with self._lock:
      index = len(self.requests)
      rec = RequestRecord(index=index, path=h.path, body=body,
                          body_sha=hashlib.sha256(raw).hexdigest(),
                          authorization=h.headers.get("Authorization"),
                          t_start=time.monotonic())
      held = self._hold_from is not None and index >= self._hold_from
      rec.held = held
      self.requests.append(rec)
      self._inflight += 1
      self.max_concurrency = max(self.max_concurrency, self._inflight)
    try:
      if held:
        self._gate.wait()
      if not h.path.endswith("/chat/completions"):
        rec.action = "not_found"
        self._send(h, 404, {"error": {"message": "no such route",
                                      "code": "not_found"}})
        return
      action = self._next_action(index, body) or {"kind": "default"}
      rec.action = action.get("kind", "default")
      if action.get("kind") == "status":
        rec.action = f"status_{action['status']}"
      delay = action.get("delay_s", self.delay_s)
      if delay:
        time.sleep(delay)
      kind = action["kind"]
      if kind == "drop":
        h.close_connection = True
        try:
          h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
          pass
        return
      if kind == "timeout":
        time.sleep(action["sleep_s"])
        self._send(h, 200, completion(default_reply(body, self.n_templates)))
      elif kind == "status":
        self._send(h, action["status"], action.get("body", {}),
                   action.get("headers"))
      elif kind == "raw":
        self._send_raw(h, action["status"], action["raw"], "text/html")
      elif kind == "completion":
        self._send(h, 200, {"id": "x", "object": "chat.completion",
                            "choices": action["choices"]})
      elif kind == "reply":
        self._send_reply(h, body, action["text"])
      elif kind == "echo":
        listed = templates_in(body) or ["a photo of a {}."]
        self._send(h, 200, completion(f'- "{listed[0]}"'))
      else:
        fmt = (body or {}).get("response_format") or {}
        if (self.refuse_response_format
            and fmt.get("type") == self.refuse_response_format):
          rec.action = "refused_format"
          self._send(h, 500, {"error": {
              "message": "[{'type': 'literal_error', 'loc': ('body', "
                         "'response_format', 'type'), 'msg': \"Input should be "
                         "'text' or 'json_object'\"}]",
              "type": "internal_server_error"}})
          return
        text = (self.reply_fn(body) if self.reply_fn is not None
                else default_reply(body, self.n_templates))
        if fmt.get("type") in ("json_schema", "json_object"):
          text = json.dumps({"templates": [
              ln[3:-1] for ln in text.splitlines() if ln.startswith('- "')]})
        self._send_reply(h, body, text)
      rec.answered = True  # written; a held one may have lost its reader
    except (BrokenPipeError, ConnectionResetError, OSError):
      pass
    finally:
      with self._lock:
        rec.t_end = time.monotonic()
        self._inflight -= 1

  def _send_reply(self, h, body: Any, text: str) -> None:
    if not self.realistic_usage:
      self._send(h, 200, completion(text), self.response_headers)
      return
    words = text.split(" ")
    cap = (body or {}).get("max_tokens")
    finish = "stop"
    if cap is not None and len(words) > cap:
      text, finish = " ".join(words[:cap]), "length"
    self._send(h, 200, completion(text, prompt_tokens=word_count(body),
                                  completion_tokens=min(len(words), cap or
                                                        len(words)),
                                  finish_reason=finish), self.response_headers)

  @staticmethod
  def _send(h, code: int, payload: Any, headers: dict | None = None) -> None:
    FakeLLMServer._send_raw(h, code, json.dumps(payload).encode(),
                            "application/json", headers)

  @staticmethod
  def _send_raw(h, code: int, data: bytes, ctype: str,
                headers: dict | None = None) -> None:
    h.send_response(code)
    h.send_header("Content-Type", ctype)
    h.send_header("Content-Length", str(len(data)))
    for k, v in (headers or {}).items():
      h.send_header(k, v)
    h.end_headers()
    h.wfile.write(data)
    h.wfile.flush()
