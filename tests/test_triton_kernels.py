"""The CUDA backend's Triton kernels against plain torch.

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set
before the kernel module is imported) on CPU tensors; on a GPU machine they are
compiled and run on CUDA tensors. Bit-exact where the math allows it (gather, column
write); the fp32-accumulated GEMM is compared with an fp64 reference.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def K():
    """The kernel module, interpreted on CPU machines, compiled on GPU machines."""
    want_interpret = DEVICE == "cpu"
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if want_interpret else "0"
    try:
        name = "paca_cuda._triton_kernels"
        module = sys.modules.get(name)
        if module is None:
            module = importlib.import_module(name)
        elif want_interpret != module.INTERPRETED:
            module = importlib.reload(module)
        assert want_interpret == module.INTERPRETED
        yield module
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def _randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)


def _cols(n: int, r: int, seed: int = 0) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:r].to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_is_exact(K, dtype):
    x = _randn(300, 96, dtype=dtype)
    idx = _cols(96, 12)
    out = K.gather_columns(x, idx)
    assert out.is_contiguous() and out.shape == (300, 12)
    assert torch.equal(out, x[:, idx])


def test_gather_strided_rows_and_many_columns(K):
    base = _randn(70, 200)
    x = base[:, 10:150]  # rows with a stride larger than the row length
    idx = _cols(140, 100, seed=1)  # more columns than one program block
    assert torch.equal(K.gather_columns(x, idx), x[:, idx])


def test_gather_empty(K):
    x = _randn(0, 8)
    assert K.gather_columns(x, _cols(8, 3)).shape == (0, 3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_column_write_is_bit_identical_to_the_reference(K, dtype):
    from paca_cpu import CPUBackend

    w = _randn(130, 96, dtype=dtype, seed=2)
    idx = _cols(96, 20, seed=3)
    delta = _randn(130, 20, seed=4) * 0.01
    dst = w.clone()
    K.write_effective_columns(dst, w, idx, delta)
    want = w.cpu().clone()
    CPUBackend().write_columns(want, idx.cpu(), w.cpu()[:, idx.cpu()].float() + delta.cpu())
    assert torch.equal(dst.cpu(), want)


def test_column_write_rounds_ties_to_even_like_torch(K):
    # fp32 sums exactly halfway between two bf16 values: truncation would differ from torch.
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0]], dtype=torch.bfloat16, device=DEVICE)
    ulp = 2.0**-7
    delta = torch.tensor([[ulp / 2, 3 * ulp / 2, -ulp / 4, ulp * 0.75]], device=DEVICE)
    idx = torch.arange(4, device=DEVICE)
    dst = torch.zeros_like(w)
    K.write_effective_columns(dst, w, idx, delta)
    assert torch.equal(dst, (w.float() + delta).to(torch.bfloat16))


def test_column_write_into_a_transposed_weight_view(K):
    w = _randn(64, 40, seed=5).t()  # (40, 64) view with strides (1, 40), as Conv1D's W.t()
    idx = _cols(64, 7, seed=6)
    delta = _randn(40, 7, seed=7)
    dst = w.clone()
    K.write_effective_columns(dst, w, idx, delta)
    ref = w.index_copy(1, idx, w.index_select(1, idx) + delta)
    assert torch.equal(dst, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("n_tok", "n_out", "r", "n_sm"), [(300, 80, 12, 1), (1000, 70, 3, 16)])
def test_delta_grad_accumulates_in_fp32(K, dtype, n_tok, n_out, r, n_sm):
    g = _randn(n_tok, n_out, dtype=dtype, seed=8)
    x = _randn(n_tok, r, dtype=dtype, seed=9)
    out = K.delta_grad(g, x, n_sm=n_sm)
    assert out.dtype == torch.float32 and out.shape == (n_out, r)
    ref = g.double().t() @ x.double()
    # fp32 accumulation of exact bf16/fp16 products: error ~ n_tok * 2^-24 * |terms|
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-3)
    # accumulating in the input dtype would be far off: the test can tell the difference
    low = (g.t() @ x).double() if DEVICE == "cuda" else (g.float().t() @ x.float()).to(dtype)
    assert (low.double() - ref).abs().max() > (out.double() - ref).abs().max()


def test_delta_grad_split_count_does_not_change_the_result_much(K):
    g = _randn(2048, 64, dtype=torch.bfloat16, seed=10)
    x = _randn(2048, 16, dtype=torch.bfloat16, seed=11)
    one, many = K.delta_grad(g, x, n_sm=1), K.delta_grad(g, x, n_sm=64)
    torch.testing.assert_close(one, many, rtol=1e-5, atol=1e-4)


def test_delta_grad_refuses_fp32(K):
    with pytest.raises(TypeError, match="fp32 inputs use torch.mm"):
        K.delta_grad(_randn(8, 4), _randn(8, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backend_in_triton_mode_uses_the_kernels_and_matches_cpu(K, dtype, monkeypatch):
    from paca_cpu import CPUBackend
    from paca_cuda import CUDABackend

    calls: list[str] = []
    for fn in ("gather_columns", "write_effective_columns", "delta_grad"):
        real = getattr(K, fn)
        monkeypatch.setattr(
            K, fn, lambda *a, _r=real, _n=fn, **k: (calls.append(_n), _r(*a, **k))[1]
        )
    cuda, ref = CUDABackend(kernels="triton"), CPUBackend()
    x = _randn(4, 9, 48, dtype=dtype, seed=12)
    w = _randn(24, 48, dtype=dtype, seed=13)
    idx = _cols(48, 6, seed=14)
    delta = _randn(24, 6, seed=15) * 0.1
    assert torch.equal(cuda.gather(x, idx).cpu(), ref.gather(x.cpu(), idx.cpu()))
    w_ref = w.clone()
    with cuda.columns_applied(w, idx, delta):  # the fused column kernel, in place
        applied = w.cpu().clone()
    with ref.columns_applied(w_ref, idx, delta):
        assert torch.equal(applied, w_ref.cpu())
    assert torch.equal(w, w_ref)  # restored bit for bit
    g = _randn(36, 24, dtype=dtype, seed=16)
    xs = x.reshape(-1, 48)[:, idx]
    got = cuda.delta_grad(g, xs, torch.float32)
    want = ref.delta_grad(g.cpu(), xs.cpu(), torch.float32)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
    expected = {"gather_columns", "write_effective_columns"}
    if dtype != torch.float32 and DEVICE == "cpu":
        expected.add("delta_grad")  # on CUDA, torch.mm(out_dtype=fp32) is preferred
    assert expected <= set(calls)
