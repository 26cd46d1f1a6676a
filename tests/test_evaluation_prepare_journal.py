"""_prepare_journal returns what the journal holds after it ran (the runner uses that instead of
parsing the journal a second time): a stale record dropped, a label corrected, duplicates
merged, or nothing to change."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from calibrated_lm.evaluation.items import Item
from calibrated_lm.evaluation.runner import _prepare_journal, _record
from calibrated_lm.evaluation.samples_file import SamplesWriter, read_records


def _item(i: int, prompt: str = "Q", label: int = 0) -> Item:
    return Item(task="t", id=str(i), requests=((f"{prompt}{i}", " a"), (f"{prompt}{i}", " b")),
                label=label, choices=("a", "b"), split="test")  # fmt: skip


def test_prepared_records_are_the_journal_as_left(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl"
    items = [_item(i) for i in range(5)]
    with SamplesWriter(path) as w:
        w.write(_record(it, [-1.0 - it.id.__len__(), -2.5], [1, 1]) for it in items)
    # Nothing to change.
    res = _prepare_journal(path, items)
    assert res["records"] == read_records(path) and len(res["records"]) == 5
    # A changed prompt (stale), a changed label (corrected), a duplicate record.
    with SamplesWriter(path) as w:
        w.write([_record(items[3], [-0.5, -0.25], [1, 1])])
    now = [_item(0, prompt="new "), _item(1, label=1), *items[2:]]
    res = _prepare_journal(path, now)
    assert res["stale"] == 1 and res["corrected"] == 1
    assert res["records"] == read_records(path)
    assert [r.id for r in res["records"]] == ["1", "2", "3", "4"]
    assert replace(res["records"][2]).choice_logprobs == (-0.5, -0.25)
