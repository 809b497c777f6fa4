"""The preferred-token probe against plain hooked runs: the detected token is the argmax of the summed
log-probability drops, and every erasure and write is the edit it names."""

import pytest
import torch
from families import CORE_PRESETS
from helpers import random_tokens, tiny_pair

import writesae  # noqa: F401
from hooked_recurrent.edits import add_to_writes, delete_writes
from writesae import WriteSAE, WriteSAEConfig
from writesae.protocols.cell import Cell, trace_cell
from writesae.protocols.preferred_token import PreferredToken, PreferredTokenConfig
from writesae.protocols.run import run_protocol


def planted_write_sae(model, layer, head, trace, t):
    """A write SAE whose atom 0 is the unit native write at ``t`` (it fires there with the write's norm)."""
    cfg = WriteSAEConfig.build(d_k=model.cfg.d_k, d_v=model.cfg.d_v, d_sae=3, k=1)
    cfg.metadata.hook_name = model.cfg.hook_name(layer, "hook_write")
    cfg.metadata.hook_head_index = head
    sae = WriteSAE(cfg, seed=1)
    unit = torch.nn.functional.normalize
    for part in ("enc", "dec"):
        getattr(sae, f"W_{part}_key").data[0, 0] = unit(trace.key[0, t], dim=0)
        getattr(sae, f"W_{part}_value").data[0, 0] = unit(trace.value[0, t], dim=0)
    return sae


@pytest.mark.parametrize("arch", CORE_PRESETS)
@torch.no_grad()
def test_detection_erasure_and_writes_equal_direct_runs(arch, tmp_path):
    model, _ = tiny_pair(arch, dtype=torch.float64)
    layer, head = model.cfg.recurrent_layers[0], 1
    tokens = random_tokens(2, 14, seed=11)
    cell = Cell(layer, head)
    sae = planted_write_sae(model, layer, head, trace_cell(model, tokens[:1], cell), t=6)
    config = PreferredTokenConfig(atom=0, n_firings=4, n_nonfiring=2, multiples=(1.0, 4.0), n_bootstrap=50)
    protocol = PreferredToken(model, sae, tokens, config=config)
    assert protocol.a_star > 0 and len(protocol.erased) == 4 and len(protocol.nonfiring) == 2
    hook = cell.write_hook(model)

    def log_p(b, t, hooks=()):
        logits = model.run_with_hooks(tokens[b : b + 1], fwd_hooks=list(hooks))[0, t]
        return torch.log_softmax(logits.double(), dim=-1)

    # Detection: the argmax of sum_f (log p_native - log p_delete), each firing deleted in its own full run.
    scores = sum(log_p(f.sequence, f.position) - log_p(f.sequence, f.position, [(hook, delete_writes([f.position]))])
                 for f in protocol.erased)  # fmt: skip
    assert protocol.detection_scores == pytest.approx(scores, abs=1e-6)
    token = int(scores.argmax())
    assert protocol.preferred_token == token

    result = run_protocol(protocol, tmp_path, verbose=False)
    erasures = [r for r in result.records if r.kind == "erasure"]
    writes = [r for r in result.records if r.kind == "write"]
    assert len(erasures) == 4 and len(writes) == 2 * 2
    for r in erasures:
        deleted = log_p(r.sequence, r.position, [(hook, delete_writes([r.position]))])
        assert r.logp_edited == pytest.approx(float(deleted[token]), abs=1e-6)
        assert r.logp_native == pytest.approx(float(log_p(r.sequence, r.position)[token]), abs=1e-6)
    atom = sae.atom_matrices(torch.tensor([0]))[0].detach().double()
    for r in writes:
        added = add_to_writes({r.position: r.multiple * protocol.a_star * atom})
        assert r.logp_edited == pytest.approx(float(log_p(r.sequence, r.position, [(hook, added)])[token]), abs=1e-6)
        assert r.activation == 0 and (r.sequence, r.position) in protocol.nonfiring
    # The summed drops are positive for the preferred token by construction, and the records measure it.
    assert sum(r.logp_native - r.logp_edited for r in erasures) == pytest.approx(float(scores[token]), abs=1e-6)
    assert result.summary["headline"]["preferred_token"] == token
    assert result.summary["erasure"]["n"] == 4 and [w["multiple"] for w in result.summary["writes"]] == [1.0, 4.0]
    assert (tmp_path / "report.md").read_text().count(f"token {token}") >= 1


def test_a_given_token_skips_detection_and_a_silent_atom_is_refused():
    model, _ = tiny_pair("tiny-random:mamba2")
    layer = model.cfg.recurrent_layers[0]
    cfg = WriteSAEConfig.build(d_k=model.cfg.d_k, d_v=model.cfg.d_v, d_sae=4, k=1)
    cfg.metadata.hook_name = model.cfg.hook_name(layer, "hook_state")
    cfg.metadata.hook_head_index = 0
    sae = WriteSAE(cfg, seed=0)
    tokens = random_tokens(1, 16, seed=1)
    config = PreferredTokenConfig(atom=0, n_firings=2, n_nonfiring=1, multiples=(1.0,))
    sae.b_enc.data[:] = torch.tensor([5.0, -1e3, -1e3, -1e3])  # atom 0 fires everywhere, the rest nowhere
    protocol = PreferredToken(model, sae, tokens, config=config, preferred_token=17)
    assert protocol.preferred_token == 17 and protocol.detection_scores is None and protocol.nonfiring == []
    disjoint = PreferredToken(
        model, sae, tokens, config=PreferredTokenConfig(atom=0, n_firings=6, detection="disjoint")
    )
    assert len(disjoint.erased) == 3 and disjoint.erased == sorted(
        disjoint.erased, key=lambda f: (f.sequence, f.position)
    )
    assert disjoint.detection_scores is not None and disjoint.preferred_token == int(disjoint.detection_scores.argmax())
    with pytest.raises(ValueError, match="never fires"):
        PreferredToken(model, sae, tokens, config=PreferredTokenConfig(atom=1), preferred_token=17)
