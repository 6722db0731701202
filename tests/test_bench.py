"""The benchmark suite: exact memory and write-traffic accounting, the search/fit and
paired-ratio maths, the JSON schema.

Timings are never asserted (the machine is shared); activation and byte figures are.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from paca.bench.config import BenchConfig, preset
from paca.bench.measure import paired_ratios, summarize
from paca.bench.memory import (
    AllocationTracker,
    SavedActivationCounter,
    model_tensors,
    optimizer_state_bytes,
    saved_activation_bytes,
    unique_storage_bytes,
)
from paca.bench.runner import check_targets, paired, ratios, traffic_vs_frozen
from paca.bench.seqlen import computed_max_seq, fit_linear, max_seq_from_fit, searched_max_seq


# --------------------------------------------------------------- memory accounting
def test_allocation_tracker_counts_new_storages_only() -> None:
    with AllocationTracker() as tr:
        a = torch.empty(1000)  # 4000 B
        b = torch.empty(500)  # 2000 B
        view = a.view(10, 100)  # a view: no new memory
        a.add_(1)  # in place: no new memory
        del a, view  # frees 4000 B
        c = torch.ones(250)  # 1000 B
    assert (tr.current, tr.peak, tr.allocations) == (3000, 6000, 3)
    del b, c


def test_allocation_tracker_sees_backward_and_frees() -> None:
    w = torch.randn(64, 32, requires_grad=True)
    x = torch.randn(16, 64)
    with AllocationTracker() as tr:
        loss = (x @ w).sum()
        loss.backward()
        del loss
    assert w.grad is not None
    assert tr.current == w.grad.numel() * 4  # only the new gradient stays alive
    # the (16, 32) product is freed by then; the gradient and the scalar loss coexist
    assert w.grad.numel() * 4 + 4 <= tr.peak < w.grad.numel() * 4 + 16 * 32 * 4


def test_saved_counter_excludes_parameters_and_counts_shared_storage_once() -> None:
    lin1, lin2 = nn.Linear(8, 4), nn.Linear(8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    counter = SavedActivationCounter(
        [*model_tensors(lin1), *model_tensors(lin2)], {"a": lin1, "b": lin2}
    )
    with counter.count():
        out = lin1(x) + lin2(x)  # both save x (their weights are trainable): one storage
        out.tanh().sum()
    x_bytes = 3 * 8 * 4
    assert counter.per_layer["a"].saved_bytes == x_bytes
    assert counter.per_layer["b"].saved_bytes == 0  # same storage, counted once
    assert counter.per_layer["a"].input_bytes == x_bytes
    assert counter.per_layer["a"].in_features == 8
    assert counter.other_bytes == 3 * 4 * 4  # tanh saves its output
    assert counter.total_bytes == x_bytes + 3 * 4 * 4


def test_saved_activation_bytes_of_a_paca_layer_is_r_over_in_of_its_input() -> None:
    import paca

    model = paca.wrap(
        nn.Sequential(nn.Linear(64, 32)), paca.PacaConfig(r=4, target_modules=["0"]), backend="cpu"
    )
    x = torch.randn(5, 7, 64, requires_grad=True)
    y, counter = saved_activation_bytes(lambda: model(x), model_tensors(model), keep=True)
    assert counter.total_bytes == 5 * 7 * 4 * 4  # x[..., idx]: r of the 64 channels
    assert [tuple(t.shape) for t in counter.saved] == [(5, 7, 4)]
    y.sum().backward()  # what was saved is still usable
    plain = nn.Linear(64, 32)
    _, counter = saved_activation_bytes(lambda: plain(x), model_tensors(plain))
    assert counter.total_bytes == x.numel() * 4 and counter.saved == []  # keep=False


def test_optimizer_state_and_unique_bytes() -> None:
    p = nn.Parameter(torch.randn(10, 10))
    opt = torch.optim.AdamW([p])
    assert optimizer_state_bytes(opt) == 0
    p.grad = torch.ones_like(p)
    opt.step()
    # exp_avg + exp_avg_sq (400 B each) + the scalar step (4 B float32)
    assert optimizer_state_bytes(opt) == 2 * 400 + 4
    t = torch.zeros(10)
    assert unique_storage_bytes([t, t[:5], t.view(2, 5)]) == 40
    assert optimizer_state_bytes(None) == 0


# ------------------------------------------------------------ max sequence length
def test_fit_and_computed_max_seq_are_exact_for_linear_memory() -> None:
    a, b, worst = fit_linear([100, 200, 400], [1100.0, 2100.0, 4100.0])
    assert (a, b, worst) == pytest.approx((100.0, 10.0, 0.0))
    assert max_seq_from_fit(100.0, 10.0, budget=10_100, batch=2) == 500
    probes = [
        {
            "tokens": t,
            "peak_fwd_bwd_bytes": 1000 + 3 * t,
            "peak_forward_bytes": 900 + 3 * t,
            "peak_optimizer_bytes": 900,
        }
        for t in (64, 128)
    ]
    got = computed_max_seq(probes, budget=1000 + 3 * 2 * 700, batch=2)
    assert got["fit_worst_relative_residual"] == 0.0
    assert got["max_seq"] == 700 and got["bytes_per_token"] == pytest.approx(3.0)
    assert computed_max_seq(probes, budget=800, batch=2)["max_seq"] == 0  # optimizer too big
    with pytest.raises(ValueError, match="two or more lengths"):
        fit_linear([5, 5], [1.0, 2.0])
    with pytest.raises(ValueError, match="two or more lengths"):
        computed_max_seq(probes[:1], budget=10**6, batch=1)


def test_computed_max_seq_takes_the_slope_where_activations_dominate() -> None:
    # full fine-tuning: a fixed 5000 B (weight gradients) sets the peak at short lengths
    probes = [
        {"tokens": t, "peak_fwd_bwd_bytes": max(5000, 1000 + 10 * t), "peak_optimizer_bytes": 0}
        for t in (128, 256, 512, 1024)
    ]
    got = computed_max_seq(probes, budget=1000 + 10 * 4000, batch=1)
    assert got["bytes_per_token"] == pytest.approx(10.0) and got["max_seq"] == 4000
    assert got["fit_worst_relative_residual"] > 0.5  # the short probes are off the line
    # ... and when even the longest backward probes sit in the gradient-bound regime,
    # the forward peak (all activations alive, linear in tokens) is the limit
    for p in probes:
        p["peak_fwd_bwd_bytes"] = max(20_000, 1000 + 10 * p["tokens"])
        p["peak_forward_bytes"] = 1000 + 10 * p["tokens"]
    got = computed_max_seq(probes, budget=1000 + 10 * 4000, batch=1)
    assert got["limiting_phase"] == "forward" and got["max_seq"] == 4000
    with pytest.raises(ValueError, match="did not grow"):
        max_seq_from_fit(0.0, 0.0, 10, 1)


@pytest.mark.parametrize("limit", [1, 63, 64, 100, 777, 4096, 5000])
def test_searched_max_seq_finds_the_largest_fitting_multiple(limit: int) -> None:
    calls: list[int] = []

    def fits(n: int) -> bool:
        calls.append(n)
        return n <= limit

    got = searched_max_seq(fits, start=512, granularity=64, upper=1 << 16)
    assert got["max_seq"] == (limit // 64) * 64
    assert len(calls) == len(set(calls)) < 20


def test_searched_max_seq_reports_the_cap() -> None:
    got = searched_max_seq(lambda n: True, start=64, granularity=64, upper=1024)
    assert got["max_seq"] == 1024 and got["capped_at"] == 1024


# ----------------------------------------------------------------- config, targets
def test_config_rejects_bad_values_with_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown benchmark method"):
        BenchConfig(methods=("paca", "dora"))
    with pytest.raises(ValueError, match="unknown benchmark preset"):
        preset("huge")
    with pytest.raises(ValueError, match="dtype"):
        BenchConfig(dtype="int8")
    assert preset("default").to_dict()["seq_points"] == [128, 256, 512]


def _fake_methods(**per: dict[str, float]) -> dict[str, Any]:
    return {
        name: {
            "step_time_s": {"median": v["t"], "tokens_per_s": 1 / v["t"]},
            "memory": {
                "saved_activation_bytes": v["act"],
                "peak_bytes": v["act"],
                "optimizer_state_bytes": 0,
            },
            "max_seq_len": {"max_seq": v["seq"]},
        }
        for name, v in per.items()
    }


def test_targets_and_ratios() -> None:
    methods = _fake_methods(
        paca={"t": 0.81, "act": 75.0, "seq": 130},
        lora={"t": 1.0, "act": 100.0, "seq": 100},
        frozen={"t": 0.8, "act": 74.0, "seq": 131},
    )
    r = ratios(methods, "lora")
    assert r["paca"]["saved_activation_bytes"] == pytest.approx(0.75)
    assert r["lora"]["step_time_s"] == 1.0
    methods["paca"]["layer_traffic"] = {"worst_extra_fraction": 0.02}
    met = {(t["metric"], t["vs"]): t["met"] for t in check_targets(methods)}
    assert met == {
        ("saved_activation_bytes", "frozen"): True,
        ("saved_activation_bytes", "lora"): True,
        ("step_time_s", "lora"): True,
        ("step_time_s", "frozen"): True,  # 0.81 / 0.8 = 1.0125
        ("max_seq", "lora"): True,
        ("extra_write_fraction", "frozen"): True,
    }
    # the paired per-round median, when there is one, decides the step-time targets
    pairs = {"paca/frozen": {"median": 1.05}, "paca/lora": {"median": 0.9}}
    got = {(t["metric"], t["vs"]): t for t in check_targets(methods, pairs)}
    assert got[("step_time_s", "frozen")]["measured"] == 1.05
    assert got[("step_time_s", "frozen")]["met"] is False
    assert got[("step_time_s", "lora")]["measured"] == 0.9
    methods["paca"]["step_time_s"]["median"] = 1.1
    methods["paca"]["memory"]["saved_activation_bytes"] = 80.0
    methods["paca"]["layer_traffic"]["worst_extra_fraction"] = 1.0  # a weight copy per step
    met = {(t["metric"], t["vs"]): t["met"] for t in check_targets(methods)}
    assert not met[("step_time_s", "lora")] and not met[("saved_activation_bytes", "lora")]
    assert not met[("saved_activation_bytes", "frozen")]  # 80/74 is 8% off the bound
    assert met[("extra_write_fraction", "frozen")] is False
    del methods["paca"]["layer_traffic"]
    assert check_targets(methods)[-1]["met"] is None  # traffic not counted: not measured
    alone = _fake_methods(paca={"t": 0.9, "act": 75.0, "seq": 130})
    assert all(t["met"] is None for t in check_targets(alone))  # nothing to compare with


def test_paired_ratios_are_taken_within_rounds() -> None:
    # PaCA is 2% slower than the bound in every round, while load doubles some rounds
    frozen = [1.0, 2.0, 1.0, 3.0, 1.0]
    paca = [1.02 * t for t in frozen]
    got = paired_ratios(paca, frozen)
    assert got["per_round"] == pytest.approx([1.02] * 5)
    assert got["median"] == pytest.approx(1.02) and got["iqr"] == pytest.approx(0.0)
    assert got["rounds"] == 5 and got["rounds_below_1"] == 0
    assert got["ratio_of_minima"] == pytest.approx(1.02)
    assert paired_ratios([], []) is None
    methods = {
        name: {"step_time_s": {"samples": samples}}
        for name, samples in (("paca", paca), ("frozen", frozen), ("lora", [2.0] * 5))
    }
    pairs = paired(methods)
    assert set(pairs) == {"paca/frozen", "paca/lora", "lora/frozen"}
    assert pairs["lora/frozen"]["per_round"] == pytest.approx([2.0, 1.0, 2.0, 2 / 3, 2.0])


def test_write_traffic_beyond_the_frozen_bound() -> None:
    def traffic(fwd: int, bwd: int, opt: int) -> dict[str, int]:
        return {
            "forward_bytes": fwd,
            "backward_bytes": bwd,
            "optimizer_bytes": opt,
            "total_bytes": fwd + bwd + opt,
        }

    methods = {
        "paca": {"write_traffic": traffic(1010, 2020, 30), "adapted_weight_bytes": 1000},
        "lora": {"write_traffic": traffic(1500, 2500, 60), "adapted_weight_bytes": 1000},
        "frozen": {"write_traffic": traffic(1000, 2000, 0), "adapted_weight_bytes": 1000},
        "full": {"adapted_weight_bytes": 1000},  # run with --no-traffic: left out
    }
    extra = traffic_vs_frozen(methods)
    assert set(extra) == {"paca", "lora", "frozen"}
    assert extra["paca"]["extra_fwd_bwd_bytes"] == 30
    assert extra["paca"]["extra_fwd_bwd_fraction"] == pytest.approx(0.03)
    assert extra["paca"]["extra_step_fraction"] == pytest.approx(0.06)
    assert extra["lora"]["extra_fwd_bwd_fraction"] == pytest.approx(1.0)
    assert extra["frozen"]["extra_step_bytes"] == 0
    assert traffic_vs_frozen({"paca": methods["paca"]}) == {}  # no bound measured


def test_summarize_median_and_spread() -> None:
    s = summarize([3.0, 1.0, 2.0, 10.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.5, 1.0, 10.0, 4)
    assert s["samples"] == [3.0, 1.0, 2.0, 10.0]  # raw order kept


def test_cli_options_map_to_config() -> None:
    from paca.cli.bench import _overrides
    from paca.cli.main import build_parser

    args = build_parser().parse_args(
        ["bench", "--quick", "--methods", "paca,lora", "--r", "4", "--budget-gib", "2"]
    )
    cfg = preset("quick", **_overrides(args))
    assert cfg.methods == ("paca", "lora") and cfg.r == 4 and cfg.budget_bytes == 2 * 1024**3
    assert cfg.hidden == 256 and cfg.traffic is True
    args = build_parser().parse_args(["bench", "--no-traffic", "--repeats", "30"])
    cfg = preset("default", **_overrides(args))
    assert cfg.traffic is False and cfg.repeats == 30


def test_one_builder_lora_alpha_equals_r_and_frozen_reaches_the_input() -> None:
    from paca_cpu import CPUBackend

    from paca.bench.methods import apply_method

    def stack() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 16, bias=False), nn.Linear(16, 16, bias=False))

    backend = CPUBackend()
    lora = apply_method("lora", stack(), r=4, targets=["0", "1"], backend=backend)
    scalings = [m.scaling["default"] for m in lora.modules() if hasattr(m, "scaling")]
    assert scalings == [1.0, 1.0]  # lora_alpha = r, as the experiment runner's default
    frozen = apply_method("frozen", stack(), r=4, targets=["0", "1"], backend=backend)
    assert not any(p.requires_grad for p in frozen.parameters())
    pm = apply_method("paca", stack(), r=4, targets=["0", "1"], backend=backend)
    assert sum(p.numel() for p in pm.parameters() if p.requires_grad) == 2 * 16 * 4
    with pytest.raises(ValueError, match="unknown benchmark method"):
        apply_method("dora", stack(), r=4, targets=["0"], backend=backend)


# --------------------------------------------------------- the whole run, tiny model
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    from paca.cli.main import main

    out = tmp_path_factory.mktemp("bench")
    assert main(["bench", "--preset", "tiny", "--out", str(out), "--no-progress"]) == 0
    return json.loads((out / "bench.json").read_text()), out


@pytest.mark.slow
def test_tiny_run_writes_json_markdown_and_chart(tiny_run: tuple[dict[str, Any], Path]) -> None:
    result, out = tiny_run
    assert result["schema"] == "paca-bench/1"
    env = result["environment"]
    for key in ("python", "cpu", "torch_threads", "versions", "backend", "timestamp_utc"):
        assert key in env
    assert env["versions"]["torch"] == torch.__version__.split("+")[0] or env["versions"]["torch"]
    assert result["config"]["seed"] == 0 and result["config"]["dtype"] == "float32"
    assert list(result["methods"]) == ["paca", "lora", "full", "frozen"]
    cfg = result["config"]
    for m in result["methods"].values():
        t = m["step_time_s"]
        assert len(t["samples"]) == cfg["repeats"] and len(t["warmup_samples"]) == cfg["warmup"]
        assert t["min"] <= t["median"] <= t["max"]
        assert t["tokens_per_s"] == pytest.approx(cfg["batch"] * cfg["seq"] / t["median"])
        mem = m["memory"]
        assert mem["seq"] == cfg["seq"] and mem["peak_bytes"] >= mem["static_bytes"] > 0
        assert [p["seq"] for p in m["memory_probes"]] == cfg["seq_points"]
        assert m["max_seq_len"]["how"] == "computed" and m["max_seq_len"]["max_seq"] > 0
    assert set(result["ratios"]["vs_lora"]) == set(result["methods"])
    assert result["ratios"]["vs_frozen"]["frozen"]["saved_activation_bytes"] == 1.0
    assert len(result["targets"]) == 6
    assert set(result["paired"]) == {"paca/frozen", "paca/lora", "lora/frozen"}
    assert result["paired"]["paca/frozen"]["rounds"] == cfg["repeats"]
    md = (out / "bench.md").read_text()
    assert "| PaCA |" in md and "Ratios to LoRA" in md and "Ratios to the frozen bound" in md
    assert "| PaCA / Frozen (bound) |" in md and "Write traffic" in md
    assert "cache" not in md.lower() and "cache" not in json.dumps(result["environment"]).lower()
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_tiny_run_write_traffic_is_counted_per_phase(
    tiny_run: tuple[dict[str, Any], Path],
) -> None:
    result, _ = tiny_run
    cfg = result["config"]
    methods = result["methods"]
    h, i, n = cfg["hidden"], cfg["intermediate"], cfg["layers"]
    kv = h * cfg["kv_heads"] // cfg["heads"]
    weights = 4 * n * (2 * h * h + 2 * h * kv + 3 * h * i)  # q,o + k,v + gate,up,down (fp32)
    for name, m in methods.items():
        t = m["write_traffic"]
        assert m["adapted_weight_bytes"] == weights, name
        assert t["total_bytes"] == t["forward_bytes"] + t["backward_bytes"] + t["optimizer_bytes"]
        assert sum(t["by_op"].values()) == t["total_bytes"], name
        assert t["tokens"] == cfg["batch"] * cfg["seq"]
    assert methods["frozen"]["write_traffic"]["optimizer_bytes"] == 0
    # AdamW writes at least the parameter and both moments of every trained element
    for name in ("paca", "lora", "full"):
        trained = 4 * methods[name]["trainable_params"]
        assert methods[name]["write_traffic"]["optimizer_bytes"] >= 3 * trained, name
    extra = result["write_traffic_vs_frozen"]
    assert extra["frozen"]["extra_step_bytes"] == 0
    # no weight-sized tensor per call: far below one copy of the adapted weights (PaCA
    # needs no gradient of the first layer's input, so it may even write less than the bound)
    assert extra["paca"]["extra_fwd_bwd_fraction"] <= 0.1
    assert extra["paca"]["extra_step_bytes"] < extra["lora"]["extra_step_bytes"]
    assert extra["lora"]["extra_step_bytes"] < extra["full"]["extra_step_bytes"]
    # per layer, as the op's bound is stated: each shape once, counted against its base
    tokens = cfg["batch"] * cfg["seq"]
    for name in ("paca", "lora"):
        per = methods[name]["layer_traffic"]
        assert per["input_lead_shape"] == [cfg["batch"], cfg["seq"]]
        assert sum(s["layers"] for s in per["shapes"].values()) == n * len(cfg["targets"])
        assert sum(s["weight_bytes"] * s["layers"] for s in per["shapes"].values()) == weights
    paca_layers = methods["paca"]["layer_traffic"]["shapes"]
    by_out: dict[int, set[int]] = {}
    for key, s in paca_layers.items():
        in_f, out_f = map(int, key.split("->"))
        # the saved x[..., idx] and d(delta) alone; the swap/decomposition adds a few more
        assert s["extra_bytes"] >= 4 * cfg["r"] * (tokens + out_f), key
        by_out.setdefault(out_f, set()).add(s["extra_bytes"])
    # nothing of size out x in is written: the extra does not grow with in (64->64 and
    # 176->64 write the same), while a copy of W would
    assert by_out[h] and all(len(v) == 1 for v in by_out.values()), paca_layers
    assert len([k for k in paca_layers if k.endswith(f"->{h}")]) == 2
    worst = methods["paca"]["layer_traffic"]["worst_extra_fraction"]
    assert worst == max(s["extra_fraction"] for s in paca_layers.values())
    assert (
        methods["lora"]["layer_traffic"]["extra_bytes"]
        > methods["paca"]["layer_traffic"]["extra_bytes"]
    )
    target = next(t for t in result["targets"] if t["metric"] == "extra_write_fraction")
    assert target["measured"] == worst


@pytest.mark.slow
def test_write_traffic_of_a_step_is_deterministic() -> None:
    from paca_cpu import CPUBackend

    from paca.bench.methods import build_method, make_batch, train_step
    from paca.bench.traffic import step_traffic

    cfg = preset("tiny")
    ids = make_batch(cfg, cfg.seq, torch.device("cpu"))
    setup = build_method("paca", cfg, CPUBackend())
    train_step(setup, ids)  # steady state: AdamW's moments exist
    first, second = step_traffic(setup, ids), step_traffic(setup, ids)
    assert first["total_bytes"] == second["total_bytes"] > 0
    assert first["by_phase_op"] == second["by_phase_op"]
    # what PaCA's columns cost: the gather and the (out x r) d(delta) products, no copy of W
    assert "index_select" in first["by_phase_op"]["forward"]


@pytest.mark.slow
def test_tiny_run_activation_figures_are_exact(tiny_run: tuple[dict[str, Any], Path]) -> None:
    result, _ = tiny_run
    cfg = result["config"]
    methods = result["methods"]
    tokens = cfg["batch"] * cfg["seq"]
    paca_layers = methods["paca"]["memory"]["per_layer"]
    assert len(paca_layers) == cfg["layers"] * len(cfg["targets"])
    for name, rec in paca_layers.items():
        # PaCA saves exactly r of the layer's `in` input channels, in the input's dtype
        assert rec["saved_bytes"] * rec["in_features"] == rec["input_bytes"] * cfg["r"], name
        assert rec["saved_bytes"] == tokens * cfg["r"] * 4
    # the frozen base saves nothing inside its (frozen) linear layers
    assert methods["frozen"]["memory"]["saved_in_target_layers"] == 0
    # LoRA saves each distinct layer input whole (q/k/v and gate/up share theirs)
    lora = methods["lora"]["memory"]["per_layer"]
    q = next(rec for n, rec in lora.items() if n.endswith("layers.0.self_attn.q_proj"))
    k = next(rec for n, rec in lora.items() if n.endswith("layers.0.self_attn.k_proj"))
    assert q["saved_bytes"] >= q["input_bytes"]  # the whole input, plus A's small output
    assert k["saved_bytes"] < k["input_bytes"]  # the input was already counted for q
    paca_total = methods["paca"]["memory"]["saved_activation_bytes"]
    assert paca_total < methods["lora"]["memory"]["saved_activation_bytes"]
    assert methods["frozen"]["trainable_params"] == 0
    assert methods["paca"]["memory"]["optimizer_state_bytes"] > 0


class _TrackedCPU:
    """Builds a CPU backend that reports a peak counter like a device allocator does."""

    @staticmethod
    def make() -> type:
        from paca_cpu.backend import CPUBackend

        class TrackedCPU(CPUBackend):
            name = "tracked-cpu"
            priority = None

            def __init__(self) -> None:
                super().__init__()
                self.tracker: AllocationTracker | None = None

            def reset_peak_memory(self) -> None:
                self.close()
                self.tracker = AllocationTracker()
                self.tracker.__enter__()

            def close(self) -> None:
                if self.tracker is not None:
                    self.tracker.__exit__(None, None, None)
                    self.tracker = None

            def memory_allocated(self) -> int | None:
                return self.tracker.current if self.tracker else 0

            def max_memory_allocated(self) -> int | None:
                return self.tracker.peak if self.tracker else 0

        return TrackedCPU


@pytest.mark.slow
def test_device_path_searches_max_seq_with_the_allocator_counter() -> None:
    import paca
    from paca._registry import registry
    from paca.bench import run_benchmark

    paca.register_backend(_TrackedCPU.make())
    budget = 2 * 1024**2
    cfg = preset(
        "tiny",
        backend="tracked-cpu",
        methods=("paca", "lora"),
        budget_bytes=budget,
        seq_granularity=8,
        seq_search_max=4096,
        repeats=1,
    )
    try:
        result = run_benchmark(cfg)
    finally:
        registry().instance("tracked-cpu").close()
    for m in result["methods"].values():
        found = m["max_seq_len"]
        assert found["how"] == "searched" and found["budget_bytes"] == budget
        assert found["max_seq"] > 0 and found["max_seq"] % 8 == 0
        tried = {int(k): v for k, v in found["tried"].items()}
        assert tried[found["max_seq"]] is True
        assert any(not ok and n == found["max_seq"] + 8 for n, ok in tried.items())
        assert m["memory"]["peak_source"] == "tracked-cpu-allocator"
    seqs = {n: m["max_seq_len"]["max_seq"] for n, m in result["methods"].items()}
    assert seqs["paca"] >= seqs["lora"]


@pytest.mark.slow
def test_rerender_from_json_reproduces_the_tables(
    tiny_run: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    from paca.cli.main import main

    result, out = tiny_run
    assert main(["bench", "--from-json", str(out / "bench.json"), "--out", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "bench.json").read_text())
    assert again["ratios"] == result["ratios"] and len(again["rerendered_utc"]) == 1
    assert (tmp_path / "bench.md").read_text() == (out / "bench.md").read_text()


@pytest.mark.slow
def test_rerender_of_a_result_without_write_traffic(
    tiny_run: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    from paca.cli.main import main

    result, _ = tiny_run
    old = json.loads(json.dumps(result))  # as results from before the traffic count look
    for m in old["methods"].values():
        m.pop("write_traffic")
        m.pop("adapted_weight_bytes")
    old.pop("paired")
    old["paired_paca_vs_lora"] = {"median": 1.0}
    (tmp_path / "old.json").write_text(json.dumps(old))
    out = tmp_path / "out"
    assert main(["bench", "--from-json", str(tmp_path / "old.json"), "--out", str(out)]) == 0
    again = json.loads((out / "bench.json").read_text())
    assert again["write_traffic_vs_frozen"] == {} and "paired_paca_vs_lora" not in again
    assert "paca/lora" in again["paired"]
    assert "Write traffic" not in (out / "bench.md").read_text()


def test_rerender_refuses_other_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from paca.cli.main import main

    bad = tmp_path / "other.json"
    bad.write_text(json.dumps({"schema": "something-else"}))
    assert main(["bench", "--from-json", str(bad), "--out", str(tmp_path / "o")]) == 1
    assert "is not a paca-bench/1 result" in capsys.readouterr().err
