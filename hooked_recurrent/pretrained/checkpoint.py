"""Resume checkpoints as one safetensors file: tensors plus a JSON header.

Everything needed to continue a run bit-for-bit lives in a single file, so a
save is atomic (write a temporary file, then ``os.replace``) and a crash can
never leave a model from one step beside an optimizer from another. Tensors:

* ``model/<name>``: the model's state dict (tied weights stored once per name).
* ``optim/<param name>/<key>``: AdamW's per-parameter state, keyed by the
  parameter's name rather than its position, so the file is self-describing.
* ``rng/torch``, ``rng/numpy``: generator states as byte/integer tensors.

The safetensors metadata entry ``"state"`` holds JSON with the scalar state
(step, data position, optimizer hyperparameters, Python and numpy RNG scalars,
and whatever the caller adds). Nothing is pickled.
"""

from __future__ import annotations

import json
import pathlib
import random

import numpy as np
import torch
from safetensors import safe_open

from hooked_recurrent.files import atomic_save_safetensors

_FORMAT = "hooked-recurrent-resume-v1"


def _param_names(model: torch.nn.Module) -> dict[int, str]:
    """Maps ``id(parameter)`` to its name; tied parameters keep their first name."""
    return {id(p): name for name, p in model.named_parameters()}


def _optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, list]:
    names = _param_names(model)
    tensors, groups = {}, []
    for group in optimizer.param_groups:
        groups.append({k: v for k, v in group.items() if k != "params"} | {
            "params": [names[id(p)] for p in group["params"]]
        })
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                tensors[f"optim/{names[id(p)]}/{key}"] = torch.as_tensor(value).detach().clone()
    return tensors, groups


def _rng_state() -> tuple[dict, dict]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    tensors = {
        "rng/torch": torch.get_rng_state().clone(),
        "rng/numpy": torch.from_numpy(keys.astype(np.int64)),
    }
    scalars = {
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": list(py_state), "gauss_next": gauss_next},
    }
    return tensors, scalars


def _set_rng_state(tensors: dict, scalars: dict) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    np_s = scalars["numpy"]
    np.random.set_state(
        (np_s["kind"], tensors["rng/numpy"].numpy().astype(np.uint32), np_s["pos"], np_s["has_gauss"],
         np_s["cached_gaussian"])
    )
    py = scalars["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))


def save_checkpoint(path: pathlib.Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Atomically writes a resume checkpoint.

    Args:
        path: Destination ``.safetensors`` file.
        model: The model being trained.
        optimizer: Its optimizer (any ``torch.optim`` optimizer whose state is tensors/numbers).
        state: JSON-serialisable run state (step, data position, ...).
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # clone() breaks storage sharing between tied weights, which safetensors refuses.
    tensors = {f"model/{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    optim_tensors, groups = _optimizer_tensors(model, optimizer)
    rng_tensors, rng_scalars = _rng_state()
    tensors |= optim_tensors | rng_tensors
    header = {"format": _FORMAT, "state": state, "param_groups": groups, "rng": rng_scalars}
    atomic_save_safetensors(tensors, path, metadata={"state": json.dumps(header)})


def load_checkpoint(path: pathlib.Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restores model, optimizer and RNG states in place; returns the run state.

    Args:
        path: A file written by :func:`save_checkpoint`.
        model: A model of the same architecture.
        optimizer: An optimizer over ``model``'s parameters, built the same way.

    Returns:
        The ``state`` dict given to :func:`save_checkpoint`.
    """
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["state"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if header.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a {_FORMAT} checkpoint")
    model.load_state_dict({k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")})

    index = {}  # parameter name -> position in optimizer.state_dict() numbering
    groups = []
    for group in header["param_groups"]:
        ids = []
        for name in group["params"]:
            index[name] = len(index)
            ids.append(index[name])
        groups.append(group | {"params": ids})
    opt_state = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            name, field = key[len("optim/"):].rsplit("/", 1)
            opt_state.setdefault(index[name], {})[field] = value
    names = _param_names(model)
    if list(index) != [names[id(p)] for g in optimizer.param_groups for p in g["params"]]:
        raise ValueError("optimizer parameter groups differ from the checkpoint's")
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    _set_rng_state(tensors, header["rng"])
    return header["state"]
