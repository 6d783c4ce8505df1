"""What a run is: the configuration dataclasses, JAX-free, the one source of defaults.

`ExperimentConfig` holds one experiment (data, model, method, outputs) and nests the
rooms' own configs (`SearchConfig`, `LLMConfig`) and `CoOpConfig`. Every field's help is
the line under `Attributes:` in its class docstring: `flags.py` generates one command-line
flag per field from it, so an option is defined once. `RuntimeConfig` holds what belongs
to the process rather than the experiment (several hosts, the compilation cache).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lmbbo_jax import tracking
from lmbbo_jax.llm.client import LLMConfig
from lmbbo_jax.search.optimizer import SearchConfig
from lmbbo_jax.search.state import SearchError

# What a run does: the black-box search (with `proposer`), CoOp's white-box
# prompt learning on the same cached features (lmbbo_jax/coop.py), or class descriptions
# (lmbbo_jax/descriptions.py): written by the LLM (cupl, dclip), random (waffle), or the
# chosen template of another method of the comparison filled with DCLIP's descriptors.
DESCRIPTION_METHODS = ("cupl", "dclip", "waffle", "ours_pn+descriptions")
DESCRIPTION_LLM_METHODS = ("cupl", "dclip")  # the ones that call the LLM
METHODS = ("search", "coop", *DESCRIPTION_METHODS)
PROPOSERS = ("auto", "llm", "ape", "iterative_ape", "edit", "replay")
# Baselines a run can score beside the search. hand_best is picked by the selection split;
# hand_oracle by test accuracy, as the paper's hand-engineered row was (an oracle:
# reported, never used by the search). dataset_*: the templates a source ships
# (CLIP_benchmark's zeroshot_classification_templates.txt), when it has them.
BASELINES = ("empty", "photo", "hand_best", "hand_oracle", "hand_ensemble", "pool_best",
             "dataset_best", "dataset_ensemble")
DTYPES = ("float32", "bfloat16")

# The paper's comparison (Table 1 and its ablations): each named method is the run's
# config with these changes, run into <workdir>/<name> on the same tasks, model, cached
# image features and call budget (`experiment.run_comparison`).
COMPARISON: dict[str, dict[str, Any]] = {
    "llm_no_feedback": {"proposer": "llm", "search": {"feedback": "none"}},
    "ape": {"proposer": "ape"},
    "iterative_ape": {"proposer": "iterative_ape"},
    "ours_p": {"proposer": "llm", "search": {"feedback": "pos"}},
    "ours_n": {"proposer": "llm", "search": {"feedback": "neg"}},
    "ours_pn": {"proposer": "llm", "search": {"feedback": "pos_neg"}},
    "cupl": {"method": "cupl"},
    "dclip": {"method": "dclip"},
    "waffle": {"method": "waffle"},
    "ours_pn+descriptions": {"method": "ours_pn+descriptions"},
    # Beyond the paper, at the same calls as ours_pn: confusion feedback (the class pairs
    # the best templates confuse on train, from predictions alone); P+N with a merge of two
    # per-class Pareto front members every 3rd call; 12 candidates per call kept by
    # successive halving over train then val.
    "ours_confusion": {"proposer": "llm", "search": {"feedback": "confusion"}},
    "ours_pareto": {"proposer": "llm", "search": {"feedback": "pos_neg", "merge_every": 3}},
    "ours_many": {"proposer": "llm", "search": {"feedback": "pos_neg", "m_new": 12,
                                                "m_ask": 12, "selection": "halving"}},
    "coop": {"method": "coop"},
}


class ExperimentError(RuntimeError):
  """A user-facing failure: one line that says what is wrong and what to do."""


class ConfigError(ExperimentError):
  """A bad configuration value; `field` names it (a flag on the command line)."""

  def __init__(self, field: str, message: str):
    super().__init__(f"{field}: {message}")
    self.field = field
    self.message = message


@dataclasses.dataclass(frozen=True)
class CoOpConfig:
  """CoOp's hyper-parameters (defaults: CoOp's, see lmbbo_jax/coop.py).

  Attributes:
    n_ctx: CoOp: learned context tokens.
    epochs: CoOp: training epochs; 0 = CoOp's for the shots (1: 50, 2-4: 100, 8-16: 200).
    lr: CoOp: peak SGD learning rate of the cosine schedule.
    momentum: CoOp: SGD momentum.
    weight_decay: CoOp: SGD weight decay.
    warmup_epochs: CoOp: constant warm-up epochs before the cosine.
    warmup_lr: CoOp: learning rate of the warm-up.
    batch_size: CoOp: images per step.
    init_std: CoOp: standard deviation of the context's initialisation.
  """

  n_ctx: int = 16
  epochs: int = 0
  lr: float = 0.002
  momentum: float = 0.9
  weight_decay: float = 5e-4
  warmup_epochs: int = 1
  warmup_lr: float = 1e-5
  batch_size: int = 32
  init_std: float = 0.02


@dataclasses.dataclass(frozen=True)
class DescriptionsConfig:
  """The class-description methods' settings (lmbbo_jax/descriptions.py).

  Attributes:
    per_question: cupl: sentences asked per class and question (CuPL samples 10).
    classes_per_call: cupl, dclip: classes in one LLM request, at least (0: as few as the
      call budget, n_restart x n_reset x n_iter per seed, allows).
    max_tokens: cupl, dclip: reply tokens per request (one request answers for several
      classes).
    waffle_count: waffle: pairs of a random-word and a random-character descriptor
      (WaffleCLIP's default 15).
    template_from: ours_pn+descriptions: the comparison's method whose chosen template per
      seed is filled with the descriptors (run before it in --methods).
    descriptors_from: ours_pn+descriptions: the comparison's method whose LLM-written
      descriptors it uses (dclip; run before it in --methods).
  """

  per_question: int = 10
  classes_per_call: int = 0
  max_tokens: int = 1024
  waffle_count: int = 15
  template_from: str = "ours_pn"
  descriptors_from: str = "dclip"


@dataclasses.dataclass
class ExperimentConfig:
  """One experiment: its data, model, method and outputs (`run_experiment`).

  Attributes:
    dataset: Task: a dataset name (caltech101, imagenet, ...: TFDS), coop:/path/to/DATA/<Dir>
      (CoOp layout), folder:/path (one subfolder per class) or toy:<task> (offline toy world).
    workdir: Output directory (created).
    shots: Training images per class (paper: 1; CoOp: 1, 2, 4, 8, 16).
    seeds: Few-shot seeds; each seed is one full run, results are aggregated.
    data_dir: TFDS data_dir (prepared datasets); default: TFDS's own default.
    max_test_per_class: Cap the test split per class (quick runs); unset = full split.
    model: CLIP: RN50, RN101, ViT-B/32, ViT-B/16, ViT-L/14, a hub id, a local checkpoint
      directory/file, toyclip (offline toy model) or random:<arch>.
    dtype: Compute dtype of the towers, float32 or bfloat16 (parameters stay float32).
    model_cache_dir: Where converted checkpoints are cached (default ~/.cache/lmbbo_jax).
    image_batch_size: Images per device call when encoding the few-shot images.
    feature_cache_dir: Image-feature cache (default: <workdir>/feature_cache, which
      --overwrite deletes; a comparison shares <workdir>/feature_cache among its methods).
    method: search: the black-box search with --proposer; coop: CoOp's learned context
      (white box, trained on the same cached image features; --coop_*).
    coop: CoOp's settings.
    descriptions: the class-description methods' settings.
    proposer: Who proposes templates: llm (the paper's method; --llm=local or
      --llm_base_url), ape (APE: the best of LLM-written templates, no feedback),
      iterative_ape (APE, then variations of the top templates, no scores), edit (offline
      GrIPS-style edits), replay (re-run --replay_transcript); auto = llm when an LLM is
      configured, else edit.
    search: the search's settings.
    search_seed: Seed of pool sampling and edit proposals.
    init_pool: Initial template corpus: builtin, a template file (one per line, with {}) or
      a caption file (one caption per line, e.g. LAION-COCO) turned into templates by
      replacing a class word with {}.
    replay_transcript: transcript.jsonl to replay with --proposer=replay.
    llm: the LLM endpoint's settings.
    baselines: Baselines scored in the same run: empty ({}), photo (a photo of a {}.),
      hand_best (CLIP's hand-engineered templates, picked by the selection split),
      hand_oracle (the same, picked by test accuracy), hand_ensemble (their ensemble),
      pool_best (initial pool's best), dataset_best and dataset_ensemble (the templates the
      dataset ships, e.g. CLIP_benchmark's, picked by the selection split or ensembled:
      CLIP_benchmark's own protocol).
    transfer_to: Other CLIPs (as --model takes them, e.g. RN101,ViT-B/32) on which each
      seed's chosen template and the baselines are scored as chosen, without re-selecting.
    compare: Run the paper's comparison instead of one run: each named method into
      <workdir>/<name> with this run's other settings, then comparison.md, comparison.csv
      and efficiency.png in --workdir (also --methods).
    tracking: Where metrics go besides the files: tensorboard (event files under
      <workdir>/tracking), wandb, mlflow (when installed); none for files only.
    resume: Continue the run in --workdir (killed or finished).
    overwrite: Replace a finished run in --workdir.
    dry_run: Print the estimated LLM calls and cost, then exit.
    profile_dir: Write a jax.profiler trace of scoring here.
    progress: Show progress bars.
  """

  dataset: str
  workdir: str
  shots: int = 1
  seeds: tuple[int, ...] = (1, 2, 3)
  data_dir: str | None = None
  max_test_per_class: int | None = None
  model: str = "RN50"
  dtype: str = "float32"
  model_cache_dir: str | None = None
  image_batch_size: int = 64
  feature_cache_dir: str | None = None
  method: str = "search"
  coop: CoOpConfig = dataclasses.field(default_factory=CoOpConfig)
  descriptions: DescriptionsConfig = dataclasses.field(default_factory=DescriptionsConfig)
  proposer: str = "auto"
  search: SearchConfig = dataclasses.field(default_factory=SearchConfig)
  search_seed: int = 0
  init_pool: str = "builtin"
  replay_transcript: str | None = None
  llm: LLMConfig = dataclasses.field(default_factory=LLMConfig)
  baselines: tuple[str, ...] = BASELINES
  transfer_to: tuple[str, ...] = ()
  compare: tuple[str, ...] = ()
  tracking: tuple[str, ...] = ("tensorboard",)
  resume: bool = False
  overwrite: bool = False
  dry_run: bool = False
  profile_dir: str | None = None
  progress: bool = True

  @property
  def proposer_kind(self) -> str:
    if self.method != "search":
      return self.method
    if self.proposer != "auto":
      return self.proposer
    return "llm" if (self.llm.base_url or self.llm.local) else "edit"

  def validate(self) -> None:
    """Raises `ConfigError` naming the field, with a one-line fix, for any bad value."""
    if not self.dataset:
      raise ConfigError("dataset", "give a dataset, e.g. toy:mix or caltech101")
    if not self.workdir:
      raise ConfigError("workdir", "give an output directory")
    if self.shots < 1:
      raise ConfigError("shots", "must be a positive integer (paper: 1; CoOp: 1, 2, 4, 8, 16)")
    if not self.seeds:
      raise ConfigError("seeds", "give at least one seed, e.g. 1,2,3")
    if self.image_batch_size < 1:
      raise ConfigError("image_batch_size", "must be >= 1")
    for name, value, choices in (("method", (self.method,), METHODS),
                                 ("proposer", (self.proposer,), PROPOSERS),
                                 ("dtype", (self.dtype,), DTYPES),
                                 ("baselines", self.baselines, BASELINES),
                                 ("compare", self.compare, COMPARISON)):
      unknown = [v for v in value if v not in choices]
      if unknown:
        raise ConfigError(name, f"unknown {', '.join(map(repr, unknown))}; use "
                          f"{'some' if len(value) != 1 else 'one'} of {', '.join(choices)}")
    try:
      tracking.parse_kinds(self.tracking)
    except tracking.TrackingError as e:
      raise ConfigError("tracking", str(e).split(": ", 1)[-1]) from None
    d = self.descriptions
    for name in ("per_question", "max_tokens", "waffle_count"):
      if getattr(d, name) < 1:
        raise ConfigError(f"descriptions_{name}", "must be >= 1")
    if d.classes_per_call < 0:
      raise ConfigError("descriptions_classes_per_call", "must be >= 0 (0: from the budget)")
    if "ours_pn+descriptions" in self.compare:
      at = self.compare.index("ours_pn+descriptions")
      for field, needed in (("template_from", d.template_from),
                            ("descriptors_from", d.descriptors_from)):
        if needed not in self.compare[:at]:
          raise ConfigError("compare", f"ours_pn+descriptions reads the run of {needed!r} "
                            f"(--descriptions_{field}): list {needed} before it in --methods")
    for name in ("n_ctx", "batch_size"):
      if getattr(self.coop, name) < 1:
        raise ConfigError(f"coop_{name}", "must be >= 1")
    if self.coop.epochs < 0:
      raise ConfigError("coop_epochs", "must be >= 0")
    for name in ("max_concurrency", "n_ctx", "rpm", "tpm"):
      value = getattr(self.llm, name)
      if value is not None and value < 1:
        raise ConfigError(f"llm_{name}", "must be >= 1" + (
            " (or unset for no limit)" if name in ("rpm", "tpm") else ""))
    if self.llm.max_retries < 0:
      raise ConfigError("llm_max_retries", "must be >= 0")
    if self.llm.local_threads < 0:
      raise ConfigError("llm_local_threads", "must be >= 0 (0: all cores)")
    try:
      self.search.validate()
    except SearchError as e:  # Its messages start with the field's name.
      field = str(e).split(" ", 1)[0].split("=", 1)[0]
      raise ConfigError(field, str(e)) from None

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d["proposer_kind"] = self.proposer_kind
    for name in ("seeds", "baselines", "transfer_to", "compare", "tracking"):
      d[name] = list(d[name])
    d["select_by"] = self.search.select_by
    return d


@dataclasses.dataclass
class RuntimeConfig:
  """The process, not the experiment: the compilation cache and several hosts.

  Attributes:
    jax_cache_dir: Persistent JAX compilation cache (a rerun skips recompiling); empty to
      disable.
    distributed: Run as one process of several (jax.distributed): one mesh over every
      process's devices, each encodes its share of the images, process 0 runs the search,
      the LLM calls and the outputs. Start the same command on every host (README:
      'Several hosts').
    coordinator_address: host:port of process 0 (unset: read from the cluster).
    num_processes: Processes in the job (unset: read from the cluster).
    process_id: This process's index (unset: read from the cluster).
    distributed_heartbeat_s: A process that sends no heartbeat for this long is taken for
      dead and the others stop.
  """

  jax_cache_dir: str = "~/.cache/lmbbo_jax/jax"
  distributed: bool = False
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  distributed_heartbeat_s: int = 100


def comparison_config(cfg: ExperimentConfig, name: str) -> ExperimentConfig:
  """The config of method `name` of the comparison (see `COMPARISON`)."""
  if name not in COMPARISON:
    raise ConfigError("compare", f"unknown method {name!r}; use some of {','.join(COMPARISON)}")
  change = dict(COMPARISON[name])
  search = dataclasses.replace(cfg.search, **change.pop("search", {}))
  workdir = cfg.workdir.rstrip("/")
  return dataclasses.replace(
      cfg, workdir=f"{workdir}/{name}", search=search, compare=(),
      feature_cache_dir=cfg.feature_cache_dir or f"{workdir}/feature_cache", **change)
