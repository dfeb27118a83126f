"""The final adapter is a plain PEFT adapter: PeftModel.from_pretrained(base, dir) reproduces our model."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from server.outputs import ADAPTER_DIR, MODEL_CARD, save_adapter, write_json_atomic
from shared.model import (
    build_model,
    encode,
    fold_feature_center,
    get_feature_center,
    get_trainable,
    load_base_model,
    set_feature_center,
    set_trainable,
)
from tests.conftest import make_rows


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_saved_adapter_loads_with_plain_peft_and_gives_the_same_predictions(tiny_config, tmp_path, pooling):
    tiny_config = replace(tiny_config, classifier_pooling=pooling, center_features=pooling == "mean")
    model = build_model(tiny_config, 2)
    rng = np.random.default_rng(0)
    set_trainable(model, {k: rng.normal(0, 0.3, v.shape).astype(np.float32) for k, v in get_trainable(model).items()})
    if pooling == "mean":  # a centered head: the export folds the center into the head's bias
        center = rng.normal(0, 1.0, get_feature_center(model).shape).astype(np.float32)
        set_feature_center(model, center)
    out = save_adapter(fold_feature_center(model), tmp_path, card={"label_names": ["rotten", "fresh"]})
    if pooling == "mean":
        np.testing.assert_array_equal(get_feature_center(model), center)  # folded a copy, not the live model
    assert out == tmp_path / ADAPTER_DIR
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / MODEL_CARD).read_text())["label_names"] == ["rotten", "fresh"]

    if pooling == "cls":  # transformers' own head: nothing of ours in the base model
        base = AutoModelForSequenceClassification.from_pretrained(tiny_config.model_path, num_labels=2)
    else:
        base = load_base_model(tiny_config.model_path, num_labels=2, pooling="mean")
    loaded = PeftModel.from_pretrained(base, str(out)).eval()
    model.eval()
    rows = make_rows(16, seed=9)
    data = encode(
        AutoTokenizer.from_pretrained(tiny_config.model_path),
        [t for t, _ in rows],
        np.zeros(16),
        max_length=16,
    )
    with torch.no_grad():
        ours = model(input_ids=data.input_ids, attention_mask=data.attention_mask).logits
        theirs = loaded(input_ids=data.input_ids, attention_mask=data.attention_mask).logits
    torch.testing.assert_close(theirs, ours)
    assert not torch.allclose(ours[:, 0], ours[:, 1])  # a non-trivial head, so the comparison means something


def test_json_is_written_atomically_and_rejects_nan(tmp_path):
    path = tmp_path / "m.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(ValueError):
        write_json_atomic(path, {"a": float("nan")})
    assert json.loads(path.read_text()) == {"a": 1}  # the old file survives a failed write
