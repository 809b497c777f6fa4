"""The TransformerLens hook API: names, caches, contexts, and clear errors on bad hooks."""

import pytest
import torch
from transformer_lens.ActivationCache import ActivationCache

from helpers import random_tokens, tiny_pair

GDN_HOOKS = [
    "hook_q_pre_conv", "hook_k_pre_conv", "hook_v_pre_conv", "hook_gate_input", "hook_q", "hook_k", "hook_v",
    "hook_beta", "hook_log_decay", "hook_write_key", "hook_write_value", "hook_read_query", "hook_write",
    "hook_state", "hook_recurrence_out", "hook_out", "heads.0.hook_write", "heads.0.hook_state",
]
ATTN_HOOKS = ["hook_q", "hook_k", "hook_v", "hook_attn_scores", "hook_pattern", "hook_z", "hook_gate", "hook_out"]
BLOCK_HOOKS = [
    "hook_resid_pre", "ln1.hook_normalized", "hook_resid_mid", "ln2.hook_normalized", "mlp.hook_pre",
    "mlp.hook_pre_linear", "mlp.hook_post", "hook_mlp_out", "hook_resid_post",
]


@pytest.fixture(scope="module")
def pair():
    return tiny_pair("tiny-random:qwen3.5")


def test_every_design_hook_point_exists(pair):
    model, _ = pair
    names = set(model.hook_dict)
    assert {"hook_embed", "ln_final.hook_normalized"} <= names
    for layer, kind in enumerate(model.cfg.layer_types):
        assert {f"blocks.{layer}.{h}" for h in BLOCK_HOOKS} <= names
        mixer, hooks = ("linear_attn", GDN_HOOKS) if kind == "gated_deltanet" else ("attn", ATTN_HOOKS)
        assert {f"blocks.{layer}.{mixer}.{h}" for h in hooks} <= names, layer


@torch.no_grad()
def test_hook_shapes(pair):
    model, _ = pair
    cfg = model.cfg
    tokens = random_tokens(2, 9)
    _, cache = model.run_with_cache(tokens)
    assert isinstance(cache, ActivationCache)
    gdn = "blocks.0.linear_attn."
    expected = {
        "hook_embed": (2, 9, cfg.d_model),
        gdn + "hook_q": (2, 9, cfg.n_key_heads, cfg.d_k),
        gdn + "hook_v": (2, 9, cfg.n_heads, cfg.d_v),
        gdn + "hook_beta": (2, 9, cfg.n_heads),
        gdn + "hook_log_decay": (2, 9, cfg.n_heads),
        gdn + "hook_write_key": (2, 9, cfg.n_heads, cfg.d_k),
        gdn + "hook_write_value": (2, 9, cfg.n_heads, cfg.d_v),
        gdn + "hook_write": (2, 9, cfg.n_heads, cfg.d_k, cfg.d_v),
        gdn + "hook_state": (2, 9, cfg.n_heads, cfg.d_k, cfg.d_v),
        gdn + "hook_recurrence_out": (2, 9, cfg.n_heads, cfg.d_v),
        "blocks.3.attn.hook_k": (2, 9, cfg.n_kv_heads, cfg.d_head),
        "blocks.3.attn.hook_pattern": (2, cfg.n_attn_heads, 9, 9),
        "blocks.2.mlp.hook_post": (2, 9, cfg.d_mlp),
    }
    for name, shape in expected.items():
        assert tuple(cache[name].shape) == shape, name
    assert set(cache.keys()) == set(model.hook_dict)  # every hook point, the per-head views included
    for h in range(cfg.n_heads):
        for kind in ("hook_write", "hook_state"):
            assert torch.equal(cache[f"{gdn}heads.{h}.{kind}"], cache[gdn + kind][:, :, h])
    torch.testing.assert_close(cache["resid_pre", 1], cache["blocks.1.hook_resid_pre"])  # TL shorthand
    assert (cache[gdn + "hook_log_decay"] <= 0).all()


@torch.no_grad()
def test_unknown_hook_name_lists_closest_names(pair):
    model, _ = pair
    tokens = random_tokens(1, 4)
    for call in (
        lambda: model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.linear_attn.hook_wirte", lambda x, hook: x)]),
        lambda: model.add_hook("blocks.0.linear_attn.hook_wirte", lambda x, hook: x),
        lambda: model.run_with_cache(tokens, names_filter=["blocks.0.linear_attn.hook_wirte"]),
    ):
        with pytest.raises(KeyError, match="blocks.0.linear_attn.hook_write"):
            call()
    assert not any(hp.has_fwd_hooks() for hp in model.hook_dict.values())


@torch.no_grad()
def test_wrong_shape_or_dtype_names_hook_and_expected_shape(pair):
    model, _ = pair
    tokens = random_tokens(1, 6)
    with pytest.raises(ValueError, match=r"blocks.0.linear_attn.hook_write.*\[batch pos head d_k d_v\]"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.linear_attn.hook_write", lambda x, hook: x[:, :3])])
    with pytest.raises(ValueError, match=r"dtype torch.float64.*blocks.1.hook_resid_pre|blocks.1.hook_resid_pre.*dtype torch.float64"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_resid_pre", lambda x, hook: x.double())])
    assert not any(hp.has_fwd_hooks() for hp in model.hook_dict.values())


@torch.no_grad()
def test_context_hooks_are_removed_even_when_the_body_raises(pair):
    model, _ = pair
    calls = []
    hook = ("blocks.0.hook_resid_post", lambda x, hook: calls.append(1))
    with pytest.raises(RuntimeError, match="boom"):
        with model.hooks(fwd_hooks=[hook]):
            model(random_tokens(1, 3))
            raise RuntimeError("boom")
    with pytest.raises(ZeroDivisionError):
        model.run_with_hooks(random_tokens(1, 3), fwd_hooks=[("hook_embed", lambda x, hook: 1 / 0)])
    assert calls == [1]
    assert not any(hp.has_fwd_hooks() for hp in model.hook_dict.values())
    model(random_tokens(1, 3))
    assert calls == [1]


@torch.no_grad()
def test_residual_edit_propagates_and_reset_hooks(pair):
    model, _ = pair
    tokens = random_tokens(2, 8)
    plain = model(tokens)
    model.add_hook("blocks.2.hook_resid_pre", lambda x, hook: x * 0)
    edited = model(tokens)
    assert (edited - plain).abs().max() > 1e-3
    model.reset_hooks()
    assert torch.equal(model(tokens), plain)


def test_hf_modules_keep_their_paths_and_parameters(pair):
    model, hf = pair
    assert set(model.hf_model.state_dict()) == set(hf.state_dict())
    gdn = model.hf_model.model.layers[0].linear_attn
    assert gdn.in_proj_qkv.weight is model.blocks[0].linear_attn.hf.in_proj_qkv.weight
    own = {id(p) for p in model.parameters()}
    assert own == {id(p) for p in model.hf_model.parameters()}  # no copies anywhere


def test_cfg_describes_the_model(pair):
    model, hf = pair
    cfg, c = model.cfg, hf.config
    assert cfg.architecture == "Qwen3_5ForCausalLM"
    assert cfg.n_layers == c.num_hidden_layers and cfg.d_model == c.hidden_size and cfg.d_vocab == c.vocab_size
    assert cfg.layer_types == ["gated_deltanet"] * 3 + ["attention"]
    assert (cfg.n_heads, cfg.d_k, cfg.d_v, cfg.n_key_heads) == (4, 16, 24, 2)
    assert cfg.recurrent_layers == [0, 1, 2]
    assert cfg.hook_name(1, "hook_state") == "blocks.1.linear_attn.hook_state"


MAMBA2_HOOKS = [
    "hook_x_pre_conv", "hook_B_pre_conv", "hook_C_pre_conv", "hook_gate_input", "hook_x", "hook_B", "hook_C",
    "hook_dt", "hook_log_decay", "hook_write_key", "hook_write_value", "hook_read_query", "hook_write",
    "hook_state", "hook_recurrence_out", "hook_skip", "hook_out", "heads.5.hook_write", "heads.5.hook_state",
]


@torch.no_grad()
def test_mamba2_hook_points_and_shapes():
    model, _ = tiny_pair("tiny-random:mamba2")
    cfg = model.cfg
    names = set(model.hook_dict)
    for layer in range(cfg.n_layers):
        assert {f"blocks.{layer}.mixer.{h}" for h in MAMBA2_HOOKS} <= names
        assert {f"blocks.{layer}.{h}" for h in ("hook_resid_pre", "ln1.hook_normalized", "hook_resid_post")} <= names
        assert f"blocks.{layer}.hook_resid_mid" not in names  # no MLP in a Mamba-2 block
    _, cache = model.run_with_cache(random_tokens(2, 7))
    m = "blocks.1.mixer."
    expected = {
        m + "hook_x": (2, 7, cfg.n_heads, cfg.d_v),
        m + "hook_B": (2, 7, cfg.n_groups, cfg.d_k),
        m + "hook_dt": (2, 7, cfg.n_heads),
        m + "hook_write_key": (2, 7, cfg.n_heads, cfg.d_k),
        m + "hook_write_value": (2, 7, cfg.n_heads, cfg.d_v),
        m + "hook_write": (2, 7, cfg.n_heads, cfg.d_k, cfg.d_v),
        m + "hook_state": (2, 7, cfg.n_heads, cfg.d_k, cfg.d_v),
        m + "hook_recurrence_out": (2, 7, cfg.n_heads, cfg.d_v),
        m + "hook_skip": (2, 7, cfg.n_heads, cfg.d_v),
    }
    for name, shape in expected.items():
        assert tuple(cache[name].shape) == shape, name
    assert (cfg.layer_types, cfg.d_k, cfg.d_v, cfg.n_groups) == (["mamba2"] * 3, 16, 12, 2)
    # Group g's B is broadcast to its heads.
    torch.testing.assert_close(cache[m + "hook_write_key"][:, :, 3], cache[m + "hook_B"][:, :, 1])


@torch.no_grad()
def test_mamba1_channels_are_heads_whose_hook_points_are_built_when_named():
    model, _ = tiny_pair("tiny-random:jamba")
    cfg = model.cfg
    m = "blocks.1.mixer."
    # 80 channels: no per-head hook point exists until one is named.
    assert (cfg.n_heads, cfg.d_k, cfg.d_v, cfg.layer_types) == (80, 8, 1, ["mamba1", "mamba1", "attention"])
    assert not any(".heads." in name for name in model.hook_dict)
    names = [m + h for h in ("hook_B", "hook_dt", "hook_log_decay", "hook_write_key", "hook_write", "hook_state")]
    _, cache = model.run_with_cache(random_tokens(2, 7), names_filter=[*names, m + "heads.5.hook_state"])
    assert m + "heads.5.hook_state" in model.hook_dict and m + "heads.6.hook_state" not in model.hook_dict
    expected = {
        "hook_B": (2, 7, cfg.d_k),
        "hook_dt": (2, 7, cfg.n_heads),
        "hook_log_decay": (2, 7, cfg.n_heads, cfg.d_k),
        "hook_write": (2, 7, cfg.n_heads, cfg.d_k, 1),
        "heads.5.hook_state": (2, 7, cfg.d_k, 1),
    }
    for name, shape in expected.items():
        assert tuple(cache[m + name].shape) == shape, name
    torch.testing.assert_close(cache[m + "heads.5.hook_state"], cache[m + "hook_state"][:, :, 5])
    # Every channel's key is the layer's B, so the layer's writes together are rank-1: B_t (dt_t x_t)^T.
    torch.testing.assert_close(cache[m + "hook_write_key"][:, :, 17], cache[m + "hook_B"])
    assert torch.linalg.matrix_rank(cache[m + "hook_write"][1, 4, :, :, 0]) == 1
    with pytest.raises(KeyError, match="heads.80"):
        model.run_with_hooks(random_tokens(1, 3), fwd_hooks=[(m + "heads.80.hook_state", lambda x, hook: x)])


@torch.no_grad()
def test_zamba2_shared_block_has_one_set_of_hook_points_per_use():
    model, _ = tiny_pair("tiny-random:zamba2")
    layers = model.hf_model.model.layers
    assert layers[1].shared_transformer.self_attn.q_proj.weight is layers[2].shared_transformer.self_attn.q_proj.weight
    tokens = random_tokens(2, 9)
    calls = []
    record = lambda x, hook: calls.append(hook.name)  # noqa: E731
    model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.attn.hook_out", record) for layer in (1, 2)])
    assert calls == ["blocks.1.attn.hook_out", "blocks.2.attn.hook_out"]
    # Editing the second use leaves the first untouched and changes the logits.
    names = ["blocks.1.hook_shared_out", "blocks.2.hook_resid_post"]
    logits, plain = model.run_with_cache(tokens, names_filter=names)
    with model.hooks(fwd_hooks=[("blocks.2.hook_shared_out", lambda x, hook: torch.zeros_like(x))]):
        edited_logits, edited = model.run_with_cache(tokens, names_filter=names)
    assert torch.equal(edited[names[0]], plain[names[0]])
    assert (edited[names[1]] - plain[names[1]]).abs().max() > 1e-3 and not torch.equal(edited_logits, logits)
