"""Small test utilities shared by several test modules."""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn


def saved_activation_bytes(
    fn: Callable[[], torch.Tensor], exclude: Iterable[torch.Tensor] = ()
) -> tuple[torch.Tensor, int, list[torch.Tensor]]:
    """Run ``fn`` and count bytes autograd saves for backward, excluding ``exclude``.

    The project's one counter (:class:`paca.bench.memory.SavedActivationCounter`):
    tensors sharing storage with an excluded tensor (parameters, buffers and views of
    them) are not activations; whole storages count, each once. Returns the result,
    the bytes and the saved tensors (for messages).
    """
    from paca.bench.memory import saved_activation_bytes as count

    out, counter = count(fn, exclude, keep=True)
    return out, counter.total_bytes, counter.saved


def params_and_buffers(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def make_distribution(
    root: Path, dist: str, entry_points: dict[str, str], modules: dict[str, str]
) -> None:
    """A fake installed distribution: a .dist-info folder plus modules, under ``root``.

    The folder name is normalized (``paca_toy-1.2.3.dist-info``) as pip writes it;
    importlib.metadata derives the distribution's identity from it.
    """
    info = root / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    lines = ["[paca.backends]"] + [f"{k} = {v}" for k, v in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    for name, source in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(source))


#: Leaf names of a transformers ViT's attention projections, by role: transformers 5.x
#: names them ``layers.N.attention.q_proj``, 4.x ``encoder.layer.N.attention.attention.query``.
VIT_PROJECTION_NAMES = {"q": ("q_proj", "query"), "k": ("k_proj", "key"), "v": ("v_proj", "value")}


def vit_projections(model: nn.Module, *roles: str) -> list[str]:
    """The leaf names of ``model``'s ViT attention projections ``roles`` (``"q"``, ``"k"``,
    ``"v"``) as the installed transformers calls them, for ``target_modules``.

    Exactly one spelling per role must name ``nn.Linear`` layers of the model, so a rename
    in a future transformers fails here instead of silently targeting nothing.
    """
    leaves = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    names = []
    for role in roles:
        spellings = VIT_PROJECTION_NAMES[role]
        found = [n for n in spellings if n in leaves]
        assert len(found) == 1, f"ViT {role} projection: expected one of {spellings}"
        names.append(found[0])
    return names


#: Source of a fake backend plugin module: an available "toy" backend (never
#: auto-selected) and an unavailable, high-priority "toy-off" one.
TOY_PLUGIN = """
from paca.hookspecs import hookimpl
from paca_cpu import CPUBackend

class Toy(CPUBackend):
    name = "toy"
    priority = None

class ToyOff(CPUBackend):
    name = "toy-off"
    priority = 100

    @classmethod
    def is_available(cls):
        return False

    @classmethod
    def unavailable_reason(cls):
        return "no toy device attached"

@hookimpl
def paca_backends():
    return [Toy, ToyOff]
"""
