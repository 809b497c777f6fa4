"""Trainable WriteSAE: reconstruction + AuxK losses on dense states or on rank-1 writes in factor form.

Losses are in the paper's units: MSE is the mean over samples *and* the ``d_k * d_v`` entries, and the
total is ``mse + aux_loss_coefficient * aux + penalty``. The penalty (`SparsityLoss`) is zero for TopK and
BatchTopK; for ``sparsity="jumprelu"`` it is ``lambda * mean_b sum_i H(z_i - theta_i)`` (the L0, with
straight-through threshold gradients, `writesae.activations`); for ``"gated"`` it is
``lambda * mean_b sum_i g_i + aux_coefficient * MSE(x, g through the frozen decoder)`` with the gate
values ``g = ReLU(pi_gate)`` (``gate="hard"``, Rajamanoharan et al.'s Gated SAE; atoms are kept near unit
norm by re-normalisation, so the L1 needs no decoder-norm weights). With ``gate="soft_sigmoid"`` (the
reference code's gate) ``g = sigmoid(pi_gate / tau)``, and in training mode the SAE reconstructs from
``g ReLU(pi_mag)``; its reported code, its dead-atom counts and every code outside training keep the hard
gate ``1[pi_gate > 0]``. (SAELens'
``training_forward_pass``, kept for its ``SAETrainer``, reports the same losses summed over entries,
SAELens' convention.)

Factor-form batches ``(key [B, d_k], value [B, d_v])`` stand for the writes ``T_b = k_b u_b^T``. With
``S_hat = sum_j a_j A_j + c`` (``c = b_dec (+ input_mean)``), the squared error is expanded so that no
``d_k x d_v`` matrix per sample is built::

    ||T - S_hat||^2 = ||k||^2 ||u||^2 - 2 (sum_j a_j <T, A_j> + k^T c u)
                      + a^T G a + 2 sum_j a_j <A_j, c> + ||c||^2

with ``<T, A_j> = sum_r (v_jr . k)(w_jr . u)`` and ``G`` the Gram matrix of the sample's active atoms.
The AuxK term (dead atoms regress the detached residual ``R = T - S_hat``) expands the same way, using
the cross-Gram between active and AuxK atoms. Gram algebra costs ``(K r)^2 (d_k + d_v)`` per sample and
a dense sum ``K r d_k d_v``; ``factor_loss="auto"`` picks the cheaper per term (at ``d_k = d_v = 128``,
``k = 32``: Gram for the reconstruction, dense for AuxK with ``k_aux = 256``). Dense decoders (flat,
bilinear_flat) have dense atoms, so their reconstruction is always built (bilinear_flat still scores the
writes from their factors); dense encoders (flat, matrix) build the writes chunk-wise to score them (see
``factors.dense_scores_rank1``), so factor form saves them little. JumpReLU and gated SAEs build the writes
too: JumpReLU's threshold gradients need every atom's ``<G, A_i>`` (a dense decoder's backward), and the
gated auxiliary loss decodes every open gate.
"""

from __future__ import annotations

from pathlib import Path
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from sae_lens.saes.sae import TrainingSAE, TrainStepInput, TrainStepOutput
from torch import Tensor
from typing_extensions import override

from writesae import factors as F
from writesae.activations import SparseCode, gate_magnitudes, heaviside, sparse_rows
from writesae.config import WriteTrainingSAEConfig, has_factor_decoder
from writesae.sae import DEFAULT_BANDWIDTH, FactorPair, WriteSAEMixin, seeded

Batch = Tensor | tuple[Tensor, Tensor]
FactorLoss = Literal["auto", "gram", "dense"]
Gate = Literal["hard", "soft_sigmoid"]
GATES: tuple[str, ...] = ("hard", "soft_sigmoid")
# Penalty weights lambda when none is given: the paper's for JumpReLU (main text), the reference code's
# class default for gated SAEs (the paper gives none; its CLI default is 1.0).
DEFAULT_SPARSITY_COEFFICIENT = {"jumprelu": 1e-5, "gated": 1e-3}


class SparsityLoss(NamedTuple):
    """The sparsity penalty's settings for one step (see the module docstring); the trainer fills them
    from `writesae.trainer.TrainerConfig`.

    Attributes:
        coefficient: lambda (JumpReLU: on the L0; gated: on the L1 of ``ReLU(pi_gate)``).
        bandwidth: JumpReLU's kernel bandwidth ``h`` at this step.
        gate: Gated SAEs' gate in training: ``"hard"`` (``1[pi_gate > 0]``, no gradient to the gate
            path but through the penalty and the auxiliary loss, both on ``ReLU(pi_gate)``) or
            ``"soft_sigmoid"`` (the reconstruction, the penalty and the auxiliary loss all on
            ``sigmoid(pi_gate / temperature)``, as the reference code).
        temperature: ``tau`` of the soft gate ``sigmoid(pi_gate / tau)``.
        aux_coefficient: Weight of the gated SAE's frozen-decoder reconstruction loss.
    """

    coefficient: float
    bandwidth: float = DEFAULT_BANDWIDTH
    gate: Gate = "hard"
    temperature: float = 0.1
    aux_coefficient: float = 1.0

    @classmethod
    def default(cls, sparsity: str) -> SparsityLoss | None:
        """The default settings of a sparsity kind (``None``: no penalty, TopK and BatchTopK)."""
        coefficient = DEFAULT_SPARSITY_COEFFICIENT.get(sparsity)
        return None if coefficient is None else cls(coefficient)


class LossOutput(NamedTuple):
    """What one loss evaluation returns.

    Attributes:
        loss: ``mse + aux_loss_coefficient * aux + penalty`` (differentiable).
        mse: Mean squared error per entry.
        aux: AuxK loss per entry (zero when no atom is dead).
        sq_err: ``[B]`` squared error per sample (detached).
        sq_norm: ``[B]`` squared norm of each input (detached).
        input_sum: ``[d_k, d_v]`` sum of the inputs over the batch (detached), for explained variance.
        code: The batch's sparse code (``dense [B, d_sae]``).
        pre: ``[B, d_sae]`` pre-activations.
        penalty: The sparsity penalty, weights included (zero for TopK and BatchTopK).
    """

    loss: Float[Tensor, ""]
    mse: Float[Tensor, ""]
    aux: Float[Tensor, ""]
    sq_err: Float[Tensor, " B"]
    sq_norm: Float[Tensor, " B"]
    input_sum: Float[Tensor, "d_k d_v"]
    code: SparseCode
    pre: Float[Tensor, "B d_sae"]
    penalty: Float[Tensor, ""]


class WriteTrainingSAE(WriteSAEMixin, TrainingSAE[WriteTrainingSAEConfig]):
    """Trainable WriteSAE; saves as an inference ``"write_sae"``.

    In training mode a BatchTopK SAE selects codes batch-wide; in ``eval()`` mode it uses
    ``cfg.batchtopk_inference``, like the inference class. A gated SAE trained with the soft gate
    reconstructs through it in training mode only (module docstring).

    Attributes:
        factor_loss: ``"auto"`` (cheaper of Gram and dense per loss term), ``"gram"`` or ``"dense"``.
    """

    factor_loss: FactorLoss = "auto"

    def __init__(
        self, cfg: WriteTrainingSAEConfig, use_error_term: bool = False, seed: int | None = None
    ):
        """Build the SAE; ``seed`` makes the random init reproducible without touching torch's global RNG."""
        with seeded(seed):
            super().__init__(cfg, use_error_term)

    @override
    def _batchtopk_rule(self) -> str:
        return "batch" if self.training else self.cfg.batchtopk_inference

    # ------------------------------------------------------------------ losses

    def compute_loss(
        self,
        batch: Batch,
        dead_mask: Bool[Tensor, " d_sae"] | None = None,
        aux_slots: int | None = None,
        sparsity_loss: SparsityLoss | None = None,
    ) -> LossOutput:
        """Reconstruction (+ AuxK, + sparsity penalty) loss of a batch of dense states or factor-form writes.

        The encode hooks fire; ``hook_sae_recons``/``hook_sae_output`` do not, since a factor-form
        batch never has a dense reconstruction.

        Args:
            batch: ``[B, d_k, d_v]`` or ``[B, d_in]`` states, or ``(key [B, d_k], value [B, d_v])``.
            dead_mask: Atoms currently counted as dead; ``None`` or all-false skips AuxK.
            aux_slots: At least the number of dead atoms, known without asking the device (see
                `writesae.dead_atoms`); ``None`` counts them (the host waits for the device).
            sparsity_loss: The JumpReLU / gated penalty's settings; ``None``: the sparsity's defaults
                (`SparsityLoss.default`). Ignored by TopK and BatchTopK.
        """
        settings = sparsity_loss or SparsityLoss.default(self.cfg.sparsity)
        bandwidth = settings.bandwidth if settings is not None else None
        pre, code, _, _, states, pair = self.encode_full(batch, bandwidth=bandwidth)
        # What the reconstruction is made from: the code, except a soft-gated SAE's in training.
        recon_code = self._soft_gated_code(pre, settings) if self.training else None
        recon_code = code if recon_code is None else recon_code
        c_out = self._output_offset()
        aux_code = self._aux_code(pre, dead_mask, aux_slots)
        any_dead = None if aux_code is None else dead_mask.any()  # type: ignore[union-attr]
        if states is None:
            assert pair is not None
            key, value = pair
            gram_main = self._use_gram(recon_code.indices.shape[-1])
            if has_factor_decoder(self.cfg.variant) and gram_main and self.cfg.sparsity not in ("jumprelu", "gated"):
                sq_err, aux_err = self._factor_errors(key, value, recon_code, c_out, aux_code)
                sq_norm = key.pow(2).sum(-1) * value.pow(2).sum(-1)
                penalty = self._penalty(pre, None, settings)
                return self._finish(sq_err, aux_err, any_dead, sq_norm, key.T @ value, code, pre, penalty)
            states = key[:, :, None] * value[:, None, :]
        if self.cfg.sparsity == "jumprelu":
            # Every atom's code gets its gradient, active or not: the thresholds' straight-through
            # estimator needs it for the atoms just below their thresholds too.
            recon = self._decode_matrix(recon_code.dense)
        else:
            recon = self._decode_sparse(recon_code.indices, recon_code.values) + c_out
        residual = states - recon
        sq_err = residual.pow(2).sum(dim=(1, 2))
        aux_err = None
        if aux_code is not None:
            aux_recon = self._decode_sparse(*aux_code)
            aux_err = (residual.detach() - aux_recon).pow(2).sum(dim=(1, 2))
        penalty = self._penalty(pre, states, settings)
        sq_norm, input_sum = states.pow(2).sum(dim=(1, 2)), states.sum(0)
        return self._finish(sq_err, aux_err, any_dead, sq_norm, input_sum, code, pre, penalty)

    def _soft_gated_code(self, pre: Float[Tensor, "B d_sae"], settings: SparsityLoss | None) -> SparseCode | None:
        """``sigmoid(pi_gate / tau) ReLU(pi_mag)`` for a gated SAE trained with the soft gate, else ``None``."""
        if self.cfg.sparsity != "gated" or settings is None or settings.gate != "soft_sigmoid":
            return None
        magnitude = gate_magnitudes(pre, self.b_enc, self.r_mag, self.b_mag).relu()  # type: ignore[attr-defined]
        return sparse_rows(torch.sigmoid(pre / settings.temperature) * magnitude)

    def _penalty(
        self, pre: Float[Tensor, "B d_sae"], states: Float[Tensor, "B d_k d_v"] | None, settings: SparsityLoss | None
    ) -> Float[Tensor, ""]:
        """The sparsity penalty of JumpReLU and gated SAEs (module docstring), weights included."""
        if settings is None:
            return pre.new_zeros(())
        if self.cfg.sparsity == "jumprelu":
            threshold = self.log_threshold.exp()  # type: ignore[attr-defined]
            l0 = heaviside(pre, threshold, settings.bandwidth).sum(-1).mean()
            return settings.coefficient * l0
        assert states is not None
        gate = torch.sigmoid(pre / settings.temperature) if settings.gate == "soft_sigmoid" else pre.relu()
        gate_code = sparse_rows(gate)
        # Through a frozen decoder: this loss trains the gate path (encoder, b_gate) only.
        frozen = self._decode_sparse(gate_code.indices, gate_code.values, frozen=True) + self._output_offset().detach()
        aux = (states - frozen).pow(2).mean()
        return settings.coefficient * gate.sum(-1).mean() + settings.aux_coefficient * aux

    def _finish(
        self,
        sq_err: Tensor,
        aux_err: Tensor | None,
        any_dead: Tensor | None,
        sq_norm: Tensor,
        input_sum: Tensor,
        code: SparseCode,
        pre: Tensor,
        penalty: Tensor,
    ) -> LossOutput:
        d_in = self.cfg.d_in
        mse = sq_err.mean() / d_in
        if aux_err is None or any_dead is None:
            aux = mse.new_zeros(())
        else:  # no dead atom: the AuxK slots all hold coefficient 0, and there is no AuxK loss
            aux = torch.where(any_dead, aux_err.mean() / d_in, 0.0)
        loss = mse + self.cfg.aux_loss_coefficient * aux + penalty
        return LossOutput(
            loss, mse, aux, sq_err.detach(), sq_norm.detach(), input_sum.detach(), code, pre, penalty
        )

    def _use_gram(self, n_atoms: int) -> bool:
        if self.factor_loss != "auto":
            return self.factor_loss == "gram"
        cfg = self.cfg
        return F.gram_is_cheaper(n_atoms, cfg.rank, cfg.d_k, cfg.d_v)

    def _aux_code(
        self, pre: Float[Tensor, "B d_sae"], dead_mask: Bool[Tensor, " d_sae"] | None, aux_slots: int | None = None
    ) -> tuple[Int[Tensor, "B Ka"], Float[Tensor, "B Ka"]] | None:
        """AuxK code: the top ``k_aux`` pre-activations among dead atoms, ReLU'd (paper / Gao et al.).

        ``min(k_aux, aux_slots)`` slots; when ``aux_slots`` exceeds the dead atoms, the extra slots
        hold live atoms at ``-inf`` and get coefficient 0, which adds nothing to the AuxK
        reconstruction (and with no dead atom at all, `compute_loss` zeroes the AuxK loss).
        """
        if dead_mask is None or self.cfg.k_aux == 0:
            return None
        slots = min(self.cfg.k_aux, int(dead_mask.sum()) if aux_slots is None else aux_slots)
        if slots == 0:
            return None
        masked = pre.masked_fill(~dead_mask, float("-inf"))
        values, indices = torch.topk(masked, slots, dim=-1, sorted=False)
        return indices, values.relu()

    def _decode_sparse(
        self, indices: Int[Tensor, "B K"], values: Float[Tensor, "B K"], frozen: bool = False
    ) -> Float[Tensor, "B d_k d_v"]:
        """``sum_j a_j A_j`` (no bias) over the atoms ``indices`` with coefficients ``values``.

        ``frozen``: the atoms are detached (no gradient reaches the decoder).
        """
        cfg = self.cfg
        if has_factor_decoder(cfg.variant):
            key_f, value_f = self.W_dec_key, self.W_dec_value
            if frozen:
                key_f, value_f = key_f.detach(), value_f.detach()
            key_g, value_g = F.gather_factors(indices, key_f, value_f)
            return F.decode_gathered(values, key_g, value_g)
        # Dense atoms: one matmul (gathering rows would build [B, K, d_in]).
        dense = torch.zeros(
            values.shape[0], cfg.d_sae, dtype=values.dtype, device=values.device
        ).scatter(-1, indices, values)
        w_dec = self.W_dec.detach() if frozen else self.W_dec
        return (dense @ w_dec).reshape(-1, cfg.d_k, cfg.d_v)

    def _factor_errors(
        self,
        key: Float[Tensor, "B d_k"],
        value: Float[Tensor, "B d_v"],
        code: SparseCode,
        c_out: Float[Tensor, "d_k d_v"],
        aux_code: tuple[Tensor, Tensor] | None,
    ) -> tuple[Float[Tensor, " B"], Float[Tensor, " B"] | None]:
        """Squared reconstruction and AuxK errors of rank-1 targets, from factors (module docstring)."""
        dec_key, dec_value = self.W_dec_key, self.W_dec_value
        a = code.values
        key_g, value_g = F.gather_factors(code.indices, dec_key, dec_value)
        t_a = F.rank1_inner(key, value, key_g, value_g)  # <T, A_j>
        offset_inner = F.atom_offset_inner(dec_key, dec_value, c_out)  # <A_i, c> for all atoms
        h_a = offset_inner[code.indices]
        t_c = torch.einsum("bk,kv,bv->b", key, c_out, value)  # <T, c>
        t_t = key.pow(2).sum(-1) * value.pow(2).sum(-1)
        recon_sq = F.quadratic_form(a, F.cross_gram(key_g, value_g, key_g, value_g), a)
        sq_err = (
            t_t - 2 * ((a * t_a).sum(-1) + t_c) + recon_sq + 2 * (a * h_a).sum(-1) + c_out.pow(2).sum()
        )
        if aux_code is None:
            return sq_err, None
        aux_idx, e = aux_code
        if not self._use_gram(aux_idx.shape[-1]):
            # Cheaper to build the residual and the AuxK sum as matrices (see module docstring).
            with torch.no_grad():
                states = key[:, :, None] * value[:, None, :]
                residual = states - (F.decode_gathered(a, key_g, value_g) + c_out)
            aux_recon = self._decode_sparse(aux_idx, e)
            return sq_err, (residual - aux_recon).pow(2).sum(dim=(1, 2))
        key_x, value_x = F.gather_factors(aux_idx, dec_key, dec_value)
        # <R, A_m> with R = T - S_hat held fixed (detached), as AuxK regresses a constant target.
        cross = F.cross_gram(key_g.detach(), value_g.detach(), key_x, value_x)
        r_m = (
            F.rank1_inner(key, value, key_x, value_x)
            - torch.einsum("bj,bjm->bm", a.detach(), cross)
            - F.atom_offset_inner(dec_key, dec_value, c_out.detach())[aux_idx]
        )
        aux_sq = F.quadratic_form(e, F.cross_gram(key_x, value_x, key_x, value_x), e)
        return sq_err, sq_err.detach() - 2 * (e * r_m).sum(-1) + aux_sq

    @torch.no_grad()
    def update_topk_threshold(
        self, code: Float[Tensor, "B d_sae"], lr: float = 0.01, reduce_min: Callable[[Tensor], Tensor] | None = None
    ) -> None:
        """Track BatchTopK's inference threshold: EMA of the smallest positive code (SAELens' rule).

        Args:
            code: The batch's codes.
            lr: EMA rate.
            reduce_min: Makes the smallest positive code the whole batch's when ranks share a batch
                (`writesae.data_parallel.DataParallel.min`).
        """
        if self.cfg.sparsity != "batchtopk":
            return
        smallest = code.masked_fill(code <= 0, float("inf")).amin() if code.numel() else code.new_tensor(float("inf"))
        if reduce_min is not None:
            smallest = reduce_min(smallest)
        # No positive code anywhere leaves the threshold as it was (decided on the device, no sync).
        self.topk_threshold.copy_(torch.where(smallest.isfinite(), self.topk_threshold * (1 - lr) + lr * smallest,
                                              self.topk_threshold))  # fmt: skip

    # ------------------------------------------------------------------ SAELens training API

    @override
    def encode_with_hidden_pre(
        self, x: Float[Tensor, "..."] | FactorPair
    ) -> tuple[Float[Tensor, "... d_sae"], Float[Tensor, "... d_sae"]]:
        pre, code, lead, _, _, _ = self.encode_full(x)
        n = self.cfg.d_sae
        return code.dense.reshape(*lead, n), pre.reshape(*lead, n)

    @override
    def get_coefficients(self) -> dict[str, float]:
        return {}

    @override
    def calculate_aux_loss(
        self,
        step_input: TrainStepInput,
        feature_acts: Tensor,
        hidden_pre: Tensor,
        sae_out: Tensor,
    ) -> dict[str, Tensor]:
        """AuxK loss in SAELens' units (summed over entries, averaged over the batch)."""
        aux_code = self._aux_code(hidden_pre.reshape(-1, self.cfg.d_sae), step_input.dead_neuron_mask)
        if aux_code is None:
            return {"auxiliary_reconstruction_loss": sae_out.new_zeros(())}
        residual = (step_input.sae_in - sae_out).detach().reshape(-1, self.cfg.d_k, self.cfg.d_v)
        aux_recon = self._decode_sparse(*aux_code)
        aux = (residual - aux_recon).pow(2).sum(dim=(1, 2)).mean()
        aux = torch.where(step_input.dead_neuron_mask.any(), aux, 0.0)  # type: ignore[union-attr]
        return {"auxiliary_reconstruction_loss": self.cfg.aux_loss_coefficient * aux}

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """One step for SAELens' ``SAETrainer`` on dense ``[B, d_in]`` batches (a JumpReLU or gated SAE
        takes `SparsityLoss`'s defaults: a fixed bandwidth, the hard gate)."""
        out = self.compute_loss(step_input.sae_in, step_input.dead_neuron_mask)
        d_in = self.cfg.d_in
        if self.cfg.sparsity == "batchtopk":
            self.update_topk_threshold(out.code.dense)
        losses = {
            "mse_loss": out.mse * d_in,
            "auxiliary_reconstruction_loss": self.cfg.aux_loss_coefficient * out.aux * d_in,
        }
        if self.cfg.sparsity in DEFAULT_SPARSITY_COEFFICIENT:  # at SparsityLoss's defaults
            losses["sparsity_loss"] = out.penalty * d_in
        with torch.no_grad():
            sae_out = self._decode_matrix(out.code.dense).reshape(step_input.sae_in.shape)
        return TrainStepOutput(
            sae_in=step_input.sae_in,
            sae_out=sae_out,
            feature_acts=out.code.dense,
            hidden_pre=out.pre,
            loss=out.loss * d_in,
            losses=losses,
        )

    @override
    @torch.no_grad()
    def log_histograms(self) -> dict[str, Any]:
        return {"weights/W_dec_norms": self.get_W_dec_norm().float().cpu().numpy()}

    # ------------------------------------------------------------------ files

    @override
    def save_model(self, path: str | Path) -> tuple[Path, Path]:
        """Atomically write this SAE with its training config (loads as an inference WriteSAE)."""
        from writesae.io import save_sae_files

        return save_sae_files(path, self.state_dict(), self.cfg.to_dict())

    @override
    def save_inference_model(self, path: str | Path) -> tuple[Path, Path]:
        """Atomically write the inference files (``cfg.json`` of architecture ``"write_sae"``)."""
        from writesae.io import save_sae_files

        return save_sae_files(path, self.state_dict(), self.cfg.get_inference_sae_cfg_dict())
