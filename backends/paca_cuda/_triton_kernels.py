"""Triton kernels of the CUDA backend (imported only when Triton is installed).

Three kernels, each replacing several torch launches on the hot path:

* ``gather_columns``: ``x[..., idx]`` as one strided-gather kernel writing a contiguous
  ``(N, r)`` result (torch's ``index_select`` on the last dim is a generic indexing kernel).
* ``write_effective_columns``: ``dst[:, idx] = round(W[:, idx] + delta)`` with the add in
  fp32, one kernel instead of index_select + cast + add + cast + index_copy.
* ``delta_grad``: ``dY^T @ x_sel`` for bf16/fp16 inputs with an fp32 accumulator written
  straight to an fp32 result, split over the token dimension (deterministic: partial sums
  are reduced with one ``sum``, no atomics). Used when ``torch.mm(..., out_dtype=float32)``
  is not available.

Triton decides at decoration time whether to interpret kernels (``TRITON_INTERPRET=1``,
which runs them on CPU tensors with numpy); :data:`INTERPRETED` records that choice.
The kernels call only builtin ``tl`` functions (``tl.full``, not the jitted ``tl.zeros``),
so they also interpret when Triton itself was imported before the variable was set.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from paca.environment import env_flag

#: Triton reads ``TRITON_INTERPRET`` as a boolean too (``1``, ``true``, ``yes``, ``on``).
INTERPRETED: bool = env_flag("TRITON_INTERPRET")

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _gather_columns_kernel(
    x_ptr,
    idx_ptr,
    out_ptr,
    n_rows,
    r,
    stride_xn,
    stride_xc,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    col_ok = cols < r
    src_cols = tl.load(idx_ptr + cols, mask=col_ok, other=0)
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    vals = tl.load(
        x_ptr + rows64[:, None] * stride_xn + src_cols[None, :].to(tl.int64) * stride_xc,
        mask=mask,
    )
    tl.store(out_ptr + rows64[:, None] * r + cols[None, :], vals, mask=mask)


def gather_columns(x2d: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x2d[:, idx]`` as a new contiguous ``(N, r)`` tensor; ``x2d`` may be strided."""
    n_rows, r = x2d.shape[0], idx.numel()
    out = torch.empty((n_rows, r), dtype=x2d.dtype, device=x2d.device)
    if n_rows == 0 or r == 0:
        return out
    block_r = min(triton.next_power_of_2(r), 64)
    # Interpreted kernels cost per program: use big blocks there.
    block_n = 1024 if INTERPRETED else max(16, 4096 // block_r)
    grid = (triton.cdiv(n_rows, block_n), triton.cdiv(r, block_r))
    _gather_columns_kernel[grid](
        x2d, idx, out, n_rows, r, x2d.stride(0), x2d.stride(1), BLOCK_N=block_n, BLOCK_R=block_r
    )
    return out


@triton.jit
def _round_to_bf16(val):
    """fp32 -> bf16 with round-to-nearest-even written out in integer ops.

    Compiled kernels round ``.to(tl.bfloat16)`` to nearest even, but Triton's interpreter
    truncates; spelling the rounding out gives torch's bits on both (NaN stays NaN).
    """
    bits = val.to(tl.uint32, bitcast=True)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    rounded = tl.where(val != val, bits | 0x400000, rounded)
    return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _effective_columns_kernel(
    dst_ptr,
    w_ptr,
    delta_ptr,
    idx_ptr,
    n_out,
    r,
    stride_do,
    stride_di,
    stride_wo,
    stride_wi,
    stride_eo,
    stride_er,
    OUT_DTYPE: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    cols = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_out
    col_ok = cols < r
    mask = row_ok[:, None] & col_ok[None, :]
    src = tl.load(idx_ptr + cols, mask=col_ok, other=0).to(tl.int64)
    rows64 = rows.to(tl.int64)
    w = tl.load(w_ptr + rows64[:, None] * stride_wo + src[None, :] * stride_wi, mask=mask)
    d = tl.load(
        delta_ptr + rows64[:, None] * stride_eo + cols[None, :].to(tl.int64) * stride_er, mask=mask
    )
    val = w.to(tl.float32) + d.to(tl.float32)
    if ROUND_BF16:  # noqa: SIM108 (constexpr branch; explicit RTNE, see _round_to_bf16)
        val = _round_to_bf16(val)
    else:
        val = val.to(OUT_DTYPE)
    tl.store(dst_ptr + rows64[:, None] * stride_do + src[None, :] * stride_di, val, mask=mask)


def write_effective_columns(
    dst: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor, delta: torch.Tensor
) -> None:
    """In place: ``dst[:, idx] = (weight[:, idx].float() + delta.float()).to(dst.dtype)``."""
    n_out, r = weight.shape[0], idx.numel()
    if n_out == 0 or r == 0:
        return
    block_r = min(triton.next_power_of_2(r), 32)
    block_o = 1024 if INTERPRETED else 128
    grid = (triton.cdiv(n_out, block_o), triton.cdiv(r, block_r))
    _effective_columns_kernel[grid](
        dst,
        weight,
        delta,
        idx,
        n_out,
        r,
        dst.stride(0),
        dst.stride(1),
        weight.stride(0),
        weight.stride(1),
        delta.stride(0),
        delta.stride(1),
        OUT_DTYPE=_TL_DTYPES[dst.dtype],
        ROUND_BF16=dst.dtype == torch.bfloat16,
        BLOCK_O=block_o,
        BLOCK_R=block_r,
    )


@triton.jit
def _delta_grad_kernel(
    g_ptr,
    x_ptr,
    part_ptr,
    n_tok,
    n_out,
    r,
    tok_per_split,
    stride_gn,
    stride_go,
    stride_xn,
    stride_xr,
    BLOCK_O: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_o = tl.program_id(0)
    pid_r = tl.program_id(1)
    split = tl.program_id(2)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    o_ok = offs_o < n_out
    r_ok = offs_r < r
    start = split * tok_per_split
    stop = tl.minimum(start + tok_per_split, n_tok)
    acc = tl.full((BLOCK_O, BLOCK_R), 0.0, dtype=tl.float32)  # not tl.zeros: see INTERPRETED
    for k0 in range(start, stop, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < stop
        k64 = offs_k.to(tl.int64)
        g_t = tl.load(
            g_ptr + offs_o[:, None].to(tl.int64) * stride_go + k64[None, :] * stride_gn,
            mask=o_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        xs = tl.load(
            x_ptr + k64[:, None] * stride_xn + offs_r[None, :].to(tl.int64) * stride_xr,
            mask=k_ok[:, None] & r_ok[None, :],
            other=0.0,
        )
        if UPCAST:  # the interpreter's dot cannot multiply bf16 (stored as uint16)
            acc = tl.dot(g_t.to(tl.float32), xs.to(tl.float32), acc, input_precision="ieee")
        else:  # bf16/fp16 tensor-core dot, fp32 accumulator
            acc = tl.dot(g_t, xs, acc)
    out = part_ptr + split.to(tl.int64) * n_out * r + offs_o[:, None] * r + offs_r[None, :]
    tl.store(out, acc, mask=o_ok[:, None] & r_ok[None, :])


def delta_grad(grad_out: torch.Tensor, x_sel: torch.Tensor, n_sm: int = 0) -> torch.Tensor:
    """``grad_out.T @ x_sel`` in fp32 for bf16/fp16 ``(N, out)`` and ``(N, r)`` inputs.

    Splits the ``N`` reduction over enough programs to fill ``n_sm`` multiprocessors;
    each split writes an fp32 partial, summed once (deterministic, no atomics).
    """
    if grad_out.dtype not in (torch.bfloat16, torch.float16) or x_sel.dtype != grad_out.dtype:
        raise TypeError(
            f"the Triton delta-grad kernel takes two bf16 or two fp16 inputs, got "
            f"{grad_out.dtype} and {x_sel.dtype} (fp32 inputs use torch.mm)"
        )
    n_tok, n_out = grad_out.shape
    r = x_sel.shape[1]
    block_o, block_r, block_k = 64, max(16, min(triton.next_power_of_2(r), 64)), 64
    tiles = triton.cdiv(n_out, block_o) * triton.cdiv(r, block_r)
    want = max(1, (2 * n_sm) // max(tiles, 1)) if n_sm else 1
    splits = max(1, min(want, triton.cdiv(max(n_tok, 1), 4 * block_k)))
    tok_per_split = triton.cdiv(max(n_tok, 1), splits)
    tok_per_split = triton.cdiv(tok_per_split, block_k) * block_k
    splits = triton.cdiv(max(n_tok, 1), tok_per_split)
    part = torch.empty((splits, n_out, r), dtype=torch.float32, device=grad_out.device)
    grid = (triton.cdiv(n_out, block_o), triton.cdiv(r, block_r), splits)
    _delta_grad_kernel[grid](
        grad_out,
        x_sel,
        part,
        n_tok,
        n_out,
        r,
        tok_per_split,
        grad_out.stride(0),
        grad_out.stride(1),
        x_sel.stride(0),
        x_sel.stride(1),
        BLOCK_O=block_o,
        BLOCK_R=block_r,
        BLOCK_K=block_k,
        UPCAST=INTERPRETED,
    )
    return part[0] if splits == 1 else part.sum(0)
