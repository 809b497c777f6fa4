"""TransformerLens' HookedRootModule / HookPoint behaviour, asserted on the hooked recurrent models.

Each test states a property a TransformerLens user relies on; references are the unhooked model,
tensors sliced by hand, and TransformerLens' own HookPoint and Slice.
"""

import ast
import inspect
from unittest import mock

import pytest
import torch
from transformer_lens.hook_points import HookPoint as TLHookPoint
from transformer_lens.utilities import Slice

from families import FAMILY_PRESETS
from helpers import left_padding_mask, random_tokens, tiny_pair
from hooked_recurrent import HookedRecurrentModel, HookPoint, RecurrentCache

ARCHS = ["tiny-random:qwen3.5", "tiny-random:mamba2"]


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    return tiny_pair(request.param)[0]


@pytest.fixture(scope="module")
def qwen():
    return tiny_pair("tiny-random:qwen3.5")[0]


def named(activation, hook):
    return activation


def other(activation, hook):
    return None


def test_lens_handles_hold_the_callables_users_gave(qwen):
    name = "blocks.0.hook_resid_post"
    try:
        qwen.add_hook(name, named, is_permanent=True)
        qwen.add_hook(name, other, prepend=True)
        qwen.add_hook(name, named, dir="bwd")
        listed = qwen.list_hooks()
        assert set(listed) == {name}
        assert [h.user_hook for h in qwen.list_hooks(name, dir="fwd")[name]] == [other, named]
        assert [h.user_hook for h in qwen.list_hooks(dir="fwd", including_permanent=False)[name]] == [other]
        assert [h.user_hook for h in qwen.list_hooks(dir="bwd")[name]] == [named]
        assert "2 fwd" in repr(qwen.hook_dict[name]) and "1 bwd" in repr(qwen.hook_dict[name])
        # What runs is still the checked wrapper: a wrong replacement fails at the hook point.
        qwen.add_hook(name, lambda x, hook: x[:, :1])
        with pytest.raises(ValueError, match="returned shape"):
            qwen(random_tokens(1, 3))
    finally:
        qwen.reset_hooks(including_permanent=True)
    assert qwen.list_hooks() == {}


def test_names_resolve_through_mod_dict_as_in_transformerlens(qwen):
    """TransformerLens looks hook names up in mod_dict and enables them at the context level."""
    saved, level = qwen.mod_dict, qwen.context_level
    fake = mock.Mock(TLHookPoint)
    try:
        qwen.mod_dict = {**saved, "linear": fake}
        qwen.context_level = 5
        qwen._enable_hook("linear", hook=named, dir="fwd")
        fake.add_hook.assert_called_with(named, dir="fwd", level=5)
        qwen._enable_hook_with_name("linear", hook=other, dir="bwd")
        fake.add_hook.assert_called_with(other, dir="bwd", level=5)
        with pytest.raises(KeyError, match="a module, not a hook point"):
            qwen._enable_hook_with_name("blocks.0", hook=named, dir="fwd")
        with pytest.raises(KeyError, match="blocks.0.hook_resid_pre"):
            qwen._enable_hook("blocks.0.hook_resid_pr", hook=named, dir="fwd")
    finally:
        qwen.mod_dict, qwen.context_level = saved, level


# Hook points of every rank and pos position: residual [b p d], per-head [b p h d], all-head and
# one-head states [b p h k v] / [b p k v], attention pattern [b h q k] (the query axis is sliced).
SLICED = {
    "tiny-random:qwen3.5": {
        "blocks.1.hook_resid_mid": 1, "blocks.0.linear_attn.hook_write_key": 1, "blocks.0.linear_attn.hook_state": 1,
        "blocks.2.linear_attn.heads.3.hook_write": 1, "blocks.3.attn.hook_pattern": 2, "blocks.3.attn.hook_z": 1,
    },
    "tiny-random:mamba2": {"blocks.1.mixer.hook_x": 1, "blocks.2.mixer.heads.0.hook_state": 1, "hook_embed": 1},
}


@pytest.mark.parametrize("pos_slice", [-1, (1, 4), [0, 2, 5], Slice((None, None, 2))])
@torch.no_grad()
def test_pos_slice_keeps_the_same_positions_of_every_hook_point(model, pos_slice):
    tokens = random_tokens(2, 6, seed=1)
    names = SLICED[model.cfg.model_name]
    _, full = model.run_with_cache(tokens, names_filter=list(names))
    _, sliced = model.run_with_cache(tokens, names_filter=list(names), pos_slice=pos_slice)
    as_slice = Slice.unwrap(pos_slice)
    for name, axis in names.items():
        assert torch.equal(sliced[name], as_slice.apply(full[name], dim=axis)), name
    _, first = model.run_with_cache(tokens[:1], names_filter=list(names))
    _, one = model.run_with_cache(tokens[:1], names_filter=list(names), pos_slice=pos_slice, remove_batch_dim=True)
    for name, axis in names.items():
        assert torch.equal(one[name], as_slice.apply(first[name][0], dim=axis - 1)), name


@pytest.mark.parametrize("preset", FAMILY_PRESETS)
@torch.no_grad()
def test_an_unfiltered_cache_holds_every_hook_point_and_changes_nothing(preset):
    model = tiny_pair(preset)[0]
    tokens = random_tokens(2, 5, seed=2)
    logits, cache = model.run_with_cache(tokens)
    assert set(cache.keys()) == set(model.hook_dict)
    assert torch.equal(logits, model(tokens))  # bit for bit: observing never changes a result
    layer = model.cfg.recurrent_layers[0]
    mixer = model.cfg.hook_name(layer, "")
    # The per-head views are the all-head tensors' slices (a mixer with many heads builds them when named).
    for h, _ in model.mixer(layer).heads.built():
        assert torch.equal(cache[f"{mixer}heads.{h}.hook_state"], cache[f"{mixer}hook_state"][:, :, h])


def overloads(method: str) -> list[dict[str, str]]:
    """The annotations (argument -> annotation, and "return") of each ``@overload`` of a model method.

    Read from the source: under the test suite's runtime type checking every overload is wrapped
    by one checker function, which hides them from ``typing.get_overloads``.
    """
    tree = ast.parse(inspect.getsource(HookedRecurrentModel))
    found = []
    for node in tree.body[0].body:
        if isinstance(node, ast.FunctionDef) and node.name == method:
            if any(ast.unparse(d) == "overload" for d in node.decorator_list):
                args = node.args.args + node.args.kwonlyargs
                annotations = {a.arg: ast.unparse(a.annotation) for a in args if a.annotation is not None}
                found.append({**annotations, "return": ast.unparse(node.returns)})
    return found


def test_forward_and_run_with_cache_are_typed_per_return_type():
    plain = {o["return_type"]: o["return"] for o in overloads("forward") if o["stop_at_layer"] == "None" and "True" not in o["cache"]}
    assert plain == {
        "Literal['logits']": "Float[Tensor, 'batch pos d_vocab']",
        "Literal['loss']": "Loss",
        "Literal['both']": "tuple[Float[Tensor, 'batch pos d_vocab'], Loss]",
        "None": "None",
    }
    returns = {o["return"] for o in overloads("forward")}
    assert {"Float[Tensor, 'batch pos d_model']", "tuple[Any, RecurrentCache]"} <= returns  # stop_at_layer, cache=True
    cached = {o["return_cache_object"]: o["return"] for o in overloads("run_with_cache")}
    assert cached == {"Literal[True]": "tuple[Any, RecurrentActivationCache]", "Literal[False]": "tuple[Any, dict[str, Tensor]]"}


@torch.no_grad()
def test_generate_continues_from_a_given_cache(model):
    prompt = random_tokens(2, 9, seed=4)
    whole = model.generate(prompt, max_new_tokens=6, do_sample=False, stop_at_eos=False, verbose=False)
    cache = RecurrentCache(model, 2)
    model(prompt[:, :5], cache=cache)
    kept = cache.clone()
    rest = model.generate(prompt[:, 5:], max_new_tokens=6, do_sample=False, stop_at_eos=False, verbose=False, cache=cache)
    assert torch.equal(rest, whole[:, 5:])
    assert cache.position == 9 + 5 and kept.position == 5  # updated in place; a clone kept the prefix


@torch.no_grad()
def test_generate_continues_a_left_padded_cache_at_the_right_positions(qwen):
    prompt = random_tokens(3, 10, seed=6)
    mask = left_padding_mask(3, 10, [0, 2, 5])
    prompt = prompt.masked_fill(mask == 0, 0)
    whole = qwen.generate(prompt, attention_mask=mask, max_new_tokens=4, do_sample=False, stop_at_eos=False, verbose=False)
    cache = RecurrentCache(qwen, 3)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, :7]
    qwen(prompt[:, :7], attention_mask=mask[:, :7], cache=cache, position_ids=positions)
    rest = qwen.generate(prompt[:, 7:], max_new_tokens=4, do_sample=False, stop_at_eos=False, verbose=False, cache=cache)
    assert torch.equal(rest, whole[:, 7:])


@torch.no_grad()
def test_right_padding_is_refused_with_the_fix(model):
    prompt = random_tokens(2, 6, seed=5)
    mask = torch.ones_like(prompt)
    mask[1, 4:] = 0
    with pytest.raises(ValueError, match="right-padded.*Pad on the left"):
        model.generate(prompt, attention_mask=mask, max_new_tokens=2, verbose=False)


def test_our_hook_points_are_transformerlens_hook_points():
    point = HookPoint()
    assert isinstance(point, TLHookPoint) and repr(point) == "HookPoint()"
    point.add_hook(named, level=3, is_permanent=True)
    assert point.has_hooks(level=3) and not point.has_hooks(including_permanent=False)
    assert torch.equal(point(torch.ones(2)), torch.ones(2))


def test_a_cache_filled_under_autograd_clones(model):
    tokens, more = random_tokens(2, 8, seed=7), random_tokens(2, 3, seed=8)
    _, cache = model(tokens, cache=True)  # grad enabled: the states are graph tensors
    copy = cache.clone()
    layer = model.cfg.recurrent_layers[0]
    copy.set_state(layer, torch.zeros(model.cfg.d_k, model.cfg.d_v), head=0)
    assert cache.state(layer)[:, 0].abs().sum() > 0  # the original keeps its state
    with torch.no_grad():
        expected = model(torch.cat([tokens, more], 1))[:, 8:]
        torch.testing.assert_close(model(more, cache=cache.clone()), expected)


@torch.no_grad()
def test_observing_attention_leaves_the_output_and_editing_it_reaches_z(qwen):
    tokens = random_tokens(2, 7, seed=9)
    attn = "blocks.3.attn."
    plain = qwen(tokens)
    for name in ("hook_attn_scores", "hook_pattern"):
        assert torch.equal(qwen.run_with_hooks(tokens, fwd_hooks=[(attn + name, lambda x, hook: x.clone())]), plain)

    def uniform(pattern, hook):  # attend equally to every earlier position
        allowed = (pattern > 0).float()
        return allowed / allowed.sum(-1, keepdim=True)

    with qwen.hooks(fwd_hooks=[(attn + "hook_pattern", uniform)]):
        edited, cache = qwen.run_with_cache(tokens, names_filter=[attn + "hook_v", attn + "hook_z"])
    values = cache[attn + "hook_v"].repeat_interleave(qwen.cfg.n_attn_heads // qwen.cfg.n_kv_heads, dim=2)
    causal_mean = values.cumsum(1) / torch.arange(1, 8)[None, :, None, None]
    torch.testing.assert_close(cache[attn + "hook_z"], causal_mean)
    assert (edited - plain).abs().max() > 1e-4
