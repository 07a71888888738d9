"""Prompt sets: generated sets are deterministic, split cleanly and pass their own checks;
user files in Flow-GRPO's formats load, and bad lines fail with file:line before any model."""

import json
import sys
import types

import pytest

import prompts
import rewards
import tiny


@pytest.mark.parametrize("task", ["ocr", "geneval"])
def test_generated_sets_are_deterministic_and_disjoint(task):
    train, test = prompts.load_prompts(task, "train"), prompts.load_prompts(task, "test")
    assert train == prompts.load_prompts(task, "train") and len(train) > 5 * len(test) > 0
    key = (lambda r: r["metadata"]["text"].lower()) if task == "ocr" else (lambda r: r["prompt"])
    assert not {key(r) for r in train} & {key(r) for r in test}
    assert len({key(r) for r in train}) == len(train)  # no duplicates
    assert all(r["task"] == task and set(r) == {"prompt", "task", "metadata"} for r in train + test)


def test_ocr_rows_quote_their_target():
    rows = prompts.load_prompts("ocr", "train")
    assert len(rows) == prompts.OCR_SIZE["train"]
    assert all(rewards.quoted_text(r["prompt"]) == r["metadata"]["text"] for r in rows)
    assert all(prompts.make_row("ocr", r["prompt"], {}, "x") == r for r in rows[:50])


def test_geneval_rows_are_valid_and_cover_classes_colours_tags():
    rows = prompts.load_prompts("geneval", "train")
    assert all(prompts.geneval_problem(r["metadata"]) is None for r in rows)
    assert all(r["metadata"]["prompt"] == r["prompt"] for r in rows)
    metas = [r["metadata"] for r in rows]
    assert {m["tag"] for m in metas} == set(prompts.GENEVAL_TAGS)
    assert {q["class"] for m in metas for q in m["include"]} == set(rewards.COCO_CLASSES)
    assert {q["color"] for m in metas for q in m["include"] if "color" in q} == set(rewards.COLORS)
    assert {m["tag"] for m in (r["metadata"] for r in prompts.load_prompts("geneval", "test"))} == set(prompts.GENEVAL_TAGS)
    counting = next(m for m in metas if m["tag"] == "counting")
    assert counting["exclude"] == [{"class": counting["include"][0]["class"], "count": counting["include"][0]["count"] + 1}]
    position = next(m for m in metas if m["tag"] == "position")
    assert position["include"][1]["position"][1] == 0 and position["include"][1]["position"][0] in position["prompt"]


def test_articles_and_plurals():
    assert prompts.with_article("apple") == "an apple" and prompts.with_article("dog") == "a dog"
    assert [prompts.plural(c) for c in ["bus", "dog", "knife", "skis", "person", "toothbrush"]] == [
        "buses", "dogs", "knives", "pairs of skis", "people", "toothbrushes"]


def test_ocr_txt_file_and_unquoted_line(tmp_path, monkeypatch):
    monkeypatch.setattr(rewards, "MODELS", {})
    path = tmp_path / "ocr.txt"
    path.write_text('A sign that reads "Open"\n\nA mug with “Good Morning” on it\n')
    rows = prompts.load_prompts("ocr", "test", path=str(path))
    assert [r["metadata"]["text"] for r in rows] == ["Open", "Good Morning"]
    path.write_text('A sign that reads "Open"\nA mug with "Hi" on it\nA sign that reads open\n')
    with pytest.raises(ValueError, match=r"ocr\.txt:3: OCR prompt has no quoted text"):
        prompts.load_prompts("ocr", "train", path=str(path))
    assert rewards.MODELS == {}  # nothing loaded on the way to the error


GOOD = {"tag": "position", "prompt": "a photo of a dog left of a cat",
        "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["left of", 0]}]}


def write_jsonl(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return str(path)


def test_geneval_jsonl_loads(tmp_path):
    rows = prompts.load_prompts("geneval", "test", path=write_jsonl(tmp_path / "meta.jsonl", [GOOD, GOOD]))
    assert rows == [{"prompt": GOOD["prompt"], "task": "geneval", "metadata": GOOD}] * 2


@pytest.mark.parametrize("bad, problem", [
    ('{"tag": "single_object", "prompt": "a dog"', "malformed JSON"),
    ({"tag": "single_object", "include": [{"class": "dog", "count": 1}]}, "string 'prompt'"),
    ({"tag": "single_object", "prompt": "a dog"}, "'include' must be a non-empty list"),
    ({"tag": "portrait", "prompt": "a dog", "include": [{"class": "dog", "count": 1}]}, "tag 'portrait'"),
    ({"tag": "single_object", "prompt": "a unicorn", "include": [{"class": "unicorn", "count": 1}]}, "unknown class"),
    ({"tag": "single_object", "prompt": "a dog", "include": [{"class": "dog"}]}, "needs 'class' and 'count'"),
    ({"tag": "counting", "prompt": "dogs", "include": [{"class": "dog", "count": 0}]}, "positive integer"),
    ({"tag": "colors", "prompt": "a teal dog", "include": [{"class": "dog", "count": 1, "color": "teal"}]}, "colour 'teal'"),
    ({**GOOD, "include": [GOOD["include"][1], GOOD["include"][0]]}, r"include\[0\]: position"),
])
def test_geneval_jsonl_bad_line_names_file_and_line(tmp_path, bad, problem):
    path = write_jsonl(tmp_path / "meta.jsonl", [GOOD, bad, GOOD])
    with pytest.raises(ValueError, match=rf"meta\.jsonl:2: .*{problem}"):
        prompts.load_prompts("geneval", "test", path=path)


def test_empty_and_wrong_kind_of_files(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match=r"empty\.txt: no prompts"):
        prompts.load_prompts("ocr", "train", path=str(tmp_path / "empty.txt"))
    (tmp_path / "geneval.txt").write_text("a photo of a dog\n")
    with pytest.raises(ValueError, match="metadata .jsonl"):
        prompts.load_prompts("geneval", "train", path=str(tmp_path / "geneval.txt"))


def test_folder_in_flow_grpo_layout(tmp_path):
    (tmp_path / "train.txt").write_text('a sign saying "one"\n')
    write_jsonl(tmp_path / "test_metadata.jsonl", [GOOD])
    assert prompts.load_prompts("ocr", "train", path=str(tmp_path))[0]["metadata"]["text"] == "one"
    assert prompts.load_prompts("geneval", "test", path=str(tmp_path))[0]["metadata"] == GOOD
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: no test\.txt, test\.jsonl or test_metadata\.jsonl"):
        prompts.load_prompts("ocr", "test", path=str(tmp_path / "empty"))


def test_held_out_note_only_for_a_single_file(tmp_path):
    (tmp_path / "train.txt").write_text("a cat\n")
    note = prompts.held_out_note(str(tmp_path / "train.txt"))
    assert note.startswith(f"note: {tmp_path / 'train.txt'} is one file") and "\n" not in note
    assert prompts.held_out_note(str(tmp_path)) is None and prompts.held_out_note("") is None


def test_other_tasks_from_files_and_tiny_world(tmp_path, monkeypatch):
    (tmp_path / "p.txt").write_text("a cozy cabin at dusk\n")
    assert prompts.load_prompts("pickscore", "train", path=str(tmp_path / "p.txt")) == [
        {"prompt": "a cozy cabin at dusk", "task": "pickscore", "metadata": {}}]
    row = {"prompt": "two red squares", "task": "count", "metadata": {"n": 2}}
    world = types.SimpleNamespace(prompt_set=lambda task, split: [dict(row, task=task, metadata={"split": split})])
    monkeypatch.setitem(sys.modules, "tiny.world", world)
    monkeypatch.setattr(tiny, "world", world)
    assert prompts.load_prompts("count", "test") == [{"prompt": "two red squares", "task": "count", "metadata": {"split": "test"}}]


def test_unknown_task_and_split():
    with pytest.raises(ValueError, match="unknown split 'val'"):
        prompts.load_prompts("ocr", "val")
    with pytest.raises(ValueError, match="no built-in prompts for task 'pickscore'.*ocr, geneval, count"):
        prompts.load_prompts("pickscore", "train")


def test_spread_covers_every_tag_of_a_grouped_set():
    rows = prompts.load_prompts("count", "test")  # grouped by tag: single, counting, two_object, position
    picked = prompts.spread(rows, 16)
    assert len(picked) == 16 and len({id(r) for r in picked}) == 16
    assert {r["metadata"]["tag"] for r in picked} == {"single", "counting", "two_object", "position"}
    assert {r["metadata"]["tag"] for r in rows[:16]} != {"single", "counting", "two_object", "position"}
    assert [r["index"] for r in picked] == [i * len(rows) // 16 for i in range(16)]
    for every in (prompts.spread(rows, 0), prompts.spread(rows, 10_000)):
        assert [{k: v for k, v in r.items() if k != "index"} for r in every] == rows
        assert [r["index"] for r in every] == list(range(len(rows)))


def test_balanced_draws_give_tasks_and_tags_equal_shares():
    import collections
    import common
    rows = prompts.load_prompts("count", "train") + prompts.load_prompts("text", "train")
    draw = lambda balance: [r for step in range(200) for r in common.sample_rows(rows, 20, 0, step, 0, balance)]
    tasks = collections.Counter(r["task"] for r in draw(True))
    tags = collections.Counter(r["metadata"]["tag"] for r in draw(True) if r["task"] == "count")
    assert abs(tasks["count"] / 4000 - 0.5) < 0.03
    assert all(abs(n / sum(tags.values()) - 0.25) < 0.03 for n in tags.values()), tags
    uniform = collections.Counter(r["metadata"]["tag"] for r in draw(False) if r["task"] == "count")
    assert uniform["single"] / sum(uniform.values()) < 0.05  # the control: 7 of 336 prompts
    assert common.sample_rows(rows, 20, 0, 3, 0, True) == common.sample_rows(rows, 20, 0, 3, 0, True)


def test_prompts_need_no_torch():
    """prompts.py holds the vocabulary it shares with rewards.py (GenEval's classes, the OCR quote
    rule), so reading prompt sets imports no torch; the control: rewards.py does."""
    import subprocess
    from pathlib import Path
    check = "import sys, {0}; {0}.load_prompts('geneval', 'test') if '{0}' == 'prompts' else None; print('torch' in sys.modules)"
    for module, torch_loaded in (("prompts", "False"), ("rewards", "True")):
        out = subprocess.run([sys.executable, "-c", check.format(module)], cwd=Path(__file__).resolve().parents[1],
                             capture_output=True, text=True, timeout=120)
        assert out.stdout.strip() == torch_loaded, (module, out.stdout, out.stderr[-500:])
