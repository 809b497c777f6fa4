"""The shared recurrence engine against the float64 step-by-step reference."""

import pytest
import torch

from hooked_recurrent.recurrence import RecurrenceInputs, StepEdit, chunked_scan, run_recurrence
from reference import Factors, recurrence, rel_err

F64 = torch.float64


def lane_inputs(lanes=3, length=133, d_k=8, d_v=12, erase=True, per_channel=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    key = torch.nn.functional.normalize(torch.randn(lanes, length, d_k, generator=g, dtype=F64), dim=-1)
    query = torch.randn(lanes, length, d_k, generator=g, dtype=F64)
    value = torch.randn(lanes, length, d_v, generator=g, dtype=F64)
    if per_channel:
        # Channels from slow to very fast: one chunk's decay spans exp(-500), which only a
        # computation that never divides by a decay survives.
        log_decay = -torch.rand(lanes, length, d_k, generator=g, dtype=F64) * 0.3
        log_decay[..., 0] = -8.0
    else:
        log_decay = -torch.rand(lanes, length, generator=g, dtype=F64) * 0.3
    erase_strength = torch.rand(lanes, length, generator=g, dtype=F64) if erase else None
    return RecurrenceInputs(query=query, key=key, value=value, log_decay=log_decay, erase=erase_strength)


def as_factors(x: RecurrenceInputs) -> Factors:
    """Lanes as a batch of one-head sequences, for the reference."""
    add_head = lambda t: None if t is None else t.unsqueeze(2)  # noqa: E731
    return Factors(add_head(x.query), add_head(x.key), add_head(x.value), add_head(x.log_decay), add_head(x.erase))


@pytest.mark.parametrize("per_channel", [False, True], ids=["scalar-decay", "per-channel-decay"])
@pytest.mark.parametrize("erase", [True, False], ids=["delta-rule", "no-erase"])
@pytest.mark.parametrize("chunk", [1, 16, 64])  # 1: the loop over positions
def test_chunked_scan_equals_reference(erase, chunk, per_channel):
    x = lane_inputs(erase=erase, per_channel=per_channel)
    initial = torch.randn(3, 8, 12, dtype=F64)
    result = chunked_scan(x, initial, chunk_size=chunk, return_states=True)
    states, reads = recurrence(as_factors(x), initial_state=initial.unsqueeze(1))
    assert rel_err(result.states, states[:, :, 0]) < 1e-12
    assert rel_err(result.output, reads[:, :, 0]) < 1e-12
    assert rel_err(result.final_state, states[:, -1, 0]) < 1e-12


def test_a_per_channel_decay_with_equal_channels_is_the_scalar_decay():
    x = lane_inputs()
    diagonal = RecurrenceInputs(x.query, x.key, x.value, x.log_decay[..., None].expand(-1, -1, 8), x.erase)
    initial = torch.randn(3, 8, 12, dtype=F64)
    scalar, per_channel = (chunked_scan(i, initial, chunk_size=16, return_states=True) for i in (x, diagonal))
    assert rel_err(per_channel.states, scalar.states) < 1e-12
    assert rel_err(per_channel.output, scalar.output) < 1e-12


@pytest.mark.parametrize("per_channel", [False, True], ids=["scalar-decay", "per-channel-decay"])
def test_edits_at_positions_equal_reference(per_channel):
    x = lane_inputs(per_channel=per_channel)
    g = torch.Generator().manual_seed(1)
    write = torch.randn(3, 8, 12, generator=g, dtype=F64)
    state = torch.randn(3, 8, 12, generator=g, dtype=F64)
    edits = {
        20: StepEdit(write=write, write_lanes=torch.tensor([True, False, True])),
        64: StepEdit(state=state, state_lanes=torch.tensor([False, True, False])),
    }
    result = run_recurrence(x, torch.zeros(3, 8, 12, dtype=F64), edits=edits, chunk_size=16, return_states=True)

    def write_override(t, w):
        if t == 20:
            w[[0, 2], 0] = write[[0, 2]]
        return w

    def state_override(t, s):
        if t == 64:
            s[1, 0] = state[1]
        return s

    states, reads = recurrence(as_factors(x), write_override=write_override, state_override=state_override)
    assert rel_err(result.states, states[:, :, 0]) < 1e-12
    assert rel_err(result.output, reads[:, :, 0]) < 1e-12


def test_runtime_shape_checks_are_active():
    """The suite runs with jaxtyping + beartype import hooks; a mis-shaped input must fail."""
    x = lane_inputs()
    with pytest.raises(Exception, match="(?i)type-check|d_k"):
        RecurrenceInputs(query=x.query[..., :5], key=x.key, value=x.value, log_decay=x.log_decay)


@pytest.mark.parametrize("bad", ["key", "value", "log_decay", "erase", "query"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["scalar-decay", "per-channel-decay"])
@pytest.mark.parametrize("chunk", [1, 16])
def test_a_non_finite_input_spoils_only_later_positions(bad, per_channel, chunk):
    """NaN in one position's input leaves every earlier output as the float64 reference has it (a
    chunk's matrix products must not carry it backwards) and spoils what a token-by-token loop
    would: its own output for a query, the state and all later outputs for a write."""
    x = lane_inputs(length=40, per_channel=per_channel)
    broken = getattr(x, bad).clone()
    broken[1, 21] = float("nan")
    setattr(x, bad, broken)
    initial = torch.randn(3, 8, 12, dtype=F64)
    result = chunked_scan(x, initial, chunk_size=chunk, return_states=True)
    states, reads = recurrence(as_factors(x), initial_state=initial.unsqueeze(1))
    spoiled = torch.zeros(3, 40, dtype=torch.bool)
    spoiled[1, 21:] = True if bad != "query" else False
    spoiled[1, 21] = True
    nan_out = result.output.isnan().any(-1)
    assert torch.equal(nan_out, spoiled)
    assert rel_err(result.output[~spoiled], reads[:, :, 0][~spoiled]) < 1e-12
    assert torch.equal(reads[:, :, 0].isnan().any(-1), spoiled)  # the reference loop agrees
    if bad != "query":
        assert result.states[1, 21:].isnan().all() and result.final_state[1].isnan().all()
    assert torch.isfinite(result.states[0]).all() and torch.isfinite(result.final_state[2]).all()


@pytest.mark.parametrize("arch", ["tiny-random:qwen3.5", "tiny-random:mamba2"])
def test_a_nan_written_into_the_model_reaches_no_earlier_logit(arch):
    """A NaN written at position 5 of the first recurrent layer leaves logits 0..4 as they were,
    through every later layer (recurrent kernels and attention alike), and spoils 5 onward."""
    from helpers import random_tokens, tiny_pair

    model = tiny_pair(arch)[0]
    tokens = random_tokens(2, 24, seed=1)
    name = model.cfg.hook_name(model.cfg.recurrent_layers[0], "hook_write")

    def nan_at_5(writes, hook):
        writes = writes.clone()
        writes[0, 5] = float("nan")
        return writes

    with torch.no_grad():
        clean = model(tokens)
        logits = model.run_with_hooks(tokens, fwd_hooks=[(name, nan_at_5)])
    assert logits[0, 5:].isnan().all(-1).all() and torch.isfinite(logits[0, :5]).all()
    torch.testing.assert_close(logits[0, :5], clean[0, :5], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[1], clean[1], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_the_one_token_delta_rule_step_equals_transformers_loop():
    """`delta_rule_step` (the decode step of the delta-rule families) against transformers' own
    one-token loop, over three chained steps, with key heads shared by two value heads."""
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_recurrent_gated_delta_rule

    from hooked_recurrent.mixers.gated_deltanet import delta_rule_step

    g = torch.Generator().manual_seed(0)
    batch, key_heads, heads, d_k, d_v = 3, 2, 4, 16, 24
    ours = theirs = torch.randn(batch, heads, d_k, d_v, generator=g) * 0.3
    for _ in range(3):
        inputs = dict(
            query=torch.randn(batch, 1, key_heads, d_k, generator=g),
            key=torch.randn(batch, 1, key_heads, d_k, generator=g),
            value=torch.randn(batch, 1, heads, d_v, generator=g),
            g=-torch.rand(batch, 1, heads, generator=g),
            beta=torch.rand(batch, 1, heads, generator=g),
            output_final_state=True,
            use_qk_l2norm_in_kernel=True,
        )
        out, ours = delta_rule_step(initial_state=ours, **inputs)
        expected, theirs = torch_recurrent_gated_delta_rule(initial_state=theirs, **inputs)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert float((ours - theirs).abs().max()) < 1e-5 < float(theirs.abs().max())
