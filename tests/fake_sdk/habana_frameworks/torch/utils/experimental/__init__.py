"""Tiny subset of ``habana_frameworks.torch.utils.experimental`` (device-type queries)."""

import enum

from habana_frameworks import _fake_config


class synDeviceType(enum.IntEnum):  # noqa: N801 - real name
    synDeviceGaudi = 1
    synDeviceGaudi2 = 2
    synDeviceGaudi3 = 3
    synDeviceTypeInvalid = 0


def _get_device_type() -> synDeviceType:
    name = _fake_config.DEVICE_NAME.upper()
    if "GAUDI3" in name:
        return synDeviceType.synDeviceGaudi3
    if "GAUDI2" in name:
        return synDeviceType.synDeviceGaudi2
    if "GAUDI" in name:
        return synDeviceType.synDeviceGaudi
    return synDeviceType.synDeviceTypeInvalid
