"""Execution-provider and bundle-variant choice (pure functions over simulated machines), versions, options."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from phi3_onnx.errors import Phi3OnnxError
from phi3_onnx.manifest import Manifest
from phi3_onnx.runtime.deps import check_requires, version_tuple
from phi3_onnx.runtime.options import GenerationOptions, find_stop, safe_prefix_len
from phi3_onnx.runtime.package import Variant, choose_variant
from phi3_onnx.runtime.providers import (Environment, choose_provider, cuda_device_count, dml_adapter_count,
                                         probe_environment)
from phi3_onnx.spec import ModelSpec
from phi3_onnx.targets import QuantRecipe, get_target

CUDA, DML, CPU = "CUDAExecutionProvider", "DmlExecutionProvider", "CPUExecutionProvider"
CUDA_ONLY = Environment((CUDA,), cuda_devices=1)
DML_ONLY = Environment((DML,), dml_adapters=1)
CPU_ONLY = Environment((CPU,))
CUDA_CPU = Environment((CUDA, CPU), cuda_devices=1)
CUDA_WHEEL_NO_GPU = Environment((CUDA, CPU), cuda_devices=0)  # onnxruntime-gpu on a laptop without NVIDIA


# --- choose_provider ---------------------------------------------------------------------
@pytest.mark.parametrize("env, package, expected", [
    (CUDA_ONLY, "cuda", "cuda"),
    (DML_ONLY, "dml", "dml"),
    (CPU_ONLY, "cpu", "cpu"),
    (CUDA_CPU, "cuda", "cuda"),
    (CUDA_CPU, "cpu", "cpu"),  # an fp32 CPU graph does not run on CUDA's fp16-only GQA: stay on CPU
    (Environment((CUDA, DML, CPU), cuda_devices=1, dml_adapters=1), "dml", "dml"),
])
def test_auto_runs_package_on_its_own_provider(env, package, expected):
    choice = choose_provider(env, package)
    assert choice.provider == expected
    assert choice.warning is None


@pytest.mark.parametrize("env, package", [(CPU_ONLY, "cuda"), (CUDA_WHEEL_NO_GPU, "cuda"), (CPU_ONLY, "dml")])
def test_gpu_package_falls_back_to_cpu_with_one_line_warning(env, package):
    choice = choose_provider(env, package, target_name="fp16-x")
    assert choice.provider == "cpu"
    assert choice.warning and "\n" not in choice.warning
    assert "fp16-x" in choice.warning and "CPU" in choice.warning


def test_fallback_warning_says_why():
    assert "no CUDA device" in choose_provider(CUDA_WHEEL_NO_GPU, "cuda").warning
    assert "phi3-onnx[cuda]" in choose_provider(CPU_ONLY, "cuda").warning


@pytest.mark.parametrize("env, package", [(CUDA_ONLY, "cpu"), (DML_ONLY, "cuda"), (DML_ONLY, "cpu")])
def test_no_provider_can_run_it(env, package):
    with pytest.raises(Phi3OnnxError, match="no execution provider"):
        choose_provider(env, package)


def test_cpu_package_on_requested_cuda_is_refused_naming_a_cuda_target():
    with pytest.raises(Phi3OnnxError, match=r"cannot run on the CUDA EP: export a CUDA target") as e:
        choose_provider(CUDA_CPU, "cpu", "cuda", target_name="int4-cpu")
    assert "int4-cpu" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("env, device, needle", [
    (CPU_ONLY, "cuda", r"no CUDAExecutionProvider \(install phi3-onnx\[cuda\]\)"),
    (CUDA_WHEEL_NO_GPU, "cuda", "no CUDA device was found"),
    (CPU_ONLY, "dml", r"install phi3-onnx\[directml\]"),
    (CUDA_ONLY, "cpu", "no CPUExecutionProvider"),
])
def test_requested_device_not_usable(env, device, needle):
    with pytest.raises(Phi3OnnxError, match=needle):
        choose_provider(env, device, device)


def test_requested_cpu_for_gpu_package_warns_and_runs():
    choice = choose_provider(CUDA_CPU, "cuda", "cpu")
    assert choice.provider == "cpu" and "requested" in choice.warning


def test_unknown_device():
    with pytest.raises(Phi3OnnxError, match="unknown device 'tpu'"):
        choose_provider(CPU_ONLY, "cpu", "tpu")


def test_this_machine_for_real():
    """The real probes on this machine (CI: onnxruntime CPU wheel, no GPU)."""
    env = probe_environment()
    assert CPU in env.providers and env.dml_adapters == 0
    has_gpu = shutil.which("nvidia-smi") is not None  # CI: no; the lent GPU machine: yes
    assert (cuda_device_count() > 0) == has_gpu and dml_adapter_count() == 0
    # an onnxruntime-gpu wheel here lists CUDA; the probe decides whether a device is behind it
    wheel_only = probe_environment(providers=(CUDA, CPU))
    assert choose_provider(wheel_only, "cuda").provider == ("cuda" if has_gpu else "cpu")
    assert choose_provider(env, "cpu").provider == "cpu"
    if CUDA in env.providers and has_gpu:  # an onnxruntime-gpu install on a GPU machine
        assert choose_provider(env, "cuda").provider == "cuda"
        return
    fallback = choose_provider(env, "cuda", target_name="fp16-cuda")
    assert fallback.provider == "cpu" and fallback.warning
    with pytest.raises(Phi3OnnxError, match="device cuda requested"):
        choose_provider(env, "cpu", "cuda")


# --- bundle variants ---------------------------------------------------------------------
def _variant(name: str, provider: str, io_dtype: str, method: str | None) -> Variant:
    base = get_target("int4-cpu")
    quant = QuantRecipe(method=method) if method else None
    target = dataclasses.replace(base, name=name, provider=provider, io_dtype=io_dtype, quant=quant)
    spec = ModelSpec(64, 128, 2, 4, 2, 100, 256, 256)
    return Variant(name, Path(name), Manifest(target, spec, 256, {}, {}, {}, "t"))


ALL = [
    _variant("fp32-cpu", "cpu", "float32", None),
    _variant("int4-cpu", "cpu", "float32", "rtn"),
    _variant("int4-awq-cpu", "cpu", "float32", "awq"),
    _variant("fp16-cuda", "cuda", "float16", None),
    _variant("int4-cuda", "cuda", "float16", "rtn"),
    _variant("int4-awq-dml", "dml", "float16", "awq"),
]


def _pick(env: Environment, names: list[str], device: str = "auto") -> str:
    variants = [v for v in ALL if v.name in names]
    return choose_variant(env, variants, device)[0].name


def test_variant_preferences():
    assert _pick(CUDA_CPU, [v.name for v in ALL]) == "int4-cuda"
    assert _pick(CUDA_CPU, ["fp16-cuda", "fp32-cpu", "int4-cpu"]) == "fp16-cuda"
    assert _pick(Environment((DML, CPU), dml_adapters=1), [v.name for v in ALL]) == "int4-awq-dml"
    assert _pick(CPU_ONLY, [v.name for v in ALL]) == "int4-awq-cpu"
    assert _pick(CPU_ONLY, ["fp32-cpu", "int4-cpu", "fp16-cuda"]) == "int4-cpu"
    assert _pick(CPU_ONLY, ["fp32-cpu", "fp16-cuda"]) == "fp32-cpu"  # native before fallback
    assert _pick(CUDA_CPU, ["fp32-cpu", "int4-cpu"]) == "int4-cpu"  # a CPU bundle on a GPU machine
    assert _pick(CUDA_CPU, [v.name for v in ALL], device="cpu") == "int4-awq-cpu"


def test_gpu_only_bundle_on_cpu_machine_falls_back_with_warning():
    variant, choice = choose_variant(CPU_ONLY, [v for v in ALL if v.name in ("fp16-cuda", "int4-cuda")])
    assert variant.name == "int4-cuda" and choice.provider == "cpu" and choice.warning


def test_named_variant():
    variant, choice = choose_variant(CUDA_CPU, ALL, variant="fp32-cpu")
    assert variant.name == "fp32-cpu" and choice.provider == "cpu"
    with pytest.raises(Phi3OnnxError, match="no variant 'int8-npu'.*int4-cpu"):
        choose_variant(CUDA_CPU, ALL, variant="int8-npu")


def test_bundle_that_cannot_run_here():
    with pytest.raises(Phi3OnnxError, match="no variant of this bundle can run here"):
        choose_variant(DML_ONLY, [v for v in ALL if v.manifest.target.provider == "cuda"])


# --- versions and options ------------------------------------------------------------------
def test_check_requires():
    check_requires({"onnxruntime": "1.20.0"}, {"onnxruntime": "1.31.1"})
    with pytest.raises(Phi3OnnxError, match=r"needs onnxruntime-genai>=0\.9\.0 but 0\.8\.2 is installed"):
        check_requires({"onnxruntime-genai": "0.9.0"}, {"onnxruntime-genai": "0.8.2"})
    with pytest.raises(Phi3OnnxError, match="not installed"):
        check_requires({"onnxruntime-genai": "0.5.0"}, {})
    assert version_tuple("1.22.0rc1") == (1, 22, 0) and version_tuple("0.10.0") > version_tuple("0.9.9")


@pytest.mark.parametrize("kwargs, needle", [
    ({"temperature": -0.5}, "temperature must be >= 0"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"stop": ("",)}, "stop strings"),
])
def test_bad_generation_options(kwargs, needle):
    with pytest.raises(Phi3OnnxError, match=needle):
        GenerationOptions(**kwargs)


def test_search_options():
    assert GenerationOptions().search_options(100, 10) == {"max_length": 100, "do_sample": False}
    sampled = GenerationOptions(temperature=0.7, top_p=0.9, seed=3).search_options(100, 10)
    assert sampled["do_sample"] and sampled["top_k"] == 10 and sampled["random_seed"] == 3


def test_stop_string_helpers():
    assert find_stop("abc STOP def END", ("END", "STOP")) == 4
    assert find_stop("abc", ("x",)) == -1
    assert safe_prefix_len("hello ST", ("STOP",)) == 6  # "ST" may begin "STOP": held back
    assert safe_prefix_len("hello", ("STOP",)) == 5
