"""Capacity sweep: does label smoothing help calibration less when V/D is large?

Trains tiny causal LMs (2-layer Llama, tied embeddings) from scratch on a small slice of the
shared corpus, for a grid of vocabulary sizes V (byte-level BPE tokenizers built here with the
``tokenizers`` library), hidden sizes D and label smoothing eps in {0, 0.1}. The training slice is
small and seen for several epochs on purpose: over-confidence on held-out text comes from fitting
the training text, and how far a model can go there is what the capacity argument is about.

For every configuration it records on held-out text: mean confidence, accuracy, entropy, NLL,
next-token ECE (15 equal-width bins), how many tokens reach the LS target probability
``1 - eps + eps/V`` (eps = 0.1), and the over-confidence capacity of the trained head from
``calibrated_lm.analysis.capacity`` (the bound from the ``capacity`` tool).

Resumable: each configuration writes ``configs/<name>.json`` under the output folder and a rerun
skips finished ones, so the sweep can be run in chunks (``--max-minutes``). ``--summarize`` (run
automatically at the end) gathers all finished configurations into ``summary.json`` and draws
``capacity_sweep.png``/``.svg``.

Usage::

    python experiments/capacity_sweep.py                       # run (or resume) the whole grid
    python experiments/capacity_sweep.py --max-minutes 10      # one chunk
    python experiments/capacity_sweep.py --summarize           # only gather + plot
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = ROOT.parent / "shared" / "data" / "corpus"
DEFAULT_OUT = ROOT / "experiments" / "results" / "capacity_sweep"
# Tokenizers, heads and per-token arrays are large and reproducible: kept out of git (runs/).
DEFAULT_WORK = ROOT / "runs" / "capacity_sweep"

VOCABS = (512, 4096, 16384)
DIMS = (32, 128, 512)
EPSILONS = (0.0, 0.1)
LS_REFERENCE_EPS = 0.1
ECE_BINS = 15


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    p.add_argument("--output", type=Path, default=DEFAULT_OUT)
    p.add_argument("--work", type=Path, default=DEFAULT_WORK)
    p.add_argument("--vocabs", default=",".join(map(str, VOCABS)))
    p.add_argument("--dims", default=",".join(map(str, DIMS)))
    p.add_argument("--eps", default=",".join(map(str, EPSILONS)))
    p.add_argument("--train-chars", type=int, default=24_000, help="training slice (characters)")
    p.add_argument("--heldout-chars", type=int, default=48_000)
    p.add_argument("--epochs", type=int, default=24)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3, help="peak LR at D=512; scaled by sqrt(512/D)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--max-minutes", type=float, default=None, help="stop starting new configs after"
    )
    p.add_argument("--capacity-samples", type=int, default=128)
    p.add_argument("--summarize", action="store_true", help="only gather results and plot")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------- data


def load_texts(corpus: Path, train_chars: int, heldout_chars: int) -> tuple[str, str, str]:
    """(tokenizer text, LM training slice, held-out slice) from the corpus folder.

    Wikipedia text only (wikitext2_test.raw + wiki_demo.txt): the LM training slice is the start
    of wikitext2_test.raw and the held-out slice its end (same source, disjoint articles); the
    tokenizers are trained on everything except the held-out slice (so large vocabularies are
    realistic, not fitted to the 24K-character training slice).
    """
    a = (corpus / "wikitext2_test.raw").read_text(encoding="utf-8")
    b = (corpus / "wiki_demo.txt").read_text(encoding="utf-8")
    heldout = a[-heldout_chars:]
    tok_text = a[:-heldout_chars] + "\n" + b
    return tok_text, a[:train_chars], heldout


def build_tokenizer(text: str, vocab: int, path: Path):  # -> tokenizers.Tokenizer
    """Byte-level BPE with exactly ``vocab`` entries (256 bytes + merges), cached at ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if path.exists():
        return Tokenizer.from_file(str(path))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    lines = text.split("\n")
    tok.train_from_iterator(lines, trainer=trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return tok


def encode(tok, text: str) -> np.ndarray:
    return np.asarray(tok.encode(text).ids, dtype=np.int64)


# ---------------------------------------------------------------------------------------- model


def make_model(vocab: int, dim: int, layers: int, seq_len: int, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=dim,
        intermediate_size=2 * dim,
        num_hidden_layers=layers,
        num_attention_heads=max(1, dim // 32),
        num_key_value_heads=max(1, dim // 32),
        max_position_embeddings=seq_len,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
    )
    return LlamaForCausalLM(cfg)


def train_one(model, ids: np.ndarray, args: argparse.Namespace, eps: float, desc: str) -> list:
    """AdamW on random windows of ``ids``; ``epochs`` passes worth of tokens; returns loss log."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    gen = torch.Generator().manual_seed(args.seed)
    data = torch.from_numpy(ids)
    n_windows = (len(ids) - 1) // args.seq_len
    steps = max(1, math.ceil(args.epochs * n_windows / args.batch))
    # narrow models take larger steps (Adam updates scale like 1/sqrt(width) for these sizes)
    lr = args.lr * math.sqrt(512 / model.config.hidden_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    model.train()
    log = []
    bar = tqdm(range(steps), desc=desc, leave=False, mininterval=2.0)
    for step in bar:
        starts = torch.randint(0, len(ids) - args.seq_len - 1, (args.batch,), generator=gen)
        x = torch.stack([data[s : s + args.seq_len + 1] for s in starts.tolist()])
        hidden = model.model(input_ids=x[:, :-1]).last_hidden_state
        logits = model.lm_head(hidden).float()
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), label_smoothing=eps
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 20 == 0 or step == steps - 1:
            log.append([step, float(loss)])
            bar.set_postfix(loss=f"{float(loss):.3f}")
    model.eval()
    return log


def token_stats(model, ids: np.ndarray, seq_len: int, vocab: int) -> dict[str, np.ndarray]:
    """Per-token confidence, correctness, entropy, target log-prob and logit gaps (no grad)."""
    import torch

    n = (len(ids) - 1) // seq_len
    x = torch.from_numpy(ids[: n * seq_len + 1])
    out: dict[str, list] = {k: [] for k in ("conf", "correct", "entropy", "logp_y", "gap", "mgap")}
    with torch.no_grad():
        for i in range(0, n, 32):
            rows = range(i, min(n, i + 32))
            inp = torch.stack([x[r * seq_len : (r + 1) * seq_len] for r in rows])
            tgt = torch.stack([x[r * seq_len + 1 : (r + 1) * seq_len + 1] for r in rows])
            z = model(input_ids=inp).logits.float().reshape(-1, vocab)
            t = tgt.reshape(-1)
            logp = torch.log_softmax(z, -1)
            p = logp.exp()
            conf, pred = p.max(-1)
            top2 = z.topk(2, dim=-1).values
            ztop = top2[:, 0]
            out["conf"].append(conf)
            out["correct"].append((pred == t).float())
            out["entropy"].append(-(p * logp).sum(-1))
            out["logp_y"].append(logp.gather(1, t[:, None])[:, 0])
            out["gap"].append(top2[:, 0] - top2[:, 1])
            # gap between the top logit and the mean of the others: the LS optimum makes it G_eps
            out["mgap"].append(ztop - (z.sum(-1) - ztop) / (vocab - 1))
    return {k: torch.cat(v).numpy().astype(np.float64) for k, v in out.items()}


def ece(conf: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Next-token ECE: the project's ``calibration_error`` (equal-width bins, L1)."""
    from calibrated_lm.calibration import calibration_error

    return float(calibration_error(conf, correct, n_bins=bins))


def summarize_stats(s: dict[str, np.ndarray], vocab: int) -> dict[str, float]:
    g = math.log1p((1 - LS_REFERENCE_EPS) * vocab / LS_REFERENCE_EPS)
    p_ls = 1 - LS_REFERENCE_EPS + LS_REFERENCE_EPS / vocab
    return {
        "tokens": int(len(s["conf"])),
        "mean_confidence": float(s["conf"].mean()),
        "accuracy": float(s["correct"].mean()),
        "overconfidence": float(s["conf"].mean() - s["correct"].mean()),
        "ece": ece(s["conf"], s["correct"]),
        "mean_entropy": float(s["entropy"].mean()),
        "nll": float(-s["logp_y"].mean()),
        "ls_target_prob": p_ls,
        "ls_target_gap": g,
        "frac_conf_ge_ls_target": float((s["conf"] >= p_ls).mean()),
        "frac_conf_ge_0.9": float((s["conf"] >= 0.9).mean()),
        "mean_top_gap": float(s["gap"].mean()),
        "mean_top_to_mean_gap": float(s["mgap"].mean()),
        "frac_top_to_mean_gap_ge_ls_gap": float((s["mgap"] >= g).mean()),
        "p95_confidence": float(np.quantile(s["conf"], 0.95)),
    }


def head_capacity(head_file: Path, samples: int, seed: int, train_ids: np.ndarray) -> dict:
    """The ``capacity`` tool's numbers for a trained head (ceiling, reachability of the LS gap).

    The head is a Llama one: logits = W (g * u) with ||u|| = sqrt(D) after the final RMSNorm.
    Two samples: ``samples`` token ids drawn uniformly from the vocabulary (what the command
    does), and the ``samples`` most frequent target tokens of the training slice, whose
    occurrence-weighted fractions say how much of the *text* the head could make LS-confident.
    """
    import torch

    from calibrated_lm.analysis.capacity import analyze_head

    saved = torch.load(head_file)
    kw = {"eps": (0.05, 0.1, 0.2), "seed": seed, "progress": False}
    summary = analyze_head(saved["lm_head"], saved["norm"], samples=samples, **kw).summary()
    counts = np.bincount(train_ids[1:], minlength=saved["lm_head"].shape[0])
    top = np.argsort(-counts, kind="stable")[:samples]
    top = top[counts[top] > 0]
    rep = analyze_head(saved["lm_head"], saved["norm"], token_ids=np.sort(top), **kw)
    w = counts[rep.token_ids].astype(np.float64)
    frequent = {"tokens": int(len(top)), "coverage": float(w.sum() / counts.sum())}
    for e in (0.05, 0.1, 0.2):
        lp = math.log(1 - e + e / len(counts))
        frequent[f"weighted_reach_ls_{e:g}"] = float((w * (rep.log_ceiling >= lp)).sum() / w.sum())
    frequent["weighted_median_ceiling"] = _weighted_median(np.exp(rep.log_ceiling), w)
    frequent["weighted_frac_can_be_argmax"] = float((w * (rep.gap_lower > 0)).sum() / w.sum())
    summary["frequent_tokens"] = frequent
    return summary


def _weighted_median(x: np.ndarray, w: np.ndarray) -> float:
    order = np.argsort(x)
    cum = np.cumsum(w[order])
    return float(x[order][np.searchsorted(cum, cum[-1] / 2)])


def run_config(name: str, vocab: int, dim: int, eps: float, args, texts, out_dir: Path) -> None:
    import torch

    tok = build_tokenizer(texts[0], vocab, args.work / "tokenizers" / f"bpe{vocab}.json")
    train_ids, held_ids = encode(tok, texts[1]), encode(tok, texts[2])
    model = make_model(vocab, dim, args.layers, args.seq_len, args.seed)
    t0 = time.time()
    log = train_one(model, train_ids, args, eps, desc=name)
    train_s = time.time() - t0
    held = token_stats(model, held_ids, args.seq_len, vocab)
    train = token_stats(model, train_ids, args.seq_len, vocab)
    heads = args.work / "heads"
    heads.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "lm_head": model.lm_head.weight.detach().clone(),
            "norm": model.model.norm.weight.detach(),
        },
        heads / f"{name}.pt",
    )
    np.savez_compressed(args.work / "heads" / f"{name}_heldout.npz", **held)
    result = {
        "name": name,
        "vocab": vocab,
        "dim": dim,
        "v_over_d": vocab / dim,
        "eps": eps,
        "params": sum(p.numel() for p in model.parameters()),
        "train_tokens": int(len(train_ids)),
        "heldout_tokens_total": int(len(held_ids)),
        "train_seconds": train_s,
        "loss_log": log,
        "heldout": summarize_stats(held, vocab),
        "train": summarize_stats(train, vocab),
        "settings": {
            k: getattr(args, k)
            for k in ("train_chars", "heldout_chars", "epochs", "seq_len", "batch", "lr", "layers")
        }
        | {"seed": args.seed, "torch": torch.__version__},
    }
    tmp = out_dir / f".{name}.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.rename(out_dir / f"{name}.json")


# ------------------------------------------------------------------------------------ summarise


def ece_benefit_ci(work: Path, name0: str, name1: str, seq_len: int, draws: int = 200) -> list:
    """95% paired block-bootstrap interval of ECE(eps=0) - ECE(eps=0.1) on the held-out text.

    Both runs of a pair share the tokenizer, hence the same held-out token positions; whole
    ``seq_len`` windows are resampled (tokens within a window are not independent). This covers
    the held-out sampling noise only, not the training-seed noise (one seed per configuration).
    """
    from calibrated_lm.calibration import bootstrap_indices, percentile_interval

    a, b = (np.load(work / "heads" / f"{n}_heldout.npz") for n in (name0, name1))
    n_win = len(a["conf"]) // seq_len
    idx = bootstrap_indices(n_win, draws, seed=0)
    offs = np.arange(seq_len)
    diffs = []
    for row in idx:
        tok = (row[:, None] * seq_len + offs[None, :]).ravel()
        diffs.append(
            ece(a["conf"][tok], a["correct"][tok]) - ece(b["conf"][tok], b["correct"][tok])
        )
    return percentile_interval(np.asarray(diffs))


def summarize(args: argparse.Namespace) -> dict:
    """Gather finished configurations (adding each trained head's capacity once) and plot."""
    out, work = args.output, args.work
    texts = load_texts(args.corpus, args.train_chars, args.heldout_chars)
    rows = []
    for path in sorted((out / "configs").glob("*.json")):
        row = json.loads(path.read_text())
        before = json.dumps(row)
        held = work / "heads" / f"{row['name']}_heldout.npz"
        if held.exists():  # recompute with the project's metric (rows may predate it)
            arrays = np.load(held)
            row["heldout"]["ece"] = ece(arrays["conf"], arrays["correct"])
            row["heldout"]["ece_metric"] = "calibrated_lm.calibration.calibration_error, 15 bins"
        if "capacity" not in row or "frequent_tokens" not in row["capacity"]:
            tok = build_tokenizer(
                texts[0], row["vocab"], work / "tokenizers" / f"bpe{row['vocab']}.json"
            )
            row["capacity"] = head_capacity(
                work / "heads" / f"{row['name']}.pt",
                args.capacity_samples,
                args.seed,
                encode(tok, texts[1]),
            )
        if json.dumps(row) != before:
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(json.dumps(row, indent=1))
            tmp.rename(path)
        rows.append(row)
    by_key = {(r["vocab"], r["dim"], r["eps"]): r for r in rows}
    pairs = []
    for (v, d, e), r in sorted(by_key.items()):
        if e != 0.0 or (v, d, 0.1) not in by_key:
            continue
        s = by_key[(v, d, 0.1)]
        pairs.append(
            {
                "vocab": v,
                "dim": d,
                "v_over_d": v / d,
                "ece_eps0": r["heldout"]["ece"],
                "ece_eps0.1": s["heldout"]["ece"],
                "ece_benefit": r["heldout"]["ece"] - s["heldout"]["ece"],
                "ece_benefit_ci95": ece_benefit_ci(
                    args.work, r["name"], s["name"], r["settings"]["seq_len"]
                ),
                "overconf_eps0": r["heldout"]["overconfidence"],
                "overconf_eps0.1": s["heldout"]["overconfidence"],
                "conf_eps0": r["heldout"]["mean_confidence"],
                "conf_eps0.1": s["heldout"]["mean_confidence"],
                "acc_eps0": r["heldout"]["accuracy"],
                "acc_eps0.1": s["heldout"]["accuracy"],
                "nll_eps0": r["heldout"]["nll"],
                "nll_eps0.1": s["heldout"]["nll"],
                "entropy_eps0": r["heldout"]["mean_entropy"],
                "entropy_eps0.1": s["heldout"]["mean_entropy"],
                "train_frac_ge_ls_target_eps0": r["train"]["frac_conf_ge_ls_target"],
                "train_frac_ge_ls_target_eps0.1": s["train"]["frac_conf_ge_ls_target"],
                "cap_frac_reach_ls_eps0.1_model_eps0": r["capacity"]["reach_ls"]["0.1"][
                    "frac_ceiling"
                ],
                "cap_frac_argmax_model_eps0": r["capacity"]["frac_can_be_argmax"],
                "cap_median_ceiling_model_eps0": r["capacity"]["ceiling"]["median"],
                "cap_weighted_reach_ls_0.1_eps0": r["capacity"]["frequent_tokens"][
                    "weighted_reach_ls_0.1"
                ],
                "cap_weighted_reach_ls_0.1_eps0.1": s["capacity"]["frequent_tokens"][
                    "weighted_reach_ls_0.1"
                ],
                "cap_frequent_coverage": r["capacity"]["frequent_tokens"]["coverage"],
                "train_conf_eps0": r["train"]["mean_confidence"],
                "train_conf_eps0.1": s["train"]["mean_confidence"],
            }
        )
    summary = {"configs": len(rows), "pairs": pairs}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if pairs:
        plot(pairs, out)
    return summary


def _paired_lines(
    ax: Any,
    pairs: list[dict],
    dims: list[int],
    colors: dict[int, Any],
    keys: tuple[str, str],
    labels: tuple[str, str],
) -> None:
    """Per D, two series against V/D: ``keys[0]`` solid with circles, ``keys[1]`` dashed with
    squares (labels are format strings of ``d``)."""
    for d in dims:
        ps = sorted((p for p in pairs if p["dim"] == d), key=lambda p: p["v_over_d"])
        x = [p["v_over_d"] for p in ps]
        for key, label, style in zip(keys, labels, ("o-", "s--")):
            ax.plot(x, [p[key] for p in ps], style, color=colors[d], label=label.format(d=d))


def plot(pairs: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    dims = sorted({p["dim"] for p in pairs})
    colors = dict(zip(dims, plt.cm.viridis(np.linspace(0, 0.85, len(dims)))))
    ax = axes[0]
    for d in dims:
        ps = sorted((p for p in pairs if p["dim"] == d), key=lambda p: p["v_over_d"])
        ben = np.array([p["ece_benefit"] for p in ps])
        ci = np.array([p["ece_benefit_ci95"] for p in ps])
        ax.errorbar(
            [p["v_over_d"] for p in ps],
            ben,
            yerr=[ben - ci[:, 0], ci[:, 1] - ben],
            fmt="o-",
            capsize=3,
            color=colors[d],
            label=f"D={d}",
        )
        for p in ps:
            ax.annotate(
                f"V={p['vocab']}",
                (p["v_over_d"], p["ece_benefit"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("V / D")
    ax.set_ylabel("held-out ECE(eps=0) - ECE(eps=0.1)")
    ax.set_title("calibration benefit of label smoothing")
    ax.legend()
    ax = axes[1]
    _paired_lines(
        ax,
        pairs,
        dims,
        colors,
        ("overconf_eps0", "overconf_eps0.1"),
        ("D={d}, eps=0", "D={d}, eps=0.1"),
    )
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("V / D")
    ax.set_ylabel("held-out mean confidence - accuracy")
    ax.set_title("over-confidence")
    ax.legend(fontsize=7)
    ax = axes[2]
    _paired_lines(
        ax,
        pairs,
        dims,
        colors,
        ("cap_frac_reach_ls_eps0.1_model_eps0", "cap_weighted_reach_ls_0.1_eps0"),
        (
            "D={d}: tool, uniform vocabulary sample",
            "D={d}: tool, frequent tokens, occurrence-weighted",
        ),
    )
    ax.set_xscale("log")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("V / D")
    ax.set_ylabel("fraction whose ceiling >= 1 - eps + eps/V (eps=0 head)")
    ax.set_title("head can reach the LS target (eps=0.1)? (tool)")
    ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    for ext in ("png", "svg"):
        fig.savefig(out / f"capacity_sweep.{ext}", dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    out_dir = args.output / "configs"
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.summarize:
        summary = summarize(args)
        print(json.dumps(summary, indent=1))
        return 0
    if not (args.corpus / "wikitext2_test.raw").exists():
        print(f"error: corpus folder {args.corpus} lacks wikitext2_test.raw", file=sys.stderr)
        return 2
    texts = load_texts(args.corpus, args.train_chars, args.heldout_chars)
    grid = [
        (int(v), int(d), float(e))
        for d in args.dims.split(",")
        for v in args.vocabs.split(",")
        for e in args.eps.split(",")
    ]
    t_start = time.time()
    bar = tqdm(grid, desc="capacity sweep")
    for v, d, e in bar:
        name = f"V{v}_D{d}_eps{e:g}"
        if (out_dir / f"{name}.json").exists():
            continue
        if args.max_minutes is not None and time.time() - t_start > 60 * args.max_minutes:
            print("time budget reached; rerun to continue", file=sys.stderr)
            break
        bar.set_postfix(config=name)
        run_config(name, v, d, e, args, texts, out_dir)
    try:
        summarize(args)
    except ImportError as exc:  # the analysis package is missing: results are kept, plot later
        print(f"trained configurations kept; summary skipped ({exc})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
