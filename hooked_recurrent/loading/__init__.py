"""Loading HF models (hub ids, local directories, presets) for `HookedRecurrentModel`."""

from .hf import check_model_name, load_hf_model

__all__ = ["check_model_name", "load_hf_model"]
