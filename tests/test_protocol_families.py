"""SAE families at a matched budget (Tables 5, 7): parameter counts, validation MSE and win rates against
independent recomputations from the saved SAEs."""

import json

import pytest
import torch

import writesae  # noqa: F401
from helpers import random_tokens, tiny_pair
from writesae import WriteSAE, WriteTrainingSAE, WriteTrainingSAEConfig
from writesae.config import VARIANTS
from writesae.protocols.families import FamiliesConfig, matched_d_sae, parameters_per_atom, run_families
from writesae.protocols.flat_svd import flat_svd_test
from writesae.protocols.run import run_protocol
from writesae.protocols.substitution import SubstitutionConfig
from writesae.store import WriteStore


def test_families_at_matched_parameters_measure_what_their_saved_saes_give(tmp_path):
    torch.manual_seed(0)
    model, _ = tiny_pair("tiny-random:qwen3.5")
    layer, head = model.cfg.recurrent_layers[0], 1
    d_k, d_v = model.cfg.d_k, model.cfg.d_v
    substitution = SubstitutionConfig(n_atoms=3, max_firings_per_atom=1, n_bootstrap=20, n_permutations=20)
    config = FamiliesConfig(variants=("bilinear", "flat", "bilinear_flat"), seeds=(0,), d_sae=32, k=2, epochs=2,
                            budget="parameters",
                            trainer={"batch_size": 32, "warmup_steps": 1}, substitution=substitution)
    held_out = random_tokens(2, 8, seed=9)
    result = run_families(model, held_out, train_tokens=random_tokens(6, 16, seed=8), layer=layer, head=head,
                          config=config, out_dir=tmp_path, verbose=False)
    records = {r.variant: r for r in result.records}
    assert set(records) == {"bilinear", "flat", "bilinear_flat"}
    # App. C's parameter formulas, against the modules' own parameters.
    for variant, r in records.items():
        assert r.n_parameters == d_k * d_v + r.d_sae * parameters_per_atom(variant, d_k, d_v)
    assert records["bilinear"].d_sae == 32
    assert records["flat"].d_sae == matched_d_sae("flat", "bilinear", 32, d_k, d_v, 2)
    budget = records["bilinear"].n_parameters
    assert records["flat"].n_parameters <= budget < records["flat"].n_parameters + parameters_per_atom("flat", d_k, d_v)
    # Each record's validation MSE and win rate, recomputed from the saved SAE.
    val = WriteStore(tmp_path / "store").read(layer, head, "val")["states"].float()
    for variant, r in records.items():
        # the folder name starts with the variant, and "bilinear_" begins "bilinear_flat_" too: read the config
        (folder,) = [p for p in (tmp_path / "cells").iterdir()
                     if json.loads((p / "sae" / "cfg.json").read_text())["variant"] == variant]  # fmt: skip
        sae = WriteSAE.load_from_disk(folder / "sae")
        with torch.no_grad():
            mse = float(((sae(val) - val) ** 2).mean())
        assert r.val_mse == pytest.approx(mse, rel=1e-3)
        dense = variant in ("flat", "bilinear_flat")  # substituted through the top-1 SVD of the reconstruction
        test = flat_svd_test(model, sae, held_out, "reconstruction", config=substitution) if dense else None
        if test is None:
            from writesae.protocols.substitution import SubstitutionTest

            test = SubstitutionTest(model, sae, held_out, config=substitution)
        summary = run_protocol(test, verbose=False).summary
        assert r.n_firings == summary["n_firings"] > 0
        assert r.win_rate == summary["headline"]["win_rate"]
    h = result.summary["headline"]
    for variant in ("bilinear", "bilinear_flat"):
        assert h[f"{variant}/topk_mse_over_flat"] == pytest.approx(records[variant].val_mse / records["flat"].val_mse)
    assert (tmp_path / "families.png").is_file() and (tmp_path / "report.md").is_file()
    # Resumed from the store it collected: every SAE is finished, none is trained again.
    again = run_families(model, held_out, store=tmp_path / "store", config=config, out_dir=tmp_path, mode="resume",
                         verbose=False)
    assert again.records == result.records


@pytest.mark.parametrize(("variant", "rank"), [(v, r) for v in VARIANTS for r in (1, 2) if v != "flat" or r == 1])
def test_parameters_per_atom_counts_the_trainable_parameters_of_every_variant(variant, rank):
    d_k, d_v, d_sae = 6, 5, 7
    cfg = WriteTrainingSAEConfig.build(d_k=d_k, d_v=d_v, d_sae=d_sae, k=2, variant=variant, rank=rank)
    counted = sum(p.numel() for p in WriteTrainingSAE(cfg).parameters() if p.requires_grad)
    assert counted == d_k * d_v + d_sae * parameters_per_atom(variant, d_k, d_v, rank)


def test_unknown_families_are_refused():
    with pytest.raises(ValueError, match="variants"):
        FamiliesConfig(variants=("jumprelu",))
    with pytest.raises(ValueError, match="sparsities"):
        FamiliesConfig(sparsities=("relu",))


def test_sparsity_variants_train_the_other_sparsities_on_those_families_only(tmp_path):
    """Table 5's grid beside Table 7's: every family under TopK, the WriteSAE alone under the others."""
    from writesae.protocols.families import Families
    from writesae.store import collect

    model = tiny_pair("tiny-random:qwen3.5")[0]
    collect(model, random_tokens(4, 12, seed=5), layers=[0], heads=[1], kind="state", out_dir=tmp_path / "store",
            verbose=False)  # fmt: skip
    config = FamiliesConfig(variants=("bilinear", "flat", "matrix"), sparsities=("topk", "jumprelu", "gated"),
                            sparsity_variants=("bilinear",), seeds=(0, 1), substitution=None)  # fmt: skip
    families = Families(model, random_tokens(1, 8), store=tmp_path / "store", cells_dir=tmp_path / "cells", config=config)
    grid = sorted((c.settings["variant"], c.settings["sparsity"], c.seed) for c in families.cells)
    expected = [("bilinear", s, seed) for s in ("topk", "jumprelu", "gated") for seed in (0, 1)]
    expected += [(v, "topk", seed) for v in ("flat", "matrix") for seed in (0, 1)]
    assert grid == sorted(expected)
    everywhere = Families(model, random_tokens(1, 8), store=tmp_path / "store", cells_dir=tmp_path / "cells",
                          config=FamiliesConfig(**{**vars(config), "sparsity_variants": None}))  # fmt: skip
    assert len(everywhere.cells) == 3 * 3 * 2
    with pytest.raises(ValueError, match="sparsity_variants must be among variants"):
        FamiliesConfig(variants=("flat",), sparsity_variants=("bilinear",))
