"""An offline byte-level tokenizer, so tests and the default job need no model hub.

Every UTF-8 string maps to its bytes (ids 0-255, id == byte value) and back, so any
text round-trips exactly and the vocabulary is tiny (259 tokens), which keeps the
embedding and LM head of the tiny models small.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported on first use: keeps `import paca.tiny` light
    from transformers import PreTrainedTokenizerFast

#: Special tokens, appended after the 256 byte tokens.
PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_ID = 256
BOS_ID = 257
EOS_ID = 258
#: Size of the byte tokenizer's vocabulary: 256 bytes + 3 specials.
VOCAB_SIZE = 259


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (what ByteLevel emits)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """Build the raw ``tokenizers`` pipeline once; cached as an immutable JSON string."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # use_regex=False: no word splitting, no prefix space -> pure bytes in, bytes out.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([PAD_TOKEN, BOS_TOKEN, EOS_TOKEN])
    return tok.to_str()


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Return a fresh byte-level ``PreTrainedTokenizerFast`` (pad/bos/eos set, right padding).

    The expensive part is cached; each call returns a new object, so callers may mutate
    it (e.g. ``padding_side``) without affecting other callers. ``encode`` adds no
    special tokens, so ``decode(encode(s)) == s`` for any string ``s``.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    return tok
