"""The CUDA backend: registration, availability, and its compute paths vs the CPU reference.

No GPU here, so the backend's compute paths run on CPU tensors (plain-torch fallbacks,
and the Triton kernels under ``TRITON_INTERPRET=1``) through the same conformance suite
the CPU reference passes. Tests marked ``cuda`` need a real GPU and skip cleanly without:
``ci/gpu-check.sh`` runs them.
"""

from __future__ import annotations

import copy
import importlib
import os
import sys

import pytest
import torch
from paca_cpu import CPUBackend
from paca_cuda import CUDABackend
from paca_cuda import kernels as kernel_loader
from torch import nn

import paca
from paca.backend_abc import BackendUnavailableError
from paca.testing import check_backend

HAS_TRITON = kernel_loader.triton_installed()


def _items(*prefixes: str) -> list[str]:
    from paca.testing import CONTRACT

    return [i for i in CONTRACT if i.split("[")[0] in prefixes]


@pytest.fixture
def interpreted_kernels():
    """Triton kernels running in the interpreter on CPU tensors (CPU machines only)."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed (pip install triton)")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the kernels are checked compiled, on CUDA tensors")
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    name = "paca_cuda._triton_kernels"
    module = sys.modules.get(name)
    if module is None:
        module = importlib.import_module(name)
    elif not module.INTERPRETED:
        module = importlib.reload(module)
    yield module
    if old is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = old


# ---------------------------------------------------------------- registration
def test_registered_through_its_entry_point_with_priority_and_capabilities():
    info = {i.name: i for i in paca.list_backends()}["cuda"]
    assert info.cls is CUDABackend
    assert info.priority == 200 and info.device_type == "cuda"
    assert {"bfloat16", "float16", "compile", "graphs"} <= info.capabilities
    assert issubclass(CUDABackend, CPUBackend)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_unavailable_without_a_gpu_with_an_actionable_reason():
    assert CUDABackend.is_available() is False
    reason = CUDABackend.unavailable_reason()
    assert reason and "CUDA" in reason and ("install" in reason or "nvidia-smi" in reason)
    with pytest.raises(BackendUnavailableError, match="cuda"):
        paca.use_backend("cuda")
    assert paca.get_backend().name != "cuda"  # auto-detection passes over it


def test_reasons_for_each_kind_of_missing_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "no CUDA support" in CUDABackend.unavailable_reason()
    monkeypatch.setattr(torch.version, "cuda", "12.6")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert "sees no NVIDIA GPU" in CUDABackend.unavailable_reason()


def test_is_available_never_raises(monkeypatch):
    def boom() -> bool:
        raise RuntimeError("driver exploded")

    monkeypatch.setattr(torch.cuda, "is_available", boom)
    assert CUDABackend.is_available() is False
    assert isinstance(CUDABackend().describe(), dict)  # describe() never raises either


def test_kernel_mode_is_validated(monkeypatch):
    with pytest.raises(ValueError, match="unknown CUDA kernel mode 'fast'"):
        CUDABackend(kernels="fast")
    monkeypatch.setenv("PACA_CUDA_KERNELS", "torch")
    assert CUDABackend().kernels == "torch"
    monkeypatch.setattr(kernel_loader, "triton_installed", lambda: False)
    with pytest.raises(ValueError, match="pip install"):
        CUDABackend(kernels="triton")
    assert CUDABackend(kernels="auto").describe()["kernels"] == "auto"


def test_auto_mode_never_interprets_kernels_on_cpu_tensors():
    assert CUDABackend(kernels="auto").uses_triton(torch.zeros(2)) is False
    assert CUDABackend(kernels="torch").uses_triton(torch.zeros(2)) is False


# ---------------------------------------------------- conformance on CPU tensors
#: What the suite cannot exercise on CPU tensors: registration (an instance, not looked up
#: by name), compile (tests/test_compile.py), CUDA graphs and NF4 kernels (need a GPU), lazy
#: (not declared).
CPU_TENSOR_SKIPS = {"registration", "compile", "graphs", "nf4", "lazy"}


@pytest.mark.slow
def test_torch_paths_pass_the_conformance_suite_on_cpu_tensors():
    report = check_backend(CUDABackend(kernels="torch"), device="cpu", run_compile=False)
    report.raise_for_failures()
    skipped = {r.item for r in report.results if r.status == "skipped"}
    assert skipped <= CPU_TENSOR_SKIPS, str(report)
    assert "CUDA device" in report["graphs"].message  # says why, and where it can run


@pytest.mark.slow
def test_triton_paths_pass_the_conformance_suite_under_the_interpreter(interpreted_kernels):
    backend = CUDABackend(kernels="triton")
    assert backend.uses_triton(torch.zeros(2))
    report = check_backend(backend, device="cpu", run_compile=False)
    report.raise_for_failures()
    skipped = {r.item for r in report.results if r.status == "skipped"}
    assert skipped <= CPU_TENSOR_SKIPS, str(report)
    assert report["traffic"].status == "passed"  # interpreter's host copies not counted


# ------------------------------------------------------------ individual paths
def test_half_precision_delta_grad_accumulates_in_fp32_on_the_fallback():
    g = torch.randn(4096, 8, dtype=torch.bfloat16)
    x = torch.randn(4096, 4, dtype=torch.bfloat16)
    got = CUDABackend(kernels="torch").delta_grad(g, x, torch.float32)
    ref = g.double().t() @ x.double()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-3)


def test_cpu_index_is_moved_once_and_refreshed_when_it_changes():
    backend = CUDABackend(kernels="torch")
    idx = torch.tensor([3, 1], dtype=torch.int32)  # not int64: converted, then reused
    first = backend._index_on(idx, torch.device("cpu"))
    assert first.dtype == torch.long and backend._index_on(idx, torch.device("cpu")) is first
    idx[0] = 2  # an in-place edit bumps the version: the copy is refreshed
    assert backend._index_on(idx, torch.device("cpu")).tolist() == [2, 1]
    same = torch.tensor([0, 2])
    assert backend._index_on(same, torch.device("cpu")) is same  # nothing to do


def _tiny(backend) -> paca.PacaModel:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    model = paca.wrap(
        net,
        paca.PacaConfig(r=4, target_modules=["0", "2"]),
        backend=backend,
        move_to_device=False,
    )
    for _, layer in model.paca_layers():
        with torch.no_grad():
            layer.paca_delta["default"].normal_(0, 0.1)
    return model


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast-bf16"])
def test_gradient_checkpointing_matches_the_cpu_reference(autocast):
    from torch.utils.checkpoint import checkpoint

    cuda_model = _tiny(CUDABackend(kernels="torch"))
    ref_model = copy.deepcopy(cuda_model).to_backend("cpu")
    x = torch.randn(6, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = checkpoint(cuda_model, x, use_reentrant=False)
        y_ref = ref_model(x)
    y.float().sum().backward()
    y_ref.float().sum().backward()
    assert torch.equal(y, y_ref)
    for (_, a), (_, b) in zip(cuda_model.paca_layers(), ref_model.paca_layers(), strict=True):
        ga, gb = a.paca_delta["default"].grad, b.paca_delta["default"].grad
        assert ga.dtype == torch.float32
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_benchmark_script_runs_and_reports_saved_activations(capsys):
    from paca_cuda.bench import main

    result = main(["--tiny", "--dtype", "float32"])
    rows = {r["method"]: r for r in result["steps"]}
    assert set(rows) == {
        "frozen (no adapter)",
        "LoRA r=4",
        "PaCA (torch)",
        "PaCA swap (torch)",
        "PaCA decompose (torch)",
    }
    paca_rows = [r for name, r in rows.items() if name.startswith("PaCA")]
    # PaCA saves r/in of each layer input (32 tokens x 4 columns x 4 bytes x 2 layers)
    assert all(r["saved_bytes"] == 32 * 4 * 4 * 2 for r in paca_rows)
    assert rows["LoRA r=4"]["saved_bytes"] > paca_rows[0]["saved_bytes"]
    assert rows["frozen (no adapter)"]["extra_bytes_written"] == 0
    # no weight copy per call: a step writes well under one copy of the 2 weights beyond
    # the frozen stack (64x64 fp32 each; at 32 tokens the r columns' terms are not small)
    for r in paca_rows:
        assert r["traffic_complete"] and 0 < r["extra_vs_weights"] < 1.0, r
    assert all(
        r["extra_bytes_written"] < rows["LoRA r=4"]["extra_bytes_written"] for r in paca_rows
    )
    pieces = {r["piece"]: r for r in result["primitives"]}
    assert {"gather x[..., idx]", "column swap (apply + restore)", "linear_forward"} <= set(pieces)
    assert {"linear_backward", "delta_grad (fp32 acc)"} <= set(pieces)
    # the swap writes the r columns (64 x 4 fp32 = 1 KiB) a few times, never the weight
    assert pieces["column swap (apply + restore)"]["bytes_written_torch"] < 64 * 64 * 4
    out = capsys.readouterr().out
    assert "delta_grad" in out and "column swap" in out
    assert "cache" not in out.lower()


# ------------------------------------------------------------ real GPU only
@pytest.mark.cuda
@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_conformance_on_the_gpu(kernels):
    if kernels == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed")
    report = check_backend(CUDABackend(kernels=kernels), device="cuda")
    print(report)
    report.raise_for_failures()
    assert report["graphs"].status == "passed", str(report)  # CUDA graph capture and replay
    assert report["compile"].status == "passed", str(report)


@pytest.mark.cuda
def test_registry_picks_cuda_on_a_gpu_machine():
    assert paca.get_backend().name in ("cuda", "hpu")  # highest available priority wins
    assert CUDABackend.unavailable_reason() is None
    assert CUDABackend().describe()["device_name"]


@pytest.mark.cuda
def test_training_step_never_synchronizes_with_the_host():
    model = _tiny(CUDABackend()).cuda()
    x = torch.randn(8, 16, device="cuda")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], fused=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):  # warm-up: one-time probes, compiles
        model(x).float().sum().backward()
    opt.step()
    torch.cuda.synchronize()
    try:
        for _ in range(2):
            # forward (incl. the column swap after a step) and backward run under
            # "error", so any host sync in PaCA raises; torch's optimizer step runs outside
            torch.cuda.set_sync_debug_mode("error")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(x).float().sum()
            loss.backward()
            torch.cuda.set_sync_debug_mode("default")
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
def test_cuda_graph_capture_of_forward_and_backward_replays_correctly():
    """Static shapes and fixed indices: capture one step, replay after optimizer steps."""
    model = _tiny(CUDABackend()).cuda()
    ref = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    ref_params = [p for p in ref.parameters() if p.requires_grad]
    static_x = torch.randn(8, 16, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as torch's docs require
        for _ in range(2):
            model(static_x).square().mean().backward()
    torch.cuda.current_stream().wait_stream(stream)
    for p in params:
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = model(static_x).square().mean()
        static_loss.backward()
    opt = torch.optim.SGD(params, lr=0.5)
    ref_opt = torch.optim.SGD(ref_params, lr=0.5)
    for step in range(3):
        static_x.copy_(torch.randn(8, 16, device="cuda"))
        graph.replay()
        loss_ref = ref(static_x).square().mean()
        loss_ref.backward()
        torch.testing.assert_close(static_loss, loss_ref, rtol=1e-5, atol=1e-6, msg=f"{step}")
        for p, q in zip(params, ref_params, strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
        opt.step()  # in place: the captured graph reads the new deltas on the next replay
        ref_opt.step()
        ref_opt.zero_grad()


@pytest.mark.cuda
def test_bf16_delta_grad_uses_fp32_output_gemm_on_the_gpu():
    backend = CUDABackend(kernels="torch")
    g = torch.randn(8192, 64, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(8192, 8, device="cuda", dtype=torch.bfloat16)
    got = backend.delta_grad(g, x, torch.float32)
    assert got.dtype == torch.float32
    assert backend._mm_out_dtype.get(("cuda", torch.bfloat16)) is True, "mm(out_dtype) missing"
    ref = g.double().t() @ x.double()
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-2)
