"""The training corpus: the running interpreter's own standard-library sources.

Every machine that can run this package has a Python standard library, so these
files are a corpus that needs no download. The files are read from
``sysconfig.get_paths()["stdlib"]`` and split into train and validation sets at
the level of whole files.

What is excluded, and why:

* ``site-packages/``: third-party code, different on every machine.
* Any directory named ``test``, ``tests`` or ``idle_test`` (the regression test
  suite, ``lib2to3/tests``, ``ctypes/test``...): distributors often ship these
  as separate packages (Debian's ``libpython3.X-testsuite``), so they are not
  on every machine, and they are full of deliberately malformed or
  non-UTF-8 inputs. They are also more than half of the bytes.
* ``config-*/`` and ``_sysconfigdata_*.py``: the build configuration of this
  particular interpreter (compiler flags, paths), not portable Python.
* ``pydoc_data/``: one generated 750 KB dict of help-topic strings.
* Character-map codecs in ``encodings/`` (files that call
  ``codecs.charmap_build`` or ``codecs.make_identity_dict``): tables generated
  by ``gencodec.py`` that are mostly long runs of escaped code points.
* Files that are not valid UTF-8 (none remain after the rules above on
  CPython 3.11, but the reader stays strict rather than guessing encodings).

The split is by a SHA-256 hash of the file's path relative to the stdlib root
(POSIX separators), so it depends neither on directory listing order nor on
where the interpreter is installed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import sysconfig

# Salt for the split hash: changing it reshuffles which files are held out.
_SPLIT_SALT = "hooked-recurrent-stdlib-split-v1"
_TEST_DIR_NAMES = frozenset({"test", "tests", "idle_test"})
_CHARMAP_MARKERS = ("codecs.charmap_build(", "codecs.make_identity_dict(")


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """One standard-library source file.

    Attributes:
        relpath: Path relative to the stdlib root, with POSIX separators.
        text: The file's contents decoded as UTF-8.
    """

    relpath: str
    text: str


def stdlib_root() -> pathlib.Path:
    """Returns the running interpreter's standard-library directory."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _excluded_by_path(relpath: pathlib.PurePosixPath) -> bool:
    """Whether a file is excluded by where it lives (see module docstring)."""
    dirs = relpath.parts[:-1]
    if "site-packages" in dirs or "pydoc_data" in dirs:
        return True
    if any(part in _TEST_DIR_NAMES for part in dirs):
        return True
    if dirs and dirs[0].startswith("config-"):
        return True
    return relpath.name.startswith("_sysconfigdata_")


def _is_charmap_table(relpath: pathlib.PurePosixPath, text: str) -> bool:
    """Whether a file is a generated character-map codec table."""
    return relpath.parts[0] == "encodings" and any(m in text for m in _CHARMAP_MARKERS)


def list_source_files(root: pathlib.Path | None = None) -> list[SourceFile]:
    """Reads the kept stdlib ``.py`` files, sorted by relative path.

    Args:
        root: Standard-library directory; defaults to :func:`stdlib_root`.

    Returns:
        The kept files, sorted by ``relpath`` so the result is independent of
        the file system's listing order.
    """
    root = stdlib_root() if root is None else pathlib.Path(root)
    files = []
    for path in root.rglob("*.py"):
        relpath = pathlib.PurePosixPath(path.relative_to(root).as_posix())
        if _excluded_by_path(relpath) or not path.is_file():
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        if _is_charmap_table(relpath, text):
            continue
        files.append(SourceFile(str(relpath), text))
    files.sort(key=lambda f: f.relpath)
    return files


def is_validation(relpath: str, val_fraction: float) -> bool:
    """Whether a file belongs to the validation split.

    Args:
        relpath: Path relative to the stdlib root, POSIX separators.
        val_fraction: Expected fraction of files held out, in ``[0, 1]``.

    Returns:
        True if the salted SHA-256 of the path falls in the held-out fraction.
    """
    digest = hashlib.sha256(f"{_SPLIT_SALT}:{relpath}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < val_fraction * 2**64


def split_files(
    files: list[SourceFile], val_fraction: float = 0.05
) -> tuple[list[SourceFile], list[SourceFile]]:
    """Splits files into (train, validation), each keeping the input order."""
    train = [f for f in files if not is_validation(f.relpath, val_fraction)]
    val = [f for f in files if is_validation(f.relpath, val_fraction)]
    return train, val


def corpus_fingerprint(files: list[SourceFile]) -> str:
    """SHA-256 over paths and contents, to tell whether two corpora are equal."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.relpath.encode() + b"\0" + f.text.encode() + b"\0")
    return h.hexdigest()
