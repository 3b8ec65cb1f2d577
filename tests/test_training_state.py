"""`train.py --save-state S` and `--resume`: a run stopped after step S goes on bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training import averaging, state
from training.train import command_line

ROOT = Path(__file__).parents[1]

# A small run with every read-out and look-up the shipped recipe trains, two averages and the
# last step's own weights: about 15 s a process on 2 cores.
SMALL = (
    "--steps 100 --batch-size 2 --image-size 64 --patch-size 16 --scale-factor 2 "
    "--vision-layers 1 --vision-width 32 --text-layers 2 --draw-max 64 --char-columns 4 "
    "--token-chars --glyph-weight 1.0 --attend-weight 0.1 --colour-weight 0.3 --read-weight 0.1 "
    "--item-weight 0.1 --item-readout-weight 0.3 --char-slots --bitmap-face 0.3 "
    "--ema 0.99,0.9 --keep-raw --workers 0"
).split()


def train(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "training.train", "--out", str(out), *SMALL, *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def losses(folder: Path) -> list[dict[str, float]]:
    log = json.loads((folder / "training_log.json").read_text())["log"]
    return [{k: v for k, v in entry.items() if k != "minutes"} for entry in log]


def test_a_run_resumed_from_its_saved_state_ends_with_the_same_weights(tmp_path: Path) -> None:
    """The whole run writes its state after step 50 on the way; a second process goes on from
    it. Every checkpoint the two write (the averages and the last step's own weights) must be
    the same bytes, and the logs the same losses: the read-out heads, AdamW's moments, the
    averages and the batches all go on where they were (a checkpoint folder alone, as
    `--init-from` loads it, holds none of the first three)."""
    whole = train(tmp_path / "whole", "--save-state", "50")
    assert whole.returncode == 0, whole.stderr[-3000:]
    saved = state.folder(tmp_path / "whole", 50)
    assert (saved / state.FILE).is_file()
    resumed = train(tmp_path / "resumed", "--resume", str(saved))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed after step 50 from {saved}" in resumed.stdout
    folders = [
        ("whole", "resumed"),
        ("whole-raw", "resumed-raw"),
        (averaging.folder_name("whole", 0.9), averaging.folder_name("resumed", 0.9)),
    ]
    for a, b in folders:
        mine = (tmp_path / a / "model.safetensors").read_bytes()
        assert mine == (tmp_path / b / "model.safetensors").read_bytes(), (a, b)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "whole")
    assert [e["step"] for e in losses(tmp_path / "resumed")] == [50, 100]
    log = json.loads((tmp_path / "resumed" / "training_log.json").read_text())
    assert log["resumed"]["step"] == 50
    assert log["resumed"]["args"]["out"] == str(tmp_path / "whole")
    assert f"--resume {saved}" in (tmp_path / "resumed" / "README.md").read_text()
    # the run that was not resumed says nothing of a state
    assert "resumed" not in json.loads((tmp_path / "whole" / "training_log.json").read_text())


LATE = "describe=0.1,count=0.0,color=0.0,exists=0.0,text=0.9,pair=0.5"


def test_a_late_mix_in_one_run_is_a_resumed_run_with_that_mix(tmp_path: Path) -> None:
    """`--late-mix 50:MIX` from scratch writes what the state after step 50 resumed with `--mix
    MIX` writes: a last stretch screened from a saved state is then one command from scratch.
    And the late mix changes the run (its losses after step 50 are not the plain run's)."""
    first = train(tmp_path / "first", "--save-state", "50", "--stop-after", "50")
    assert first.returncode == 0, first.stderr[-3000:]
    tail = train(
        tmp_path / "tail", "--resume", str(state.folder(tmp_path / "first", 50)), "--mix", LATE
    )
    assert tail.returncode == 0, tail.stderr[-3000:]
    whole = train(tmp_path / "whole", "--late-mix", f"50:{LATE}")
    assert whole.returncode == 0, whole.stderr[-3000:]
    for name in ("", "-raw"):
        mine = (tmp_path / f"whole{name}" / "model.safetensors").read_bytes()
        assert mine == (tmp_path / f"tail{name}" / "model.safetensors").read_bytes(), name
    assert losses(tmp_path / "whole") == losses(tmp_path / "tail")
    plain = train(tmp_path / "plain", "--stop-after", "100")
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert losses(tmp_path / "plain")[0] == losses(tmp_path / "whole")[0]  # step 50: the same
    assert losses(tmp_path / "plain")[1] != losses(tmp_path / "whole")[1]
    card = " ".join((tmp_path / "whole" / "README.md").read_text().split())
    assert "--late-mix 50:describe=0.1," in card
    assert "two-image descriptions to step 50, 50% after it" in card


def test_a_state_that_does_not_fit_the_run_is_refused_by_name(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    heads = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW([*model.parameters(), *heads.parameters()])
    average = averaging.WeightAverage(model, 0.99)
    state.save(
        tmp_path / "s", 50, {"model": model, "heads": heads}, optimizer, [average], [], 1.0, {}
    )

    wider = torch.nn.Linear(4, 2)
    other = torch.optim.AdamW([*wider.parameters(), *heads.parameters()])
    loaded = state.load(tmp_path / "s")
    with pytest.raises(ValueError, match="model: the state's weights do not fit"):
        state.restore(loaded, {"model": wider, "heads": heads}, other, [])
    with pytest.raises(ValueError, match="resume with the read-out options"):
        state.restore(loaded, {"model": model}, optimizer, [average])
    with pytest.raises(ValueError, match=r"the averages \[0.99\]"):
        state.restore(loaded, {"model": model, "heads": heads}, optimizer, [])
    with pytest.raises(FileNotFoundError, match="--save-state"):
        state.load(tmp_path / "nothing")


def test_a_restored_state_puts_back_the_moments_the_averages_and_the_generator(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    average = averaging.WeightAverage(model, 0.9)
    for step in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 3)).sum().backward()
        optimizer.step()
        average.update(step)
    generator = torch.get_rng_state()
    log = [{"step": 50, "loss": 1.5}]
    state.save(tmp_path / "s", 3, {"model": model}, optimizer, [average], log, 2.5, {"lr": "0.1"})

    torch.manual_seed(1)
    fresh = torch.nn.Linear(3, 2)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    fresh_average = averaging.WeightAverage(fresh, 0.9)
    loaded = state.load(tmp_path / "s")
    state.restore(loaded, {"model": fresh}, fresh_optimizer, [fresh_average])
    assert (loaded.step, loaded.log, loaded.minutes, loaded.args) == (3, log, 2.5, {"lr": "0.1"})
    assert torch.equal(fresh.weight, model.weight)
    moments = optimizer.state_dict()["state"][0]
    assert torch.equal(fresh_optimizer.state_dict()["state"][0]["exp_avg"], moments["exp_avg"])
    assert torch.equal(fresh_average.shadow[0], average.shadow[0])
    assert torch.equal(torch.get_rng_state(), generator)


def test_states_are_saved_at_the_logs_stride_and_resumed_from_alone() -> None:
    def refused(*argv: str) -> str:
        run = subprocess.run(
            [sys.executable, "-m", "training.train", "--out", "x", "--no-pin-math", *argv],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 2, run.stdout + run.stderr
        return run.stderr

    assert "multiples of 50" in refused("--save-state", "30")
    assert "steps, comma-separated" in refused("--save-state", "fifty")
    assert "not with --init-from" in refused("--resume", "a", "--init-from", "b")
    assert "no run state in nowhere" in refused("--resume", "nowhere")
    assert command_line().parse_args(["--out", "x", "--save-state", "50,100"]).save_state
    assert "give STEP:kind=weight" in refused("--late-mix", "text=0.3")
    assert "is not one of" in refused("--late-mix", "50:words=0.3")
    late = command_line().parse_args(["--out", "x", "--late-mix", "5000:text=0.25"]).late_mix
    assert late[0] == 5000 and late[1]["text"] == 0.25 and late[1]["pair"] > 0
