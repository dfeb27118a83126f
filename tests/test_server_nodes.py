"""The ServerApp's wait for nodes at start-up: Flower's simulation registers its nodes while the ServerApp
starts, so the server waits until no more join before it provisions the roster and asks round 0."""

from __future__ import annotations

import pytest

from server.app import wait_for_nodes


class JoiningGrid:
    """A grid whose nodes appear a few at a time, as Flower's simulation registers them."""

    def __init__(self, waves: list[list[int]]) -> None:
        self.waves = waves
        self.calls = 0

    def get_node_ids(self) -> list[int]:
        wave = self.waves[min(self.calls, len(self.waves) - 1)]
        self.calls += 1
        return wave


def test_start_up_waits_until_the_nodes_stop_joining():
    grid = JoiningGrid([[7], [7, 3], [7, 3, 9], [7, 3, 9]])

    nodes = wait_for_nodes(grid, 2, settle_s=0.01)  # type: ignore[arg-type]

    assert nodes == [3, 7, 9]


def test_without_settling_the_first_minimum_is_enough():
    grid = JoiningGrid([[7, 3], [7, 3, 9]])

    assert wait_for_nodes(grid, 2) == [3, 7]  # type: ignore[arg-type]


def test_too_few_nodes_is_a_clear_error():
    with pytest.raises(RuntimeError, match="only 1 node\\(s\\) connected after 0s; need min-train-nodes=2"):
        wait_for_nodes(JoiningGrid([[1]]), 2, timeout_s=0.0)  # type: ignore[arg-type]
