"""Version of the emulated SDK release (``FAKE_SDK_VERSION``, default ``1.21.0``)."""

from habana_frameworks._fake_config import SDK_VERSION

__version__ = SDK_VERSION
version = SDK_VERSION
