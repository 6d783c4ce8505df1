"""Runs a command that must not outlive the process that started it.

  python -m lmbbo_jax.llm.launch PARENT_PID -- COMMAND [ARGS...]

On Linux the kernel does the work: `prctl(PR_SET_PDEATHSIG, SIGKILL)` is set
and the command is exec'd in place, so it is killed the moment its parent dies,
even by SIGKILL (no Python code of the parent runs then). Elsewhere this
process stays as a supervisor: it runs the command in its own process group and
kills that group when the parent is gone (polled twice a second) or when it is
itself asked to stop.
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
  child = subprocess.Popen(command, start_new_session=True)

  def stop(*_):
    _kill_group(child.pid)
    sys.exit(0)

  signal.signal(signal.SIGTERM, stop)
  signal.signal(signal.SIGINT, stop)
  while child.poll() is None:
    if os.getppid() != parent_pid:
      _kill_group(child.pid)
      break
    time.sleep(0.5)
  return child.wait()


def _kill_group(pid: int) -> None:
  try:
    os.killpg(pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass


def main(argv: list[str]) -> int:
  if len(argv) < 3 or argv[1] != "--":
    print("usage: python -m lmbbo_jax.llm.launch PARENT_PID -- COMMAND ...",
          file=sys.stderr)
    return 2
  parent_pid, command = int(argv[0]), argv[2:]
  if _set_parent_death_signal():
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
      return 1
    os.execvp(command[0], command)
  return _supervise(parent_pid, command)


if __name__ == "__main__":
  raise SystemExit(main(sys.argv[1:]))
