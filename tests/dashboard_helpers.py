"""One small dashboard on the shipped model, built once per test session and shared by the tests."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import torch

LAYER, HEAD = 2, 3  # the shipped model's longest-memory head: gate half-lives of tens of tokens


@functools.lru_cache(maxsize=1)
def small_dashboard():
    """(model, sae, tokens, data, out_dir): an untrained 24-atom SAE on L2 H3's writes, 6 x 48 tokens."""
    import writesae  # noqa: F401
    from hooked_recurrent import HookedRecurrentModel
    from writesae import WriteSAE, WriteSAEConfig
    from writesae.dashboard import DashboardConfig, build_dashboard
    from writesae.tokens import token_blocks

    model = HookedRecurrentModel.from_pretrained("stdlib:qwen3.5")
    cfg = WriteSAEConfig.build(d_k=model.cfg.d_k, d_v=model.cfg.d_v, d_sae=24, k=3)
    cfg.metadata.hook_name = model.cfg.hook_name(LAYER, "hook_write")
    cfg.metadata.hook_head_index = HEAD
    cfg.metadata.model_name = model.cfg.model_name
    sae = WriteSAE(cfg, seed=3)
    with torch.no_grad():  # one strong atom, so that the scales of the atoms differ
        sae.b_enc[5] = 0.05
    tokens = token_blocks(model, "stdlib", split="val", n_sequences=6, seq_len=48, seed=1)
    root = tempfile.mkdtemp(prefix="wsd-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    out = Path(root) / "dashboard"
    config = DashboardConfig(contexts=4, queries=3, before=6, after=2, max_horizon=16, batch_size=4, response_horizon=5)
    data = build_dashboard(model, sae, tokens, config=config, out_dir=out, source="stdlib", verbose=False)
    return model, sae, tokens, data, out
