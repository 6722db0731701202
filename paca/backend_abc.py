"""The `Backend` interface: the only thing the core knows about devices.

The core decides *what* PaCA computes (which columns, what the effective weight is,
which gradients exist). A backend decides *how* a device computes those few
primitives and what has to happen at step boundaries (Gaudi lazy mode needs
``mark_step``; CUDA does not). Keep this interface small: every method here is a
promise every backend, including third-party plugins, must keep and the
conformance suite in :mod:`paca.testing` checks (``paca.testing.check_backend(name)``
reports which contract item a backend breaks and why). The walk-through and the
reference for every member are in ``docs/writing-a-backend.md``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # pragma: no cover - typing only; keeps `import paca` light
    import torch
    from torch import nn

#: Version of the backend API as ``(major, minor)``. A plugin declares the version it was
#: written against in ``Backend.api_version``. Minor versions only add members with
#: defaults, so a plugin for an older minor keeps loading; a different major (or a minor
#: newer than this paca knows) is refused with a message naming the plugin.
BACKEND_API_VERSION: tuple[int, int] = (2, 0)

#: Capability names a backend may declare in ``Backend.capabilities``; each one is read
#: by the core and exercised by the conformance suite (``docs/writing-a-backend.md``).
KNOWN_CAPABILITIES = frozenset(
    {
        "float32",  # the dtypes the core may hand the backend (x, weight, bias, grad_out)
        "bfloat16",
        "float16",
        "compile",  # torch.compile(fullgraph=True) of a PaCA layer without graph breaks
        "graphs",  # device graph capture (CUDA graphs, HPU graphs) of forward and backward
        "lazy",  # lazy graph mode: the core calls the step hooks (needs wants_step_hooks)
        "nf4",  # 4-bit NF4 frozen bases (bitsandbytes Linear4bit), see quantized_linear_*
    }
)

#: The dtype capability for each floating dtype.
DTYPE_CAPABILITY = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for on a machine where it cannot run."""


class BackendCapabilityError(TypeError):
    """The core was asked to hand a backend a dtype or mode it does not declare."""


class BackendContractError(RuntimeError):
    """A backend broke the contract at run time (wrong shape/dtype, or it raised)."""


class Backend(ABC):
    """How one kind of device computes PaCA.

    Two levels, so that a new backend needs only a handful of methods and a vendor can
    still fuse everything:

    * **Fused ops** (:meth:`linear_forward`, :meth:`linear_backward`,
      :meth:`conv2d_forward`, :meth:`conv2d_backward`): the whole PaCA layer step. The
      defaults here are built from the primitives below with the *column swap*: the
      ``r`` trained columns of ``weight`` are overwritten with ``round(W[:, idx] + delta)``
      for the one GEMM that needs them and restored bit for bit right after (also on
      an exception), so no O(out·in) tensor is written per call. A vendor may replace
      them with one kernel computing ``x·Wᵀ + x_sel·deltaᵀ`` without touching W.
    * **Primitives**: :meth:`gather`, :meth:`delta_grad`, :meth:`write_columns`
      (abstract), and :meth:`read_columns`, :meth:`linear`, :meth:`input_grad` and the
      conv primitives (plain-torch defaults).

    Subclasses set ``name`` (what users pass to :func:`paca.use_backend`),
    ``device_type`` and implement :meth:`is_available`. The CPU backend (``paca_cpu``)
    is the reference implementation; ``paca.testing`` checks every backend against a
    dense autograd computation that defines correct results.

    Shapes: ``x`` is ``(..., in)``; ``weight`` is ``(out, in)`` (possibly a transposed
    view, as for transformers ``Conv1D``); ``idx`` is a 1-D int64 tensor of the ``r``
    trained input columns (unsorted, on the weight's device); ``delta`` is ``(out, r)``.
    The core guarantees: ``x``, ``weight``, ``bias`` and ``grad_out`` share one dtype the
    backend declares; ``delta`` is a floating tensor (any dtype); the op is never called
    with ``weight.requires_grad`` in grad mode.
    """

    #: Name users select the backend by, e.g. ``"cpu"``, ``"cuda"``, ``"hpu"``.
    name: ClassVar[str]
    #: torch device type the backend's tensors live on.
    device_type: ClassVar[str]
    #: Backend API ``(major, minor)`` this class was written against (an int means minor 0).
    api_version: ClassVar[tuple[int, int] | int] = BACKEND_API_VERSION
    #: Auto-detection priority; higher wins among available backends. ``None`` means
    #: "only when asked for by name". A third-party backend is auto-selected only when
    #: its own class body sets a priority above the built-ins' (docs/writing-a-backend.md).
    priority: ClassVar[int | None] = None
    #: What the backend supports; see :data:`KNOWN_CAPABILITIES`.
    capabilities: ClassVar[frozenset[str]] = frozenset({"float32"})
    #: Whether the same inputs always give bit-identical outputs and gradients. The
    #: conformance suite checks it unless this is False.
    deterministic: ClassVar[bool] = True
    #: How the default fused ops apply the trained columns: ``"swap"`` (write them into
    #: the weight for the one GEMM that needs them, then restore them exactly),
    #: ``"decompose"`` (``x·Wᵀ + x_sel·deltaᵀ`` and ``dY·W`` plus ``dY·delta`` added into
    #: the r columns: W is never written, so concurrent calls on one layer are safe) or
    #: ``"auto"`` (per call, whichever writes fewer bytes; see docs/architecture.md).
    column_strategy: ClassVar[str] = "auto"

    # ----------------------------------------------------------------- discovery
    @classmethod
    @abstractmethod
    def is_available(cls) -> bool:
        """Whether this machine can run the backend. Must never raise."""

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why :meth:`is_available` is false (an actionable sentence), else None."""
        return None if cls.is_available() else f"backend {cls.name!r} reports it is unavailable"

    def device(self, index: int | None = None) -> torch.device:
        """The torch device this backend computes on."""
        import torch

        return (
            torch.device(self.device_type, index)
            if index is not None
            else torch.device(self.device_type)
        )

    def describe(self) -> dict[str, Any]:
        """Facts for run records: device name, library versions. Never raises."""
        return {"backend": self.name, "device_type": self.device_type}

    # ------------------------------------------------------------------ fused ops
    def linear_forward(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        delta: torch.Tensor,
        idx: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, x_sel)``: ``y = x·W_effᵀ + bias`` and ``x_sel = x[..., idx]`` (contiguous).

        ``W_eff`` is ``weight`` with columns ``idx`` replaced by ``round(W[:, idx] + delta)``
        (fp32 add, one rounding to ``weight.dtype``). ``x_sel`` is what the core saves for
        backward: it must own its storage. ``weight`` must be bit-exact again on return.
        """
        x_sel = self.gather(x, idx, dim=-1)
        rows = x.numel() // max(x.shape[-1], 1)
        if self._swap_cheaper(delta.numel(), rows * weight.shape[0]):
            with self.columns_applied(weight, idx, delta):
                return self.linear(x, weight, bias), x_sel
        y = self.linear(x, weight, bias)
        return _add_delta_term(y, x_sel, delta), x_sel

    def linear_backward(
        self,
        grad_out: torch.Tensor,
        x_sel: torch.Tensor,
        weight: torch.Tensor,
        delta: torch.Tensor,
        idx: torch.Tensor,
        need_input_grad: bool,
        need_delta_grad: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(dX, d(delta))``: ``dX = dY·W_eff`` in ``grad_out.dtype``, and
        ``d(delta) = dYᵀ·x_sel`` summed over all leading dims, accumulated in fp32 and
        returned ``(out, r)`` in ``delta.dtype``. Each is None when not asked for. Must
        not modify ``grad_out``.
        """
        grad_x = grad_delta = None
        flat_g = grad_out.reshape(-1, grad_out.shape[-1])
        if need_input_grad:
            if self._swap_cheaper(delta.numel(), 2 * x_sel.numel()):
                with self.columns_applied(weight, idx, delta):
                    grad_x = self.input_grad(grad_out, weight)
            else:  # dX = dY·W, plus dY·delta added into the r trained columns
                grad_x = _add_delta_input_grad(
                    self.input_grad(grad_out, weight), flat_g, delta, idx
                )
        if need_delta_grad:
            grad_delta = self.delta_grad(flat_g, x_sel.reshape(-1, x_sel.shape[-1]), delta.dtype)
        return grad_x, grad_delta

    def conv2d_forward(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        delta: torch.Tensor,
        idx: torch.Tensor,
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, x_sel)`` for ``conv2d(x, W_eff, bias)``; ``x`` is ``(N, C, H, W)``,
        ``weight`` ``(out, C, kh, kw)``, ``delta`` ``(out, r, kh, kw)``, ``x_sel`` the
        ``r`` selected input channels ``(N, r, H, W)``. Same rules as :meth:`linear_forward`.
        """
        x_sel = self.gather(x, idx, dim=1)
        with self.columns_applied(weight, idx, delta):
            y = self.conv2d(x, weight, bias, stride, padding, dilation)
        return y, x_sel

    def conv2d_backward(
        self,
        grad_out: torch.Tensor,
        x_sel: torch.Tensor,
        weight: torch.Tensor,
        delta: torch.Tensor,
        idx: torch.Tensor,
        input_shape: tuple[int, ...],
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
        need_input_grad: bool,
        need_delta_grad: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(dX, d(delta))`` of :meth:`conv2d_forward`; ``d(delta)`` in ``delta.dtype``,
        accumulated in fp32."""
        grad_x = grad_delta = None
        if need_input_grad:
            if self._swap_cheaper(delta.numel(), 2 * x_sel.numel()):
                with self.columns_applied(weight, idx, delta):
                    grad_x = self.conv2d_input_grad(
                        grad_out, weight, input_shape, stride, padding, dilation
                    )
            else:
                grad_x = self.conv2d_input_grad(
                    grad_out, weight, input_shape, stride, padding, dilation
                )
                grad_x = grad_x if grad_x.is_contiguous() else grad_x.contiguous()
                sel_shape = (input_shape[0], idx.numel(), *input_shape[2:])
                correction = self.conv2d_input_grad(
                    grad_out, delta.to(grad_out.dtype), sel_shape, stride, padding, dilation
                )
                grad_x.index_add_(1, idx, correction)
        if need_delta_grad:
            grad_delta = self.conv2d_delta_grad(
                grad_out, x_sel, tuple(delta.shape), stride, padding, dilation, delta.dtype
            )
        return grad_x, grad_delta

    # ------------------------------------------------- 4-bit frozen bases ("nf4")
    def quantized_linear_forward(
        self,
        x: torch.Tensor,
        qweight: torch.Tensor,
        quant_state: Any,
        bias: torch.Tensor | None,
        delta: torch.Tensor,
        idx: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, x_sel)`` for a 4-bit NF4 base (capability ``"nf4"``; see :mod:`paca.ops_quant`).

        ``qweight`` is the packed bitsandbytes ``Params4bit`` and ``quant_state`` its
        ``QuantState``; ``y = x·dequant(W)ᵀ + x_sel·deltaᵀ + bias`` in ``x.dtype`` and
        ``x_sel = x[..., idx]`` (owning its storage). The packed weight must not be
        written, and no dequantized copy may outlive the call. The default uses
        bitsandbytes' 4-bit GEMM (which dequantizes internally on CPU, a transient).
        """
        from paca.ops_quant import nf4_linear

        x_sel = self.gather(x, idx, dim=-1)
        y = nf4_linear(x, qweight, quant_state, bias)
        return _add_delta_term(y, x_sel, delta), x_sel

    def quantized_linear_backward(
        self,
        grad_out: torch.Tensor,
        x_sel: torch.Tensor,
        qweight: torch.Tensor,
        quant_state: Any,
        delta: torch.Tensor,
        idx: torch.Tensor,
        need_input_grad: bool,
        need_delta_grad: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(dX, d(delta))`` of :meth:`quantized_linear_forward`: ``dX = dY·dequant(W)``
        plus ``dY·delta`` added into columns ``idx``, in ``grad_out.dtype``; ``d(delta) =
        dYᵀ·x_sel`` accumulated in fp32, in ``delta.dtype``. None where not asked for. The
        default dequantizes W for the one GEMM that needs it (a transient of ``out×in``
        elements in ``grad_out.dtype``, freed on return).
        """
        from paca.ops_quant import nf4_input_grad

        grad_x = grad_delta = None
        flat_g = grad_out.reshape(-1, grad_out.shape[-1])
        if need_input_grad:
            grad_x = nf4_input_grad(grad_out, qweight, quant_state)
            grad_x = _add_delta_input_grad(grad_x, flat_g, delta, idx)
        if need_delta_grad:
            grad_delta = self.delta_grad(flat_g, x_sel.reshape(-1, x_sel.shape[-1]), delta.dtype)
        return grad_x, grad_delta

    def capability_problem(self, name: str) -> str | None:
        """Why declared capability ``name`` cannot be used on this machine, else None.

        Checked lazily, when the core first needs the capability (a 4-bit layer is
        wrapped), so declaring a capability costs nothing at import. The default probes
        bitsandbytes' kernels on :attr:`device_type` for ``"nf4"`` (once per process) and
        accepts everything else.
        """
        if name == "nf4" and name in self.capabilities:
            from paca.ops_quant import nf4_kernel_problem

            return nf4_kernel_problem(self.device_type)
        return None

    def _swap_cheaper(self, delta_elems: int, decompose_elems: int) -> bool:
        """Whether swapping the columns writes fewer elements than the decomposition.

        A swap reads the ``r`` columns, writes ``round(W + delta)`` and restores them:
        about four ``delta``-sized writes. The decomposition writes one output-sized
        (forward) or two ``x_sel``-sized (backward) extra tensors and never touches W.
        """
        if self.column_strategy == "swap":
            return True
        if self.column_strategy == "decompose":
            return False
        return 4 * delta_elems <= decompose_elems

    @contextmanager
    def columns_applied(
        self, weight: torch.Tensor, idx: torch.Tensor, delta: torch.Tensor
    ) -> Iterator[None]:
        """Within the block ``weight[:, idx] = round(W[:, idx] + delta)``; restored exactly after.

        Writes go through ``weight.data`` so autograd's version counter of the (frozen)
        weight is not bumped: other ops that saved it for backward stay valid, because
        it is bit-exact again before anything else can read it. Not safe against a
        concurrent call on the same weight from another thread (``column_strategy =
        "decompose"`` is). Backends may override it with a fused column kernel.
        """
        import torch

        with torch.no_grad():
            w = weight.data
            saved = self.read_columns(w, idx)
            # bf16 + bf16 and mixed dtypes both add in fp32 and round once (torch opmath)
            self.write_columns(w, idx, torch.add(saved, delta))
            try:
                yield
            finally:
                self.write_columns(w, idx, saved)

    # ------------------------------------------------------------ primitives
    @abstractmethod
    def gather(self, x: torch.Tensor, idx: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """``x.index_select(dim, idx)`` as a new contiguous tensor (the saved activation).

        It must own its storage: a view into a larger tensor would keep all of ``x``
        alive for backward and defeat PaCA's memory saving. Exact. ``dim`` may be negative.
        """

    @abstractmethod
    def delta_grad(
        self, grad_out: torch.Tensor, x_sel: torch.Tensor, out_dtype: torch.dtype
    ) -> torch.Tensor:
        """``grad_out.T @ x_sel`` accumulated in fp32, rounded once to ``out_dtype``.

        ``grad_out`` is ``(N, out)``, ``x_sel`` is ``(N, r)``, one dtype (N may exceed
        65536); result ``(out, r)`` in ``out_dtype`` (the delta's dtype: fp32 for fp32
        master deltas). Must not modify its inputs.
        """

    @abstractmethod
    def write_columns(self, weight: torch.Tensor, idx: torch.Tensor, columns: torch.Tensor) -> None:
        """In place: ``weight[:, idx] = columns`` rounded once to ``weight.dtype``.

        ``weight`` may be a non-contiguous view (the transposed ``Conv1D`` weight) and
        must be written through, never into a copy. ``columns`` may have any float dtype.
        """

    def read_columns(self, weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``weight[:, idx]`` as a new tensor in ``weight.dtype`` (what a swap restores)."""
        return weight.index_select(1, idx)

    def linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """The GEMM ``x @ weight.T + bias`` (``weight`` may be a transposed view)."""
        import torch.nn.functional as F

        return F.linear(x, weight, bias)

    def input_grad(self, grad_out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``grad_out @ weight``: the gradient of the layer input."""
        return grad_out.matmul(weight)

    # ``stride``, ``padding`` and ``dilation`` are 2-tuples of ints; ``groups`` is always 1.
    def conv2d(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
    ) -> torch.Tensor:
        """The forward convolution ``conv2d(x, weight, bias)`` (``x`` is ``(N, C, H, W)``)."""
        import torch.nn.functional as F

        return F.conv2d(x, weight, bias, stride, padding, dilation)

    def conv2d_input_grad(
        self,
        grad_out: torch.Tensor,
        weight: torch.Tensor,
        input_shape: tuple[int, ...],
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
    ) -> torch.Tensor:
        """Gradient of the conv input of shape ``input_shape`` (needs no saved input)."""
        import torch

        return torch.nn.grad.conv2d_input(input_shape, weight, grad_out, stride, padding, dilation)

    def conv2d_delta_grad(
        self,
        grad_out: torch.Tensor,
        x_sel: torch.Tensor,
        delta_shape: tuple[int, ...],
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
        out_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Kernel gradient for the ``r`` selected input channels ``x_sel`` ``(N, r, H, W)``.

        Returns ``delta_shape`` = ``(out, r, kh, kw)`` accumulated in fp32 and rounded once
        to ``out_dtype`` (None: fp32). It equals the slice ``[:, idx]`` of the dense kernel
        gradient.
        """
        import torch

        out_dtype = out_dtype or torch.float32
        if out_dtype == grad_out.dtype:  # half convolutions accumulate in fp32 and round once
            return torch.nn.grad.conv2d_weight(
                x_sel, delta_shape, grad_out, stride, padding, dilation
            )
        return torch.nn.grad.conv2d_weight(
            x_sel.float(), delta_shape, grad_out.float(), stride, padding, dilation
        ).to(out_dtype)

    # ------------------------------------------------- step and graph-mode hooks
    #: True when :meth:`on_backward_end` / :meth:`on_optimizer_step` do something; the
    #: core installs its autograd/optimizer hooks only then, so backends that need
    #: nothing pay nothing. A backend declaring ``"lazy"`` must set it.
    wants_step_hooks: ClassVar[bool] = False
    #: Set False while something else marks the steps (optimum-habana's GaudiTrainer):
    #: the core then skips :meth:`on_backward_end` and :meth:`on_optimizer_step`.
    step_hooks_enabled: bool = True

    def on_backward_end(self) -> None:
        """Called once after each backward pass through PaCA layers (e.g. ``mark_step``)."""

    def on_optimizer_step(self) -> None:
        """Called after an optimizer holding PaCA parameters steps (e.g. ``mark_step``)."""

    def compile_backend(self) -> str | None:
        """The ``torch.compile`` backend to use on this device (None: torch's default)."""
        return None

    def prepare_for_inference(self, model: nn.Module) -> nn.Module:
        """Optionally wrap a model for fast evaluation (e.g. HPU graphs). Default: as is."""
        return model

    def synchronize(self) -> None:
        """Wait for queued device work (for timing). Default: nothing to wait for."""

    def memory_allocated(self) -> int | None:
        """Bytes currently allocated on the device by torch, if the device can tell."""
        return None

    def max_memory_allocated(self) -> int | None:
        """Peak bytes allocated since :meth:`reset_peak_memory`, if the device can tell."""
        return None

    def reset_peak_memory(self) -> None:
        """Start a new peak-memory window."""

    # Backends are per-process singletons chosen by name: copying a model must not
    # copy its backend, and pickling one stores only the name.
    def __deepcopy__(self, memo: dict[int, Any]) -> Backend:
        return self

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        from paca._registry import backend_by_name

        return backend_by_name, (self.name,)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} name={self.name!r} device_type={self.device_type!r}>"


def _add_delta_term(y: torch.Tensor, x_sel: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``y + x_sel·deltaᵀ`` in place (on a contiguous ``y``): the decomposition's forward."""
    y = y if y.is_contiguous() else y.contiguous()
    y.view(-1, y.shape[-1]).addmm_(x_sel.reshape(-1, x_sel.shape[-1]), delta.to(y.dtype).t())
    return y


def _add_delta_input_grad(
    grad_x: torch.Tensor, flat_g: torch.Tensor, delta: torch.Tensor, idx: torch.Tensor
) -> torch.Tensor:
    """``dX`` with ``dY·delta`` added into columns ``idx``: the decomposition's backward."""
    grad_x = grad_x if grad_x.is_contiguous() else grad_x.contiguous()
    correction = flat_g.matmul(delta.to(flat_g.dtype))
    grad_x.view(-1, grad_x.shape[-1]).index_add_(1, idx, correction)
    return grad_x


def api_version_tuple(version: object) -> tuple[int, int] | None:
    """``version`` as ``(major, minor)``, or None if it is neither an int nor such a pair."""
    if isinstance(version, bool):
        return None
    if isinstance(version, int):
        return (version, 0)
    if (
        isinstance(version, tuple)
        and len(version) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in version)
    ):
        return (version[0], version[1])
    return None
