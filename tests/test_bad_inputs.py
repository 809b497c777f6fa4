"""Every case of docs/errors.md: a bad input gets the error the table promises, naming the argument and value.

Each case is ``(id, call, error type, message pattern)``; the ids are the table's first column, and a
test checks that table and cases agree. Cases that need a model use the tiny random presets.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from helpers import char_tokenizer, random_tokens
from hooked_recurrent import HookedRecurrentModel, RecurrentCache
from hooked_recurrent.edits import add_to_states, delete_writes, scale_writes
from hooked_recurrent.fork import fork
from hooked_recurrent.presets import build_preset
from writesae import CheckpointError, TensorSource, TrainerConfig, WriteSAE, WriteSAETrainer
from writesae.cli import main
from writesae.outputs import OutputExistsError, prepare_output_dir
from writesae.protocols.install import InstallConfig
from writesae.protocols.logit_shift import LogitShiftConfig
from writesae.protocols.readers import reader_heads
from writesae.protocols.substitution import SubstitutionConfig
from writesae.store import WriteStore, collect
from writesae.trainer import TrainingError

ERRORS_MD = Path(__file__).resolve().parents[1] / "docs" / "errors.md"

_models: dict[str, HookedRecurrentModel] = {}


def model(arch: str = "qwen3.5") -> HookedRecurrentModel:
    """A tiny random model with a character tokenizer (built once per architecture)."""
    if arch not in _models:
        name = f"tiny-random:{arch}"
        _models[arch] = HookedRecurrentModel(build_preset(name), tokenizer=char_tokenizer(), model_name=name)
    return _models[arch]


def tokens(length: int = 8) -> torch.Tensor:
    return random_tokens(1, length, seed=3)


def write_hook(arch: str = "qwen3.5") -> str:
    return model(arch).cfg.hook_name(model(arch).cfg.recurrent_layers[0], "hook_write")


def cli(*argv: str) -> None:
    main(list(argv))


def run_hooked(hook_fn, arch: str = "qwen3.5") -> None:
    model(arch).run_with_hooks(tokens(), fwd_hooks=[(write_hook(arch), hook_fn)])


def generate_with(hook_fn) -> None:
    with model().hooks(fwd_hooks=[(write_hook(), hook_fn)]):
        model().generate(tokens(4), max_new_tokens=3, verbose=False, do_sample=False)


def fit(data: torch.Tensor, **cfg) -> None:
    from writesae import WriteTrainingSAE
    from writesae.config import WriteTrainingSAEConfig

    sae = WriteTrainingSAE(WriteTrainingSAEConfig.build(d_k=6, d_v=5, d_sae=16, k=2), seed=0)
    config = TrainerConfig(**{"batch_size": 16, "epochs": 1, "warmup_steps": 1, "lr": 1e-2, "progress": False, **cfg})
    WriteSAETrainer(sae, TensorSource(data, shuffle=False), config).fit()


def right_padded_generate() -> None:
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    model().generate(random_tokens(2, 6), attention_mask=mask, max_new_tokens=2, verbose=False)


def stock_sae(hook: str, d_in: int = 64, head: int | None = None, model_name: str | None = None):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(hook_name=hook, hook_head_index=head, model_name=model_name)
    return StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=8, metadata=meta))


def unequal_atom_norms() -> None:
    sae = WriteSAE.from_dict({"architecture": "write_sae", "d_in": 30, "d_sae": 8, "d_k": 6, "d_v": 5, "k": 2})
    with torch.no_grad():
        sae.W_dec_key[0].mul_(3.0)
    sae.fold_W_dec_norm()


def nan_states() -> torch.Tensor:
    data = torch.randn(32, 6, 5)
    data[20, 0, 0] = float("nan")
    return data


def continue_after_bfloat16(tmp: Path) -> None:
    half = HookedRecurrentModel(build_preset("tiny-random:qwen3.5"), model_name="tiny-random:qwen3.5")
    cache = RecurrentCache(half, 1)
    half(tokens(4), cache=cache)
    half.to(torch.bfloat16)
    half(tokens(1), cache=cache)


def collect_into(tmp: Path, **kw) -> None:
    args = dict(layers=[0], heads=[0], out_dir=tmp / "store", verbose=False)
    collect(model(), random_tokens(4, 12), **{**args, **kw})


def file_model(tmp: Path) -> None:
    (tmp / "model.safetensors").write_bytes(b"not a model")
    HookedRecurrentModel.from_pretrained(str(tmp / "model.safetensors"))


def existing_output(tmp: Path) -> None:
    (tmp / "run").mkdir()
    (tmp / "run" / "records.jsonl").write_text("{}\n")
    prepare_output_dir(tmp / "run")


def existing_store(tmp: Path) -> None:
    collect_into(tmp)
    collect_into(tmp)


E, V, K, T, S = (OSError, ValueError, KeyError, TypeError, SystemExit)

# (id, call taking a temporary folder, error type, pattern the message must match)
CASES = [
    # model inputs
    ("empty-prompt", lambda tmp: model()("", prepend_bos=False), V, r"shape \(1, 0\).*at least one"),
    ("zero-length-tokens", lambda tmp: model()(torch.zeros(1, 0, dtype=torch.long)), V, r"shape \(1, 0\)"),
    ("token-id-too-large", lambda tmp: model()(torch.tensor([[5, 256]])), V, r"token id 256 at \[batch, pos\] = \[0, 1\].*0\.\.255"),
    ("token-id-negative", lambda tmp: model()(torch.tensor([[-1, 5]])), V, r"token id -1 .*0\.\.255"),
    ("float-tokens", lambda tmp: model()(torch.zeros(1, 4)), T, r"token tensors must be integer|Type-check error"),
    ("mask-shape", lambda tmp: model()(tokens(), attention_mask=torch.ones(1, 3, dtype=torch.long)), (V, T), r"Type-check error|attention_mask has shape"),
    ("stop-at-layer-too-large", lambda tmp: model()(tokens(), stop_at_layer=99), V, r"stop_at_layer=99 .* -4\.\.4"),
    ("stop-at-layer-too-small", lambda tmp: model()(tokens(), stop_at_layer=-5), V, r"stop_at_layer=-5"),
    ("one-token-loss", lambda tmp: model()(tokens(1), return_type="loss"), V, r"at least 2 positions.*has 1"),
    ("unknown-hook-name", lambda tmp: model().run_with_hooks(tokens(), fwd_hooks=[("blocks.0.hook_wrte", print)]), K, r"hook_wrte"),
    ("hook-name-negative-layer", lambda tmp: model().cfg.hook_name(-1, "hook_write"), V, r"layer=-1 is not a block of this model: give 0\.\.3"),
    ("cache-empty-batch", lambda tmp: RecurrentCache(model(), 0), V, r"batch_size=0: .*>= 1"),
    ("cache-after-dtype-change", continue_after_bfloat16, V, r"filled by the model in torch\.float32 .* now runs in torch\.bfloat16"),
    ("hook-name-is-a-module", lambda tmp: model().run_with_hooks(tokens(), fwd_hooks=[("blocks.0.ln1", print)]), K, r"'blocks\.0\.ln1' is a module, not a hook point.*blocks\.0\.ln1\.hook_normalized"),
    # splicing SAEs
    ("sae-d-in-mismatch", lambda tmp: model().run_with_saes(tokens(), saes=[stock_sae("blocks.1.hook_resid_pre", d_in=63)]), V, r"d_in=63, but 'blocks\.1\.hook_resid_pre' carries \(1, 8, 64\)"),
    ("sae-head-out-of-range", lambda tmp: model().add_sae(stock_sae("blocks.3.attn.hook_z", 16, head=7)), V, r"head 7 is out of range: blocks\.3\.attn\.hook_z has heads 0\.\.3"),
    ("sae-head-without-head-axis", lambda tmp: model().add_sae(stock_sae("blocks.1.hook_resid_pre", head=0)), V, r"hook_head_index=0, but blocks\.1\.hook_resid_pre carries \[batch pos d_model\], with no head axis"),
    ("sae-other-model", lambda tmp: model().add_sae(stock_sae("blocks.1.hook_resid_pre", model_name="gpt2")), V, r"trained on 'gpt2'.*strict=False"),
    ("sae-unequal-atom-norms-fold", lambda tmp: unequal_atom_norms(), NotImplementedError, r"atoms' norms differ.*normalize_decoder\(\)"),
    # generation
    ("generate-top-p-0", lambda tmp: model().generate(tokens(3), top_p=0.0, verbose=False), V, r"top_p=0.0: .*\(0, 1\]"),
    ("generate-top-k-0", lambda tmp: model().generate(tokens(3), top_k=0, verbose=False), V, r"top_k=0"),
    ("generate-negative-new-tokens", lambda tmp: model().generate(tokens(3), max_new_tokens=-1, verbose=False), V, r"max_new_tokens=-1: .*>= 0"),
    ("generate-negative-temperature", lambda tmp: model().generate(tokens(3), temperature=-1.0, verbose=False), V, r"temperature=-1.0: .*>= 0"),
    ("generate-int-input", lambda tmp: model().generate(5, verbose=False), T, r"input must be a string, a list of strings or a \[batch, pos\] token tensor|Type-check error"),
    ("generate-empty-prompt", lambda tmp: model().generate("", prepend_bos=False, verbose=False), V, r"at least one token"),
    ("generate-right-padding", lambda tmp: right_padded_generate(), V, r"right-padded \(its attention_mask has 0s after real tokens\).*padding_side='left'"),
    # edit helpers
    ("edit-negative-position", lambda tmp: delete_writes([-1]), V, r"position -1 is not an absolute position"),
    ("edit-negative-head", lambda tmp: scale_writes([2], 2.0, heads=[-1]), V, r"head -1"),
    ("edit-head-out-of-range", lambda tmp: run_hooked(delete_writes([2], heads=[9])), V, r"head 9 is out of range at blocks\.0\.linear_attn\.hook_write: it has 4 heads \(0\.\.3\)"),
    ("edit-head-out-of-range-mamba2", lambda tmp: run_hooked(delete_writes([2], heads=[9]), "mamba2"), V, r"head 9 is out of range .*\(0\.\.5\)"),
    ("edit-head-out-of-range-in-generate", lambda tmp: generate_with(scale_writes([5], 2.0, heads=[9])), V, r"head 9 is out of range"),
    ("add-to-states-wrong-shape", lambda tmp: model().run_with_hooks(tokens(), fwd_hooks=[(model().cfg.hook_name(0, "hook_state"), add_to_states(2, torch.zeros(3, 3)))]), V, r"delta has shape \(3, 3\)"),
    # forks
    ("fork-no-conditions", lambda tmp: fork(model(), tokens(), 3, []), V, r"conditions=\[\]: give a non-empty list"),
    ("fork-unnested-condition", lambda tmp: fork(model(), tokens(), 3, [(write_hook(), delete_writes([3]))]), (V, T), r"Type-check error|condition 0 is .*wrap a single pair in a list"),
    ("fork-position-out-of-range", lambda tmp: fork(model(), tokens(), 9, [[]]), V, r"need 0 <= position < until"),
    # loading
    ("from-pretrained-file", file_model, V, r"is a file; from_pretrained takes the model's folder"),
    ("from-pretrained-empty-name", lambda tmp: HookedRecurrentModel.from_pretrained(""), V, r"name_or_path=''"),
    ("from-pretrained-unknown-builtin", lambda tmp: HookedRecurrentModel.from_pretrained("tiny-random:gpt2"), K, r"tiny-random:gpt2.*tiny-random:qwen3\.5"),
    ("from-pretrained-unknown-shipped", lambda tmp: HookedRecurrentModel.from_pretrained("stdlib:gpt2"), V, r"stdlib:gpt2.*stdlib:mamba2"),
    ("from-pretrained-missing-folder", lambda tmp: HookedRecurrentModel.from_pretrained(str(tmp / "absent" / "model")), E, r"absent/model: no such folder"),
    ("from-pretrained-bad-dtype", lambda tmp: HookedRecurrentModel.from_pretrained("tiny-random:qwen3.5", dtype="float33"), V, r"dtype='float33' is not a model dtype; give one of float32"),
    ("from-pretrained-absent-device", lambda tmp: HookedRecurrentModel.from_pretrained("tiny-random:qwen3.5", device="cuda:99"), V, r"device='cuda:99': (no CUDA GPU is visible|this machine has)"),
    ("sae-missing-folder", lambda tmp: WriteSAE.load_from_disk(tmp / "nothing"), CheckpointError, r"not a directory"),
    ("store-missing", lambda tmp: WriteStore(tmp), E, r"not a WriteStore \(no manifest\.json\)"),
    # output folders
    ("output-folder-exists", existing_output, OutputExistsError, r"already holds a run .*--resume.*--overwrite"),
    ("store-folder-exists", existing_store, OutputExistsError, r"already holds a store"),
    ("resume-nothing", lambda tmp: prepare_output_dir(tmp / "none", "resume"), E, r"nothing to resume .*Drop --resume"),
    # collect
    ("collect-int-dtype", lambda tmp: collect_into(tmp, dtype=torch.int8), V, r"dtype=torch\.int8: .*integer dtype would round"),
    ("collect-zero-positions", lambda tmp: collect_into(tmp, positions_per_sequence=0), V, r"positions_per_sequence=0: give a whole number >= 1"),
    ("collect-skip-everything", lambda tmp: collect_into(tmp, skip_first=12), V, r"skip_first=12 skips every position"),
    ("collect-attention-layer", lambda tmp: collect_into(tmp, layers=[3]), V, r"layer 3 is not matrix-recurrent; recurrent layers: \[0, 1, 2\]"),
    ("collect-head-out-of-range", lambda tmp: collect_into(tmp, heads=[4]), V, r"head 4 is out of range.*0\.\.3"),
    ("collect-empty-split", lambda tmp: collect(model(), random_tokens(1, 12), layers=[0], out_dir=tmp / "s", verbose=False), V, r"split would hold no sequence \(1 sequence\(s\), val_fraction=0\.2\)"),
    # training
    ("train-nan-data", lambda tmp: fit(nan_states()), V, r"training batch 1 of epoch 0: row 4 of the states holds NaN"),
    ("train-constant-data", lambda tmp: fit(torch.zeros(32, 6, 5)), TrainingError, r"every training sample is the same"),
    ("train-empty-data", lambda tmp: fit(torch.zeros(0, 6, 5)), TrainingError, r"holds no sample"),
    ("train-diverges", lambda tmp: fit(torch.randn(64, 6, 5), lr=1e9, lr_min=1e9), TrainingError, r"diverged at step \d+ .*lr=1e\+08"),
    ("train-bad-lr", lambda tmp: TrainerConfig(lr=float("nan")), V, r"lr=nan"),
    ("train-bad-batch-size", lambda tmp: TrainerConfig(batch_size=0), V, r"batch_size must be >= 1"),
    ("train-bad-betas", lambda tmp: TrainerConfig(adam_betas=(1.5, 0.9)), V, r"adam_betas must be two numbers in \[0, 1\)"),
    ("train-bad-grad-clip", lambda tmp: TrainerConfig(grad_clip=-1.0), V, r"grad_clip must be > 0, or None"),
    # protocol configs built in Python
    ("config-n-atoms-0", lambda tmp: LogitShiftConfig(n_atoms=0), V, r"LogitShiftConfig\.n_atoms=0: every value must be a finite number > 0"),
    ("config-no-epsilons", lambda tmp: LogitShiftConfig(epsilons=()), V, r"LogitShiftConfig\.epsilons is empty"),
    ("config-unknown-choice", lambda tmp: SubstitutionConfig(scale="norm"), (V, T), r"Type-check error|SubstitutionConfig\.scale='norm' is not one of 'activation', 'matched_norm'"),
    ("config-negative-multiple", lambda tmp: InstallConfig(multiples=(1.5, -3.0)), V, r"InstallConfig\.multiples=\(1\.5, -3\.0\): every value must be a finite number > 0"),
    ("config-nan-threshold", lambda tmp: SubstitutionConfig(register_threshold=float("nan")), V, r"register_threshold=nan: .*>= 0"),
    ("readers-no-attention-layer", lambda tmp: reader_heads(model("mamba2"), 0, ("attention",)), V, r"has no attention layer after layer 0 .*reader_kinds=\('recurrent',\) \(--readers recurrent\)"),
    # the command line (argparse: exit status 2, "argument --NAME: ..." on stderr)
    ("cli-seq-len-0", lambda tmp: cli("collect", "tiny-random:qwen3.5", "--layer", "0", "--seq-len", "0", "--out", "x"), S, r"--seq-len: 0 is not a positive whole number"),
    ("cli-sequences-0", lambda tmp: cli("collect", "tiny-random:qwen3.5", "--layer", "0", "--sequences", "0", "--out", "x"), S, r"--sequences: 0"),
    ("cli-dtype-unknown", lambda tmp: cli("collect", "tiny-random:qwen3.5", "--layer", "0", "--dtype", "float33", "--out", "x"), S, r"--dtype: invalid choice: 'float33'"),
    ("cli-store-dtype-int8", lambda tmp: cli("collect", "tiny-random:qwen3.5", "--layer", "0", "--store-dtype", "int8", "--out", "x"), S, r"--store-dtype: invalid choice: 'int8'"),
    ("cli-positions-0", lambda tmp: cli("collect", "tiny-random:qwen3.5", "--layer", "0", "--positions-per-sequence", "0", "--out", "x"), S, r"--positions-per-sequence: 0"),
    ("cli-negative-layer", lambda tmp: cli("collect", "tiny-random:qwen3.5", "--layer", "-1", "--out", "x"), S, r"--layer: -1 is negative"),
    ("cli-device-unknown", lambda tmp: cli("collect", "tiny-random:qwen3.5", "--layer", "0", "--device", "tpu", "--out", "x"), S, r"--device: 'tpu'"),
    ("cli-device-absent", lambda tmp: cli("collect", "tiny-random:qwen3.5", "--layer", "0", "--device", "cuda:99", "--out", "x"), S, r"--device: 'cuda:99': (no CUDA GPU is visible|this machine has \d+ CUDA)"),
    ("cli-model-missing-folder", lambda tmp: cli("collect", str(tmp / "absent" / "model"), "--layer", "0", "--out", "x"), S, r"argument model: .*absent/model: no such folder"),
    ("cli-tokens-missing", lambda tmp: cli("collect", "tiny-random:qwen3.5", "--layer", "0", "--tokens", str(tmp / "none.txt"), "--out", "x"), S, r"--tokens: .*none\.txt' is neither stdlib, random, hf:DATASET nor an existing file"),
    ("cli-model-file", lambda tmp: (tmp / "w.bin").write_bytes(b"x") and cli("collect", str(tmp / "w.bin"), "--layer", "0", "--out", "x"), S, r"argument model: .* is a file"),
    ("cli-resume-and-overwrite", lambda tmp: cli("collect", "tiny-random:qwen3.5", "--layer", "0", "--out", "x", "--resume", "--overwrite"), S, r"--overwrite: not allowed with argument --resume"),
    ("cli-store-missing", lambda tmp: cli("train", str(tmp / "none"), "--layer", "0", "--head", "0", "--out", "x"), S, r"argument store: .* does not exist"),
    ("cli-lr-0", lambda tmp: cli("train", "--lr", "0", str(tmp), "--layer", "0", "--head", "0", "--out", "x"), S, r"--lr: 0 is not a finite number > 0"),
    ("cli-n-atoms-0", lambda tmp: cli("logit-shift", "tiny-random:qwen3.5", "--n-atoms", "0", "--sae", "x", "--out", "x"), S, r"--n-atoms: 0"),
    ("cli-sae-not-a-folder", lambda tmp: cli("logit-shift", "tiny-random:qwen3.5", "--sae", str(tmp / "none"), "--out", "x"), S, r"--sae: .*not a directory"),
    ("cli-new-tokens-negative", lambda tmp: cli("install", "tiny-random:qwen3.5", "--layer", "0", "--head", "0", "--new-tokens", "-1", "--out", "x"), S, r"--new-tokens: -1"),
    ("cli-sweep-grid-missing", lambda tmp: cli("sweep", str(tmp / "grid.yaml"), "--out", "x"), S, r"argument grid: .*grid\.yaml: no such file"),
    ("cli-threads-negative", lambda tmp: cli("demo", "--threads", "-2"), S, r"--threads: -2 is negative"),
]  # fmt: skip


@pytest.mark.parametrize(("call", "error", "pattern"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_the_documented_error(call, error, pattern, tmp_path, capsys):
    with pytest.raises(error) as caught:
        call(tmp_path)
    # Under the test suite's jaxtyping import hook a wrong *type* fails its annotation first
    # (a TypeError); users without the hook get the library's own message.
    message = capsys.readouterr().err if error is SystemExit else str(caught.value)
    if error is SystemExit:
        assert caught.value.code == 2
    assert re.search(pattern, message, flags=re.S), message


def test_errors_md_lists_every_case_and_no_other():
    rows = re.findall(r"^\| `([a-z0-9-]+)` \|", ERRORS_MD.read_text(), flags=re.M)
    assert sorted(rows) == sorted(c[0] for c in CASES)
    assert len(set(rows)) == len(rows)
