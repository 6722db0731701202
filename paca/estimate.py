"""Will it fit? Predict the peak memory of one training step without allocating the model.

:func:`estimate_memory` builds the model from its transformers config on the **meta
device** (shapes and dtypes, no storage), applies the method exactly as a user would
(``paca.wrap``; :func:`paca.quantize_nf4` then ``paca.wrap`` for QPaCA; PEFT LoRA;
:func:`paca.quantize_nf4` then PEFT LoRA for QLoRA; every weight trainable for full
fine-tuning) and runs two real training steps (forward with the loss, backward, AdamW)
on it. The second step runs under a dispatch mode that tracks every storage the ATen
and bitsandbytes operators create and frees, which gives the live bytes at every point
of the step. The prediction is::

    peak = parameters + buffers + 4-bit quantization state + optimizer state
           + max over the step of (live activations, gradients, temporaries)
           + a 4-bit kernel's internal dequantization, at the moment it runs

Because the dry run executes the model's own code (the loss's fp32 upcast of the
logits, GQA, gradient checkpointing's recomputation, PEFT's adapter dtypes, PaCA's
``x[..., idx]``), nothing about the architecture is approximated. What the dry run
decides instead of a device:

* attention is flash-style (``q, k, v``, output and log-sum-exp saved, no ``s×s``
  matrix), as PyTorch's SDPA on CPU and CUDA runs it for causal training without a
  padding mask;
* ``kernel_transients``: bitsandbytes' 4-bit GEMM dequantizes the whole weight inside
  the kernel (CPU, and CUDA for training-size inputs); the estimate counts that
  ``out×in`` buffer while the kernel runs. (A CPU measurement with a dispatch-mode
  tracker cannot see inside a kernel, so it is left out when validating against one.)
* ``optimizer_foreach``: torch's AdamW on CUDA defaults to the multi-tensor
  implementation, whose temporaries are as large as all trainable parameters together;
  on CPU it loops per tensor.

Not included (add them yourself for a device): the runtime's own memory (a CUDA context
is about 0.3–1 GiB and not in ``max_memory_allocated``), allocator caching and
fragmentation, and communication buffers of multi-device training. :meth:`MemoryEstimate.fits`
applies a documented headroom for those. The estimate is validated against measured
peaks of ``paca bench`` models in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import contextlib
import json
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

GIB = 1024**3
METHODS = ("paca", "qpaca", "lora", "qlora", "full")
QUANTIZED = frozenset({"qpaca", "qlora"})
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: What :meth:`MemoryEstimate.fits` keeps free on a device besides the predicted peak:
#: a fraction for allocator caching/fragmentation and a fixed amount for the runtime.
HEADROOM_FRACTION = 0.05
HEADROOM_BYTES = 1 * GIB

#: Model configs written from their published ``config.json`` (no download).
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    # meta-llama/Meta-Llama-3-8B: 8.03 B parameters
    "llama-3-8b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    },
    # meta-llama/Llama-3.1-70B: 70.55 B parameters
    "llama-3.1-70b": {
        "model_type": "llama",
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "tie_word_embeddings": False,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    },
    # meta-llama/Llama-2-7b-hf: 6.74 B parameters
    "llama-2-7b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
}


class EstimateError(ValueError):
    """Inputs :func:`estimate_memory` cannot use; the message says what to pass."""


@dataclass
class MemoryEstimate:
    """Predicted memory of one steady-state training step (bytes unless noted)."""

    model: str
    method: str
    r: int
    batch: int
    seq: int
    dtype: str
    gradient_checkpointing: bool
    total_params: int  # logical parameters (a 4-bit weight counts out×in)
    trainable_params: int
    weight_bytes: int  # parameters and buffers as stored (4-bit packed where quantized)
    quant_state_bytes: int  # 4-bit scales (absmax, codes) outside parameters and buffers
    optimizer_state_bytes: int
    static_bytes: int  # all of the above: held between steps
    saved_activation_bytes: int  # what autograd keeps for backward (not parameters)
    kernel_transient_bytes: int  # largest in-kernel dequantization counted
    peak_forward_bytes: int
    peak_backward_bytes: int
    peak_optimizer_bytes: int
    peak_bytes: int
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def bytes_per_param(self) -> float:
        """Static bytes per logical parameter of the whole wrapped model."""
        return self.static_bytes / max(self.total_params, 1)

    def required_bytes(self) -> float:
        """The peak plus :data:`HEADROOM_FRACTION` of it plus :data:`HEADROOM_BYTES`."""
        return self.peak_bytes * (1 + HEADROOM_FRACTION) + HEADROOM_BYTES

    def fits(self, capacity_bytes: float) -> bool:
        """Whether :meth:`required_bytes` fits in ``capacity_bytes`` of device memory."""
        return self.required_bytes() <= capacity_bytes

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["bytes_per_param"] = self.bytes_per_param
        data["required_bytes"] = self.required_bytes()
        return data

    def summary(self) -> str:
        g = 1 / GIB
        ckpt = ", gradient checkpointing" if self.gradient_checkpointing else ""
        lines = [
            f"{self.model}: {self.method}, r={self.r}, batch {self.batch} × seq {self.seq}, "
            f"{self.dtype}{ckpt}",
            f"  parameters {self.total_params / 1e9:.3f} B, trainable "
            f"{self.trainable_params / 1e6:.2f} M",
            f"  weights {self.weight_bytes * g:.2f} GiB (+ 4-bit scales "
            f"{self.quant_state_bytes * g:.2f} GiB), optimizer state "
            f"{self.optimizer_state_bytes * g:.2f} GiB; {self.bytes_per_param:.2f} bytes/param",
            f"  saved activations {self.saved_activation_bytes * g:.2f} GiB, kernel transient "
            f"{self.kernel_transient_bytes * g:.2f} GiB",
            f"  peak {self.peak_bytes * g:.2f} GiB (forward {self.peak_forward_bytes * g:.2f}, "
            f"backward {self.peak_backward_bytes * g:.2f}, optimizer "
            f"{self.peak_optimizer_bytes * g:.2f}); with headroom {self.required_bytes() * g:.2f} GiB",
        ]
        return "\n".join(lines)


# ----------------------------------------------------------------------- model configs
def resolve_config(model: Any) -> tuple[str, Any]:
    """``(label, transformers config)`` from a config object, a dict, a known name
    (:data:`KNOWN_MODELS`), a ``config.json`` path or folder, or a hub id (config only)."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return getattr(model, "_name_or_path", "") or type(model).__name__, model
    if isinstance(model, dict):
        data = dict(model)
        kind = data.pop("model_type", "llama")
        return f"{kind} config", AutoConfig.for_model(kind, **data)
    if not isinstance(model, str) or not model:
        raise EstimateError(
            f"model must be a transformers config, a dict, a known name "
            f"({', '.join(sorted(KNOWN_MODELS))}), a config.json path or a hub id; got "
            f"{type(model).__name__}"
        )
    key = model.lower()
    if key in KNOWN_MODELS:
        data = dict(KNOWN_MODELS[key])
        return key, AutoConfig.for_model(data.pop("model_type"), **data)
    if key.startswith("bench-"):
        return key, _bench_config(key.removeprefix("bench-"))
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json" and path.is_file():
        data = json.loads(path.read_text())
        kind = data.pop("model_type", None)
        if kind is None:
            raise EstimateError(f"{path} has no model_type; is it a transformers config.json?")
        return str(path), AutoConfig.for_model(kind, **data)
    try:
        return model, AutoConfig.from_pretrained(model)
    except OSError as exc:
        raise EstimateError(
            f"model {model!r} is not a known name ({', '.join(sorted(KNOWN_MODELS))}, "
            f"bench-default, bench-quick, bench-tiny), not a config.json path, and its hub "
            f"config could not be read ({exc})"
        ) from exc


def _bench_config(preset: str) -> Any:
    """The LLaMA-style config of a ``paca bench`` preset."""
    from paca.bench.config import preset as bench_preset

    return _bench_config_from(bench_preset(preset))


# ----------------------------------------------------------------------- the dry run
def _storage_key(t: torch.Tensor) -> int | None:
    try:
        return int(t.untyped_storage()._cdata)
    except (RuntimeError, NotImplementedError, AttributeError):
        return None


def _unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        key = _storage_key(t)
        if key is not None:
            seen[key] = int(t.untyped_storage().nbytes())
    return sum(seen.values())


class StorageTracker(TorchDispatchMode):
    """Live and peak bytes of the storages operators create inside the mode (any device,
    meta included). Storages that existed before are not counted. With
    ``kernel_transients``, a bitsandbytes 4-bit GEMM also counts the dense weight it
    dequantizes internally while it runs."""

    def __init__(self, kernel_transients: bool = True) -> None:
        super().__init__()
        self.kernel_transients = kernel_transients
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.transient_peak = 0

    def reset_peak(self) -> None:
        self.peak = self.current

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {
            _storage_key(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
        }
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            key = _storage_key(t)
            if key is None or key in inputs or key in self.live:
                continue
            storage = t.untyped_storage()
            nbytes = int(storage.nbytes())
            self.live[key] = nbytes
            self.current += nbytes
            weakref.finalize(storage, self._free, key)
        extra = 0
        if self.kernel_transients and "bitsandbytes::gemm_4bit" in str(func._schema.name):
            a, shape = args[0], args[2]
            extra = int(shape[0]) * int(shape[1]) * a.element_size()
            self.transient_peak = max(self.transient_peak, extra)
        self.peak = max(self.peak, self.current + extra)
        return out


def _flash_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """SDPA as its flash kernels compute it (saves q, k, v, output and log-sum-exp)."""
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    return op(query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]


@contextlib.contextmanager
def _meta_safe() -> Iterator[None]:
    """A check that reads values, which meta tensors do not have: transformers looks for
    packed sequences in ``position_ids`` (a dry run's batch is never packed: the answer is
    None, as it is for real unpacked input). (PaCA's own storage check skips meta.)"""
    # On meta tensors PyTorch's SDPA falls back to the math kernel (it materializes the
    # s×s attention matrix); a device runs flash attention. (A patch of the function,
    # not a TorchFunctionMode: checkpointing recomputes in backward, outside the mode.)
    patches: list[tuple[Any, str, Any]] = [
        (torch.nn.functional, "scaled_dot_product_attention", _flash_sdpa),
    ]
    with contextlib.suppress(ImportError):
        import transformers.masking_utils as mu

        if hasattr(mu, "find_packed_sequence_indices"):
            patches.append((mu, "find_packed_sequence_indices", lambda position_ids: None))
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, value in patches:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


def _build_meta_model(config: Any, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    config.attn_implementation = "sdpa"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model.to(dtype)


def _apply_method(
    model: nn.Module,
    method: str,
    r: int,
    targets: list[str] | str,
    double_quant: bool,
    lora_alpha: float | None,
) -> nn.Module:
    if method in QUANTIZED:
        from paca.layers_quant import quantize_nf4

        quantize_nf4(model, "all-linear", double_quant=double_quant)
    if method in ("paca", "qpaca"):
        import paca

        return paca.wrap(
            model,
            paca.PacaConfig(r=r, target_modules=targets),
            backend="cpu",
            move_to_device=False,
        )
    if method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=r,
            lora_alpha=lora_alpha if lora_alpha is not None else r,
            lora_dropout=0.0,
            target_modules=targets,
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, cfg)
    model.requires_grad_(True)
    return model


def _hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PacaModel or PeftModel."""
    for _ in range(3):
        if hasattr(model, "gradient_checkpointing_enable") and not hasattr(model, "base_model"):
            return model
        inner = getattr(model, "model", None) if hasattr(model, "paca_layers") else None
        if inner is None:
            inner = getattr(getattr(model, "base_model", None), "model", None)
        if inner is None:
            return model
        model = inner
    return model


def _enable_checkpointing(model: nn.Module) -> None:
    hf = _hf_model(model)
    for name in ("activation_checkpointing_enable", "gradient_checkpointing_enable"):
        fn = getattr(hf, name, None)
        if callable(fn):
            kw = name.replace("_enable", "_kwargs")
            with contextlib.suppress(TypeError):
                fn(**{kw: {"use_reentrant": False}})
                return
            fn(gradient_checkpointing_kwargs={"use_reentrant": False})
            return
    raise EstimateError(f"{type(hf).__name__} has no gradient checkpointing switch")


def _logical_params(model: nn.Module) -> tuple[int, int]:
    total = trainable = 0
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        n = int(state.shape[0]) * int(state.shape[1]) if state is not None else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return total, trainable


def _quant_state_tensors(model: nn.Module) -> list[torch.Tensor]:
    out = []
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        if state is None:
            continue
        out += [t for t in (state.absmax, state.code, state.offset) if isinstance(t, torch.Tensor)]
        s2 = state.state2
        if s2 is not None:
            out += [t for t in (s2.absmax, s2.code) if isinstance(t, torch.Tensor)]
    return out


def estimate_memory(
    model: Any,
    method: str = "paca",
    *,
    r: int = 8,
    batch: int = 1,
    seq: int = 512,
    dtype: str = "bfloat16",
    gradient_checkpointing: bool = False,
    targets: list[str] | str | None = None,
    double_quant: bool = True,
    lora_alpha: float | None = None,
    kernel_transients: bool = True,
    optimizer_foreach: bool | None = None,
    device: str = "cuda",
) -> MemoryEstimate:
    """Predict the peak memory of a training step of ``model`` with ``method``.

    Args:
        model: a transformers config, a config dict, a name from :data:`KNOWN_MODELS`
            (``"llama-3-8b"``, ``"llama-3.1-70b"``, ``"llama-2-7b"``), ``"bench-<preset>"``
            (the ``paca bench`` models), a ``config.json`` path/folder, or a hub id (only
            its config is read).
        method: ``"paca"``, ``"qpaca"`` (PaCA on an NF4 base), ``"lora"`` (PEFT),
            ``"qlora"`` (PEFT LoRA on an NF4 base) or ``"full"``.
        r: rank (columns per layer for PaCA, LoRA rank); ``targets`` the adapted modules
            (default the attention and MLP projections). Quantized methods quantize
            every linear layer but the output head, as ``load_in_4bit`` does.
        batch, seq: sequences per step and tokens per sequence (loss on every token).
        dtype: weights and compute dtype (``bfloat16``, ``float16``, ``float32``).
        gradient_checkpointing: transformers' activation checkpointing (non-reentrant).
        kernel_transients: count the whole-weight dequantization inside bitsandbytes'
            4-bit GEMM while it runs (on for a device; a CPU dispatch-mode measurement
            cannot see it).
        optimizer_foreach: AdamW's multi-tensor implementation (default: True for
            ``device="cuda"``, as torch picks there; False for ``"cpu"``).
        device: ``"cuda"`` or ``"cpu"``: which defaults above apply.

    Nothing is allocated: the model lives on the meta device (see the module docs).
    """
    if method not in METHODS:
        raise EstimateError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if dtype not in DTYPES:
        raise EstimateError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    for name, value in (("r", r), ("batch", batch), ("seq", seq)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise EstimateError(f"{name} must be a positive int, got {value!r}")
    if device not in ("cuda", "cpu"):
        raise EstimateError(f"device must be 'cuda' or 'cpu', got {device!r}")
    foreach = (device == "cuda") if optimizer_foreach is None else bool(optimizer_foreach)
    label, config = resolve_config(model)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if vocab < 1:
        raise EstimateError(f"{label}: the config has no vocab_size (not a causal LM?)")
    target_list: list[str] | str = list(targets) if targets is not None else list(DEFAULT_TARGETS)
    if isinstance(targets, str):
        target_list = targets

    torch_dtype = DTYPES[dtype]
    with _meta_safe(), warnings_off():
        wrapped = _apply_method(
            _build_meta_model(config, torch_dtype), method, r, target_list, double_quant, lora_alpha
        )
        if gradient_checkpointing:
            _enable_checkpointing(wrapped)
        wrapped.train()
        trainable = [p for p in wrapped.parameters() if p.requires_grad]
        if not trainable:
            raise EstimateError(f"{method} on {label} trains nothing (check targets)")
        opt = torch.optim.AdamW(trainable, lr=1e-4, foreach=foreach)
        ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
        _step(wrapped, opt, ids)  # creates the optimizer state: the steady state starts
        opt.zero_grad(set_to_none=True)
        tensors = [*wrapped.parameters(), *wrapped.buffers()]
        weight_bytes = _unique_bytes(tensors)
        quant_bytes = _unique_bytes(_quant_state_tensors(wrapped))
        opt_tensors = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
        opt_bytes = _unique_bytes(opt_tensors)
        static = _unique_bytes([*tensors, *_quant_state_tensors(wrapped), *opt_tensors])
        excluded = {_storage_key(t) for t in tensors}
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            key = _storage_key(t)
            if key is not None and key not in excluded:
                saved[key] = int(t.untyped_storage().nbytes())
            return t

        tracker = StorageTracker(kernel_transients)
        with tracker:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = wrapped(input_ids=ids, labels=ids)
            forward = tracker.peak
            tracker.reset_peak()
            out.loss.backward()
            del out
            backward = max(forward, tracker.peak)
            tracker.reset_peak()
            opt.step()
            optimizer = tracker.peak
    total, n_trainable = _logical_params(wrapped)
    peak = static + max(backward, optimizer)
    return MemoryEstimate(
        model=label,
        method=method,
        r=r,
        batch=batch,
        seq=seq,
        dtype=dtype,
        gradient_checkpointing=gradient_checkpointing,
        total_params=total,
        trainable_params=n_trainable,
        weight_bytes=weight_bytes,
        quant_state_bytes=quant_bytes,
        optimizer_state_bytes=opt_bytes,
        static_bytes=static,
        saved_activation_bytes=sum(saved.values()),
        kernel_transient_bytes=tracker.transient_peak,
        peak_forward_bytes=static + forward,
        peak_backward_bytes=static + backward,
        peak_optimizer_bytes=static + optimizer,
        peak_bytes=peak,
        settings={
            "device": device,
            "targets": target_list,
            "double_quant": double_quant,
            "kernel_transients": kernel_transients,
            "optimizer": f"AdamW ({'foreach' if foreach else 'for-loop'})",
            "attention": "flash (SDPA)",
        },
    )


def _step(model: nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    opt.step()


@contextlib.contextmanager
def warnings_off() -> Iterator[None]:
    import logging
    import warnings

    loggers = [logging.getLogger(n) for n in ("transformers", "peft", "bitsandbytes", "paca")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


# ----------------------------------------------------------------------- validation
def validate(
    preset: str = "tiny",
    methods: Iterable[str] = METHODS,
    *,
    gradient_checkpointing: bool = False,
    **overrides: Any,
) -> list[dict[str, Any]]:
    """Measured vs estimated peak of each method on a ``paca bench`` preset, on this CPU.

    The measurement is ``paca bench``'s own (:func:`paca.bench.measure.probe_memory`:
    parameters, buffers and optimizer state plus a dispatch-mode tracker's peak during a
    steady-state step); the estimate is :func:`estimate_memory` with the CPU defaults and
    without kernel transients (that tracker cannot see inside a kernel either).
    """
    from paca.bench.config import preset as bench_preset
    from paca.bench.measure import probe_memory
    from paca.bench.methods import build_method, make_batch, train_step
    from paca.bench.runner import resolve_backend

    cfg = bench_preset(preset, **overrides)
    backend = resolve_backend("cpu")
    rows = []
    for method in methods:
        setup = build_method(method, cfg, backend)
        if gradient_checkpointing:
            _enable_checkpointing(setup.model)
        ids = make_batch(cfg, cfg.seq, backend.device())
        with warnings_off():
            train_step(setup, ids)  # optimizer state exists: the steady state
            measured = probe_memory(setup, ids, backend)
        est = estimate_memory(
            _bench_config_from(cfg),
            method,
            r=cfg.r,
            batch=cfg.batch,
            seq=cfg.seq,
            dtype=cfg.dtype,
            gradient_checkpointing=gradient_checkpointing,
            targets=list(cfg.targets),
            kernel_transients=False,
            device="cpu",
        )
        rows.append(
            {
                "preset": preset,
                "method": method,
                "gradient_checkpointing": gradient_checkpointing,
                "measured_peak_bytes": measured.peak_bytes,
                "estimated_peak_bytes": est.peak_bytes,
                "error": est.peak_bytes / measured.peak_bytes - 1,
                "measured_static_bytes": measured.static_bytes,
                "estimated_static_bytes": est.static_bytes,
            }
        )
    return rows


def _bench_config_from(cfg: Any) -> Any:
    from paca.tiny import VOCAB_SIZE, llama_config

    out = llama_config(
        vocab_size=cfg.vocab_size or VOCAB_SIZE,
        hidden=cfg.hidden,
        layers=cfg.layers,
        heads=cfg.heads,
        kv_heads=cfg.kv_heads,
        intermediate=cfg.intermediate,
        max_positions=max(cfg.seq_search_max, max(cfg.probe_lengths())),
    )
    out._name_or_path = f"bench ({cfg.hidden}×{cfg.layers})"
    return out
