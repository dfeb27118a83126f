import numpy as np
import pytest

from shared.partition import (
    PartitionError,
    dirichlet_partitions,
    federated_split,
    iid_partitions,
    train_test_split,
)


def _assert_disjoint_and_complete(parts, universe):
    joined = np.concatenate(parts)
    assert len(joined) == len(set(joined.tolist())), "a row is in two partitions"
    assert sorted(joined.tolist()) == sorted(np.asarray(universe).tolist()), "a row is missing"


def test_iid_partitions_are_disjoint_complete_balanced_and_seeded():
    parts = iid_partitions(1003, 10, seed=1)
    _assert_disjoint_and_complete(parts, range(1003))
    assert {len(p) for p in parts} <= {100, 101}
    assert all(np.array_equal(a, b) for a, b in zip(parts, iid_partitions(1003, 10, seed=1), strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, iid_partitions(1003, 10, seed=2), strict=True))


def test_dirichlet_partitions_are_disjoint_complete_seeded_and_skewed():
    labels = np.repeat([0, 1], 500)
    parts = dirichlet_partitions(labels, 10, alpha=0.3, seed=3)
    _assert_disjoint_and_complete(parts, range(1000))
    again = dirichlet_partitions(labels, 10, alpha=0.3, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    share_pos = [labels[p].mean() for p in parts]
    iid_share = [labels[p].mean() for p in iid_partitions(1000, 10, seed=3)]
    assert np.std(share_pos) > 3 * np.std(iid_share)  # strong label skew at small alpha
    assert min(len(p) for p in parts) >= 8


def test_train_test_split_holds_out_rows_no_client_sees():
    labels = np.arange(500) % 3
    parts, test = federated_split(labels, num_partitions=5, partitioning="iid", alpha=0.5, test_fraction=0.2, seed=0)
    assert len(test) == 100
    assert not set(test.tolist()) & set(np.concatenate(parts).tolist())
    _assert_disjoint_and_complete([*parts, test], range(500))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: iid_partitions(3, 5, seed=0), "cannot split 3 rows into 5"),
        (lambda: iid_partitions(3, 0, seed=0), "num_partitions must be >= 1"),
        (lambda: dirichlet_partitions(np.zeros(20), 5, alpha=0.5, seed=0), "cannot give 5 clients 8 rows"),
        (lambda: dirichlet_partitions(np.zeros(100), 5, alpha=0.0, seed=0), "alpha must be > 0"),
        (lambda: train_test_split(10, test_fraction=1.0, seed=0), "test_fraction must be in (0, 1)"),
        (
            lambda: federated_split(
                np.zeros(50), num_partitions=2, partitioning="x", alpha=1, test_fraction=0.2, seed=0
            ),
            "partitioning must be 'iid' or 'dirichlet'",
        ),
    ],
)
def test_impossible_partitioning_is_a_clear_error(call, message):
    with pytest.raises(PartitionError) as err:
        call()
    assert message in str(err.value)
