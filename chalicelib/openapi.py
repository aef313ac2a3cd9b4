"""Builds the OpenAPI 3.1 document from the route table that app.py registers."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema


@dataclass(frozen=True)
class RouteSpec:
    path: str
    method: str
    summary: str
    permission: str | None  # None: no token needed
    body: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    status: int = 200
    query: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        }
    },
}


def _success(r: RouteSpec, refs: dict[Any, Any]) -> dict[str, Any]:
    if r.status == 204:
        return {"description": "No Content"}
    schema = refs[(r.response, "serialization")] if r.response else {}
    return {"description": "OK", "content": {"application/json": {"schema": schema}}}


def build_document(routes: list[RouteSpec], version: str) -> dict[str, Any]:
    models = {m for r in routes for m in (r.body, r.response) if m is not None}
    keyed: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = [
        (m, "validation" if any(r.body is m for r in routes) else "serialization") for m in models
    ]
    refs, defs = models_json_schema(keyed, ref_template="#/components/schemas/{model}")
    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        params = [
            {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
            for p in re.findall(r"{(\w+)}", r.path)
        ] + [{"name": q, "in": "query", "required": False, "schema": {"type": "string"}, "description": d}
             for q, d in r.query.items()] + [
            {"name": h, "in": "header", "required": False, "schema": {"type": "string"}, "description": d}
            for h, d in r.headers.items()]
        op: dict[str, Any] = {
            "summary": r.summary,
            "operationId": f"{r.method.lower()}_{re.sub(r'[^a-z0-9]+', '_', r.path.lower()).strip('_') or 'root'}",
            "parameters": params,
            "responses": {
                str(r.status): _success(r, refs),
                "default": {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
            },
        }
        if r.permission:
            op["security"] = [{"bearer": []}]
            op["description"] = f"Needs a token whose role has the `{r.permission}` permission."
        if r.body:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": refs[(r.body, "validation")]}},
            }
        paths.setdefault(r.path, {})[r.method.lower()] = op
    schemas = dict(defs.get("$defs", {}))
    schemas["Error"] = ERROR_SCHEMA
    return {
        "openapi": "3.1.0",
        "info": {"title": "dagcast control API", "version": version},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
