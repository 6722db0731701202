"""``paca estimate``: the meta-device dry run predicts measured peaks (within 10%), needs
no memory, and refuses bad input with advice."""

from __future__ import annotations

import json

import pytest
import torch

from paca.cli.main import main
from paca.estimate import KNOWN_MODELS, EstimateError, estimate_memory, resolve_config, validate

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")


@pytest.mark.slow
@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointing"])
def test_estimates_match_measured_peaks_on_the_tiny_bench_model(ckpt):
    rows = validate("tiny", gradient_checkpointing=ckpt)
    assert [r["method"] for r in rows] == ["paca", "qpaca", "lora", "qlora", "full"]
    for row in rows:
        assert abs(row["error"]) < 0.10, row
        if row["method"] in ("paca", "lora", "full"):  # dense: the same accounting, exactly
            assert row["estimated_peak_bytes"] == row["measured_peak_bytes"], row


def test_estimate_allocates_nothing_and_orders_the_methods():
    before = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    est = {
        m: estimate_memory("bench-tiny", m, batch=2, seq=16, dtype="float32", device="cpu")
        for m in ("paca", "qpaca", "lora", "qlora", "full")
    }
    assert (torch.cuda.memory_allocated() if torch.cuda.is_available() else 0) == before
    peak = {m: e.peak_bytes for m, e in est.items()}
    assert peak["qpaca"] < peak["paca"] < peak["lora"] < peak["full"]
    assert peak["qpaca"] < peak["qlora"]
    assert est["paca"].trainable_params == est["qpaca"].trainable_params
    assert est["qpaca"].total_params == est["paca"].total_params  # logical, not packed
    assert est["qpaca"].weight_bytes < 0.6 * est["paca"].weight_bytes
    assert est["qpaca"].saved_activation_bytes == est["paca"].saved_activation_bytes
    # the 4-bit kernel's whole-weight dequantization is counted while it runs
    assert est["qpaca"].kernel_transient_bytes == 176 * 64 * 4  # the MLP's 176×64 fp32
    assert est["paca"].kernel_transient_bytes == 0


def test_known_configs_are_the_published_sizes():
    _, cfg8 = resolve_config("llama-3-8b")
    assert (cfg8.hidden_size, cfg8.intermediate_size, cfg8.num_hidden_layers) == (4096, 14336, 32)
    _, cfg70 = resolve_config("llama-3.1-70b")
    assert (cfg70.hidden_size, cfg70.num_hidden_layers, cfg70.num_key_value_heads) == (8192, 80, 8)
    assert set(KNOWN_MODELS) >= {"llama-3-8b", "llama-3.1-70b"}


def test_cli_prints_a_table_and_json(capsys, tmp_path):
    args = ["estimate", "bench-tiny", "--method", "paca,qpaca", "--batch", "2", "--seq", "16"]
    assert main([*args, "--device", "cpu", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "qpaca" in out and "80 GiB" in out and "96 GiB" in out and "fits" in out
    assert main([*args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["method"] for d in data] == ["paca", "qpaca"] and data[0]["peak_bytes"] > 0
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llama", **{
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
    }}))  # fmt: skip
    assert main(["estimate", str(config), "--method", "lora", "--seq", "8"]) == 0


def test_bad_input_is_refused_with_advice(capsys):
    with pytest.raises(EstimateError, match="unknown method 'dora'.*paca, qpaca"):
        estimate_memory("bench-tiny", "dora")
    with pytest.raises(EstimateError, match="seq must be a positive int"):
        estimate_memory("bench-tiny", "paca", seq=0)
    with pytest.raises(EstimateError, match="not a known name.*llama-3-8b"):
        resolve_config("no/such-model-anywhere")
    assert main(["estimate", "bench-tiny", "--method", "paca,dora"]) == 1
    assert "choose from paca, qpaca" in capsys.readouterr().err
    assert main(["estimate", "bench-tiny", "--device-gib", "80,x"]) == 1
    assert "--device-gib" in capsys.readouterr().err
