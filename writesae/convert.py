"""Load the WriteSAE paper's public checkpoints (``best.pt`` / ``final.pt``) as ``WriteSAE``.

Their layout (reference code ``core/train.py``; see reference-code-notes §3.5) is a dict
``{"model_state_dict": ..., "config": {...}, ...}``. State-dict keys by ``config["sae_type"]``:

============== ================================================================ =======================
sae_type       their keys                                                       ours
============== ================================================================ =======================
bilinear       ``V_enc (n,r,d_k)``, ``W_enc (n,r,d_v)``, ``b_enc (n)``,          ``W_enc_key``, ``W_enc_value``, ``b_enc``,
               ``V_dec (n,r,d_k)``, ``W_dec (n,r,d_v)``, ``bias (d_k,d_v)``      ``W_dec_key``, ``W_dec_value``, ``b_dec``
bilinear_tied  ``V_dec``, ``W_dec``, ``b_enc``, ``bias``                         ``W_dec_key``, ``W_dec_value``, ...
rank1          ``encoder.weight (n,d_in)``, ``encoder.bias``, ``V``, ``W``, ``bias``  variant ``matrix``
flat           ``encoder.*``, ``decoder.weight (d_in,n)``, ``decoder.bias (d_in)``  variant ``flat``
bilinear_flat  ``V_enc``, ``W_enc``, ``b_enc``, ``decoder.weight``, ``decoder.bias``  ``W_enc_key``, ``W_enc_value``,
                                                                                ``b_enc``, ``W_dec``, ``b_dec``
bilinear_      bilinear's keys plus ``log_threshold (n)``                       sparsity ``jumprelu``,
jumprelu                                                                        ``log_threshold``
bilinear_      bilinear's keys with ``b_gate`` for ``b_enc``, plus ``b_mag``,   sparsity ``gated``, ``b_enc``,
gated          ``r_mag`` (n)                                                    ``b_mag``, ``r_mag``
============== ================================================================ =======================

``V_*`` are key-side (``d_k``) and ``W_*`` value-side (``d_v``) factors, matching ours. Older checkpoints
store rank-1 factors as 2-D ``(n, d)`` tensors; they are read as ``(n, 1, d)``. ``steps_since_active``
(a training buffer) is dropped. Their encoder does not subtract the decoder bias, so the converted
config has ``apply_b_dec_to_input=False``; their flattening of ``S`` is row-major, like ours. Their gated
SAE keeps its soft gate ``sigmoid(pi_gate / gate_tau)`` at inference; a converted one uses the hard gate
``1[pi_gate > 0]`` (docs/design.md §5), so its codes differ where a gate is near 0 (``gate_tau`` goes to
the metadata as ``paper_gate_tau``).

Files are read with ``torch.load(weights_only=True)`` only. The Hub release also has full-module
pickles; those are refused (unpickling runs arbitrary code), with instructions to re-save them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from sae_lens.saes.sae import SAEMetadata

from writesae.config import WriteSAEConfig
from writesae.io import CheckpointError
from writesae.sae import WriteSAE

_VARIANT = {"bilinear": "bilinear", "bilinear_tied": "bilinear_tied", "rank1": "matrix", "flat": "flat",
            "bilinear_flat": "bilinear_flat", "bilinear_jumprelu": "bilinear",
            "bilinear_gated": "bilinear"}  # fmt: skip
_SPARSITY = {"bilinear_jumprelu": "jumprelu", "bilinear_gated": "gated"}
_FACTOR_KEYS = {"V_enc", "W_enc", "V_dec", "W_dec", "V", "W"}


def _read(path_or_dict: str | Path | dict[str, Any]) -> tuple[dict[str, Any], str]:
    if isinstance(path_or_dict, dict):
        return path_or_dict, "<dict>"
    path = Path(path_or_dict)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found.") from None
    except Exception as exc:  # torch raises UnpicklingError or RuntimeError, by version
        raise CheckpointError(
            f"{path}: cannot be read with torch.load(weights_only=True) ({type(exc).__name__}). If it is "
            "a full-module pickle from the Hub release, re-save its tensors in an environment you "
            "trust: torch.save({'model_state_dict': ckpt['sae'].state_dict(), 'config': "
            "ckpt.get('config', {})}, 'plain.pt'), then convert plain.pt."
        ) from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}.")
    return ckpt, str(path)


def _infer_type(state: dict[str, torch.Tensor]) -> str:
    if "log_threshold" in state:
        return "bilinear_jumprelu"
    if "b_gate" in state:
        return "bilinear_gated"
    if "V_enc" in state:
        return "bilinear_flat" if "decoder.weight" in state else "bilinear"
    if "V_dec" in state:
        return "bilinear_tied"
    if "V" in state:
        return "rank1"
    if "decoder.weight" in state:
        return "flat"
    raise CheckpointError(f"unrecognised WriteSAE paper state dict (keys {sorted(state)}).")


def load_paper_checkpoint(
    path_or_dict: str | Path | dict[str, Any],
    *,
    k: int | None = None,
    sparsity: str | None = None,
    batchtopk_inference: str = "topk",
    hook_name: str | None = None,
    hook_head_index: int | None = None,
    model_name: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> WriteSAE:
    """Convert a paper checkpoint into an inference ``WriteSAE``.

    Args:
        path_or_dict: A ``.pt`` file or an already-loaded checkpoint dict (``model_state_dict`` +
            ``config``; a bare state dict also works if ``k`` is given).
        k: TopK k; default ``config["k"]``.
        sparsity: ``"topk"``/``"batchtopk"``; default from ``config["use_batchtopk"]`` (JumpReLU and
            gated checkpoints have their own, and ignore ``k``).
        batchtopk_inference: Inference rule for BatchTopK checkpoints (see ``WriteSAEConfig``).
        hook_name: Hook the SAE belongs to, e.g. ``"blocks.9.linear_attn.hook_state"`` (their
            checkpoints record only layer/head; those go to metadata as ``paper_layer``/``paper_head``).
        hook_head_index: Head; default ``config["head"]``.
        model_name: Model name for the metadata.
        device: Where to put the SAE.
        dtype: SAE dtype.
    """
    ckpt, source = _read(path_or_dict)
    config: dict[str, Any] = dict(ckpt.get("config") or {})
    state = ckpt.get("model_state_dict", ckpt)
    state = {name: t for name, t in state.items() if name != "steps_since_active"}
    sae_type = config.get("sae_type") or _infer_type(state)
    if sae_type not in _VARIANT:
        raise CheckpointError(
            f"{source}: sae_type {sae_type!r} is not convertible; supported: {sorted(_VARIANT)}."
        )
    if sae_type in _SPARSITY:
        if sparsity not in (None, _SPARSITY[sae_type]):
            raise CheckpointError(
                f"{source}: a {sae_type} checkpoint is a {_SPARSITY[sae_type]} SAE; drop sparsity={sparsity!r}."
            )
        sparsity = _SPARSITY[sae_type]
        k = k if k is not None else int(config.get("k", 32))  # not used by these sparsities
    state = {
        name: (t[:, None, :] if name in _FACTOR_KEYS and t.ndim == 2 else t) for name, t in state.items()
    }
    ours = _rename(sae_type, state, source)

    b_dec = ours["b_dec"]
    d_k, d_v = config.get("d_k"), config.get("d_v")
    # Any factor pair gives d_k, d_v and the rank (bilinear_flat has encoder factors only).
    key_f, value_f = ours.get("W_dec_key", ours.get("W_enc_key")), ours.get("W_dec_value", ours.get("W_enc_value"))
    if key_f is not None and value_f is not None:
        d_k, d_v = key_f.shape[-1], value_f.shape[-1]
    if d_k is None or d_v is None:
        if b_dec.ndim != 2:
            raise CheckpointError(f"{source}: config lacks d_k/d_v and the bias is not a matrix.")
        d_k, d_v = b_dec.shape
    ours["b_dec"] = b_dec.reshape(d_k, d_v)
    d_sae = ours["b_enc"].shape[0]
    rank = key_f.shape[1] if key_f is not None else 1
    if k is None:
        if "k" not in config:
            raise CheckpointError(f"{source}: config has no 'k'; pass k= explicitly.")
        k = int(config["k"])
    if sparsity is None:
        sparsity = "batchtopk" if config.get("use_batchtopk") else "topk"
    metadata = SAEMetadata(
        hook_name=hook_name,
        hook_head_index=hook_head_index if hook_head_index is not None else config.get("head"),
        model_name=model_name,
        paper_layer=config.get("layer"),
        paper_head=config.get("head"),
        converted_from="WriteSAE paper checkpoint (arXiv 2605.12770)",
        **({"paper_gate_tau": config.get("gate_tau")} if sae_type == "bilinear_gated" else {}),
    )
    cfg = WriteSAEConfig.build(
        d_k=d_k, d_v=d_v, d_sae=d_sae, k=k, rank=rank, variant=_VARIANT[sae_type],
        sparsity=sparsity, batchtopk_inference=batchtopk_inference,
        apply_b_dec_to_input=False, dtype=dtype, device=device, metadata=metadata,
    )  # fmt: skip
    sae = WriteSAE(cfg)
    if sparsity == "batchtopk":
        # Their code learns no inference threshold; zero means "no threshold" if one is requested.
        ours["topk_threshold"] = torch.zeros(())
    ours = {name: t.to(dtype=sae.dtype) for name, t in ours.items()}
    sae.process_state_dict_for_loading(ours)
    sae.load_state_dict(ours)
    return sae.to(device)


def _rename(sae_type: str, state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    def take(name: str) -> torch.Tensor:
        if name not in state:
            raise CheckpointError(
                f"{source}: a {sae_type!r} checkpoint needs {name!r}; it has {sorted(state)}."
            )
        return state[name]

    if sae_type in ("bilinear", "bilinear_jumprelu", "bilinear_gated"):
        mapping = {"W_enc_key": "V_enc", "W_enc_value": "W_enc", "b_enc": "b_enc",
                   "W_dec_key": "V_dec", "W_dec_value": "W_dec", "b_dec": "bias"}  # fmt: skip
        if sae_type == "bilinear_jumprelu":
            mapping["log_threshold"] = "log_threshold"
        if sae_type == "bilinear_gated":
            mapping.update(b_enc="b_gate", b_mag="b_mag", r_mag="r_mag")
        return {ours: take(theirs) for ours, theirs in mapping.items()}
    if sae_type == "bilinear_tied":
        mapping = {"b_enc": "b_enc", "W_dec_key": "V_dec", "W_dec_value": "W_dec", "b_dec": "bias"}
        return {ours: take(theirs) for ours, theirs in mapping.items()}
    if sae_type == "bilinear_flat":
        return {
            "W_enc_key": take("V_enc"),
            "W_enc_value": take("W_enc"),
            "b_enc": take("b_enc"),
            "W_dec": take("decoder.weight").T.contiguous(),
            "b_dec": take("decoder.bias"),
        }
    if sae_type == "rank1":
        return {
            "W_enc": take("encoder.weight").T.contiguous(),
            "b_enc": take("encoder.bias"),
            "W_dec_key": take("V"),
            "W_dec_value": take("W"),
            "b_dec": take("bias"),
        }
    return {
        "W_enc": take("encoder.weight").T.contiguous(),
        "b_enc": take("encoder.bias"),
        "W_dec": take("decoder.weight").T.contiguous(),
        "b_dec": take("decoder.bias"),
    }
