"""Loading HF models (hub ids, local directories, presets) for `HookedRecurrentModel`."""

from .hf import load_hf_model, text_model_of

__all__ = ["load_hf_model", "text_model_of"]
