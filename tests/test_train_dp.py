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


@pytest.mark.parametrize("drawn", ["no batch draws a row", "only the first batch is empty"])
def test_an_empty_poisson_batch_is_a_noise_only_step_and_never_a_nan_loss(no_dropout_config, monkeypatch, drawn):
    """The "Also found" bug: a round whose Poisson batches all drew no row averaged no losses into NaN, and the
    NaN killed the simulation's metrics JSON. An empty batch is a legal DP-SGD step (noise only), accounted."""
    from client.dp_random import PoissonBatchSampler

    real_iter = PoissonBatchSampler.__iter__

    def batches(self):
        real = real_iter(self)
        for i in range(self.num_batches):
            drawn_rows = next(real)
            yield [] if drawn == "no batch draws a row" or i == 0 else drawn_rows

    monkeypatch.setattr(PoissonBatchSampler, "__iter__", batches)
    data = _data(no_dropout_config, n=16)
    model = build_model(no_dropout_config, 2)
    before = flatten(get_trainable(model))
    result = train_round(
        model,
        data,
        steps=4,
        batch_size=4,  # 4 batches of 16 rows: one pass of the sampler
        learning_rate=0.1,
        optimizer_name="sgd",
        dp=True,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        seed=None,
    )
    after = flatten(get_trainable(model))
    assert result.event is not None and result.event.steps == 4  # every step taken and accounted
    assert np.all(np.isfinite(after)) and np.linalg.norm(after - before) > 0  # the noise moved the weights
    if drawn == "no batch draws a row":
        assert result.empty_batches == 4 and result.mean_loss is None  # no loss to report, not NaN
    else:
        assert result.empty_batches >= 1 and result.mean_loss is not None and np.isfinite(result.mean_loss)


def test_the_centering_answer_is_the_sum_of_clipped_vectors_and_the_count_plus_calibrated_noise(no_dropout_config):
    from client.train import noisy_feature_sum
    from shared.centering import ANSWER_SCALE, center_from_sum
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

    exact = noisy_feature_sum(model, data, clip_norm=1e6, noise_multiplier=0.0, seed=None) * ANSWER_SCALE
    np.testing.assert_allclose(exact[:-1], by_hand.sum(dim=0).numpy(), rtol=1e-5, atol=1e-6)
    assert exact[-1] == pytest.approx(1e6 * len(data))  # the count, in units of the clip norm
    clip = 0.5 * float(by_hand.norm(dim=1).min())  # every row clipped: each contributes a vector of norm `clip`
    clipped = noisy_feature_sum(model, data, clip_norm=clip, noise_multiplier=0.0, seed=None)
    unit = by_hand / by_hand.norm(dim=1, keepdim=True)
    np.testing.assert_allclose(clipped[:-1] * ANSWER_SCALE, (clip * unit).sum(dim=0).numpy(), rtol=1e-5, atol=1e-6)
    center, count = center_from_sum(clipped, clip_norm=clip)  # the server's division: the clipped mean
    assert count == pytest.approx(len(data))
    np.testing.assert_allclose(center, (clip * unit).mean(dim=0).numpy(), rtol=1e-5, atol=1e-6)

    # noise: std noise_multiplier * sqrt(2) * clip on every coordinate of the sum, the count's included
    draws = np.stack([noisy_feature_sum(model, data, clip_norm=clip, noise_multiplier=3.0, seed=s) for s in range(200)])
    residual = (draws - clipped) * ANSWER_SCALE
    assert residual.std() == pytest.approx(3.0 * np.sqrt(2.0) * clip, rel=0.05)
    assert residual[:, -1].std() == pytest.approx(3.0 * np.sqrt(2.0) * clip, rel=0.25)
    assert abs(residual.mean()) < 4 * residual.std() / np.sqrt(residual.size)
    np.testing.assert_array_equal(
        noisy_feature_sum(model, data, clip_norm=clip, noise_multiplier=3.0, seed=7), draws[7]
    )
    assert not np.array_equal(  # without a seed: the OS's CSPRNG, never the same twice
        noisy_feature_sum(model, data, clip_norm=clip, noise_multiplier=3.0, seed=None),
        noisy_feature_sum(model, data, clip_norm=clip, noise_multiplier=3.0, seed=None),
    )


def test_the_centering_answer_moves_by_at_most_the_accounted_sensitivity_between_neighbours(tiny_config, monkeypatch):
    """Issue 10 item 9: on neighbouring data sets (one row added or removed) the released answer moves by at
    most the sensitivity its DP event records, relative to the noise it carries: the recorded noise multiplier is
    the real one. The worst case for a mean is a data set on one side and a row added on the other; the former
    answer, the noisy sum divided by the private row count, moved by ~2C/(n+1) there against noise C sigma/n:
    an effective multiplier of about sigma/2."""
    import shared.model
    from client.app import centering_event
    from client.train import noisy_feature_sum
    from shared.centering import ANSWER_SCALE
    from shared.model import Encoded

    cfg = replace(tiny_config, center_clip_norm=1.0)
    event = centering_event(cfg)
    rng = np.random.default_rng(0)
    hidden = 8
    one_side = rng.normal(0.0, 0.1, (12, hidden)) + np.eye(hidden)[0] * -3.0  # norms ~3: all clipped to C = 1
    vectors = torch.as_tensor(np.vstack([one_side, np.eye(hidden)[0] * 3.0]))  # row 12: the other side
    # rows are stand-ins: the pooled vector of row i is vectors[i] (the query's arithmetic, not the encoder's)
    monkeypatch.setattr(shared.model, "pooled_features", lambda model, data, **_: vectors[data.labels].float())

    def answer(rows, noise_multiplier=0.0, seed=None):
        index = torch.as_tensor(rows)
        data = Encoded(index[:, None], index[:, None], index)
        return noisy_feature_sum(
            None, data, clip_norm=cfg.center_clip_norm, noise_multiplier=noise_multiplier, seed=seed
        ).astype(np.float64)

    base = list(range(12))
    neighbours = [base + [12]] + [base[:i] + base[i + 1 :] for i in base]
    worst = max(np.linalg.norm(answer(base) - answer(other)) for other in neighbours)
    noise = np.stack([answer(base, event.noise_multiplier, seed=s) - answer(base) for s in range(200)])
    # the mechanism's real noise multiplier is (noise std) / (real sensitivity): at least the one recorded
    assert noise.std() / worst >= event.noise_multiplier * (1 - 0.03)
    # and the record is exact: the noise is sigma x the recorded sensitivity, and the sensitivity is reached
    assert noise.std() == pytest.approx(event.noise_multiplier * event.clip_norm / ANSWER_SCALE, rel=0.03)
    assert worst == pytest.approx(event.clip_norm / ANSWER_SCALE, rel=1e-6)
    assert (event.sample_rate, event.steps) == (1.0, 1)


def test_the_centering_query_costs_what_the_docs_say():
    """README, docs/architecture.md, docs/configuration.md: the query alone is epsilon 0.73 at delta 1e-5."""
    from client.app import centering_event
    from shared.config import RunConfig
    from shared.privacy import compose_epsilon

    cfg = RunConfig()
    event = centering_event(cfg)
    assert event.clip_norm == pytest.approx(np.sqrt(2.0) * cfg.center_clip_norm)
    assert compose_epsilon([event], delta=1e-5) == pytest.approx(0.73, abs=0.005)
