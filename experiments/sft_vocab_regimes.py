"""Experiment (issue 6, claim 3, second regime): SFT calibration at two vocabulary sizes, same D.

No pretrained small-V/D model is available offline, so two tiny Llama models with the same
hidden size D (default 128, 2 layers, tied embeddings, ``capacity_sweep.make_model``) but very
different vocabularies (default V = 512 and V = 16,384: V/D = 4 and 128) are pretrained from
scratch on the Wikipedia text of ``corpus/`` (``wikitext2_test.raw`` without its last
``--pretrain-heldout-chars`` characters, plus ``wiki_demo.txt``), each with its own byte-level
BPE tokenizer (``tokenizers`` library, trained on the same text, ``<|endoftext|>`` as EOS/pad).
Each is then fine-tuned with ``calibrated_lm.training.loop.train`` (plain template, assistant
tokens only) on a mix of the instruction files (``common.mix_instruction_data``), with label
smoothing eps in {0, 0.1} x seeds {1, 2}, and the remedies T = 0.5 and C = 32 with eps in
{0, 0.1} (``--remedy-seeds``, default seed 1).

Both regimes see the same text: every record is reduced to its last turn and its prompt and
response are cut (at a line, sentence or word end) to ``--prompt-chars``/``--response-chars``
characters, so that no example is truncated by ``--max-seq-len`` in either tokenizer. The SFT
training set is a fixed random subset of ``--sft-records`` records of the training split.

The task: next-token prediction on the held-out responses (assistant tokens, the EOS included).
Every model (pretrained and SFT) is scored on exactly the same held-out text, with the logits
as saved (no training temperature or softcap; the remedies are also scored with their
training-time transform, a secondary view). Per token: confidence (max probability), whether
the argmax is the target, log-probability of the target. Metrics: accuracy, mean confidence,
ECE and RMS-CE (15 equal-width bins, ``calibrated_lm.calibration``), NLL, and an NLL-fitted
temperature on a fixed sample of held-out tokens (a diagnostic: > 1 means over-confident).
95% CIs: percentile bootstrap over held-out *examples* (all tokens of a drawn example together),
paired across the runs compared (the same draws for every run).

Resumable: every unit (prepare, pretrain, eval, train) writes its folder under ``--work`` and a
``done.json`` marker; a rerun skips finished ones. ``--max-minutes`` stops before starting a
unit once that much time has passed (rerun to continue). The report (``summary.json``,
``tables.md``, ``sft_vocab_regimes.png``) is written to ``--results`` whenever all units are
done, or with ``--report``.

Profiles (``--profile``, see PROFILES): ``planned`` (1,200 SFT records x 3 epochs) and ``long``
(400 x 12), each in its own ``--work``/``--results`` subfolder; both reuse the pretrained models
in ``--pretrained`` (refused if these were made with other pretraining settings).

Usage::

    python experiments/sft_vocab_regimes.py --profile planned   # run (or resume) everything
    python experiments/sft_vocab_regimes.py --profile long --max-minutes 10   # one chunk
    python experiments/sft_vocab_regimes.py --profile long --report   # only (re)write the report
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from capacity_sweep import make_model, token_stats, train_one  # noqa: E402
from common import mix_instruction_data, read_json, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DEFAULT_CORPUS = SHARED / "corpus"
DEFAULT_DATA = tuple(
    SHARED / "instruct" / f
    for f in ("alpaca_en_demo.json", "lima.json", "alpaca_eval_gpt4_outputs.json")
)
DEFAULT_WORK = ROOT / "runs" / "sft_vocab_regimes"
DEFAULT_RESULTS = ROOT / "experiments" / "results" / "sft_vocab_regimes"
DONE = "done.json"
EOS = "<|endoftext|>"
ECE_BINS = 15
FIGURE = "sft_vocab_regimes.png"
# SFT length. ``planned``: the design fixed before any run (1,200 records x 3 epochs). Its eps=0
# models did not become over-confident on the held-out responses (they stayed under-fitted), so
# ``long`` was added once, fixed before it ran: fewer records seen for many more epochs, the way
# over-confidence arises from fitting the SFT set. Both are reported.
PROFILES: dict[str, dict[str, Any]] = {
    "planned": {"sft_records": 1200, "sft_epochs": 3.0},
    "long": {"sft_records": 400, "sft_epochs": 12.0},
}
# Pretraining settings a pretrained folder must match to be reused by another profile.
PRETRAIN_KEYS = (
    "corpus_chars",
    "pretrain_heldout_chars",
    "pretrain_epochs",
    "pretrain_seq_len",
    "pretrain_batch",
    "pretrain_lr",
    "dim",
    "layers",
    "max_seq_len",
)


@dataclass(frozen=True)
class Run:
    """One SFT setting of one regime: label smoothing eps, optional temperature/softcap, seed."""

    eps: float
    seed: int
    temperature: float | None = None
    softcap: float | None = None

    def name(self) -> str:
        """e.g. ``eps0.1_T0.5_s1``."""
        parts = [f"eps{self.eps:g}"]
        if self.temperature is not None:
            parts.append(f"T{self.temperature:g}")
        if self.softcap is not None:
            parts.append(f"C{self.softcap:g}")
        return "_".join([*parts, f"s{self.seed}"])

    def remedy(self) -> str:
        """``plain``, ``T0.5`` or ``C32``: the training-time logit transform."""
        if self.temperature is not None:
            return f"T{self.temperature:g}"
        if self.softcap is not None:
            return f"C{self.softcap:g}"
        return "plain"

    def setting(self) -> str:
        """Seed-free label, e.g. ``SFT eps=0.1, T=0.5``."""
        s = f"SFT eps={self.eps:g}"
        if self.temperature is not None:
            s += f", T={self.temperature:g}"
        if self.softcap is not None:
            s += f", C={self.softcap:g}"
        return s


def planned_runs(seeds: list[int], remedy_seeds: list[int]) -> list[Run]:
    """In priority order: the eps comparison over ``seeds``, then the remedies."""
    runs = [Run(e, s) for s in seeds for e in (0.0, 0.1)]
    for t, c in ((0.5, None), (None, 32.0)):
        runs += [Run(e, s, temperature=t, softcap=c) for s in remedy_seeds for e in (0.0, 0.1)]
    return runs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    p.add_argument("--data", type=Path, nargs="+", default=list(DEFAULT_DATA))
    p.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default="planned",
        help="SFT length (see PROFILES); picks --work/--results subfolders and SFT defaults",
    )
    p.add_argument("--work", type=Path, default=None, help="default: runs/.../<profile>")
    p.add_argument("--pretrained", type=Path, default=DEFAULT_WORK / "pretrained")
    p.add_argument("--results", type=Path, default=None, help="default: results/.../<profile>")
    p.add_argument("--vocabs", default="512,16384")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--corpus-chars", type=int, default=None, help="use only this much text")
    p.add_argument("--pretrain-heldout-chars", type=int, default=48_000)
    p.add_argument("--pretrain-epochs", type=float, default=2.0)
    p.add_argument("--pretrain-seq-len", type=int, default=320)
    p.add_argument("--pretrain-batch", type=int, default=16)
    p.add_argument("--pretrain-lr", type=float, default=2e-3, help="scaled by sqrt(512/D)")
    p.add_argument("--holdout-frac", type=float, default=0.08)
    p.add_argument("--prompt-chars", type=int, default=160)
    p.add_argument("--response-chars", type=int, default=360)
    p.add_argument("--sft-records", type=int, default=None, help="default: the profile's")
    p.add_argument("--sft-epochs", type=float, default=None, help="default: the profile's")
    p.add_argument("--sft-lr", type=float, default=1e-3)
    p.add_argument("--sft-batch", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--remedy-seeds", default="1")
    p.add_argument("--temperature-tokens", type=int, default=1000)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--report", action="store_true", help="only write the report")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    prof = PROFILES[args.profile]
    if args.sft_records is None:
        args.sft_records = prof["sft_records"]
    if args.sft_epochs is None:
        args.sft_epochs = prof["sft_epochs"]
    if args.work is None:
        args.work = DEFAULT_WORK / args.profile
    if args.results is None:
        args.results = DEFAULT_RESULTS / args.profile
    return args


# ------------------------------------------------------------------------------------- data


def cut_text(text: str, limit: int) -> str:
    """``text`` if it has at most ``limit`` characters, else its longest prefix of at most
    ``limit`` characters ending at a line end, else a sentence end, else a word end (each
    searched in the second half of the prefix), else the hard cut; trailing space removed."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    for seps in (("\n",), (". ", "! ", "? "), (" ",)):
        at = max(head.rfind(s) for s in seps)
        if at >= limit // 2:
            return head[: at + 1].rstrip()
    return head.rstrip()


def shorten_record(rec: dict[str, Any], prompt_chars: int, response_chars: int) -> dict[str, Any]:
    """The record's last turn only (``history`` dropped), prompt and response cut by
    :func:`cut_text`; the prompt budget goes to the instruction first, then to the input."""
    instr = cut_text(rec["instruction"], prompt_chars)
    out = {"instruction": instr, "output": cut_text(rec["output"], response_chars)}
    room = prompt_chars - len(instr) - 2
    if rec.get("input") and room > 20:
        out["input"] = cut_text(rec["input"], room)
    return out


def prepare_data(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Mix, split (held-out), shorten and subsample the instruction data into ``folder``."""
    import random

    for f in args.data:
        if not f.is_file():
            raise SystemExit(f"error: instruction data file {f} does not exist")
    info = mix_instruction_data(args.data, folder, holdout_frac=args.holdout_frac, seed=0)
    for split in ("train", "heldout"):
        recs = read_json(folder / f"{split}.json")
        recs = [shorten_record(r, args.prompt_chars, args.response_chars) for r in recs]
        if split == "train" and len(recs) > args.sft_records:
            recs = random.Random(0).sample(recs, args.sft_records)
        (folder / f"{split}.json").write_text(json.dumps(recs), encoding="utf-8")
        info[f"n_{split}_used"] = len(recs)
        info[f"{split}_response_chars"] = sum(len(r["output"]) for r in recs)
    info["shortening"] = {
        "history": "dropped (last turn kept)",
        "prompt_chars": args.prompt_chars,
        "response_chars": args.response_chars,
        "train_subset": f"{args.sft_records} records, random.Random(0).sample",
    }
    return info


def corpus_texts(args: argparse.Namespace) -> tuple[str, str]:
    """(pretraining text, held-out text): Wikipedia text of the corpus folder; the held-out
    slice is the end of wikitext2_test.raw (disjoint articles)."""
    a = (args.corpus / "wikitext2_test.raw").read_text(encoding="utf-8")
    b = (args.corpus / "wiki_demo.txt").read_text(encoding="utf-8")
    if args.corpus_chars is not None:
        a, b = a[: args.corpus_chars], b[: args.corpus_chars]
    k = args.pretrain_heldout_chars
    return a[:-k] + "\n" + b, a[-k:]


def build_tokenizer(text: str, vocab: int, folder: Path):  # -> PreTrainedTokenizerFast
    """Byte-level BPE with ``vocab`` entries (``<|endoftext|>``, 256 bytes, merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[EOS],
        show_progress=False,
    )
    tok.train_from_iterator(text.split("\n"), trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)
    hf.save_pretrained(folder)
    return hf


# ---------------------------------------------------------------------------------- pretrain


def pretrain(args: argparse.Namespace, vocab: int, folder: Path) -> dict[str, Any]:
    """Tokenizer + LM pretraining (plain CE, random windows, ``capacity_sweep.train_one``);
    saves a transformers folder (model + tokenizer) and the held-out Wikipedia statistics."""
    import torch

    text, held = corpus_texts(args)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = build_tokenizer(text, vocab, tmp)
    v = len(tok)
    ids = np.asarray(tok(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    held_ids = np.asarray(tok(held, add_special_tokens=False)["input_ids"], dtype=np.int64)
    model = make_model(v, args.dim, args.layers, args.max_seq_len, seed=0)
    model.config.eos_token_id = model.config.pad_token_id = tok.eos_token_id
    model.config.bos_token_id = None
    targs = argparse.Namespace(
        seed=0,
        seq_len=args.pretrain_seq_len,
        epochs=args.pretrain_epochs,
        batch=args.pretrain_batch,
        lr=args.pretrain_lr,
    )
    t0 = time.monotonic()
    log = train_one(model, ids, targs, eps=0.0, desc=f"pretrain V={v}")
    train_s = time.monotonic() - t0
    stats = token_stats(model, held_ids, args.pretrain_seq_len, v)
    model.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    with torch.no_grad():
        params = sum(p.numel() for p in model.parameters())
    return {
        "pretrain_settings": {k: getattr(args, k) for k in PRETRAIN_KEYS},
        "vocab": v,
        "vocab_requested": vocab,
        "dim": args.dim,
        "v_over_d": v / args.dim,
        "layers": args.layers,
        "params": params,
        "pretrain_tokens": int(len(ids)),
        "pretrain_chars_per_token": len(text) / max(1, len(ids)),
        "pretrain_steps": log[-1][0] + 1 if log else 0,
        "pretrain_s": round(train_s, 1),
        "loss_log": log,
        "wiki_heldout": {
            "tokens": int(len(stats["conf"])),
            "nll": float(-stats["logp_y"].mean()),
            "accuracy": float(stats["correct"].mean()),
            "mean_confidence": float(stats["conf"].mean()),
            "ece": _ece(stats["conf"], stats["correct"]),
        },
    }


# -------------------------------------------------------------------------------------- SFT


def sft(args: argparse.Namespace, base: Path, data: Path, run: Run, out: Path) -> dict[str, Any]:
    """``calibrated_lm.training.loop.train`` on the prepared training split."""
    from calibrated_lm.training.loop import TrainConfig, train

    cfg = TrainConfig(
        model=str(base),
        data=str(data / "train.json"),
        output=str(out),
        label_smoothing=run.eps,
        epochs=args.sft_epochs,
        lr=args.sft_lr,
        batch_size=args.sft_batch,
        grad_accum=1,
        max_seq_len=args.max_seq_len,
        temperature=run.temperature,
        softcap=run.softcap,
        seed=run.seed,
        device="cpu",
        resume=(out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()),
        save_every=0,
        log_every=5,
        progress=not args.no_progress,
    )
    t0 = time.monotonic()
    result = train(cfg)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # only needed to resume
    return {
        "train_s": round(time.monotonic() - t0, 1),
        "steps": result["steps"],
        "skipped_steps": result["skipped_steps"],
        "dropped": result["dropped"],
        "last": result["last"],
        "config": dataclasses.asdict(cfg),
    }


# --------------------------------------------------------------------------------- evaluation


def _ece(conf: np.ndarray, correct: np.ndarray, norm: str = "l1") -> float:
    from calibrated_lm.calibration import calibration_error

    return float(calibration_error(conf, correct, n_bins=ECE_BINS, norm=norm))


def evaluate(
    args: argparse.Namespace, model_dir: Path, data: Path, out: Path, run: Run | None
) -> dict[str, Any]:
    """Score the held-out responses; writes ``tokens.npz`` (per-token arrays) into ``out``.

    Arrays: ``example`` (held-out example index), ``conf``, ``correct``, ``logp_y`` for the
    logits as saved, and ``conf_train``/``correct_train``/``logp_y_train`` under the run's
    training-time transform (z / T or C tanh(z / C)) for remedy runs.
    """
    import torch
    from tqdm import tqdm

    from calibrated_lm.calibration import fit_temperature
    from calibrated_lm.models.loading import load_model
    from calibrated_lm.training.batching import collate
    from calibrated_lm.training.data import load_dataset

    model, tok = load_model(str(model_dir), dtype="float32", device="cpu")
    ds = load_dataset(data / "heldout.json", tok, max_seq_len=args.max_seq_len)
    if ds.dropped:
        raise SystemExit(f"error: held-out examples dropped while tokenizing: {dict(ds.dropped)}")
    truncated = sum(1 for ex in ds.examples if len(ex.input_ids) >= args.max_seq_len)
    transform = None
    if run is not None and run.temperature is not None:
        transform = lambda z: z / run.temperature  # noqa: E731
    elif run is not None and run.softcap is not None:
        transform = lambda z: run.softcap * torch.tanh(z / run.softcap)  # noqa: E731
    n_target = ds.n_target_tokens
    stride = max(1, n_target // max(1, args.temperature_tokens))
    cols: dict[str, list] = {k: [] for k in ("example", "conf", "correct", "logp_y")}
    if transform is not None:
        cols |= {"conf_train": [], "correct_train": [], "logp_y_train": []}
    fit_z, fit_y = [], []
    order = sorted(range(len(ds.examples)), key=lambda i: len(ds.examples[i].input_ids))
    seen = 0
    with torch.no_grad():
        for i in tqdm(
            range(0, len(order), 8), desc=f"eval {out.name}", leave=False, disable=args.no_progress
        ):
            idx = order[i : i + 8]
            b = collate([ds.examples[j] for j in idx], tok.pad_token_id)
            z = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            y = b["labels"][:, 1:]
            mask = y != -100
            z = z[:, :-1][mask].float()
            y = y[mask]
            ex = torch.tensor(idx)[:, None].expand_as(mask)[mask]
            cols["example"].append(ex)
            views = [("", z)] + ([("_train", transform(z))] if transform else [])
            for suffix, zz in views:
                lp = torch.log_softmax(zz, -1)
                top, pred = lp.max(-1)
                cols["conf" + suffix].append(top.exp())
                cols["correct" + suffix].append((pred == y).float())
                cols["logp_y" + suffix].append(lp.gather(1, y[:, None])[:, 0])
            pick = (torch.arange(seen, seen + len(y)) % stride) == 0
            fit_z.append(z[pick])
            fit_y.append(y[pick])
            seen += len(y)
    arrays = {k: torch.cat(v).numpy() for k, v in cols.items()}
    arrays["example"] = arrays["example"].astype(np.int64)
    for k in arrays:
        if k != "example":
            arrays[k] = arrays[k].astype(np.float64)
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "tokens.npz", **arrays)
    zf = torch.cat(fit_z).double().numpy()
    t_fit = fit_temperature(zf, torch.cat(fit_y).numpy(), tol=1e-4)
    res = point_metrics(arrays)
    res |= {
        "examples": len(ds.examples),
        "examples_at_max_seq_len": truncated,
        "fitted_temperature": t_fit,
        "fitted_temperature_tokens": int(zf.shape[0]),
        "model": model_dir.name if model_dir.name != "final" else model_dir.parent.name,
    }
    if transform is not None:
        res["train_transform"] = point_metrics(arrays, "_train")
    return res


def point_metrics(a: dict[str, np.ndarray], suffix: str = "") -> dict[str, float]:
    conf, correct, lp = a["conf" + suffix], a["correct" + suffix], a["logp_y" + suffix]
    return {
        "tokens": int(len(conf)),
        "accuracy": float(correct.mean()),
        "mean_confidence": float(conf.mean()),
        "overconfidence": float(conf.mean() - correct.mean()),
        "ece": _ece(conf, correct),
        "rms_ce": _ece(conf, correct, "l2"),
        "nll": float(-lp.mean()),
    }


# ------------------------------------------------------------------------------------- units


@dataclass
class Unit:
    name: str
    folder: Path
    action: Any  # () -> dict

    def done(self) -> bool:
        return (self.folder / DONE).exists()


def regime_name(vocab: int, dim: int) -> str:
    return f"V{vocab}_D{dim}"


def units(args: argparse.Namespace) -> list[Unit]:
    w = args.work
    data = w / "data"
    vocabs = [int(v) for v in args.vocabs.split(",")]
    runs = planned_runs(_ints(args.seeds), _ints(args.remedy_seeds))
    out = [Unit("prepare", data, lambda: prepare_data(args, data))]
    for v in vocabs:
        r = w / regime_name(v, args.dim)
        base = args.pretrained / r.name
        out.append(Unit(f"{r.name}/pretrain", base, lambda v=v, base=base: pretrain(args, v, base)))
        out.append(
            Unit(
                f"{r.name}/eval/pretrained",
                r / "evals" / "pretrained",
                lambda base=base, r=r: evaluate(args, base, data, r / "evals" / "pretrained", None),
            )
        )
    for run in runs:  # both regimes of a setting before the next setting
        for v in vocabs:
            r = w / regime_name(v, args.dim)
            sft_dir = r / "sft" / run.name()
            ev_dir = r / "evals" / run.name()
            out.append(
                Unit(
                    f"{r.name}/sft/{run.name()}",
                    sft_dir,
                    lambda r=r, run=run, d=sft_dir: (
                        sft(args, args.pretrained / r.name, data, run, d)
                        | {"setting": run.setting(), "eps": run.eps, "seed": run.seed}
                    ),
                )
            )
            out.append(
                Unit(
                    f"{r.name}/eval/{run.name()}",
                    ev_dir,
                    lambda run=run, d=sft_dir, e=ev_dir: evaluate(args, d / "final", data, e, run),
                )
            )
    return out


def check_pretrained(args: argparse.Namespace) -> None:
    """Refuse to reuse a pretrained model made with other pretraining settings."""
    want = {k: getattr(args, k) for k in PRETRAIN_KEYS}
    for v in args.vocabs.split(","):
        done = args.pretrained / regime_name(int(v), args.dim) / DONE
        if done.exists():
            have = read_json(done).get("pretrain_settings")
            if have != want:
                raise SystemExit(
                    f"error: {done.parent} was pretrained with other settings ({have}); pass "
                    "another --pretrained folder"
                )


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def run_units(args: argparse.Namespace) -> bool:
    """Run unfinished units in order; returns whether all are done."""
    from tqdm import tqdm

    t0 = time.monotonic()
    todo = units(args)
    check_pretrained(args)
    bar = tqdm(todo, desc="sft_vocab_regimes", disable=args.no_progress)
    for u in bar:
        if u.done():
            continue
        if args.max_minutes is not None and time.monotonic() - t0 > 60 * args.max_minutes:
            print("time budget reached; rerun to continue", file=sys.stderr)
            return False
        bar.set_postfix(unit=u.name)
        start = time.monotonic()
        result = u.action()
        result["unit_s"] = round(time.monotonic() - start, 1)
        write_json(u.folder / DONE, result)
    return all(u.done() for u in todo)


# ------------------------------------------------------------------------------------ report


def _example_bin_sums(a: dict[str, np.ndarray], n_examples: int) -> np.ndarray:
    """(examples, bins, 3) per-example [count, confidence, correct] sums per ECE bin."""
    from calibrated_lm.calibration import bin_indices

    b = bin_indices(a["conf"], ECE_BINS, "width")
    flat = a["example"] * ECE_BINS + b
    out = np.zeros((n_examples * ECE_BINS, 3))
    for j, x in enumerate((np.ones_like(a["conf"]), a["conf"], a["correct"])):
        out[:, j] = np.bincount(flat, weights=x, minlength=n_examples * ECE_BINS)
    return out.reshape(n_examples, ECE_BINS, 3)


class Resampler:
    """Paired example-level bootstrap: every run is resampled with the same example draws."""

    def __init__(self, n_examples: int, draws: int) -> None:
        from calibrated_lm.calibration.bootstrap import bootstrap_indices
        from calibrated_lm.calibration.resampled import multiplicities

        self.n = n_examples
        self.w = multiplicities(bootstrap_indices(n_examples, draws, seed=0), n_examples)
        self._cache: dict[str, dict[str, np.ndarray]] = {}

    def draws(self, key: str, a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per-draw ECE, RMS-CE, accuracy, confidence and NLL of one run."""
        if key not in self._cache:
            from calibrated_lm.calibration.resampled import errors_from_sums

            sums = _example_bin_sums(a, self.n)
            per_draw = np.einsum("be,ekj->bkj", self.w, sums)
            err = errors_from_sums(per_draw)
            cnt = per_draw[..., 0].sum(1)
            nll_ex = np.bincount(a["example"], weights=-a["logp_y"], minlength=self.n)
            self._cache[key] = {
                "ece": err["ece"],
                "rms_ce": err["rms_ce"],
                "accuracy": per_draw[..., 2].sum(1) / cnt,
                "mean_confidence": per_draw[..., 1].sum(1) / cnt,
                "nll": (self.w @ nll_ex) / cnt,
            }
        return self._cache[key]


def _ci(x: np.ndarray) -> list[float]:
    from calibrated_lm.calibration import percentile_interval

    return percentile_interval(x)


def report(args: argparse.Namespace) -> dict[str, Any]:
    """Gather every finished evaluation into summary.json, tables.md and the figure."""
    w, res_dir = args.work, args.results
    res_dir.mkdir(parents=True, exist_ok=True)
    data_info = read_json(w / "data" / DONE)
    regimes: list[dict[str, Any]] = []
    runs = planned_runs(_ints(args.seeds), _ints(args.remedy_seeds))
    total_s = data_info.get("unit_s", 0.0)
    pretrain_s = 0.0
    for v in [int(x) for x in args.vocabs.split(",")]:
        r = w / regime_name(v, args.dim)
        if not (r / "evals" / "pretrained" / DONE).exists():
            continue
        pre = read_json(args.pretrained / r.name / DONE)
        pretrain_s += pre["unit_s"]
        evals: dict[str, dict] = {}
        arrays: dict[str, dict[str, np.ndarray]] = {}
        for name, run in [("pretrained", None)] + [(x.name(), x) for x in runs]:
            done = r / "evals" / name / DONE
            if not done.exists():
                continue
            evals[name] = read_json(done)
            # Older markers hold the absolute model path: keep only the run's name.
            m = Path(evals[name]["model"])
            evals[name]["model"] = m.parent.name if m.name == "final" else m.name
            total_s += evals[name]["unit_s"]
            if run is not None:
                tr = read_json(r / "sft" / name / DONE)
                total_s += tr["unit_s"]
                evals[name]["train"] = {
                    k: tr[k] for k in ("train_s", "steps", "skipped_steps", "last")
                }
                evals[name] |= {
                    "setting": run.setting(),
                    "eps": run.eps,
                    "seed": run.seed,
                    "remedy": run.remedy(),
                }
            with np.load(r / "evals" / name / "tokens.npz") as z:
                arrays[name] = {k: z[k] for k in z.files}
        n_ex = evals["pretrained"]["examples"]
        rs = Resampler(n_ex, args.bootstrap)
        for name, e in evals.items():
            d = rs.draws(name, arrays[name])
            e["ci95"] = {k: _ci(d[k]) for k in ("ece", "rms_ce", "accuracy", "nll")}
        settings = _settings(evals, rs, arrays)
        benefits = _benefits(evals, rs, arrays)
        regimes.append(
            {
                "name": r.name,
                "vocab": pre["vocab"],
                "dim": pre["dim"],
                "v_over_d": pre["v_over_d"],
                "params": pre["params"],
                "pretrain": {k: x for k, x in pre.items() if k != "loss_log"},
                "evals": evals,
                "settings": settings,
                "ls_benefit": benefits,
                "recovery": _recovery(evals, rs, arrays),
                "reliability": {
                    k: _reliability(arrays[k])
                    for k in ("pretrained", "eps0_s1", "eps0.1_s1")
                    if k in arrays
                },
            }
        )
    summary = {
        "claim": "label smoothing's calibration benefit at small vs large V/D (same D); "
        "training-time T=0.5 / C=32 as remedies",
        "data": data_info,
        "corpus": {
            "pretraining": ["wikitext2_test.raw (without its held-out tail)", "wiki_demo.txt"],
            "pretrain_heldout_chars": args.pretrain_heldout_chars,
        },
        "settings": {
            k: getattr(args, k)
            for k in (
                "vocabs",
                "dim",
                "layers",
                "pretrain_epochs",
                "pretrain_seq_len",
                "pretrain_batch",
                "pretrain_lr",
                "holdout_frac",
                "prompt_chars",
                "response_chars",
                "sft_records",
                "sft_epochs",
                "sft_lr",
                "sft_batch",
                "max_seq_len",
                "seeds",
                "remedy_seeds",
                "temperature_tokens",
                "bootstrap",
            )
        },
        "metrics": "next-token on held-out assistant tokens; ECE/RMS-CE: 15 equal-width bins "
        "(calibrated_lm.calibration); CIs: 95% percentile bootstrap over held-out examples, "
        "paired across runs",
        "pretrain_unit_seconds": round(pretrain_s, 1),
        "sft_eval_unit_seconds": round(total_s, 1),
        "wall_minutes": _wall_minutes(w),
        "regimes": regimes,
    }
    write_json(res_dir / "summary.json", summary)
    (res_dir / "tables.md").write_text(tables(summary), encoding="utf-8")
    if regimes:
        plot(summary, res_dir / FIGURE)
    return summary


def _wall_minutes(work: Path) -> float:
    """Minutes from the start of the ``prepare`` unit to the last marker written under ``work``
    (pretraining is included only where it ran inside that span)."""
    marks = [p.stat().st_mtime for p in work.rglob(DONE)]
    start = (work / "data" / DONE).stat().st_mtime - read_json(work / "data" / DONE)["unit_s"]
    return round((max(marks) - start) / 60, 1)


def _settings(evals: dict, rs: Resampler, arrays: dict) -> list[dict[str, Any]]:
    """Seed-mean metrics per setting, with CIs of the seed mean (paired example draws)."""
    groups: dict[str, list[str]] = {}
    for name, e in evals.items():
        groups.setdefault(e.get("setting", "pretrained"), []).append(name)
    out = []
    for setting, names in groups.items():
        row: dict[str, Any] = {"setting": setting, "runs": names, "seeds": len(names)}
        for k in ("ece", "rms_ce", "accuracy", "mean_confidence", "nll", "overconfidence"):
            vals = [evals[n][k] for n in names]
            row[k] = float(np.mean(vals))
            row[k + "_per_seed"] = vals
        for k in ("ece", "rms_ce", "accuracy", "nll"):
            row[k + "_ci95"] = _ci(np.mean([rs.draws(n, arrays[n])[k] for n in names], axis=0))
        row["fitted_temperature"] = float(np.mean([evals[n]["fitted_temperature"] for n in names]))
        if all("train_transform" in evals[n] for n in names):
            row["train_transform_ece"] = float(
                np.mean([evals[n]["train_transform"]["ece"] for n in names])
            )
            row["train_transform_mean_confidence"] = float(
                np.mean([evals[n]["train_transform"]["mean_confidence"] for n in names])
            )
        out.append(row)
    return out


def _view(a: dict[str, np.ndarray], suffix: str) -> dict[str, np.ndarray]:
    """The per-token arrays of one scoring view (``""``: saved logits, ``"_train"``: with the
    training-time transform) under the plain names."""
    return {k: a[k + suffix] for k in ("conf", "correct", "logp_y")} | {"example": a["example"]}


def _benefits(evals: dict, rs: Resampler, arrays: dict) -> dict[str, dict[str, Any]]:
    """Per remedy: ECE/RMS-CE(eps=0) - (eps=0.1) over the seeds both have; paired CIs.

    Keys ``plain``, ``T0.5``, ``C32`` (saved logits) and ``T0.5 as trained``, ``C32 as
    trained`` (scored with the training-time transform)."""
    out: dict[str, dict[str, Any]] = {}
    for remedy, suffix in (
        ("plain", ""),
        ("T0.5", ""),
        ("C32", ""),
        ("T0.5", "_train"),
        ("C32", "_train"),
    ):
        pairs = []
        for n0, e0 in evals.items():
            if e0.get("remedy") != remedy or e0["eps"] != 0.0:
                continue
            n1 = n0.replace("eps0_", "eps0.1_", 1)
            if n1 in evals:
                pairs.append((n0, n1, e0["seed"]))
        if not pairs:
            continue
        row: dict[str, Any] = {"seeds": [s for *_, s in pairs]}
        point = {
            n: evals[n]["train_transform"] if suffix else evals[n] for p in pairs for n in p[:2]
        }
        res = {n: rs.draws(n + suffix, _view(arrays[n], suffix)) for n in point}
        for k in ("ece", "rms_ce", "accuracy", "nll"):
            diffs = [point[a][k] - point[b][k] for a, b, _ in pairs]
            row[k] = float(np.mean(diffs))
            row[k + "_per_seed"] = diffs
            dd = [res[a][k] - res[b][k] for a, b, _ in pairs]
            row[k + "_ci95"] = _ci(np.mean(dd, axis=0))
        out[remedy + (" as trained" if suffix else "")] = row
    return out


def _recovery(evals: dict, rs: Resampler, arrays: dict) -> dict[str, dict[str, Any]]:
    """Per transform view: its LS benefit minus the plain LS benefit, seed by seed over the
    seeds both have (remedy seeds), with a paired CI: what T or C adds to label smoothing.

    benefit = ECE(eps=0) - ECE(eps=0.1); recovery = benefit(transform) - benefit(plain)."""
    out: dict[str, dict[str, Any]] = {}
    for remedy, tag, suffix in (
        ("T0.5", "T0.5", ""),
        ("C32", "C32", ""),
        ("T0.5", "T0.5 as trained", "_train"),
        ("C32", "C32 as trained", "_train"),
    ):
        seeds = [
            e["seed"]
            for n, e in evals.items()
            if e.get("remedy") == remedy
            and e["eps"] == 0.0
            and all(
                x in evals
                for x in (
                    n.replace("eps0_", "eps0.1_", 1),
                    f"eps0_s{e['seed']}",
                    f"eps0.1_s{e['seed']}",
                )
            )
        ]
        if not seeds:
            continue
        vals, draws = [], []
        for sd in seeds:
            names = {
                "t0": (f"eps0_{remedy}_s{sd}", suffix),
                "t1": (f"eps0.1_{remedy}_s{sd}", suffix),
                "p0": (f"eps0_s{sd}", ""),
                "p1": (f"eps0.1_s{sd}", ""),
            }
            pt = {
                k: (evals[n]["train_transform"] if sf else evals[n])["ece"]
                for k, (n, sf) in names.items()
            }
            dr = {k: rs.draws(n + sf, _view(arrays[n], sf))["ece"] for k, (n, sf) in names.items()}
            vals.append((pt["t0"] - pt["t1"]) - (pt["p0"] - pt["p1"]))
            draws.append((dr["t0"] - dr["t1"]) - (dr["p0"] - dr["p1"]))
        out[tag] = {
            "seeds": seeds,
            "ece_recovery": float(np.mean(vals)),
            "ece_recovery_ci95": _ci(np.mean(draws, axis=0)),
        }
    return out


def _reliability(a: dict[str, np.ndarray]) -> dict[str, list]:
    from calibrated_lm.calibration import bin_table

    t = bin_table(a["conf"], a["correct"], n_bins=ECE_BINS)
    # Empty bins have NaN means: null in strict JSON.
    return {
        k: [None if not math.isfinite(x) else float(x) for x in getattr(t, k)]
        for k in ("lower", "upper", "count", "accuracy", "confidence")
    }


def _fmt_ci(x: float, ci: list[float]) -> str:
    return f"{x:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def tables(summary: dict[str, Any]) -> str:
    lines = ["# SFT calibration at two vocabulary sizes (same D): tables", ""]
    lines.append(
        "Next-token prediction on the held-out responses (assistant tokens). Seed-mean values; "
        "brackets: 95% bootstrap CI over held-out examples (paired across runs). "
        "T fit: NLL-fitted temperature on a token sample (> 1 = over-confident)."
    )
    lines += _overview(summary)
    for reg in summary["regimes"]:
        pre = reg["pretrain"]
        lines += [
            "",
            f"## {reg['name']}: V = {reg['vocab']:,}, D = {reg['dim']}, V/D = "
            f"{reg['v_over_d']:.0f}, {reg['params']:,} parameters",
            "",
            f"Pretraining: {pre['pretrain_tokens']:,} tokens x {summary['settings']['pretrain_epochs']}"
            f" epochs ({pre['pretrain_steps']} steps, {pre['pretrain_s']:.0f} s); held-out "
            f"Wikipedia NLL {pre['wiki_heldout']['nll']:.3f}, accuracy "
            f"{pre['wiki_heldout']['accuracy']:.3f}, ECE {pre['wiki_heldout']['ece']:.3f}. "
            f"Held-out responses: {reg['evals']['pretrained']['examples']} examples, "
            f"{reg['evals']['pretrained']['tokens']:,} tokens.",
            "",
            "| setting | seeds | accuracy | confidence | ECE | RMS-CE | NLL | T fit |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for s in reg["settings"]:
            lines.append(
                f"| {s['setting']} | {s['seeds']} | {s['accuracy']:.3f} | "
                f"{s['mean_confidence']:.3f} | {_fmt_ci(s['ece'], s['ece_ci95'])} | "
                f"{_fmt_ci(s['rms_ce'], s['rms_ce_ci95'])} | {s['nll']:.3f} | "
                f"{s['fitted_temperature']:.2f} |"
            )
        lines += [
            "",
            "Label-smoothing benefit (eps=0 minus eps=0.1; positive = LS lowers the error), "
            "seed mean, paired CI:",
            "",
            "| training transform | seeds | ECE benefit | per seed | RMS-CE benefit | "
            "accuracy change (eps0 - eps0.1) |",
            "|---|---|---|---|---|---|",
        ]
        for remedy, b in reg["ls_benefit"].items():
            per = ", ".join(f"{x:+.3f}" for x in b["ece_per_seed"])
            lines.append(
                f"| {remedy} | {len(b['seeds'])} | {_fmt_ci(b['ece'], b['ece_ci95'])} | {per} | "
                f"{_fmt_ci(b['rms_ce'], b['rms_ce_ci95'])} | "
                f"{_fmt_ci(b['accuracy'], b['accuracy_ci95'])} |"
            )
        tt = [s for s in reg["settings"] if "train_transform_ece" in s]
        if tt:
            lines += [
                "",
                "Remedy runs scored with their training-time transform applied (z/T or "
                "C tanh(z/C)) instead of the saved logits:",
                "",
                "| setting | ECE (transform) | confidence (transform) |",
                "|---|---|---|",
            ]
            for s in tt:
                lines.append(
                    f"| {s['setting']} | {s['train_transform_ece']:.3f} | "
                    f"{s['train_transform_mean_confidence']:.3f} |"
                )
    lines += [
        "",
        f"Time: pretraining {summary['pretrain_unit_seconds'] / 60:.1f} min (both regimes; "
        "shared by the profiles), SFT + evaluations of this profile "
        f"{summary['sft_eval_unit_seconds'] / 60:.1f} min; wall time from the first to the last "
        f"marker of this profile's folder: {summary['wall_minutes']:.1f} min.",
    ]
    return "\n".join(lines) + "\n"


def _overview(summary: dict[str, Any]) -> list[str]:
    """One row per regime: over-confidence after SFT and the LS benefit per transform."""
    keys = ["plain", "T0.5", "T0.5 as trained", "C32", "C32 as trained"]
    lines = [
        "",
        "## Overview",
        "",
        "conf - acc: mean confidence minus accuracy (seed mean). LS benefit: ECE(eps=0) - "
        "ECE(eps=0.1), paired 95% CI; 'as trained': scored with z/T or C tanh(z/C).",
        "",
        "| regime | V/D | conf - acc: pretrained | SFT eps=0 | SFT eps=0.1 | "
        + " | ".join(f"LS benefit, {k}" for k in keys)
        + " |",
        "|---" * (5 + len(keys)) + "|",
    ]
    for reg in summary["regimes"]:
        by = {s["setting"]: s for s in reg["settings"]}
        oc = [by[k]["overconfidence"] if k in by else None for k in ("pretrained", "SFT eps=0")]
        oc.append(by["SFT eps=0.1"]["overconfidence"] if "SFT eps=0.1" in by else None)
        cells = [f"{x:+.3f}" if x is not None else "-" for x in oc]
        for k in keys:
            b = reg["ls_benefit"].get(k)
            cells.append(_fmt_ci(b["ece"], b["ece_ci95"]) if b else "-")
        lines.append(f"| {reg['name']} | {reg['v_over_d']:.0f} | " + " | ".join(cells) + " |")
    rec_keys = ["T0.5", "T0.5 as trained", "C32", "C32 as trained"]
    lines += [
        "",
        "Recovery: LS benefit with the transform minus the plain LS benefit, on the same seeds "
        "(the remedy seeds), paired 95% CI (positive: the transform adds to LS's benefit):",
        "",
        "| regime | seeds | " + " | ".join(f"recovery, {k}" for k in rec_keys) + " |",
        "|---" * (2 + len(rec_keys)) + "|",
    ]
    for reg in summary["regimes"]:
        rec = reg.get("recovery", {})
        seeds = next(iter(rec.values()))["seeds"] if rec else []
        cells = [
            _fmt_ci(rec[k]["ece_recovery"], rec[k]["ece_recovery_ci95"]) if k in rec else "-"
            for k in rec_keys
        ]
        lines.append(f"| {reg['name']} | {','.join(map(str, seeds))} | " + " | ".join(cells) + " |")
    return lines


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regs = summary["regimes"]
    rows = 1 + math.ceil(len(regs) / 2)
    fig, grid = plt.subplots(rows, 2, figsize=(11, 4.6 * rows), squeeze=False)
    axes = list(grid.ravel())
    for ax in axes[2 + len(regs) :]:
        ax.axis("off")
    colors = plt.cm.tab10(np.arange(len(regs)))
    ax = axes[0]
    width = 0.8 / len(regs)
    labels = [s["setting"] for s in regs[0]["settings"]]
    for i, reg in enumerate(regs):
        by = {s["setting"]: s for s in reg["settings"]}
        xs, ys, lo, hi = [], [], [], []
        for j, lab in enumerate(labels):
            if lab in by:
                s = by[lab]
                xs.append(j + (i - (len(regs) - 1) / 2) * width)
                ys.append(s["ece"])
                # ECE is biased upwards: a bootstrap interval can lie above the estimate.
                lo.append(max(0.0, s["ece"] - s["ece_ci95"][0]))
                hi.append(max(0.0, s["ece_ci95"][1] - s["ece"]))
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, color=colors[i], label=reg["name"])
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=7)
    ax.set_ylabel("held-out next-token ECE")
    ax.set_title("ECE by setting (seed mean, 95% CI)")
    ax.legend(fontsize=7)
    ax = axes[1]
    remedies = ["plain", "T0.5", "C32", "T0.5 as trained", "C32 as trained"]
    for i, reg in enumerate(regs):
        xs, ys, lo, hi = [], [], [], []
        for j, rem in enumerate(remedies):
            b = reg["ls_benefit"].get(rem)
            if b is None:
                continue
            xs.append(j + (i - (len(regs) - 1) / 2) * width)
            ys.append(b["ece"])
            lo.append(max(0.0, b["ece"] - b["ece_ci95"][0]))
            hi.append(max(0.0, b["ece_ci95"][1] - b["ece"]))
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, color=colors[i], label=reg["name"])
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(range(len(remedies)))
    ax.set_xticklabels(
        ["no transform", "T=0.5", "C=32", "T=0.5\nas trained", "C=32\nas trained"], fontsize=8
    )
    ax.set_ylabel("ECE(eps=0) - ECE(eps=0.1)")
    ax.set_title("label-smoothing benefit (paired 95% CI)")
    ax.legend(fontsize=7)
    for ax, reg in zip(axes[2:], regs):
        for key, lab, st in (
            ("pretrained", "pretrained", "k:"),
            ("eps0_s1", "SFT eps=0 (seed 1)", "o-"),
            ("eps0.1_s1", "SFT eps=0.1 (seed 1)", "s--"),
        ):
            rel = reg["reliability"].get(key)
            if not rel:
                continue
            m = [i for i, c in enumerate(rel["count"]) if c]
            ax.plot(
                [rel["confidence"][i] for i in m], [rel["accuracy"][i] for i in m], st, label=lab
            )
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_title(f"reliability, {reg['name']} (V/D = {reg['v_over_d']:.0f})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if not args.report:
        if not (args.corpus / "wikitext2_test.raw").is_file():
            print(f"error: corpus folder {args.corpus} lacks wikitext2_test.raw", file=sys.stderr)
            return 2
        if not run_units(args):
            return 0
    if not (args.work / "data" / DONE).exists():
        print(
            f"error: nothing to report in {args.work} (run the experiment first)", file=sys.stderr
        )
        return 2
    summary = report(args)
    print(f"report written to {args.results} ({len(summary['regimes'])} regimes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
