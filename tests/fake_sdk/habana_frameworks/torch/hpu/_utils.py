"""Device-index helper (mirrors the bridge's ``hpu/_utils.py``)."""

import torch


def _get_device_index(device, optional=True) -> int:
    """``None`` -> current device; ``int``; ``"hpu"``/``"hpu:N"``; ``torch.device("hpu", N)``."""
    if device is None:
        if not optional:
            raise ValueError("Expected a device, got None")
        from habana_frameworks.torch import hpu

        return hpu._current_device_index
    if isinstance(device, str):
        device = torch.device(device)
    if isinstance(device, torch.device):
        if device.type != "hpu":
            raise ValueError(f"Expected a hpu device, but got: {device}")
        if device.index is None:
            from habana_frameworks.torch import hpu

            return hpu._current_device_index
        return device.index
    if isinstance(device, int):
        return device
    raise ValueError(f"Cannot interpret {device!r} as a hpu device")
