"""n-gram speculative decoding (issue 10): `speculative="ngram"` never changes greedy output.

Greedy ids with and without it are compared through every entry point (generate, stream, chat,
the CLI) on input-grounded prompts where drafts are actually proposed and accepted, and across the
LongRoPE cache rebuild; genai's own statistics prove the drafts ran.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from phi3_onnx.errors import Phi3OnnxError
from phi3_onnx.runtime import load
from phi3_onnx.runtime.model import Finish
from phi3_onnx.runtime.options import GenerationOptions

HELDOUT = (Path(__file__).resolve().parent / "assets" / "corpus" / "heldout.txt").read_text(encoding="utf-8")
PASSAGE = HELDOUT[:700]
# input-grounded tasks: the answer repeats the input, where n-gram drafts are found
PROMPTS = {
    "quote": [{"role": "user", "content": f"Quote this passage exactly:\n{PASSAGE}"}],
    "continue": PASSAGE + "\n" + PASSAGE[:240],
    "edit": [{"role": "user", "content": f"Fix the spelling in:\n{PASSAGE.replace('the', 'teh')}"}],
    "code": "def join(a, b):\n    return a + b\n\n\ndef join(a, b):\n    return",
}


@pytest.fixture(scope="module")
def model(exported):
    return load(exported("int4-cpu"))


@pytest.mark.parametrize("task", list(PROMPTS))
def test_greedy_output_is_identical_with_ngram_drafts(model, task: str) -> None:
    prompt = PROMPTS[task]
    plain = model.generate(prompt, max_new_tokens=80, min_new_tokens=80)
    finish = Finish()
    fast = "".join(model.stream(prompt, max_new_tokens=80, min_new_tokens=80, speculative="ngram", finish=finish))
    assert fast == plain
    assert finish.speculative is not None and finish.speculative["draft_tokens_proposed"] > 0


def test_drafts_are_accepted_on_a_repeated_passage(model) -> None:
    """The statistics are genai's own, and on text that repeats its input most drafts are right."""
    finish = Finish()
    list(model.stream(PROMPTS["continue"], max_new_tokens=120, min_new_tokens=120, speculative="ngram", finish=finish))
    stats = finish.speculative
    assert stats["draft_tokens_accepted"] > 0 and stats["draft_tokens_accepted"] <= stats["draft_tokens_proposed"]
    assert finish.completion_tokens == 120


def test_load_default_and_per_call_override(exported, model) -> None:
    spec_model = load(exported("int4-cpu"), speculative="ngram")
    prompt = PROMPTS["continue"]
    assert spec_model.options().speculative is not None and spec_model.options(speculative="off").speculative is None
    assert spec_model.generate(prompt, max_new_tokens=60) == model.generate(prompt, max_new_tokens=60)
    off = Finish()
    list(spec_model.stream(prompt, max_new_tokens=10, speculative="off", finish=off))
    assert off.speculative is None


def test_chat_turns_are_identical_with_ngram(exported, model) -> None:
    turns = [f"Repeat after me: {PASSAGE[:300]}", "Again, the same words."]
    plain, fast = model.chat(), load(exported("int4-cpu"), speculative="ngram").chat()
    for turn in turns:
        assert fast.send(turn, max_new_tokens=60) == plain.send(turn, max_new_tokens=60)


def test_longrope_rebuild_keeps_greedy_ids(exported, tiny_longrope_ckpt) -> None:
    """Across the original-context switch the Generator is rebuilt (with the same drafts option)."""
    m = load(exported("fp32-cpu", tiny_longrope_ckpt))
    ids = m.encode(HELDOUT[:1000])[:44]
    got = {}
    for spec in ("off", "ngram"):
        options = m.options(max_new_tokens=40, min_new_tokens=40, speculative=spec)
        decoder = m.new_decoder(options, len(ids))
        got[spec] = list(m.token_ids(decoder, ids, options))
        assert decoder.rebuilds == 1
    assert got["ngram"] == got["off"]


def test_bad_method_is_refused(exported, model) -> None:
    with pytest.raises(Phi3OnnxError, match="speculative must be one of off, ngram"):
        model.generate("x", speculative="medusa")
    with pytest.raises(Phi3OnnxError, match="speculative must be one of"):
        load(exported("int4-cpu"), speculative="eagle")
    assert GenerationOptions().speculative is None


def test_cli_stdout_unchanged_and_statistics_on_stderr(exported) -> None:
    pkg = str(exported("int4-cpu"))
    base = [sys.executable, "-m", "phi3_onnx.cli", "generate", pkg, "--raw", "-p", PROMPTS["continue"], "--max-new-tokens", "40"]
    plain = subprocess.run(base, capture_output=True, text=True, timeout=120)
    fast = subprocess.run([*base, "--speculative", "ngram"], capture_output=True, text=True, timeout=120)
    assert plain.returncode == fast.returncode == 0, fast.stderr
    assert fast.stdout == plain.stdout
    assert "speculative: ngram," in fast.stderr and "speculative" not in plain.stderr
    bad = subprocess.run([*base, "--speculative", "bogus"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--speculative" in bad.stderr
