"""The read-only web page: the stdlib HTTP server, its routes and a small cache of plots.

    server = make_server(config, sources)   # bound to config.host:config.port (0: any free)
    server.serve_forever()

GET only. Pages are rendered per request from the registry and Redis; plots of immutable
things (a registry version's report, a projection of one embedding version) are cached.
A Content-Security-Policy keeps the browser from loading anything but this server's images.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis

from userembed import prerequisites as pre
from userembed.errors import DataNotFoundError, InvalidInputError, UserEmbedError
from userembed.ids import parse_user_id
from userembed.redis_urls import open_redis, redacted
from userembed.registry import DEFAULT_MODEL, VERSION_RE, Registry, check_model_name
from userembed.ui import data, pages, plots
from userembed.ui.projection import attributes, project
from userembed.vectors import VectorStore

logger = logging.getLogger(__name__)

CACHE_SIZE = 128
CSP = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; form-action 'self'"
Reply = tuple[int, str, bytes]  # status, content type, body


class _Cache:
    """A bounded LRU of rendered plots, shared by the server's threads."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self.size = size
        self.items: OrderedDict[Any, bytes] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: Any, make: Callable[[], bytes]) -> bytes:
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        value = make()
        with self.lock:
            self.items[key] = value
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return value


class UiApp:
    """Routes a GET path and its query to a reply; no state beyond the plot cache."""

    def __init__(self, config: data.UiConfig, sources: data.UiSources) -> None:
        self.config = config
        self.sources = sources
        self.registry = Registry(config.registry_root)
        self.redis = open_redis(config.redis_url, socket_connect_timeout=2, socket_timeout=10)
        self.cache = _Cache()
        self.where = f"Redis {redacted(config.redis_url)}, registry {self.registry.root}"
        self.routes: dict[str, Callable[[dict[str, str]], Reply]] = {
            "/": self.overview,
            "/model": self.model,
            "/version": self.version,
            "/transfer": self.transfer,
            "/user": self.user,
            "/projection": self.projection,
            "/status": self.status,
            "/plot/auc.png": self.plot_auc,
            "/plot/expert_load.png": self.plot_expert_load,
            "/plot/drift.png": self.plot_drift,
            "/plot/projection.png": self.plot_projection,
        }

    # --- plumbing --------------------------------------------------------------------

    def handle(self, target: str) -> Reply:
        url = urlsplit(target)
        route = self.routes.get(url.path)
        if route is None:
            return self._page(HTTPStatus.NOT_FOUND, "Not found", pages.missing(url.path))
        params = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            return route(params)
        except InvalidInputError as e:
            return self._page(HTTPStatus.BAD_REQUEST, "Bad request", pages.missing(str(e)))
        except UserEmbedError as e:
            return self._page(HTTPStatus.NOT_FOUND, "Not there yet", pages.missing(str(e)))
        except redis.RedisError as e:
            text = (
                f"Redis does not answer at {redacted(self.config.redis_url)} ({type(e).__name__})"
            )
            return self._page(
                HTTPStatus.SERVICE_UNAVAILABLE, "Redis unavailable", pages.missing(text)
            )

    def _page(self, status: int, title: str, body: str) -> Reply:
        return status, "text/html; charset=utf-8", pages.layout(title, body, self.where).encode()

    def _ok(self, title: str, body: str) -> Reply:
        return self._page(HTTPStatus.OK, title, body)

    @staticmethod
    def _png(body: bytes) -> Reply:
        return HTTPStatus.OK, "image/png", body

    def _models(self) -> list[str]:
        return self.registry.list_models()

    def _model(self, params: dict[str, str], key: str = "model") -> str:
        """The model asked for; the default model (or the first there is) when none is."""
        if params.get(key):
            return check_model_name(params[key])
        models = self._models()
        if not models:
            raise DataNotFoundError(
                pre.run_first(
                    f"no model in registry {self.registry.root}", pre.EXPORT.format(run="RUN_DIR")
                )
            )
        return DEFAULT_MODEL if DEFAULT_MODEL in models else models[0]

    def _version(self, model: str, params: dict[str, str]) -> str:
        version = params.get("version", "")
        if not VERSION_RE.match(version):
            raise InvalidInputError(f"version {version!r} is not a registry version id")
        return self.registry.resolve(model, version)

    def _store(self, model: str) -> VectorStore:
        return VectorStore(self.redis, model)

    # --- pages -----------------------------------------------------------------------

    def overview(self, params: dict[str, str]) -> Reply:
        models = self._models()
        if not models:
            text = pre.run_first(
                f"no model in registry {self.registry.root}", pre.EXPORT.format(run="RUN_DIR")
            )
            return self._ok("Models", pages.missing(text))
        rows = []
        for m in models:
            state = data.embedding_state(self._store(m), self.sources.refresh_record)
            rows.append(
                (m, len(self.registry.list_versions(m)), self.registry.aliases(m), state.serving)
            )
        feast = (
            "<p class=muted>The feature repository has its own UI: <code>feast -c feature_repo ui"
            "</code> (docs/ui.md).</p>"
        )
        return self._ok("Models", pages.overview(rows) + feast)

    def model(self, params: dict[str, str]) -> Reply:
        model = self._model(params, "name")
        rows = data.model_versions(self.registry, model, self.config.report_file)
        state = data.embedding_state(self._store(model), self.sources.refresh_record)
        serving = state.serving
        served = serving.info.model_version if serving else ""
        shown = next((r for r in rows if r.version == served), rows[0])
        body = "<h2>Registry versions</h2>" + pages.versions_table(model, rows, served)
        body += "<h2>Embedding versions</h2>"
        if serving is None:
            body += pages.missing(
                pre.run_first(f"no embedding version serves {model}", pre.REFRESH)
            )
        else:
            body += (
                f"<p>Readers follow <b>{pages.esc(serving.info.id)}</b>, computed by model version "
                f"{pages.link('/version', serving.info.model_version, model=model, version=served)}.</p>"
            )
        body += pages.embeddings_table(state, {r.version: r.dim for r in rows})
        body += "<h2>Drift between embedding versions</h2>" + pages.img(
            "/plot/drift.png", "drift", model=model
        )
        body += f"<h2>Training report of {pages.esc(shown.version)}</h2>" + self._report_plots(
            model, shown
        )
        return self._ok(f"Model {model}", body)

    def _report_plots(self, model: str, row: data.VersionRow) -> str:
        if not row.has_report:
            return pages.missing(f"{model}/{row.version} was published without a training report")
        return pages.img(
            "/plot/auc.png", "per-task AUC", model=model, version=row.version
        ) + pages.img("/plot/expert_load.png", "expert load", model=model, version=row.version)

    def version(self, params: dict[str, str]) -> Reply:
        model = self._model(params)
        version = self._version(model, params)
        m = self.registry.read_manifest(model, version)
        aliases = [a for a, v in self.registry.aliases(model).items() if v == version]
        row = data.version_row(m, aliases, self.config.report_file)
        body = pages.manifest_summary(m, row)
        body += "<h2>Training report</h2>" + self._report_plots(model, row)
        auc = pages.table(
            ["task", "test AUC"], [[pages.esc(t), f"{v:.4f}"] for t, v in row.test_auc.items()]
        )
        body += auc if row.test_auc else ""
        body += "<h2>Export parity</h2>" + pages.parity_table(m.parity)
        return self._ok(f"{model} {version}", body)

    def transfer(self, params: dict[str, str]) -> Reply:
        tables = data.transfer_tables(self.config.transfer_dir)
        if not tables:
            text = f"no transfer benchmark in {self.config.transfer_dir}: run 'python bench/transfer.py'"
            return self._ok("Transfer", pages.missing(text))
        return self._ok("Transfer", pages.transfer(tables))

    def user(self, params: dict[str, str]) -> Reply:
        model = self._model(params)
        user_id = params.get("id", "")
        recompute = params.get("recompute") == "1" and self.sources.recompute is not None
        body = pages.user_form(self._models(), model, user_id, recompute, self.config.target)
        if self.sources.recompute is None:
            body += "<p class=muted>No server to ask: recompute is off.</p>"
        if user_id:
            parse_user_id(user_id)
            answer = data.user_answer(
                self._store(model), user_id, self.sources.recompute if recompute else None
            )
            body += pages.user_answer(answer)
        return self._ok("User", body)

    def projection(self, params: dict[str, str]) -> Reply:
        model = self._model(params)
        attrs = attributes(self.config.offline_dir)
        if not attrs:
            problem = pre.offline_tables_problem(self.config.offline_dir) or "no profile attribute"
            return self._ok("Projection", pages.missing(pre.run_first(problem, pre.DATA_BUILD)))
        attr = params.get("attribute") or attrs[0]
        body = pages.projection_form(self._models(), model, attrs, attr)
        ev = self._store(model).current_version()
        if ev is None:
            body += pages.missing(
                pre.run_first(f"no embedding version serves {model}", pre.REFRESH)
            )
        else:
            body += (
                f"<p>Version readers follow: <b>{pages.esc(ev)}</b>; a sample of up to "
                f"{self.config.projection_sample} users from the profile table.</p>"
                + pages.img("/plot/projection.png", "projection", model=model, attribute=attr)
            )
        return self._ok("Projection", body)

    def status(self, params: dict[str, str]) -> Reply:
        if self.sources.status is None:
            return self._ok("Status", pages.missing("no status source"))
        status = self.sources.status(self._model(params))
        # A stage that could not reach Redis names its URL: shown without the password.
        raw, shown = status.redis_url, redacted(status.redis_url)
        checks = tuple(
            replace(
                c,
                summary=c.summary.replace(raw, shown),
                more=tuple(m.replace(raw, shown) for m in c.more),
            )
            for c in status.checks
        )
        return self._ok(
            "Status", pages.status_table(replace(status, redis_url=shown, checks=checks))
        )

    # --- plots -----------------------------------------------------------------------

    def _report(self, params: dict[str, str]) -> dict[str, Any]:
        model = self._model(params)
        m = self.registry.read_manifest(model, self._version(model, params))
        report = data.training_report(self.registry, m, self.config.report_file)
        if report is None:
            raise DataNotFoundError(f"{m.ref} has no training report")
        return report

    def plot_auc(self, params: dict[str, str]) -> Reply:
        key = ("auc", params.get("model"), params.get("version"))
        return self._png(self.cache.get(key, lambda: plots.auc_curves(self._report(params))))

    def plot_expert_load(self, params: dict[str, str]) -> Reply:
        key = ("experts", params.get("model"), params.get("version"))
        return self._png(self.cache.get(key, lambda: plots.expert_load(self._report(params))))

    def plot_drift(self, params: dict[str, str]) -> Reply:
        model = self._model(params)
        state = data.embedding_state(self._store(model), self.sources.refresh_record)
        series = data.drift_series(state)
        key = ("drift", model, repr(series))
        return self._png(self.cache.get(key, lambda: plots.drift(series)))

    def plot_projection(self, params: dict[str, str]) -> Reply:
        model = self._model(params)
        attr = params.get("attribute", "")
        store = self._store(model)
        ev = store.current_version()
        if ev is None:
            raise DataNotFoundError(
                pre.run_first(f"no embedding version serves {model}", pre.REFRESH)
            )
        sample = self.config.projection_sample

        def make() -> bytes:
            return plots.projection(project(store, ev, self.config.offline_dir, attr, sample))

        return self._png(self.cache.get(("projection", model, ev, attr, sample), make))


def make_server(config: data.UiConfig, sources: data.UiSources) -> ThreadingHTTPServer:
    app = UiApp(config, sources)

    class Handler(BaseHTTPRequestHandler):
        server_version = "userembed-ui"

        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            status, ctype, body = app.handle(self.path)
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Security-Policy", CSP)
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            logger.debug("%s %s", self.address_string(), format % args)

    server = ThreadingHTTPServer((config.host, config.port), Handler)
    server.daemon_threads = True
    threading.Thread(target=plots.warm_up, name="plots-warm-up", daemon=True).start()
    return server
