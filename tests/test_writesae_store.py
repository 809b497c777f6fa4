"""The store keeps exactly what the hooks saw, split by sequence, sharded, and streams it reproducibly."""

import pytest
import torch

from families import CORE_PRESETS
from helpers import left_padding_mask, random_tokens, tiny_pair
from writesae.store import WriteStore, collect



@pytest.fixture(scope="module", params=CORE_PRESETS)
def model(request):
    return tiny_pair(request.param)[0]


@pytest.mark.parametrize("kind", ["state", "write"])
@torch.no_grad()
def test_store_holds_the_hooked_values_at_their_positions(model, kind, tmp_path):
    tokens = random_tokens(12, 40, seed=1)
    mask = left_padding_mask(12, 40, [0, 5] * 6)
    layer = model.cfg.recurrent_layers[1]
    store = collect(model, tokens, layers=[layer], heads=[0, 2], kind=kind, out_dir=tmp_path / "s",
                    attention_mask=mask, batch_size=5, shard_size=100, verbose=False)
    names = [model.cfg.hook_name(layer, n) for n in ("hook_state", "hook_write_key", "hook_write_value")]
    _, acts = model.run_with_cache(tokens, attention_mask=mask, names_filter=names)
    seen = set()
    for split in ("train", "val"):
        data = store.read(layer, 2, split)
        seq, pos = data["sequence"], data["position"]
        assert bool(mask[seq, pos].all())  # padding is never captured
        if kind == "state":
            torch.testing.assert_close(data["states"], acts[names[0]][seq, pos, 2], rtol=1e-5, atol=1e-6)
        else:
            torch.testing.assert_close(data["keys"], acts[names[1]][seq, pos, 2])
            torch.testing.assert_close(data["values"], acts[names[2]][seq, pos, 2])
        seen.add(frozenset(seq.tolist()))
    train_seqs, val_seqs = seen
    assert not train_seqs & val_seqs  # split by sequence
    assert store.num_samples(layer, 2, "train") + store.num_samples(layer, 2, "val") == int(mask.sum())
    assert len(list((tmp_path / "s" / "train" / f"L{layer}_H2").iterdir())) > 1  # sharded


@torch.no_grad()
def test_split_subsampling_and_streaming_are_reproducible(model, tmp_path):
    tokens = random_tokens(20, 32, seed=2)
    layer = model.cfg.recurrent_layers[0]
    kwargs = dict(layers=[layer], heads=[1], kind="write", positions_per_sequence=6, skip_first=2, shard_size=40,
                  seed=7, verbose=False)
    a = collect(model, tokens, out_dir=tmp_path / "a", batch_size=4, **kwargs)
    b = collect(model, tokens, out_dir=tmp_path / "b", batch_size=4, **kwargs)
    assert a.num_samples(layer, 1, "train") + a.num_samples(layer, 1, "val") == 20 * 6
    assert (a.read(layer, 1)["position"] >= 2).all()
    for split in ("train", "val"):
        assert torch.equal(a.read(layer, 1, split)["keys"], b.read(layer, 1, split)["keys"])
    source = a.source(layer, 1)
    epoch0 = list(source.batches(0, 16))
    again = list(source.batches(0, 16))
    resumed = list(source.batches(0, 16, start=2))
    assert all(torch.equal(x[0], y[0]) for x, y in zip(epoch0, again))
    assert all(torch.equal(x[0], y[0]) for x, y in zip(epoch0[2:], resumed))
    assert sum(len(k) for k, _ in epoch0) == source.num_samples
    epoch1 = list(source.batches(1, 16))
    assert not torch.equal(epoch0[0][0], epoch1[0][0])  # a new order each epoch


@torch.no_grad()
def test_writes_cost_far_fewer_bytes_than_states_and_means_are_stored(model, tmp_path):
    tokens = random_tokens(6, 30, seed=3)
    layer = model.cfg.recurrent_layers[0]
    states = collect(model, tokens, layers=[layer], heads=[0], kind="state", out_dir=tmp_path / "s", center=True, verbose=False)
    writes = collect(model, tokens, layers=[layer], heads=[0], kind="write", out_dir=tmp_path / "w", center=True, verbose=False)
    d_k, d_v = model.cfg.d_k, model.cfg.d_v
    ratio = states.bytes_per_sample(layer, 0) / writes.bytes_per_sample(layer, 0)
    assert ratio > 0.5 * (d_k * d_v) / (d_k + d_v)  # shard headers and indices aside
    data = states.read(layer, 0)
    torch.testing.assert_close(states.mean(layer, 0).float(), data["states"].double().mean(0).float())
    w = writes.read(layer, 0)
    dense_mean = torch.einsum("nk,nv->kv", w["keys"].double(), w["values"].double()) / len(w["keys"])
    torch.testing.assert_close(writes.mean(layer, 0).float(), dense_mean.float())


def test_bad_input_and_damaged_files(model, tmp_path):
    tokens = random_tokens(4, 10)
    layer = model.cfg.recurrent_layers[0]
    with pytest.raises(ValueError, match="head 99"):
        collect(model, tokens, layers=[layer], heads=[99], out_dir=tmp_path / "x", verbose=False)
    store = collect(model, tokens, layers=[layer], heads=[0], out_dir=tmp_path / "ok", verbose=False)
    with pytest.raises(FileExistsError, match="already holds a store"):
        collect(model, tokens, layers=[layer], heads=[0], out_dir=tmp_path / "ok", verbose=False)
    with pytest.raises(KeyError, match="no layer"):
        store.source(layer, 3)
    shard = next((tmp_path / "ok" / "train").rglob("shard_*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:50])
    with pytest.raises(OSError, match="damaged"):
        WriteStore(tmp_path / "ok").read(layer, 0)


@torch.no_grad()
def _variance(x):
    return float(((x - x.mean(0)) ** 2).mean())


def test_training_on_captured_states_beats_the_data_variance(tmp_path):
    """A WriteSAE trained on states of a tiny random Qwen3.5 reconstructs held-out states far below their variance.

    Random weights and random tokens give states with no structure to learn, so the head decays fast
    (its state is mostly its last few writes) and the prompts use three token ids: the states are
    then sums of a few of the head's recurring writes, which a rank-1 dictionary should find.
    """
    from writesae.training import TrainerConfig, train_on_store

    model = tiny_pair("tiny-random:qwen3.5")[0]
    layer, head = 0, 1
    with torch.no_grad():
        model.blocks[layer].linear_attn.hf.A_log.fill_(1.0)
    tokens = torch.randint(3, 6, (64, 48), generator=torch.Generator().manual_seed(4))
    store = collect(model, tokens, layers=[layer], heads=[head], kind="state", out_dir=tmp_path / "s", verbose=False)
    sae, metrics = train_on_store(
        store, layer, head, d_sae=128, k=4,
        trainer=TrainerConfig(epochs=15, batch_size=128, lr=3e-3, warmup_steps=10, progress=False),
    )
    val_states = store.read(layer, head, "val")["states"]
    variance = _variance(val_states.flatten(1))
    with torch.no_grad():
        mse = float(((sae(val_states) - val_states) ** 2).mean())
    assert metrics["best_val_mse"] == pytest.approx(mse, rel=1e-3)
    assert mse < 0.25 * variance
    assert sae.cfg.metadata.hook_name == model.cfg.hook_name(layer, "hook_state")
    model.add_sae(sae)  # fits the model it was trained on
    model.reset_saes()


@torch.no_grad()
def test_an_interrupted_collection_resumes_to_the_uninterrupted_store(model, tmp_path, monkeypatch):
    tokens = random_tokens(20, 16, seed=6)
    layer = model.cfg.recurrent_layers[0]
    kwargs = dict(layers=[layer], heads=[0, 1], kind="write", positions_per_sequence=5, batch_size=3, shard_size=7,
                  center=True, checkpoint_every=2, verbose=False)  # fmt: skip
    collect(model, tokens, out_dir=tmp_path / "full", **kwargs)

    real, calls = type(model).run_with_cache, []

    def stop_at_fifth_batch(self, *args, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(self, *args, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(type(model), "run_with_cache", stop_at_fifth_batch)
        with pytest.raises(KeyboardInterrupt):
            collect(model, tokens, out_dir=tmp_path / "cut", **kwargs)
    assert (tmp_path / "cut" / "collect_checkpoint").is_dir() and not (tmp_path / "cut" / "manifest.json").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        collect(model, tokens, out_dir=tmp_path / "cut", **kwargs)
    with pytest.raises(ValueError, match="batch_size=3, this call has 4"):
        collect(model, tokens, out_dir=tmp_path / "cut", **{**kwargs, "batch_size": 4}, mode="resume")
    collect(model, tokens, out_dir=tmp_path / "cut", **kwargs, mode="resume")

    files = sorted(p.relative_to(tmp_path / "full") for p in (tmp_path / "full").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "cut") for p in (tmp_path / "cut").rglob("*") if p.is_file())
    for name in files:
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "cut" / name).read_bytes(), name


def test_collect_refuses_arguments_that_give_an_empty_or_wrong_store(model, tmp_path):
    tokens = random_tokens(4, 10)
    layer = model.cfg.recurrent_layers[0]
    cases = [
        (dict(dtype=torch.int8), "dtype=torch.int8"),
        (dict(positions_per_sequence=0), "positions_per_sequence=0"),
        (dict(skip_first=10), "skip_first=10"),
        (dict(val_fraction=0.0), "val_fraction=0.0"),
        (dict(batch_size=0), "batch_size=0"),
        (dict(layers=[]), "layers=\\[\\]"),
        (dict(heads=[0, 0]), "repeats"),
        (dict(tokens=tokens[:, :0]), "shape \\(4, 0\\)"),
        (dict(tokens=tokens[:1]), "the (train|val) split would hold no sequence"),
    ]
    for overrides, message in cases:
        args = dict(tokens=tokens, layers=[layer], heads=[0], out_dir=tmp_path / "x", verbose=False, mode="overwrite")
        args.update(overrides)
        with pytest.raises(ValueError, match=message):
            collect(model, args.pop("tokens"), **args)
    if model.cfg.architecture.startswith("Qwen"):  # float16 cannot hold values past 65504: refused, not stored as inf
        big = tiny_pair("tiny-random:qwen3.5")[0]
        with torch.no_grad():
            big.blocks[layer].linear_attn.hf.in_proj_qkv.weight.mul_(1e6)
        with pytest.raises(ValueError, match="beyond the largest torch.float16"):
            collect(big, tokens, layers=[layer], heads=[0], kind="write", out_dir=tmp_path / "h", verbose=False,
                    dtype=torch.float16)
