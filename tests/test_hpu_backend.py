"""The Intel Gaudi (HPU) backend, tested against the fake SDK in ``tests/fake_sdk``.

Nothing here ran on a Gaudi: the fake records every SDK call (``mark_step``, HPU graphs,
``hpu_backend`` compiles) while computing on the CPU, so these tests check *what* the
backend asks the SDK to do and that results equal the CPU reference. Tests that need a
real device are marked ``hpu`` and skipped unless ``PACA_REAL_HPU=1``.

In-process tests use plain torch models only: with the fake on ``sys.path``,
transformers would detect a Gaudi and patch torch, so the tiny-LLaMA training script
runs in a subprocess.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fake_sdk.loader import FAKE_SDK_DIR, fake_events, load_fake_sdk, unload_fake_sdk
from torch import nn

import paca
from paca.backend_abc import BackendUnavailableError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_tiny.py"
#: A real Intel Gaudi SDK on this machine: the fake cannot be loaded next to it.
REAL_SDK = importlib.util.find_spec("habana_frameworks") is not None


def _load_fake(*args: object, **kwargs: object) -> object:
    if REAL_SDK:
        pytest.skip("a real Intel Gaudi SDK is installed; the fake SDK cannot replace it")
    return load_fake_sdk(*args, **kwargs)


# --------------------------------------------------------------------------- helpers
@pytest.fixture
def lazy_sdk() -> Iterator[object]:
    """Fake SDK 1.18 with PT_HPU_LAZY_MODE=1 (the paper's setting)."""
    yield _load_fake(lazy=True, version="1.18.0")
    unload_fake_sdk()


@pytest.fixture
def eager_sdk() -> Iterator[object]:
    """Fake SDK 1.21 with PT_HPU_LAZY_MODE=0; mark_step would raise here (fake default)."""
    yield _load_fake(lazy=False, version="1.21.0")
    unload_fake_sdk()


@pytest.fixture(autouse=True)
def _no_fake_left_behind() -> Iterator[None]:
    yield
    if not REAL_SDK:  # unloading purges every habana_frameworks module, real ones too
        unload_fake_sdk()


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(24, 32), nn.GELU(), nn.Linear(32, 16), nn.GELU(), nn.Linear(16, 4)
    )


def _wrap(backend: str, seed: int = 0) -> paca.PacaModel:
    config = paca.PacaConfig(r=4, target_modules=["0", "2", "4"], seed=seed)
    return paca.wrap(_mlp(seed), config, backend=backend)


def _batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 24, generator=g), torch.randn(6, 4, generator=g)) for _ in range(n)]


def _train(
    pm: nn.Module,
    steps: int,
    grad_accum: int = 1,
    bf16: bool = False,
    mark: bool = False,
    model: nn.Module | None = None,
    input_dtype: torch.dtype | None = None,
) -> list[float]:
    """A plain loop with no SDK call in it; ``mark`` interleaves markers in the fake log."""
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    run = model if model is not None else pm
    device = next(pm.parameters()).device
    losses = []
    data = _batches(steps * grad_accum)
    for step in range(steps):
        total = 0.0
        for micro in range(grad_accum):
            x, y = data[step * grad_accum + micro]
            x, y = x.to(device), y.to(device)  # the CPU under the fake, "hpu" on a Gaudi
            x = x.to(input_dtype) if input_dtype is not None else x
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = nn.functional.mse_loss(run(x).float(), y) / grad_accum
            loss.backward()
            if mark:
                fake_events().record("test:backward")
            total += loss.item()
        opt.step()
        if mark:
            fake_events().record("test:step")
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses


def _deltas(pm: paca.PacaModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}


# ----------------------------------------------------------- discovery / availability
def test_use_backend_discovers_hpu_and_auto_detection_prefers_it(lazy_sdk):
    b = paca.use_backend("hpu")
    assert type(b).__name__ == "HPUBackend" and b.name == "hpu"
    info = {i.name: i for i in paca.list_backends()}
    assert info["hpu"].available and info["hpu"].priority == 300
    assert info["hpu"].distribution == "paca"
    paca.use_backend(None)
    assert paca.get_backend().name == "hpu"  # priority 300 beats cpu (0)


@pytest.mark.skipif(REAL_SDK, reason="a real Intel Gaudi SDK is installed here")
def test_unavailable_without_sdk_gives_clear_error():
    from paca_hpu.backend import HPUBackend

    assert "habana_frameworks" not in sys.modules
    assert not HPUBackend.is_available()
    reason = HPUBackend.unavailable_reason()
    assert "habana_frameworks" in reason and "not installed" in reason
    with pytest.raises(BackendUnavailableError) as err:
        paca.use_backend("hpu")
    text = str(err.value)
    assert "'hpu'" in text and "not installed" in text and "PACA_BACKEND=cpu" in text
    assert "Available here:" in text and "cpu" in text
    with pytest.raises(BackendUnavailableError, match="not installed"):
        HPUBackend()  # direct construction says the same


def test_unavailable_without_device():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fake warns that no HPU is visible
        _load_fake(lazy=True, version="1.18.0", device_count=0)
    from paca_hpu.backend import HPUBackend

    assert not HPUBackend.is_available()
    assert "no HPU is visible" in HPUBackend.unavailable_reason()
    with pytest.raises(BackendUnavailableError, match="hl-smi"):
        paca.use_backend("hpu")


def test_sdk_import_failure_is_reported_not_raised():
    env = {"FAKE_HPU_REQUIRE_TORCH_FORK": "1"}  # newer bridges refuse stock torch in lazy mode
    with pytest.raises(AssertionError, match="Stock PyTorch"):
        _load_fake(lazy=True, version="1.18.0", extra_env=env)
    from paca_hpu.backend import HPUBackend

    assert HPUBackend.is_available() is False
    reason = HPUBackend.unavailable_reason()
    assert "importing habana_frameworks.torch failed" in reason and "Stock PyTorch" in reason
    assert not {i.name: i for i in paca.list_backends()}["hpu"].available


@pytest.mark.skipif(REAL_SDK, reason="a real Intel Gaudi SDK is installed (torch may autoload it)")
def test_cpu_backend_never_imports_the_sdk(monkeypatch):
    """The SDK is importable here, but choosing and using the cpu backend never loads it."""
    monkeypatch.syspath_prepend(FAKE_SDK_DIR)
    monkeypatch.setenv("PACA_BACKEND", "cpu")
    assert "habana_frameworks" not in sys.modules
    import paca_hpu.backend  # noqa: F401  (importing the backend class is not using it)
    import paca_hpu.plugin  # noqa: F401

    assert paca.get_backend().name == "cpu"
    pm = _wrap("cpu")
    _train(pm, steps=1)
    pm.merge()
    pm.unmerge()
    assert "habana_frameworks" not in sys.modules


def _imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module":
            names.update(a.value for a in node.args if isinstance(a, ast.Constant))
    return names


def test_only_the_hpu_backend_imports_habana_frameworks():
    sources = [*(ROOT / "paca").rglob("*.py"), *(ROOT / "backends").rglob("*.py")]
    offenders = [
        str(p.relative_to(ROOT))
        for p in sources
        if "paca_hpu" not in p.parts
        # the conformance suite exercises a declared 'graphs' on HPU with the SDK's own
        # wrap_in_hpu_graph, imported inside that one check (never at import time)
        and p.relative_to(ROOT).as_posix() != "paca/testing/_checks_capabilities.py"
        and any(n.split(".")[0] == "habana_frameworks" for n in _imports_of(p))
    ]
    assert offenders == []
    # and inside paca_hpu no module imports it at import time (only sdk.py, on demand)
    for path in (ROOT / "backends" / "paca_hpu").glob("*.py"):
        tree = ast.parse(path.read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        assert not any("habana" in ast.dump(n) for n in top), path.name


# ------------------------------------------------------------------------- modes
@pytest.mark.parametrize(
    ("version", "lazy"), [("1.18.0", True), ("1.20.1", True), ("1.21.0", False)]
)
def test_mode_default_follows_the_sdk_release(version, lazy):
    _load_fake(lazy=None, version=version)  # PT_HPU_LAZY_MODE unset
    b = paca.use_backend("hpu")
    assert b.lazy is lazy and b.wants_step_hooks is lazy
    assert b.mode == ("lazy" if lazy else "eager")
    assert ("compile" in b.capabilities) is (not lazy)
    assert ("graphs" in b.capabilities) is lazy


def test_mode_is_asked_from_the_sdk_not_the_environment(monkeypatch):
    _load_fake(lazy=True, version="1.18.0")
    import habana_frameworks.torch.utils.internal as internal

    monkeypatch.setattr(internal, "is_lazy", lambda: False)  # the SDK's word wins over the env
    assert os.environ["PT_HPU_LAZY_MODE"] == "1"
    assert paca.use_backend("hpu").lazy is False


@pytest.mark.parametrize(("version", "lazy"), [("1.18.0", True), ("1.21.0", False)])
def test_mode_falls_back_to_the_release_default_without_is_lazy(monkeypatch, version, lazy):
    """Bridges without ``utils.internal.is_lazy``: PT_HPU_LAZY_MODE, else the release default."""
    _load_fake(lazy=None, version=version)
    import habana_frameworks.torch.utils.internal as internal

    monkeypatch.delattr(internal, "is_lazy")
    assert paca.use_backend("hpu").lazy is lazy


def test_default_lazy_for_release():
    from paca_hpu.sdk import default_lazy_for

    assert default_lazy_for("1.18.0") and default_lazy_for("1.20.1")
    assert not default_lazy_for("1.21.0") and not default_lazy_for("1.22.2+hpu")


# ------------------------------------------------------------- results vs the CPU
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "eager"])
def test_training_equals_cpu_reference(lazy, bf16):
    ref = _wrap("cpu")
    ref_losses = _train(ref, steps=3, grad_accum=2, bf16=bf16)
    _load_fake(lazy=lazy, version="1.18.0" if lazy else "1.21.0")
    pm = _wrap("hpu")
    assert pm.backend.name == "hpu"
    losses = _train(pm, steps=3, grad_accum=2, bf16=bf16)
    assert losses == ref_losses
    got, want = _deltas(pm), _deltas(ref)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == torch.float32  # fp32 delta master weights under bf16
        assert torch.equal(got[name], want[name]), name


def test_bf16_model_equals_cpu_reference_with_fp32_deltas():
    """The paper's Gaudi setting: the whole model cast to bf16, PaCA deltas kept in fp32."""
    ref = _wrap("cpu").to(torch.bfloat16)
    for p in ref.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    ref_losses = _train(ref, steps=2, input_dtype=torch.bfloat16)
    _load_fake(lazy=True, version="1.18.0")
    pm = _wrap("hpu").to(torch.bfloat16)
    for p in pm.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    assert _train(pm, steps=2, input_dtype=torch.bfloat16) == ref_losses
    for name, want in _deltas(ref).items():
        got = _deltas(pm)[name]
        assert got.dtype == torch.float32 and torch.equal(got, want), name


def test_delta_gradient_is_fp32_under_bf16_autocast(lazy_sdk):
    pm = _wrap("hpu")
    x = torch.randn(5, 24)
    with pm.backend.autocast():  # bf16 by default
        out = pm(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    grads = [p.grad for p in pm.parameters() if p.requires_grad]
    assert grads and all(g.dtype == torch.float32 for g in grads)


# --------------------------------------------------------------- step boundaries
def test_lazy_mode_marks_each_backward_and_each_optimizer_step(lazy_sdk):
    pm = _wrap("hpu")
    fake_events().clear_events()
    _train(pm, steps=3, grad_accum=2, mark=True)
    per_micro = ["mark_step", "test:backward"]
    per_step = [*per_micro, *per_micro, "mark_step", "test:step"]
    assert fake_events().kinds() == per_step * 3


def test_lazy_mode_no_marks_for_inference_or_foreign_optimizers(lazy_sdk):
    pm = _wrap("hpu")
    other = nn.Parameter(torch.zeros(3))
    foreign = torch.optim.SGD([other], lr=0.1)
    fake_events().clear_events()
    with torch.no_grad():
        pm(torch.randn(2, 24))
    other.grad = torch.ones(3)
    foreign.step()  # holds no PaCA parameter: not a PaCA step boundary
    assert fake_events().count("mark_step") == 0


def test_step_hooks_enabled_can_be_handed_to_a_trainer(lazy_sdk):
    pm = _wrap("hpu")
    pm.backend.step_hooks_enabled = False
    try:
        fake_events().clear_events()
        _train(pm, steps=2)
        assert fake_events().count("mark_step") == 0
        pm.backend.mark_step()  # explicit boundary still available without htcore
        assert fake_events().kinds() == ["mark_step"]
    finally:
        pm.backend.step_hooks_enabled = True


def test_eager_mode_never_marks_steps(eager_sdk):
    pm = _wrap("hpu")
    b = pm.backend
    assert b.wants_step_hooks is False and b.lazy is False
    fake_events().clear_events()
    _train(pm, steps=2, grad_accum=2)  # the fake raises on any eager mark_step
    b.mark_step()  # documented no-op in eager mode
    assert fake_events().count("mark_step") == 0


# ---------------------------------------------------------------- compile / graphs
@pytest.mark.slow
def test_compile_with_hpu_backend_no_graph_breaks_no_recompiles(eager_sdk):
    ref = _wrap("cpu")
    ref_losses = _train(ref, steps=3)
    pm = _wrap("hpu")
    b = pm.backend
    assert b.compile_backend() == "hpu_backend"
    compiled = b.compile(pm, fullgraph=True)  # fullgraph: any graph break raises
    losses = _train(pm, steps=3, model=compiled)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-6, atol=0)
    compiles = fake_events().count("compile")
    assert compiles >= 1
    _train(pm, steps=1, model=compiled)  # same shapes: no new graph
    assert fake_events().count("compile") == compiles


def test_compile_in_lazy_mode_is_a_clear_error(lazy_sdk):
    b = paca.use_backend("hpu")
    assert b.compile_backend() == "hpu_backend" and "compile" not in b.capabilities
    with pytest.raises(RuntimeError, match="PT_HPU_LAZY_MODE=0"):
        b.compile(nn.Linear(2, 2))


def test_inference_uses_hpu_graphs_in_lazy_mode(lazy_sdk):
    pm = _wrap("hpu")
    x = torch.randn(3, 24)
    with torch.no_grad():
        want = pm(x).clone()
        fast = pm.backend.prepare_for_inference(pm)
        assert fast is pm and not pm.training and not pm.model.training
        first = fast(x).clone()
        second = fast(x)
    assert torch.equal(first, want) and torch.equal(second, want)
    kinds = fake_events().kinds()
    assert kinds.count("wrap_in_hpu_graph") == 1
    assert kinds.count("graph_capture") == 1 and kinds.count("graph_replay") == 1


def test_training_hpu_graphs_module_cacher_equal_cpu(lazy_sdk):
    """optimum-habana's ``use_hpu_graphs_for_training`` path (ModuleCacher) around a PaCA model."""
    ref_losses = _train(_wrap("cpu"), steps=3)
    pm = _wrap("hpu")
    lazy_sdk.hpu.ModuleCacher()(model=pm, inplace=True)
    assert _train(pm, steps=3) == ref_losses
    kinds = fake_events().kinds()
    assert kinds.count("graph_capture") == 1 and kinds.count("graph_replay") == 2
    assert kinds.count("mark_step") == 3 * 2


def test_inference_in_eager_mode_is_eval_only(eager_sdk):
    pm = _wrap("hpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fake warns if HPU graphs are used in eager mode
        out = pm.backend.prepare_for_inference(pm)
    assert out is pm and not pm.training
    assert fake_events().count("wrap_in_hpu_graph") == 0


# ------------------------------------------------------------ static shapes / misc
def test_indices_must_live_on_the_device(lazy_sdk):
    b = paca.use_backend("hpu")
    w, delta = torch.randn(4, 6), torch.zeros(4, 2)
    with pytest.raises(ValueError, match="fixed tensor"):
        b.linear_forward(torch.randn(2, 6), w, None, delta, torch.tensor([1, 3], device="meta"))
    with pytest.raises(ValueError, match="1-D int64"):
        b.linear_forward(torch.randn(2, 6), w, None, delta, torch.tensor([1, 3], dtype=torch.int32))


def test_describe_memory_and_synchronize(lazy_sdk):
    b = paca.use_backend("hpu")
    info = b.describe()
    assert info["mode"] == "lazy" and info["sdk_version"] == "1.18.0"
    assert info["fake_sdk"] is True and info["device_name"] == "GAUDI2"
    assert info["env"]["PT_HPU_LAZY_MODE"] == "1"
    b.reset_peak_memory()
    now, peak = b.memory_allocated(), b.max_memory_allocated()
    assert isinstance(now, int) and isinstance(peak, int) and peak >= now >= 0
    b.synchronize()
    assert fake_events().count("synchronize") == 1


@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "eager"])
def test_conformance_suite_under_fake_sdk(lazy):
    """paca.testing's contract, run against the HPU backend in both modes.

    The fake's device seam maps the HPU to the CPU; the suite accepts that and says so in
    its ``availability`` item.
    """
    testing = pytest.importorskip("paca.testing")
    _load_fake(lazy=lazy, version="1.18.0" if lazy else "1.21.0")
    report = testing.check_backend("hpu", run_compile=not lazy)
    assert report.ok, str(report)
    results = {r.item: r for r in report.results}
    assert "'cpu'" in results["availability"].message  # the seam, reported
    for item in ("registration", "entry_point", "shapes[bfloat16]", "retention", "traffic"):
        assert results[item].status == "passed", str(report)
    assert results["step_hooks"].status == "passed", str(report)
    assert "not declared" in results["dtype[float16]"].message  # refused by the core
    # lazy mode: step marks and HPU graphs (wrap_in_hpu_graph); eager mode: hpu_backend compile
    assert results["lazy"].status == ("passed" if lazy else "skipped"), str(report)
    assert results["graphs"].status == ("passed" if lazy else "skipped"), str(report)
    assert results["compile"].status == ("skipped" if lazy else "passed"), str(report)
    if not lazy:
        assert "'hpu_backend'" in results["compile"].message


@pytest.mark.hpu
def test_real_gaudi_step_runs_on_hpu_device():
    """On a real Gaudi (PACA_REAL_HPU=1): tensors live on "hpu" and training matches CPU."""
    b = paca.use_backend("hpu")
    assert b.device().type == "hpu" and not b.sdk.fake
    ref = _wrap("cpu")
    ref_losses = _train(ref, steps=2)
    pm = _wrap("hpu")
    assert next(pm.parameters()).device.type == "hpu"
    losses = _train(pm, steps=2)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-3, atol=1e-4)


@pytest.mark.hpu
def test_real_gaudi_lazy_marks_steps(monkeypatch):
    """On a real Gaudi in lazy mode: one mark_step per backward and per optimizer step."""
    b = paca.use_backend("hpu")
    if not b.lazy:
        pytest.skip("run with PT_HPU_LAZY_MODE=1 for this check")
    calls: list[str] = []
    real = b.sdk.core.mark_step
    monkeypatch.setattr(b.sdk.core, "mark_step", lambda *a, **k: (calls.append("m"), real())[1])
    _train(_wrap("hpu"), steps=2, grad_accum=2)
    assert len(calls) == 2 * (2 + 1)


# --------------------------------------------------- the same script on cpu and hpu
_DRIVER = r"""
import contextlib, importlib.util, io, json, os, runpy, sys
script, fake_dir, out = sys.argv[1], sys.argv[2], sys.argv[3]
args = sys.argv[4:]
spec = importlib.util.spec_from_file_location("fake_loader", os.path.join(fake_dir, "loader.py"))
loader = importlib.util.module_from_spec(spec)
spec.loader.exec_module(loader)  # the fake goes on sys.path only inside load_fake_sdk()
from paca._registry import reset_registry

def run(backend, **fake):
    loader.unload_fake_sdk()
    if fake:
        loader.load_fake_sdk(**fake)
    os.environ["PACA_BACKEND"] = backend
    reset_registry()
    sys.argv = [script, *args]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        runpy.run_path(script, run_name="__main__")  # as `python examples/train_tiny.py`
    text = stdout.getvalue()
    return {
        "stdout": text,
        "summary": json.loads(text.strip().splitlines()[-1]),
        "events": loader.fake_events().kinds() if fake else [],
        "sdk_imported": "habana_frameworks" in sys.modules,
    }

results = {"cpu": run("cpu")}
results["hpu_lazy"] = run("hpu", lazy=True, version="1.18.0")
results["hpu_eager"] = run("hpu", lazy=None, version="1.21.0")
json.dump(results, open(out, "w"))
"""


@pytest.mark.slow
def test_same_script_cpu_and_hpu_identical_losses(tmp_path):
    if REAL_SDK:
        pytest.skip("a real Intel Gaudi SDK is installed; the fake SDK cannot replace it")
    """examples/train_tiny.py, unchanged, with PACA_BACKEND=cpu and =hpu (lazy and eager).

    One subprocess runs all three (transformers sees a Gaudi once the fake is on the
    path, so this stays out of the pytest process); the cpu run goes first with no SDK.
    """
    steps, accum = 3, 2
    out = tmp_path / "runs.json"
    args = ["--steps", str(steps), "--grad-accum", str(accum), "--batch-size", "2"]
    args += ["--seq-len", "24", "--eval-batches", "1"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PACA_", "PT_HPU", "FAKE_"))}
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER, str(SCRIPT), FAKE_SDK_DIR, str(out), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = json.loads(out.read_text())
    cpu, lazy, eager = runs["cpu"], runs["hpu_lazy"], runs["hpu_eager"]
    assert cpu["summary"]["backend"] == "cpu" and lazy["summary"]["backend"] == "hpu"
    assert len(cpu["summary"]["losses"]) == steps
    assert lazy["summary"]["losses_hex"] == cpu["summary"]["losses_hex"]
    assert eager["summary"]["losses_hex"] == cpu["summary"]["losses_hex"]
    assert lazy["summary"]["eval_losses"] == cpu["summary"]["eval_losses"]
    # lazy: one mark_step per backward and one per optimizer step, then HPU-graph eval
    assert lazy["events"] == (
        ["sdk_import"]
        + ["mark_step"] * (steps * (accum + 1))
        + ["wrap_in_hpu_graph", "graph_capture", "synchronize"]
    )
    # eager (SW 1.21 default): no mark_step, no HPU graphs
    assert eager["events"] == ["sdk_import", "synchronize"]
    assert cpu["sdk_imported"] is False  # the cpu run never touched habana_frameworks
    assert "step 0 loss" in lazy["stdout"] and '"mode": "lazy"' in lazy["stdout"]
    assert '"mode": "eager"' in eager["stdout"] and '"fake_sdk": true' in eager["stdout"]


# ------------------------------------------------------ optimum-habana glue (no SDK run)
def _gaudi_args(**kw: object) -> object:
    from types import SimpleNamespace

    base = dict(use_habana=True, use_lazy_mode=True, torch_compile=False, fp16=False)
    return SimpleNamespace(**{**base, "deepspeed": None, **kw})


def test_gaudi_args_checks(lazy_sdk):
    from paca.integrations.habana import GaudiSettingsError, check_gaudi_args

    lazy = paca.use_backend("hpu")
    assert check_gaudi_args(_gaudi_args(), lazy) == []
    bad = {
        "PT_HPU_LAZY_MODE=0": _gaudi_args(use_lazy_mode=False),
        "needs eager mode": _gaudi_args(torch_compile=True),
        "use bf16": _gaudi_args(fp16=True),
        "use_habana=True": _gaudi_args(use_habana=False),
    }
    for needle, args in bad.items():
        with pytest.raises(GaudiSettingsError, match=needle):
            check_gaudi_args(args, lazy)
    # ZeRO-3 is accepted (DeepSpeed gathers the base weight for the PaCA layer), with a note
    zero3 = check_gaudi_args(_gaudi_args(deepspeed={"zero_optimization": {"stage": 3}}), lazy)
    assert any("ZeRO-3" in note and "not yet on Gaudi" in note for note in zero3)
    with pytest.raises(GaudiSettingsError, match="backend='hpu'"):
        check_gaudi_args(_gaudi_args(), paca.use_backend("cpu"))


@pytest.mark.parametrize("name", ["ds_zero1_bf16.json", "ds_zero2_bf16.json"])
def test_shipped_deepspeed_configs_are_accepted(eager_sdk, name):
    from paca.integrations.habana import check_gaudi_args

    path = ROOT / "examples" / "deepspeed" / name
    config = json.loads(path.read_text())
    assert config["bf16"]["enabled"] is True and config["zero_optimization"]["stage"] in (1, 2)
    eager = paca.use_backend("hpu")
    args = _gaudi_args(use_lazy_mode=False, torch_compile=True, deepspeed=str(path))
    args.torch_compile_backend = "hpu_backend"
    assert check_gaudi_args(args, eager) == []
    args.torch_compile_backend = "inductor"
    with pytest.raises(ValueError, match="hpu_backend"):
        check_gaudi_args(args, eager)


def test_gaudi_callback_leaves_step_marking_to_the_trainer(lazy_sdk):
    """Replays GaudiTrainer's lazy loop: its own mark_step after each training step
    (forward + backward) and after each optimizer step; paca must add none of its own."""
    import habana_frameworks.torch.core as htcore

    from paca.integrations.habana import PacaGaudiCallback

    pm = _wrap("hpu")
    callback = PacaGaudiCallback(pm.backend)
    args = _gaudi_args()
    callback.on_train_begin(args, None, None)
    fake_events().clear_events()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    steps, accum = 2, 2
    for x, y in _batches(steps * accum):
        nn.functional.mse_loss(pm(x), y).backward()
        htcore.mark_step()  # GaudiTrainer, after training_step
        fake_events().record("test:backward")
        if fake_events().count("test:backward") % accum == 0:
            opt.step()
            opt.zero_grad()
            htcore.mark_step()  # GaudiTrainer, after the optimizer step
            fake_events().record("test:step")
    micro = ["mark_step", "test:backward"]
    assert fake_events().kinds() == ([*micro, *micro, "mark_step", "test:step"]) * steps
    callback.on_train_end(args, None, None)
    assert pm.backend.step_hooks_enabled is True


def test_gaudi_trainer_glue_without_optimum_habana_says_how_to_install():
    from paca.integrations import habana

    try:
        import optimum.habana  # noqa: F401
    except ImportError:
        pass
    else:  # pragma: no cover - only on a Gaudi machine
        pytest.skip("optimum-habana is installed here")
    with pytest.raises(ImportError, match=r"paca\[hpu\]"):
        habana.gaudi_config_for_paca()
    pm = _wrap("cpu")
    with pytest.raises(ImportError, match=r"paca\[hpu\]"):
        habana.make_gaudi_trainer(pm, _gaudi_args())
    with pytest.raises(TypeError, match="PacaModel"):
        habana.make_gaudi_trainer(nn.Linear(2, 2), _gaudi_args())


# -------------------------------------------- `paca run` on Gaudi: one GaudiTrainer builder
_PACA_RUN_DRIVER = r"""
import contextlib, io, json, sys
tests_dir, exp_path, run_dir, out = sys.argv[1:5]
sys.path.insert(0, tests_dir)
from fake_sdk.loader import fake_events, load_fake_sdk, unload_fake_sdk
load_fake_sdk(lazy=True, version="1.18.0")  # PT_HPU_LAZY_MODE=1
import fake_optimum_habana
import paca
from paca._registry import reset_registry
from paca.cli.main import main

habana = fake_optimum_habana.install()
args = ["run", exp_path, "--backend", "hpu", "--no-progress"]
rc = main([*args, "--run-dir", run_dir])
trainer = habana.GaudiTrainer.built[-1]
result = {
    "rc": rc,
    "kinds": [k for k in fake_events().kinds() if k == "mark_step" or k.startswith("gaudi:")],
    "trainer_class": type(trainer).__name__,
    "callbacks": [type(c).__name__ for c in trainer.callback_handler.callbacks],
    "gaudi_config": vars(trainer.gaudi_config),
    "step_hooks_enabled_after": paca.get_backend().step_hooks_enabled,
}
# SW 1.21 defaults to eager: [hpu].lazy_mode = true (the default) is refused, saying why
unload_fake_sdk()
load_fake_sdk(lazy=None, version="1.21.0")
reset_registry()
stderr = io.StringIO()
with contextlib.redirect_stderr(stderr):
    result["eager_rc"] = main([*args, "--run-dir", run_dir + "-eager"])
result["eager_stderr"] = stderr.getvalue()
json.dump(result, open(out, "w"))
"""


@pytest.mark.slow
def test_paca_run_in_lazy_mode_marks_steps_through_gaudi_trainer_only(tmp_path):
    """``paca run`` on an HPU backend with optimum-habana builds its GaudiTrainer with
    :func:`paca.integrations.habana.make_gaudi_trainer`: checked arguments, the PaCA
    GaudiConfig, and in lazy mode every ``mark_step`` comes from GaudiTrainer (after each
    training step, each optimizer step and each prediction step), none from paca's hooks.

    A subprocess (transformers sees a Gaudi once the fake is on the path) runs a 2-step
    experiment (2 micro-batches each, 2 eval batches before and after) against the fake
    SDK and tests/fake_optimum_habana.py."""
    if REAL_SDK:
        pytest.skip("a real Intel Gaudi SDK is installed; the fake SDK cannot replace it")
    from test_experiment import tiny_experiment

    from paca.experiment.schema import dumps_toml

    exp = tiny_experiment(
        tmp_path,
        data={"max_train_samples": 8, "max_eval_samples": 4},
        train={"steps": 2, "grad_accum": 2, "batch_size": 2, "eval_batch_size": 2,
               "save_steps": 2, "throughput_warmup_steps": 0},
    )  # fmt: skip
    exp_path = tmp_path / "exp.toml"
    exp_path.write_text(dumps_toml(exp))
    out = tmp_path / "result.json"
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PACA_", "PT_HPU", "FAKE_"))}
    proc = subprocess.run(
        [sys.executable, "-c", _PACA_RUN_DRIVER, str(ROOT / "tests"), str(exp_path),
         str(run_dir), str(out)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["rc"] == 0, proc.stderr[-4000:]
    evaluation = ["mark_step", "gaudi:prediction_step"] * 2
    micro = ["mark_step", "gaudi:training_step"]
    step = [*micro, *micro, "mark_step", "gaudi:optimizer_step"]
    assert result["kinds"] == [*evaluation, *step, *step, *evaluation]
    assert result["trainer_class"] == "PacaGaudiTrainer"  # adapter-only checkpoints
    assert "PacaGaudiCallback" in result["callbacks"]
    assert result["step_hooks_enabled_after"] is True  # handed back after training
    config = result["gaudi_config"]  # PaCA's GaudiConfig; no autocast for an fp32 run
    assert config["use_torch_autocast"] is False
    assert (config["use_fused_clip_norm"], config["use_fused_adam"]) == (True, False)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["trainer"] == "GaudiTrainer"
    assert summary["steps"] == 2
    assert (run_dir / "checkpoints" / "checkpoint-2" / "paca_adapter.safetensors").is_file()
    assert result["eager_rc"] == 1
    refusal = result["eager_stderr"]
    assert "use_lazy_mode=True but the Gaudi bridge was loaded in eager mode" in refusal, refusal
    assert "[hpu].lazy_mode" in refusal
