"""The sidecar's error answers: always JSON, never Flask's HTML pages.

`Refusal` is raised by request handling that finds a bad input or a state that
forbids the request; its answer names the field at fault (when there is one)
and why, so a client (or Terraform) can point at what to fix.
"""
from __future__ import annotations

import json
import logging

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

log = logging.getLogger("sidecar")

STATUS_WORDS = {400: "invalid", 403: "forbidden", 404: "not found", 409: "conflict",
                422: "invalid", 503: "unavailable", 504: "timeout"}


class Refusal(Exception):
    """An HTTP error answer: {"status", "field"?, "reason", **extra} with `code`."""

    def __init__(self, code: int, reason: str, field: str | None = None, **extra: object) -> None:
        super().__init__(reason)
        self.code, self.reason, self.field, self.extra = code, reason, field, extra

    def body(self) -> dict:
        out: dict = {"status": STATUS_WORDS.get(self.code, "error")}
        if self.field is not None:
            out["field"] = self.field
        out["reason"] = self.reason
        out.update(self.extra)
        return out


def install(app: Flask) -> None:
    """Every error answer of `app` is JSON: Refusals, Flask's own (404, 405, a bad
    body...) and a crash (logged with its traceback, answered without it)."""
    @app.errorhandler(Refusal)
    def refused(e: Refusal) -> tuple[Response, int]:
        if e.code != 404:
            log.info("refused %s %s from %s: %d %s", request.method, request.path,
                     request.remote_addr, e.code, e.reason)
        return jsonify(e.body()), e.code

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException) -> Response:
        resp = e.get_response()         # keeps the status and headers such as Allow
        resp.set_data(json.dumps({"status": (e.name or "error").lower(),
                                  "reason": e.description}))
        resp.content_type = "application/json"
        return resp

    @app.errorhandler(Exception)
    def crash(e: Exception) -> tuple[Response, int]:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return jsonify(status="error", reason=f"internal error: {type(e).__name__}"), 500
