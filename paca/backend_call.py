"""Calling a backend from the core: capability checks before, contract checks after.

The core never hands a backend a dtype it did not declare, and a backend that breaks
the contract at run time (raises, returns the wrong shape or dtype, returns a view of
its input as the saved activation) is reported by backend and member name instead of
failing later, deep inside autograd. The checks read only tensor metadata, so they
cost nothing measurable per call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from paca.backend_abc import Backend, BackendCapabilityError, BackendContractError

_CAPABILITY = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def capability_of(dtype: torch.dtype) -> str:
    """The capability name a backend must declare to be handed ``dtype``."""
    name = _CAPABILITY.get(dtype)
    if name is None:
        raise BackendCapabilityError(
            f"PaCA layers compute in float32, bfloat16 or float16, not {dtype}; cast the "
            f"model (model.to(torch.bfloat16)) or run under torch.autocast"
        )
    return name


def require_dtype(backend: Backend, dtype: torch.dtype, what: str) -> None:
    """Raise unless ``backend`` declares the capability for ``dtype``."""
    name = capability_of(dtype)
    if name not in backend.capabilities:
        declared = ", ".join(sorted(backend.capabilities)) or "nothing"
        raise BackendCapabilityError(
            f"paca backend {backend.name!r} does not declare the {name!r} capability, but "
            f"{what} computes in {dtype} (it declares: {declared}); use a dtype it declares "
            f"(e.g. model.float(), or no autocast) or another backend (paca.use_backend)"
        )


def delta_for(backend: Backend, delta: torch.Tensor) -> torch.Tensor:
    """``delta`` in a dtype the backend declares (an exact, ``out×r``-sized cast at most)."""
    if _CAPABILITY.get(delta.dtype) in backend.capabilities:
        return delta
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        if _CAPABILITY[dtype] in backend.capabilities:
            return delta.to(dtype)
    raise BackendCapabilityError(
        f"paca backend {backend.name!r} declares no floating dtype capability "
        f"(float32, bfloat16, float16); it cannot compute PaCA"
    )


def call(backend: Backend, member: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``; an exception is re-raised naming the backend and the member.

    Out-of-memory errors pass through unchanged (callers catch them by type), as do
    paca's own capability/contract errors and anything that is not an ``Exception``.
    """
    try:
        return fn(*args)
    except (torch.OutOfMemoryError, BackendCapabilityError, BackendContractError):
        raise
    except Exception as exc:
        raise BackendContractError(
            f"paca backend {backend.name!r} failed in {member}: {type(exc).__name__}: {exc}"
        ) from exc


def check_tensor(
    backend: Backend,
    member: str,
    what: str,
    got: object,
    shape: Sequence[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """``got`` if it is a tensor of ``shape`` and ``dtype``, else a contract error."""
    if not isinstance(got, torch.Tensor):
        raise BackendContractError(
            f"paca backend {backend.name!r}: {member} returned {type(got).__name__} for "
            f"{what}, expected a tensor of shape {tuple(shape)} and dtype {dtype}"
        )
    if tuple(got.shape) != tuple(shape) or got.dtype != dtype:
        raise BackendContractError(
            f"paca backend {backend.name!r}: {member} returned {what} of shape "
            f"{tuple(got.shape)} and dtype {got.dtype}, expected {tuple(shape)} and {dtype}"
        )
    return got


def check_pair(backend: Backend, member: str, got: object) -> tuple[Any, Any]:
    """``got`` as a 2-tuple, else a contract error."""
    if not isinstance(got, tuple | list) or len(got) != 2:
        raise BackendContractError(
            f"paca backend {backend.name!r}: {member} must return a pair of tensors, "
            f"got {type(got).__name__}"
        )
    return got[0], got[1]


def check_owns_storage(
    backend: Backend, member: str, what: str, got: torch.Tensor, source: torch.Tensor
) -> None:
    """The saved activation must not be a view of the input (it would keep all of it)."""
    if torch.compiler.is_compiling():  # fake tensors while tracing (conv2d): nothing to compare
        return
    if got.is_meta or source.is_meta:  # meta tensors all report data pointer 0
        return
    if got.numel() and source.numel():
        same = got.untyped_storage().data_ptr() == source.untyped_storage().data_ptr()
        if same:
            raise BackendContractError(
                f"paca backend {backend.name!r}: {member} returned {what} sharing storage "
                f"with the input; it must be a new tensor (a view keeps the whole input "
                f"alive for backward)"
            )


def require_capability(backend: Backend, capability: str, what: str) -> None:
    """Raise unless ``backend`` declares ``capability`` (named with what needs it)."""
    if capability not in backend.capabilities:
        declared = ", ".join(sorted(backend.capabilities)) or "nothing"
        raise BackendCapabilityError(
            f"{what} needs the {capability!r} capability, which paca backend "
            f"{backend.name!r} does not declare (it declares: {declared}); use a backend "
            f"that declares it (paca backends lists them) or leave {what} off"
        )
