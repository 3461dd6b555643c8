"""A loaded package: generation, streaming and Phi-3 chat over onnxruntime-genai.

Thread safety: `Phi3Model.generate/stream` may be called from several threads at once; each call
runs its own genai Generator (own KV cache) over the shared og.Model, whose ORT session is
thread-safe. A `ChatSession` keeps one Generator across turns, so it serialises its turns with a lock.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from phi3_onnx.errors import Phi3OnnxError
from phi3_onnx.manifest import Manifest
from phi3_onnx.runtime.decoder import Decoder, WindowSwitch
from phi3_onnx.runtime.deps import import_genai
from phi3_onnx.runtime.options import speculative_method
from phi3_onnx.runtime.options import GenerationOptions, find_stop, safe_prefix_len, whole
from phi3_onnx.runtime.package import Package
from phi3_onnx.runtime.providers import Choice
from phi3_onnx.runtime.structured import JsonPlan, plan_for
from phi3_onnx.runtime.threads import resolve_threads, session_overlay
from phi3_onnx.targets.providers import PROVIDERS

Message = Mapping[str, str]
Prompt = Union[str, Sequence[Message]]
# Phi-3's end-of-turn and end-of-text tokens: generation stops at either even when a package's
# eos list names only one (generation running past <|end|> is a common complaint elsewhere).
STOP_TOKENS = ("<|end|>", "<|endoftext|>")
# Content of the one-message conversation that asks a chat template whether it renders a role.
ROLE_PROBE = "phi3-onnx role probe 7f3a"
log = logging.getLogger("phi3_onnx")


@dataclass
class Finish:
    """Why a completion ended, filled in while it streams (pass one to `stream(..., finish=)`).

    reason: "end_token" (`detail` names it, e.g. <|end|>), "stop_string" (`detail` is the string),
    "max_new_tokens" or "max_length" (the KV cache is full; `detail` gives the limit).
    """

    reason: str | None = None
    detail: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    speculative: dict[str, Any] | None = None  # genai's draft statistics when speculative decoding ran

    @property
    def finish_reason(self) -> str:
        """OpenAI's two-way name: "length" when a limit cut the answer, else "stop"."""
        return "length" if self.reason in ("max_new_tokens", "max_length") else "stop"

    def set(self, reason: str, detail: str) -> None:
        self.reason, self.detail = reason, detail


class Detokenizer:
    """genai's incremental decoder for one completion, minus the tokenizer's leading-space artifact.

    A SentencePiece tokenizer (Phi-3's) marks the first word of every text segment with ▁ — at the
    start and right after a special token such as <|assistant|> — where the text has no space, so a
    model answers "<|assistant|>" with "▁Return". When the prompt ends with a special token, the
    first piece's leading space is that marker and is dropped (as transformers' decode of the
    completion drops it); any further space ("▁▁Return" -> " Return") and every space after plain
    text (a --raw completion of "... and" -> " the") is the model's own and kept.
    """

    def __init__(self, stream: Any, drop_marker: bool) -> None:
        self._stream = stream
        self._drop = drop_marker

    def decode(self, token: int) -> str:
        piece = str(self._stream.decode(token))
        if self._drop and piece:
            self._drop = False
            piece = piece[1:] if piece.startswith(" ") else piece
        return piece


class Phi3Model:
    """A phi3-onnx package loaded on one execution provider (see `phi3_onnx.runtime.load`)."""

    def __init__(self, package: Package, choice: Choice, max_length: int | None = None, variant: str | None = None,
                 max_batch: int | None = None, speculative: str | None = None, threads: int | None = None) -> None:
        self.path: Path = package.path
        self.manifest: Manifest = package.manifest
        self.choice = choice
        self.variant = variant
        self.max_length = _check_max_length(package.manifest, max_length)
        self.max_batch = _check_max_batch(max_batch)
        self.speculative = speculative_method(speculative)  # the default for generate/stream/chat
        # the decoder session's intra_op_num_threads (a count; None = genai's default, GPU EPs only)
        self.threads = resolve_threads(package.path, choice.provider, threads)
        # a package with a window-free decoder (package.window_free) runs it while sequences fit the window
        self.window_free = package.manifest.window_free_decoder
        self._og = _load_og_model(package.path, choice.provider, self.max_length, self.max_batch, self.threads,
                                  self.window_free)
        self._og_windowed: Any = None if self.window_free else self._og
        self._load_lock = threading.Lock()
        self._tokenizer = import_genai().Tokenizer(self._og)
        self.stop_token_ids = frozenset(self._stop_ids())
        self._roles: dict[str, bool] = {}  # role -> whether the chat template renders it
        self._undecodable: dict[int, bool] = {}  # token id -> genai's tokenizer fails on it alone
        self.special_tokens = _special_tokens(package.path)  # id -> text, from the package's tokenizer files
        self._marks_segments = self.decode(self.encode("a")).startswith(" ")  # SentencePiece's ▁ word marker

    @property
    def provider(self) -> str:
        return self.choice.provider

    def windowed_og_model(self) -> Any:
        """The og.Model of the package's own decoder (exact at any length), loaded on first use when the
        window-free one runs by default; both stay loaded after that (weights held twice)."""
        with self._load_lock:
            if self._og_windowed is None:
                self._og_windowed = _load_og_model(self.path, self.choice.provider, self.max_length, self.max_batch,
                                                   self.threads)
            return self._og_windowed

    def window_switch(self, draft_tokens: int = 0, max_length: int | None = None) -> WindowSwitch | None:
        """Where a Generator (of at most `max_length` tokens, default the loaded one) on the window-free
        decoder must move to the windowed one: before a step whose tokens (up to `draft_tokens` more with
        speculative decoding) could pass the window. None when no sequence can pass it."""
        window = self.manifest.model.attention_window
        if self.window_free is None or window is None or (max_length or self.max_length) <= window:
            return None
        return WindowSwitch(window - draft_tokens, self.windowed_og_model)

    def engine_og_model(self) -> Any:
        """The og.Model for genai's batching Engine: the default one (window-free where the package has it).
        The Engine cannot move a request between decoders, so `BatchEngine.accepts` sends a turn that could
        pass the window to its own Generator (a Decoder, which moves)."""
        return self._og

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
        """Text of `ids`; ids genai's tokenizer cannot decode (see `decodable`) are left out."""
        ids = [int(t) for t in ids]
        try:
            return str(self._tokenizer.decode(ids))
        except RuntimeError:
            return str(self._tokenizer.decode([t for t in ids if self.decodable(t)]))

    def decode_piece(self, stream: Any, token: int) -> str:
        """One token through a genai TokenizerStream; an undecodable one is shown as nothing."""
        try:
            return str(stream.decode(token))
        except RuntimeError:
            self.decodable(token)
            return ""

    def decodable(self, token: int) -> bool:
        """Whether genai's tokenizer decodes `token` alone. Some tokenizer.json forms (e.g. a Metaspace
        decoder) make it fail with `map::at` on ordinary ids; generation must not die on a sampled one."""
        if token not in self._undecodable:
            try:
                self._tokenizer.decode([token])
                self._undecodable[token] = False
            except RuntimeError as exc:
                if not any(self._undecodable.values()):  # one warning per model
                    log.warning(f"onnxruntime-genai cannot decode token id {token} with the tokenizer of {self.path} "
                                f"({_first_line(exc)}); such tokens are left out of the text")
                self._undecodable[token] = True
        return not self._undecodable[token]

    def text_stream(self, prompt_ids: Sequence[int] = ()) -> Detokenizer:
        """An incremental detokenizer for the completion of `prompt_ids`: `.decode(token) -> str` gives the
        text each new token adds (without the tokenizer's leading-space artifact, see Detokenizer)."""
        return Detokenizer(self._tokenizer.create_stream(), self.marker_space(prompt_ids))

    def marker_space(self, prompt_ids: Sequence[int]) -> bool:
        """Whether a completion of `prompt_ids` starts with the tokenizer's word marker, not a space of its own."""
        return self._marks_segments and bool(prompt_ids) and int(prompt_ids[-1]) in self.special_tokens

    def completion_text(self, prompt_ids: Sequence[int], ids: Sequence[int]) -> str:
        """The completion `ids` of `prompt_ids` decoded in one go (the same text as streaming it)."""
        text = self.decode(ids)
        return text[1:] if self.marker_space(prompt_ids) and text.startswith(" ") else text

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The package's own chat template (tokenizer_config.json / chat_template.jinja) over `messages`.

        A message whose role the template does not render (it would be dropped silently) is refused.
        """
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise Phi3OnnxError(f"messages must be a list of {{'role': str, 'content': str}}, got {messages!r:.80}")
        checked = [_check_message(m) for m in messages]
        for role in sorted({m["role"] for m in checked}):
            self._check_role(role)
        return self._render(json.dumps(checked), add_generation_prompt)

    def _check_role(self, role: str) -> None:
        if role not in self._roles:
            probe = self._render(json.dumps([{"role": role, "content": ROLE_PROBE}]), False)
            self._roles[role] = ROLE_PROBE in probe
        if not self._roles[role]:
            known = [r for r in ("system", "user", "assistant") if r == role or self._renders(r)]
            raise Phi3OnnxError(f"the chat template of {self.path} does not render role {role!r} (the message "
                                f"would be dropped); it renders: {', '.join(known) or 'none of system/user/assistant'}")

    def _renders(self, role: str) -> bool:
        try:
            self._check_role(role)
        except Phi3OnnxError:
            return False
        return True

    def _render(self, doc: str, add_generation_prompt: bool) -> str:
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
        """A fresh Generator with `options`' search settings (one per call or chat session).

        With a `prompt_length` (one call: generate/stream/serve/bench) its KV cache holds just the prompt
        and `options.max_new_tokens` (at most the loaded max_length): genai's CUDA graphs attend over the
        whole buffer, so a 4096-token one costs ~4 % decode speed at a 16-token prompt on an H200. A chat
        session (no prompt_length) keeps the loaded max_length for all its turns.
        """
        og = import_genai()
        length = self.max_length if prompt_length <= 0 else min(self.max_length, prompt_length + options.max_new_tokens)
        search = options.search_options(length, self.manifest.model.vocab_size, prompt_length)

        plan = self.json_plan(options, prompt_length)

        def params(model: Any) -> Any:
            p = og.GeneratorParams(model)
            p.set_search_options(**search)
            if options.speculative is not None:
                p.set_speculative_options(**options.speculative.genai_options())
            if plan is not None:
                p.set_guidance("lark_grammar", plan.lark)
            return p

        rope = self.manifest.model.longrope
        long_after = self.manifest.model.original_max_position_embeddings if rope is not None else None
        forced = self.continuation_ids(plan.forced) if plan is not None and plan.forced is not None else None
        draft = options.speculative.max_draft_tokens if options.speculative is not None else 0
        return Decoder(self._og, params, length, long_after, forced, self.window_switch(draft, length),
                       speculative=options.speculative is not None)

    def json_plan(self, options: GenerationOptions, prompt_length: int) -> JsonPlan | None:
        """How options.json_schema's answer fits its budget (None without a schema); see runtime.structured."""
        if options.json_schema is None:
            return None
        budget = options.json_budget(self.max_length, prompt_length)
        return plan_for(options.json_schema, budget, lambda text: len(self.continuation_ids(text)))

    def continuation_ids(self, text: str) -> list[int]:
        """Tokens that decode to exactly `text` mid-sequence (no SentencePiece leading-space token)."""
        ids = self.encode(text)
        while len(ids) > 1 and self.decode(ids) != text and self.decode(ids[1:]) == text:
            ids = ids[1:]
        return ids

    def check_room(self, n_prompt: int) -> None:
        if n_prompt >= self.context_length:
            raise Phi3OnnxError(f"prompt is {n_prompt} tokens but the model's context is {self.context_length}")
        if n_prompt >= self.max_length:
            raise Phi3OnnxError(f"prompt is {n_prompt} tokens but the model was loaded with max_length={self.max_length}; "
                                f"load with a larger max_length (up to {self.context_length})")

    def token_ids(self, decoder: Decoder, prompt_ids: Sequence[int], options: GenerationOptions,
                  finish: Finish | None = None) -> Iterator[int]:
        """New tokens after `prompt_ids` (reusing the decoder's cached prefix), stop tokens excluded;
        `finish` records why they ended (and the speculative-decoding statistics, when it ran)."""
        finish = finish if finish is not None else Finish()
        try:
            yield from self._token_ids(decoder, prompt_ids, options, finish)
        finally:
            if options.speculative is not None:
                finish.speculative = decoder.speculative_stats()

    def _token_ids(self, decoder: Decoder, prompt_ids: Sequence[int], options: GenerationOptions,
                   finish: Finish) -> Iterator[int]:
        finish.prompt_tokens = len(prompt_ids)
        self.check_room(len(prompt_ids))
        if decoder.forced is not None:  # a structured answer forced whole (runtime.structured)
            yield from decoder.forced[:options.max_new_tokens]
            cut = len(decoder.forced) > options.max_new_tokens
            finish.set(*(("max_new_tokens", f"max_new_tokens {options.max_new_tokens}") if cut
                         else ("end_token", "end of the structured answer")))
            return
        decoder.extend_to(prompt_ids)
        for _ in range(options.max_new_tokens):
            if decoder.done():
                finish.set("max_length", f"max_length {self.max_length}")
                return
            token = decoder.next_token()
            if token in self.stop_token_ids:
                finish.set("end_token", self.special_tokens.get(token, f"token {token}"))
                return
            yield token
        finish.set("max_new_tokens", f"max_new_tokens {options.max_new_tokens}")

    def _pieces(self, tokens: Iterator[int], out: list[int], prompt_ids: Sequence[int]) -> Iterator[str]:
        """Incrementally decoded text of `tokens` (recorded into `out`), the completion of `prompt_ids`."""
        stream = self.text_stream(prompt_ids)
        for token in tokens:
            out.append(token)
            yield self.decode_piece(stream, token)

    def stream_text(self, tokens: Iterator[int], options: GenerationOptions, out: list[int],
                    prompt_ids: Sequence[int] = (), finish: Finish | None = None) -> Iterator[str]:
        """Text pieces as they are decoded; stops at (and hides) the first stop string."""
        shown = ""
        text = ""
        for piece in self._pieces(tokens, out, prompt_ids):
            text += piece
            cut = find_stop(text, options.stop)
            visible = text[:cut] if cut >= 0 else text[:safe_prefix_len(text, options.stop)]
            if len(visible) > len(shown):
                yield visible[len(shown):]
                shown = visible
            if cut >= 0:
                if finish is not None:
                    finish.set("stop_string", next(s for s in options.stop if text.find(s) == cut))
                    finish.completion_tokens = len(out)
                return
        if finish is not None:
            finish.completion_tokens = len(out)
        if len(text) > len(shown):
            yield text[len(shown):]

    def generate(self, prompt: Prompt, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, stop: str | Sequence[str] = (), min_new_tokens: int = 0,
                 json_schema: Mapping[str, Any] | bool | None = None, speculative: str | None = None) -> str:
        """The completion as one string (decoded in one go from its token ids).

        json_schema: the answer is JSON matching this schema ({"type": "object"} for any object),
        complete within max_new_tokens whenever its shortest valid form fits (runtime.structured).
        speculative: "ngram" (n-gram speculative decoding; greedy output unchanged), "off", or None
        for the model's default (`load(..., speculative=)`).
        """
        options = self.options(max_new_tokens, temperature, top_p, top_k, seed, stop, min_new_tokens, json_schema,
                               speculative)
        ids: list[int] = []
        prompt_ids = self.prompt_ids(prompt)
        tokens = self.token_ids(self.new_decoder(options, len(prompt_ids)), prompt_ids, options)
        for _ in self.stream_text(tokens, options, ids, prompt_ids):
            pass
        text = self.completion_text(prompt_ids, ids)
        cut = find_stop(text, options.stop)
        return text[:cut] if cut >= 0 else text

    def stream(self, prompt: Prompt, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, seed: int | None = None, stop: str | Sequence[str] = (),
               min_new_tokens: int = 0, json_schema: Mapping[str, Any] | bool | None = None,
               finish: Finish | None = None, speculative: str | None = None) -> Iterator[str]:
        """The completion as text pieces, yielded as tokens are generated (bad input raises here, not later).

        `finish` (a `Finish()`), when given, says at the end why generation stopped and how many tokens it took
        (and, with speculative decoding, genai's draft statistics in `finish.speculative`).
        """
        options = self.options(max_new_tokens, temperature, top_p, top_k, seed, stop, min_new_tokens, json_schema,
                               speculative)
        ids = self.prompt_ids(prompt)
        self.check_room(len(ids))
        tokens = self.token_ids(self.new_decoder(options, len(ids)), ids, options, finish)
        return self.stream_text(tokens, options, [], ids, finish)

    def options(self, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                seed: int | None = None, stop: str | Sequence[str] = (), min_new_tokens: int = 0,
                json_schema: Mapping[str, Any] | bool | None = None, speculative: str | None = None) -> GenerationOptions:
        """Generation settings checked against this model (top_k <= its vocabulary); speculative None: the model's default."""
        options = GenerationOptions.build(max_new_tokens, temperature, top_p, top_k, seed, stop, min_new_tokens, json_schema)
        method = self.speculative if speculative is None else speculative_method(speculative)
        options = dataclasses.replace(options, speculative=method)
        return options.check_vocab(self.manifest.model.vocab_size)

    def chat(self, system: str | None = None) -> ChatSession:
        if system is not None and not isinstance(system, str):
            raise Phi3OnnxError(f"system must be a string, got {system!r:.80}")
        return ChatSession(self, system)


class ChatSession:
    """Multi-turn Phi-3 chat that keeps its KV cache between turns: a turn appends only new tokens.

    One Generator per session, so turns run one at a time: each generation step holds the session
    lock, never a paused stream. A new turn first settles the previous one: a reply still being
    read (its stream referenced, from this or another thread) is finished and recorded, the reader
    getting the rest from a buffer; a stream closed or dropped early is discarded unrecorded. So an
    abandoned stream never blocks the session. Use one session per conversation.
    """

    def __init__(self, model: Phi3Model, system: str | None = None) -> None:
        self.model = model
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self._lock = threading.RLock()
        self._decoder: Decoder | None = None
        self._options: GenerationOptions | None = None
        self._turn: _Turn | None = None
        self.reused_tokens = 0  # prompt tokens served from the cache in the last turn

    def send(self, text: str, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, seed: int | None = None, stop: str | Sequence[str] = (), speculative: str | None = None) -> str:
        return "".join(self.stream(text, max_new_tokens, temperature, top_p, top_k, seed, stop, speculative))

    def stream(self, text: str, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, seed: int | None = None, stop: str | Sequence[str] = (),
               speculative: str | None = None) -> Iterator[str]:
        """One turn: the user's `text` in, the assistant's reply out as pieces; history updated at the end.

        Bad input raises here; the previous turn is settled first (see the class docstring).
        """
        options = self.model.options(max_new_tokens, temperature, top_p, top_k, seed, stop, speculative=speculative)
        if not isinstance(text, str):
            raise Phi3OnnxError(f"a chat turn is a string, got {text!r:.80}")
        with self._lock:
            self._settle()
            turn = self._start(text, options)
            reader = self._read(turn)
            turn.reader = weakref.ref(reader)
            self._turn = turn
        return reader

    def _start(self, text: str, options: GenerationOptions) -> _Turn:
        messages = [*self.messages, {"role": "user", "content": text}]
        prompt = self.model.prompt_ids(messages)
        self.model.check_room(len(prompt))
        decoder = self._decoder_for(options)
        pieces = self.model.stream_text(self.model.token_ids(decoder, prompt, options), options, [], prompt)

        def record(reply: str) -> None:
            self.messages = [*messages, {"role": "assistant", "content": reply}]
            self.reused_tokens = decoder.reused

        return _Turn(pieces, record)

    def _settle(self) -> None:
        """Finish the previous turn if someone can still read it, else discard it (caller holds the lock)."""
        turn = self._turn
        if turn is None or turn.done:
            return
        if turn.closed or turn.reader is None or turn.reader() is None:
            turn.cancel(Phi3OnnxError("this reply was closed before it ended"))
        else:
            turn.finish()

    def _read(self, turn: _Turn) -> Iterator[str]:
        """The reader of one turn: pieces from the buffer, generating one step at a time under the lock."""
        try:
            while True:
                with self._lock:
                    if not turn.buffer and not turn.done:
                        turn.step()
                    piece = turn.buffer.popleft() if turn.buffer else None
                if piece is None:
                    if turn.error is not None:
                        raise turn.error
                    return
                yield piece
        finally:
            turn.closed = True  # no lock here: this may run in a garbage-collection finaliser

    def _decoder_for(self, options: GenerationOptions) -> Decoder:
        """Keep the Generator while the search settings stay the same; they are fixed per Generator."""
        if self._decoder is None or self._options is None or options.sampling != self._options.sampling:
            self._decoder, self._options = self.model.new_decoder(options), options
        return self._decoder

    def reset(self) -> None:
        """Forget the conversation (the system message stays); a reply still streaming ends with an error."""
        with self._lock:
            if self._turn is not None and not self._turn.done:
                self._turn.cancel(Phi3OnnxError("the chat was reset while this reply was streaming"))
            self.messages = [m for m in self.messages if m["role"] == "system"]
            self._decoder = None


class _Turn:
    """One chat reply being generated: its pieces so far (for a reader that has not taken them yet)
    and how it ended. Every method runs under the session's lock."""

    def __init__(self, pieces: Iterator[str], record: Callable[[str], None]) -> None:
        self._pieces = pieces
        self._record = record
        self.buffer: deque[str] = deque()
        self.reply: list[str] = []
        self.done = False
        self.closed = False
        self.error: BaseException | None = None
        self.reader: weakref.ref[Iterator[str]] | None = None

    def step(self) -> None:
        """Generate one more piece into the buffer, or end the turn (recording it in the history)."""
        try:
            piece = next(self._pieces)
        except StopIteration:
            self.done = True
            self._record("".join(self.reply))
            return
        except BaseException as exc:
            self.cancel(exc if isinstance(exc, Exception) else Phi3OnnxError("generation was interrupted"))
            raise
        self.reply.append(piece)
        self.buffer.append(piece)

    def finish(self) -> None:
        """Run the turn to its end for a reader that has not come back (errors stay with that reader)."""
        try:
            while not self.done:
                self.step()
        except Exception:
            pass  # kept in self.error for the turn's own reader; the next turn goes ahead

    def cancel(self, error: BaseException) -> None:
        self.done, self.error = True, error
        self.buffer.clear()


def _special_tokens(folder: Path) -> dict[int, str]:
    """The tokenizer's special tokens (id -> text) from tokenizer.json, else tokenizer_config.json."""
    for name, read in (("tokenizer.json", _added_tokens), ("tokenizer_config.json", _added_tokens_decoder)):
        try:
            doc = json.loads((folder / name).read_text(encoding="utf-8"))
            found = read(doc)
        except (OSError, ValueError, TypeError, AttributeError, KeyError):
            continue
        if found:
            return found
    return {}


def _added_tokens(doc: dict[str, Any]) -> dict[int, str]:
    return {int(t["id"]): str(t["content"]) for t in doc.get("added_tokens", []) if t.get("special")}


def _added_tokens_decoder(doc: dict[str, Any]) -> dict[int, str]:
    return {int(i): str(t["content"]) for i, t in doc.get("added_tokens_decoder", {}).items() if t.get("special")}


def _check_message(m: Message) -> dict[str, str]:
    if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str) \
            or not m["role"]:
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
    length = manifest.max_length if max_length is None else whole("max_length", max_length)
    context = manifest.model.max_position_embeddings
    if not 0 < length <= context:
        raise Phi3OnnxError(f"max_length must be in 1..{context} (the model's context), got {length}")
    return length


def _check_max_batch(max_batch: int | None) -> int | None:
    if max_batch is not None and not 1 <= int(max_batch) <= 256:
        raise Phi3OnnxError(f"max_batch must be in 1..256, got {max_batch}")
    return None if max_batch is None else int(max_batch)


def _load_og_model(path: Path, provider: str, max_length: int, max_batch: int | None = None,
                   threads: int | None = None, decoder_file: str | None = None) -> Any:
    """og.Model with the chosen EP, threads, max_length (and another decoder file of the package) set
    through og.Config: genai_config.json stays untouched."""
    og = import_genai()
    try:
        config = og.Config(str(path))
        if threads is not None:  # before the providers, so the overlay cannot touch their options
            config.overlay(json.dumps(session_overlay(threads)))
        config.clear_providers()
        if provider != "cpu":
            config.append_provider(provider)
            for key, value in decoder_provider_options(path, provider, decoder_file).items():
                config.set_provider_option(provider, key, str(value))
        overlay: dict[str, Any] = {"search": {"max_length": max_length}}
        if decoder_file is not None:
            overlay["model"] = {"decoder": {"filename": decoder_file}}
        if max_batch is not None:  # the batching Engine's slots (runtime.batch); plain Generators ignore it
            overlay["engine"] = {"static_batching": {"max_batch_size": max_batch}}
        config.overlay(json.dumps(overlay))
        return og.Model(config)
    except RuntimeError as exc:
        raise Phi3OnnxError(f"onnxruntime-genai could not load {path} on {provider}: {_first_line(exc)}") from None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def decoder_provider_options(path: Path, provider: str, decoder_file: str | None) -> dict[str, Any]:
    """The package's options for `provider`; for its window-free decoder (a plain GQA graph without
    step-dependent shapes, package.window_free) graph capture back on where the EP captures: a DirectML
    package of a sliding-window model turns capture off for its model.onnx (plain-op window attention)."""
    options = _provider_options(path, provider)
    info = PROVIDERS.get(provider)
    if decoder_file is not None and info is not None and info.capture_option in info.genai_options:
        options[info.capture_option] = info.genai_options[info.capture_option]
    return options


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
