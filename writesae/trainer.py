"""Training loop for WriteSAE, with the paper's recipe (App. D, Table 8) as defaults.

Why not SAELens' ``SAETrainer``: its data provider yields dense ``[B, d_in]`` tensors (writes in factor
form, the cheap input, cannot pass through); it has no dead-atom resampling, no decoder
re-normalisation and no validation/best checkpoint; it always clips gradients at norm 1 (the paper does
not clip); and its checkpoints pickle the optimizer (``torch.save``), where ours are safetensors + JSON.
What we keep from SAELens: the SAE classes themselves (``WriteTrainingSAE`` is a ``TrainingSAE`` whose
``training_forward_pass`` also runs under ``SAETrainer`` on dense batches), its file format, and its
dead-latent AuxK scheme.

Recipe (defaults): Adam (0.9, 0.999), lr 3e-4 with a linear warm-up of 50 steps then cosine decay to
3e-5 at the last step; batch 256; 20 epochs or a sample budget; AuxK on atoms silent for 100 steps
(``k_aux`` and its weight live on the SAE config); every 250 steps resample atoms silent for 100 steps;
every 100 steps re-normalise decoder factors. JumpReLU and gated SAEs add their sparsity penalty
(`writesae.training_sae.SparsityLoss`, settings here: ``jumprelu_*``, ``gated_*``, ``gate*``).
Validation (MSE, normalised MSE, explained variance, L0, fraction of atoms never active on the
validation set) after every epoch, or every ``val_every`` steps; the best SAE by validation MSE is kept.

Files in ``out_dir``: ``train_log.jsonl`` (one JSON object per logged step or validation),
``checkpoint/`` (resumable: the SAE's ``cfg.json`` + ``sae_weights.safetensors``, plus
``trainer_state.safetensors`` with Adam moments, dead counters, the trainer's RNG and the best
weights so far, and ``trainer_state.json``; its ``cfg.json`` names the architecture
``write_sae_training_checkpoint``, so it is never loaded as an SAE by mistake), ``best/`` and
``final/`` (inference SAEs, loadable with ``sae_lens.SAE.load_from_disk``). Every directory is
written atomically. A fresh ``fit()`` refuses an ``out_dir`` that holds an earlier run (logs of
two runs never mix); ``fit(resume_from=...)`` continues it.

Bad data and bad states stop training with their cause: a sample holding NaN or inf (naming the
batch and row; a store names its shard), a loss or weights turning non-finite (naming the step and
a lower learning rate; no non-finite weight is ever written), an empty source, or data whose
samples are all equal. Training runs with gradients on whatever the caller's grad mode.

Data-parallel: given a ``world`` of several ranks (processes started by ``torchrun``), every rank
trains the same SAE on its share of every batch, ending where one process with the same global batch
would, up to float rounding (`writesae.data_parallel`); only rank 0 writes files.

The step never waits for the device (a GPU stays busy): metrics stay on the device and are read one
step later, when logged; divergence is noted on the device and raised at the next log line or
checkpoint, before anything non-finite is saved; the AuxK size comes from a bound on the dead atoms
known on the host (`writesae.dead_atoms`).

Determinism: the trainer draws random numbers only from its own generator (seeded by ``seed``, saved in
checkpoints), never from torch's global one, and the data order is a function of the epoch (see
``writesae.data``). Resuming from a checkpoint therefore reproduces the uninterrupted run's weights
exactly on CPU with the same configuration.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from hooked_recurrent.files import atomic_write_text

from writesae.data import Batch, WriteSource, as_source, batch_rows, slice_batch
from writesae.data_parallel import DataParallel
from writesae.dead_atoms import DeadAtomBound
from writesae.distributed import World, on_main, rank_range
from writesae.io import (
    CHECKPOINT_ARCHITECTURE,
    CheckpointError,
    check_sae_dir,
    check_state_dict,
    load_tensors,
    save_sae_files,
    write_atomic_dir,
    write_sae_files,
)
from writesae.outputs import OutputExistsError
from writesae.resample import resample_dead_atoms
from writesae.sae import to_raw_units
from writesae.training_sae import DEFAULT_SPARSITY_COEFFICIENT, GATES, Gate, LossOutput, SparsityLoss, WriteTrainingSAE

TRAINER_STATE_JSON = "trainer_state.json"
TRAINER_STATE_TENSORS = "trainer_state.safetensors"
LOG_FILENAME = "train_log.jsonl"
# Trainer fields that fix the data order and the random draws; a resume must keep them.
_RESUME_INVARIANTS = ("batch_size", "seed", "input_scaling")
_CHECKPOINT_FORMAT = 2  # 2: the best weights travel in the checkpoint
_NEVER = 2**62  # "no divergence yet", as a step number


class TrainingError(RuntimeError):
    """Training cannot go on: the run diverged, or the data cannot be trained on."""


@dataclass
class TrainerConfig:
    """Hyper-parameters of ``WriteSAETrainer`` (defaults: the paper's main text / Table 8).

    Attributes:
        batch_size: Samples per step.
        epochs: Passes over the training source (needs ``source.num_samples``).
        max_samples: Sample budget; when set it replaces ``epochs``.
        seed: Seeds the trainer's generator (resampling draws). Data order is the source's.
        lr: Peak learning rate.
        lr_min: Learning rate at the last step (cosine floor).
        warmup_steps: Linear warm-up steps.
        adam_betas: Adam betas.
        adam_eps: Adam epsilon.
        grad_clip: Max gradient norm, or ``None`` (paper: no clipping).
        dead_steps: An atom is dead after this many consecutive steps without firing.
        resample_every: Resample dead atoms every this many steps (``None``: never).
        resample_from: ``"input"`` (reference code) or ``"residual"``; see ``writesae.resample``.
        resample_encoder_scale: Encoder scale of resampled atoms relative to alive ones.
        renorm_every: Re-normalise decoder factors every this many steps (1: every step; ``None``: never).
        val_every: Validate every this many steps; ``None``: after every epoch (and at the end).
        val_batch_size: Validation batch size (default: ``batch_size``).
        checkpoint_every: Save ``checkpoint/`` every this many steps; ``None``: at every validation.
        out_dir: Where files go; ``None`` keeps everything in memory.
        log_every: Write a train-log line every this many steps.
        progress: Show a tqdm progress bar.
        estimate_input_mean: For ``input_mean="fixed"`` SAEs, set ``input_mean`` to the training
            mean before the first step (paper §2.1's ``M``).
        mean_samples: Samples used for that estimate and for ``input_scaling`` (``None``: one full pass).
        input_scaling: ``"none"`` (the paper: train on the raw data) or ``"unit_mean_square"``: train on
            the data times ``c = 1 / sqrt(mean ||S||_F^2)`` and fold ``c`` back into the biases at the
            end (``WriteSAE.fold_activation_norm_scaling_factor``), so the saved SAE acts on raw data
            and its codes are in raw units. Use it when the data are far from unit scale (Mamba-2
            writes are ~1e-2): Adam moves biases by about ``lr`` per step whatever the data's scale,
            so on tiny data the biases, not the data, pick the TopK atoms and most atoms die.
        jumprelu_coefficient: ``sparsity="jumprelu"``: lambda on the L0 (paper main text: 1e-5; the
            reference code: 1e-3). Like the loss's MSE (a per-entry mean), in the units training sees.
        jumprelu_bandwidth: The rectangle kernel's bandwidth ``h`` at the first step (paper: 1e-3), in
            the units training sees (raw data, or the data scaled by ``input_scaling``).
        jumprelu_bandwidth_final: ``h`` at the last step, reached by cosine annealing (paper: 1e-5;
            equal to ``jumprelu_bandwidth`` for a constant bandwidth, the reference code's default).
        gated_coefficient: ``sparsity="gated"``: lambda on ``sum_i ReLU(pi_gate_i)`` (the paper gives
            none; the reference code's class default 1e-3, its CLI's 1.0).
        gated_aux_coefficient: Weight of the gated SAE's frozen-decoder reconstruction loss (1, as
            Rajamanoharan et al. and the reference code).
        gate: The gate a gated SAE trains with: ``"hard"`` (``1[pi_gate > 0]``, the standard Gated SAE:
            penalty and auxiliary loss on ``ReLU(pi_gate)``) or ``"soft_sigmoid"`` (the reference code's
            ``sigmoid(pi_gate / gate_temperature)``, in the code, the penalty and the auxiliary loss).
            Codes outside training always use the hard gate.
        gate_temperature: ``tau`` of the soft gate (reference code: 0.1), in the units training sees.
    """

    batch_size: int = 256
    epochs: int | None = 20
    max_samples: int | None = None
    seed: int = 42
    lr: float = 3e-4
    lr_min: float = 3e-5
    warmup_steps: int = 50
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    grad_clip: float | None = None
    dead_steps: int = 100
    resample_every: int | None = 250
    resample_from: Literal["input", "residual"] = "input"
    resample_encoder_scale: float = 0.2
    renorm_every: int | None = 100
    val_every: int | None = None
    val_batch_size: int | None = None
    checkpoint_every: int | None = None
    out_dir: str | Path | None = None
    log_every: int = 1
    progress: bool = True
    estimate_input_mean: bool = True
    mean_samples: int | None = None
    input_scaling: Literal["none", "unit_mean_square"] = "none"
    jumprelu_coefficient: float = DEFAULT_SPARSITY_COEFFICIENT["jumprelu"]
    jumprelu_bandwidth: float = 1e-3
    jumprelu_bandwidth_final: float = 1e-5
    gated_coefficient: float = DEFAULT_SPARSITY_COEFFICIENT["gated"]
    gated_aux_coefficient: float = 1.0
    gate: Gate = "hard"
    gate_temperature: float = 0.1

    def __post_init__(self) -> None:
        positive = ("batch_size", "epochs", "max_samples", "dead_steps", "resample_every",
                    "renorm_every", "val_every", "val_batch_size", "checkpoint_every", "log_every",
                    "mean_samples")  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"TrainerConfig.{name} must be >= 1 or None (got {value}).")
        if self.resample_from not in ("input", "residual"):
            raise ValueError(
                f"TrainerConfig.resample_from must be 'input' or 'residual' (got {self.resample_from!r})."
            )
        if self.input_scaling not in ("none", "unit_mean_square"):
            raise ValueError(
                f"TrainerConfig.input_scaling must be 'none' or 'unit_mean_square' (got {self.input_scaling!r})."
            )
        if not (math.isfinite(self.lr) and 0 < self.lr_min <= self.lr):
            raise ValueError(f"need 0 < lr_min <= lr (got lr={self.lr}, lr_min={self.lr_min}).")
        if self.warmup_steps < 0:
            raise ValueError(f"TrainerConfig.warmup_steps must be >= 0 (got {self.warmup_steps}).")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"TrainerConfig.adam_betas must be two numbers in [0, 1) (got {self.adam_betas}).")
        if not self.adam_eps > 0:
            raise ValueError(f"TrainerConfig.adam_eps must be > 0 (got {self.adam_eps}).")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"TrainerConfig.grad_clip must be > 0, or None for no clipping (got {self.grad_clip}).")
        if not self.resample_encoder_scale >= 0:
            raise ValueError(f"TrainerConfig.resample_encoder_scale must be >= 0 (got {self.resample_encoder_scale}).")
        for name in ("jumprelu_coefficient", "gated_coefficient", "gated_aux_coefficient"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"TrainerConfig.{name} must be a number >= 0 (got {value}); 0 turns that term off.")
        for name in ("jumprelu_bandwidth", "jumprelu_bandwidth_final", "gate_temperature"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(
                    f"TrainerConfig.{name} must be a number > 0 (got {value}), in the units training sees; "
                    "the paper's bandwidth goes from 1e-3 to 1e-5, its soft gate's temperature is 0.1."
                )
        if self.gate not in GATES:
            raise ValueError(
                f"TrainerConfig.gate must be one of {GATES} (got {self.gate!r}): 'hard' is the standard Gated SAE, "
                "'soft_sigmoid' the reference code's sigmoid(pi_gate / gate_temperature)."
            )


def check_finite_batch(batch: Batch, where: str) -> None:
    """Refuse a batch holding NaN or inf, naming ``where`` and the row.

    Raises:
        ValueError: naming the batch, the row and the fix.
    """
    for name, tensor in (("keys", batch[0]), ("values", batch[1])) if isinstance(batch, tuple) else (("states", batch),):
        finite = torch.isfinite(tensor).reshape(tensor.shape[0], -1).all(1)
        if not bool(finite.all()):
            row = int((~finite).nonzero()[0])
            raise ValueError(
                f"{where}: row {row} of the {name} holds NaN or inf; remove such samples from the training data "
                "(a store refuses them at collect time)."
            )


def _varies(batch: Batch) -> bool:
    """Whether a batch holds two different samples."""
    parts = batch if isinstance(batch, tuple) else (batch,)
    return any(bool((t != t[:1]).any()) for t in parts)


def _constant_data_error() -> TrainingError:
    return TrainingError(
        "every training sample is the same (zero variance): there is nothing to learn. Was the store "
        "collected from a dead head, or into a dtype that rounds the values away?"
    )


def cosine_anneal(start: float, end: float, progress: float) -> float:
    """``start`` at ``progress = 0`` to ``end`` at ``progress = 1``, along half a cosine."""
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * progress))


def learning_rate(step: int, total_steps: int, cfg: TrainerConfig) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to ``lr_min`` at the last step."""
    if step < cfg.warmup_steps:  # warmup_steps == 0 skips warm-up
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, total_steps - cfg.warmup_steps - 1)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cosine_anneal(cfg.lr, cfg.lr_min, progress)


def jumprelu_bandwidth(step: int, total_steps: int, cfg: TrainerConfig) -> float:
    """JumpReLU's kernel bandwidth: cosine from ``jumprelu_bandwidth`` at the first step to
    ``jumprelu_bandwidth_final`` at the last (the paper anneals 1e-3 -> 1e-5; it does not say over
    which steps, so over all of them)."""
    progress = min(1.0, step / max(1, total_steps - 1))
    return cosine_anneal(cfg.jumprelu_bandwidth, cfg.jumprelu_bandwidth_final, progress)


def sparsity_loss(sparsity: str, step: int, total_steps: int, cfg: TrainerConfig) -> SparsityLoss | None:
    """The penalty settings of step ``step`` for an SAE of this sparsity (``None`` for TopK, BatchTopK)."""
    if sparsity == "jumprelu":
        return SparsityLoss(cfg.jumprelu_coefficient, bandwidth=jumprelu_bandwidth(step, total_steps, cfg))
    if sparsity == "gated":
        return SparsityLoss(cfg.gated_coefficient, gate=cfg.gate, temperature=cfg.gate_temperature,
                            aux_coefficient=cfg.gated_aux_coefficient)  # fmt: skip
    return None


class _Totals:
    """Running sums for metrics over many batches, kept on the SAE's device: adding a batch never
    waits for the device; `metrics` does, once."""

    def __init__(self, sae: WriteTrainingSAE, input_scale: float = 1.0):
        cfg, device = sae.cfg, sae.device
        self.input_scale = input_scale  # MSE is reported in the raw data's units
        self.d_in = cfg.d_in
        # samples, squared error, squared norm, active codes, loss * samples, AuxK loss * samples
        self.sums = torch.zeros(6, dtype=torch.float64, device=device)
        self.input_sum = torch.zeros(cfg.d_k, cfg.d_v, dtype=torch.float64, device=device)
        self.fired = torch.zeros(cfg.d_sae, dtype=torch.bool, device=device)

    def add(self, out: LossOutput, rows: int | None = None) -> None:
        """Add a loss evaluation (its first ``rows`` samples; the rest pad an empty share)."""
        n = out.sq_err.shape[0] if rows is None else rows
        active = out.code.dense[:n] != 0
        parts = (active.new_tensor(n, dtype=torch.float64), out.sq_err[:n].double().sum(), out.sq_norm[:n].double().sum(),
                 active.sum().double(), out.loss.detach().double() * n, out.aux.detach().double() * n)  # fmt: skip
        self.sums += torch.stack(parts)
        if n:
            self.input_sum += out.input_sum.double()
        self.fired |= active.any(0)

    def reduce(self, parallel: DataParallel) -> _Totals:
        """Sum over the ranks that share the batches (in place)."""
        parallel.sum(self.sums)
        parallel.sum(self.input_sum)
        self.fired = parallel.any(self.fired)
        return self

    def metrics(self) -> dict[str, torch.Tensor]:
        """The metrics as 0-d tensors on the device (read them with ``float``, or `as_floats`)."""
        n, sq_err, sq_norm, l0, loss, aux = self.sums.unbind()
        n = n.clamp(min=1)
        centred = sq_norm - self.input_sum.pow(2).sum() / n
        return {
            "loss": loss / n,
            "aux": aux / n,
            "mse": sq_err / (n * self.d_in) / self.input_scale**2,
            "nmse": sq_err / sq_norm.clamp(min=1e-30),
            "explained_variance": 1.0 - sq_err / centred.clamp(min=1e-30),
            "l0": l0 / n,
        }


def as_floats(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` with its tensors read as Python numbers (one wait for the device)."""
    tensors = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    values = torch.stack([metrics[k].double() for k in tensors]).tolist() if tensors else []
    return {**metrics, **dict(zip(tensors, values))}


class WriteSAETrainer:
    """Train a ``WriteTrainingSAE`` on a ``WriteSource`` (dense states or factor-form writes).

    Args:
        sae: The SAE to train (initialise it yourself, e.g. under ``torch.manual_seed``).
        train: Training data (anything ``writesae.data.as_source`` accepts).
        cfg: Hyper-parameters.
        val: Validation data, or ``None`` (no validation, no best checkpoint).
        world: The ranks that train this SAE together, each on its share of every batch
            (`writesae.data_parallel`); default ``World()``, one process. Pass
            ``World.from_env()`` inside `writesae.distributed.process_group` under ``torchrun``.
            Only rank 0 writes files.
    """

    def __init__(
        self,
        sae: WriteTrainingSAE,
        train: WriteSource | Any,
        cfg: TrainerConfig | None = None,
        val: WriteSource | Any | None = None,
        world: World | None = None,
    ):
        self.sae = sae
        self.cfg = cfg or TrainerConfig()
        self.train_source = as_source(train)
        self.val_source = as_source(val) if val is not None else None
        self.out_dir = Path(self.cfg.out_dir) if self.cfg.out_dir else None
        self.world = world or World()
        self.parallel = DataParallel(self.world, sae)
        if self.world.distributed and sae.cfg.sparsity == "batchtopk":
            warnings.warn(
                f"BatchTopK under data-parallel training selects k * rows codes within each of the "
                f"{self.world.world_size} ranks' shares of a batch, not over the whole batch; the result differs "
                "from one process's (see writesae.data_parallel). TopK is unaffected.",
                stacklevel=2,
            )
        self._param_names = [name for name, _ in sae.named_parameters()]
        self.optimizer = torch.optim.Adam(
            [p for _, p in sae.named_parameters()],
            lr=self.cfg.lr,
            betas=self.cfg.adam_betas,
            eps=self.cfg.adam_eps,
        )
        self.generator = torch.Generator().manual_seed(self.cfg.seed)
        self.steps_since_active = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=sae.device)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.samples_seen = 0
        self.best_val_mse = math.inf
        self.best_state_dict: dict[str, torch.Tensor] | None = None
        self.best_val: dict[str, float] | None = None  # the best validation's metrics (and its step)
        # Training sees ``input_scale * data`` (see TrainerConfig.input_scaling); 1.0 means raw data.
        self.input_scale = 1.0
        self.last_val: dict[str, float] | None = None
        self.total_steps = self._total_steps()
        # Divergence is noted on the device (the first bad step, its epoch, what went bad) and read
        # when a step is logged or a checkpoint saved, so that no step waits for the device to answer.
        self._first_bad = torch.full((3,), _NEVER, dtype=torch.long, device=sae.device)
        self._unlogged: dict[str, Any] | None = None  # the last logged step's metrics, read one step later
        self._dead_bound = DeadAtomBound(self.cfg.dead_steps, sae.cfg.d_sae)
        self._bar: Any = None

    # ------------------------------------------------------------------ schedule

    def _total_steps(self) -> int:
        cfg = self.cfg
        if cfg.max_samples is not None:
            return math.ceil(cfg.max_samples / cfg.batch_size)
        n = self.train_source.num_samples
        if n == 0:
            raise TrainingError("the training source holds no sample; collect data first (a store: writesae collect).")
        if cfg.epochs is None or n is None:
            raise ValueError(
                "cannot tell how long to train: set TrainerConfig.max_samples, or TrainerConfig.epochs "
                "with a source whose num_samples is known."
            )
        return cfg.epochs * math.ceil(n / cfg.batch_size)

    @property
    def dead_mask(self) -> torch.Tensor:
        """Atoms silent for at least ``dead_steps`` steps."""
        return self.steps_since_active >= self.cfg.dead_steps

    # ------------------------------------------------------------------ one step

    def _to_device(self, batch: Batch) -> Batch:
        dev, dt, c = self.sae.device, self.sae.dtype, self.input_scale
        if isinstance(batch, tuple):  # a write k u^T scales with its key factor
            keys = batch[0].to(dev, dt, non_blocking=True)
            return (keys * c if c != 1.0 else keys), batch[1].to(dev, dt, non_blocking=True)
        batch = batch.to(dev, dt, non_blocking=True)
        return batch * c if c != 1.0 else batch

    def _global_rows(self, n_rank: int) -> int:
        """Samples in the global batch this rank holds ``n_rank`` of (from the schedule: no collective)."""
        if not self.world.distributed:
            return n_rank
        n = self.train_source.num_samples
        full = self.cfg.batch_size if n is None else min(self.cfg.batch_size, n - self.batch_in_epoch * self.cfg.batch_size)
        begin, end = rank_range(full, self.world.rank, self.world.world_size)
        if n_rank != end - begin:
            raise TrainingError(
                f"rank {self.world.rank} got {n_rank} samples of batch {self.batch_in_epoch}, expected {end - begin} of "
                f"{full}; the training source must yield batches of batch_size samples (the last may be smaller)"
            )
        return full

    def _stand_in(self, empty: Batch) -> Batch:
        """One zero sample shaped like ``empty``'s, for a rank whose share of a short last batch is
        empty: it still takes part in the gradient average, with weight 0."""
        dev, dt = self.sae.device, self.sae.dtype
        if isinstance(empty, tuple):
            return tuple(torch.zeros(1, *t.shape[1:], device=dev, dtype=dt) for t in empty)  # type: ignore[return-value]
        return torch.zeros(1, *empty.shape[1:], device=dev, dtype=dt)

    @torch.enable_grad()  # whatever the caller's grad mode (TransformerLens code often turns it off)
    def train_step(self, batch: Batch) -> dict[str, Any]:
        """One optimisation step (plus dead tracking, re-normalisation and resampling when due).

        Nothing here waits for the device: the returned metrics (``loss``, ``mse``, ...) are
        0-d tensors on the SAE's device until read, and divergence is noted on the device and
        raised when the step is logged (`WriteSAETrainer.fit`) or a checkpoint saved. Under
        data-parallel training ``batch`` is this rank's share of the global batch.

        Raises:
            ValueError: the batch holds NaN or inf (checked where the batch is, before the copy).
        """
        cfg, sae = self.cfg, self.sae
        sae.train()
        check_finite_batch(batch, f"training batch {self.batch_in_epoch} of epoch {self.epoch}")
        n_rank = batch_rows(batch)
        n_batch = self._global_rows(n_rank)
        batch = self._to_device(batch) if n_rank else self._stand_in(batch)
        lr = learning_rate(self.step, self.total_steps, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # AuxK's size from a bound known on the host (no wait for the device); 0 skips AuxK.
        slots = self._dead_bound.slots(self.steps_since_active, self.step)
        penalty = sparsity_loss(sae.cfg.sparsity, self.step, self.total_steps, cfg)
        out = self.parallel.loss(batch, self.dead_mask if slots else None, slots, penalty)
        self.optimizer.zero_grad(set_to_none=True)
        weight = self.parallel.loss_weight(n_rank, n_batch)
        (out.loss * weight if weight != 1.0 else out.loss).backward()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self._note_divergence(out.loss)

        with torch.no_grad():
            fired = self.parallel.any((out.code.dense[:n_rank] != 0).any(0))
            self.steps_since_active += 1
            self.steps_since_active.masked_fill_(fired, 0)
            sae.update_topk_threshold(out.code.dense[:n_rank], reduce_min=self.parallel.min)
        self.step += 1
        self.samples_seen += n_batch
        if cfg.renorm_every and self.step % cfg.renorm_every == 0:
            sae.normalize_decoder()
        n_resampled = 0
        if cfg.resample_every and self.step % cfg.resample_every == 0:
            dead = self.dead_mask
            whole, sq_err = self.parallel.gather(slice_batch(batch, 0, n_rank), out.sq_err[:n_rank])
            n_resampled = resample_dead_atoms(
                sae, self.optimizer, dead, whole, sq_err, self.generator, cfg.resample_from, cfg.resample_encoder_scale,
            )  # fmt: skip
            self.steps_since_active[dead] = 0

        totals = _Totals(sae, self.input_scale)
        totals.add(out, n_rank)
        if self.world.distributed and self.step % cfg.log_every == 0:  # the same steps on every rank
            totals.reduce(self.parallel)
        return {
            "step": self.step,
            "epoch": self.epoch,
            "samples": self.samples_seen,
            "lr": lr,
            **totals.metrics(),
            "dead_fraction": self.dead_mask.float().mean(),
            "resampled": n_resampled,
        }

    def _note_divergence(self, loss: torch.Tensor) -> None:
        """Record on the device the first step whose loss (code 0) or weights (code 1) are not finite."""
        weights_ok = torch.stack([p.isfinite().all() for p in self.sae.parameters()]).all()
        what = torch.where(loss.isfinite(), 1, 0)
        noted = torch.stack([torch.full_like(what, self.step), torch.full_like(what, self.epoch), what])
        first = (self._first_bad[0] == _NEVER) & ~(loss.isfinite() & weights_ok)
        self._first_bad.copy_(torch.where(first, noted, self._first_bad))

    def _raise_if_diverged(self) -> None:
        """Raise the divergence noted on the device (on every rank alike); a host sync, done when logging."""
        step, epoch, what = (int(v) for v in self.parallel.min(self._first_bad.clone()).cpu())
        if step != _NEVER:
            lr = learning_rate(step, self.total_steps, self.cfg)
            what = "the loss became non-finite" if what == 0 else "the weights became non-finite"
            raise self._diverged(what, lr, step, epoch)

    def _diverged(self, what: str, lr: float, step: int, epoch: int) -> TrainingError:
        kept = f" The last finite checkpoint stays in {self.out_dir / 'checkpoint'}." if self.out_dir else ""
        return TrainingError(
            f"training diverged at step {step + 1} (epoch {epoch}): {what} at learning rate {lr:.3g}. "
            f"Train again with a lower learning rate, e.g. lr={self.cfg.lr / 10:.3g} (writesae train --lr "
            f"{self.cfg.lr / 10:.3g} --overwrite), or with input_scaling='unit_mean_square' if the data are far "
            f"from unit scale.{kept}"
        )

    # ------------------------------------------------------------------ validation

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Metrics over the whole validation source (BatchTopK uses its inference rule)."""
        if self.val_source is None:
            raise ValueError("no validation source: pass val= to WriteSAETrainer.")
        self.sae.eval()
        totals = _Totals(self.sae, self.input_scale)
        size = self.cfg.val_batch_size or self.cfg.batch_size
        for batch in self.parallel.rows(self.val_source, 0, size):
            if batch_rows(batch):
                totals.add(self.sae.compute_loss(self._to_device(batch)))
        self.sae.train()
        totals.reduce(self.parallel)
        kept = {k: v for k, v in totals.metrics().items() if k not in ("loss", "aux")}
        metrics = {f"val_{k}": v for k, v in as_floats(kept).items()}
        metrics["val_dead_fraction"] = 1.0 - float(totals.fired.float().mean())
        self.last_val = metrics
        return metrics

    # ------------------------------------------------------------------ loop

    def fit(self, resume_from: str | Path | None = None) -> WriteTrainingSAE:
        """Train to the end of the schedule; returns the SAE (final weights).

        Args:
            resume_from: A ``checkpoint/`` directory written by this trainer; training continues
                where it stopped and ends with the weights (and best weights) an uninterrupted
                run would have.

        Raises:
            OutputExistsError: a fresh run into an ``out_dir`` holding an earlier run.
            ValueError: a training sample holds NaN or inf.
            TrainingError: the run diverged, or the data are empty or all equal.
        """
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        else:
            on_main(self._refuse_earlier_run, self.world)
            self._prepare_inputs()
        cfg = self.cfg
        data_varies = self.step > 0  # checked over the first epoch of a fresh run
        with tqdm(total=self.total_steps, initial=self.step, disable=not cfg.progress, desc="WriteSAE") as bar:
            self._bar = bar
            while self.step < self.total_steps:
                n_batches = 0
                for batch in self.parallel.rows(self.train_source, self.epoch, cfg.batch_size, self.batch_in_epoch):
                    n_batches += 1
                    data_varies = data_varies or _varies(batch)
                    metrics = self.train_step(batch)
                    self.batch_in_epoch += 1
                    # The previous step's metrics are read now, while this step runs on the device.
                    self._write_unlogged()
                    if self.step % cfg.log_every == 0:
                        self._unlogged = {"type": "train", **metrics}
                    bar.update(1)
                    if self.step >= self.total_steps:
                        break
                    self._periodic()
                else:
                    if n_batches == 0 and self.batch_in_epoch == 0:
                        raise TrainingError(
                            f"the training source yielded no batches in epoch {self.epoch}; is it empty?"
                        )
                    data_varies = self._on_any_rank(data_varies)
                    if not data_varies:
                        raise _constant_data_error()
                    self.epoch += 1
                    self.batch_in_epoch = 0
                    if cfg.val_every is None and self.step < self.total_steps:
                        self._validate_and_save()
                    continue
                break
            self._write_unlogged()
        if not self._on_any_rank(data_varies):
            raise _constant_data_error()
        self._validate_and_save()
        # From here on the SAE acts on raw data (the last checkpoint keeps the scaled weights and c).
        self.sae.fold_activation_norm_scaling_factor(self.input_scale)
        self.input_scale = 1.0
        if self.out_dir is not None and self.world.is_main:
            self.sae.save_inference_model(self.out_dir / "final")
        return self.sae

    def _on_any_rank(self, flag: bool) -> bool:
        return bool(self.parallel.any(torch.tensor([flag], device=self.sae.device)))

    def _write_unlogged(self) -> None:
        """Log the step held back for logging (its numbers are read here), and raise a divergence
        noted since the last check."""
        record, self._unlogged = self._unlogged, None
        if record is None:
            return
        self._raise_if_diverged()
        record = as_floats(record)
        self._log(record)
        if self._bar is not None:
            self._bar.set_postfix(mse=f"{record['mse']:.3g}", l0=f"{record['l0']:.1f}", dead=f"{record['dead_fraction']:.2f}")

    def _refuse_earlier_run(self) -> None:
        """A fresh run never mixes its log and checkpoints with an earlier run's."""
        if self.out_dir is None:
            return
        earlier = [n for n in (LOG_FILENAME, "checkpoint", "best", "final") if (self.out_dir / n).exists()]
        if earlier:
            raise OutputExistsError(
                f"{self.out_dir} already holds a training run ({', '.join(earlier)}). Continue it with "
                f"fit(resume_from='{self.out_dir / 'checkpoint'}') (writesae train --resume), or choose another "
                "out_dir, or delete it first (writesae train --overwrite)."
            )

    def _periodic(self) -> None:
        cfg = self.cfg
        if cfg.val_every and self.step % cfg.val_every == 0:
            self._validate_and_save()
        elif cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.out_dir:
            self.save_checkpoint(self.out_dir / "checkpoint")

    def _validate_and_save(self) -> None:
        self._write_unlogged()  # the log stays in step order, and a diverged run saves nothing
        self._raise_if_diverged()
        if self.val_source is not None:
            metrics = self.validate()
            self._log({"type": "val", "step": self.step, "epoch": self.epoch, **metrics})
            if metrics["val_mse"] < self.best_val_mse:
                self.best_val_mse = metrics["val_mse"]
                self.best_val = {**metrics, "step": self.step}
                self.best_state_dict = self._raw_state_dict()
                if self.out_dir is not None and self.world.is_main:
                    cfg_dict = self.sae.cfg.get_inference_sae_cfg_dict()
                    cfg_dict["metadata"] = {**cfg_dict["metadata"], **metrics, "step": self.step}
                    save_sae_files(self.out_dir / "best", self.best_state_dict, cfg_dict)
        if self.out_dir is not None and (self.cfg.checkpoint_every is None or self.step >= self.total_steps):
            self.save_checkpoint(self.out_dir / "checkpoint")

    def _raw_state_dict(self) -> dict[str, torch.Tensor]:
        """A copy of the SAE's weights for raw (unscaled) data."""
        state = {k: v.detach().clone() for k, v in self.sae.state_dict().items()}
        to_raw_units(state, self.input_scale)
        return state

    def _prepare_inputs(self) -> None:
        """Set ``input_scale`` and the fixed ``input_mean`` from one pass over the training data
        (or its first ``mean_samples``), as the configuration asks; warn about raw data far from
        unit scale."""
        scale = self.cfg.input_scaling == "unit_mean_square"
        mean = self.sae.cfg.input_mean == "fixed" and self.cfg.estimate_input_mean
        if not scale:
            self._warn_if_far_from_unit_scale()
        if not (scale or mean):
            return
        d_k, d_v, device = self.sae.cfg.d_k, self.sae.cfg.d_v, self.sae.device
        # [squared norms, samples] and the sum of the samples, on the device; ranks add their shares.
        sums, total = torch.zeros(2, dtype=torch.float64, device=device), torch.zeros(d_k, d_v, dtype=torch.float64, device=device)
        seen = 0  # global batches' samples so far, counted alike on every rank (for mean_samples)
        for batch in self.parallel.rows(self.train_source, 0, self.cfg.batch_size):
            if isinstance(batch, tuple):  # writes k u^T: ||k u^T||_F = ||k|| ||u||
                keys, values = (t.to(device, torch.float64, non_blocking=True) for t in batch)
                sums += torch.stack([(keys.norm(dim=-1) * values.norm(dim=-1)).pow(2).sum(), sums.new_tensor(len(keys))])
                if mean:
                    total += keys.T @ values
            else:
                states = batch.to(device, torch.float64, non_blocking=True).reshape(-1, d_k, d_v)
                sums += torch.stack([states.pow(2).sum(), sums.new_tensor(len(states))])
                if mean:
                    total += states.sum(0)
            seen += self.cfg.batch_size
            if self.cfg.mean_samples is not None and seen >= self.cfg.mean_samples:
                break
        sq_norms, n = (float(v) for v in self.parallel.sum(sums).cpu())
        total = self.parallel.sum(total)
        if scale:
            if n == 0 or not sq_norms > 0:
                raise ValueError("input_scaling='unit_mean_square' needs training data that are not all zero.")
            self.input_scale = (sq_norms / n) ** -0.5
        if mean:
            with torch.no_grad():  # in the units training sees
                self.sae.input_mean.copy_(total / max(n, 1) * self.input_scale)

    def _warn_if_far_from_unit_scale(self) -> None:
        first = next(iter(self.train_source.batches(0, self.cfg.batch_size)), None)
        if first is None:
            return
        if isinstance(first, tuple):
            mean_square = float((first[0].double().norm(dim=-1) * first[1].double().norm(dim=-1)).pow(2).mean())
        else:
            mean_square = float(first.double().pow(2).sum()) / first.shape[0]  # [B, d_in] or [B, d_k, d_v]
        if not 1e-2 <= mean_square <= 1e2:
            warnings.warn(
                f"the training samples have mean squared Frobenius norm {mean_square:.2g}, far from 1: "
                "with raw data most atoms may die; consider TrainerConfig(input_scaling='unit_mean_square').",
                stacklevel=4,
            )

    # ------------------------------------------------------------------ log

    def _log(self, record: dict[str, Any]) -> None:
        if self.out_dir is None or not self.world.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / LOG_FILENAME, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _truncate_log(self) -> None:
        """Drop log lines past the resumed step (the interrupted run wrote them; they will be redone)."""
        if self.out_dir is None or not self.world.is_main or not (self.out_dir / LOG_FILENAME).exists():
            return
        path = self.out_dir / LOG_FILENAME
        kept = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line torn by the interruption
                break
            if record["step"] <= self.step:
                kept.append(line)
        atomic_write_text(path, "".join(line + "\n" for line in kept))

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, path: str | Path) -> Path:
        """Atomically write a resumable checkpoint (safetensors + JSON, no pickles); only rank 0
        writes (the ranks' states are equal). A run that diverged raises instead."""
        self._write_unlogged()
        self._raise_if_diverged()
        if not self.world.is_main:
            return Path(path)
        tensors: dict[str, torch.Tensor] = {
            "trainer.steps_since_active": self.steps_since_active.cpu(),
            "trainer.generator": self.generator.get_state(),
        }
        for name, param in zip(self._param_names, self.optimizer.param_groups[0]["params"]):
            for key, value in self.optimizer.state.get(param, {}).items():
                tensors[f"optimizer.{name}.{key}"] = value.detach().cpu().contiguous()
        for name, value in (self.best_state_dict or {}).items():
            tensors[f"best.{name}"] = value.detach().cpu().contiguous()
        state = {
            "format": _CHECKPOINT_FORMAT,
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "samples_seen": self.samples_seen,
            "best_val_mse": self.best_val_mse if math.isfinite(self.best_val_mse) else None,
            "best_val": self.best_val,
            "input_scale": self.input_scale,
            "total_steps": self.total_steps,
            "trainer_config": asdict(self.cfg),
            "sae_config": self.sae.cfg.to_dict(),
        }

        cfg_dict = {**self.sae.cfg.get_inference_sae_cfg_dict(), "architecture": CHECKPOINT_ARCHITECTURE}

        def write(d: Path) -> None:
            write_sae_files(d, self.sae.state_dict(), cfg_dict)
            save_file(tensors, d / TRAINER_STATE_TENSORS)
            (d / TRAINER_STATE_JSON).write_text(json.dumps(state, indent=2, default=str))

        return write_atomic_dir(path, write)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore SAE weights, Adam state, counters, RNG and data position from ``path``."""
        path = Path(path)
        check_sae_dir(path, checkpoint=True)
        state_path = path / TRAINER_STATE_JSON
        try:
            state = json.loads(state_path.read_text())
        except (OSError, ValueError):
            raise CheckpointError(
                f"{state_path}: missing or not valid JSON; {path} is not a resumable checkpoint "
                "(resume from OUT_DIR/checkpoint, not best/ or final/)."
            ) from None
        if state.get("format") != _CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"{state_path}: checkpoint format {state.get('format')}, this version reads format "
                f"{_CHECKPOINT_FORMAT}; start the training again."
            )
        for field in _RESUME_INVARIANTS:
            saved = state["trainer_config"].get(field, getattr(TrainerConfig, field))
            if saved != getattr(self.cfg, field):
                raise CheckpointError(
                    f"{state_path}: the checkpoint was trained with {field}={saved}, this trainer has "
                    f"{getattr(self.cfg, field)}; resume with the same {field}."
                )
        weights = load_tensors(path / "sae_weights.safetensors", device=str(self.sae.device))
        check_state_dict(weights, self.sae.expected_shapes())
        self.sae.load_state_dict(weights)
        tensors = load_tensors(path / TRAINER_STATE_TENSORS)
        opt_state = self.optimizer.state_dict()
        opt_state["state"] = {}
        for index, name in enumerate(self._param_names):
            prefix = f"optimizer.{name}."
            entry = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if entry:
                opt_state["state"][index] = entry
        self.optimizer.load_state_dict(opt_state)
        self.steps_since_active = tensors["trainer.steps_since_active"].to(self.sae.device)
        self.generator.set_state(tensors["trainer.generator"])
        self.step = state["step"]
        self.epoch = state["epoch"]
        self.batch_in_epoch = state["batch_in_epoch"]
        self.samples_seen = state["samples_seen"]
        self.input_scale = float(state.get("input_scale", 1.0))
        best = state["best_val_mse"]
        self.best_val_mse = math.inf if best is None else best
        best_weights = {k[len("best."):]: v.to(self.sae.device) for k, v in tensors.items() if k.startswith("best.")}
        self.best_state_dict = best_weights or None
        self.best_val = state.get("best_val")
        self._truncate_log()
