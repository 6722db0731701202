"""``TraceBackend``: computes with another backend and records every call paca makes.

Use it to see what PaCA asks a device to do (one fused forward and one fused backward per
layer step, which shapes and dtypes reach them, where time goes, which columns merges
write) and to find the first call that produces a NaN or Inf. The backend named
``"trace"`` wraps the CPU reference; :func:`traced` makes a tracing twin of any other
backend (``"trace-cuda"``, ...).

It uses only paca's public API (``paca.Backend``, ``paca.list_backends``,
``paca.backend``), as a third-party backend should.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import paca
import torch
from paca.environment import env_flag
from torch import nn

from paca_example_backend.trace import Trace, TraceEvent

Pair = tuple[int, int]

#: Set to 1 to make every tracing backend stop at the first non-finite result.
CHECK_FINITE_ENV = "PACA_TRACE_CHECK_FINITE"


class NonFiniteError(FloatingPointError):
    """A call produced NaN or Inf (raised only with finite-checking on)."""


def _cpu_backend() -> type[paca.Backend]:
    from paca_cpu import CPUBackend

    return CPUBackend


class TraceBackend(paca.Backend):
    """Delegates to ``inner_cls`` (the CPU reference for ``"trace"``) and records calls.

    ``trace`` holds the record (see :class:`~paca_example_backend.trace.Trace`).
    ``check_finite`` (or ``PACA_TRACE_CHECK_FINITE=1``) checks every result and raises
    :class:`NonFiniteError` naming the call and the optimizer step; ``sync_timing``
    synchronizes the device around each call so times are per call on async devices.
    """

    name: ClassVar[str] = "trace"
    device_type: ClassVar[str] = "cpu"
    api_version: ClassVar[tuple[int, int]] = (2, 0)  # the backend API this was written for
    priority: ClassVar[int | None] = None  # debugging only: never auto-selected
    #: What the wrapped backend declares (the CPU reference for "trace"; traced() copies
    #: the inner class's declarations).
    capabilities: ClassVar[frozenset[str]] = frozenset(
        {"float32", "bfloat16", "float16", "compile", "nf4"}
    )
    wants_step_hooks: ClassVar[bool] = True  # to number steps; the inner's hooks still run
    #: The wrapped backend class; ``None`` means the CPU reference.
    inner_cls: ClassVar[type[paca.Backend] | None] = None

    def __init__(
        self,
        inner: paca.Backend | None = None,
        *,
        check_finite: bool | None = None,
        sync_timing: bool = False,
        max_events: int = 100_000,
    ) -> None:
        self.inner = inner if inner is not None else self._default_inner()
        self.trace = Trace(max_events)
        if check_finite is None:
            check_finite = env_flag(CHECK_FINITE_ENV)
        self.check_finite = check_finite
        self.sync_timing = sync_timing

    @classmethod
    def _inner_class(cls) -> type[paca.Backend]:
        return cls.inner_cls or _cpu_backend()

    def _default_inner(self) -> paca.Backend:
        inner_cls = self._inner_class()
        try:  # share the process's instance of the wrapped backend when it is registered
            with paca.backend(inner_cls.name) as found:
                if isinstance(found, inner_cls):
                    return found
        except Exception:  # noqa: BLE001 - not registered under that name: make our own
            pass
        return inner_cls()

    # ------------------------------------------------------------------ discovery
    @classmethod
    def is_available(cls) -> bool:
        try:
            return bool(cls._inner_class().is_available())
        except Exception:  # noqa: BLE001 - must never raise
            return False

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if cls.is_available():
            return None
        inner = cls._inner_class()
        try:
            why = inner.unavailable_reason()
        except Exception as exc:  # noqa: BLE001
            why = f"{type(exc).__name__}: {exc}"
        return f"the traced backend {inner.name!r} is unavailable: {why}"

    def device(self, index: int | None = None) -> torch.device:
        return self.inner.device(index)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "inner": self.inner.describe(),
            "calls": sum(self.trace.calls.values()),
        }

    # ------------------------------------------------------------------ recording
    def _record(self, call: str, args: tuple[Any, ...], seconds: float) -> None:
        if torch.compiler.is_compiling():  # never put Python bookkeeping into a graph
            return
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        self.trace.record(
            TraceEvent(
                self.trace.step,
                call,
                tuple(tuple(t.shape) for t in tensors),
                tuple(str(t.dtype).removeprefix("torch.") for t in tensors),
                seconds,
            )
        )

    def _call(self, call: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():  # never put Python bookkeeping into a graph
            return fn(*args, **kwargs)
        if self.sync_timing:
            self.inner.synchronize()
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        if self.sync_timing:
            self.inner.synchronize()
        self._record(call, args, time.perf_counter() - start)
        if self.check_finite:
            self._check_finite(call, [a for a in args if isinstance(a, torch.Tensor)], out)
        return out

    def _check_finite(self, call: str, inputs: list[torch.Tensor], out: Any) -> None:
        # write_columns returns None: its result is what it wrote (the columns argument).
        if isinstance(out, torch.Tensor):
            results = [out]
        elif isinstance(out, tuple | list):
            results = [o for o in out if isinstance(o, torch.Tensor)]
        else:
            results = inputs[-1:]
        bad = [r for r in results if r.is_floating_point() and not torch.isfinite(r).all()]
        if not bad:
            return
        bad_inputs = [
            f"argument {i} {tuple(t.shape)}"
            for i, t in enumerate(inputs)
            if t.is_floating_point() and not torch.isfinite(t).all()
        ]
        origin = (
            f"its inputs were already non-finite ({', '.join(bad_inputs)}), so the problem "
            f"started earlier (look at the forward of the layer before, or the loss)"
            if bad_inputs and out is not None
            else "its inputs were finite: this call is where NaN/Inf first appeared"
        )
        raise NonFiniteError(
            f"paca trace: {call} produced NaN/Inf at optimizer step {self.trace.step} "
            f"(result shape {tuple(bad[0].shape)}, {bad[0].dtype}); {origin}. "
            f"Unset {CHECK_FINITE_ENV} or set backend.check_finite = False to continue anyway."
        )

    # ------------------------------------------------------------------ fused ops
    # What paca's layers call: one forward and one backward per PaCA layer step. Each is
    # recorded and computed by the wrapped backend's own fused op (its kernels, its column
    # strategy), so tracing never changes what is computed.
    def linear_forward(self, x, weight, bias, delta, idx):  # type: ignore[no-untyped-def]
        return self._call("linear_forward", self.inner.linear_forward, x, weight, bias, delta, idx)

    def linear_backward(  # type: ignore[no-untyped-def]
        self, grad_out, x_sel, weight, delta, idx, need_input_grad, need_delta_grad
    ):
        return self._call(
            "linear_backward", self.inner.linear_backward, grad_out, x_sel, weight, delta, idx,
            need_input_grad, need_delta_grad,
        )  # fmt: skip

    def conv2d_forward(  # type: ignore[no-untyped-def]
        self, x, weight, bias, delta, idx, stride, padding, dilation
    ):
        return self._call(
            "conv2d_forward", self.inner.conv2d_forward, x, weight, bias, delta, idx, stride,
            padding, dilation,
        )  # fmt: skip

    def conv2d_backward(  # type: ignore[no-untyped-def]
        self, grad_out, x_sel, weight, delta, idx, input_shape, stride, padding, dilation,
        need_input_grad, need_delta_grad,
    ):  # fmt: skip
        return self._call(
            "conv2d_backward", self.inner.conv2d_backward, grad_out, x_sel, weight, delta, idx,
            input_shape, stride, padding, dilation, need_input_grad, need_delta_grad,
        )  # fmt: skip

    def quantized_linear_forward(  # type: ignore[no-untyped-def]
        self, x, qweight, quant_state, bias, delta, idx
    ):
        return self._call(
            "quantized_linear_forward", self.inner.quantized_linear_forward, x, qweight,
            quant_state, bias, delta, idx,
        )  # fmt: skip

    def quantized_linear_backward(  # type: ignore[no-untyped-def]
        self, grad_out, x_sel, qweight, quant_state, delta, idx, need_input_grad, need_delta_grad
    ):
        return self._call(
            "quantized_linear_backward", self.inner.quantized_linear_backward, grad_out, x_sel,
            qweight, quant_state, delta, idx, need_input_grad, need_delta_grad,
        )  # fmt: skip

    @contextmanager
    def columns_applied(
        self, weight: torch.Tensor, idx: torch.Tensor, delta: torch.Tensor
    ) -> Iterator[None]:
        self._record("columns_applied", (weight, idx, delta), 0.0)
        with self.inner.columns_applied(weight, idx, delta):
            yield

    def capability_problem(self, name: str) -> str | None:
        return self.inner.capability_problem(name)

    # --------------------------------------------------------- compute primitives
    # Called directly by paca too: write_columns/read_columns by merge and unmerge.
    def gather(self, x: torch.Tensor, idx: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return self._call("gather", self.inner.gather, x, idx, dim=dim)

    def delta_grad(
        self, grad_out: torch.Tensor, x_sel: torch.Tensor, out_dtype: torch.dtype
    ) -> torch.Tensor:
        return self._call("delta_grad", self.inner.delta_grad, grad_out, x_sel, out_dtype)

    def write_columns(self, weight: torch.Tensor, idx: torch.Tensor, columns: torch.Tensor) -> None:
        self._call("write_columns", self.inner.write_columns, weight, idx, columns)

    def read_columns(self, weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self._call("read_columns", self.inner.read_columns, weight, idx)

    def linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        return self._call("linear", self.inner.linear, x, weight, bias)

    def input_grad(self, grad_out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self._call("input_grad", self.inner.input_grad, grad_out, weight)

    def conv2d(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stride: Pair,
        padding: Pair,
        dilation: Pair,
    ) -> torch.Tensor:
        return self._call("conv2d", self.inner.conv2d, x, weight, bias, stride, padding, dilation)

    def conv2d_input_grad(
        self,
        grad_out: torch.Tensor,
        weight: torch.Tensor,
        input_shape: tuple[int, ...],
        stride: Pair,
        padding: Pair,
        dilation: Pair,
    ) -> torch.Tensor:
        fn = self.inner.conv2d_input_grad
        return self._call(
            "conv2d_input_grad", fn, grad_out, weight, input_shape, stride, padding, dilation
        )

    def conv2d_delta_grad(
        self,
        grad_out: torch.Tensor,
        x_sel: torch.Tensor,
        delta_shape: tuple[int, ...],
        stride: Pair,
        padding: Pair,
        dilation: Pair,
        out_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        fn = self.inner.conv2d_delta_grad
        return self._call(
            "conv2d_delta_grad", fn, grad_out, x_sel, delta_shape, stride, padding, dilation,
            out_dtype,
        )  # fmt: skip

    # ------------------------------------------------------- step and graph hooks
    def on_backward_end(self) -> None:
        self.trace.backward_passes += 1
        if self.inner.wants_step_hooks:
            self.inner.on_backward_end()

    def on_optimizer_step(self) -> None:
        self.trace.step += 1
        if self.inner.wants_step_hooks:
            self.inner.on_optimizer_step()

    def compile_backend(self) -> str | None:
        return self.inner.compile_backend()

    def prepare_for_inference(self, model: nn.Module) -> nn.Module:
        return self.inner.prepare_for_inference(model)

    def synchronize(self) -> None:
        self.inner.synchronize()

    def memory_allocated(self) -> int | None:
        return self.inner.memory_allocated()

    def max_memory_allocated(self) -> int | None:
        return self.inner.max_memory_allocated()

    def reset_peak_memory(self) -> None:
        self.inner.reset_peak_memory()


def traced(inner: str | type[paca.Backend]) -> type[TraceBackend]:
    """A tracing twin of another backend, named ``"trace-<name>"``.

    ``paca.register_backend(traced("cuda")); paca.use_backend("trace-cuda")`` runs on
    CUDA with every call recorded. ``inner`` is a registered backend name or a Backend
    class.
    """
    if isinstance(inner, str):
        infos = {i.name: i for i in paca.list_backends()}
        if inner not in infos or infos[inner].cls is None:
            raise paca.UnknownBackendError(
                f"cannot trace unknown backend {inner!r}; installed: {', '.join(infos)}"
            )
        inner_cls: type[paca.Backend] = infos[inner].cls  # type: ignore[assignment]
    elif isinstance(inner, type) and issubclass(inner, paca.Backend):
        inner_cls = inner
    else:
        raise TypeError(f"traced() takes a backend name or Backend class, not {inner!r}")
    if issubclass(inner_cls, TraceBackend):
        raise TypeError(f"{inner_cls.name!r} already traces; trace its inner backend instead")
    return type(
        f"Trace{inner_cls.__name__}",
        (TraceBackend,),
        {
            "__module__": __name__,
            "name": f"trace-{inner_cls.name}",
            "device_type": inner_cls.device_type,
            "capabilities": inner_cls.capabilities,
            "deterministic": inner_cls.deterministic,
            "inner_cls": inner_cls,
        },
    )
