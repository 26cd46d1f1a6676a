"""``calibrated-lm train``: label-smoothed SFT of a causal LM on the fused loss kernel."""

from __future__ import annotations

import argparse

from calibrated_lm.launcher import launch_env


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="fine-tune a causal LM with label smoothing on the fused loss",
        description=(
            "Supervised fine-tuning with label smoothing, computing the loss from the final "
            "hidden states without materialising the logits. Writes OUTPUT/metrics.jsonl, "
            "atomic checkpoints under OUTPUT/checkpoints/step-N/ and the trained model to "
            "OUTPUT/final (save_pretrained folders, both: pass either to `calibrated-lm eval "
            "--model`; a checkpoint also holds the optimizer, RNG and step state that --resume "
            "needs). Data: JSON or "
            "JSONL in Alpaca (instruction/input/output[/history]), chat (messages), ShareGPT "
            "(conversations) or prompt/completion form; loss only on assistant tokens. Under "
            "torchrun / accelerate launch it trains with FSDP2. Every argument is checked "
            "before the model is loaded; --resume continues from the newest intact checkpoint "
            "and refuses changed settings (data order, loss, optimizer) or changed data."
        ),
    )
    p.add_argument("--model", required=True, help="hub id, folder, .gguf or embedded name")
    p.add_argument("--data", required=True, help="JSON or JSONL training file")
    p.add_argument("--output", required=True, help="run folder (metrics, checkpoints, final)")
    p.add_argument(
        "--label-smoothing", type=float, default=0.1, help="eps, in [0, 1) (default 0.1)"
    )
    p.add_argument(
        "--epochs", type=float, default=2.0, help="passes over the data, > 0 (default 2)"
    )
    p.add_argument("--lr", type=float, default=2e-5, help="peak AdamW learning rate (2e-5)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch per GPU")
    p.add_argument("--grad-accum", type=int, default=16, help="micro-batches per optimizer step")
    p.add_argument("--max-seq-len", type=int, default=2048, help="truncate longer examples")
    p.add_argument(
        "--max-steps", type=int, default=None, help="optimizer steps, >= 1 (overrides epochs)"
    )
    p.add_argument(
        "--warmup-ratio",
        type=float,
        default=0.03,
        help="linear warmup share of the steps, in [0, 1] (0.03)",
    )
    p.add_argument(
        "--reduction",
        choices=("sum", "mean"),
        default="sum",
        help="sum: every target token of a step weighs the same (paper); mean: per micro-batch",
    )
    p.add_argument("--temperature", type=float, default=None, help="train on logits / T")
    p.add_argument("--softcap", type=float, default=None, help="train on c*tanh(z/c)")
    p.add_argument("--z-loss", type=float, default=0.0, help="z-loss coefficient (0)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument(
        "--max-grad-norm",
        type=float,
        default=1.0,
        help="clip the global gradient norm to this (default 1); 0 disables clipping (the norm "
        "is still measured and a non-finite one skips its step); negative values are refused",
    )
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument(
        "--save-every", type=int, default=500, help="checkpoint every N steps (0: only at the end)"
    )
    p.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept")
    p.add_argument("--log-every", type=int, default=1, help="metrics line every N steps")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest intact checkpoint, with the same settings and data",
    )
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute decoder activations in backward (less memory, ~30%% more compute)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile each decoder layer (fuses the elementwise work; the first steps "
        "are slower while it compiles)",
    )
    p.add_argument(
        "--no-group-by-length",
        action="store_true",
        help="keep the shuffled micro-batches as drawn (default: each step's examples are "
        "re-cut into micro-batches of similar length, which cuts padding)",
    )
    p.add_argument(
        "--deepspeed",
        default=None,
        metavar="CONFIG",
        help="DeepSpeed JSON config: shard with a ZeRO-3 engine instead of FSDP2 (several "
        "processes; the run sets batch sizes, clipping, bf16 and the optimizer)",
    )
    p.add_argument(
        "--eval-data",
        default=None,
        metavar="FILE",
        help="held-out JSON/JSONL (any --data layout): its target tokens are scored after the "
        "last step and every --eval-every steps; the step's metrics line gets eval_loss, "
        "eval_confidence, eval_accuracy, eval_entropy, eval_ece (15 bins) and eval_tokens",
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=0,
        metavar="N",
        help="score --eval-data every N optimizer steps (default 0: only after the last step)",
    )
    p.add_argument(
        "--report-to",
        default="none",
        metavar="BACKEND",
        help="also log every metrics.jsonl line to tensorboard (OUTPUT/tensorboard), wandb, "
        "or both (tensorboard,wandb); default none. Needs the package: pip install "
        "'calibrated-lm[tracking]' or 'calibrated-lm[wandb]'",
    )
    p.add_argument(
        "--head-subset",
        default=None,
        metavar="FILE",
        help="head_subset.json (calibrated_lm.models.head_subset), or a folder holding one: "
        "the output softmax over its V' tokens only (a tied head stays tied; only its kept "
        "rows get the head's gradients, targets outside the subset left out of the "
        "loss; each metrics line gets outside_subset_share). The file is saved into every "
        "checkpoint and final/, so `calibrated-lm eval` scores with it; a resume keeps it",
    )
    p.add_argument(
        "--token-cache",
        default=None,
        metavar="DIR",
        help="keep the tokenized --data in DIR, keyed by the file's bytes, the tokenizer and "
        "--max-seq-len: a restart or resume reads it back instead of tokenizing again",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from calibrated_lm.training.loop import TrainConfig, train

    cfg = TrainConfig(
        model=args.model,
        data=args.data,
        output=args.output,
        label_smoothing=args.label_smoothing,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_seq_len=args.max_seq_len,
        max_steps=args.max_steps,
        warmup_ratio=args.warmup_ratio,
        reduction=args.reduction,
        temperature=args.temperature,
        softcap=args.softcap,
        z_loss=args.z_loss,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm or None,  # 0: no clipping (negative: refused)
        seed=args.seed,
        device=args.device,
        resume=args.resume,
        save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints,
        log_every=args.log_every,
        progress=not args.no_progress,
        gradient_checkpointing=args.gradient_checkpointing,
        compile=args.compile,
        group_by_length=not args.no_group_by_length,
        deepspeed=args.deepspeed,
        eval_data=args.eval_data,
        eval_every=args.eval_every,
        report_to=args.report_to,
        head_subset=args.head_subset,
        token_cache=args.token_cache,
    )
    if args.no_progress:  # transformers' own bars too (loading and writing weights)
        import transformers

        transformers.utils.logging.disable_progress_bar()
    result = train(cfg)
    if not launch_env().is_main:  # one summary per run, not per rank
        return 0
    last = result["last"]
    if last:
        print(
            f"trained {result['steps']} steps: loss {last['loss']:.4f}, confidence "
            f"{last['confidence']:.3f}, accuracy {last['accuracy']:.3f}; model saved to "
            f"{result['final']}"
        )
    else:
        print(
            f"nothing left to train: the run is at step {result['steps']}, as many as asked for "
            f"or more; model at {result['final']}"
        )
    return 0
