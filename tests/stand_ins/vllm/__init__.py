"""Stand-in for the vllm package (see README.md): only the names OpenRLHF imports at import time.

Anything that would actually generate text raises, so a test can never pass on fake rollouts.
"""

__version__ = "0.0.0+cpu-stand-in"
STAND_IN = True


class SamplingParams:
    """Holds its keyword arguments, as vllm.SamplingParams does; generates nothing."""

    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


def __getattr__(name):
    raise RuntimeError(f"vllm.{name} is not available: this is the CPU test stand-in for vllm")
