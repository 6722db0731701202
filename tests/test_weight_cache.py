"""The per-optimizer-step effective-weight cache equals the per-call path, exactly.

The mechanism is device-agnostic (version counters, storage pointers and an optimizer
post-step hook), so it is proven here on CPU: training with the cache gives bit-identical
losses, gradients and deltas to training without it, over several optimizer steps with
gradient accumulation, while writing each layer's columns once per optimizer step.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import paca
from paca import weight_cache


@pytest.fixture(autouse=True)
def _clean_cache(monkeypatch):
    monkeypatch.delenv(weight_cache.POLICY_ENV, raising=False)
    weight_cache.set_enabled(None)
    weight_cache.clear()
    weight_cache.reset_stats()
    yield
    weight_cache.set_enabled(None)
    weight_cache.clear()


def _model(dtype: torch.dtype = torch.float32) -> paca.PacaModel:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(24, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 8)
    )
    net = net.to(dtype)
    return paca.wrap(net, paca.PacaConfig(r=4, target_modules=["0", "2", "4"]), backend="cpu")


def _batches(n: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(6, 24, generator=g).to(dtype), torch.randn(6, 8, generator=g))
        for _ in range(n)
    ]


def _train(model, batches, cached: bool, accumulate: int, autocast: bool = False, **opt_kw):
    """Run the loop; return per-micro-batch losses, per-step grads and final deltas."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, **opt_kw)
    losses, grads = [], []
    with weight_cache.enabled(cached):
        for i, (x, y) in enumerate(batches):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = model(x)
            loss = (out.float() - y).pow(2).mean() / accumulate
            loss.backward()
            losses.append(loss.detach())
            if (i + 1) % accumulate == 0:
                grads.append([p.grad.clone() for p in params])
                opt.step()
                opt.zero_grad()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            final = model(batches[0][0])  # an eval forward after the last step must see it
    return losses, grads, [p.detach().clone() for p in params], final


@pytest.mark.parametrize(
    ("dtype", "fused", "autocast"),
    [(torch.float32, False, False), (torch.bfloat16, True, False), (torch.float32, False, True)],
    ids=["fp32-foreach-adamw", "bf16-fused-adamw", "fp32-weights-bf16-autocast"],
)
def test_cached_training_equals_per_call_training(dtype, fused, autocast):
    base = _model(dtype)
    cached_model = copy.deepcopy(base)
    batches = _batches(8, dtype)
    kw = {"fused": True} if fused else {}
    want = _train(base, batches, cached=False, accumulate=2, autocast=autocast, **kw)
    weight_cache.reset_stats()
    got = _train(cached_model, batches, cached=True, accumulate=2, autocast=autocast, **kw)
    for a, b in zip(got[0], want[0], strict=True):
        assert torch.equal(a, b)
    for ga, gb in zip(got[1], want[1], strict=True):
        assert all(torch.equal(x, y) for x, y in zip(ga, gb, strict=True))
    assert all(torch.equal(x, y) for x, y in zip(got[2], want[2], strict=True))
    assert torch.equal(got[3], want[3])
    # 3 layers, 9 forwards each (8 training + 1 eval): built once, columns written once per
    # optimizer step (4 steps), reused by the other 4 forwards. Backward reuses its forward's
    # tensor; the per-call path would have rebuilt the whole weight 9 + 8 times per layer.
    s = weight_cache.stats()
    assert (s.rebuilds, s.column_writes, s.hits) == (3, 3 * 4, 3 * 4)
    if autocast:  # the cache holds the bf16 compute copy: half the bytes, no cast per call
        assert weight_cache.cached_bytes() == sum(
            layer.base_layer.weight.numel() * 2 for _, layer in cached_model.paca_layers()
        )


def test_fused_adamw_does_not_bump_versions_but_the_cache_still_sees_the_step():
    # The reason for the optimizer hook: fused AdamW writes parameters without bumping
    # their version counters, so version counters alone would serve stale columns.
    p = nn.Parameter(torch.randn(4, 4))
    opt = torch.optim.AdamW([p], fused=True)
    p.grad = torch.randn(4, 4)
    before = p._version
    opt.step()
    assert p._version == before, "torch changed: fused AdamW now bumps versions"
    model = _model()
    layer = model.model[0]
    x = torch.randn(3, 24)
    with weight_cache.enabled():
        model(x).sum().backward()
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], fused=True)
        opt.step()
        got = model(x)
    with weight_cache.enabled(False):
        want = model(x)
    assert torch.equal(got, want)
    assert layer.paca_delta["default"].abs().sum() > 0


def test_manual_in_place_edits_are_seen():
    model = _model()
    x = torch.randn(3, 24)
    with weight_cache.enabled():
        model(x)
        with torch.no_grad():
            model.model[2].paca_delta["default"].add_(0.5)  # bumps the version counter
        got = model(x)
        with torch.no_grad():
            model.model[2].paca_delta["default"].data.mul_(2)  # invisible to version counters
        weight_cache.invalidate()  # ... so say so
        got2 = model(x)
    with weight_cache.enabled(False):
        want2 = model(x)
        with torch.no_grad():
            model.model[2].paca_delta["default"].div_(2)
        want = model(x)
    assert torch.equal(got, want) and torch.equal(got2, want2)


def test_base_weight_is_never_written_and_unload_is_bit_exact():
    model = _model(torch.bfloat16)
    originals = {n: layer.base_layer.weight.detach().clone() for n, layer in model.paca_layers()}
    _train(model, _batches(4, torch.bfloat16), cached=True, accumulate=1)
    for n, layer in model.paca_layers():
        assert torch.equal(layer.base_layer.weight, originals[n])
    net = model.unload()
    assert torch.equal(net[0].weight, originals["0"])


def test_weight_changes_rebuild_the_cache():
    model = _model()
    layer = model.model[0]
    x = torch.randn(3, 24)
    with torch.no_grad():
        layer.paca_delta["default"].normal_(0, 0.1)
    with weight_cache.enabled():
        model(x)
        with torch.no_grad():
            layer.base_layer.weight.mul_(1.5)  # e.g. a reloaded base checkpoint
        got = model(x)
    with weight_cache.enabled(False):
        want = model(x)
    assert torch.equal(got, want)
    assert weight_cache.stats().rebuilds == 3 + 1


def test_merge_and_unmerge_with_the_cache_on():
    model = _model()
    x = torch.randn(3, 24)
    for _, layer in model.paca_layers():
        with torch.no_grad():
            layer.paca_delta["default"].normal_(0, 0.1)
    with weight_cache.enabled():
        before = model(x)
        model.merge()
        merged = model(x)
        model.unmerge()
        after = model(x)
    torch.testing.assert_close(merged, before, rtol=1e-5, atol=1e-6)
    assert torch.equal(after, before)


def test_backward_after_the_delta_changed_is_refused():
    model = _model()
    x = torch.randn(3, 24)
    with weight_cache.enabled():
        y = model(x)
        model.model[0].paca_delta["default"].data.add_(1.0)  # as a fused optimizer would
        weight_cache.invalidate()
        model(x)  # rewrites the cached columns the first forward used
        with pytest.raises(RuntimeError, match="changed between forward and backward"):
            y.sum().backward()


def test_gradient_checkpointing_uses_the_cache_and_matches():
    from torch.utils.checkpoint import checkpoint

    model = _model()
    ref = copy.deepcopy(model)
    x = torch.randn(5, 24, requires_grad=True)
    with weight_cache.enabled():
        checkpoint(model, x, use_reentrant=False).sum().backward()
    ref(x.detach()).sum().backward()
    for (_, a), (_, b) in zip(model.paca_layers(), ref.paca_layers(), strict=True):
        assert torch.equal(a.paca_delta["default"].grad, b.paca_delta["default"].grad)


def test_bypassed_while_compiling(monkeypatch):
    model = _model()
    layer = model.model[0]
    args = (
        layer.backend,
        layer.base_layer.weight,
        layer.paca_delta["default"],
        layer.paca_idx["default"],
    )
    with weight_cache.enabled():
        assert weight_cache.lookup(*args) is not None
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert weight_cache.lookup(*args) is None


def test_policy_switches(monkeypatch):
    class Opted:
        cache_effective_weight = True

    assert not weight_cache.is_enabled(None)
    assert weight_cache.is_enabled(Opted())
    monkeypatch.setenv(weight_cache.POLICY_ENV, "call")
    assert not weight_cache.is_enabled(Opted())
    monkeypatch.setenv(weight_cache.POLICY_ENV, "step")
    assert weight_cache.is_enabled(None)
    weight_cache.set_enabled(False)
    assert not weight_cache.is_enabled(None)
    with weight_cache.enabled(True):
        assert weight_cache.is_enabled(None)
    monkeypatch.setenv(weight_cache.POLICY_ENV, "sometimes")
    weight_cache.set_enabled(None)
    with pytest.raises(ValueError, match="PACA_WEIGHT_CACHE='sometimes'"):
        weight_cache.is_enabled(None)


def test_memory_cost_is_one_weight_copy_per_layer_and_clear_frees_it():
    model = _model()
    with weight_cache.enabled():
        model(torch.randn(2, 24))
    expected = sum(
        layer.base_layer.weight.numel() * layer.base_layer.weight.element_size()
        for _, layer in model.paca_layers()
    )
    assert weight_cache.cached_bytes() == expected
    weight_cache.clear()
    assert weight_cache.cached_bytes() == 0
