"""WriteSAE: sparse autoencoders whose atoms are rank-1 matrices shaped like a recurrent write.

Importing this package registers the architecture ``"write_sae"`` with SAELens (inference and training
classes), so ``sae_lens.SAE.load_from_disk(path)`` loads a saved WriteSAE. Registration is idempotent:
re-importing or ``importlib.reload`` keeps one entry, pointing at the current classes.
"""

from sae_lens.registry import (
    SAE_CLASS_REGISTRY,
    SAE_TRAINING_CLASS_REGISTRY,
    register_sae_class,
    register_sae_training_class,
)

from writesae.activations import (
    SparseCode,
    batch_topk_code,
    gated_code,
    jumprelu_code,
    sparse_rows,
    threshold_code,
    topk_code,
)
from writesae.config import ARCHITECTURE, WriteSAEConfig, WriteTrainingSAEConfig
from writesae.convert import load_paper_checkpoint
from writesae.data import FactorSource, TensorSource, WriteSource, as_source
from writesae.io import CheckpointError
from writesae.sae import WriteSAE
from writesae.trainer import TrainerConfig, WriteSAETrainer
from writesae.training_sae import SparsityLoss, WriteTrainingSAE


def _register(registry: dict, register, classes: tuple) -> None:  # type: ignore[type-arg]
    present = registry.get(ARCHITECTURE)
    if present is None:
        register(ARCHITECTURE, *classes)
        return
    if present == classes:
        return
    if all(
        (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)
        for a, b in zip(present, classes)
    ):
        # Our own classes from before an importlib.reload: point the entry at the current ones.
        registry[ARCHITECTURE] = classes
        return
    raise RuntimeError(
        f"SAELens architecture {ARCHITECTURE!r} is already registered by {present[0].__module__}; "
        "two packages claim the same name: uninstall or rename the other one."
    )


_register(SAE_CLASS_REGISTRY, register_sae_class, (WriteSAE, WriteSAEConfig))
_register(
    SAE_TRAINING_CLASS_REGISTRY,
    register_sae_training_class,
    (WriteTrainingSAE, WriteTrainingSAEConfig),
)

__all__ = [
    "ARCHITECTURE",
    "CheckpointError",
    "FactorSource",
    "SparseCode",
    "SparsityLoss",
    "TensorSource",
    "TrainerConfig",
    "WriteSAE",
    "WriteSAEConfig",
    "WriteSAETrainer",
    "WriteSource",
    "WriteTrainingSAE",
    "WriteTrainingSAEConfig",
    "as_source",
    "batch_topk_code",
    "gated_code",
    "jumprelu_code",
    "load_paper_checkpoint",
    "sparse_rows",
    "threshold_code",
    "topk_code",
]
