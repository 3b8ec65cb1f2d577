"""`training.snapshots`: averages of a finished run's `--save-every` snapshots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from training.snapshots import main, weights_for, write


def fake_run(root: Path, values: dict[str, float], steps: int) -> Path:
    """A run folder as `train.py --save-every 1 --ema ... --keep-raw` leaves it: each folder's
    one weight tensor filled with its value, the config telling the folders apart."""
    for name, value in values.items():
        folder = root / name
        folder.mkdir()
        save_file(
            {"w": torch.full((2, 3), value), "n": torch.tensor([7])}, folder / "model.safetensors"
        )
        (folder / "config.json").write_text(json.dumps({"from": name}))
    log = {"args": {"steps": str(steps)}, "log": []}
    (root / "run" / "training_log.json").write_text(json.dumps(log))
    return root / "run"


def weight(folder: Path) -> torch.Tensor:
    return load_file(folder / "model.safetensors")["w"]


def test_a_plain_mean_takes_the_snapshots_from_the_step_asked_and_the_last_steps_own(
    tmp_path: Path,
) -> None:
    run = fake_run(
        tmp_path,
        {"run": 100.0, "run-raw": 3.0, "run-step1": 1.0, "run-step2": 2.0, "run-step10": 50.0},
        steps=3,
    )
    line = write(run, tmp_path / "mean", start=2, decay=None)
    # the average in `run` and the snapshot past the last step weigh nothing
    assert torch.allclose(weight(tmp_path / "mean"), torch.full((2, 3), 2.5))
    assert load_file(tmp_path / "mean" / "model.safetensors")["n"].tolist() == [7]
    assert json.loads((tmp_path / "mean" / "config.json").read_text()) == {"from": "run-raw"}
    assert "2 steps from 2 to 3" in line


def test_a_decay_weighs_each_snapshot_by_its_distance_from_the_last_step(tmp_path: Path) -> None:
    run = fake_run(tmp_path, {"run": 3.0, "run-step1": 1.0, "run-step2": 2.0}, steps=3)
    main(["--run", str(run), "--decay", "0.5", "--out", str(tmp_path / "ema")])
    expected = (0.25 * 1.0 + 0.5 * 2.0 + 1.0 * 3.0) / 1.75  # no -raw: `run` is the last step
    assert torch.allclose(weight(tmp_path / "ema"), torch.full((2, 3), expected))
    assert weight(tmp_path / "ema").dtype == torch.float32


def test_the_shares_sum_to_one_and_the_choice_is_checked() -> None:
    assert weights_for([1, 2, 3], 3, start=1) == pytest.approx([1 / 3] * 3)
    assert sum(weights_for([100, 200, 6500], 6500, decay=0.999)) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        weights_for([1, 2], 2, start=5)
    with pytest.raises(ValueError):
        weights_for([1, 2], 2, start=1, decay=0.9)
    with pytest.raises(ValueError):
        weights_for([1, 2], 2, decay=1.5)
