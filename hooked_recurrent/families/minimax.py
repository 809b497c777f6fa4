"""MiniMax (``minimax``): lightning attention (linear attention with a fixed decay per head) and softmax attention.

Lightning attention is ``S_t = lambda_h S_{t-1} + k_t v_t^T``, ``o_t = S_t^T q_t``, with
``q, k, v = SiLU(qkv_proj(x))`` and ``lambda_h = exp(-slope_h)`` fixed per head and layer (no
short convolution, no erase); the reads of all heads are RMS-normed together, gated by
``sigmoid(output_gate(x))`` and projected. Its hooks (at ``blocks.{l}.linear_attn``) are those of
every matrix-recurrent mixer plus ``hook_q``, ``hook_k``, ``hook_v``, ``hook_gate`` and
``hook_out``; ``hook_log_decay`` carries ``-slope_h`` at every position. transformers runs this
recurrence inline (no kernel function); the hooked layer runs the same blocked computation
(`lightning_recurrence`) where nothing is edited, and `hooked_recurrent.recurrence` for edited
heads. Blocks norm the residual stream before each sublayer and add scaled outputs
(`MiniMaxBlock`); the softmax attention layers and the MoE MLPs run unchanged.

transformers' own ``MiniMaxCache`` keeps the lightning states in a list of its own beside a
key/value layer for every index, and its ``get_seq_length()`` reads layer 0, whose key/value layer
stays empty when layer 0 is a lightning layer (as in the released models): it returns 0, so a
cached continuation builds its masks for the wrong length, and left-padded generation goes wrong. The hooked
model's cache (`MiniMaxRecurrentCache`, what ``RecurrentCache(model, n)`` builds for MiniMax)
holds typed layers, so its token count comes from an attention layer, and generation is exact.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformers import MiniMaxConfig
from transformers.models.minimax.modeling_minimax import MiniMaxCache

from ..blocks import BlockHooks, RunContext
from ..cache import RecurrentCache
from ..components import NormHooks, mlp_hooks
from ..config import HookedRecurrentConfig
from ..hook_points import HookPoint
from ..mixers.attention import AttentionOutputHooks
from ..mixers.base import MatrixRecurrentMixer, RecurrenceFactors
from ..mixers.steps import cached_state, mask_padding, store_state
from .base import ATTENTION, TINY, Family, LayerKind, base_config

__all__ = ["LIGHTNING", "LightningAttention", "MiniMaxBlock", "MiniMaxRecurrentCache", "MiniMax"]

LIGHTNING = LayerKind("lightning_attention", "linear_attn", recurrent=True)


class LightningAttention(MatrixRecurrentMixer):
    """Hook points of one lightning attention layer; the block calls it in place of the HF module.

    Args:
        hf_module: The ``MiniMaxLightningAttention`` it computes with (a plain reference).
        context: The model's `RunContext`.
    """

    def __init__(self, hf_module: nn.Module, context: RunContext | None = None) -> None:
        m = hf_module
        super().__init__(m, context, m.num_attention_heads, m.head_dim, m.head_dim)
        self.hook_q = HookPoint("batch pos head d_k")
        self.hook_k = HookPoint("batch pos head d_k")
        self.hook_v = HookPoint("batch pos head d_v")
        self.hook_gate = HookPoint("batch pos value_dim")
        self.hook_out = HookPoint("batch pos d_model")

    @property
    def output_projection(self) -> nn.Linear:
        return self.hf.out_proj

    def forward(
        self, hidden_states: Tensor, cache: Any = None, attention_mask: Tensor | None = None, **kwargs: Any
    ) -> Tensor:
        """Same computation and cache updates as ``MiniMaxLightningAttention.forward``, with hooks."""
        m = self.hf
        batch, length, _ = hidden_states.shape
        heads, d = self.n_heads, self.d_k
        recurrent_state = cached_state(cache, m.layer_idx)
        qkv = mask_padding(m.act_fn(m.qkv_proj(hidden_states)), self.padding_mask(attention_mask))
        query, key, value = qkv.reshape(batch, length, heads, 3 * d).split(d, dim=-1)
        query, key, value = self.hook_q(query), self.hook_k(key), self.hook_v(value)
        # float32 at least: the state sums many writes (float64 models stay float64).
        compute_dtype = torch.float64 if hidden_states.dtype == torch.float64 else torch.float32
        decay = -m.slope_rate.reshape(heads).to(compute_dtype)
        log_decay = self.hook_log_decay(decay.expand(batch, length, heads))

        def factors() -> RecurrenceFactors:
            return RecurrenceFactors(
                query=query.to(compute_dtype),
                key=key.to(compute_dtype),
                value=value.to(compute_dtype),
                log_decay=log_decay.to(compute_dtype),
                erase=None,
            )

        def native() -> tuple[Tensor, Tensor]:
            heads_first = [x.to(compute_dtype).transpose(1, 2) for x in (query, key, value)]
            reads, final = lightning_recurrence(m, *heads_first, recurrent_state)
            return reads.transpose(1, 2), final

        reads, final_state = self.recur(
            factors=factors,
            # transformers' decay tables of float64 models were computed in float32 (then cast).
            native=None if compute_dtype == torch.float64 else native,
            initial_state=recurrent_state,
            output_dtype=compute_dtype,
        )
        if cache is not None:
            store_state(cache, m.layer_idx, final_state)
        gate = self.hook_gate(torch.sigmoid(m.output_gate(hidden_states)))
        return self.hook_out(self.output(reads, gate))

    def output(
        self, core_out: Float[Tensor, "batch pos head d_v"], gate: Float[Tensor, "batch pos value_dim"]
    ) -> Float[Tensor, "batch pos d_model"]:
        """The norm of the reads (over every head), the sigmoid output gate, the output projection."""
        m = self.hf
        normed = m.norm(core_out.flatten(2).to(m.out_proj.weight.dtype))
        return m.out_proj(gate * normed)

    def output_inputs(self, activations: Callable[[str], Tensor]) -> tuple[Tensor, Tensor]:
        return activations("hook_recurrence_out"), activations("hook_gate")


def lightning_recurrence(
    m: nn.Module,
    query: Float[Tensor, "batch head pos d"],
    key: Float[Tensor, "batch head pos d"],
    value: Float[Tensor, "batch head pos d"],
    state: Float[Tensor, "batch head d d"] | None,
) -> tuple[Float[Tensor, "batch head pos d"], Float[Tensor, "batch head d d"]]:
    """The recurrence as transformers computes it, in the same order of operations (so its reads
    are transformers' to the last bit): blocks of ``m.block_size`` positions with the layer's
    precomputed decay tables from the start, one position at a time when continuing a state."""
    batch, heads, length, d = key.shape
    if state is not None:
        step_decay = torch.exp(-m.slope_rate).to(key.dtype)
        reads = []
        for t in range(length):
            state = step_decay * state + key[:, :, t, :, None] @ value[:, :, t, None]
            reads.append(query[:, :, t, None] @ state)
        return torch.cat(reads, dim=-2), state
    state = key.new_zeros(batch, heads, d, d)
    reads = []
    for start in range(0, length, m.block_size):
        q, k, v = (x[:, :, start : start + m.block_size] for x in (query, key, value))
        n = k.shape[2]
        within = (q @ k.transpose(-1, -2) * m.diagonal_decay[:, :, :n, :n]) @ v
        reads.append((q * m.query_decay[:, :n]) @ state + within)
        state = state * torch.exp(-m.slope_rate * n) + (k * m.key_decay[:, -n:]).transpose(-1, -2) @ v
    return torch.cat(reads, dim=-2), state


class MiniMaxBlock(BlockHooks):
    """A MiniMax layer: norm, then mixer and residual combined with fixed weights; again for the MLP.

    ``x = a * ln1(x) + b * mixer(ln1(x))``, then ``x = c * ln2(x) + d * mlp(ln2(x))`` with the
    layer's ``alpha``/``beta`` factors. Hook points: ``hook_resid_pre``, ``ln1.hook_normalized``,
    the mixer's, ``hook_attn_out`` (the mixer's output, before its factor), ``hook_resid_mid``, ``ln2.hook_normalized``, ``hook_mlp_out`` (the MoE output,
    before its factor), ``hook_resid_post``.
    """

    additive_residual = False  # the residual stream is rescaled by the layer's factors

    def __init__(self, hf_layer: nn.Module, index: int, context: RunContext) -> None:
        super().__init__(hf_layer, index, context)
        self.ln1 = NormHooks(hf_layer.input_layernorm)
        if hf_layer.block_type == "linear_attention":
            self.mixer_name = LIGHTNING.container
            self.linear_attn = LightningAttention(hf_layer.self_attn, context)
        else:
            self.mixer_name = ATTENTION.container
            self.attn = AttentionOutputHooks(hf_layer.self_attn)
        self.hook_attn_out = HookPoint("batch pos d_model")
        self.hook_resid_mid = HookPoint("batch pos d_model")
        self.ln2 = NormHooks(hf_layer.post_attention_layernorm)
        self.mlp = mlp_hooks(hf_layer.mlp)
        self.hook_mlp_out = HookPoint("batch pos d_model")
        self.hook_resid_post = HookPoint("batch pos d_model")

    def forward(self, hidden_states: Tensor, **kwargs: Any) -> Tensor:
        layer = self.hf
        normed = self.ln1(self.enter(hidden_states))
        mixed = self.hook_attn_out(getattr(self, self.mixer_name)(normed, **kwargs))
        residual = self.hook_resid_mid(normed * layer.attn_alpha_factor + mixed * layer.attn_beta_factor)
        normed = self.ln2(residual)
        mlp_out = self.hook_mlp_out(self.mlp(normed))
        return self.hook_resid_post(normed * layer.mlp_alpha_factor + mlp_out * layer.mlp_beta_factor)


class MiniMaxRecurrentCache(RecurrentCache, MiniMaxCache):
    """The `RecurrentCache` of MiniMax models (``MiniMaxModel`` accepts only a ``MiniMaxCache``).

    States live in typed per-layer entries, like every `RecurrentCache`; ``MiniMaxCache``'s own
    list of states stays empty.
    """

    def __init__(self, model: Any, batch_size: int) -> None:
        super().__init__(model, batch_size)
        self.linear_cache = []


class MiniMax(Family):
    """MiniMax: lightning attention and softmax attention layers, MoE MLPs, scaled residuals."""

    name = "minimax"
    hf_class_names = ("MiniMaxForCausalLM",)
    layer_kinds = (LIGHTNING, ATTENTION)
    uses_position_ids = True
    example_hub_id = "MiniMaxAI/MiniMax-Text-01-hf"
    cache_class = MiniMaxRecurrentCache

    @classmethod
    def build_block(cls, hf_layer: nn.Module, index: int, context: RunContext) -> MiniMaxBlock:
        return MiniMaxBlock(hf_layer, index, context)

    @classmethod
    def describe(cls, hf_model: nn.Module, model_name: str, tokenizer: Any = None) -> HookedRecurrentConfig:
        c = hf_model.config
        kinds = {"linear_attention": LIGHTNING.name, "full_attention": ATTENTION.name}
        head_dim = c.head_dim or c.hidden_size // c.num_attention_heads
        return base_config(
            hf_model,
            model_name,
            tokenizer,
            layer_types=[kinds[t] for t in c.layer_types[: c.num_hidden_layers]],
            n_heads=c.num_attention_heads,
            d_k=head_dim,
            d_v=head_dim,
            n_attn_heads=c.num_attention_heads,
            n_kv_heads=c.num_key_value_heads,
            d_head=head_dim,
        )

    @classmethod
    def tiny_config(cls, **overrides: Any) -> MiniMaxConfig:
        """4 layers (softmax attention third, lightning first as in the released models), 4 heads
        of width 16, blocks of 16 positions in transformers' lightning kernel, 4 experts (top 2),
        residual factors away from 1."""
        params = dict(
            TINY,
            hidden_size=64,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            block_size=16,
            layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention"],
            linear_attn_alpha_factor=0.8,
            linear_attn_beta_factor=1.3,
            full_attn_alpha_factor=1.2,
            full_attn_beta_factor=0.7,
            mlp_alpha_factor=0.9,
            mlp_beta_factor=1.1,
        )
        params.update(overrides)
        return MiniMaxConfig(**params)
