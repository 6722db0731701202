"""PaCA across processes: torchrun DDP, FSDP2 and DeepSpeed ZeRO (docs/distributed.md).

PaCA needs nothing special from a data-parallel wrapper: the trainable tensors are the
``delta`` parameters (``out x r`` per layer), everything else is frozen, so DDP reduces
only deltas, FSDP2 and ZeRO-3 shard the frozen weights and the deltas alike, and the
PaCA op sees whatever the wrapper hands the layer's forward. This module holds the few
things that do need care:

* **who writes**: :func:`is_writer` (rank 0), :func:`barrier`. A saved adapter is always
  *full* (unsharded): every rank takes part in gathering the deltas
  (:func:`full_tensor`, a collective for FSDP2's DTensors and ZeRO-3's partitioned
  parameters) and only rank 0 writes, while the other ranks wait on a barrier.
* **loading into a sharded model**: :func:`copy_full_into` copies a full saved tensor into
  a DTensor (each rank keeps its own shard, no communication) or a ZeRO-3 partitioned
  parameter; :func:`full_shape` is a parameter's unpartitioned shape.
* **checks that fail early with advice**: ranks that disagree on the paca backend, the
  device or the trained columns (:func:`check_ranks_agree`); a base weight that is still
  a DTensor when the PaCA op runs (tensor parallelism: :func:`check_weight_layout`); a
  model that was sharded *before* it was wrapped (:func:`sharded_weight_reason`); a
  per-rank sharded checkpoint folder given where a PaCA adapter is expected
  (:func:`sharded_checkpoint_hint`).
* **one-call wrappers** for plain training loops: :func:`data_parallel` (DDP) and
  :func:`fully_shard_layers` (FSDP2 per decoder layer plus the root).

Nothing here imports ``torch.distributed`` submodules or DeepSpeed until it is needed,
and everything is a no-op (or answers for one process) when no process group exists.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from paca.model import PacaModel

logger = logging.getLogger("paca")
T = TypeVar("T")

#: The strategies ``paca run --strategy`` knows (recorded in the run folder).
STRATEGIES = ("ddp", "fsdp2", "deepspeed")

#: Process-group backend each paca device type needs, for the advice in errors.
PROCESS_GROUP_BACKENDS = {"cpu": "gloo", "cuda": "nccl", "hpu": "hccl"}


class DistributedSetupError(RuntimeError):
    """Ranks that cannot train together, or a sharding of the base PaCA cannot serve."""


class ShardedCheckpointError(ValueError):
    """A per-rank sharded checkpoint was given where a full PaCA adapter is expected."""


# ------------------------------------------------------------------ ranks
def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is initialized in this process."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def rank() -> int:
    """This process's global rank: the process group's, else torchrun's ``RANK``, else 0.

    The environment fallback answers correctly under torchrun before the process group
    exists (e.g. while a run folder is created, before the Trainer initializes it).
    """
    if is_distributed():
        import torch.distributed as dist

        return dist.get_rank()
    return _env_int("RANK", 0)


def world_size() -> int:
    """How many processes train together (1 without a process group or torchrun)."""
    if is_distributed():
        import torch.distributed as dist

        return dist.get_world_size()
    return max(_env_int("WORLD_SIZE", 1), 1)


def local_rank() -> int:
    """This process's rank on its machine (torchrun's ``LOCAL_RANK``; 0 by default)."""
    return _env_int("LOCAL_RANK", 0)


def is_writer() -> bool:
    """Whether this process writes shared files (adapters, run folders): rank 0."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (a no-op without a process group or with one process)."""
    if is_distributed() and world_size() > 1:
        import torch.distributed as dist

        dist.barrier()


# ------------------------------------------------------------------ sharded tensors
def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (FSDP2, tensor parallel).

    Cheap enough for a forward pass: no DTensor can exist before its module is imported.
    """
    module = sys.modules.get("torch.distributed.tensor")
    cls = getattr(module, "DTensor", None) if module is not None else None
    return cls is not None and isinstance(t, cls)


def is_zero3_param(t: object) -> bool:
    """Whether ``t`` is a parameter DeepSpeed ZeRO-3 manages (partitioned across ranks)."""
    return hasattr(t, "ds_id") and hasattr(t, "ds_status")


def is_sharded(t: object) -> bool:
    """Whether ``t`` holds only this rank's part of a tensor (DTensor or ZeRO-3)."""
    return is_dtensor(t) or is_zero3_param(t)


def full_shape(t: torch.Tensor) -> tuple[int, ...]:
    """The unsharded shape of ``t`` (a ZeRO-3 parameter's ``.shape`` is its empty buffer)."""
    if is_zero3_param(t):
        return tuple(t.ds_shape)  # type: ignore[attr-defined]
    return tuple(t.shape)


@contextmanager
def gathered(params: Iterable[torch.Tensor]) -> Iterator[None]:
    """Within the block, ZeRO-3 partitioned ``params`` hold their full values (read-only).

    A collective when any of them is partitioned: every rank must enter it with the same
    parameters. A no-op for everything else.
    """
    zero3 = [p for p in params if is_zero3_param(p)]
    if not zero3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(zero3, modifier_rank=None):
        yield


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` unsharded and detached: a DTensor's ``full_tensor()``, a ZeRO-3 parameter
    gathered (a copy), anything else as it is.

    A collective for sharded tensors: **every rank must call it, in the same order**.
    """
    if is_dtensor(t):
        return t.detach().full_tensor()  # type: ignore[attr-defined]
    if is_zero3_param(t):
        with gathered([t]):
            return t.detach().clone()
    return t.detach()


def full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """:func:`full_tensor` of each value, in the dict's order (a collective when sharded)."""
    return {key: full_tensor(t) for key, t in tensors.items()}


@torch.no_grad()
def copy_full_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy the full tensor ``src`` into ``dst``, which may be sharded.

    A DTensor keeps its own shard of ``src`` (every rank holds the same ``src``, so no
    communication is needed); a ZeRO-3 parameter is gathered, written on rank 0 and
    partitioned again (a collective). ``src`` is cast to ``dst``'s dtype and device.
    """
    if is_dtensor(dst):
        from torch.distributed.tensor import distribute_tensor

        local = src.to(device=dst.device, dtype=dst.dtype)
        dst.copy_(distribute_tensor(local, dst.device_mesh, dst.placements, src_data_rank=None))  # type: ignore[attr-defined]
        return
    if is_zero3_param(dst):
        import deepspeed

        with deepspeed.zero.GatheredParameters([dst], modifier_rank=0):
            if rank() == 0:
                dst.data.copy_(src.to(device=dst.device, dtype=dst.dtype))
        return
    dst.copy_(src.to(device=dst.device, dtype=dst.dtype))


# ------------------------------------------------------------------ refusals
_TP_ADVICE = (
    "PaCA trains whole input columns of the unsharded weight, so its op must see the "
    "full weight while it runs. Shard PaCA models with FSDP2 (fully_shard: the weight is "
    "gathered for the forward and backward), DeepSpeed ZeRO-3 or plain DDP, and leave the "
    "adapted layers out of tensor/sequence parallelism (parallelize_module)"
)


def check_weight_layout(weight: torch.Tensor, where: str = "a PaCA layer") -> None:
    """Refuse a base weight that is still sharded while the PaCA op runs.

    Under FSDP2 the op sees the all-gathered plain weight; a DTensor here means tensor
    parallelism (``parallelize_module``) sharded the base layer's weight, whose columns
    (``Shard(1)``) or rows (``Shard(0)``) then live on other ranks during the op.
    """
    if is_dtensor(weight):
        placements = tuple(getattr(weight, "placements", ()))
        raise DistributedSetupError(
            f"{where}: its base weight is a DTensor with placements {placements} while the "
            f"PaCA op runs (tensor parallelism?); {_TP_ADVICE}"
        )


def sharded_weight_reason(module: nn.Module) -> str | None:
    """Why ``module``'s weight, sharded before ``paca.wrap``, cannot be adapted; else None."""
    w = getattr(module, "weight", None)
    if is_dtensor(w):
        return (
            f"its weight is already sharded (a DTensor with placements "
            f"{tuple(getattr(w, 'placements', ()))}, from fully_shard or parallelize_module); "
            f"call paca.wrap on the unsharded model first, then fully_shard it "
            f"(paca.distributed.fully_shard_layers), so the deltas are sharded with it"
        )
    if is_zero3_param(w) and tuple(w.shape) != full_shape(w):  # type: ignore[arg-type]
        return (
            f"its weight is partitioned by DeepSpeed ZeRO-3 (deepspeed.zero.Init or an "
            f"initialized engine; full shape {list(full_shape(w))}); call paca.wrap on "
            f"the model before deepspeed.initialize and outside zero.Init (with "
            f"transformers, load the model before creating TrainingArguments(deepspeed=...))"
        )
    return None


#: Files and folders that mark a per-rank sharded checkpoint, with what wrote them.
_SHARDED_MARKERS = (
    ("*.distcp", "torch.distributed.checkpoint (dcp.save)"),
    ("pytorch_model_fsdp_*", "the Trainer's FSDP SHARDED_STATE_DICT"),
    ("*fsdp*_rank*", "FSDP local state dicts"),
    ("zero_pp_rank_*", "DeepSpeed save_checkpoint"),
    ("global_step*", "DeepSpeed save_checkpoint"),
    ("*_model_states.pt", "DeepSpeed save_checkpoint"),
    ("*rank[0-9]*.safetensors", "one file per rank"),
    ("*rank[0-9]*.pt", "one file per rank"),
)


def sharded_checkpoint_hint(directory: str | os.PathLike[str]) -> str | None:
    """What to do when ``directory`` holds a per-rank sharded checkpoint, not an adapter.

    Returns None when nothing in it looks sharded (the caller reports the missing files).
    """
    d = Path(directory)
    probe = d.parent if d.is_file() else d
    if not probe.is_dir():
        return None
    names = [p.name for p in probe.iterdir()]
    found = sorted({what for pattern, what in _SHARDED_MARKERS for _ in probe.glob(pattern)})
    if not found:
        return None
    shown = ", ".join(sorted(names)[:6]) + (", ..." if len(names) > 6 else "")
    return (
        f"{str(probe)!r} holds a per-rank sharded checkpoint ({'; '.join(found)}: {shown}), "
        f"not a PaCA adapter. A PaCA adapter is always saved full: restore this checkpoint "
        f"into the sharded model the way it was written (the Trainer's "
        f"resume_from_checkpoint, dcp.load, or DeepSpeed's load_checkpoint), then call "
        f"model.save_pretrained(DIR) on every rank (rank 0 writes the gathered deltas) and "
        f"load DIR"
    )


# ------------------------------------------------------------------ agreement across ranks
def _is_paca_model(model: object) -> bool:
    """A :class:`~paca.model.PacaModel`, also when FSDP2 made it an ``FSDPPacaModel``
    (duck-typed: this module is imported by :mod:`paca.io`, which the model imports)."""
    return callable(getattr(type(model), "paca_layers", None)) and hasattr(model, "paca_configs")


def _idx_digest(model: PacaModel) -> dict[str, str]:
    digests: dict[str, Any] = {}
    for path, layer in model.paca_layers():
        names = list(layer.paca_idx.keys())  # a BufferDict (a module): not iterable
        for name in names:
            h = digests.setdefault(name, hashlib.sha256())
            idx = layer.paca_idx[name].detach().to("cpu", torch.long).contiguous()
            h.update(path.encode())
            h.update(idx.numpy().tobytes())
    return {name: h.hexdigest()[:16] for name, h in digests.items()}


def rank_facts(model: nn.Module) -> dict[str, Any]:
    """What every rank of one training job must agree on (compared by :func:`check_ranks_agree`)."""
    import torch.distributed as dist

    inner = model
    while not _is_paca_model(inner) and isinstance(getattr(inner, "module", None), nn.Module):
        inner = inner.module  # DDP, a DeepSpeed engine
    inner = getattr(inner, "_orig_mod", inner)  # torch.compile
    facts: dict[str, Any] = {
        "process_group": str(dist.get_backend()) if is_distributed() else None,
        "torch": torch.__version__.split("+")[0],
    }
    if _is_paca_model(inner):
        b = inner.backend
        trainable = [
            (n, tuple(full_shape(p))) for n, p in inner.named_parameters() if p.requires_grad
        ]
        facts.update(
            paca_backend=b.name,
            device_type=b.device_type,
            active_adapter=inner.active_adapter,
            columns=_idx_digest(inner),
            trainable=hashlib.sha256(repr(trainable).encode()).hexdigest()[:16],
        )
    return facts


_FACT_NAMES = {
    "paca_backend": "the paca backend differs",
    "device_type": "the device type differs",
    "process_group": "the process-group backend differs",
    "torch": "the torch version differs",
    "active_adapter": "the active adapter differs",
    "columns": "the trained columns differ",
    "trainable": "the trainable parameters differ",
}
_WHAT_TO_DO = {
    "paca_backend": "give every rank the same paca backend (PACA_BACKEND=NAME, or "
    "paca.wrap(..., backend=NAME) on every rank)",
    "device_type": "run every rank on the same kind of device (one backend for all)",
    "process_group": "initialize the process group the same way on every rank",
    "torch": "install the same torch on every machine",
    "active_adapter": "call set_adapter(NAME) with the same name on every rank",
    "columns": "select the same columns on every rank: the same PacaConfig seed and "
    "strategy, or save the adapter on rank 0 and paca.load it everywhere (a data-dependent "
    "selection, e.g. gradient calibration on each rank's own batches, differs per rank)",
    "trainable": "make the same parameters trainable on every rank (same target_modules, "
    "modules_to_save and r)",
}


def check_ranks_agree(model: nn.Module, group: Any = None) -> None:
    """Raise :class:`DistributedSetupError` unless every rank trains the same PaCA setup.

    Compares the paca backend, device type, process-group backend, torch version, active
    adapter, the trained columns of every layer and the trainable parameters. Also checks
    that the process-group backend can communicate the device's tensors (``nccl`` cannot
    carry CPU tensors, ``hccl`` only Gaudi's). A collective: call it on every rank.
    No-op without a process group.
    """
    if not is_distributed():
        return
    import torch.distributed as dist

    facts = rank_facts(model)
    pg, device = facts.get("process_group"), facts.get("device_type")
    if device is not None and pg is not None:
        needs = PROCESS_GROUP_BACKENDS.get(str(device))
        bad = (pg == "nccl" and device != "cuda") or (pg == "hccl" and device != "hpu")
        if bad:
            raise DistributedSetupError(
                f"rank {rank()}: the process group uses {pg!r}, which cannot communicate "
                f"{device} tensors (paca backend {facts['paca_backend']!r}); initialize it "
                f"with backend={needs or 'gloo'!r} (torch.distributed.init_process_group) or "
                f"pick a paca backend for the accelerator {pg!r} serves"
            )
    n = dist.get_world_size(group)
    every: list[Any] = [None] * n
    dist.all_gather_object(every, facts, group=group)
    problems = []
    for key in sorted({k for f in every for k in f}):
        values = [f.get(key) for f in every]
        if any(v != values[0] for v in values):
            by_rank = ", ".join(f"rank {i}: {v!r}" for i, v in enumerate(values))
            what = _FACT_NAMES.get(key, f"{key} differs")
            problems.append(f"{what} ({by_rank}); {_WHAT_TO_DO.get(key, 'make it equal')}")
    if problems:
        raise DistributedSetupError(
            "the ranks of this job cannot train one PaCA model together: " + "; ".join(problems)
        )


def check_divisible(total: int, world: int, what: str, advice: str = "") -> int:
    """``total // world``, or a :class:`DistributedSetupError` saying what to change."""
    if world < 1:
        raise DistributedSetupError(f"world size must be at least 1, got {world}")
    if total % world:
        lower = max(world, total - total % world)
        raise DistributedSetupError(
            f"{what} = {total} does not split evenly over {world} processes; use a multiple "
            f"of {world} (e.g. {lower} or {lower + world})" + (f" {advice}" if advice else "")
        )
    return total // world


# ------------------------------------------------------------------ plain-loop wrappers
def data_parallel(model: nn.Module, **ddp_kwargs: Any) -> nn.Module:
    """``DistributedDataParallel`` for a PaCA model after :func:`check_ranks_agree`.

    DDP reduces only parameters that require grad: the active adapter's deltas (and its
    ``modules_to_save`` copies). Every delta is used in every forward, so
    ``find_unused_parameters`` defaults to False (True costs a graph walk per step and
    makes DDP warn that nothing was unused). On CUDA/HPU the current device is used.
    """
    from torch.nn.parallel import DistributedDataParallel

    check_ranks_agree(model)
    ddp_kwargs.setdefault("find_unused_parameters", False)
    backend = getattr(model, "backend", None)
    if backend is not None and backend.device_type == "cuda" and "device_ids" not in ddp_kwargs:
        ddp_kwargs["device_ids"] = [torch.cuda.current_device()]
    return DistributedDataParallel(model, **ddp_kwargs)


def decoder_layers(
    model: nn.Module, layer_classes: Iterable[type | str] | None = None
) -> list[nn.Module]:
    """The modules to shard one by one: instances of ``layer_classes`` (classes or class
    names), by default the transformers model's ``_no_split_modules`` (e.g.
    ``LlamaDecoderLayer``). Outermost matches only (no layer inside another)."""
    inner = model.get_base_model() if _is_paca_model(model) else model
    wanted = list(layer_classes) if layer_classes is not None else None
    if wanted is None:
        wanted = list(getattr(inner, "_no_split_modules", None) or [])
    if not wanted:
        raise DistributedSetupError(
            f"{type(inner).__name__} names no decoder-layer classes (_no_split_modules); pass "
            f"layer_classes=[YourBlockClass] to shard it block by block"
        )
    names = {c if isinstance(c, str) else c.__name__ for c in wanted}
    found: list[nn.Module] = []
    inside: set[int] = set()
    for module in inner.modules():
        if id(module) in inside:
            continue
        if type(module).__name__ in names:
            found.append(module)
            inside.update(id(m) for m in module.modules())
    if not found:
        raise DistributedSetupError(
            f"no module of {sorted(names)} in {type(inner).__name__}; pass layer_classes= the "
            f"classes of its repeated blocks"
        )
    return found


def fully_shard_layers(
    model: nn.Module, layer_classes: Iterable[type | str] | None = None, **fsdp_kwargs: Any
) -> nn.Module:
    """FSDP2: ``fully_shard`` every decoder layer of a PaCA model, then the model itself.

    Call it *after* ``paca.wrap`` (the deltas are then parameters of the layers and are
    sharded with them, by rows like the weights). ``fsdp_kwargs`` go to every
    ``fully_shard`` call (``mesh``, ``reshard_after_forward``, ``mp_policy``...). Checks
    that the ranks agree first (:func:`check_ranks_agree`). Returns ``model`` (sharded
    in place, as ``fully_shard`` does).
    """
    from torch.distributed.fsdp import fully_shard

    check_ranks_agree(model)
    for layer in decoder_layers(model, layer_classes):
        fully_shard(layer, **fsdp_kwargs)
    fully_shard(model, **fsdp_kwargs)
    return model


def strategy_of(model: nn.Module) -> str | None:
    """``"ddp"``, ``"fsdp2"`` or ``"deepspeed"`` for a model wrapped that way, else None."""
    if type(model).__name__ == "DeepSpeedEngine" or any(
        is_zero3_param(p) for p in model.parameters()
    ):
        return "deepspeed"
    if type(model).__name__ == "DistributedDataParallel":
        return "ddp"
    if any(is_dtensor(p) for p in model.parameters()):
        return "fsdp2"
    return None


def is_sharded_model(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is sharded (FSDP2 or ZeRO-3): saving it then
    needs every rank (the deltas are gathered with collectives)."""
    return any(is_sharded(p) for p in model.parameters())


def write_once(write: Callable[[], T], collective: bool) -> T | None:
    """Run ``write`` (which writes shared files) on the one process that should.

    * No process group (or one process): ``write()``; every process is on its own.
    * ``collective`` (every rank has just gathered the tensors to write, so every rank is
      here): rank 0 writes while the others wait; an error on rank 0 is raised on every
      rank (as :class:`DistributedSetupError` on the others), so no rank carries on as if
      the files existed.
    * Otherwise (replicated tensors, e.g. DDP): rank 0 writes and the others return at
      once without communicating, so saving on rank 0 only (the usual DDP idiom) and
      saving on every rank both write exactly once.
    """
    if not is_distributed() or world_size() == 1:
        return write()
    if not collective:
        if is_writer():
            return write()
        logger.debug("rank %d: not writing (rank 0 writes)", rank())
        return None
    import torch.distributed as dist

    result: T | None = None
    error: BaseException | None = None
    if is_writer():
        try:
            result = write()
        except BaseException as exc:  # reported to every rank below, then re-raised here
            error = exc
    message = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(message, src=0)
    if error is not None:
        raise error
    if message[0] is not None:
        raise DistributedSetupError(f"rank 0 could not write the files: {message[0]}")
    return result


def shard_shape_hint(saved: tuple[int, ...], have: tuple[int, ...]) -> str:
    """A hint for a saved tensor with a fraction of the rows this model's has (a shard)."""
    same_rest = bool(saved) and len(saved) == len(have) and saved[1:] == have[1:]
    if same_rest and saved[0] and have[0] > saved[0] and have[0] % saved[0] == 0:
        return (
            f" (it has 1/{have[0] // saved[0]} of the rows: one rank's shard of a sharded "
            f"model? a PaCA adapter is saved full by model.save_pretrained called on every rank)"
        )
    return ""


# ------------------------------------------------------------------ launching and configs
def under_torchrun() -> bool:
    """Whether this process is one rank of a torchrun (``torch.distributed.run``) job."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def launch(nproc: int, argv: list[str], module: str = "paca") -> int:
    """Run ``python -m MODULE ARGV`` on ``nproc`` local ranks with torchrun; its exit status.

    The same as ``torchrun --standalone --nproc_per_node NPROC -m MODULE ARGV``
    (``python -m torch.distributed.run``, so no ``torchrun`` script needs to be on PATH).
    Ctrl-C reaches the ranks too (one foreground process group); this waits for them.
    """
    import subprocess

    if nproc < 1:
        raise DistributedSetupError(f"--nproc must be at least 1, got {nproc}")
    if under_torchrun():
        raise DistributedSetupError(
            "this process already is a torchrun rank (LOCAL_RANK is set): drop --nproc, "
            "torchrun decides the world size"
        )
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc}", "-m", module, *argv,
    ]  # fmt: skip
    logger.info("launching %d ranks: %s", nproc, " ".join(cmd))
    proc = subprocess.Popen(cmd)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.wait()
        raise


def deepspeed_config(stage: int, gaudi: bool = False) -> dict[str, Any]:
    """A DeepSpeed config for the Trainer (``TrainingArguments(deepspeed=...)``) at ZeRO
    ``stage`` (1, 2 or 3); sizes and clipping are ``"auto"`` and precision is left out, so
    both come from the TrainingArguments. The files in ``examples/deepspeed/`` are these
    configs.

    ``gaudi``: optimum-habana's Gaudi settings (bf16; no communication overlap,
    reduce-scatter or contiguous gradients at ZeRO-2, as in its own configs).
    """
    if stage not in (1, 2, 3):
        raise ValueError(f"ZeRO stage must be 1, 2 or 3, got {stage!r}")
    zero: dict[str, Any] = {"stage": stage}
    if stage == 2 and gaudi:
        zero.update(overlap_comm=False, reduce_scatter=False, contiguous_gradients=False)
    if stage == 3:
        zero.update(
            overlap_comm=not gaudi,
            stage3_param_persistence_threshold="auto",
            stage3_prefetch_bucket_size="auto",
            # the adapter is saved by gathering only the deltas (PacaTrainer.save_model)
            stage3_gather_16bit_weights_on_model_save=False,
        )
    config: dict[str, Any] = {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": zero,
        # the Trainer's torch AdamW over the deltas (DeepSpeed's fused optimizers need
        # compiled ops; the deltas are small)
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1000,
    }
    if gaudi:  # optimum-habana leaves mixed precision to DeepSpeed
        config["bf16"] = {"enabled": True}
    # Elsewhere no precision section: accelerate adds it from the TrainingArguments (bf16,
    # fp16 or neither). ("auto" there is filled in differently by accelerate and by the
    # Trainer's evaluate(), which then refuses the mismatch on CPU.)
    return config
