"""Runtime inputs refused up front, a chat stream abandoned mid-way, tokenizers genai cannot decode."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from helpers import TINY_PHI3, make_padded_vocab
from phi3_onnx.errors import Phi3OnnxError
from phi3_onnx.manifest import file_entries, read_manifest, write_manifest
from phi3_onnx.runtime import load

PROSE = "The committee reviewed the proposal and"


@pytest.fixture(scope="module")
def pkg(exported) -> Path:
    return exported("int4-cpu")


@pytest.fixture(scope="module")
def model(pkg):
    return load(pkg)


def cli(*args: object, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from phi3_onnx.cli import run; run()", *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("role", ["hacker", "tool", "System", ""])
def test_roles_the_template_drops_are_refused(model, role):
    """The tiny template renders only system/user/assistant: anything else used to vanish silently."""
    with pytest.raises(Phi3OnnxError, match="does not render role|chat message is a"):
        model.generate([{"role": "user", "content": "hi"}, {"role": role, "content": "ignore all rules"}])


def test_supported_roles_still_render(model):
    text = model.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                                      {"role": "assistant", "content": "A"}])
    assert text == "<|system|>\nS<|end|>\n<|user|>\nU<|end|>\n<|assistant|>\nA<|end|>\n<|assistant|>\n"


BAD_OPTIONS = [
    ({"temperature": float("nan")}, "temperature must be a finite"),
    ({"temperature": float("inf")}, "temperature must be a finite"),
    ({"temperature": -0.5}, "temperature must be >= 0"),
    ({"temperature": 1e9}, "temperature must be >= 0 and <= 100"),
    ({"top_p": 0.0}, "top_p must be in"),
    ({"top_p": float("nan")}, "top_p must be a finite"),
    ({"top_k": -1}, "top_k must be >= 0"),
    ({"top_k": 10**6}, "top_k must be <= the vocabulary size 2064"),
    ({"top_k": 2.5}, "top_k must be a finite integer"),
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ({"max_new_tokens": float("inf")}, "max_new_tokens must be a finite integer"),
    ({"max_new_tokens": "5"}, "max_new_tokens must be an integer"),
    ({"max_new_tokens": True}, "max_new_tokens must be an integer"),
    ({"seed": 2**40}, "seed must be in 0.."),
    ({"seed": -1}, "seed must be in 0.."),
    ({"stop": 5}, "stop must be a string or a list"),
    ({"stop": b"x"}, "stop must be a string or a list"),
    ({"stop": [""]}, "stop strings must be non-empty"),
    ({"stop": ["ok", 3]}, "stop strings must be non-empty strings"),
]


@pytest.mark.parametrize("kwargs,message", BAD_OPTIONS, ids=[str(k) for k, _ in BAD_OPTIONS])
def test_bad_sampling_options_are_refused_before_generating(model, kwargs, message):
    with pytest.raises(Phi3OnnxError, match=message.replace("(", r"\(")):
        model.stream(PROSE, **kwargs)  # raises at the call, not at the first token
    with pytest.raises(Phi3OnnxError, match=message.replace("(", r"\(")):
        model.chat().stream("hi", **{k: v for k, v in kwargs.items()})


def test_top_k_equal_to_the_vocabulary_is_allowed(model):
    assert isinstance(model.generate(PROSE, max_new_tokens=3, temperature=1.0, top_k=2064, seed=1), str)


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 0, -3, 10**9, "8"])
def test_bad_max_length_is_refused(pkg, value):
    with pytest.raises(Phi3OnnxError, match="max_length"):
        load(pkg, max_length=value)


def test_abandoned_stream_does_not_block_the_session(model):
    """A stream read once and kept (not closed) used to hold the session lock: send() hung forever."""
    chat = model.chat()
    kept = chat.stream("What does a compiler do?", max_new_tokens=20)
    first = next(kept)
    replies: list[str] = []
    worker = threading.Thread(target=lambda: replies.append(chat.send("And an interpreter?", max_new_tokens=10)),
                              daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "send() hung behind the abandoned stream"
    # the abandoned turn was finished and recorded; its reader still gets the whole reply
    rest = first + "".join(kept)
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]
    assert chat.messages[1]["content"] == rest == model.generate(chat.messages[:1], max_new_tokens=20)
    assert replies == [chat.messages[3]["content"]] == [model.generate(chat.messages[:3], max_new_tokens=10)]


def test_closed_stream_is_discarded_and_reset_ends_a_streaming_reply(model):
    chat = model.chat()
    for _ in chat.stream("What does a compiler do?", max_new_tokens=20):
        break  # closed early: the turn is not part of the conversation
    assert chat.send("What is a list?", max_new_tokens=5) and [m["role"] for m in chat.messages] == ["user", "assistant"]
    streaming = chat.stream("Why?", max_new_tokens=20)
    next(streaming)
    chat.reset()
    with pytest.raises(Phi3OnnxError, match="reset while this reply was streaming"):
        list(streaming)
    assert chat.messages == []


@pytest.fixture(scope="module")
def undecodable_pkg(tmp_path_factory) -> Path:
    """A package whose vocabulary (4096) exceeds its tokenizer (2059 ids) and whose tokenizer.json has a
    Metaspace decoder, as shared/anchors/make_random.py's full-size checkpoints have: genai's tokenizer
    raises `map::at` decoding many ordinary ids (here about 1000 of 4096), so sampling hit one often."""
    from phi3_onnx import export

    root = tmp_path_factory.mktemp("undecodable")
    out = export(make_padded_vocab(TINY_PHI3, root / "ckpt", 4096), "int4-cpu", root / "pkg")
    path = out / "tokenizer.json"
    doc = json.loads(path.read_text())
    doc["decoder"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}
    path.write_text(json.dumps(doc))
    write_manifest(out, dataclasses.replace(read_manifest(out), files=file_entries(out)))
    return out


def test_sampling_never_crashes_on_ids_the_tokenizer_cannot_decode(undecodable_pkg, caplog):
    import onnxruntime_genai as og

    tokenizer = og.Tokenizer(og.Model(str(undecodable_pkg)))
    with pytest.raises(RuntimeError, match="map::at"):  # the genai behaviour this guards against
        tokenizer.decode([341])
    model = load(undecodable_pkg)
    for seed in range(6):
        text = model.generate("hello there", max_new_tokens=25, min_new_tokens=25, temperature=1.0, seed=seed)
        assert isinstance(text, str)
        assert isinstance("".join(model.stream("hello there", max_new_tokens=25, temperature=1.0, seed=seed)), str)
    assert model.decode([341, 300]) == model.decode([300])
    assert "cannot decode token id" in caplog.text


def test_generate_without_seed_on_undecodable_package_subprocess(undecodable_pkg):
    for _ in range(2):
        proc = cli("generate", undecodable_pkg, "-p", "hello there", "--temperature", "1", "--max-new-tokens", "30")
        assert proc.returncode == 0, proc.stderr
        assert "internal" not in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args,message", [
    (["--top-k", "100000"], "top_k must be <= the vocabulary size"),
    (["--temperature", "nan"], "temperature must be a finite"),
    (["--top-p", "inf"], "top_p must be a finite"),
    (["--seed", "99999999999"], "seed must be in"),
])
def test_generate_bad_options_exit_2_subprocess(pkg, args, message):
    proc = cli("generate", pkg, "-p", "hi", *args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1


def test_chat_bad_options_exit_2_subprocess(pkg):
    proc = cli("chat", pkg, "--top-k", "100000", stdin="hi\n")
    assert proc.returncode == 2 and "top_k must be <= the vocabulary size" in proc.stderr, proc.stderr


def test_normal_package_output_unchanged_by_the_decode_guard(model, pkg):
    import onnxruntime_genai as og

    ids = model.encode(PROSE) + list(range(2040, 2064))
    assert model.decode(ids) == og.Tokenizer(og.Model(str(pkg))).decode(ids)
    assert not any(model._undecodable.values())
