"""Offline loaders for duquant's local zero-shot tasks (lm-eval `custom_dataset` functions).

Each loader reads the local copy of a data set from the duquant data directory ($DUQUANT_DATA_DIR,
see shared/data/MANIFEST.md) and returns it as a `datasets.DatasetDict` whose rows have exactly the
fields lm-eval's own task of the same data set sees on the hub (after its `process_docs`), so the
prompts, targets and choices in the YAML files beside this module can be copied verbatim from
lm-eval's task definitions. lm-eval imports this file by path (`!function utils.name`), and duquant
imports it as `duquant.eval.tasks.utils` for the file table.
"""

from __future__ import annotations

import bz2
import json
import re
from pathlib import Path

# task -> files (relative to the data directory) it reads; the first file is the examples
LOCAL_FILES: dict[str, tuple[str, ...]] = {
    "arc_easy": ("arc/ARC-Easy-Test.jsonl",),
    "arc_challenge": ("arc/ARC-Challenge-Test.jsonl",),
    "hellaswag": ("hellaswag/hellaswag_val_full.txt.bz2",),
    "winogrande": ("winogrande/dev.jsonl",),
    "lambada_openai": ("lambada_openai/lambada_test.jsonl",),
    "piqa": ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
    "openbookqa": ("openbookqa/test.jsonl",),
}


def local_root() -> Path:
    """The data directory, or an error naming what is needed."""
    from duquant.data import DataNotFoundError, data_dir

    root = data_dir()
    if root is None:
        raise DataNotFoundError(
            "no duquant data directory: set DUQUANT_DATA_DIR (see shared/data/MANIFEST.md)"
        )
    return root


def local_paths(task: str) -> list[Path]:
    """Absolute paths of the files `task` reads (they may not exist)."""
    root = local_root()
    return [root / rel for rel in LOCAL_FILES[task]]


def _read_jsonl(path: Path) -> list[dict]:
    """Rows of a jsonl file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _dataset(split: str, rows: list[dict]):
    """A DatasetDict with one split."""
    import datasets

    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})


def _ai2_choices(question: dict) -> dict:
    """AI2 `question.choices` [{text, label}] as the hub's {text: [...], label: [...]}."""
    return {
        "text": [c["text"] for c in question["choices"]],
        "label": [c["label"] for c in question["choices"]],
    }


def _arc_rows(path: Path) -> list[dict]:
    """ARC in the hub's allenai/ai2_arc layout: id, question, choices{text,label}, answerKey."""
    return [
        {
            "id": r["id"],
            "question": r["question"]["stem"],
            "choices": _ai2_choices(r["question"]),
            "answerKey": r["answerKey"],
        }
        for r in _read_jsonl(path)
    ]


def load_arc_easy(**_: object):
    """ARC-Easy test from the local AI2 jsonl."""
    return _dataset("test", _arc_rows(local_paths("arc_easy")[0]))


def load_arc_challenge(**_: object):
    """ARC-Challenge test from the local AI2 jsonl."""
    return _dataset("test", _arc_rows(local_paths("arc_challenge")[0]))


def load_openbookqa(**_: object):
    """OpenBookQA main test in the hub's allenai/openbookqa layout."""
    rows = [
        {
            "id": r["id"],
            "question_stem": r["question"]["stem"],
            "choices": _ai2_choices(r["question"]),
            "answerKey": r["answerKey"],
        }
        for r in _read_jsonl(local_paths("openbookqa")[0])
    ]
    return _dataset("test", rows)


def load_winogrande(**_: object):
    """WinoGrande 1.1 dev (= lm-eval's validation split of winogrande_xl)."""
    rows = [
        {k: r[k] for k in ("sentence", "option1", "option2", "answer")}
        for r in _read_jsonl(local_paths("winogrande")[0])
    ]
    return _dataset("validation", rows)


# lm-eval's winogrande prompt functions (tasks/winogrande/preprocess_winogrande.py), verbatim
def winogrande_doc_to_text(doc: dict) -> int:
    """The index of the correct option (partial scoring: the choices are the contexts)."""
    answer_to_num = {"1": 0, "2": 1}
    return answer_to_num[doc["answer"]]


def winogrande_doc_to_target(doc: dict) -> str:
    """The sentence after the blank, scored after each option."""
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc: dict) -> list[str]:
    """The sentence up to the blank, completed with each option."""
    idx = doc["sentence"].index("_")
    options = [doc["option1"], doc["option2"]]
    return [doc["sentence"][:idx] + opt for opt in options]


def load_piqa(**_: object):
    """PIQA validation: the authors' jsonl joined with their labels file."""
    data, labels = local_paths("piqa")
    rows = _read_jsonl(data)
    gold = [int(x) for x in labels.read_text().split()]
    if len(gold) != len(rows):
        raise ValueError(f"{labels} has {len(gold)} labels for {len(rows)} PIQA examples")
    out = [
        {"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": g}
        for r, g in zip(rows, gold, strict=True)
    ]
    return _dataset("validation", out)


def load_lambada_openai(**_: object):
    """LAMBADA (OpenAI version) test: one `text` per row."""
    rows = [{"text": r["text"]} for r in _read_jsonl(local_paths("lambada_openai")[0])]
    return _dataset("test", rows)


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag `preprocess` (strip, drop [bracketed] WikiHow markup, collapse double spaces)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def hellaswag_rows(path: Path) -> list[dict]:
    """The llama.cpp HellaSwag text (6 lines a task) as lm-eval's processed docs: query, choices, label."""
    with bz2.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    while lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise ValueError(
            f"{path}: {len(lines)} lines is not a multiple of 6 (context, gold, 4 endings)"
        )
    rows = []
    for i in range(0, len(lines), 6):
        ctx, gold, *endings = lines[i : i + 6]
        rows.append(
            {
                "query": hellaswag_preprocess(ctx),
                "choices": [hellaswag_preprocess(e) for e in endings],
                "label": int(gold),
            }
        )
    return rows


def load_hellaswag(**_: object):
    """HellaSwag validation from the preprocessed llama.cpp copy (close to, not identical with, lm-eval's)."""
    return _dataset("validation", hellaswag_rows(local_paths("hellaswag")[0]))
