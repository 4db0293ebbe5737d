"""Structured outputs on both engines (model/grammar.py): under sampled decoding the output always
follows its schema, with the real 128k Llama-3 tokenizer and Cyrillic text, and a model that
already writes valid JSON costs no mask at all."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import jsonschema
import pytest

from api.serving import structured
from model.engine import Engine
from model.types import ChatMessage, Completion, SamplingParams, TextDelta
from tests.unit.conftest import Script

MESSAGES = [ChatMessage("user", "Ответь в JSON.")]

SCHEMAS: dict[str, dict[str, Any]] = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "city": {"enum": ["Москва", "Санкт-Петербург", "Казань"]},
        },
        "required": ["name", "age", "city"],
        "additionalProperties": False,
    },
    "flags": {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 3},
    "either": {"anyOf": [{"const": "да"}, {"type": "integer", "minimum": -5, "maximum": 5}]},
    "ref": {
        "$defs": {
            "slot": {
                "type": "object",
                "properties": {"день": {"enum": ["пн", "вт"]}},
                "required": ["день"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {
            "slot": {"$ref": "#/$defs/slot"},
            "note": {"type": "string", "pattern": "^[а-я]{1,6}$"},
        },
        "required": ["slot", "note"],
        "additionalProperties": False,
    },
}


def generate(engine: Engine, sampling: SamplingParams) -> tuple[str, Completion]:
    text, end = "", None
    for event in engine.stream(engine.prepare(MESSAGES), sampling):
        if isinstance(event, TextDelta):
            text += event.text
        else:
            end = event
    assert isinstance(end, Completion)
    return text, end


@pytest.mark.parametrize("name", sorted(SCHEMAS))
@pytest.mark.parametrize("temperature", [1.0, 80.0], ids=["t1", "flat"])
def test_sampled_output_always_follows_the_schema(engine: Engine, name: str, temperature: float) -> None:
    schema = SCHEMAS[name]
    grammar = structured.grammar_for_schema(schema, "response_format")
    for seed in range(3):
        sampling = SamplingParams(
            max_tokens=120, temperature=temperature, top_p=1.0, seed=seed, grammar=grammar
        )
        text, end = generate(engine, sampling)
        # Every schema here is bounded, so each generation closes well within its budget.
        assert end.finish_reason == "stop", (text, end)
        jsonschema.validate(json.loads(text), schema)


def test_an_object_cut_by_max_tokens_ends_with_length(engine: Engine) -> None:
    # At least 50 characters cannot fit in 5 tokens: the object is cut, and says so.
    schema = {"type": "object", "properties": {"s": {"type": "string", "minLength": 50}}, "required": ["s"]}
    grammar = structured.grammar_for_schema(schema, "response_format")
    text, end = generate(engine, SamplingParams(max_tokens=5, temperature=80.0, seed=1, grammar=grammar))
    assert end.finish_reason == "length" and end.completion_tokens == 5
    assert text.startswith("{")


def test_a_model_already_writing_valid_json_costs_no_mask(
    scripted_engine: Callable[..., tuple[Engine, Script]],
) -> None:
    engine, _ = scripted_engine('{"city":"Казань","ok":true}')
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "ok": {"type": "boolean"}}}
    grammar = structured.grammar_for_schema(schema, "response_format")
    masks, compiled = engine.grammars.masks, engine.grammars.compiled
    text, end = generate(engine, SamplingParams(max_tokens=64, temperature=0.0, grammar=grammar))
    assert (text, end.finish_reason) == ('{"city":"Казань","ok":true}', "stop")
    assert engine.grammars.masks == masks  # every sampled token was accepted on the first check
    generate(engine, SamplingParams(max_tokens=64, temperature=0.0, grammar=grammar))
    assert engine.grammars.compiled <= compiled + 1  # the repeat was a cache hit


def test_an_unsupported_schema_keyword_is_refused_with_its_param() -> None:
    from api import errors

    with pytest.raises(errors.InvalidRequest) as refused:
        structured.chat_grammar({"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}})
    assert refused.value.param == "response_format" and "'not'" in refused.value.message


def test_objects_that_list_their_properties_are_closed_where_the_schema_is_silent() -> None:
    person = {"type": "object", "properties": {"name": {"type": "string"}}}
    schema = {
        "type": "object",
        "properties": {
            "author": person,
            "properties": {"type": "object", "properties": {"x": {"type": "integer"}}},  # a key so named
            "extra": {"type": "object", "properties": {}, "additionalProperties": True},
            "free": {"type": "object"},
            "items": {"type": "array", "items": person},
        },
        "$defs": {
            "a": {"type": "object", "properties": {"p": {"type": "integer"}}},
            "b": {"type": "object", "properties": {"q": {"type": "integer"}}},
            "c": {"type": "object", "properties": {"r": {"type": "integer"}}},
        },
    }
    before = json.dumps(schema)
    out = structured.closed(schema)
    assert json.dumps(schema) == before  # a copy; the request's schema is left as it was
    props = out["properties"]
    assert out["additionalProperties"] is False
    assert props["author"]["additionalProperties"] is False
    assert props["items"]["items"]["additionalProperties"] is False
    assert props["properties"]["additionalProperties"] is False
    assert set(props["properties"]) == {"type", "properties", "additionalProperties"}
    assert props["extra"]["additionalProperties"] is True  # said: kept
    assert "additionalProperties" not in props["free"]  # lists no properties: any object
    assert out["$defs"]["c"]["additionalProperties"] is False
    valid = {"author": {"name": "Лев"}, "free": {"any": 1}, "extra": {"k": 0}}
    jsonschema.validate(valid, out)
    jsonschema.validate(valid, schema)
    # An object requiring a key it does not list stays open (closed, nothing would be valid).
    needs = structured.closed({"type": "object", "properties": {"a": {}}, "required": ["a", "b"]})
    assert "additionalProperties" not in needs
    # Where schemas combine on one object (allOf anywhere), nothing is closed.
    combined = {"allOf": [{"$ref": "#/$defs/a"}, {"anyOf": [dog_like := {"properties": {"q": {}}}]}]}
    assert structured.closed({**combined, "$defs": {"a": {"properties": {"p": {}}}}}) == {
        **combined,
        "$defs": {"a": {"properties": {"p": {}}}},
    }
    assert "additionalProperties" not in dog_like


def test_alternatives_are_closed_but_not_what_combines_with_properties_beside_it() -> None:
    cat = {"type": "object", "properties": {"meow": {"type": "boolean"}}}
    dog = {"type": "object", "properties": {"bark": {"type": "boolean"}}}
    union = structured.closed({"anyOf": [cat, dog]})
    assert [m["additionalProperties"] for m in union["anyOf"]] == [False, False]
    # Properties beside an anyOf meet its members' on the same object: closing either side would
    # refuse the other's keys, so both stay as they are.
    beside = {"type": "object", "properties": {"name": {"type": "string"}}, "anyOf": [cat, dog]}
    out = structured.closed(beside)
    assert "additionalProperties" not in out and all("additionalProperties" not in m for m in out["anyOf"])
    jsonschema.validate({"name": "Барсик", "meow": True}, out)


def test_keys_a_schema_does_not_list_are_refused_where_it_is_silent() -> None:
    from transformers import AutoTokenizer

    from model.grammar import Grammars
    from tests.unit.conftest import llama3_tokenizer_path

    tokenizer = AutoTokenizer.from_pretrained(llama3_tokenizer_path())
    grammars = Grammars(tokenizer, frozenset({tokenizer.convert_tokens_to_ids("<|eot_id|>")}))
    # A Pydantic model's schema, as LangChain sends it: it says nothing of other keys.
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}

    def accepts(grammar: str, text: str) -> bool:
        constraint = grammars.constraint(grammar)
        return all(constraint.accept(t) for t in tokenizer.encode(text, add_special_tokens=False))

    padded = '{"city":"Казань","population_density_per_km":1000000}'
    closed = structured.grammar_for_schema(schema, "response_format")
    assert accepts(closed, '{"city":"Казань"}')
    assert not accepts(closed, padded)
    # The schema as given allows it: the closing is what refuses it.
    as_given = structured._grammar(json.dumps(schema, sort_keys=True), "response_format")
    assert accepts(as_given, padded)
