"""The substitution test on constructed cases, walked once, resumed, and end to end on both architectures."""

import json

import pytest
import torch

import writesae  # noqa: F401
from families import CORE_PRESETS
from helpers import random_tokens, tiny_pair
from writesae import WriteSAE, WriteSAEConfig
from writesae.protocols.activity import Firing
from writesae.protocols.cell import Cell, trace_cell
from writesae.protocols.run import run_protocol
from writesae.protocols.substitution import VARIANTS, SubstitutionConfig, SubstitutionTest, kl_divergence, run_substitution


def sae_for(model, layer, head, hook="hook_write", d_sae=4, k=1):
    cfg = WriteSAEConfig.build(d_k=model.cfg.d_k, d_v=model.cfg.d_v, d_sae=d_sae, k=k)
    cfg.metadata.hook_name = model.cfg.hook_name(layer, hook)
    cfg.metadata.hook_head_index = head
    cfg.metadata.model_name = model.cfg.model_name
    return WriteSAE(cfg, seed=0)


@pytest.mark.parametrize("arch", CORE_PRESETS)
@torch.no_grad()
def test_atom_equal_to_the_native_write_costs_nothing_and_an_orthogonal_one_does(arch, tmp_path):
    model, _ = tiny_pair(arch)
    layer, head, t = model.cfg.recurrent_layers[1], 2, 20
    tokens = random_tokens(1, 32, seed=3)
    trace = trace_cell(model, tokens, Cell(layer, head))
    key, value = trace.key[0, t], trace.value[0, t]
    sae = sae_for(model, layer, head)
    unit = torch.nn.functional.normalize
    sae.W_dec_key.data[0, 0], sae.W_dec_value.data[0, 0] = unit(key, dim=0), unit(value, dim=0)
    other_key = unit(torch.randn(model.cfg.d_k, generator=torch.Generator().manual_seed(0)), dim=0)
    other_key = unit(other_key - (other_key @ unit(key, dim=0)) * unit(key, dim=0), dim=0)
    sae.W_dec_key.data[1, 0], sae.W_dec_value.data[1, 0] = other_key, unit(value, dim=0)

    firings = [Firing(0, t, 0, 1.0), Firing(0, t, 1, 1.0)]
    config = SubstitutionConfig(n_bootstrap=50, n_permutations=50)
    result = run_substitution(model, sae, tokens, config=config, firings=firings, out_dir=tmp_path, verbose=False)
    same, orthogonal = result.records
    assert same.cos_atom_to_write == pytest.approx(1.0, abs=1e-5)
    assert same.kl_atom["firing/matched_norm"] < 1e-9 < same.kl_delete  # at the write's norm it *is* the write
    assert orthogonal.cos_atom_to_write == pytest.approx(0.0, abs=1e-5)
    assert orthogonal.kl_atom["firing/matched_norm"] > max(1e-10, 100 * same.kl_atom["firing/matched_norm"])
    # The run directory holds what the function returned, in the documented layout.
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["n_firings"] == 2 and summary["n_positions"] == 1 and summary["headline_variant"] == "firing/activation"
    assert len((tmp_path / "records.jsonl").read_text().splitlines()) == 2
    names = {p.name for p in tmp_path.iterdir()}
    assert {"settings.json", "summary.json", "report.md", "atoms.jsonl", "kl_histogram.png"} <= names


def test_kl_divergence_by_hand():
    p, q = torch.tensor([0.0, 0.0]), torch.log(torch.tensor([0.25, 0.75]))
    expected = 0.5 * torch.log(torch.tensor(0.5 / 0.25)) + 0.5 * torch.log(torch.tensor(0.5 / 0.75))
    assert float(kl_divergence(p, q)) == pytest.approx(float(expected))


@pytest.mark.parametrize("arch", CORE_PRESETS)
def test_walking_each_sequence_once_gives_the_per_firing_records(arch):
    """Sequences walked together, one cache advanced from firing to firing, equal recomputing every
    prefix of every sequence alone, record for record."""
    model, _ = tiny_pair(arch, dtype=torch.float64)
    sae = sae_for(model, model.cfg.recurrent_layers[0], 1, hook="hook_state", d_sae=16, k=2)
    tokens = random_tokens(2, 16, seed=5)
    config = SubstitutionConfig(max_firings_per_atom=1, random_control="per_coordinate", n_bootstrap=20, n_permutations=20)
    walked = run_substitution(model, sae, tokens, config=config, verbose=False).records
    alone = SubstitutionConfig(**{**vars(config), "sequences_per_unit": 1})
    recomputed = run_substitution(model, sae, tokens, config=alone, verbose=False, recompute_prefixes=True).records
    assert len(walked) == len(recomputed) > 4 and len({r.sequence for r in walked}) == 2
    for a, b in zip(walked, recomputed):
        assert (a.sequence, a.position, a.atom, a.dominant_atom, a.top1) == (b.sequence, b.position, b.atom, b.dominant_atom, b.top1)
        for variant in VARIANTS:
            assert a.kl_atom[variant] == pytest.approx(b.kl_atom[variant], rel=1e-4, abs=1e-8)
            assert a.kl_random[variant] == pytest.approx(b.kl_random[variant], rel=1e-4, abs=1e-8)
        assert a.kl_delete == pytest.approx(b.kl_delete, rel=1e-4, abs=1e-8)


def test_an_interrupted_substitution_resumes_to_the_same_records(tmp_path, monkeypatch):
    model, _ = tiny_pair("tiny-random:mamba2")
    sae = sae_for(model, model.cfg.recurrent_layers[0], 1, hook="hook_state", d_sae=16, k=2)
    tokens = random_tokens(3, 12, seed=6)
    config = SubstitutionConfig(max_firings_per_atom=1, n_bootstrap=20, n_permutations=20, sequences_per_unit=2)
    uninterrupted = run_substitution(model, sae, tokens, config=config, verbose=False)
    original, calls = SubstitutionTest._sequences, []

    def interrupted(self, group):
        if len(calls) == 1:
            raise KeyboardInterrupt
        calls.append(group)
        return original(self, group)

    monkeypatch.setattr(SubstitutionTest, "_sequences", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_substitution(model, sae, tokens, config=config, out_dir=tmp_path, verbose=False)
    assert calls == [[0, 1]] and len((tmp_path / "records.jsonl").read_text().splitlines()) > 0
    monkeypatch.setattr(SubstitutionTest, "_sequences", original)
    resumed = run_substitution(model, sae, tokens, config=config, out_dir=tmp_path, mode="resume", verbose=False)
    assert resumed.records == uninterrupted.records  # random controls included: seeded per sequence
    assert resumed.summary["headline"] == uninterrupted.summary["headline"]
    assert json.loads((tmp_path / "summary.json").read_text())["n_firings"] == len(uninterrupted.records)


@pytest.mark.parametrize("arch", CORE_PRESETS)
def test_discovered_firings_end_to_end(arch, tmp_path):
    model, _ = tiny_pair(arch)
    layer = model.cfg.recurrent_layers[0]
    sae = sae_for(model, layer, 1, hook="hook_state", d_sae=16, k=2)
    tokens = random_tokens(3, 24, seed=5)
    config = SubstitutionConfig(max_firings_per_atom=3, min_firings=2, kl_offsets=(0, 1), n_bootstrap=100, n_permutations=200)
    protocol = SubstitutionTest(model, sae, tokens, config=config)
    result = run_protocol(protocol, tmp_path, verbose=False)
    records, summary = result.records, result.summary
    assert summary["n_firings"] == len(records) > 0
    assert summary["n_positions"] == len({(r.sequence, r.position) for r in records})
    assert max(sum(r.atom == a for r in records) for a in {r.atom for r in records}) <= 3
    headline = summary["headline"]
    assert headline["win_rate"] == pytest.approx(sum(r.kl_atom["firing/activation"] < r.kl_delete for r in records) / len(records))
    assert headline["wilson95"][0] <= headline["win_rate"] <= headline["wilson95"][1]
    assert [a["variant"] for a in summary["alternatives"]] == list(VARIANTS)
    assert all(r.position < 23 for r in records)  # a KL offset of 1 needs a next position
    for r in records:  # the random control is an atom that does not fire there
        assert r.random_atom >= 0 and r.random_atom not in protocol.activity.codes_at(r.sequence, r.position)[0].tolist()
        assert r.dominant_activation >= r.activation
    # Every alive atom of the scanned sequences is classified, tested or not.
    atoms = [json.loads(line) for line in (tmp_path / "atoms.jsonl").read_text().splitlines()]
    partition = summary["partition"]
    assert len(atoms) == partition["n_alive"] == partition["n_registers"] + partition["n_bundles"]
    assert partition["n_alive"] + partition["n_dead"] == sae.cfg.d_sae
    assert {a["atom_class"] for a in atoms} <= {"register", "bundle"}
    assert sum(a["n_tested"] for a in atoms) == len(records)
