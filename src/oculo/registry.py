"""The model registry: public model id -> Engine, loaded from the catalog.

Engines are built lazily by kind so that importing oculo never imports torch; loading runs in a
worker thread at start-up and `ready` says when every model is in memory.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from oculo.config import ModelSpec
from oculo.engines.base import Engine, Startable
from oculo.errors import EngineUnavailable, ModelNotFound

log = logging.getLogger("oculo.registry")

EngineFactory = Callable[[ModelSpec], Engine]


def build_engine(spec: ModelSpec) -> Engine:
    """Construct (and load) the engine a catalog entry names. Blocking."""
    if spec.engine == "remote":
        from oculo.engines.remote import RemoteEngine

        return RemoteEngine(spec)
    if spec.engine == "transformers" and spec.path is not None:
        from oculo.engines.transformers import TransformersEngine

        return TransformersEngine(
            spec.path,
            model_id=spec.id,
            device=spec.device,
            dtype=spec.dtype,
            max_new_tokens_default=spec.max_tokens,
            context_length=spec.context_length,
        )
    raise ValueError(f"unknown engine kind {spec.engine!r}")


class ModelRegistry:
    def __init__(self, specs: Sequence[ModelSpec], factory: EngineFactory = build_engine) -> None:
        self._specs = {spec.id: spec for spec in specs}
        self._factory = factory
        self._engines: dict[str, Engine] = {}
        self._failed: dict[str, str] = {}

    @property
    def ids(self) -> list[str]:
        return list(self._specs)

    @property
    def specs(self) -> list[ModelSpec]:
        return list(self._specs.values())

    @property
    def ready(self) -> bool:
        return len(self._engines) == len(self._specs)

    def add(self, engine: Engine, spec: ModelSpec) -> None:
        """Register an engine that is already built (tests, embedding oculo in another app)."""
        self._specs[spec.id] = spec
        self._engines[spec.id] = engine

    async def load_all(self) -> None:
        for model_id, spec in self._specs.items():
            if model_id in self._engines:
                continue
            where = spec.path or ", ".join(spec.upstreams)
            log.info("loading model %s from %s", model_id, where)
            try:
                engine = await asyncio.to_thread(self._factory, spec)
                if isinstance(engine, Startable):
                    await engine.start()  # on this event loop: its background work lives here
                self._engines[model_id] = engine
            except Exception as exc:  # a broken checkpoint must not take the others down
                log.exception("model %s failed to load", model_id)
                self._failed[model_id] = f"{type(exc).__name__}: {exc}"
            else:
                log.info("model %s ready", model_id)

    def spec(self, model_id: str) -> ModelSpec:
        try:
            return self._specs[model_id]
        except KeyError:
            known = ", ".join(sorted(self._specs)) or "none"
            raise ModelNotFound(
                f"The model '{model_id}' does not exist. Models served here: {known}.",
                param="model",
            ) from None

    def get(self, model_id: str) -> Engine:
        self.spec(model_id)
        engine = self._engines.get(model_id)
        if engine is None:
            reason = self._failed.get(model_id)
            message = (
                f"The model '{model_id}' failed to load ({reason})."
                if reason
                else f"The model '{model_id}' is still loading; try again shortly."
            )
            raise EngineUnavailable(message, param="model", retry_after=None if reason else 5)
        return engine

    def engine_or_none(self, model_id: str) -> Engine | None:
        return self._engines.get(model_id)

    def engines(self) -> list[Engine]:
        """The engines loaded so far."""
        return list(self._engines.values())

    def status(self, model_id: str) -> str:
        if model_id in self._engines:
            return "ready"
        return "failed" if model_id in self._failed else "loading"

    async def close(self) -> None:
        for engine in self._engines.values():
            await engine.close()
        self._engines.clear()
