"""PaCA on a 4-bit NF4 frozen base (QPaCA): the core op and the bitsandbytes calls.

The base weight stays packed (bitsandbytes ``Params4bit``, two 4-bit codes per byte plus
per-block scales) and is never written. The trained change is the ``out×r`` delta on
the ``r`` selected input columns, applied by decomposition:

* forward ``y = x·dequant(W)ᵀ + x_sel·deltaᵀ + b``: the first term is bitsandbytes'
  4-bit GEMM, the second an ``(N, r) × (r, out)`` product added in place;
* backward ``dX = dY·dequant(W)`` plus ``dY·delta`` added into the ``r`` columns, and
  ``d(delta) = dYᵀ·x_sel`` accumulated in fp32 (:meth:`Backend.delta_grad`).

What autograd keeps between forward and backward is ``x[..., idx]`` (r of the ``in``
input channels), ``delta`` and ``idx``; the packed weight and its quantization state are
held by reference (they are the layer's own tensors, not copies). No dequantized weight
survives a call. Where a kernel dequantizes internally, that is a *transient* of the
kernel, alive only inside one call and freed before it returns: bitsandbytes' CPU
``gemm_4bit`` (forward) dequantizes the whole ``out×in`` weight in the compute dtype,
and the input gradient needs ``dequant(W)`` for one GEMM (``dequantize_4bit``, as
bitsandbytes' own ``MatMul4Bit.backward`` does). :func:`dequant_transient_bytes` gives
that size; ``paca estimate`` counts it.

The core (:func:`paca_linear_4bit`) handles dtypes like :mod:`paca.ops`: autocast's
dtype, else the layer's ``compute_dtype``, else the input's; capability (``"nf4"`` plus
the compute dtype) and contract checks; the bias gradient. How the step is computed is
the backend's (:meth:`Backend.quantized_linear_forward` /
:meth:`Backend.quantized_linear_backward`); their defaults call the helpers below, which
import bitsandbytes lazily (``import paca`` never imports it).

Graph mode: the quantization state is a Python object, not a tensor, so this op is a
plain ``autograd.Function`` (no ``torch.library`` custom op); ``torch.compile`` runs it
eagerly (a graph break per 4-bit layer).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from paca import backend_call as bc
from paca.backend_abc import Backend, BackendCapabilityError, BackendContractError
from paca.ops import BASE_WEIGHT_GRAD_MESSAGE, autocast_dtype, backend_for_key, no_autocast
from paca.ops import backend_key as _backend_key
from paca.steps import queue_backward_end

#: The backend capability a 4-bit base needs.
NF4 = "nf4"
#: Oldest bitsandbytes whose CPU backend runs ``Linear4bit`` forward, input gradient and
#: ``dequantize_4bit`` (the multi-backend CPU kernels); checked by :func:`nf4_kernel_problem`.
MIN_BNB_VERSION = (0, 45, 0)
INSTALL_HINT = "pip install -U 'bitsandbytes>=0.45'"


# ------------------------------------------------------------------ bitsandbytes calls
def bnb_version() -> str:
    """The installed bitsandbytes version, or ``"not installed"`` (imports it)."""
    try:
        import bitsandbytes
    except ImportError:
        return "not installed"
    return str(getattr(bitsandbytes, "__version__", "unknown"))


def _version_tuple(text: str) -> tuple[int, ...]:
    out = []
    for part in text.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


@functools.cache
def nf4_kernel_problem(device_type: str) -> str | None:
    """Why bitsandbytes cannot run QPaCA's 4-bit kernels on ``device_type``, else None.

    Probes once per process and device type: quantize a 64×64 weight to NF4, run the
    4-bit GEMM and ``dequantize_4bit``, and compare with a dense GEMM. The message names
    the bitsandbytes version and what to do.
    """
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    except ImportError as exc:
        return (
            f"bitsandbytes is not importable ({exc}); QPaCA (4-bit NF4 bases) needs it: "
            f"{INSTALL_HINT}"
        )
    except Exception as exc:  # a broken install raises all sorts of things on import
        return (
            f"bitsandbytes failed to import ({type(exc).__name__}: {exc}); reinstall it: "
            f"{INSTALL_HINT}"
        )
    version = bnb_version()
    if _version_tuple(version) < MIN_BNB_VERSION:
        return (
            f"bitsandbytes {version} has no {device_type} kernels for 4-bit NF4 layers "
            f"(QPaCA needs >= {'.'.join(map(str, MIN_BNB_VERSION))}): {INSTALL_HINT}"
        )
    try:
        gen = torch.Generator().manual_seed(0)
        w = (torch.randn(64, 64, generator=gen) * 0.1).to(device_type)
        x = torch.randn(3, 64, generator=gen).to(device_type)
        packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
        dense = bnbf.dequantize_4bit(packed, state)
        with torch.no_grad():
            y = bnb.matmul_4bit(x, packed.t(), quant_state=state)
        ref = x @ dense.t()
        err = float((y - ref).abs().max()) / max(float(ref.abs().max()), 1e-12)
        wq = float((dense - w).abs().max())
        if not err < 1e-3 or not wq < 0.1:
            return (
                f"bitsandbytes {version}'s 4-bit NF4 kernels on {device_type} give wrong "
                f"results (GEMM error {err:.2e}, dequantization error {wq:.2e}); upgrade: "
                f"{INSTALL_HINT}"
            )
    except Exception as exc:
        return (
            f"bitsandbytes {version} cannot run 4-bit NF4 kernels on {device_type} "
            f"({type(exc).__name__}: {str(exc).strip()[:200]}); upgrade it ({INSTALL_HINT}), "
            f"or load the model unquantized"
        )
    return None


def check_quant_state(quant_state: Any, what: str) -> None:
    """Refuse quantization states the QPaCA kernels cannot read, naming ``what``."""
    if quant_state is None:
        raise ValueError(
            f"{what}: its 4-bit weight has no quant_state (not quantized yet); move the "
            f"layer to its device first (layer.to('cpu') or .to('cuda') quantizes it)"
        )
    if getattr(quant_state, "packing_format_for_cpu", False):
        raise ValueError(
            f"{what}: its 4-bit weight was repacked by bitsandbytes for CPU inference "
            f"(packing_format_for_cpu, done by an eval-mode forward on AVX512-BF16 CPUs); "
            f"reload the model, or wrap it before running it in eval mode"
        )
    shape = getattr(quant_state, "shape", None)
    if shape is None or len(shape) != 2:
        raise ValueError(f"{what}: its 4-bit quant_state has shape {shape}, expected (out, in)")


def nf4_dequantize(
    qweight: torch.Tensor, quant_state: Any, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``dequant(W)`` as a new dense ``(out, in)`` tensor in ``dtype`` (default: the
    dtype the weight was quantized from). A transient: callers drop it after one use."""
    import bitsandbytes.functional as bnbf

    w = bnbf.dequantize_4bit(qweight.data if hasattr(qweight, "data") else qweight, quant_state)
    return w if dtype is None or w.dtype == dtype else w.to(dtype)


def nf4_linear(
    x: torch.Tensor, qweight: torch.Tensor, quant_state: Any, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x·dequant(W)ᵀ + bias`` with bitsandbytes' 4-bit GEMM (no autograd graph)."""
    import bitsandbytes as bnb

    with torch.no_grad():
        return bnb.matmul_4bit(x, qweight.t(), quant_state=quant_state, bias=bias)


def nf4_input_grad(grad_out: torch.Tensor, qweight: torch.Tensor, quant_state: Any) -> torch.Tensor:
    """``dY·dequant(W)``; ``dequant(W)`` lives only for this one GEMM."""
    w = nf4_dequantize(qweight, quant_state, grad_out.dtype)
    return grad_out.matmul(w)


def dequant_transient_bytes(out_features: int, in_features: int, dtype: torch.dtype) -> int:
    """Bytes of the dense weight a 4-bit kernel materializes for one call."""
    return out_features * in_features * torch.empty((), dtype=dtype).element_size()


# ------------------------------------------------------------------ capability
def require_nf4(backend: Backend, what: str) -> None:
    """Raise unless ``backend`` declares ``"nf4"`` and its kernels work here."""
    if NF4 not in backend.capabilities:
        declared = ", ".join(sorted(backend.capabilities)) or "nothing"
        raise BackendCapabilityError(
            f"paca backend {backend.name!r} does not declare the {NF4!r} capability, so it "
            f"cannot compute PaCA on the 4-bit base of {what} (it declares: {declared}). "
            f"Use a backend that does (paca.use_backend('cpu') or 'cuda'), or load the model "
            f"unquantized (without a 4-bit BitsAndBytesConfig)"
        )
    problem = backend.capability_problem(NF4)
    if problem:
        raise BackendCapabilityError(
            f"paca backend {backend.name!r} declares {NF4!r}, but it cannot be used for "
            f"{what}: {problem}"
        )


def _owns_storage(b: Backend, member: str, got: torch.Tensor, source: torch.Tensor) -> None:
    if got.is_meta or source.is_meta:  # no storage to share (paca estimate's dry run)
        return
    bc.check_owns_storage(b, member, "x_sel", got, source)


# ------------------------------------------------------------------ the math, once
def _forward_impl(
    x: torch.Tensor,
    qweight: torch.Tensor,
    quant_state: Any,
    bias: torch.Tensor | None,
    delta: torch.Tensor,
    idx: torch.Tensor,
    b: Backend,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    bc.require_dtype(b, dtype, "this QPaCA (4-bit) linear layer")
    out_features = int(quant_state.shape[0])
    member = "quantized_linear_forward"
    with no_autocast(x.device.type):
        x = x.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        d = bc.delta_for(b, delta)
        out = bc.call(b, member, b.quantized_linear_forward, x, qweight, quant_state, bias, d, idx)
    y, x_sel = bc.check_pair(b, member, out)
    lead = tuple(x.shape[:-1])
    bc.check_tensor(b, member, "y", y, (*lead, out_features), dtype)
    bc.check_tensor(b, member, "x_sel", x_sel, (*lead, idx.shape[0]), dtype)
    _owns_storage(b, member, x_sel, x)
    return y, x_sel


def _backward_impl(
    grad_out: torch.Tensor,
    x_sel: torch.Tensor,
    qweight: torch.Tensor,
    quant_state: Any,
    delta: torch.Tensor,
    idx: torch.Tensor,
    b: Backend,
    need_input_grad: bool,
    need_delta_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    dtype = x_sel.dtype
    member = "quantized_linear_backward"
    with no_autocast(grad_out.device.type):
        g = grad_out.to(dtype)
        d = bc.delta_for(b, delta)
        out = bc.call(
            b,
            member,
            b.quantized_linear_backward,
            g,
            x_sel,
            qweight,
            quant_state,
            d,
            idx,
            need_input_grad,
            need_delta_grad,
        )
    grad_x, grad_delta = bc.check_pair(b, member, out)
    lead = tuple(g.shape[:-1])
    if need_input_grad:
        bc.check_tensor(b, member, "grad_x", grad_x, (*lead, int(quant_state.shape[1])), dtype)
    if need_delta_grad:
        bc.check_tensor(b, member, "grad_delta", grad_delta, tuple(d.shape), d.dtype)
    return grad_x, grad_delta


class PacaLinear4bitFunction(torch.autograd.Function):
    """``y = x·(dequant(W) + scatter(delta))ᵀ + b`` saving only ``x[..., idx]``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        qweight: torch.Tensor,
        bias: torch.Tensor | None,
        delta: torch.Tensor,
        idx: torch.Tensor,
        quant_state: Any,
        key: str,
        dtype: torch.dtype,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        b = backend_for_key(key)
        y, x_sel = _forward_impl(x, qweight, quant_state, bias, delta, idx, b, dtype)
        ctx.save_for_backward(x_sel, delta, idx)
        # the layer's own packed weight and state, by reference: no copy, nothing of the
        # weight's size is added to what autograd keeps
        ctx.qweight, ctx.quant_state = qweight, quant_state
        ctx.backend_key, ctx.x_dtype = key, x.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y if y.dtype == out_dtype else y.to(out_dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x_sel, delta, idx = ctx.saved_tensors
        b = backend_for_key(ctx.backend_key)
        need_x, need_delta = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[3])
        grad_x = grad_delta = None
        if need_x or need_delta:
            grad_x, grad_delta = _backward_impl(
                grad_out, x_sel, ctx.qweight, ctx.quant_state, delta, idx, b, need_x, need_delta
            )
        if grad_x is not None:
            grad_x = grad_x.to(ctx.x_dtype)
        if grad_delta is not None:
            grad_delta = grad_delta.to(delta.dtype)
        grad_bias = None
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).float().sum(0).to(ctx.bias_dtype)
        queue_backward_end(b)
        return grad_x, None, grad_bias, grad_delta, None, None, None, None, None


def paca_linear_4bit(
    x: torch.Tensor,
    qweight: torch.Tensor,
    quant_state: Any,
    bias: torch.Tensor | None,
    delta: torch.Tensor,
    idx: torch.Tensor,
    backend: Backend,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """QPaCA linear: ``x·(dequant(W) + scatter(delta))ᵀ + bias``, saving ``x[..., idx]``.

    ``qweight``/``quant_state`` are a bitsandbytes ``Params4bit`` and its ``quant_state``
    (NF4, with or without double quantization). The op computes in autocast's dtype when
    active, else in ``compute_dtype`` (the layer's ``compute_dtype``), else in
    ``x.dtype``; the output is in the compute dtype under autocast and in ``x.dtype``
    otherwise (as bitsandbytes' ``Linear4bit``). ``d(delta)`` is accumulated in fp32.
    """
    if getattr(qweight, "requires_grad", False) and torch.is_grad_enabled():
        raise RuntimeError(BASE_WEIGHT_GRAD_MESSAGE)
    if NF4 not in backend.capabilities:
        require_nf4(backend, "this layer")
    if not isinstance(idx, torch.Tensor) or idx.dim() != 1:
        raise BackendContractError("QPaCA: idx must be a 1-D index tensor")
    auto = autocast_dtype(x.device.type)
    dtype = auto or compute_dtype or x.dtype
    out_dtype = dtype if auto is not None else x.dtype
    key = _backend_key(backend)
    return PacaLinear4bitFunction.apply(
        x, qweight, bias, delta, idx, quant_state, key, dtype, out_dtype
    )
