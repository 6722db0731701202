"""The conformance suite: the CPU reference passes it, and broken backends fail the right
contract item with a message that says why."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from paca_cpu import CPUBackend

from paca.testing import CONTRACT, ContractViolation, check_backend
from paca.testing.conformance import *  # noqa: F403  (the suite, as backend authors use it)

pytest_plugins = ["pytester"]


@pytest.fixture
def paca_backend_name() -> str:
    return "cpu"


@pytest.fixture
def paca_conformance_options() -> dict:
    return {"run_compile": False}  # the compile item runs once, below, marked slow


@pytest.mark.slow
def test_cpu_passes_the_compile_item():
    report = check_backend("cpu", items=["compile"])
    assert report["compile"].status == "passed", report["compile"].message
    assert "0 graph breaks" in report["compile"].message


# ------------------------------------------------------------ deliberately broken backends
class BF16AccumulatingDeltaGrad(CPUBackend):
    name = "broken-accum"

    def delta_grad(self, grad_out, x_sel):
        return grad_out.t().mm(x_sel).float()  # accumulates (and rounds) in the input dtype


class MutatingEffectiveWeight(CPUBackend):
    name = "broken-mutates"

    def effective_weight(self, weight, idx, delta):
        weight.index_copy_(
            1, idx, (weight.index_select(1, idx).float() + delta.float()).to(weight.dtype)
        )
        return weight


class LowPrecisionLinear(CPUBackend):
    name = "broken-tf32"

    def linear(self, x, weight, bias):
        y = torch.nn.functional.linear(x.bfloat16(), weight.bfloat16(), None).to(x.dtype)
        return y if bias is None else y + bias


class GatherKeepsInputAlive(CPUBackend):
    name = "broken-gather"

    def gather(self, x, idx, dim=-1):
        sel = x.index_select(dim, idx)
        big = torch.cat([sel.reshape(-1), x.detach().reshape(-1)])  # sel first, then all of x
        return big[: sel.numel()].view(sel.shape)


class CopyingWriteColumns(CPUBackend):
    name = "broken-write"

    def write_columns(self, weight, idx, columns):
        out = weight.clone()
        out.index_copy_(1, idx, columns.to(weight.dtype))
        return out


class RaisingAvailability(CPUBackend):
    name = "broken-available"

    @classmethod
    def is_available(cls):
        raise ImportError("libvendor.so not found")


class SilentUnavailable(CPUBackend):
    name = "broken-silent"

    @classmethod
    def is_available(cls):
        return False

    @classmethod
    def unavailable_reason(cls):
        return None


class MisspeltCapability(CPUBackend):
    name = "broken-caps"
    capabilities: ClassVar[frozenset[str]] = frozenset({"float32", "bf16"})


class UnknownCompileBackend(CPUBackend):
    name = "broken-compile"

    def compile_backend(self):
        return "no_such_compiler"


class FailingStepHook(CPUBackend):
    name = "broken-hooks"
    wants_step_hooks = True
    calls: ClassVar[list[str]] = []

    def on_optimizer_step(self):
        raise RuntimeError("device lost")


class ConvIgnoresDilation(CPUBackend):
    name = "broken-conv"

    def conv2d_delta_grad(self, grad_out, x_sel, delta_shape, stride, padding, dilation):
        return super().conv2d_delta_grad(grad_out, x_sel, delta_shape, stride, padding, (1, 1))


BROKEN = [
    (BF16AccumulatingDeltaGrad, "delta_grad[bfloat16]", "above the tolerance 0.0001"),
    (MutatingEffectiveWeight, "effective_weight[float32]", "returned the weight itself"),
    (LowPrecisionLinear, "linear[float32]", "above the tolerance"),
    (GatherKeepsInputAlive, "saved_activations[float32]", "not a view into a larger one"),
    (CopyingWriteColumns, "write_columns[float32]", "it writes in place"),
    (MisspeltCapability, "api", "unknown capabilities ['bf16']"),
    (UnknownCompileBackend, "graph_entry_points", "'no_such_compiler'"),
    (FailingStepHook, "step_hooks", "RuntimeError: device lost"),
    (ConvIgnoresDilation, "conv2d_delta_grad[float32]", "stride 2, dilation 2"),
]


@pytest.mark.parametrize(
    ("cls", "item", "fragment"), BROKEN, ids=[c.__name__ for c, _, _ in BROKEN]
)
def test_broken_backend_fails_the_right_item(cls, item, fragment):
    report = check_backend(cls, items=["api", item])
    assert report[item].status == "failed", str(report)
    assert fragment in report[item].message
    if item != "api":
        assert report["api"].status == "passed"
    assert not report.ok
    with pytest.raises(AssertionError, match=item.replace("[", r"\[").replace("]", r"\]")):
        report.raise_for_failures()


def test_broken_backend_fails_only_what_it_breaks():
    """A full run names exactly the broken promise's items, nothing else."""
    report = check_backend(BF16AccumulatingDeltaGrad, run_compile=False)
    failed = {r.item for r in report.failed}
    # bf16/fp16 delta_grad (primitive) break; the op rounds delta's grad to bf16/fp16 anyway.
    assert failed == {"delta_grad[bfloat16]", "delta_grad[float16]"}, str(report)
    assert report["registration"].status == "skipped"  # passed as a class, not by name


def test_unavailable_backends_are_checked_for_what_they_declare():
    raising = check_backend(RaisingAvailability)
    assert raising["availability"].status == "failed"
    assert "ImportError: libvendor.so not found" in raising["availability"].message
    assert all(
        r.status == "failed" for r in raising.results if r.item not in ("api", "availability")
    )

    silent = check_backend(SilentUnavailable)
    assert silent["api"].status == "passed"
    assert silent["availability"].status == "failed"
    assert "gave no reason" in silent["availability"].message
    skipped = [r for r in silent.results if r.item not in ("api", "availability")]
    assert skipped and all(r.status == "skipped" for r in skipped)


def test_dtype_items_skip_undeclared_capabilities():
    class FP32Only(CPUBackend):
        name = "fp32-only"
        capabilities: ClassVar[frozenset[str]] = frozenset({"float32"})

    report = check_backend(FP32Only, items=["op_forward[float32]", "op_forward[bfloat16]"])
    assert report["op_forward[float32]"].status == "passed"
    assert report["op_forward[bfloat16]"].status == "skipped"
    assert "'bfloat16'" in report["op_forward[bfloat16]"].message


def test_step_hooks_timing_is_checked_for_hook_backends():
    class Counting(CPUBackend):
        name = "counting"
        wants_step_hooks = True

    report = check_backend(Counting(), items=["step_hooks"])
    assert report["step_hooks"].status == "passed", report["step_hooks"].message


def test_report_and_unknown_items():
    report = check_backend("cpu", items=["api", "gather[float32]"])
    assert report.ok and len(report.passed) == 2
    assert "2 passed, 0 failed" in str(report)
    with pytest.raises(KeyError, match="unknown contract items"):
        check_backend("cpu", items=["nope"])
    assert all(isinstance(v.title, str) and v.title for v in CONTRACT.values())
    assert issubclass(ContractViolation, AssertionError)


def test_pytest_entry_points_name_the_failed_item(pytester: pytest.Pytester):
    """The documented pytest usage, run by pytest itself: a fixture, and --paca-backend."""
    pytester.makepyfile(
        test_broken="""
            import pytest
            from paca.testing.conformance import *  # noqa
            from paca_cpu import CPUBackend

            class Mutating(CPUBackend):
                name = "mutating"
                def effective_weight(self, weight, idx, delta):
                    return weight

            @pytest.fixture
            def paca_backend_name():
                return Mutating
            """,
        test_by_option="from paca.testing.conformance import *  # noqa\n",
    )
    result = pytester.runpytest_inprocess(
        "-p", "paca.testing.pytest_plugin", "--paca-backend", "cpu",
        "-k", "effective_weight and float32 or api", "-p", "no:cacheprovider",
    )  # fmt: skip
    result.assert_outcomes(failed=1, passed=3)
    out = result.stdout.str()
    assert "breaks contract item 'effective_weight[float32]'" in out
    assert "returned the weight itself" in out


@pytest.mark.slow
def test_pytest_without_a_backend_says_how_to_name_one(pytester: pytest.Pytester, monkeypatch):
    monkeypatch.delenv("PACA_CONFORMANCE_BACKEND", raising=False)
    pytester.makepyfile(test_nothing="from paca.testing.conformance import *  # noqa\n")
    result = pytester.runpytest_inprocess("-k", "api", "-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    assert "define a `paca_backend_name` fixture" in result.stdout.str()
    monkeypatch.setenv("PACA_CONFORMANCE_BACKEND", "cpu")
    pytester.runpytest_inprocess("-k", "api", "-p", "no:cacheprovider").assert_outcomes(passed=1)
