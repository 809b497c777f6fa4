"""The one protocol path: in memory or on disk the same records; an interrupted run resumes to them."""

from dataclasses import dataclass

import pytest
import torch

from writesae.outputs import OutputExistsError
from writesae.protocols.run import Protocol, load_run, run_protocol, unit_generator


@dataclass
class Draw:
    unit: int
    value: float
    values: dict[str, float]


class Draws(Protocol[Draw]):
    """Three random draws per unit, from the unit's own generator; can stop after some units."""

    name, title, record_type = "draws", "Draws", Draw

    def __init__(self, n_units: int, seed: int = 0, stop_after: int | None = None) -> None:
        self.n_units, self.seed, self.stop_after, self.calls = n_units, seed, stop_after, 0

    def settings(self):
        return {"n_units": self.n_units, "seed": self.seed}

    def units(self):
        for u in range(self.n_units):
            yield f"unit-{u}", lambda u=u: self._unit(u)

    def _unit(self, u):
        if self.stop_after is not None and self.calls == self.stop_after:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the run
        self.calls += 1
        g = unit_generator(self.seed, f"unit-{u}")
        return [Draw(u, float(torch.rand(1, generator=g)), {"x": float(torch.rand(1, generator=g))}) for _ in range(3)]

    def summarize(self, records):
        return {"n": len(records), "mean": sum(r.value for r in records) / len(records)}

    def report(self, summary, records):
        return [("Headline", f"{summary['n']} draws")]

    def tables(self, summary, records):
        return {"atoms": [{"unit": u, "n": sum(r.unit == u for r in records)} for u in range(self.n_units)]}


def test_in_memory_and_on_disk_give_the_same_typed_records(tmp_path):
    memory = run_protocol(Draws(4), verbose=False)
    disk = run_protocol(Draws(4), tmp_path / "run", verbose=False)
    assert memory.records == disk.records and isinstance(disk.records[0], Draw)
    assert memory.summary == disk.summary and len(disk.records) == 12
    loaded = load_run(tmp_path / "run")
    assert loaded.summary == disk.summary and loaded.settings == {"n_units": 4, "seed": 0}
    assert loaded.tables["atoms"] == [{"unit": u, "n": 3} for u in range(4)]
    assert [Draw(**r) for r in loaded.records] == disk.records
    assert (tmp_path / "run" / "report.md").read_text().startswith("# Draws")


def test_an_interrupted_run_resumes_to_the_uninterrupted_records(tmp_path):
    uninterrupted = run_protocol(Draws(5), verbose=False).records
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_protocol(Draws(5, stop_after=2), out, verbose=False)
    assert len(load_run(out).records) == 6  # two finished units survive
    with pytest.raises(OutputExistsError, match="--resume"):
        run_protocol(Draws(5), out, verbose=False)
    with pytest.raises(ValueError, match="other settings.*seed"):
        run_protocol(Draws(5, seed=1), out, mode="resume", verbose=False)
    resumed = Draws(5)
    result = run_protocol(resumed, out, mode="resume", verbose=False)
    assert resumed.calls == 3  # only the unfinished units ran
    assert result.records == uninterrupted
    assert run_protocol(Draws(5), out, mode="overwrite", verbose=False).records == uninterrupted


def test_load_run_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a protocol run directory"):
        load_run(tmp_path)
