"""Dead-atom resampling (paper App. D; the details follow the paper's public reference code).

For every dead atom: draw one sample of the current batch with probability proportional to its squared
reconstruction error; take that sample's matrix (``resample_from="input"``: the input minus the
decoder offset, as the reference code; ``"residual"``: what the SAE currently fails to reconstruct);
set the decoder factors to its top-r singular vectors (unit norm); set the encoder to the same
directions scaled to ``encoder_scale`` times the mean norm of the alive atoms' encoders; zero the
atom's encoder bias and its Adam moments. A JumpReLU atom's log-threshold restarts at the mean of the
alive atoms' (the reference code's: a dead atom's threshold is often what stopped it firing); a gated
atom's magnitude path at ``r_mag = b_mag = 0``, its initial value (reference code too). Dense
encoders/decoders get the flattened matrix, normalised (reference code); a matched-filter encoder over a
dense decoder (``bilinear_flat``) still gets the top-r singular vectors. Factor-form batches are built as
matrices only for the drawn samples.
"""

from __future__ import annotations

from typing import Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from writesae import factors as F
from writesae.config import has_dense_encoder, has_encoder_factors, has_factor_decoder
from writesae.data import Batch
from writesae.training_sae import WriteTrainingSAE

ResampleFrom = Literal["input", "residual"]

# Axis of each per-atom parameter that indexes atoms.
_ATOM_AXIS = {
    "W_enc_key": 0, "W_enc_value": 0, "W_dec_key": 0, "W_dec_value": 0, "W_dec": 0, "b_enc": 0,
    "W_enc": 1, "log_threshold": 0, "r_mag": 0, "b_mag": 0,
}  # fmt: skip
_SVD_CHUNK = 256


def _rows_of(batch: Batch, picks: Tensor, sae: WriteTrainingSAE) -> Float[Tensor, "m d_k d_v"]:
    """The drawn samples as matrices."""
    d_k, d_v = sae.cfg.d_k, sae.cfg.d_v
    if isinstance(batch, tuple):
        key, value = batch[0][picks].to(sae.dtype), batch[1][picks].to(sae.dtype)
        return key[:, :, None] * value[:, None, :]
    return batch[picks].to(sae.dtype).reshape(-1, d_k, d_v)


def _top_singular(m: Float[Tensor, "m d_k d_v"], rank: int) -> tuple[Tensor, Tensor]:
    keys, values = [], []
    for chunk in m.split(_SVD_CHUNK):
        u, _, vh = torch.linalg.svd(chunk, full_matrices=False)
        keys.append(u[:, :, :rank].transpose(1, 2))
        values.append(vh[:, :rank, :])
    return torch.cat(keys), torch.cat(values)


@torch.no_grad()
def resample_dead_atoms(
    sae: WriteTrainingSAE,
    optimizer: torch.optim.Optimizer,
    dead: Bool[Tensor, " d_sae"],
    batch: Batch,
    sq_err: Float[Tensor, " B"],
    generator: torch.Generator,
    resample_from: ResampleFrom = "input",
    encoder_scale: float = 0.2,
) -> int:
    """Re-initialise the dead atoms from high-error samples of ``batch``; returns how many.

    Args:
        sae: The SAE being trained (edited in place).
        optimizer: Its Adam optimizer (moments of the resampled atoms are zeroed).
        dead: Which atoms to resample.
        batch: The current batch (dense or factor form).
        sq_err: ``[B]`` squared errors of ``batch``; sampling weights.
        generator: Random source (the trainer's, so resuming replays the same draws).
        resample_from: ``"input"`` or ``"residual"``.
        encoder_scale: Encoder norm relative to the mean alive encoder norm (reference code: 0.2).
    """
    atoms = dead.nonzero().squeeze(-1)
    if atoms.numel() == 0:
        return 0
    cfg = sae.cfg
    weights = sq_err.clamp(min=0).double()
    if not torch.isfinite(weights).all() or weights.sum() <= 0:
        weights = torch.ones_like(weights)
    picks = torch.multinomial(weights, atoms.numel(), replacement=True, generator=generator)
    picks = picks.to(sq_err.device)
    rows = _rows_of(batch, picks, sae)
    if resample_from == "residual":
        rows = rows - sae._decode_matrix(sae._code(sae._scores(rows, None)).dense)
    else:
        rows = rows - sae._output_offset()
    alive = ~dead

    if has_factor_decoder(cfg.variant) or has_encoder_factors(cfg.variant):
        key, value = _top_singular(rows, cfg.rank)
    if has_factor_decoder(cfg.variant):
        sae.W_dec_key[atoms] = key
        sae.W_dec_value[atoms] = value
    else:
        sae.W_dec[atoms] = F.unit_rows(rows.reshape(atoms.numel(), -1))

    if has_encoder_factors(cfg.variant):
        norms = F.atom_frobenius_norms(sae.W_enc_key, sae.W_enc_value)
        scale = encoder_scale * (norms[alive].mean() if alive.any() else norms.new_tensor(1.0))
        sae.W_enc_key[atoms] = key * scale.sqrt()
        sae.W_enc_value[atoms] = value * scale.sqrt()
    elif has_dense_encoder(cfg.variant):
        norms = sae.W_enc.norm(dim=0)
        scale = encoder_scale * (norms[alive].mean() if alive.any() else norms.new_tensor(1.0))
        sae.W_enc[:, atoms] = (F.unit_rows(rows.reshape(atoms.numel(), -1)) * scale).T
    sae.b_enc[atoms] = 0.0
    if cfg.sparsity == "jumprelu":
        sae.log_threshold[atoms] = sae.log_threshold[alive if alive.any() else slice(None)].mean()
    elif cfg.sparsity == "gated":
        sae.r_mag[atoms] = 0.0
        sae.b_mag[atoms] = 0.0

    params = dict(sae.named_parameters())
    for name, axis in _ATOM_AXIS.items():
        state = optimizer.state.get(params[name]) if name in params else None
        for moment in ("exp_avg", "exp_avg_sq"):
            if state and moment in state:
                state[moment].index_fill_(axis, atoms, 0.0)
    return int(atoms.numel())
