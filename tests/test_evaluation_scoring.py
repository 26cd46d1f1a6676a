"""The scoring path: harness tokenisation split, and batching/packing that change no score."""

from __future__ import annotations

import pytest
import torch
from helpers_tiny_lm import TINY_SHAPE, build_tiny_lm

from calibrated_lm.evaluation.items import Item
from calibrated_lm.evaluation.scoring import Encoder, plan_rows, score_items


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = build_tiny_lm(tmp_path_factory.mktemp("tiny") / "m")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def _encoder(tok) -> Encoder:
    return Encoder(tokenizer=tok, add_bos=False, prefix_id=tok.eos_token_id)


def test_trailing_space_moves_to_continuation(tiny) -> None:
    _, tok = tiny
    enc = _encoder(tok)
    [(ctx, cont)] = enc.encode_pairs([("Question: Paris?\nAnswer: ", "carbon dioxide")])
    whole = tok("Question: Paris?\nAnswer: carbon dioxide", add_special_tokens=False).input_ids
    assert ctx == tok("Question: Paris?\nAnswer:", add_special_tokens=False).input_ids
    assert ctx + cont == whole
    assert tok.decode(cont) == " carbon dioxide"


def test_split_is_whole_minus_context_length(tiny) -> None:
    """Continuation = tokens of context+continuation past len(tokens of context), even
    where a merge crosses the boundary (the harness' rule, not separate encoding)."""
    _, tok = tiny
    enc = _encoder(tok)
    context, continuation = "Answer: the su", "n is a star"
    [(ctx, cont)] = enc.encode_pairs([(context, continuation)])
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    assert ctx == tok(context, add_special_tokens=False).input_ids
    assert cont == whole[len(ctx) :]


def test_empty_context_uses_prefix_token(tiny) -> None:
    _, tok = tiny
    [(ctx, cont)] = _encoder(tok).encode_pairs([("", "Paris is")])
    assert ctx == [tok.eos_token_id]
    assert cont == tok("Paris is", add_special_tokens=False).input_ids


def test_many_questions_at_once_encode_as_one_at_a_time(tiny) -> None:
    """encode_many (a window's questions in a few tokenizer calls, shared contexts once) gives
    each question exactly what encode_pairs gives it alone: trailing spaces, merges across
    the boundary, empty contexts, repeated contexts and continuations, an empty group."""
    _, tok = tiny
    groups = [
        [("Question: Paris?\nAnswer: ", "carbon dioxide"), ("Question: Paris?\nAnswer: ", "x")],
        [("", "Paris is"), ("", "Paris is"), ("Answer: the su", "n is a star")],
        [],
        [("Answer: the su", "n is a star"), ("Q:  ", " two spaces"), ("", "Paris is")],
    ]

    def one(context: str, continuation: str, add_bos: bool) -> tuple[list[int], list[int]]:
        """The harness' rule for one request, with one tokenizer call per string."""
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        if context == "":
            return [tok.eos_token_id], tok(continuation, add_special_tokens=False).input_ids
        ctx = tok(context, add_special_tokens=add_bos).input_ids
        return ctx, tok(context + continuation, add_special_tokens=add_bos).input_ids[len(ctx) :]

    for add_bos in (False, True):
        enc = Encoder(tokenizer=tok, add_bos=add_bos, prefix_id=tok.eos_token_id)
        want = [[one(c, k, add_bos) for c, k in g] for g in groups]
        assert enc.encode_many(groups) == want
        assert [enc.encode_pairs(g) for g in groups] == want
    assert _encoder(tok).encode_many([]) == []


def _oracle(model, ctx: list[int], cont: list[int]) -> float:
    """Full forward of ctx+cont[:-1], plain log-softmax, sum over the continuation."""
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    return float(sum(logp[len(ctx) - 1 + j, t] for j, t in enumerate(cont)))


def _items() -> list[Item]:
    qs = [
        ("Question: Which gas do plants take in?\nAnswer:", ["carbon dioxide", "water", "sun"]),
        ("The following are multiple choice questions.\n\nA. Mars\nAnswer:", list("ABCD")),
        ("Paris is the capital of", [" France", " the sun is a star and more words", " it"]),
        ("Calibration means", ["confidence", "accuracy on average", "x", "y", "water boils"]),
    ]
    items = []
    for i, (ctx, choices) in enumerate(qs):
        reqs = tuple((ctx, " " + c) for c in choices)
        items.append(Item(task="t", id=str(i), requests=reqs, label=0, choices=tuple(choices)))
    # Winogrande-like: different contexts, one continuation.
    wino = (
        ("Sarah was better than Maria so Sarah", " got it."),
        ("Sarah was better so Maria", " got it."),
    )
    items.append(Item(task="t", id="w", requests=wino, label=1, choices=("a", "b")))
    return items


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_scores_match_oracle_for_any_batching(tiny, pack: bool, batch_size: int) -> None:
    model, tok = tiny
    enc = _encoder(tok)
    items = _items()
    got = score_items(model, enc, items, batch_size=batch_size, max_len=512, pack=pack)
    for item, scores in zip(items, got):
        for (c, k), s in zip(enc.encode_pairs(item.requests), scores):
            assert s == pytest.approx(_oracle(model, c, k), abs=2e-5)


def test_letters_share_one_row_and_choices_pack_into_one(tiny) -> None:
    _, tok = tiny
    enc = _encoder(tok)
    items = _items()
    encoded = [enc.encode_pairs(i.requests) for i in items]
    plain = plan_rows(encoded[1:2], 512)
    assert len(plain) == 1 and len(plain[0].targets) == 4  # MMLU letters: one forward row
    packed = plan_rows(encoded[:1], 512, pack=True)
    assert len(packed) == 1 and len(packed[0].segments) == 3
    unpacked = plan_rows(encoded[:1], 512, pack=False)
    assert len(unpacked) == 3
    assert len(plan_rows(encoded[4:], 512, pack=True)) == 2  # different contexts: no packing


def test_truncation_keeps_the_last_tokens(tiny) -> None:
    model, tok = tiny
    enc = _encoder(tok)
    items = _items()[:1]
    got = score_items(model, enc, items, batch_size=4, max_len=6, pack=True)
    for (c, k), s in zip(enc.encode_pairs(items[0].requests), got[0]):
        full = (c + k)[-7:]
        n = min(len(k), len(full) - 1)
        assert s == pytest.approx(
            _oracle(model, full[: len(full) - n], full[len(full) - n :]), abs=2e-5
        )


def test_packing_respects_sliding_window(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok = tiny
    enc = _encoder(tok)
    items = _items()[:1]
    monkeypatch.setattr(model.config, "sliding_window", 4, raising=False)
    got = score_items(model, enc, items, batch_size=4, max_len=512)
    for (c, k), s in zip(enc.encode_pairs(items[0].requests), got[0]):
        assert s == pytest.approx(_oracle(model, c, k), abs=2e-5)


def _loop_mask(batch, width: int) -> torch.Tensor:
    """The mask's definition, one row at a time."""
    allowed = torch.zeros((len(batch), width, width), dtype=torch.bool)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    for b, r in enumerate(batch):
        p = r.prefix
        allowed[b, :p, :p] = causal[:p, :p]
        for start, end in r.segments:
            allowed[b, start:end, :p] = True
            allowed[b, start:end, start:end] = causal[: end - start, : end - start]
        idx = torch.arange(len(r.tokens), width)
        allowed[b, idx, idx] = True
    return allowed


def test_block_mask_matches_its_definition(tiny) -> None:
    from calibrated_lm.evaluation.scoring import _block_mask

    _, tok = tiny
    enc = _encoder(tok)
    encoded = [enc.encode_pairs(i.requests) for i in _items()]
    rows = plan_rows(encoded, 512, pack=True)
    assert any(len(r.segments) >= 2 for r in rows) and any(not r.segments for r in rows)
    width = max(len(r.tokens) for r in rows) + 3  # every row gets padding
    mask = _block_mask(rows, width, torch.float32)
    assert mask.shape == (len(rows), 1, width, width)
    assert torch.equal(mask[:, 0] == 0, _loop_mask(rows, width))


def test_scores_are_the_same_when_the_log_softmax_runs_in_chunks(tiny, monkeypatch) -> None:
    from calibrated_lm.evaluation import scoring

    model, tok = tiny
    enc = _encoder(tok)
    items = _items()
    whole = score_items(model, enc, items, batch_size=64, max_len=512, pack=True)
    monkeypatch.setattr(scoring, "_LOGSOFTMAX_CHUNK", 3)
    chunked = score_items(model, enc, items, batch_size=64, max_len=512, pack=True)
    assert chunked == whole  # the same values, only fewer at a time


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_on_the_gpu_the_overlapped_batches_score_as_on_the_cpu(tiny, pack, batch_size) -> None:
    """On CUDA a batch's inputs go over pinned and non-blocking, and its scores are read back
    only after the next batch is queued: every request must still get its own score (the CPU
    oracle's, to fp32 matmul rounding), in any batching."""
    model, tok = tiny
    enc = _encoder(tok)
    items = _items() * 3  # more batches in flight than items
    try:
        gpu = score_items(
            model.to("cuda"), enc, items, batch_size=batch_size, max_len=512, pack=pack
        )
    finally:
        model.to("cpu")  # the fixture is shared with the CPU tests
    for item, scores in zip(items, gpu):
        for (c, k), s in zip(enc.encode_pairs(item.requests), scores):
            assert s == pytest.approx(_oracle(model, c, k), abs=1e-4)


def _head_inputs(head) -> tuple[list[tuple[int, ...]], object]:
    """The shapes of every input the output layer ``head`` receives, and the hook's handle."""
    shapes: list[tuple[int, ...]] = []
    handle = head.register_forward_hook(lambda mod, args, out: shapes.append(tuple(args[0].shape)))
    return shapes, handle


@pytest.mark.parametrize("pack", [False, True])
def test_the_output_layer_sees_only_the_distinct_target_positions(tiny, pack: bool) -> None:
    model, tok = tiny
    enc = _encoder(tok)
    items = _items()
    encoded = [enc.encode_pairs(i.requests) for i in items]
    rows = plan_rows(encoded, 512, pack=pack)
    distinct = {(id(r), p) for r in rows for _, pos, _ in r.targets for p in pos}
    targets = sum(len(c) for _, pos, c in (t for r in rows for t in r.targets))
    assert len(distinct) < targets  # shared positions exist: a letter row, a packed context
    shapes, handle = _head_inputs(model.get_output_embeddings())
    try:
        got = score_items(model, enc, items, batch_size=64, max_len=512, pack=pack)
    finally:
        handle.remove()
    assert shapes == [(1, len(distinct), model.config.hidden_size)]
    for item, scores in zip(items, got):
        for (c, k), s in zip(enc.encode_pairs(item.requests), scores):
            assert s == pytest.approx(_oracle(model, c, k), abs=2e-5)


def test_without_a_known_output_layer_the_full_logits_are_read(tiny, monkeypatch) -> None:
    """A model whose output layer cannot be found (or is bypassed) scores as before."""
    model, tok = tiny
    enc = _encoder(tok)
    items = _items()
    gathered = score_items(model, enc, items, batch_size=3, max_len=512, pack=True)
    monkeypatch.setattr(model, "get_output_embeddings", lambda: None)
    shapes, handle = _head_inputs(model.lm_head)
    try:
        full = score_items(model, enc, items, batch_size=3, max_len=512, pack=True)
    finally:
        handle.remove()
    assert shapes and all(s[0] > 1 for s in shapes)  # whole (B, keep, D) batches
    for a, b in zip(gathered, full):
        assert a == pytest.approx(b, abs=1e-5)


def test_a_final_logit_softcap_applies_to_the_gathered_rows(tiny) -> None:
    """Gemma 2 caps the logits after its output layer, in its own forward: the gathered rows
    go through it too (the oracle reads the model's own full logits)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    _, tok = tiny
    torch.manual_seed(0)
    cfg = Gemma2Config(
        vocab_size=len(tok),
        **TINY_SHAPE,
        head_dim=8,
        final_logit_softcapping=2.0,  # small, so the cap changes every score
        attn_implementation="eager",
    )
    model = Gemma2ForCausalLM(cfg).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40)  # logits well past the cap
        ids = torch.tensor([tok("Paris is the capital of France").input_ids])
        raw = model.get_output_embeddings()(model.model(ids).last_hidden_state)
        assert raw.abs().max() > 4 and model(ids).logits.abs().max() <= 2.0  # the cap acts
    enc = _encoder(tok)
    items = _items()
    shapes, handle = _head_inputs(model.get_output_embeddings())
    try:
        got = score_items(model, enc, items, batch_size=64, max_len=512, pack=True)
    finally:
        handle.remove()
    assert len(shapes) == 1 and shapes[0][0] == 1
    for item, scores in zip(items, got):
        for (c, k), s in zip(enc.encode_pairs(item.requests), scores):
            assert s == pytest.approx(_oracle(model, c, k), abs=2e-5)


def test_a_head_called_twice_is_scored_again_from_the_full_logits(tiny) -> None:
    """The hook gathers on the head's first call; a second call in the same forward (here a
    post-hook that calls it again) makes that batch's logits unreadable, so it runs again
    without the hook, and so does every later batch."""
    model, tok = tiny
    enc = _encoder(tok)
    items = _items()
    head = model.get_output_embeddings()
    inside = []

    def again(mod, args, out):
        if not inside:
            inside.append(1)
            mod(args[0])
            inside.clear()

    handle = head.register_forward_hook(again)
    shapes, count = _head_inputs(head)
    try:
        got = score_items(model, enc, items, batch_size=3, max_len=512, pack=True)
    finally:
        handle.remove()
        count.remove()
    assert shapes[0][0] == 1 and shapes[2][0] > 1  # gathered, called again, then whole
    assert not head._forward_pre_hooks
    for item, scores in zip(items, got):
        for (c, k), s in zip(enc.encode_pairs(item.requests), scores):
            assert s == pytest.approx(_oracle(model, c, k), abs=2e-5)


def test_a_failing_forward_leaves_no_hook_behind(tiny, monkeypatch) -> None:
    model, tok = tiny

    def boom(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(model.model, "forward", boom)
    with pytest.raises(RuntimeError, match="out of memory"):
        score_items(model, _encoder(tok), _items(), batch_size=3, max_len=512, pack=True)
    assert not model.get_output_embeddings()._forward_pre_hooks


def test_gathered_rows_score_as_the_full_logits_under_a_subset_and_a_transform(
    tiny, monkeypatch
) -> None:
    import numpy as np

    from calibrated_lm.evaluation.logit_transform import LogitTransform
    from calibrated_lm.models.head_subset import HeadSubset

    model, tok = tiny
    enc = _encoder(tok)
    items = _items()
    needed = {t for i in items for _, k in enc.encode_pairs(i.requests) for t in k}
    kept = np.array(sorted(needed | set(range(0, len(tok), 3))))
    kw = dict(
        batch_size=3,
        max_len=512,
        pack=True,
        head_subset=HeadSubset(kept, len(tok)),
        transform=LogitTransform(softcap=3.0, temperature=0.7),
    )
    gathered = score_items(model, enc, items, **kw)
    monkeypatch.setattr(model, "get_output_embeddings", lambda: None)
    full = score_items(model, enc, items, **kw)
    for a, b in zip(gathered, full):
        assert a == pytest.approx(b, abs=1e-5)
