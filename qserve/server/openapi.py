"""``/openapi.json``: FastAPI's schema of the routes, plus the request bodies, which FastAPI cannot see.

The handlers read and validate their bodies themselves (so every error is OpenAI-shaped, never FastAPI's
422), so each POST's ``requestBody`` is added here from the same pydantic models that validate it, and
every operation documents the OpenAI error body under its error statuses.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

REF = "#/components/schemas/{model}"
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
ERROR_STATUSES = {
    "400": "Invalid request",
    "401": "Missing or wrong API key",
    "404": "Unknown model or path",
    "413": "Request body or prompt too long",
    "429": "Queue full (see Retry-After)",
    "500": "Engine error",
    "503": "Draining or engine not running",
}


def install_openapi(app: FastAPI, bodies: dict[str, type[BaseModel]]) -> None:
    """Make ``app.openapi()`` (served at app.openapi_url) document ``bodies``: POST path -> body model."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        _, defs = models_json_schema([(m, "validation") for m in bodies.values()], ref_template=REF)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(defs.get("$defs", {}))
        components["Error"] = ERROR_SCHEMA
        error_ref = {"$ref": REF.format(model="Error")}
        for path, ops in schema.get("paths", {}).items():
            for method, op in ops.items():
                if method == "post" and path in bodies:
                    body = {"$ref": REF.format(model=bodies[path].__name__)}
                    op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
                responses = op.setdefault("responses", {})
                responses.pop("422", None)  # FastAPI's validation error: never answered here
                for status, text in ERROR_STATUSES.items():
                    responses.setdefault(
                        status, {"description": text, "content": {"application/json": {"schema": error_ref}}}
                    )
        schema["components"].get("schemas", {}).pop("HTTPValidationError", None)
        schema["components"].get("schemas", {}).pop("ValidationError", None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
