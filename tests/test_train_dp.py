"""DP-SGD under Opacus on a PEFT model: the step is the plain step when noise and clipping vanish, the
per-sample gradients of the LoRA tensors are right (opacus#820 once corrupted them), and the event recorded is
the one Opacus accounted."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from client.train import train_round
from shared.model import build_model, encode, flatten, get_trainable
from tests.conftest import make_rows


@pytest.fixture()
def no_dropout_config(tiny_config, tiny_model_dir, tmp_path):
    """The tiny model saved again without dropout, so that two forward passes are comparable."""
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(
        str(tiny_model_dir), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    model.save_pretrained(str(tmp_path / "nodrop"))
    AutoTokenizer.from_pretrained(str(tiny_model_dir)).save_pretrained(str(tmp_path / "nodrop"))
    return replace(tiny_config, model_path=str(tmp_path / "nodrop"))


def _data(cfg, n=12):
    rows = make_rows(n, seed=5)
    tok = AutoTokenizer.from_pretrained(cfg.model_path)
    labels = np.array([1 if lab == "fresh" else 0 for _, lab in rows])
    return encode(tok, [t for t, _ in rows], labels, max_length=cfg.max_length)


def _make_b_nonzero(model):
    # B starts at zero; with B = 0 the gradient of A vanishes and the LoRA path is trivially "right".
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)


@pytest.mark.parametrize("lora_mode", ["ffa", "lora"])
def test_dp_step_with_zero_noise_and_huge_clip_equals_the_plain_step(no_dropout_config, lora_mode):
    cfg = replace(no_dropout_config, lora_mode=lora_mode)
    data = _data(cfg)
    plain, private = build_model(cfg, 2), build_model(cfg, 2)
    _make_b_nonzero(plain)
    _make_b_nonzero(private)
    before = flatten(get_trainable(plain))
    before_b = get_trainable(plain)
    # batch_size = all rows: the plain step uses every row, and the Poisson rate is 1, so DP uses every row too
    common = dict(steps=1, batch_size=len(data), learning_rate=0.5, max_grad_norm=1e6, seed=0, optimizer_name="sgd")
    train_round(plain, data, dp=False, noise_multiplier=0.0, **common)
    result = train_round(private, data, dp=True, noise_multiplier=0.0, **common)
    after_plain, after_dp = flatten(get_trainable(plain)), flatten(get_trainable(private))
    assert result.event is not None and result.event.sample_rate == 1.0
    np.testing.assert_allclose(after_dp, after_plain, rtol=1e-4, atol=1e-6)
    assert np.linalg.norm(after_dp - before) > 1e-3  # the weights really moved
    b_moved = [n for n, a in get_trainable(private).items() if ".lora_B." in n and not np.allclose(a, before_b[n])]
    assert b_moved, "DP training did not change any LoRA B tensor (the opacus#820 symptom)"


def test_opacus_per_sample_gradients_of_lora_tensors_match_single_example_gradients(no_dropout_config):
    """The opacus#820 check: each LoRA (A and B) per-sample gradient equals that example's own gradient."""
    from opacus import GradSampleModule

    cfg = replace(no_dropout_config, lora_mode="lora")
    data = _data(cfg, n=4)
    model = build_model(cfg, 2)
    _make_b_nonzero(model)
    reference = {}
    loss_fn = torch.nn.CrossEntropyLoss()
    for i in range(4):
        model.zero_grad()
        out = model(input_ids=data.input_ids[i : i + 1], attention_mask=data.attention_mask[i : i + 1])
        loss_fn(out.logits, data.labels[i : i + 1]).backward()
        reference[i] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    gsm = GradSampleModule(model, loss_reduction="sum")
    out = gsm(input_ids=data.input_ids, attention_mask=data.attention_mask)
    torch.nn.CrossEntropyLoss(reduction="sum")(out.logits, data.labels).backward()
    checked = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        assert p.grad_sample is not None, f"no per-sample gradient for {name}"
        for i in range(4):
            torch.testing.assert_close(p.grad_sample[i], reference[i][name], rtol=1e-4, atol=1e-6)
        checked += "lora_" in name
    gsm._close()
    assert checked >= 4  # A and B of at least two layers


def test_dp_training_clips_and_noises_and_records_the_event_opacus_accounted(tiny_config):
    data = _data(tiny_config, n=24)
    model = build_model(tiny_config, 2)
    before = flatten(get_trainable(model))
    result = train_round(
        model,
        data,
        steps=3,
        batch_size=8,
        learning_rate=0.1,
        dp=True,
        noise_multiplier=1.3,
        max_grad_norm=0.7,
        seed=1,
    )
    assert result.event is not None
    assert (result.event.sample_rate, result.event.noise_multiplier) == (pytest.approx(8 / 24), 1.3)
    assert (result.event.steps, result.event.clip_norm) == (3, 0.7)
    assert np.linalg.norm(flatten(get_trainable(model)) - before) > 0
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())


def test_an_empty_poisson_batch_is_a_noise_only_step(tiny_config):
    data = _data(tiny_config, n=40)
    model = build_model(tiny_config, 2)
    # sample rate 1/40: many of the 5 batches are empty; every step must still be taken and accounted
    result = train_round(
        model,
        data,
        steps=5,
        batch_size=1,
        learning_rate=0.1,
        dp=True,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        seed=3,
    )
    assert result.event is not None and result.event.steps == 5
    assert result.empty_batches >= 1


def test_the_centering_query_is_the_mean_of_clipped_pooled_vectors_plus_calibrated_noise(no_dropout_config):
    from client.train import noisy_feature_mean
    from shared.model import pooled_features

    model = build_model(no_dropout_config, 2)
    _make_b_nonzero(model)  # the query reads the vectors under the global adapter, not the bare encoder
    data = _data(no_dropout_config, n=12)
    inner = model.base_model.model
    with torch.no_grad():  # by hand, one row at a time, unpadded
        rows = [
            inner.pool(data.input_ids[i : i + 1, : int(m.sum())], data.attention_mask[i : i + 1, : int(m.sum())])[0]
            for i, m in enumerate(data.attention_mask)
        ]
    by_hand = torch.stack(rows).double()
    torch.testing.assert_close(pooled_features(model, data, batch_size=5).double(), by_hand, rtol=1e-5, atol=1e-5)
    assert model.training  # read in eval mode, handed back in train mode

    exact = noisy_feature_mean(model, data, clip_norm=1e6, noise_multiplier=0.0, seed=None)
    np.testing.assert_allclose(exact, by_hand.mean(dim=0).numpy(), rtol=1e-5, atol=1e-6)
    clip = 0.5 * float(by_hand.norm(dim=1).min())  # every row clipped: each contributes a vector of norm `clip`
    clipped = noisy_feature_mean(model, data, clip_norm=clip, noise_multiplier=0.0, seed=None)
    unit = by_hand / by_hand.norm(dim=1, keepdim=True)
    np.testing.assert_allclose(clipped, (clip * unit).mean(dim=0).numpy(), rtol=1e-5, atol=1e-6)

    # noise: std noise_multiplier * clip on the sum, so std noise_multiplier * clip / n on the mean
    draws = np.stack(
        [noisy_feature_mean(model, data, clip_norm=clip, noise_multiplier=3.0, seed=s) for s in range(200)]
    )
    residual = draws - clipped
    assert residual.std() == pytest.approx(3.0 * clip / len(data), rel=0.05)
    assert abs(residual.mean()) < 4 * residual.std() / np.sqrt(residual.size)
    np.testing.assert_array_equal(
        noisy_feature_mean(model, data, clip_norm=clip, noise_multiplier=3.0, seed=7), draws[7]
    )
