"""Dataset loaders: each official format from its fixture, the .tgz / folder forms of RULER, and malformed
variants that are skipped with a counted reason instead of crashing."""

import io
import json
import os
import tarfile

import pytest

from dsa_otel.runners import burstgpt, longbench, ruler, sharegpt
from dsa_otel.runners.base import LoadReport, MissingDataError

FIX = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "runners", "fixtures")


def test_ruler_file_folder_and_tgz(tmp_path):
    one = ruler.load(os.path.join(FIX, "ruler_niah_single_1.jsonl"))
    assert len(one) == 4 and one[0].reference == "1000" and "special magic number" in one[0].prompt
    # the archive layout: <length>/<task>/validation.jsonl, tasks with different schemas
    tgz = tmp_path / "ruler.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        for task, fname in (("niah_single_1", "ruler_niah_single_1.jsonl"), ("qa_1", "ruler_qa_1.jsonl")):
            data = open(os.path.join(FIX, fname), "rb").read()
            info = tarfile.TarInfo(f"ruler/4096/{task}/validation.jsonl")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    rep = LoadReport("ruler")
    reqs = ruler.load(str(tgz), rep)
    assert len(reqs) == 7 and rep.loaded == 7 and not rep.skipped
    qa = [r for r in reqs if r.metadata["task"] == "qa_1"]
    assert len(qa) == 3 and qa[0].prompt.endswith("What is the capital of France?") and qa[0].reference == "Paris"
    folder = tmp_path / "f" / "qa_1"
    folder.mkdir(parents=True)
    (folder / "validation.jsonl").write_bytes(open(os.path.join(FIX, "ruler_qa_1.jsonl"), "rb").read())
    assert [r.metadata["task"] for r in ruler.load(str(tmp_path / "f"))] == ["qa_1"] * 3


def test_ruler_malformed_rows_are_counted(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"index": 0, "input": "ok", "outputs": ["1"]}\nnot json\n[1, 2]\n{"index": 3}\n\n')
    rep = LoadReport("ruler")
    reqs = ruler.load(str(p), rep)
    assert len(reqs) == 1 and rep.rows == 4
    assert rep.skipped == {"not JSON": 1, "not an object": 1, "no input/prompt/context+query": 1}


def test_ruler_synthetic_needles_have_the_requested_length():
    reqs = ruler.load("synthetic:2000")
    assert len(reqs) == 64
    for r in reqs[:5]:
        assert abs(len(r.prompt.encode()) - 2000) <= 2 and r.reference in r.prompt
    assert ruler.needle_prompt(3, 500).prompt == ruler.needle_prompt(3, 500).prompt  # deterministic


def test_longbench_template_and_filters(tmp_path):
    path = os.path.join(FIX, "longbench_v2_sample.json")
    reqs = longbench.load(path)
    assert len(reqs) == 4 and reqs[0].reference == "C"
    p = reqs[0].prompt
    assert p.startswith("Please read the following text") and "(C) 64" in p and "<text>" in p
    assert p.endswith('Format your response as follows: "The correct answer is (insert answer here)".')
    rep = LoadReport("longbench-v2")
    short_hard = longbench.load(path, rep, length="short", difficulty="hard")
    assert [r.metadata["_id"] for r in short_hard] == ["66f00002"] and sum(rep.skipped.values()) == 3
    bad = json.load(open(path))
    del bad[1]["choice_B"]
    bad.append("nope")
    (tmp_path / "lb.json").write_text(json.dumps(bad))
    rep = LoadReport("longbench-v2")
    assert len(longbench.load(str(tmp_path / "lb.json"), rep)) == 3
    assert rep.skipped == {"missing choice_B": 1, "not an object": 1}
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match="not LongBench-v2 JSON"):
        longbench.load(str(tmp_path / "broken.json"))


def test_sharegpt_turns_extend_the_previous_prompt(tmp_path):
    reqs = sharegpt.load(os.path.join(FIX, "sharegpt_sample.json"))
    assert len(reqs) == 5
    c0 = [r for r in reqs if r.metadata["conversation"] == "conv0"]
    assert c0[1].prompt.startswith(c0[0].prompt[: -len("Assistant:")])  # the second turn extends the first
    assert c0[0].reference == "Attention over a selected subset of tokens." and c0[0].output_len == 43
    c2 = [r for r in reqs if r.metadata["conversation"] == "conv2"]
    assert c2[0].prompt.startswith("System: Be brief.") and c2[1].metadata["turn"] == 1
    bad = json.load(open(os.path.join(FIX, "sharegpt_sample.json"))) + [{"id": "x"}, {"id": "y", "conversations": [{"from": "alien", "value": "?"}]}]
    (tmp_path / "sg.json").write_text(json.dumps(bad))
    rep = LoadReport("sharegpt")
    assert len(sharegpt.load(str(tmp_path / "sg.json"), rep)) == 5
    assert rep.skipped == {"no conversations": 1, "malformed turn": 1}
    (tmp_path / "obj.json").write_text('{"conversations": []}')
    with pytest.raises(ValueError, match="expected a JSON list of conversations"):
        sharegpt.load(str(tmp_path / "obj.json"))


def test_burstgpt_arrivals_lengths_and_window(tmp_path):
    path = os.path.join(FIX, "burstgpt_sample.csv")
    reqs = burstgpt.load(path, time_scale=2.0)
    assert len(reqs) == 10 and reqs[0].arrival_s == 0.0
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(reqs, reqs[1:]))
    rows = [line.split(",") for line in open(path).read().splitlines()[1:]]
    t0 = float(rows[0][0])
    for r, row in zip(reqs, rows):
        assert r.prompt_tokens == int(row[2]) == len(r.prompt.encode()) and r.output_len == int(row[3])
        assert r.arrival_s == pytest.approx((float(row[0]) - t0) / 2.0)
    conv = burstgpt.load(path, log_type="Conversation log")
    assert len(conv) == 5
    windowed = burstgpt.load(path, start_s=t0 + 1.0)
    assert windowed and windowed[0].arrival_s == 0.0 and len(windowed) < 10
    bad = tmp_path / "b.csv"
    bad.write_text(open(path).read() + "oops,ChatGPT,x,1,2,API log\n9999,ChatGPT,50,0,50,API log\n")
    rep = LoadReport("burstgpt")
    assert len(burstgpt.load(str(bad), rep)) == 10
    assert rep.skipped == {"non-numeric field": 1, "no response tokens (failed request)": 1}
    (tmp_path / "w.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a BurstGPT CSV"):
        burstgpt.load(str(tmp_path / "w.csv"))


@pytest.mark.parametrize("mod", [ruler, longbench, sharegpt, burstgpt])
def test_missing_data_says_where_to_get_it(mod, tmp_path):
    with pytest.raises(MissingDataError) as e:
        mod.load(str(tmp_path / "absent"))
    assert "--data" in str(e.value) or "pass" in str(e.value)
