"""Requests to generation: token events from the batching engine (or, for seeded sampling, a
Generator of their own) turned into text pieces, with stop strings, usage and finish_reason."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from phi3_onnx.runtime import Phi3Model
from phi3_onnx.runtime.batch import BatchEngine, Event
from phi3_onnx.runtime.options import GenerationOptions, find_stop, safe_prefix_len


@dataclass(frozen=True)
class Finish:
    reason: str  # stop | length | error
    prompt_tokens: int
    completion_tokens: int
    message: str = ""


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class _ThreadJob:
    """A request on its own genai Generator: seeded sampling (the static Engine cannot seed a turn) and,
    with `serve --speculative ngram`, every request (the Engine verifies no drafts)."""

    def __init__(self, service: Service, ids: Sequence[int], options: GenerationOptions, emit: Any) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(service, list(ids), options, emit), daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        self._stop.set()

    def _run(self, service: Service, ids: list[int], options: GenerationOptions, emit: Any) -> None:
        n = 0
        with service.seeded_slots:
            try:
                model = service.model
                for token in model.token_ids(model.new_decoder(options, len(ids)), ids, options):
                    if self._stop.is_set():
                        break
                    n += 1
                    emit(Event(token=token))
            except Exception as exc:  # reported to the client as a server error, never raised in a thread
                emit(Event(finish="error", message=str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__))
                return
        emit(Event(finish="length" if n >= options.max_new_tokens else "stop", prompt_tokens=len(ids), generated_tokens=n))


class Service:
    """What the HTTP routes call: one loaded model, one batching engine."""

    def __init__(self, model: Phi3Model, engine: BatchEngine, seeded_slots: int = 2) -> None:
        self.model = model
        self.engine = engine
        # speculative serving runs every request on a Generator: as many at once as the engine would batch
        slots = max(seeded_slots, model.max_batch or 0) if model.speculative is not None else seeded_slots
        self.seeded_slots = threading.BoundedSemaphore(slots)

    @property
    def model_id(self) -> str:
        return self.model.path.name

    def stats(self) -> dict[str, int]:
        return self.engine.stats()

    async def stream(self, ids: Sequence[int], options: GenerationOptions) -> AsyncIterator[str | Finish]:
        """Text pieces, then one Finish; leaving early (a disconnect) cancels the generation."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        if self.model.speculative is not None:  # `serve --speculative ngram`: drafts on every request
            options = dataclasses.replace(options, speculative=self.model.speculative)
        batched = self.engine.accepts(options, len(ids)) and options.speculative is None
        job: Cancellable = self.engine.submit(ids, options, emit) if batched else _ThreadJob(self, ids, options, emit)
        text = TextAssembler(self.model, options.stop, ids)
        count = 0
        try:
            while True:
                event = await events.get()
                if event.token is None:
                    if event.finish == "cancelled":
                        continue
                    tail = text.flush()
                    if tail:
                        yield tail
                    yield Finish(event.finish or "stop", len(ids), count, event.message)
                    return
                count += 1
                piece, stopped = text.add(event.token)
                if piece:
                    yield piece
                if stopped:
                    job.cancel()
                    yield Finish("stop", len(ids), count)
                    return
        finally:
            job.cancel()


class TextAssembler:
    """Incremental detokenising that hides stop strings (and any tail that may begin one)."""

    def __init__(self, model: Phi3Model, stops: tuple[str, ...], prompt_ids: Sequence[int] = ()) -> None:
        self._stream = model.text_stream(prompt_ids)
        self._stops = stops
        self._text = ""
        self._shown = 0

    def add(self, token: int) -> tuple[str, bool]:
        self._text += str(self._stream.decode(token))
        cut = find_stop(self._text, self._stops)
        end = cut if cut >= 0 else safe_prefix_len(self._text, self._stops)
        piece = self._text[self._shown:end] if end > self._shown else ""
        self._shown = max(self._shown, end)
        return piece, cut >= 0

    def flush(self) -> str:
        piece = self._text[self._shown:]
        self._shown = len(self._text)
        return piece
