"""The experiment-file schema: typed sections, defaults and validation with key paths.

An experiment file is TOML with the sections below. Every key is optional except
``[model].name``; unknown keys and wrong types are errors that name the key path
(``[train].lr``), what was found, and what is allowed, so a typo never silently falls
back to a default.

The sections are pydantic models (``extra="forbid"``; a file is validated in strict
mode: ``"10"`` is not an integer, though an integer is a number). pydantic finds the
problems; :func:`experiment_from_dict` words the first one the way the file reads
(``[train].lr``, the allowed values, a "did you mean" hint). The resolved experiment is
written back with ``tomli_w``.
"""

from __future__ import annotations

import difflib
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

Method = Literal["paca", "lora", "full", "frozen"]
Task = Literal["auto", "causal-lm", "image-classification"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Quantization = Literal["none", "nf4"]
Precision = Literal["fp32", "bf16", "fp16"]
Format = Literal["auto", "instruction", "text", "chat", "image"]
Scheduler = Literal["constant", "constant_with_warmup", "linear", "cosine"]
Optimizer = Literal["adamw_torch", "adamw_torch_fused", "sgd", "adafactor"]

METHODS = typing.get_args(Method)
TASKS = typing.get_args(Task)
DTYPES = typing.get_args(Dtype)
QUANTIZATIONS = typing.get_args(Quantization)
PRECISIONS = typing.get_args(Precision)
FORMATS = typing.get_args(Format)
SCHEDULERS = typing.get_args(Scheduler)
OPTIMIZERS = typing.get_args(Optimizer)


class ExperimentError(ValueError):
    """An experiment file (or dict) is invalid; the message names the key path."""


class _Section(BaseModel):
    """A table of the file: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class ModelSection(_Section):
    """Which pretrained model to fine-tune."""

    name: str = Field(
        "",
        description="hub id, local folder, or built-in paca.tiny/tiny-llama, tiny-gpt2, tiny-vit",
    )
    task: Task = Field("auto", description="what the model does")
    dtype: Dtype = Field("auto", description="dtype the weights are loaded in (auto: float32)")
    tokenizer: str = Field("", description="tokenizer/processor to load ('' = same as name)")
    revision: str = Field("", description="hub revision ('' = default branch)")
    trust_remote_code: bool = Field(False, description="allow hub model code")
    attn_implementation: str = Field(
        "", description="attention kernel ('' = the library's choice), e.g. sdpa"
    )
    quantization: Quantization = Field(
        "none",
        description="frozen base in 4-bit: 'nf4' = bitsandbytes NF4 with double quantization "
        "(QLoRA's format; paca -> QPaCA, lora -> QLoRA)",
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of a built-in tiny builder"
    )


class DataSection(_Section):
    """Where the examples come from and how they become model inputs."""

    train: str = Field(
        "paca.tiny/instructions",
        description="built-in 'paca.tiny/instructions' or 'paca.tiny/images', a "
        ".jsonl/.json/.csv file, a datasets save_to_disk folder, or a hub dataset id",
    )
    eval: str = Field("", description="held-out source (same forms); '' = eval_split or none")
    config_name: str = Field("", description="hub dataset configuration name")
    train_split: str = Field("train", description="split used for training")
    eval_split: str = Field("", description="split of the train source used for evaluation")
    eval_fraction: float = Field(
        0.0, ge=0, description="hold out this fraction of train when no eval is given"
    )
    format: Format = Field("auto", description="how rows are turned into inputs")
    text_field: str = Field("text", description="column with plain text")
    instruction_field: str = Field("instruction", description="instruction column")
    input_field: str = Field("input", description="optional context column")
    response_field: str = Field("response", description="response column ('output' is also tried)")
    messages_field: str = Field("messages", description="chat column (list of turns)")
    image_field: str = Field("image", description="image column ('img' is also tried)")
    label_field: str = Field("label", description="class label column")
    seq_len: int = Field(64, ge=1, description="tokens per example (padded)")
    image_size: int = Field(0, ge=0, description="resize images to this (0 = the model's size)")
    mask_prompt: bool = Field(False, description="no loss on the instruction part")
    max_train_samples: int = Field(0, ge=0, description="cap (0 = all); size of a built-in set")
    max_eval_samples: int = Field(0, ge=0, description="cap (0 = all); size of a built-in set")
    num_labels: int = Field(0, ge=0, description="classes (0 = from the data/model)")


class MethodSection(_Section):
    """How the model is fine-tuned."""

    name: Method = Field("paca", description="fine-tuning method")
    r: int = Field(8, ge=1, description="PaCA columns / LoRA rank")
    alpha: float = Field(
        0.0,
        ge=0,
        description="LoRA alpha (0 = r); for PaCA the authors' scaling alpha/r, applied as a "
        "learning-rate factor (0 = none)",
    )
    target_modules: list[str] | str = Field(
        "all-linear", description="module names, a regex, or 'all-linear'"
    )
    exclude_modules: list[str] = Field(default_factory=list, description="never adapted")
    modules_to_save: list[str] = Field(
        default_factory=list, description="modules trained in full too (e.g. a new head)"
    )
    selection: str = Field("random", description="PaCA column-selection strategy")
    seed: int = Field(-1, description="PaCA column seed (-1 = the experiment seed)")
    dropout: float = Field(0.0, ge=0, description="LoRA dropout")


class TrainSection(_Section):
    """Optimisation hyper-parameters (passed to transformers' Trainer)."""

    steps: int = Field(0, ge=0, description="optimizer steps (0 = use epochs)")
    epochs: float = Field(1.0, ge=0, description="epochs when steps = 0")
    batch_size: int = Field(8, ge=1, description="global batch size (split over ranks)")
    grad_accum: int = Field(1, ge=1, description="gradient accumulation steps")
    lr: float = Field(1e-4, ge=0, description="learning rate")
    lr_scheduler: Scheduler = Field("constant", description="schedule")
    warmup_steps: int = Field(0, ge=0, description="warm-up steps")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, ge=0, description="clip (0 = off)")
    optimizer: Optimizer = Field("adamw_torch", description="optimizer")
    precision: Precision = Field("fp32", description="mixed precision")
    gradient_checkpointing: bool = Field(False, description="recompute activations")
    logging_steps: int = Field(10, ge=1, description="log every N steps")
    eval_steps: int = Field(0, ge=0, description="evaluate every N steps (0 = before and after)")
    eval_batch_size: int = Field(0, ge=0, description="0 = batch_size")
    save_steps: int = Field(100, ge=0, description="checkpoint every N steps (0 = never)")
    save_total_limit: int = Field(2, ge=1, description="checkpoints kept")
    throughput_warmup_steps: int = Field(3, ge=0, description="first steps left out of throughput")
    dataloader_workers: int = Field(0, ge=0, description="DataLoader workers")
    deepspeed: str = Field("", description="DeepSpeed JSON config path ('' = none)")


class HpuSection(_Section):
    """Gaudi settings, used only on an HPU backend with optimum-habana."""

    lazy_mode: bool = Field(True, description="GaudiTrainingArguments.use_lazy_mode")
    gaudi_config: str = Field(
        "",
        description="GaudiConfig hub id or path ('' = PaCA's GaudiConfig with the two flags below)",
    )
    use_hpu_graphs_for_training: bool = Field(False, description="HPU graphs")
    use_fused_adam: bool = Field(False, description="GaudiConfig.use_fused_adam")
    use_fused_clip_norm: bool = Field(True, description="GaudiConfig.use_fused_clip_norm")


class Experiment(_Section):
    """A whole experiment: one file, any backend."""

    name: str = Field("experiment", description="names the run folder")
    description: str = Field("", description="free text, copied to the run record")
    seed: int = Field(0, description="seed of init, data order and columns")
    backend: str = Field("auto", description="cpu, cuda, hpu, a plugin's name, or auto")
    output_dir: str = Field("runs", description="parent folder of run folders")
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    method: MethodSection = Field(default_factory=MethodSection)
    train: TrainSection = Field(default_factory=TrainSection)
    hpu: HpuSection = Field(default_factory=HpuSection)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def to_toml(self) -> str:
        """The resolved experiment as TOML (every key, defaults filled in)."""
        return dumps_toml(self.to_dict())


def dumps_toml(data: dict[str, Any]) -> str:
    """``data`` (an experiment table) as TOML."""
    return tomli_w.dumps(data)


# ---------------------------------------------------------------------- error messages
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return _type_name(type(typing.get_args(tp)[0]))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0]).split(' ', 1)[-1]}s"
    if origin is dict:
        return "a table"
    return {str: "a string", int: "an integer", float: "a number", bool: "true/false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _describe(value: Any) -> str:
    text = repr(value)
    return (
        f"{text[:60]}... ({type(value).__name__})"
        if len(text) > 60
        else f"{text} ({type(value).__name__})"
    )


def _pretty(path: tuple[str, ...]) -> str:
    """``("train", "lr")`` -> ``[train].lr`` (how the key looks in the TOML file)."""
    return f"[{path[0]}].{path[1]}" if len(path) > 1 else path[0]


def _words(name: str) -> list[str]:
    return [w for w in name.lower().replace("-", "_").split("_") if w]


def _abbreviated(key: list[str], field: str) -> int:
    """How many words of ``key`` the name ``field`` stands for (0: none): ``lr`` for
    ``learning_rate`` (initials), ``grad_accum`` for ``gradient_accumulation_steps`` and
    ``batch_size`` for ``per_device_train_batch_size`` (each word a prefix, in order)."""
    words = _words(field)
    best = 0
    if len(words) == 1:
        for i in range(len(key)):
            for j in range(i + 2, len(key) + 1):
                if "".join(w[0] for w in key[i:j]) == words[0]:
                    best = max(best, j - i)
    k = 0
    for word in words:
        while k < len(key) and not (key[k].startswith(word) or word.startswith(key[k])):
            k += 1
        if k == len(key):
            return best
        k += 1
    return max(best, len(words))


def _closest_key(key: str, section: type[BaseModel]) -> str | None:
    """The key of ``section`` that ``key`` most likely means: one it abbreviates (or
    that abbreviates it), else a close spelling (difflib), else the key one of whose
    allowed values ``key`` is (``bf16`` -> ``precision``)."""
    fields = list(section.model_fields)
    words = _words(key)
    scored = [
        (_abbreviated(words, f), difflib.SequenceMatcher(None, key, f).ratio(), f) for f in fields
    ]
    best = max(scored)
    if best[0]:
        return best[2]
    close = difflib.get_close_matches(key, fields, n=1)
    if close:
        return close[0]
    for name, info in section.model_fields.items():
        choices = typing.get_args(info.annotation) if _is_literal(info.annotation) else ()
        if key.lower() in {str(c).lower() for c in choices}:
            return name
    return None


def _is_literal(tp: Any) -> bool:
    return typing.get_origin(tp) is Literal


def _located(loc: tuple[Any, ...], data: Any) -> tuple[tuple[str, ...], Any, Any]:
    """``(key path, annotation, value given)`` of the field an error's ``loc`` points into."""
    head = str(loc[0])
    info = Experiment.model_fields[head]
    section = info.annotation
    if len(loc) > 1 and isinstance(section, type) and issubclass(section, BaseModel):
        key = str(loc[1])
        return (head, key), section.model_fields[key].annotation, data[head][key]
    return (head,), info.annotation, data[head]


def _message(error: Any, data: Any) -> str:
    """One pydantic error, worded as :func:`experiment_from_dict` reports it."""
    loc, kind = tuple(error["loc"]), error["type"]
    if kind == "model_type":
        what = f"[{loc[0]}]" if loc else "the file"
        return f"{what} must be a table, got {_describe(error['input'])}"
    if kind == "extra_forbidden":
        *where, key = (str(part) for part in loc)
        section = Experiment.model_fields[where[0]].annotation if where else Experiment
        close = _closest_key(key, section)
        hint = f" Did you mean {close!r}?" if close else ""
        table = f" in [{where[0]}]" if where else ""
        return (
            f"unknown key {_pretty((*where, key))}.{hint} Allowed keys{table}: "
            f"{', '.join(section.model_fields)}"
        )
    path, annotation, value = _located(loc, data)
    if kind == "literal_error":
        choices = typing.get_args(annotation)
        if not isinstance(value, type(choices[0])):
            return f"{_pretty(path)} must be {_type_name(annotation)}, got {_describe(value)}"
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return (
            f"{_pretty(path)} = {value!r} is not allowed{hint}; "
            f"allowed values: {', '.join(map(repr, choices))}"
        )
    if kind == "greater_than_equal":
        return f"{_pretty(path)} = {value!r} is too small; it must be >= {error['ctx']['ge']}"
    return f"{_pretty(path)} must be {_type_name(annotation)}, got {_describe(value)}"


def _first_in_file(errors: list[Any], data: Any) -> Any:
    """The error about the key that comes first in the file."""

    def position(error: Any) -> tuple[int, int]:
        loc, table, out = error["loc"], data, []
        for part in loc[:2]:
            keys = list(table) if isinstance(table, dict) else []
            out.append(keys.index(part) if part in keys else len(keys))
            table = table.get(part) if isinstance(table, dict) else None
        return tuple(out) if out else (-1,)

    return min(errors, key=position)


def _check_semantics(exp: Experiment, where: str) -> None:
    if not exp.model.name:
        raise ExperimentError(
            f"{where}[model].name is required: a hub id (e.g. 'meta-llama/Llama-2-7b-hf'), "
            f"a local model folder, or a built-in 'paca.tiny/tiny-llama'"
        )
    if not 0 <= exp.data.eval_fraction < 1:
        raise ExperimentError(
            f"{where}[data].eval_fraction = {exp.data.eval_fraction} must be in [0, 1)"
        )
    tm = exp.method.target_modules
    if isinstance(tm, list) and not tm:
        raise ExperimentError(f"{where}[method].target_modules is empty: name at least one module")
    if exp.model.quantization != "none" and exp.method.name == "full":
        raise ExperimentError(
            f"{where}[model].quantization = {exp.model.quantization!r} keeps the base frozen in "
            f"4-bit, but [method].name = 'full' trains every weight: use 'paca' (QPaCA) or "
            f"'lora' (QLoRA), or set quantization = 'none'"
        )
    if exp.train.steps == 0 and exp.train.epochs <= 0 and exp.method.name != "frozen":
        raise ExperimentError(f"{where}[train]: set steps > 0 or epochs > 0")


def experiment_from_dict(data: dict[str, Any], source: str = "") -> Experiment:
    """Validate a parsed experiment table; errors name ``source`` and the key path."""
    where = f"{source}: " if source else ""
    try:
        exp = Experiment.model_validate(data, strict=True)
    except ValidationError as exc:
        error = _first_in_file(exc.errors(), data)
        raise ExperimentError(where + _message(error, data)) from None
    _check_semantics(exp, where)
    return exp


def load_experiment(path: str | Path, overrides: dict[str, Any] | None = None) -> Experiment:
    """Read and validate an experiment TOML file (``overrides``: ``{"train.steps": 5}``)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"experiment file not found: {p.resolve()} (shipped examples: "
            f"{', '.join(sorted(shipped_experiments()))})"
        )
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ExperimentError(f"{p}: not valid TOML: {exc}") from None
    return experiment_from_dict(apply_overrides(data, overrides or {}), source=str(p))


def loads_experiment(text: str, source: str = "<string>") -> Experiment:
    """Parse and validate experiment TOML given as a string."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ExperimentError(f"{source}: not valid TOML: {exc}") from None
    return experiment_from_dict(data, source=source)


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (``"train.steps"``) in a copy of a parsed experiment table."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for dotted, value in overrides.items():
        head, _, rest = dotted.partition(".")
        if rest:
            out.setdefault(head, {})
            if not isinstance(out[head], dict):
                raise ExperimentError(f"cannot set {dotted}: {head} is not a table")
            out[head][rest] = value
        else:
            out[head] = value
    return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.lr=1e-3", "method.name=lora"]`` -> ``{"train.lr": 0.001, "method.name": "lora"}``
    (``--set KEY=VALUE`` of ``paca run`` and ``side_by_side``; VALUE is read as TOML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ExperimentError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=1e-3")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text  # a bare word: take it as a string (method.name=lora)
        out[key.strip()] = value
    return out


def shipped_experiments() -> dict[str, Path]:
    """The experiment files shipped in ``paca/experiments``, by stem."""
    folder = Path(__file__).resolve().parents[1] / "experiments"
    return {p.stem: p for p in sorted(folder.glob("*.toml"))}


def resolve_experiment_path(name_or_path: str) -> Path:
    """A path as given, else the shipped experiment of that name (``paca run llama2-7b-mmlu``)."""
    p = Path(name_or_path)
    if p.exists():
        return p
    shipped = shipped_experiments()
    stem = p.stem if p.suffix == ".toml" else name_or_path
    if stem in shipped and p.parent == Path("."):
        return shipped[stem]
    return p
