"""Run the contract against a backend and report, item by item, what passed and why not
(and for a failure, which backend member broke)."""

from __future__ import annotations

import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch

from paca.backend_abc import BACKEND_API_VERSION, Backend, BackendUnavailableError
from paca.testing._cases import ConvShape, LinearShape, as_shape
from paca.testing._contract import (
    CONTRACT,
    TOLERANCES,
    CheckContext,
    ContractSkip,
    ContractViolation,
)

Status = Literal["passed", "failed", "skipped"]

#: Items that still run when the backend is unavailable on this machine.
_WITHOUT_DEVICE = ("api", "availability", "entry_point")

#: What the report says the backend was checked against.
API_LABEL = f"backend API v{BACKEND_API_VERSION[0]}.{BACKEND_API_VERSION[1]}"


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one contract item."""

    item: str
    title: str
    status: Status
    message: str = ""
    #: The backend member blamed for a failure (``"delta_grad"``, ``"capabilities"`` ...),
    #: None when the item passed, was skipped, or the failure is nobody's member.
    member: str | None = None
    #: Every member blamed (an item checking several members may blame more than one).
    members: tuple[str, ...] = ()

    def __str__(self) -> str:
        tail = f": {self.message}" if self.message else ""
        return f"{self.status.upper():7} {self.item}{tail}"


class ConformanceError(AssertionError):
    """Raised by :meth:`ConformanceReport.raise_for_failures`; the message lists the items."""


@dataclass
class ConformanceReport:
    """Every contract item's result for one backend."""

    backend: str
    device: str
    results: list[CheckResult] = field(default_factory=list)
    #: The backend API version of this paca, which the backend was checked against.
    api_version: tuple[int, int] = BACKEND_API_VERSION

    @property
    def failed(self) -> list[CheckResult]:
        return [r for r in self.results if r.status == "failed"]

    @property
    def passed(self) -> list[CheckResult]:
        return [r for r in self.results if r.status == "passed"]

    @property
    def skipped(self) -> list[CheckResult]:
        return [r for r in self.results if r.status == "skipped"]

    @property
    def ok(self) -> bool:
        """True when no item failed (skipped items do not count against a backend)."""
        return not self.failed

    def __getitem__(self, item: str) -> CheckResult:
        for r in self.results:
            if r.item == item:
                return r
        raise KeyError(f"no contract item {item!r} in this report")

    def summary(self) -> str:
        head = (
            f"paca backend conformance: {self.backend!r} on {self.device}: "
            f"{len(self.passed)} passed, {len(self.failed)} failed, {len(self.skipped)} skipped "
            f"(checked against backend API v{self.api_version[0]}.{self.api_version[1]})"
        )
        return "\n".join([head, *(f"  {r}" for r in self.results)])

    __str__ = summary

    def raise_for_failures(self) -> None:
        if self.failed:
            lines = "\n".join(f"  {r.item}: {r.message}" for r in self.failed)
            raise ConformanceError(
                f"backend {self.backend!r} breaks {len(self.failed)} contract item(s) "
                f"({API_LABEL}):\n{lines}"
            )

    def as_dict(self) -> dict[str, object]:
        """JSON-ready: backend, device, api_version, ok and every result."""
        return {
            "backend": self.backend,
            "device": self.device,
            "api_version": list(self.api_version),
            "ok": self.ok,
            "results": [{**vars(r), "members": list(r.members)} for r in self.results],
        }


@dataclass
class _Resolved:
    cls: type[Backend]
    instance: Backend | None
    registered: bool
    reason: str = ""  # why there is no instance
    broken: bool = False  # available, but constructing it raised


def resolve_backend(backend: str | Backend | type[Backend]) -> _Resolved:
    """Find the class and, when it can run here, the instance to check."""
    if isinstance(backend, Backend):
        return _Resolved(type(backend), backend, False)
    if isinstance(backend, str):
        from paca._registry import registry

        reg = registry()
        try:
            instance = reg.instance(backend)  # UnknownBackendError is the caller's mistake
            return _Resolved(type(instance), instance, True)
        except BackendUnavailableError as exc:
            cls = next(i.cls for i in reg.infos() if i.name == backend)
            return _Resolved(cls, None, True, str(exc))
        except Exception as exc:
            cls = next(i.cls for i in reg.infos() if i.name == backend)
            return _Resolved(cls, None, True, f"constructing it raised {exc!r}", broken=True)
    if not (isinstance(backend, type) and issubclass(backend, Backend)):
        raise TypeError(
            f"check_backend() takes a backend name, Backend subclass or instance, not {backend!r}"
        )
    try:
        if not backend.is_available():
            return _Resolved(backend, None, False, backend.unavailable_reason() or "unavailable")
        return _Resolved(backend, backend(), False)
    except Exception as exc:
        return _Resolved(backend, None, False, f"constructing it raised {exc!r}", broken=True)


def run_item(item_id: str, ctx: CheckContext) -> CheckResult:
    """Run one contract item; a crash inside the backend counts as a failure of that item."""
    item = CONTRACT[item_id]
    try:
        note = item.check(ctx)
    except ContractSkip as exc:
        return CheckResult(item.id, item.title, "skipped", str(exc))
    except ContractViolation as exc:
        members = getattr(exc, "members", ()) or (
            (exc.member,) if getattr(exc, "member", None) else ()
        )
        return CheckResult(
            item.id, item.title, "failed", str(exc), getattr(exc, "member", None), tuple(members)
        )
    except Exception as exc:
        where = traceback.extract_tb(exc.__traceback__)[-1]
        return CheckResult(
            item.id,
            item.title,
            "failed",
            f"raised {type(exc).__name__}: {exc} (at {where.filename}:{where.lineno})",
        )
    return CheckResult(item.id, item.title, "passed", note or "")


def make_context(
    backend: Backend,
    device: torch.device | str | None = None,
    *,
    registered: bool = True,
    tolerances: dict[torch.dtype, float] | None = None,
    run_compile: bool = True,
    seed: int = 0,
    extra_shapes: Iterable[LinearShape | ConvShape | dict] = (),
    generated: int = 6,
) -> CheckContext:
    return CheckContext(
        backend=backend,
        device=torch.device(device) if device is not None else backend.device(),
        tolerances={**TOLERANCES, **(tolerances or {})},
        seed=seed,
        registered=registered,
        run_compile=run_compile,
        extra_shapes=tuple(as_shape(s) for s in extra_shapes),
        generated=generated,
    )


def expand_items(items: Iterable[str] | None) -> list[str]:
    """Item ids, where a family name (``"shapes"``) stands for all its ids (``shapes[...]``)."""
    if items is None:
        return list(CONTRACT)
    chosen: list[str] = []
    unknown = []
    for item in items:
        family = [i for i in CONTRACT if i.split("[")[0] == item]
        if item in CONTRACT:
            chosen.append(item)
        elif family:
            chosen += family
        else:
            unknown.append(item)
    if unknown:
        raise KeyError(f"unknown contract items {unknown}; known: {', '.join(CONTRACT)}")
    return list(dict.fromkeys(chosen))


def check_backend(
    backend: str | Backend | type[Backend],
    device: torch.device | str | None = None,
    *,
    items: Iterable[str] | None = None,
    tolerances: dict[torch.dtype, float] | None = None,
    run_compile: bool = True,
    seed: int = 0,
    extra_shapes: Iterable[LinearShape | ConvShape | dict] = (),
    generated: int = 6,
) -> ConformanceReport:
    """Check ``backend`` (a registered name, a class or an instance) against every contract
    item and return a :class:`ConformanceReport`; never raises for a broken backend.

    ``device`` defaults to ``backend.device()``. ``items`` picks contract item ids or
    families (``"shapes"`` = every ``shapes[...]``; see :data:`paca.testing.CONTRACT`);
    ``tolerances`` overrides :data:`TOLERANCES` per dtype; ``run_compile=False`` skips the
    torch.compile item (the slowest); ``extra_shapes`` adds the vendor's own
    :class:`~paca.testing.LinearShape` / :class:`~paca.testing.ConvShape` (or dicts of their
    fields) to the ``shapes[...]`` items; ``generated`` is how many shapes hypothesis
    (when installed) generates per family. An unavailable backend gets its declaration
    items (``api``, ``availability``, ``entry_point``) checked and the rest skipped with
    the reason.
    """
    chosen = expand_items(items)
    shapes = tuple(as_shape(s) for s in extra_shapes)  # a bad shape is the caller's mistake
    found = resolve_backend(backend)
    if found.instance is None:
        return _report_without_instance(found, chosen)
    ctx = make_context(
        found.instance,
        device,
        registered=found.registered,
        tolerances=tolerances,
        run_compile=run_compile,
        seed=seed,
        extra_shapes=shapes,
        generated=generated,
    )
    report = ConformanceReport(found.instance.name, str(ctx.device))
    for item_id in chosen:
        report.results.append(run_item(item_id, ctx))
    return report


def result_without_instance(found: _Resolved, item_id: str) -> CheckResult:
    """One item for a backend that has no instance here: its declarations are checked,
    the rest is skipped (unavailable) or failed (constructing an available one raised)."""
    item = CONTRACT[item_id]
    if item_id in _WITHOUT_DEVICE:
        try:
            return run_item(item_id, declarations_context(found.cls))
        except ContractViolation as exc:
            return CheckResult(item_id, item.title, "failed", str(exc), exc.member)
    if found.broken:
        return CheckResult(item_id, item.title, "failed", found.reason)
    return CheckResult(item_id, item.title, "skipped", f"unavailable: {found.reason}")


def _report_without_instance(found: _Resolved, chosen: list[str]) -> ConformanceReport:
    report = ConformanceReport(found.cls.name, "unavailable")
    report.results.extend(result_without_instance(found, item_id) for item_id in chosen)
    return report


def declarations_context(cls: type[Backend]) -> CheckContext:
    """A context for checking an unavailable backend's declarations without constructing
    it the usual way (its ``__init__`` may need the missing device)."""
    try:
        proxy = object.__new__(cls)
    except TypeError as exc:  # abstract: some primitive is not implemented
        raise ContractViolation(f"{cls.__name__} cannot be instantiated: {exc}") from exc
    ctx = make_context(proxy, "cpu", registered=False, run_compile=False)
    ctx.constructed = False
    return ctx
