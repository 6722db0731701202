"""PaCA fine-tuning under optimum-habana's GaudiTrainer (one card or several).

NOT RUN ON GAUDI HARDWARE YET: written against optimum-habana's documented API
(GaudiTrainer, GaudiTrainingArguments, GaudiConfig); only the paca glue it calls
(paca.integrations.habana) is tested, against a fake SDK. See docs/backends/hpu.md.

    # one Gaudi2, lazy mode (SW < 1.21 default; set PT_HPU_LAZY_MODE=1 on 1.21+)
    PT_HPU_LAZY_MODE=1 python examples/gaudi_trainer_clm.py --output_dir /tmp/paca-gaudi \
        --use_habana --use_lazy_mode --bf16 --max_steps 50 --per_device_train_batch_size 8

    # eager + torch.compile
    PT_HPU_LAZY_MODE=0 python examples/gaudi_trainer_clm.py --output_dir /tmp/paca-gaudi \
        --use_habana --use_lazy_mode False --torch_compile --torch_compile_backend hpu_backend \
        --bf16 --max_steps 50

    # 8 cards with DeepSpeed ZeRO-2 (gaudi_spawn.py ships with optimum-habana's examples)
    python gaudi_spawn.py --world_size 8 --use_deepspeed examples/gaudi_trainer_clm.py \
        --deepspeed examples/deepspeed/ds_zero2_bf16.json --output_dir /tmp/paca-gaudi \
        --use_habana --use_lazy_mode --bf16 --max_steps 50

``--model_name_or_path`` takes a hub name or a local folder; without it a tiny
random-init LLaMA is trained on generated data (no download).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

import paca
from paca.tiny import byte_tokenizer, instruction_dataset, tiny_llama, tokenize_for_clm

try:
    from optimum.habana import GaudiTrainingArguments
except ImportError:
    sys.exit("this example needs optimum-habana on a Gaudi machine: pip install 'paca[hpu]'")

from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

from paca.integrations.habana import make_gaudi_trainer


@dataclass
class ScriptArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "hub name or path"})
    r: int = field(default=8, metadata={"help": "PaCA columns per layer"})
    target_modules: str = field(
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        metadata={"help": "comma-separated module names"},
    )
    max_seq_length: int = field(default=512, metadata={"help": "fixed (padded) length"})
    num_examples: int = field(default=2000)


class TensorDataset(torch.utils.data.Dataset):
    """Rows of fixed-length tensors (static shapes: one graph for every step)."""

    def __init__(self, columns: dict[str, torch.Tensor]) -> None:
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.columns.items()}


def main() -> None:
    script_args, args = HfArgumentParser(
        (ScriptArguments, GaudiTrainingArguments)
    ).parse_args_into_dataclasses()
    if script_args.model_name_or_path:
        tok = AutoTokenizer.from_pretrained(script_args.model_name_or_path)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        model = AutoModelForCausalLM.from_pretrained(
            script_args.model_name_or_path, torch_dtype=torch.bfloat16
        )
    else:
        tok = byte_tokenizer()
        model = tiny_llama(vocab_size=len(tok), seed=args.seed)
    data = tokenize_for_clm(
        instruction_dataset(script_args.num_examples, seed=args.seed),
        tok,
        seq_len=script_args.max_seq_length,
    )
    config = paca.PacaConfig(
        r=script_args.r, target_modules=script_args.target_modules.split(","), seed=args.seed
    )
    pm = paca.wrap(model, config, backend="hpu")
    pm.print_trainable_parameters()
    trainer = make_gaudi_trainer(pm, args, train_dataset=TensorDataset(data))
    trainer.train()


if __name__ == "__main__":
    main()
