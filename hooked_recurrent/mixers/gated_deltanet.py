"""Gated DeltaNet and its relatives (the delta rule with a decay) with hook points.

Hook points, in execution order (at ``blocks.{l}.linear_attn``)::

    hook_q_pre_conv      [batch, pos, key_head, d_k]   query projection before the short conv
    hook_k_pre_conv      [batch, pos, key_head, d_k]
    hook_v_pre_conv      [batch, pos, head, d_v]
    hook_gate_input      [batch, pos, head, d_v]       the output gate's input
    hook_q               [batch, pos, key_head, d_k]   after conv + SiLU, before L2 norm
    hook_k               [batch, pos, key_head, d_k]
    hook_v               [batch, pos, head, d_v]
    hook_beta            [batch, pos, head]            write strength beta_t
    hook_log_decay       [batch, pos, head]            g = log alpha (<= 0); [..., head, d_k] for a
                                                       decay per key channel (Kimi Delta Attention)
    hook_write_key       [batch, pos, head, d_k]       k_t, L2-normalised (repeated to value heads)
    hook_write_value     [batch, pos, head, d_v]       beta_t v_t
    hook_read_query      [batch, pos, head, d_k]       q_t, L2-normalised, times d_k^-1/2
    hook_write           [batch, pos, head, d_k, d_v]  beta_t k_t v_t^T (lazy)
    heads.{h}.hook_write [batch, pos, d_k, d_v]        one head's write (lazy)
    hook_state           [batch, pos, head, d_k, d_v]  S_t after the write (lazy)
    heads.{h}.hook_state [batch, pos, d_k, d_v]
    hook_recurrence_out  [batch, pos, head, d_v]       o_t = S_t^T q_t, before the gated norm
    hook_out             [batch, pos, d_model]         the layer's output projection

The recurrence is ``S_t = (I - beta_t k_t k_t^T) A_t S_{t-1} + beta_t k_t v_t^T`` with
``A_t = alpha_t`` (Gated DeltaNet) or ``diag(alpha_t)`` (one decay per key channel). The write
hooks carry the native write ``beta_t k_t v_t^T``; transformers computes the equal
``k_t (beta_t (v_t - (A_t S_{t-1})^T k_t))^T``, whose erase part belongs to the decay map here.
Factor, write and state tensors are float32 (float64 for float64 models), as in the kernels.

`GatedDeltaNetMixer` is the shared computation; a family's subclass says where the inputs come
from (`project`), which kernels transformers runs and how the output is normed and projected.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor, nn

from ..hook_points import HookPoint
from .base import MatrixRecurrentMixer, RecurrenceFactors
from .steps import cached_state, hooked_split, mask_padding, short_convolution, store_state

__all__ = ["DeltaRuleInputs", "GatedDeltaNetMixer", "delta_rule_step"]


def delta_rule_step(
    query: Float[Tensor, "batch 1 key_head d_k"],
    key: Float[Tensor, "batch 1 key_head d_k"],
    value: Float[Tensor, "batch 1 head d_v"],
    g: Float[Tensor, "batch 1 head"],
    beta: Float[Tensor, "batch 1 head"],
    initial_state: Float[Tensor, "batch head d_k d_v"],
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    in_place: bool = False,
    **kwargs: Any,
) -> tuple[Float[Tensor, "batch 1 head d_v"], Float[Tensor, "batch head d_k d_v"] | None]:
    """One token of the gated delta rule: transformers' ``torch_recurrent_gated_delta_rule`` (same
    arguments, same steps in float32, equal up to float rounding), with one state-sized allocation
    instead of five.

    transformers' loop builds the decayed state, two products with the state and the updated
    state as new tensors; at a fork's batch (a hundred rows of 16 x 128 x 128 states) each is a
    hundred megabytes of fresh memory, and their page faults cost more than the arithmetic. Here
    the decayed state is the only new tensor: the reads are batched matrix products and the
    write is added in place. With ``in_place`` (a float32 ``initial_state`` that nobody else
    reads) there is no new state at all: ``initial_state`` becomes the final state.
    """
    batch, length, key_heads, d_k = key.shape
    heads, d_v = value.shape[-2:]
    if length != 1:
        raise ValueError(f"delta_rule_step takes one token, got {length}")
    if key_heads != heads:
        query = query.repeat_interleave(heads // key_heads, dim=2)
        key = key.repeat_interleave(heads // key_heads, dim=2)
    q, k, v = (x[:, 0].to(torch.float32) for x in (query, key, value))  # [batch head d]
    if use_qk_l2norm_in_kernel:
        q = q * torch.rsqrt((q * q).sum(dim=-1, keepdim=True) + 1e-6)
        k = k * torch.rsqrt((k * k).sum(dim=-1, keepdim=True) + 1e-6)
    q = q / d_k**0.5
    decay = g[:, 0].to(torch.float32).exp()[..., None, None]
    if in_place and initial_state.dtype == torch.float32 and initial_state.is_contiguous():
        state = initial_state.mul_(decay)
    else:
        state = initial_state.to(torch.float32) * decay
    flat = state.view(batch * heads, d_k, d_v)
    remembered = torch.bmm(k.reshape(batch * heads, 1, d_k), flat).view(batch, heads, d_v)  # S^T k
    delta = (v - remembered) * beta[:, 0].to(torch.float32)[..., None]
    flat.baddbmm_(k.reshape(batch * heads, d_k, 1), delta.view(batch * heads, 1, d_v))  # S += k delta^T
    out = torch.bmm(q.reshape(batch * heads, 1, d_k), flat).view(batch, 1, heads, d_v)
    return out.to(query.dtype), state if output_final_state else None


@dataclass
class DeltaRuleInputs:
    """What a family's projections give the delta-rule mixer (from the padding-masked input).

    Attributes:
        qkv: Queries, keys and values before the short convolution, concatenated.
        gate: The output gate's input.
        beta: Write strengths after their activation.
        log_decay: ``log alpha_t`` in the compute dtype, one per head or one per key channel.
    """

    qkv: Float[Tensor, "batch pos channel"]
    gate: Float[Tensor, "batch pos value_dim"]
    beta: Float[Tensor, "batch pos head"]
    log_decay: Float[Tensor, "batch pos head"] | Float[Tensor, "batch pos head d_k"]


class GatedDeltaNetMixer(MatrixRecurrentMixer):
    """Hook points of one delta-rule layer; the block calls it in place of the HF module.

    A family's subclass sets the class attributes (transformers' functions of the family wrapped
    in ``staticmethod``; the names of the HF layer's output norm and projection) and implements
    `project`; it overrides `dimensions` if its HF layer names its sizes otherwise than
    transformers' Gated DeltaNet layers do.

    Args:
        hf_module: The HF layer it computes with (kept, not copied, not re-registered).
        context: The model's `RunContext`.
    """

    chunk_kernel: ClassVar[Callable[..., tuple[Tensor, Tensor | None]]]
    step_kernel: ClassVar[Callable[..., tuple[Tensor, Tensor | None]]]
    l2norm: ClassVar[Callable[..., Tensor]]
    output_norm_name: ClassVar[str] = "norm"  # the gated RMSNorm of each head's read
    output_projection_name: ClassVar[str] = "out_proj"
    per_channel_decay: ClassVar[bool] = False  # one decay per key channel instead of one per head

    def __init__(self, hf_module: nn.Module, context: Any = None) -> None:
        n_heads, n_key_heads, d_k, d_v = self.dimensions(hf_module)
        super().__init__(hf_module, context, n_heads, d_k, d_v, per_channel_decay=self.per_channel_decay)
        self.n_key_heads = n_key_heads
        self.hook_q_pre_conv = HookPoint("batch pos key_head d_k")
        self.hook_k_pre_conv = HookPoint("batch pos key_head d_k")
        self.hook_v_pre_conv = HookPoint("batch pos head d_v")
        self.hook_gate_input = HookPoint("batch pos head d_v")
        self.hook_q = HookPoint("batch pos key_head d_k")
        self.hook_k = HookPoint("batch pos key_head d_k")
        self.hook_v = HookPoint("batch pos head d_v")
        self.hook_beta = HookPoint("batch pos head")
        self.hook_out = HookPoint("batch pos d_model")

    @staticmethod
    def dimensions(hf_module: nn.Module) -> tuple[int, int, int, int]:
        """``(value heads, key heads, d_k, d_v)`` of the HF layer; each key head serves
        ``value heads // key heads`` value heads."""
        m = hf_module
        return m.num_v_heads, m.num_k_heads, m.head_k_dim, m.head_v_dim

    @property
    def output_projection(self) -> nn.Linear:
        return getattr(self.hf, self.output_projection_name)

    def project(self, hidden_states: Tensor, compute_dtype: torch.dtype) -> DeltaRuleInputs:
        """The layer's projections of its (padding-masked) input."""
        raise NotImplementedError

    def output(
        self, core_out: Float[Tensor, "batch pos head d_v"], gate: Float[Tensor, "batch pos head d_v"]
    ) -> Float[Tensor, "batch pos d_model"]:
        """The gated norm and output projection of the reads."""
        batch, length = core_out.shape[:2]
        norm = getattr(self.hf, self.output_norm_name)
        normed = norm(core_out.reshape(-1, self.d_v), gate.reshape(-1, self.d_v))
        return self.output_projection(normed.reshape(batch, length, -1))

    def output_inputs(self, activations: Callable[[str], Tensor]) -> tuple[Tensor, Tensor]:
        return activations("hook_recurrence_out"), activations("hook_gate_input")

    def forward(
        self, hidden_states: Tensor, cache: Any = None, attention_mask: Tensor | None = None, **kwargs: Any
    ) -> Float[Tensor, "batch pos d_model"]:
        """Same computation and cache updates as the HF layer's forward, with hooks."""
        m = self.hf
        hidden_states = mask_padding(hidden_states, self.padding_mask(attention_mask))
        batch, length, _ = hidden_states.shape
        recurrent_state = cached_state(cache, m.layer_idx)
        # float32 like the kernels, except for float64 models (exact checks).
        compute_dtype = torch.float64 if hidden_states.dtype == torch.float64 else torch.float32
        inputs = self.project(hidden_states, compute_dtype)

        heads, key_heads, d_k, d_v = self.n_heads, self.n_key_heads, self.d_k, self.d_v
        pre_conv = [self.hook_q_pre_conv, self.hook_k_pre_conv, self.hook_v_pre_conv]
        mixed_qkv = hooked_split(inputs.qkv, list(zip(pre_conv, [key_heads, key_heads, heads], [d_k, d_k, d_v])))
        gate = self.hook_gate_input(inputs.gate.reshape(batch, length, heads, d_v))
        mixed_qkv = short_convolution(mixed_qkv, m.conv1d, m.activation, cache, m.layer_idx)
        query, key, value = torch.split(mixed_qkv, [key_heads * d_k, key_heads * d_k, heads * d_v], dim=-1)
        query = self.hook_q(query.reshape(batch, length, key_heads, d_k))
        key = self.hook_k(key.reshape(batch, length, key_heads, d_k))
        value = self.hook_v(value.reshape(batch, length, heads, d_v))
        beta = self.hook_beta(inputs.beta)
        g = self.hook_log_decay(inputs.log_decay)
        cu_seqlens = kwargs.pop("cu_seq_lens_q", None)

        # A fork's private state may be decayed in place when hooks look at the factors (`recur` then
        # has what it needs from the state before the kernel runs, and no NaN fallback reruns it).
        in_place = getattr(cache, "in_place", False) and self._looks_at_factors()
        step = recurrent_state is not None and length == 1

        def native() -> tuple[Tensor, Tensor | None]:
            if step and in_place and self.step_kernel is delta_rule_step:
                return delta_rule_step(query, key, value, g, beta, recurrent_state, True, True, in_place=True)
            kernel = self.step_kernel if step else self.chunk_kernel
            return kernel(
                query,
                key,
                value,
                g=g,
                beta=beta,
                initial_state=recurrent_state,
                output_final_state=cache is not None,
                use_qk_l2norm_in_kernel=True,
                cu_seqlens=cu_seqlens,
            )

        def factors() -> RecurrenceFactors:
            # The same normalisation, repetition and scaling the kernels apply internally.
            repeat = heads // key_heads
            q_hat = self.l2norm(query.to(compute_dtype), dim=-1, eps=1e-6)
            k_hat = self.l2norm(key.to(compute_dtype), dim=-1, eps=1e-6)
            if repeat > 1:
                q_hat = q_hat.repeat_interleave(repeat, dim=2)
                k_hat = k_hat.repeat_interleave(repeat, dim=2)
            beta_c = beta.to(compute_dtype)
            return RecurrenceFactors(
                query=q_hat * d_k**-0.5,
                key=k_hat,
                value=value.to(compute_dtype) * beta_c[..., None],
                log_decay=g.to(compute_dtype),
                erase=beta_c,
            )

        core_out, final_state = self.recur(
            factors=factors,
            native=None if compute_dtype == torch.float64 else native,
            initial_state=recurrent_state,
            output_dtype=query.dtype,
            private_state=in_place,
        )
        if cache is not None:
            store_state(cache, m.layer_idx, final_state)
        return self.hook_out(self.output(core_out, gate))
