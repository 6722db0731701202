"""The experiment-file schema: typed sections, defaults and validation with key paths.

An experiment file is TOML with the sections below. Every key is optional except
``[model].name``; unknown keys and wrong types are errors that name the key path
(``[train].lr``), what was found, and what is allowed, so a typo never silently falls
back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

METHODS = ("paca", "lora", "full", "frozen")
TASKS = ("auto", "causal-lm", "image-classification")
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "nf4")
PRECISIONS = ("fp32", "bf16", "fp16")
FORMATS = ("auto", "instruction", "text", "chat", "image")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "sgd", "adafactor")


#: Names people bring from transformers/PEFT/the authors' scripts -> our key.
_ALIASES = {
    "learning_rate": "lr", "learnig_rate": "lr", "max_steps": "steps",
    "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
    "train_bs": "batch_size", "gradient_accumulation_steps": "grad_accum",
    "accumulation_steps": "grad_accum", "lr_scheduler_type": "lr_scheduler",
    "bf16": "precision", "fp16": "precision", "lora_r": "r", "rank": "r",
    "lora_alpha": "alpha", "lora_dropout": "dropout", "max_seq_length": "seq_len",
    "block_size": "seq_len", "max_seq_len": "seq_len", "model_name_or_path": "name",
    "dataset_name": "train", "dataset_path": "train", "optim": "optimizer",
}  # fmt: skip


class ExperimentError(ValueError):
    """An experiment file (or dict) is invalid; the message names the key path."""


def _meta(help: str, choices: tuple[Any, ...] | None = None, minimum: float | None = None):
    return {"help": help, "choices": choices, "min": minimum}


@dataclass
class ModelSection:
    """Which pretrained model to fine-tune."""

    name: str = field(
        default="",
        metadata=_meta(
            "hub id, local folder, or built-in paca.tiny/tiny-llama, tiny-gpt2, tiny-vit"
        ),
    )
    task: str = field(default="auto", metadata=_meta("what the model does", TASKS))
    dtype: str = field(
        default="auto", metadata=_meta("dtype the weights are loaded in (auto: float32)", DTYPES)
    )
    tokenizer: str = field(
        default="", metadata=_meta("tokenizer/processor to load ('' = same as name)")
    )
    revision: str = field(default="", metadata=_meta("hub revision ('' = default branch)"))
    trust_remote_code: bool = field(default=False, metadata=_meta("allow hub model code"))
    attn_implementation: str = field(
        default="", metadata=_meta("attention kernel ('' = the library's choice), e.g. sdpa")
    )
    quantization: str = field(
        default="none",
        metadata=_meta(
            "frozen base in 4-bit: 'nf4' = bitsandbytes NF4 with double quantization "
            "(QLoRA's format; paca -> QPaCA, lora -> QLoRA)",
            QUANTIZATIONS,
        ),
    )
    options: dict[str, Any] = field(
        default_factory=dict, metadata=_meta("keyword arguments of a built-in tiny builder")
    )


@dataclass
class DataSection:
    """Where the examples come from and how they become model inputs."""

    train: str = field(
        default="paca.tiny/instructions",
        metadata=_meta(
            "built-in 'paca.tiny/instructions' or 'paca.tiny/images', a .jsonl/.json/.csv "
            "file, a datasets save_to_disk folder, or a hub dataset id"
        ),
    )
    eval: str = field(
        default="", metadata=_meta("held-out source (same forms); '' = eval_split or none")
    )
    config_name: str = field(default="", metadata=_meta("hub dataset configuration name"))
    train_split: str = field(default="train", metadata=_meta("split used for training"))
    eval_split: str = field(
        default="", metadata=_meta("split of the train source used for evaluation")
    )
    eval_fraction: float = field(
        default=0.0,
        metadata=_meta("hold out this fraction of train when no eval is given", minimum=0),
    )
    format: str = field(default="auto", metadata=_meta("how rows are turned into inputs", FORMATS))
    text_field: str = field(default="text", metadata=_meta("column with plain text"))
    instruction_field: str = field(default="instruction", metadata=_meta("instruction column"))
    input_field: str = field(default="input", metadata=_meta("optional context column"))
    response_field: str = field(
        default="response", metadata=_meta("response column ('output' is also tried)")
    )
    messages_field: str = field(default="messages", metadata=_meta("chat column (list of turns)"))
    image_field: str = field(default="image", metadata=_meta("image column ('img' is also tried)"))
    label_field: str = field(default="label", metadata=_meta("class label column"))
    seq_len: int = field(default=64, metadata=_meta("tokens per example (padded)", minimum=1))
    image_size: int = field(
        default=0, metadata=_meta("resize images to this (0 = the model's size)", minimum=0)
    )
    mask_prompt: bool = field(default=False, metadata=_meta("no loss on the instruction part"))
    max_train_samples: int = field(
        default=0, metadata=_meta("cap (0 = all); size of a built-in set", minimum=0)
    )
    max_eval_samples: int = field(
        default=0, metadata=_meta("cap (0 = all); size of a built-in set", minimum=0)
    )
    num_labels: int = field(
        default=0, metadata=_meta("classes (0 = from the data/model)", minimum=0)
    )


@dataclass
class MethodSection:
    """How the model is fine-tuned."""

    name: str = field(default="paca", metadata=_meta("fine-tuning method", METHODS))
    r: int = field(default=8, metadata=_meta("PaCA columns / LoRA rank", minimum=1))
    alpha: float = field(
        default=0.0,
        metadata=_meta(
            "LoRA alpha; for PaCA the authors' scaling alpha/r, applied as a learning-rate "
            "factor (0 = none)",
            minimum=0,
        ),
    )
    target_modules: list[str] | str = field(
        default="all-linear", metadata=_meta("module names, a regex, or 'all-linear'")
    )
    exclude_modules: list[str] = field(default_factory=list, metadata=_meta("never adapted"))
    modules_to_save: list[str] = field(
        default_factory=list, metadata=_meta("modules trained in full too (e.g. a new head)")
    )
    selection: str = field(default="random", metadata=_meta("PaCA column-selection strategy"))
    seed: int = field(default=-1, metadata=_meta("PaCA column seed (-1 = the experiment seed)"))
    dropout: float = field(default=0.0, metadata=_meta("LoRA dropout", minimum=0))


@dataclass
class TrainSection:
    """Optimisation hyper-parameters (passed to transformers' Trainer)."""

    steps: int = field(default=0, metadata=_meta("optimizer steps (0 = use epochs)", minimum=0))
    epochs: float = field(default=1.0, metadata=_meta("epochs when steps = 0", minimum=0))
    batch_size: int = field(
        default=8, metadata=_meta("global batch size (split over ranks)", minimum=1)
    )
    grad_accum: int = field(default=1, metadata=_meta("gradient accumulation steps", minimum=1))
    lr: float = field(default=1e-4, metadata=_meta("learning rate", minimum=0))
    lr_scheduler: str = field(default="constant", metadata=_meta("schedule", SCHEDULERS))
    warmup_steps: int = field(default=0, metadata=_meta("warm-up steps", minimum=0))
    weight_decay: float = field(default=0.0, metadata=_meta("AdamW weight decay", minimum=0))
    max_grad_norm: float = field(default=1.0, metadata=_meta("clip (0 = off)", minimum=0))
    optimizer: str = field(default="adamw_torch", metadata=_meta("optimizer", OPTIMIZERS))
    precision: str = field(default="fp32", metadata=_meta("mixed precision", PRECISIONS))
    gradient_checkpointing: bool = field(default=False, metadata=_meta("recompute activations"))
    logging_steps: int = field(default=10, metadata=_meta("log every N steps", minimum=1))
    eval_steps: int = field(
        default=0, metadata=_meta("evaluate every N steps (0 = before and after)", minimum=0)
    )
    eval_batch_size: int = field(default=0, metadata=_meta("0 = batch_size", minimum=0))
    save_steps: int = field(
        default=100, metadata=_meta("checkpoint every N steps (0 = never)", minimum=0)
    )
    save_total_limit: int = field(default=2, metadata=_meta("checkpoints kept", minimum=1))
    throughput_warmup_steps: int = field(
        default=3, metadata=_meta("first steps left out of throughput", minimum=0)
    )
    dataloader_workers: int = field(default=0, metadata=_meta("DataLoader workers", minimum=0))
    deepspeed: str = field(default="", metadata=_meta("DeepSpeed JSON config path ('' = none)"))


@dataclass
class HpuSection:
    """Gaudi settings, used only on an HPU backend with optimum-habana."""

    lazy_mode: bool = field(default=True, metadata=_meta("GaudiTrainingArguments.use_lazy_mode"))
    gaudi_config: str = field(
        default="", metadata=_meta("GaudiConfig hub id or path ('' = GaudiConfig())")
    )
    use_hpu_graphs_for_training: bool = field(default=False, metadata=_meta("HPU graphs"))
    use_fused_adam: bool = field(default=False, metadata=_meta("GaudiConfig.use_fused_adam"))
    use_fused_clip_norm: bool = field(
        default=True, metadata=_meta("GaudiConfig.use_fused_clip_norm")
    )


@dataclass
class Experiment:
    """A whole experiment: one file, any backend."""

    name: str = field(default="experiment", metadata=_meta("names the run folder"))
    description: str = field(default="", metadata=_meta("free text, copied to the run record"))
    seed: int = field(default=0, metadata=_meta("seed of init, data order and columns"))
    backend: str = field(default="auto", metadata=_meta("cpu, cuda, hpu, a plugin's name, or auto"))
    output_dir: str = field(default="runs", metadata=_meta("parent folder of run folders"))
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    method: MethodSection = field(default_factory=MethodSection)
    train: TrainSection = field(default_factory=TrainSection)
    hpu: HpuSection = field(default_factory=HpuSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """The resolved experiment as TOML (every key, defaults filled in)."""
        return dumps_toml(self.to_dict())


# ---------------------------------------------------------------------- validation
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}s"
    if origin is dict:
        return "a table"
    return {str: "a string", int: "an integer", float: "a number", bool: "true/false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """``(ok, value)``: whether ``value`` fits ``tp`` (ints are accepted for floats)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _coerce(value, arg)
            if ok:
                return True, v
        return False, value
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            return False, value
        out = []
        for v in value:
            ok, c = _coerce(v, item)
            if not ok:
                return False, value
            out.append(c)
        return True, out
    if origin is dict:
        return isinstance(value, dict), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    raise TypeError(f"schema type {tp!r} is not supported")  # pragma: no cover


def _describe(value: Any) -> str:
    text = repr(value)
    return (
        f"{text[:60]}... ({type(value).__name__})"
        if len(text) > 60
        else f"{text} ({type(value).__name__})"
    )


def _section(cls: type, data: Any, path: str, source: str) -> Any:
    where = f"{source}: " if source else ""
    if not isinstance(data, dict):
        what = f"[{path}]" if path else "the file"
        raise ExperimentError(f"{where}{what} must be a table, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        key_path = f"{path}.{key}" if path else key
        if key not in fields:
            allowed = ", ".join(fields)
            close = difflib.get_close_matches(key, list(fields), n=1)
            alias = _ALIASES.get(key.lower().replace("-", "_"))
            if alias in fields:
                close = [alias]
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ExperimentError(
                f"{where}unknown key {_pretty(key_path)}.{hint} Allowed keys"
                f"{' in [' + path + ']' if path else ''}: {allowed}"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _section(tp, value, key_path, source)
            continue
        ok, coerced = _coerce(value, tp)
        if not ok:
            raise ExperimentError(
                f"{where}{_pretty(key_path)} must be {_type_name(tp)}, got {_describe(value)}"
            )
        meta = fields[key].metadata
        choices = meta.get("choices")
        if choices and coerced not in choices:
            close = difflib.get_close_matches(str(coerced), [str(c) for c in choices], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ExperimentError(
                f"{where}{_pretty(key_path)} = {coerced!r} is not allowed{hint}; "
                f"allowed values: {', '.join(map(repr, choices))}"
            )
        minimum = meta.get("min")
        if minimum is not None and isinstance(coerced, (int, float)) and coerced < minimum:
            raise ExperimentError(
                f"{where}{_pretty(key_path)} = {coerced!r} is too small; it must be >= {minimum}"
            )
        kwargs[key] = coerced
    return cls(**kwargs)


def _pretty(key_path: str) -> str:
    """``train.lr`` -> ``[train].lr`` (how the key looks in the TOML file)."""
    head, _, rest = key_path.partition(".")
    return f"[{head}].{rest}" if rest else head


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
    exp = _section(Experiment, data, "", source)
    _check_semantics(exp, f"{source}: " if source else "")
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


# ------------------------------------------------------------------- TOML writing
def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dumps_toml(data: dict[str, Any]) -> str:
    """Write a two-level table (top-level keys, then sections) as TOML."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"\n[{key}]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in value.items())
    return "\n".join(lines) + "\n"
