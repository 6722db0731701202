"""What a benchmark run measures: model shape, batch, adapter rank, repetitions."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

#: Methods in the order tables and charts show them. ``frozen`` is the lower bound:
#: the same network with every weight frozen, backpropagated to its input embeddings.
METHODS = ("paca", "lora", "full", "frozen")
#: Methods on a 4-bit NF4 base (bitsandbytes), opt-in with ``methods=``: QPaCA
#: (paca.quantize_nf4 + paca.wrap) and QLoRA (the same 4-bit layers + PEFT LoRA).
QUANTIZED_METHODS = ("qpaca", "qlora")
KNOWN_METHODS = METHODS + QUANTIZED_METHODS

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

GIB = 1024**3


@dataclass
class BenchConfig:
    """One benchmark run. The defaults are the issue's default config (LLaMA-style,
    hidden 1024, 4 layers, seq 512, batch 2, r=8 on q,k,v,o,gate,up,down)."""

    hidden: int = 1024
    layers: int = 4
    heads: int = 16
    kv_heads: int = 16
    intermediate: int = 2816
    vocab_size: int | None = None  # None: the byte tokenizer's vocabulary
    seq: int = 512
    batch: int = 2
    r: int = 8
    targets: tuple[str, ...] = DEFAULT_TARGETS
    methods: tuple[str, ...] = METHODS
    dtype: str = "float32"
    seed: int = 0
    warmup: int = 2
    repeats: int = 10
    lr: float = 1e-4
    #: Memory budget for the max-sequence-length figure.
    budget_bytes: int = 8 * GIB
    #: Sequence lengths at which memory is probed to fit bytes-per-token (CPU path);
    #: None: seq/4, seq/2 and seq.
    seq_points: tuple[int, ...] | None = None
    #: Granularity of the device binary search for the max sequence length.
    seq_granularity: int = 64
    #: Upper end of the device binary search.
    seq_search_max: int = 1 << 17
    backend: str | None = None
    threads: int | None = None
    #: Count the bytes one step of each method writes (one extra, untimed step each).
    traffic: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - set(KNOWN_METHODS))
        if unknown:
            raise ValueError(f"unknown benchmark method(s) {unknown}; known: {list(KNOWN_METHODS)}")
        if not self.methods:
            raise ValueError("choose at least one benchmark method")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, not {self.dtype!r}")
        for name in ("hidden", "layers", "seq", "batch", "r", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.r > self.hidden:
            raise ValueError(f"r={self.r} exceeds hidden={self.hidden}")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError("hidden must be a multiple of heads, heads a multiple of kv_heads")
        self.targets = tuple(self.targets)
        self.methods = tuple(self.methods)

    def probe_lengths(self) -> list[int]:
        """Sequence lengths for the memory probes (always including ``seq``)."""
        points = self.seq_points or (max(1, self.seq // 4), max(1, self.seq // 2), self.seq)
        return sorted({int(p) for p in (*points, self.seq)})

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["targets"] = list(self.targets)
        data["methods"] = list(self.methods)
        data["seq_points"] = self.probe_lengths()
        return data


#: Named presets: ``default`` is the issue's config; ``quick`` runs in about a minute
#: on two CPU cores; ``tiny`` is what the test suite runs.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "quick": {
        "hidden": 256,
        "layers": 2,
        "heads": 4,
        "kv_heads": 4,
        "intermediate": 704,
        "seq": 256,
        "batch": 2,
        "warmup": 1,
        "repeats": 5,
    },
    "tiny": {
        "hidden": 64,
        "layers": 1,
        "heads": 4,
        "kv_heads": 2,
        "intermediate": 176,
        "seq": 16,
        "batch": 2,
        "warmup": 1,
        "repeats": 2,
        "seq_points": (8, 16),
    },
}


def preset(name: str, **overrides: Any) -> BenchConfig:
    """The config of preset ``name`` with ``overrides`` applied."""
    try:
        base = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown benchmark preset {name!r}; known: {sorted(PRESETS)}") from None
    return BenchConfig(**{**base, **overrides})
