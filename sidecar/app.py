"""The admin sidecar: a Flask app over the pooler's admin console, served by gevent.

    python -m sidecar.app --config /etc/pooler/pooler.yaml [--host 127.0.0.1] [--port 8080]
                          [--metrics-port 9127]

GET  /healthz   200 if the admin console answers SHOW VERSION, else 503
GET  /livez     200 while the sidecar serves HTTP (its own liveness; no login)
GET  /readyz    200 if the pooler accepts TCP connections, a PostgreSQL server of
                its config is reachable and it is not suspended; a paused pooler
                stays ready (its clients wait); else 503
GET  /drain     ?seconds=N (at most 120): wait, then 200; the preStop hook, so the
                pooler keeps accepting while the pod leaves the Service
POST /pause     PAUSE [db]      (?db=name; bearer token required)
POST /resume    RESUME [db]     (?db=name; bearer token required)
POST /reload    validate the config file, then RELOAD (bearer token required)
                (the three take ?timeout=N, 0 < N <= 120 seconds: the wait for the
                command, 504 when it expires; default --command-timeout)
GET  /          the status page (a browser: pools, counts, a latency histogram, live);
                JSON clients get the list of endpoints
GET  /status    what the page shows, as JSON (SHOW POOLS, HISTOGRAMS, STATE)
GET  /config    the effective settings (SHOW CONFIG; secrets are never in it)
GET  /metrics   Prometheus text, pgbouncer_exporter and CloudNativePG names (also
                alone on --metrics-port, if given: see metrics_server.py)
GET  /pools     the pools API; /pools/<name> one entry
POST /pools     create a pool; PATCH /pools/<name> (size, mode, user), DELETE
                /pools/<name> (bearer token required; sidecar/pool_writes.py)

State-changing endpoints need `Authorization: Bearer <token>`; with no token
configured they are refused, never open.
"""
from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any, Callable

from flask import Flask, Response, g, jsonify, request
from prometheus_client import CollectorRegistry

from pooler import logs
from pooler.config.converters import ConfigError, host_list
from pooler.config.load import check_config_file, load_config
from pooler.wire.reach import connect_probe

from . import httperrors, pool_writes, pools
from . import status as status_page
from .console import Console, ConsoleError
from .metrics_server import create_metrics_app, metrics_registry, metrics_response
from .httperrors import Refusal
from .pool_writes import PoolWriter
from .settings import Settings, from_args, parser

log = logging.getLogger("sidecar")
access = logging.getLogger("sidecar.access")
audit = logging.getLogger("sidecar.audit")      # who changed what, from where
QUIET_PATHS = frozenset(("/healthz", "/livez", "/readyz", "/metrics", "/status"))  # polled

# A database name as a PAUSE/RESUME argument: quoted by us, so only '"' needs care.
_DB_RE = re.compile(r"[^\x00\"]{1,63}")
# SHOW CONFIG never lists a secret; refuse to relay one even if a future key did.
_SECRET_KEY_RE = re.compile(r"password|secret|token", re.I)
MAX_COMMAND_TIMEOUT = 120       # ?timeout= on /pause, /resume, /reload
MAX_BODY = 64 * 1024


def create_app(settings: Settings, console: Console | None = None,
               registry: CollectorRegistry | None = None) -> Flask:
    app = Flask("sidecar")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY     # a pools request is a few fields
    console = console or Console(settings.target)
    registry = registry or metrics_registry(console, settings.legacy_metrics)
    last_good = {"cfg": None}   # the pools API keeps serving if the file turns invalid
    httperrors.install(app)
    _install_access_log(app)

    def current_config() -> Any:
        try:
            last_good["cfg"] = load_config(settings.config_path)
        except ConfigError as e:
            if last_good["cfg"] is None:
                raise
            log.warning("config file invalid, using the last valid one: %s", e.errors[0])
        return last_good["cfg"]

    @app.get("/")
    def index() -> Response:
        # A browser gets the status page; curl and programs (*/* or JSON) the endpoints.
        if request.accept_mimetypes.best_match(["application/json", "text/html"]) == "text/html":
            return Response(status_page.page(), mimetype="text/html")
        return jsonify(endpoints=["/", "/status", "/healthz", "/readyz", "/config", "/metrics",
                                  "/pools", "POST /pause", "POST /resume", "POST /reload"])

    @app.get("/status")
    def status() -> tuple[Response, int]:
        try:
            return jsonify(status_page.status(console)), 200
        except ConsoleError as e:
            return _unavailable(e)

    @app.get("/healthz")
    def healthz() -> tuple[Response, int]:
        try:
            rows = console.show("VERSION")
        except ConsoleError as e:
            return _unavailable(e)
        return jsonify(status="ok", version=rows[0]["version"] if rows else None), 200

    @app.get("/livez")
    def livez() -> tuple[Response, int]:
        return jsonify(status="ok"), 200

    @app.get("/readyz")
    def readyz() -> tuple[Response, int]:
        # Ready = clients can be served: the pooler accepts connections and reaches
        # PostgreSQL. The admin login is not required (a hashed admin secret must not
        # take the pod out of the Service); when it works, SUSPEND makes unready.
        target = settings.target
        if not _tcp_ok(target.host, target.port, target.timeout):
            return jsonify(status="unavailable",
                           reason=f"pooler not accepting on {target.host}:{target.port}"), 503
        try:
            backends = _backends(current_config())
        except ConfigError:
            backends = []
        if backends and not any(_tcp_ok(h, p, target.timeout) for h, p in backends):
            return jsonify(status="unavailable", reason="no PostgreSQL server reachable: " +
                           ", ".join(f"{h}:{p}" for h, p in backends)), 503
        try:
            data = console.show_many(["STATE", "DATABASES"])
        except ConsoleError as e:
            return jsonify(status="ok", console=f"unavailable: {e}"), 200
        state = {r["key"]: r["value"] for r in data["STATE"]}
        if state.get("suspended") == "yes":
            return jsonify(status="unavailable", reason="pooler is suspended"), 503
        # Paused (all or one database): clients queue until RESUME, so stay in the Service.
        paused_dbs = [d["name"] for d in data["DATABASES"] if d.get("paused")]
        return jsonify(status="ok", paused=state.get("paused") == "yes",
                       paused_databases=paused_dbs), 200

    @app.get("/drain")
    def drain() -> tuple[Response, int]:
        try:
            seconds = float(request.args.get("seconds", "5"))
        except ValueError:
            seconds = -1.0
        if not 0 <= seconds <= 120:
            return jsonify(status="invalid", reason="seconds must be a number from 0 to 120"), 400
        time.sleep(seconds)     # cooperative under gevent
        return jsonify(status="ok", waited=seconds), 200

    @app.post("/pause")
    @_needs_token(settings)
    def pause() -> tuple[Response, int]:
        return _run_command(console, "PAUSE", request.args.get("db"), _timeout_arg(settings))

    @app.post("/resume")
    @_needs_token(settings)
    def resume() -> tuple[Response, int]:
        return _run_command(console, "RESUME", request.args.get("db"), _timeout_arg(settings))

    @app.post("/reload")
    @_needs_token(settings)
    def reload() -> tuple[Response, int]:
        timeout = _timeout_arg(settings)
        # Validate first: an invalid file must not even be offered to the pooler.
        errors = check_config_file(settings.config_path)
        if errors:
            return jsonify(status="invalid", config=settings.config_path, errors=errors), 400
        return _run_command(console, "RELOAD", None, timeout)

    @app.get("/config")
    def config() -> tuple[Response, int]:
        try:
            rows = console.show("CONFIG")
        except ConsoleError as e:
            return _unavailable(e)
        settings_out = {r["key"]: {"value": r["value"], "default": r.get("default"),
                                   "changeable": r.get("changeable") == "yes"}
                        for r in rows if not _SECRET_KEY_RE.search(r["key"])}
        return jsonify(config=settings_out), 200

    @app.get("/metrics")
    def metrics() -> Response:
        return metrics_response(registry)

    @app.get("/pools")
    def pool_list() -> tuple[Response, int]:
        result = _pools(console, settings, current_config)
        if isinstance(result, tuple):
            return result
        return jsonify(pools=result), 200

    @app.get("/pools/<name>")
    def pool_one(name: str) -> tuple[Response, int]:
        result = _pools(console, settings, current_config)
        if isinstance(result, tuple):
            return result
        for entry in result:
            if entry["name"] == name:
                return jsonify(entry), 200
        return jsonify(status="not found", reason=f"no pool or database named {name!r}"), 404

    writer = PoolWriter(settings.config_path, console, settings.command_timeout)

    @app.post("/pools")
    @_needs_token(settings)
    def pool_create() -> tuple[Response, int]:
        req = pool_writes.create_request(_json_body())
        warnings = writer.create(req)
        _audit("created", req["name"], req)
        return pool_one_or_saved(req["name"], 201, warnings)

    @app.patch("/pools/<name>")
    @_needs_token(settings)
    def pool_update(name: str) -> tuple[Response, int]:
        changes = pool_writes.patch_request(_json_body())
        warnings = writer.update(name, changes)
        _audit("changed", name, changes)
        return pool_one_or_saved(name, 200, warnings)

    @app.delete("/pools/<name>")
    @_needs_token(settings)
    def pool_delete(name: str) -> tuple[Response, int]:
        writer.delete(name)
        _audit("deleted", name, {})
        return jsonify(status="deleted", name=name), 200

    def pool_one_or_saved(name: str, code: int, warnings: list[str]) -> tuple[Response, int]:
        resp, status = pool_one(name)
        if status != 200:       # saved and reloaded, but the console cannot show it now
            return jsonify(status="saved", name=name, warnings=warnings), code
        if warnings:
            resp = jsonify({**resp.get_json(), "warnings": warnings})
        return resp, code

    return app


# ----------------------------------------------------------------------------- helpers


def _json_body() -> Any:
    """The request's JSON (whatever its Content-Type); 400 if it is not JSON."""
    body = request.get_json(force=True, silent=True)
    if body is None:
        raise Refusal(400, "the body must be a JSON object", field="body")
    return body


def _audit(verb: str, name: str, what: dict) -> None:
    audit.info("pool %r %s by %s: %s", name, verb, request.remote_addr,
               ", ".join(f"{k}={v}" for k, v in sorted(what.items())) or "-",
               extra={"fields": {"event": "audit", "action": f"pool {verb}", "pool": name,
                                 "changes": what, "remote_addr": request.remote_addr}})


def _install_access_log(app: Flask) -> None:
    """One line per request (JSON fields with log_format: json). Probes and scrapes
    are logged at DEBUG: a kubelet asks every few seconds."""
    @app.before_request
    def started() -> None:
        g.t0 = time.monotonic()

    @app.after_request
    def done(resp: Response) -> Response:
        ms = round((time.monotonic() - g.get("t0", time.monotonic())) * 1000, 1)
        level = logging.DEBUG if request.path in QUIET_PATHS else logging.INFO
        access.log(level, "%s %s %d %s %.1f ms", request.method, request.path, resp.status_code,
                   request.remote_addr, ms,
                   extra={"fields": {"event": "access", "method": request.method,
                                     "path": request.path, "status": resp.status_code,
                                     "remote_addr": request.remote_addr, "duration_ms": ms}})
        return resp


def _needs_token(settings: Settings) -> Callable:
    """403 when no token is configured (never open by default), 401 without a bearer
    token, 403 with a wrong one (it was offered and is refused: asking again won't help)."""
    def wrap(view: Callable) -> Callable:
        def guarded(*args: Any, **kwargs: Any) -> Any:
            if settings.current_token() is None:
                return jsonify(status="forbidden",
                               reason="no token configured: state-changing endpoints are disabled"), 403
            offered = _offered_token()
            if offered is None:
                resp = jsonify(status="unauthorized", reason="a bearer token is required")
                resp.headers["WWW-Authenticate"] = 'Bearer realm="pooler-sidecar"'
                return resp, 401
            if not settings.token_matches(offered):
                log.warning("refused %s %s from %s: wrong bearer token", request.method,
                            request.path, request.remote_addr)
                return jsonify(status="forbidden", reason="the bearer token is not valid"), 403
            return view(*args, **kwargs)
        guarded.__name__ = view.__name__
        return guarded
    return wrap


def _offered_token() -> str | None:
    scheme, _, offered = request.headers.get("Authorization", "").partition(" ")
    return offered.strip() if scheme.lower() == "bearer" and offered.strip() else None


def _authorized(settings: Settings) -> bool:
    offered = _offered_token()
    return offered is not None and settings.token_matches(offered)


def _timeout_arg(settings: Settings) -> float:
    """?timeout=N (seconds, 0 < N <= MAX_COMMAND_TIMEOUT): how long this request waits
    for its command; --command-timeout without it."""
    text = request.args.get("timeout")
    if text is None:
        return settings.command_timeout
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= MAX_COMMAND_TIMEOUT:        # also refuses nan
        raise Refusal(400, f"a number of seconds, more than 0 and at most {MAX_COMMAND_TIMEOUT}",
                      field="timeout")
    return value


def _run_command(console: Console, verb: str, db: str | None,
                 timeout: float) -> tuple[Response, int]:
    if db is not None and not _DB_RE.fullmatch(db):
        return jsonify(status="invalid", reason="db must be 1 to 63 characters without '\"'"), 400
    sql = f'{verb} "{db}"' if db else verb
    try:
        tag = console.command(sql, timeout=timeout)
    except ConsoleError as e:
        if e.timed_out and verb == "PAUSE":
            # The pooler keeps pausing (it waits for running transactions to end);
            # only our wait was cut short. RESUME cancels it.
            return jsonify(status="pending", command=verb, database=db,
                           reason=f"{e}; the pause stays in effect, POST /resume cancels it"), 504
        if e.timed_out:
            return jsonify(status="timeout", command=verb, database=db, reason=str(e)), 504
        if e.sqlstate is None:
            return _unavailable(e)
        # The console refused it (already paused, unknown database, not an admin...).
        code = 403 if e.sqlstate == "42501" else 404 if e.sqlstate == "3D000" else \
            400 if e.sqlstate == "F0000" else 409
        return jsonify(status="refused", sqlstate=e.sqlstate, reason=str(e), detail=e.detail), code
    audit.info("%s done (requested from %s)", sql, request.remote_addr,
               extra={"fields": {"event": "audit", "action": verb.lower(), "database": db,
                                 "remote_addr": request.remote_addr}})
    return jsonify(status="ok", command=tag, database=db), 200


def _pools(console: Console, settings: Settings,
           current_config: Callable[[], Any]) -> list[dict] | tuple[Response, int]:
    try:
        cfg = current_config()
    except ConfigError as e:
        return jsonify(status="invalid", errors=e.errors), 500
    try:
        live = console.show("POOLS")
    except ConsoleError as e:
        return _unavailable(e)
    reveal = _authorized(settings)
    at = pools.endpoint(cfg, settings.public_host, settings.public_port, settings.client_ca_file)
    return [pools.with_connection(pools.with_counts(entry, live), cfg, at, reveal)
            for entry in pools.entries(cfg)]


def _tcp_ok(host: str, port: int, timeout: float) -> bool:
    """True if a connection to host:port (or a Unix socket directory) succeeds."""
    try:
        connect_probe(host, port, timeout)
        return True
    except OSError:
        return False


def _backends(cfg: Any) -> list[tuple[str, int]]:
    """The distinct PostgreSQL servers the config's database entries name."""
    return sorted({addr for d in cfg.databases.values() if d.host
                   for addr in host_list(d.host, d.port)})


def _unavailable(e: ConsoleError) -> tuple[Response, int]:
    return jsonify(status="unavailable", reason=f"admin console: {e}"), 503


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # Patch before the server or any connection exists; psycogreen makes psycopg2
    # wait through gevent, so a slow console blocks one request, not the process.
    from gevent import monkey
    monkey.patch_all()
    from psycogreen.gevent import patch_psycopg
    patch_psycopg()
    from gevent.pywsgi import WSGIServer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        settings = from_args(args)
    except ConfigError as e:
        print(f"pooler-sidecar: invalid pooler config {args.config}:", *e.errors, sep="\n  ",
              file=sys.stderr)
        return 2
    logs.setup(settings.log_format)       # as the pooler logs: text or JSON lines
    if settings.current_token() is None:
        log.warning("no token configured: /pause, /resume and /reload are disabled")
    console = Console(settings.target)
    registry = metrics_registry(console, settings.legacy_metrics)
    app = create_app(settings, console, registry)
    if args.paused_file:
        import gevent
        from .desired import DesiredPause
        gevent.spawn(DesiredPause(console, args.paused_file, settings.command_timeout).run)
    if args.metrics_port == args.port:
        print("pooler-sidecar: --metrics-port must differ from --port", file=sys.stderr)
        return 2
    if args.metrics_port:
        WSGIServer((args.host, args.metrics_port), create_metrics_app(registry), log=None,
                   error_log=log).start()
        log.info("metrics only on http://%s:%d/metrics", args.host, args.metrics_port)
    server = WSGIServer((args.host, args.port), app, log=None, error_log=log)
    log.info("pooler-sidecar on http://%s:%d/ (admin console %s@%s:%d)", args.host, args.port,
             settings.target.user, settings.target.host, settings.target.port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
