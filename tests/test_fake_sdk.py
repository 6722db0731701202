"""Tests of the fake Intel Gaudi SDK in tests/fake_sdk (not of paca itself).

Self-contained: puts tests/fake_sdk on sys.path and loads the fake through
``loader.load_fake_sdk`` (which re-imports it under the requested env), unloading it after
every test so nothing leaks into other test modules.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

FAKE_SDK_DIR = str(Path(__file__).resolve().parent / "fake_sdk")

# Not put on sys.path for the whole session: with the fake importable, every later test
# would see an installed Gaudi SDK and auto-detection would pick the hpu backend.
# load_fake_sdk() adds the directory while the fake is loaded and unload removes it.
from fake_sdk import loader  # noqa: E402


@pytest.fixture
def sdk():
    """Factory: ``sdk(lazy=..., version=..., device_count=..., ...)`` -> habana_frameworks.torch."""

    def _load(*args, **kwargs):
        return loader.load_fake_sdk(*args, **kwargs)

    yield _load
    loader.unload_fake_sdk()


def _modules():
    import habana_frameworks._fake_events as ev
    import habana_frameworks.torch.core as htcore
    import habana_frameworks.torch.hpu as hthpu
    from habana_frameworks.torch.utils import internal

    return htcore, hthpu, internal, ev


# --------------------------------------------------------------------------- modes


@pytest.mark.parametrize(
    ("version", "expected_lazy"),
    [("1.18.0", True), ("1.20.1", True), ("1.21.0", False), ("1.22.2", False)],
)
def test_lazy_default_follows_release(sdk, version, expected_lazy):
    ht = sdk(lazy=None, version=version)
    _, _, internal, ev = _modules()
    assert "PT_HPU_LAZY_MODE" not in os.environ
    assert ht.__version__ == version
    assert internal.is_lazy() is expected_lazy
    assert ev.events() == [("sdk_import", version, "lazy" if expected_lazy else "eager")]


@pytest.mark.parametrize("version", ["1.18.0", "1.21.0"])
@pytest.mark.parametrize("lazy", [True, False])
def test_explicit_lazy_mode_overrides_release_default(sdk, version, lazy):
    sdk(lazy=lazy, version=version)
    _, _, internal, _ = _modules()
    assert os.environ["PT_HPU_LAZY_MODE"] == ("1" if lazy else "0")
    assert internal.is_lazy() is lazy


def test_mode_is_fixed_at_import_and_drift_warns(sdk):
    sdk(lazy=False)
    _, _, internal, _ = _modules()
    os.environ["PT_HPU_LAZY_MODE"] = "1"
    with pytest.warns(RuntimeWarning, match="fixed at import"):
        assert internal.is_lazy() is False


# --------------------------------------------------------------------------- mark_step


def test_mark_step_raises_in_eager(sdk):
    sdk(lazy=False)
    htcore, _, _, ev = _modules()
    with pytest.raises(RuntimeError, match="lazy-mode only"):
        htcore.mark_step()
    with pytest.raises(RuntimeError, match="lazy-mode only"):
        htcore.mark_step("hpu", sync=True)
    assert ev.count("mark_step") == 0


def test_mark_step_eager_noop_option_matches_real_sdk(sdk):
    sdk(lazy=False, extra_env={"FAKE_HPU_EAGER_MARK_STEP": "noop"})
    htcore, _, _, ev = _modules()
    assert htcore.mark_step() is None
    assert ev.count("mark_step") == 0


def test_mark_step_lazy_records_and_runs_step_closures(sdk):
    sdk(lazy=True)
    htcore, _, _, ev = _modules()
    ev.clear_events()
    seen = []
    htcore.add_step_closure(seen.append, args=("a",))
    assert seen == []
    htcore.mark_step()
    htcore.mark_step(device_str="hpu", sync=True)
    assert seen == ["a"]
    assert ev.events() == [("mark_step",), ("mark_step",)]
    assert ev.count("mark_step") == 2


# --------------------------------------------------------------------------- device module


def test_torch_hpu_registered_and_reregistered(sdk):
    ht1 = sdk(lazy=True)
    assert torch.hpu is ht1.hpu
    assert torch.hpu.is_available() is True
    assert torch.hpu.device_count() == 1
    assert torch.hpu.get_device_name() == "GAUDI2"
    assert torch.hpu.current_device() == 0
    torch.hpu.synchronize()
    ht2 = sdk(lazy=False, device_count=2, device_name="GAUDI3")
    assert ht2 is not ht1 and torch.hpu is ht2.hpu
    assert torch.hpu.device_count() == 2
    assert torch.hpu.get_device_name("hpu:1") == "GAUDI3"
    assert sys.modules["torch.hpu"] is ht2.hpu
    _, hthpu, _, _ = _modules()
    assert hthpu._paca_fake_device == "cpu"
    assert hthpu._paca_fake_autocast_device_type == "cpu"
    assert torch.device(hthpu._paca_fake_device).type == "cpu"


def test_no_device(sdk):
    with pytest.warns(UserWarning, match="no HPU"):
        sdk(lazy=True, device_count=0)
    assert torch.hpu.is_available() is False
    assert torch.hpu.device_count() == 0
    with pytest.warns(UserWarning, match="Device not available"):
        assert torch.hpu.get_device_name() == ""
    with pytest.raises(RuntimeError):
        torch.hpu.current_device()
    with pytest.raises(RuntimeError):
        torch.hpu.memory_allocated()


def test_unload_restores_torch_env_and_backend(sdk):
    before = {k: os.environ.get(k) for k in ("PT_HPU_LAZY_MODE", "FAKE_SDK_VERSION")}
    sdk(lazy=False, version="1.19.0")
    assert "hpu_backend" in torch._dynamo.list_backends(exclude_tags=())
    loader.unload_fake_sdk()
    assert not hasattr(torch, "hpu")
    assert "habana_frameworks" not in sys.modules
    assert {k: os.environ.get(k) for k in before} == before
    assert "hpu_backend" not in torch._dynamo.list_backends(exclude_tags=())


def test_dynamic_shape_toggles(sdk):
    sdk(lazy=True)
    _, hthpu, _, ev = _modules()
    assert hthpu.get_dynamic_shape_status() is False
    hthpu.enable_dynamic_shape()
    assert hthpu.get_dynamic_shape_status() is True
    hthpu.disable_dynamic_shape()
    assert ev.events("dynamic_shape") == [("dynamic_shape", True), ("dynamic_shape", False)]


# --------------------------------------------------------------------------- memory


def test_memory_api_returns_ints_from_process(sdk):
    sdk(lazy=False)
    stats = torch.hpu.memory_stats()
    for key in ("Limit", "InUse", "MaxInUse", "NumAllocs", "NumFrees", "ActiveAllocs"):
        assert isinstance(stats[key], int), key
    assert stats["Limit"] > 0
    for fn in (
        torch.hpu.memory_allocated,
        torch.hpu.max_memory_allocated,
        torch.hpu.memory_reserved,
    ):
        assert isinstance(fn(), int)
    free, total = torch.hpu.mem_get_info()
    assert isinstance(free, int) and total == torch.hpu.memory_reserved() and free <= total
    torch.hpu.reset_peak_memory_stats()
    peak0 = torch.hpu.max_memory_allocated()
    big = torch.ones(64 * 1024 * 1024 // 4 * 4)  # 64 MiB * 4 bytes = 256 MiB, touched
    peak1 = torch.hpu.max_memory_allocated()
    assert torch.hpu.memory_allocated() <= peak1
    assert peak1 - peak0 >= 128 * 1024 * 1024, (peak0, peak1)
    del big
    with pytest.raises(AssertionError, match="Invalid device id"):
        torch.hpu.memory_stats(5)


# --------------------------------------------------------------------------- torch.compile


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 4)

    def forward(self, x):
        return torch.relu(self.lin(x)) * 2.0


def test_hpu_backend_compiles_in_eager_mode(sdk):
    sdk(lazy=False)
    _, _, _, ev = _modules()
    from habana_frameworks.torch.dynamo.compile_backend import backends

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _Tiny()
    compiled = torch.compile(model, backend="hpu_backend")
    x = torch.randn(3, 8, requires_grad=True)
    out = compiled(x)
    torch.testing.assert_close(out, model(x))
    out.sum().backward()
    assert model.lin.weight.grad is not None
    assert ev.count("compile") == 1
    (_, n_ops) = ev.events("compile")[0]
    assert n_ops >= 3
    assert backends.compile_log[0]["n_ops"] == n_ops
    torch._dynamo.reset()


def test_hpu_backend_refuses_lazy_mode(sdk):
    sdk(lazy=True)
    _, _, _, ev = _modules()
    torch._dynamo.reset()
    compiled = torch.compile(_Tiny(), backend="hpu_backend")
    with pytest.raises(RuntimeError, match="PT_HPU_LAZY_MODE=0"):
        compiled(torch.randn(2, 8))
    assert ev.count("compile") == 0
    torch._dynamo.reset()


# --------------------------------------------------------------------------- HPU graphs


def test_wrap_in_hpu_graph_capture_replay_per_shape(sdk):
    sdk(lazy=True)
    _, hthpu, _, ev = _modules()
    torch.manual_seed(0)
    ref = _Tiny().eval()
    model = _Tiny().eval()
    model.load_state_dict(ref.state_dict())
    wrapped = hthpu.wrap_in_hpu_graph(model)
    assert wrapped is model and callable(model.clear_cache)
    a, b, c = torch.randn(2, 8), torch.randn(2, 8), torch.randn(5, 8)
    with torch.no_grad():
        out_a = model(a)
        torch.testing.assert_close(out_a, ref(a))
        out_b = model(b)  # replay: same shape
        torch.testing.assert_close(out_b, ref(b))
        out_c = model(c)  # new shape: capture
        torch.testing.assert_close(out_c, ref(c))
    assert ev.kinds()[1:] == ["wrap_in_hpu_graph", "graph_capture", "graph_replay", "graph_capture"]
    cap1, rep1, cap2 = ev.events()[2:]
    assert cap1[1] == rep1[1] != cap2[1]
    assert cap1[1][0] == "_Tiny"
    # Real replay returns the capture's static output, refreshed in place.
    assert out_b is out_a
    model.clear_cache()
    with torch.no_grad():
        model(a)
    assert ev.kinds()[-1] == "graph_capture"


def test_wrap_in_hpu_graph_max_graphs_and_bypass(sdk):
    sdk(lazy=True)
    _, hthpu, _, ev = _modules()
    model = hthpu.wrap_in_hpu_graph(_Tiny().eval(), max_graphs=1)
    with torch.no_grad():
        model(torch.randn(1, 8))
        out = model(torch.randn(3, 8))
        model(torch.randn(1, 8), bypass_hpu_graphs=True)
    assert out.shape == (3, 4)
    assert ev.kinds()[-3:] == ["graph_capture", "graph_bypass", "graph_bypass"]


def test_wrap_in_hpu_graph_alias_off_and_eager_warning(sdk):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdk(lazy=False, extra_env={"FAKE_HPU_GRAPH_ALIAS_OUTPUTS": "0"})
    _, hthpu, _, ev = _modules()
    with pytest.warns(UserWarning, match="lazy-mode feature"):
        model = hthpu.wrap_in_hpu_graph(_Tiny().eval())
    with torch.no_grad():
        o1 = model(torch.zeros(2, 8))
        o2 = model(torch.ones(2, 8))
    assert o1 is not o2 and not torch.equal(o1, o2)
    assert ev.count("graph_replay") == 1


def test_module_cacher_only_caches_lazy_training_with_grad(sdk):
    sdk(lazy=True)
    _, hthpu, _, ev = _modules()
    torch.manual_seed(0)
    model = _Tiny()
    ref = _Tiny()
    ref.load_state_dict(model.state_dict())
    cached = hthpu.ModuleCacher(max_graphs=10)(model=model, inplace=True)
    assert cached is model
    x = torch.randn(4, 8)
    for _ in range(2):
        model.zero_grad()
        model(x).sum().backward()
    ref(x).sum().backward()
    torch.testing.assert_close(model.lin.weight.grad, ref.lin.weight.grad)
    assert ev.kinds()[1:] == ["module_cacher", "graph_capture", "graph_replay"]
    model.eval()
    with torch.no_grad():
        model(x)
    assert ev.count("graph_replay") == 1  # eval is not graphed


def test_module_cacher_does_not_cache_in_eager(sdk):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdk(lazy=False)
        _, hthpu, _, ev = _modules()
        model = hthpu.ModuleCacher()(model=_Tiny())
    model(torch.randn(2, 8)).sum().backward()
    assert ev.count("graph_capture") == 0


def test_raw_hpugraph_records(sdk):
    sdk(lazy=True)
    _, hthpu, _, ev = _modules()
    g = hthpu.HPUGraph()
    with pytest.raises(RuntimeError):
        g.replay()
    with hthpu.graph(g):
        pass
    g.replay()
    assert ev.kinds()[1:] == [
        "hpu_graph_capture_begin",
        "hpu_graph_capture_end",
        "hpu_graph_replay",
    ]


# --------------------------------------------------------------------------- hpex / hccl


def test_hpex_kernels(sdk):
    sdk(lazy=True)
    from habana_frameworks.torch.hpex.kernels import FusedSDPA
    from habana_frameworks.torch.hpex.normalization import FusedRMSNorm

    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    out = FusedSDPA.apply(q, k, v, None, 0.0, True, None, "None")
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, ref)
    x, w = torch.randn(2, 3, 8), torch.randn(8)
    y = FusedRMSNorm.apply(x, w, 1e-6)
    torch.testing.assert_close(y, x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w)
    with pytest.raises(RuntimeError, match="dtype"):
        FusedRMSNorm.apply(x.bfloat16(), w, 1e-6)


def test_fused_adamw(sdk):
    sdk(lazy=True)
    _, _, _, ev = _modules()
    from habana_frameworks.torch.hpex.optimizers import FusedAdamW

    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="empty parameter group"):
        FusedAdamW([{"params": [p]}, {"params": []}])
    opt = FusedAdamW([p], lr=0.1)
    assert isinstance(opt, torch.optim.Optimizer)
    p.grad = torch.ones(3)
    opt.step()
    # first step: m = 0.1, v = 0.001; step = lr * sqrt(bc2)/bc1; update = m/(sqrt(v)+eps)
    expected = 1.0 - 0.1 * (0.001**0.5 / 0.1) * (0.1 / (0.001**0.5 + 1e-6))
    torch.testing.assert_close(p.detach(), torch.full((3,), expected))
    assert ev.count("mark_step") == 2  # one per param group + one at the end (lazy)


def test_hccl_import_registers_nothing(sdk):
    sdk(lazy=True)
    import habana_frameworks.torch.distributed.hccl as hccl
    import torch.distributed as dist

    assert hccl.registered_as_gloo is False
    if dist.is_available():
        assert not hasattr(dist.Backend, "HCCL")


# --------------------------------------------------------------------------- plain install path


@pytest.mark.slow
def test_plain_import_via_pythonpath_in_subprocess():
    """The "installed" path: PYTHONPATH + env, no loader; hpu_backend registered on the
    later (deferred) import of torch._dynamo; re-importing core does not double-register."""
    code = (
        "import sys, torch, habana_frameworks.torch as ht, habana_frameworks.torch.core\n"
        "from habana_frameworks.torch.utils.internal import is_lazy\n"
        "assert 'torch._dynamo' not in sys.modules\n"
        "assert torch.hpu.is_available() and not is_lazy(), is_lazy()\n"
        "import importlib, torch._dynamo\n"
        "assert 'hpu_backend' in torch._dynamo.list_backends(exclude_tags=())\n"
        "importlib.reload(habana_frameworks.torch.core)\n"
        "importlib.reload(habana_frameworks.torch.dynamo.compile_backend.backends)\n"
        "print(ht.__version__, torch.hpu.get_device_name())\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [FAKE_SDK_DIR, env.get("PYTHONPATH")]))
    env.pop("PT_HPU_LAZY_MODE", None)
    env["FAKE_SDK_VERSION"] = "1.21.0"
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["1.21.0", "GAUDI2"]
