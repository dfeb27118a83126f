import numpy as np
import pytest

from server.optimizer import ServerOptimizer


def test_fedavg_applies_the_mean_update_scaled_by_the_learning_rate():
    opt = ServerOptimizer(kind="fedavg", learning_rate=0.5)
    np.testing.assert_allclose(opt.step(np.array([2.0, -4.0])), [1.0, -2.0])


def test_fedadam_rescales_coordinates_so_a_tiny_consistent_signal_moves_as_fast_as_a_large_one():
    opt = ServerOptimizer(kind="fedadam", learning_rate=0.1, tau=1e-6)
    for _ in range(5):
        step = opt.step(np.array([1e-4, 10.0]))
    assert step[0] == pytest.approx(step[1], rel=0.06)  # equal but for tau


def test_fedadam_averages_sign_flipping_noise_down_over_rounds():
    rng = np.random.default_rng(0)
    opt = ServerOptimizer(kind="fedadam", learning_rate=0.1, tau=1e-6)
    steps = [opt.step(np.array([0.1, rng.choice([-1.0, 1.0])])) for _ in range(50)]
    assert abs(steps[-1][1]) < 0.5 * abs(steps[-1][0])  # the noisy coordinate moves far less


def test_state_round_trips_through_a_checkpoint():
    opt = ServerOptimizer(kind="fedadam", learning_rate=0.1)
    opt.step(np.array([1.0, 2.0]))
    again = ServerOptimizer.from_state_dict(opt.state_dict())
    np.testing.assert_allclose(again.step(np.array([0.5, 0.5])), opt.step(np.array([0.5, 0.5])))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "sgd"}, "must be 'fedavg' or 'fedadam'"),
        ({"learning_rate": 0.0}, "learning rate must be > 0"),
        ({"tau": 0.0}, "tau must be > 0"),
    ],
)
def test_bad_server_optimizer_settings_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ServerOptimizer(**kwargs)
