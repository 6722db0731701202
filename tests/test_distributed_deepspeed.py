"""PaCA under DeepSpeed ZeRO-2 and ZeRO-3 with 2 CPU ranks (DeepSpeed's CPU accelerator, gloo).

Skipped when DeepSpeed is not installed (it is an optional extra: ``pip install
'paca[deepspeed]'``). One torchrun launch of this file trains the same tiny model as
``test_distributed`` with ``deepspeed.initialize`` at ZeRO-2 and ZeRO-3 (persistence
threshold 0, so every base weight really is partitioned) and saves the ZeRO-3 adapter;
the tests compare with one process:

* losses equal one process on the same global batch, at both stages;
* under ZeRO-3 the frozen base weights and the deltas are partitioned between steps
  (DeepSpeed gathers the base weight when the PaCA layer reads it, as an external
  parameter of the PaCA layer, and again for backward);
* ``save_pretrained`` on every rank writes one full adapter (rank 0) that loads into one
  process with the same outputs as the ZeRO-3 model;
* the shipped configs (``examples/deepspeed/``) are the ones ``paca run --strategy
  deepspeed`` uses (:func:`paca.distributed.deepspeed_config`).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_distributed import (  # noqa: E402
    GLOBAL_BATCH,
    LOSS_TOL,
    STEPS,
    VOCAB,
    eval_batch,
    global_batch,
    make_model,
    reference_losses,
    torchrun,
)

ROOT = Path(__file__).resolve().parents[1]
HAVE_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(
    not HAVE_DEEPSPEED, reason="DeepSpeed is not installed (pip install 'paca[deepspeed]')"
)


@pytest.fixture(scope="module")
def ds_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("dist-deepspeed")
    return out, torchrun(["deepspeed"], out, script=Path(__file__))


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stage_matches_one_process(ds_run, stage):
    _, ranks = ds_run
    want = reference_losses()
    for r in ranks:
        got = r[f"zero{stage}"]
        assert "error" not in got, got
        torch.testing.assert_close(got["losses"], want, **LOSS_TOL)


@pytest.mark.slow
@needs_deepspeed
def test_zero3_partitions_the_base_weights_and_gathers_them_for_the_paca_op(ds_run):
    _, ranks = ds_run
    for r in ranks:
        z3 = r["zero3"]
        assert z3["weight_local_shape"] == [0] and z3["weight_full_shape"] == [32, 32], z3
        assert z3["weight_in_forward"] == [32, 32]  # gathered while the PaCA op runs
        assert z3["delta_partitioned"] is True


@pytest.mark.slow
@needs_deepspeed
def test_zero3_adapter_is_full_and_loads_in_one_process(ds_run):
    import paca
    from paca.io import read_adapter
    from paca.tiny import tiny_llama

    out, ranks = ds_run
    meta, tensors = read_adapter(out / "zero3-adapter")
    assert tensors["model.layers.0.self_attn.q_proj.delta"].shape == (32, 4)
    assert meta["modules"]["model.layers.0.self_attn.q_proj"]["weight_shape"] == [32, 32]
    assert [r["zero3"]["wrote"] for r in ranks] == [True, False]
    model = paca.load(
        tiny_llama(vocab_size=VOCAB, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64),
        out / "zero3-adapter",
        backend="cpu",
    )
    with torch.no_grad():
        logits = model(input_ids=eval_batch()).logits
    torch.testing.assert_close(logits, torch.load(out / "zero3-logits.pt"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "stage", "gaudi"),
    [
        ("cuda_zero2.json", 2, False),
        ("cuda_zero3.json", 3, False),
        ("gaudi_zero3_bf16.json", 3, True),
    ],
)
def test_shipped_configs_are_the_ones_paca_run_uses(name, stage, gaudi):
    from paca.distributed import deepspeed_config

    shipped = json.loads((ROOT / "examples" / "deepspeed" / name).read_text())
    assert shipped == deepspeed_config(stage, gaudi=gaudi)


# ------------------------------------------------------------------ the ranks' side
def _scenario(out: Path, rank: int, world: int, stage: int) -> dict[str, Any]:
    import deepspeed

    pm = make_model()
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:  # partition every parameter, however small (the defaults keep tiny ones)
        zero.update(stage3_param_persistence_threshold=0, stage3_model_persistence_threshold=0)
    config = {
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
    }
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)  # as test_distributed.train
    engine, *_ = deepspeed.initialize(model=pm, optimizer=opt, config=config)
    q = pm.get_base_model().model.layers[0].self_attn.q_proj
    seen: list[list[int]] = []
    hook = q.register_forward_pre_hook(lambda m, a: seen.append(list(m.base_layer.weight.shape)))
    losses = []
    for step in range(STEPS):
        ids = global_batch(step)
        n = ids.shape[0] // world
        local = ids[rank * n : (rank + 1) * n]
        loss = engine(input_ids=local, labels=local).loss
        engine.backward(loss)
        engine.step()
        value = loss.detach().clone()
        torch.distributed.all_reduce(value)
        losses.append(float(value) / world)
    hook.remove()
    from paca import distributed

    w, delta = q.base_layer.weight, q.paca_delta["default"]
    result: dict[str, Any] = {
        "losses": losses,
        "weight_local_shape": list(w.shape),
        "weight_full_shape": list(distributed.full_shape(w)),
        "weight_in_forward": seen[-1] if seen else None,
        "delta_partitioned": distributed.is_zero3_param(delta) and delta.numel() == 0,
    }
    if stage == 3:
        engine.eval()
        with torch.no_grad():
            logits = engine(input_ids=eval_batch()).logits
        if rank == 0:
            torch.save(logits, out / "zero3-logits.pt")
        from test_distributed import _publishes

        with _publishes() as published:
            pm.save_pretrained(out / "zero3-adapter")  # a collective: every rank gathers
        result["wrote"] = bool(published)
    engine.destroy()
    return result


def _main(argv: list[str]) -> None:
    import deepspeed
    import torch.distributed as dist

    # DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce (minutes of C++
    # on a small machine, once per cache); gloo alone is enough for these tests.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    from test_distributed import _guard

    out = Path(argv[1])
    torch.set_num_threads(1)
    deepspeed.init_distributed("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    started = time.perf_counter()
    result: dict[str, Any] = {"rank": rank, "world": world}
    for stage in (2, 3):
        result[f"zero{stage}"] = _guard(lambda s=stage: _scenario(out, rank, world, s))
    result["seconds"] = time.perf_counter() - started
    (out / f"rank{rank}.json").write_text(json.dumps(result, indent=1, default=str))
    dist.barrier()


if __name__ == "__main__":
    _main(sys.argv[1:])


@pytest.mark.slow
@needs_deepspeed
def test_paca_run_with_zero3_matches_one_process_and_resumes(tmp_path):
    """``paca run --nproc 2 --strategy deepspeed`` with the shipped ZeRO-3 config: the
    PacaTrainer path (evaluation before training, adapter-only saves) on 2 ranks; then the
    run is cut back to its first checkpoint (as if killed there) and resumed from
    DeepSpeed's own checkpoint, redoing the same steps."""
    import shutil

    from test_distributed_run import EXPERIMENT, _finish, _losses, _paca

    from paca.experiment.runner import run_experiment
    from paca.experiment.schema import load_experiment
    from paca.io import read_adapter

    exp_file = tmp_path / "dist.toml"
    exp_file.write_text(
        EXPERIMENT.replace("steps = 24", "steps = 8").replace(
            "save_total_limit = 1", "save_total_limit = 2"
        )
    )
    zero3 = ROOT / "examples" / "deepspeed" / "cuda_zero3.json"
    two, log = tmp_path / "two", tmp_path / "two.log"
    proc = _paca(log, "run", str(exp_file), "--nproc", "2", "--strategy", "deepspeed",
                 "--set", f"train.deepspeed='{zero3}'", "--run-dir", str(two), "--no-progress")  # fmt: skip
    _finish(proc, log, "paca run --strategy deepspeed")
    summary = json.loads((two / "summary.json").read_text())
    assert (summary["status"], summary["world_size"], summary["strategy"]) == (
        "completed", 2, "deepspeed",
    )  # fmt: skip
    _, tensors = read_adapter(two / "adapter")
    assert tensors["model.layers.0.self_attn.q_proj.delta"].shape[0] == 64  # full rows
    first = _losses(two)
    one = run_experiment(load_experiment(exp_file), run_dir=tmp_path / "one", progress=False)
    torch.testing.assert_close(first, _losses(tmp_path / "one"), rtol=2e-4, atol=2e-4)
    for key in ("eval_loss_before", "eval_loss"):
        assert summary[key] == pytest.approx(one.summary[key], rel=1e-4), key

    # as if killed after checkpoint 4: the later checkpoint gone, the summary "running"
    shutil.rmtree(two / "checkpoints" / "checkpoint-8")
    (two / "summary.json").write_text(json.dumps({**summary, "status": "running"}))
    log = tmp_path / "resume.log"
    _finish(_paca(log, "run", "--resume", str(two), "--no-progress"), log, "paca run --resume")
    resumed = json.loads((two / "summary.json").read_text())
    assert resumed["status"] == "completed" and resumed["resumed_from"].endswith("checkpoint-4")
    assert (resumed["world_size"], resumed["strategy"]) == (2, "deepspeed")
    torch.testing.assert_close(_losses(two), first, rtol=2e-4, atol=2e-4)
