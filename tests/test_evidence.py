"""benchmarks/evidence: the pretraining script and one reduced cell of each study, end to end."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

EVIDENCE = Path(__file__).resolve().parents[1] / "benchmarks" / "evidence"
needs_sklearn = pytest.mark.skipif(
    importlib.util.find_spec("sklearn") is None, reason="scikit-learn is not installed"
)


@pytest.fixture
def evidence(monkeypatch: pytest.MonkeyPatch):
    """The scripts' folder on sys.path (they import their shared ``common`` module)."""
    monkeypatch.syspath_prepend(str(EVIDENCE))
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
    for name in ("common", "pretrain", "study"):
        sys.modules.pop(name, None)


@pytest.mark.slow
@needs_sklearn
def test_pretrain_script_writes_a_loadable_recorded_checkpoint(evidence, tmp_path: Path):
    import pretrain

    from paca.tiny import load_pretrained

    assert pretrain.main(["--only", "digits-cnn", "--steps", "3", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "digits-cnn.json").read_text())
    assert record["seed"] == 0 and record["train"]["steps"] == 3
    assert record["command"] == "python benchmarks/evidence/pretrain.py --only digits-cnn --steps 3"
    assert 0.0 <= record["result"]["held_out"]["accuracy"] <= 1.0
    model = load_pretrained("digits-cnn", checkpoint_dir=tmp_path)
    assert model.conv1.weight.shape == (16, 1, 3, 3)
    # the shipped record's configuration is what the script trains
    from safetensors.torch import load_file

    from paca.tiny import checkpoint_paths, checkpoint_record

    for name, spec in pretrain.SPECS.items():
        shipped = checkpoint_record(name)
        assert shipped["config"] == spec["config"] and shipped["train"] == spec["train"], name
        weights = load_file(str(checkpoint_paths(name)[0]))
        assert pretrain.tensors_sha256(weights) == shipped["tensors_sha256"], name
    assert record["tensors_sha256"] == pretrain.tensors_sha256(
        load_file(str(tmp_path / "digits-cnn.safetensors"))
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "study, methods",
    [
        pytest.param("cnn", ["paca-r4", "lora-r5"], marks=needs_sklearn),
        pytest.param("vit", ["frozen", "paca-r8"], marks=needs_sklearn),
        ("llama", ["paca-r8"]),
    ],
)
def test_one_reduced_cell_of_each_study(evidence, tmp_path: Path, study: str, methods: list[str]):
    import study as study_mod

    args = [study, "--methods", *methods, "--lrs", "1e-3", "--seeds", "0", "--steps", "6",
            "--timing-rounds", "3", "--out", str(tmp_path)]  # fmt: skip
    assert study_mod.main(args) == 0
    timing = json.loads((tmp_path / f"{study}.timing.json").read_text())["methods"]
    assert {m for m in methods if m != "frozen"} == set(timing)
    assert all(t["n"] == 3 and t["median_s"] > 0 for t in timing.values())
    rows = [json.loads(x) for x in (tmp_path / f"{study}.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r["method"] != "frozen"]
    assert {r["phase"] for r in trained} == {"sweep", "final"}
    for r in trained:
        assert r["step_time_median_s"] > 0 and r["memory"]["peak_bytes"] > 0
        assert r["curve"][0]["step"] == 0 and r["curve"][-1]["step"] == 6
    md = (tmp_path / f"{study}.md").read_text()
    assert "Learning-rate sweep" in md and methods[-1] in md
    assert (tmp_path / f"{study}.png").stat().st_size > 10_000
    if study == "llama":
        assert "code loss (forgetting)" in md and rows[0]["test"]["perplexity"] > 1
