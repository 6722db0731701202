"""PaCA across processes: DDP and FSDP2 with 2 CPU ranks (gloo), against one process.

Each test launches ``torchrun`` (``python -m torch.distributed.run``) on *this file*:
the ``__main__`` block at the bottom runs a scenario on every rank and writes what it
saw to ``rank<N>.json`` in a folder; the test compares it with the same training run in
the pytest process (one process, the same global batch). One launch runs several
scenarios, because starting two ranks (importing torch and transformers twice) is most
of the cost on a 2-core machine.

* DDP: only the delta parameters are reduced (a comm hook lists the reduced tensors), no
  unused-parameter warning, losses equal one process on the same global batch;
* FSDP2 (``fully_shard`` per decoder layer + root): deltas are DTensors sharded by rows,
  losses equal one process (with and without ``reshard_after_forward``), the write
  traffic of a PaCA layer step beyond the frozen layer stays within the seam's bound on
  every rank, ``save_pretrained`` writes one full adapter (rank 0) that loads into one
  process (and back into a 2-rank FSDP2 model) with equal outputs;
* bad input: ranks with different paca backends or columns, wrapping an already sharded
  model, a tensor-parallel (DTensor) base weight in the op, and a per-rank checkpoint
  folder given as an adapter, each refused with what to do.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

HERE = Path(__file__).resolve()
#: hard limit of one launch; a hung collective must fail the test, not the CI job
TIMEOUT = float(os.environ.get("PACA_DIST_TEST_TIMEOUT", "75"))
STEPS = 3
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 300
GLOBAL_BATCH = 4
SEQ = 16
#: float tolerance for losses: ranks sum gradients in another order than one process
LOSS_TOL = dict(rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ shared by both sides
def make_model(seed: int = 0, backend: Any = "cpu") -> Any:
    import paca
    from paca.tiny import tiny_llama

    model = tiny_llama(
        vocab_size=VOCAB, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, seed=seed
    )
    config = paca.PacaConfig(r=4, target_modules=TARGETS, seed=seed)
    pm = paca.wrap(model, config, backend=backend)
    return pm.train()


def global_batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)


def eval_batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(7))


def train(model: Any, steps: int, rank: int = 0, world: int = 1) -> list[float]:
    """AdamW steps on this rank's slice of each global batch; the mean loss over ranks."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    losses = []
    for step in range(steps):
        ids = global_batch(step)
        n = ids.shape[0] // world
        local = ids[rank * n : (rank + 1) * n]
        loss = model(input_ids=local, labels=local).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        value = loss.detach().clone()
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(value)
        losses.append(float(value) / world)
    return losses


def reference_losses(steps: int = STEPS) -> list[float]:
    return train(make_model(), steps)


# ------------------------------------------------------------------ launching
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc): torchrun starts each rank in a session of
    its own, so killing the launcher's process group does not reach the ranks."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` (a launcher this test started) and every process it started."""
    for pid in [*descendants(proc.pid), proc.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.communicate()


def torchrun(
    args: list[str], out: Path, nproc: int = 2, timeout: float = TIMEOUT, script: Path = HERE
) -> list[dict]:
    """Run ``script``'s ``__main__`` (this file's) on ``nproc`` ranks; each ``rank<N>.json``."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PACA_BACKEND": "cpu", "PYTHONWARNINGS": ""}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(script), *args, str(out),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        log = b""
        kill_tree(proc)  # the launcher and its ranks
        pytest.fail(f"torchrun {args} did not finish in {timeout:.0f}s:\n{log.decode()[-4000:]}")
    text = log.decode(errors="replace")
    if proc.returncode != 0:
        pytest.fail(f"torchrun {args} failed ({proc.returncode}):\n{text[-6000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.fixture(scope="module")
def core_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("dist-core")
    started = time.perf_counter()
    ranks = torchrun(["core"], out)
    ranks[0]["launch_seconds"] = time.perf_counter() - started
    return out, ranks


def _ok(rank_result: dict, key: str) -> Any:
    value = rank_result[key]
    if isinstance(value, dict) and "error" in value and len(value) == 1:
        pytest.fail(f"scenario {key} failed on a rank: {value['error']}")
    return value


# ------------------------------------------------------------------ tests
pytestmark = pytest.mark.slow


def test_ddp_reduces_only_deltas_and_matches_one_process(core_run):
    _, ranks = core_run
    want = reference_losses()
    for r in ranks:
        ddp = _ok(r, "ddp")
        torch.testing.assert_close(ddp["losses"], want, **LOSS_TOL)
        assert ddp["reduced"] == ddp["deltas"], "DDP reduced tensors other than the deltas"
        assert ddp["unused_warnings"] == [], ddp["unused_warnings"]
    assert ranks[0]["ddp"]["checksum"] == ranks[1]["ddp"]["checksum"]  # same deltas


def test_fsdp2_matches_one_process_and_shards_deltas_by_rows(core_run):
    _, ranks = core_run
    want = reference_losses()
    for r in ranks:
        fsdp = _ok(r, "fsdp2")
        assert fsdp["delta_type"] == "DTensor" and fsdp["placements"] == ["Shard(0)"]
        assert fsdp["local_rows"] * 2 == fsdp["rows"]
        torch.testing.assert_close(fsdp["losses"], want, **LOSS_TOL)
        torch.testing.assert_close(_ok(r, "fsdp2_keep")["losses"], want, **LOSS_TOL)


def test_fsdp2_adapter_is_saved_once_in_full_and_loads_in_one_process(core_run):
    import paca
    from paca.io import read_adapter
    from paca.tiny import tiny_llama

    out, ranks = core_run
    saved = out / "fsdp-adapter"
    meta, tensors = read_adapter(saved)
    assert tensors["model.layers.0.self_attn.q_proj.delta"].shape == (32, 4)  # all the rows
    assert _ok(ranks[1], "fsdp2")["wrote"] is False  # rank 1 wrote nothing, waited
    model = paca.load(
        tiny_llama(vocab_size=VOCAB, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64),
        saved,
        backend="cpu",
    )
    with torch.no_grad():
        logits = model(input_ids=eval_batch()).logits
    sharded = torch.load(out / "fsdp-logits.pt")
    torch.testing.assert_close(logits, sharded, rtol=1e-5, atol=1e-5)
    # ... and back into a freshly sharded 2-rank model (load_adapter_weights into DTensors)
    for r in ranks:
        torch.testing.assert_close(
            torch.tensor(_ok(r, "fsdp2_reload")["max_diff"]), torch.tensor(0.0)
        )


def test_fsdp2_write_traffic_per_rank_stays_within_the_seam_bound(core_run):
    _, ranks = core_run
    for r in ranks:
        t = _ok(r, "traffic")
        assert t["beyond_irreducible_fraction"] <= 0.1, t


def test_ddp_adapter_is_written_by_rank_zero_and_loads(core_run):
    from paca.io import read_adapter

    out, ranks = core_run
    _, tensors = read_adapter(out / "ddp-adapter")
    assert tensors["model.layers.1.mlp.down_proj.delta"].shape == (32, 4)
    assert _ok(ranks[1], "ddp")["wrote"] is False


def test_ranks_that_disagree_are_refused_with_what_to_do(core_run):
    _, ranks = core_run
    for r in ranks:
        assert "the paca backend differs" in r["mixed_backends"], r["mixed_backends"]
        assert "PACA_BACKEND" in r["mixed_backends"]
        assert "the trained columns differ" in r["mixed_columns"], r["mixed_columns"]


def test_a_sharding_paca_cannot_serve_is_refused(core_run):
    _, ranks = core_run
    for r in ranks:
        assert "already sharded" in r["wrap_after_shard"], r["wrap_after_shard"]
        assert "fully_shard" in r["wrap_after_shard"]
        assert "tensor parallelism" in r["tensor_parallel"], r["tensor_parallel"]


def test_a_per_rank_checkpoint_is_not_loaded_as_an_adapter(tmp_path):
    import paca
    from paca.distributed import ShardedCheckpointError

    folder = tmp_path / "checkpoint-10"
    folder.mkdir()
    for name in ("__0_0.distcp", "__1_0.distcp", ".metadata"):
        (folder / name).write_bytes(b"x")
    with pytest.raises(ShardedCheckpointError, match="per-rank sharded checkpoint") as e:
        paca.load(make_model().get_base_model(), folder)
    assert "save_pretrained" in str(e.value) and "torch.distributed.checkpoint" in str(e.value)


def test_helpers_answer_for_one_process_without_a_process_group():
    from paca import distributed

    assert distributed.world_size() >= 1 and distributed.is_writer() in (True, False)
    t = torch.arange(6.0).reshape(3, 2)
    assert distributed.full_tensor(t) is not t and torch.equal(distributed.full_tensor(t), t)
    assert distributed.write_once(lambda: 42, collective=True) == 42
    with pytest.raises(distributed.DistributedSetupError, match="multiple of 2"):
        distributed.check_divisible(5, 2, "[train].batch_size")
    assert distributed.check_divisible(8, 2, "batch") == 4
    assert "1/2 of the rows" in distributed.shard_shape_hint((16, 4), (32, 4))


# ------------------------------------------------------------------ the ranks' side
def _guard(fn: Any) -> Any:
    try:
        return fn()
    except Exception as exc:  # recorded, so one broken scenario does not hide the others
        import traceback

        return {"error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-2500:]}"}


def _message(fn: Any) -> str:
    try:
        fn()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


@contextlib.contextmanager
def _publishes() -> Any:
    """The folders this rank's save calls write (paca.io._publish, the one writer)."""
    from paca import io

    real, seen = io._publish, []

    def publish(directory: Path, files: Any) -> None:
        seen.append(str(directory))
        real(directory, files)

    io._publish = publish
    try:
        yield seen
    finally:
        io._publish = real


def _checksum(model: Any) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters() if p.requires_grad))


def _scenario_ddp(out: Path, rank: int, world: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from paca import distributed

    pm = make_model()
    deltas = sorted(n for n, p in pm.named_parameters() if p.requires_grad)
    names = {id(p): n for n, p in pm.named_parameters()}
    reduced: set[str] = set()

    def hook(state, bucket):  # no annotations: DDP checks that bucket's is GradBucket
        reduced.update(names[id(p)] for p in bucket.parameters())
        return allreduce_hook(state, bucket)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ddp = distributed.data_parallel(pm)
        ddp.register_comm_hook(None, hook)
        losses = train(ddp, STEPS, rank, world)
    unused = [str(w.message) for w in caught if "unused" in str(w.message).lower()]
    with _publishes() as published:
        pm.save_pretrained(out / "ddp-adapter")  # every rank calls it; rank 0 writes
    dist.barrier()
    return {
        "losses": losses,
        "deltas": deltas,
        "reduced": sorted(reduced),
        "unused_warnings": unused,
        "checksum": _checksum(pm),
        "wrote": bool(published),
    }


def _scenario_fsdp2(out: Path, rank: int, world: int, **fsdp: Any) -> dict:
    from paca import distributed

    pm = make_model()
    distributed.fully_shard_layers(pm, **fsdp)
    delta = pm.get_base_model().model.layers[0].self_attn.q_proj.paca_delta["default"]
    result: dict[str, Any] = {
        "delta_type": type(delta).__name__,
        "placements": [f"Shard({p.dim})" if p.is_shard() else str(p) for p in delta.placements],
        "rows": int(delta.shape[0]),
        "local_rows": int(delta.to_local().shape[0]) if hasattr(delta, "to_local") else None,
        "losses": train(pm, STEPS, rank, world),
    }
    if fsdp:
        return result
    pm.eval()
    with torch.no_grad():
        logits = pm(input_ids=eval_batch()).logits
    if rank == 0:
        torch.save(logits, out / "fsdp-logits.pt")
    with _publishes() as published:
        pm.save_pretrained(out / "fsdp-adapter")  # a collective: every rank gathers
    result["wrote"] = bool(published)
    return result


def _scenario_fsdp2_reload(out: Path, rank: int, world: int) -> dict:
    from paca import distributed
    from paca.io import load_adapter_weights

    pm = make_model()
    distributed.fully_shard_layers(pm)
    load_adapter_weights(pm, out / "fsdp-adapter", "default")
    pm.eval()
    with torch.no_grad():
        logits = pm(input_ids=eval_batch()).logits
    want = torch.load(out / "fsdp-logits.pt")
    return {"max_diff": float((logits - want).abs().max())}


def _scenario_traffic(rank: int, world: int) -> dict:
    """Bytes one PaCA layer step writes on this rank beyond the same layer frozen, both
    under FSDP2 (the all-gather of the weight is in both and cancels)."""
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    import paca
    from paca.testing.traffic import WriteCounter

    out_f, in_f, rows, r = 2816, 1024, 256, 8
    torch.manual_seed(0)
    x = torch.randn(rows, in_f)

    def step(module: nn.Module) -> int:
        inp = x.clone().requires_grad_(True)
        module(inp).sum().backward()  # warm-up: FSDP2's lazy init
        inp = x.clone().requires_grad_(True)
        with WriteCounter() as counted:
            module(inp).sum().backward()
        return counted.bytes

    frozen = nn.Sequential(nn.Linear(in_f, out_f)).requires_grad_(False)
    fully_shard(frozen)
    frozen_bytes = step(frozen)
    model = paca.wrap(
        nn.Sequential(nn.Linear(in_f, out_f)),
        paca.PacaConfig(r=r, target_modules=["0"]),
        backend="cpu",
    )
    fully_shard(model)
    paca_bytes = step(model)
    weight_bytes = out_f * in_f * 4
    delta_bytes = out_f * r * 4
    x_sel = rows * r * 4
    # irreducible: the saved x_sel, d(delta), and FSDP's own work on the delta (its
    # all-gather and the reduce-scatter of its gradient into this rank's shard)
    irreducible = x_sel + delta_bytes + delta_bytes + 2 * delta_bytes // world
    extra = paca_bytes - frozen_bytes
    return {
        "frozen_bytes": frozen_bytes,
        "paca_bytes": paca_bytes,
        "extra_bytes": extra,
        "weight_bytes": weight_bytes,
        "extra_fraction": extra / weight_bytes,
        "beyond_irreducible_fraction": (extra - irreducible) / weight_bytes,
    }


def _scenario_mixed(rank: int) -> tuple[str, str]:
    from paca_cpu import CPUBackend

    from paca import distributed

    class OtherCPU(CPUBackend):
        name = "cpu-other"

    backend = OtherCPU() if rank == 1 else "cpu"
    mixed = _message(lambda: distributed.check_ranks_agree(make_model(backend=backend)))
    columns = _message(lambda: distributed.check_ranks_agree(make_model(seed=rank)))
    return mixed, columns


def _scenario_refusals(rank: int, world: int) -> tuple[str, str]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    import paca
    from paca.tiny import tiny_llama

    def shard_then_wrap() -> None:
        model = tiny_llama(
            vocab_size=VOCAB, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64
        )
        for layer in model.model.layers:
            fully_shard(layer)
        paca.wrap(model, paca.PacaConfig(r=4, target_modules=TARGETS), backend="cpu")

    def tensor_parallel() -> None:
        pm = make_model()
        mesh = init_device_mesh("cpu", (world,))
        q = pm.get_base_model().model.layers[0].self_attn.q_proj
        parallelize_module(q.base_layer, mesh, ColwiseParallel())
        pm(input_ids=eval_batch())

    return _message(shard_then_wrap), _message(tensor_parallel)


def _main(argv: list[str]) -> None:
    import torch.distributed as dist

    scenario, out = argv[0], Path(argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result: dict[str, Any] = {"rank": rank, "world": world}
    started = time.perf_counter()
    if scenario == "core":
        result["ddp"] = _guard(lambda: _scenario_ddp(out, rank, world))
        result["fsdp2"] = _guard(lambda: _scenario_fsdp2(out, rank, world))
        dist.barrier()
        result["fsdp2_reload"] = _guard(lambda: _scenario_fsdp2_reload(out, rank, world))
        result["fsdp2_keep"] = _guard(
            lambda: _scenario_fsdp2(out, rank, world, reshard_after_forward=False)
        )
        result["traffic"] = _guard(lambda: _scenario_traffic(rank, world))
        result["mixed_backends"], result["mixed_columns"] = _scenario_mixed(rank)
        result["wrap_after_shard"], result["tensor_parallel"] = _scenario_refusals(rank, world)
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    result["seconds"] = time.perf_counter() - started
    (out / f"rank{rank}.json").write_text(json.dumps(result, indent=1, default=str))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _main(sys.argv[1:])
