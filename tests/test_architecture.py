"""The rooms' import rules (WORKSPACE.md): lower rooms never import higher ones."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "lmbbo_jax"
LOWER_ROOMS = ("models", "data", "evaluator", "search", "llm")
# Modules above every lower room: the toy world, the studies, CoOp, the wiring, the tools.
HIGHER = ("lmbbo_jax.toyworld", "lmbbo_jax.studies", "lmbbo_jax.coop", "lmbbo_jax.experiment",
          "lmbbo_jax.main", "lmbbo_jax.flags", "lmbbo_jax.report", "lmbbo_jax.bench",
          "lmbbo_jax.tracking", "lmbbo_jax.tools")


def imported_modules(path: pathlib.Path) -> set[str]:
  """Every module `path` imports: import statements (relative ones resolved) and
  string arguments of importlib.import_module / __import__."""
  tree = ast.parse(path.read_text(encoding="utf-8"))
  package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
      found.add(base)
      found.update(f"{base}.{alias.name}" for alias in node.names)
    elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
          and isinstance(node.args[0].value, str)
          and getattr(node.func, "attr", getattr(node.func, "id", "")) in
          ("import_module", "__import__")):
      found.add(node.args[0].value)
  return found


def test_the_walker_sees_every_kind_of_import(tmp_path):
  probe = PACKAGE / "data" / "_probe_for_test.py"
  probe.write_text("import a.b\nfrom c import d\nfrom . import e\nimport importlib\n"
                   "importlib.import_module('f.g')\n")
  try:
    assert {"a.b", "c.d", "lmbbo_jax.data.e", "f.g"} <= imported_modules(probe)
  finally:
    probe.unlink()


@pytest.mark.parametrize("room", LOWER_ROOMS)
def test_lower_rooms_import_neither_the_toy_world_nor_the_top(room):
  bad = {}
  for path in sorted((PACKAGE / room).rglob("*.py")):
    hits = sorted(m for m in imported_modules(path)
                  if any(m == h or m.startswith(h + ".") for h in HIGHER))
    if hits:
      bad[str(path.relative_to(PACKAGE))] = hits
  assert not bad, f"lower-room modules import higher rooms: {bad}"


def test_the_toy_world_is_reached_through_the_registries():
  from lmbbo_jax import extensions
  assert extensions.names("tokenizer") == ["toy"]
  assert extensions.names("checkpoint") == ["toyclip"]
  assert extensions.names("dataset") == ["toy:"]
  from lmbbo_jax.toyworld import checkpoint, tasks
  assert extensions.lookup("checkpoint", "toyclip")() == checkpoint.ASSETS_DIR
  assert extensions.lookup("dataset", "toy:") is tasks.build_toy_task
  assert extensions.lookup("dataset", "nope:") is None
  from lmbbo_jax.data import hand_templates
  from lmbbo_jax.toyworld.captions import GENERIC_TEMPLATES
  assert hand_templates("toy:pixel_clutter") == list(GENERIC_TEMPLATES)


def test_the_toy_world_knows_neither_the_search_nor_the_studies():
  """The toy world is data and a model: the studies use it, never the other way."""
  above = ("lmbbo_jax.search", "lmbbo_jax.llm", "lmbbo_jax.studies", "lmbbo_jax.experiment",
           "lmbbo_jax.report", "lmbbo_jax.flags", "lmbbo_jax.main")
  bad = {}
  for path in sorted((PACKAGE / "toyworld").rglob("*.py")):
    hits = sorted(m for m in imported_modules(path)
                  if any(m == h or m.startswith(h + ".") for h in above))
    if hits:
      bad[path.name] = hits
  assert not bad, bad
