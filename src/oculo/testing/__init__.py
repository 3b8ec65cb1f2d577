"""Helpers for tests and benchmarks: tiny, offline-built checkpoints of real architectures.

Importing this package is cheap; torch and transformers are imported only when a checkpoint is
built (see `oculo.testing.checkpoints`).
"""

from __future__ import annotations

from oculo.testing.checkpoints import ARCHITECTURES, Architecture, build_checkpoint

__all__ = ["ARCHITECTURES", "Architecture", "build_checkpoint"]
