"""The exact linear response of later positions to an atom, at its top firing.

For atom ``i`` firing hardest at position ``t`` of row ``s`` with code ``a``, the dashboard adds
``a * A_i`` to the head's state (or write, for an SAE on writes) at ``t`` and reads the first-order
change of the logits at ``t, t+1, ..., t+H`` from `hooked_recurrent.linear_response`: exact to first
order, every gate, erase, norm and later layer included (where the closed form of
`writesae.dashboard.readout` keeps only the value factor's direct path). An edit of the state is seen
by the read at ``t`` itself, an edit of the write too (the state at ``t`` includes it). Per position
the page lists the largest ``|change|`` and the tokens moved most.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from .data import AtomRecord

__all__ = ["add_linear_responses"]


@torch.no_grad()
def add_linear_responses(
    model: Any,
    sae: Any,
    tokens: Int[Tensor, "rows pos"],
    records: list[AtomRecord],
    config: Any,
    verbose: bool = True,
) -> None:
    """Fill ``record.response`` for every record with a firing context.

    Args:
        model: The hooked model.
        sae: The SAE whose atoms are added.
        tokens: The token source the records' contexts point into.
        records: Atom records (changed in place).
        config: A `DashboardConfig` (``response_horizon``, ``response_tokens``).
        verbose: Progress bar.
    """
    from hooked_recurrent.linear_response import linear_response

    meta = sae.cfg.metadata
    tokenizer = getattr(model, "tokenizer", None)

    def text(token: int) -> str:
        return tokenizer.decode([token]) if tokenizer is not None else f"⟨{token}⟩"

    for record in tqdm(records, disable=not verbose, desc="dashboard: linear response", unit="atom"):
        if not record.contexts:
            continue
        top = record.contexts[0]
        end = min(tokens.shape[1], top.position + 1 + config.response_horizon)
        row = tokens[top.sequence : top.sequence + 1, :end].to(model.cfg.device)
        delta = top.value * sae.atom_matrices(torch.tensor([record.index]))[0].detach()
        change = linear_response(model, row, meta.hook_name, top.position, delta, head=meta.hook_head_index)
        change = change[0, top.position : end].float().cpu()  # [offsets, d_vocab]
        moved = change.abs().topk(min(config.response_tokens, change.shape[-1]), dim=-1).indices
        record.response = {
            "sequence": top.sequence,
            "position": top.position,
            "code": top.value,
            "offsets": list(range(change.shape[0])),
            "max_abs": change.abs().max(-1).values.tolist(),
            "tokens": [[[text(int(t)), float(change[j, t])] for t in moved[j]] for j in range(change.shape[0])],
            "note": (
                f"First-order change of the logits at positions t, t+1, ... after adding the atom times its code "
                f"{top.value:.4g} to the head's {meta.hook_name.rsplit('.', 1)[-1].removeprefix('hook_')} at its top "
                f"firing (seq {top.sequence} pos {top.position}); exact to first order, everything downstream included."
            ),
        }
