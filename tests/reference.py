"""Independent float64 references, written from the equations (not by calling the code under test).

docs/design.md §2, per batch element and head, state S of shape [d_k, d_v]::

    S_t = D_t(S_{t-1}) + W_t,      W_t = k_t u_t^T,      o_t = S_t^T q_t
    D_t(S) = (I - e_t k_t k_t^T) A_t S,  A_t = exp(g_t) (one number) or diag(exp(g_t)) (g_t of width d_k)
    Gated DeltaNet: e_t = beta_t, u_t = beta_t v_t
    Mamba-2:        no erase, g_t = dt_t A_h, k_t = B_t, u_t = dt_t x_t, q_t = C_t
    Mamba-1:        one head per channel c (d_v = 1), g_t = dt_t[c] A[c] (per key channel), k_t = B_t,
                    u_t = dt_t[c] x_t[c], q_t = C_t
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

F64 = torch.float64


@dataclass
class Factors:
    """Per-position factors, float64, shaped [batch, pos, head, ...]."""

    query: Tensor  # [b, t, h, d_k]
    key: Tensor  # [b, t, h, d_k]
    value: Tensor  # [b, t, h, d_v]  (u_t)
    log_decay: Tensor  # [b, t, h], or [b, t, h, d_k] for a decay per key channel
    erase: Tensor | None  # [b, t, h] or None


def gdn_factors(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor) -> Factors:
    """Gated DeltaNet factors from the layer's raw q, k (key heads), v, beta, g.

    q and k are L2-normalised as the model defines it (``x / sqrt(|x|^2 + 1e-6)``), repeated from
    key heads to value heads, and the query is scaled by ``d_k ** -0.5``.
    """
    q, k, v, beta, g = (x.to(F64) for x in (q, k, v, beta, g))
    n_v, n_k = v.shape[2], k.shape[2]

    def norm(x: Tensor) -> Tensor:
        return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)

    q_hat = norm(q).repeat_interleave(n_v // n_k, dim=2) * q.shape[-1] ** -0.5
    k_hat = norm(k).repeat_interleave(n_v // n_k, dim=2)
    return Factors(query=q_hat, key=k_hat, value=beta[..., None] * v, log_decay=g, erase=beta)


def mamba2_factors(x: Tensor, B: Tensor, C: Tensor, dt: Tensor, A: Tensor) -> Factors:
    """Mamba-2 factors from the layer's x [b,t,h,p], B and C [b,t,g,n], dt [b,t,h] and A [h]."""
    x, B, C, dt, A = (v.to(F64) for v in (x, B, C, dt, A))
    repeat = x.shape[2] // B.shape[2]
    return Factors(
        query=C.repeat_interleave(repeat, dim=2),
        key=B.repeat_interleave(repeat, dim=2),
        value=dt[..., None] * x,
        log_decay=dt * A,
        erase=None,
    )


def mamba1_factors(x: Tensor, B: Tensor, C: Tensor, dt: Tensor, A: Tensor) -> Factors:
    """Mamba-1 factors, each channel a head with d_v = 1, from x and dt [b,t,channel], B and C
    [b,t,n] (shared by every channel) and A [channel, n]: a decay per key channel dt_c A_c."""
    x, B, C, dt, A = (v.to(F64) for v in (x, B, C, dt, A))
    heads = x.shape[2]
    return Factors(
        query=C[:, :, None].expand(-1, -1, heads, -1),
        key=B[:, :, None].expand(-1, -1, heads, -1),
        value=(dt * x)[..., None],
        log_decay=dt[..., None] * A,
        erase=None,
    )


def linear_attention_factors(q: Tensor, k: Tensor, v: Tensor, g: Tensor) -> Factors:
    """Linear attention with a decay (MiniMax's lightning attention): S_t = exp(g_t) S_{t-1} + k_t v_t^T."""
    q, k, v, g = (x.to(F64) for x in (q, k, v, g))
    return Factors(query=q, key=k, value=v, log_decay=g, erase=None)


DELTA_RULE_INPUTS = ("hook_q", "hook_k", "hook_v", "hook_beta", "hook_log_decay")

# Per recurrent layer kind: the hooks its reference factors are rebuilt from, and how.
REFERENCES: dict[str, tuple[tuple[str, ...], Callable[..., Factors]]] = {
    "gated_deltanet": (DELTA_RULE_INPUTS, lambda mixer, *v: gdn_factors(*v)),
    # Kimi Delta Attention: the same factors, with a log-decay per key channel.
    "kimi_delta_attention": (DELTA_RULE_INPUTS, lambda mixer, *v: gdn_factors(*v)),
    "mamba2": (
        ("hook_x", "hook_B", "hook_C", "hook_dt"),
        lambda mixer, *v: mamba2_factors(*v, -torch.exp(mixer.hf.A_log.detach().to(F64))),
    ),
    "mamba1": (
        ("hook_x", "hook_B", "hook_C", "hook_dt"),
        lambda mixer, *v: mamba1_factors(*v, -torch.exp(mixer.hf.A_log.detach().to(F64))),
    ),
    "lightning_attention": (("hook_q", "hook_k", "hook_v", "hook_log_decay"), lambda mixer, *v: linear_attention_factors(*v)),
}


def hf_cached_state(hf_cache, layer: int) -> Tensor:
    """The recurrent state transformers' own cache holds for a layer, in transformers' layout.

    (``MiniMaxCache`` keeps its states in a list of its own rather than in its layers.)
    """
    if hasattr(hf_cache, "linear_cache"):
        return hf_cache.linear_cache[layer]
    return hf_cache.layers[layer].recurrent_states[0]


def input_hook_names(model, layer: int) -> list[str]:
    """The hooks from which `factors_from_cache` rebuilds a layer's factors."""
    names, _ = REFERENCES[model.cfg.layer_types[layer]]
    return [model.cfg.hook_name(layer, n) for n in names]


def factors_from_cache(model, cache, layer: int) -> Factors:
    """Reference factors of a layer from its cached raw inputs (and its mixer's fixed parameters)."""
    _, build = REFERENCES[model.cfg.layer_types[layer]]
    return build(model.mixer(layer), *(cache[n] for n in input_hook_names(model, layer)))


def native_write(f: Factors) -> Tensor:
    """The native writes ``k_t u_t^T``: [b, t, h, d_k, d_v]."""
    return torch.einsum("bthk,bthv->bthkv", f.key, f.value)


def recurrence(
    f: Factors,
    initial_state: Tensor | None = None,
    write_override: Callable[[int, Tensor], Tensor] | None = None,
    state_override: Callable[[int, Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Step-by-step float64 recurrence.

    Args:
        f: Factors.
        initial_state: [b, h, d_k, d_v] (zeros if None).
        write_override: ``(t, native W_t [b, h, d_k, d_v]) -> W_t to use``.
        state_override: ``(t, S_t [b, h, d_k, d_v]) -> S_t to continue from``.

    Returns:
        ``(states [b, t, h, d_k, d_v], reads [b, t, h, d_v])``.
    """
    b, t_len, h, d_k = f.key.shape
    d_v = f.value.shape[-1]
    state = torch.zeros(b, h, d_k, d_v, dtype=F64) if initial_state is None else initial_state.to(F64)
    states, reads = [], []
    for t in range(t_len):
        k = f.key[:, t]
        alpha = torch.exp(f.log_decay[:, t])
        # One decay per head scales the whole state; one per key channel scales its rows.
        state = state * (alpha[..., None] if alpha.dim() == 3 else alpha[..., None, None])
        if f.erase is not None:
            state = state - f.erase[:, t][..., None, None] * torch.einsum("bhk,bhj,bhjv->bhkv", k, k, state)
        write = torch.einsum("bhk,bhv->bhkv", k, f.value[:, t])
        if write_override is not None:
            write = write_override(t, write).to(F64)
        state = state + write
        if state_override is not None:
            state = state_override(t, state).to(F64)
        states.append(state)
        reads.append(torch.einsum("bhkv,bhk->bhv", state, f.query[:, t]))
    return torch.stack(states, 1), torch.stack(reads, 1)


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """max |actual - expected| / max |expected|."""
    expected = expected.to(F64)
    return ((actual.to(F64) - expected).abs().max() / expected.abs().max().clamp(min=1e-30)).item()
