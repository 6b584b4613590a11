"""Run configuration: pydantic models, YAML in, validated, every field documented.

Configs never hold secrets: an API key is named by the environment variable that holds it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stillroom.errors import ConfigError

NOT_IDENTITY = {"identity": False}
"""`json_schema_extra` of a field that never defines a run's work (caps, timeouts, concurrency, retries, the key
variable's name, prices, throughput knobs): changing it resumes the same run folder. `stillroom.runs.identity_of`
is the one function that reads it."""
EVALUATION_ONLY = {"identity": "evaluation"}
"""`json_schema_extra` of a field that shapes only the evaluation: part of the run's identity, but a finished
build (a trained student, a rulebook) is reused when it changes (`identity_of(cfg, leave_out=("evaluation",))`)."""

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_SECRET_PREFIX = re.compile(r"(?i)^(sk|rk|pk|key|api|ghp|gho|hf|xox[abp]?|AKIA|AIza)[_-]?")


def check_key_env_name(name: str) -> str:
    """`name` if it can be an environment variable's name and does not look like a key; else ValueError.

    The message never repeats the value: a key pasted where its variable's name belongs must not reach a
    terminal, a log or config.yaml.
    """
    looks_secret = (
        not _ENV_NAME.fullmatch(name or "")
        or (_SECRET_PREFIX.match(name) is not None and any(c.islower() for c in name) and any(c.isdigit() for c in name)
            and len(name) >= 16)
        or (len(name) >= 24 and any(c.islower() for c in name) and any(c.isdigit() for c in name) and "_" not in name)
    )
    if looks_secret:
        raise ValueError(
            "expected the NAME of the environment variable that holds the API key (e.g. OPENAI_API_KEY), but "
            "the value given looks like a key itself or is not a variable name; it was not stored or shown. "
            "Export the key in a variable and pass that variable's name."
        )
    return name


class BackendConfig(BaseModel):
    """Which model to run and how to reach it."""

    model_config = ConfigDict(extra="forbid")

    spec: str = Field(
        "gemma3-270m",
        description=(
            "Model spec: 'gemma3-270m' (the embedded default), 'qwen2.5-coder-0.5b' (the embedded instruction-tuned "
            "teacher), 'hf:PATH_OR_NAME' (local transformers folder or "
            "a name in the local HF cache), 'gguf:FILE' (a GGUF file), 'openai:MODEL' (any OpenAI-compatible "
            "server: OpenAI, vLLM, Ollama, llama.cpp), or 'scripted:NAME' (deterministic test backend)."
        ),
    )
    base_url: str | None = Field(None, description="Base URL of an OpenAI-compatible server, e.g. http://localhost:8000/v1.")
    api_key_env: str = Field("OPENAI_API_KEY", description="NAME of the environment variable holding the API key.",
                             json_schema_extra=NOT_IDENTITY)
    max_concurrency: int = Field(8, ge=1, description="Concurrent requests to an OpenAI-compatible server.",
                                 json_schema_extra=NOT_IDENTITY)
    timeout_s: float = Field(60.0, gt=0, description="Per-request timeout in seconds.", json_schema_extra=NOT_IDENTITY)
    max_retries: int = Field(5, ge=0, description="Retries on 429 / 5xx / timeouts (exponential backoff, each one shown).",
                             json_schema_extra=NOT_IDENTITY)
    retry_budget_s: float = Field(
        120.0, gt=0,
        description="A call gives up once this many seconds have passed since its first attempt, retries included "
        "(so a server that never answers stops the run within about two minutes).",
        json_schema_extra=NOT_IDENTITY,
    )
    max_input_tokens: int | None = Field(
        None, ge=1,
        description="The most tokens one request may hold, prompt plus generation budget (the server's context "
        "window; for llama.cpp, per slot). Probed from llama.cpp's /props or vLLM's /v1/models when omitted; every "
        "prompt is checked against it before any call is paid.",
    )
    tokenizer: str | None = Field(
        None, description="OpenAI-compatible servers: a local folder holding the served model's tokenizer, so "
        "log-likelihood scoring splits context and continuation exactly without the server's /tokenize.",
    )
    max_tokens_param: Literal["auto", "max_tokens", "max_completion_tokens"] = Field(
        "auto", description="OpenAI-compatible servers: the length field sent. 'auto' sends max_tokens and switches "
        "for good when the model answers 400 asking for max_completion_tokens (newer OpenAI models).",
        json_schema_extra=NOT_IDENTITY,
    )
    batch_size: int = Field(8, ge=1, description="Batch size for local models (throughput only: not part of the run's identity).",
                            json_schema_extra=NOT_IDENTITY)
    engine: Literal["auto", "transformers", "llamacpp"] = Field(
        "auto",
        description="GGUF-backed models (the embedded specs, 'gguf:FILE'): what runs their generation. 'llamacpp': a "
        "llama.cpp server Stillroom starts on 127.0.0.1 (through xllamacpp) and stops at the end, slots sized to "
        "the machine; 'transformers': the local transformers model; 'auto': llama.cpp without CUDA, transformers "
        "with it. Log-likelihood scoring and logits always run on transformers. Not part of the run's identity "
        "(the engine is in the backend's cache identity, so the two never share cached answers).",
        json_schema_extra=NOT_IDENTITY,
    )
    device: str = Field("auto", description="Local models: 'auto', 'cpu', 'cuda', 'cuda:1', 'mps'.")
    dtype: str = Field("auto", description="Local models: 'auto', 'float32', 'bfloat16', 'float16'.")
    price_in_per_mtok: float = Field(0.0, ge=0, description="USD per million input tokens (for cost accounting).",
                                     json_schema_extra=NOT_IDENTITY)
    price_out_per_mtok: float = Field(0.0, ge=0, description="USD per million output tokens.",
                                      json_schema_extra=NOT_IDENTITY)

    @model_validator(mode="before")
    @classmethod
    def _from_spec(cls, data):
        # `student: hf:PATH` in YAML (or a spec string from the command line) is the backend with that spec.
        return {"spec": data} if isinstance(data, str) else data

    @field_validator("api_key_env")
    @classmethod
    def _key_env_is_a_name(cls, v: str) -> str:
        return check_key_env_name(v)


def lora_config(r: int, alpha: int, dropout: float, target_modules: str | list[str]):
    """The one PEFT `LoraConfig` builder. `target_modules` is 'all-linear', a comma-separated string or a list.

    It lives here, in the lowest layer that needs it (`LoraSettings.peft`), so that config imports nothing above
    it; `stillroom.models` re-exports it."""
    from peft import LoraConfig

    if isinstance(target_modules, str) and target_modules != "all-linear":
        target_modules = [t.strip() for t in target_modules.split(",") if t.strip()]
    elif not isinstance(target_modules, str):
        target_modules = list(target_modules)
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                      task_type="CAUSAL_LM", bias="none")


class LoraSettings(BaseModel):
    """LoRA adapters (PEFT) for every route that trains a student: one block, one default. The defaults follow the
    self-data distillation reference code (q_proj and v_proj, r 8, alpha 16, dropout 0.05); the adapters are
    merged into the saved student, so what a route deploys is a plain model folder. `lora: false` in YAML (or
    `--full`) means full fine-tuning."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Train LoRA adapters (True) or every weight (False).")
    r: int = Field(8, ge=1, description="LoRA rank.")
    alpha: int = Field(16, ge=1, description="LoRA scaling numerator (the update is scaled by alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        ["q_proj", "v_proj"], description="Modules that get adapters: a list of names, or 'all-linear'.")

    @model_validator(mode="before")
    @classmethod
    def _from_bool(cls, data):
        return {"enabled": data} if isinstance(data, bool) else data

    def peft(self):
        """The PEFT `LoraConfig`."""
        return lora_config(self.r, self.alpha, self.dropout, self.target_modules)


class SpendConfig(BaseModel):
    """Spend cap for a run (over all invocations on the same run folder). None means no cap. Never part of the
    run's identity: a run stopped by its cap resumes in the same folder with a higher one."""

    model_config = ConfigDict(extra="forbid")

    # These descriptions are the --help of --max-cost and --max-spend-tokens as well (stillroom.options).
    max_cost_usd: float | None = Field(None, ge=0, description="Spend cap in USD for this run folder: the run stops "
                                       "before its spend would exceed it.")
    max_tokens: int | None = Field(None, ge=0, description="Spend cap in tokens (input + output) for this run folder: "
                                   "the run stops before its tokens would exceed it.")


def spend_field(description: str = "Cap on the teacher's spend for this run."):
    """The `spend` field of every config that pays a teacher (one definition: not part of the run's identity)."""
    return Field(default_factory=SpendConfig, description=description, json_schema_extra=NOT_IDENTITY)


class TaskConfig(BaseModel):
    """Which data, and how it is split.

    The column, kind and instruction fields are also options of every command that takes a task (`input_field`
    is `--input-field`), whose help text is the field's description (`stillroom.options.field_option`): each
    description reads for both."""

    model_config = ConfigDict(extra="forbid")

    spec: str = Field(..., description="Task: a .jsonl/.csv file, 'bigbench:NAME', or 'hf:LOCAL_DATASET'.")
    input_field: str = Field("input", description="Column (CSV) or field (JSONL, dataset) holding each example's "
                             "text (default 'input'). Not used for BIG-bench.")
    label_field: str = Field("label", description="Column or field holding the gold answer (default 'label'), e.g. "
                             "category. A file without it stops at load, naming its columns, unless the task is "
                             "free text.")
    id_field: str = Field("id", description="Column or field holding a stable example id (default 'id'); ids are "
                          "generated from the input text when it is absent.")
    free_text: bool = Field(False, description="The task is free text: open answers, no label set. A file with no "
                            "label column loads only when this is set; without gold answers no quality is reported "
                            "and no route is recommended.")
    instruction: str | None = Field(None, description="Task instruction, written before the examples in every "
                                    "prompt (overrides BIG-bench's own). Empty when neither it nor an instruction "
                                    "file is given.")
    instruction_file: str | None = Field(None, description="A plain-text file holding the task instruction; give it "
                                         "or the instruction, not both.")
    labels: list[str] | None = Field(None, description="Label set for classification (inferred when omitted). Quote "
                                     "yes/no/true/false/on/off in YAML: unquoted, YAML reads them as booleans.")
    overlong: Literal["error", "truncate", "skip"] = Field(
        "error",
        description="An example whose prompt does not fit the model's context window: 'error' (before any call, "
        "naming the file and line), 'truncate' (its input is cut to fit) or 'skip' (left out); counted in the report.",
    )

    @field_validator("labels", mode="before")
    @classmethod
    def _labels_are_strings(cls, v):
        if isinstance(v, list) and any(isinstance(x, bool) for x in v):
            raise ValueError(
                "labels must be strings, but YAML read some as booleans (unquoted yes/no/true/false/on/off): quote "
                "them, e.g. labels: ['yes', 'no']"
            )
        if isinstance(v, str):  # the command line's comma-separated form
            return [x.strip() for x in v.split(",") if x.strip()]
        return v
    seed: int = Field(0, description="Seed for the deterministic train/val/test split and for sampling.")
    val_fraction: float = Field(0.2, ge=0, lt=1, description="Share of examples in the validation split.")
    test_fraction: float = Field(0.3, ge=0, lt=1, description="Share of examples in the test split.")

    @model_validator(mode="after")
    def _one_instruction(self):
        if self.instruction_file is not None:
            path = Path(self.instruction_file).expanduser()
            if not path.is_file():
                raise ValueError(f"instruction file {self.instruction_file} does not exist")
            text = path.read_text(encoding="utf-8").strip()
            # The file's text is held in `instruction` too, so it is part of the run's identity (editing the file
            # starts a new run) and a re-validated dump of this config still agrees with itself.
            if self.instruction is not None and self.instruction != text:
                raise ValueError("give instruction or instruction_file, not both")
            self.instruction = text
        if self.free_text and self.labels:
            raise ValueError("free_text and labels exclude each other: a free-text task has no label set")
        return self

    def instruction_source(self) -> str:
        """Where this config's instruction comes from: 'instruction_file PATH', 'instruction' or 'none'."""
        if self.instruction_file is not None:
            return f"instruction_file {self.instruction_file}"
        return "instruction" if self.instruction is not None else "none"

    def load_options(self) -> dict:
        """Keyword arguments for `stillroom.tasks.load_task`: the column names, the kind, the labels and the
        instruction this config sets (one place, so every route loads a task the same way)."""
        return {"instruction": self.instruction, "labels": self.labels,
                "input_field": self.input_field, "label_field": self.label_field, "id_field": self.id_field,
                "kind": "free_text" if self.free_text else None}


# ------------------------------------------------------------------------------------ shared config blocks
#
# Every route's config is made of these blocks (pydantic inheritance: the fields stay flat in YAML and on the
# command line, but each is defined once, with one name and one help text, for every route).

RENAMED_FIELDS: dict[str, str] = {
    "limit": "eval_limit",
    "split": "eval_split",
    "test_limit": "eval_limit",
    "extract_sample": "train_limit",
    "teacher_base_url": "teacher.base_url",
    "teacher_api_key_env": "teacher.api_key_env",
    "teacher_max_concurrency": "teacher.max_concurrency",
}
"""Field names of earlier versions → the one name every route uses now."""


class StillroomConfig(BaseModel):
    """Base of every command's config: unknown fields are an error, and a field of an earlier version gets one
    error naming the field that replaced it."""

    model_config = ConfigDict(extra="forbid")

    renamed: ClassVar[dict[str, str]] = RENAMED_FIELDS

    @model_validator(mode="before")
    @classmethod
    def _renamed_fields(cls, data):
        if isinstance(data, dict):
            old = [k for k in data if k in cls.renamed and k not in cls.model_fields]
            if old:
                raise ValueError("; ".join(f"'{k}' was renamed: use '{cls.renamed[k]}'" for k in old))
        return data


class SelectionBlock(StillroomConfig):
    """Which examples a route uses: the task (with its seeded split) and deterministic samples of its splits.
    The same values give the same examples to every route (`stillroom.route.select`)."""

    task: TaskConfig
    train_limit: int | None = Field(None, ge=1, description="Build from a deterministic sample of N training "
                                    "examples (all when omitted).")
    val_limit: int | None = Field(None, ge=1, description="Validation examples used while building, e.g. PLD's "
                                  "conflict loop (all when omitted).")
    eval_split: Literal["train", "val", "test"] = Field("test", description="Split every condition is evaluated on.",
                                                        json_schema_extra=EVALUATION_ONLY)
    eval_limit: int | None = Field(None, ge=1, description="Evaluate on a deterministic sample of N examples of "
                                   "eval_split (all when omitted).", json_schema_extra=EVALUATION_ONLY)


class TrainingBlock(StillroomConfig):
    """How a route trains its student (SeqKD, CoT data, logit and hint KD, healing): one name for each knob."""

    lora: LoraSettings = Field(default_factory=LoraSettings,
                               description="LoRA adapters (merged into the saved student); `false` = full fine-tuning.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training examples.")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1: use epochs).")
    learning_rate: float = Field(1e-4, gt=0, description="AdamW learning rate.")
    batch_size: int = Field(8, ge=1, description="Examples per device per step.")
    seed: int = Field(0, description="Training seed.")


class BaselineBlock(StillroomConfig):
    """The 'before' row of a training route."""

    eval_before: bool = Field(True, description="Also evaluate the student before distillation (the 'no KD' row).",
                              json_schema_extra=EVALUATION_ONLY)


class EvalConfig(SelectionBlock):
    """`stillroom eval`: score one model on one split of a task."""

    model: BackendConfig = Field(default_factory=BackendConfig)
    shots: int = Field(0, ge=0, description="k solved training examples in the prompt (k-shot).")
    system_prompt_file: str | None = Field(None, description="A plain-text system prompt (e.g. an exported rulebook).")
    method: Literal["auto", "loglik", "generate", "cot"] = Field(
        "auto",
        description=(
            "'loglik' scores each option's log-likelihood (local models), 'generate' parses a generated answer, "
            "'cot' lets the model reason first; 'auto' uses loglik where the backend can score."
        ),
    )
    max_new_tokens: int = Field(16, ge=1, description="Generation budget per answer ('generate').")
    cot_max_tokens: int = Field(256, ge=16, description="Reasoning-and-answer budget per answer ('cot').")
    spend: SpendConfig = spend_field("Cap on the model's spend for this run.")

    @model_validator(mode="after")
    def _check(self):
        if self.system_prompt_file and not Path(self.system_prompt_file).is_file():
            raise ValueError(f"system prompt file {self.system_prompt_file} does not exist")
        return self


def load_yaml_config(path: str | Path, model: type[BaseModel], overrides: dict | None = None) -> BaseModel:
    """Read a YAML file into `model`, apply command-line overrides, and report errors by field name."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: config file does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    return validate_config(model, deep_merge(data, overrides or {}), source=str(p))


def validate_config(model: type[BaseModel], data: dict, source: str = "config") -> BaseModel:
    """Validate a dict into `model`, turning pydantic's error into one line per bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e["loc"])
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{source}: field '{where}': {msg}" if where else f"{source}: {msg}")
        raise ConfigError("\n".join(lines)) from None


def deep_merge(base: dict, over: dict) -> dict:
    """Recursively merge `over` into a copy of `base` (None values in `over` are ignored, and so is a mapping of
    nothing but None: an option left out never replaces the YAML's `student: hf:PATH`). A plain spec string in
    `base` merged with a mapping becomes `{spec: ...}` first (a backend given as a string in YAML)."""
    out = dict(base)
    for k, v in over.items():
        if v is None or (isinstance(v, dict) and not _has_value(v)):
            continue
        if isinstance(v, dict):
            b = out.get(k)
            b = {"spec": b} if isinstance(b, str) else b
            out[k] = deep_merge(b if isinstance(b, dict) else {}, v)
        else:
            out[k] = v
    return out


def _has_value(d: dict) -> bool:
    return any(_has_value(v) if isinstance(v, dict) else v is not None for v in d.values())


class PLDConfig(SelectionBlock):
    """`stillroom pld`: Prompt-Level Distillation, all four phases, plus the comparison on the test split.
    `train_limit` is the sample the teacher extracts from, `val_limit` the conflict loop's validation sample."""

    teacher: BackendConfig = Field(default_factory=BackendConfig, description="Writes instructions, rules, revisions.")
    student: BackendConfig = Field(default_factory=BackendConfig, description="Answers with the rulebook as system prompt.")
    embedder: str = Field("minilm", description="'minilm' (bundled all-MiniLM-L6-v2), 'st:NAME_OR_PATH', 'openai:MODEL', or 'hash' (no model; dry runs).")
    eps: float = Field(
        0.3, gt=0, lt=2,
        description="DBSCAN eps (cosine distance). The paper's 0.4 was for another embedder; MiniLM's distances "
        "between paraphrases are larger, so use eps_sweep to pick by validation macro-F1.",
    )
    min_samples: int = Field(3, ge=1, description="DBSCAN min_samples (paper: 6, with hundreds of training examples).")
    eps_sweep: list[float] | None = Field(None, description="Try each eps; keep the one with the best validation macro-F1.")
    max_rounds: int = Field(2, ge=0, description="Conflict-resolution rounds at most (paper converged after 1-2).")
    patience: int = Field(1, ge=1, description="Stop after this many rejected rounds in a row.")
    failures_per_round: int = Field(16, ge=1, description="Student failures shown to the resolver per round.")
    successes_per_round: int = Field(8, ge=0, description="Student successes shown too (guards against regressions).")
    teacher_max_tokens: int = Field(
        256, ge=16, description="Generation budget per extraction and synthesis reply (the conflict resolver gets "
        "twice this). Sized for an instruction model that reasons before its marked answer line; a reply cut at "
        "the limit before that line is dropped and counted.")
    student_method: Literal["auto", "loglik", "generate"] = Field("auto", description="How the student answers.")
    shots: int = Field(5, ge=0, description="k for the k-shot baseline in the comparison.")
    cot: bool = Field(True, description="Include the chain-of-thought baseline (the student reasons, then answers).")
    cot_max_tokens: int = Field(256, ge=16, description="Reasoning budget per answer for the chain-of-thought baseline.")
    ablation: bool = Field(False, description="Leave-one-rule-out ablation on validation (one student pass per rule).")
    compare_baselines: bool = Field(
        True, description="Also evaluate zero-shot (and k-shot, chain-of-thought) on the test split next to PLD. "
        "`stillroom compare` turns it off: there the baselines are routes of their own.")
    spend: SpendConfig = spend_field()
