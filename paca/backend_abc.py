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
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # pragma: no cover - typing only; keeps `import paca` light
    import torch
    from torch import nn

#: Version of the backend API. A plugin declares the version it was written
#: against in ``Backend.api_version``; the registry refuses a mismatch with a
#: message naming the plugin instead of failing deep inside a training step.
BACKEND_API_VERSION = 1

#: Capability names a backend may declare in ``Backend.capabilities``.
KNOWN_CAPABILITIES = frozenset(
    {
        "float32",
        "bfloat16",
        "float16",
        "autocast",
        "compile",  # torch.compile of the PaCA op without graph breaks
        "graphs",  # device graph capture (CUDA graphs, HPU graphs)
        "lazy",  # lazy graph mode with explicit step marks (Gaudi)
        "nf4",  # 4-bit NF4 frozen bases
    }
)


class BackendUnavailableError(RuntimeError):
    """A backend was asked for on a machine where it cannot run."""


class Backend(ABC):
    """How one kind of device computes the PaCA primitives.

    Subclasses set ``name`` (the string users pass to :func:`paca.use_backend`),
    ``device_type`` (the torch device type whose tensors they compute on) and
    implement :meth:`is_available`. The compute primitives are abstract so that a
    backend states every path it takes; the CPU backend (``paca_cpu``) is the
    reference implementation others are tested against and may be subclassed.

    Shapes used below: ``x`` is ``(..., in)``; ``weight`` is ``(out, in)``;
    ``idx`` is a 1-D int64 tensor of the ``r`` trained input columns;
    ``delta`` is ``(out, r)``.
    """

    #: Name users select the backend by, e.g. ``"cpu"``, ``"cuda"``, ``"hpu"``.
    name: ClassVar[str]
    #: torch device type the backend's tensors live on.
    device_type: ClassVar[str]
    #: Backend API version this class was written against.
    api_version: ClassVar[int] = BACKEND_API_VERSION
    #: Auto-detection priority; higher wins among available backends.
    #: ``None`` means "only when asked for by name".
    priority: ClassVar[int | None] = None
    #: What the backend supports; see :data:`KNOWN_CAPABILITIES`.
    capabilities: ClassVar[frozenset[str]] = frozenset({"float32"})

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

    # ------------------------------------------------------- compute primitives
    @abstractmethod
    def gather(self, x: torch.Tensor, idx: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """``x.index_select(dim, idx)`` as a contiguous tensor (the saved activation).

        It must own its storage: a view into a larger tensor would keep all of ``x``
        alive for backward and defeat PaCA's memory saving. Exact.
        """

    @abstractmethod
    def effective_weight(
        self, weight: torch.Tensor, idx: torch.Tensor, delta: torch.Tensor
    ) -> torch.Tensor:
        """A new tensor equal to ``weight`` with ``weight[:, idx] + delta`` in columns ``idx``.

        Computed in fp32 and rounded once to ``weight.dtype``. Must not modify ``weight``.
        ``weight`` may have trailing dims (conv kernels); ``delta`` then has them too.
        """

    @abstractmethod
    def linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """The forward GEMM ``x @ weight.T + bias``."""

    @abstractmethod
    def input_grad(self, grad_out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``grad_out @ weight``: the gradient of the layer input."""

    @abstractmethod
    def delta_grad(self, grad_out: torch.Tensor, x_sel: torch.Tensor) -> torch.Tensor:
        """``grad_out.T @ x_sel`` over all leading dims, accumulated and returned in fp32.

        ``grad_out`` is ``(N, out)``, ``x_sel`` is ``(N, r)``; result ``(out, r)`` fp32.
        """

    @abstractmethod
    def write_columns(self, weight: torch.Tensor, idx: torch.Tensor, columns: torch.Tensor) -> None:
        """In place: ``weight[:, idx] = columns`` (used by merge/unmerge, never in training)."""

    # ------------------------------------------ convolution primitives (optional)
    # Non-abstract on purpose: plain torch is right on every device torch supports, so a
    # third-party backend only overrides these when it has something faster. ``stride``,
    # ``padding`` and ``dilation`` are 2-tuples of ints; ``groups`` is always 1.
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
    ) -> torch.Tensor:
        """Kernel gradient for the ``r`` selected input channels ``x_sel`` ``(N, r, H, W)``.

        Returns ``delta_shape`` = ``(out, r, kh, kw)`` in fp32, accumulated in fp32. It
        equals the slice ``[:, idx]`` of the dense kernel gradient.
        """
        import torch

        return torch.nn.grad.conv2d_weight(
            x_sel.float(), delta_shape, grad_out.float(), stride, padding, dilation
        )

    # ------------------------------------------------- step and graph-mode hooks
    #: Set True when :meth:`on_backward_end` / :meth:`on_optimizer_step` do
    #: something; the core installs its autograd/optimizer hooks only then, so
    #: backends that need nothing pay nothing.
    wants_step_hooks: ClassVar[bool] = False

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
