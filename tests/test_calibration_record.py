"""The samples record: one parser and serialiser, one reader (plain and gzip), one writer, one
naming rule; the committed samples files of every format read as their JSON says."""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
from helpers_results import RESULTS, results_left_out

from calibrated_lm.calibration.record import SampleRecord, groups_of, records_by_name, task_name
from calibrated_lm.calibration.samples import (
    read_sample_records,
    read_samples,
    write_sample_records,
)
from calibrated_lm.errors import UserError
from calibrated_lm.evaluation.samples_file import SamplesWriter, read_records

# One small committed file per on-disk format of shipped results.
COMMITTED = {
    "no subject, no question hash": RESULTS / "sft_control/samples/base__plain.jsonl.gz",
    "subjects, no question hash": RESULTS / "sft_control/samples/base__trained.jsonl.gz",
    # The reports commit no request hashes (experiments/common.py:COMMIT_FIELDS); the
    # transport format with them is FULL below.
    "claim 2, token counts": RESULTS
    / "sft_claim2/samples/sft_lr8e-05_ep3_eps0.05_s1__trained.jsonl.gz",
}


def _sparse_results() -> bool:
    """True in a device call's slim tree (experiments/device_tree.sh slim), which leaves the
    committed results folders out whole; one missing file in a present folder is a failure."""
    return results_left_out("sft_control")


FULL = SampleRecord(
    task="mmlu",
    id="anatomy/3",
    choice_logprobs=(-4.25, -math.inf, -2.5, -7.0),
    label=2,
    subject="anatomy",
    choice_char_lengths=(12, 9, 15, 4),
    choice_token_counts=(3, 2, 4, 1),
    choices=("a heart", "b", "c lung", "d"),
    prompt="Question: ...\nAnswer:",
    split="test",
    request_sha256="0" * 64,
)
MINIMAL = SampleRecord(task="quiz", id=7, choice_logprobs=(-1.0, -2.0), label=0)


@pytest.mark.parametrize("record", [FULL, MINIMAL])
def test_reader_round_trips_the_writer(tmp_path: Path, record: SampleRecord) -> None:
    records = [record, replace(record, id="other", label=1)]
    for name in ("s.jsonl", "s.jsonl.gz"):
        path = write_sample_records(tmp_path / name, records)
        assert read_sample_records(path) == records
        assert [r.source for r in read_sample_records(path)] == [f"{path}:1", f"{path}:2"]
    assert (
        gzip.decompress((tmp_path / "s.jsonl.gz").read_bytes())
        == (tmp_path / "s.jsonl").read_bytes()
    )
    assert SampleRecord.from_json(record.to_json()) == record


def test_the_eval_journal_writes_and_reads_the_same_records(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl"
    with SamplesWriter(path) as w:
        w.write([FULL, MINIMAL])
    assert read_records(path) == [FULL, MINIMAL] == read_sample_records(path)
    # The field order eval has always written: required fields, then the optional ones.
    first = json.loads(path.read_text().splitlines()[0])
    assert list(first) == [
        "task", "id", "choice_logprobs", "label", "subject", "choice_char_lengths",
        "choice_token_counts", "choices", "prompt", "split", "request_sha256",
    ]  # fmt: skip
    assert first["choice_logprobs"][1] == -math.inf


@pytest.mark.parametrize("fmt", list(COMMITTED))
def test_committed_samples_files_read_as_their_json_says(fmt: str) -> None:
    path = COMMITTED[fmt]
    if not path.exists() and _sparse_results():
        pytest.skip(
            "the committed results are left out of this tree (experiments/device_tree.sh slim)"
        )
    objs = [json.loads(x) for x in gzip.decompress(path.read_bytes()).splitlines() if x.strip()]
    records = read_sample_records(path)
    assert len(records) == len(objs) > 0
    for obj, r in zip(objs, records):
        assert r.to_json() == obj  # every field kept, nothing added
        assert (r.task, r.id, list(r.choice_logprobs), r.label) == (
            obj["task"], obj["id"], obj["choice_logprobs"], obj["label"]
        )  # fmt: skip
        assert r.name == (f"{obj['task']}_{obj['subject']}" if obj.get("subject") else obj["task"])
    tasks = read_samples([path], normalization="tokens")
    assert sum(t.n for t in tasks.values()) == len(objs)
    assert list(tasks) == list(records_by_name(records))
    for name, t in tasks.items():
        members = records_by_name(records)[name]
        assert [s.tolist() for s in t.choice_scores] == [list(r.choice_logprobs) for r in members]
        assert t.labels == [r.label for r in members]
        assert [x.tolist() for x in t.choice_token_counts] == [
            list(map(float, r.choice_token_counts)) for r in members
        ]


def test_one_naming_rule_for_subjects_and_groups() -> None:
    assert task_name("mmlu", "anatomy") == "mmlu_anatomy" == FULL.name
    assert task_name("quiz", None) == "quiz" == MINIMAL.name
    assert (FULL.group, MINIMAL.group) == ("mmlu", None)
    other = replace(FULL, subject="virology", id=1)
    assert groups_of([FULL, MINIMAL, other, FULL]) == {"mmlu": ["mmlu_anatomy", "mmlu_virology"]}
    assert list(records_by_name([FULL, MINIMAL, other])) == [
        "mmlu_anatomy",
        "quiz",
        "mmlu_virology",
    ]


def test_lengths_fall_back_to_the_choice_texts() -> None:
    r = SampleRecord("q", 1, (-1.0, -2.0), 0, choices=("abc", "de"))
    assert r.lengths("chars") == (3.0, 2.0) and r.lengths("tokens") is None
    assert r.lengths("none") is None
    assert FULL.lengths("chars") == (12, 9, 15, 4) and FULL.lengths("tokens") == (3, 2, 4, 1)


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"task": "q", "id": 1, "label": 0}, 'missing field "choice_logprobs"'),
        ({"task": "", "id": 1, "choice_logprobs": [-1.0], "label": 0}, '"task" must be'),
        ({"task": "q", "id": 1, "choice_logprobs": [-1.0, float("nan")], "label": 0}, "NaN"),
        ({"task": "q", "id": 1, "choice_logprobs": [-1.0, -2.0], "label": 2}, "outside the 2"),
        ({"task": "q", "id": 1, "choice_logprobs": [-1.0, -2.0], "label": True}, "integer"),
        (
            {"task": "q", "id": 1, "choice_logprobs": [-1.0, -2.0], "label": 0, "subject": 3},
            '"subject" must be a string',
        ),
        (
            {"task": "q", "id": 1, "choice_logprobs": [-1.0], "label": 0},
            '"choice_logprobs" needs at least 2 choices, got 1',
        ),
        (
            {
                "task": "q",
                "id": 1,
                "choice_logprobs": [-1.0, -2.0],
                "label": 0,
                "choice_char_lengths": [0, 3],
            },
            "positive lengths",
        ),  # fmt: skip
        (
            {
                "task": "q",
                "id": 1,
                "choice_logprobs": [-1.0, -2.0],
                "label": 0,
                "choice_token_counts": [1],
            },
            "1 choice token counts for 2 choice_logprobs",
        ),  # fmt: skip
    ],
)
def test_a_bad_record_is_one_sentence_naming_where(obj: dict, message: str) -> None:
    with pytest.raises(UserError, match="^f.jsonl:4: .*" + message.replace("(", r"\(")):
        SampleRecord.from_json(obj, "f.jsonl:4")


def test_a_damaged_gzip_file_is_one_sentence(tmp_path: Path) -> None:
    path = write_sample_records(tmp_path / "s.jsonl.gz", [MINIMAL] * 1)
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(UserError, match="s.jsonl.gz:.*damaged gzip data"):
        read_sample_records(path)


@pytest.mark.parametrize(
    "line, reason",
    [
        (b"{oops", "invalid JSON (Expecting property name enclosed in double quotes, column 2)"),
        (b"[1, 2]", "expected a JSON object per line"),
        (b'{"task": "q\xff"}', "not UTF-8 text (byte 0xff at column 12)"),
    ],
)
def test_one_line_decoder_for_both_readers(tmp_path: Path, line: bytes, reason: str) -> None:
    """The eval journal's reader and the samples reader decode a line the same way (one
    decoder, calibration.samples.decode_json_line) and name the same problem; the journal
    adds what to do to resume."""
    path = tmp_path / "samples.jsonl"
    good = json.dumps(MINIMAL.to_json()).encode()
    path.write_bytes(good + b"\n" + line + b"\n" + good + b"\n")
    with pytest.raises(UserError) as ours:
        read_sample_records(path)
    with pytest.raises(UserError) as journal:
        read_records(path, repair=False)
    assert str(ours.value).startswith(f"{path}:2: {reason}")
    assert str(journal.value) == (
        f"{path}:2: {reason}: a damaged line; fix or delete that line to resume"
    )
