"""What the demo hands every paper protocol of ``writesae demo --full``: one model, its cell, its SAEs, its text.

The regular demo (`writesae.demo.run_demo`) has already picked the cell, trained a WriteSAE on the
cell's states and one on its writes, and saved both; `DemoContext.load` reads them back from the
demo's folder, so a protocol stage can run (or resume) in a later process than the demo's.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jaxtyping import Int
from torch import Tensor

__all__ = ["DemoContext"]


@dataclass
class DemoContext:
    """One shipped model after its demo: what the protocols read.

    Attributes:
        model_name: The model's name (``stdlib:qwen3.5``).
        model: The `HookedRecurrentModel`.
        demo_dir: The demo's folder (``summary.json``, ``sae_state/``, its protocol runs).
        figures: The demo's ``summary.json``.
        demo_sizes: The demo's sizes (`writesae.demo.DEMO_SIZES` with the overrides it ran with).
        seed: The demo's seed.
        device: Where the model lives.
        saes: ``{"state": ..., "write": ...}``: the demo's two WriteSAEs of the cell.
    """

    model_name: str
    model: Any
    demo_dir: Path
    figures: dict[str, Any]
    demo_sizes: dict[str, int]
    seed: int = 0
    device: str = "cpu"
    saes: dict[str, Any] = field(default_factory=dict)
    _blocks: dict[tuple[str, int, int, int], Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, model_name: str, demo_dir: Path, demo_sizes: dict[str, int], seed: int = 0,
             device: str = "cpu") -> DemoContext:  # fmt: skip
        """The model, the demo's figures and its two SAEs, from a finished demo folder."""
        import writesae  # noqa: F401  registers the architecture
        from hooked_recurrent import HookedRecurrentModel
        from writesae.sae import WriteSAE

        figures = json.loads((demo_dir / "summary.json").read_text())
        model = HookedRecurrentModel.from_pretrained(model_name, device=device)
        saes = {
            kind: WriteSAE.load_from_disk(demo_dir / f"sae_{kind}", device=device).eval() for kind in ("state", "write")
        }
        return cls(model_name, model, demo_dir, figures, dict(demo_sizes), seed, device, saes)

    @property
    def layer(self) -> int:
        """The demo's cell: the head with the longest memory."""
        return int(self.figures["cell"]["layer"])

    @property
    def head(self) -> int:
        return int(self.figures["cell"]["head"])

    @property
    def sae(self) -> Any:
        """The paper's setting: the WriteSAE trained on the cell's states."""
        return self.saes["state"]

    @property
    def attention_layers(self) -> list[int]:
        """Layers with softmax attention (readers of a recurrent write); none on a pure Mamba-2."""
        return [i for i, kind in enumerate(self.model.cfg.layer_types) if kind == "attention"]

    def train_sae(self, name: str, kind: str = "state", epochs: int | None = None, **sae_kwargs: Any) -> Any:
        """Another WriteSAE of the cell (e.g. ``variant="flat"``) on the demo's store, with the demo's recipe
        and sizes; saved in ``paper/inputs/{name}/sae`` (atomically), and loaded from there once it is."""
        from writesae.demo import demo_trainer
        from writesae.sae import WriteSAE
        from writesae.training import train_on_store

        out_dir = self.demo_dir / "paper" / "inputs" / name
        saved = out_dir / "sae"
        if (saved / "cfg.json").is_file():
            return WriteSAE.load_from_disk(saved, device=self.device).eval()
        shutil.rmtree(out_dir / "training", ignore_errors=True)  # a stopped training starts again
        sizes = self.demo_sizes if epochs is None else {**self.demo_sizes, "epochs": epochs}
        trainer = demo_trainer(sizes, out_dir / "training")
        sae, _ = train_on_store(self.demo_dir / f"store_{kind}", self.layer, self.head, d_sae=self.demo_sizes["d_sae"],
                                k=self.demo_sizes["k"], trainer=trainer, seed=self.seed, device=self.device,
                                **sae_kwargs)  # fmt: skip
        sae.save_model(saved)
        return sae.eval()

    def tokens(self, n_sequences: int, seq_len: int | None = None, split: str = "val", seed: int | None = None
               ) -> Int[Tensor, "batch pos"]:  # fmt: skip
        """``n_sequences`` blocks of stdlib text (the demo's own held-out blocks by default), cached.

        Args:
            n_sequences: Blocks.
            seq_len: Tokens per block (default: the demo's).
            split: ``"val"`` (held out from the SAEs' training) or ``"train"``.
            seed: Seed of the draw (default: the demo's, so the first blocks are the demo's own).
        """
        from writesae.tokens import token_blocks

        key = (split, n_sequences, seq_len or self.demo_sizes["seq_len"], self.seed if seed is None else seed)
        if key not in self._blocks:
            blocks = token_blocks(self.model, "stdlib", split=split, n_sequences=key[1], seq_len=key[2], seed=key[3])
            self._blocks[key] = blocks.to(self.device)
        return self._blocks[key]
