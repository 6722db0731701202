"""Deliberately broken backends: each is the CPU reference with one defect, as a vendor
might write it. ``BROKEN`` says which contract item must fail, which member it must
blame, and a fragment of the message. tests/test_conformance.py runs each through the
suite; the defects include every one the conformance suite of API v1 passed (issue 11).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from paca_cpu import CPUBackend

# ------------------------------------------------------------------ values (shapes[...])


class GatherWrongAboveR8(CPUBackend):
    """A "fast path" for many columns that reads them in sorted order."""

    name = "broken-gather-r8"

    def gather(self, x, idx, dim=-1):
        if idx.numel() > 8:
            idx = idx.sort().values
        return x.index_select(dim, idx)


class DeltaGradFirst4096Rows(CPUBackend):
    """A tiled reduction that only ever runs its first tile of 4096 rows."""

    name = "broken-delta-4096"

    def delta_grad(self, grad_out, x_sel, out_dtype):
        return super().delta_grad(grad_out[:4096], x_sel[:4096], out_dtype)


class ConvDeltaGradIgnoresDilation(CPUBackend):
    name = "broken-conv-dilation"

    def conv2d_delta_grad(
        self, grad_out, x_sel, delta_shape, stride, padding, dilation, out_dtype=None
    ):
        return super().conv2d_delta_grad(grad_out, x_sel, delta_shape, stride, padding, (1, 1), out_dtype)  # fmt: skip


class BF16AccumulatingDeltaGrad(CPUBackend):
    """Accumulates half-precision products in the inputs' dtype."""

    name = "broken-accum"

    def delta_grad(self, grad_out, x_sel, out_dtype):
        return grad_out.t().mm(x_sel).to(out_dtype)


# ------------------------------------------------------------------ layouts
class LinearIgnoresWeightStrides(CPUBackend):
    """Reads the weight's storage as if it were a contiguous (out, in) matrix."""

    name = "broken-linear-strides"

    def linear(self, x, weight, bias):
        flat = torch.as_strided(weight, weight.shape, (weight.shape[1], 1))
        return F.linear(x, flat, bias)


class WriteColumnsIntoACopy(CPUBackend):
    """Writes into a contiguous copy: lost for the transposed Conv1D weight view."""

    name = "broken-write-copy"

    def write_columns(self, weight, idx, columns):
        weight.contiguous().index_copy_(1, idx, columns.to(weight.dtype))


class GatherMisreadsNegativeDims(CPUBackend):
    name = "broken-gather-dim"

    def gather(self, x, idx, dim=-1):
        if dim < -1:
            dim = -dim  # should be x.dim() + dim
        return x.index_select(dim, idx)


# ------------------------------------------------------------------ determinism
class NondeterministicDeltaGrad(CPUBackend):
    """Sums the rows in a different order on every call (a racy split reduction)."""

    name = "broken-nondeterministic"

    def delta_grad(self, grad_out, x_sel, out_dtype):
        order = torch.randperm(grad_out.shape[0], device=grad_out.device)
        return super().delta_grad(grad_out[order], x_sel[order], out_dtype)


# ------------------------------------------------------------------ purity
class InputGradScalesGradOut(CPUBackend):
    """Pre-scales grad_out in place (and compensates): its own result is right."""

    name = "broken-inplace-grad"

    def input_grad(self, grad_out, weight):
        grad_out.mul_(0.5)
        return grad_out.matmul(weight) * 2


# ------------------------------------------------------------------ aliasing
class ScratchBufferGather(CPUBackend):
    """One scratch buffer for the saved activation of every call and layer."""

    name = "broken-scratch"

    def gather(self, x, idx, dim=-1):
        out = x.index_select(dim, idx)
        buf = getattr(self, "_buf", None)
        if buf is None or buf.numel() < out.numel() or buf.dtype != out.dtype:
            buf = self._buf = torch.empty(out.numel(), dtype=out.dtype, device=out.device)
        view = buf[: out.numel()].view(out.shape)
        view.copy_(out)
        return view


class ScratchEffectiveWeight(CPUBackend):
    """API v1's scratch buffer: one W_eff buffer for every layer, built in forward and
    reused by backward (which then sees whichever layer ran forward last)."""

    name = "broken-scratch-weight"

    def _scratch(self, weight):
        buf = self.__dict__.get("_w")
        if buf is None or buf.shape != weight.shape or buf.dtype != weight.dtype:
            buf = self.__dict__["_w"] = torch.empty_like(weight)
        return buf

    def linear_forward(self, x, weight, bias, delta, idx):
        buf = self._scratch(weight)
        buf.copy_(weight)
        buf.index_copy_(1, idx, (weight.index_select(1, idx).float() + delta.float()).to(weight.dtype))  # fmt: skip
        return self.linear(x, buf, bias), self.gather(x, idx, -1)

    def linear_backward(self, grad_out, x_sel, weight, delta, idx, need_x, need_delta):
        flat = grad_out.reshape(-1, grad_out.shape[-1])
        dx = self.input_grad(grad_out, self._scratch(weight)) if need_x else None
        dd = self.delta_grad(flat, x_sel.reshape(-1, x_sel.shape[-1]), delta.dtype) if need_delta else None  # fmt: skip
        return dx, dd


class ForwardReturnsXSelView(CPUBackend):
    """Zero-copy x_sel when the columns happen to be consecutive: a view of x."""

    name = "broken-xsel-view"

    def linear_forward(self, x, weight, bias, delta, idx):
        y, x_sel = super().linear_forward(x, weight, bias, delta, idx)
        start = int(idx[0])
        if bool((idx == torch.arange(start, start + idx.numel(), device=idx.device)).all()):
            x_sel = x.narrow(-1, start, idx.numel())
        return y, x_sel


class CachesEffectiveWeightPerLayer(CPUBackend):
    """Keeps W_eff per weight (by address) across calls: never notices delta changed."""

    name = "broken-stale-cache"

    def linear_forward(self, x, weight, bias, delta, idx):
        cache = self.__dict__.setdefault("_w_eff", {})
        key = (weight.data_ptr(), tuple(weight.shape), weight.dtype)
        if key not in cache:
            cols = (weight.index_select(1, idx).float() + delta.float()).to(weight.dtype)
            cache[key] = weight.index_copy(1, idx, cols)
        return self.linear(x, cache[key], bias), self.gather(x, idx, -1)


class ReadColumnsViewForRuns(CPUBackend):
    """ "Zero-copy" read_columns for consecutive columns: the swap then restores W_eff."""

    name = "broken-read-view"

    def read_columns(self, weight, idx):
        start = int(idx[0])
        if bool((idx == torch.arange(start, start + idx.numel(), device=idx.device)).all()):
            return weight.narrow(1, start, idx.numel())
        return super().read_columns(weight, idx)


class SwapBumpsVersion(CPUBackend):
    """Swaps the columns on the weight itself (not weight.data): autograd's version counter
    of the frozen weight moves, breaking any other op that saved it for backward."""

    name = "broken-swap-version"

    @contextmanager
    def columns_applied(self, weight, idx, delta):
        with torch.no_grad():
            saved = weight.index_select(1, idx)
            weight.index_copy_(1, idx, (saved.float() + delta.float()).to(weight.dtype))
            try:
                yield
            finally:
                weight.index_copy_(1, idx, saved)


class GatherIntoLargerStorage(CPUBackend):
    """Returns x_sel as the head of one buffer that also holds a copy of x."""

    name = "broken-gather-storage"

    def gather(self, x, idx, dim=-1):
        sel = x.index_select(dim, idx)
        big = torch.cat([sel.reshape(-1), x.detach().reshape(-1)])
        return big[: sel.numel()].view(sel.shape)


# ------------------------------------------------------------------ retention
class KeepsEveryInput(CPUBackend):
    """Keeps every gathered input "for debugging": memory grows without bound."""

    name = "broken-keeps-inputs"

    def gather(self, x, idx, dim=-1):
        self.__dict__.setdefault("_seen", []).append(x)
        return super().gather(x, idx, dim)


class CachesInputViews(CPUBackend):
    """Caches a detached view of every grad_out (the Python object dies, the memory does not)."""

    name = "broken-keeps-views"

    def input_grad(self, grad_out, weight):
        self.__dict__.setdefault("_cache", []).append(grad_out.detach())
        return super().input_grad(grad_out, weight)


# ------------------------------------------------------------------ weight_exact
class SwapRestoresBySubtracting(CPUBackend):
    """Applies the columns by adding delta and "restores" them by subtracting it."""

    name = "broken-swap-subtract"

    @contextmanager
    def columns_applied(self, weight, idx, delta):
        with torch.no_grad():
            w = weight.data
            cols = w.index_select(1, idx)
            self.write_columns(w, idx, cols + delta)
            try:
                yield
            finally:
                self.write_columns(w, idx, w.index_select(1, idx) - delta)


class SwapWithoutFinally(CPUBackend):
    """Restores the columns only when the block returns normally."""

    name = "broken-swap-no-finally"

    @contextmanager
    def columns_applied(self, weight, idx, delta):
        with torch.no_grad():
            w = weight.data
            saved = w.index_select(1, idx)
            self.write_columns(w, idx, saved + delta)
            yield
            self.write_columns(w, idx, saved)


# ------------------------------------------------------------------ runtime contract
class LinearWrongOutputDtype(CPUBackend):
    """Computes half-precision GEMMs in fp32 and forgets to cast back."""

    name = "broken-dtype"

    def linear(self, x, weight, bias):
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float())


# ------------------------------------------------------------------ dtype capability
class WrongInBFloat16(CPUBackend):
    """Declares bfloat16, but its bf16 forward drops delta."""

    name = "broken-bf16"

    def linear_forward(self, x, weight, bias, delta, idx):
        if x.dtype == torch.bfloat16:
            return self.linear(x, weight, bias), self.gather(x, idx, -1)
        return super().linear_forward(x, weight, bias, delta, idx)


# ------------------------------------------------------------------ traffic
class MaterializesEffectiveWeight(CPUBackend):
    """API v1's way: builds W_eff as a new full-size tensor on every forward."""

    name = "broken-weight-copy"

    def linear_forward(self, x, weight, bias, delta, idx):
        w_eff = weight.index_copy(1, idx, (weight.index_select(1, idx).float() + delta.float()).to(weight.dtype))  # fmt: skip
        return self.linear(x, w_eff, bias), self.gather(x, idx, -1)


# ------------------------------------------------------------------ capabilities
class CompileGraphBreaks(CPUBackend):
    """Declares compile, but its conv forward (which dynamo traces) graph-breaks."""

    name = "broken-compile"

    def conv2d_forward(self, x, weight, bias, delta, idx, stride, padding, dilation):
        torch._dynamo.graph_break()
        return super().conv2d_forward(x, weight, bias, delta, idx, stride, padding, dilation)


class LazyWithoutStepHooks(CPUBackend):
    """Declares lazy, but never asks for the step hooks: steps are never marked."""

    name = "broken-lazy"
    capabilities: ClassVar[frozenset[str]] = CPUBackend.capabilities | {"lazy"}


class LazyWithNoOpHooks(CPUBackend):
    """Declares lazy and wants the hooks, but keeps the do-nothing defaults."""

    name = "broken-lazy-noop"
    capabilities: ClassVar[frozenset[str]] = CPUBackend.capabilities | {"lazy"}
    wants_step_hooks = True


class FailingStepHook(CPUBackend):
    name = "broken-hooks"
    wants_step_hooks = True

    def on_optimizer_step(self):
        raise RuntimeError("device lost")


class GraphsOnHPUWithoutSDK(CPUBackend):
    """Declares HPU graphs on a machine without the Gaudi SDK to exercise them with."""

    name = "broken-graphs"
    device_type = "hpu"
    capabilities: ClassVar[frozenset[str]] = CPUBackend.capabilities | {"graphs"}

    def device(self, index=None):
        return torch.device("cpu")


# ------------------------------------------------------------------ declarations
class StillHasV1EffectiveWeight(CPUBackend):
    """Half-ported from API v1: overrides effective_weight, which v2 never calls."""

    name = "broken-v1"

    def effective_weight(self, weight, idx, delta):
        return weight


class V1DeltaGradSignature(CPUBackend):
    name = "broken-v1-signature"

    def delta_grad(self, grad_out, x_sel):  # v2 passes out_dtype
        return grad_out.float().t().mm(x_sel.float())


class MisspeltCapability(CPUBackend):
    name = "broken-caps"
    capabilities: ClassVar[frozenset[str]] = frozenset({"float32", "bf16"})


class RaisingAvailability(CPUBackend):
    name = "broken-available"

    @classmethod
    def is_available(cls):
        raise ImportError("libvendor.so not found")


class UnknownCompileBackend(CPUBackend):
    name = "broken-compile-backend"

    def compile_backend(self):
        return "no_such_compiler"


class CopyingDeepcopy(CPUBackend):
    """Copies itself on deepcopy: a copied model would have a second backend instance."""

    name = "broken-deepcopy"

    def __deepcopy__(self, memo):
        return type(self)()


class Broken(NamedTuple):
    cls: type
    item: str
    member: str
    fragment: str


#: Every broken backend, the item that must fail, the member it must blame, and a
#: fragment of the message.
BROKEN: list[Broken] = [
    Broken(GatherWrongAboveR8, "shapes[float32]", "gather", "r=12"),
    Broken(DeltaGradFirst4096Rows, "shapes[float32]", "delta_grad", "4100 rows"),
    Broken(ConvDeltaGradIgnoresDilation, "shapes[float32]", "conv2d_delta_grad", "dilation (2, 2)"),
    Broken(BF16AccumulatingDeltaGrad, "shapes[bfloat16]", "delta_grad", "above the tolerance 0.0001"),
    Broken(LinearIgnoresWeightStrides, "layouts", "linear", "weight transposed"),
    Broken(WriteColumnsIntoACopy, "layouts", "write_columns", "the stored parameter, after"),
    Broken(GatherMisreadsNegativeDims, "layouts", "gather", "dim=-4"),
    Broken(NondeterministicDeltaGrad, "determinism", "delta_grad", "identical inputs"),
    Broken(InputGradScalesGradOut, "purity", "input_grad", "modified its input grad_out"),
    Broken(ScratchBufferGather, "aliasing", "gather", "in the same storage as the first call's"),
    Broken(ScratchEffectiveWeight, "shapes[float32]", "linear_backward", "grad_x"),
    Broken(ScratchEffectiveWeight, "aliasing", "linear_backward", "grad_x"),
    Broken(ScratchEffectiveWeight, "traffic", "linear_forward", "x the weight's bytes"),
    Broken(ForwardReturnsXSelView, "aliasing", "linear_forward", "sharing storage with its input x"),
    Broken(CachesEffectiveWeightPerLayer, "dtype[float32]", "linear_forward", "in-place update of delta"),
    Broken(ReadColumnsViewForRuns, "aliasing", "read_columns", "sharing storage with its input weight"),
    Broken(SwapBumpsVersion, "weight_exact", "columns_applied", "version counter"),
    Broken(GatherIntoLargerStorage, "retention", "gather", "view into a larger storage"),
    Broken(KeepsEveryInput, "retention", "gather", "keeps its input x alive"),
    Broken(CachesInputViews, "retention", "input_grad", "keeps a view or alias of its input grad_out"),
    Broken(SwapRestoresBySubtracting, "weight_exact", "columns_applied", "not bit-exact"),
    Broken(SwapWithoutFinally, "weight_exact", "columns_applied", "after an exception inside the block"),
    Broken(LinearWrongOutputDtype, "runtime_contract", "linear", "dtype torch.float32"),
    Broken(WrongInBFloat16, "dtype[bfloat16]", "linear_forward", "output"),
    Broken(WriteColumnsIntoACopy, "dtype[float32]", "write_columns", "after merge"),
    Broken(MaterializesEffectiveWeight, "traffic", "linear_forward", "x the weight's bytes"),
    Broken(CompileGraphBreaks, "compile", "conv2d_forward", "graph"),
    Broken(LazyWithoutStepHooks, "lazy", "wants_step_hooks", "never calls the step hooks"),
    Broken(LazyWithNoOpHooks, "lazy", "on_backward_end", "Backend default"),
    Broken(FailingStepHook, "step_hooks", "on_optimizer_step", "RuntimeError: device lost"),
    Broken(GraphsOnHPUWithoutSDK, "graphs", "capabilities", "wrap_in_hpu_graph"),
    Broken(StillHasV1EffectiveWeight, "api", "effective_weight", "v1 member"),
    Broken(V1DeltaGradSignature, "api", "delta_grad", "out_dtype"),
    Broken(MisspeltCapability, "api", "capabilities", "unknown capabilities ['bf16']"),
    Broken(RaisingAvailability, "availability", "is_available", "ImportError: libvendor.so"),
    Broken(UnknownCompileBackend, "graph_entry_points", "compile_backend", "'no_such_compiler'"),
]  # fmt: skip
