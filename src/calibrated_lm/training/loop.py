"""The SFT loop: fused label-smoothed loss, AdamW, warmup/decay, accumulation, checkpoints.

One optimizer step consumes ``grad_accum`` micro-batches of ``batch_size`` examples (per
rank). Its loss is

* ``reduction="sum"`` (token-summed, the paper's setup): the sum of the per-token losses of
  every target token in the step divided by their number, so every token weighs the same
  whatever micro-batch it lands in;
* ``reduction="mean"``: the mean over each micro-batch's tokens, averaged over micro-batches.

The logged ``loss`` is the token mean over the step in both cases; ``confidence``
(mean max-probability), ``accuracy`` (argmax == target) and ``entropy`` (nats) are the
kernel's per-token statistics averaged over the same tokens. On CUDA the forward runs under
bf16 autocast with fp32 master weights.

Every argument is checked (``config_checks.validate_config``) before anything is loaded or
written. ``--resume`` continues from the newest intact checkpoint (a damaged one is skipped,
with a note saying why) and refuses settings that would change the data order or the
objective, and a data file whose content changed since the checkpoint (``resume.py``).

:func:`train` runs in phases, each a function below: :func:`_preflight` (every check that
needs no model), :func:`_setup` (model, data, optimizer), :func:`_resume`, :func:`_step_loop`
(:func:`_step` per optimizer step, :func:`_checkpoint` on the --save-every grid and on a stop
request) and :func:`_finish` (last checkpoint, ``final/``). What differs between one device,
FSDP2 and DeepSpeed ZeRO-3 lives in one strategy object per backend (``backends.py``); the
phases never ask which one runs.

Each checkpoint (``checkpoint.py``) is a ``save_pretrained`` folder with the resume state
beside it. Logged records go to ``metrics.jsonl`` and the ``--report-to`` trackers
(``tracking.py``); with ``--eval-data`` the evaluated steps' records also carry held-out
loss, confidence, accuracy and ECE (``heldout_eval.py``). ``--head-subset FILE`` restricts the
output softmax to V' tokens (``head_restriction.py``): the token-summed loss then divides by
the targets inside the subset, and each record carries the share of targets left out.
"""

from __future__ import annotations

import math
import random
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from calibrated_lm.errors import UserError
from calibrated_lm.run_folders import refuse_other_runs
from calibrated_lm.training import distributed as D
from calibrated_lm.training.backends import Backend, StepOutcome, make_backend
from calibrated_lm.training.batching import StepPlan, collate
from calibrated_lm.training.checkpoint import (
    check_model_fits,
    checkpoint_root,
    fsync_dir,
    is_disk_full,
    list_checkpoints,
    save_pretrained_folder,
    set_rng_state,
    swap_in,
    sync_folder,
)
from calibrated_lm.training.config_checks import validate_config
from calibrated_lm.training.resume import (
    ResumePlan,
    file_sha256,
    note,
    plan_resume,
    read_resumable,
    truncate_metrics,
)
from calibrated_lm.training.schedule import learning_rate
from calibrated_lm.training.stop import StopRequest, TrainingStopped

METRICS_FILE = "metrics.jsonl"
FINAL_DIR = "final"


@dataclass
class TrainConfig:
    """Arguments of ``calibrated-lm train`` (see its --help; checked by ``validate_config``).

    ``max_grad_norm``: a positive number clips the global gradient norm to it; ``None`` or
    ``0`` means no clipping (``--max-grad-norm 0``); negative values are refused.
    ``save_every`` 0 writes only the end-of-run checkpoint. ``eval_every`` (with
    ``eval_data``) N >= 1 evaluates every N steps and after the last; 0 only after the last.
    """

    model: str
    data: str
    output: str
    label_smoothing: float = 0.1
    epochs: float = 2.0
    lr: float = 2e-5
    batch_size: int = 8
    grad_accum: int = 16
    max_seq_len: int = 2048
    max_steps: int | None = None
    warmup_ratio: float = 0.03
    reduction: str = "sum"
    temperature: float | None = None
    softcap: float | None = None
    z_loss: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    # Optimizer steps with a non-finite gradient norm are skipped; this many in a row abort.
    max_skipped_steps: int = 5
    seed: int = 42
    device: str = "auto"
    resume: bool = False
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 1
    progress: bool = True
    gradient_checkpointing: bool = False
    # torch.compile each decoder layer (models/compile.py): same numbers, fewer kernels. Not a
    # setting of the objective, so a resume may turn it on or off.
    compile: bool = False
    # Cut each step's examples into micro-batches of similar length (same step, less padding).
    group_by_length: bool = True
    # DeepSpeed JSON config: shard with a ZeRO-3 engine instead of FSDP2 (see zero3.py).
    deepspeed: str | None = None
    # Held-out file scored every eval_every steps (0: only after the last step); see
    # heldout_eval.py. Neither changes training, so a resume may change them.
    eval_data: str | None = None
    eval_every: int = 0
    # "none", "tensorboard", "wandb" or "tensorboard,wandb" (tracking.py); metrics.jsonl always.
    report_to: str = "none"
    # head_subset.json (or a folder holding one): the softmax over its V' tokens only
    # (head_restriction.py). Its content, not its path, is checked on a resume.
    head_subset: str | None = None
    # Folder of tokenized-data entries (token_cache.py): a restart reads the examples back
    # instead of tokenizing again. The same tokens either way, so a resume may change it.
    token_cache: str | None = None
    world_size: int = field(default=1, repr=False)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass


def _gib(n: float) -> float:
    return n / 2**30


def _oom_error(exc: BaseException, device: torch.device, model: Any, cfg: TrainConfig, where: str):
    params = sum(p.numel() * p.element_size() for p in model.parameters()) if model else 0
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        peak = torch.cuda.max_memory_allocated(device)
        figures = (
            f"the GPU has {_gib(total):.1f} GiB, {_gib(peak):.1f} GiB was allocated at peak, "
            f"the model's parameters alone take {_gib(params):.2f} GiB"
        )
    else:
        figures = f"the model's parameters take {_gib(params):.2f} GiB of host memory"
    return UserError(
        f"out of memory {where} (batch size {cfg.batch_size}, up to {cfg.max_seq_len} tokens "
        f"per sequence): {figures}; lower --batch-size (raise --grad-accum to keep the "
        "effective batch) or --max-seq-len, or use more GPUs"
    )


def _disk_full_final(exc: OSError, output: Path) -> UserError:
    kept = [p.name for p in list_checkpoints(output)]
    newest = f" (newest: {kept[-1]})" if kept else ""
    return UserError(
        f"no space left on the device while saving the model to {output / FINAL_DIR} "
        f"({exc.strerror or exc}); checkpoints already written are kept{newest}; free some "
        "space and rerun with --resume to save it again"
    )


def save_final(
    backend: Backend,
    tokenizer: Any,
    output: Path,
    files: dict[str, bytes] | None = None,
) -> Path:
    """``save_pretrained`` the backend's model (gathered: a collective) and ``tokenizer`` into
    ``output/final`` atomically and durably (temporary folder, fsync, rename) on the main
    rank; ``files`` (name -> bytes) are written beside them. Returns the folder."""
    info = backend.info
    state = backend.full_model_state()
    final = output / FINAL_DIR
    if info.main:
        tmp = output / f".tmp-{FINAL_DIR}"
        if tmp.exists():
            shutil.rmtree(tmp)
        try:
            tmp.mkdir()
            save_pretrained_folder(
                tmp, backend.model, tokenizer, state, for_resume=False, files=files
            )
            sync_folder(tmp)
        except OSError as exc:
            if is_disk_full(exc):
                shutil.rmtree(tmp, ignore_errors=True)
                raise _disk_full_final(exc, output) from exc
            raise
        swap_in(tmp, final)
        fsync_dir(output)
    D.barrier(info)
    return final


def train(
    cfg: TrainConfig,
    *,
    model_and_tokenizer: tuple[Any, Any] | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    stop: StopRequest | None = None,
) -> dict[str, Any]:
    """Run (or resume) SFT as configured (:func:`_train`), holding the output folder's lock.

    SIGTERM or SIGINT during the steps (or ``stop.request()``) ends the run after the current
    step with a checkpoint of it, raising :class:`~calibrated_lm.training.stop.TrainingStopped`.
    """
    # Run-folder lock (calibrated_lm.runlock): rank 0 holds OUTPUT/.lock for the whole run, so
    # a second process training into the same --output is refused with one sentence. The
    # (pure) argument check runs first so that a bad value still touches no folder.
    from calibrated_lm.launcher import launch_env, own_process_group
    from calibrated_lm.runlock import run_lock

    validate_config(cfg)
    # A process group this call creates (D.setup, under a launcher) is this call's to leave:
    # a rank that exited with its gloo group alive could abort at exit (rc -6, "terminate
    # called without an active exception") after finishing or after stopping with a message.
    with own_process_group(), run_lock(cfg.output, active=launch_env().is_main):
        return _train(cfg, model_and_tokenizer=model_and_tokenizer, on_step=on_step, stop=stop)


def _train(
    cfg: TrainConfig,
    *,
    model_and_tokenizer: tuple[Any, Any] | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    stop: StopRequest | None = None,
) -> dict[str, Any]:
    """Run (or resume) SFT as configured; returns the last logged record and the final path.

    ``model_and_tokenizer`` skips loading ``cfg.model`` (library use, tests); ``on_step`` is
    called with each logged record (after it is written).
    """
    # Every argument, before a process group, a model or a file: one sentence per bad value.
    validate_config(cfg)
    checked = _preflight(cfg)
    run = _setup(cfg, checked, model_and_tokenizer)
    start = _resume(run, checked.resume)
    run.data_outside_share = _announce(run, start)
    last, skipped_steps = _step_loop(run, start, on_step=on_step, stop=stop)
    # A SIGINT or SIGTERM now would cut the last checkpoint or final/ mid-write (torch.save
    # then fails on its own half-written archive, with a traceback): the first one waits for
    # them, which take seconds; a second one still ends the process at once.
    with StopRequest() as late:
        result = _finish(run, start, last, skipped_steps)
    if late.signum is not None and run.info.main:
        print(
            f"{late.name} came during the final save; the save was finished first: "
            f"{result['final']}",
            file=sys.stderr,
        )
    return result


# -- phase 1: checks before anything is loaded -----------------------------------------------


@dataclass
class _Checked:
    """What :func:`_preflight` established: the processes, the backend, the output folder,
    the head subset the run trains with, the data's fingerprint and (with --resume) the
    checkpoints it may continue from."""

    info: D.DistInfo
    backend: Backend
    output: Path
    subset: Any  # head_subset.SubsetFile | None
    data_sha: str
    resume: ResumePlan | None


def _preflight(cfg: TrainConfig) -> _Checked:
    """Start the process group and the backend and check the output folder, the data, the
    held-out data, the head subset and a resume, all before minutes of model loading; then
    create the output folder and seed the generators. Sets ``cfg.world_size`` (and, on a
    resume without --head-subset, ``cfg.head_subset``: the checkpoint's)."""
    from calibrated_lm.training import head_restriction as R
    from calibrated_lm.training import heldout_eval as H
    from calibrated_lm.training.data import check_layouts, read_records

    info = D.setup(cfg.device)
    cfg.world_size = info.world
    # A bad DeepSpeed config fails here.
    backend = make_backend(
        info,
        deepspeed=cfg.deepspeed,
        batch_size=cfg.batch_size,
        grad_accum=cfg.grad_accum,
        max_grad_norm=cfg.max_grad_norm,
    )
    output = Path(cfg.output)
    refuse_other_runs(output, "train")
    checkpoints = list_checkpoints(output)
    if checkpoints and not cfg.resume:
        raise UserError(
            f"{output} already holds a run (checkpoint {checkpoints[-1].name}); pass --resume to "
            "continue it or choose another --output"
        )
    if cfg.resume and not checkpoints:
        raise UserError(f"--resume: no checkpoint in {output / 'checkpoints'} to resume from")
    if not checkpoints and (output / FINAL_DIR).exists():
        # A finished run whose checkpoints were removed: a new run would replace its model and
        # its metrics.jsonl, which nothing could bring back.
        raise UserError(
            f"{output} already holds a finished run's model ({output / FINAL_DIR}) and no "
            "checkpoint to resume from; choose another --output, or remove final/ and "
            "metrics.jsonl there to train anew"
        )
    # Bad data fails here (held-out data too).
    check_layouts(read_records(cfg.data), str(cfg.data))
    if cfg.eval_data:
        H.check_eval_file(cfg.eval_data)
    subset = R.open_for_run(cfg.head_subset)
    data_sha = file_sha256(cfg.data)
    # So does a resume that would not continue the same run (settings, data content).
    plan = None
    if cfg.resume:
        plan = plan_resume(
            cfg, checkpoints, data_sha, weights=backend.resume_reads_weights, main=info.main
        )
        newest, newest_state = plan.candidates[0]
        given, subset = subset, R.for_resume(subset, newest)
        if given is None and subset is not None:
            # Kept from the checkpoint; the record names the file the run was started with.
            cfg.head_subset = newest_state["config"].get("head_subset") or str(subset.path)
            if info.main:
                size, sha = subset.subset.size, subset.sha256[:12]
                note(
                    f"--resume: training on with the checkpoint's head subset (V' = {size}, {sha}...)"
                )
    output.mkdir(parents=True, exist_ok=True)
    _seed_everything(cfg.seed)
    return _Checked(info, backend, output, subset, data_sha, plan)


# -- phase 2: model, data, optimizer ---------------------------------------------------------


@dataclass
class _Run:
    """What the phases after :func:`_setup` share."""

    cfg: TrainConfig
    info: D.DistInfo
    backend: Backend
    output: Path
    tokenizer: Any
    data: Any  # data.Dataset of the training examples
    eval_set: Any  # heldout_eval's Dataset, or None without --eval-data
    pad_id: int
    subset: Any  # head_subset.SubsetFile | None
    kept: torch.Tensor | None  # (V,) bool of the head subset's tokens
    subset_files: dict[str, bytes]  # written into every checkpoint and final/
    data_sha: str
    plan: StepPlan
    total: int
    data_outside_share: float | None = None
    # The CUDA forward runs under bf16 autocast (fp32 master weights).
    autocast: bool = field(init=False)

    def __post_init__(self) -> None:
        self.autocast = self.info.device.type == "cuda"

    @property
    def model(self) -> Any:
        return self.backend.model


def _total_steps(cfg: TrainConfig, plan: StepPlan) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * plan.steps_per_epoch))


def _load_model(cfg: TrainConfig, model_and_tokenizer: tuple[Any, Any] | None) -> tuple[Any, Any]:
    """The model (fp32, CPU) and tokenizer, set up for training (no KV cache; activation
    checkpointing with --gradient-checkpointing)."""
    if model_and_tokenizer is None:
        from calibrated_lm.models.loading import load_model

        model, tokenizer = load_model(cfg.model, dtype="float32", device="cpu")
    else:
        model, tokenizer = model_and_tokenizer
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model, tokenizer


def _setup(
    cfg: TrainConfig, checked: _Checked, model_and_tokenizer: tuple[Any, Any] | None
) -> _Run:
    """Load the model and the data, patch the model with the run's loss, hand it to the
    backend (placed or sharded, then compiled with --compile) with its AdamW, and plan the
    steps."""
    from calibrated_lm.launcher import on_every_rank
    from calibrated_lm.models.patching import patch_model
    from calibrated_lm.training import head_restriction as R
    from calibrated_lm.training import heldout_eval as H
    from calibrated_lm.training.data import load_dataset

    info, backend, subset = checked.info, checked.backend, checked.subset
    # Together: a model no rank can read stops every rank at this point, and they leave the
    # group after a barrier, as after finished work (launcher.on_every_rank).
    model, tokenizer = on_every_rank(lambda: _load_model(cfg, model_and_tokenizer))
    data = load_dataset(
        cfg.data,
        tokenizer,
        max_seq_len=cfg.max_seq_len,
        progress=cfg.progress and info.main,
        # Every rank reads an entry that is there (the key makes it the same tokens); only
        # the main rank writes one, so ranks never race on it.
        cache_dir=cfg.token_cache,
        cache_write=info.main,
    )
    if data.template == "plain":
        from calibrated_lm.training.data import PLAIN_CHAT_TEMPLATE

        # Saved with every checkpoint and final/: the model is scored in the format it learnt.
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    eval_set = None
    if cfg.eval_data:
        eval_set = H.load_eval_set(cfg.eval_data, tokenizer, max_seq_len=cfg.max_seq_len)
    kept = None
    subset_files: dict[str, bytes] = {}
    if subset is not None:
        R.check_model(subset, model)
        kept = R.kept_mask(subset)
        subset_files = {R.FILE: subset.data}

    patch_model(
        model,
        label_smoothing=cfg.label_smoothing,
        softcap=cfg.softcap,
        temperature=cfg.temperature,
        z_loss=cfg.z_loss,
        head_subset=subset.subset if subset is not None else None,
    )
    try:
        backend.place(model)
    except torch.OutOfMemoryError as exc:
        raise _oom_error(exc, info.device, model, cfg, "moving the model to the device") from exc
    model.train()
    if cfg.compile:
        from calibrated_lm.models.compile import compile_decoder

        compile_decoder(model)  # after sharding: FSDP2's hooks stay outside the graphs
    backend.attach_optimizer(
        torch.optim.AdamW(
            model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999)
        )
    )
    plan = StepPlan(
        len(data.examples),
        cfg.batch_size,
        cfg.grad_accum,
        cfg.seed,
        info.world,
        lengths=[len(ex.input_ids) for ex in data.examples] if cfg.group_by_length else None,
    )
    return _Run(
        cfg=cfg,
        info=info,
        backend=backend,
        output=checked.output,
        tokenizer=tokenizer,
        data=data,
        eval_set=eval_set,
        pad_id=pad_id,
        subset=subset,
        kept=kept,
        subset_files=subset_files,
        data_sha=checked.data_sha,
        plan=plan,
        total=_total_steps(cfg, plan),
    )


# -- phase 3: resume -------------------------------------------------------------------------


def _resume(run: _Run, plan: ResumePlan | None) -> int:
    """The step the run starts from: 0, or (with --resume) the step of the newest checkpoint
    every rank can load, with the model, optimizer and RNG states restored from it and
    ``metrics.jsonl`` cut back to it (steps after it are redone). A fresh run starts a new
    ``metrics.jsonl``."""
    info = run.info
    metrics_path = run.output / METRICS_FILE
    if plan is None:
        if info.main and metrics_path.exists():
            metrics_path.unlink()
        return 0
    path, ckpt = read_resumable(
        plan, info, weights=run.backend.resume_reads_weights, subset=run.subset
    )
    if isinstance(ckpt.get("model"), Mapping):
        check_model_fits(run.backend.model, ckpt["model"], path)
    run.backend.load_checkpoint(path, ckpt)
    set_rng_state(ckpt["rng"])
    start = int(ckpt["state"]["step"])
    if info.main:
        torn = truncate_metrics(metrics_path, start)
        if torn:
            note(f"--resume: dropped {torn} unreadable (torn) line(s) of {metrics_path}")
    return start


def _announce(run: _Run, start: int) -> float | None:
    """Print what a new run trains on (main rank; the head subset's coverage on a resume
    too); returns the share of the data's targets outside the head subset (None without)."""
    from calibrated_lm.training import head_restriction as R

    data, eval_set = run.data, run.eval_set
    if run.info.main and start == 0:
        dropped = dict(data.dropped)
        print(
            f"data: {data.n_records} records, {len(data.examples)} examples "
            f"({data.template} template), {data.n_target_tokens} target tokens, dropped: "
            f"{sum(dropped.values())} {dropped if dropped else ''}".rstrip()
        )
        if eval_set is not None:
            dropped = dict(eval_set.dropped)
            print(
                f"eval data: {eval_set.n_records} records, {len(eval_set.examples)} examples, "
                f"{eval_set.n_target_tokens} target tokens, dropped: "
                f"{sum(dropped.values())} {dropped if dropped else ''}".rstrip()
            )
    if run.subset is None:
        return None
    inside, outside = R.data_counts((ex.labels for ex in data.examples), run.kept)
    if run.info.main:
        print(R.describe(run.subset, inside, outside))
    return R.share(inside, outside)


# -- phase 4: the steps ----------------------------------------------------------------------


def _step(run: _Run, step: int) -> tuple[dict[str, Any], StepOutcome]:
    """Optimizer step ``step`` (0-based): its micro-batches forward and backward, the update
    through the backend; returns the step's record (module docstring) and how it ended."""
    from calibrated_lm.models.attention import training_attention
    from calibrated_lm.training import head_restriction as R

    cfg, info, backend, plan, data = run.cfg, run.info, run.backend, run.plan, run.data
    t0 = time.perf_counter()
    lr = learning_rate(step, run.total, cfg.lr, cfg.warmup_ratio)
    backend.set_lr(lr)
    all_batches = plan.step_batches(step)
    mine_batches = [
        collate([data.examples[i] for i in b], run.pad_id)
        for b in all_batches[info.rank :: info.world]
    ]
    # Targets the loss scores: with a head subset, those inside it (the others are left out,
    # so they must not dilute the token-summed loss's denominator either).
    if run.kept is None:
        local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in mine_batches)
        local_outside = 0
    else:
        counts = [R.count_targets(b["labels"], run.kept) for b in mine_batches]
        local_tokens = sum(c[0] for c in counts)
        local_outside = sum(c[1] for c in counts)
    # Every rank must run as many forwards as the others (FSDP2 and ZeRO-3 gather parameters
    # inside them): a rank short of micro-batches at an epoch's end repeats the step's first
    # one with weight 0.
    n_real = len(mine_batches)
    per_rank = -(-len(all_batches) // info.world)
    mine_batches += [
        collate([data.examples[i] for i in all_batches[0]], run.pad_id)
        for _ in range(per_rank - n_real)
    ]
    step_tokens = D.all_reduce_sum(local_tokens, info)
    n_micro = len(all_batches)
    sums = {"loss": 0.0, "confidence": 0.0, "accuracy": 0.0, "entropy": 0.0, "inputs": 0}
    forward = backend.forward
    for j, b in enumerate(mine_batches):
        b = {k: v.to(info.device) for k, v in b.items()}
        with (
            torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=run.autocast),
            training_attention(info.device),
        ):
            out = forward(**b, calibrated_lm_reduction="sum", calibrated_lm_stats=True)
        stats = out.loss_stats
        if cfg.reduction == "sum":
            scaled = out.loss / max(step_tokens, 1)
        else:
            scaled = out.loss / max(stats.n_tokens, 1) / n_micro
        if j >= n_real:  # a padding forward: gradients of zero
            scaled = scaled * 0.0
        # Every backend averages gradients over the ranks; times the world size, the update
        # equals the one-rank update on the same examples.
        backend.backward(scaled * info.world, boundary=j == len(mine_batches) - 1)
        if j >= n_real:
            continue
        sums["loss"] += float(out.loss.detach())
        for key in ("confidence", "accuracy", "entropy"):
            sums[key] += getattr(stats, key) * stats.n_tokens
        sums["inputs"] += int(b["attention_mask"].sum())
    outcome = backend.finish_step()
    totals = {k: D.all_reduce_sum(v, info) for k, v in sums.items()}
    elapsed = time.perf_counter() - t0
    denom = max(step_tokens, 1)
    record = {
        "step": step + 1,
        "epoch": round(plan.epoch_of(step + 1), 4),
        "loss": totals["loss"] / denom,
        "lr": lr,
        "tokens_per_s": totals["inputs"] / elapsed,
        # Wall seconds of this step: what a scheduler needs to tell how long a resume takes.
        "step_s": round(elapsed, 4),
        "confidence": totals["confidence"] / denom,
        "accuracy": totals["accuracy"] / denom,
        "entropy": totals["entropy"] / denom,
        "target_tokens": int(step_tokens),
        "grad_norm": outcome.grad_norm if outcome.finite else None,
        "skipped": outcome.skipped,
    }
    if run.subset is not None:
        outside = int(D.all_reduce_sum(local_outside, info))
        record["outside_subset_tokens"] = outside
        record["outside_subset_share"] = R.share(int(step_tokens), outside)
    if outcome.nonfinite_params:
        record["nonfinite_grads"] = outcome.nonfinite_params
    return record, outcome


def _nonfinite_line(run: _Run, step: int, outcome: StepOutcome, in_a_row: int) -> str:
    """The progress line of a step whose gradient norm was not finite."""
    line = (
        f"step {step + 1}: gradient norm is {outcome.grad_norm}; "
        f"{run.backend.nonfinite_action} ({in_a_row} in a row)"
    )
    if outcome.skipped:
        names = ", ".join(outcome.nonfinite_params) or "(none on this rank)"
        line += f"; non-finite gradients in: {names}"
    return line


def _maybe_evaluate(run: _Run, step: int, record: dict[str, Any], bar: Any) -> bool:
    """With --eval-data, score the held-out set after step ``step`` (0-based) when it is due
    (every --eval-every steps and after the last) into ``record``; a collective. Returns
    whether it was."""
    from calibrated_lm.training import heldout_eval as H

    cfg = run.cfg
    due = run.eval_set is not None and (
        step + 1 == run.total or (cfg.eval_every > 0 and (step + 1) % cfg.eval_every == 0)
    )
    if not due:
        return False
    record.update(
        H.evaluate(
            run.backend.forward,
            run.model,
            run.eval_set,
            batch_size=cfg.batch_size,
            pad_id=run.pad_id,
            info=run.info,
            autocast=run.autocast,
        )
    )
    ece = record["eval_ece"]
    if run.info.main:  # the figures are all-reduced: one line per run, not per rank
        bar.write(
            f"step {step + 1}: held-out loss {record['eval_loss']:.4f}, confidence "
            f"{record['eval_confidence']:.3f}, accuracy "
            f"{record['eval_accuracy']:.3f}, ECE "
            f"{'n/a' if ece is None else f'{ece:.4f}'} ({record['eval_tokens']} tokens)"
        )
    return True


def _step_loop(
    run: _Run,
    start: int,
    *,
    on_step: Callable[[dict[str, Any]], None] | None,
    stop: StopRequest | None,
) -> tuple[dict[str, Any], int]:
    """Steps ``start`` to the last: each is logged (metrics.jsonl, --report-to, ``on_step``)
    every --log-every steps, after the last and when evaluated, and checkpointed every
    --save-every steps (not the last: :func:`_finish` does). Returns the last step's record
    ({} when none ran) and how many steps were skipped for a non-finite gradient.

    Raises :class:`UserError` after --max-skipped-steps non-finite norms in a row and on
    running out of memory (with figures), and :class:`TrainingStopped` after a SIGTERM,
    SIGINT or ``stop.request()`` once the current step is checkpointed."""
    from tqdm.auto import tqdm

    from calibrated_lm.training.tracking import open_trackers

    cfg, info, total = run.cfg, run.info, run.total
    bar = tqdm(
        total=total,
        initial=start,
        desc="train",
        unit="step",
        disable=not (cfg.progress and info.main),
    )
    record: dict[str, Any] = {}
    step = start
    consecutive_skips = 0
    skipped_steps = 0
    # metrics.jsonl (truncated on a resume) and the --report-to backends, main rank only.
    tracker = open_trackers(
        cfg.report_to,
        run.output,
        metrics_file=METRICS_FILE,
        config=asdict(cfg),
        start_step=start,
        resume=cfg.resume,
        main=info.main,
    )
    stopper = stop if stop is not None else StopRequest()
    stopper.__enter__()  # left in the finally below, before the final save
    try:
        for step in range(start, total):
            record, outcome = _step(run, step)
            if outcome.finite:
                consecutive_skips = 0
            else:
                consecutive_skips += 1
                skipped_steps += int(outcome.skipped)
                bar.write(_nonfinite_line(run, step, outcome, consecutive_skips))
            evaluated = _maybe_evaluate(run, step, record, bar)
            bar.update(1)
            if (step + 1) % cfg.log_every == 0 or step + 1 == total or evaluated:
                tracker.log(record)
                bar.set_postfix(
                    loss=f"{record['loss']:.4f}",
                    lr=f"{record['lr']:.2e}",
                    tok_s=f"{record['tokens_per_s']:.0f}",
                    conf=f"{record['confidence']:.3f}",
                    acc=f"{record['accuracy']:.3f}",
                )
                if on_step:
                    on_step(record)
            if consecutive_skips >= cfg.max_skipped_steps:
                raise UserError(
                    f"training diverged: the gradient norm was not finite for "
                    f"{consecutive_skips} optimizer steps in a row (up to step {step + 1}); "
                    f"{run.backend.diverged_params}. Lower --lr, check the data, or resume "
                    f"from the last checkpoint in {run.output / 'checkpoints'}"
                )
            saved = cfg.save_every and (step + 1) % cfg.save_every == 0
            if saved and step + 1 != total:
                tracker.sync()  # the log lines this checkpoint covers, on disk before it is
                _checkpoint(run, step + 1)
            if step + 1 != total and stopper.requested(lambda v: D.all_reduce_sum(v, info)):
                if not saved:
                    tracker.sync()
                    _checkpoint(run, step + 1)
                raise TrainingStopped(
                    f"stopped by {stopper.name} after step {step + 1} of {total}; its "
                    f"checkpoint is in {checkpoint_root(run.output)}; rerun with --resume to "
                    "go on",
                    step + 1,
                    stopper.signum or 15,
                )
    except torch.OutOfMemoryError as exc:
        run.backend.drop_grads()
        raise _oom_error(exc, info.device, run.model, cfg, f"at step {step + 1}") from exc
    except RuntimeError as exc:
        # The CPU allocator reports exhaustion as a plain RuntimeError.
        if "can't allocate memory" not in str(exc):
            raise
        run.backend.drop_grads()
        raise _oom_error(exc, info.device, run.model, cfg, f"at step {step + 1}") from exc
    finally:
        stopper.__exit__()
        bar.close()
        tracker.close()
    return record, skipped_steps


# -- phase 5: checkpoints --------------------------------------------------------------------


def _checkpoint(run: _Run, step: int) -> None:
    """Write checkpoint ``step`` (the state after that many steps) through the backend; a
    collective."""
    cfg, plan = run.cfg, run.plan
    epoch, in_epoch = divmod(step, plan.steps_per_epoch)
    state = {
        "step": step,
        "total_steps": run.total,
        # Informational: the data order is a function of the seed and the step (batching).
        "data_position": {
            "epoch": epoch,
            "step_in_epoch": in_epoch,
            "steps_per_epoch": plan.steps_per_epoch,
        },
        "config": asdict(cfg),
        "data_sha256": run.data_sha,
    }
    if run.subset is not None:
        state["head_subset"] = run.subset.record()
    run.backend.save_checkpoint(
        run.output,
        step,
        state=state,
        tokenizer=run.tokenizer,
        keep=cfg.keep_checkpoints,
        files=run.subset_files,
    )


# -- phase 6: finish -------------------------------------------------------------------------


def _finish(run: _Run, start: int, last: dict[str, Any], skipped_steps: int) -> dict[str, Any]:
    """Checkpoint the last step (when this call ran any) and save ``final/``; returns what
    :func:`train` returns (which then leaves the process group)."""
    if run.total > start:
        _checkpoint(run, run.total)
    final = save_final(run.backend, run.tokenizer, run.output, files=run.subset_files)
    return {
        "last": last,
        "final": str(final),
        # A resume past a smaller --max-steps trains nothing and keeps its checkpoint's step.
        "steps": max(start, run.total),
        "dropped": dict(run.data.dropped),
        "skipped_steps": skipped_steps,
        "template": run.data.template,
        "outside_subset_share": run.data_outside_share,
    }
