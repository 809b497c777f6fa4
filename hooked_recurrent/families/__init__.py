"""The supported model families, one file each; every table of supported models derives from `FAMILIES`.

To add a family, write ``families/<name>.py`` with a `Family` subclass (its HF classes, where the
HF model keeps its parts, its block and mixer hook containers, its layer kinds and the config of
its ``tiny-random:<name>`` preset) and add it to `FAMILIES` below. The tests pick it up from there.
"""

from __future__ import annotations

from torch import nn

from .bamba import Bamba
from .base import Family, LayerKind
from .falcon_h1 import FalconH1
from .granitemoehybrid import GraniteMoeHybrid
from .jamba import Jamba
from .kimi_linear import KimiLinear
from .mamba2 import Mamba2
from .minimax import MiniMax
from .nemotron_h import NemotronH
from .olmo_hybrid import OlmoHybrid
from .qwen3_5 import Qwen3_5
from .qwen3_5_moe import Qwen3_5Moe
from .qwen3_next import Qwen3Next
from .zamba2 import Zamba2

__all__ = ["FAMILIES", "Family", "LayerKind", "LAYER_KINDS", "family_of", "text_model_of"]

FAMILIES: list[type[Family]] = [
    Qwen3_5, Mamba2, Qwen3Next, Qwen3_5Moe, OlmoHybrid, KimiLinear, MiniMax,
    Bamba, NemotronH, GraniteMoeHybrid, FalconH1, Zamba2, Jamba,
]  # fmt: skip

# Every layer kind by name (a kind several families share is the same object).
LAYER_KINDS: dict[str, LayerKind] = {kind.name: kind for family in FAMILIES for kind in family.layer_kinds}


def family_of(hf_model: nn.Module) -> type[Family]:
    """The family of an HF causal LM, or a clear error listing what is supported."""
    for family in FAMILIES:
        if family.matches(hf_model):
            return family
    supported = ", ".join(name for family in FAMILIES for name in family.hf_class_names)
    multimodal = ", ".join(name for family in FAMILIES for name in family.multimodal_class_names)
    raise TypeError(
        f"HookedRecurrentModel cannot hook a {type(hf_model).__name__}; supported HF classes: {supported}. "
        f"Multimodal checkpoints ({multimodal}) load as their text model through "
        "HookedRecurrentModel.from_pretrained."
    )


def text_model_of(hf_model: nn.Module) -> nn.Module:
    """The causal text model inside a multimodal model (sharing its modules), else the model itself."""
    for family in FAMILIES:
        if type(hf_model).__name__ in family.multimodal_class_names:
            return family.text_model(hf_model)
    return hf_model
