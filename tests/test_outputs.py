"""Output folders never clobber; record logs survive an interruption; atomic writes never tear."""

import json

import pytest
import torch
from safetensors.torch import load_file

from hooked_recurrent.files import atomic_dir, atomic_save_safetensors, atomic_write_text
from writesae.outputs import OutputExistsError, RecordLog, prepare_output_dir


def test_new_output_dir_refuses_existing_work(tmp_path):
    out = prepare_output_dir(tmp_path / "run")
    (out / "records.jsonl").write_text("{}\n")
    with pytest.raises(OutputExistsError, match="--resume.*--overwrite"):
        prepare_output_dir(out)
    assert (out / "records.jsonl").read_text() == "{}\n"  # nothing lost
    assert prepare_output_dir(out, "resume") == out
    prepare_output_dir(out, "overwrite")
    assert list(out.iterdir()) == []


def test_resume_needs_something_to_resume(tmp_path):
    with pytest.raises(FileNotFoundError, match="Drop --resume"):
        prepare_output_dir(tmp_path / "missing", "resume")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        prepare_output_dir(tmp_path / "file")
    with pytest.raises(ValueError, match="not one of"):
        prepare_output_dir(tmp_path / "x", "append")


def test_record_log_drops_a_torn_unit_and_resumes(tmp_path):
    log = RecordLog(tmp_path / "records.jsonl")
    log.append("a", [{"x": 1}, {"x": 2}])
    log.append("empty", [])
    # An interrupted unit: one complete line without the done mark, then half a line.
    with open(log.path, "a") as f:
        f.write(json.dumps({"x": 3, "_unit": "b"}) + "\n" + '{"x": 4, "_un')
    resumed = RecordLog(log.path)
    assert resumed.done_units() == {"a", "empty"}
    assert resumed.records() == [{"x": 1}, {"x": 2}]
    resumed.append("b", [{"x": 3}, {"x": 4}])
    lines = log.path.read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # the torn tail is gone, not glued to new lines
    assert RecordLog(log.path).records() == [{"x": 1}, {"x": 2}, {"x": 3}, {"x": 4}]


def test_atomic_writes_leave_the_old_file_when_interrupted(tmp_path):
    path = atomic_write_text(tmp_path / "a.txt", "old")
    target = atomic_save_safetensors({"w": torch.ones(3)}, tmp_path / "w.safetensors")
    assert torch.equal(load_file(target)["w"], torch.ones(3))

    def fail(directory):
        (directory / "half").write_text("partial")
        raise KeyboardInterrupt

    atomic_dir(tmp_path / "d", lambda d: (d / "f").write_text("1"))
    with pytest.raises(KeyboardInterrupt):
        atomic_dir(tmp_path / "d", fail)
    assert (tmp_path / "d" / "f").read_text() == "1" and not (tmp_path / "d" / "half").exists()
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "d", "w.safetensors"]  # no temp files left


def test_atomic_saves_get_the_usual_permissions(tmp_path):
    import os

    umask = os.umask(0o022)
    os.umask(umask)
    expected = 0o666 & ~umask
    assert atomic_write_text(tmp_path / "a.txt", "x").stat().st_mode & 0o777 == expected
    folder = atomic_dir(tmp_path / "d", lambda d: (d / "f").write_text("1"))
    assert folder.stat().st_mode & 0o777 == (0o777 & ~umask)
