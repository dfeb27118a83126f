"""Shared fixtures and their builders: a tiny BERT and a tiny Llama built from configs (no download), tiny labelled
CSV and prompt/response rows, run configs on them, a tiny Flower app directory, offline settings."""

from __future__ import annotations

import os
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

POSITIVE = ["good", "great", "wonderful", "moving", "brilliant", "fun", "charming", "sharp"]
NEGATIVE = ["bad", "dull", "awful", "boring", "clumsy", "tedious", "flat", "messy"]
FILLER = ["the", "film", "plot", "actors", "story", "movie", "was", "really", "quite", "and", "its", "ending"]


def make_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Short synthetic reviews whose label is carried by sentiment words: learnable by a tiny model."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "fresh" if i % 2 == 0 else "rotten"
        words = POSITIVE if label == "fresh" else NEGATIVE
        text = " ".join(rng.sample(FILLER, 4) + rng.sample(words, 2) + rng.sample(FILLER, 2))
        rows.append((text, label))
    rng.shuffle(rows)
    return rows


def write_csv(path: Path, rows: list[tuple[str, str]], *, header: str = "text,label") -> Path:
    path.write_text(header + "\n" + "".join(f'"{t}",{lab}\n' for t, lab in rows))
    return path


# a tiny Flower app (tests of app approval): its ClientApp module
CLIENT = 'def client_fn(rows):\n    """Train on the rows; return the update."""\n    return sum(rows)\n'


def write_app(app_dir: Path, *, client: str = CLIENT) -> Path:
    """A tiny Flower app: pyproject.toml, a ClientApp module (``client``), a ServerApp module."""
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text(
        '[project]\nname = "tinyapp"\nversion = "1.0.0"\n\n[tool.flwr.app]\npublisher = "site-tests"\n\n'
        '[tool.flwr.app.components]\nserverapp = "tinyapp.server:app"\nclientapp = "tinyapp.client:app"\n\n'
        "[tool.flwr.app.config]\nnum-server-rounds = 1\n"
    )
    (app_dir / "tinyapp").mkdir(exist_ok=True)
    (app_dir / "tinyapp" / "__init__.py").write_text("")
    (app_dir / "tinyapp" / "client.py").write_text(client)
    (app_dir / "tinyapp" / "server.py").write_text("app = None\n")
    return app_dir


def tiny_llama_config(**overrides: Any):
    """A 2-layer, 32-wide Llama's config on MiniLM's vocabulary: the shape of every tiny causal LM in the tests
    (``overrides`` for a test that needs another vocabulary or head count)."""
    from transformers import LlamaConfig

    shape: dict[str, Any] = dict(
        vocab_size=30522,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaConfig(**{**shape, **overrides})


def save_tiny_model(out: Path, model_class: Any, config: Any, *, tokenizer_from: Path) -> Path:
    """``model_class(config)`` with random weights from seed 0, saved in ``out`` with the tokenizer of
    ``tokenizer_from`` (a local directory: nothing is downloaded)."""
    import torch
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    model_class(config).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(tokenizer_from), local_files_only=True).save_pretrained(str(out))
    return out


def tiny_run_config(tmp_path: Path, **fields: Any):
    """A run config with what every tiny run shares (2 rounds of 2 local steps on batches of 8, learning rate 0.5,
    epsilon 8, no secure aggregation, outputs under ``tmp_path``) and the task's own ``fields``."""
    from shared.config import RunConfig

    return RunConfig(
        batch_size=8,
        local_steps=2,
        num_server_rounds=2,
        learning_rate=0.5,
        target_epsilon=8.0,
        secure_aggregation=False,
        output_dir=str(tmp_path / "runs"),
        **fields,
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide BERT for sequence classification with the MiniLM tokenizer, saved locally."""
    from transformers import BertConfig, BertForSequenceClassification

    from shared.model import resolve_model_path

    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
    )
    return save_tiny_model(
        tmp_path_factory.mktemp("tiny-bert"),
        BertForSequenceClassification,
        config,
        tokenizer_from=resolve_model_path("builtin:all-minilm-l6-v2"),
    )


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_csv(tmp_path_factory.mktemp("data") / "reviews.csv", make_rows(240))


@pytest.fixture()
def tiny_config(tiny_model_dir: Path, tiny_csv: Path, tmp_path: Path):
    return tiny_run_config(
        tmp_path,
        model_path=str(tiny_model_dir),
        data_path=str(tiny_csv),
        labels="rotten,fresh",
        max_length=16,
        max_test_examples=40,
    )


@pytest.fixture()
def no_dropout_config(tiny_config, tiny_model_dir: Path, tmp_path: Path):
    """``tiny_config`` on the tiny model saved again without dropout, so that two forward passes are comparable."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(
        str(tiny_model_dir), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    model.save_pretrained(str(tmp_path / "nodrop"))
    AutoTokenizer.from_pretrained(str(tiny_model_dir)).save_pretrained(str(tmp_path / "nodrop"))
    return replace(tiny_config, model_path=str(tmp_path / "nodrop"))


def write_instructions(path: Path, rows: list[tuple[str, str]]) -> Path:
    """``rows`` as prompt/response JSONL: the review in the prompt, its label as the short answer."""
    import json

    lines = [
        json.dumps({"prompt": f"Is this review fresh or rotten? {text}\nAnswer:", "response": f" {label}"})
        for text, label in rows
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_causal_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A 2-layer, 32-wide Llama (random weights) with the MiniLM tokenizer (no eos, no chat template), saved."""
    from transformers import LlamaForCausalLM

    return save_tiny_model(
        tmp_path_factory.mktemp("tiny-llama"), LlamaForCausalLM, tiny_llama_config(), tokenizer_from=tiny_model_dir
    )


@pytest.fixture(scope="session")
def tiny_instructions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_instructions(tmp_path_factory.mktemp("data") / "instructions.jsonl", make_rows(240))


@pytest.fixture()
def tiny_causal_config(tiny_causal_dir: Path, tiny_instructions: Path, tmp_path: Path):
    return tiny_run_config(
        tmp_path,
        task="causal-lm",
        model_path=str(tiny_causal_dir),
        data_path=str(tiny_instructions),
        lora_target_modules="q_proj,v_proj",
        max_length=32,
        max_test_examples=20,
    )


SIMULATION_KEYS = (
    "model-path",
    "data-path",
    "labels",
    "max-length",
    "batch-size",
    "local-steps",
    "max-test-examples",
    "learning-rate",
    "output-dir",
)


def simulation_overrides(config, **extra) -> dict:
    """The run-config overrides that make ``run_simulation`` use the tiny model and data of ``config``."""
    flat = config.to_flower()
    return {**{k: flat[k] for k in SIMULATION_KEYS}, "num-server-rounds": 2, **extra}


@pytest.fixture(autouse=True)
def flower_task_identity():
    """Flower 1.41 stamps every new Message with the process's task identity; tests play the SuperLink's part."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 4242
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    yield


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` need a CUDA device: skipped where torch sees none (CI is CPU-only)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
