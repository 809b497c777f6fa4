"""TransformerLens' `ActivationCache`, made to work on hybrid recurrent models.

`run_with_cache` returns a `RecurrentActivationCache`. Every `ActivationCache` method either works
on these models or raises an error that says why it does not apply:

- Unchanged (they read TransformerLens' hook names, which these models have): indexing by name or
  ``(name, layer)`` shorthand, ``keys/values/items``, ``to``, ``toggle_autodiff``,
  ``remove_batch_dim``, ``apply_slice_to_batch_dim``, ``stack_activation``, ``logit_attrs``,
  ``decompose_resid`` (a block's token mixer, attention or recurrent, is its ``attn_out``; blocks
  without an MLP make ``cfg.attn_only`` true), ``apply_ln_to_stack`` (with the norms'
  ``hook_scale``), ``get_full_resid_decomposition`` (where every mixer has head results and every
  MLP is gated; otherwise it says which output bias or head results are unknown).
- Adapted: ``accumulated_resid``, ``decompose_resid`` and ``apply_ln_to_stack`` say so when a block
  has no MLP (hence no ``resid_mid`` / ``ln2``); the decompositions say so when a family's blocks
  rescale the residual stream or their sublayers' outputs (MiniMax, Granite 4, Falcon-H1), which
  then is not a sum of its components' outputs; ``compute_head_results`` and ``stack_head_results`` give every head of
  every mixer, attention or recurrent (each mixer's heads, ``L{l}H{h}``, sum to its ``hook_out``);
  the head and neuron methods say so when a block has no such results (attention run as the HF
  module is, no gated MLP, or a post-norm block whose outputs are normed before they are added); ``ssm_layers`` and
  ``compute_ssm_state`` read the recurrent layers and their cached ``hook_state``.
- Not applicable: ``compute_ssm_effective_attention`` (TransformerBridge's reconstruction of an SSM
  from its interior hooks; here the writes and states are hook points themselves).

Head results live under ``blocks.{l}.{mixer}.hook_result`` (``attn`` only for attention layers),
like TransformerLens' ``blocks.{l}.attn.hook_result``.
"""

from __future__ import annotations

from typing import Any

import einops
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.ActivationCache import ActivationCache
from transformer_lens.utilities import Slice

__all__ = ["RecurrentActivationCache"]


class RecurrentActivationCache(ActivationCache):
    """An `ActivationCache` of a `HookedRecurrentModel` run (see the module docstring)."""

    def _mixer(self, layer: int) -> tuple[str, Any]:
        cfg = self.model.cfg
        name = cfg.mixer_name(layer)
        return f"blocks.{layer}.{name}", self.model.mixer(layer)

    def _require_mid(self, what: str) -> None:
        if self.model.cfg.attn_only:
            raise ValueError(
                f"{what}: {self.model.cfg.architecture} blocks have no MLP, hence no resid_mid and no "
                "ln2 (a block is norm -> mixer -> residual add); use incl_mid=False and mlp_input=False."
            )

    def _require_additive(self, what: str) -> None:
        rescaled = [l for l, block in enumerate(self.model.blocks) if not block.additive_residual]
        if rescaled:
            raise ValueError(
                f"{what}: the residual stream of {self.model.cfg.architecture} is not a sum of its components' "
                f"outputs (blocks {rescaled} scale it, or what they add to it, by fixed factors), so it does not "
                "decompose into them; accumulated_resid, stack_head_results and the hook points themselves still apply."
            )

    def decompose_resid(self, layer: int | None = None, mlp_input: bool = False, mode: str = "all",
                        apply_ln: bool = False, pos_slice: Any = None, incl_embeds: bool = True,
                        return_labels: bool = False) -> Any:
        self._require_additive("decompose_resid")
        if mlp_input:
            self._require_mid("decompose_resid(mlp_input=True)")
        return super().decompose_resid(layer, mlp_input, mode, apply_ln, pos_slice, incl_embeds, return_labels)

    def get_full_resid_decomposition(self, layer: int | None = None, mlp_input: bool = False,
                                     expand_neurons: bool = True, apply_ln: bool = False, pos_slice: Any = None,
                                     return_labels: bool = False, project_output_onto: Tensor | None = None) -> Any:
        self._require_additive("get_full_resid_decomposition")
        return super().get_full_resid_decomposition(
            layer, mlp_input, expand_neurons, apply_ln, pos_slice, return_labels, project_output_onto
        )

    def accumulated_resid(self, layer: int | None = None, incl_mid: bool = False, apply_ln: bool = False,
                          pos_slice: Any = None, mlp_input: bool = False, return_labels: bool = False) -> Any:
        if incl_mid or mlp_input:
            self._require_mid("accumulated_resid(incl_mid=True or mlp_input=True)")
        return super().accumulated_resid(layer, incl_mid, apply_ln, pos_slice, mlp_input, return_labels)

    def apply_ln_to_stack(self, residual_stack: Tensor, layer: int | None = None, mlp_input: bool = False,
                          pos_slice: Any = None, batch_slice: Any = None, has_batch_dim: bool = True,
                          recompute_ln: bool = False) -> Tensor:
        if mlp_input:
            self._require_mid("apply_ln_to_stack(mlp_input=True)")
        return super().apply_ln_to_stack(
            residual_stack, layer, mlp_input, pos_slice, batch_slice, has_batch_dim, recompute_ln
        )

    # ------------------------------------------------------------------ heads

    def compute_head_results(self) -> None:
        """Cache every head's contribution to the residual stream, for every layer (once)."""
        for layer in range(self.model.cfg.n_layers):
            prefix, mixer = self._mixer(layer)
            if f"{prefix}.hook_result" in self.cache_dict:
                continue
            if not hasattr(mixer, "head_results"):
                raise ValueError(
                    f"layer {layer} ({self.model.cfg.layer_types[layer]}) runs its HF module as it is and "
                    "exposes only its output (hook_out), so it has no per-head results."
                )
            if self.model.blocks[layer].normed_outputs:
                raise ValueError(
                    f"block {layer} norms its mixer's output before adding it to the residual stream, so "
                    "per-head results would not add up to what the block adds; it has no per-head results."
                )

            def activation(name: str, prefix: str = prefix) -> Tensor:
                key = f"{prefix}.{name}"
                if key not in self.cache_dict:
                    raise KeyError(f"head results need {key} in the cache; cache it (or run_with_cache unfiltered)")
                return self.cache_dict[key]

            self.cache_dict[f"{prefix}.hook_result"] = mixer.head_results(activation)

    def stack_head_results(self, layer: int = -1, return_labels: bool = False, incl_remainder: bool = False,
                           pos_slice: Any = None, apply_ln: bool = False) -> Any:
        """Every head's result in the layers before ``layer``, stacked (labels ``L{l}H{h}``).

        As TransformerLens', with every mixer's heads: attention heads and recurrent heads alike.
        """
        pos_slice = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        if layer is None or layer == -1:
            layer = self.model.cfg.n_layers
        self.compute_head_results()
        components, labels = [], []
        for l in range(layer):
            result = self.cache_dict[f"{self._mixer(l)[0]}.hook_result"]
            components.append(pos_slice.apply(result, dim=-3))
            labels += [f"L{l}H{h}" for h in range(result.shape[-2])]
        if components:
            stack = einops.rearrange(torch.cat(components, dim=-2), "... head d_model -> head ... d_model")
        else:
            stack = torch.zeros(0, *pos_slice.apply(self["hook_embed"], dim=-2).shape, device=self.model.cfg.device)
        if incl_remainder:
            total = pos_slice.apply(self[("resid_post", layer - 1)], dim=-2)
            stack = torch.cat([stack, (total - stack.sum(0))[None]], dim=0)
            labels.append("remainder")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    # ------------------------------------------------------------------ neurons

    def _require_neurons(self, layer: int) -> None:
        block = self.model.blocks[layer]
        if not hasattr(block, "mlp") or not hasattr(block.mlp, "W_out"):
            raise ValueError(
                f"block {layer} of {self.model.cfg.architecture} has no gated MLP (no mlp.hook_post and "
                "W_out), so it has no neuron results; decompose_resid(mode='mlp') gives whole MLP outputs."
            )
        if block.normed_outputs:
            raise ValueError(
                f"block {layer} norms its MLP's output before adding it to the residual stream (hook_mlp_out "
                "is the normed output), so neuron results would not add up to it; it has no neuron results."
            )

    def get_neuron_results(self, layer: int, neuron_slice: Any = None, pos_slice: Any = None,
                           project_output_onto: Tensor | None = None) -> Tensor:
        self._require_neurons(layer)
        return super().get_neuron_results(layer, neuron_slice, pos_slice, project_output_onto)

    def stack_neuron_results(self, layer: int, pos_slice: Any = None, neuron_slice: Any = None,
                             return_labels: bool = False, incl_remainder: bool = False, apply_ln: bool = False,
                             project_output_onto: Tensor | None = None) -> Any:
        top = self.model.cfg.n_layers if layer is None or layer == -1 else layer
        for l in range(top):
            self._require_neurons(l)
        return super().stack_neuron_results(
            layer, pos_slice, neuron_slice, return_labels, incl_remainder, apply_ln, project_output_onto
        )

    # ------------------------------------------------------------------ recurrent layers

    def ssm_layers(self, mixer_type: Any = None) -> list[int]:
        """The matrix-recurrent layers (``mixer_type``: a layer kind such as ``"mamba2"``, or None for all)."""
        cfg = self.model.cfg
        return [l for l in cfg.recurrent_layers if mixer_type is None or cfg.layer_types[l] == mixer_type]

    def compute_ssm_state(
        self, layer: int | None = None, time_step: int | None = None
    ) -> Float[Tensor, "batch pos head d_k d_v"] | Tensor | dict[int, Tensor]:
        """The recurrent states ``S_t`` ``[batch, pos, head, d_k, d_v]`` of one or every recurrent layer.

        They are hook points here (``hook_state``, exact, key-by-value layout), so they are read from
        the cache rather than reconstructed; ``time_step`` picks one position.
        """
        layers = self.ssm_layers() if layer is None else [layer]
        states = {}
        for l in layers:
            if l not in self.model.cfg.recurrent_layers:
                raise TypeError(f"layer {l} is a {self.model.cfg.layer_types[l]} layer: it has no recurrent state")
            key = self.model.cfg.hook_name(l, "hook_state")
            if key not in self.cache_dict:
                raise KeyError(f"{key} is not in this cache: run_with_cache with names_filter including it")
            state = self.cache_dict[key]
            states[l] = state if time_step is None else state[..., time_step, :, :, :]
        if layer is not None:
            return states[layer]
        if len(states) == self.model.cfg.n_layers:
            return torch.stack(list(states.values()))
        return states

    def compute_ssm_effective_attention(self, *args: Any, **kwargs: Any) -> Tensor:
        raise NotImplementedError(
            "compute_ssm_effective_attention is TransformerBridge's reconstruction of an SSM's mixing "
            "from its interior hooks; here every write (hook_write), state (hook_state) and read "
            "(hook_read_query, hook_recurrence_out) is a hook point of its own: cache those instead."
        )
