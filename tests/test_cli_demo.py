"""The writesae command: the demo pipeline end to end (small sizes) and clear errors."""

import json

import pytest

from writesae.cli import main
from writesae.demo import run_demo
from writesae.outputs import OutputExistsError
from writesae.protocols.logit_shift import PATHS
from writesae.protocols.substitution import VARIANTS
from writesae.trainer import WriteSAETrainer

SMALL = dict(store_sequences=24, seq_len=48, d_sae=64, k=4, epochs=2, substitution_sequences=4, substitution_atoms=4,
             firings_per_atom=2, shift_prompts=2, shift_atoms=2, shift_positions=1, install_prompts=1, new_tokens=2)


@pytest.mark.parametrize("model", ["stdlib:qwen3.5", "stdlib:mamba2"])
def test_demo_pipeline_writes_every_result(model, tmp_path, demo_runs):
    headline = run_demo(model, out_dir=tmp_path, sizes=SMALL)
    demo_runs[model] = tmp_path
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["model"] == model and summary["splice_with_error_term_exact"] is True
    substitution = summary["substitution"]
    assert substitution["headline"]["variant"] == "firing/activation" and substitution["headline"]["n"] > 0
    assert 0 <= substitution["headline"]["win_rate"] <= 1
    assert {(g["sae_input"], g["variant"]) for g in substitution["alternatives"]} == {(i, v) for i in ("state", "write") for v in VARIANTS}
    assert set(summary["logit_shift"]["small_eps"]["median_r2"]) == set(PATHS)
    assert set(summary["install"]) == {"paper", "native_key", "readout", "logprob_gradient"}
    for run in ("substitution", "substitution_write_sae", "logit_shift", "logit_shift_paper_eps", "install",
                "install_native_key", "install_readout", "install_logprob_gradient"):
        assert {"settings.json", "records.jsonl", "summary.json", "report.md"} <= {p.name for p in (tmp_path / run).iterdir()}
    assert (tmp_path / "sae_state" / "cfg.json").exists() and (tmp_path / "sae_write" / "cfg.json").exists()
    report = (tmp_path / "report.md").read_text()
    assert "## Headline, in the paper's settings" in report and "## Settings that differ from the paper, and why" in report
    assert headline["cell"] == summary["cell"]


def test_cli_errors_are_short_and_name_the_problem(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(tmp_path / "missing"), "--layer", "1", "--head", "0", "--out", str(tmp_path / "o")])
    assert exit_.value.code == 2
    assert "argument store" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["collect"])  # argparse explains the missing arguments


@pytest.fixture(scope="module")
def demo_runs():
    """Output folders of the uninterrupted demo runs above, by model."""
    return {}


def test_an_interrupted_demo_resumes_to_the_same_summary(tmp_path, monkeypatch, demo_runs):
    """Stopped in the middle of training (after the first epoch's checkpoint), a demo resumed with
    mode="resume" ends with the uninterrupted run's figures and SAE."""
    full = demo_runs.get("stdlib:qwen3.5")
    if full is None:
        pytest.skip("needs the uninterrupted stdlib:qwen3.5 demo of test_demo_pipeline_writes_every_result")
    real = WriteSAETrainer.train_step

    def train_step(self, batch):
        if self.step == self.total_steps - 2:
            raise KeyboardInterrupt
        return real(self, batch)

    with monkeypatch.context() as patch:
        patch.setattr(WriteSAETrainer, "train_step", train_step)
        with pytest.raises(KeyboardInterrupt):
            run_demo("stdlib:qwen3.5", out_dir=tmp_path, sizes=SMALL)
    assert (tmp_path / "training_state" / "checkpoint").is_dir() and not (tmp_path / "summary.json").exists()
    with pytest.raises(OutputExistsError, match="--resume"):
        run_demo("stdlib:qwen3.5", out_dir=tmp_path, sizes=SMALL)
    run_demo("stdlib:qwen3.5", out_dir=tmp_path, sizes=SMALL, mode="resume")

    summaries = [json.loads((run / "summary.json").read_text()) for run in (full, tmp_path)]
    for summary in summaries:
        summary.pop("seconds")
    assert summaries[0] == summaries[1]
    for name in ("sae_state/sae_weights.safetensors", "training_state/train_log.jsonl", "substitution/records.jsonl"):
        assert (full / name).read_bytes() == (tmp_path / name).read_bytes(), name
