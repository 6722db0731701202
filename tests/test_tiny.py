"""Tests for paca.tiny: offline tokenizer, tiny model builders and built-in data."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoTokenizer
from transformers.pytorch_utils import Conv1D

from paca.tiny import (
    BOS_ID,
    EOS_ID,
    IMAGE_MODELS,
    PAD_ID,
    PRETRAINED,
    RANDOM_INIT_MODELS,
    TINY_MODELS,
    VOCAB_SIZE,
    build_tiny,
    builtin_instructions_path,
    byte_tokenizer,
    format_example,
    format_prompt,
    image_dataset,
    instruction_dataset,
    load_jsonl,
    save_jsonl,
    tiny_gpt2,
    tiny_llama,
    tiny_vit,
    tokenize_for_clm,
)

TEXTS = [
    "",
    "hello world",
    "  two  spaces\n\ttab\r\n",
    "héllo wörld 日本語 🤖 ∑",
    "a . b , c ? don't",
    "<s> looks special </s> <pad>",
    "\x00\x01\x7f",
    "### Instruction: add 1 and 2\n### Response: 3",
]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads; on a busy 2-core box two are 5-20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- tokenizer ---------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trips(text: str) -> None:
    tok = byte_tokenizer()
    assert tok.decode(tok.encode(text)) == text


def test_tokenizer_is_byte_level_with_specials() -> None:
    tok = byte_tokenizer()
    assert len(tok) == VOCAB_SIZE == 259
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)
    assert tok.padding_side == "right"
    text = "é🤖x"
    assert tok.encode(text) == list(text.encode("utf-8"))


def test_tokenizer_calls_return_independent_objects() -> None:
    a = byte_tokenizer()
    a.padding_side = "left"
    assert byte_tokenizer().padding_side == "right"


def test_tokenizer_save_and_reload(tmp_path) -> None:
    tok = byte_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == len(tok)
    assert loaded.pad_token_id == PAD_ID and loaded.eos_token_id == EOS_ID
    assert loaded.padding_side == "right"
    for text in TEXTS:
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.decode(loaded.encode(text)) == text


# --- models ------------------------------------------------------------------------


def test_llama_uses_linear_projections() -> None:
    model = tiny_llama()
    layer = model.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    for mod in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
        assert type(mod) is nn.Linear
    for mod in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        assert type(mod) is nn.Linear
    # grouped-query attention: k/v are narrower than q
    assert attn.k_proj.out_features == attn.q_proj.out_features // 2
    assert mlp.up_proj.out_features == 176
    assert model.get_input_embeddings().num_embeddings == VOCAB_SIZE


def test_gpt2_uses_conv1d() -> None:
    block = tiny_gpt2().transformer.h[0]
    for mod in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
        assert isinstance(mod, Conv1D)
    assert block.attn.c_attn.weight.shape == (64, 3 * 64)  # Conv1D stores (in, out)


def test_vit_has_conv2d_patch_embedding() -> None:
    model = tiny_vit(image_size=32, patch=8, num_labels=10)
    proj = model.vit.embeddings.patch_embeddings.projection
    assert isinstance(proj, nn.Conv2d)
    assert proj.kernel_size == (8, 8) and proj.stride == (8, 8)
    # Module paths differ between transformers 4.x (encoder.layer.N.attention.attention.query)
    # and 5.x (layers.N.attention.q_proj), so count instead: q, k, v, o, fc1, fc2 per layer.
    linears = [m for m in model.vit.modules() if type(m) is nn.Linear]
    assert len(linears) == 6 * model.config.num_hidden_layers
    assert model.classifier.out_features == 10


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_causal_lm_returns_loss(name: str) -> None:
    model = build_tiny(name)
    ids = torch.randint(0, VOCAB_SIZE, (2, 12), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    assert out.logits.shape == (2, 12, VOCAB_SIZE)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert 5.0 < out.loss.item() < 6.5  # ~ln(259) at random init


def test_vit_returns_loss() -> None:
    pixels, labels = image_dataset(4)
    out = tiny_vit()(pixel_values=pixels, labels=labels)
    assert out.logits.shape == (4, 10)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("name", sorted(RANDOM_INIT_MODELS))
def test_builders_are_deterministic_and_keep_global_rng(name: str) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = build_tiny(name, seed=0)
    assert torch.equal(torch.rand(3), expected)  # global RNG untouched
    assert _same_weights(a, build_tiny(name, seed=0))
    assert not _same_weights(a, build_tiny(name, seed=1))


def test_build_tiny_overrides_and_unknown_name() -> None:
    model = build_tiny("tiny-llama", hidden=32, layers=1, intermediate=64)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 1
    assert set(RANDOM_INIT_MODELS) == {"tiny-llama", "tiny-gpt2", "tiny-vit"}
    assert set(TINY_MODELS) == set(RANDOM_INIT_MODELS) | set(PRETRAINED)
    with pytest.raises(ValueError, match="tiny-llama"):
        build_tiny("huge-llama")


@pytest.mark.parametrize("name", PRETRAINED)
def test_pretrained_builders_are_deterministic_and_keep_global_rng(name: str) -> None:
    """The checkpoint is the same for every seed; a new classifier head follows the seed."""
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = build_tiny(name, seed=0)
    assert torch.equal(torch.rand(3), expected)
    assert _same_weights(a, build_tiny(name, seed=1))  # the pretrained weights, whatever the seed
    if name in IMAGE_MODELS:
        assert not _same_weights(a, build_tiny(name, seed=1, new_head=True))
        assert _same_weights(
            build_tiny(name, seed=1, new_head=True), build_tiny(name, seed=1, new_head=True)
        )


# --- data --------------------------------------------------------------------------


def test_instruction_dataset_is_deterministic() -> None:
    a = instruction_dataset(50, seed=0)
    assert a == instruction_dataset(50, seed=0)
    assert a != instruction_dataset(50, seed=1)
    assert all(set(row) == {"instruction", "response"} for row in a)
    ex = {"instruction": "copy: cat", "response": "cat"}
    assert format_example(ex) == "### Instruction: copy: cat\n### Response: cat"
    assert format_example(ex).startswith(format_prompt(ex))


def test_tokenize_for_clm_static_shapes_and_masked_padding() -> None:
    tok = byte_tokenizer()
    rows = instruction_dataset(200, seed=3)
    batch = tokenize_for_clm(rows, tok, seq_len=64)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for t in batch.values():
        assert t.shape == (200, 64) and t.dtype == torch.long
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert torch.equal(labels == -100, mask == 0)  # exactly the padding is ignored
    assert torch.equal(labels[mask == 1], ids[mask == 1])
    assert (ids[mask == 0] == PAD_ID).all()
    assert (ids[:, 0] == BOS_ID).all()
    lengths = mask.sum(1)
    assert (ids[torch.arange(200), lengths - 1] == EOS_ID).all()  # every example fits
    assert tok.decode(ids[0, 1 : lengths[0] - 1].tolist()) == format_example(rows[0])


def test_tokenize_for_clm_truncates_and_masks_prompt() -> None:
    tok = byte_tokenizer()
    ex = {"instruction": "reverse: tiger", "response": "regit"}
    short = tokenize_for_clm([ex], tok, seq_len=8)
    assert short["input_ids"].shape == (1, 8) and short["attention_mask"].all()
    masked = tokenize_for_clm([ex], tok, seq_len=64, mask_prompt=True)
    kept = masked["labels"][masked["labels"] != -100].tolist()
    assert kept == list(b"regit") + [EOS_ID]
    plain = tokenize_for_clm(["just text"], tok, seq_len=16, mask_prompt=True)
    assert (plain["labels"] != -100).sum() == len("just text") + 2


def test_image_dataset_is_deterministic() -> None:
    x, y = image_dataset(32, image_size=16, num_classes=4, seed=0)
    assert x.shape == (32, 3, 16, 16) and x.dtype == torch.float32
    assert y.shape == (32,) and y.dtype == torch.long and y.min() >= 0 and y.max() < 4
    x2, y2 = image_dataset(32, image_size=16, num_classes=4, seed=0)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, image_dataset(32, image_size=16, num_classes=4, seed=1)[0])


def test_shipped_jsonl_matches_generator(tmp_path) -> None:
    path = builtin_instructions_path()
    assert path.stat().st_size < 100_000
    rows = load_jsonl(path)
    # If this fails after changing the generator, run `python -m paca.tiny.data`.
    assert rows == instruction_dataset(500, seed=0)
    out = tmp_path / "copy.jsonl"
    save_jsonl(rows[:5], out)
    assert load_jsonl(out) == rows[:5]


# --- learnability ------------------------------------------------------------------


def _train_clm(model: nn.Module, params: list[nn.Parameter], lr: float, steps: int = 30):
    bs = 8
    batch = tokenize_for_clm(instruction_dataset(steps * bs, seed=0), byte_tokenizer(), 64)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(steps):
        chunk = {k: v[step * bs : (step + 1) * bs] for k, v in batch.items()}
        loss = model(**chunk).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_tiny_llama_learns_instruction_data() -> None:
    """Full fine-tuning for 30 AdamW steps must clearly lower the loss."""
    model = tiny_llama(seed=0)
    losses = _train_clm(model, list(model.parameters()), lr=3e-3)
    assert losses[0] > 5.0
    assert sum(losses[-5:]) / 5 < 2.5, losses


def test_tiny_llama_learns_with_frozen_embeddings_and_head() -> None:
    """Adapters (PaCA, LoRA) freeze embeddings, norms and LM head; the init must allow that.

    With transformers' default init std (0.02) this plateaus near 4.5; TINY_INIT_STD fixes it.
    """
    model = tiny_llama(seed=0)
    model.requires_grad_(False)
    params = []
    for name, module in model.named_modules():
        if type(module) is nn.Linear and name != "lm_head":
            module.weight.requires_grad_(True)
            params.append(module.weight)
    losses = _train_clm(model, params, lr=1e-2)
    assert sum(losses[-5:]) / 5 < 3.5, losses


def test_tiny_vit_learns_image_data() -> None:
    pixels, labels = image_dataset(16 * 20, seed=0)
    test_pixels, test_labels = image_dataset(128, seed=1)
    model = tiny_vit(seed=0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(20):
        sl = slice(step * 16, (step + 1) * 16)
        model(pixel_values=pixels[sl], labels=labels[sl]).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        accuracy = (model(pixel_values=test_pixels).logits.argmax(-1) == test_labels).float()
    assert accuracy.mean() > 0.5  # chance is 0.1
