"""Compare run folders side by side: a table (terminal and Markdown) and a PNG plot.

Every number is shown with its ratio to the first run, so "Gaudi2 vs A100" or "PaCA vs
LoRA" reads directly off the table. Runs that did not complete are shown with their
status, never silently mixed in as if they had.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paca.experiment import record


class NotARunFolderError(FileNotFoundError):
    """A path given to compare is not a run folder written by ``paca run``."""


@dataclass
class Run:
    """One run folder, read back."""

    path: Path
    summary: dict[str, Any]
    environment: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.path.name


def load_run(path: str | Path) -> Run:
    p = Path(path)
    summary_file = p / record.SUMMARY_FILE
    if not summary_file.is_file():
        raise NotARunFolderError(
            f"{p} is not a run folder: {summary_file} not found (run folders are written by "
            f"'paca run'; they hold summary.json, environment.json and metrics.jsonl)"
        )
    env_file = p / record.ENVIRONMENT_FILE
    env = record.read_json(env_file) if env_file.is_file() else {}
    return Run(p, record.read_json(summary_file), env, record.read_metrics(p))


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    scale: float = 1.0  # displayed value = raw * scale
    fmt: str = "{:.4g}"
    ratio: bool = True


COLUMNS = (
    Column("tokens_per_second", "tokens/s", fmt="{:,.0f}"),
    Column("samples_per_second", "samples/s", fmt="{:,.2f}"),
    Column("step_time_median_s", "step ms (median)", scale=1000.0, fmt="{:,.1f}"),
    Column("peak_memory_bytes", "peak mem MiB", scale=1 / 2**20, fmt="{:,.0f}"),
    Column("train_loss_final", "train loss", fmt="{:.4f}"),
    Column("eval_loss", "eval loss", fmt="{:.4f}"),
    Column("eval_accuracy", "eval acc", fmt="{:.4f}"),
)
TEXT_COLUMNS = (("run", "run"), ("backend", "backend"), ("device", "device"),
                ("ranks", "ranks"), ("method", "method"), ("status", "status"))  # fmt: skip


def _ranks(summary: dict[str, Any]) -> str:
    """``"1"`` for one process, ``"2 ddp"`` for two DDP ranks (runs before this was
    recorded ran on one process)."""
    world = summary.get("world_size") or 1
    strategy = summary.get("strategy")
    return f"{world} {strategy}" if world != 1 and strategy else str(world)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def comparison_rows(runs: list[Run]) -> list[dict[str, Any]]:
    """One dict per run: text columns, ``<key>`` values and ``<key>_ratio`` vs the first run."""
    if not runs:
        raise ValueError("compare needs at least one run folder")
    first = runs[0].summary
    rows = []
    for run in runs:
        s = run.summary
        row: dict[str, Any] = {
            "run": run.label,
            "backend": s.get("backend") or run.environment.get("backend", "?"),
            "device": s.get("device") or run.environment.get("device_name", "?"),
            "ranks": _ranks(s),
            "method": s.get("method", "?"),
            "status": s.get("status", "?"),
        }
        for col in COLUMNS:
            value, base = _number(s.get(col.key)), _number(first.get(col.key))
            row[col.key] = value
            row[col.key + "_ratio"] = value / base if value is not None and base else None
        rows.append(row)
    return rows


def _cell(row: dict[str, Any], col: Column, first: bool) -> str:
    value = row[col.key]
    if value is None:
        return "n/a"
    text = col.fmt.format(value * col.scale)
    ratio = row[col.key + "_ratio"]
    if col.ratio and not first and ratio is not None:
        text += f" ({ratio:.2f}x)"
    return text


def format_table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    """The comparison as an aligned text table, or as a Markdown table."""
    header = [t for _, t in TEXT_COLUMNS] + [c.title for c in COLUMNS]
    body = [
        [str(row[k]) for k, _ in TEXT_COLUMNS] + [_cell(row, c, i == 0) for c in COLUMNS]
        for i, row in enumerate(rows)
    ]
    if markdown:
        align = ["---"] * len(TEXT_COLUMNS) + ["---:"] * len(COLUMNS)
        lines = [header, align, *body]
        out = "\n".join("| " + " | ".join(cells) + " |" for cells in lines)
        return out + "\n\nRatios in parentheses are relative to the first run.\n"
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    n_text = len(TEXT_COLUMNS)

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < n_text else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(b) for b in body)]) + "\n"


def _loss_curves(run: Run) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    train = [(m["step"], m["loss"]) for m in run.metrics if "loss" in m]
    evals = [(m["step"], m["eval_loss"]) for m in run.metrics if "eval_loss" in m]
    return train, evals


def _short(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def plot(runs: list[Run], path: str | Path) -> Path:
    """Loss curves (train solid, eval dashed) and throughput/step-time/memory bars, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = comparison_rows(runs)
    fig = plt.figure(figsize=(13, 7), constrained_layout=True)
    grid = fig.add_gridspec(3, 2, width_ratios=[1.6, 1])
    ax_loss = fig.add_subplot(grid[:, 0])
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        colour = colours[i % len(colours)]
        train, evals = _loss_curves(run)
        if train:
            ax_loss.plot(*zip(*train, strict=True), color=colour, label=f"{run.label} train")
        if evals:
            ax_loss.plot(
                *zip(*evals, strict=True), color=colour, linestyle="--", marker="o",
                label=f"{run.label} eval",
            )  # fmt: skip
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("Loss")
    ax_loss.grid(alpha=0.3)
    if ax_loss.lines:
        ax_loss.legend(fontsize=8)
    bars = (
        ("tokens_per_second", "tokens/s", 1.0),
        ("step_time_median_s", "median step time (ms)", 1000.0),
        ("peak_memory_bytes", "peak device memory (MiB)", 1 / 2**20),
    )
    labels = [f"{r['backend']}\n{r['method']}" for r in rows]
    for k, (key, title, scale) in enumerate(bars):
        ax = fig.add_subplot(grid[k, 1])
        values = [(r[key] or 0.0) * scale for r in rows]
        drawn = ax.bar(range(len(rows)), values, color=colours[: len(rows)])
        reported = any(r[key] is not None for r in rows)
        for bar, row in zip(drawn if reported else [], rows, strict=False):
            ratio = row[key + "_ratio"]
            text = "n/a" if row[key] is None else _short(bar.get_height())
            if ratio is not None and row is not rows[0]:
                text += f"\n{ratio:.2f}x"
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)  # fmt: skip
        if not reported:
            ax.set_yticks([])
            ax.text(0.5, 0.5, "not reported by these backends", ha="center", va="center",
                    transform=ax.transAxes, fontsize=8, color="grey")  # fmt: skip
        ax.set_xticks(range(len(rows)), labels, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.margins(y=0.35)
    fig.suptitle(" vs ".join(r["run"] for r in rows), fontsize=10)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def compare(paths: list[str | Path], out_dir: str | Path | None = None, png: bool = True) -> dict:
    """Read ``paths``; return the text table, and write ``compare.md``/``compare.png``."""
    runs = [load_run(p) for p in paths]
    rows = comparison_rows(runs)
    result: dict[str, Any] = {"rows": rows, "table": format_table(rows)}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        md = out / "compare.md"
        md.write_text(
            "# Run comparison\n\n" + format_table(rows, markdown=True) + _notes(runs),
            encoding="utf-8",
        )
        result["markdown"] = md
        if png:
            result["png"] = plot(runs, out / "compare.png")
    return result


def _notes(runs: list[Run]) -> str:
    """Facts a reader needs to trust the comparison: versions, precision, warm-up."""
    lines = [
        "",
        "| run | precision | seq len | batch | libraries | git |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        s, env = run.summary, run.environment
        libs = ", ".join(f"{k} {v}" for k, v in (env.get("libraries") or {}).items() if v)
        git = (env.get("git") or {}).get("commit", "")[:10]
        lines.append(
            f"| {run.label} | {s.get('precision', '?')} | {s.get('seq_len', '?')} | "
            f"{s.get('batch_size', '?')}x{s.get('grad_accum', 1)} | {libs} | {git} |"
        )
    lines.append(
        "\nThroughput and step time exclude the first `throughput_warmup_steps` steps, "
        "evaluation, logging and checkpointing."
    )
    return "\n".join(lines) + "\n"
