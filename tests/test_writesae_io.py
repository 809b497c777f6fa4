"""Files: SAELens round trip in a fresh process, idempotent registration, atomic saves, clear errors."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jaxtyping
import pytest
import torch

with jaxtyping.install_import_hook("writesae", "beartype.beartype"):
    import writesae
    from writesae import CheckpointError, WriteSAE, WriteSAEConfig
    from writesae import io as wio

from sae_lens.saes.sae import SAEMetadata

REPO_ROOT = Path(writesae.__file__).resolve().parent.parent


def make_sae(**kw) -> WriteSAE:
    torch.manual_seed(0)
    meta = SAEMetadata(hook_name="blocks.9.linear_attn.hook_state", hook_head_index=4, model_name="tiny-qwen3.5")
    cfg = WriteSAEConfig.build(d_k=6, d_v=5, d_sae=16, k=3, metadata=meta, **kw)
    sae = WriteSAE(cfg)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    return sae


def test_fresh_process_loads_equal_sae_and_registration_is_idempotent(tmp_path: Path) -> None:
    saes = {
        "bilinear": make_sae(sparsity="batchtopk", input_mean="fixed", rank=2),
        "flat": make_sae(variant="flat"),
        "bilinear_flat": make_sae(variant="bilinear_flat", rank=2, input_mean="fixed"),
    }
    states = torch.randn(4, 6, 5)
    for name, sae in saes.items():
        sae.save_model(tmp_path / name)
        torch.save({"x": states, "out": sae(states), "codes": sae.encode(states)}, tmp_path / f"{name}.pt")
    script = textwrap.dedent(
        f"""
        import json
        import torch
        import writesae  # the only thing a user does before loading
        import sae_lens

        out = {{}}
        for name in {list(saes)}:
            sae = sae_lens.SAE.load_from_disk(r"{tmp_path}/" + name)
            ref = torch.load(r"{tmp_path}/" + name + ".pt")
            out[name] = {{
                "cls": type(sae).__name__,
                "cfg": sae.cfg.to_dict(),
                "state": {{k: v.tolist() for k, v in sae.state_dict().items()}},
                "out_equal": bool(torch.equal(sae(ref["x"]), ref["out"])),
                "codes_equal": bool(torch.equal(sae.encode(ref["x"]), ref["codes"])),
            }}

        # Registration survives re-import and importlib.reload, and follows reloaded classes.
        import importlib
        import writesae.sae, writesae.training_sae
        from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY
        importlib.reload(writesae)                      # re-import: no "already registered" error
        importlib.reload(writesae.sae)                  # new class objects ...
        importlib.reload(writesae.training_sae)
        importlib.reload(writesae)                      # ... the registry follows them
        assert SAE_CLASS_REGISTRY["write_sae"][0] is writesae.sae.WriteSAE
        assert SAE_TRAINING_CLASS_REGISTRY["write_sae"][0] is writesae.training_sae.WriteTrainingSAE
        again = sae_lens.SAE.load_from_disk(r"{tmp_path}/bilinear")
        assert type(again) is writesae.sae.WriteSAE
        print(json.dumps(out))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    for name, sae in saes.items():
        got = loaded[name]
        assert got["cls"] == "WriteSAE"
        assert got["cfg"] == json.loads(json.dumps(sae.cfg.to_dict()))
        assert got["cfg"]["metadata"]["hook_head_index"] == 4
        for key, tensor in sae.state_dict().items():
            assert torch.equal(torch.tensor(got["state"][key]), tensor), key
        assert got["out_equal"] and got["codes_equal"]


def test_save_is_atomic_when_interrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sae = make_sae()
    target = tmp_path / "sae"
    sae.save_model(target)
    (target / "notes.txt").write_text("kept")  # a file saved next to the SAE by someone else
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(wio, "save_file", crash)
    with torch.no_grad():
        sae.b_dec.add_(1.0)
    with pytest.raises(OSError, match="simulated"):
        sae.save_model(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # old copy untouched
    assert [p.name for p in tmp_path.iterdir()] == ["sae"]  # no half-written leftovers
    monkeypatch.undo()
    sae.save_model(target)
    assert (target / "notes.txt").read_text() == "kept"
    loaded = WriteSAE.load_from_disk(target)
    assert torch.equal(loaded.b_dec, sae.b_dec)


def test_interrupted_swap_points_to_the_previous_copy(tmp_path: Path) -> None:
    make_sae().save_model(tmp_path / "sae")
    os.replace(tmp_path / "sae", tmp_path / ".sae.old-1234abcd")  # crash between the two renames
    with pytest.raises(CheckpointError, match=r"previous complete copy is .*\.sae\.old-1234abcd"):
        WriteSAE.load_from_disk(tmp_path / "sae")


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda b: b[: len(b) // 2], "truncated: tensor"),
        (lambda b: b[:5], "truncated: 5 bytes"),
        (lambda b: b[:8] + b"{not json" + b[17:], "header is not valid JSON"),
        (lambda b: b + b"\0\0\0\0", "4 bytes after the last tensor"),
        (lambda b: b[:-4] + bytes(x ^ 0xFF for x in b[-4:]), "SHA-256 differs"),
    ],
)
def test_damaged_weights_file_is_named_with_the_problem(tmp_path: Path, damage, match: str) -> None:
    make_sae().save_model(tmp_path / "sae")
    weights = tmp_path / "sae" / "sae_weights.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(CheckpointError, match=match) as info:
        WriteSAE.load_from_disk(tmp_path / "sae")
    assert str(weights) in str(info.value)


def test_weights_that_do_not_fit_the_config_are_named(tmp_path: Path) -> None:
    make_sae().save_model(tmp_path / "sae")
    cfg_path = tmp_path / "sae" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["d_sae"] = 17
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"tensor 'W_enc_key' has shape \(16, 1, 6\) but the config needs \(17, 1, 6\)"):
        WriteSAE.load_from_disk(tmp_path / "sae")


def test_missing_or_broken_config(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a directory"):
        WriteSAE.load_from_disk(tmp_path / "nothing")
    make_sae().save_model(tmp_path / "sae")
    (tmp_path / "sae" / "cfg.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"cfg\.json: corrupted"):
        WriteSAE.load_from_disk(tmp_path / "sae")
