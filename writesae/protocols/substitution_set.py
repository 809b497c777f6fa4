"""Several substitution tests run as one protocol: one record log, each record tagged with its test.

Protocols that compare substitution tests (two SAEs of one cell in `writesae.protocols.flat_svd`,
one SAE per head in `writesae.protocols.all_heads`) hold one `SubstitutionTest` per name and run
them here. Nothing is measured twice or differently: each test's units run as they would alone
(their keys prefixed by the test's name, their random draws seeded per sequence as alone), so a
test's records equal those of `run_substitution` on the same SAE, and each test summarises its own
records with `SubstitutionTest.summarize`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any

from .run import Protocol
from .substitution import SubstitutionRecord, SubstitutionTest

__all__ = ["TaggedRecord", "SubstitutionSet", "untag"]


@dataclass
class TaggedRecord(SubstitutionRecord):
    """A `SubstitutionRecord` and the name of the test (SAE) it belongs to.

    Attributes:
        sae: The test's name (e.g. ``"writesae"``, ``"flat_svd"``, ``"H3"``).
    """

    sae: str = ""


_FIELDS = tuple(f.name for f in fields(SubstitutionRecord))


def untag(record: TaggedRecord) -> SubstitutionRecord:
    """The plain record, as `run_substitution` returns it."""
    return SubstitutionRecord(**{name: getattr(record, name) for name in _FIELDS})


class SubstitutionSet(Protocol[TaggedRecord]):
    """Named substitution tests as one protocol (subclasses set ``name``, ``title``, the report).

    Args:
        tests: Name -> test; the names tag the records and prefix the unit keys.
    """

    record_type = TaggedRecord

    def __init__(self, tests: dict[str, SubstitutionTest]) -> None:
        bad = [n for n in tests if not n or "/" in n]
        if bad:
            raise ValueError(f"test names must be non-empty and hold no '/' (got {bad})")
        self.tests = tests

    def settings(self) -> dict[str, Any]:
        return {"protocol": self.name, "tests": {name: test.settings() for name, test in self.tests.items()}}

    def units(self) -> Iterable[tuple[str, Callable[[], list[TaggedRecord]]]]:
        for name, test in self.tests.items():
            for key, work in test.units():
                yield f"{name}/{key}", lambda work=work, name=name: [TaggedRecord(**asdict(r), sae=name)
                                                                     for r in work()]  # fmt: skip

    def by_test(self, records: list[TaggedRecord]) -> dict[str, list[SubstitutionRecord]]:
        """Each test's records, untagged, in the order they were written."""
        split: dict[str, list[SubstitutionRecord]] = {name: [] for name in self.tests}
        for r in records:
            split[r.sae].append(untag(r))
        return split

    def summaries(self, records: list[TaggedRecord]) -> dict[str, dict[str, Any]]:
        """Each test's own summary (`SubstitutionTest.summarize`) of its records."""
        return {name: self.tests[name].summarize(rs) for name, rs in self.by_test(records).items()}
