"""runtime.structured: budget-bounded JSON grammars, and model.generate(json_schema=...)."""

from __future__ import annotations

import json

import jsonschema
import pytest

from phi3_onnx.runtime import load
from phi3_onnx.runtime.structured import Bounds, SchemaError, budget_grammar, max_bytes, min_bytes, parse_schema

SCHEMA = {"type": "object", "required": ["name", "n"],
          "properties": {"name": {"type": "string", "maxLength": 40}, "n": {"type": "number"},
                         "ok": {"type": "boolean"}, "xs": {"type": "array", "items": {"type": "integer"}, "minItems": 1},
                         "tag": {"anyOf": [{"const": "x"}, {"type": "null"}]}}}
MSG = [{"role": "user", "content": "Describe it as JSON."}]


@pytest.fixture(scope="module")
def model(exported):
    return load(exported("int4-cpu"))


@pytest.mark.parametrize("budget", [20, 50, 100, 400, 3000])
def test_longest_answer_fits_the_budget(budget):
    node = parse_schema(SCHEMA)
    bounded = budget_grammar(node, budget)
    assert bounded is not None and bounded[1] <= budget
    assert min_bytes(node) <= max_bytes(node, Bounds(0))


def test_no_grammar_when_the_shortest_answer_is_too_long():
    assert budget_grammar(parse_schema(SCHEMA), min_bytes(parse_schema(SCHEMA)) - 1) is None


@pytest.mark.parametrize("schema", [{"type": "string", "pattern": "a"}, {"$ref": "#/x"}, {"type": "wat"},
                                    {"type": "object", "properties": {}, "required": ["x"]}, {"enum": []}])
def test_unsupported_or_bad_schemas_are_refused(schema):
    with pytest.raises(SchemaError):
        parse_schema(schema)


@pytest.mark.parametrize("budget", [16, 25, 40, 80, 300])
def test_generate_json_schema_completes_or_reports(model, budget):
    text = model.generate(MSG, max_new_tokens=budget, json_schema=SCHEMA)
    ids = model.prompt_ids(MSG)
    from phi3_onnx.runtime.options import GenerationOptions

    plan = model.json_plan(GenerationOptions.build(budget, 0, 1, 0, None, None, json_schema=SCHEMA), len(ids))
    if plan.mode == "length":
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)
    else:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert plan.mode == ("grammar" if budget >= 25 else plan.mode)


def test_generate_json_object_and_stream(model):
    assert isinstance(json.loads(model.generate(MSG, max_new_tokens=50, json_schema={"type": "object"})), dict)
    pieces = "".join(model.stream(MSG, max_new_tokens=50, json_schema={"type": "object"}))
    assert pieces == model.generate(MSG, max_new_tokens=50, json_schema={"type": "object"})
