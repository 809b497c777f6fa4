"""Edits of writes and states propagate exactly like a float64 recurrence with the same edit."""

import pytest
import torch

import hooked_recurrent.recurrence as recurrence_module
from families import CORE_PRESETS, FAMILY_PRESETS
from helpers import left_padding_mask, random_tokens, tiny_pair
from reference import factors_from_cache, input_hook_names, recurrence, rel_err

LENGTH = 150
LAYER = 1
EDITS = [(5, 0, 1), (70, 1, 3), (131, 0, 0)]  # (position, batch, head)

# float32 runs are compared at 1e-4, float64 runs at 1e-10 (relative, max-norm).
TOLERANCES = {torch.float32: 1e-4, torch.float64: 1e-10}


CASES = [(arch, torch.float32) for arch in FAMILY_PRESETS] + [(arch, torch.float64) for arch in CORE_PRESETS]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0].split(':')[1]}-{str(c[1])[6:]}")
def setup(request):
    arch, dtype = request.param
    model, _ = tiny_pair(arch, dtype=dtype)
    tokens = random_tokens(2, LENGTH, seed=5)
    mask = left_padding_mask(2, LENGTH, [0, 3])
    return model, tokens, mask, dtype


def mixer(model, hook):
    return f"blocks.{LAYER}.{model.cfg.mixer_name(LAYER)}.{hook}"


def reference_factors(model, tokens, mask):
    _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=input_hook_names(model, LAYER))
    return factors_from_cache(model, cache, LAYER)


def logits_with_reads(model, tokens, mask, reads):
    """Logits of an unedited run whose recurrence reads at LAYER are replaced by `reads`."""
    replace = lambda out, hook: reads.to(out.dtype)  # noqa: E731
    return model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[(mixer(model, "hook_recurrence_out"), replace)])


def replacement(model, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(model.cfg.d_k, model.cfg.d_v, generator=g, dtype=torch.float64).to(dtype)


@torch.no_grad()
def test_write_edits_propagate(setup):
    model, tokens, mask, dtype = setup
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    new = {(t, b, h): replacement(model, i, compute) for i, (t, b, h) in enumerate(EDITS)}

    def edit(writes, hook):
        writes = writes.clone()
        for (t, b, h), w in new.items():
            writes[b, t, h] = w
        return writes

    with model.hooks(fwd_hooks=[(mixer(model, "hook_write"), edit)]):
        logits, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=[mixer(model, "hook_state")])

    def override(t, w):
        for (tt, b, h), value in new.items():
            if tt == t:
                w[b, h] = value
        return w

    states, reads = recurrence(reference_factors(model, tokens, mask), write_override=override)
    tol = TOLERANCES[dtype]
    assert rel_err(cache[mixer(model, "hook_state")], states) < tol
    assert rel_err(logits, logits_with_reads(model, tokens, mask, reads)) < tol
    assert (logits - model(tokens, attention_mask=mask)).abs().max() > 1e-3  # the edit matters


@torch.no_grad()
def test_state_edits_propagate_and_later_hooks_see_them(setup):
    model, tokens, mask, dtype = setup
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    t, b, h = 60, 1, 2
    new_state = replacement(model, 7, compute)

    def edit(states, hook):
        states[b, t, h] = new_state  # in place, returning nothing
        return None

    with model.hooks(fwd_hooks=[(mixer(model, "hook_state"), edit)]):
        logits, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=[mixer(model, "hook_state")])

    def override(tt, s):
        if tt == t:
            s[b, h] = new_state
        return s

    states, reads = recurrence(reference_factors(model, tokens, mask), state_override=override)
    tol = TOLERANCES[dtype]
    assert rel_err(cache[mixer(model, "hook_state")], states) < tol  # later states are recomputed
    assert rel_err(logits, logits_with_reads(model, tokens, mask, reads)) < tol


@torch.no_grad()
def test_replacing_every_write_by_itself_changes_nothing(setup):
    model, tokens, mask, _ = setup
    plain = model(tokens, attention_mask=mask)
    for name in ["hook_write", "hook_write_key", "hook_write_value", "hook_state", "heads.2.hook_write"]:
        same = model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[(mixer(model, name), lambda x, hook: x.clone())])
        assert torch.equal(same, plain), name


@torch.no_grad()
def test_per_head_and_factor_edits_equal_the_dense_edit(setup):
    model, tokens, mask, dtype = setup
    t, b, h = 40, 0, 2
    scale = 3.0

    def dense(writes, hook):
        writes[b, t, h] *= scale

    def per_head(writes, hook):
        writes[b, t] *= scale

    def factor(values, hook):
        values[b, t, h] *= scale

    runs = [
        model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[(mixer(model, name), fn)])
        for name, fn in [("hook_write", dense), (f"heads.{h}.hook_write", per_head), ("hook_write_value", factor)]
    ]
    tol = TOLERANCES[dtype]
    assert rel_err(runs[1], runs[0]) < tol and rel_err(runs[2], runs[0]) < tol
    assert (runs[0] - model(tokens, attention_mask=mask)).abs().max() > 1e-4


@torch.no_grad()
def test_read_query_edit_changes_only_that_read(setup):
    model, tokens, mask, dtype = setup
    t = 90

    def edit(queries, hook):
        queries[:, t] = -queries[:, t]

    names = [mixer(model, "hook_recurrence_out"), mixer(model, "hook_state")]
    _, plain = model.run_with_cache(tokens, attention_mask=mask, names_filter=names)
    with model.hooks(fwd_hooks=[(mixer(model, "hook_read_query"), edit)]):
        _, edited = model.run_with_cache(tokens, attention_mask=mask, names_filter=names)
    reads, reads_plain = edited[names[0]], plain[names[0]]
    tol = TOLERANCES[dtype]
    assert rel_err(reads[:, :t], reads_plain[:, :t]) < tol
    assert rel_err(reads[:, t + 1 :], reads_plain[:, t + 1 :]) < tol
    assert rel_err(reads[:, t], -reads_plain[:, t]) < tol
    assert rel_err(edited[names[1]], plain[names[1]]) < tol


@torch.no_grad()
def test_edits_split_the_chunked_computation(setup, monkeypatch):
    """Edits at 3 positions cost 3 explicit steps, not a token-by-token loop."""
    model, tokens, mask, _ = setup
    steps = []
    original = recurrence_module.step
    monkeypatch.setattr(recurrence_module, "step", lambda *a, **k: steps.append(1) or original(*a, **k))

    def edit(writes, hook):
        writes[0, [10, 50, 120]] *= 2.0

    model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[(mixer(model, "heads.1.hook_write"), edit)])
    assert len(steps) == 3
