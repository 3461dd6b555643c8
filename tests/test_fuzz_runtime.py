"""Property-based fuzzing of what a package's JSON files may hold and of the sampling options.

The property everywhere: a clean `Phi3OnnxError` (the CLI's exit 2) or a correct result; never
another exception (the CLI's `error: internal ...`), a traceback or a hang. The budget is small
by default; PHI3_ONNX_FUZZ_EXAMPLES=500 runs a longer campaign.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phi3_onnx.errors import Phi3OnnxError
from phi3_onnx.manifest import BUNDLE_FORMAT, FileEntry, file_entries, read_manifest, sha256_file
from phi3_onnx.runtime import load, plan_load

EXAMPLES = int(os.environ.get("PHI3_ONNX_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# JSON values, small and nasty: wrong types, huge and negative numbers, path-like strings.
PATHS = st.sampled_from(["model.onnx", "../model.onnx", "/etc/passwd", "a/../../x", "", ".", "sub/./x", "C:\\x",
                         "tokenizer.json", "link-out", "link-out/x", "nested/deep/file", "\x00", "int4-cpu"])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=12), PATHS)
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                     st.dictionaries(st.text(max_size=8) | PATHS, inner, max_size=3)),
                    max_leaves=8)


@pytest.fixture(scope="module")
def playground(exported, tmp_path_factory) -> Path:
    """A copy of a package (+ a symlink leaving it) whose JSON files each example rewrites."""
    root = tmp_path_factory.mktemp("fuzz")
    folder = Path(shutil.copytree(exported("int4-cpu"), root / "pkg"))
    (root / "outside").write_text("secret\n")
    (folder / "link-out").symlink_to(root / "outside")
    return folder


def clean_or_ok(action) -> object:
    try:
        return action()
    except Phi3OnnxError as exc:
        assert str(exc) and "\n" not in str(exc).strip(), repr(exc)
        return exc


def manifest_doc(folder: Path) -> dict:
    return read_manifest(folder).to_dict()


@FUZZ
@given(key=st.sampled_from(["format", "target", "model", "max_length", "files", "requires", "tool_versions",
                            "source"]), value=JSON)
def test_fuzz_manifest_fields(playground, key, value):
    doc = manifest_doc(playground)
    original = json.dumps(doc)
    doc[key] = value
    try:
        (playground / "manifest.json").write_text(json.dumps(doc))
        clean_or_ok(lambda: plan_load(playground, verify=True))
    finally:
        (playground / "manifest.json").write_text(original)


@FUZZ
@given(name=PATHS | st.text(max_size=20), entry=JSON, guess=st.booleans())
def test_fuzz_manifest_file_entries(playground, name, entry, guess):
    """Added entries of any name: a right size+sha256 guess for a file outside must still be refused."""
    doc = manifest_doc(playground)
    original = json.dumps(doc)
    if guess:
        entry = {"size": 7, "sha256": sha256_file(playground.parent / "outside")}
    doc["files"][name] = entry
    try:
        (playground / "manifest.json").write_text(json.dumps(doc))
        result = clean_or_ok(lambda: plan_load(playground, verify=True))
        if not isinstance(result, Phi3OnnxError):  # accepted: the name must be a real file inside
            resolved = (playground / name).resolve()
            assert resolved.is_relative_to(playground.resolve()) and resolved.is_file()
    finally:
        (playground / "manifest.json").write_text(original)


@FUZZ
@given(decoder=JSON, extra_key=st.sampled_from(["filename", "custom_ops_library", "encoder_filename", "tiktoken_file",
                                                "ep.context_file_path", "enable_profiling", "name"]), extra=JSON)
def test_fuzz_genai_config_file_names(playground, decoder, extra_key, extra):
    path = playground / "genai_config.json"
    original = path.read_text()
    doc = json.loads(original)
    doc["model"]["decoder"]["filename"] = decoder
    doc["model"].setdefault("vision", {})[extra_key] = extra
    manifest = (playground / "manifest.json").read_text()
    try:
        path.write_text(json.dumps(doc))
        m = json.loads(manifest)
        m["files"]["genai_config.json"] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
        (playground / "manifest.json").write_text(json.dumps(m))
        clean_or_ok(lambda: plan_load(playground, verify=True))
    finally:
        path.write_text(original)
        (playground / "manifest.json").write_text(manifest)


@pytest.fixture(scope="module")
def bundle(playground) -> Path:
    folder = playground.parent / "bundle"
    folder.mkdir()
    shutil.copytree(playground, folder / "int4-cpu", symlinks=True)
    (folder / "out").symlink_to(playground.parent, target_is_directory=True)
    return folder


VARIANT = st.fixed_dictionaries({"name": st.text(max_size=6) | st.just("int4-cpu"), "path": PATHS | st.just("out/pkg")},
                                optional={"provider": SCALARS})


@FUZZ
@given(doc=st.one_of(JSON, st.fixed_dictionaries({"format": st.just(BUNDLE_FORMAT),
                                                   "variants": st.lists(VARIANT | JSON, max_size=3)})))
def test_fuzz_bundle_json(bundle, doc):
    (bundle / "bundle.json").write_text(json.dumps(doc))
    result = clean_or_ok(lambda: plan_load(bundle))
    if not isinstance(result, Phi3OnnxError):
        assert result.package.path.resolve().is_relative_to(bundle.resolve())


@pytest.fixture(scope="module")
def small(exported):
    return load(exported("int4-cpu"), max_length=24)  # bounds every run: at most ~20 new tokens


NUMBERS = st.one_of(st.integers(-3, 3), st.integers(2000, 2100), st.integers(-2**64, 2**64),
                    st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 2), st.booleans(), st.text(max_size=3),
                    st.none())


@FUZZ
@given(max_new_tokens=NUMBERS, temperature=NUMBERS, top_p=NUMBERS, top_k=NUMBERS, seed=NUMBERS,
       stop=st.one_of(st.none(), st.text(max_size=3), st.lists(st.text(max_size=3) | st.integers(), max_size=2),
                      st.integers()), chat=st.booleans())
def test_fuzz_sampling_options(small, max_new_tokens, temperature, top_p, top_k, seed, stop, chat):
    kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                  stop=stop)
    run = (lambda: small.chat().send("hi", **kwargs)) if chat else (lambda: small.generate("The list", **kwargs))
    result = clean_or_ok(run)
    assert isinstance(result, (str, Phi3OnnxError))
    if isinstance(result, str) and isinstance(stop, str) and stop:
        assert stop not in result


def test_fuzz_budget_is_small_by_default():
    assert EXAMPLES >= 1 and (os.environ.get("PHI3_ONNX_FUZZ_EXAMPLES") or EXAMPLES == 25)
    assert FileEntry(1, "0" * 64) == FileEntry(1, "0" * 64) and file_entries  # imported API stays public
