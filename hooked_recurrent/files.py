"""Atomic file and directory writes: the one place the project writes a file that must not tear.

Every save goes to a temporary sibling first and is renamed into place, so an interrupted save
(Ctrl-C, a killed job, a full disk) leaves the previous file intact and never a half-written one.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from hooked_recurrent.files import atomic_save_safetensors, atomic_write_text
    >>> d = Path(tempfile.mkdtemp())
    >>> atomic_write_text(d / "note.txt", "hello\\n").read_text()
    'hello\\n'
    >>> atomic_save_safetensors({"x": torch.zeros(2)}, d / "x.safetensors").name
    'x.safetensors'
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_bytes", "atomic_save_safetensors", "atomic_dir", "fsync_path"]


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# mkstemp/mkdtemp create private (0600/0700) entries; saved ones get the modes open()/mkdir() would.
_FILE_MODE = 0o666 & ~_umask()
_DIR_MODE = 0o777 & ~_umask()


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file or directory to disk (a rename is durable only once its directory is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Create or replace file ``path`` atomically.

    Args:
        path: The file to write (its parent is created).
        write: Called with a temporary path in the same directory; must create that file.

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, _FILE_MODE)
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Save tensors as a safetensors file atomically (detached, contiguous, never a pickle)."""
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _carry_over(old: Path, new: Path) -> None:
    """Hard-link (or copy) entries of ``old`` that ``new`` does not have."""
    for entry in old.iterdir():
        dest = new / entry.name
        if dest.exists() or entry.name.startswith("."):
            continue
        if entry.is_dir():
            shutil.copytree(entry, dest)
            continue
        try:
            os.link(entry, dest)
        except OSError:
            shutil.copy2(entry, dest)


def atomic_dir(target: str | os.PathLike, write: Callable[[Path], None], keep_other_files: bool = True) -> Path:
    """Create or replace directory ``target`` atomically.

    ``write`` fills a fresh hidden sibling, which is flushed to disk and renamed into place. A
    crash while writing leaves the old directory untouched (plus a ``.NAME.tmp-*`` sibling).
    Replacing an existing directory takes two renames (old out of the way, new in); a crash
    exactly between them leaves no ``NAME`` but a complete ``.NAME.old-*`` sibling. A half-written
    ``NAME`` is never visible.

    Args:
        target: The directory to create or replace.
        write: Called with an empty temporary directory to fill.
        keep_other_files: Keep files of an existing ``target`` that ``write`` does not produce
            (as SAELens' ``save_model`` keeps them).

    Returns:
        ``target`` as a ``Path``.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory; choose another path.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(tmp, _DIR_MODE)
        write(tmp)
        if keep_other_files and target.exists():
            _carry_over(target, tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync_path(f)
        fsync_path(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
    os.replace(tmp, target)
    fsync_path(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target
