"""The runtime wrapper against references: a plain onnxruntime-genai loop and transformers."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import numpy as np
import onnxruntime_genai as og
import pytest

from phi3_onnx.errors import Phi3OnnxError
from phi3_onnx.runtime import load
from phi3_onnx.runtime.options import GenerationOptions

HELDOUT = Path(__file__).resolve().parent / "assets" / "corpus" / "heldout.txt"
PROSE = "The committee reviewed the proposal and"
QUESTION = [{"role": "user", "content": "What does a compiler do?"}]


def plain_genai(path, ids, n, eos=None, **search):
    """Reference: the documented onnxruntime-genai loop, no wrapper; optionally another eos list."""
    config = og.Config(str(path))
    if eos is not None:
        config.overlay(json.dumps({"model": {"eos_token_id": eos}}))
    m = og.Model(config)
    params = og.GeneratorParams(m)
    params.set_search_options(max_length=len(ids) + n, **search)
    g = og.Generator(m, params)
    g.append_tokens(np.asarray(ids, dtype=np.int32))
    out = []
    while not g.is_done() and len(out) < n:
        g.generate_next_token()
        out.append(int(g.get_next_tokens()[0]))
    return out


def wrapper_ids(model, prompt, n, **opts):
    options = GenerationOptions(max_new_tokens=n, **opts)
    ids = model.prompt_ids(prompt)
    return list(model.token_ids(model.new_decoder(options, len(ids)), ids, options))


@pytest.mark.parametrize("prompt, min_new", [(PROSE, 0), (QUESTION, 0), (PROSE, 30)])
def test_greedy_matches_plain_genai_loop(model, pkg, prompt, min_new):
    ids = model.prompt_ids(prompt)
    ref = plain_genai(pkg, ids, 40, do_sample=False, **({"min_length": len(ids) + min_new} if min_new else {}))
    ref = ref[:-1] if ref[-1] in model.stop_token_ids else ref
    assert len(ref) >= max(min_new, 2)
    assert wrapper_ids(model, prompt, 40, min_new_tokens=min_new) == ref
    text = og.Tokenizer(og.Model(str(pkg))).decode(ref)  # less the tokenizer's marker space after <|assistant|>
    assert model.generate(prompt, max_new_tokens=40, min_new_tokens=min_new) == (text[1:] if model.marker_space(ids) else text)


def test_seeded_sampling_matches_plain_genai_loop(model, pkg):
    ids = model.encode(PROSE)
    ref = plain_genai(pkg, ids, 20, do_sample=True, temperature=0.9, top_p=0.95, top_k=model.manifest.model.vocab_size,
                      random_seed=7)
    ref = ref[:-1] if ref[-1] in model.stop_token_ids else ref
    assert wrapper_ids(model, PROSE, 20, temperature=0.9, top_p=0.95, seed=7) == ref


def test_chat_stops_at_end_token(model, pkg):
    """The reference runs on past <|end|> (eos = <|endoftext|> only); the wrapper stops right there."""
    end, eot = model.encode("<|end|>"), model.encode("<|endoftext|>")
    assert len(end) == 1 and len(eot) == 1
    prompt = model.prompt_ids(QUESTION)
    assert model.decode(prompt) == model.decode(model.encode("<|user|>\nWhat does a compiler do?<|end|>\n<|assistant|>\n"))
    ref = plain_genai(pkg, prompt, 120, eos=eot[0], do_sample=False)
    assert end[0] in ref, "the tiny chat model should end its reply with <|end|>"
    cut = ref.index(end[0])
    assert cut >= 2 and len(ref) > cut + 1  # a real reply, and the reference really runs past it
    got = wrapper_ids(model, QUESTION, 120)
    assert got == ref[:cut]
    text = model.generate(QUESTION, max_new_tokens=120)
    assert text == model.completion_text(prompt, ref[:cut]) and "<|" not in text


def test_stream_equals_generate(model):
    for prompt, opts in ((PROSE, {"min_new_tokens": 30}), (QUESTION, {}), (PROSE, {"temperature": 0.8, "seed": 3, "top_k": 40})):
        whole = model.generate(prompt, max_new_tokens=40, **opts)
        pieces = list(model.stream(prompt, max_new_tokens=40, **opts))
        assert len(pieces) >= 2 and "".join(pieces) == whole


def test_stop_strings(model):
    full = model.generate(PROSE, max_new_tokens=40, min_new_tokens=30)
    words = full.split()
    assert len(words) >= 6
    stop = " " + words[4]
    expected = full[: full.index(stop)]
    assert model.generate(PROSE, max_new_tokens=40, min_new_tokens=30, stop=stop) == expected
    assert "".join(model.stream(PROSE, max_new_tokens=40, min_new_tokens=30, stop=[stop, "zzzz"])) == expected


def test_max_length_bounds_generation_and_prompt(pkg, model):
    assert model.max_length == json.loads((pkg / "manifest.json").read_text())["max_length"] <= 4096
    n = len(model.encode(PROSE))
    short = load(pkg, max_length=n + 5)
    assert wrapper_ids(short, PROSE, 50) == wrapper_ids(model, PROSE, 50)[:5]
    with pytest.raises(Phi3OnnxError, match=r"loaded with max_length=\d+"):
        load(pkg, max_length=n).generate(PROSE)
    with pytest.raises(Phi3OnnxError, match="max_length must be in 1.."):
        load(pkg, max_length=model.context_length + 1)


def test_prompt_over_context(model):
    long = "word " * (model.context_length + 10)
    with pytest.raises(Phi3OnnxError, match=r"model's context is \d+"):
        model.generate(long)


def test_multi_turn_chat_reuses_cache_and_matches_fresh_generation(model, pkg):
    chat = model.chat(system="You are terse.")
    first = chat.send("What does a compiler do?", max_new_tokens=60)
    assert first and chat.reused_tokens == 0
    second = chat.send("And an interpreter?", max_new_tokens=60)
    prompt = model.prompt_ids(chat.messages[:-1])
    assert chat.reused_tokens > len(model.encode("You are terse. What does a compiler do?"))
    ref = plain_genai(pkg, prompt, 60, do_sample=False)
    ref = ref[:-1] if ref and ref[-1] in model.stop_token_ids else ref
    assert second == model.completion_text(prompt, ref)
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "user", "assistant"]


@pytest.mark.parametrize("cut", [{"max_new_tokens": 3}, {"stop": ["o"]}])
def test_chat_turn_cut_short_then_continued(model, pkg, cut):
    """A turn cut by max_new_tokens (last token pending) or a stop string (history diverges from
    the cached tokens: rewind) still continues exactly like a fresh generation over the history."""
    chat = model.chat()
    first = chat.send("What does a compiler do?", **{"max_new_tokens": 60, **cut})
    assert first and ("o" not in first if "stop" in cut else True)
    second = chat.send("Go on.", max_new_tokens=40)
    assert 0 < chat.reused_tokens < len(model.prompt_ids(chat.messages[:-1]))
    prompt = model.prompt_ids(chat.messages[:-1])
    ref = plain_genai(pkg, prompt, 40, do_sample=False)
    ref = ref[:-1] if ref and ref[-1] in model.stop_token_ids else ref
    assert second == model.completion_text(prompt, ref)


def test_threads_share_one_model(model):
    prompts = [PROSE, "A small village near the river", "The algorithm works by", QUESTION]
    expected = [model.generate(p, max_new_tokens=25, min_new_tokens=20) for p in prompts]
    results: dict[int, str] = {}

    def work(i: int) -> None:
        results[i] = model.generate(prompts[i % 4], max_new_tokens=25, min_new_tokens=20)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(8)] == expected * 2


def test_longrope_crossing_matches_transformers(exported, tiny_longrope_ckpt):
    """Greedy ids equal transformers generate() for 40 tokens crossing the original context (64)."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    model = load(exported("fp32-cpu", tiny_longrope_ckpt))
    orig = model.manifest.model.original_max_position_embeddings
    assert model.manifest.model.longrope is not None and orig == 64
    ids = model.encode(HELDOUT.read_text(encoding="utf-8")[:1000])[:44]
    assert len(ids) == 44
    hf = AutoModelForCausalLM.from_pretrained(tiny_longrope_ckpt, dtype=torch.float32)
    # min_new_tokens: the tiny model ends its short documents early; both sides suppress the end tokens alike
    out = hf.generate(torch.tensor([ids]), max_new_tokens=40, min_new_tokens=40, do_sample=False)
    expected = out[0, len(ids):].tolist()
    options = GenerationOptions(max_new_tokens=40, min_new_tokens=40)
    decoder = model.new_decoder(options, len(ids))
    got = list(model.token_ids(decoder, ids, options))
    assert decoder.rebuilds == 1 and len(ids) + len(got) == 84  # crossed position 64 once
    assert got == expected
    # why the rebuild: plain genai keeps the short-factor keys cached before position 64 and drifts
    pkg = model.path
    assert plain_genai(pkg, ids, 40, do_sample=False, min_length=len(ids) + 40) != expected


def test_chat_session_serialises_turns_from_threads(model):
    chat = model.chat()
    threads = [threading.Thread(target=chat.send, args=(q,), kwargs={"max_new_tokens": 15})
               for q in ("What does a compiler do?", "What is a list?")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]
    # whichever went second saw the first turn in its prompt: same reply as a fresh greedy run over it
    assert chat.messages[3]["content"] == model.generate(chat.messages[:3], max_new_tokens=15)


def _repackage(src, dst, edit):
    """A copy of a package with `edit(folder)` applied and its manifest's file list refreshed."""
    import shutil

    from phi3_onnx.manifest import file_entries, read_manifest, write_manifest

    shutil.copytree(src, dst)
    edit(dst)
    write_manifest(dst, dataclasses.replace(read_manifest(dst), files=file_entries(dst)))
    return dst


def test_chat_template_from_jinja_file_or_none(model, pkg, tmp_path):
    """genai reads the template only from tokenizer_config.json; the wrapper also finds chat_template.jinja."""
    def move_template(folder):
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "chat_template.jinja").write_text(cfg.pop("chat_template"))
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg))

    moved = load(_repackage(pkg, tmp_path / "jinja", move_template))
    assert moved.apply_chat_template(QUESTION) == model.apply_chat_template(QUESTION)
    bare = load(_repackage(tmp_path / "jinja", tmp_path / "bare", lambda f: (f / "chat_template.jinja").unlink()))
    with pytest.raises(Phi3OnnxError, match="has no chat template"):
        bare.generate(QUESTION)
    assert bare.generate(PROSE, max_new_tokens=5) == model.generate(PROSE, max_new_tokens=5)


@pytest.mark.parametrize("bad", [[{"role": "user"}], [{"role": "user", "content": 3}], ["hello"]])
def test_bad_messages(model, bad):
    with pytest.raises(Phi3OnnxError, match="chat message is a"):
        model.generate(bad)
