"""A first look: load a small Qwen3.5, cache its write hooks, print what was captured.

Run with ``python -m hooked_recurrent.demo [model]`` (default: the built-in ``tiny-random:qwen3.5``).
"""

from __future__ import annotations

import sys

import torch

from . import HookedRecurrentModel


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    name = argv[0] if argv else "tiny-random:qwen3.5"
    model = HookedRecurrentModel.from_pretrained(name, device="cpu")
    cfg = model.cfg
    print(f"{cfg.model_name}: {cfg.architecture}, {cfg.n_layers} layers {cfg.layer_types}")
    print(f"  recurrent heads {cfg.n_heads}, state d_k x d_v = {cfg.d_k} x {cfg.d_v}")
    tokens = torch.randint(3, cfg.d_vocab, (2, 96), generator=torch.Generator().manual_seed(0))
    layer = cfg.recurrent_layers[0]
    wanted = [cfg.hook_name(layer, h) for h in ("hook_write_key", "hook_write_value", "hook_write", "hook_state")]
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=wanted)
    print(f"logits {tuple(logits.shape)}; captured:")
    for name in wanted:
        print(f"  {name:42s} {tuple(cache[name].shape)}")
    writes = cache[wanted[2]]
    ranks = torch.linalg.matrix_rank(writes[0, :8, 0], rtol=1e-5).tolist()
    print(f"rank of the first 8 writes of head 0: {ranks} (each write is rank-1: k_t (beta_t v_t)^T)")
    states = cache[wanted[3]][0, :, 0]
    sv = torch.linalg.svdvals(states[-1].double())
    print(f"state after {states.shape[0]} tokens: top singular values {[round(v, 4) for v in sv[:4].tolist()]}")


if __name__ == "__main__":
    main()
