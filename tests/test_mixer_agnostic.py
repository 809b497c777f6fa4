"""Code that consumes writes and states runs on every family without branching."""

import pytest
import torch

from families import FAMILY_PRESETS
from helpers import random_tokens, tiny_pair
from hooked_recurrent import HookedRecurrentModel
from hooked_recurrent.edits import add_to_states, delete_writes
from reference import rel_err


def frobenius_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine between matrices (the trailing two dims)."""
    return torch.nn.functional.cosine_similarity(a.flatten(-2), b.flatten(-2), dim=-1)


def deletion_removes_exactly_the_write(model: HookedRecurrentModel, layer: int, position: int, head: int) -> None:
    """Mixer-agnostic property: deleting W_t changes S_t by exactly -W_t (D_t acts on the same S_{t-1})."""
    name = lambda hook: model.cfg.hook_name(layer, hook)  # noqa: E731
    tokens = random_tokens(2, 60, seed=11)
    _, plain = model.run_with_cache(tokens, names_filter=[name("hook_write"), name("hook_state")])
    with model.hooks(fwd_hooks=[(name("hook_write"), delete_writes([position], heads=[head]))]):
        _, edited = model.run_with_cache(tokens, names_filter=[name("hook_state")])
    delta = edited[name("hook_state")] - plain[name("hook_state")]
    write = plain[name("hook_write")][:, position, head]
    assert rel_err(delta[:, position, head], -write) < 1e-4
    noise = 1e-6 * plain[name("hook_state")].abs().max()  # float32 rounding, relative to the states' scale
    assert delta[:, :position].abs().max() < noise  # earlier states untouched
    assert delta[:, position, [h for h in range(model.cfg.n_heads) if h != head]].abs().max() < noise
    # The same edit leaves a (decayed) trace at every later position of that head only.
    later = frobenius_cosine(delta[:, position + 1 :, head], -write[:, None].expand_as(delta[:, position + 1 :, head]))
    assert later[:, 0].min() > 0.5


@pytest.mark.parametrize("arch", FAMILY_PRESETS)
@torch.no_grad()
def test_one_function_over_every_family(arch):
    model, _ = tiny_pair(arch)
    deletion_removes_exactly_the_write(model, layer=model.cfg.recurrent_layers[1], position=23, head=2)


@pytest.mark.parametrize("arch", FAMILY_PRESETS)
@torch.no_grad()
def test_state_addition_helper_over_every_family(arch):
    model, _ = tiny_pair(arch)
    name = model.cfg.hook_name(0, "hook_state")
    delta = torch.ones(model.cfg.d_k, model.cfg.d_v)
    tokens = random_tokens(1, 30, seed=12)
    _, plain = model.run_with_cache(tokens, names_filter=[name])
    with model.hooks(fwd_hooks=[(name, add_to_states(10, delta, heads=[1]))]):
        _, edited = model.run_with_cache(tokens, names_filter=[name])
    diff = edited[name] - plain[name]
    torch.testing.assert_close(diff[0, 10, 1], delta)
    assert diff[0, :10].abs().max() < 1e-6 and diff[0, 11:, 1].abs().max() > 1e-3
