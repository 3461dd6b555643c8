"""Server settings, checked once."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from phi3_onnx.errors import Phi3OnnxError

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class ServeOptions:
    host: str = LOOPBACK
    port: int = 8000
    api_key: str | None = None
    max_body_bytes: int = 1 << 20  # 1 MiB of JSON per request
    max_queue: int = 256  # requests waiting for a batch slot before 429s
    drain_seconds: float = 60.0  # SIGINT/SIGTERM: how long in-flight requests may take to finish

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise Phi3OnnxError(f"--port must be in 0..65535, got {self.port}")
        if self.api_key is not None and not self.api_key.strip():
            raise Phi3OnnxError("--api-key must not be empty")
        if self.max_body_bytes < 1024:
            raise Phi3OnnxError(f"the body limit must be at least 1024 bytes, got {self.max_body_bytes}")

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def exposure_warning(self) -> str | None:
        """A warning when the server listens beyond this machine without an API key."""
        if self.loopback or self.api_key:
            return None
        return f"listening on {self.host} without --api-key: anyone who can reach this port can use the model"
