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

_LABELS = {"paca": "PaCA", "lora": "LoRA", "full": "Full FT", "frozen": "Frozen (bound)"}


def _label(name: str) -> str:
    return _LABELS.get(name, name)


def _mib(n: float | None) -> str:
    return "–" if n is None else f"{n / MIB:,.1f}"


def _x(r: float | None) -> str:
    return "–" if r is None else f"{r:.3f}×"


def _fmt_target(t: dict[str, Any]) -> str:
    metric = t["metric"].replace("_", " ")
    if t["op"] == "within":
        want = f"within ±{100 * t['value']:.0f}% of {_label(t['vs'])}"
    else:
        want = f"{t['op']} {t['value']}× {_label(t['vs'])}"
    got = _x(t["measured"])
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
    paired = result.get("paired_paca_vs_lora")
    if paired:
        lines += [
            "",
            f"Paired rounds: PaCA/LoRA step-time ratio median {paired['median']:.3f}; PaCA "
            f"faster in {paired['rounds_paca_faster']} of {paired['rounds']} rounds; ratio of "
            f"the fastest steps {_x(paired.get('ratio_of_minima'))}.",
        ]
    lines += [
        "",
        "Targets (from the issue; reported, not asserted):",
        "",
        "| metric | target | PaCA measured | result |",
        "|---|---|---:|---|",
        *(_fmt_target(t) for t in result["targets"]),
    ]
    return "\n".join(lines) + "\n"


def plot_chart(result: dict[str, Any], path: str | Path) -> Path:
    """A 2×2 bar chart: step time (median, min–max whiskers), saved activations, peak
    memory and max sequence length, one bar per method."""
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
    col = [colors.get(n, "#444444") for n in names]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
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
