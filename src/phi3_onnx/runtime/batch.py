"""Concurrent generation batched through onnxruntime-genai's Engine / Request API (genai >= 0.18).

One thread owns the og.Engine: it admits turns (at most `max_batch` at once, the rest wait in a
bounded queue), calls `Engine.run` (one batched step over every active turn) and hands each event
to its job's callback. Greedy answers equal the sequential `Phi3Model.generate` ones (tested).

genai's static-batching Engine (what a GQA package gets) has no per-turn seed and no stop strings:
`accepts()` says no to seeded sampling and to turns that could pass a window-free decoder's window
(run those on their own Generator), and stop strings are the
caller's to watch (cancel the job when one appears).
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from phi3_onnx.errors import Phi3OnnxError
from phi3_onnx.runtime.deps import import_genai
from phi3_onnx.runtime.model import Phi3Model
from phi3_onnx.runtime.options import GenerationOptions


@dataclass(frozen=True)
class Event:
    """A token (`token` set) or the end of a job (`finish` set: stop | length | cancelled | error)."""

    token: int | None = None
    finish: str | None = None
    prompt_tokens: int = 0
    generated_tokens: int = 0
    message: str = ""


class Busy(Phi3OnnxError):
    """The waiting queue is full."""


class Job:
    """One turn in the engine; `cancel()` frees its slot (safe from any thread, any time)."""

    def __init__(self, engine: BatchEngine, prompt_ids: Sequence[int], options: GenerationOptions,
                 on_event: Callable[[Event], None], forced: Sequence[int] | None, guidance: str | None) -> None:
        self._engine = engine
        self.prompt_ids = [int(t) for t in prompt_ids]
        self.options = options
        self.on_event = on_event
        self.forced = forced
        self.guidance = guidance
        self.request: Any = None
        self.turn: int | None = None
        self.generated = 0
        self.done = False

    def cancel(self) -> None:
        self._engine._commands.put(("cancel", self))


class BatchEngine:
    """Batched generation for one loaded model; start() once, submit() from any thread, close() at the end."""

    def __init__(self, model: Phi3Model, max_queue: int = 256) -> None:
        og = import_genai()
        if not hasattr(og, "Engine"):
            raise Phi3OnnxError("this onnxruntime-genai has no Engine API (needs >= 0.18)")
        self.model = model
        self._og = og
        self.max_queue = max_queue
        self._engine: Any = None  # created on (and only used from) the engine thread: genai requires it
        self._buffer: Any = None
        self.max_batch = 0
        self.draft_tokens = 0  # speculative draft tokens per proposal the engine accepts (0: none)
        self._ready = threading.Event()
        self._error: str | None = None
        self._commands: queue.Queue = queue.Queue()
        self._waiting: deque[Job] = deque()
        self._active: list[Job] = []
        self._thread = threading.Thread(target=self._loop, name="phi3-onnx-engine", daemon=True)
        self._closed = False

    def start(self) -> BatchEngine:
        """Start the engine thread and wait until its og.Engine exists."""
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise Phi3OnnxError(f"onnxruntime-genai's Engine cannot run {self.model.path}: {self._error}")
        return self

    def stats(self) -> dict[str, int]:
        return {"active": len(self._active), "waiting": len(self._waiting), "max_batch": self.max_batch}

    def accepts(self, options: GenerationOptions, prompt_length: int = 0) -> bool:
        """False for seeded sampling (the static-batching Engine cannot seed a turn) and, on a package whose
        Engine runs the window-free decoder (package.window_free), for a turn that could pass the window
        (a request cannot move between decoders): run those on their own Generator."""
        if not (options.greedy or options.seed is None):
            return False
        longest = prompt_length + options.max_new_tokens + 1  # + the end token after a grammar-bounded answer
        return self.model.window_switch(max_length=longest) is None

    def submit(self, prompt_ids: Sequence[int], options: GenerationOptions, on_event: Callable[[Event], None]) -> Job:
        if not self.accepts(options, len(prompt_ids)):
            raise Phi3OnnxError("this request does not run on the batching engine (seeded sampling, or it could "
                                "pass the sliding window of a window-free decoder)")
        if self._closed:
            raise Phi3OnnxError("the engine is closed")
        self.model.check_room(len(prompt_ids))
        plan = self.model.json_plan(options, len(prompt_ids))
        forced = self.model.continuation_ids(plan.forced) if plan is not None and plan.forced else None
        job = Job(self, prompt_ids, options, on_event, forced, plan.lark if plan is not None else None)
        if forced is not None:
            self._emit_forced(job)
            return job
        self._commands.put(("submit", job))
        return job

    def close(self) -> None:
        self._closed = True
        self._commands.put(("close", None))
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self._engine = None

    # --- the engine thread -------------------------------------------------------------------
    def _create(self) -> bool:
        try:
            self._engine = self._og.Engine(self.model.engine_og_model())
            self.max_batch = int(self._engine.get_capabilities().configured_max_batch_size)
            self.draft_tokens = int(self._engine.max_draft_tokens_per_proposal())
            self._buffer = self._engine.create_event_buffer(4 * self.max_batch + 16)
        except RuntimeError as exc:
            self._error = str(exc).splitlines()[0][:300]
        self._ready.set()
        return self._error is None

    def _loop(self) -> None:
        if not self._create():
            return
        while True:
            idle = not self._active
            if not self._drain_commands(block=idle):
                self._fail_all("the server is shutting down")
                return
            self._admit()
            if self._active:
                self._step()

    def _drain_commands(self, block: bool) -> bool:
        """Apply queued submits/cancels; False on close."""
        try:
            command = self._commands.get(block=block, timeout=0.5 if block else None)
        except queue.Empty:
            return True
        while True:
            kind, job = command
            if kind == "close":
                return False
            if kind == "submit":
                self._enqueue(job)
            else:
                self._cancel(job)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _enqueue(self, job: Job) -> None:
        if len(self._waiting) >= self.max_queue:
            self._finish(job, Event(finish="error", message="busy"))
            return
        self._waiting.append(job)

    def _admit(self) -> None:
        while self._waiting and len(self._active) < self.max_batch:
            job = self._waiting.popleft()
            try:
                self._begin(job)
            except RuntimeError as exc:
                self._finish(job, Event(finish="error", message=str(exc).splitlines()[0][:300]))
                continue
            self._active.append(job)

    def _begin(self, job: Job) -> None:
        og, opts = self._og, job.options
        request_options = og.RequestOptions()
        request_options.set_max_session_tokens(self.model.max_length)
        job.request = self._engine.create_request(options=request_options)
        turn = og.TurnOptions(job.request)
        extra = 1 if job.guidance is not None else 0  # the end token after a grammar-bounded answer
        turn.set_max_generated_tokens(min(opts.max_new_tokens + extra, self.model.max_length - len(job.prompt_ids)))
        if opts.min_new_tokens:
            turn.set_min_generated_tokens(opts.min_new_tokens)
        turn.set_do_sample(not opts.greedy)
        if not opts.greedy:
            turn.set_temperature(opts.temperature)
            turn.set_top_p(opts.top_p)
            turn.set_top_k(opts.top_k or self.model.manifest.model.vocab_size)
        if job.guidance is not None:
            turn.set_guidance("lark_grammar", job.guidance)
        job.turn = job.request.begin_turn(np.asarray(job.prompt_ids, dtype=np.int32), turn)

    def _step(self) -> None:
        try:
            events = list(self._engine.run(self._buffer))
        except RuntimeError as exc:
            self._fail_all(str(exc).splitlines()[0][:300])
            return
        for ev in events:
            job = next((j for j in self._active if j.request == ev.request), None)
            if job is not None:
                self._dispatch(job, ev)

    def _dispatch(self, job: Job, ev: Any) -> None:
        flags = self._og.EngineEventFlags
        if ev.flags & flags.TOKEN and ev.token is not None:
            token = int(ev.token)
            if token in self.model.stop_token_ids:
                return
            job.generated += 1
            if job.generated <= job.options.max_new_tokens:
                job.on_event(Event(token=token))
        if ev.flags & flags.FAILED:
            self._finish(job, Event(finish="error", message=f"engine failed: {ev.error_code.name}"))
        elif ev.flags & flags.TURN_FINISHED:
            self._finish(job, self._final(job, ev))

    def _final(self, job: Job, ev: Any) -> Event:
        reasons = self._og.FinishReason
        capped = ev.finish_reason in (reasons.MAX_GENERATED_TOKENS, reasons.MAX_SESSION_TOKENS)
        return Event(finish="length" if capped else "stop", prompt_tokens=len(job.prompt_ids),
                     generated_tokens=min(job.generated, job.options.max_new_tokens))

    def _cancel(self, job: Job) -> None:
        if job.done:
            return
        if job in self._waiting:
            self._waiting.remove(job)
        elif job.request is not None and job.turn is not None:
            job.request.cancel_turn(job.turn)
        self._finish(job, Event(finish="cancelled", prompt_tokens=len(job.prompt_ids), generated_tokens=job.generated))

    def _finish(self, job: Job, event: Event) -> None:
        if job.done:
            return
        job.done = True
        if job in self._active:
            self._active.remove(job)
        if job.request is not None:
            job.request.close()
            job.request = None
        job.on_event(event)

    def _fail_all(self, message: str) -> None:
        for job in [*self._active, *self._waiting]:
            self._finish(job, Event(finish="error", message=message))
        self._waiting.clear()

    def _emit_forced(self, job: Job) -> None:
        """A structured answer forced whole (runtime.structured): its tokens, then stop."""
        for token in job.forced or ():
            job.on_event(Event(token=token))
        job.done = True
        job.on_event(Event(finish="stop", prompt_tokens=len(job.prompt_ids), generated_tokens=len(job.forced or ())))
