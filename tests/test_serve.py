"""`phi3-onnx serve` against the real openai client: one server subprocess for the module."""

from __future__ import annotations

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import jsonschema
import openai
import pytest

from serve_helpers import start_server, stop_server

KEY = "test-key-123"
QUESTIONS = ["What does a compiler do?", "How do I join paths?", "What is a list?", "Explain os.walk.",
             "What is a generator?", "How do I sort a dict?", "What does zip do?", "Open a file."]
PERSON = {"type": "object", "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                         "tags": {"type": "array", "items": {"type": "string"}}, "kind": {"enum": ["a", "b"]}}}


@pytest.fixture(scope="module")
def server(pkg):
    proc, url = start_server(pkg, "--api-key", KEY, "--max-batch", "8")
    yield url
    assert stop_server(proc) == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


def ask(client, content, **kw):
    kw = {"temperature": 0, "max_tokens": 40, **kw}
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}], **kw)


def streamed(client, content, **kw):
    kw = {"temperature": 0, "max_tokens": 40, **kw}
    chunks = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                            stream=True, stream_options={"include_usage": True}, **kw)
    text, reason, usage = [], None, None
    for ch in chunks:
        if ch.usage:
            usage = ch.usage
        for c in ch.choices:
            text.append(c.delta.content or "")
            reason = c.finish_reason or reason
    return "".join(text), reason, usage


def test_models_and_health(client, server, pkg):
    assert [m.id for m in client.models.list().data] == [pkg.name]
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["max_batch"] == 8


def test_chat_greedy_equals_runtime_and_stream(client, model):
    r = ask(client, QUESTIONS[0])
    messages = [{"role": "user", "content": QUESTIONS[0]}]
    assert r.choices[0].message.content == model.generate(messages, max_new_tokens=40)
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == len(model.prompt_ids(messages))
    text, reason, usage = streamed(client, QUESTIONS[0])
    assert (text, reason) == (r.choices[0].message.content, "stop")
    assert usage.completion_tokens == r.usage.completion_tokens


def test_length_stop_strings_and_completions(client, model):
    r = ask(client, QUESTIONS[1], max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    full = ask(client, QUESTIONS[0]).choices[0].message.content
    word = full.split()[2]
    cut = ask(client, QUESTIONS[0], stop=[word])
    assert cut.choices[0].message.content == full[:full.index(word)] and cut.choices[0].finish_reason == "stop"
    c = client.completions.create(model="tiny", prompt="The committee reviewed the proposal and", temperature=0,
                                  max_tokens=12)
    assert c.choices[0].text == model.generate("The committee reviewed the proposal and", max_new_tokens=12)


def test_seeded_sampling_is_reproducible(client):
    a = ask(client, QUESTIONS[2], temperature=0.9, seed=7).choices[0].message.content
    b = ask(client, QUESTIONS[2], temperature=0.9, seed=7).choices[0].message.content
    assert a == b


@pytest.mark.parametrize("budget", [200, 40, 30, 22])
def test_json_schema_parses_and_validates(client, budget):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    r = ask(client, "Describe a person as JSON.", max_tokens=budget, response_format=fmt)
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens <= budget
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


def test_json_schema_too_small_budget_is_length(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    r = ask(client, "Describe a person as JSON.", max_tokens=8, response_format=fmt)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens <= 8


def test_json_object_streamed(client):
    text, reason, _ = streamed(client, "Give me JSON.", max_tokens=60, response_format={"type": "json_object"})
    assert reason == "stop" and isinstance(json.loads(text), dict)


def test_eight_concurrent_streams_equal_sequential_greedy(client):
    sequential = [ask(client, q).choices[0].message.content for q in QUESTIONS]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(lambda q: streamed(client, q)[0], QUESTIONS))
    assert concurrent == sequential


def test_disconnect_mid_stream_frees_the_slot(client, server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": QUESTIONS[3]}], "stream": True,
            "temperature": 0.8, "max_tokens": 3000, "stop": ["\x00never"]}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, headers=headers, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 10
    while httpx.get(f"{server}/health").json()["active"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert httpx.get(f"{server}/health").json()["active"] == 0
    assert ask(client, QUESTIONS[0]).choices[0].finish_reason == "stop"


@pytest.mark.parametrize("kw, param", [
    ({"messages": []}, "messages"),
    ({"temperature": -1}, "temperature"),
    ({"max_tokens": 10**6}, "max_tokens"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "a+"}}}},
     "response_format"),
    ({"n": 2}, "n"),
])
def test_bad_requests_are_400_with_error_json(server, kw, param):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, **kw}
    r = httpx.post(f"{server}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param and err["message"]


def test_malformed_and_oversized_bodies(server):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(f"{server}/v1/chat/completions", content=b"{not json", headers=headers)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(f"{server}/v1/chat/completions", content=b"x" * (2 << 20), headers=headers)
    assert r.status_code == 413 and "error" in r.json()
    r = httpx.post(f"{server}/v1/completions", json={"model": "t", "prompt": ["a", "b"]}, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.get(f"{server}/v1/nothing", headers=headers)
    assert r.status_code == 404 and "error" in r.json()


def test_auth(server):
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.get(f"{server}/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_sigterm_drains_in_flight_and_exits_0(pkg):
    proc, url = start_server(pkg)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    result: dict = {}

    def run():
        result["r"] = streamed(client, QUESTIONS[0], max_tokens=400, temperature=0.7, stop=["\x00never"])

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    t.join(timeout=60)
    assert proc.wait(timeout=60) == 0
    assert result["r"][1] in ("stop", "length")


def test_speculative_ngram_server_gives_the_same_greedy_answers(pkg, client):
    """`serve --speculative ngram`: every request drafts on its own Generator; greedy answers equal the
    batched server's, streamed or not, also four at once."""
    proc, url = start_server(pkg, "--speculative", "ngram", "--max-batch", "4")
    try:
        spec = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        prompts = [f"Repeat this: {q} {q}" for q in QUESTIONS[:4]]
        expected = [ask(client, q, max_tokens=48).choices[0].message.content for q in prompts]
        assert [ask(spec, q, max_tokens=48).choices[0].message.content for q in prompts] == expected
        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(lambda q: streamed(spec, q, max_tokens=48)[0], prompts)) == expected
    finally:
        assert stop_server(proc) == 0
