"""The CPU reference backend: plain torch, the definition of correct PaCA results.

Every other backend is tested against this one, so it favours clarity and exact
fp32 arithmetic over speed. Other backends may subclass :class:`CPUBackend` and
override only the primitives they compute differently.
"""

from paca_cpu.backend import CPUBackend

__all__ = ["CPUBackend"]
