"""Checkpoint files: atomic directory saves, and checks that say which file is wrong and how.

A WriteSAE directory holds SAELens' two files, ``cfg.json`` and ``sae_weights.safetensors``; no pickles.
``cfg.json`` also records ``weights_sha256`` (a top-level key SAELens ignores), so a flipped byte in the
weights is caught, not only a truncated file.

Atomicity: ``write_atomic_dir`` goes through `hooked_recurrent.files.atomic_dir` (fill a hidden sibling,
flush, rename into place), so a half-written SAE directory is never visible; ``check_sae_dir`` points
to a complete ``.NAME.old-*`` sibling left by a crash between the two renames of a replace.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME

from hooked_recurrent.files import atomic_dir

WEIGHTS_SHA256_KEY = "weights_sha256"
# The architecture written into a training checkpoint's cfg.json: no SAE class loads it, so a
# checkpoint (scaled units, optimizer state beside it) is never taken for an inference SAE.
CHECKPOINT_ARCHITECTURE = "write_sae_training_checkpoint"

_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupted or does not fit the model."""


# ---------------------------------------------------------------------------------- writing


def write_atomic_dir(target: str | Path, write: Callable[[Path], None]) -> Path:
    """Create or replace directory ``target`` atomically (`hooked_recurrent.files.atomic_dir`),
    keeping files of an existing ``target`` that ``write`` does not produce (as SAELens'
    ``save_model`` keeps them); a file in the way is a `CheckpointError`."""
    if Path(target).exists() and not Path(target).is_dir():
        raise CheckpointError(f"{target} exists and is not a directory; choose another path.")
    return atomic_dir(target, write)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in tensors.items()}


def write_sae_files(directory: Path, state_dict: dict[str, torch.Tensor], cfg_dict: dict[str, Any]) -> None:
    """Write ``sae_weights.safetensors`` then ``cfg.json`` (with the weights' SHA-256) into ``directory``.

    Raises:
        CheckpointError: a tensor holds NaN or inf (such weights are never written).
    """
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(
                f"refusing to save non-finite weights: tensor {name!r} holds NaN or inf. If they come from "
                "training, it diverged: lower the learning rate and train again."
            )
    weights = directory / SAE_WEIGHTS_FILENAME
    save_file(_contiguous(state_dict), weights)
    cfg = {**cfg_dict, WEIGHTS_SHA256_KEY: sha256_file(weights)}
    (directory / SAE_CFG_FILENAME).write_text(json.dumps(cfg, indent=2))


def save_sae_files(
    path: str | Path, state_dict: dict[str, torch.Tensor], cfg_dict: dict[str, Any]
) -> tuple[Path, Path]:
    """Atomically write a SAELens-loadable SAE directory.

    Returns:
        ``(weights_path, cfg_path)``, as SAELens' ``save_model`` does.
    """
    path = write_atomic_dir(path, lambda d: write_sae_files(d, state_dict, cfg_dict))
    return path / SAE_WEIGHTS_FILENAME, path / SAE_CFG_FILENAME


# ---------------------------------------------------------------------------------- checking


def read_safetensors_header(path: str | Path) -> dict[str, Any]:
    """Parse and check a safetensors header against the file size.

    Raises:
        CheckpointError: naming the file and what is wrong (missing, truncated, bad header, tensor
            sizes that do not add up, trailing bytes).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found.")
    size = path.stat().st_size
    fix = "re-save it, or copy/download it again"
    if size < 8:
        raise CheckpointError(f"{path}: truncated: {size} bytes, not even the 8-byte header length; {fix}.")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if 8 + n > size:
            raise CheckpointError(
                f"{path}: truncated: the header claims {n} bytes but only {size - 8} follow; {fix}."
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
        assert isinstance(header, dict)
    except (ValueError, AssertionError):
        raise CheckpointError(
            f"{path}: corrupted: the safetensors header is not valid JSON; {fix}."
        ) from None
    data_bytes = size - 8 - n
    end_max = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            itemsize = _DTYPE_BYTES[info["dtype"]]
            begin, end = info["data_offsets"]
            expected = math.prod(info["shape"]) * itemsize
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{path}: corrupted: bad header entry for tensor {name!r}; {fix}."
            ) from None
        if end - begin != expected:
            raise CheckpointError(
                f"{path}: corrupted: tensor {name!r} {info['dtype']}{info['shape']} needs {expected} "
                f"bytes but the header gives it {end - begin}; {fix}."
            )
        if end > data_bytes:
            raise CheckpointError(
                f"{path}: truncated: tensor {name!r} ends at data byte {end} but the file holds only "
                f"{data_bytes} data bytes; {fix}."
            )
        end_max = max(end_max, end)
    if end_max != data_bytes:
        raise CheckpointError(
            f"{path}: corrupted: {data_bytes - end_max} bytes after the last tensor; {fix}."
        )
    return header


def load_tensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file after checking its header (see ``read_safetensors_header``)."""
    read_safetensors_header(path)
    return load_file(str(path), device=device)


def _interrupted_save_hint(path: Path) -> str:
    olds = sorted(path.parent.glob(f".{path.name}.old-*")) if path.parent.exists() else []
    if not olds:
        return ""
    return (
        f" A save into it was interrupted; the previous complete copy is {olds[-1]} "
        f"(rename it to {path.name})."
    )


def check_sae_dir(path: str | Path, checkpoint: bool = False) -> dict[str, Any]:
    """Check a saved SAE directory before loading it; returns the parsed ``cfg.json``.

    Args:
        path: The directory.
        checkpoint: Expect a training checkpoint (``WriteSAETrainer``'s ``checkpoint/``) rather
            than an inference SAE.

    Raises:
        CheckpointError: naming the file and what is wrong.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(
            f"{path}: not a directory; give the SAE's folder (cfg.json + sae_weights.safetensors; "
            f"writesae train writes OUT/sae).{_interrupted_save_hint(path)}"
        )
    cfg_path = path / SAE_CFG_FILENAME
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path}: file not found; is {path} an SAE directory?")
    try:
        cfg = json.loads(cfg_path.read_text())
        assert isinstance(cfg, dict) and "architecture" in cfg
    except (ValueError, AssertionError):
        raise CheckpointError(
            f"{cfg_path}: corrupted: not a JSON object with an 'architecture' key; re-save the SAE."
        ) from None
    is_checkpoint = cfg["architecture"] == CHECKPOINT_ARCHITECTURE
    if is_checkpoint and not checkpoint:
        raise CheckpointError(
            f"{path} is a training checkpoint, not an SAE to use: its weights are in the units training saw "
            "and it holds the optimizer's state. Load the trained SAE from the run's best/ or final/ folder "
            "(writesae train: OUT/sae), or resume training from it."
        )
    if checkpoint and not is_checkpoint:
        raise CheckpointError(
            f"{path} is not a training checkpoint (architecture {cfg['architecture']!r}); resume from "
            "OUT_DIR/checkpoint, not best/ or final/."
        )
    weights = path / SAE_WEIGHTS_FILENAME
    read_safetensors_header(weights)
    recorded = cfg.get(WEIGHTS_SHA256_KEY)
    if recorded is not None and sha256_file(weights) != recorded:
        raise CheckpointError(
            f"{weights}: corrupted: its SHA-256 differs from the one recorded in {cfg_path} at save "
            "time; re-save or copy/download it again."
        )
    return cfg


def check_state_dict(
    state_dict: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]
) -> None:
    """Check that a state dict has exactly the expected names, shapes and finite values.

    Raises:
        CheckpointError: naming the tensor and what differs.
    """
    missing = sorted(set(expected) - set(state_dict))
    extra = sorted(set(state_dict) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"the weights do not fit this WriteSAE config: missing {missing}, unexpected {extra}; "
            "were cfg.json and sae_weights.safetensors saved together?"
        )
    for name, shape in expected.items():
        got = tuple(state_dict[name].shape)
        if got != shape:
            raise CheckpointError(
                f"tensor {name!r} has shape {got} but the config needs {shape}; "
                "were cfg.json and sae_weights.safetensors saved together?"
            )
        t = state_dict[name]
        if t.is_floating_point() and t.device.type != "meta" and not torch.isfinite(t).all():
            raise CheckpointError(f"tensor {name!r} contains NaN or inf values; the file is corrupted.")
