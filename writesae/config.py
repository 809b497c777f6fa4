"""WriteSAE configuration: the SAELens config plus the shape of one recurrent-state head.

The state of one head is a ``[d_k, d_v]`` matrix (key rows, value columns; see docs/design.md §2). SAELens
thinks in flat vectors of length ``d_in``; we keep ``d_in = d_k * d_v`` with the row-major flattening
``vec(S)[i * d_v + j] = S[i, j]`` (what ``torch.reshape`` does), so a WriteSAE and a flat SAELens SAE
agree on what a flattened state means.

Every place where the WriteSAE paper (arXiv 2605.12770) and its code disagree is a field here, with
the choice written next to it (docs/design.md §5):

- ``variant``: which encoder/decoder pair. ``"bilinear"`` (matched-filter encoder, rank-r decoder) is the
  WriteSAE of the paper's README/model card and of all headline numbers; the paper's App. J "dense-encoder
  WriteSAE" is ``"matrix"``; ``"flat"`` is the FlatSAE baseline; ``"bilinear_tied"`` shares factors;
  ``"bilinear_flat"`` (the reference code's ``BilinearEncoderFlatSAE``, a Table 7 ablation) pairs the
  matched-filter encoder with a dense decoder. ``rank`` is the rank of the factor side(s): both sides of
  the bilinear variants, the decoder of ``"matrix"``, the encoder of ``"bilinear_flat"``.
- ``sparsity``: ``"topk"`` or ``"batchtopk"`` (the headline L9 H4 SAE used BatchTopK); ``"jumprelu"`` (the
  paper's family-invariance check, Table 5 / Fig. 8) and ``"gated"`` (its negative result: Gated SAEs
  failed to train). Neither of the last two has a ``k``: the field is kept but ignored (and not checked);
  their weights are ``log_threshold`` (JumpReLU) and ``r_mag``, ``b_mag`` (gated, whose gate bias is
  ``b_enc``); their loss settings (penalty weight, JumpReLU's kernel bandwidth schedule, the gated SAE's
  gate indicator during training) are `writesae.trainer.TrainerConfig` fields, and JumpReLU's initial
  threshold is ``WriteTrainingSAEConfig.jumprelu_init_threshold``. Thresholds are in the units of the data
  the SAE acts on: an SAE trained on scaled data (``TrainerConfig.input_scaling``) trains them in the
  scaled units and folds them back with the biases (docs/design.md §5).
- ``batchtopk_inference``: how a BatchTopK SAE picks codes outside training. The paper never says; its
  App. J pseudo-code keeps "k = 32 nonzeros" per position, so per-sample TopK (``"topk"``) is the default.
  ``"batch"`` reproduces the reference code (batch-level selection, so codes depend on the batch), and
  ``"threshold"`` uses the global threshold learned during training (SAELens' BatchTopK -> JumpReLU rule).
- Centering. The paper's main text encodes ``vec(S - M)`` with a mean state ``M``; the code instead learns
  a decoder bias ``b_dec`` (added on decode, not subtracted before encoding). Here ``b_dec`` is always a
  learned ``[d_k, d_v]`` matrix. ``apply_b_dec_to_input=True`` (SAELens' default, and ours) subtracts it
  before encoding, i.e. it is the paper's centering with a learned ``M``; ``False`` is the reference
  code's behaviour (the paper-checkpoint converter sets it). ``input_mean="fixed"`` adds a fixed buffer
  ``input_mean`` (e.g. the training-set mean, estimated by the trainer) that is subtracted before
  encoding and added back after decoding: the main text's ``vec(S - M)`` with ``M`` fixed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from sae_lens.saes.sae import SAEConfig, SAEMetadata, TrainingSAEConfig
from typing_extensions import override

ARCHITECTURE = "write_sae"

Variant = Literal["bilinear", "flat", "matrix", "bilinear_tied", "bilinear_flat"]
Sparsity = Literal["topk", "batchtopk", "jumprelu", "gated"]
BatchTopKInference = Literal["topk", "batch", "threshold"]
InputMean = Literal["none", "fixed"]

VARIANTS: tuple[str, ...] = ("bilinear", "flat", "matrix", "bilinear_tied", "bilinear_flat")
SPARSITIES: tuple[str, ...] = ("topk", "batchtopk", "jumprelu", "gated")
# JumpReLU's initial threshold theta_0 (paper §2.4 / App. J main text; the reference code's default is 1e-3).
JUMPRELU_INIT_THRESHOLD = 1e-4
BATCHTOPK_INFERENCE: tuple[str, ...] = ("topk", "batch", "threshold")
INPUT_MEANS: tuple[str, ...] = ("none", "fixed")


def has_factor_decoder(variant: str) -> bool:
    """Whether the variant's atoms are stored as rank-r key/value factors (all but the dense decoders,
    ``"flat"`` and ``"bilinear_flat"``, whose atoms are rows of ``W_dec [d_sae, d_in]``)."""
    return variant not in ("flat", "bilinear_flat")


def has_dense_encoder(variant: str) -> bool:
    """Whether the variant encodes with a dense ``W_enc [d_in, d_sae]`` (``"flat"``, ``"matrix"``)."""
    return variant in ("flat", "matrix")


def has_encoder_factors(variant: str) -> bool:
    """Whether the variant has matched-filter encoder factors of its own, ``W_enc_key``/``W_enc_value``
    (``"bilinear"``, ``"bilinear_flat"``; the tied variant encodes with its decoder factors)."""
    return variant in ("bilinear", "bilinear_flat")


_Config = TypeVar("_Config", bound="_WriteFields")


@dataclass(kw_only=True)
class _WriteFields:
    """The fields WriteSAE adds to SAELens' config (shared by the inference and training configs).

    Attributes:
        d_k: Key dimension of the state (rows).
        d_v: Value dimension of the state (columns).
        k: Number of active atoms per sample (TopK), or on average per sample (BatchTopK); ignored (and
            not checked) by ``"jumprelu"`` and ``"gated"``, whose thresholds set the sparsity.
        rank: Rank r of each atom ``sum_r v_ir w_ir^T``; 1 is the paper's WriteSAE. For
            ``"bilinear_flat"`` the rank of the encoder's matched filters (its decoder is dense).
        variant: Encoder/decoder pair, see the module docstring.
        sparsity: ``"topk"``, ``"batchtopk"``, ``"jumprelu"`` or ``"gated"`` (module docstring).
        batchtopk_inference: Code selection of a BatchTopK SAE outside training.
        input_mean: ``"fixed"`` adds an ``input_mean`` buffer subtracted before encoding and added after
            decoding; ``"none"`` has no such buffer.
    """

    d_k: int = 0
    d_v: int = 0
    k: int = 32
    rank: int = 1
    variant: Variant = "bilinear"
    sparsity: Sparsity = "topk"
    batchtopk_inference: BatchTopKInference = "topk"
    input_mean: InputMean = "none"

    @classmethod
    def build(cls: type[_Config], *, d_k: int, d_v: int, d_sae: int, **kwargs: Any) -> _Config:
        """Make a config from the state shape, filling ``d_in = d_k * d_v``.

        Args:
            d_k: Key dimension.
            d_v: Value dimension.
            d_sae: Number of atoms.
            **kwargs: Any other config field (``k``, ``rank``, ``variant``, ``metadata``, ...).
        """
        return cls(d_in=d_k * d_v, d_sae=d_sae, d_k=d_k, d_v=d_v, **kwargs)

    def _coerce_metadata(self) -> None:
        # SAELens' from_dict passes metadata as a plain dict before replacing it.
        if isinstance(self.metadata, dict):  # type: ignore[attr-defined]
            self.metadata = SAEMetadata(**self.metadata)  # type: ignore[attr-defined]


def _validate(cfg: Any) -> None:
    """Check the WriteSAE fields; every message says what to change."""
    if cfg.d_k < 1 or cfg.d_v < 1:
        raise ValueError(
            f"WriteSAEConfig needs d_k >= 1 and d_v >= 1 (got d_k={cfg.d_k}, d_v={cfg.d_v}); "
            "pass the state shape of one head, e.g. WriteSAEConfig.build(d_k=128, d_v=128, d_sae=2048)."
        )
    if cfg.d_in != cfg.d_k * cfg.d_v:
        raise ValueError(
            f"d_in must equal d_k * d_v = {cfg.d_k * cfg.d_v} (got d_in={cfg.d_in}); "
            "set d_in=d_k*d_v or use WriteSAEConfig.build(d_k=..., d_v=..., d_sae=...)."
        )
    if cfg.sparsity not in SPARSITIES:
        raise ValueError(
            f"sparsity must be one of {SPARSITIES} (got {cfg.sparsity!r}); 'jumprelu' and 'gated' ignore k."
        )
    if cfg.sparsity in ("topk", "batchtopk") and not 1 <= cfg.k <= cfg.d_sae:
        raise ValueError(f"k must be in [1, d_sae={cfg.d_sae}] (got k={cfg.k}).")
    if cfg.variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS} (got {cfg.variant!r}).")
    if cfg.batchtopk_inference not in BATCHTOPK_INFERENCE:
        raise ValueError(
            f"batchtopk_inference must be one of {BATCHTOPK_INFERENCE} "
            f"(got {cfg.batchtopk_inference!r})."
        )
    if cfg.input_mean not in INPUT_MEANS:
        raise ValueError(f"input_mean must be one of {INPUT_MEANS} (got {cfg.input_mean!r}).")
    if cfg.rank < 1:
        raise ValueError(f"rank must be >= 1 (got {cfg.rank}).")
    if cfg.variant == "flat" and cfg.rank != 1:
        raise ValueError(
            "variant='flat' has a dense encoder and dense atoms, so rank does not apply; leave rank=1 "
            f"(got rank={cfg.rank}) or pick variant='bilinear'/'matrix' for rank-r atoms "
            "('bilinear_flat' for a rank-r encoder with dense atoms)."
        )
    if cfg.rank > min(cfg.d_k, cfg.d_v):
        raise ValueError(
            f"rank={cfg.rank} exceeds min(d_k, d_v)={min(cfg.d_k, cfg.d_v)}: such atoms are no "
            "longer low-rank; lower rank or use variant='flat'."
        )
    if cfg.normalize_activations != "none":
        raise NotImplementedError(
            f"WriteSAE supports normalize_activations='none' only (got "
            f"{cfg.normalize_activations!r}): run-time norms and whitening act on the flattened vector "
            "and would not keep atoms rank-r. Centre with input_mean='fixed', and scale with "
            "TrainerConfig(input_scaling='unit_mean_square') instead."
        )
    if cfg.reshape_activations != "none":
        raise ValueError(
            "WriteSAE reads [..., d_k, d_v] or [..., d_k*d_v] inputs itself; "
            f"set reshape_activations='none' (got {cfg.reshape_activations!r})."
        )


@dataclass
class WriteSAEConfig(SAEConfig, _WriteFields):
    """Config of an inference WriteSAE (SAELens architecture ``"write_sae"``).

    ``metadata.hook_name`` names the hook the SAE was trained on (a state or write hook),
    ``metadata.hook_head_index`` the head, and ``metadata.model_name`` the model.
    """

    # SAELens' default; here it means "centre with the learned b_dec" (see module docstring).
    apply_b_dec_to_input: bool = True
    # SAELens' from_dict passes a plain dict here (see _coerce_metadata).
    metadata: SAEMetadata | dict[str, Any] = field(default_factory=SAEMetadata)

    @override
    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE

    @override
    def __post_init__(self) -> None:
        self._coerce_metadata()
        super().__post_init__()
        _validate(self)


@dataclass(kw_only=True)
class WriteTrainingSAEConfig(TrainingSAEConfig, _WriteFields):
    """Config of a trainable WriteSAE; saves as an inference ``"write_sae"`` config.

    Attributes:
        k_aux: Dead atoms used by the AuxK loss per sample (paper: 256).
        aux_loss_coefficient: Weight of the AuxK loss. The paper's main text (App. D, Table 10) uses
            1e-2, our default; the reference code adds it with weight 1.0.
        decoder_init_norm: Unused (SAELens field); WriteSAE atoms start at unit Frobenius norm.
        jumprelu_init_threshold: ``sparsity="jumprelu"`` only: every atom's initial threshold ``theta_0``
            (paper main text: 1e-4; the reference code: 1e-3), in the units of the data training sees
            (raw, or scaled by ``TrainerConfig.input_scaling``).
    """

    apply_b_dec_to_input: bool = True
    metadata: SAEMetadata | dict[str, Any] = field(default_factory=SAEMetadata)
    k_aux: int = 256
    aux_loss_coefficient: float = 1e-2
    jumprelu_init_threshold: float = JUMPRELU_INIT_THRESHOLD

    @override
    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE

    @override
    def __post_init__(self) -> None:
        self._coerce_metadata()
        _validate(self)
        if self.k_aux < 0:
            raise ValueError(f"k_aux must be >= 0 (got {self.k_aux}); 0 turns the AuxK loss off.")
        if not (math.isfinite(self.jumprelu_init_threshold) and self.jumprelu_init_threshold > 0):
            raise ValueError(
                f"jumprelu_init_threshold must be a positive number (got {self.jumprelu_init_threshold}); the "
                "threshold is stored as its logarithm. The paper's is 1e-4."
            )
        super().__post_init__()
