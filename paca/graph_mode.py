"""Graph execution of a PaCA model, gated by what its backend declares.

``"compile"`` means a PaCA layer compiles with ``torch.compile(fullgraph=True)`` without
graph breaks (the suite checks it); ``"graphs"`` means the backend can capture device
graphs for evaluation (CUDA graphs, HPU graphs). Asking for either on a backend that does
not declare it is an error naming the backend, instead of a slow or wrong fallback.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from paca.backend_call import require_capability


def _backend_of(model: nn.Module) -> Any:
    backend = getattr(model, "backend", None)
    if backend is None:
        raise TypeError(
            f"expected a paca-wrapped model (paca.wrap(...)), got {type(model).__name__}"
        )
    return backend


def compile(model: nn.Module, **kwargs: Any) -> nn.Module:  # noqa: A001 - mirrors torch.compile
    """``torch.compile(model, backend=<the backend's compile backend>, **kwargs)``.

    Refused unless the model's paca backend declares ``"compile"``.
    """
    import torch

    backend = _backend_of(model)
    require_capability(backend, "compile", "paca.compile")
    if "backend" not in kwargs and backend.compile_backend() is not None:
        kwargs["backend"] = backend.compile_backend()
    return torch.compile(model, **kwargs)  # type: ignore[return-value]


def prepare_for_inference(model: nn.Module, graphs: bool = True) -> nn.Module:
    """Eval mode, plus the backend's graph capture when ``graphs`` (needs ``"graphs"``)."""
    backend = _backend_of(model)
    if not graphs:
        return model.eval()
    require_capability(backend, "graphs", "prepare_for_inference(graphs=True)")
    return backend.prepare_for_inference(model)
