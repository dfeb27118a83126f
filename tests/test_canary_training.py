"""The one-run canary audit on real DP-SGD (Opacus, Poisson sampling) in a small federation.

Three sites train a linear model on hashed bag-of-words features with Opacus, the server averages their
updates; canaries (random words, random label) are inserted into one random site each with probability 1/2,
exactly as in canary mode. The final model scores every canary by the drop of its loss. With DP on, the
empirical lower bound stays below the epsilon the accountant claims; with the noise switched off and a
(false) claim of epsilon = 1, the bound exceeds the claim: the audit has power.
"""

from __future__ import annotations

import json
import warnings
import zlib

import numpy as np
import pytest
import torch
from torch import nn

from shared.audit.canary import make_canaries, one_run_audit, site_canary_rows
from shared.audit.cli import canary_section
from shared.canary_data import write_canary_scores
from shared.ledger import cumulative_epsilon
from shared.privacy import DpEvent

pytestmark = pytest.mark.slow

DIM, SITES, ROWS, CANARIES, DELTA = 1024, 3, 300, 500, 1e-5
ROUNDS, STEPS, BATCH, LR, CLIP = 3, 30, 32, 4.0, 1.0


def _features(texts: list[str]) -> torch.Tensor:
    x = np.zeros((len(texts), DIM), np.float32)
    for i, text in enumerate(texts):
        for word in text.split():
            x[i, zlib.crc32(word.encode()) % DIM] = 1.0
        x[i] /= max(float(np.linalg.norm(x[i])), 1e-9)
    return torch.from_numpy(x)


def _site_rows(rng: np.random.Generator) -> list[tuple[str, int]]:
    vocab = [f"w{i}" for i in range(200)]
    rows = []
    for _ in range(ROWS):
        label = int(rng.integers(2))
        rows.append((" ".join([*rng.choice(vocab, 8), "good" if label else "bad"]), label))
    return rows


def _local_round(global_model: nn.Linear, rows, *, noise_multiplier: float) -> tuple[dict, DpEvent]:
    from opacus import PrivacyEngine

    x, y = _features([t for t, _ in rows]), torch.tensor([label for _, label in rows])
    model = nn.Linear(DIM, 2)
    model.load_state_dict(global_model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)
    engine = PrivacyEngine(accountant="prv")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about noise_multiplier=0 and secure RNG
        model, optimizer, loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=CLIP,
            poisson_sampling=True,
        )
        steps = 0
        while steps < STEPS:
            for xb, yb in loader:
                optimizer.zero_grad()
                if len(xb):
                    nn.functional.cross_entropy(model(xb), yb).backward()
                optimizer.step()
                steps += 1
                if steps == STEPS:
                    break
    new = model._module.state_dict()
    update = {k: new[k] - v for k, v in global_model.state_dict().items()}
    event = DpEvent(sample_rate=BATCH / len(rows), noise_multiplier=noise_multiplier, steps=STEPS, clip_norm=CLIP)
    return update, event


def _federated_run(noise_multiplier: float, seed: int = 0):
    """Train with canaries; return (canaries, loss drop per canary, epsilon per site)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    base = [_site_rows(rng) for _ in range(SITES)]
    canaries = make_canaries(CANARIES, num_sites=SITES, num_labels=2, seed=seed)
    global_model = nn.Linear(DIM, 2)
    x_canary = _features([c.text for c in canaries])
    y_canary = torch.tensor([c.label for c in canaries])
    loss = nn.CrossEntropyLoss(reduction="none")
    with torch.no_grad():
        before = loss(global_model(x_canary), y_canary).numpy()
    events: dict[int, list[DpEvent]] = {s: [] for s in range(SITES)}
    for _ in range(ROUNDS):
        updates = []
        for s in range(SITES):
            update, event = _local_round(
                global_model, base[s] + site_canary_rows(canaries, s), noise_multiplier=noise_multiplier
            )
            updates.append(update)
            events[s].append(event)
        state = global_model.state_dict()
        global_model.load_state_dict({k: v + sum(u[k] for u in updates) / SITES for k, v in state.items()})
    with torch.no_grad():
        after = loss(global_model(x_canary), y_canary).numpy()
    epsilons = {s: cumulative_epsilon(ev, delta=DELTA, accountant="rdp") for s, ev in events.items()}
    return canaries, before, after, epsilons


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: threads only contend
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def no_noise_run():
    return _federated_run(noise_multiplier=0.0)


@pytest.fixture(scope="module")
def dp_run():
    return _federated_run(noise_multiplier=3.0)  # epsilon ~1.2: below what the run without noise reveals


def test_with_dp_on_the_bound_stays_below_the_claimed_epsilon(dp_run, no_noise_run):
    canaries, before, after, epsilons = dp_run
    claimed = max(epsilons.values())
    leaky_canaries, leaky_before, leaky_after, _ = no_noise_run
    leaky = one_run_audit(leaky_before - leaky_after, [c.included for c in leaky_canaries], delta=DELTA)

    audit = one_run_audit(before - after, [c.included for c in canaries], delta=DELTA)

    assert leaky.epsilon_lower > claimed  # so this test would fail if the noise were silently not applied
    assert audit.epsilon_lower <= claimed


def test_with_the_noise_off_the_bound_exceeds_a_claim_of_one(no_noise_run):
    canaries, before, after, epsilons = no_noise_run

    audit = one_run_audit(before - after, [c.included for c in canaries], delta=DELTA)

    assert all(eps == float("inf") for eps in epsilons.values())  # the ledger would say so
    assert audit.epsilon_lower > 1.0


def test_scores_unrelated_to_membership_give_a_bound_near_zero(no_noise_run):
    canaries, before, after, _ = no_noise_run
    shuffled = np.random.default_rng(1).permutation([c.included for c in canaries])

    assert one_run_audit(before - after, shuffled, delta=DELTA).epsilon_lower < 0.2


def test_the_audit_command_flags_a_false_claim(no_noise_run, tmp_path):
    canaries, before, after, _ = no_noise_run
    path = write_canary_scores(
        tmp_path,
        run_id="7",
        seed=0,
        canaries=canaries,
        losses_before=before,
        losses_after=after,
        site_ids=[f"site-{i}" for i in range(SITES)],
        delta=DELTA,
    )
    scores = {**json.loads(path.read_text()), "claimed_epsilon": 1.0}  # what a buggy run would claim

    section, findings = canary_section(scores, run_id="7", sites={}, confidence=0.95, where=path)

    assert section["claimed_epsilon"] == 1.0 and section["epsilon_lower"] > 1.0
    assert [f.kind for f in findings] == ["canary"]
    assert "exceeds the claimed epsilon 1.000" in findings[0].message


def test_the_audit_command_accepts_an_honest_dp_run(dp_run, tmp_path):
    canaries, before, after, epsilons = dp_run
    path = write_canary_scores(
        tmp_path,
        run_id="8",
        seed=0,
        canaries=canaries,
        losses_before=before,
        losses_after=after,
        site_ids=[f"site-{i}" for i in range(SITES)],
        delta=DELTA,
    )
    scores = {**json.loads(path.read_text()), "claimed_epsilon": max(epsilons.values())}

    section, findings = canary_section(scores, run_id="8", sites={}, confidence=0.95, where=path)

    assert findings == [] and section["epsilon_lower"] <= section["claimed_epsilon"]
