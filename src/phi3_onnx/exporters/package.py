"""The export pipeline: checkpoint → spec → graph (lazy weights) → package folder.

Fixed steps, each a small function: resolve → read spec → check tensors → build graph →
stream-save into a temp folder → genai_config + tokenizer + manifest → rename into place.
Nothing half-written is left behind: on any error the temp folder is removed.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir

from phi3_onnx import __version__
from phi3_onnx.errors import Phi3OnnxError
from phi3_onnx.exporters.checkpoint import SafetensorsCheckpoint, check_tensors, resolve_model, spec_from_folder
from phi3_onnx.exporters.genai_config import default_max_length, genai_config
from phi3_onnx.exporters.graph import WeightSource, build_model
from phi3_onnx.manifest import MIN_VERSIONS, Manifest, file_entries, write_manifest
from phi3_onnx.progress import task
from phi3_onnx.spec import ModelSpec
from phi3_onnx.targets import Target, get_target

# Files copied from the checkpoint so the package is self-contained (genai reads the tokenizer
# from the model folder) and keeps the model's licence terms.
AUX_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "chat_template.jinja", "generation_config.json", "config.json",
)
SAVE_WORKERS = 2
LICENSE_GLOBS = ("LICENSE*", "README*", "NOTICE*", "CODE_OF_CONDUCT*")


@dataclass(frozen=True)
class ExportPlan:
    """What an export would write (for --dry-run) and the memory it is expected to need."""

    source: Path
    spec: ModelSpec
    target: Target
    output: Path
    max_length: int
    weight_bytes: int
    peak_ram_bytes: int
    files: tuple[str, ...]


def _tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"phi3-onnx": __version__, "python": platform.python_version()}
    for dist in ("onnx", "onnx-ir", "onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-genai"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def _resolve_target(target: str | Target, block_size: int | None, accuracy_level: int | None) -> Target:
    try:
        t = get_target(target) if isinstance(target, str) else target
        return t.with_overrides(block_size=block_size, accuracy_level=accuracy_level)
    except (KeyError, ValueError) as exc:
        raise Phi3OnnxError(str(exc.args[0])) from None


def _with_context(spec: ModelSpec, tokens: int | None) -> ModelSpec:
    try:
        return spec if tokens is None else spec.with_context(tokens)
    except ValueError as exc:
        raise Phi3OnnxError(f"--context-length: {exc}") from None


def _check_block_size(spec: ModelSpec, target: Target) -> None:
    if target.quant is None:
        return
    bs = target.quant.block_size
    for k in (spec.hidden_size, spec.intermediate_size):
        if k % bs:
            raise Phi3OnnxError(f"block size {bs} does not divide the layer width {k}")


def plan_export(
    model: str,
    target: str | Target,
    output: str | os.PathLike,
    *,
    max_length: int | None = None,
    block_size: int | None = None,
    accuracy_level: int | None = None,
    context_length: int | None = None,
) -> tuple[ExportPlan, SafetensorsCheckpoint]:
    """Validate every input before anything is written."""
    tgt = _resolve_target(target, block_size, accuracy_level)
    source = resolve_model(model)
    spec = _with_context(spec_from_folder(source), context_length)
    _check_block_size(spec, tgt)
    ckpt = SafetensorsCheckpoint(source)
    check_tensors(ckpt, spec)
    length = max_length or default_max_length(spec)
    if not 0 < length <= spec.max_position_embeddings:
        raise Phi3OnnxError(f"--max-length must be in 1..{spec.max_position_embeddings}, got {length}")
    graph = build_model(spec, tgt, ckpt)
    weight_bytes = sum(v.const_value.nbytes for v in graph.graph.initializers.values())
    largest = max(e.end - e.begin for e in ckpt.entries.values())
    # one tensor at a time: raw bytes + float32 copy + transposed/quantized copies, plus the interpreter
    peak = largest * 2 * 4 + 700 * 2**20
    files = ("model.onnx", "model.onnx.data", "genai_config.json", "manifest.json",
             *[f for f in AUX_FILES if (source / f).is_file()])
    plan = ExportPlan(source, spec, tgt, Path(output), length, weight_bytes, peak, files)
    return plan, ckpt


def _copy_aux(source: Path, dest: Path) -> None:
    for name in AUX_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, dest / name)
    for pattern in LICENSE_GLOBS:
        for path in sorted(source.glob(pattern)):
            if path.is_file():
                shutil.copy2(path, dest / path.name)
    _inline_chat_template(dest)


def _inline_chat_template(dest: Path) -> None:
    """transformers 5 saves the chat template beside tokenizer_config.json; genai reads it from inside."""
    cfg_path, tpl = dest / "tokenizer_config.json", dest / "chat_template.jinja"
    if not (cfg_path.is_file() and tpl.is_file()):
        return
    cfg = json.loads(cfg_path.read_text())
    if "chat_template" not in cfg:
        cfg["chat_template"] = tpl.read_text()
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def write_package(plan: ExportPlan, weights: WeightSource, dest: Path, progress: bool = True) -> None:
    """Build the graph over `weights` and write the whole package into `dest` (an empty folder)."""
    model = build_model(plan.spec, plan.target, weights)
    total = len(model.graph.initializers)
    with task(f"Writing {plan.target.name} weights", total, progress) as advance:
        # two workers: one reads/widens a tensor while the other quantizes (both release the GIL)
        ir.save(model, dest / "model.onnx", external_data="model.onnx.data", max_workers=SAVE_WORKERS,
                max_in_flight_bytes=1 << 30, callback=lambda tensor, info: advance(1))
    config = genai_config(plan.spec, plan.target, plan.max_length)
    (dest / "genai_config.json").write_text(json.dumps(config, indent=4) + "\n")
    _copy_aux(plan.source, dest)
    manifest = Manifest(
        target=plan.target, model=plan.spec, max_length=plan.max_length, files=file_entries(dest),
        tool_versions=_tool_versions(), requires=dict(MIN_VERSIONS), source=plan.spec.name,
    )
    write_manifest(dest, manifest)


def temp_folder_for(output: Path) -> Path:
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def refuse_existing(output: Path, force: bool) -> None:
    """Checked before any slow work starts, and again when the folder is staged."""
    if output.exists() and not force:
        raise Phi3OnnxError(f"output {output} exists; pass --force to replace it")


@contextmanager
def staged_folder(output: Path, force: bool) -> Iterator[Path]:
    """A temp folder beside `output`, renamed into place on success and removed on any error."""
    refuse_existing(output, force)
    tmp = temp_folder_for(output)
    try:
        yield tmp
        if output.exists():
            shutil.rmtree(output) if output.is_dir() else output.unlink()
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _awq_weights(plan: ExportPlan, calibration: str | None, samples: int | None, progress: bool) -> WeightSource | None:
    """AWQ's rescaled view of the checkpoint for AWQ targets, else None (imported lazily: needs torch)."""
    if plan.target.quant is None or plan.target.quant.method != "awq":
        return None
    try:
        from phi3_onnx.quantize import awq
    except ModuleNotFoundError as exc:
        if exc.name not in ("torch", "tokenizers"):
            raise
        raise Phi3OnnxError("AWQ calibration needs PyTorch: pip install 'phi3-onnx[awq]'") from None
    return awq.awq_weights(plan.source, plan.spec, plan.target.quant, calibration,
                           samples or awq.DEFAULT_SAMPLES, progress=progress)


def export(
    model: str | os.PathLike,
    target: str | Target,
    output: str | os.PathLike,
    *,
    force: bool = False,
    max_length: int | None = None,
    block_size: int | None = None,
    accuracy_level: int | None = None,
    progress: bool = False,
    weights: WeightSource | None = None,
    calibration: str | None = None,
    calibration_samples: int | None = None,
    context_length: int | None = None,
) -> Path:
    """Export one checkpoint to one target package folder; returns the folder.

    `weights` replaces the checkpoint as the tensor source (the AWQ quantizer passes its
    rescaled view); by default tensors are streamed from the safetensors files. AWQ targets
    calibrate on `calibration` (a text file; None: the built-in one), `calibration_samples` sequences.
    `context_length` caps the package's context (genai refuses longer sequences); see `ModelSpec.with_context`.
    """
    output = Path(output)
    refuse_existing(output, force)
    plan, ckpt = plan_export(str(model), target, output, max_length=max_length,
                             block_size=block_size, accuracy_level=accuracy_level, context_length=context_length)
    with staged_folder(output, force) as tmp:
        weights = weights or _awq_weights(plan, calibration, calibration_samples, progress) or ckpt
        write_package(plan, weights, tmp, progress)
    return output
