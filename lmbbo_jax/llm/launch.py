"""Runs a command that must not outlive the process that started it.

  python -m lmbbo_jax.llm.launch PARENT_PID -- COMMAND [ARGS...]

On Linux the kernel does the work: `prctl(PR_SET_PDEATHSIG, SIGKILL)` is set
and the command is exec'd in place, so it is killed the moment its parent dies,
even by SIGKILL (no Python code of the parent runs then). Elsewhere this
process stays as a supervisor: it runs the command in its own process group
(the one its starter made) and kills it when the parent is gone (polled twice
a second) or when it is itself asked to stop (also used on Linux when LMBBO_LAUNCH_SUPERVISE=1 is set,
so that this path is tested everywhere).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import time

_PR_SET_PDEATHSIG = 1


def _set_parent_death_signal() -> bool:
  """True when the kernel will SIGKILL this process as its parent dies."""
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6",
                       use_errno=True)
    return libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
  except (OSError, AttributeError):
    return False


def _supervise(parent_pid: int, command: list[str]) -> int:
  """Runs `command` in this process's group until the parent is gone.

  The command stays in the supervisor's process group (the one its starter
  made), so a `killpg` of that group reaches both; the handlers are installed
  before the command starts, so a stop request can never leave it behind.
  """
  child: subprocess.Popen | None = None

  def stop(*_):
    if child is not None and child.poll() is None:
      child.kill()
    sys.exit(0)

  signal.signal(signal.SIGTERM, stop)
  signal.signal(signal.SIGINT, stop)
  child = subprocess.Popen(command)
  while child.poll() is None:
    if os.getppid() != parent_pid:
      child.kill()
      break
    time.sleep(0.5)
  return child.wait()


def main(argv: list[str]) -> int:
  if len(argv) < 3 or argv[1] != "--":
    print("usage: python -m lmbbo_jax.llm.launch PARENT_PID -- COMMAND ...",
          file=sys.stderr)
    return 2
  parent_pid, command = int(argv[0]), argv[2:]
  if not os.environ.get("LMBBO_LAUNCH_SUPERVISE") and _set_parent_death_signal():
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
      return 1
    os.execvp(command[0], command)
  return _supervise(parent_pid, command)


if __name__ == "__main__":
  raise SystemExit(main(sys.argv[1:]))
