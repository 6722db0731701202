"""Turn a benchmark result into files people read: JSON, a Markdown table, a chart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MIB = 1024**2

NO_MATPLOTLIB = (
    "the benchmark chart needs matplotlib: pip install matplotlib (or paca[plot]), "
    "or pass --no-chart"
)

_LABELS = {
    "paca": "PaCA",
    "lora": "LoRA",
    "full": "Full FT",
    "frozen": "Frozen (bound)",
    "qpaca": "QPaCA (NF4)",
    "qlora": "QLoRA (NF4)",
}


def _label(name: str) -> str:
    return _LABELS.get(name, name)


def _mib(n: float | None, digits: int = 1) -> str:
    return "–" if n is None else f"{n / MIB:,.{digits}f}"


def _x(r: float | None) -> str:
    return "–" if r is None else f"{r:.3f}×"


def _frac(r: float | None) -> str:
    return "–" if r is None else f"{r:.4f}"


def _paired_rows(result: dict[str, Any]) -> list[str]:
    pairs = result.get("paired") or {}
    if not pairs:
        return []
    lines = [
        "",
        "Paired rounds (each round times every method once, in rotating order; the ratio "
        "is taken within a round, so load from elsewhere mostly cancels):",
        "",
        "| step time | rounds | median per-round ratio | IQR | min–max | rounds below 1 "
        "| ratio of fastest steps |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, pr in pairs.items():
        a, b = key.split("/")
        lines.append(
            f"| {_label(a)} / {_label(b)} | {pr['rounds']} | {pr['median']:.3f} "
            f"| {pr['q1']:.3f}–{pr['q3']:.3f} | {pr['min']:.3f}–{pr['max']:.3f} "
            f"| {pr['rounds_below_1']} | {_x(pr.get('ratio_of_minima'))} |"
        )
    return lines


def _traffic_rows(result: dict[str, Any]) -> list[str]:
    methods = result["methods"]
    if not any(m.get("write_traffic") for m in methods.values()):
        return []
    extra = result.get("write_traffic_vs_frozen") or {}
    weights = next((m.get("adapted_weight_bytes") for m in methods.values()), None)
    lines = [
        "",
        "Write traffic: bytes written by aten ops in one training step (counted at "
        "dispatch: new outputs and in-place writes; indexed writes by their source's size)"
        + (f"; the adapted weights are {_mib(weights)} MiB" if weights else "")
        + ":",
        "",
        "| method | forward MiB | backward MiB | optimizer MiB | step MiB "
        "| beyond frozen, fwd+bwd MiB | ÷ adapted weights | beyond frozen, step MiB "
        "| ÷ adapted weights |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in methods.items():
        t = m.get("write_traffic")
        if not t:
            continue
        e = extra.get(name) or {}
        lines.append(
            f"| {_label(name)} | {_mib(t['forward_bytes'])} | {_mib(t['backward_bytes'])} "
            f"| {_mib(t['optimizer_bytes'])} | {_mib(t['total_bytes'])} "
            f"| {_mib(e.get('extra_fwd_bwd_bytes'), 2)} "
            f"| {_frac(e.get('extra_fwd_bwd_fraction'))} "
            f"| {_mib(e.get('extra_step_bytes'), 2)} | {_frac(e.get('extra_step_fraction'))} |"
        )
    return lines + _layer_traffic_rows(methods)


def _layer_traffic_rows(methods: dict[str, Any]) -> list[str]:
    per = {n: methods[n]["layer_traffic"] for n in methods if methods[n].get("layer_traffic")}
    if not per:
        return []
    names = list(per)
    head = " | ".join(f"{_label(n)} beyond frozen KiB | ÷ weight" for n in names)
    lines = [
        "",
        "Per adapted layer (the op's bound): one forward+backward of the layer on the "
        "step's input shape, bytes written beyond the same layer frozen:",
        "",
        f"| layer (in→out) | layers | weight KiB | {head} |",
        "|---|---:|---:|" + "---:|---:|" * len(names),
    ]
    shapes = list(dict.fromkeys(k for n in names for k in per[n]["shapes"]))
    for key in shapes:
        cells, first = [], None
        for n in names:
            sh = per[n]["shapes"].get(key)
            first = first or sh
            cells.append(
                "– | –"
                if sh is None
                else f"{sh['extra_bytes'] / 1024:,.1f} | {_frac(sh['extra_fraction'])}"
            )
        lines.append(
            f"| {key.replace('->', '→')} | {first['layers']} | {first['weight_bytes'] / 1024:,.0f} "
            f"| {' | '.join(cells)} |"
        )
    total = " | ".join(
        f"{per[n]['extra_bytes'] / 1024:,.1f} | {_frac(per[n]['extra_fraction'])}" for n in names
    )
    lines.append(f"| all adapted layers | | | {total} |")
    return lines


_METRICS = {
    "step_time_s": "step time (paired per-round median)",
    "saved_activation_bytes": "saved activation bytes",
    "max_seq": "max seq",
    "extra_write_fraction": "bytes a layer step writes beyond the frozen layer ÷ its weight's",
}


def _fmt_target(t: dict[str, Any]) -> str:
    metric = _METRICS.get(t["metric"], t["metric"].replace("_", " "))
    if t["op"] == "within":
        want = f"within ±{100 * t['value']:.0f}% of {_label(t['vs'])}"
    elif t["metric"] == "extra_write_fraction":
        want = f"{t['op']} {t['value']}"
    else:
        want = f"{t['op']} {t['value']}× {_label(t['vs'])}"
    got = _x(t["measured"]) if t["metric"] != "extra_write_fraction" else _frac(t["measured"])
    verdict = {True: "met", False: "**missed**", None: "not measured"}[t["met"]]
    return f"| {metric} | {want} | {got} | {verdict} |"


def markdown_report(result: dict[str, Any]) -> str:
    """Tables of absolute figures and of ratios to LoRA and to the frozen bound."""
    env, cfg, methods = result["environment"], result["config"], result["methods"]
    backend = env["backend"]
    lines = [
        f"Machine: {env['cpu']} ({env['cpu_count']} logical CPUs, {env['torch_threads']} torch "
        f"threads); backend `{backend.get('backend')}`"
        + (f" on {backend['device_name']}" if backend.get("device_name") else "")
        + f"; load average {env.get('load_average_start')} → {env.get('load_average_end')}.",
        f"Versions: torch {env['versions'].get('torch')}, transformers "
        f"{env['versions'].get('transformers')}, peft {env['versions'].get('peft')}, "
        f"paca {env['versions'].get('paca')}, Python {env['python']}.",
        f"Model: LLaMA-style, hidden {cfg['hidden']}, {cfg['layers']} layers, {cfg['heads']} "
        f"heads ({cfg['kv_heads']} kv), MLP {cfg['intermediate']}, random init (seed "
        f"{cfg['seed']}), {cfg['dtype']}; batch {cfg['batch']} × seq {cfg['seq']}; r={cfg['r']} "
        f"on {', '.join(cfg['targets'])}; AdamW. Timing: {cfg['warmup']} warm-up + "
        f"{cfg['repeats']} timed steps per method, interleaved.",
        "",
        "| method | trainable params | step time median (IQR; min–max) | tokens/s "
        "| saved activations MiB | peak MiB | optimizer state MiB "
        f"| max seq @ {cfg['budget_bytes'] / 1024**3:g} GiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in methods.items():
        t, mem = m["step_time_s"], m["memory"]
        lines.append(
            f"| {_label(name)} | {m['trainable_params']:,} | {1e3 * t['median']:.1f} ms "
            f"({1e3 * t['iqr']:.1f}; {1e3 * t['min']:.1f}–{1e3 * t['max']:.1f}) "
            f"| {t['tokens_per_s']:,.0f} | {_mib(mem['saved_activation_bytes'])} "
            f"| {_mib(mem['peak_bytes'])} | {_mib(mem['optimizer_state_bytes'])} "
            f"| {m['max_seq_len']['max_seq']:,} |"
        )
    for key, ref in (("vs_lora", "LoRA"), ("vs_frozen", "the frozen bound")):
        rows = result["ratios"].get(key) or {}
        if not rows:
            continue
        lines += [
            "",
            f"Ratios to {ref} (lower is better except tokens/s and max seq):",
            "",
            "| method | step time | tokens/s | saved activations | peak | max seq |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, r in rows.items():
            lines.append(
                f"| {_label(name)} | {_x(r['step_time_s'])} | {_x(r['tokens_per_s'])} "
                f"| {_x(r['saved_activation_bytes'])} | {_x(r['peak_bytes'])} "
                f"| {_x(r['max_seq'])} |"
            )
    lines += _paired_rows(result)
    lines += _traffic_rows(result)
    lines += _quantized_rows(result)
    lines += [
        "",
        "Targets (from the issues; reported, not asserted):",
        "",
        "| metric | target | PaCA measured | result |",
        "|---|---|---:|---|",
        *(_fmt_target(t) for t in result["targets"]),
    ]
    return "\n".join(lines) + "\n"


def _quantized_rows(result: dict[str, Any]) -> list[str]:
    """QPaCA vs QLoRA on the same 4-bit NF4 layers (when both ran)."""
    methods = result["methods"]
    if "qpaca" not in methods or "qlora" not in methods:
        return []
    pair = (result.get("paired") or {}).get("qpaca/qlora") or {}
    lines = [
        "",
        "4-bit NF4 base (QPaCA vs QLoRA, same quantized layers):",
        "",
        "| method | step time median | saved activations MiB | peak MiB | trainable MiB "
        "| model MiB | bytes/param |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ("qpaca", "qlora"):
        m = methods[name]
        mem = m["memory"]
        lines.append(
            f"| {_label(name)} | {1e3 * m['step_time_s']['median']:.1f} ms "
            f"| {_mib(mem['saved_activation_bytes'])} | {_mib(mem['peak_bytes'])} "
            f"| {_mib(m.get('trainable_bytes'))} | {_mib(m.get('model_bytes'))} "
            f"| {m.get('bytes_per_param', float('nan')):.3f} |"
        )
    qp, ql = methods["qpaca"], methods["qlora"]
    lines += [
        "",
        f"QPaCA / QLoRA: step time {_x(pair.get('median'))} (median of per-round ratios), "
        f"saved activations {_x(_div(qp['memory']['saved_activation_bytes'], ql['memory']['saved_activation_bytes']))}, "
        f"peak {_x(_div(qp['memory']['peak_bytes'], ql['memory']['peak_bytes']))}.",
    ]
    return lines


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def plot_chart(result: dict[str, Any], path: str | Path) -> Path:
    """Bar charts, one bar per method: step time (median, min–max whiskers), saved
    activations, peak memory, max sequence length and (when counted) bytes written per
    step."""
    try:
        import matplotlib
    except ImportError as exc:
        raise RuntimeError(NO_MATPLOTLIB) from exc

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = result["methods"]
    names = list(methods)
    labels = [_label(n) for n in names]
    colors = {"paca": "#1b9e77", "lora": "#d95f02", "full": "#7570b3", "frozen": "#999999"}
    colors.update({"qpaca": "#66a61e", "qlora": "#e6ab02"})
    col = [colors.get(n, "#444444") for n in names]
    traffic = all(methods[n].get("write_traffic") for n in names)
    fig, axes = plt.subplots(2, 3 if traffic else 2, figsize=(14 if traffic else 10, 7))
    med = [1e3 * methods[n]["step_time_s"]["median"] for n in names]
    lo = [m - 1e3 * methods[n]["step_time_s"]["min"] for m, n in zip(med, names, strict=True)]
    hi = [1e3 * methods[n]["step_time_s"]["max"] - m for m, n in zip(med, names, strict=True)]
    panels = [
        (axes[0][0], med, "step time, ms (median; min–max)", (lo, hi)),
        (
            axes[0][1],
            [methods[n]["memory"]["saved_activation_bytes"] / MIB for n in names],
            "saved activations, MiB",
            None,
        ),
        (axes[1][0], [methods[n]["memory"]["peak_bytes"] / MIB for n in names], "peak, MiB", None),
        (
            axes[1][1],
            [methods[n]["max_seq_len"]["max_seq"] for n in names],
            f"max seq len @ {result['config']['budget_bytes'] / 1024**3:g} GiB",
            None,
        ),
    ]
    if traffic:
        panels.append(
            (
                axes[0][2],
                [methods[n]["write_traffic"]["total_bytes"] / MIB for n in names],
                "bytes written per step, MiB",
                None,
            )
        )
        axes[1][2].axis("off")
    for ax, values, title, err in panels:
        bars = ax.bar(labels, values, color=col, yerr=err, capsize=4 if err else 0)
        ax.set_title(title)
        if err:  # whiskers would hide a label on top of the bar: put it inside
            ax.bar_label(bars, fmt="%.0f", fontsize=8, label_type="center", color="white")
        else:
            ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.tick_params(axis="x", labelsize=9)
    env, cfg = result["environment"], result["config"]
    fig.suptitle(
        f"hidden {cfg['hidden']}, {cfg['layers']} layers, batch {cfg['batch']}×{cfg['seq']}, "
        f"r={cfg['r']}, {cfg['dtype']} — {env['backend'].get('backend')} on {env['cpu']}",
        fontsize=9,
    )
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_outputs(result: dict[str, Any], out_dir: str | Path, chart: bool = True) -> list[Path]:
    """Write ``bench.json``, ``bench.md`` and (if ``chart``) ``bench.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "bench.json", out / "bench.md"]
    paths[0].write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    paths[1].write_text(markdown_report(result), encoding="utf-8")
    if chart:
        paths.append(plot_chart(result, out / "bench.png"))
    return paths
