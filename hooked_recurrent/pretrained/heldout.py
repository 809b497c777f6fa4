"""The shipped held-out sample: one validation-split stdlib file, frozen.

Validation files come from whatever interpreter is running, so their losses
differ between Python versions. The shipped sample is a fixed text instead,
so anyone can recompute a shipped model's recorded loss on it exactly.

The sample is ``random.py`` from CPython 3.11.7: a validation-split file of
about 32 KB, ordinary library code with docstrings. It is Python Software
Foundation-licensed standard-library source, copied unmodified. Its source,
Python version, byte count and SHA-256 are in ``heldout_sample.json``.

Regenerate (only ever needed with a new corpus) with::

    python -m hooked_recurrent.pretrained.heldout
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import platform

from hooked_recurrent.files import atomic_write_bytes
from hooked_recurrent.pretrained.corpus import is_validation, stdlib_root

SAMPLE_SOURCE = "random.py"
SAMPLE_PATH = pathlib.Path(__file__).with_name("heldout_sample.py.txt")
SAMPLE_INFO_PATH = pathlib.Path(__file__).with_name("heldout_sample.json")
_VAL_FRACTION = 0.05  # must match the training default, so the sample stays unseen


def load_sample() -> str:
    """Returns the shipped held-out text, exactly as stored (no newline translation)."""
    return SAMPLE_PATH.read_bytes().decode("utf-8")


def sample_sha256() -> str:
    """SHA-256 of the shipped sample's bytes."""
    return hashlib.sha256(SAMPLE_PATH.read_bytes()).hexdigest()


def write_sample() -> dict:
    """Copies the sample out of the running stdlib and writes its description.

    Returns:
        The description written to ``heldout_sample.json``.

    Raises:
        ValueError: If the source file is not in the validation split.
    """
    if not is_validation(SAMPLE_SOURCE, _VAL_FRACTION):
        raise ValueError(f"{SAMPLE_SOURCE} is in the training split; pick a validation file")
    data = (stdlib_root() / SAMPLE_SOURCE).read_bytes()
    info = {
        "source": f"Lib/{SAMPLE_SOURCE} (stdlib-relative path {SAMPLE_SOURCE!r})",
        "python_version": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "license": "Python Software Foundation License (CPython standard library source, unmodified)",
        "split": f"validation (val_fraction={_VAL_FRACTION})",
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    for path, payload in ((SAMPLE_PATH, data), (SAMPLE_INFO_PATH, (json.dumps(info, indent=2) + "\n").encode())):
        atomic_write_bytes(path, payload)
    return info


if __name__ == "__main__":
    print(json.dumps(write_sample(), indent=2))
