"""Structured outputs: `response_format` (chat) and `text.format` (responses) as the llguidance
grammar a worker constrains decoding with (model/grammar.py), checked before anything is queued.

A schema may use only the keywords below (llguidance implements them faithfully); anything else
is a 400 naming `response_format`, never silently ignored.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import llguidance

from api import errors

# What a schema may say, beyond annotations. README "Structured outputs" lists them.
SUPPORTED_KEYWORDS = frozenset(
    {
        "type", "properties", "required", "additionalProperties", "enum", "const", "items",
        "prefixItems", "minItems", "maxItems", "anyOf", "oneOf", "allOf", "$ref", "$defs",
        "definitions", "format", "pattern", "minLength", "maxLength", "minimum", "maximum",
        "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minProperties", "maxProperties",
    }
)  # fmt: skip
ANNOTATIONS = frozenset(
    {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
     "readOnly", "writeOnly", "strict"}
)  # fmt: skip
# Keywords whose value is a map of names to schemas, or a schema, or a list of schemas.
_SCHEMA_MAPS = ("properties", "$defs", "definitions")
_SCHEMA_VALUES = ("items", "additionalProperties")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
# Compact JSON, as OpenAI's structured outputs: flexible whitespace lets a small model pad an
# object with newlines until it runs out of tokens.
_COMPILE_OPTIONS: dict[str, Any] = {"whitespace_flexible": False}


def _refuse(message: str, param: str) -> errors.InvalidRequest:
    return errors.InvalidRequest(message, param=param, code="invalid_value")


def check_schema(schema: Any, param: str) -> None:
    """Every keyword supported, everywhere in the schema (iteratively: nesting is bounded by the
    body's own depth limit)."""
    stack: list[tuple[Any, str]] = [(schema, "schema")]
    while stack:
        node, where = stack.pop()
        if isinstance(node, bool):
            continue  # `true` / `false` are schemas too
        if not isinstance(node, dict):
            raise _refuse(f"The schema at '{where}' must be an object.", param)
        for key, value in node.items():
            if key in ANNOTATIONS:
                continue
            if key not in SUPPORTED_KEYWORDS:
                raise _refuse(f"The schema keyword '{key}' (at '{where}') is not supported.", param)
            if key in _SCHEMA_MAPS and isinstance(value, dict):
                stack += [(v, f"{where}.{key}.{k}") for k, v in value.items()]
            elif key in _SCHEMA_VALUES and isinstance(value, dict | bool):
                stack.append((value, f"{where}.{key}"))
            elif key in _SCHEMA_LISTS and isinstance(value, list):
                stack += [(v, f"{where}.{key}[{i}]") for i, v in enumerate(value)]


def closed(schema: Any) -> Any:
    """A copy of the schema in which every object that lists its `properties` and says nothing of
    others allows no others (`additionalProperties: false`), as xgrammar's strict mode, and so
    vLLM, constrain by default. Every output still validates against the schema as given; what
    changes is that a model cannot pad an object with keys of its own until its tokens run out
    (SmolLM2 did, on a Pydantic model as LangChain sends it). Conservative: a schema in which
    anything combines with other schemas on one object (`allOf` anywhere, or `properties` beside
    `anyOf`/`oneOf`/`$ref`) is left as it is, as is an object that requires, or needs more, keys
    than it lists. A schema that wants other keys says `additionalProperties: true`."""
    copy = json.loads(json.dumps(schema))
    nodes = _nodes(copy)
    if any(isinstance(n.get("allOf"), list) or _combines(n) for n in nodes):
        return copy
    stack: list[Any] = [copy]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            continue
        props = node.get("properties")
        if isinstance(props, dict) and "additionalProperties" not in node and _fits(node, props):
            node["additionalProperties"] = False
        for key, value in node.items():
            if key in _SCHEMA_MAPS and isinstance(value, dict):
                stack += value.values()
            elif key in _SCHEMA_VALUES and isinstance(value, dict):
                stack.append(value)
            elif key in _SCHEMA_LISTS and isinstance(value, list):
                stack += value
    return copy


def _combines(node: dict[str, Any]) -> bool:
    """An object schema whose own properties meet those of other schemas on the same instance."""
    return isinstance(node.get("properties"), dict) and (
        "$ref" in node or any(isinstance(node.get(k), list) for k in ("anyOf", "oneOf"))
    )


def _fits(node: dict[str, Any], props: dict[str, Any]) -> bool:
    """Whether the listed properties alone can satisfy the object's required keys and minimum."""
    required = node.get("required", [])
    minimum = node.get("minProperties", 0)
    listed = isinstance(required, list) and all(isinstance(k, str) and k in props for k in required)
    return listed and (not isinstance(minimum, int) or minimum <= len(props))


def _nodes(value: Any) -> list[dict[str, Any]]:
    """Every JSON object anywhere in a value (iteratively)."""
    out: list[dict[str, Any]] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            out.append(item)
            stack += item.values()
        elif isinstance(item, list):
            stack += item
    return out


@lru_cache(maxsize=256)
def _grammar(schema_json: str, param: str) -> str:
    grammar: str = llguidance.LLMatcher.grammar_from_json_schema(schema_json, defaults=_COMPILE_OPTIONS)  # type: ignore[arg-type]
    if problem := llguidance.LLMatcher.validate_grammar(grammar):
        raise _refuse(f"The schema cannot be used: {problem[:300]}", param)
    return grammar


def grammar_for_schema(schema: Any, param: str) -> str:
    check_schema(schema, param)
    return _grammar(json.dumps(closed(schema), sort_keys=True, ensure_ascii=False), param)


def chat_grammar(response_format: dict[str, Any] | None) -> str | None:
    """The grammar for a chat completion's `response_format`, or None for plain text."""
    spec = (response_format or {}).get("json_schema")
    if (response_format or {}).get("type") == "json_schema" and (
        not isinstance(spec, dict) or not isinstance(spec.get("name"), str)
    ):
        raise _refuse("'response_format.json_schema' must be an object with a 'name'.", "response_format")
    return _format_grammar(response_format, spec if isinstance(spec, dict) else {}, "response_format")


def text_format_grammar(text_format: dict[str, Any] | None) -> str | None:
    """The grammar for a response's `text.format` (its json_schema is flat: name, schema, strict)."""
    fields = text_format or {}
    if fields.get("type") == "json_schema" and not isinstance(fields.get("name"), str):
        raise _refuse("'text.format' of type 'json_schema' needs a 'name'.", "text.format")
    return _format_grammar(text_format, fields, "text.format")


def _format_grammar(text_format: dict[str, Any] | None, named: dict[str, Any], param: str) -> str | None:
    """What both endpoints' format objects mean; `named` is where the json_schema's name and
    schema sit (nested in chat's `json_schema`, flat in a response's `text.format`)."""
    kind = (text_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return grammar_for_schema({"type": "object"}, param)
    if kind == "json_schema":
        return grammar_for_schema(named.get("schema", {"type": "object"}), param)
    raise _refuse(
        f"'{param}.type' must be 'text', 'json_object' or 'json_schema', not '{str(kind)[:40]}'.", param
    )
