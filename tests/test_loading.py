"""Loading: local directories and hub ids share one path; multimodal checkpoints load as their text model."""

import pytest
import torch
import transformers

from families import FAMILY_PRESETS
from helpers import char_tokenizer, random_tokens
from hooked_recurrent import HookedRecurrentModel
from hooked_recurrent.families import FAMILIES
from hooked_recurrent.presets import build_preset


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    """A tiny Qwen3.5 checkpoint with a tokenizer, saved the way the hub serves it."""
    path = tmp_path_factory.mktemp("qwen")
    build_preset("tiny-random:qwen3.5", seed=3).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


@torch.no_grad()
def test_local_directory_loads_with_its_tokenizer(saved_dir):
    model = HookedRecurrentModel.from_pretrained(str(saved_dir), device="cpu")
    reference = build_preset("tiny-random:qwen3.5", seed=3)
    tokens = random_tokens(2, 30)
    assert (model(tokens) - reference(input_ids=tokens).logits).abs().max() <= 1e-5
    assert model.cfg.model_name == str(saved_dir)

    text = "def f(x):\n    return x"
    assert model.cfg.default_prepend_bos  # the tokenizer has a BOS token
    assert model.to_tokens(text)[0, 0].item() == model.tokenizer.bos_token_id
    tokens = model.to_tokens(text, prepend_bos=False)
    assert tokens.shape == (1, len(text))
    assert model.to_string(tokens[0]) == text
    assert model.to_str_tokens(text, prepend_bos=False)[:4] == ["d", "e", "f", " "]
    assert model.to_single_token("x") == tokens[0, -1].item()
    # Text batches are padded and masked; the loss ignores padding.
    batch = model.to_tokens(["ab", "abcdef"], prepend_bos=False)
    assert batch.shape == (2, 6)
    loss = model(["ab", "abcdef"], return_type="loss")
    assert torch.isfinite(loss)


@pytest.mark.parametrize("preset", FAMILY_PRESETS)
@torch.no_grad()
def test_every_family_loads_from_a_local_directory(preset, tmp_path):
    """A saved checkpoint loads by path through the one loading path, as its own family."""
    reference = build_preset(preset, seed=3)
    reference.save_pretrained(tmp_path)
    model = HookedRecurrentModel.from_pretrained(str(tmp_path), device="cpu")
    assert model.cfg.architecture == type(reference).__name__
    tokens = random_tokens(2, 12)
    assert (model(tokens) - reference(input_ids=tokens).logits).abs().max() <= 1e-5


MULTIMODAL = [(family, name) for family in FAMILIES for name in family.multimodal_class_names]


@pytest.mark.parametrize("family, class_name", MULTIMODAL, ids=[name for _, name in MULTIMODAL])
@torch.no_grad()
def test_multimodal_checkpoint_loads_as_its_text_model(family, class_name, tmp_path):
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  patch_size=4, spatial_merge_size=2, temporal_patch_size=1)
    multimodal = getattr(transformers, class_name)
    config = multimodal.config_class(text_config=family.tiny_config().to_dict(), vision_config=vision)
    torch.manual_seed(0)
    full = multimodal(config).eval()
    full.save_pretrained(tmp_path)
    tokens = random_tokens(2, 25)
    expected = full(input_ids=tokens).logits
    loaded = HookedRecurrentModel.from_pretrained(str(tmp_path), device="cpu")
    wrapped = HookedRecurrentModel.from_pretrained("vl", hf_model=full, device="cpu")
    for model in (loaded, wrapped):
        assert model.cfg.architecture == family.hf_class_names[0]
        assert model.tokenizer is None
        assert (model(tokens) - expected).abs().max() <= 1e-5
    # Wrapping shares the multimodal model's parameters.
    assert wrapped.hf_model.model.embed_tokens.weight is full.model.language_model.embed_tokens.weight


@torch.no_grad()
def test_without_a_tokenizer_token_tensors_work_and_text_says_what_to_do():
    model = HookedRecurrentModel.from_pretrained("tiny-random:qwen3.5", device="cpu")
    assert model(random_tokens(1, 5)).shape == (1, 5, 256)
    with pytest.raises(ValueError, match="tokenizer"):
        model("hello")


def test_dtype_and_unknown_builtin_name():
    model = HookedRecurrentModel.from_pretrained("tiny-random:qwen3.5", dtype="float64", device="cpu")
    assert model.cfg.dtype == torch.float64
    assert next(model.parameters()).dtype == torch.float64
    with pytest.raises(KeyError, match="tiny-random:qwen3.5"):
        HookedRecurrentModel.from_pretrained("tiny-random:qwen9")
