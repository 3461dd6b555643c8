"""Where logits come from: an exported package (plain onnxruntime) or the PyTorch checkpoint.

Both kinds satisfy `LogitsSource`, so the reference can be either: the original checkpoint
(fp32 transformers, needs the torch extra) or another package such as the fp32-cpu export
(no PyTorch needed, which is what CI wants).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from phi3_onnx.errors import Phi3OnnxError
from phi3_onnx.targets import needs_shared_kv
from phi3_onnx.targets.providers import ORT_NAMES
from phi3_onnx.manifest import MANIFEST, Manifest, read_manifest

# onnxruntime's name for each Target.provider
EP_NAMES = ORT_NAMES  # targets.providers: our provider name -> onnxruntime's
CPU_EP = EP_NAMES["cpu"]
TORCH_HINT = "pip install 'phi3-onnx[torch]'"


class LogitsSource(Protocol):
    """Maps one window of token ids [T] to logits [T, vocab] (float32), from position 0, no cache."""

    kind: str  # "package" | "checkpoint"
    path: str
    ep: str  # the onnxruntime EP, or "torch-cpu" for the checkpoint

    def logits(self, input_ids: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class EpChoice:
    """The EP a package is built for, the one it runs on here, and why they differ (if they do)."""

    requested: str
    used: str
    note: str | None


def choose_ep(manifest: Manifest, available: list[str]) -> EpChoice:
    """The target's EP when this onnxruntime has it, else the CPU EP (the report says so)."""
    requested = EP_NAMES[manifest.target.provider]
    if requested in available:
        return EpChoice(requested, requested, None)
    note = f"{requested} is not available in this onnxruntime; evaluated on {CPU_EP}"
    return EpChoice(requested, CPU_EP, note)


@dataclass
class PackageSource:
    """A package's model.onnx in an onnxruntime.InferenceSession, fed an empty KV cache."""

    path: str
    manifest: Manifest
    session: Any  # onnxruntime.InferenceSession
    ep: str
    kind: str = "package"

    @classmethod
    def open(cls, folder: Path, ep: str) -> PackageSource:
        """Load the session on `ep`; onnxruntime errors propagate (the caller decides skip vs fail)."""
        import onnxruntime as ort

        manifest = read_manifest(folder)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        session = ort.InferenceSession(str(folder / "model.onnx"), sess_options=opts, providers=[ep])
        return cls(str(folder), manifest, session, ep)

    def feeds(self, input_ids: np.ndarray) -> dict[str, np.ndarray]:
        """Inputs by name from the graph itself, so position_ids-style graphs are fed too."""
        spec, n = self.manifest.model, int(input_ids.shape[0])
        empty = np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), dtype=self.manifest.target.io_dtype)
        known = {
            "input_ids": input_ids[None, :].astype(np.int64),
            "attention_mask": np.ones((1, n), dtype=np.int64),
            "position_ids": np.arange(n, dtype=np.int64)[None, :],
        }
        feeds = {}
        for inp in self.session.get_inputs():
            if inp.name not in known and not inp.name.startswith("past_key_values."):
                raise Phi3OnnxError(f"{self.path}: model.onnx has an unexpected input {inp.name!r}")
            feeds[inp.name] = known.get(inp.name, empty)
        return feeds

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        if needs_shared_kv(self.manifest.model, self.manifest.target):
            return self._shared_kv_logits(input_ids)
        (out,) = self.session.run(["logits"], self.feeds(input_ids))
        return np.asarray(out[0], dtype=np.float32)

    def _shared_kv_logits(self, input_ids: np.ndarray) -> np.ndarray:
        """Phi-3-small's SparseAttention graphs: past and present bound to one zeroed buffer of the window's length."""
        import onnxruntime as ort

        spec, n = self.manifest.model, int(input_ids.shape[0])
        device = "cuda" if self.ep == "CUDAExecutionProvider" else "cpu"
        io = self.session.io_binding()
        for name, value in self.feeds(input_ids).items():
            if not name.startswith("past_key_values."):
                io.bind_cpu_input(name, value)
                continue
            buf = np.zeros((1, spec.num_kv_heads, n, spec.head_dim), dtype=self.manifest.target.io_dtype)
            kv = ort.OrtValue.ortvalue_from_numpy(buf, device, 0)
            io.bind_ortvalue_input(name, kv)
            io.bind_ortvalue_output(name.replace("past_key_values.", "present."), kv)
        io.bind_output("logits", "cpu")
        self.session.run_with_iobinding(io)
        return np.asarray(io.copy_outputs_to_cpu()[-1][0], dtype=np.float32)


@dataclass
class CheckpointSource:
    """The original checkpoint in transformers' Phi3ForCausalLM, fp32 on the CPU."""

    path: str
    model: Any  # transformers.Phi3ForCausalLM
    ep: str = "torch-cpu"
    kind: str = "checkpoint"

    @classmethod
    def open(cls, checkpoint: str) -> CheckpointSource:
        torch, model_class = _import_torch(checkpoint)
        try:
            model = model_class.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="eager")
        except (OSError, ValueError) as exc:
            raise Phi3OnnxError(f"--reference {checkpoint}: cannot load the checkpoint ({first_line(exc)})") from None
        return cls(str(checkpoint), model.eval())

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.model(torch.from_numpy(input_ids.astype(np.int64))[None, :]).logits
        return out[0].float().numpy()


def _import_torch(checkpoint: str) -> tuple[Any, Any]:
    """torch and Phi3ForCausalLM, imported only for a checkpoint reference (the optional torch extra)."""
    try:
        import torch
        from transformers import Phi3ForCausalLM
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise Phi3OnnxError(
            f"--reference {checkpoint} is a checkpoint, which needs PyTorch: {TORCH_HINT} "
            "(or pass an exported fp32-cpu package as --reference)"
        ) from None
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # config-format advice is noise in a CI log
    return torch, Phi3ForCausalLM


def first_line(exc: BaseException) -> str:
    """An exception as one short line (onnxruntime messages run over many)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def open_reference(reference: str) -> LogitsSource:
    """A package folder (has manifest.json) runs on its target's EP; anything else is a checkpoint."""
    path = Path(reference)
    if (path / MANIFEST).is_file():
        try:
            return PackageSource.open(path, _reference_ep(path))
        except Phi3OnnxError:
            raise
        except Exception as exc:  # onnxruntime's own exception types
            raise Phi3OnnxError(f"--reference {reference}: cannot load the package ({first_line(exc)})") from None
    if path.is_dir() and not (path / "config.json").is_file():
        raise Phi3OnnxError(f"--reference {reference} is neither a package (manifest.json) nor a checkpoint (config.json)")
    if not path.exists() and reference.count("/") != 1:
        raise Phi3OnnxError(f"--reference {reference} not found")
    return CheckpointSource.open(reference)


def _reference_ep(folder: Path) -> str:
    import onnxruntime as ort

    return choose_ep(read_manifest(folder), ort.get_available_providers()).used
