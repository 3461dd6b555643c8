"""A window-free copy of a sliding-window decoder, over the same weights file (issue 10 item 3).

Phi-3-mini-4k attends over a 2047-token sliding window. On ONNX Runtime's CUDA EP a windowed
GroupQueryAttention at head size 96 decodes through Flash split-KV, ~13 % slower than the cuDNN
SDPA path a window-free GQA takes (benchmarks/RESULTS.md). A graph without the window is exact
while no query can see past the window: while the whole sequence is at most `sliding_window` tokens.

So a CUDA package of such a model holds two decoders: `model.onnx` (windowed: what genai_config names,
exact at any length, what plain onnxruntime-genai users run) and `model.nowindow.onnx`, the same graph
with `local_window_size=-1` and the same `model.onnx.data`. `phi3_onnx.runtime` runs the window-free one
and moves a sequence to the windowed one (one re-prefill) when it would pass the window.

With head sizes ORT's XQA decode kernel takes (64, 128, 256) the window costs nothing (Phi-3-medium:
1.00x the builder with the window), so those packages get no copy.

DirectML's GQA kernel ignores local_window_size, so there `model.onnx` attends through plain ops over GQA's
present K/V with the window as a mask (graph.attention.plain_attention): exact at any length, but each layer
attends twice. Its copy drops those nodes and takes GQA's own output (what DML computes without a window:
exact up to the window), whatever the head size.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from phi3_onnx.spec import ModelSpec
from phi3_onnx.targets import Target
from phi3_onnx.targets.providers import PROVIDERS

WINDOW_FREE_DECODER = "model.nowindow.onnx"
XQA_HEAD_SIZES = (64, 128, 256)


def wants_window_free(spec: ModelSpec, target: Target) -> bool:
    """Whether a package of `spec` for `target` gets the window-free decoder copy."""
    if spec.attention_window is None:
        return False
    if not PROVIDERS[target.provider].gqa_applies_window:  # the window is in plain ops: the copy is the fast graph
        return True
    return target.graph.window_free_decoder and spec.head_dim not in XQA_HEAD_SIZES


def write_window_free(folder: Path) -> str:
    """Write `folder`/model.nowindow.onnx: model.onnx with every GQA window removed, and the plain-op window
    attention (graph.attention.plain_attention, `/attn/window/` nodes) replaced by GQA's own output; returns
    its file name. Only the graph proto is read and written (external weights stay references to model.onnx.data).
    """
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    changed = 0
    for node in model.graph.node:
        if node.op_type != "GroupQueryAttention":
            continue
        for attr in node.attribute:
            if attr.name == "local_window_size" and attr.i != -1:
                attr.i = -1
                changed += 1
    if not changed:
        raise ValueError(f"{folder / 'model.onnx'} has no windowed GroupQueryAttention")
    _drop_plain_window(model.graph)
    onnx.save(model, str(folder / WINDOW_FREE_DECODER))
    return WINDOW_FREE_DECODER


def _drop_plain_window(graph: onnx.GraphProto) -> None:
    """Each layer's consumers of `<layer>/attn/window/out` read `<layer>/attn/GroupQueryAttention`'s output
    instead; then the nodes no graph output depends on any more are removed."""
    gqa_out = {n.name.rsplit("/", 1)[0]: n.output[0] for n in graph.node if n.op_type == "GroupQueryAttention"}
    window_out = {n.output[0]: gqa_out[n.name.rsplit("/window/", 1)[0]] for n in graph.node if n.name.endswith("/attn/window/out")}
    if not window_out:
        return
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in window_out:
                node.input[i] = window_out[name]
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    used = {i for n in graph.node for i in n.input}
    live = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(live)


__all__ = ["WINDOW_FREE_DECODER", "wants_window_free", "write_window_free"]
