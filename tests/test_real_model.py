"""The bundled all-MiniLM-L6-v2 through the default head (the only test that loads the real encoder)."""

import numpy as np
import pytest
import torch

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
