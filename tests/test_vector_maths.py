"""`oculo.engines.vector_maths`: the process's first vector-maths call, made on one thread."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from oculo.engines import transformers as local_engine
from oculo.engines import vector_maths
from oculo.errors import EngineError


def test_the_first_call_is_made_on_one_thread_once_and_the_threads_are_given_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """MKL's vector maths pick their code path at the first call, which two threads racing to
    make once left one thread's cosines 1.5e-4 off; the first call is made on one thread, the
    threads are given back after, and a second call does nothing."""
    monkeypatch.setattr(vector_maths, "_settled", False)
    seen: list[int] = []
    cos = torch.Tensor.cos

    def noting(tensor: torch.Tensor) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return cos(tensor)

    monkeypatch.setattr(torch.Tensor, "cos", noting)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        vector_maths.settle_vector_maths()
        assert seen == [1]
        assert torch.get_num_threads() == 2
        vector_maths.settle_vector_maths()
        assert seen == [1]
        # the rotary embedding's table, split between two threads, is the one-thread table
        angles = torch.outer(torch.arange(107.0), 1.0 / 10000 ** (torch.arange(0, 32, 2) / 32))
        table = torch.cat([angles, angles], -1).contiguous()
        split = cos(table)
        torch.set_num_threads(1)
        assert torch.equal(split, cos(table))
    finally:
        torch.set_num_threads(before)


def test_the_local_engine_settles_before_it_loads_a_model(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(local_engine, "settle_vector_maths", lambda: calls.append("settled"))

    class Refusing:
        @staticmethod
        def from_pretrained(*args: object, **kwargs: object) -> None:
            calls.append("loaded")
            raise OSError("no checkpoint here")

    monkeypatch.setattr(local_engine, "AutoProcessor", Refusing)
    with pytest.raises(EngineError):
        local_engine.TransformersEngine(tmp_path)
    assert calls == ["settled", "loaded"]
