"""ShareGPT: the common JSON list of ``{id, conversations: [{from, value}]}``. Each human turn becomes a request
whose prompt is the whole conversation so far (earlier turns and answers), so successive turns extend the previous
prompt and exercise the prefix cache; the logged answer gives the reference and the expected output length.

Get the data: e.g. ``ShareGPT_V3_unfiltered_cleaned_split.json`` (anon8231489123/ShareGPT_Vicuna_unfiltered).
"""

from __future__ import annotations

from .base import LoadReport, WorkloadRequest, load_json_list, require

HOW = "Download a ShareGPT JSON (e.g. ShareGPT_V3_unfiltered_cleaned_split.json) and pass it with --data."
ROLES = {"human": "User", "user": "User", "gpt": "Assistant", "chatgpt": "Assistant", "assistant": "Assistant",
         "system": "System"}


def load(path: str, report: LoadReport | None = None, max_turns: int | None = None) -> list[WorkloadRequest]:
    report = report or LoadReport("sharegpt")
    require(path, "ShareGPT", HOW)
    convs = load_json_list(path, "ShareGPT", "conversations")
    out: list[WorkloadRequest] = []
    for n, conv in enumerate(convs):
        report.rows += 1
        where = f"{path}[{n}]"
        turns = conv.get("conversations") if isinstance(conv, dict) else None
        if not isinstance(turns, list) or not turns:
            report.skip("no conversations", where)
            continue
        if not all(isinstance(t, dict) and isinstance(t.get("value"), str) and t.get("from") in ROLES for t in turns):
            report.skip("malformed turn", where)
            continue
        history = ""
        turn_no = 0
        for i, t in enumerate(turns):
            role = ROLES[t["from"]]
            if role == "User":
                answer = turns[i + 1]["value"] if i + 1 < len(turns) and ROLES[turns[i + 1]["from"]] == "Assistant" else None
                prompt = history + f"User: {t['value']}\nAssistant:"
                out.append(WorkloadRequest(index=len(out), prompt=prompt, reference=answer,
                                           output_len=len(answer.encode()) if answer else None,
                                           metadata={"conversation": conv.get("id", str(n)), "turn": turn_no}))
                turn_no += 1
                if max_turns and turn_no >= max_turns:
                    break
            history += f"{role}: {t['value']}\n"
    report.loaded = len(out)
    return out
