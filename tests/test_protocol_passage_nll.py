"""Passage NLL (Fig. 2b) on planted register atoms: an atom equal to the write costs nothing, deleting does."""

import json
import math

import pytest
import torch
from families import CORE_PRESETS
from helpers import random_tokens, tiny_pair

import writesae  # noqa: F401
from hooked_recurrent import HookedRecurrentModel
from hooked_recurrent.edits import delete_writes
from writesae import WriteSAE, WriteSAEConfig
from writesae.protocols.activity import Firing
from writesae.protocols.cell import Cell, trace_cell
from writesae.protocols.passage_nll import PassageNLLConfig, run_passage_nll


def planted_sae(model, layer, head, trace, positions):
    """A write SAE whose atom j is the unit-norm native write at ``positions[j]``: a perfect register there."""
    cfg = WriteSAEConfig.build(d_k=model.cfg.d_k, d_v=model.cfg.d_v, d_sae=len(positions) + 1, k=1)
    cfg.metadata.hook_name = model.cfg.hook_name(layer, "hook_write")
    cfg.metadata.hook_head_index = head
    cfg.metadata.model_name = model.cfg.model_name
    sae = WriteSAE(cfg, seed=0)
    unit = torch.nn.functional.normalize
    for j, t in enumerate(positions):
        sae.W_dec_key.data[j, 0] = unit(trace.key[0, t], dim=0)
        sae.W_dec_value.data[j, 0] = unit(trace.value[0, t], dim=0)
    firings = [Firing(0, t, j, float(trace.write_norm()[0, t])) for j, t in enumerate(positions)]
    return sae, firings


def bits(logits, tokens):
    return float(torch.nn.functional.cross_entropy(logits[0, :-1].double(), tokens[0, 1:])) / math.log(2)


@pytest.mark.parametrize("arch", CORE_PRESETS)
@torch.no_grad()
def test_planted_atoms_cost_nothing_and_deletion_equals_a_direct_run(arch, tmp_path):
    model, _ = tiny_pair(arch)
    layer, head, positions = model.cfg.recurrent_layers[0], 1, [4, 9, 15, 22]
    tokens = random_tokens(1, 28, seed=2)
    trace = trace_cell(model, tokens, Cell(layer, head))
    sae, firings = planted_sae(model, layer, head, trace, positions)
    result = run_passage_nll(model, sae, tokens, firings=firings, out_dir=tmp_path, verbose=False)
    (record,) = result.records
    assert record.n_positions == len(positions) == record.n_firings
    # The atom times its code is the native write itself: the passage is unchanged.
    assert abs(record.delta_bits["atom"]) < 1e-5
    # Deleting equals deleting the same writes in one ordinary hooked run.
    deleted = model.run_with_hooks(
        tokens,
        fwd_hooks=[(Cell(layer, head).write_hook(model), delete_writes(positions))],
    )
    assert record.nll_bits["delete"] == pytest.approx(bits(deleted, tokens), abs=1e-5)
    assert record.nll_bits["base"] == pytest.approx(bits(model(tokens), tokens), abs=1e-5)
    assert abs(record.delta_bits["delete"]) > 1e-4 and abs(record.delta_bits["random"]) > 1e-4
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["headline"]["delete_bits_per_token"] == pytest.approx(record.delta_bits["delete"])
    assert {"settings.json", "records.jsonl", "report.md", "passage_nll.png"} <= {p.name for p in tmp_path.iterdir()}


@torch.no_grad()
def test_on_the_trained_model_deleting_planted_register_writes_raises_the_nll():
    """On the shipped stdlib:qwen3.5, the writes of its longest-memory head carry information: deleting
    them at the planted firings costs bits, and the atom standing in for each costs none."""
    torch.manual_seed(0)
    model = HookedRecurrentModel.from_pretrained("stdlib:qwen3.5")
    from writesae.tokens import token_blocks

    tokens = token_blocks(model, "stdlib", split="val", n_sequences=1, seq_len=96, seed=3)
    layer, head = 2, 3
    positions = list(range(8, 88, 4))
    trace = trace_cell(model, tokens, Cell(layer, head))
    sae, firings = planted_sae(model, layer, head, trace, positions)
    config = PassageNLLConfig(random_mode="add")
    (record,) = run_passage_nll(model, sae, tokens, firings=firings, config=config, verbose=False).records
    assert abs(record.delta_bits["atom"]) < 1e-4 < record.delta_bits["delete"]


def test_scanned_registers_end_to_end():
    model, _ = tiny_pair("tiny-random:mamba2")
    layer = model.cfg.recurrent_layers[0]
    cfg = WriteSAEConfig.build(d_k=model.cfg.d_k, d_v=model.cfg.d_v, d_sae=16, k=2)
    cfg.metadata.hook_name = model.cfg.hook_name(layer, "hook_state")
    cfg.metadata.hook_head_index = 0
    sae = WriteSAE(cfg, seed=0)
    tokens = random_tokens(3, 20, seed=4)
    result = run_passage_nll(
        model,
        sae,
        tokens,
        config=PassageNLLConfig(atoms="alive", max_positions=5),
        verbose=False,
    )
    assert [r.passage for r in result.records] == [0, 1, 2]
    assert all(0 < r.n_positions <= 5 for r in result.records)
    assert result.summary["headline"]["n_passages"] == 3
