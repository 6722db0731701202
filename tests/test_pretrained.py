"""The shipped pretrained checkpoints: present, small, recorded, loadable, checked."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import paca
from paca.tiny import (
    PRETRAINED,
    CheckpointMismatchError,
    DigitsCNN,
    checkpoint_paths,
    checkpoint_record,
    load_pretrained,
)
from paca.tiny.pretrained import CHECKPOINT_DIR, _fit_key_layout

needs_sklearn = pytest.mark.skipif(
    importlib.util.find_spec("sklearn") is None, reason="scikit-learn is not installed"
)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_checkpoints_are_shipped_small_and_recorded():
    total = 0
    for name in PRETRAINED:
        weights, record = checkpoint_paths(name)
        assert weights.is_file() and record.is_file(), name
        total += weights.stat().st_size
        meta = checkpoint_record(name)
        assert meta["script"] == "benchmarks/evidence/pretrain.py"
        assert isinstance(meta["seed"], int) and meta["command"].startswith("python ")
        assert meta["data"].startswith("paca.data/") and meta["train"]["steps"] > 0
        import hashlib

        assert hashlib.sha256(weights.read_bytes()).hexdigest() == meta["sha256"]
    assert total < 3 * 2**20  # a few MB at most in the wheel


def test_pyproject_ships_the_checkpoints_as_package_data():
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert "tiny/checkpoints/*.safetensors" in text and "tiny/checkpoints/*.json" in text


def test_new_head_is_seeded_and_the_body_is_the_checkpoint():
    a = load_pretrained("digits-vit", seed=0, new_head=True)
    b = load_pretrained("digits-vit", seed=1, new_head=True)
    kept = load_pretrained("digits-vit")
    assert not torch.equal(a.classifier.weight, b.classifier.weight)
    assert torch.equal(
        a.classifier.weight, load_pretrained("digits-vit", new_head=True).classifier.weight
    )
    body = {k: v for k, v in kept.state_dict().items() if not k.startswith("classifier.")}
    for k, v in body.items():
        assert torch.equal(v, a.state_dict()[k]), k
    three = load_pretrained("digits-cnn", num_labels=3)
    assert three.classifier.out_features == 3 and three.config.num_labels == 3


@needs_sklearn
def test_shipped_classifiers_know_digits_0_to_4():
    from paca.experiment.sources import load_source

    rows, _ = load_source("paca.data/digits:0-4", "test")
    x = torch.stack([r["image"] for r in rows])
    y = torch.tensor([r["label"] for r in rows])
    for name in ("digits-cnn", "digits-vit"):
        with torch.no_grad():
            accuracy = (load_pretrained(name)(pixel_values=x).logits.argmax(-1) == y).float().mean()
        assert accuracy > 0.95, name


def test_code_llama_predicts_code_far_better_than_chance():
    from paca.experiment.sources import load_source
    from paca.tiny import byte_tokenizer, tokenize_for_clm

    rows, _ = load_source("paca.data/python-code", "test", seq_len=128)
    batch = tokenize_for_clm([r["text"] for r in rows[:16]], byte_tokenizer(), seq_len=128)
    with torch.no_grad():
        loss = load_pretrained("code-llama")(**batch).loss
    assert loss < 1.8  # random init: ln(259) = 5.6 nats per byte


def test_other_architecture_than_the_checkpoint_says_what_differs():
    with pytest.raises(
        CheckpointMismatchError, match=r"hidden=96.*asks hidden=32.*pretrained = false"
    ):
        load_pretrained("code-llama", hidden=32)
    scratch = load_pretrained("code-llama", hidden=32, layers=1, pretrained=False)
    assert scratch.config.hidden_size == 32
    with pytest.raises(CheckpointMismatchError, match="no classifier head"):
        load_pretrained("code-llama", num_labels=4)
    with pytest.raises(TypeError, match="paca.tiny/digits-cnn"):
        load_pretrained("digits-cnn", no_such_option=1, pretrained=False)


def test_a_file_that_does_not_fit_its_config_says_which_tensors_differ(tmp_path: Path):
    for name in ("digits-cnn",):
        weights, record = checkpoint_paths(name)
        shutil.copy(weights, tmp_path / weights.name)
        meta = json.loads(record.read_text())
        meta["config"]["widths"] = [16, 32, 64, 32]  # the file holds conv4 with 64 channels
        (tmp_path / record.name).write_text(json.dumps(meta))
        with pytest.raises(
            CheckpointMismatchError,
            match=r"conv4.weight: checkpoint \(64, 64, 3, 3\), model \(32, 64, 3, 3\)",
        ):
            load_pretrained(name, checkpoint_dir=tmp_path)
    (tmp_path / "digits-cnn.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="pretrain.py --only digits-cnn"):
        load_pretrained("digits-cnn", checkpoint_dir=tmp_path)


def test_vit_keys_follow_the_installed_transformers_layout():
    state = {"vit.layers.0.attention.q_proj.weight": 1, "vit.layers.0.mlp.fc2.bias": 2}
    old = {
        "vit.encoder.layer.0.attention.attention.query.weight",
        "vit.encoder.layer.0.output.dense.bias",
    }
    assert set(_fit_key_layout(state, old)) == old  # transformers 4.x names
    assert _fit_key_layout(state, set(state)) is state


def test_cnn_trains_with_paca_on_conv_layers_and_with_lora():
    model = load_pretrained("digits-cnn", new_head=True)
    assert isinstance(model, DigitsCNN) and isinstance(model.conv2, nn.Conv2d)
    pm = paca.wrap(model, paca.PacaConfig(r=4, target_modules=["conv2", "conv3", "conv4"],
                                          modules_to_save=["classifier"]))  # fmt: skip
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 5, (8,))
    out = pm(pixel_values=x, labels=y)
    out.loss.backward()
    trained = [n for n, p in pm.named_parameters() if p.requires_grad and p.grad is not None]
    assert trained and all("delta" in n or "classifier" in n for n in trained)
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(
        load_pretrained("digits-cnn", new_head=True),
        peft.LoraConfig(
            r=2, target_modules=["conv2", "conv3", "conv4"], modules_to_save=["classifier"]
        ),
    )
    lora(pixel_values=x, labels=y).loss.backward()


def test_checkpoint_folder_is_the_package_folder():
    assert Path(paca.__file__).resolve().parent / "tiny" / "checkpoints" == CHECKPOINT_DIR
