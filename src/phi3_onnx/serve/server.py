"""Running the app: uvicorn on one socket, SIGINT/SIGTERM stop accepting, drain in-flight requests, exit 0."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from phi3_onnx.runtime import Phi3Model
from phi3_onnx.runtime.batch import BatchEngine
from phi3_onnx.serve.app import create_app
from phi3_onnx.serve.options import ServeOptions
from phi3_onnx.serve.service import Service

log = logging.getLogger("phi3_onnx")


class GracefulServer(uvicorn.Server):
    """uvicorn re-raises a caught SIGINT/SIGTERM after its graceful shutdown (the process then dies
    of the signal); here a signal only starts the drain, and serve() returns normally."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, sig: int, frame: object) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C stops without waiting
        self.should_exit = True


def build(model: Phi3Model, options: ServeOptions) -> tuple[uvicorn.Server, BatchEngine]:
    engine = BatchEngine(model, max_queue=options.max_queue).start()
    app = create_app(Service(model, engine), options)
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=options.drain_seconds, lifespan="off")
    return GracefulServer(config), engine


def serve(model: Phi3Model, options: ServeOptions) -> None:
    """Serve until SIGINT/SIGTERM, then let in-flight requests finish (up to drain_seconds)."""
    server, engine = build(model, options)
    try:
        server.run()
    finally:
        engine.close()
