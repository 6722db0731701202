"""What the trace backend records, its NaN/Inf stop, and tracing other backends."""

from __future__ import annotations

import json

import paca
import pytest
import torch
from torch import nn

from paca_example_backend import NonFiniteError, TraceBackend, traced


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def _train(backend: str, steps: int = 3) -> tuple[paca.PacaModel, list[float]]:
    model = paca.wrap(_model(), paca.PacaConfig(r=4, target_modules=["0", "2"]), backend=backend)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return model, losses


def test_registered_through_its_entry_point_and_never_auto_selected():
    infos = {i.name: i for i in paca.list_backends()}
    assert "trace" in infos, "not installed: pip install -e plugins/paca-example-backend"
    info = infos["trace"]
    assert info.distribution == "paca-example-backend" and info.available
    assert info.priority is None
    assert paca.get_backend().name != "trace"


def test_records_every_call_per_step_and_computes_like_cpu():
    _, want = _train("cpu")
    if "trace" not in {i.name for i in paca.list_backends()}:
        pytest.fail("not installed: pip install -e plugins/paca-example-backend", pytrace=False)
    backend = paca.use_backend("trace")
    assert isinstance(backend, TraceBackend)
    backend.trace.clear()  # the process's one "trace" instance may have run before
    _, got = _train("trace")
    assert got == want  # the same CPU arithmetic, only observed
    trace = backend.trace
    assert trace.step == 3 and trace.backward_passes == 3
    # per step, per PaCA layer: one fused forward and one fused backward (the first layer's
    # backward is asked for d(delta) only: its input is data)
    assert trace.counts(step=0) == {"linear_forward": 2, "linear_backward": 2}
    assert trace.counts()["linear_forward"] == 6
    first = trace.events[0]
    assert first.call == "linear_forward"
    assert first.shapes[:2] == ((5, 16), (32, 16))  # x, then the (out, in) weight
    assert "linear_backward" in trace.summary() and "optimizer steps: 3" in trace.summary()
    json.dumps(trace.to_records())


def test_merge_writes_r_columns_per_layer_through_write_columns():
    """The kind of question the trace answers: what does a merge write?"""
    backend = TraceBackend()
    model = paca.wrap(_model(), paca.PacaConfig(r=4, target_modules=["0", "2"]), backend=backend)
    model.merge()
    writes = [e for e in backend.trace.events if e.call == "write_columns"]
    assert len(writes) == 2  # one per layer, r columns each: never the whole weight
    assert [e.shapes[2] for e in writes] == [(32, 4), (8, 4)]
    model.unmerge()
    assert backend.trace.counts()["write_columns"] == 4


def test_gradient_accumulation_shows_one_step_per_optimizer_step():
    backend = TraceBackend()
    model = paca.wrap(_model(), paca.PacaConfig(r=4, target_modules=["0", "2"]), backend=backend)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(5, 16)
    for _ in range(2):
        for _ in range(2):  # two micro-batches per optimizer step
            model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert backend.trace.step == 2 and backend.trace.backward_passes == 4
    assert backend.trace.counts(step=1) == {"linear_forward": 4, "linear_backward": 4}


def test_bounded_log_keeps_totals():
    backend = TraceBackend(max_events=4)
    x = torch.randn(3, 8)
    for _ in range(5):
        backend.linear(x, torch.randn(2, 8), None)
    assert len(backend.trace.events) == 4 and backend.trace.dropped == 1
    assert backend.trace.counts() == {"linear": 5}
    backend.trace.clear()
    assert backend.trace.counts() == {} and backend.trace.step == 0


def test_check_finite_names_the_first_call_that_overflows():
    backend = TraceBackend(check_finite=True)
    x = torch.full((2, 40), 300.0, dtype=torch.float16)
    w = torch.full((3, 40), 300.0, dtype=torch.float16)  # 40 * 9e4 overflows fp16
    with pytest.raises(NonFiniteError, match=r"linear produced NaN/Inf.*inputs were finite"):
        backend.linear(x, w, None)
    x[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="inputs were already non-finite"):
        backend.gather(x, torch.tensor([0, 1]))


def test_check_finite_from_the_environment(monkeypatch):
    monkeypatch.setenv("PACA_TRACE_CHECK_FINITE", "1")
    assert TraceBackend().check_finite
    monkeypatch.setenv("PACA_TRACE_CHECK_FINITE", "0")
    assert not TraceBackend().check_finite


def test_traced_twin_of_another_backend():
    cls = traced("cpu")
    assert cls.name == "trace-cpu" and cls.device_type == "cpu" and cls.is_available()
    paca.register_backend(cls)
    backend = paca.use_backend("trace-cpu")
    backend.gather(torch.randn(2, 5), torch.tensor([1, 3]))
    assert backend.trace.counts() == {"gather": 1}
    assert backend.describe()["inner"]["backend"] == "cpu"
    with pytest.raises(paca.UnknownBackendError, match="cannot trace unknown backend 'tpu'"):
        traced("tpu")
    with pytest.raises(TypeError, match="already traces"):
        traced(TraceBackend)


def test_traced_unavailable_backend_says_why():
    class Missing(paca.Backend):
        name = "missing"
        device_type = "cpu"

        @classmethod
        def is_available(cls):
            return False

        @classmethod
        def unavailable_reason(cls):
            return "no device attached"

    cls = traced(Missing)
    assert not cls.is_available()
    assert (
        cls.unavailable_reason()
        == "the traced backend 'missing' is unavailable: no device attached"
    )
