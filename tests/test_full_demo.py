"""``writesae demo --full``: the demo, then every registered paper protocol, in one report.

The quick check (``preset="tiny"``) runs every stage of the registry on the shipped stdlib:qwen3.5
with a few sequences; the report must hold a row per protocol with the figures of that protocol's
own run directory, the paper's reference beside them, and every protocol that did not run listed
with its reason or its error. The full-size run on both shipped models (the 20-minute budget) is
marked slow.
"""

import json
import re
import time

import pytest

from writesae.cli import main
from writesae.full_demo import FULL_PROTOCOLS, FullDemoError, FullProtocol, run_full_demo
from writesae.full_demo.registry import INPUTS, ProtocolCall
from writesae.protocols.run import load_run

MODEL = "stdlib:qwen3.5"


def _not_applicable(ctx):
    return "needs an attention layer after the cell" if ctx.model_name == MODEL else None


def _broken(ctx, out_dir, mode, sizes):
    raise ArithmeticError("a planted failure")


# Two planted entries: one that does not apply to the model, one that fails; both must be listed.
REFERENCE = ({"table": "-", "model": "-", "value": "-"},)
NOT_APPLICABLE = FullProtocol("planted-not-applicable", "writesae.protocols.run", "never runs here", _broken,
                              applies=_not_applicable, reference=REFERENCE)  # fmt: skip
BROKEN = FullProtocol("planted-failure", "writesae.protocols.run", "always fails", _broken, reference=REFERENCE)


def test_quick_full_demo(tmp_path):
    """One quick run of the registry plus the planted entries, then a resume without them (one test, so that
    pytest-xdist does not run the same demo on both workers)."""
    quick_run = _quick_run(tmp_path)
    _report_has_a_row_per_protocol_with_its_runs_figures(quick_run)
    _nothing_is_skipped_silently(quick_run)
    _resume_keeps_finished_stages(quick_run)


def _quick_run(out):
    with pytest.raises(FullDemoError, match="planted-failure"):
        run_full_demo((MODEL,), out, preset="tiny", protocols=(*FULL_PROTOCOLS, NOT_APPLICABLE, BROKEN))
    first = json.loads((out / "summary.json").read_text())
    report_with_planted = (out / "report.md").read_text()
    demo_summary = out / "qwen3.5" / "summary.json"
    stamp = demo_summary.stat().st_mtime_ns
    begin = time.time()
    resumed = run_full_demo((MODEL,), out, preset="tiny", mode="resume")
    return {"out": out, "first": first, "report_with_planted": report_with_planted, "resumed": resumed,
            "demo_kept": demo_summary.stat().st_mtime_ns == stamp, "resume_seconds": time.time() - begin}  # fmt: skip


def _report_has_a_row_per_protocol_with_its_runs_figures(quick_run):
    out, summary = quick_run["out"], quick_run["resumed"]
    report = (out / "report.md").read_text()
    rows = {row["protocol"]: row for row in summary["models"][MODEL]["protocols"]}
    assert list(rows) == [entry.name for entry in FULL_PROTOCOLS] == summary["protocols"]
    overview = report.split("## Overview")[1].split("## Every protocol")[0]
    for entry in FULL_PROTOCOLS:
        row = rows[entry.name]
        assert re.search(rf"^\| `{re.escape(entry.name)}` \|", overview, flags=re.MULTILINE), entry.name
        if row["status"] == "not applicable":  # e.g. recurrent readers after the last recurrent layer
            assert row["reason"] and f"not applicable: {row['reason']}" in overview
            continue
        assert row["status"] == "ran", row
        # The figures are those of the protocol's own run directory (the demo's, or the stage's).
        run = load_run(out / row["run_dir"])
        assert json.loads(json.dumps(entry.headline(run.summary))) == row["headline"] and row["headline"]
        for key in row["key_figures"]:
            assert key in overview
        # The paper's value is cited, as a reference from a named, different model.
        refs = entry.references()
        assert refs and all(ref["model"] in report and ref["value"][:40] in report for ref in refs)
    assert "references from different, far larger models" in report
    written = json.loads((out / "summary.json").read_text())
    assert written["models"][MODEL]["protocols"] == summary["models"][MODEL]["protocols"]


def _nothing_is_skipped_silently(quick_run):
    rows = {row["protocol"]: row for row in quick_run["first"]["models"][MODEL]["protocols"]}
    assert rows["planted-not-applicable"]["status"] == "not applicable"
    assert rows["planted-failure"]["status"] == "failed"
    assert "ArithmeticError: a planted failure" in rows["planted-failure"]["error"]
    report = quick_run["report_with_planted"]
    not_run = report.split("## Not run")[1]
    reason = "needs an attention layer after the cell"
    assert f"`planted-not-applicable` on stdlib:qwen3.5: not applicable ({reason})" in not_run
    assert "`planted-failure` on stdlib:qwen3.5: failed (ArithmeticError: a planted failure)" in not_run
    # the failure did not stop the stages after it, nor the ones before it
    assert all(rows[entry.name]["status"] in ("ran", "not applicable") for entry in FULL_PROTOCOLS)


def _resume_keeps_finished_stages(quick_run):
    assert quick_run["demo_kept"], "a finished demo is kept as it is on --resume"
    before = {row["protocol"]: row["headline"] for row in quick_run["first"]["models"][MODEL]["protocols"]}
    after = {row["protocol"]: row["headline"] for row in quick_run["resumed"]["models"][MODEL]["protocols"]}
    assert after == {name: before[name] for name in after}
    assert "planted-failure" not in (quick_run["out"] / "report.md").read_text()


@pytest.mark.parametrize("entry", FULL_PROTOCOLS, ids=[entry.name for entry in FULL_PROTOCOLS])
def test_every_entry_is_complete(entry):
    """Without running anything: the sizes of both presets build the protocol's config, its inputs exist, and
    the paper's value it cites names a table and a model (so a changed protocol fails here, in a second)."""
    assert (entry.run is None) != (entry.demo_run is None), "an entry runs its protocol or reads the demo's run"
    if isinstance(entry.run, ProtocolCall):
        for preset in ("full", "tiny"):
            entry.run.config(entry.sizes_for(preset))
        assert set(entry.run.inputs + entry.run.keywords) <= set(INPUTS)
    for ref in entry.references():
        assert ref["table"] not in ("", "?") and ref["model"] not in ("", "?") and ref["value"], ref


def test_full_flag_options_are_checked(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path / "a")]) == 2
    assert "--quick and --jobs go with --full" in capsys.readouterr().err
    assert main(["demo", "--full", "--layer", "1", "--head", "0", "--out", str(tmp_path / "b")]) == 2
    assert "give one model (--model)" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_full_demo_on_both_shipped_models_within_budget(tmp_path):
    """The real thing: both shipped models at ``--full`` sizes, within 20 minutes (on 2 idle cores)."""
    begin = time.time()
    assert main(["demo", "--full", "--out", str(tmp_path)]) == 0
    seconds = time.time() - begin
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["models"]) == {"stdlib:qwen3.5", "stdlib:mamba2"}
    assert all(row["status"] != "failed" for run in summary["models"].values() for row in run["protocols"])
    assert seconds < 20 * 60, f"{seconds:.0f} s (load average {summary['machine']})"
