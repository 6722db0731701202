"""Items about the backend as declared: its class attributes and member signatures, its
availability, its registration by name, and its entry point's name."""

from __future__ import annotations

import copy
import inspect
import json
import pickle
import re
from typing import Any

import torch

from paca.backend_abc import BACKEND_API_VERSION, KNOWN_CAPABILITIES, Backend, api_version_tuple
from paca.testing._contract import CheckContext, ContractSkip, ContractViolation, contract_item

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.\-]*$")
STRATEGIES = ("auto", "swap", "decompose")

#: Backend API v1 members that v2 no longer calls: a class defining one was not ported.
V1_MEMBERS = {
    "effective_weight": "the fused ops linear_forward/linear_backward (or the column swap "
    "columns_applied) replace it; W is never copied",
    "write_effective_columns": "override columns_applied instead",
    "cache_effective_weight": "the effective-weight cache was removed",
    "auto_mark_step": "use step_hooks_enabled",
}

#: How the core calls each member (positional arguments, then keywords).
CALLS: dict[str, tuple[int, tuple[str, ...]]] = {
    "gather": (2, ("dim",)),  # gather(x, idx, dim=...)
    "delta_grad": (3, ()),
    "write_columns": (3, ()),
    "read_columns": (2, ()),
    "linear": (3, ()),
    "input_grad": (2, ()),
    "conv2d": (6, ()),
    "conv2d_input_grad": (6, ()),
    "conv2d_delta_grad": (7, ()),
    "linear_forward": (5, ()),
    "linear_backward": (7, ()),
    "conv2d_forward": (8, ()),
    "conv2d_backward": (11, ()),
    "columns_applied": (3, ()),
    "quantized_linear_forward": (6, ()),
    "quantized_linear_backward": (8, ()),
    "capability_problem": (1, ()),
    "on_backward_end": (0, ()),
    "on_optimizer_step": (0, ()),
    "compile_backend": (0, ()),
    "prepare_for_inference": (1, ()),
}


def api_note() -> str:
    return f"checked against backend API v{BACKEND_API_VERSION[0]}.{BACKEND_API_VERSION[1]}"


def _signature_problem(cls: type[Backend], member: str) -> str | None:
    positional, keywords = CALLS[member]
    fn = inspect.getattr_static(cls, member, None)
    fn = getattr(fn, "__func__", fn)
    if fn is None or fn is getattr(Backend, member, None):
        return None
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    try:
        sig.bind(None, *range(positional))
        if keywords:
            sig.bind(None, *range(positional), **dict.fromkeys(keywords))
    except TypeError as exc:
        base = inspect.signature(getattr(Backend, member))
        return f"signature {member}{sig} cannot take the call {member}{base} ({exc})"
    return None


@contract_item(
    "api",
    "declares name, device_type, a compatible api_version, priority, known capabilities, "
    "deterministic, column_strategy, wants_step_hooks; members have the v2 signatures",
)
def check_api(ctx: CheckContext) -> str | None:
    b = ctx.backend
    cls = type(b)
    if not isinstance(b, Backend):
        raise ContractViolation(f"{cls.__name__} is not a paca.backend_abc.Backend subclass")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ContractViolation(
            f"{name!r} must be a lower-case string without spaces (users type it)", "name"
        )
    ours = BACKEND_API_VERSION
    theirs = api_version_tuple(cls.api_version)
    if theirs is None:
        raise ContractViolation(
            f"{cls.api_version!r} is neither an int nor a (major, minor) tuple; set "
            f"api_version = {ours}",
            "api_version",
        )
    if theirs[0] != ours[0] or theirs[1] > ours[1]:
        raise ContractViolation(
            f"declares backend API v{theirs[0]}.{theirs[1]} but this paca speaks "
            f"v{ours[0]}.{ours[1]} (same major, minor no newer); port the backend",
            "api_version",
        )
    try:
        torch.device(cls.device_type)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise ContractViolation(
            f"{cls.device_type!r} is not a torch device type: {exc}", "device_type"
        ) from exc
    if cls.priority is not None and (
        not isinstance(cls.priority, int) or isinstance(cls.priority, bool)
    ):
        raise ContractViolation(f"must be an int or None, not {cls.priority!r}", "priority")
    caps = b.capabilities
    if not isinstance(caps, frozenset | set) or not all(isinstance(c, str) for c in caps):
        raise ContractViolation(f"must be a frozenset of strings, not {caps!r}", "capabilities")
    unknown = sorted(set(caps) - KNOWN_CAPABILITIES)
    if unknown:
        raise ContractViolation(
            f"unknown capabilities {unknown}; known names are {sorted(KNOWN_CAPABILITIES)} "
            f"(a misspelt capability silently disables the checks that need it)",
            "capabilities",
        )
    for attr in ("deterministic", "wants_step_hooks", "step_hooks_enabled"):
        value = getattr(b, attr)
        if not isinstance(value, bool):
            raise ContractViolation(f"must be a bool, not {value!r}", attr)
    if b.column_strategy not in STRATEGIES:
        raise ContractViolation(
            f"{b.column_strategy!r} is not one of {STRATEGIES}", "column_strategy"
        )
    for member, why in V1_MEMBERS.items():
        if hasattr(cls, member) and not hasattr(Backend, member):
            raise ContractViolation(
                f"is a backend API v1 member that v2 never calls ({why}); see "
                f"docs/writing-a-backend.md",
                member,
            )
    for member in CALLS:
        problem = _signature_problem(cls, member)
        if problem:
            raise ContractViolation(problem, member)
    version = f"v{theirs[0]}.{theirs[1]}"
    return f"{api_note()}; declares {version}, capabilities {sorted(caps)}"


@contract_item(
    "availability",
    "is_available() never raises and returns a stable bool; unavailable_reason() says why; "
    "describe() is a JSON-able dict; device()",
)
def check_availability(ctx: CheckContext) -> str | None:
    cls = type(ctx.backend)
    try:
        first, second = cls.is_available(), cls.is_available()
    except Exception as exc:
        raise ContractViolation(
            f"raised {type(exc).__name__}: {exc}; it must return False instead "
            f"(check for vendor SDKs with importlib.util.find_spec, catch their errors)",
            "is_available",
        ) from exc
    if not isinstance(first, bool) or first != second:
        raise ContractViolation(
            f"must return the same bool on every call, got {first!r} then {second!r}",
            "is_available",
        )
    try:
        reason = cls.unavailable_reason()
    except Exception as exc:
        raise ContractViolation(
            f"raised {type(exc).__name__}: {exc}", "unavailable_reason"
        ) from exc
    if first and reason is not None:
        raise ContractViolation(
            f"available, but unavailable_reason() returned {reason!r}, not None",
            "unavailable_reason",
        )
    if not first and not (isinstance(reason, str) and reason.strip()):
        raise ContractViolation(
            "unavailable, but gave no reason; return a sentence that says what to install or "
            "attach",
            "unavailable_reason",
        )
    if not ctx.constructed:  # unavailable here: instance methods may need the device
        return f"unavailable: {reason}"
    try:
        facts = ctx.backend.describe()
    except Exception as exc:
        raise ContractViolation(f"raised {type(exc).__name__}: {exc}", "describe") from exc
    if not isinstance(facts, dict) or facts.get("backend") != cls.name:
        raise ContractViolation(
            f"must return a dict with 'backend': {cls.name!r}; got {facts!r}", "describe"
        )
    try:
        json.dumps(facts, default=str)
    except (TypeError, ValueError) as exc:
        raise ContractViolation(f"is not JSON-serialisable: {exc}", "describe") from exc
    dev = ctx.backend.device()
    if not isinstance(dev, torch.device):
        raise ContractViolation(f"returned {dev!r}, not a torch.device", "device")
    if dev.type != cls.device_type:  # allowed (simulators, fake SDKs), but worth seeing
        return f"device() is {dev.type!r} while device_type is {cls.device_type!r}"
    return None


@contract_item(
    "registration",
    "the registry returns this backend by name; deepcopy and pickle keep the singleton",
)
def check_registration(ctx: CheckContext) -> str | None:
    from paca._registry import registry  # the registry's own lookup is what users get

    b = ctx.backend
    if not ctx.registered:
        raise ContractSkip("backend instance was passed directly, not looked up by name")
    got = registry().instance(b.name)
    if got is not b:
        raise ContractViolation(
            f"registry().instance({b.name!r}) returned {got!r}, not the backend under test; "
            f"is the name also used by another plugin?",
            "name",
        )
    if copy.deepcopy(b) is not b:
        raise ContractViolation(
            "copy.deepcopy(backend) must return the backend itself", "__deepcopy__"
        )
    if pickle.loads(pickle.dumps(b)) is not b:
        raise ContractViolation(
            "unpickling a backend must give the registered instance back", "__reduce__"
        )
    return None


def backend_info(cls: type[Backend]) -> Any:
    """The registry's row for ``cls`` (public ``paca.list_backends()``), or None."""
    import warnings

    import paca

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        infos = paca.list_backends()
    for info in infos:
        if info.cls is cls:
            return info
    for info in infos:
        if info.name == cls.name and info.cls is not None and issubclass(cls, info.cls):
            return info
    return None


@contract_item(
    "entry_point",
    "the paca.backends entry point that provides the backend has the backend's name "
    "(paca loads a backend by name lazily only from an entry point of that name)",
)
def check_entry_point(ctx: CheckContext) -> str | None:
    cls = type(ctx.backend)
    info = backend_info(cls)
    if info is None:
        raise ContractSkip(
            f"{cls.__name__} is not installed through a paca.backends entry point (nothing to check)"
        )
    entry = getattr(info, "entry_point", None)
    if entry is None:
        raise ContractSkip(
            f"{info.name!r} was registered at run time (paca.register_backend), not by an entry point"
        )
    if entry != cls.name:
        raise ContractViolation(
            f"backend {cls.name!r} from {info.distribution} is provided by the entry point "
            f'{entry!r}; name the entry point {cls.name!r} ([project.entry-points."paca.backends"] '
            f'{cls.name} = "...") so paca can load it by name without importing every plugin',
            "entry point",
        )
    return f"entry point {entry!r} from {info.distribution}"
