"""Feature dashboards: streaming accumulators against brute force, the built data against an
independent pass through the spliced SAE, the page, the Neuronpedia export, notebooks, the command."""

import gzip
import json
import base64
import math
import re

import numpy as np
import pytest
import torch

from dashboard_helpers import HEAD, LAYER, small_dashboard
from writesae.dashboard.histogram import FixedHistograms, GrowingHistograms
from writesae.dashboard.scan import gate_horizons, retrieval_scores
from writesae.dashboard.topk import TopKContexts


def test_streaming_topk_equals_a_sort_of_the_whole_stream():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(7, 11, 5, generator=g).relu()  # zeros are non-firings
    tokens = torch.randint(0, 100, (7, 11), generator=g)
    top = TopKContexts(n_atoms=5, k=4, before=2, after=1)
    for start, stop in ((0, 3), (3, 4), (4, 7)):  # uneven batches
        top.update(scores[start:stop], tokens[start:stop], first_sequence=start)
    for atom in range(5):
        flat = scores[..., atom].flatten()
        order = flat.argsort(descending=True)[:4]
        expected = [(float(flat[i]), divmod(int(i), 11)) for i in order if flat[i] > 0]
        got = top.contexts(atom)
        assert [(c.value, (c.sequence, c.position)) for c in got] == expected
        for c in got:
            lo, hi = max(0, c.position - 2), min(11, c.position + 2)
            assert c.tokens == tokens[c.sequence, lo:hi].tolist()
            assert c.values == scores[c.sequence, lo:hi, atom].tolist()
            assert c.values[c.center] == c.value


def test_growing_histograms_equal_a_histogram_over_the_final_range():
    g = torch.Generator().manual_seed(1)
    hist = GrowingHistograms(n_atoms=3, n_bins=8)
    values = {a: [] for a in range(3)}
    for scale in (0.01, 0.3, 5.0, 0.02, 70.0):  # the ranges grow in jumps of several doublings
        atoms = torch.randint(0, 2, (50,), generator=g)  # atom 2 never fires
        v = torch.rand(50, generator=g, dtype=torch.float64) * scale + 1e-9
        hist.update(atoms, v)
        for a, x in zip(atoms.tolist(), v.tolist()):
            values[a].append(x)
    for a in range(2):
        high = float(hist.high[a])
        assert max(values[a]) < high <= 2 * max(values[a])  # a power of two just above the maximum
        expected, _ = np.histogram(values[a], bins=8, range=(0.0, high))
        assert hist.counts[a].tolist() == expected.tolist()
    assert hist.counts[2].sum() == 0 and hist.high[2] == 0


def test_fixed_histogram_median_bins():
    edges = torch.linspace(-1, 1, 21, dtype=torch.float64)
    hist = FixedHistograms(2, edges)
    g = torch.Generator().manual_seed(2)
    v = torch.rand(41, generator=g, dtype=torch.float64) * 2 - 1
    hist.update(torch.zeros(41, dtype=torch.long), v)
    median_bin = int(hist.median_bins()[0])
    assert float(edges[median_bin]) <= float(v.median()) < float(edges[median_bin + 1])
    assert int(hist.median_bins()[1]) == -1  # no value


def test_gate_horizons_by_a_direct_loop():
    g = torch.Generator().manual_seed(3)
    log_decay = -torch.rand(3, 30, generator=g) * 0.3
    level, max_horizon = 0.5, 6
    got = gate_horizons(log_decay, level, max_horizon)
    for b in range(3):
        for t in range(30):
            product, expected = 1.0, None
            for h in range(1, 30 - t):
                product *= math.exp(float(log_decay[b, t + h]))
                if product <= level:
                    expected = h if h <= max_horizon else max_horizon + 1
                    break
            if expected is None:  # never fell within the row
                expected = max_horizon + 1 if 30 - 1 - t >= max_horizon else -1
            assert int(got[b, t]) == expected, (b, t)


def test_retrieval_scores_are_the_norm_of_the_read_of_the_atom():
    g = torch.Generator().manual_seed(4)
    key_f, value_f = torch.randn(5, 2, 6, generator=g), torch.randn(5, 2, 4, generator=g)  # rank 2
    query = torch.randn(9, 6, generator=g)
    atoms = torch.einsum("nrk,nrv->nkv", key_f, value_f)
    expected = torch.einsum("nkv,bk->bnv", atoms, query).norm(dim=-1)
    got = retrieval_scores(query, key_f, value_f @ value_f.transpose(1, 2))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def reference_codes(model, sae, tokens):
    """Codes through the SAE spliced in at its hook (dense writes, not the scan's factor path)."""
    name = model.sae_hook_name(sae, "hook_sae_acts_post")
    with torch.no_grad():
        _, cache = model.run_with_cache_with_saes(tokens, saes=[sae], use_error_term=True, names_filter=[name])
    codes = cache[name].float().clone()
    codes[:, 0] = 0  # skip_first=1
    return codes


def test_dashboard_numbers_match_an_independent_pass():
    model, sae, tokens, data, _ = small_dashboard()
    codes = reference_codes(model, sae, tokens)
    fires = codes > 0
    alive = fires.flatten(0, 1).any(0).nonzero()[:, 0].tolist()
    assert sorted(r.index for r in data.atoms) == alive
    assert data.meta["n_positions"] == tokens.shape[0] * (tokens.shape[1] - 1)
    for record in data.atoms:
        a = record.index
        values = codes[..., a][fires[..., a]]
        assert record.count == len(values)
        assert record.frequency == pytest.approx(len(values) / data.meta["n_positions"])
        assert record.mean_activation == pytest.approx(float(values.mean()), rel=1e-4)
        assert record.max_activation == pytest.approx(float(values.max()), rel=1e-4)
        assert sum(record.activations.counts) == record.count
        top = codes[..., a].flatten().topk(len(record.contexts))
        assert [c.value for c in record.contexts] == pytest.approx(top.values.tolist(), rel=1e-4)
        c = record.contexts[0]
        window = tokens[c.sequence, c.position - c.center : c.position - c.center + len(c.tokens)]
        assert c.tokens == model.to_str_tokens(window)


def test_cosines_and_horizons_match_the_definitions():
    model, sae, tokens, data, _ = small_dashboard()
    codes = reference_codes(model, sae, tokens)
    names = [model.cfg.hook_name(LAYER, n) for n in ("hook_write_key", "hook_write_value", "hook_log_decay")]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=names)
    key, value, log_decay = (cache[n][:, :, HEAD].float() for n in names)
    atoms = sae.atom_matrices().detach().float()
    horizons = gate_horizons(log_decay, 0.5, data.meta["config"]["max_horizon"])
    for record in data.atoms:
        b, t = (codes[..., record.index] > 0).nonzero(as_tuple=True)
        writes = key[b, t][:, :, None] * value[b, t][:, None, :]
        cos = torch.nn.functional.cosine_similarity(writes.flatten(1), atoms[record.index].flatten()[None], dim=1)
        # The cosine histogram has 0.01 bins; the median is reported at its bin's centre.
        assert record.median_cosine == pytest.approx(float(cos.sort().values[(len(cos) - 1) // 2]), abs=0.0051)
        assert record.cosine_class == ("register" if record.median_cosine >= 0.05 else "bundle")
        seen = horizons[b, t][horizons[b, t] >= 0]
        if len(seen):
            assert record.horizon == int(seen.sort().values[(len(seen) - 1) // 2])
        else:
            assert record.horizon is None


def test_value_factor_readout_through_the_output_path_and_unembedding():
    model, sae, _, data, _ = small_dashboard()
    record = data.atoms[0]
    w = sae.atom_value[record.index, 0].detach()
    effect = model.W_U.detach().T @ (model.mixer(LAYER).head_output_weight(HEAD).detach() @ w)
    top = effect.topk(len(record.value_tokens[0]["top"]))
    assert [v for _, v in record.value_tokens[0]["top"]] == pytest.approx(top.values.tolist(), rel=1e-4)
    assert [t for t, _ in record.value_tokens[0]["top"]] == model.to_str_tokens(top.indices)
    assert min(v for _, v in record.value_tokens[0]["bottom"]) == pytest.approx(float(effect.min()), rel=1e-4)


def _fragments(html):
    payload = json.loads(re.search(r'<script type="application/json" id="wsd-data">(.*?)</script>', html).group(1))
    inflate = lambda b: gzip.decompress(base64.b64decode(b)).decode()  # noqa: E731
    fragments = {"list": inflate(payload["list"])}
    for i, chunk in enumerate(payload["chunks"]):
        pages = json.loads(inflate(chunk))
        assert all(payload["atoms"][a] == i for a in pages)  # the index points at the chunk that holds the page
        fragments.update(pages)
    return fragments


def test_page_is_self_contained_and_holds_every_alive_atom(tmp_path):
    _, _, _, data, out = small_dashboard()
    html = (out / "index.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//|@import|url\(""", html)  # nothing to fetch
    fragments = _fragments(html)
    assert set(fragments) == {"list"} | {str(r.index) for r in data.atoms}
    assert fragments["list"].count("<tr data-atom=") == len(data.atoms)
    strongest = max(data.atoms, key=lambda r: r.max_activation)
    assert f"Atom {strongest.index}" in fragments[str(strongest.index)]
    assert len(html) < 5000 * len(data.atoms) + 20000  # lazy, compressed pages: a few kB per atom


def test_saved_data_round_trips():
    from writesae.dashboard import DashboardData

    _, _, _, data, out = small_dashboard()
    loaded = DashboardData.load(out)
    assert loaded.meta == json.loads(json.dumps(data.meta))
    assert [r.index for r in loaded.atoms] == [r.index for r in data.atoms]
    assert loaded.atoms[0].contexts == data.atoms[0].contexts


# The fields Neuronpedia's converter (convert-saedashboard-to-neuronpedia-export.py) reads.
NEURONPEDIA_BATCH = {"model_id", "layer", "sae_id_suffix", "features"}
NEURONPEDIA_FEATURE = {
    "feature_index", "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
    "correlated_neurons_indices", "correlated_neurons_pearson", "correlated_neurons_l1",
    "correlated_features_indices", "correlated_features_pearson", "correlated_features_l1",
    "neg_str", "neg_values", "pos_str", "pos_values", "frac_nonzero", "freq_hist_data_bar_heights",
    "freq_hist_data_bar_values", "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
    "decoder_weights_dist", "activations",
}
NEURONPEDIA_ACTIVATION = {"tokens", "values", "bin_min", "bin_max", "bin_contains", "qualifying_token_index"}


def test_neuronpedia_export_has_what_the_importer_reads():
    model, _, tokens, data, out = small_dashboard()
    batches = sorted((out / "neuronpedia").glob("batch-*.json"))
    features = []
    for path in batches:
        batch = json.loads(path.read_text())
        assert NEURONPEDIA_BATCH <= set(batch) and batch["layer"] == LAYER
        features += batch["features"]
    assert [f["feature_index"] for f in features] == sorted(r.index for r in data.atoms)
    for f in features:
        record = data.atom(f["feature_index"])
        assert NEURONPEDIA_FEATURE <= set(f)
        assert f["frac_nonzero"] == record.frequency and sum(f["freq_hist_data_bar_heights"]) == record.count
        assert f["n_prompts_total"] == tokens.shape[0] and f["n_tokens_in_prompt"] == tokens.shape[1]
        for activation, context in zip(f["activations"], record.contexts):
            assert NEURONPEDIA_ACTIVATION <= set(activation)
            i = activation["qualifying_token_index"]
            assert activation["values"][i] == pytest.approx(context.value, rel=1e-4) and activation["bin_max"] == record.max_activation
            assert "".join(activation["tokens"]) == model.to_string(
                tokens[context.sequence, context.position - i : context.position - i + len(activation["tokens"])]
            )


def test_notebook_views_and_a_silent_atom():
    _, _, _, data, _ = small_dashboard()
    listing = data._repr_html_()
    assert listing.startswith('<div class="wsd"><style>') and listing.count("<tr data-atom=") == min(50, len(data.atoms))
    record = data.atoms[0]
    page = data.atom(record.index)._repr_html_()
    assert f"Atom {record.index}" in page and "Top activations" in page
    silent = sorted(set(range(data.meta["d_sae"])) - {r.index for r in data.atoms})
    if silent:
        with pytest.raises(KeyError, match="did not fire"):
            data.atom(silent[0])


def test_bad_tokens_are_refused_before_any_work():
    from writesae.dashboard import build_dashboard

    model, sae, tokens, _, _ = small_dashboard()
    with pytest.raises(ValueError, match=r"more than skip_first=1 positions, got shape \(6, 1\)"):
        build_dashboard(model, sae, tokens[:, :1], verbose=False)


def test_command_writes_refuses_to_clobber_and_overwrites(tmp_path, capsys):
    from writesae.cli import main

    _, sae, _, _, _ = small_dashboard()
    sae.save_model(tmp_path / "sae")
    args = ["dashboard", str(tmp_path / "sae"), "--model", "stdlib:qwen3.5", "--tokens", "random", "--sequences", "3", "--seq-len", "32",
            "--no-linear-response", "--out", str(tmp_path / "dash")]
    assert main(args) == 0
    assert {"index.html", "dashboard.json", "neuronpedia"} <= {p.name for p in (tmp_path / "dash").iterdir()}
    assert "atoms fired" in capsys.readouterr().out
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    capsys.readouterr()
    assert main(args + ["--resume"]) == 0  # a finished dashboard is kept
    assert "holds a finished dashboard" in capsys.readouterr().out


def test_linear_response_panel_matches_a_small_real_edit():
    """The panel's numbers against a finite difference: the atom (times its code) really added at the firing."""
    model, sae, tokens, data, _ = small_dashboard()
    record = max(data.atoms, key=lambda r: r.max_activation)
    response = record.response
    s, t = response["sequence"], response["position"]
    row = tokens[s : s + 1, : t + len(response["offsets"])]
    atom = response["code"] * sae.atom_matrices(torch.tensor([record.index]))[0].detach()
    name = model.cfg.hook_name(LAYER, f"heads.{HEAD}.hook_write")

    def edited(eps):
        def add(writes, hook):
            writes[:, t] += eps * atom
            return writes

        with torch.no_grad():
            return model.run_with_hooks(row, fwd_hooks=[(name, add)])[0, t:]

    eps = 0.05  # a central difference: the second-order term cancels, float32 rounding stays small
    shift = (edited(eps) - edited(-eps)) / (2 * eps)
    assert response["max_abs"] == pytest.approx(shift.abs().max(-1).values.tolist(), rel=2e-2, abs=1e-6)
    for j, moved in enumerate(response["tokens"]):
        token_ids = shift[j].abs().topk(len(moved)).indices
        assert [tok for tok, _ in moved] == model.to_str_tokens(token_ids)


def test_protocol_run_figures_per_atom(tmp_path):
    from writesae.dashboard.runs import atom_run_figures
    from writesae.dashboard.views import atom_page
    from writesae.protocols.logit_shift import LogitShiftConfig, run_logit_shift
    from writesae.protocols.substitution import SubstitutionConfig, run_substitution

    model, sae, tokens, data, _ = small_dashboard()
    atoms = [r.index for r in sorted(data.atoms, key=lambda r: -r.count)[:2]]
    prompts = tokens[:2, :24]
    substitution = run_substitution(model, sae, prompts, atoms=atoms, config=SubstitutionConfig(max_firings_per_atom=2, n_bootstrap=10),
                                    out_dir=tmp_path / "sub", verbose=False)
    run_logit_shift(model, sae, prompts, atoms=atoms, config=LogitShiftConfig(epsilons=(0.1, 0.3), horizons=(1, 2)),
                    out_dir=tmp_path / "shift", verbose=False)
    figures = atom_run_figures([tmp_path / "sub", tmp_path / "shift"])
    headline = substitution.summary["headline_variant"]
    for atom in atoms:
        records = [r for r in substitution.records if r.atom == atom]
        assert figures[atom]["substitution"]["n"] == len(records)
        assert figures[atom]["substitution"]["win_rate"] == pytest.approx(np.mean([r.kl_atom[headline] < r.kl_delete for r in records]))
        assert set(figures[atom]["logit_shift"]["eps"]) == {0.1, 0.3}
    record = data.atom(atoms[0])
    page = atom_page(type(record)(**{**record.__dict__, "runs": figures[atoms[0]]}))
    assert "substitution win rate" in page and "logit-shift R²" in page and "atom &lt; delete &lt; random" in page
    with pytest.raises(FileNotFoundError, match="not a protocol run directory"):
        atom_run_figures([tmp_path])
