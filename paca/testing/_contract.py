"""The contract items a backend must satisfy, and the helpers checks are written with.

A contract item is a named check function ``check(ctx) -> str | None``. It passes by
returning (optionally a one-line note), fails by raising :class:`ContractViolation`
with a sentence that names the backend **member** that broke (``delta_grad``,
``write_columns``, ``linear_forward`` ...), what was expected and what came back, and
declines to run by raising :class:`ContractSkip` (e.g. bf16 checks on a backend that
does not declare ``"bfloat16"``). Items are registered in :data:`CONTRACT` in the order
they run.

Many items check several members; :class:`Findings` collects one failure per member so
a report names every member that broke, and marks a fused op that fails only because a
primitive it is built from failed earlier as a consequence rather than a second defect.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from paca.backend_abc import Backend
    from paca.testing._cases import ConvShape, LinearShape

#: Allowed error, as ``max|result - reference| / max|reference|``, of results computed
#: in each dtype (GEMMs may sum in a different order on another device; bf16 keeps 8
#: significant bits, fp16 11). fp32 means full fp32: TF32 matmuls fail it on purpose.
TOLERANCES: dict[torch.dtype, float] = {
    torch.float32: 1e-4,
    torch.bfloat16: 2e-2,
    torch.float16: 4e-3,
}

#: Smallest tolerance for fp32 convolutions: cuDNN computes them in TF32 by default
#: (``torch.backends.cudnn.allow_tf32``), which torch users expect, unlike TF32 GEMMs.
CONV_FP32_TOLERANCE = 5e-3

#: Dtypes the suite covers, with the capability name a backend declares for each.
DTYPE_CAPABILITIES: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
}
DTYPES = tuple(DTYPE_CAPABILITIES)

#: What each default fused op (and the default swap) is built from: when one of these
#: fails in an item, a failure of the fused op in the same item is its consequence.
BUILT_FROM: dict[str, tuple[str, ...]] = {
    "columns_applied": ("read_columns", "write_columns"),
    "linear_forward": ("gather", "linear", "columns_applied", "read_columns", "write_columns"),
    "linear_backward": (  # in a layer, x_sel comes from the forward
        "gather",
        "linear_forward",
        "input_grad",
        "delta_grad",
        "columns_applied",
        "read_columns",
        "write_columns",
    ),
    "conv2d_forward": ("gather", "conv2d", "columns_applied", "read_columns", "write_columns"),
    "conv2d_backward": (
        "gather",
        "conv2d_forward",
        "conv2d_input_grad",
        "conv2d_delta_grad",
        "columns_applied",
        "read_columns",
        "write_columns",
    ),
    "quantized_linear_forward": ("gather",),
    "quantized_linear_backward": ("delta_grad",),
}


class ContractViolation(AssertionError):
    """A backend broke a contract item; the message says which member, which promise, how.

    ``member`` is the backend member blamed (``"delta_grad"``, ``"capabilities"``...), or
    None when the failure is not one member's (e.g. the paca core itself misbehaved).
    """

    def __init__(self, message: str, member: str | None = None) -> None:
        if member and not message.startswith(member):
            message = f"{member}: {message}"
        super().__init__(message)
        self.member = member
        #: Every member blamed (an item that checks several members may blame several).
        self.members: tuple[str, ...] = (member,) if member else ()


class ContractSkip(Exception):
    """A contract item does not apply to this backend (the message says why)."""


@dataclass
class CheckContext:
    """What every check gets: the backend under test and the device to test it on."""

    backend: Backend
    device: torch.device
    tolerances: dict[torch.dtype, float] = field(default_factory=lambda: dict(TOLERANCES))
    seed: int = 0
    #: Whether the backend was obtained from the registry by its name (pickling a
    #: backend stores only the name, so that check needs a registered backend).
    registered: bool = True
    #: Whether to run torch.compile for the "compile" capability (slowest item).
    run_compile: bool = True
    #: False when ``backend`` was made without ``__init__`` because the backend is
    #: unavailable here: only class-level declarations can be checked then.
    constructed: bool = True
    #: A vendor's own shapes, added to the ``shapes[...]`` items.
    extra_shapes: tuple[LinearShape | ConvShape, ...] = ()
    #: How many shapes hypothesis generates per family (when hypothesis is installed).
    generated: int = 6

    def generator(self, salt: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 100_003 + salt)

    def randn(self, *shape: int, dtype: torch.dtype = torch.float32, salt: int = 0) -> torch.Tensor:
        """Seeded normal values, made on the CPU (portable) and returned there."""
        return torch.randn(*shape, generator=self.generator(salt)).to(dtype)

    def columns(self, n_in: int, r: int, salt: int = 0) -> torch.Tensor:
        """``r`` distinct input columns out of ``n_in`` in an unsorted order (int64, CPU)."""
        idx = torch.randperm(n_in, generator=self.generator(salt + 7))[:r].to(torch.long)
        if r > 1 and bool((idx[1:] > idx[:-1]).all()):  # sorted by chance: unsort it
            idx = idx.flip(0)
        return idx

    def on_device(self, t: torch.Tensor) -> torch.Tensor:
        """A fresh copy on the device under test (never aliases the reference's inputs)."""
        return t.detach().to(self.device, copy=True)

    @property
    def declared_dtypes(self) -> list[torch.dtype]:
        return [d for d, cap in DTYPE_CAPABILITIES.items() if cap in self.backend.capabilities]

    @property
    def primary_dtype(self) -> torch.dtype:
        """The dtype the dtype-independent items run in: fp32 if declared, else the first."""
        declared = self.declared_dtypes
        if not declared:
            raise ContractSkip(
                "the backend declares no floating dtype (float32, bfloat16, float16)"
            )
        return declared[0]

    def require_dtype(self, dtype: torch.dtype) -> None:
        """Skip unless the backend declares the capability for ``dtype``."""
        cap = DTYPE_CAPABILITIES[dtype]
        if cap not in self.backend.capabilities:
            raise ContractSkip(f"backend does not declare the {cap!r} capability")

    def master_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The delta dtype the core hands the backend for fp32 master deltas."""
        return torch.float32 if "float32" in self.backend.capabilities else dtype

    def tol(self, dtype: torch.dtype) -> float:
        return self.tolerances[dtype]

    def conv_tol(self, dtype: torch.dtype) -> float:
        tol = self.tol(dtype)
        return max(tol, CONV_FP32_TOLERANCE) if dtype == torch.float32 else tol


@dataclass(frozen=True)
class ContractItem:
    """One promise of the Backend contract, checked by ``check``."""

    id: str
    title: str
    check: Callable[[CheckContext], str | None] = field(repr=False)


#: Every contract item, in the order the suite runs them (filled by the check modules).
CONTRACT: dict[str, ContractItem] = {}


def contract_item(
    item_id: str, title: str
) -> Callable[[Callable[[CheckContext], str | None]], Callable[[CheckContext], str | None]]:
    """Register ``check`` as contract item ``item_id`` (ids must be unique)."""

    def deco(check: Callable[[CheckContext], str | None]) -> Callable[[CheckContext], str | None]:
        if item_id in CONTRACT:
            raise ValueError(f"duplicate contract item id {item_id!r}")
        CONTRACT[item_id] = ContractItem(item_id, title, check)
        return check

    return deco


def reorder(modules: tuple[str, ...]) -> None:
    """Run the items of ``modules`` (check module names, in this order) first, keeping the
    registration order within each module; items of other modules follow."""
    rank = {m: n for n, m in enumerate(modules)}
    items = sorted(
        CONTRACT.values(),
        key=lambda i: rank.get(i.check.__module__.rsplit(".", 1)[-1], len(rank)),
    )
    CONTRACT.clear()
    CONTRACT.update((i.id, i) for i in items)


DtypeCheck = Callable[[CheckContext, torch.dtype], "str | None"]


def per_dtype(
    item: str, title: str, *, skip_undeclared: bool = True
) -> Callable[[DtypeCheck], DtypeCheck]:
    """Register one contract item per dtype, e.g. ``shapes[bfloat16]``; with
    ``skip_undeclared`` each skips unless the backend declares that dtype's capability."""

    def deco(check: DtypeCheck) -> DtypeCheck:
        for dtype in DTYPES:

            def bound(ctx: CheckContext, _dtype: torch.dtype = dtype) -> str | None:
                if skip_undeclared:
                    ctx.require_dtype(_dtype)
                return check(ctx, _dtype)

            bound.__doc__ = check.__doc__
            bound.__module__ = check.__module__
            contract_item(f"{item}[{dtype_name(dtype)}]", f"{title} ({dtype_name(dtype)})")(bound)
        return check

    return deco


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------ collecting failures
class Findings:
    """Failures of one item, one per member, in the order members were checked.

    ``with findings.member("gather", "3-D x"):`` runs one member's check: a
    :class:`ContractViolation` (or any exception the backend raised) is recorded for that
    member and the item goes on with the next member. :meth:`raise_if_any` then fails the
    item naming every member that broke.
    """

    def __init__(self, ctx: CheckContext | None = None) -> None:
        self.ctx = ctx
        self.failures: dict[str, str] = {}
        self.consequences: dict[str, str] = {}
        self.notes: list[str] = []

    def failed(self, member: str) -> bool:
        return member in self.failures

    def known(self, member: str) -> bool:
        """Whether ``member`` already failed, directly or as a consequence."""
        return member in self.failures or member in self.consequences

    @contextlib.contextmanager
    def member(self, member: str, what: str = "") -> Iterator[None]:
        known = member in self.failures or member in self.consequences
        try:
            yield
        except ContractSkip:
            raise
        except Exception:
            if known:  # one finding per member is enough; later cases run for the others
                return
            self._catch(member, what)

    def _catch(self, member: str, what: str) -> None:
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, ContractViolation):
            blamed = exc.member or member
            self._record(member, str(exc).removeprefix(f"{blamed}: "), exc.member)
        else:
            label = f"{what}: " if what else ""
            self._record(member, f"{label}raised {type(exc).__name__}: {exc}", None)

    def _record(self, member: str, message: str, blamed: str | None) -> None:
        if blamed and blamed != member:  # the check blamed a more specific member
            member = blamed
        causes = [m for m in BUILT_FROM.get(member, ()) if m in self.failures]
        if not causes and member in BUILT_FROM and self.ctx is not None:
            # A fused op failed with no failing primitive in this item: if it is built from
            # primitives, check those directly, so the defect is named where it is.
            from paca.testing._checks_members import diagnose

            for primitive, why in diagnose(self.ctx, member).items():
                self.failures.setdefault(
                    primitive, f"{why} (found diagnosing this failure of {member}: {message})"
                )
                causes.append(primitive)
        if causes:
            self.consequences[member] = f"{member} (built from {', '.join(causes)})"
        else:
            self.failures.setdefault(member, message)

    def raise_if_any(self) -> None:
        if not self.failures:
            return
        parts = [f"{m}: {msg}" for m, msg in self.failures.items()]
        if self.consequences:
            also = ", ".join(self.consequences.values())
            parts.append(f"also failing, as a consequence of the above: {also}")
        exc = ContractViolation("; ".join(parts))
        exc.member = next(iter(self.failures))
        exc.members = tuple(self.failures)
        raise exc


@contextlib.contextmanager
def calling(what: str, member: str | None = None) -> Iterator[None]:
    """Turn an exception raised by the backend into a violation that says which case."""
    try:
        yield
    except (ContractViolation, ContractSkip):
        raise
    except Exception as exc:
        raise ContractViolation(f"{what}: raised {type(exc).__name__}: {exc}", member) from exc


# ------------------------------------------------------------------ comparisons
def _shape_and_dtype(
    what: str, result: Any, shape: tuple[int, ...], dtype: torch.dtype | None
) -> torch.Tensor:
    if not isinstance(result, torch.Tensor):
        raise ContractViolation(
            f"{what}: returned {type(result).__name__}, expected a tensor of shape {shape}"
        )
    if tuple(result.shape) != tuple(shape):
        raise ContractViolation(f"{what}: shape {tuple(result.shape)} != expected {tuple(shape)}")
    if dtype is not None and result.dtype != dtype:
        raise ContractViolation(f"{what}: dtype {result.dtype} != expected {dtype}")
    return result


def expect_close(
    what: str,
    result: Any,
    reference: torch.Tensor,
    tol: float,
    dtype: torch.dtype | None = None,
) -> float:
    """Fail unless ``result`` has ``reference``'s shape (and ``dtype``) and is within ``tol``
    of it relative to ``max|reference|``; returns the relative error."""
    result = _shape_and_dtype(what, result, tuple(reference.shape), dtype).detach()
    a = result.to("cpu", torch.float64)
    b = reference.detach().to("cpu", torch.float64)
    if not torch.isfinite(a).all():
        raise ContractViolation(f"{what}: result contains NaN or Inf")
    scale = float(b.abs().max()) if b.numel() else 0.0
    err = float((a - b).abs().max()) if b.numel() else 0.0
    rel = err / max(scale, 1e-12)
    if rel > tol:
        where = int((a - b).abs().flatten().argmax())
        raise ContractViolation(
            f"{what}: max abs error {err:.3g} is {rel:.3g} of max|reference| {scale:.3g}, "
            f"above the tolerance {tol:g} (worst at flat index {where}: got "
            f"{float(a.flatten()[where]):.6g}, expected {float(b.flatten()[where]):.6g})"
        )
    return rel


def bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the CPU as integers with the same bits (NaN payloads and -0.0 included)."""
    t = t.detach().to("cpu").contiguous()
    if t.is_floating_point():
        view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
        return t.view(view)
    return t


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return tuple(a.shape) == tuple(b.shape) and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def expect_exact(what: str, result: Any, reference: torch.Tensor) -> None:
    """Fail unless ``result`` equals ``reference`` bit for bit (same shape and dtype)."""
    result = _shape_and_dtype(what, result, tuple(reference.shape), reference.dtype)
    if not bit_equal(result, reference):
        a, b = result.detach().to("cpu").double(), reference.detach().to("cpu").double()
        diff = (a - b).abs().nan_to_num(float("inf"))
        n = int((bits(result) != bits(reference)).sum())
        raise ContractViolation(
            f"{what}: must be exact but {n} of {reference.numel()} values differ "
            f"(max abs difference {float(diff.max()):.3g})"
        )


def expect_device(what: str, t: torch.Tensor, device: torch.device) -> None:
    if isinstance(t, torch.Tensor) and t.device.type != device.type:
        raise ContractViolation(
            f"{what}: returned a tensor on {t.device}, expected the backend's device {device}"
        )


def storage_ptr(t: torch.Tensor) -> int:
    """The data pointer of ``t``'s storage; 0 where the device reports none (lazy HPU)."""
    try:
        return int(t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):
        return 0


def shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    if not (a.numel() and b.numel()):
        return False
    pa, pb = storage_ptr(a), storage_ptr(b)
    return bool(pa) and pa == pb
