"""The contract items a backend must satisfy, and the helpers checks are written with.

A contract item is a named check function ``check(ctx) -> str | None``. It passes by
returning (optionally a one-line note), fails by raising :class:`ContractViolation`
with a sentence that says what was expected and what came back, and declines to run
by raising :class:`ContractSkip` (e.g. bf16 checks on a backend that does not declare
``"bfloat16"``). Items are registered in :data:`CONTRACT` in the order they run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from paca.backend_abc import Backend

#: Allowed error, as ``max|result - reference| / max|reference|``, of results computed
#: in each dtype (GEMMs may sum in a different order on another device; bf16 keeps 8
#: significant bits, fp16 11). fp32 means full fp32: TF32 matmuls fail it on purpose.
TOLERANCES: dict[torch.dtype, float] = {
    torch.float32: 1e-4,
    torch.bfloat16: 2e-2,
    torch.float16: 4e-3,
}

#: Dtypes the suite covers, with the capability name a backend declares for each.
DTYPE_CAPABILITIES: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
}


class ContractViolation(AssertionError):
    """A backend broke a contract item; the message says which promise and how."""


class ContractSkip(Exception):
    """A contract item does not apply to this backend (the message says why)."""


@dataclass
class CheckContext:
    """What every check gets: the backend under test, its device and the CPU reference."""

    backend: Backend
    device: torch.device
    reference: Backend
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

    def generator(self, salt: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1000 + salt)

    def randn(self, *shape: int, dtype: torch.dtype = torch.float32, salt: int = 0) -> torch.Tensor:
        """Seeded normal values, made on the CPU (portable) and returned there."""
        return torch.randn(*shape, generator=self.generator(salt)).to(dtype)

    def columns(self, n_in: int, r: int, salt: int = 0) -> torch.Tensor:
        """``r`` distinct, unsorted input columns out of ``n_in`` (int64, CPU)."""
        return torch.randperm(n_in, generator=self.generator(salt + 7))[:r].to(torch.long)

    def on_device(self, t: torch.Tensor) -> torch.Tensor:
        """A fresh copy on the device under test (never aliases the reference's inputs)."""
        return t.detach().to(self.device, copy=True)

    def require_dtype(self, dtype: torch.dtype) -> None:
        """Skip unless the backend declares the capability for ``dtype``."""
        cap = DTYPE_CAPABILITIES[dtype]
        if cap not in self.backend.capabilities:
            raise ContractSkip(f"backend does not declare the {cap!r} capability")

    def tol(self, dtype: torch.dtype) -> float:
        return self.tolerances[dtype]


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


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@contextlib.contextmanager
def calling(what: str) -> Iterator[None]:
    """Turn an exception raised by the backend into a violation that says which case."""
    try:
        yield
    except (ContractViolation, ContractSkip):
        raise
    except Exception as exc:
        raise ContractViolation(f"{what}: raised {type(exc).__name__}: {exc}") from exc


# ------------------------------------------------------------------ comparisons
def expect_close(
    what: str, result: torch.Tensor, reference: torch.Tensor, tol: float, dtype_label: str = ""
) -> float:
    """Fail unless ``result`` matches ``reference`` in shape and within ``tol`` (relative to
    ``max|reference|``); returns the relative error so passing checks can report it."""
    result = result.detach()
    if tuple(result.shape) != tuple(reference.shape):
        raise ContractViolation(
            f"{what}: shape {tuple(result.shape)} != expected {tuple(reference.shape)}"
        )
    a = result.to("cpu", torch.float64)
    b = reference.detach().to("cpu", torch.float64)
    if not torch.isfinite(a).all():
        raise ContractViolation(f"{what}: result contains NaN or Inf")
    scale = float(b.abs().max()) if b.numel() else 0.0
    err = float((a - b).abs().max()) if b.numel() else 0.0
    rel = err / max(scale, 1e-12)
    if rel > tol:
        label = f" for {dtype_label}" if dtype_label else ""
        raise ContractViolation(
            f"{what}: max abs error {err:.3g} is {rel:.3g} of max|reference| {scale:.3g}, "
            f"above the tolerance {tol:g}{label}"
        )
    return rel


def expect_exact(what: str, result: torch.Tensor, reference: torch.Tensor) -> None:
    """Fail unless ``result`` equals ``reference`` exactly (same shape, dtype and values)."""
    result = result.detach()
    if tuple(result.shape) != tuple(reference.shape):
        raise ContractViolation(
            f"{what}: shape {tuple(result.shape)} != expected {tuple(reference.shape)}"
        )
    if result.dtype != reference.dtype:
        raise ContractViolation(f"{what}: dtype {result.dtype} != expected {reference.dtype}")
    a, b = result.to("cpu"), reference.detach().to("cpu")
    if not torch.equal(a, b):
        diff = (a.double() - b.double()).abs()
        n = int((diff != 0).sum()) + int((a.isnan() != b.isnan()).sum())
        raise ContractViolation(
            f"{what}: must be exact but {n} of {b.numel()} values differ "
            f"(max abs difference {float(diff.nan_to_num(0).max()):.3g})"
        )


def expect_dtype(what: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    if t.dtype != dtype:
        raise ContractViolation(f"{what}: returned dtype {t.dtype}, the contract says {dtype}")


def expect_device(what: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device.type != device.type:
        raise ContractViolation(
            f"{what}: returned a tensor on {t.device}, expected the backend's device {device}"
        )
