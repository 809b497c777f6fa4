"""Installs during generation raise the target on a tiny model."""

import pytest
import torch

from families import CORE_PRESETS
from helpers import random_tokens, tiny_pair
from writesae.protocols.cell import Cell
from writesae.protocols.install import InstallConfig, run_install, target_direction


@pytest.mark.parametrize("arch", CORE_PRESETS)
def test_installs_raise_the_target(arch, tmp_path):
    model, _ = tiny_pair(arch)
    layer = model.cfg.recurrent_layers[-1]
    prompts = random_tokens(4, 16, seed=4)
    # Random weights: the head's gated norm and later layers bend the direction, so the test asks
    # for a clear majority over 32 trials, with the key read by the last prompt query.
    config = InstallConfig(multiples=(3.0,), ends_from_last=(0, 2), new_tokens=4, rank_classes=((20, 120),),
                           targets_per_class=4, key="query")
    result = run_install(model, prompts, layer, 1, config=config, out_dir=tmp_path, verbose=False)
    records = result.records
    assert len(records) == 4 * 4 * 2
    assert all(20 <= r["rank_before"] < 120 for r in records)
    assert sum(r["rank_after"] < r["rank_before"] for r in records) >= 0.75 * len(records)
    pooled = [g for g in result.summary["groups"] if g["target_class"] == "pooled"][0]
    assert pooled["n"] == 32 and pooled["median_rank_shift"] > 0 and pooled["median_logp_lift"] > 0
    assert (tmp_path / "target_rate.png").exists() and (tmp_path / "report.md").exists()


def test_target_direction_points_the_head_output_at_the_token():
    model, _ = tiny_pair("tiny-random:qwen3.5")
    cell = Cell(1, 2)
    direction = target_direction(model, cell, 42)
    out_proj = model.mixer(1).head_output_weight(2).detach()
    scores = (out_proj @ direction) @ model.W_U.detach()  # logit change per unit read along the direction
    assert float(direction.norm()) == pytest.approx(1.0)
    assert scores[42] > 0 and scores[42] >= torch.quantile(scores, 0.9)
