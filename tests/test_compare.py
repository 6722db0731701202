"""`paca compare`: one experiment on two backends gives matching losses, a table and a PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_experiment import tiny_experiment

from paca.cli.main import main
from paca.experiment import experiment_from_dict, run_experiment
from paca.experiment.compare import (
    NotARunFolderError,
    compare,
    comparison_rows,
    format_table,
    load_run,
)


def _twin_cpu() -> type:
    """A second backend with another name, computing exactly as the CPU reference."""
    from paca_cpu.backend import CPUBackend

    class TwinCPUBackend(CPUBackend):
        name = "twin-cpu"
        priority = None

        def describe(self) -> dict[str, Any]:
            return {**super().describe(), "device_name": "twin CPU"}

        def reset_peak_memory(self) -> None:  # a device that can tell its memory
            self.resets = getattr(self, "resets", 0) + 1

        def max_memory_allocated(self) -> int | None:
            return 64 * 2**20 if getattr(self, "resets", 0) else None

    return TwinCPUBackend


@pytest.fixture(scope="module")
def two_backends(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same experiment run on ``cpu`` and on a plugin-style backend ``twin-cpu``."""
    import paca
    from paca._registry import reset_registry

    tmp = tmp_path_factory.mktemp("cmp")
    exp = experiment_from_dict(tiny_experiment(tmp, train={"save_steps": 0}))
    reset_registry()
    paca.register_backend(_twin_cpu())
    first = run_experiment(exp, backend="cpu", run_dir=tmp / "cpu", progress=False).run_dir
    second = run_experiment(exp, backend="twin-cpu", run_dir=tmp / "twin", progress=False).run_dir
    reset_registry()
    return first, second


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_same_file_on_two_backends_gives_matching_losses(two_backends):
    cpu, twin = (load_run(p) for p in two_backends)
    assert cpu.summary["backend"] == "cpu" and twin.summary["backend"] == "twin-cpu"
    assert twin.environment["device_name"] == "twin CPU"
    assert len(_losses(cpu.path)) == 6
    assert _losses(twin.path) == pytest.approx(_losses(cpu.path), rel=1e-5, abs=1e-6)
    assert twin.summary["eval_loss"] == pytest.approx(cpu.summary["eval_loss"], rel=1e-5)
    # peak memory comes from the backend's hooks (reset at train start), None where absent
    assert twin.summary["peak_memory_bytes"] == 64 * 2**20
    assert cpu.summary["peak_memory_bytes"] is None


def test_compare_writes_markdown_table_and_png(two_backends, tmp_path: Path):
    result = compare(list(two_backends), out_dir=tmp_path)
    table = result["table"]
    assert "cpu" in table and "twin-cpu" in table and "tokens/s" in table
    md = result["markdown"].read_text()
    assert md.count("\n|") >= 4 and "| run | backend |" in md and "twin CPU" in md
    assert "| 64 |" in md  # the twin's peak memory in MiB; the CPU's is n/a
    png = result["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_compare_command(two_backends, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "report"
    assert main(["compare", *map(str, two_backends), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "twin-cpu" in printed and "compare.png" in printed
    assert (out / "compare.md").is_file() and (out / "compare.png").is_file()


def _fake_run(folder: Path, **summary: Any) -> Path:
    folder.mkdir(parents=True)
    base = {"status": "completed", "backend": "cpu", "device": "x", "method": "paca"}
    (folder / "summary.json").write_text(json.dumps({**base, **summary}))
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    return folder


def test_ratios_are_relative_to_the_first_run(tmp_path: Path):
    a = _fake_run(tmp_path / "a", tokens_per_second=100.0, step_time_median_s=0.2,
                  peak_memory_bytes=None, eval_loss=1.0)  # fmt: skip
    b = _fake_run(tmp_path / "b", backend="hpu", tokens_per_second=150.0,
                  step_time_median_s=0.1, peak_memory_bytes=2**30, eval_loss=1.1)  # fmt: skip
    rows = comparison_rows([load_run(a), load_run(b)])
    assert rows[1]["tokens_per_second_ratio"] == pytest.approx(1.5)
    assert rows[1]["step_time_median_s_ratio"] == pytest.approx(0.5)
    assert rows[1]["peak_memory_bytes_ratio"] is None  # no baseline memory: no ratio
    text = format_table(rows)
    assert "150 (1.50x)" in text and "100.0 (0.50x)" in text and "1,024" in text
    assert "n/a" in text
    md = format_table(rows, markdown=True)
    assert md.splitlines()[1].startswith("| --- | --- |") and "---:" in md


def test_not_a_run_folder_is_a_clear_error(tmp_path: Path):
    with pytest.raises(NotARunFolderError, match="not a run folder.*summary.json"):
        load_run(tmp_path)
    assert main(["compare", str(tmp_path)]) == 1
