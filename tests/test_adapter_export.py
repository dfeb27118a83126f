"""The adapter a run publishes is usable without this project: ``merged/`` loads with plain transformers and
gives the logits the project's own loader gives, and README.md is a real model card with no local path."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from server.outputs import (
    EXPORT_DIR,
    HEAD_FILE,
    README_FILE,
    model_card,
    public_name,
    publish_adapter,
    save_adapter,
)
from shared.model import (
    build_model,
    fold_feature_center,
    get_trainable,
    load_tokenizer,
    set_feature_center,
    set_trainable,
)
from shared.predict import load_classifier

TEXTS = ["a sharp, moving film", "dull", "the plot was really quite tedious and the ending flat and messy"]

# Run in a fresh interpreter (-I: no PYTHONPATH, no current directory on sys.path) that refuses to import this
# project even though the venv has it installed in editable mode.
NO_PROJECT = """
import sys
class _NoProject:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("shared", "server", "client", "tests"):
            raise ImportError(f"the export must load without this project, but {name} was imported")
        return None
sys.meta_path.insert(0, _NoProject())
"""


def _published(tiny_config, tmp_path: Path, pooling: str, history: dict | None = None) -> Path:
    cfg = replace(tiny_config, classifier_pooling=pooling, center_features=pooling == "mean")
    model = build_model(cfg, 2)
    rng = np.random.default_rng(3)
    set_trainable(model, {k: rng.normal(0, 0.3, v.shape).astype(np.float32) for k, v in get_trainable(model).items()})
    if pooling == "mean":  # a centered head, as a default run has: the export must carry the folded bias
        set_feature_center(model, rng.normal(0, 1.0, 32).astype(np.float32))
    card = {
        "base_model": cfg.model_path,
        "classifier_pooling": pooling,
        "label_names": ["rotten", "fresh"],
        "max_length": 16,
    }
    folded = fold_feature_center(model)
    adapter_dir = save_adapter(folded, tmp_path, card=card)
    records = [
        {"round": 0, "attestations": {"site-0": {"epsilon": 0.16, "delta": 1e-5, "accountant": "prv"}}},
        {
            "round": 1,
            "attestations": {
                "site-0": {"epsilon": 7.9912345678, "delta": 1e-5, "accountant": "prv"},
                "site-1": {"epsilon": 3.3333333333333335, "delta": 1e-6, "accountant": "rdp"},
            },
        },
    ]
    history = history or {
        "run_id": "77",
        "config": {"num-server-rounds": 1, "dp": True, "secure-aggregation": True, "lora-mode": "ffa"},
        "rounds": [{"round": 1, "test": {"accuracy": 0.6666666666666666, "macro_f1": 0.5, "loss": 0.61234}}],
    }
    publish_adapter(
        adapter_dir,
        folded,
        history=history,
        run_records=records,
        data_path=str(tmp_path / "secret-dir" / "reviews.csv"),
        tokenizer=load_tokenizer(cfg.model_path),
    )
    return adapter_dir


def _project_logits(adapter_dir: Path) -> np.ndarray:
    classifier = load_classifier(adapter_dir)
    batch = classifier.tokenizer(TEXTS, padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        return classifier.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.numpy()


def _plain_python(code: str, cwd: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run(
        [sys.executable, "-I", "-c", NO_PROJECT + code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _card_snippet(adapter_dir: Path) -> str:
    card = (adapter_dir / README_FILE).read_text()
    blocks = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    return blocks[0]  # the first block: the one without PrivaTune


def test_mean_pooling_export_loads_with_plain_transformers_and_gives_the_projects_logits(tiny_config, tmp_path):
    adapter_dir = _published(tiny_config, tmp_path, "mean")
    snippet = _card_snippet(adapter_dir)
    assert "shared" not in snippet and "privatune" not in snippet.lower()
    code = snippet.replace('["a sharp, moving film"]', repr(TEXTS))  # the card's own code, on three rows
    code += "\nimport json\nprint(json.dumps(logits.tolist()))\n"

    theirs = np.array(_plain_python(code, cwd=adapter_dir))

    assert (adapter_dir / EXPORT_DIR / HEAD_FILE).is_file()
    ours = _project_logits(adapter_dir)
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-5)
    assert not np.allclose(ours[:, 0], ours[:, 1])  # a non-trivial head, so the comparison means something


def test_cls_export_is_a_plain_sequence_classifier_with_the_projects_logits(tiny_config, tmp_path):
    adapter_dir = _published(tiny_config, tmp_path, "cls")
    code = f"""
import json, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
path = {EXPORT_DIR!r}
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForSequenceClassification.from_pretrained(path).eval()
batch = tokenizer({TEXTS!r}, padding=True, truncation=True, max_length=16, return_tensors="pt")
with torch.no_grad():
    logits = model(**batch).logits
print(json.dumps({{"logits": logits.tolist(), "labels": model.config.id2label}}))
"""
    theirs = _plain_python(code, cwd=adapter_dir)

    np.testing.assert_allclose(np.array(theirs["logits"]), _project_logits(adapter_dir), rtol=1e-4, atol=1e-5)
    assert theirs["labels"] == {"0": "rotten", "1": "fresh"}
    snippet = _card_snippet(adapter_dir)
    assert "pipeline" in snippet and "shared" not in snippet


def test_no_local_path_is_left_in_the_adapter_config_or_the_card(tiny_config, tmp_path):
    adapter_dir = _published(tiny_config, tmp_path, "mean")

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    card = (adapter_dir / README_FILE).read_text()
    assert config["base_model_name_or_path"] == Path(tiny_config.model_path).name
    for text in (json.dumps(config), card):
        assert str(tmp_path) not in text and str(Path(tiny_config.model_path).parent) not in text
    assert "secret-dir" not in card and "`reviews.csv`" in card


def test_the_model_card_gives_base_data_rounds_privacy_per_site_and_metrics(tiny_config, tmp_path):
    adapter_dir = _published(tiny_config, tmp_path, "mean")

    card = (adapter_dir / README_FILE).read_text()

    assert "Model Card for Model ID" not in card  # PEFT's blank template is gone
    assert f"base_model: {Path(tiny_config.model_path).name}" in card
    assert "| rounds | 1 of 1 planned |" in card
    assert "| site-0 | 7.991 | 1e-05 | prv | 1 | attested |" in card  # the last attested, cumulative epsilon
    assert "| site-1 | 3.333 | 1e-06 | rdp | 1 | no |" in card  # training rounds as "1 of 1"; round 0 apart
    assert "| 0.6667 | 0.5000 | 0.6123 | not recorded |" in card  # rounded; no majority baseline recorded
    assert "0.6666666" not in card and "3.33333" not in card


def test_the_model_card_shows_the_majority_baseline_when_the_run_recorded_it():
    history = {
        "run_id": "1",
        "majority_baseline": {"accuracy": 0.5416666666666666, "label": "fresh"},
        "rounds": [{"round": 1, "test": {"accuracy": 0.7, "macro_f1": 0.69, "loss": 0.5}}],
    }
    card = {"base_model": "builtin:all-minilm-l6-v2", "classifier_pooling": "mean", "label_names": ["a", "b"]}

    text = model_card(
        card={**card, "max_length": 48}, history=history, run_records=[], data_path="builtin:x", exported=True
    )

    assert "| 0.7000 | 0.6900 | 0.5000 | 0.5417 |" in text
    assert "No site attested a release in this run." in text


def test_the_model_card_shows_each_labels_recall_and_warns_about_a_label_the_adapter_rarely_finds():
    per_class = {
        "rotten": {"rows": 342, "found": 77, "recall": 77 / 342},
        "fresh": {"rows": 468, "found": 468, "recall": 1.0},
    }
    test = {"accuracy": 0.6728, "macro_f1": 0.59, "loss": 0.6, "top_class": 1, "top_class_share": 733 / 810}
    history = {
        "run_id": "1",
        "majority_baseline": {"accuracy": 468 / 810, "macro_f1": 0.366, "class": 1},
        "rounds": [{"round": 3, "test": {**test, "per_class": per_class}}],
    }
    card = {"base_model": "builtin:all-minilm-l6-v2", "classifier_pooling": "mean", "label_names": ["rotten", "fresh"]}

    text = model_card(card={**card, "max_length": 48}, history=history, run_records=[], data_path="x", exported=True)

    assert "the majority-class baseline, always 'fresh', finds every 'fresh' row and no other" in text
    assert "| label | test rows | found | recall |" in text
    assert "| rotten | 342 | 77 | 0.2251 |" in text and "| fresh | 468 | 468 | 1.0000 |" in text
    assert "**Warning:** this adapter finds only 77 of 342 'rotten' rows (recall 0.2251)" in text
    balanced = {name: {"rows": c["rows"], "found": c["rows"] * 3 // 4, "recall": 0.75} for name, c in per_class.items()}
    history["rounds"][0]["test"] = {**test, "top_class_share": 0.5, "per_class": balanced}
    text = model_card(card={**card, "max_length": 48}, history=history, run_records=[], data_path="x", exported=True)
    assert "| rotten | 342 | 256 | 0.7500 |" in text and "Warning" not in text


@pytest.mark.parametrize(
    ("path", "shown"),
    [("builtin:all-minilm-l6-v2", "builtin:all-minilm-l6-v2"), ("/home/ana/models/my-bert", "my-bert")],
)
def test_public_names_keep_builtin_names_and_drop_directories(path, shown):
    assert public_name(path) == shown


def test_the_card_shows_the_metrics_privatune_json_gives_for_this_adapter():
    history = {"run_id": "1", "rounds": [{"round": 2, "test": {"accuracy": 0.5, "macro_f1": 0.33, "loss": 0.9}}]}
    card = {
        "base_model": "builtin:all-minilm-l6-v2",
        "classifier_pooling": "mean",
        "label_names": ["a", "b"],
        "max_length": 48,
        "final_test": {"accuracy": 0.71, "macro_f1": 0.7, "loss": 0.55},  # e.g. the best round's adapter
    }

    text = model_card(card=card, history=history, run_records=[], data_path="builtin:x", exported=True)

    assert "| 0.7100 | 0.7000 | 0.5500 | not recorded |" in text
    # the best round's card (server/evaluation.update_best) has its round's metrics as "test", no final_test
    best = {k: v for k, v in card.items() if k != "final_test"}
    best |= {"round": 1, "adapter": "best", "test": {"accuracy": 0.66, "macro_f1": 0.6, "loss": 0.7}}
    text = model_card(card=best, history=history, run_records=[], data_path="builtin:x", exported=True)
    assert "| 0.6600 | 0.6000 | 0.7000 | not recorded |" in text and "| this adapter | round 1 (best) |" in text
