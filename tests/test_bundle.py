"""Bundles: one folder per target + bundle.json, written atomically, loaded by device."""

from __future__ import annotations

import json

import pytest

from phi3_onnx.cli import main
from phi3_onnx.errors import Phi3OnnxError
from phi3_onnx.package import bundle as bundle_mod
from phi3_onnx.package.bundle import export_bundle
from phi3_onnx.manifest import read_manifest
from phi3_onnx.runtime import load, plan_load


@pytest.fixture(scope="module")
def bundle(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "tiny-bundle"
    argv = ["export", "-m", str(tiny_ckpt), "-t", "int4-cpu", "-t", "fp32-cpu", "-t", "fp16-cuda", "-o", str(out), "-q"]
    assert main(argv) == 0
    return out


def test_bundle_layout(bundle, exported):
    doc = json.loads((bundle / "bundle.json").read_text())
    assert [v["name"] for v in doc["variants"]] == ["int4-cpu", "fp32-cpu", "fp16-cuda"]
    assert sorted(p.name for p in bundle.iterdir()) == ["bundle.json", "fp16-cuda", "fp32-cpu", "int4-cpu"]
    for name in ("int4-cpu", "fp32-cpu", "fp16-cuda"):
        variant = bundle / name
        assert read_manifest(variant).target.name == name
        # self-contained and byte-identical to a single-target export of the same target
        single = exported(name)
        assert sorted(p.name for p in variant.iterdir()) == sorted(p.name for p in single.iterdir())
        assert (variant / "model.onnx.data").read_bytes() == (single / "model.onnx.data").read_bytes()


def test_load_picks_variant_for_this_cpu_machine(bundle, exported):
    model = load(bundle)
    assert model.variant == "int4-cpu" and model.provider == "cpu"
    reference = load(exported("int4-cpu"))
    assert model.generate("The committee reviewed", max_new_tokens=15) == reference.generate("The committee reviewed", max_new_tokens=15)
    assert load(bundle, variant="fp32-cpu").manifest.target.name == "fp32-cpu"
    with pytest.raises(Phi3OnnxError, match="no variant 'int4-cuda'"):
        plan_load(bundle, variant="int4-cuda")


def test_failed_bundle_leaves_nothing(tiny_ckpt, tmp_path, monkeypatch):
    real = bundle_mod.pipeline.export
    calls = []

    def flaky(model, target, output, *args, **kw):
        calls.append(target)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(model, target, output, *args, **kw)

    monkeypatch.setattr(bundle_mod.pipeline, "export", flaky)
    with pytest.raises(RuntimeError, match="disk full"):
        export_bundle(tiny_ckpt, ["int4-cpu", "fp32-cpu"], tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


def test_bundle_bad_targets_fail_before_writing(capsys, tiny_ckpt, tmp_path):
    for targets, needle in ((["int4-cpu", "int4-cpu"], "target given twice"), (["int4-cpu", "int9-npu"], "unknown target")):
        argv = ["export", "-m", str(tiny_ckpt), "-o", str(tmp_path / "b")] + [a for t in targets for a in ("-t", t)]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_info_on_bundle(capsys, bundle):
    assert main(["info", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "3 variants: int4-cpu, fp32-cpu, fp16-cuda" in out and "variant:    int4-cpu" in out and "provider:   cpu" in out
    assert main(["info", str(bundle), "--variant", "fp32-cpu"]) == 0
    assert "target:     fp32-cpu" in capsys.readouterr().out


def test_cuda_variant_runs_on_this_cpu_machine(bundle, caplog):
    """Asked for explicitly, the fp16 CUDA variant falls back to the CPU EP (with a warning) and
    generates what a plain genai loop on the CPU EP does."""
    import numpy as np
    import onnxruntime_genai as og

    with caplog.at_level("WARNING", logger="phi3_onnx"):
        model = load(bundle, variant="fp16-cuda")
    assert model.provider == "cpu" and "fp16-cuda is built for CUDA" in caplog.text
    config = og.Config(str(bundle / "fp16-cuda"))
    config.clear_providers()
    ref_model = og.Model(config)
    ids = model.encode("The committee reviewed the proposal and")
    params = og.GeneratorParams(ref_model)
    params.set_search_options(max_length=len(ids) + 20, min_length=len(ids) + 20, do_sample=False)
    gen = og.Generator(ref_model, params)
    gen.append_tokens(np.asarray(ids, dtype=np.int32))
    ref = []
    while not gen.is_done():
        gen.generate_next_token()
        ref.append(int(gen.get_next_tokens()[0]))
    got = model.generate("The committee reviewed the proposal and", max_new_tokens=20, min_new_tokens=20)
    assert len(ref) == 20 and got == og.Tokenizer(ref_model).decode(ref)
