"""A stand-in for `python -m llama_cpp.server` in a process of its own (tests).

  python tests/fake_llm_process.py --host 127.0.0.1 --port P [--crash_on_post=SIGILL] [--drop_post]

Serves `GET /v1/models` and `POST /v1/chat/completions` (one fixed template
line), like the real server, until it is killed; with `--crash_on_post` it dies
by that signal at its first POST, as a llama.cpp build for the wrong CPU does.
"""

import argparse
import http.server
import json
import signal
import threading


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--host", default="127.0.0.1")
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--crash_on_post", default=None, help="a signal name, e.g. SIGILL")
  parser.add_argument("--drop_post", action="store_true",
                      help="close every POST's connection without an answer, and live on")
  args = parser.parse_args()

  class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
      pass

    def _json(self, obj):
      data = json.dumps(obj).encode()
      self.send_response(200)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      self.wfile.write(data)

    def do_GET(self):  # noqa: N802
      self._json({"object": "list", "data": [{"id": "fake", "object": "model"}]})

    def do_POST(self):  # noqa: N802
      self.rfile.read(int(self.headers.get("Content-Length") or 0))
      if args.drop_post:
        self.close_connection = True
        return
      if args.crash_on_post:
        # At this thread, as a CPU fault is: a process-wide kill() of a core-dumping
        # signal goes to the main thread, and this one could answer before it dies.
        sig = getattr(signal, args.crash_on_post)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
        signal.pthread_kill(threading.get_ident(), sig)
        threading.Event().wait()  # never answer, whatever the kernel's timing
      self._json({"id": "x", "object": "chat.completion", "choices": [
          {"index": 0, "finish_reason": "stop",
           "message": {"role": "assistant", "content": '- "a fake photo of a {}."'}}],
          "usage": {"prompt_tokens": 10, "completion_tokens": 5}})

  if args.crash_on_post:
    # As a native crash: the signal's default action, whatever mask or handler this
    # process inherited (a fault raised by the CPU cannot be blocked either).
    sig = getattr(signal, args.crash_on_post)
    signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
  http.server.ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()


if __name__ == "__main__":
  main()
