"""The local DP step at LLM scale: Opacus's per-sample gradients of every LoRA tensor of a causal LM are each row's
own (opacus#820 once corrupted LoRA updates silently), a logical batch taken in length-sorted micro-batches gives
the step of the whole batch, length-sorted evaluation returns the rows' results in their order, and bf16 autocast
gives the float32 loss to bf16 precision."""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import AutoTokenizer

from client.dp_random import DpEngine, random_source
from client.train import logical_step, make_optimizer, train_round
from shared.batching import eval_batches, micro_batches, row_lengths
from shared.causal_model import row_mean_nll
from shared.model import Encoded, build_model, classifier_loss, encode, flatten, get_trainable
from tests.conftest import make_rows, tiny_llama_config

# reproducible-noise draws from a seeded generator: Opacus's warning about it is expected here
pytestmark = pytest.mark.filterwarnings("ignore:Secure RNG turned off")
VOCAB = 64
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def tiny_causal_lm(mode: str) -> nn.Module:
    """A random 2-layer, 32-wide Llama with LoRA on q,k,v,o: FFA (A frozen, nonzero) or plain LoRA; B nonzero so
    that the gradient of A does not vanish."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=VOCAB, num_attention_heads=4, max_position_embeddings=64)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        model = get_peft_model(
            LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(TARGETS))
        )
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            if ".lora_A." in name:
                p.requires_grad_(mode == "lora")
    model.train()
    return model


def causal_rows(n: int = 7, width: int = 12, seed: int = 0) -> Encoded:
    """Rows of different lengths, right-padded; per-token labels: the prompt (first 3) and the padding are -100."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, width + 1, (n,), generator=gen)
    ids = torch.randint(1, VOCAB, (n, width), generator=gen)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100
    return Encoded(ids, mask, labels)


def one_row(data: Encoded, i: int) -> Encoded:
    n = int(row_lengths(data.attention_mask[i : i + 1])[0])  # the row alone, without its padding
    labels = data.labels[i : i + 1, :n] if data.labels.dim() == 2 else data.labels[i : i + 1]
    return Encoded(data.input_ids[i : i + 1, :n], data.attention_mask[i : i + 1, :n], labels)


def classifier_rows(cfg, n: int = 9) -> Encoded:
    rows = make_rows(n, seed=3)
    texts = [t if i % 3 else " ".join([t] * 2) for i, (t, _) in enumerate(rows)]  # lengths differ
    labels = np.array([1 if lab == "fresh" else 0 for _, lab in rows])
    return encode(AutoTokenizer.from_pretrained(cfg.model_path), texts, labels, max_length=cfg.max_length)


def classifier_model(cfg, mode: str) -> nn.Module:
    model = build_model(replace(cfg, lora_mode=mode), 2)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def _per_sample_vs_single(model: nn.Module, data: Encoded, loss_fn) -> int:
    """Assert Opacus's per-sample gradient of every trained tensor equals that row's own gradient; returns the
    number of LoRA tensors checked."""
    from opacus import GradSampleModule

    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    reference = []
    for i in range(len(data)):
        model.zero_grad()
        loss_fn(model, one_row(data, i)).backward()
        reference.append({n: p.grad.detach().clone() for n, p in trained.items()})
    model.zero_grad()
    gsm = GradSampleModule(model, loss_reduction="mean")  # the mean over rows, as the DP step's loss
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ff]ull backward hook.*")
        loss_fn(gsm, data).backward()
    try:
        for name, p in trained.items():
            assert p.grad_sample is not None, f"no per-sample gradient for {name}"
            assert p.grad_sample.shape == (len(data), *p.shape), name
            for i in range(len(data)):
                torch.testing.assert_close(p.grad_sample[i], reference[i][name], rtol=1e-4, atol=1e-6, msg=name)
    finally:
        gsm._close()
    return sum(".lora_" in n for n in trained)


@pytest.mark.parametrize(("mode", "tensors"), [("ffa", 2 * 4), ("lora", 2 * 4 * 2)])
def test_per_sample_gradients_of_every_lora_tensor_of_a_causal_lm_equal_single_row_gradients(mode, tensors):
    model = tiny_causal_lm(mode)
    checked = _per_sample_vs_single(model, causal_rows(), row_mean_nll)
    assert checked == tensors  # every LoRA tensor trained: B of q,k,v,o in both layers (and A under plain LoRA)


@pytest.mark.parametrize("mode", ["ffa", "lora"])
def test_per_sample_gradients_of_the_classifier_equal_single_row_gradients(no_dropout_config, mode):
    model = classifier_model(no_dropout_config, mode)
    checked = _per_sample_vs_single(model, classifier_rows(no_dropout_config), classifier_loss)
    assert checked >= (2 if mode == "ffa" else 4)


# -- micro-batches ------------------------------------------------------------------------------------------------
def test_micro_batches_are_sorted_by_length_bounded_trimmed_and_hold_every_row_once():
    data = causal_rows(n=7)
    pieces = micro_batches(data, 3)
    assert [len(p) for p in pieces] == [3, 2, 2]
    lengths = [row_lengths(p.attention_mask).tolist() for p in pieces]
    flat = [n for piece in lengths for n in piece]
    assert flat == sorted(row_lengths(data.attention_mask).tolist(), reverse=True)
    for piece, ns in zip(pieces, lengths, strict=True):
        assert piece.input_ids.shape[1] == max(ns) == piece.labels.shape[1]  # per-token labels trimmed too
    width = data.input_ids.shape[1]
    padded = sorted(tuple(r + [0] * (width - len(r))) for p in pieces for r in p.input_ids.tolist())
    assert padded == sorted(tuple(r) for r in data.input_ids.tolist())  # every row once, cut only in its padding
    assert (
        len(micro_batches(data, 0)) == 1
        and micro_batches(Encoded(data.input_ids[:0], data.attention_mask[:0], data.labels[:0]), 2) == []
    )
    with pytest.raises(ValueError, match="micro_batch_size must be >= 0, got -1"):
        micro_batches(data, -1)


def _dp_step(model: nn.Module, data: Encoded, loss_fn, *, micro: int, clip: float, autocast: str = "off") -> float:
    """One DP-SGD step (SGD, lr 1, noise 0) on exactly ``data``; returns the loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    loader = DataLoader(TensorDataset(data.input_ids, data.attention_mask, data.labels), batch_size=len(data))
    engine = DpEngine(accountant="prv", source=random_source(0))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        module, optimizer, _ = engine.make_private(
            module=model,
            optimizer=make_optimizer("sgd", params, 1.0),
            data_loader=loader,
            noise_multiplier=0.0,
            max_grad_norm=clip,
            poisson_sampling=True,
        )
    try:
        loss = logical_step(
            module,
            optimizer,
            data,
            params,
            loss_fn=loss_fn,
            micro_batch_size=micro,
            dp=True,
            device="cpu",
            autocast=autocast,
        )
    finally:
        module._close()
    assert loss is not None
    return loss


def _plain_step(model: nn.Module, data: Encoded, loss_fn, *, micro: int) -> float | None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer("sgd", params, 1.0)
    return logical_step(
        model, optimizer, data, params, loss_fn=loss_fn, micro_batch_size=micro, dp=False, device="cpu", autocast="off"
    )


@pytest.mark.parametrize("micro", [1, 3])
@pytest.mark.parametrize("mode", ["ffa", "lora"])
def test_a_dp_step_in_micro_batches_equals_the_step_on_the_whole_batch(mode, micro):
    data = causal_rows(n=7)
    whole, pieces = tiny_causal_lm(mode), tiny_causal_lm(mode)
    before = flatten(get_trainable(whole))
    # a clip norm below every row's gradient norm: each row is clipped, so a sum over rows coupled by the
    # micro-batching (or per-piece instead of per-row clipping) would differ
    loss_whole = _dp_step(whole, data, row_mean_nll, micro=0, clip=1e-3)
    loss_pieces = _dp_step(pieces, data, row_mean_nll, micro=micro, clip=1e-3)
    after_whole, after_pieces = flatten(get_trainable(whole)), flatten(get_trainable(pieces))
    assert loss_pieces == pytest.approx(loss_whole, rel=1e-5)
    np.testing.assert_allclose(after_pieces, after_whole, rtol=1e-5, atol=1e-8)
    # every row clipped to 1e-3 and divided by the expected batch size 7: the step has norm at most 1e-3
    assert 0 < np.linalg.norm(after_whole - before) <= 1e-3 * (1 + 1e-5)


def test_a_classifier_dp_step_in_micro_batches_equals_the_step_on_the_whole_batch(no_dropout_config):
    data = classifier_rows(no_dropout_config)
    whole, pieces = classifier_model(no_dropout_config, "ffa"), classifier_model(no_dropout_config, "ffa")
    _dp_step(whole, data, classifier_loss, micro=0, clip=1e-3)
    _dp_step(pieces, data, classifier_loss, micro=2, clip=1e-3)
    np.testing.assert_allclose(flatten(get_trainable(pieces)), flatten(get_trainable(whole)), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("mode", ["ffa", "lora"])
def test_a_non_private_step_in_micro_batches_equals_the_step_on_the_whole_batch(mode):
    data = causal_rows(n=7)
    whole, pieces = tiny_causal_lm(mode), tiny_causal_lm(mode)
    loss_whole = _plain_step(whole, data, row_mean_nll, micro=0)
    loss_pieces = _plain_step(pieces, data, row_mean_nll, micro=2)
    assert loss_pieces == pytest.approx(loss_whole, rel=1e-5)
    np.testing.assert_allclose(flatten(get_trainable(pieces)), flatten(get_trainable(whole)), rtol=1e-5, atol=1e-7)


def test_a_seeded_dp_round_in_micro_batches_equals_the_round_on_whole_poisson_batches():
    """The same Poisson batches and the same noise (reproducible-noise): micro-batching changes nothing, the
    event included; steps count logical steps."""
    data = causal_rows(n=20, seed=4)
    common = dict(
        steps=3,
        batch_size=5,
        learning_rate=0.5,
        dp=True,
        noise_multiplier=1.1,
        max_grad_norm=0.05,
        seed=11,
        optimizer_name="sgd",
        loss_fn=row_mean_nll,
    )
    whole, pieces = tiny_causal_lm("ffa"), tiny_causal_lm("ffa")
    result_whole = train_round(whole, data, micro_batch_size=0, **common)
    result_pieces = train_round(pieces, data, micro_batch_size=2, **common)
    assert result_pieces.event == result_whole.event and result_pieces.event is not None
    assert result_pieces.event.steps == 3 and result_pieces.event.sample_rate == pytest.approx(5 / 20)
    assert result_pieces.empty_batches == result_whole.empty_batches
    np.testing.assert_allclose(flatten(get_trainable(pieces)), flatten(get_trainable(whole)), rtol=1e-5, atol=1e-7)


def test_an_empty_poisson_batch_in_micro_batch_mode_is_still_a_noise_only_step(monkeypatch):
    from client.dp_random import PoissonBatchSampler

    monkeypatch.setattr(PoissonBatchSampler, "__iter__", lambda self: iter([[] for _ in range(self.num_batches)]))
    model = tiny_causal_lm("ffa")
    before = flatten(get_trainable(model))
    result = train_round(
        model,
        causal_rows(n=8),
        steps=2,
        batch_size=4,
        learning_rate=0.1,
        dp=True,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        seed=None,
        loss_fn=row_mean_nll,
        micro_batch_size=2,
    )
    assert result.event is not None and result.event.steps == 2 and result.empty_batches == 2
    assert result.mean_loss is None and np.linalg.norm(flatten(get_trainable(model)) - before) > 0


def test_train_round_refuses_a_negative_micro_batch_and_an_unknown_autocast():
    model, data = tiny_causal_lm("ffa"), causal_rows()
    common = dict(steps=1, batch_size=4, learning_rate=0.1, dp=False, noise_multiplier=0.0, max_grad_norm=1.0, seed=0)
    with pytest.raises(ValueError, match="micro_batch_size must be >= 0, got -2"):
        train_round(model, data, micro_batch_size=-2, loss_fn=row_mean_nll, **common)
    with pytest.raises(ValueError, match="autocast must be 'off', 'bf16' or 'auto', got 'fp16'"):
        train_round(model, data, autocast="fp16", loss_fn=row_mean_nll, **common)


# -- evaluation in length-sorted batches --------------------------------------------------------------------------
def test_length_sorted_prediction_returns_each_rows_own_result_in_row_order(no_dropout_config):
    from shared.canary_data import per_example_losses
    from shared.metrics import predict

    model = classifier_model(no_dropout_config, "ffa").eval()
    data = classifier_rows(no_dropout_config, n=11)
    with torch.no_grad():
        alone = [
            model(input_ids=r.input_ids, attention_mask=r.attention_mask).logits[0]
            for r in (one_row(data, i) for i in range(len(data)))
        ]
    expected_preds = np.array([int(a.argmax()) for a in alone])
    expected_losses = np.array(
        [float(nn.functional.cross_entropy(a[None], data.labels[i : i + 1])) for i, a in enumerate(alone)]
    )
    assert len(set(row_lengths(data.attention_mask).tolist())) > 2  # the rows really differ in length
    preds, loss = predict(model, data, batch_size=4)
    np.testing.assert_array_equal(preds, expected_preds)
    assert loss == pytest.approx(expected_losses.mean(), rel=1e-5)
    np.testing.assert_allclose(per_example_losses(model, data, batch_size=4), expected_losses, rtol=1e-5, atol=1e-6)


def test_eval_batches_cover_every_row_once_longest_first():
    data = causal_rows(n=9)
    seen = []
    for index, batch in eval_batches(data, 4):
        assert len(batch) <= 4 and batch.input_ids.shape[1] == int(row_lengths(batch.attention_mask).max())
        seen += index.tolist()
    assert sorted(seen) == list(range(9))
    assert row_lengths(data.attention_mask)[seen].tolist() == sorted(
        row_lengths(data.attention_mask).tolist(), reverse=True
    )
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        next(eval_batches(data, 0))


# -- bf16 autocast ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dp", [False, True])
def test_bf16_autocast_gives_the_float32_loss_to_bf16_precision_and_keeps_the_adapter_in_float32(dp):
    data = causal_rows(n=6)
    exact, mixed = tiny_causal_lm("ffa"), tiny_causal_lm("ffa")
    if dp:
        loss32 = _dp_step(exact, data, row_mean_nll, micro=2, clip=1e-2)
        loss16 = _dp_step(mixed, data, row_mean_nll, micro=2, clip=1e-2, autocast="bf16")
    else:
        params = [p for p in mixed.parameters() if p.requires_grad]
        loss32 = _plain_step(exact, data, row_mean_nll, micro=2)
        loss16 = logical_step(
            mixed,
            make_optimizer("sgd", params, 1.0),
            data,
            params,
            loss_fn=row_mean_nll,
            micro_batch_size=2,
            dp=False,
            device="cpu",
            autocast="bf16",
        )
    assert loss16 == pytest.approx(loss32, rel=2e-2)
    assert all(p.dtype == torch.float32 for p in mixed.parameters())
    a, b = flatten(get_trainable(exact)), flatten(get_trainable(mixed))
    before = flatten(get_trainable(tiny_causal_lm("ffa")))
    assert np.linalg.norm(b - a) <= 0.1 * np.linalg.norm(a - before)  # the same step, to bf16 precision


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "off")])
def test_auto_autocast_is_bf16_only_on_a_cpu_that_does_bf16_natively(monkeypatch, native, expected):
    import client.train

    monkeypatch.setattr(client.train, "cpu_has_native_bf16", lambda: native)
    assert client.train.resolve_autocast("auto", "cpu") == expected
    assert (
        client.train.resolve_autocast("bf16", "cpu") == "bf16" and client.train.resolve_autocast("off", "cpu") == "off"
    )
    assert client.train.resolve_autocast("auto", "mps") == "off"


# -- CUDA -----------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_a_micro_batched_dp_step_on_cuda_equals_the_whole_batch_step_on_cuda():
    data = causal_rows(n=7)
    results = []
    for micro in (0, 3):
        model = tiny_causal_lm("lora").to("cuda")
        params = [p for p in model.parameters() if p.requires_grad]
        loader = DataLoader(TensorDataset(data.input_ids, data.attention_mask, data.labels), batch_size=len(data))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore")
            module, optimizer, _ = DpEngine(accountant="prv", source=random_source(0)).make_private(
                module=model,
                optimizer=make_optimizer("sgd", params, 1.0),
                data_loader=loader,
                noise_multiplier=0.0,
                max_grad_norm=1e-3,
                poisson_sampling=True,
            )
        logical_step(
            module,
            optimizer,
            data,
            params,
            loss_fn=row_mean_nll,
            micro_batch_size=micro,
            dp=True,
            device="cuda",
            autocast="off",
        )
        module._close()
        assert all(p.device.type == "cuda" for p in params)
        results.append(flatten(get_trainable(model)))
    np.testing.assert_allclose(results[1], results[0], rtol=1e-4, atol=1e-7)


def test_the_gpu_benchmark_imports_neither_flwr_nor_ray():
    """The GPU machine has torch, transformers and peft (opacus carried as a wheel), no flwr and no ray."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = (
        "import sys, runpy; sys.argv = ['gpu_benchmark', '--help']\n"
        "try:\n    runpy.run_path('simulations/gpu_benchmark.py', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'flwr', 'ray', 'pandas', 'cryptography'}))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_a_simulation_sharing_one_gpu_refuses_a_device_its_ray_workers_cannot_see():
    """Ray shows each simulated site only the GPU share it reserved, as cuda:0: cuda:1 would fail in every worker
    after Ray started; it fails here, before anything starts."""
    from shared.simulation import run_simulation

    with pytest.raises(ValueError, match="device 'cuda:1': a simulated site sees only the GPU Ray gave it"):
        run_simulation({}, num_clients=3, site_settings={"device": "cuda:1"}, num_gpus_per_client=1 / 3)
