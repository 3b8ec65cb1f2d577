"""`train.py --ema`: averages of the weights kept beside a run, which change nothing of it."""

from __future__ import annotations

import pytest
import torch

from training.averaging import WeightAverage, decay_at, folder_name, parse_decays


def test_the_decay_ramps_up_from_the_first_step_to_the_one_asked_for() -> None:
    assert decay_at(0.999, 0) == pytest.approx(0.1)
    assert decay_at(0.999, 8) == pytest.approx(0.5)
    assert decay_at(0.999, 100_000) == 0.999


def test_the_average_is_the_ramped_exponential_average_of_each_steps_weights() -> None:
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(0.0)
        model.bias.fill_(0.0)
    average = WeightAverage(model, 0.9)
    expected = torch.zeros(2, 3)
    for step, value in enumerate((1.0, 2.0, 4.0, -1.0, 3.0, 5.0, 0.5, 7.0, 2.0, 9.0, 1.0, 6.0)):
        with torch.no_grad():
            model.weight.fill_(value)
        average.update(step)
        d = min(0.9, (1 + step) / (10 + step))
        expected = d * expected + (1 - d) * value
        assert torch.allclose(average.shadow[0], expected), step
    # keeping the average never touched the weights themselves
    assert torch.equal(model.weight, torch.full((2, 3), 6.0))


def test_the_model_holds_the_average_only_inside_the_block() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    average = WeightAverage(model, 0.99)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    moved = {k: v.clone() for k, v in model.state_dict().items()}
    average.update(0)  # decay 0.1: 0.1 * own + 0.9 * moved
    with average.applied():
        for k, v in model.state_dict().items():
            assert torch.allclose(v, 0.1 * own[k] + 0.9 * moved[k]), k
    for k, v in model.state_dict().items():
        assert torch.equal(v, moved[k]), k


def test_decays_are_read_from_the_command_line_and_name_their_folders() -> None:
    assert parse_decays("0.999,0.9995") == [0.999, 0.9995]
    for bad in ("", "1.0", "0", "0.9,2"):
        with pytest.raises(ValueError):
            parse_decays(bad)
    assert folder_name("oculo-tiny", 0.9995) == "oculo-tiny-ema0.9995"
