"""Several models per server: an :class:`~kvtier.engine.engine.Engine` per model, loaded on first
use, the least recently used idle ones unloaded to keep ``model.memory_budget``.

Every engine shares one store (:class:`~kvtier.storage.manager.TierManager`), where each model's
blocks live under its own fingerprint namespace: unloading a model frees its weights and its hot
tier, never its blocks, so a conversation on a model that was unloaded resumes from the store when
the model is loaded again. With one model served, any model name reaches it (llama.cpp's server
does the same); with several, requests are routed by name.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from kvtier.config import Config
from kvtier.engine.api import (DEFAULT_TENANT, CacheStats, Finished, GenerationRequest,
                               HotStats, ModelStats, SessionInfo, SlotStats, check_session_id)
from kvtier.engine.engine import Engine
from kvtier.engine.handle import GenerationHandle
from kvtier.engine.model import default_model_path
from kvtier.engine.sessions import session_key
from kvtier.errors import ConfigError, ModelNotFound
from kvtier.storage.manager import TierManager

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    """The model's id in the API: its file name without ``.gguf``."""
    path: Path


def model_specs(config: Config) -> list[ModelSpec]:
    """The models ``config`` serves, in order: ``model.model_path`` (or, with no file named at
    all, the default model), then ``model.models``."""
    mc = config.model
    paths = ([mc.model_path] if mc.model_path else []) + list(mc.models)
    specs = [ModelSpec(Path(p).name.removesuffix(".gguf"), Path(p).expanduser())
             for p in paths or [str(default_model_path())]]
    seen: dict[str, Path] = {}
    for spec in specs:
        if spec.name in seen:
            raise ConfigError("model.models", f"two files are served as {spec.name!r} "
                              f"({seen[spec.name]} and {spec.path}); model ids are file names")
        seen[spec.name] = spec.path
    return specs


@dataclass(slots=True)
class _Loaded:
    engine: Engine
    pending: int = 0
    """Submits under way (not yet in the engine's queue): the engine must not be unloaded."""


class ModelPool:
    """The served models; the HTTP layer's one way into the engines."""

    def __init__(self, config: Config, manager: TierManager | None = None) -> None:
        self.config = config
        self.specs = {spec.name: spec for spec in model_specs(config)}
        for spec in self.specs.values():
            if not spec.path.is_file():
                raise ConfigError("model.models" if str(spec.path) in config.model.models
                                  else "model.model_path", f"no such file: {spec.path}")
        self.model_name = next(iter(self.specs))
        """The first model: it is loaded at startup and serves requests that name none."""
        self.manager = manager if manager is not None else TierManager(config)
        self._owns_manager = manager is None
        self._lock = threading.RLock()
        self._loaded: OrderedDict[str, _Loaded] = OrderedDict()
        """Least recently used first."""
        self._sizes: dict[str, int] = {}
        """Bytes each model held when it was last loaded (its next load's estimate)."""
        self._last: dict[str, CacheStats] = {}
        """The stats of models unloaded since start, as they were when unloaded."""
        self._used: str = self.model_name
        try:
            self._acquire(self.model_name, pending=False)
        except BaseException:
            self._close_manager()
            raise

    # -- routing and loading ---------------------------------------------------------------------
    def resolve(self, model: str | None) -> str:
        """The id of the model serving ``model``: with one served, any name (or none)."""
        if len(self.specs) == 1 or not model:
            return self.model_name
        if model not in self.specs:
            raise ModelNotFound(f"model {model!r} is not served here; this server serves "
                                f"{', '.join(repr(n) for n in self.specs)}")
        return model

    def is_loaded(self, name: str) -> bool:
        with self._lock:
            return name in self._loaded

    def engine(self, model: str | None = None) -> Engine:
        """The engine of ``model`` (resolved as :meth:`resolve` does), loaded if need be."""
        return self._acquire(self.resolve(model), pending=False)

    def _acquire(self, name: str, pending: bool) -> Engine:
        """The loaded engine of ``name``, most recently used now; ``pending`` counts a submit on
        it until :meth:`_settle`. Loads and unloads run under the lock, one at a time."""
        with self._lock:
            loaded = self._loaded.get(name)
            if loaded is None:
                self._make_room(name, self._sizes.get(name, self.specs[name].path.stat().st_size))
                started = time.perf_counter()
                config = self.config.model_copy(deep=True)
                config.model.model_path = str(self.specs[name].path)
                config.model.models = []
                loaded = self._loaded[name] = _Loaded(Engine(config, self.manager))
                self._sizes[name] = loaded.engine.memory_bytes()
                log.info("loaded %s in %.2f s (%d MiB with its hot tier; %d slots of %d tokens)",
                         name, time.perf_counter() - started, self._sizes[name] >> 20,
                         loaded.engine.n_slots, loaded.engine.sizing.slot_tokens)
                self._make_room(name, 0)
            self._loaded.move_to_end(name)
            self._used = name
            if pending:
                loaded.pending += 1
            return loaded.engine

    def _settle(self, name: str) -> None:
        with self._lock:
            self._loaded[name].pending -= 1

    def _make_room(self, name: str, need: int) -> None:
        """Unload idle models, least recently used first, until ``need`` more bytes fit."""
        budget = self.config.model.memory_budget
        if not budget:
            return
        for other in list(self._loaded):
            if self._held() + need <= budget:
                return
            loaded = self._loaded[other]
            if other != name and loaded.pending == 0 and loaded.engine.idle():
                self._unload(other)
        if self._held() + need > budget:
            others = [n for n in self._loaded if n != name]
            log.warning("loaded models hold %d MiB (%d MiB more to load), beyond "
                        "model.memory_budget (%d MiB): %s", self._held() >> 20, need >> 20,
                        budget >> 20, f"{', '.join(others)} busy" if others
                        else f"{name} alone takes more")

    def _held(self) -> int:
        return sum(self._sizes[n] for n in self._loaded)

    def _unload(self, name: str) -> None:
        engine = self._loaded.pop(name).engine
        self._last[name] = engine.cache_stats()
        engine.close()  # stores what is still queued for the store, then frees the model
        log.info("unloaded %s (its blocks stay in the store)", name)

    # -- generation ------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest,
               loop: asyncio.AbstractEventLoop | None = None) -> GenerationHandle:
        """Route the request to its model's engine (loading it if need be) and queue it."""
        name = self.resolve(request.model)
        engine = self._acquire(name, pending=True)
        try:
            return engine.submit(request, loop)
        finally:
            self._settle(name)

    def generate(self, request: GenerationRequest) -> Finished:
        """Run a request to the end (blocking)."""
        return self.submit(request).result()

    # -- sessions (one catalog for every model) --------------------------------------------------
    def _engines(self) -> list[Engine]:
        with self._lock:
            return [loaded.engine for loaded in self._loaded.values()]

    def wait_session(self, session_id: str | None = None, tenant: str = DEFAULT_TENANT) -> None:
        """Wait until ``tenant``'s session's previous turn (None: every session's) is stored."""
        for engine in self._engines():
            engine.wait_session(session_id, tenant)

    def _owner(self, session_id: str, tenant: str) -> Engine:
        """The loaded engine whose model the session belongs to, else the last one used (a
        session of an unloaded model has no request running)."""
        entry = self.manager.get_session(session_key(tenant, check_session_id(session_id))) \
            if session_id else None
        engines = self._engines()
        for engine in engines:
            if entry is not None and engine.namespace == entry.namespace:
                return engine
        return engines[-1]

    def list_sessions(self, after: str = "", limit: int = 20, tenant: str = DEFAULT_TENANT
                      ) -> list[SessionInfo]:
        self.wait_session()
        return self._owner("", tenant).list_sessions(after, limit, tenant)

    def get_session(self, session_id: str, tenant: str = DEFAULT_TENANT) -> SessionInfo:
        self.wait_session(session_id, tenant)
        return self._owner(session_id, tenant).get_session(session_id, tenant)

    def delete_session(self, session_id: str, tenant: str = DEFAULT_TENANT) -> None:
        self.wait_session(session_id, tenant)
        self._owner(session_id, tenant).delete_session(session_id, tenant)

    def fork_session(self, session_id: str, new_id: str | None = None,
                     tenant: str = DEFAULT_TENANT) -> SessionInfo:
        self.wait_session(session_id, tenant)
        return self._owner(session_id, tenant).fork_session(session_id, new_id, tenant)

    # -- state -----------------------------------------------------------------------------------
    def wait_stored(self, timeout: float | None = None) -> bool:
        return all(engine.wait_stored(timeout) for engine in self._engines())

    def models(self) -> list[tuple[str, bool]]:
        """Every served model's id, and whether it is loaded."""
        with self._lock:
            return [(name, name in self._loaded) for name in self.specs]

    def cache_stats(self) -> CacheStats:
        """The store's tiers; the engines' counts summed over every model (throughput: the model
        used last); per model, its own (a model unloaded since start: as it was then)."""
        with self._lock:
            loaded = {name: l.engine for name, l in self._loaded.items()}
            used = self._used
        current = {name: engine.cache_stats() for name, engine in loaded.items()}
        per_model = tuple(_model_stats(name, name in current, current.get(name)
                                       or self._last.get(name)) for name in self.specs)
        first = current[used] if used in current else next(iter(current.values()))
        return CacheStats(first.tiers, _sum([m.tokens for m in per_model]),
                          _sum([m.slots for m in per_model]), first.throughput,
                          _sum([m.working_set for m in per_model]),
                          _sum([m.store for m in per_model]), degraded=first.degraded,
                          hot=_sum([m.hot for m in per_model]), models=per_model,
                          remote=first.remote)

    def close(self) -> None:
        """Close every loaded engine, then the store."""
        with self._lock:
            for name in list(self._loaded):
                self._loaded.pop(name).engine.close()
        self._close_manager()

    def _close_manager(self) -> None:
        if self._owns_manager:
            self.manager.close()


def _model_stats(name: str, loaded: bool, stats: CacheStats | None) -> ModelStats:
    if stats is None:
        return ModelStats(name, False)
    return ModelStats(name, loaded, stats.hot if loaded else HotStats(), stats.tokens,
                      stats.slots if loaded else SlotStats(0, 0, 0), stats.throughput,
                      stats.working_set, stats.store)


def _sum(items: Sequence[Any]) -> Any:
    """Field by field sum of dataclasses of one type (booleans: any)."""
    cls = type(items[0])
    values = {}
    for f in fields(cls):
        column = [getattr(item, f.name) for item in items]
        values[f.name] = any(column) if isinstance(column[0], bool) else \
            round(sum(column), 6) if isinstance(column[0], float) else sum(column)
    return cls(**values)

