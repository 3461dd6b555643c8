"""The execution-provider registry, beside `Target`: one row of data per EP, read by every stage.

    name  ORT name               label     extra                  package provider options        session threads   device probe
    cuda  CUDAExecutionProvider  CUDA      phi3-onnx[cuda]        enable_cuda_graph "1"           genai's           cuda_devices
    dml   DmlExecutionProvider   DirectML  phi3-onnx[directml]    enable_graph_capture "1"        genai's           dml_adapters
    cpu   CPUExecutionProvider   CPU       phi3-onnx[cpu]         -                               0 (all cores)     -

The package stage writes `genai_options` and `session_threads` into genai_config.json; the runtime
chooses by `rank` (device="auto": fastest first) and probes the device named by `probe`
(`runtime.providers.Environment`'s count field; None: always present); eval opens `ort_name`.
cuda: "enable_cuda_graph" "1" makes genai capture one decode step and replay it (needs shared
past/present buffers and a graph without control flow). dml: "enable_graph_capture" "1" is the key
the model builder writes for DirectML (genai turns it into ORT's "ep.dml.enable_graph_capture").
dml: ORT's DmlOperatorGroupQueryAttention reads query, key, value and seqlens_k only: it applies neither
local_window_size nor attention_bias (graphs that need them attend in plain ops over GQA's present cache).
cpu: "intra_op_num_threads" 0 is ONNX Runtime's one thread per physical core of the machine that runs
the package (never a count from the exporting machine); without the key genai 0.18 runs one thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from phi3_onnx.registry import registry

ProviderName = Literal["cpu", "cuda", "dml"]


@dataclass(frozen=True)
class ProviderInfo:
    name: ProviderName
    ort_name: str
    label: str
    extra: str  # the pip extra that installs its onnxruntime build
    rank: int  # device="auto" preference: lower first
    genai_options: dict[str, str] = field(default_factory=dict)  # genai_config provider_options
    session_threads: dict[str, int] = field(default_factory=dict)  # genai_config session_options
    probe: str | None = None  # the device count that must be > 0 (runtime.providers.Environment)
    capture_option: str | None = None  # the genai_options key that turns graph capture on ("1") or off ("0")
    # whether the EP's com.microsoft.GroupQueryAttention applies local_window_size / attention_bias (input 10)
    gqa_applies_window: bool = True
    gqa_applies_bias: bool = True

    def provider_options(self, capture: bool = True) -> list[dict[str, dict[str, str]]]:
        """genai_config's `session_options.provider_options` for a package built for this EP; capture False:
        the graph has an op that cannot be captured, so the capture option says "0"."""
        options = dict(self.genai_options)
        if not capture and self.capture_option is not None:
            options[self.capture_option] = "0"
        return [{self.name: options}] if options else []


PROVIDERS: dict[str, ProviderInfo] = registry((
    ProviderInfo("cuda", "CUDAExecutionProvider", "CUDA", "phi3-onnx[cuda]", rank=0,
                 genai_options={"enable_cuda_graph": "1"}, probe="cuda_devices", capture_option="enable_cuda_graph"),
    ProviderInfo("dml", "DmlExecutionProvider", "DirectML", "phi3-onnx[directml]", rank=1,
                 genai_options={"enable_graph_capture": "1"}, probe="dml_adapters", capture_option="enable_graph_capture",
                 gqa_applies_window=False, gqa_applies_bias=False),
    ProviderInfo("cpu", "CPUExecutionProvider", "CPU", "phi3-onnx[cpu]", rank=2,
                 session_threads={"intra_op_num_threads": 0}),
), key=lambda p: p.name, what="provider")

PROVIDER_ORDER: tuple[str, ...] = tuple(sorted(PROVIDERS, key=lambda n: PROVIDERS[n].rank))
ORT_NAMES: dict[str, str] = {n: p.ort_name for n, p in PROVIDERS.items()}

__all__ = ["ORT_NAMES", "PROVIDERS", "PROVIDER_ORDER", "ProviderInfo", "ProviderName"]
