"""DP randomness (issue 10 item 10): noise and Poisson coins from the OS's CSPRNG, with the right distribution,
wired into Opacus's optimizer and data loader, and no warning that says otherwise."""

import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from client.dp_random import DpEngine, PoissonBatchSampler, SecureRandom, SeededRandom, random_source
from client.train import train_round
from shared.model import build_model, encode, flatten, get_trainable
from tests.conftest import make_rows


def _data(cfg, n=16):
    rows = make_rows(n, seed=5)
    tok = AutoTokenizer.from_pretrained(cfg.model_path)
    labels = np.array([1 if lab == "fresh" else 0 for _, lab in rows])
    return encode(tok, [t for t, _ in rows], labels, max_length=cfg.max_length)


def test_secure_uniforms_are_uniform_on_0_1():
    u = SecureRandom().uniform(200_000)
    assert u.dtype == np.float64 and u.min() >= 0.0 and u.max() < 1.0
    counts, _ = np.histogram(u, bins=20, range=(0.0, 1.0))
    expected = len(u) / 20
    assert np.all(np.abs(counts - expected) < 6 * np.sqrt(expected))  # each bin within 6 standard deviations


def test_secure_noise_has_mean_0_and_the_requested_std_and_is_gaussian():
    from scipy import stats

    std, n = 2.5, 200_000
    noise = SecureRandom().normal((n,), std=std, dtype=torch.float64, device="cpu").numpy()
    assert abs(noise.mean()) < 5 * std / np.sqrt(n)
    assert abs(noise.std() - std) < 5 * std / np.sqrt(2 * n)
    assert stats.kstest(noise / std, "norm").pvalue > 1e-6  # the shape too: not just two matching moments
    shaped = SecureRandom().normal((3, 4), std=1.0, dtype=torch.float32, device="cpu")
    assert shaped.shape == (3, 4) and shaped.dtype == torch.float32
    assert torch.count_nonzero(SecureRandom().normal((5,), std=0.0, dtype=torch.float32, device="cpu")) == 0


def test_secure_draws_are_never_repeated_and_seeded_draws_always_are():
    shape = (64,)
    first = SecureRandom().normal(shape, std=1.0, dtype=torch.float64, device="cpu")
    assert not torch.equal(first, SecureRandom().normal(shape, std=1.0, dtype=torch.float64, device="cpu"))
    a = SeededRandom(7).normal(shape, std=1.0, dtype=torch.float64, device="cpu")
    torch.testing.assert_close(a, SeededRandom(7).normal(shape, std=1.0, dtype=torch.float64, device="cpu"))
    assert isinstance(random_source(None), SecureRandom) and isinstance(random_source(3), SeededRandom)


def test_the_poisson_sampler_includes_each_row_with_probability_q():
    num_samples, q, num_batches = 500, 0.1, 400
    sampler = PoissonBatchSampler(
        num_samples=num_samples, sample_rate=q, num_batches=num_batches, source=SecureRandom()
    )
    batches = list(sampler)
    assert len(sampler) == num_batches and len(batches) == num_batches
    sizes = np.array([len(b) for b in batches])
    draws = num_samples * num_batches
    assert abs(sizes.sum() - q * draws) < 5 * np.sqrt(draws * q * (1 - q))
    assert sizes.std() == pytest.approx(np.sqrt(num_samples * q * (1 - q)), rel=0.15)  # binomial batch sizes
    included = np.zeros(num_samples)
    for batch in batches:
        assert batch == sorted(set(batch)) and all(0 <= i < num_samples for i in batch)
        included[batch] += 1
    # every row, not only the batch size: each row's inclusion count is Binomial(num_batches, q)
    assert np.abs(included - q * num_batches).max() < 6 * np.sqrt(num_batches * q * (1 - q))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_samples": 0, "sample_rate": 0.1, "num_batches": 1}, "num_samples must be > 0, got 0"),
        ({"num_samples": 5, "sample_rate": 0.0, "num_batches": 1}, r"sample_rate must be in \(0, 1\], got 0.0"),
        ({"num_samples": 5, "sample_rate": 0.5, "num_batches": 0}, "num_batches must be > 0, got 0"),
    ],
)
def test_a_bad_sampler_setting_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PoissonBatchSampler(source=SecureRandom(), **kwargs)


class RecordingSource(SeededRandom):
    """A seeded source that keeps every noise tensor it hands out and can be told to draw no rows."""

    def __init__(self, *, empty: bool) -> None:
        super().__init__(0)
        self.empty = empty
        self.noise: list[torch.Tensor] = []

    def uniform(self, n):
        return np.ones(n) if self.empty else super().uniform(n)

    def normal(self, shape, *, std, dtype, device):
        draw = super().normal(shape, std=std, dtype=dtype, device=device)
        self.noise.append(draw.clone())
        return draw


def test_the_optimizer_adds_the_sources_noise_and_the_loader_draws_the_sources_coins(tiny_config):
    """With a source that draws no row, a DP step is noise only: each gradient is exactly the source's noise
    (std noise_multiplier x max_grad_norm) divided by the expected batch size, Opacus's 'mean' reduction."""
    data = _data(tiny_config)
    model = build_model(tiny_config, 2)
    params = [p for p in model.parameters() if p.requires_grad]
    source = RecordingSource(empty=True)
    engine = DpEngine(accountant="prv", source=source)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data.input_ids, data.attention_mask, data.labels), batch_size=4
    )
    module, optimizer, private_loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(params, lr=0.1),
        data_loader=loader,
        noise_multiplier=1.5,
        max_grad_norm=0.5,
        poisson_sampling=True,
    )
    (input_ids, _, labels), *_ = list(private_loader)
    assert input_ids.shape[0] == 0 and labels.shape[0] == 0  # the source's coins: no row drawn
    for p in params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
    optimizer.step()
    assert len(source.noise) == len(params)
    for p, noise in zip(params, source.noise, strict=True):
        torch.testing.assert_close(p.grad, (noise / optimizer.expected_batch_size).view_as(p))
    assert optimizer.expected_batch_size == 4  # 16 rows, sample rate 1/4
    assert engine.accountant.history == [(1.5, 0.25, 1)]
    module._close()


def test_two_rounds_without_reproducible_noise_differ_and_two_seeded_rounds_agree(tiny_config):
    def update(seed):
        model = build_model(tiny_config, 2)
        before = flatten(get_trainable(model))
        common = dict(steps=2, batch_size=8, learning_rate=0.1, dp=True, noise_multiplier=1.0, max_grad_norm=1.0)
        train_round(model, _data(tiny_config), seed=seed, **common)
        return flatten(get_trainable(model)) - before

    assert not np.allclose(update(None), update(None))
    np.testing.assert_array_equal(update(11), update(11))


def _opacus_secure_rng_warnings(cfg, seed):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_round(
            build_model(cfg, 2),
            _data(cfg),
            steps=1,
            batch_size=8,
            learning_rate=0.1,
            dp=True,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            seed=seed,
        )
    return [w for w in caught if "Secure RNG" in str(w.message)]


def test_opacus_secure_rng_warning_is_not_printed_when_the_noise_is_secure(tiny_config):
    assert _opacus_secure_rng_warnings(tiny_config, seed=None) == []


def test_opacus_secure_rng_warning_stays_where_the_noise_is_seeded(tiny_config):
    # reproducible-noise really is "secure RNG turned off": the filter is for the CSPRNG path only
    assert len(_opacus_secure_rng_warnings(replace(tiny_config, reproducible_noise=True), seed=5)) == 1


def test_the_engine_refuses_what_it_would_not_draw_from_its_source(tiny_config):
    data = _data(tiny_config)
    model = build_model(tiny_config, 2)
    params = [p for p in model.parameters() if p.requires_grad]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data.input_ids, data.attention_mask, data.labels), batch_size=4
    )
    engine = DpEngine(accountant="prv", source=SecureRandom())
    with pytest.raises(ValueError, match="poisson_sampling=False"):
        engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(params, lr=0.1),
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=False,
        )
