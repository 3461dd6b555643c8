"""Locating a checkpoint: a local folder, or a Hugging Face hub id fetched with huggingface_hub."""

from __future__ import annotations

from pathlib import Path

from phi3_onnx.errors import Phi3OnnxError

HUB_FILE_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "LICENSE*", "README*", "*.md"]


def resolve_model(model: str, cache_dir: str | None = None) -> Path:
    """A local checkpoint folder when `model` exists on disk, else a hub id fetched with huggingface_hub."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise Phi3OnnxError(f"--model {model} is a file; pass the checkpoint folder")
        return path
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        raise Phi3OnnxError(f"model folder not found: {model}")
    return _download(model, cache_dir)


def _download(repo_id: str, cache_dir: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILE_PATTERNS, cache_dir=cache_dir))
    except Exception as exc:  # offline, unknown repo, gated, ...: one line naming the model
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise Phi3OnnxError(
            f"{repo_id} is not a local folder and could not be fetched from the Hugging Face hub ({reason})"
        ) from None
