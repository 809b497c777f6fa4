"""Loading HF models (hub ids, local directories, presets) for `HookedRecurrentModel`."""

from .hf import check_device, check_dtype, check_model_name, load_hf_model

__all__ = ["check_device", "check_dtype", "check_model_name", "load_hf_model"]
