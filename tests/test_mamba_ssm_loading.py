"""Original mamba_ssm checkpoints load to the same model as the transformers format."""

import json

import pytest
import torch
from safetensors.torch import save_file

from helpers import random_tokens
from hooked_recurrent import HookedRecurrentModel
from hooked_recurrent.families.mamba2 import Mamba2
from hooked_recurrent.loading.mamba_ssm import mamba2_config_from_ssm
from hooked_recurrent.presets import build_preset


def write_mamba_ssm_checkpoint(path, hf_model, weights_format: str) -> None:
    """Save an HF Mamba-2 model the way mamba_ssm publishes checkpoints."""
    c = hf_model.config
    config = {
        "d_model": c.hidden_size,
        "d_intermediate": 0,
        "n_layer": c.num_hidden_layers,
        "vocab_size": c.vocab_size - 6,  # mamba_ssm pads this up to a multiple of 16
        "ssm_cfg": {"layer": "Mamba2", "d_state": c.state_size, "headdim": c.head_dim,
                    "ngroups": c.n_groups, "chunk_size": c.chunk_size, "expand": c.expand},
        "attn_layer_idx": [],
        "attn_cfg": {},
        "rms_norm": True,
        "residual_in_fp32": True,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": 16,
        "tie_embeddings": False,
    }
    (path / "config.json").write_text(json.dumps(config))
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v.clone() for k, v in hf_model.state_dict().items()}
    if weights_format == "bin":
        torch.save(state, path / "pytorch_model.bin")
    else:
        save_file(state, path / "model.safetensors")


@pytest.mark.parametrize("weights_format", ["bin", "safetensors"])
@torch.no_grad()
def test_mamba_ssm_and_transformers_formats_give_identical_logits(tmp_path, weights_format):
    hf = build_preset("tiny-random:mamba2", seed=4)
    (tmp_path / "hf").mkdir()
    (tmp_path / "ssm").mkdir()
    hf.save_pretrained(tmp_path / "hf")
    write_mamba_ssm_checkpoint(tmp_path / "ssm", hf, weights_format)
    tokens = random_tokens(2, 70)
    from_hf = HookedRecurrentModel.from_pretrained(str(tmp_path / "hf"), device="cpu")
    from_ssm = HookedRecurrentModel.from_pretrained(str(tmp_path / "ssm"), device="cpu")
    assert from_ssm.cfg.architecture == "Mamba2ForCausalLM"
    assert (from_ssm.cfg.d_k, from_ssm.cfg.d_v, from_ssm.cfg.n_heads) == (16, 12, 6)
    assert torch.equal(from_ssm(tokens), from_hf(tokens))
    assert torch.equal(from_hf(tokens), hf(input_ids=tokens).logits)


def test_mamba_ssm_config_defaults_and_refusals():
    # state-spaces/mamba2-370m's config leaves every SSM field at mamba_ssm's defaults.
    config = mamba2_config_from_ssm({"d_model": 1024, "n_layer": 48, "vocab_size": 50277,
                                     "ssm_cfg": {"layer": "Mamba2"}, "pad_vocab_size_multiple": 16,
                                     "tie_embeddings": True})
    assert (config.vocab_size, config.num_heads, config.head_dim, config.state_size) == (50288, 32, 64, 128)
    assert config.n_groups == 1 and config.tie_word_embeddings
    with pytest.raises(ValueError, match="Mamba1"):
        mamba2_config_from_ssm({"d_model": 8, "n_layer": 1, "vocab_size": 8, "ssm_cfg": {"layer": "Mamba1"}})
    with pytest.raises(ValueError, match="attention"):
        mamba2_config_from_ssm({"d_model": 8, "n_layer": 2, "vocab_size": 8, "attn_layer_idx": [1]})
    assert Mamba2.tiny_config().num_heads == 6
