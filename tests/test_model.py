"""FFA-LoRA: identical frozen A at every party, only B and the head train, and the mean is exact."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from shared.model import (
    ModelError,
    build_model,
    flatten,
    get_trainable,
    set_trainable,
    trainable_names,
    unflatten,
)


def _lora_weights(model) -> dict[str, torch.Tensor]:
    """The effective weight change s * B @ A of every LoRA layer."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            a = module.lora_A["default"].weight
            b = module.lora_B["default"].weight
            out[name] = (b @ a) * module.scaling["default"]
    return out


def _randomize_trainable(model, seed: int) -> None:
    rng = np.random.default_rng(seed)
    set_trainable(model, {k: rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in get_trainable(model).items()})


def test_ffa_trains_only_b_and_the_head(tiny_config):
    model = build_model(tiny_config, num_labels=2)
    names = trainable_names(model)
    assert names and all(".lora_B." in n or "classifier" in n for n in names)
    assert any(".lora_B." in n for n in names) and any("classifier" in n for n in names)


def test_every_party_derives_the_same_frozen_a_and_head_from_the_seed(tiny_config):
    first, second = build_model(tiny_config, 2), build_model(tiny_config, 2)
    other = build_model(replace(tiny_config, seed=tiny_config.seed + 1), 2)
    a1 = {n: p for n, p in first.named_parameters() if ".lora_A." in n}
    a2 = dict(second.named_parameters())
    a3 = dict(other.named_parameters())
    assert a1 and all(torch.equal(p, a2[n]) for n, p in a1.items())
    assert not all(torch.equal(p, a3[n]) for n, p in a1.items())
    assert np.array_equal(flatten(get_trainable(first)), flatten(get_trainable(second)))


def test_ffa_mean_of_client_updates_is_the_update_of_the_mean_model(tiny_config):
    clients = []
    for seed in range(4):
        m = build_model(tiny_config, 2)
        _randomize_trainable(m, seed)
        clients.append(m)
    mean_model = build_model(tiny_config, 2)
    mean_vec = np.mean([flatten(get_trainable(m)) for m in clients], axis=0)
    set_trainable(mean_model, unflatten(mean_vec, get_trainable(mean_model)))
    for layer, delta in _lora_weights(mean_model).items():
        mean_of_deltas = torch.stack([_lora_weights(m)[layer] for m in clients]).mean(0)
        torch.testing.assert_close(delta, mean_of_deltas, rtol=1e-5, atol=1e-6)


def test_plain_lora_mean_is_not_exact_which_is_why_ffa_is_the_default(tiny_config):
    cfg = replace(tiny_config, lora_mode="lora")
    clients = []
    for seed in range(4):
        m = build_model(cfg, 2)
        _randomize_trainable(m, seed)
        clients.append(m)
    assert any(".lora_A." in n for n in trainable_names(clients[0]))
    mean_model = build_model(cfg, 2)
    mean_vec = np.mean([flatten(get_trainable(m)) for m in clients], axis=0)
    set_trainable(mean_model, unflatten(mean_vec, get_trainable(mean_model)))
    layer, delta = next(iter(_lora_weights(mean_model).items()))
    mean_of_deltas = torch.stack([_lora_weights(m)[layer] for m in clients]).mean(0)
    assert not torch.allclose(delta, mean_of_deltas, atol=1e-4)


def test_flatten_unflatten_round_trip(tiny_config):
    arrays = get_trainable(build_model(tiny_config, 2))
    back = unflatten(flatten(arrays), arrays)
    assert list(back) == sorted(arrays)
    assert all(np.array_equal(back[k], arrays[k]) for k in arrays)


def test_set_trainable_rejects_wrong_names_and_shapes(tiny_config):
    model = build_model(tiny_config, 2)
    arrays = get_trainable(model)
    name = next(iter(arrays))
    with pytest.raises(ModelError, match="do not match the model"):
        set_trainable(model, {k: v for k, v in arrays.items() if k != name})
    with pytest.raises(ModelError, match=f"tensor {name} has shape"):
        set_trainable(model, {**arrays, name: np.zeros((1, 1), np.float32)})
    with pytest.raises(ModelError, match="flat vector has shape"):
        unflatten(np.zeros(3, np.float32), arrays)


def test_a_missing_or_non_model_directory_is_a_clear_error(tiny_config, tmp_path):
    with pytest.raises(ModelError, match="is not a local directory"):
        build_model(replace(tiny_config, model_path=str(tmp_path / "nope")), 2)
    with pytest.raises(ModelError, match="has no config.json"):
        build_model(replace(tiny_config, model_path=str(tmp_path)), 2)


def test_target_modules_that_match_nothing_are_a_clear_error(tiny_config):
    with pytest.raises((ModelError, ValueError), match="q_proj"):
        build_model(replace(tiny_config, lora_target_modules="q_proj"), 2)


def test_mean_pooling_head_ignores_padding_and_averages_the_token_states(tiny_config):
    model = build_model(replace(tiny_config, classifier_pooling="mean"), 2).eval()
    ids = torch.tensor([[101, 2307, 3185, 102]])
    mask = torch.ones_like(ids)
    padded_ids = torch.cat([ids, torch.zeros((1, 3), dtype=torch.long)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros((1, 3), dtype=torch.long)], dim=1)
    with torch.no_grad():
        short = model(input_ids=ids, attention_mask=mask).logits
        long = model(input_ids=padded_ids, attention_mask=padded_mask).logits
        inner = model.base_model.model
        states = inner.transformer(input_ids=ids, attention_mask=mask).last_hidden_state
        by_hand = inner.classifier.modules_to_save["default"](states.mean(dim=1))
    torch.testing.assert_close(long, short)
    torch.testing.assert_close(short, by_hand)


def test_unknown_pooling_is_a_config_error(tiny_config):
    from shared.config import ConfigError

    with pytest.raises(ConfigError, match="classifier-pooling"):
        replace(tiny_config, classifier_pooling="max")


def test_fresh_model_is_build_model_and_copies_share_nothing(tiny_config):
    from shared.model import fresh_model

    first = fresh_model(tiny_config, 2)
    np.testing.assert_array_equal(flatten(get_trainable(first)), flatten(get_trainable(build_model(tiny_config, 2))))
    _randomize_trainable(first, seed=3)
    second = fresh_model(tiny_config, 2)
    np.testing.assert_array_equal(flatten(get_trainable(second)), flatten(get_trainable(build_model(tiny_config, 2))))
    assert all(a is not b for a, b in zip(first.parameters(), second.parameters(), strict=True))


def test_the_head_reads_the_pooled_vector_minus_the_feature_center(tiny_config):
    from shared.model import get_feature_center, set_feature_center

    model = build_model(tiny_config, 2).eval()
    ids = torch.tensor([[101, 2307, 3185, 102], [101, 4569, 102, 0]])
    mask = (ids != 0).long()
    center = np.linspace(-1.0, 1.0, get_feature_center(model).shape[0]).astype(np.float32)
    set_feature_center(model, center)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        inner = model.base_model.model
        by_hand = inner.classifier.modules_to_save["default"](inner.pool(ids, mask) - torch.from_numpy(center))
    torch.testing.assert_close(logits, by_hand)
    np.testing.assert_array_equal(get_feature_center(model), center)
    with pytest.raises(ModelError, match="feature center must be"):
        set_feature_center(model, center[:-1])
    with pytest.raises(ModelError, match="feature center must be"):
        set_feature_center(model, np.full_like(center, np.nan))


def test_feature_centering_needs_the_mean_pooling_head(tiny_config):
    from shared.model import pooled_features

    model = build_model(replace(tiny_config, classifier_pooling="cls", center_features=False), 2)
    with pytest.raises(ModelError, match="classifier-pooling = 'mean'"):
        pooled_features(model, None)  # type: ignore[arg-type]
