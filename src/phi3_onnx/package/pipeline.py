"""The export pipeline: checkpoint → spec → graph (lazy weights) → quantizer → package folder.

Fixed steps, each a small function: resolve → read spec → check tensors → build graph →
quantizer prepares the weights → stream-save into a temp folder → genai_config + tokenizer +
manifest (with the recipe that ran) → rename into place. Nothing half-written is left behind:
on any error the temp folder is removed.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx_ir as ir

from phi3_onnx.checkpoint import SafetensorsCheckpoint, check_tensors, open_checkpoint, resolve_model, spec_from_folder
from phi3_onnx.checkpoint import tiktoken
from phi3_onnx.errors import Phi3OnnxError
from phi3_onnx.checkpoint.tensors import TENSORS
from phi3_onnx.graph import WeightSource, build_model
from phi3_onnx.graph.rope import rope_cache_rows
from phi3_onnx.manifest import MIN_VERSIONS, Manifest, file_entries, write_manifest
from phi3_onnx.package.genai_config import default_max_length, genai_config
from phi3_onnx.package.options import ExportOptions
from phi3_onnx.package.staging import check_destination, preview_destination, staged_folder
from phi3_onnx.package.verify import available_memory, check_loadable
from phi3_onnx.package.window_free import WINDOW_FREE_DECODER, wants_window_free, write_window_free
from phi3_onnx.progress import task
from phi3_onnx.safety import pause_point, pause_requested
from phi3_onnx.quantize import QuantizeInput, Quantized, get_quantizer
from phi3_onnx.spec import ModelSpec
from phi3_onnx.targets import Target, get_target
from phi3_onnx.version import __version__

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
    options: ExportOptions
    awq_ram_bytes: int = 0  # the part of peak_ram_bytes that AWQ calibration adds (0 for other targets)


def _tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"phi3-onnx": __version__, "python": platform.python_version()}
    for dist in ("onnx", "onnx-ir", "onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-genai"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def resolve_target(target: str | Target, options: ExportOptions) -> Target:
    """The registry target with the options' int4 overrides applied."""
    try:
        t = get_target(target) if isinstance(target, str) else target
        return t.with_overrides(block_size=options.block_size, accuracy_level=options.accuracy_level,
                                quantize_embedding=options.quantize_embedding)
    except (KeyError, ValueError) as exc:
        raise Phi3OnnxError(str(exc.args[0])) from None


def _with_context(spec: ModelSpec, tokens: int | None) -> ModelSpec:
    try:
        return spec if tokens is None else spec.with_context(tokens)
    except ValueError as exc:
        raise Phi3OnnxError(f"--context-length: {exc}") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def _check_tokenizer(source: Path, spec: ModelSpec | None = None, options: ExportOptions | None = None) -> None:
    """genai loads the tokenizer from the package folder: a checkpoint without one exports an unusable package."""
    if spec is not None and spec.small is not None:  # Phi-3-small: tiktoken ranks, converted when packaging
        tiktoken.find_ranks(source, options.tiktoken if options else None)
        return
    if not any((source / f).is_file() for f in TOKENIZER_FILES):
        raise Phi3OnnxError(f"{source} has no tokenizer ({' or '.join(TOKENIZER_FILES)}): the package could not tokenize")


def _peak_ram(spec: ModelSpec, largest_tensor: int, target: Target) -> int:
    """Expected peak RSS: the graph's rotary caches (built in float32, then cast), one tensor at a
    time (raw bytes + float32 copy + transposed/quantized copies), the interpreter; AWQ adds
    `_awq_ram`."""
    rope = rope_cache_rows(spec) * (spec.rotary_dim // 2) * 4 * 2 * 2
    return rope + largest_tensor * 2 * 4 + 700 * 2**20 + _awq_ram(spec, target)


def _awq_ram(spec: ModelSpec, target: Target) -> int:
    """AWQ's extra: one layer's float32 weights (three copies) and the calibration hidden states (Phi-3-small:
    the same roles and shapes; its biases, LayerNorm betas and [heads, 256, 256] attention masks add little)."""
    if target.quant is None or target.quant.method != "awq":
        return 0
    if spec.moe is not None:
        return _awq_moe_ram(spec)
    layer = sum(t.shape(spec)[0] * (t.shape(spec)[1] if len(t.shape(spec)) > 1 else 1)
                for r, t in TENSORS.items() if t.per_layer) * 4
    # GPTQ rounding: its codes (4 bits per weight of every int4 linear, kept until the weights are
    # written), one layer's full input Grams (float32) and the float64 Cholesky work on the widest one
    codes = (layer // 4 * spec.num_layers + spec.vocab_size * spec.hidden_size) // 2
    widest = max(spec.hidden_size, spec.intermediate_size)
    grams = (3 * spec.hidden_size ** 2 + spec.intermediate_size ** 2) * 4
    return 3 * layer + 8 * 256 * spec.hidden_size * 4 * 4 + codes + grams + widest * widest * 20


def _awq_moe_ram(spec: ModelSpec) -> int:
    """Phi-3.5-MoE's AWQ extra (quantize/awq_moe.py): the attention weights and router, every expert's searched
    rows, one expert at a time (three copies), the calibration states (hidden, MoE input, expert outputs), one
    expert's full input Grams plus the Cholesky work, and GPTQ's codes for every int4 weight (kept until written)."""
    h, i, e, kv = spec.hidden_size, spec.intermediate_size, spec.moe.num_experts, spec.kv_dim
    attention = (h * (h + 2 * kv) + h * h + e * h) * 4
    expert = 3 * h * i * 4
    tokens = 8 * 256
    states = tokens * h * 4 * 8 + tokens * i * 4 * 2
    grams = (h * h + i * i) * 4 + max(h, i) ** 2 * 20
    codes = (spec.num_layers * (h * (h + 2 * kv) + h * h + e * expert // 4) + spec.vocab_size * h) // 2
    return 3 * attention + 3 * expert + e * 2 * min(i, 512) * h * 4 + states + grams + codes


def _check_memory(spec: ModelSpec, peak: int) -> None:
    """Refuse up front what this machine cannot hold (never cap it silently)."""
    free = available_memory()
    if peak <= free:
        return
    gib = 2**30
    raise Phi3OnnxError(
        f"exporting this model needs ~{peak / gib:.1f} GiB (context {spec.max_position_embeddings} tokens: "
        f"max_position_embeddings in config.json); this machine has {free / gib:.1f} GiB available "
        "(use --context-length to cap the context)")


def plan_export(model: str, target: str | Target, output: str | os.PathLike,
                options: ExportOptions = ExportOptions()) -> tuple[ExportPlan, SafetensorsCheckpoint]:
    """Validate every input before anything is written."""
    tgt = resolve_target(target, options)
    source = resolve_model(model)
    spec = _with_context(spec_from_folder(source), options.context_length)
    _check_tokenizer(source, spec, options)
    ckpt = open_checkpoint(source, spec)
    check_tensors(ckpt, spec)
    length = default_max_length(spec) if options.max_length is None else options.max_length
    if not 0 < length <= spec.max_position_embeddings:
        raise Phi3OnnxError(f"--max-length must be in 1..{spec.max_position_embeddings}, got {length}")
    largest = max(e.end - e.begin for e in ckpt.entries.values())
    peak = _peak_ram(spec, largest, tgt)
    _check_memory(spec, peak)
    graph = build_model(spec, tgt, ckpt)
    weight_bytes = sum(v.const_value.nbytes for v in graph.graph.initializers.values())
    # an initializer built from several checkpoint tensors (Phi-3.5-MoE's stacked experts) is held whole,
    # in float32 plus its output, by each save worker
    stacked = max(v.const_value.size for v in graph.graph.initializers.values()) * 4 * 2 * SAVE_WORKERS
    if stacked > largest * 2 * 4:
        peak += stacked - largest * 2 * 4
        _check_memory(spec, peak)
    files = ("model.onnx", "model.onnx.data", "genai_config.json", "manifest.json", *(p.name for p in _aux_files(source)))
    if wants_window_free(spec, tgt):
        files += (WINDOW_FREE_DECODER,)
    if spec.small is not None:  # written by the tiktoken conversion
        files = tuple(dict.fromkeys((*files, "tokenizer.json", "tokenizer_config.json")))
    plan = ExportPlan(source, spec, tgt, Path(output), length, weight_bytes, peak, tuple(sorted(files)), options,
                      _awq_ram(spec, tgt))
    return plan, ckpt


def dry_run(model: str, targets: list[str], output: str | os.PathLike, options: ExportOptions = ExportOptions(),
            *, force: bool = False) -> list[ExportPlan]:
    """The plans a real export would follow (one per target; several: output/<target>), refusing what it would refuse."""
    output = Path(output)
    preview_destination(output, resolve_model(model), force)
    plans = []
    for name in targets:
        out = output / name if len(targets) > 1 else output
        plans.append(plan_export(model, name, out, options.for_target(resolve_target(name, ExportOptions())))[0])
    return plans


def _aux_files(source: Path) -> list[Path]:
    """What the export copies from the checkpoint: the tokenizer/config files, then the licence and readme."""
    files = [source / name for name in AUX_FILES if (source / name).is_file()]
    for pattern in LICENSE_GLOBS:
        files += [path for path in sorted(source.glob(pattern)) if path.is_file()]
    return files


def _copy_aux(source: Path, dest: Path) -> None:
    for path in _aux_files(source):
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


def write_package(plan: ExportPlan, quantized: Quantized, dest: Path, progress: bool = True) -> None:
    """Build the graph over the quantizer's weights and write the whole package into `dest` (an empty folder)."""
    quant = plan.target.quant
    pack = get_quantizer(quant.method).packer() if quant else None
    model = build_model(plan.spec, plan.target, quantized.weights, pack)
    # the callback fires once per tensor written to model.onnx.data (info.total of them); initializers
    # under onnx_ir's size threshold stay inside model.onnx, so len(initializers) is not the count
    total = len(model.graph.initializers)
    with task(f"Writing {plan.target.name} weights", total, progress) as advance:
        # two workers: one reads/widens a tensor while the other quantizes (both release the GIL). A test
        # pausing mid-weights saves on the main thread: onnx_ir runs callbacks under one lock, so a
        # pause in a worker's callback would stall the other worker and the main thread's wait with it.
        workers = None if pause_requested("export:weights") else SAVE_WORKERS
        ir.save(model, dest / "model.onnx", external_data="model.onnx.data", max_workers=workers,
                max_in_flight_bytes=1 << 30, callback=lambda tensor, info: _saved(advance, info.total))
    window_free = write_window_free(dest) if wants_window_free(plan.spec, plan.target) else None
    config = genai_config(plan.spec, plan.target, plan.max_length)
    (dest / "genai_config.json").write_text(json.dumps(config, indent=4) + "\n")
    _copy_aux(plan.source, dest)
    if plan.spec.small is not None:
        tiktoken.write_tokenizer(plan.source, dest, plan.spec.vocab_size, plan.options.tiktoken)
    manifest = Manifest(
        target=plan.target, model=plan.spec, max_length=plan.max_length, files=file_entries(dest),
        tool_versions=_tool_versions(), requires=dict(MIN_VERSIONS), source=plan.spec.name,
        recipe=_recipe(plan, quantized), window_free_decoder=window_free,
    )
    write_manifest(dest, manifest)


def _saved(advance, total: int) -> None:
    """One tensor written to model.onnx.data (the saver's own count is the bar's total)."""
    advance(1, total=total)
    pause_point("export:weights")


def _recipe(plan: ExportPlan, quantized: Quantized) -> dict[str, Any]:
    """What actually ran: the quantizer's record (None for float targets) and the context/KV sizes used."""
    return {
        "quantization": quantized.record if plan.target.quant else None,
        "context_length": plan.spec.max_position_embeddings,
        "context_capped": plan.options.context_length is not None,
        "max_length": plan.max_length,
    }


def quantize(plan: ExportPlan, ckpt: SafetensorsCheckpoint, progress: bool) -> Quantized:
    """The target's quantizer over the checkpoint; float targets read the checkpoint as it is."""
    quant = plan.target.quant
    if quant is None:
        return Quantized(ckpt, {})
    job = QuantizeInput(plan.source, ckpt, plan.spec, quant, plan.options.calibration, progress, plan.options.tiktoken)
    return get_quantizer(quant.method).prepare(job)


def export(
    model: str | os.PathLike,
    target: str | Target,
    output: str | os.PathLike,
    options: ExportOptions = ExportOptions(),
    *,
    force: bool = False,
    progress: bool = False,
    weights: WeightSource | None = None,
) -> Path:
    """Export one checkpoint to one target package folder; returns the folder.

    `weights` replaces the quantizer's weight source (tests pass AWQ's views or the plain
    checkpoint); by default the target's quantizer prepares them (RTN: the checkpoint as it is;
    AWQ: calibrated on `options.calibration`).
    """
    source = resolve_model(str(model))
    dest = check_destination(output, source, force)  # exit 2 before any slow work
    plan, ckpt = plan_export(str(source), target, Path(output), options)
    pause_point("export:planned")
    with staged_folder(dest) as tmp:
        if weights is not None:
            quantized = Quantized(weights, {"method": plan.target.quant.method if plan.target.quant else None,
                                            "weights": "supplied by the caller"})
        else:
            quantized = quantize(plan, ckpt, progress)
        write_package(plan, quantized, tmp, progress)
        check_loadable(tmp)
    return Path(output)
