"""Amplification: an atom planted to write toward a token raises that token's rate during sampling, against the
baseline and a dose-matched random control; multi-position state additions compose."""

import pytest
import torch

import writesae  # noqa: F401
from helpers import random_tokens, tiny_pair
from hooked_recurrent import HookedRecurrentModel
from hooked_recurrent.cache import RecurrentCache
from hooked_recurrent.edits import add_to_states
from writesae import WriteSAE, WriteSAEConfig
from writesae.protocols.amplification import PAPER_REFERENCE, AmplifyConfig, run_amplification
from writesae.protocols.cell import Cell, trace_cell
from writesae.protocols.install import target_direction
from writesae.tokens import token_blocks

unit = torch.nn.functional.normalize


def sae_for(model, layer, head, d_sae=8, k=2):
    cfg = WriteSAEConfig.build(d_k=model.cfg.d_k, d_v=model.cfg.d_v, d_sae=d_sae, k=k)
    cfg.metadata.hook_name = model.cfg.hook_name(layer, "hook_state")
    cfg.metadata.hook_head_index = head
    cfg.metadata.model_name = model.cfg.model_name
    return WriteSAE(cfg, seed=0)


@torch.no_grad()
def test_additions_at_decoding_steps_accumulate_as_one_hook_per_position():
    model, _ = tiny_pair("tiny-random:mamba2")
    name = model.cfg.hook_name(1, "heads.2.hook_state")
    delta = torch.randn(model.cfg.d_k, model.cfg.d_v, generator=torch.Generator().manual_seed(0))
    tokens = random_tokens(1, 12, seed=2)
    apart = model.run_with_hooks(tokens, fwd_hooks=[(name, add_to_states(p, delta)) for p in (3, 7, 8)])
    cache, stepped = RecurrentCache(model, 1), []
    with model.hooks(fwd_hooks=[(name, add_to_states([3, 7, 8], delta))]):
        for p in range(12):  # one position per call, as decoding runs
            stepped.append(model(tokens[:, p : p + 1], cache=cache))
    assert torch.allclose(torch.cat(stepped, 1), apart, atol=1e-4)
    assert not torch.allclose(apart, model(tokens), atol=1e-3)


@torch.no_grad()
def test_an_atom_planted_toward_a_token_raises_its_rate_over_baseline_and_control(tmp_path):
    # The shipped Mamba-2 (trained, so one head can move the logits; a tiny random model's logits are nearly flat).
    model = HookedRecurrentModel.from_pretrained("stdlib:mamba2")
    cell, target = Cell(6, 1), 200  # token 200 is "\n"
    tokens = token_blocks(model, "stdlib", split="val", n_sequences=8, seq_len=8, seed=0)
    sae = sae_for(model, cell.layer, cell.head)
    # Key: the head's mean query (later reads see it positively); value: the direction that raises the target.
    sae.W_dec_key.data[0, 0] = unit(trace_cell(model, tokens, cell).query.mean((0, 1)), dim=0)
    sae.W_dec_value.data[0, 0] = target_direction(model, cell, target)
    config = AmplifyConfig(features=(0,), doses=(30.0,), dose_unit="state_norm", readout_tokens=(target,),
                           new_tokens=24, per_tokens=24, prompt_length=8, n_bootstrap=200)  # fmt: skip
    result = run_amplification(model, sae, tokens, config=config, out_dir=tmp_path, verbose=False)
    assert len(result.records) == 8 * 3 and 0 not in result.summary["headline"]["control"].split(",")
    rows = {r["condition"]: r for r in result.summary["conditions"]}
    base, top, control = rows["baseline"], rows["amplify"], rows["random"]
    assert top["rate"] > 1 and top["rate"] > 4 * max(base["rate"], control["rate"])  # dose-matched control: no effect
    assert top["change"] == pytest.approx(top["rate"] - base["rate"]) and top["p"] < 0.05 and top["cohens_d"] > 1
    assert top["ci95"][0] <= top["rate"] <= top["ci95"][1] and top["p_bonferroni"] == pytest.approx(top["p"])
    h = result.summary["headline"]
    assert h["amplify_30x_rate"] == top["rate"] and h["random_30x_rate"] == control["rate"] and h["features"] == "0"
    assert result.summary["paper_reference"] == PAPER_REFERENCE
    assert {"report.md", "amplify.png", "records.jsonl"} <= {p.name for p in tmp_path.iterdir()}
