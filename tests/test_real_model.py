"""The bundled all-MiniLM-L6-v2 through the default head (the only test that loads the real encoder)."""

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from shared.config import RunConfig
from shared.model import build_model, encode, get_trainable, load_tokenizer

pytestmark = pytest.mark.integration


def test_default_model_is_minilm_with_a_mean_pooling_head_and_ffa_lora():
    cfg = RunConfig()
    model = build_model(cfg, num_labels=2).eval()
    inner = model.base_model.model
    assert type(inner).__name__ == "MeanPoolingClassifier" and inner.config.hidden_size == 384
    trained = get_trainable(model)
    # rank 2 on query and value of 6 layers: 6 x 2 x (384 x 2) B values, plus a 384 x 2 head and its bias
    assert sum(v.size for v in trained.values()) == 6 * 2 * 384 * 2 + 384 * 2 + 2
    texts = ["a moving, funny and wise film", "tedious and badly acted", "ok", "the plot goes nowhere at all"]
    enc = encode(load_tokenizer(cfg.model_path), texts, np.zeros(4), max_length=cfg.max_length)
    with torch.no_grad():
        batch = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
        one = model(input_ids=enc.input_ids[2:3, :4], attention_mask=enc.attention_mask[2:3, :4]).logits
    assert torch.isfinite(batch).all()
    torch.testing.assert_close(batch[2:3], one, atol=1e-5, rtol=1e-4)  # padding does not move the mean


def test_the_readmes_sizes_are_the_default_adapters_and_checkpoints(tmp_path):
    from server.checkpoint import Checkpoint, save_checkpoint
    from server.outputs import save_adapter
    from shared.model import fold_feature_center

    cfg = RunConfig()
    model = build_model(cfg, num_labels=2)
    card = {"base_model": cfg.model_path, "classifier_pooling": "mean", "label_names": ["a", "b"], "max_length": 128}
    adapter = save_adapter(fold_feature_center(model), tmp_path, card=card) / "adapter_model.safetensors"
    arrays = get_trainable(model)
    save_checkpoint(
        tmp_path,
        Checkpoint(
            run_id="1", lineage=[], server_round=3, config={}, rng_state={}, history={}, run_ledger_head=None,
            arrays=arrays,
        ),
    )  # fmt: skip
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    said = {
        "adapter": re.search(r"`adapter/adapter_model.safetensors`, (\d+) KB at the defaults", readme),
        "numbers": re.search(r"the 2-label head, ([\d,]+) float32 numbers", readme),
        "checkpoint": re.search(r"tensors in the `.npz`, (\d+) KB at the defaults", readme),
    }

    assert all(said.values()), said
    assert round(adapter.stat().st_size / 1000) == int(said["adapter"][1])  # type: ignore[index]
    with safe_open(str(adapter), "pt") as f:  # LoRA's A (frozen, but saved) and B, and the head
        numbers = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118  (not a dict)
    assert numbers == int(said["numbers"][1].replace(",", ""))  # type: ignore[index]
    assert round((tmp_path / "checkpoint-r3.npz").stat().st_size / 1000) == int(said["checkpoint"][1])  # type: ignore[index]
