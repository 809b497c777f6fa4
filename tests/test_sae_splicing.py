"""Any SAELens SAE splices into HookedRecurrentModel with HookedSAETransformer's semantics.

References are independent of the splicing code: SAELens' own ``encode``/``decode`` applied by a
plain forward hook, the unspliced model, and decoder algebra written out here.
"""

import logging

import pytest
import torch
from sae_lens import GatedSAE, GatedSAEConfig, JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig
from sae_lens import TopKSAE, TopKSAEConfig
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.transcoder import Transcoder, TranscoderConfig

import writesae  # noqa: F401  registers the architecture
from families import FAMILY_PRESETS
from helpers import random_tokens, tiny_pair
from writesae import WriteSAE, WriteSAEConfig

KINDS = {
    "standard": (StandardSAE, StandardSAEConfig, {}),
    "topk": (TopKSAE, TopKSAEConfig, {"k": 3}),
    "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig, {}),
    "gated": (GatedSAE, GatedSAEConfig, {}),
}


def stock_sae(kind, hook, d_in, seed=0, **extra):
    cls, cfg_cls, kw = KINDS[kind]
    sae = cls(cfg_cls(d_in=d_in, d_sae=2 * d_in, metadata=SAEMetadata(hook_name=hook), **kw, **extra))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():  # SAELens initialises biases and thresholds at 0: make every part matter
            p.copy_(torch.rand(p.shape, generator=g) * 0.2 - 0.05)
    return sae


def write_sae(model, layer, hook, head, seed=0, d_sae=32):
    cfg = WriteSAEConfig.build(d_k=model.cfg.d_k, d_v=model.cfg.d_v, d_sae=d_sae, k=4)
    cfg.metadata.hook_name = model.cfg.hook_name(layer, hook)
    cfg.metadata.hook_head_index = head
    return WriteSAE(cfg, seed=seed)


@pytest.fixture(scope="module")
def qwen():
    return tiny_pair("tiny-random:qwen3.5")[0]


@pytest.fixture(scope="module")
def mamba():
    return tiny_pair("tiny-random:mamba2")[0]


# (hook, kind, d_in, extra config) on tiny-random:qwen3.5: residual, MLP, attention, recurrent.
QWEN_SITES = [
    ("blocks.0.hook_resid_pre", "standard", 64, {}),
    ("blocks.0.hook_mlp_out", "topk", 64, {}),
    ("blocks.1.mlp.hook_post", "jumprelu", 128, {}),
    ("blocks.3.attn.hook_z", "gated", 64, {"reshape_activations": "hook_z"}),
    ("blocks.2.linear_attn.hook_recurrence_out", "topk", 24, {}),
    ("blocks.1.linear_attn.hook_state", "standard", 16 * 24, {}),  # every head, flattened d_k x d_v
]


def reference_splice(sae):
    """A plain hook that puts SAELens' own reconstruction in place of the activation."""

    def hook(x, hook):
        flat = x.shape[-1] != sae.cfg.d_in and sae.cfg.reshape_activations != "hook_z"
        inside = x.flatten(-2) if flat else x
        out = sae.decode(sae.encode(inside))
        return out.unflatten(-1, x.shape[-2:]) if flat else out

    return hook


@pytest.mark.parametrize("hook,kind,d_in,extra", QWEN_SITES, ids=[s[0] for s in QWEN_SITES])
@torch.no_grad()
def test_stock_saes_replace_the_activation_or_leave_the_model_exact(qwen, hook, kind, d_in, extra):
    tokens = random_tokens(2, 7, seed=3)
    sae = stock_sae(kind, hook, d_in, **extra)
    plain = qwen(tokens)
    spliced = qwen.run_with_saes(tokens, saes=[sae])
    expected = qwen.run_with_hooks(tokens, fwd_hooks=[(hook, reference_splice(sae))])
    torch.testing.assert_close(spliced, expected)
    assert (spliced - plain).abs().max() > 1e-3
    assert torch.equal(qwen.run_with_saes(tokens, saes=[sae], use_error_term=True), plain)
    assert not qwen.acts_to_saes and not any(hp.splices for hp in qwen.hook_dict.values())


@torch.no_grad()
def test_mamba2_hook_points_take_stock_saes_too(mamba):
    tokens = random_tokens(2, 7, seed=4)
    cfg = mamba.cfg
    saes = [
        stock_sae("topk", "blocks.1.hook_resid_post", cfg.d_model),
        stock_sae("standard", "blocks.0.mixer.hook_state", cfg.d_k * cfg.d_v),
    ]
    plain = mamba(tokens)
    logits, cache = mamba.run_with_cache_with_saes(tokens, saes=saes, use_error_term=True)
    assert torch.equal(logits, plain)
    assert cache["blocks.0.mixer.hook_state.hook_sae_acts_post"].shape == (2, 7, cfg.n_heads, 2 * cfg.d_k * cfg.d_v)
    assert (mamba.run_with_saes(tokens, saes=saes) - plain).abs().max() > 1e-3


def test_use_error_term_none_keeps_the_saes_own_setting(qwen):
    sae = stock_sae("standard", "blocks.0.hook_resid_pre", 64)
    sae._use_error_term = True  # SAELens' deprecated attribute, set without its warning
    qwen.add_sae(sae)
    assert qwen._acts_to_saes["blocks.0.hook_resid_pre"].use_error_term is True
    qwen.add_sae(sae, use_error_term=False)  # an explicit value wins, and replaces the first splice
    assert qwen._acts_to_saes["blocks.0.hook_resid_pre"].use_error_term is False
    assert len(qwen.acts_to_saes) == 1 and qwen.acts_to_saes["blocks.0.hook_resid_pre"] is sae
    qwen.reset_saes()
    sae._use_error_term = False
    with qwen.saes(saes=sae, use_error_term=True):
        assert qwen._acts_to_saes["blocks.0.hook_resid_pre"].use_error_term is True
    assert sae.use_error_term is False and not qwen.acts_to_saes


def test_gradients_reach_every_spliced_sae_stock_and_write_mixed(qwen):
    tokens = random_tokens(1, 10, seed=5)
    resid = stock_sae("standard", "blocks.0.hook_resid_pre", 64)
    mlp = stock_sae("topk", "blocks.2.hook_mlp_out", 64)
    state = write_sae(qwen, 1, "hook_state", head=2)
    write = write_sae(qwen, 2, "hook_write", head=1, seed=1)
    for error_term in (False, True):
        for sae in (resid, mlp, state, write):
            sae.zero_grad(set_to_none=True)
        qwen.run_with_saes(tokens, saes=[resid, mlp, state, write], use_error_term=error_term).sum().backward()
        for sae in (resid, mlp, state, write):
            grads = [p.grad for p in sae.parameters() if p.requires_grad]
            assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0, sae.cfg.metadata


def test_backward_hooks_give_every_feature_its_decoder_gradient(qwen):
    """SAELens' semantics: d loss / d acts = (d loss / d recon) . atom, for all d_sae features."""
    tokens = random_tokens(1, 9, seed=6)
    write = write_sae(qwen, 1, "hook_state", head=3)
    resid = stock_sae("topk", "blocks.1.hook_resid_pre", 64)
    grads = {}

    def keep(grad, hook):
        grads[hook.name] = grad.clone()

    key_w, key_r = write.cfg.metadata.hook_name, resid.cfg.metadata.hook_name
    names = [f"{k}.{h}" for k in (key_w, key_r) for h in ("hook_sae_acts_post", "hook_sae_recons")]
    with qwen.saes([write, resid], use_error_term=True):
        with qwen.hooks(bwd_hooks=[(n, keep) for n in names]):  # no forward hook anywhere
            qwen(tokens)[0, -1].logsumexp(-1).backward()
    atoms = write.atom_matrices()  # [d_sae, d_k, d_v], written out densely for the reference
    acts_grad = grads[f"{key_w}.hook_sae_acts_post"]
    torch.testing.assert_close(acts_grad, torch.einsum("bpkv,nkv->bpn", grads[f"{key_w}.hook_sae_recons"], atoms))
    assert (acts_grad[:, 1:] != 0).float().mean() > 0.9  # inactive features too, not only the k active ones
    torch.testing.assert_close(grads[f"{key_r}.hook_sae_acts_post"], grads[f"{key_r}.hook_sae_recons"] @ resid.W_dec.T)


@torch.no_grad()
def test_per_head_saes_answer_to_their_hook_name_and_share_it_by_head(qwen):
    tokens = random_tokens(2, 8, seed=7)
    layer, hook = 1, "blocks.1.linear_attn.hook_state"
    h2, h3 = write_sae(qwen, layer, "hook_state", head=2), write_sae(qwen, layer, "hook_state", head=3, seed=1)
    _, states = qwen.run_with_cache(tokens, names_filter=hook)
    with qwen.saes([h2]):
        assert qwen.acts_to_saes == {hook: h2}
        _, cache = qwen.run_with_cache(tokens)
        torch.testing.assert_close(cache[hook + ".hook_sae_acts_post"], h2.encode(states[hook][:, :, 2]))
        assert qwen.sae_hook_name(h3) == hook + ".heads.3.hook_sae_acts_post"  # what adding h3 will do
        qwen.add_sae(h3)
        assert qwen.acts_to_saes == {hook + ".heads.2": h2, hook + ".heads.3": h3}
        _, cache = qwen.run_with_cache(tokens)
        for h, sae in ((2, h2), (3, h3)):
            torch.testing.assert_close(cache[f"{hook}.heads.{h}.hook_sae_acts_post"], sae.encode(states[hook][:, :, h]))
        qwen.reset_saes(hook + ".heads.3")
        assert qwen.acts_to_saes == {hook: h2} and hook + ".hook_sae_acts_post" in qwen.hook_dict
    assert not qwen.acts_to_saes
    qwen.add_sae(h2)
    qwen.add_sae(h3)
    qwen.reset_saes(hook)  # the hook name removes every SAE on it
    assert not qwen.acts_to_saes and not any(".hook_sae_" in n for n in qwen.hook_dict)


@torch.no_grad()
def test_a_per_head_sae_on_a_head_axis_replaces_that_head_only(qwen):
    tokens = random_tokens(2, 6, seed=8)
    hook = "blocks.3.attn.hook_z"
    sae = stock_sae("standard", hook, qwen.cfg.d_head)
    sae.cfg.metadata.hook_head_index = 1
    _, plain = qwen.run_with_cache(tokens, names_filter=hook)
    _, spliced = qwen.run_with_cache_with_saes(tokens, saes=[sae], names_filter=hook)
    before, after = plain[hook], spliced[hook]
    assert torch.equal(after[:, :, [0, 2, 3]], before[:, :, [0, 2, 3]])
    torch.testing.assert_close(after[:, :, 1], sae.decode(sae.encode(before[:, :, 1])))


def test_displaced_saes_come_back_and_bad_names_are_reported(qwen, caplog):
    first, second = (stock_sae("standard", "blocks.2.hook_resid_post", 64, seed=s) for s in (0, 1))
    qwen.add_sae(first, use_error_term=True)
    with pytest.raises(RuntimeError, match="inside"):
        with qwen.saes([second]):
            assert qwen.acts_to_saes["blocks.2.hook_resid_post"] is second
            raise RuntimeError("inside")
    splice = qwen._acts_to_saes["blocks.2.hook_resid_post"]
    assert splice.sae is first and splice.use_error_term is True
    qwen._reset_sae("blocks.2.hook_resid_post", second)  # SAELens' private form, with a replacement
    assert qwen.acts_to_saes == {"blocks.2.hook_resid_post": second}
    qwen.reset_saes()
    with caplog.at_level(logging.WARNING):
        qwen.add_sae(stock_sae("standard", "blocks.2.hook_resid_pots", 64))
        qwen.reset_saes("blocks.2.hook_resid_post")
    assert "No hook found for blocks.2.hook_resid_pots" in caplog.text and "blocks.2.hook_resid_post" in caplog.text
    assert "No SAE is attached to blocks.2.hook_resid_post" in caplog.text and not qwen.acts_to_saes


@torch.no_grad()
def test_the_error_term_comes_from_a_clean_pass_so_feature_edits_show(qwen):
    tokens = random_tokens(1, 8, seed=9)
    hook = "blocks.1.hook_mlp_out"
    sae = stock_sae("standard", hook, 64)
    plain, clean = qwen.run_with_cache(tokens, names_filter=hook)
    zero = [(hook + ".hook_sae_acts_post", lambda acts, hook: acts * 0)]
    with qwen.saes([sae], use_error_term=True), qwen.hooks(fwd_hooks=zero):
        ablated, cache = qwen.run_with_cache(tokens, names_filter=lambda n: n.startswith(hook))
    x = clean[hook]
    error = x - sae.decode(sae.encode(x))
    torch.testing.assert_close(cache[hook + ".hook_sae_error"], error)
    torch.testing.assert_close(cache[hook + ".hook_sae_output"], error + sae.b_dec)  # decode(0) = b_dec
    assert (ablated - plain).abs().max() > 1e-4


@torch.no_grad()
def test_transcoders_read_one_hook_point_and_write_another(qwen):
    tokens = random_tokens(2, 6, seed=10)
    cfg = TranscoderConfig(
        d_in=64, d_sae=96, d_out=64, apply_b_dec_to_input=False,
        metadata=SAEMetadata(hook_name="blocks.0.ln2.hook_normalized", hook_name_out="blocks.0.hook_mlp_out"),
    )
    tc = Transcoder(cfg)
    with torch.no_grad():
        for p in tc.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    plain = qwen(tokens)
    _, clean = qwen.run_with_cache(tokens, names_filter="blocks.0.ln2.hook_normalized")
    logits, cache = qwen.run_with_cache_with_saes(tokens, saes=[tc])
    torch.testing.assert_close(
        cache["blocks.0.hook_mlp_out.hook_sae_recons"], tc.decode(tc.encode(clean["blocks.0.ln2.hook_normalized"]))
    )
    assert (logits - plain).abs().max() > 1e-3
    assert torch.equal(qwen.run_with_saes(tokens, saes=[tc], use_error_term=True), plain)


@torch.no_grad()
def test_special_tokens_can_keep_their_activation(qwen):
    tokens = random_tokens(2, 6, seed=11)
    tokens[:, 0] = 1  # a "BOS" the SAE must skip
    hook = "blocks.1.hook_resid_pre"
    sae = stock_sae("standard", hook, 64)
    _, plain = qwen.run_with_cache(tokens, names_filter=hook)
    _, cache = qwen.run_with_cache_with_saes(tokens, saes=[sae], exclude_special_tokens=[1])
    out = cache[hook + ".hook_sae_output"]
    assert torch.equal(out[:, 0], plain[hook][:, 0]) and (out[:, 1:] - plain[hook][:, 1:]).abs().max() > 1e-3


@pytest.mark.parametrize("error_term", [False, True])
def test_backward_hooks_fire_on_every_sae_hook_point_as_in_saelens(qwen, error_term):
    """Each SAE hook point in the graph gets its gradient; the error term is a constant (no gradient)."""
    write = write_sae(qwen, 2, "hook_write", head=0)
    resid = stock_sae("jumprelu", "blocks.0.hook_resid_post", 64)
    fired = set()
    names = [f"{s.cfg.metadata.hook_name}.hook_sae_{h}" for s in (write, resid)
             for h in ("input", "acts_pre", "acts_post", "recons", "output", "error")]
    with qwen.saes([write, resid], use_error_term=error_term):
        with qwen.hooks(bwd_hooks=[(n, lambda grad, hook: fired.add(hook.name)) for n in names]):
            qwen(random_tokens(1, 6, seed=13)).sum().backward()
    expected = {n for n in names if not n.endswith("error")}  # no error without the error term; constant with it
    assert fired == expected


@pytest.mark.parametrize("preset", FAMILY_PRESETS)
def test_every_family_takes_a_stock_and_a_write_sae_together(preset):
    model = tiny_pair(preset)[0]
    layer = model.cfg.recurrent_layers[-1]
    mixer = model.mixer(layer)
    resid = stock_sae("topk", f"blocks.{layer}.hook_resid_pre", model.cfg.d_model)
    cfg = WriteSAEConfig.build(d_k=mixer.d_k, d_v=mixer.d_v, d_sae=16, k=3)
    cfg.metadata.hook_name, cfg.metadata.hook_head_index = model.cfg.hook_name(layer, "hook_state"), mixer.n_heads - 1
    state = WriteSAE(cfg, seed=0)
    tokens = random_tokens(2, 6, seed=14)
    with torch.no_grad():
        plain = model(tokens)
        assert torch.equal(model.run_with_saes(tokens, saes=[resid, state], use_error_term=True), plain)
    model.run_with_saes(tokens, saes=[resid, state]).sum().backward()
    assert resid.W_enc.grad.abs().sum() > 0 and state.W_dec_key.grad.abs().sum() > 0
