"""``writesae demo --full``: the regular demo, then every paper protocol, on each shipped model, in one report.

- `registry`: `FULL_PROTOCOLS`, one entry per protocol (how its inputs come from the demo, its sizes).
- `context`: `DemoContext`, what a finished demo hands the protocols (model, cell, SAEs, text).
- `runner`: `run_full_demo`, the stages (resumable one by one) and the combined files.
- `report`: the combined ``report.md``, every figure next to the paper's reference value.
"""

from .context import DemoContext
from .registry import FULL_PROTOCOLS, FullProtocol
from .runner import SHIPPED_MODELS, TINY_DEMO_SIZES, FullDemoError, run_full_demo

__all__ = [
    "FULL_PROTOCOLS",
    "SHIPPED_MODELS",
    "TINY_DEMO_SIZES",
    "DemoContext",
    "FullDemoError",
    "FullProtocol",
    "run_full_demo",
]
