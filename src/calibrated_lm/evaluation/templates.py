"""lm-evaluation-harness prompt templates, as functions from a dataset row to a :class:`Doc`.

Each function reproduces the harness task YAML named in its docstring (``doc_to_text``,
``doc_to_choice``, ``doc_to_target``, ``process_docs``), so prompts, and therefore
log-likelihoods, are comparable with published harness numbers.
"""

from __future__ import annotations

import re
from typing import Any

from calibrated_lm.evaluation.items import Doc

LETTERS = "ABCDEFGHIJ"


def arc(row: dict[str, Any], idx: int) -> Doc:
    """``arc_easy.yaml``: ``"Question: {{question}}\\nAnswer:"``, choices ``choices.text``."""
    labels = list(row["choices"]["label"])
    return Doc(
        id=str(row.get("id", idx)),
        query=f"Question: {row['question']}\nAnswer:",
        choices=tuple(row["choices"]["text"]),
        label=labels.index(row["answerKey"]),
    )


def arc_olmes(doc: dict[str, Any], idx: int) -> Doc:
    """ARC test docs from OLMES request files (query already in the harness ARC format)."""
    from calibrated_lm.evaluation.data_olmes import arc_question_from_query

    question = arc_question_from_query(doc["query"])
    return Doc(
        id=str(doc.get("id", idx)),
        query=f"Question: {question}\nAnswer:",
        choices=tuple(doc["choices"]),
        label=int(doc["gold"]),
    )


def mmlu_description(subject: str) -> str:
    """The subject line of ``mmlu/default/_mmlu_*.yaml`` (underscores read as spaces)."""
    return (
        "The following are multiple choice questions (with answers) about "
        f"{subject.replace('_', ' ')}.\n\n"
    )


def mmlu(row: dict[str, Any], idx: int) -> Doc:
    """``mmlu/default/_default_template_yaml``: question, lettered options, letters scored."""
    subject = row["subject"]
    choices = list(row["choices"])
    body = row["question"].strip() + "\n"
    body += "".join(f"{LETTERS[i]}. {c}\n" for i, c in enumerate(choices))
    return Doc(
        id=f"{subject}/{idx}",
        query=body + "Answer:",
        choices=tuple(LETTERS[: len(choices)]),
        label=int(row["answer"]),
        subject=subject,
        description=mmlu_description(subject),
    )


def _hellaswag_clean(text: str) -> str:
    """``hellaswag/utils.py: preprocess`` (WikiHow bracket artefacts removed)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag(row: dict[str, Any], idx: int) -> Doc:
    """``hellaswag.yaml`` with ``utils.process_docs``: activity label, context, endings."""
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return Doc(
        id=str(row.get("ind", idx)) + f"/{idx}",
        query=_hellaswag_clean(row["activity_label"] + ": " + ctx),
        choices=tuple(_hellaswag_clean(e) for e in row["endings"]),
        label=int(row["label"]),
    )


def piqa(row: dict[str, Any], idx: int) -> Doc:
    """``piqa.yaml``: ``"Question: {{goal}}\\nAnswer:"``, choices ``[sol1, sol2]``."""
    return Doc(
        id=str(idx),
        query=f"Question: {row['goal']}\nAnswer:",
        choices=(row["sol1"], row["sol2"]),
        label=int(row["label"]),
    )


def sciq(row: dict[str, Any], idx: int) -> Doc:
    """``sciq.yaml``: support passage, question; the correct answer is the 4th choice."""
    return Doc(
        id=str(idx),
        query=f"{row['support'].lstrip()}\nQuestion: {row['question']}\nAnswer:",
        choices=(row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]),
        label=3,
    )


def openbookqa(row: dict[str, Any], idx: int) -> Doc:
    """``openbookqa.yaml``: the bare ``question_stem``, choices ``choices.text``."""
    labels = list(row["choices"]["label"])
    return Doc(
        id=str(row.get("id", idx)),
        query=row["question_stem"],
        choices=tuple(row["choices"]["text"]),
        label=labels.index(row["answerKey"].lstrip()),
    )


def boolq(row: dict[str, Any], idx: int) -> Doc:
    """``super_glue/boolq/default.yaml``: passage, question with ``?``, choices no/yes."""
    return Doc(
        id=str(idx),
        query=f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:",
        choices=("no", "yes"),
        label=int(bool(row["answer"])),
    )


def commonsense_qa(row: dict[str, Any], idx: int) -> Doc:
    """``commonsense_qa/default.yaml``: question, lettered options A-E, letters scored."""
    texts = list(row["choices"]["text"])
    body = f"Question: {row['question'].strip()}\n"
    body += "".join(f"{LETTERS[i]}. {t}\n" for i, t in enumerate(texts))
    return Doc(
        id=str(row.get("id", idx)),
        query=body + "Answer:",
        choices=tuple(LETTERS[: len(texts)]),
        label=LETTERS.index(row["answerKey"]),
    )


def social_iqa(row: dict[str, Any], idx: int) -> Doc:
    """``siqa.yaml``: ``"Q: {{context}} {{question}}\\nA:"``, label is 1-based."""
    return Doc(
        id=str(idx),
        query=f"Q: {row['context']} {row['question']}\nA:",
        choices=(row["answerA"], row["answerB"], row["answerC"]),
        label=int(row["label"]) - 1,
    )


def winogrande(row: dict[str, Any], idx: int) -> Doc:
    """``winogrande/default.yaml`` (partial evaluation): one context per option, the text
    after the blank is the shared continuation (``preprocess_winogrande.py``)."""
    sentence = row["sentence"]
    blank = sentence.index("_")
    target = sentence[blank + 1 :].strip()
    contexts = tuple(sentence[:blank] + opt for opt in (row["option1"], row["option2"]))
    return Doc(
        id=str(idx),
        query=target,
        choices=contexts,
        label={"1": 0, "2": 1}[str(row["answer"])],
        contexts=contexts,
    )
