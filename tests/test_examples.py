"""The examples run: examples/own_fit_loop.py finds a ticket in plain `model.fit` calls.

It is the README's "Library use (your own fit loop)": lth_tf's wrapper, the
step-k recorder, the pruning function and the rewind, with no driver.
"""

import importlib.util
import pathlib

import numpy as np
import pytest

from lth_tf import masks

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "own_fit_loop.py"


@pytest.fixture(scope="module")
def ticket():
    spec = importlib.util.spec_from_file_location("own_fit_loop", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    x, y = example.make_data(n=1024)
    history, w_k = example.find_ticket(x, y, rounds=2, epochs=3, rewind_step=10)
    return history, w_k


def test_each_round_prunes_a_fifth_of_the_survivors_and_keeps_the_output_dense(ticket):
    history, _ = ticket
    assert set(history[0]["masks"]) == {"fc1", "fc2"}  # output_rate=0: not wrapped
    sizes = sum(m.size for m in history[0]["masks"].values())
    alive = sizes
    for h in history[1:]:
        alive -= int(np.round(0.2 * alive))
        assert int(sum(m.sum() for m in h["masks"].values())) == alive
    for before, after in zip(history[:-1], history[1:], strict=True):
        masks.check_subset(after["masks"], before["masks"])


def test_masks_are_the_magnitude_pruning_of_the_previous_rounds_final_weights(ticket):
    history, _ = ticket
    for before, after in zip(history[:-1], history[1:], strict=True):
        kernels = {n: before["final"][f"{n}/kernel"] for n in before["masks"]}
        expected = masks.prune(kernels, before["masks"], 0.2, "global")
        assert all(np.array_equal(after["masks"][n], expected[n]) for n in expected)


def test_every_pruned_round_starts_from_w_k_masked_and_keeps_pruned_weights_at_zero(ticket):
    history, w_k = ticket
    assert not np.array_equal(w_k["fc1/kernel"], history[0]["start"]["fc1/kernel"])  # k > 0
    for h in history[1:]:
        for key, value in w_k.items():
            layer = key.split("/")[0]
            expected = (
                value * h["masks"][layer]
                if key.endswith("/kernel") and layer in h["masks"]
                else value
            )
            np.testing.assert_array_equal(h["start"][key], expected)
        for n, m in h["masks"].items():
            assert not h["final"][f"{n}/kernel"][m == 0].any()
            assert h["final"][f"{n}/kernel"][m == 1].all()  # the survivors trained


def test_the_ticket_learns_the_task(ticket):
    history, _ = ticket
    assert history[0]["test_accuracy"] > 0.6  # chance: 0.25
    assert history[-1]["test_accuracy"] > history[0]["test_accuracy"] - 0.1
