"""A loaded package: generation, streaming and Phi-3 chat over onnxruntime-genai.

Thread safety: `Phi3Model.generate/stream` may be called from several threads at once; each call
runs its own genai Generator (own KV cache) over the shared og.Model, whose ORT session is
thread-safe. A `ChatSession` keeps one Generator across turns, so it serialises its turns with a lock.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

from phi3_onnx.errors import Phi3OnnxError
from phi3_onnx.manifest import Manifest
from phi3_onnx.runtime.decoder import Decoder
from phi3_onnx.runtime.deps import import_genai
from phi3_onnx.runtime.options import GenerationOptions, find_stop, safe_prefix_len
from phi3_onnx.runtime.package import Package
from phi3_onnx.runtime.providers import Choice
from phi3_onnx.runtime.threads import resolve_threads, session_overlay

Message = Mapping[str, str]
Prompt = Union[str, Sequence[Message]]
# Phi-3's end-of-turn and end-of-text tokens: generation stops at either even when a package's
# eos list names only one (generation running past <|end|> is a common complaint elsewhere).
STOP_TOKENS = ("<|end|>", "<|endoftext|>")


class Phi3Model:
    """A phi3-onnx package loaded on one execution provider (see `phi3_onnx.runtime.load`)."""

    def __init__(self, package: Package, choice: Choice, max_length: int | None = None, variant: str | None = None,
                 threads: int | None = None) -> None:
        self.path: Path = package.path
        self.manifest: Manifest = package.manifest
        self.choice = choice
        self.variant = variant
        self.max_length = _check_max_length(package.manifest, max_length)
        # the decoder session's intra_op_num_threads (a count; None = genai's default, GPU EPs only)
        self.threads = resolve_threads(package.path, choice.provider, threads)
        self._og = _load_og_model(package.path, choice.provider, self.max_length, self.threads)
        self._tokenizer = import_genai().Tokenizer(self._og)
        self.stop_token_ids = frozenset(self._stop_ids())

    @property
    def provider(self) -> str:
        return self.choice.provider

    @property
    def context_length(self) -> int:
        return self.manifest.model.max_position_embeddings

    def _stop_ids(self) -> set[int]:
        ids = {int(t) for t in self._tokenizer.eos_token_ids} | set(self.manifest.model.eos_token_ids)
        return ids | {i for i in (int(self._tokenizer.to_token_id(s)) for s in STOP_TOKENS) if i >= 0}

    # --- text <-> tokens -------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self._tokenizer.encode(text)]

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(ids)))

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The package's own chat template (tokenizer_config.json / chat_template.jinja) over `messages`."""
        doc = json.dumps([_check_message(m) for m in messages])
        try:
            return str(self._tokenizer.apply_chat_template(doc, add_generation_prompt=add_generation_prompt))
        except RuntimeError:
            template = _template_file(self.path)
        try:
            return str(self._tokenizer.apply_chat_template(
                doc, template_str=template, add_generation_prompt=add_generation_prompt))
        except RuntimeError as exc:
            raise Phi3OnnxError(f"the chat template in {self.path} failed: {_first_line(exc)}") from None

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """A string is used as is; a list of messages goes through the chat template."""
        text = prompt if isinstance(prompt, str) else self.apply_chat_template(prompt)
        ids = self.encode(text)
        if not ids:
            raise Phi3OnnxError("prompt is empty")
        return ids

    # --- generation ------------------------------------------------------------------------
    def new_decoder(self, options: GenerationOptions, prompt_length: int = 0) -> Decoder:
        """A fresh Generator with `options`' search settings (one per call or chat session)."""
        og = import_genai()
        search = options.search_options(self.max_length, self.manifest.model.vocab_size, prompt_length)

        def params() -> Any:
            p = og.GeneratorParams(self._og)
            p.set_search_options(**search)
            return p

        rope = self.manifest.model.longrope
        long_after = self.manifest.model.original_max_position_embeddings if rope is not None else None
        return Decoder(self._og, params, self.max_length, long_after)

    def check_room(self, n_prompt: int) -> None:
        if n_prompt >= self.context_length:
            raise Phi3OnnxError(f"prompt is {n_prompt} tokens but the model's context is {self.context_length}")
        if n_prompt >= self.max_length:
            raise Phi3OnnxError(f"prompt is {n_prompt} tokens but the model was loaded with max_length={self.max_length}; "
                                f"load with a larger max_length (up to {self.context_length})")

    def token_ids(self, decoder: Decoder, prompt_ids: Sequence[int], options: GenerationOptions) -> Iterator[int]:
        """New tokens after `prompt_ids` (reusing the decoder's cached prefix), stop tokens excluded."""
        self.check_room(len(prompt_ids))
        decoder.extend_to(prompt_ids)
        for _ in range(options.max_new_tokens):
            if decoder.done():
                return
            token = decoder.next_token()
            if token in self.stop_token_ids:
                return
            yield token

    def _pieces(self, tokens: Iterator[int], out: list[int]) -> Iterator[str]:
        """Incrementally decoded text of `tokens` (recorded into `out`)."""
        stream = self._tokenizer.create_stream()
        for token in tokens:
            out.append(token)
            yield str(stream.decode(token))

    def stream_text(self, tokens: Iterator[int], options: GenerationOptions, out: list[int]) -> Iterator[str]:
        """Text pieces as they are decoded; stops at (and hides) the first stop string."""
        shown = ""
        text = ""
        for piece in self._pieces(tokens, out):
            text += piece
            cut = find_stop(text, options.stop)
            visible = text[:cut] if cut >= 0 else text[:safe_prefix_len(text, options.stop)]
            if len(visible) > len(shown):
                yield visible[len(shown):]
                shown = visible
            if cut >= 0:
                return
        if len(text) > len(shown):
            yield text[len(shown):]

    def generate(self, prompt: Prompt, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, stop: str | Sequence[str] = (), min_new_tokens: int = 0) -> str:
        """The completion as one string (decoded in one go from its token ids)."""
        options = GenerationOptions.build(max_new_tokens, temperature, top_p, top_k, seed, stop, min_new_tokens)
        ids: list[int] = []
        prompt_ids = self.prompt_ids(prompt)
        tokens = self.token_ids(self.new_decoder(options, len(prompt_ids)), prompt_ids, options)
        for _ in self.stream_text(tokens, options, ids):
            pass
        text = self.decode(ids)
        cut = find_stop(text, options.stop)
        return text[:cut] if cut >= 0 else text

    def stream(self, prompt: Prompt, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, seed: int | None = None, stop: str | Sequence[str] = (),
               min_new_tokens: int = 0) -> Iterator[str]:
        """The completion as text pieces, yielded as tokens are generated (bad input raises here, not later)."""
        options = GenerationOptions.build(max_new_tokens, temperature, top_p, top_k, seed, stop, min_new_tokens)
        ids = self.prompt_ids(prompt)
        self.check_room(len(ids))
        return self.stream_text(self.token_ids(self.new_decoder(options, len(ids)), ids, options), options, [])

    def chat(self, system: str | None = None) -> ChatSession:
        return ChatSession(self, system)


class ChatSession:
    """Multi-turn Phi-3 chat that keeps its KV cache between turns: a turn appends only new tokens.

    Turns are serialised with a lock (one Generator per session); use one session per conversation.
    """

    def __init__(self, model: Phi3Model, system: str | None = None) -> None:
        self.model = model
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self._lock = threading.Lock()
        self._decoder: Decoder | None = None
        self._options: GenerationOptions | None = None
        self.reused_tokens = 0  # prompt tokens served from the cache in the last turn

    def send(self, text: str, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, seed: int | None = None, stop: str | Sequence[str] = ()) -> str:
        return "".join(self.stream(text, max_new_tokens, temperature, top_p, top_k, seed, stop))

    def stream(self, text: str, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, seed: int | None = None, stop: str | Sequence[str] = ()) -> Iterator[str]:
        """One turn: the user's `text` in, the assistant's reply out as pieces; history updated at the end."""
        return self._turn(text, GenerationOptions.build(max_new_tokens, temperature, top_p, top_k, seed, stop))

    def _turn(self, text: str, options: GenerationOptions) -> Iterator[str]:
        with self._lock:
            messages = [*self.messages, {"role": "user", "content": text}]
            prompt = self.model.prompt_ids(messages)
            decoder = self._decoder_for(options)
            reply: list[str] = []
            for piece in self.model.stream_text(self.model.token_ids(decoder, prompt, options), options, []):
                reply.append(piece)
                yield piece
            self.messages = [*messages, {"role": "assistant", "content": "".join(reply)}]
            self.reused_tokens = decoder.reused

    def _decoder_for(self, options: GenerationOptions) -> Decoder:
        """Keep the Generator while the search settings stay the same; they are fixed per Generator."""
        if self._decoder is None or self._options is None or options.sampling != self._options.sampling:
            self._decoder, self._options = self.model.new_decoder(options), options
        return self._decoder

    def reset(self) -> None:
        with self._lock:
            self.messages = [m for m in self.messages if m["role"] == "system"]
            self._decoder = None


def _check_message(m: Message) -> dict[str, str]:
    if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
        raise Phi3OnnxError(f"a chat message is a {{'role': str, 'content': str}} mapping, got {m!r}")
    return {"role": m["role"], "content": m["content"]}


def _template_file(folder: Path) -> str:
    """The chat template when genai does not find one itself."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    cfg = folder / "tokenizer_config.json"
    template = json.loads(cfg.read_text()).get("chat_template") if cfg.is_file() else None
    if not isinstance(template, str):
        raise Phi3OnnxError(f"{folder} has no chat template; pass a plain string prompt instead of messages")
    return template


def _check_max_length(manifest: Manifest, max_length: int | None) -> int:
    """KV buffers are allocated at max_length: default to the package's (<= 4096), never the full context."""
    length = manifest.max_length if max_length is None else int(max_length)
    context = manifest.model.max_position_embeddings
    if not 0 < length <= context:
        raise Phi3OnnxError(f"max_length must be in 1..{context} (the model's context), got {length}")
    return length


def _load_og_model(path: Path, provider: str, max_length: int, threads: int | None = None) -> Any:
    """og.Model with the chosen EP, threads and max_length set through og.Config: genai_config.json stays untouched."""
    og = import_genai()
    try:
        config = og.Config(str(path))
        if threads is not None:  # before the providers, so the overlay cannot touch their options
            config.overlay(json.dumps(session_overlay(threads)))
        config.clear_providers()
        if provider != "cpu":
            config.append_provider(provider)
            for key, value in _provider_options(path, provider).items():
                config.set_provider_option(provider, key, str(value))
        config.overlay(json.dumps({"search": {"max_length": max_length}}))
        return og.Model(config)
    except RuntimeError as exc:
        raise Phi3OnnxError(f"onnxruntime-genai could not load {path} on {provider}: {_first_line(exc)}") from None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _provider_options(path: Path, provider: str) -> dict[str, Any]:
    """The package's own options for `provider` (e.g. CUDA graphs), read from genai_config.json."""
    try:
        cfg = json.loads((path / "genai_config.json").read_text())
        entries = cfg["model"]["decoder"]["session_options"].get("provider_options", [])
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        return {}
    merged: dict[str, Any] = {}
    for entry in entries:
        merged.update(entry.get(provider, {}) if isinstance(entry, dict) else {})
    return merged
