"""`train.py --optimizer muon`: Muon on the transformer layers' matrices, AdamW on the rest."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText

from oculo.testing.checkpoints import Size, build_tokenizer, idefics3_parts
from tests.test_training_state import losses, train
from training import averaging, lookup, optimizers, state
from training.train import ISOLATE, tokenizer_corpus


def test_muon_computes_torchs_muon_in_float32() -> None:
    """The same momentum, Nesterov step, decoupled decay and Moonshot's size rule as
    `torch.optim.Muon(adjust_lr_fn="match_rms_adamw")`; only the orthogonalisation's precision
    differs (torch's bfloat16), so three steps agree to that precision and no further."""
    torch.manual_seed(0)
    mine = [torch.nn.Parameter(torch.randn(64, 32)), torch.nn.Parameter(torch.randn(32, 96))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in mine]
    ours = optimizers.Muon(mine, lr=0.01)
    torchs = torch.optim.Muon(theirs, lr=0.01, weight_decay=0.01, adjust_lr_fn="match_rms_adamw")
    start = [p.detach().clone() for p in mine]
    for _ in range(3):
        for a, b in zip(mine, theirs, strict=True):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        ours.step()
        torchs.step()
    for a, b, s in zip(mine, theirs, start, strict=True):
        ours_moved, torchs_moved = (a - s).detach(), (b - s).detach()
        assert ours_moved.abs().mean() > 1e-3  # it did step
        assert (ours_moved - torchs_moved).abs().max() < 0.02 * torchs_moved.abs().max()
        cosine = torch.nn.functional.cosine_similarity(
            ours_moved.flatten(), torchs_moved.flatten(), dim=0
        )
        assert cosine > 0.999
    # the update's singular values are pushed into the quintic's band, in float32
    update = optimizers.orthogonalised(torch.randn(32, 96, dtype=torch.float32))
    singular = torch.linalg.svdvals(update)
    assert update.dtype == torch.float32
    assert singular.min() > 0.5 and singular.max() < 1.5


def test_muon_trains_the_layers_matrices_and_adamw_the_rest() -> None:
    tokenizer = build_tokenizer(
        "idefics3", tokenizer_corpus(0, n=300), vocab_size=300, isolate=ISOLATE
    )
    size = Size(image_size=32, patch_size=8, hidden=32, layers=1, heads=2, vision_hidden=32,
                vision_layers=1, vision_heads=2)  # fmt: skip
    config, _ = idefics3_parts(tokenizer, size)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config)
    head = torch.nn.Linear(32, 3)
    built = optimizers.build("muon", model, head.parameters(), lr=0.001, muon_scale=4.0)
    assert isinstance(built, optimizers.Together)
    muon = {id(p) for g in built.parts["muon"].param_groups for p in g["params"]}
    adamw = {id(p) for g in built.parts["adamw"].param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert muon.isdisjoint(adamw)
    assert muon | adamw == {*names, *(id(p) for p in head.parameters())}
    in_muon = sorted(names[i] for i in muon)
    assert "model.connector.modality_projection.proj.weight" in in_muon
    assert any("text_model.layers.0.mlp.down_proj.weight" in n for n in in_muon)
    assert any("vision_model.encoder.layers.0.self_attn.q_proj.weight" in n for n in in_muon)
    for kept in ("embed_tokens", "lm_head", "patch_embedding", "position_embedding", "norm"):
        assert not any(kept in n for n in in_muon), kept
    assert all(g["scale"] == 4.0 and g["lr"] == 0.004 for g in built.parts["muon"].param_groups)
    # the default is AdamW alone, its parameters in the order the shipped runs gave them
    plain = optimizers.build("adamw", model, head.parameters(), lr=0.001)
    assert isinstance(plain, torch.optim.AdamW)
    assert [id(p) for p in plain.param_groups[0]["params"]] == [
        *(id(p) for p in model.parameters()),
        *(id(p) for p in head.parameters()),
    ]
    with pytest.raises(ValueError, match="unknown optimizer"):
        optimizers.build("sgd", model, [], lr=0.001)


def test_a_muon_run_resumes_bit_for_bit_and_says_so_on_its_card(tmp_path: Path) -> None:
    """Both optimizers' moments go into a saved state and come back; the card names the
    optimizer and its scale so that the command on it trains the same run; an AdamW state does
    not resume a Muon run."""
    extra = ("--optimizer", "muon", "--muon-scale", "2", "--muon-skip", "lookup-attention")
    whole = train(tmp_path / "whole", *extra, "--save-state", "50")
    assert whole.returncode == 0, whole.stderr[-3000:]
    saved = state.folder(tmp_path / "whole", 50)
    resumed = train(tmp_path / "resumed", *extra, "--resume", str(saved))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for a, b in (("whole", "resumed"), (averaging.folder_name("whole", 0.9),) * 2):
        b = b.replace("whole", "resumed")
        assert (tmp_path / a / "model.safetensors").read_bytes() == (
            tmp_path / b / "model.safetensors"
        ).read_bytes(), (a, b)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "whole")
    card = (tmp_path / "whole" / "README.md").read_text()
    assert "--optimizer muon --muon-scale 2.0 --muon-skip lookup-attention" in card
    assert "Muon on the transformer layers' matrices and the connector's but the attention" in card
    args = json.loads((tmp_path / "whole" / "training_log.json").read_text())["args"]
    assert args["optimizer"] == "muon"
    wrong = train(tmp_path / "wrong", "--resume", str(saved))  # AdamW, from a Muon state
    assert wrong.returncode != 0
    assert "the optimizer's state does not fit this run" in wrong.stderr


@pytest.mark.parametrize("skip", ["text-attention", "lookup-attention"])
def test_muon_skip_keeps_the_language_models_attention_on_adamw(skip: str) -> None:
    """`--muon-skip text-attention` leaves every language-model layer's attention matrices to
    AdamW, `lookup-attention` only those of the look-up head's layer; the tower's attention and
    every MLP stay on Muon either way."""
    tokenizer = build_tokenizer(
        "idefics3", tokenizer_corpus(0, n=300), vocab_size=300, isolate=ISOLATE
    )
    size = Size(image_size=32, patch_size=8, hidden=32, layers=3, heads=2, vision_hidden=32,
                vision_layers=1, vision_heads=2)  # fmt: skip
    config, _ = idefics3_parts(tokenizer, size)
    model = AutoModelForImageTextToText.from_config(config)
    built = optimizers.build("muon", model, [], lr=0.001, muon_skip=skip)
    assert isinstance(built, optimizers.Together)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in built.parts["muon"].param_groups for p in g["params"]}
    adamw = {names[id(p)] for g in built.parts["adamw"].param_groups for p in g["params"]}
    assert muon.isdisjoint(adamw) and muon | adamw == set(names.values())
    attention = [n for n in names.values() if "text_model.layers." in n and ".self_attn." in n]
    assert len(attention) == 3 * 4  # q, k, v and o in each of the three layers
    for name in attention:
        on_adamw = skip == "text-attention" or f"layers.{lookup.LAYER}." in name
        assert (name in adamw) == on_adamw, name
    for layer in range(3):
        assert any(f"text_model.layers.{layer}.mlp.down_proj" in n for n in muon)
    assert any("vision_model.encoder.layers.0.self_attn.q_proj" in n for n in muon)
    with pytest.raises(ValueError, match="unknown --muon-skip"):
        optimizers.for_muon("x", torch.zeros(2, 2), "everything")


def test_muons_settings_are_refused_without_muon() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "training.train", "--out", "x", "--muon-skip", "text-attention"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0
    assert "give --optimizer muon" in run.stderr
