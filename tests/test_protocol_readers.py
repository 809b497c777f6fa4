"""Reader traces: signals equal a direct edited-vs-unedited run, a head silenced by construction ranks last,
only later layers read, and a model without attention layers is refused with the fix."""

import pytest
import torch

import writesae  # noqa: F401
from helpers import random_tokens, tiny_pair
from hooked_recurrent.edits import add_to_states
from writesae import WriteSAE, WriteSAEConfig
from writesae.protocols.readers import PAPER_REFERENCE, ReadersConfig, reader_heads, run_readers


def sae_for(model, layer, head, d_sae=6, k=2):
    cfg = WriteSAEConfig.build(d_k=model.cfg.d_k, d_v=model.cfg.d_v, d_sae=d_sae, k=k)
    cfg.metadata.hook_name = model.cfg.hook_name(layer, "hook_state")
    cfg.metadata.hook_head_index = head
    cfg.metadata.model_name = model.cfg.model_name
    return WriteSAE(cfg, seed=0)


def silence(model, layer, head):
    """A hook making one attention head's output a constant (zero): nothing can move it."""

    def hook(z, hook):
        z[:, :, head] = 0
        return z

    return model.cfg.hook_name(layer, "hook_z"), hook


@torch.no_grad()
def test_signals_match_a_direct_run_and_a_silenced_head_ranks_last(tmp_path):
    model, _ = tiny_pair("tiny-random:qwen3.5")
    attention = [l for l, kind in enumerate(model.cfg.layer_types) if kind == "attention"][-1]
    cell_layer = max(l for l in model.cfg.recurrent_layers if l < attention)
    sae = sae_for(model, cell_layer, 1)
    tokens = random_tokens(2, 14, seed=3)
    config = ReadersConfig(atom_pool="frequent", n_atoms=2, max_firings_per_atom=2, window=4, n_random=2)
    with model.hooks(fwd_hooks=[silence(model, attention, 0)]):
        result = run_readers(model, sae, tokens, config=config, out_dir=tmp_path, verbose=False)
        r = result.records[0]
        # The same signal from two plain runs, edited and unedited (independent of the fork and the capture hooks).
        z_name = model.cfg.hook_name(attention, "hook_z")
        edit = -r.activation * sae.atom_matrices([r.atom])[0].detach()
        state = model.cfg.hook_name(cell_layer, "heads.1.hook_state")
        _, base = model.run_with_cache(tokens[r.sequence : r.sequence + 1], names_filter=[z_name])
        with model.hooks(fwd_hooks=[(state, add_to_states(r.position, edit))]):
            _, edited = model.run_with_cache(tokens[r.sequence : r.sequence + 1], names_filter=[z_name])
    window = slice(r.position, min(r.position + 4, tokens.shape[1]))
    direct = (edited[z_name] - base[z_name])[0, window].norm(dim=-1).mean(0)
    for h in range(model.cfg.n_attn_heads):
        assert r.signal[f"L{attention} H{h}"] == pytest.approx(float(direct[h]), rel=1e-4, abs=1e-9)
    assert r.norm == pytest.approx(float(edit.norm()), rel=1e-5)
    assert set(r.signal) == {f"L{attention} H{h}" for h in range(model.cfg.n_attn_heads)}  # later layers only
    for atom in {rec.atom for rec in result.records}:
        ranked = [row for row in result.summary["ranking"] if row["atom"] == atom]
        assert ranked[-1]["reader"] == f"L{attention} H0" and ranked[-1]["ratio"] == 0.0
        assert all(row["ratio"] > 0 for row in ranked[:-1]) and ranked[0]["rank"] == 1
    assert result.summary["headline"]["n_firings"] == len(result.records)
    assert result.summary["paper_reference"] == PAPER_REFERENCE
    assert {"report.md", "readers.png", "readers.jsonl"} <= {p.name for p in tmp_path.iterdir()}


def test_a_model_without_attention_is_refused_and_recurrent_readers_are_offered():
    model, _ = tiny_pair("tiny-random:mamba2")
    with pytest.raises(ValueError, match=r"no attention layer after layer 0.*reader_kinds=\('recurrent',\)"):
        reader_heads(model, 0, ("attention",))
    assert [l for l, _, _ in reader_heads(model, 0, ("recurrent",))] == [l for l in model.cfg.recurrent_layers if l > 0]
    with pytest.raises(ValueError, match="no recurrent layer"):
        reader_heads(model, model.cfg.n_layers - 1, ("recurrent",))
    sae = sae_for(model, 0, 2)
    result = run_readers(model, sae, random_tokens(1, 10, seed=1), verbose=False,
                         config=ReadersConfig(reader_kinds=("recurrent",), atom_pool="frequent", n_atoms=1,
                                              max_firings_per_atom=1, window=3, n_random=1))  # fmt: skip
    assert len(result.records) == 1 and all(name.split()[0] != "L0" for name in result.records[0].signal)
