"""The conformance suite: the CPU reference passes it, and every deliberately broken backend
(tests/broken_backends.py) fails the right contract item, blaming the right member."""

from __future__ import annotations

import warnings
from typing import ClassVar

import pytest
from broken_backends import BROKEN, InputGradScalesGradOut, NondeterministicDeltaGrad
from helpers import make_distribution
from paca_cpu import CPUBackend

import paca
from paca.backend_abc import BACKEND_API_VERSION
from paca.testing import (
    API_LABEL,
    CONTRACT,
    ContractViolation,
    ConvShape,
    LinearShape,
    check_backend,
)
from paca.testing._cases import generated_shapes
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
@pytest.mark.parametrize("broken", BROKEN, ids=[f"{b.cls.__name__}-{b.item}" for b in BROKEN])
def test_broken_backend_fails_the_right_item_naming_the_member(broken):
    report = check_backend(broken.cls, items=[broken.item])
    result = report[broken.item]
    assert result.status == "failed", str(report)
    assert result.member == broken.member, result.message
    assert result.message.startswith(f"{broken.member}: "), result.message
    assert broken.fragment in result.message, result.message
    assert not report.ok
    with pytest.raises(AssertionError, match=broken.item.replace("[", r"\[").replace("]", r"\]")):
        report.raise_for_failures()


def test_every_suite_item_has_a_broken_backend():
    covered = {b.item.split("[")[0] for b in BROKEN} | {"registration", "entry_point"}
    families = {i.split("[")[0] for i in CONTRACT}
    # utilities: nothing a backend can get wrong there that the suite can observe;
    # nf4: QPaCA's item (paca/testing/_checks_nf4.py) has its own tests
    assert families - covered <= {"utilities", "nf4"}, sorted(families - covered)


@pytest.mark.slow
def test_grad_out_mutation_is_blamed_on_input_grad_never_on_delta_grad():
    """The v1 suite reported this as a delta-gradient failure (issue 11)."""
    report = check_backend(InputGradScalesGradOut, run_compile=False)
    assert not report.ok
    for r in report.failed:
        assert "delta_grad" not in r.members, str(r)
    for item in ("purity", "shapes[float32]", "shapes[bfloat16]", "layouts"):
        assert report[item].member == "input_grad", str(report[item])
    assert "modified its input grad_out" in report["purity"].message


def test_a_backend_that_declares_itself_nondeterministic_is_not_held_to_it():
    class Declared(NondeterministicDeltaGrad):
        name = "declared-nondeterministic"
        deterministic: ClassVar[bool] = False

    report = check_backend(Declared, items=["determinism", "shapes[float32]"])
    assert report["determinism"].status == "skipped"
    assert "deterministic = False" in report["determinism"].message
    assert report["shapes[float32]"].status == "passed", str(report)


def test_registration_is_checked_for_backends_looked_up_by_name():
    from broken_backends import CopyingDeepcopy

    paca.register_backend(CopyingDeepcopy)
    result = check_backend("broken-deepcopy", items=["registration"])["registration"]
    assert result.status == "failed" and result.member == "__deepcopy__", result.message
    assert check_backend("cpu", items=["registration"]).ok


def test_entry_point_named_unlike_its_backend_fails(plugin_path):
    make_distribution(
        plugin_path,
        "paca-misnamed",
        {"misnamed-plugin": "misnamed_plugin"},
        {
            "misnamed_plugin": """
                from paca.hookspecs import hookimpl
                from paca_cpu import CPUBackend

                class Misnamed(CPUBackend):
                    name = "misnamed"

                @hookimpl
                def paca_backends():
                    return [Misnamed]
            """
        },
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the registry warns about the name too
        result = check_backend("misnamed", items=["entry_point"])["entry_point"]
    assert result.status == "failed", result.message
    assert result.member == "entry point"
    assert "'misnamed-plugin'" in result.message and "paca-misnamed" in result.message
    ok = check_backend("cpu", items=["entry_point"])["entry_point"]
    assert ok.status == "passed" and "'cpu'" in ok.message
    runtime = check_backend(CPUBackend, items=["entry_point"])["entry_point"]
    assert runtime.status == "passed"  # the class of the 'cpu' entry point


def test_unavailable_backends_are_checked_for_what_they_declare():
    from broken_backends import RaisingAvailability

    raising = check_backend(RaisingAvailability)
    assert raising["availability"].status == "failed"
    assert "ImportError: libvendor.so not found" in raising["availability"].message
    assert all(
        r.status == "failed"
        for r in raising.results
        if r.item not in ("api", "availability", "entry_point")
    )

    class SilentUnavailable(CPUBackend):
        name = "broken-silent"

        @classmethod
        def is_available(cls):
            return False

        @classmethod
        def unavailable_reason(cls):
            return None

    silent = check_backend(SilentUnavailable)
    assert silent["api"].status == "passed"
    assert silent["availability"].status == "failed"
    assert silent["availability"].member == "unavailable_reason"
    skipped = [r for r in silent.results if r.item not in ("api", "availability", "entry_point")]
    assert skipped and all(r.status == "skipped" for r in skipped)


def test_undeclared_dtypes_are_skipped_per_member_and_refused_by_the_core():
    class FP32Only(CPUBackend):
        name = "fp32-only"
        capabilities: ClassVar[frozenset[str]] = frozenset({"float32"})

    report = check_backend(FP32Only, items=["shapes[bfloat16]", "dtype"])
    assert report["shapes[bfloat16]"].status == "skipped"
    assert "'bfloat16'" in report["shapes[bfloat16]"].message
    assert report["dtype[float32]"].status == "passed", str(report)
    for dtype in ("bfloat16", "float16"):
        result = report[f"dtype[{dtype}]"]
        assert result.status == "passed", str(report)
        assert "the core refuses it" in result.message and "autocast" in result.message


def test_vendor_extra_shapes_are_checked():
    class WrongForWideLayers(CPUBackend):
        name = "wrong-wide"

        def input_grad(self, grad_out, weight):
            out = super().input_grad(grad_out, weight)
            return out if weight.shape[0] < 100 else out * 0

    assert check_backend(WrongForWideLayers, items=["shapes[float32]"]).ok
    extra = [LinearShape((2, 3), 8, 128, 2), {"lead": 5, "n_in": 6, "n_out": 101, "r": 6}]
    result = check_backend(WrongForWideLayers, items=["shapes[float32]"], extra_shapes=extra)[
        "shapes[float32]"
    ]
    assert result.status == "failed" and result.member == "input_grad"
    assert "weight (128, 8)" in result.message and "2 of them the vendor's" not in result.message
    conv = ConvShape(1, 3, 4, (5, 5), (3, 3), 2, padding=(1, 1))
    ok = check_backend("cpu", items=["shapes[float32]"], extra_shapes=[conv, {**vars(conv)}])
    assert ok.ok and "2 of them the vendor's" in ok["shapes[float32]"].message
    with pytest.raises(TypeError, match="extra_shapes takes"):
        check_backend("cpu", items=["api"], extra_shapes=[(2, 8, 4, 1)])
    with pytest.raises(ValueError, match="r <= n_in"):
        LinearShape((2,), 4, 4, 5)


def test_generated_shapes_are_the_same_on_every_run():
    first, second = generated_shapes(6), generated_shapes(6)
    assert first == second
    assert len(first[0]) == 6 and first[1]


def test_report_names_the_api_version_and_selects_items_by_family():
    report = check_backend("cpu", items=["api", "dtype"])
    assert report.ok and [r.item for r in report.results] == [
        "api",
        "dtype[float32]",
        "dtype[bfloat16]",
        "dtype[float16]",
    ]
    version = f"v{BACKEND_API_VERSION[0]}.{BACKEND_API_VERSION[1]}"
    assert f"backend API {version}" == API_LABEL
    assert f"checked against backend API {version}" in str(report)
    assert f"checked against backend API {version}" in report["api"].message
    assert report.as_dict()["api_version"] == list(BACKEND_API_VERSION)
    assert "4 passed, 0 failed" in str(report)
    with pytest.raises(KeyError, match="unknown contract items"):
        check_backend("cpu", items=["nope"])
    assert all(isinstance(v.title, str) and v.title for v in CONTRACT.values())
    assert issubclass(ContractViolation, AssertionError)
    assert ContractViolation("x", "gather").member == "gather"


def test_the_backend_is_left_as_it_was():
    """Checks patch members on the instance for a moment (fault injection, hook spies):
    all of it is undone, even for items that fail."""
    backend = CPUBackend()
    check_backend(backend, items=["weight_exact", "runtime_contract", "step_hooks"])
    assert not {k for k in vars(backend) if not k.startswith("_paca")}, vars(backend)
    assert backend.step_hooks_enabled is True


def test_pytest_entry_points_name_the_failed_item_and_member(pytester: pytest.Pytester):
    """The documented pytest usage, run by pytest itself: a fixture, and --paca-backend."""
    pytester.makepyfile(
        test_broken="""
            import pytest
            from paca.testing.conformance import *  # noqa
            from paca_cpu import CPUBackend

            class Copying(CPUBackend):
                name = "copying"
                def write_columns(self, weight, idx, columns):
                    weight.contiguous().index_copy_(1, idx, columns.to(weight.dtype))

            @pytest.fixture
            def paca_backend_name():
                return Copying
            """,
        test_by_option="from paca.testing.conformance import *  # noqa\n",
    )
    result = pytester.runpytest_inprocess(
        "-p", "paca.testing.pytest_plugin", "--paca-backend", "cpu",
        "-k", "layouts or api", "-p", "no:cacheprovider",
    )  # fmt: skip
    result.assert_outcomes(failed=1, passed=3)
    out = result.stdout.str()
    assert "breaks contract item 'layouts' in write_columns" in out
    assert API_LABEL in out


@pytest.mark.slow
def test_pytest_without_a_backend_says_how_to_name_one(pytester: pytest.Pytester, monkeypatch):
    monkeypatch.delenv("PACA_CONFORMANCE_BACKEND", raising=False)
    pytester.makepyfile(test_nothing="from paca.testing.conformance import *  # noqa\n")
    result = pytester.runpytest_inprocess("-k", "api", "-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    assert "define a `paca_backend_name` fixture" in result.stdout.str()
    monkeypatch.setenv("PACA_CONFORMANCE_BACKEND", "cpu")
    pytester.runpytest_inprocess("-k", "api", "-p", "no:cacheprovider").assert_outcomes(passed=1)


@pytest.mark.cuda
def test_a_backend_that_syncs_with_the_host_fails_cuda_graph_capture():
    from paca_cuda import CUDABackend

    class Syncing(CUDABackend):
        name = "syncing"

        def gather(self, x, idx, dim=-1):
            if float(x.abs().max()) > 1e9:  # a host sync: not capturable
                raise ValueError("huge input")
            return super().gather(x, idx, dim)

    result = check_backend(Syncing(), device="cuda", items=["graphs"])["graphs"]
    assert result.status == "failed", result.message


def test_cpu_backend_has_nothing_unexpected_skipped():
    """What a plain CPU run skips, and why (everything else runs)."""
    report = check_backend("cpu", items=["lazy", "graphs"])
    assert report["lazy"].status == "skipped" and "'lazy'" in report["lazy"].message
    assert report["graphs"].status == "skipped" and "'graphs'" in report["graphs"].message
