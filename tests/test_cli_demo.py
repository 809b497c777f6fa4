"""The writesae command: the demo pipeline end to end (small sizes) and clear errors."""

import json

import pytest

from writesae.cli import main
from writesae.demo import run_demo

SMALL = dict(store_sequences=24, seq_len=48, d_sae=64, k=4, epochs=2, substitution_sequences=4,
             substitution_atoms=4, firings_per_atom=2, shift_prompts=2, shift_atoms=2, install_prompts=1)


@pytest.mark.parametrize("model", ["stdlib:qwen3.5", "stdlib:mamba2"])
def test_demo_pipeline_writes_every_result(model, tmp_path):
    headline = run_demo(model, out_dir=tmp_path, sizes=SMALL)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["model"] == model and summary["splice_with_error_term_exact"] is True
    assert 0 <= summary["substitution"]["win_rate"] <= 1 and summary["substitution"]["n_firings"] > 0
    assert set(summary["logit_shift"]) == {"out_proj", "jacobian"}
    for run in ("substitution", "logit_shift_out_proj", "logit_shift_jacobian", "install"):
        assert {"records.jsonl", "summary.json", "report.md"} <= {p.name for p in (tmp_path / run).iterdir()}
    assert (tmp_path / "sae" / "cfg.json").exists()
    assert headline["cell"] == summary["cell"]


def test_cli_errors_are_short_and_name_the_problem(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(tmp_path / "missing"), "--layer", "1", "--head", "0", "--out", str(tmp_path / "o")])
    assert exit_.value.code == 2
    assert "argument store" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["collect"])  # argparse explains the missing arguments
