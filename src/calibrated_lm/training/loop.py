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
objective, and a data file whose content changed since the checkpoint (its sha256 is kept
in ``state.json``).

Each checkpoint (``checkpoint.py``) is a ``save_pretrained`` folder with the resume state
beside it. Logged records go to ``metrics.jsonl`` and the ``--report-to`` trackers
(``tracking.py``); with ``--eval-data`` the evaluated steps' records also carry held-out
loss, confidence, accuracy and ECE (``heldout_eval.py``). ``--head-subset FILE`` restricts the
output softmax to V' tokens (``head_restriction.py``): the token-summed loss then divides by
the targets inside the subset, and each record carries the share of targets left out.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from calibrated_lm.errors import UserError
from calibrated_lm.training import distributed as D
from calibrated_lm.training.batching import StepPlan, collate
from calibrated_lm.training.checkpoint import (
    CheckpointError,
    checkpoint_root,
    fsync_dir,
    inspect_checkpoint,
    is_disk_full,
    list_checkpoints,
    read_checkpoint,
    save_pretrained_folder,
    set_rng_state,
    swap_in,
    sync_folder,
    write_checkpoint,
)
from calibrated_lm.training.config_checks import validate_config
from calibrated_lm.training.schedule import learning_rate
from calibrated_lm.training.stop import StopRequest, TrainingStopped

METRICS_FILE = "metrics.jsonl"
FINAL_DIR = "final"
# Changing any of these between a run and its resume would change which examples a step sees.
_RESUME_FIXED = (
    "model",
    "data",
    "batch_size",
    "grad_accum",
    "max_seq_len",
    "seed",
    "world_size",
    "group_by_length",
    "deepspeed",
)
# Values of settings added later, as checkpoints written before them were trained.
_RESUME_LEGACY = {"group_by_length": False, "deepspeed": None}
# Changing any of these would change the loss or the optimizer in the middle of a run (a
# checkpoint that predates one of them is not checked on it). The number of steps (--epochs,
# --max-steps) may change: that extends or shortens the run.
_RESUME_OBJECTIVE = (
    "label_smoothing",
    "lr",
    "temperature",
    "softcap",
    "z_loss",
    "reduction",
    "weight_decay",
    "warmup_ratio",
    "max_grad_norm",
)


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
    world_size: int = field(default=1, repr=False)


def _total_steps(cfg: TrainConfig, plan: StepPlan) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * plan.steps_per_epoch))


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


def _nonfinite_grads(model: Any, limit: int = 5) -> list[str]:
    """Names of (up to ``limit``) parameters whose local gradient holds a NaN or Inf.

    Only called after a non-finite norm, so its cost does not matter; the names say where a
    divergence starts (attention projections, embeddings, the head...)."""
    names = []
    for name, p in model.named_parameters():
        g = p.grad
        if g is None:
            continue
        g = g.to_local() if hasattr(g, "to_local") else g  # FSDP2 DTensor: this rank's shard
        if not bool(torch.isfinite(g).all()):
            names.append(name)
            if len(names) >= limit:
                break
    return names


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _truncate_metrics(path: Path, last_step: int) -> int:
    """Keep only logged lines of steps <= ``last_step`` (those after it will be redone).

    A line that does not parse (the last one, torn by a kill mid-write) is dropped; returns
    how many were."""
    if not path.exists():
        return 0
    kept = []
    torn = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step = int(row["step"])
        except (ValueError, TypeError, KeyError):
            torn += 1
            continue
        if step <= last_step:
            kept.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
    return torn


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes (the data fingerprint kept in checkpoints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _resume_candidates(
    checkpoints: list[Path], *, weights: bool, say: bool
) -> list[tuple[Path, dict[str, Any]]]:
    """The intact checkpoints (by :func:`inspect_checkpoint`), newest first, with their
    states; each damaged one is reported and skipped."""
    good, bad = [], []
    for path in reversed(checkpoints):
        try:
            good.append((path, inspect_checkpoint(path, weights=weights)))
        except CheckpointError as exc:
            bad.append(f"{path.name}: {exc}")
            continue
        if say and len(good) == 1:  # those newer than the one resumed from
            for line in bad:
                name, why = line.split(": ", 1)
                _note(f"--resume: skipping checkpoint {name}: {why}")
    if not good:
        root = checkpoints[0].parent if checkpoints else "checkpoints"
        raise UserError(f"--resume: no intact checkpoint in {root} ({'; '.join(bad)})")
    return good


def _same(key: str, a: Any, b: Any) -> bool:
    if key == "max_grad_norm":  # 0 and None both mean no clipping
        a, b = a or None, b or None
    return a == b


def _check_resume(cfg: TrainConfig, path: Path, state: dict[str, Any], data_sha: str) -> list[str]:
    """Refuse resuming ``cfg`` from checkpoint ``path`` (state ``state``) when a setting that
    fixes the data order or the objective, or the data file's content, changed; returns notes
    (a checkpoint too old to say)."""
    saved = {**_RESUME_LEGACY, **state["config"]}
    mine = asdict(cfg)
    diff = [k for k in _RESUME_FIXED if saved.get(k) != mine.get(k)]
    if diff:
        raise UserError(
            "--resume: these settings differ from the checkpointed run and would change the "
            "data order: "
            + ", ".join(f"{k} ({saved.get(k)} -> {mine.get(k)})" for k in diff)
            + "; resume with the values it was started with, or train into a new --output"
        )
    diff = [k for k in _RESUME_OBJECTIVE if k in saved and not _same(k, saved[k], mine.get(k))]
    if diff:
        raise UserError(
            f"--resume: these settings differ from the run checkpointed in {path.name} and "
            "would change its objective midway: "
            + ", ".join(f"{k} ({saved[k]} -> {mine.get(k)})" for k in diff)
            + "; resume with the values it was started with, or train into a new --output"
        )
    old_sha = state.get("data_sha256")
    if old_sha is None:
        return [
            f"--resume: checkpoint {path.name} predates data fingerprints, so it cannot be "
            f"checked that {cfg.data} still holds the data it was trained on"
        ]
    if old_sha != data_sha:
        raise UserError(
            f"--resume: the content of {cfg.data} changed since checkpoint {path.name} was "
            f"written (sha256 {old_sha[:12]}... -> {data_sha[:12]}...), which would change "
            "the examples of every later step; restore the original file or train into a "
            "new --output"
        )
    return []


def _disk_full_final(exc: OSError, output: Path) -> UserError:
    kept = [p.name for p in list_checkpoints(output)]
    newest = f" (newest: {kept[-1]})" if kept else ""
    return UserError(
        f"no space left on the device while saving the model to {output / FINAL_DIR} "
        f"({exc.strerror or exc}); checkpoints already written are kept{newest}; free some "
        "space and rerun with --resume to save it again"
    )


def save_final(
    model: Any,
    tokenizer: Any,
    output: Path,
    info: D.DistInfo,
    zero3: bool = False,
    files: dict[str, bytes] | None = None,
) -> Path:
    """``save_pretrained`` the model and tokenizer into ``output/final`` atomically and durably
    (temporary folder, fsync, rename); ``files`` (name -> bytes) are written beside them."""
    if zero3:
        from calibrated_lm.training import zero3 as Z

        state = Z.full_model_state(model, info.main)
    else:
        state = D.full_model_state(model, info)
    final = output / FINAL_DIR
    if info.main:
        tmp = output / f".tmp-{FINAL_DIR}"
        if tmp.exists():
            shutil.rmtree(tmp)
        try:
            tmp.mkdir()
            save_pretrained_folder(tmp, model, tokenizer, state, for_resume=False, files=files)
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
    from calibrated_lm.launcher import launch_env
    from calibrated_lm.runlock import run_lock

    validate_config(cfg)
    with run_lock(cfg.output, active=launch_env().is_main):
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
    from tqdm.auto import tqdm

    from calibrated_lm.models.attention import training_attention
    from calibrated_lm.models.patching import patch_model
    from calibrated_lm.training import head_restriction as R
    from calibrated_lm.training import heldout_eval as H
    from calibrated_lm.training.data import check_layouts, load_dataset, read_records
    from calibrated_lm.training.tracking import open_trackers

    # Every argument, before a process group, a model or a file: one sentence per bad value.
    validate_config(cfg)
    info = D.setup(cfg.device)
    cfg.world_size = info.world
    ds_config = None
    if cfg.deepspeed:
        from calibrated_lm.training import zero3 as Z

        if not info.enabled:
            raise UserError(
                "--deepspeed shards over several processes: launch with torchrun, deepspeed or "
                "accelerate launch (WORLD_SIZE > 1)"
            )
        # A bad config fails here, before minutes of model loading.
        ds_config = Z.engine_config(
            cfg.deepspeed,
            micro_batch=cfg.batch_size,
            grad_accum=cfg.grad_accum,
            world=info.world,
            clip=cfg.max_grad_norm,
            bf16=info.device.type == "cuda",
        )
    output = Path(cfg.output)
    checkpoints = list_checkpoints(output)
    if checkpoints and not cfg.resume:
        raise UserError(
            f"{output} already holds a run (checkpoint {checkpoints[-1].name}); pass --resume to "
            "continue it or choose another --output"
        )
    if cfg.resume and not checkpoints:
        raise UserError(f"--resume: no checkpoint in {output / 'checkpoints'} to resume from")
    # Bad data fails here, before minutes of model loading (held-out data too).
    check_layouts(read_records(cfg.data), str(cfg.data))
    if cfg.eval_data:
        H.check_eval_file(cfg.eval_data)
    subset = R.open_for_run(cfg.head_subset)
    data_sha = file_sha256(cfg.data)
    # So does a resume that would not continue the same run (settings, data content).
    candidates: list[tuple[Path, dict[str, Any]]] = []
    noted: set[str] = set()
    if cfg.resume:
        candidates = _resume_candidates(checkpoints, weights=ds_config is None, say=info.main)
        for note in _check_resume(cfg, *candidates[0], data_sha):
            if info.main and note not in noted:
                _note(note)
            noted.add(note)
        given, subset = subset, R.for_resume(subset, candidates[0][0])
        if given is None and subset is not None:
            # Kept from the checkpoint; the record names the file the run was started with.
            cfg.head_subset = candidates[0][1]["config"].get("head_subset") or str(subset.path)
            if info.main:
                size, sha = subset.subset.size, subset.sha256[:12]
                _note(
                    f"--resume: training on with the checkpoint's head subset (V' = {size}, {sha}...)"
                )
    output.mkdir(parents=True, exist_ok=True)
    _seed_everything(cfg.seed)

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
    data = load_dataset(cfg.data, tokenizer, max_seq_len=cfg.max_seq_len, progress=info.main)
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
    kept = None  # (V,) bool of the head subset's tokens
    subset_files: dict[str, bytes] = {}  # written into every checkpoint and final/
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
        if info.enabled and not cfg.deepspeed:
            # fully_shard moves each unit to the device as it shards it, so no GPU ever
            # holds the whole model.
            D.shard(model, info)
        else:
            model.to(info.device)
    except torch.OutOfMemoryError as exc:
        raise _oom_error(exc, info.device, model, cfg, "moving the model to the device") from exc
    model.train()
    if cfg.compile:
        from calibrated_lm.models.compile import compile_decoder

        compile_decoder(model)  # after sharding: FSDP2's hooks stay outside the graphs
    optim = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999)
    )
    engine = None  # the DeepSpeed engine, with --deepspeed
    if ds_config is not None:
        # ZeRO wraps ``optim`` and steps it, so setting its learning rate below still works.
        engine = Z.initialize(model, optim, ds_config)
    plan = StepPlan(
        len(data.examples),
        cfg.batch_size,
        cfg.grad_accum,
        cfg.seed,
        info.world,
        lengths=[len(ex.input_ids) for ex in data.examples] if cfg.group_by_length else None,
    )
    total = _total_steps(cfg, plan)
    metrics_path = output / METRICS_FILE
    start = 0
    if cfg.resume:
        ckpt = None
        skipped = False
        for i, (path, saved_state) in enumerate(candidates):
            if i:  # a fallback: it must continue the same run too
                for note in _check_resume(cfg, path, saved_state, data_sha):
                    if info.main and note not in noted:
                        _note(note)
                    noted.add(note)
                R.for_resume(subset, path)  # the same subset as the newest one
            problem = None
            try:
                ckpt = read_checkpoint(path, info.rank, weights=engine is None)
            except CheckpointError as exc:
                problem = str(exc)
            # Every rank resumes from the same checkpoint: one that any rank cannot read is out.
            if D.all_reduce_sum(0.0 if problem is None else 1.0, info):
                if info.main:
                    _note(
                        f"--resume: skipping checkpoint {path.name}: "
                        f"{problem or 'another rank could not read it'}"
                    )
                ckpt, skipped = None, True
                continue
            if info.main and (skipped or path != checkpoints[-1]):
                _note(f"--resume: resuming from the newest intact checkpoint, {path.name}")
            break
        if ckpt is None:
            raise UserError(
                f"--resume: no checkpoint in {checkpoint_root(output)} could be loaded (see "
                "the notes above)"
            )
        if engine is not None:
            Z.load(engine, path)
        else:
            D.load_full_states(model, optim, ckpt["model"], ckpt["optimizer"], info)
        set_rng_state(ckpt["rng"])
        start = int(ckpt["state"]["step"])
        if info.main:
            torn = _truncate_metrics(metrics_path, start)
            if torn:
                _note(f"--resume: dropped {torn} unreadable (torn) line(s) of {metrics_path}")
        del ckpt
    elif info.main and metrics_path.exists():
        metrics_path.unlink()
    if info.main and start == 0:
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
    data_outside_share = None
    if subset is not None:
        inside, outside = R.data_counts((ex.labels for ex in data.examples), kept)
        data_outside_share = R.share(inside, outside)
        if info.main:
            print(R.describe(subset, inside, outside))

    def checkpoint(step: int) -> None:
        epoch, in_epoch = divmod(step, plan.steps_per_epoch)
        state = {
            "step": step,
            "total_steps": total,
            # Informational: the data order is a function of the seed and the step (batching).
            "data_position": {
                "epoch": epoch,
                "step_in_epoch": in_epoch,
                "steps_per_epoch": plan.steps_per_epoch,
            },
            "config": asdict(cfg),
            "data_sha256": data_sha,
        }
        if subset is not None:
            state["head_subset"] = subset.record()
        if engine is not None:
            # Gathered (a collective) only for the save_pretrained copy: ZeRO-3 resumes from
            # its own partitions, written by Z.save below.
            model_state = Z.full_model_state(model, info.main)
        else:
            model_state = D.full_model_state(model, info)
        write_checkpoint(
            output,
            step,
            model_state=model_state,
            optim_state=None if engine else D.full_optim_state(model, optim, info),
            state=state,
            model=model,
            tokenizer=tokenizer,
            rank=info.rank,
            keep=cfg.keep_checkpoints,
            barrier=(lambda: D.barrier(info)) if info.enabled else None,
            # DeepSpeed writes its partitions (a collective) into the temporary folder.
            extra=(lambda folder: Z.save(engine, folder)) if engine else None,
            files=subset_files,
        )

    autocast = info.device.type == "cuda"
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
    # metrics.jsonl (truncated above on a resume) and the --report-to backends, main rank only.
    tracker = open_trackers(
        cfg.report_to,
        output,
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
            t0 = time.perf_counter()
            lr = learning_rate(step, total, cfg.lr, cfg.warmup_ratio)
            for group in optim.param_groups:
                group["lr"] = lr
            all_batches = plan.step_batches(step)
            mine_batches = [
                collate([data.examples[i] for i in b], pad_id)
                for b in all_batches[info.rank :: info.world]
            ]
            # Targets the loss scores: with a head subset, those inside it (the others are left
            # out, so they must not dilute the token-summed loss's denominator either).
            if kept is None:
                local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in mine_batches)
                local_outside = 0
            else:
                counts = [R.count_targets(b["labels"], kept) for b in mine_batches]
                local_tokens = sum(c[0] for c in counts)
                local_outside = sum(c[1] for c in counts)
            # Every rank must run as many forwards as the others (FSDP2 and ZeRO-3 gather
            # parameters inside them): a rank short of micro-batches at an epoch's end repeats
            # the step's first one with weight 0.
            n_real = len(mine_batches)
            per_rank = -(-len(all_batches) // info.world)
            mine_batches += [
                collate([data.examples[i] for i in all_batches[0]], pad_id)
                for _ in range(per_rank - n_real)
            ]
            step_tokens = D.all_reduce_sum(local_tokens, info)
            n_micro = len(all_batches)
            sums = {"loss": 0.0, "confidence": 0.0, "accuracy": 0.0, "entropy": 0.0, "inputs": 0}
            forward = engine if engine is not None else model
            for j, b in enumerate(mine_batches):
                b = {k: v.to(info.device) for k, v in b.items()}
                with (
                    torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=autocast),
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
                if engine is not None:
                    engine.set_gradient_accumulation_boundary(j == len(mine_batches) - 1)
                    engine.backward(scaled * info.world, scale_wrt_gas=False)
                    engine.step()  # ZeRO's optimizer step (with clipping) at the boundary only
                else:
                    (scaled * info.world).backward()
                if j >= n_real:
                    continue
                sums["loss"] += float(out.loss.detach())
                for key in ("confidence", "accuracy", "entropy"):
                    sums[key] += getattr(stats, key) * stats.n_tokens
                sums["inputs"] += int(b["attention_mask"].sum())
            bad_params: list[str] = []
            grad_norm: float | None
            if engine is not None:
                # Already applied by engine.step(); a non-finite norm can only be reported.
                # (DeepSpeed measures it only when it clips: None without --max-grad-norm.)
                norm = engine.get_global_grad_norm()
                grad_norm = float(norm) if norm is not None else None
            else:
                # The norm is always measured (clipping at +inf changes nothing) so that a
                # non-finite gradient is caught before AdamW turns every parameter into NaN.
                grad_norm = float(
                    torch.nn.utils.clip_grad_norm_(
                        model.parameters(), cfg.max_grad_norm or float("inf")
                    )
                )
            finite = grad_norm is None or math.isfinite(grad_norm)
            if finite:
                if engine is None:
                    optim.step()
                consecutive_skips = 0
            elif engine is not None:
                consecutive_skips += 1
                bar.write(
                    f"step {step + 1}: gradient norm is {grad_norm}; DeepSpeed has applied the "
                    f"step ({consecutive_skips} in a row)"
                )
            else:
                consecutive_skips += 1
                skipped_steps += 1
                bad_params = _nonfinite_grads(model)
                bar.write(
                    f"step {step + 1}: gradient norm is {grad_norm}; optimizer step skipped "
                    f"({consecutive_skips} in a row); non-finite gradients in: "
                    f"{', '.join(bad_params) or '(none on this rank)'}"
                )
            if engine is None:
                optim.zero_grad(set_to_none=True)
            totals = {k: D.all_reduce_sum(v, info) for k, v in sums.items()}
            elapsed = time.perf_counter() - t0
            denom = max(step_tokens, 1)
            record = {
                "step": step + 1,
                "epoch": round(plan.epoch_of(step + 1), 4),
                "loss": totals["loss"] / denom,
                "lr": lr,
                "tokens_per_s": totals["inputs"] / elapsed,
                "confidence": totals["confidence"] / denom,
                "accuracy": totals["accuracy"] / denom,
                "entropy": totals["entropy"] / denom,
                "target_tokens": int(step_tokens),
                "grad_norm": grad_norm if finite else None,
                "skipped": not finite and engine is None,
            }
            if subset is not None:
                outside = int(D.all_reduce_sum(local_outside, info))
                record["outside_subset_tokens"] = outside
                record["outside_subset_share"] = R.share(int(step_tokens), outside)
            if bad_params:
                record["nonfinite_grads"] = bad_params
            evaluated = eval_set is not None and (
                step + 1 == total or (cfg.eval_every > 0 and (step + 1) % cfg.eval_every == 0)
            )
            if evaluated:
                record.update(
                    H.evaluate(
                        engine if engine is not None else model,
                        model,
                        eval_set,
                        batch_size=cfg.batch_size,
                        pad_id=pad_id,
                        info=info,
                        autocast=autocast,
                    )
                )
                ece = record["eval_ece"]
                if info.main:  # the figures are all-reduced: one line per run, not per rank
                    bar.write(
                        f"step {step + 1}: held-out loss {record['eval_loss']:.4f}, confidence "
                        f"{record['eval_confidence']:.3f}, accuracy "
                        f"{record['eval_accuracy']:.3f}, ECE "
                        f"{'n/a' if ece is None else f'{ece:.4f}'} ({record['eval_tokens']} tokens)"
                    )
            bar.update(1)
            if (step + 1) % cfg.log_every == 0 or step + 1 == total or evaluated:
                tracker.log(record)
                bar.set_postfix(
                    loss=f"{record['loss']:.4f}",
                    lr=f"{lr:.2e}",
                    tok_s=f"{record['tokens_per_s']:.0f}",
                    conf=f"{record['confidence']:.3f}",
                    acc=f"{record['accuracy']:.3f}",
                )
                if on_step:
                    on_step(record)
            if consecutive_skips >= cfg.max_skipped_steps:
                kept = (
                    "DeepSpeed applied them, so the parameters may be NaN"
                    if engine is not None
                    else "parameters were left as they were before them"
                )
                raise UserError(
                    f"training diverged: the gradient norm was not finite for "
                    f"{consecutive_skips} optimizer steps in a row (up to step {step + 1}); "
                    f"{kept}. Lower --lr, check the data, or resume from the last checkpoint "
                    f"in {output / 'checkpoints'}"
                )
            saved = cfg.save_every and (step + 1) % cfg.save_every == 0
            if saved and step + 1 != total:
                checkpoint(step + 1)
            if step + 1 != total and stopper.requested(lambda v: D.all_reduce_sum(v, info)):
                if not saved:
                    checkpoint(step + 1)
                raise TrainingStopped(
                    f"stopped by {stopper.name} after step {step + 1} of {total}; its "
                    f"checkpoint is in {checkpoint_root(output)}; rerun with --resume to go on",
                    step + 1,
                    stopper.signum or 15,
                )
    except torch.OutOfMemoryError as exc:
        optim.zero_grad(set_to_none=True)
        raise _oom_error(exc, info.device, model, cfg, f"at step {step + 1}") from exc
    except RuntimeError as exc:
        # The CPU allocator reports exhaustion as a plain RuntimeError.
        if "can't allocate memory" not in str(exc):
            raise
        optim.zero_grad(set_to_none=True)
        raise _oom_error(exc, info.device, model, cfg, f"at step {step + 1}") from exc
    finally:
        stopper.__exit__()
        bar.close()
        tracker.close()
    if total > start:
        checkpoint(total)
    final = save_final(model, tokenizer, output, info, zero3=engine is not None, files=subset_files)
    D.teardown(info)
    return {
        "last": record,
        "final": str(final),
        "steps": total,
        "dropped": dict(data.dropped),
        "skipped_steps": skipped_steps,
        "template": data.template,
        "outside_subset_share": data_outside_share,
    }
