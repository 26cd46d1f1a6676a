"""The one scoring path: summed log-likelihood of each choice's continuation tokens.

For a request ``(context, continuation)`` (lm-evaluation-harness ``HFLM._encode_pair``):
trailing whitespace of the context moves to the front of the continuation; ``context +
continuation`` and ``context`` are tokenised separately and the continuation tokens are the
whole encoding past the context's length. The model reads ``(ctx + cont)[:-1]`` (left-truncated
to the model's window) and

    score = Σ_{t in cont} log p(t | tokens before t).

With a head subset S (``calibrated_lm.models.head_subset``, claim 3 of issue 12) the softmax
is over the V' kept tokens only, ``p(t | .) = exp(z_t) / Σ_{j in S} exp(z_j)``, the
restricted model that ``calibrated-lm train --head-subset`` trains; a continuation token
outside S has no probability under it and is refused (:func:`check_in_subset`), never scored
as -inf. A :class:`~calibrated_lm.evaluation.logit_transform.LogitTransform` (``eval
--logit-softcap C / --logit-temperature T``) maps those logits, ``z -> C tanh(z / C) / T``,
after the restriction and before the log-softmax.

Two things make it fast without changing any score:

* requests whose input is a prefix of another request's input of the same question share that
  row (a causal LM's logits at position i depend only on tokens <= i); MMLU's four one-letter
  answers thus cost one forward pass;
* rows are sorted by length and right-padded; causal attention never lets a real position see
  the padding that follows it, and only the positions that predict continuation tokens go
  through the output layer: ``logits_to_keep`` cuts the rows' heads off, and a pre-hook on
  the output layer (:class:`_HeadGather`) hands it the distinct target positions alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from calibrated_lm.errors import UserError
from calibrated_lm.evaluation.items import Item
from calibrated_lm.evaluation.logit_transform import LogitTransform
from calibrated_lm.models.head_subset import HeadSubset


@dataclass
class Encoder:
    """Tokenises requests the way the harness' HF backend does.

    ``add_bos``: prepend the tokenizer's special tokens (the harness does so only for Gemma
    models, whose tokenizer adds ``<bos>``). ``prefix_id`` stands in for an empty context.
    """

    tokenizer: Any
    add_bos: bool
    prefix_id: int

    def encode_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        """``(context ids, continuation ids)`` per ``(context, continuation)`` request: the
        continuation's ids are those of ``context + continuation`` after the context's own
        (trailing whitespace of the context moved onto the continuation first, as the harness
        does); an empty context becomes ``[prefix_id]`` and the continuation is tokenised
        alone."""
        return self.encode_many([pairs])[0]

    def encode_many(
        self, groups: Sequence[Sequence[tuple[str, str]]]
    ) -> list[list[tuple[list[int], list[int]]]]:
        """:meth:`encode_pairs` of every group (a question's requests), in a few tokenizer
        calls for them all: the ids of a string do not depend on its batch, and a question's
        choices share their context, which is tokenised once."""
        moved: list[tuple[str, str]] = []
        for pairs in groups:
            for context, continuation in pairs:
                n = len(context) - len(context.rstrip())
                if n:
                    continuation = context[-n:] + continuation
                    context = context[:-n]
                moved.append((context, continuation))
        contexts = list(dict.fromkeys(c for c, _ in moved if c != ""))
        lone = list(dict.fromkeys(k for c, k in moved if c == ""))
        tok = self.tokenizer
        wholes = _ids(tok, [c + k for c, k in moved if c != ""], self.add_bos)
        ctx_ids = dict(zip(contexts, _ids(tok, contexts, self.add_bos)))
        lone_ids = dict(zip(lone, _ids(tok, lone, False)))
        flat: list[tuple[list[int], list[int]]] = []
        whole_iter = iter(wholes)
        for context, continuation in moved:
            if context == "":
                flat.append(([self.prefix_id], list(lone_ids[continuation])))
            else:
                ctx, whole = ctx_ids[context], next(whole_iter)
                flat.append((list(ctx), list(whole[len(ctx) :])))
        out: list[list[tuple[list[int], list[int]]]] = []
        pos = 0
        for pairs in groups:
            out.append(flat[pos : pos + len(pairs)])
            pos += len(pairs)
        return out


def _ids(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """Token ids of each text, in one call (none for no texts)."""
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]


def make_encoder(tokenizer: Any, model: Any, *, chat: bool) -> Encoder:
    """The harness' rule: BOS only for Gemma (and never on chat-rendered prompts, which carry
    their own); empty contexts become the BOS token, else end-of-text. ``model``: the model or
    its config."""
    model_type = str(getattr(getattr(model, "config", model), "model_type", ""))
    add_bos = "gemma" in model_type and not chat
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else None
    if prefix is None:
        prefix = tokenizer.eos_token_id
    if prefix is None:
        raise UserError(
            "the tokenizer has neither a BOS nor an EOS token to stand for an empty context"
        )
    return Encoder(tokenizer=tokenizer, add_bos=add_bos, prefix_id=int(prefix))


@dataclass
class _Row:
    """One sequence of a forward pass.

    ``prefix`` tokens are causal; each ``segments`` block [start, end) attends to the prefix
    and causally to itself only (a packed continuation). ``targets`` lists, per request, the
    row positions whose logits predict its continuation tokens, and those tokens.
    """

    tokens: list[int]
    prefix: int
    segments: list[tuple[int, int]] = field(default_factory=list)
    targets: list[tuple[int, list[int], list[int]]] = field(default_factory=list)

    def position_ids(self) -> list[int]:
        pos = list(range(self.prefix))
        for start, end in self.segments:
            pos += list(range(self.prefix, self.prefix + end - start))
        return pos


def _plain_rows(inputs: list[tuple[int, list[int], list[int]]]) -> list[_Row]:
    """Unpacked rows; an input that is a prefix of a longer one shares its row (causal LMs'
    logits at position i depend only on tokens <= i)."""
    item_rows: list[_Row] = []
    for r, x, cont in sorted(inputs, key=lambda t: -len(t[1])):
        positions = list(range(len(x) - len(cont), len(x)))
        for row in item_rows:
            if len(x) <= len(row.tokens) and row.tokens[: len(x)] == x:
                row.targets.append((r, positions, cont))
                break
        else:
            item_rows.append(_Row(tokens=x, prefix=len(x), targets=[(r, positions, cont)]))
    return item_rows


def _packed_row(reqs: list[int], ctx: list[int], conts: list[list[int]]) -> _Row:
    """Context once, then each continuation (minus its last token) as its own segment.

    The last context position predicts every continuation's first token; position j of
    segment i predicts token j+1 of continuation i. Position ids restart at len(ctx) in each
    segment, so every continuation sees exactly the positions and keys it would unpacked.
    """
    tokens = list(ctx)
    row = _Row(tokens=tokens, prefix=len(ctx))
    for r, cont in zip(reqs, conts):
        start = len(tokens)
        tokens.extend(cont[:-1])
        if len(cont) > 1:
            row.segments.append((start, len(tokens)))
        positions = [len(ctx) - 1] + list(range(start, start + len(cont) - 1))
        row.targets.append((r, positions, cont))
    return row


def plan_rows(
    encoded: Sequence[Sequence[tuple[list[int], list[int]]]],
    max_len: int,
    pack: bool = False,
    pack_len: int | None = None,
) -> list[_Row]:
    """Forward-pass rows for the encoded requests of several items.

    ``encoded[i][j]`` is ``(ctx_ids, cont_ids)`` of choice j of item i; request indices in the
    returned targets run over all choices of all items in order. With ``pack``, the choices of
    a question sharing one context go into one row (when it fits in ``pack_len``, default
    ``max_len``); other rows are left-truncated to ``max_len`` + 1 tokens as the harness does.
    """
    pack_len = max_len if pack_len is None else pack_len
    rows: list[_Row] = []
    req = 0
    for item in encoded:
        first = req
        for _, cont in item:
            if not cont:
                raise UserError("a choice encodes to zero tokens; it cannot be scored")
        ctx0 = item[0][0]
        packed_len = len(ctx0) + sum(len(c) - 1 for _, c in item)
        if pack and all(ctx == ctx0 for ctx, _ in item) and packed_len <= pack_len and ctx0:
            reqs = list(range(first, first + len(item)))
            rows.append(_packed_row(reqs, ctx0, [c for _, c in item]))
            req += len(item)
            continue
        inputs: list[tuple[int, list[int], list[int]]] = []
        for ctx, cont in item:
            full = (ctx + cont)[-(max_len + 1) :]
            n = min(len(cont), len(full) - 1)
            inputs.append((req, full[:-1], cont[-n:]))
            req += 1
        rows.extend(_plain_rows(inputs))
    return rows


def _batches(rows: list[_Row], batch_size: int, max_tokens: int | None) -> Iterator[list[_Row]]:
    """Consecutive rows (sorted longest first), at most ``batch_size`` rows and, when set,
    at most ``max_tokens`` padded tokens per batch (the first row sets the width)."""
    start = 0
    while start < len(rows):
        n = batch_size
        if max_tokens is not None:
            n = max(1, min(n, max_tokens // max(1, len(rows[start].tokens))))
        yield rows[start : start + n]
        start += n


def _segment_ids(batch: list[_Row], width: int) -> Any:
    """(B, T) long: 0 for prefix tokens, k for tokens of a row's k-th packed segment, -1 for
    padding."""
    import torch

    seg = torch.full((len(batch), width), -1, dtype=torch.long)
    for b, r in enumerate(batch):
        seg[b, : r.prefix] = 0
        for k, (start, end) in enumerate(r.segments, 1):
            seg[b, start:end] = k
    return seg


def _block_mask(
    batch: list[_Row], width: int, dtype: Any, device: Any = "cpu", to_device: Any = None
) -> Any:
    """Additive (B, 1, T, T) mask: causal prefix, segments see the prefix and themselves
    causally, padding sees only itself (so no softmax row is empty).

    Query i may see key j iff j <= i, i is a real token, and j is in the prefix or in i's own
    segment; plus the diagonal. Built on ``device`` from (B, T) segment ids, so only those
    cross from the host (a (B, T, T) mask built on the host was most of a packed batch's
    host-side cost)."""
    import torch

    seg = _segment_ids(batch, width)
    seg = to_device(seg) if to_device is not None else seg.to(device)
    q, k = seg[:, :, None], seg[:, None, :]
    causal = torch.ones((width, width), dtype=torch.bool, device=device).tril()
    allowed = causal & (q >= 0) & ((k == 0) | (k == q))
    allowed |= torch.eye(width, dtype=torch.bool, device=device)
    mask = torch.zeros((len(batch), 1, width, width), dtype=dtype, device=device)
    return mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)


# Positions per log-softmax chunk: a chunk's fp32 rows take CHUNK x V x 4 bytes (1 GiB at
# V = 128K), whatever the batch.
_LOGSOFTMAX_CHUNK = 2048


def _target_logprobs_on_device(
    logits: Any,
    b_idx: Any,
    p_idx: Any,
    t_idx: Any,
    kept: Any = None,
    transform: LogitTransform | None = None,
) -> Any:
    """log_softmax(logits[b, p])[t] for each (b, p, t), in fp32, only at those positions; a
    float64 tensor on the logits' device, not yet read back (reading it waits for the GPU).

    With ``kept`` (the V' token ids of a head subset, on the logits' device) the softmax is
    over those columns only, and ``t_idx`` must already index into them. ``transform`` maps
    the (restricted, fp32) logits first: log_softmax(transform(z))[t]."""
    import torch

    out = []
    for s in range(0, b_idx.numel(), _LOGSOFTMAX_CHUNK):
        sl = slice(s, s + _LOGSOFTMAX_CHUNK)
        rows = logits[b_idx[sl], p_idx[sl]]
        rows = (rows if kept is None else rows.index_select(1, kept)).float()
        if transform is not None:
            rows = transform.apply(rows)  # in fp32: z / T of bf16 logits keeps fp32 precision
        picked = rows.gather(1, t_idx[sl, None]).squeeze(1)
        out.append(picked - torch.logsumexp(rows, dim=-1))
    return torch.cat(out).double()


def _output_layer(model: Any) -> Any:
    """The module that maps hidden states to logits (``get_output_embeddings()``), or None."""
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        return None


class _HeadGather:
    """While active, the output layer sees only the hidden states at the target positions.

    The model's forward hands its output layer ``(B, keep, D)`` hidden states (``keep`` =
    ``logits_to_keep``); a forward pre-hook replaces them with ``(1, U, D)``, the U distinct
    positions that some target reads (``unique``: flat indices ``b * keep + p``, sorted), so
    the head's product and whatever the forward does to the logits afterwards (Gemma's final
    softcap, Cohere's or Granite's scaling) run on U rows instead of ``B * keep``. Each kept
    row's logits are the model's own: the same function of the same hidden state.

    :meth:`outcome` says what the forward did: ``"gathered"`` (the logits are the ``(1, U,
    V)`` rows), ``"full"`` (the hook changed nothing: no output layer found, another input
    shape, a forward that bypasses the layer), or ``"redo"`` (the hook gathered, but the layer
    was called again or the logits came back in another layout: they cannot be read, and the
    caller runs the batch again without the hook).

    Why: a packed batch keeps every position from its earliest target to its end, most of
    them context or padding of the other rows; at a 262K vocabulary the head over those rows
    costs more than the model body (``benchmarks/results/scoring_cpu_head_gather_*.md``).
    """

    def __init__(self, head: Any, unique: Any, rows: int, keep: int) -> None:
        self.head, self.unique, self.rows, self.keep = head, unique, rows, keep
        self.calls = 0
        self.gathered = False
        self._handle: Any = None

    def _hook(self, module: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        self.calls += 1
        hidden = args[0] if args else None
        shape = tuple(getattr(hidden, "shape", ()))
        if self.calls > 1 or len(shape) != 3 or shape[:2] != (self.rows, self.keep):
            return None
        self.gathered = True
        rows = hidden[self.unique // self.keep, self.unique % self.keep]
        return (rows[None], *args[1:])

    def __enter__(self) -> _HeadGather:
        if self.head is not None and hasattr(self.head, "register_forward_pre_hook"):
            self._handle = self.head.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def outcome(self, logits: Any) -> str:
        """``"gathered"``, ``"full"`` or ``"redo"`` (class docstring)."""
        if not self.gathered:
            return "full"
        shape = tuple(getattr(logits, "shape", ()))
        if self.calls > 1 or len(shape) != 3 or shape[:2] != (1, self.unique.numel()):
            return "redo"
        return "gathered"


def supports_packing(model: Any) -> bool:
    """Packed rows need a custom 4D mask: fine for eager and SDPA attention, not for kernels
    that only know causal/padding masks. Sliding-window layers would ignore their window under a
    custom mask, so such models pack only rows shorter than the window (see score_items)."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return impl in ("eager", "sdpa")


def score_rows(
    model: Any,
    rows: list[_Row],
    n_requests: int,
    batch_size: int,
    max_tokens: int | None = None,
    head_subset: HeadSubset | None = None,
    transform: LogitTransform | None = None,
) -> list[float]:
    """Summed continuation log-likelihood per request: the exactly rounded (``math.fsum``)
    float64 sum of the fp32 log-softmax values of its tokens (over the kept tokens of
    ``head_subset`` only, when given; every target must then be kept; of the logits mapped
    by ``transform``, when given)."""
    import math

    import torch

    param = next(model.parameters())
    device = param.device
    head = _output_layer(model)  # None: every batch reads the full logits
    kept = index_map = None
    if transform is not None and transform.is_identity:
        transform = None
    if head_subset is not None:
        kept = torch.as_tensor(head_subset.kept, dtype=torch.long, device=device)
        index_map = torch.as_tensor(head_subset.index_map(), dtype=torch.long, device=device)
    scores = [float("nan")] * n_requests

    def settle(owners: list[int], values: Any) -> None:
        sums: dict[int, list[float]] = {}
        for req, v in zip(owners, values.tolist()):
            sums.setdefault(req, []).append(v)
        for req, vs in sums.items():
            scores[req] = math.fsum(vs)

    def to_device(t: Any) -> Any:
        # Pinned and non-blocking: a plain host-to-GPU copy waits for the GPU's queue, which
        # would hold this batch's preparation until the previous batch's forward is done.
        if device.type != "cuda":
            return t.to(device)
        return t.pin_memory().to(device, non_blocking=True)

    # One batch in flight: its scores are read back (a wait for the GPU) only after the next
    # batch is prepared and queued, so the host's work overlaps the GPU's.
    pending: tuple[list[int], Any] | None = None
    order = sorted(rows, key=lambda r: -len(r.tokens))
    for batch in _batches(order, batch_size, max_tokens):
        width = max(len(r.tokens) for r in batch)
        # First position whose logits any request needs; only those go through the output layer.
        first = min(min(pos) for r in batch for _, pos, _ in r.targets)
        keep = width - first
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        for b, r in enumerate(batch):
            ids[b, : len(r.tokens)] = torch.tensor(r.tokens, dtype=torch.long)
        kwargs: dict[str, Any] = {}
        if any(r.segments for r in batch):
            pos_ids = torch.zeros((len(batch), width), dtype=torch.long)
            for b, r in enumerate(batch):
                pos_ids[b, : len(r.tokens)] = torch.tensor(r.position_ids(), dtype=torch.long)
            kwargs["position_ids"] = to_device(pos_ids)
            kwargs["attention_mask"] = _block_mask(batch, width, param.dtype, device, to_device)
        else:
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for b, r in enumerate(batch):
                mask[b, : len(r.tokens)] = 1
            kwargs["attention_mask"] = to_device(mask)
        # Every target of the batch in one gather (one host-device round trip per batch, not
        # one per request); owners[i] is the request whose sum value i joins.
        where: list[list[int]] = [[], [], []]
        owners: list[int] = []
        for b, r in enumerate(batch):
            for req, positions, cont in r.targets:
                where[0].extend([b] * len(cont))
                where[1].extend(p - first for p in positions)
                where[2].extend(cont)
                owners.extend([req] * len(cont))
        host = torch.tensor(where, dtype=torch.long)
        n = host.shape[1]
        # The distinct target positions, found on the host (on the device, torch.unique
        # would wait for the previous batch's forward) and sent in the same copy.
        unique, inverse = torch.unique(host[0] * keep + host[1], return_inverse=True)
        sent = to_device(torch.cat([host.reshape(-1), unique, inverse]))
        b_idx, p_idx, t_idx = sent[: 3 * n].view(3, n)
        unique, inverse = sent[3 * n : 3 * n + unique.numel()], sent[3 * n + unique.numel() :]
        if index_map is not None:
            t_idx = index_map[t_idx]  # V -> V' (check_in_subset has ruled out -1)
        with torch.inference_mode():
            gather = _HeadGather(head, unique, len(batch), keep)
            with gather:
                out = model(input_ids=to_device(ids), logits_to_keep=keep, **kwargs)
            outcome = gather.outcome(out.logits)
            if outcome == "redo":  # an unusual forward: this batch again, all later ones, whole
                head = None
                del out
                out = model(input_ids=to_device(ids), logits_to_keep=keep, **kwargs)
            if outcome == "gathered":
                # (1, U, V): one row per distinct target position, target i's at inverse[i].
                b_idx, p_idx = torch.zeros_like(inverse), inverse
                logits = out.logits
            else:
                logits = out.logits[:, -keep:, :]
            values = _target_logprobs_on_device(logits, b_idx, p_idx, t_idx, kept, transform)
            del out, logits  # only the gathered values outlive the batch
        if pending is not None:
            settle(*pending)
        pending = (owners, values)
    if pending is not None:
        settle(*pending)
    return scores


def check_in_subset(
    items: Sequence[Item],
    encoded: Sequence[Sequence[tuple[list[int], list[int]]]],
    subset: HeadSubset,
    tokenizer: Any = None,
) -> None:
    """:class:`UserError` naming the first choice with a continuation token outside
    ``subset`` (the restricted softmax gives it no probability, so its score would be -inf).

    ``encoded[i][j]`` is ``(ctx_ids, cont_ids)`` of choice j of item i (``Encoder``)."""
    index_map = subset.index_map()
    for item, pairs in zip(items, encoded):
        for j, (_, cont) in enumerate(pairs):
            missing = [t for t in cont if index_map[t] < 0]
            if not missing:
                continue
            shown = f"token id(s) {missing[:8]}"
            if tokenizer is not None:
                shown += f" ({[tokenizer.decode([t]) for t in missing[:8]]})"
            choice = item.choices[j] if j < len(item.choices) else item.requests[j][1]
            raise UserError(
                f"{item.task} question {item.id}: choice {j} ({choice!r}) has {shown} outside "
                f"the head subset (V' = {subset.size}), whose softmax gives them no "
                "probability; choose the subset with every scored answer token required "
                "(calibrated_lm.models.head_subset.select_vocabulary(required=...))"
            )


def check_items_in_subset(encoder: Encoder, items: Sequence[Item], subset: HeadSubset) -> None:
    """:func:`check_in_subset` for ``items`` as ``encoder`` tokenises them (before scoring:
    a run refused here has written nothing)."""
    step = 1024  # questions per tokenizer call: bounded memory on large tasks
    for s in range(0, len(items), step):
        chunk = items[s : s + step]
        encoded = encoder.encode_many([item.requests for item in chunk])
        check_in_subset(chunk, encoded, subset, encoder.tokenizer)


def model_max_length(model: Any, tokenizer: Any) -> int:
    """Context window: the model's position limit, capped by the tokenizer's where set.
    ``model``: the model or its config."""
    cfg = getattr(model, "config", model)
    n = getattr(cfg, "max_position_embeddings", None) or 2048
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 10**7:
        n = min(n, tok_max)
    return int(n)


def score_items(
    model: Any,
    encoder: Encoder,
    items: Sequence[Item],
    *,
    batch_size: int,
    max_len: int,
    max_tokens: int | None = None,
    pack: bool | None = None,
    token_counts: list[list[int]] | None = None,
    head_subset: HeadSubset | None = None,
    transform: LogitTransform | None = None,
) -> list[list[float]]:
    """Per item, per choice: the summed continuation log-likelihood.

    ``pack`` (default: when the attention implementation allows it) scores a question's
    choices that share a context in one packed row; the scores are the same as unpacked.
    When ``token_counts`` is a list, it is extended with, per item, the number of
    continuation tokens each choice's score sums over (after any left-truncation to the
    window), the length that per-token normalisation divides by. ``head_subset``: the
    log-softmax over its kept tokens only (module docstring); a choice with a continuation
    token outside it is a :class:`UserError` (:func:`check_in_subset`). ``transform``: the
    logits (after that restriction) mapped by it before the log-softmax.
    """
    if pack is None:
        pack = supports_packing(model)
    pack_len = max_len
    window = getattr(getattr(model, "config", None), "sliding_window", None)
    if pack and isinstance(window, int) and window > 0:
        pack_len = min(max_len, window)
    encoded = encoder.encode_many([item.requests for item in items])
    if head_subset is not None:
        check_in_subset(items, encoded, head_subset, encoder.tokenizer)
    if token_counts is not None:
        # plan_rows keeps at most max_len continuation tokens of a request (the window holds
        # max_len + 1 tokens, the last of which is only predicted).
        token_counts.extend([min(len(c), max_len) for _, c in item] for item in encoded)
    rows = plan_rows(encoded, max_len, pack=pack, pack_len=pack_len)
    n_req = sum(len(i.requests) for i in items)
    flat = score_rows(model, rows, n_req, batch_size, max_tokens, head_subset, transform)
    out: list[list[float]] = []
    pos = 0
    for item in items:
        out.append(flat[pos : pos + len(item.requests)])
        pos += len(item.requests)
    return out
