"""Fuzzes the reply parser: no reply may crash it, slip an invalid template past it, or stall it.

  python -m lmbbo_jax.tools.fuzz_parser --replies=100000 --out=/tmp/fuzz_parser

Generates seeded replies (random text, random JSON, constructions aimed at regular-expression
backtracking: long runs of spaces, quotes, brackets, digits, `{}`, `*`, `|`, deeply nested
brackets, huge single lines, and mixes of real reply styles) and reads each with
`search.parsing.read_reply` + `validate`, in a worker process that is replaced when one
reply runs past `--timeout_s`. Checks that nothing raises, that every accepted template passes
`templates.invalid_reason` and can be written by the run log, and records the worst parse time
for replies up to 4 KB and up to 1 MB (goals: 10 ms and 200 ms). Writes `OUT/report.json`
and the worst inputs (`OUT/worst_4k.txt`, `OUT/worst_1m.txt`); exit status 1 when a check or
a goal fails. Times are of the parse itself: the garbage collector is paused while a reply
is timed, and a reply past half its goal is timed 3 times and the least taken (the parse is
deterministic; the rest is the machine's load).
"""

from __future__ import annotations

import gc
import json
import multiprocessing as mp
import pathlib
import random
import time

from absl import app, flags

FLAGS = flags.FLAGS

SMALL = 4 * 1024
LARGE = 1024 * 1024
GOAL_S = {SMALL: 0.010, LARGE: 0.200}

# Units whose long runs trip backtracking regular expressions.
_RUNS = [" ", "\t", '"', "'", "`", "“", "”", "«", "[", "]", "{", "}", "(", ")", "<", ">",
         "0", "1.", "{}", "{ }", "*", "**", "_", "|", " | ", "-", " - ", ": ", ". ", ".",
         ",", ";", "#", "&", "&amp;", "\\", "a", "a ", "A. ", "e.g. ", "%", "0.5%",
         "(score: ", "[acc=", "<think>", "</think>", "<|channel|>", "<a ", "<li>",
         "{class}", "[CLASS]", "<class>", "\u200b", "\u202e", "\ufeff", "\u00ad",
         "\ud800", "\udfff", "\x1b", "\r", "\n", "\n\n", "\u3000", "｛｝", "。", "1️⃣ ",
         "- [ ] ", "i. ", "'a'", '"a {}" ', "a {} ", "a {}. ", "Template: ", "\u0301"]
_STYLES = [
    'Here are four new templates:\n\n- "a detailed sketch of a {}."\n- "a line drawing of a {}."',
    "1. **A pixel art image of a {}**: captures the blocky look\n2. **A low resolution {}**",
    "<think>\nThe good ones avoid photo. Maybe 'a {} picture'?\n</think>\n\n- a picture of a {}.",
    '{"templates": ["a photo of a small {}.", "a picture of a {} (score: 0.85)"]}',
    "```json\n[\"an image of a {}\", \"a drawing of a {}\"]\n```",
    "['a photo of a {}.', 'a drawing of a {}.']",
    "| # | Template | Why |\n|---|---|---|\n| 1 | a sketch of a {} | outline |",
    "<ul><li>a photo of a {}</li><li>a &quot;rendering&quot; of a {}</li></ul>",
    "<|channel|>analysis<|message|>Think {}<|end|><|start|>assistant<|channel|>final"
    "<|message|>- a photo of a {}<|return|>",
    "[THINK]hmm {}[/THINK]\ni) a photo of a {}\nii) a sketch of a {}",
    "templates:\n  - \"a photo of a {}\"\n  - a sketch of a {}",
    '"a photo of a {}." "a picture of a {}." | a rendering of a {}; a doodle of a {}',
    "Voici trois modèles :\n1. une photo d'un {}.\n2. « un dessin d'un {} »",
    "以下是模板：\n1. 一张{}的照片。\n2. 一幅{}的素描。",
    "Step 1: a photo of a {} - 85%\nStep 2: a sketch of a {} [acc=0.9]\nWhy: the {} matters.",
]
_ALPHABET = (" \t\n abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123456789{}{}[]()<>\"'`*_|-:;.,#&%!?/\\"
             "“”‘’«»•→✅１｛｝é漢\u200b\u200e\u202e\ufeff\u00ad\ud800\udc00\x00\x1b")


def _random_json(rng: random.Random, depth: int = 0):
  kind = rng.randrange(7 if depth < 6 else 4)
  if kind == 0:
    return rng.choice(["a photo of a {}", "{}", "x {} (score: 0.9)", "", "\ud800 {}",
                       "1. a {} \u200b", "<b>a {}</b>", "a {0} {}", "Why: the {}"])
  if kind == 1:
    return "".join(rng.choice(_ALPHABET) for _ in range(rng.randrange(40)))
  if kind == 2:
    return rng.choice([None, True, 0, -1.5, 1e308])
  if kind == 3:
    return rng.randrange(10 ** 6)
  if kind in (4, 5):
    return [_random_json(rng, depth + 1) for _ in range(rng.randrange(6))]
  keys = ["templates", "prompts", "template", "why", "reasoning", "candidates", "x", "text"]
  return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randrange(5))}


def _size(rng: random.Random, big: bool) -> int:
  return rng.randrange(LARGE // 8, LARGE) if big else int(2 ** rng.uniform(0, 12))


def _adversarial(rng: random.Random, n: int) -> str:
  parts = []
  while sum(map(len, parts)) < n:
    unit = rng.choice(_RUNS)
    run = unit * max(1, rng.randrange(1, max(2, n // max(1, len(unit)) // rng.choice((1, 2, 4, 16)))))
    parts.append(run)
    if rng.random() < 0.5:
      parts.append(rng.choice(_RUNS + ["\n", " {} ", "x"]))
  text = "".join(parts)[:n]
  if rng.random() < 0.3:  # after a plausible head, so every branch of the parser sees it
    text = rng.choice(["- ", "1. ", '"', "Template: ", "<think>", "[", "{", "| "]) + text
  return text


def generate(seed: int, index: int) -> tuple[str, str]:
  """Reply number `index` of the seeded stream: (kind, text)."""
  rng = random.Random(seed * 1_000_003 + index)
  big = rng.random() < 0.005
  kind = rng.choice(["text", "json", "adversarial", "adversarial", "nested", "styles"])
  n = _size(rng, big)
  if kind == "text":
    text = "".join(rng.choice(_ALPHABET) for _ in range(min(n, 4096)))
    text = text * (n // max(1, len(text)))
  elif kind == "json":
    text = json.dumps(_random_json(rng), ensure_ascii=rng.random() < 0.5)
    if big:
      text = json.dumps({"templates": [text] * (n // max(1, len(text)))})
  elif kind == "adversarial":
    text = _adversarial(rng, n)
  elif kind == "nested":
    opener, closer = rng.choice([("[", "]"), ("{", "}"), ("(", ")"), ('["', '"]'),
                                 ("<b>", "</b>"), ("<think>", "</think>"), ("**", "**")])
    depth = n // (len(opener) + len(closer))
    text = opener * depth + rng.choice(["", "a {}", '"a {}"', "x"]) + closer * rng.randrange(depth + 1)
  else:
    pieces = [rng.choice(_STYLES) for _ in range(rng.randrange(1, 6))]
    for _ in range(rng.randrange(4)):  # a splice of junk somewhere
      i = rng.randrange(len(pieces))
      pieces[i] = _adversarial(rng, rng.randrange(1, 200)).join(
          pieces[i].split(rng.choice([" ", "\n", "{}", '"']), 1))
    text = rng.choice(["\n", "\n\n", " ", ""]).join(pieces)
    if big:
      text = text * (n // max(1, len(text)))
  return kind, text


def check(reply: str) -> tuple[float, str | None]:
  """Seconds to read and validate `reply`, and what was wrong (None: nothing)."""
  import orjson
  from lmbbo_jax import templates as tpl
  from lmbbo_jax.search import parsing
  gc.disable()  # a collection of what earlier replies left is not this parse's cost
  start = time.perf_counter()
  try:
    reading = parsing.read_reply(reply)
    result = parsing.validate(reading.candidates, seen=set())
  except Exception as e:  # what the fuzzer looks for
    return time.perf_counter() - start, f"raised {type(e).__name__}: {e}"
  finally:
    seconds = time.perf_counter() - start
    gc.enable()
  for text, reason in reading.rejections + result.rejections:
    if reason.startswith(parsing.INTERNAL_ERROR):
      return seconds, f"internal error: {reason}"
    try:
      orjson.dumps([text, reason])
    except orjson.JSONEncodeError:
      return seconds, f"rejection the run log cannot write: {text!r}"
  for t in result.valid:
    problem = tpl.invalid_reason(t)
    if problem is None and t != tpl.canonical(t):
      problem = "not canonical (NFC, no invisible characters)"
    if problem is None and "\n" in t:
      problem = "a line break"
    if problem:
      return seconds, f"accepted template {t!r}: {problem}"
  return seconds, None


def _worker(seed: int, start: int, stop: int, conn) -> None:
  for i in range(start, stop):
    if i % 500 == 0:
      gc.collect()
    kind, reply = generate(seed, i)
    seconds, problem = check(reply)
    if seconds > GOAL_S[SMALL if len(reply) <= SMALL else LARGE] / 2:
      # The parse is deterministic: the least of 3 runs is its cost, not the machine's load.
      seconds = min([seconds] + [check(reply)[0] for _ in range(2)])
    conn.send((i, kind, len(reply), seconds, problem))
  conn.send(None)


def fuzz(replies: int, seed: int, timeout_s: float, out: pathlib.Path,
         progress_every: int = 5000) -> dict:
  """Runs the fuzz; returns the report (also written to `out/report.json`)."""
  out.mkdir(parents=True, exist_ok=True)
  ctx = mp.get_context("spawn")
  worst = {SMALL: (0.0, -1, ""), LARGE: (0.0, -1, "")}
  problems, timeouts, by_kind = [], [], {}
  done, next_index, began = 0, 0, time.perf_counter()
  while next_index < replies:
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_worker, args=(seed, next_index, replies, sender), daemon=True)
    proc.start()
    sender.close()
    while True:
      if not receiver.poll(timeout_s + 30.0 if done == 0 else timeout_s):
        timeouts.append(next_index)  # stalled on this reply: a new worker goes on after it
        proc.kill()
        proc.join()
        next_index += 1
        done += 1
        break
      try:
        msg = receiver.recv()
      except EOFError:  # the worker died (e.g. killed for memory): count it as a problem
        problems.append({"index": next_index, "problem": "worker died"})
        next_index += 1
        done += 1
        break
      if msg is None:
        next_index = replies
        break
      i, kind, size, seconds, problem = msg
      next_index, done = i + 1, done + 1
      stats = by_kind.setdefault(kind, {"replies": 0, "worst_s": 0.0})
      stats["replies"] += 1
      stats["worst_s"] = max(stats["worst_s"], round(seconds, 6))
      for limit in (SMALL, LARGE):
        if size <= limit and seconds > worst[limit][0]:
          worst[limit] = (seconds, i, kind)
      if problem:
        problems.append({"index": i, "kind": kind, "problem": problem[:500]})
      if done % progress_every == 0:
        print(f"{done}/{replies} replies, {time.perf_counter() - began:.0f} s: worst "
              f"{worst[SMALL][0] * 1e3:.2f} ms (<= 4 KB), {worst[LARGE][0] * 1e3:.1f} ms "
              f"(<= 1 MB), {len(problems)} problems, {len(timeouts)} timeouts", flush=True)
    proc.join()
  report = {"replies": replies, "seed": seed, "timeout_s": timeout_s,
            "seconds": round(time.perf_counter() - began, 1), "problems": problems[:100],
            "problem_count": len(problems), "timeouts": timeouts, "by_kind": by_kind}
  for limit, name in ((SMALL, "4k"), (LARGE, "1m")):
    seconds, index, kind = worst[limit]
    entry = {"worst_s": round(seconds, 6), "goal_s": GOAL_S[limit], "index": index, "kind": kind}
    if index >= 0:
      reply = generate(seed, index)[1]
      path = out / f"worst_{name}.txt"
      path.write_bytes(reply.encode("utf-8", "surrogatepass"))
      entry.update(size=len(reply), file=str(path), head=reply[:200])
    report[f"worst_{name}"] = entry
  for index in timeouts[:5]:
    (out / f"timeout_{index}.txt").write_bytes(
        generate(seed, index)[1].encode("utf-8", "surrogatepass"))
  report["passed"] = (not problems and not timeouts and all(
      report[f"worst_{n}"]["worst_s"] <= GOAL_S[limit]
      for limit, n in ((SMALL, "4k"), (LARGE, "1m"))))
  (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=True))
  return report


def define_flags() -> None:
  """The command line's flags (defined when run, so that importing this module defines none)."""
  flags.DEFINE_integer("replies", 100_000, "replies to generate and parse")
  flags.DEFINE_integer("seed", 0, "seed of the generated replies")
  flags.DEFINE_float("timeout_s", 10.0, "a reply parsed longer than this counts as a stall")
  flags.DEFINE_string("out", "/tmp/fuzz_parser", "folder for report.json and the worst inputs")


def main(argv):
  del argv
  report = fuzz(FLAGS.replies, FLAGS.seed, FLAGS.timeout_s, pathlib.Path(FLAGS.out))
  summary = {k: report[k] for k in ("replies", "seconds", "problem_count", "timeouts", "passed")}
  print(json.dumps({**summary, "worst_4k": report["worst_4k"]["worst_s"],
                    "worst_1m": report["worst_1m"]["worst_s"]}))
  print(f"report: {pathlib.Path(FLAGS.out) / 'report.json'}")
  return 0 if report["passed"] else 1


if __name__ == "__main__":
  define_flags()
  app.run(main)
