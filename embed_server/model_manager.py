"""Loading served models from the registry and swapping in new versions (hot reload).

A background task polls each model's registry alias (`latest` by default). A new version is
verified (sha256 via `Registry.load_verified`), loaded into onnxruntime and smoke-tested in a
worker thread while the old version keeps serving; then one dict assignment swaps it in.
Requests hold a reference to the version they started with, so none is dropped. A version that
fails (CorruptModelError, failing smoke inference) is refused once, logged, and not retried
until the alias moves again.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from embed_server.errors import NotReadyError
from embed_server.metrics import ServerMetrics
from embed_server.settings import ServerSettings
from userembed.errors import CorruptModelError, ModelNotFoundError, UserEmbedError
from userembed.features import InputSpec
from userembed.items import ItemAttributeMap
from userembed.manifest import Manifest
from userembed.onnx_encoder import OnnxEncoder
from userembed.registry import Registry
from userembed.vectors import now_ms

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServingModel:
    """One loaded model version: what a request needs, immutable (swapped whole)."""

    name: str
    version: str
    manifest: Manifest
    encoder: OnnxEncoder
    loaded_at_ms: int
    # The entry's verified item attribute map (None for a model without item attributes):
    # the miss path looks each event's item up in it before the encoder runs.
    items: ItemAttributeMap | None = None

    @property
    def version_bytes(self) -> bytes:
        """The version as Redis returns it (compared per stored vector)."""
        return self.version.encode()

    @property
    def dim(self) -> int:
        return self.manifest.vector.dim

    @property
    def spec(self) -> InputSpec:
        return self.manifest.input_spec


def load_serving_model(
    registry: Registry, model: str, ref: str, intra_op_threads: int, spinning: bool = False
) -> ServingModel:
    """Verify, load and smoke-test one registry entry (blocking: run it in a thread)."""
    loaded = registry.load_verified(model, ref)
    m = loaded.manifest
    try:
        items = loaded.items()  # read before release(): a download folder goes with it
        encoder = OnnxEncoder(
            loaded.session_source(),
            m.vector.dim,
            intra_op_threads,
            name=f"{model}/{m.version}",
            allow_spinning=spinning,
        )
    finally:
        loaded.release()  # the session holds the model now
    encoder.smoke_test(m.input_spec, items)
    return ServingModel(
        name=model,
        version=m.version,
        manifest=m,
        encoder=encoder,
        loaded_at_ms=now_ms(),
        items=items,
    )


class ModelManager:
    def __init__(
        self,
        settings: ServerSettings,
        registry: Registry,
        metrics: ServerMetrics,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self._models: dict[str, ServingModel] = {}
        self._refused: dict[str, str] = {}  # model -> version refused (not retried)

    # -- request side ------------------------------------------------------------------------
    @property
    def models(self) -> dict[str, ServingModel]:
        return dict(self._models)

    @property
    def ready(self) -> bool:
        return bool(self._models)

    @property
    def default_model(self) -> str:
        if self.settings.default_model:
            return self.settings.default_model
        if self.settings.models:
            return self.settings.models[0]
        return min(self._models) if self._models else ""

    def get(self, name: str) -> ServingModel:
        """The loaded version of `name` ("" = default model)."""
        name = name or self.default_model
        m = self._models.get(name)
        if m is not None:
            return m
        if not self._models:
            raise NotReadyError("no model loaded yet")
        raise ModelNotFoundError(
            f"unknown model '{name}' (served: {', '.join(sorted(self._models))})"
        )

    # -- loading -----------------------------------------------------------------------------
    def _names(self) -> list[str]:
        if self.settings.models:
            return list(self.settings.models)
        return self.registry.list_models()

    async def poll_once(self) -> None:
        """Load every served model whose alias points at a version not loaded (nor refused)."""
        try:
            names = await asyncio.to_thread(self._names)
        except (UserEmbedError, OSError) as e:
            logger.warning("registry %s unreadable: %s", self.registry.root, e)
            return
        for name in names:
            await self._poll_model(name)

    async def _poll_model(self, name: str) -> None:
        alias = self.settings.model_alias
        try:
            version = await asyncio.to_thread(self.registry.resolve, name, alias)
        except (UserEmbedError, OSError) as e:
            if name not in self._models:
                logger.warning("model %s: cannot resolve '%s': %s", name, alias, e)
            return
        current = self._models.get(name)
        if (current is not None and current.version == version) or self._refused.get(
            name
        ) == version:
            return
        try:
            new = await asyncio.to_thread(
                load_serving_model,
                self.registry,
                name,
                version,
                self.settings.encoder_threads(),
                bool(self.settings.intra_op_spinning),
            )
        except (CorruptModelError, ModelNotFoundError) as e:
            self._refused[name] = version
            self.metrics.reloads.labels(name, "refused").inc()
            logger.error(
                "model %s: refusing version %s (%s); still serving %s",
                name,
                version,
                e,
                current.version if current else "nothing",
            )
            return
        except OSError as e:  # registry I/O hiccup: try again at the next poll
            logger.warning("model %s: loading %s failed (%s); will retry", name, version, e)
            return
        self._models[name] = new
        self.metrics.reloads.labels(name, "loaded").inc()
        self.metrics.set_loaded(name, new.version, new.encoder.provider)
        logger.info(
            "model %s: serving version %s (was %s) on %s",
            name,
            new.version,
            current.version if current else "nothing",
            new.encoder.provider,
        )
