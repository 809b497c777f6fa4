"""One (layer, head) cell of a model, seen through its hooks: writes, states, gates, reads, codes.

Everything here works on any matrix-recurrent mixer (Gated DeltaNet, Mamba-2) through the shared
hook points of docs/design.md §3; nothing branches on the architecture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["Cell", "CellTrace", "trace_cell", "recurrent_cell", "sae_cell", "encode_trace", "STRENGTH_HOOKS"]

STRENGTH_HOOKS = ("hook_beta", "hook_dt")
"""Per-head scalars that scale a mixer's write (Gated DeltaNet ``beta_t``, Mamba-2 ``dt_t``), in order
of preference: ``u_t`` divided by it is the write "before its strength" (the paper's ``k_t v_t^T``)."""


@dataclass(frozen=True)
class Cell:
    """A layer and a head of a hooked model."""

    layer: int
    head: int

    def hook_name(self, model: Any, name: str) -> str:
        """Full name of a hook of this cell's mixer (``"hook_log_decay"``; ``"heads.{h}.hook_state"``
        names this cell's head)."""
        return model.cfg.hook_name(self.layer, name.format(h=self.head))

    def write_hook(self, model: Any) -> str:
        """This head's ``heads.{h}.hook_write``."""
        return self.hook_name(model, "heads.{h}.hook_write")

    def state_hook(self, model: Any) -> str:
        """This head's ``heads.{h}.hook_state``."""
        return self.hook_name(model, "heads.{h}.hook_state")


def recurrent_cell(model: Any, layer: int, head: int) -> Cell:
    """The cell at (layer, head), refused unless the layer is matrix-recurrent and the head exists."""
    if layer not in model.cfg.recurrent_layers or not 0 <= head < model.cfg.n_heads:
        raise ValueError(
            f"layer={layer}, head={head} is not a recurrent head; recurrent layers: {model.cfg.recurrent_layers}, "
            f"heads 0..{model.cfg.n_heads - 1}"
        )
    return Cell(layer, head)


def sae_cell(model: Any, sae: Any) -> tuple[Cell, str]:
    """The cell an SAE was trained on, and whether it reads ``"state"`` or ``"write"``."""
    meta = sae.cfg.metadata
    site = model.sae_site(sae)  # validates hook name, head, shapes
    kind = "state" if site.endswith("hook_state") else "write"
    layer = int(meta.hook_name.split(".")[1])
    return Cell(layer, int(meta.hook_head_index)), kind


@dataclass
class CellTrace:
    """Per-position quantities of one cell over a batch of sequences (on CPU).

    Attributes:
        key: Write key factors ``k_t`` [batch, pos, d_k].
        value: Write value factors ``u_t`` [batch, pos, d_v] (the native write is ``k_t u_t^T``).
        query: Read queries ``q_t`` [batch, pos, d_k].
        log_decay: ``log alpha_t`` [batch, pos].
        strength: The write's strength (see `STRENGTH_HOOKS`) [batch, pos]; ones if the mixer has none.
        states: ``S_t`` [batch, pos, d_k, d_v], when asked for.
        logits: The model's logits [batch, pos, d_vocab], when asked for.
    """

    key: Tensor
    value: Tensor
    query: Tensor
    log_decay: Tensor
    strength: Tensor
    states: Tensor | None = None
    logits: Tensor | None = None

    def write(self, b: int, t: int) -> Float[Tensor, "d_k d_v"]:
        return torch.outer(self.key[b, t], self.value[b, t])

    def write_norm(self) -> Float[Tensor, "batch pos"]:
        return self.key.norm(dim=-1) * self.value.norm(dim=-1)


@torch.no_grad()
def trace_cell(
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    cell: Cell,
    *,
    attention_mask: Tensor | None = None,
    with_states: bool = False,
    with_logits: bool = False,
) -> CellTrace:
    """Run the model once and keep one cell's factors, gates, reads (and states) and the logits."""
    names = {n: cell.hook_name(model, n) for n in ("hook_write_key", "hook_write_value", "hook_read_query", "hook_log_decay")}
    strength = next((cell.hook_name(model, n) for n in STRENGTH_HOOKS if cell.hook_name(model, n) in model.hook_dict), None)
    if strength is not None:
        names["strength"] = strength
    if with_states:
        names["state"] = cell.state_hook(model)
    logits, cache = model.run_with_cache(
        tokens, attention_mask=attention_mask, names_filter=list(names.values()), return_cache_object=False
    )
    h = cell.head
    log_decay = cache[names["hook_log_decay"]][:, :, h].cpu()
    return CellTrace(
        key=cache[names["hook_write_key"]][:, :, h].cpu(),
        value=cache[names["hook_write_value"]][:, :, h].cpu(),
        query=cache[names["hook_read_query"]][:, :, h].cpu(),
        log_decay=log_decay,
        strength=cache[strength][:, :, h].cpu() if strength is not None else torch.ones_like(log_decay),
        states=cache[names["state"]].cpu() if with_states else None,
        logits=logits.cpu() if with_logits else None,
    )


@torch.no_grad()
def encode_trace(sae: Any, trace: CellTrace, kind: str) -> Float[Tensor, "batch pos d_sae"]:
    """SAE codes at every position: of the states, or of the writes (from their factors)."""
    if kind == "state":
        if trace.states is None:
            raise ValueError("this SAE reads states: trace the cell with with_states=True")
        return sae.encode(trace.states.to(sae.device, sae.dtype))
    return sae.encode((trace.key.to(sae.device, sae.dtype), trace.value.to(sae.device, sae.dtype)))
