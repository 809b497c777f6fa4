"""Train a WriteSAE on one (layer, head) cell of a `WriteStore`, and get back an inference SAE.

The SAE's metadata names what it belongs to (``hook_name``, ``hook_head_index``, ``model_name``),
so it can be spliced back into the model it was trained on with ``model.add_sae(sae)``.

Example:
    >>> import tempfile, torch
    >>> from hooked_recurrent import HookedRecurrentModel
    >>> from writesae.store import collect
    >>> model = HookedRecurrentModel.from_pretrained("tiny-random:qwen3.5")
    >>> tokens = torch.randint(3, 256, (16, 48), generator=torch.Generator().manual_seed(0))
    >>> store = collect(model, tokens, layers=[1], heads=[2], kind="write", out_dir=tempfile.mkdtemp(), verbose=False)
    >>> sae, metrics = train_on_store(store, 1, 2, d_sae=64, k=4, trainer=TrainerConfig(epochs=1, progress=False))
    >>> sae.cfg.metadata.hook_name, sae.cfg.metadata.hook_head_index
    ('blocks.1.linear_attn.hook_write', 2)
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from writesae.config import WriteTrainingSAEConfig
from writesae.distributed import World
from writesae.sae import WriteSAE
from writesae.store import WriteStore
from writesae.trainer import TrainerConfig, WriteSAETrainer
from writesae.training_sae import WriteTrainingSAE

__all__ = ["train_on_store", "TrainerConfig"]


def train_on_store(
    store: WriteStore | str | Path,
    layer: int,
    head: int,
    *,
    d_sae: int = 2048,
    k: int = 32,
    trainer: TrainerConfig | None = None,
    seed: int = 42,
    resume_from: str | Path | None = None,
    world: World | None = None,
    **sae_kwargs: Any,
) -> tuple[WriteSAE, dict[str, float]]:
    """Train a WriteSAE on a store cell and return it (best validation checkpoint) with its metrics.

    Args:
        store: A store (or its directory) from `writesae.store.collect`.
        layer: Layer of the cell.
        head: Head of the cell.
        d_sae: Dictionary size (paper: 2,048).
        k: Active atoms per sample (paper: 32).
        trainer: Trainer settings (default: the paper's; ``out_dir`` keeps logs and checkpoints).
        seed: Seed of the SAE's initialisation.
        resume_from: A trainer checkpoint directory to continue from.
        world: Ranks that train this SAE together, data-parallel (see `WriteSAETrainer`); each
            reads only its share of every batch from the store. Default: one process.
        **sae_kwargs: Further `WriteTrainingSAEConfig` fields (``variant``, ``rank``, ``sparsity``,
            ``device``...).

    Returns:
        ``(inference SAE with the best validation weights, that validation's metrics)``: the
        metrics (``val_mse``, ``val_explained_variance``..., ``best_val_mse``, ``best_step``) are
        those of the returned weights, also after a resume.

    Raises:
        ValueError: the cell has no training or no validation sample.
    """
    store = store if isinstance(store, WriteStore) else WriteStore(store)
    for split in ("train", "val"):
        if store.num_samples(layer, head, split) == 0:
            raise ValueError(
                f"{store.path}: layer {layer} head {head} has no {split} sample; collect more sequences "
                "(writesae collect --sequences) or more positions per sequence"
            )
    d_k, d_v = store.manifest["model"]["d_k"], store.manifest["model"]["d_v"]
    cfg = WriteTrainingSAEConfig.build(d_k=d_k, d_v=d_v, d_sae=d_sae, k=k, **sae_kwargs)
    cfg.metadata.hook_name = store.hook_name(layer)
    cfg.metadata.hook_head_index = head
    cfg.metadata.model_name = store.model_name
    training_sae = WriteTrainingSAE(cfg, seed=seed)
    trainer = trainer or TrainerConfig()
    pin = torch.device(cfg.device).type == "cuda"  # page-locked batches copy to the GPU asynchronously
    train = store.source(layer, head, "train", pin_memory=pin)
    val = store.source(layer, head, "val", shuffle=False, pin_memory=pin)
    run = WriteSAETrainer(training_sae, train, trainer, val=val, world=world)
    run.fit(resume_from=resume_from)
    if run.best_state_dict is not None:
        training_sae.load_state_dict(run.best_state_dict)
    with tempfile.TemporaryDirectory() as tmp:
        training_sae.save_inference_model(tmp)
        sae = WriteSAE.load_from_disk(tmp)
    metrics = {k: v for k, v in (run.best_val or {}).items() if k != "step"}
    metrics["best_val_mse"] = float(run.best_val_mse)
    metrics["best_step"] = (run.best_val or {}).get("step")
    return sae.to(torch.device(training_sae.device)), metrics
