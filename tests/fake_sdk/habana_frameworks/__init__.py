"""Fake Intel Gaudi SDK (``habana_frameworks``) for CPU-only tests of paca.

This is NOT the real SDK. It mirrors the module layout and the Python signatures of
HabanaAI/gaudi-pytorch-bridge ``python_packages/habana_frameworks`` closely enough for
paca's HPU backend to be exercised on a CPU machine, and records every SDK call in
:mod:`habana_frameworks._fake_events`. See ``tests/fake_sdk/README.md``.

Load it with ``tests/fake_sdk/loader.py:load_fake_sdk`` rather than by hand: the
fake, like the real bridge, reads its environment once at import time.
"""

IS_FAKE = True
