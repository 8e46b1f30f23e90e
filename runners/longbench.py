"""LongBench-v2: the official JSON list (``_id, domain, sub_domain, difficulty, length, question, choice_A..D,
answer, context``) with the official zero-shot prompt template; filters by length class and difficulty.

Get the data: the ``data.json`` of THUDM/LongBench-v2 (also published as the zai-org/LongBench-v2 dataset).
"""

from __future__ import annotations

from .base import LoadReport, WorkloadRequest, load_json_list, require

HOW = "Download data.json of LongBench-v2 (THUDM/LongBench-v2) and pass it with --data."

TEMPLATE = """Please read the following text and answer the question below.

<text>
$DOC$
</text>

What is the correct answer to this question: $Q$
Choices:
(A) $C_A$
(B) $C_B$
(C) $C_C$
(D) $C_D$

Format your response as follows: "The correct answer is (insert answer here)"."""

FIELDS = ("_id", "question", "choice_A", "choice_B", "choice_C", "choice_D", "answer", "context")


def format_prompt(row: dict) -> str:
    return (TEMPLATE.replace("$DOC$", row["context"].strip()).replace("$Q$", row["question"].strip())
            .replace("$C_A$", row["choice_A"].strip()).replace("$C_B$", row["choice_B"].strip())
            .replace("$C_C$", row["choice_C"].strip()).replace("$C_D$", row["choice_D"].strip()))


def load(path: str, report: LoadReport | None = None, length: str | None = None,
         difficulty: str | None = None) -> list[WorkloadRequest]:
    report = report or LoadReport("longbench-v2")
    require(path, "LongBench-v2", HOW)
    rows = load_json_list(path, "LongBench-v2", "questions")
    out: list[WorkloadRequest] = []
    for n, row in enumerate(rows):
        report.rows += 1
        where = f"{path}[{n}]"
        if not isinstance(row, dict):
            report.skip("not an object", where)
            continue
        missing = [k for k in FIELDS if not isinstance(row.get(k), str)]
        if missing:
            report.skip(f"missing {missing[0]}", where)
            continue
        if length and row.get("length") != length:
            report.skip(f"length is not {length}", where)
            continue
        if difficulty and row.get("difficulty") != difficulty:
            report.skip(f"difficulty is not {difficulty}", where)
            continue
        out.append(WorkloadRequest(index=len(out), prompt=format_prompt(row), reference=row["answer"],
                                   metadata={k: row.get(k) for k in ("_id", "domain", "sub_domain", "difficulty",
                                                                      "length")}))
    report.loaded = len(out)
    return out
