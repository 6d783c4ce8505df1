"""Run tracking backends: TensorBoard by default, Weights & Biases and MLflow on request.

`open_writer(kinds, logdir, run_name, config)` opens one `MetricWriter` (the
interface, and what a search writes, are in `search/tracking.py`) over the
backends named in `--tracking`:

* `tensorboard` (default): event files in `logdir` through `tensorboardX`
  (`tensorboard --logdir <logdir>`).
* `wandb`: a Weights & Biases run (files under `<logdir>/wandb`; the project
  from `WANDB_PROJECT`, else "lmbbo_jax"; `WANDB_MODE=offline` works offline).
  Each tag family (`seed_0/chain_1/...`) is plotted against its own step.
* `mlflow`: an MLflow run (tracking URI from `MLFLOW_TRACKING_URI`, else
  MLflow's default backend, SQLite, in `<logdir>/mlflow.db`; experiment from
  `MLFLOW_EXPERIMENT_NAME`, else "lmbbo_jax").
* `none`: nothing.

wandb and mlflow are never required: asking for one that is not installed is
a one-line error naming the pip package. Writers never receive secrets: config
and summary keys that name a key, token, secret or password are dropped, and
credentials in URLs are removed.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import re
import time
from typing import Any, Mapping, Sequence

from lmbbo_jax.llm.cache import redact_url
from lmbbo_jax.search.tracking import MetricWriter, MultiWriter, NullWriter

KINDS = ("tensorboard", "wandb", "mlflow", "none")
# Each backend's module, which is also its pip package's name.
PACKAGES = {"tensorboard": "tensorboardX", "wandb": "wandb", "mlflow": "mlflow"}
_SECRET_WORDS = {"key", "apikey", "token", "secret", "password", "passwd", "credential",
                 "credentials"}


class TrackingError(ValueError):
  """A tracking backend that cannot be opened (one-line message says what to do)."""


def is_secret_key(name: str) -> bool:
  """Whether a config key names a secret (`api_key`, `hf_token`, `client_secret`, ...)."""
  return any(w in _SECRET_WORDS for w in re.split(r"[^a-z]+", name.lower()))


def public_flat(config: Mapping[str, Any], sep: str = ".") -> dict[str, Any]:
  """`config` flattened (`llm.model`), without secret-named keys; URLs without credentials."""
  out: dict[str, Any] = {}

  def walk(prefix: str, value: Any) -> None:
    if isinstance(value, Mapping):
      for k, v in value.items():
        if not is_secret_key(str(k)):
          walk(f"{prefix}{sep}{k}" if prefix else str(k), v)
    elif isinstance(value, str) and "://" in value:
      out[prefix] = redact_url(value)
    else:
      out[prefix] = value

  walk("", config)
  return out


def _plain(value: Any) -> bool | int | float | str:
  """A value every backend takes: numbers, booleans and strings as they are, others as JSON."""
  if isinstance(value, (bool, int, float, str)):
    return value
  return json.dumps(value, sort_keys=True, default=str)


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


class TensorBoardWriter:
  """Event files in `logdir`: scalars as scalars, the config and summary as text,
  the summary's numbers as `final/...` scalars."""

  def __init__(self, logdir: str | os.PathLike):
    from tensorboardX import SummaryWriter
    self._writer = SummaryWriter(os.fspath(logdir))

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    for tag, value in scalars.items():
      self._writer.add_scalar(tag, float(value), global_step=step)

  def write_hparams(self, config: Mapping[str, Any]) -> None:
    self._writer.add_text("config", _markdown_table(public_flat(config)), global_step=0)

  def write_summary(self, final: Mapping[str, Any]) -> None:
    flat = public_flat(final, sep="/")
    for key, value in flat.items():
      if _is_number(value):
        self._writer.add_scalar(f"final/{key}", float(value), global_step=0)
    self._writer.add_text("summary", _markdown_table(flat), global_step=0)

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def _markdown_table(flat: Mapping[str, Any]) -> str:
  def cell(v: Any) -> str:
    return str(_plain(v)).replace("|", "\\|").replace("\n", " ")
  rows = [f"| {cell(k)} | {cell(v)} |" for k, v in sorted(flat.items())]
  return "\n".join(["| key | value |", "|---|---|", *rows])


class WandbWriter:
  """A Weights & Biases run (`.run`, for more logging); each tag family has its
  own step metric."""

  def __init__(self, logdir: str | os.PathLike, run_name: str):
    import wandb
    os.makedirs(logdir, exist_ok=True)
    self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "lmbbo_jax",
                           name=run_name, dir=os.fspath(logdir))
    self._families: set[str] = set()

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    # wandb's own step must only grow, but chains and seeds count calls apart:
    # each family ("seed_0/chain_1") is plotted against its own "<family>/step".
    by_family: dict[str, dict[str, float]] = {}
    for tag, value in scalars.items():
      family = tag.rpartition("/")[0] or "run"
      by_family.setdefault(family, {})[tag] = float(value)
    for family, values in by_family.items():
      if family not in self._families:
        self.run.define_metric(f"{family}/step")
        self.run.define_metric(f"{family}/*", step_metric=f"{family}/step")
        self._families.add(family)
      self.run.log({**values, f"{family}/step": step})

  def write_hparams(self, config: Mapping[str, Any]) -> None:
    self.run.config.update({k: _plain(v) for k, v in public_flat(config).items()},
                            allow_val_change=True)

  def write_summary(self, final: Mapping[str, Any]) -> None:
    self.run.summary.update({f"final/{k}": _plain(v)
                              for k, v in public_flat(final, sep="/").items()})

  def flush(self) -> None:
    pass  # wandb sends (or, offline, writes) in its own process

  def close(self) -> None:
    self.run.finish()


class MLflowWriter:
  """An MLflow run (`.run_id`), through the tracking client (no global active run)."""

  def __init__(self, logdir: str | os.PathLike, run_name: str):
    from mlflow.tracking import MlflowClient
    os.makedirs(logdir, exist_ok=True)
    uri = (os.environ.get("MLFLOW_TRACKING_URI")
           or f"sqlite:///{pathlib.Path(logdir, 'mlflow.db').resolve()}")
    self._client = MlflowClient(tracking_uri=uri)
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "lmbbo_jax"
    experiment = self._client.get_experiment_by_name(name)
    experiment_id = (experiment.experiment_id if experiment is not None
                     else self._client.create_experiment(name))
    self.run_id = self._client.create_run(experiment_id, run_name=run_name).info.run_id

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    from mlflow.entities import Metric
    now = int(time.time() * 1000)
    self._client.log_batch(self.run_id, metrics=[
        Metric(tag, float(value), now, step) for tag, value in scalars.items()])

  def write_hparams(self, config: Mapping[str, Any]) -> None:
    from mlflow.entities import Param
    params = [Param(k, str(_plain(v))[:6000]) for k, v in public_flat(config).items()]
    for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
      self._client.log_batch(self.run_id, params=params[i:i + 100])

  def write_summary(self, final: Mapping[str, Any]) -> None:
    flat = public_flat(final, sep="/")
    self.write_scalars(0, {f"final/{k}": v for k, v in flat.items() if _is_number(v)})
    for k, v in flat.items():
      if not _is_number(v):
        self._client.set_tag(self.run_id, f"final/{k}", str(_plain(v))[:5000])

  def flush(self) -> None:
    pass  # every call above is already stored

  def close(self) -> None:
    self._client.set_terminated(self.run_id)


def parse_kinds(spec: str | Sequence[str]) -> list[str]:
  """`"tensorboard,wandb"` (or a list) as a checked list of backend names."""
  kinds = [k.strip() for k in (spec.split(",") if isinstance(spec, str) else spec)
           if k.strip()]
  bad = [k for k in kinds if k not in KINDS]
  if bad:
    raise TrackingError(f"--tracking={','.join(kinds)}: {', '.join(bad)} is not a backend; "
                        f"use a comma-separated list of {', '.join(KINDS[:-1])}, or none.")
  if "none" in kinds and len(kinds) > 1:
    raise TrackingError(f"--tracking={','.join(kinds)}: none turns tracking off; "
                        "drop it or the other backends.")
  return kinds


def _require(kind: str) -> None:
  package = PACKAGES[kind]
  try:
    importlib.import_module(package)
  except ImportError as e:
    why = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise TrackingError(f"--tracking={kind} needs the {package} package ({why}): "
                        f"pip install {package}, or drop {kind} from --tracking.") from None


def open_writer(kinds: str | Sequence[str], logdir: str | os.PathLike, run_name: str,
                config: Mapping[str, Any]) -> MetricWriter:
  """One writer over the backends `kinds`, with `config` written as the run's hparams.

  Raises:
    TrackingError: an unknown backend, or a requested one that is not installed
      (checked for all before any is opened).
  """
  kinds = [k for k in parse_kinds(kinds) if k != "none"]
  for kind in kinds:
    _require(kind)
  if not kinds:
    return NullWriter()
  writers: list[MetricWriter] = []
  try:
    for kind in kinds:
      if kind == "tensorboard":
        writers.append(TensorBoardWriter(logdir))
      elif kind == "wandb":
        writers.append(WandbWriter(logdir, run_name))
      else:
        writers.append(MLflowWriter(logdir, run_name))
    writer = writers[0] if len(writers) == 1 else MultiWriter(writers)
    writer.write_hparams(config)
  except BaseException:
    MultiWriter(writers).close()
    raise
  return writer
