"""WriteSAE: a SAELens SAE whose atoms are rank-r matrices shaped like a recurrent-state write.

Parameters (state-dict keys) by variant; ``[d_k, d_v]`` is one head's state, ``n = d_sae``, ``r = rank``:

=================  =============================================  ==========================================
variant            encoder                                         decoder
=================  =============================================  ==========================================
``bilinear``       ``W_enc_key [n,r,d_k]``, ``W_enc_value [n,r,d_v]``  ``W_dec_key [n,r,d_k]``, ``W_dec_value [n,r,d_v]``
``bilinear_tied``  the decoder factors                            ``W_dec_key``, ``W_dec_value``
``matrix``         ``W_enc [d_in, n]``                            ``W_dec_key``, ``W_dec_value``
``flat``           ``W_enc [d_in, n]``                            ``W_dec [n, d_in]``
``bilinear_flat``  ``W_enc_key [n,r,d_k]``, ``W_enc_value [n,r,d_v]``  ``W_dec [n, d_in]``
=================  =============================================  ==========================================

plus ``b_enc [n]`` and ``b_dec [d_k, d_v]`` always, ``input_mean [d_k, d_v]`` when ``input_mean="fixed"``,
``topk_threshold []`` when ``sparsity="batchtopk"``, ``log_threshold [n]`` when ``sparsity="jumprelu"``, and
``r_mag [n]``, ``b_mag [n]`` when ``sparsity="gated"`` (whose gate bias is ``b_enc``). Factor-form atoms
are ``A_i = sum_r v_ir w_ir^T`` with ``v`` on the key side and ``w`` on the value side (the reference
code's ``V_*``/``W_*``), each factor unit-norm after training so that a code value is the atom's
Frobenius magnitude. Dense decoders (``flat``, ``bilinear_flat``) keep unit-norm rows ``W_dec[i] = vec(A_i)``
instead, and have no factors.

The forward computation, with ``c_in = input_mean + b_dec * apply_b_dec_to_input`` and
``c_out = b_dec + input_mean``::

    pre_i  = <E_i, S - c_in> + b_enc_i        E_i = encoder atom (bilinear: sum_r v^enc_ir w^enc_ir^T,
                                                    dense: column i of W_enc reshaped to [d_k, d_v])
    a      = TopK(pre) / BatchTopK(pre)
           / pre_i 1[pre_i > exp(log_threshold_i)]                         (jumprelu)
           / 1[pre_i > 0] ReLU(exp(r_mag_i) (pre_i - b_enc_i) + b_mag_i)   (gated; pre is pi_gate)
    S_hat  = sum_i a_i A_i + c_out

Hooks fire as in SAELens, in the layout of the input: ``hook_sae_input`` (the input),
``hook_sae_acts_pre`` and ``hook_sae_acts_post`` (``[..., d_sae]``), ``hook_sae_recons`` (the
reconstruction), ``hook_sae_error`` and ``hook_sae_output`` (forward only).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, TypeVar

import torch
from jaxtyping import Float, Int
from sae_lens.saes.sae import SAE
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint
from typing_extensions import override

from writesae import factors as F
from writesae.activations import (
    SparseCode,
    batch_topk_code,
    gated_code,
    jumprelu_code,
    sparse_rows,
    threshold_code,
    topk_code,
)
from writesae.config import (
    JUMPRELU_INIT_THRESHOLD,
    WriteSAEConfig,
    has_dense_encoder,
    has_encoder_factors,
    has_factor_decoder,
)

if TYPE_CHECKING:
    from writesae.config import WriteTrainingSAEConfig

Layout = Literal["flat", "matrix"]
T_WRITE_SAE = TypeVar("T_WRITE_SAE", bound="WriteSAE")

# A rank-1 input given as (key [..., d_k], value [..., d_v]); it stands for key value^T.
FactorPair = tuple[Float[Tensor, "*batch d_k"], Float[Tensor, "*batch d_v"]]
# The same with the leading axes flattened into one (what the internals pass around).
FlatPair = tuple[Float[Tensor, "b d_k"], Float[Tensor, "b d_v"]]
# Weights in the input's units: an SAE trained on c * S acts on S once these are divided by c ...
INPUT_SCALED = ("b_enc", "b_dec", "input_mean", "topk_threshold", "b_mag")
# ... and once log(c) is subtracted from these (thresholds stored as logarithms).
LOG_INPUT_SCALED = ("log_threshold",)
# JumpReLU's kernel bandwidth where none is given (the paper's starting bandwidth); it only shapes gradients.
DEFAULT_BANDWIDTH = 1e-3


@torch.no_grad()
def to_raw_units(weights: dict[str, Tensor], scale: float) -> None:
    """Make weights trained on ``scale * S`` act on ``S``, in place (see ``INPUT_SCALED``).

    Args:
        weights: Name -> tensor (a state dict, or its copy); names not scaled are left alone.
        scale: The factor ``c`` the training data were multiplied by.
    """
    if not scale > 0:
        raise ValueError(f"scaling_factor must be positive (got {scale}).")
    for name, tensor in weights.items():
        if name in INPUT_SCALED:
            tensor.div_(scale)
        elif name in LOG_INPUT_SCALED:
            tensor.sub_(math.log(scale))


class Encoded(NamedTuple):
    """One encode pass, with everything decode and the losses need.

    Attributes:
        pre: ``[b, d_sae]`` pre-activations (after ``hook_sae_acts_pre``).
        code: The code (after ``hook_sae_acts_post``), leading axes flattened to ``b``.
        lead: Leading shape of the input.
        layout: ``"matrix"`` or ``"flat"`` (factor pairs count as matrix).
        states: ``[b, d_k, d_v]`` inputs when encoded as matrices, else ``None``.
        pair: Flattened factor pair when encoded in factor form, else ``None``.
    """

    pre: Float[Tensor, "b d_sae"]
    code: SparseCode
    lead: tuple[int, ...]
    layout: Layout
    states: Float[Tensor, "b d_k d_v"] | None
    pair: FlatPair | None


@contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Run the block with torch's CPU RNG seeded by ``seed`` and restored afterwards (no-op for None)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _is_hooked(hook: nn.Module) -> bool:
    """Whether a hook point has forward hooks (so it may read or edit what passes through)."""
    return bool(hook._forward_hooks) or bool(hook._forward_pre_hooks)


class WriteSAEMixin:
    """Everything the inference and training WriteSAE share: weights, encode, decode, forward.

    Mixed in front of ``sae_lens.SAE`` (inference) or ``sae_lens.TrainingSAE`` (training), so its
    methods override theirs.
    """

    cfg: WriteSAEConfig | WriteTrainingSAEConfig
    dtype: torch.dtype
    device: torch.device
    training: bool
    hook_sae_input: HookPoint
    hook_sae_acts_pre: HookPoint
    hook_sae_acts_post: HookPoint
    hook_sae_recons: HookPoint
    hook_sae_error: HookPoint
    hook_sae_output: HookPoint
    use_error_term: bool
    # Layout of the most recent encode(); decode() returns it when asked for no layout.
    _last_layout: Layout = "flat"

    # ------------------------------------------------------------------ weights

    @override
    def initialize_weights(self) -> None:
        """Random unit-norm factors (the reference code's init), zero biases.

        Factors are standard normal, then each ``(atom, rank)`` row is scaled to unit norm; dense
        encoders follow ``nn.Linear``'s default; dense decoders (flat, bilinear_flat) have unit-norm rows.
        """
        cfg, kw = self.cfg, {"dtype": self.dtype, "device": self.device}
        n, r, d_k, d_v, d_in = cfg.d_sae, cfg.rank, cfg.d_k, cfg.d_v, cfg.d_in

        def factor(d: int) -> nn.Parameter:
            return nn.Parameter(F.unit_rows(torch.randn(n, r, d, **kw)))

        if has_dense_encoder(cfg.variant):
            bound = d_in**-0.5
            self.W_enc = nn.Parameter(torch.empty(d_in, n, **kw).uniform_(-bound, bound))
        elif has_encoder_factors(cfg.variant):
            self.W_enc_key = factor(d_k)
            self.W_enc_value = factor(d_v)
        if has_factor_decoder(cfg.variant):
            self.W_dec_key = factor(d_k)
            self.W_dec_value = factor(d_v)
        else:
            self.W_dec = nn.Parameter(F.unit_rows(torch.randn(n, d_in, **kw)))
        self.b_enc = nn.Parameter(torch.zeros(n, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d_k, d_v, **kw))
        if cfg.input_mean == "fixed":
            self.register_buffer("input_mean", torch.zeros(d_k, d_v, **kw))
        if cfg.sparsity == "batchtopk":
            self.register_buffer("topk_threshold", torch.zeros((), **kw))
        elif cfg.sparsity == "jumprelu":
            theta_0 = getattr(cfg, "jumprelu_init_threshold", JUMPRELU_INIT_THRESHOLD)
            self.log_threshold = nn.Parameter(torch.full((n,), math.log(theta_0), **kw))
        elif cfg.sparsity == "gated":
            self.r_mag = nn.Parameter(torch.zeros(n, **kw))
            self.b_mag = nn.Parameter(torch.zeros(n, **kw))

    def __getattr__(self, name: str) -> Any:
        # W_enc / W_dec are real parameters for dense variants; for factor variants SAELens code that
        # reads them gets a dense view built on demand.
        if self._is_view(name):
            return self.dense_W_enc() if name == "W_enc" else self.dense_W_dec()
        if name in ("atom_key", "atom_value", "encoder_factors"):
            # Python lands here when a property raised AttributeError: say why.
            raise AttributeError(self._no_factors_message(name))
        return super().__getattr__(name)  # type: ignore[misc]

    def __setattr__(self, name: str, value: Any) -> None:
        if self._is_view(name):
            raise AttributeError(
                f"{name} of a {self.cfg.variant!r} WriteSAE is a read-only dense view of its "
                "factors; edit W_dec_key/W_dec_value (W_enc_key/W_enc_value) instead."
            )
        super().__setattr__(name, value)  # type: ignore[misc]

    def _is_view(self, name: str) -> bool:
        """Whether ``name`` is a dense view (not a parameter) for this variant."""
        cfg = self.__dict__.get("cfg")
        if cfg is None:
            return False
        if name == "W_enc":
            return not has_dense_encoder(cfg.variant)
        return name == "W_dec" and has_factor_decoder(cfg.variant)

    def dense_W_enc(self) -> Float[Tensor, "d_in d_sae"]:
        """Encoder as SAELens' dense ``W_enc [d_in, d_sae]`` (``pre = (x - c_in) @ W_enc + b_enc``).

        For factor encoders this builds ``d_in * d_sae`` elements (128 MiB in float32 at
        ``d_k = d_v = 128``, ``d_sae = 2048``) on every access; it is a copy, edits do not stick.
        """
        if has_dense_encoder(self.cfg.variant):
            return self._parameters["W_enc"]  # type: ignore[attr-defined,return-value]
        key_f, value_f = self.encoder_factors
        return F.atom_matrices(key_f, value_f).reshape(self.cfg.d_sae, -1).T

    def dense_W_dec(self) -> Float[Tensor, "d_sae d_in"]:
        """Decoder as SAELens' dense ``W_dec [d_sae, d_in]`` (row ``i`` = ``vec(A_i)``).

        For factor decoders this builds ``d_sae * d_in`` elements on every access (see
        ``dense_W_enc``); it is a copy, edits do not stick.
        """
        if not has_factor_decoder(self.cfg.variant):
            return self._parameters["W_dec"]  # type: ignore[attr-defined,return-value]
        return self.atom_matrices().reshape(self.cfg.d_sae, -1)

    @property
    def atom_key(self) -> Float[Tensor, "d_sae rank d_k"]:
        """Key-side decoder factors ``v_ir`` (the parameter itself; edits stick)."""
        return self._factor_param("W_dec_key")

    @property
    def atom_value(self) -> Float[Tensor, "d_sae rank d_v"]:
        """Value-side decoder factors ``w_ir`` (the parameter itself; edits stick)."""
        return self._factor_param("W_dec_value")

    @property
    def encoder_factors(self) -> tuple[Float[Tensor, "d_sae rank d_k"], Float[Tensor, "d_sae rank d_v"]]:
        """Key and value factors of the matched-filter encoder (bilinear variants only)."""
        if has_encoder_factors(self.cfg.variant):
            return self.W_enc_key, self.W_enc_value  # type: ignore[attr-defined]
        if self.cfg.variant == "bilinear_tied":
            return self.W_dec_key, self.W_dec_value  # type: ignore[attr-defined]
        raise AttributeError("encoder_factors")

    def _factor_param(self, name: str) -> Tensor:
        if not has_factor_decoder(self.cfg.variant):
            raise AttributeError(name)
        return getattr(self, name)

    def _no_factors_message(self, name: str) -> str:
        if name == "encoder_factors":
            return (
                f"variant {self.cfg.variant!r} has a dense encoder W_enc [d_in, d_sae] and no "
                "encoder factors; use dense_W_enc()."
            )
        return (
            f"variant {self.cfg.variant!r} has dense atoms (W_dec [d_sae, d_in]) and no factors; use "
            "atom_matrices() for [d_sae, d_k, d_v] atoms."
        )

    def atom_matrices(
        self, indices: Int[Tensor, " n"] | list[int] | None = None
    ) -> Float[Tensor, "n d_k d_v"]:
        """Decoder atoms as dense ``[n, d_k, d_v]`` matrices (all atoms, or those in ``indices``).

        Args:
            indices: Atom indices; ``None`` for all ``d_sae`` atoms (``d_sae * d_k * d_v`` elements).
        """
        cfg = self.cfg
        if not has_factor_decoder(cfg.variant):
            w = self.W_dec if indices is None else self.W_dec[indices]  # type: ignore[attr-defined]
            return w.reshape(-1, cfg.d_k, cfg.d_v)
        key_f, value_f = self.atom_key, self.atom_value
        if indices is not None:
            key_f, value_f = key_f[indices], value_f[indices]
        return F.atom_matrices(key_f, value_f)

    @torch.no_grad()
    def get_W_dec_norm(self) -> Float[Tensor, " d_sae"]:
        """Frobenius norm of each atom, from the factors (exact for any rank)."""
        if not has_factor_decoder(self.cfg.variant):
            return self.W_dec.norm(dim=-1).clamp(min=1e-8)  # type: ignore[attr-defined]
        return F.atom_frobenius_norms(self.atom_key, self.atom_value).clamp(min=1e-8)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Scale every decoder factor row (dense decoders: every ``W_dec`` row) to unit norm, in place.

        This is the paper's periodic re-normalisation; for rank 1 it makes ``||v_i w_i^T||_F = 1``.
        The code is not compensated (as in the reference code), so the function changes slightly.
        """
        if has_factor_decoder(self.cfg.variant):
            for p in (self.W_dec_key, self.W_dec_value):  # type: ignore[attr-defined]
                p.copy_(F.unit_rows(p))
        else:
            self.W_dec.copy_(F.unit_rows(self.W_dec))  # type: ignore[attr-defined]

    @override
    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        """Give every atom unit Frobenius norm and fold the norms into the encoder, where that is exact.

        SAELens' contract: afterwards the atoms have unit norm, each code is the old code times its
        atom's old norm, and the reconstruction is unchanged. Pre-activations are scaled the same
        way, so TopK / BatchTopK pick the same atoms only if every atom has the same norm (unit norm,
        the trained case, folds to nothing). With unequal norms the fold would change the selection,
        and this raises ``NotImplementedError`` as SAELens' TopK SAEs do; ``normalize_decoder()``
        renormalises anyway if that change is acceptable. JumpReLU and gated SAEs decide per atom
        (JumpReLU's threshold is scaled with the atom, the gate's sign does not change), so they fold
        any norms exactly. The tied variant shares its atoms with the encoder, so it can only fold
        unit norms.
        """
        norms = self.get_W_dec_norm()
        if torch.allclose(norms, torch.ones_like(norms), rtol=0, atol=1e-6):
            return
        per_atom = self.cfg.sparsity in ("jumprelu", "gated")
        if not per_atom and float(norms.max() - norms.min()) > 1e-6 * float(norms.max()):
            raise NotImplementedError(
                "fold_W_dec_norm would change which atoms TopK selects (the atoms' norms differ, from "
                f"{float(norms.min()):.4g} to {float(norms.max()):.4g}); call normalize_decoder() if "
                "that change is acceptable."
            )
        if self.cfg.variant == "bilinear_tied":
            raise NotImplementedError(
                "a bilinear_tied WriteSAE encodes with its atoms, so their norms cannot move to the "
                "encoder; call normalize_decoder() if changing the codes' scale is acceptable."
            )
        self._fold_norms(norms)

    def _fold_norms(self, norms: Float[Tensor, " d_sae"]) -> None:
        """Decoder atoms divided by their norm, encoder atoms (and biases, thresholds) multiplied by it."""
        if has_factor_decoder(self.cfg.variant):
            self.W_dec_key.div_(norms[:, None, None])  # type: ignore[attr-defined]
        else:
            self.W_dec.div_(norms[:, None])  # type: ignore[attr-defined]
        if has_dense_encoder(self.cfg.variant):
            self.W_enc.mul_(norms)  # type: ignore[attr-defined]
        else:
            self.W_enc_key.mul_(norms[:, None, None])  # type: ignore[attr-defined]
        self.b_enc.mul_(norms)  # type: ignore[attr-defined]
        if self.cfg.sparsity == "batchtopk":
            self.topk_threshold.mul_(norms[0])  # type: ignore[attr-defined]
        elif self.cfg.sparsity == "jumprelu":
            self.log_threshold.add_(norms.log())  # type: ignore[attr-defined]
        elif self.cfg.sparsity == "gated":
            self.b_mag.mul_(norms)  # type: ignore[attr-defined]

    @override
    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        """Make an SAE trained on ``c * S`` act on raw ``S`` (``c = scaling_factor``).

        Every pre-activation is ``<E_i, S - c_in> + b_enc_i``, so dividing ``b_enc``, ``b_dec``,
        ``input_mean`` and the BatchTopK threshold by ``c`` divides all pre-activations by ``c``: TopK
        keeps the same atoms, codes come out in the raw input's units and the reconstruction is the
        trained SAE's divided by ``c``. JumpReLU's thresholds are divided by ``c`` too (``log c`` is
        subtracted from ``log_threshold``), and so is a gated SAE's magnitude bias ``b_mag`` (its gate
        keeps its sign). The atoms are untouched, so they keep unit norm and a code stays the Frobenius
        magnitude of its atom in the model's own units (the paper's convention).
        This differs from SAELens' dense SAEs, whose fold keeps codes in the scaled units.
        """
        to_raw_units(self.state_dict(), scaling_factor)  # state-dict tensors share the weights' storage

    @override
    def fold_activation_whitening(
        self, mean: Tensor, whitening_matrix: Tensor, unwhitening_matrix: Tensor
    ) -> None:
        raise NotImplementedError(
            "A d_in x d_in whitening folded into the decoder turns rank-r atoms into dense ones, "
            "which is what WriteSAE exists to avoid; use input_mean='fixed' for centering."
        )

    # ------------------------------------------------------------------ encode

    @override
    def get_activation_fn(self) -> Callable[[Tensor], Tensor]:
        return lambda pre: self._code(pre).dense

    def _batchtopk_rule(self) -> str:
        """Code selection of a BatchTopK SAE right now: the configured inference rule."""
        return self.cfg.batchtopk_inference

    def _code(self, pre: Float[Tensor, "*batch d_sae"], bandwidth: float | None = None) -> SparseCode:
        """Apply the configured sparsity rule.

        Args:
            pre: Pre-activations (a gated SAE's gate pre-activations).
            bandwidth: JumpReLU's kernel bandwidth, for its threshold gradients (default
                ``DEFAULT_BANDWIDTH``); the code itself does not depend on it.
        """
        cfg = self.cfg
        if cfg.sparsity == "jumprelu":
            return jumprelu_code(pre, self.log_threshold, bandwidth or DEFAULT_BANDWIDTH)  # type: ignore[attr-defined]
        if cfg.sparsity == "gated":
            return gated_code(pre, self.b_enc, self.r_mag, self.b_mag)  # type: ignore[attr-defined]
        rule = "topk" if cfg.sparsity == "topk" else self._batchtopk_rule()
        if rule == "batch":
            return batch_topk_code(pre, cfg.k)
        if rule == "threshold":
            return threshold_code(pre, self.topk_threshold)  # type: ignore[attr-defined]
        return topk_code(pre, cfg.k)

    def _input_offset(self) -> Float[Tensor, "d_k d_v"] | None:
        """``c_in``: what is subtracted from the state before encoding (``None`` if nothing)."""
        offset = None
        if self.cfg.input_mean == "fixed":
            offset = self.input_mean  # type: ignore[attr-defined]
        if self.cfg.apply_b_dec_to_input:
            offset = self.b_dec if offset is None else offset + self.b_dec  # type: ignore[attr-defined]
        return offset

    def _output_offset(self) -> Float[Tensor, "d_k d_v"]:
        """``c_out = b_dec + input_mean``: what decode adds to the sum of atoms."""
        if self.cfg.input_mean == "fixed":
            return self.b_dec + self.input_mean  # type: ignore[attr-defined]
        return self.b_dec  # type: ignore[attr-defined]

    def _split_input(
        self, x: Float[Tensor, "..."] | FactorPair
    ) -> tuple[Float[Tensor, "b d_k d_v"] | None, FlatPair | None, tuple[int, ...], Layout]:
        """Read an input as (matrices, factor pair, leading shape, layout); fires ``hook_sae_input``.

        A factor pair is materialised only if ``hook_sae_input`` has hooks (they need the matrix).
        """
        cfg = self.cfg
        if isinstance(x, tuple):
            key, value = x
            if key.shape[-1] != cfg.d_k or value.shape[-1] != cfg.d_v or key.shape[:-1] != value.shape[:-1]:
                raise ValueError(
                    f"a factor pair must be (key [..., {cfg.d_k}], value [..., {cfg.d_v}]) with equal "
                    f"leading shapes; got {tuple(key.shape)} and {tuple(value.shape)}."
                )
            key, value = key.to(self.dtype), value.to(self.dtype)
            lead = tuple(key.shape[:-1])
            if not _is_hooked(self.hook_sae_input):
                return None, (key.reshape(-1, cfg.d_k), value.reshape(-1, cfg.d_v)), lead, "matrix"
            x = key[..., :, None] * value[..., None, :]
        x = x.to(self.dtype)
        layout = self._layout_of(x)
        x = self.hook_sae_input(x)
        lead = tuple(x.shape[:-2] if layout == "matrix" else x.shape[:-1])
        return x.reshape(-1, cfg.d_k, cfg.d_v), None, lead, layout

    def _layout_of(self, x: Tensor) -> Layout:
        cfg = self.cfg
        if x.ndim >= 2 and tuple(x.shape[-2:]) == (cfg.d_k, cfg.d_v):
            return "matrix"
        if x.shape[-1] == cfg.d_in:
            return "flat"
        raise ValueError(
            f"expected a state [..., {cfg.d_k}, {cfg.d_v}], a flat state [..., {cfg.d_in}] or a "
            f"(key, value) factor pair; got shape {tuple(x.shape)}."
        )

    def _scores(
        self, states: Float[Tensor, "b d_k d_v"] | None, pair: FlatPair | None
    ) -> Float[Tensor, "b d_sae"]:
        """Pre-activations before hooks: ``<E_i, S - c_in> + b_enc_i`` for matrices or factor pairs."""
        cfg = self.cfg
        offset = self._input_offset()
        if states is not None:
            centred = states if offset is None else states - offset
            if has_dense_encoder(cfg.variant):
                pre = centred.reshape(centred.shape[0], -1) @ self.W_enc
            else:
                pre = F.bilinear_scores(centred, *self.encoder_factors)
        else:
            assert pair is not None
            key, value = pair
            if has_dense_encoder(cfg.variant):
                pre = F.dense_scores_rank1(key, value, self.W_enc)
                if offset is not None:
                    pre = pre - offset.reshape(-1) @ self.W_enc
            else:
                key_f, value_f = self.encoder_factors
                pre = F.bilinear_scores_rank1(key, value, key_f, value_f)
                if offset is not None:
                    pre = pre - F.atom_offset_inner(key_f, value_f, offset)
        return pre + self.b_enc  # type: ignore[attr-defined]

    def encode_full(self, x: Float[Tensor, "..."] | FactorPair, bandwidth: float | None = None) -> Encoded:
        """Encode with hooks, returning pre-activations and the sparse code too (see ``Encoded``).

        Args:
            x: As for ``encode``.
            bandwidth: JumpReLU's kernel bandwidth for the backward pass (see ``_code``).
        """
        states, pair, lead, layout = self._split_input(x)
        pre = self.hook_sae_acts_pre(self._scores(states, pair).reshape(*lead, -1))
        code = self._code(pre, bandwidth)
        dense = self.hook_sae_acts_post(code.dense)
        if _is_hooked(self.hook_sae_acts_post):
            code = sparse_rows(dense)  # the hook may have edited the code, even in place
        else:
            # Decode from the hook point's output, so that backward hooks on it see the gradient.
            code = code._replace(dense=dense)
        self._last_layout = layout
        n = self.cfg.d_sae
        flat_code = SparseCode(
            code.dense.reshape(-1, n),
            code.indices.reshape(-1, code.indices.shape[-1]),
            code.values.reshape(-1, code.values.shape[-1]),
        )
        return Encoded(pre.reshape(-1, n), flat_code, lead, layout, states, pair)

    @override
    def encode(self, x: Float[Tensor, "..."] | FactorPair) -> Float[Tensor, "... d_sae"]:
        """Codes of states ``[..., d_k, d_v]``, flat states ``[..., d_in]`` or a factor pair.

        Args:
            x: A state tensor in either layout, or ``(key [..., d_k], value [..., d_v])`` standing
                for the rank-1 matrices ``key value^T``. Matched-filter (bilinear) encoders score
                these from the factors, ``(v_i . k)(w_i . u)``, and never build them (unless
                ``hook_sae_input`` is hooked); dense encoders have no such shortcut and build them
                in bounded chunks (``factors.dense_scores_rank1``).

        Returns:
            Codes ``[..., d_sae]`` (leading axes of the input).
        """
        enc = self.encode_full(x)
        return enc.code.dense.reshape(*enc.lead, self.cfg.d_sae)

    def encode_factors(
        self, key: Float[Tensor, "*batch d_k"], value: Float[Tensor, "*batch d_v"]
    ) -> Float[Tensor, "*batch d_sae"]:
        """Codes of rank-1 inputs ``key value^T``, the same as ``encode((key, value))``."""
        return self.encode((key, value))

    # ------------------------------------------------------------------ decode

    def _decode_matrix(self, dense: Float[Tensor, "b d_sae"]) -> Float[Tensor, "b d_k d_v"]:
        """``sum_i a_i A_i + c_out`` as ``[b, d_k, d_v]`` matrices (no hooks).

        The active set is re-read from the dense code and sorted, so the result is a function of the
        dense code alone: two decodes of equal codes agree bit for bit (``use_error_term`` relies on it).
        """
        cfg = self.cfg
        if has_factor_decoder(cfg.variant):
            indices = sparse_rows(dense).indices.sort(dim=-1).values
            recon = F.decode_dense_code(dense, indices, self.W_dec_key, self.W_dec_value)  # type: ignore[attr-defined]
        else:
            recon = (dense @ self.W_dec).reshape(-1, cfg.d_k, cfg.d_v)  # type: ignore[attr-defined]
        return recon + self._output_offset()

    def _to_layout(
        self, matrices: Float[Tensor, "b d_k d_v"], lead: tuple[int, ...], layout: Layout
    ) -> Tensor:
        if layout == "matrix":
            return matrices.reshape(*lead, self.cfg.d_k, self.cfg.d_v)
        return matrices.reshape(*lead, self.cfg.d_in)

    @override
    def decode(
        self, feature_acts: Float[Tensor, "... d_sae"], layout: Layout | None = None
    ) -> Float[Tensor, "..."]:
        """Reconstruct ``sum_i a_i A_i + b_dec (+ input_mean)`` from codes.

        Args:
            feature_acts: Codes ``[..., d_sae]`` (any values; edited codes are fine).
            layout: ``"matrix"`` for ``[..., d_k, d_v]``, ``"flat"`` for ``[..., d_in]``; ``None``
                returns the layout of the most recent ``encode`` (SAELens' ``decode(encode(x))``
                then has the shape of ``x``), or flat if nothing was encoded yet.

        Returns:
            The reconstruction, after ``hook_sae_recons``.
        """
        layout = layout or self._last_layout
        lead = tuple(feature_acts.shape[:-1])
        dense = feature_acts.to(self.dtype).reshape(-1, self.cfg.d_sae)
        return self.hook_sae_recons(self._to_layout(self._decode_matrix(dense), lead, layout))

    # ------------------------------------------------------------------ forward

    @override
    def forward(
        self, x: Float[Tensor, "..."] | FactorPair, use_error_term: bool | None = None
    ) -> Float[Tensor, "..."]:
        """Reconstruct ``x`` (in its layout; factor pairs give ``[..., d_k, d_v]`` matrices).

        With the error term the output is ``x`` itself plus the change that hooks made to the
        reconstruction (edits of ``hook_sae_acts_post``/``hook_sae_recons``/``hook_sae_error`` pass
        through), computed so that with no edits the output equals ``x`` bit for bit; the gradient
        flows through the reconstruction only, as in SAELens.

        Args:
            x: As for ``encode``.
            use_error_term: Override ``self.use_error_term`` for this call (splicing code can pass
                it instead of setting SAELens' deprecated attribute).
        """
        if use_error_term is None:
            use_error_term = self.use_error_term
        _, code, lead, layout, _, pair = self.encode_full(x)
        recon = self.hook_sae_recons(self._to_layout(self._decode_matrix(code.dense), lead, layout))
        if not use_error_term:
            return self.hook_sae_output(recon)
        with torch.no_grad():
            # The clean pass takes the same route as the hooked one (factor pair or matrices) and
            # skips the hooks, so with no edits `recon` and `clean` are equal bit for bit. Like
            # SAELens, it encodes the input as given, before any hook_sae_input edit.
            if pair is not None:
                clean_pre = self._scores(None, pair)
                states = pair[0][:, :, None] * pair[1][:, None, :]
            else:
                states = self._matrices_of(x)
                clean_pre = self._scores(states, None)
            clean_m = self._decode_matrix(self._code(clean_pre).dense)
            inp = self._to_layout(states, lead, layout)
            clean = self._to_layout(clean_m, lead, layout)
            error = inp - clean
            out = inp + (recon.detach() - clean)
            if _is_hooked(self.hook_sae_error):
                out = out + (self.hook_sae_error(error.clone()) - error)
            else:
                self.hook_sae_error(error)
        # Value of `out`, gradient of `recon` (recon - recon.detach() is exactly zero).
        return self.hook_sae_output(out + (recon - recon.detach()))

    def _matrices_of(self, x: Float[Tensor, "..."] | FactorPair) -> Float[Tensor, "b d_k d_v"]:
        """The input as ``[b, d_k, d_v]`` matrices, without hooks (factor pairs are built)."""
        if isinstance(x, tuple):
            x = x[0].to(self.dtype)[..., :, None] * x[1].to(self.dtype)[..., None, :]
        return x.to(self.dtype).reshape(-1, self.cfg.d_k, self.cfg.d_v)

    # ------------------------------------------------------------------ files

    @override
    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        """Check names and shapes before loading, with a message that names the mismatch."""
        from writesae.io import check_state_dict

        check_state_dict(state_dict, self.expected_shapes())

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every tensor in this SAE's state dict."""
        return {name: tuple(t.shape) for name, t in self.state_dict().items()}  # type: ignore[attr-defined]


class WriteSAE(WriteSAEMixin, SAE[WriteSAEConfig]):
    """Inference WriteSAE (SAELens architecture ``"write_sae"``); see the module docstring.

    Load a saved one with ``sae_lens.SAE.load_from_disk(path)`` after ``import writesae``, or with
    ``WriteSAE.load_from_disk(path)``, which first checks the files and names what is wrong.
    """

    def __init__(self, cfg: WriteSAEConfig, use_error_term: bool = False, seed: int | None = None):
        """Build the SAE; ``seed`` makes the random init reproducible without touching torch's global RNG."""
        with seeded(seed):
            super().__init__(cfg, use_error_term)

    @override
    def save_model(self, path: str | Path) -> tuple[Path, Path]:
        """Write ``cfg.json`` + ``sae_weights.safetensors`` atomically (see ``writesae.io``)."""
        from writesae.io import save_sae_files

        return save_sae_files(path, self.state_dict(), self.cfg.to_dict())

    @override
    @classmethod
    def load_from_disk(
        cls: type[T_WRITE_SAE],
        path: str | Path,
        device: str = "cpu",
        dtype: str | None = None,
        converter: Any = None,
        fold_W_dec_norm: bool = False,
    ) -> T_WRITE_SAE:
        """Check the files in ``path`` (clear errors naming the file), then load like SAELens.

        Args:
            path: Directory with ``cfg.json`` and ``sae_weights.safetensors``.
            device: Where to load.
            dtype: Override the saved dtype.
            converter: A SAELens disk loader; default SAELens' own.
            fold_W_dec_norm: Passed to SAELens (a no-op for unit-norm atoms).
        """
        from writesae.io import check_sae_dir

        check_sae_dir(path)
        kwargs: dict[str, Any] = {"device": device, "dtype": dtype, "fold_W_dec_norm": fold_W_dec_norm}
        if converter is not None:
            kwargs["converter"] = converter
        return super().load_from_disk(path, **kwargs)  # type: ignore[misc]
