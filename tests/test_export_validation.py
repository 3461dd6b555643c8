"""Export refuses bad checkpoints up front (issue 9): exit 2, one line naming the file and field, nothing written.

Configs, safetensors headers and indexes that used to export silently into wrong or unloadable
packages, or crashed as `error: internal ...`. Plus property-based fuzzing (hypothesis): any config
value or safetensors header gives a clean Phi3OnnxError or a correct result, never anything else.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phi3_onnx.checkpoint import SafetensorsCheckpoint, spec_from_folder
from phi3_onnx.checkpoint.reader import _read_header
from phi3_onnx.cli import main
from phi3_onnx.errors import Phi3OnnxError
from phi3_onnx.package import ExportOptions, plan_export

FUZZ = int(os.environ.get("PHI3_ONNX_FUZZ_EXAMPLES", "60"))


def _copy(tiny_ckpt: Path, dst: Path) -> Path:
    return Path(shutil.copytree(tiny_ckpt, dst))


def _config(c: Path, **change) -> None:
    cfg = json.loads((c / "config.json").read_text())
    (c / "config.json").write_text(json.dumps(cfg | change))


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write(path: Path, header: dict, data: bytes) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def _shard(c: Path) -> Path:
    return sorted(c.glob("model-*.safetensors"))[0]


def _edit_first_tensor(c: Path, edit: Callable[[dict], None]) -> None:
    header, data = _header(_shard(c))
    name = sorted(k for k in header if k != "__metadata__")[0]
    edit(header[name])
    _write(_shard(c), header, data)


def _overlap(c: Path) -> None:
    header, data = _header(_shard(c))
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    a, b = header[names[0]], header[names[1]]
    length = b["data_offsets"][1] - b["data_offsets"][0]
    b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + length]
    _write(_shard(c), header, data)


def _duplicate_tensor(c: Path) -> None:
    """The same tensor name in both shards (the index names it once)."""
    shards = sorted(c.glob("model-*.safetensors"))
    h0, d0 = _header(shards[0])
    h1, d1 = _header(shards[1])
    name = sorted(k for k in h0 if k != "__metadata__")[0]
    begin, end = h0[name]["data_offsets"]
    h1[name] = {"dtype": h0[name]["dtype"], "shape": h0[name]["shape"], "data_offsets": [len(d1), len(d1) + end - begin]}
    _write(shards[1], h1, d1 + d0[begin:end])


def _extra_tensor(c: Path) -> None:
    shard = _shard(c)
    header, data = _header(shard)
    header["model.layers.0.self_attn.rotary_emb.inv_freq"] = {"dtype": "F32", "shape": [4], "data_offsets": [len(data), len(data) + 16]}
    _write(shard, header, data + bytes(16))
    index = json.loads((c / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.self_attn.rotary_emb.inv_freq"] = shard.name
    (c / "model.safetensors.index.json").write_text(json.dumps(index))


def _index_points(c: Path, where: str) -> None:
    index = json.loads((c / "model.safetensors.index.json").read_text())
    first = sorted(index["weight_map"])[0]
    index["weight_map"][first] = where
    (c / "model.safetensors.index.json").write_text(json.dumps(index))


def _symlink_out(c: Path) -> None:
    shard = _shard(c)
    outside = c.parent / "elsewhere.safetensors"
    shutil.move(shard, outside)
    shard.symlink_to(outside)


def _no_tokenizer(c: Path) -> None:
    for name in ("tokenizer.json", "tokenizer.model"):
        (c / name).unlink(missing_ok=True)


def _broken_tokenizer(c: Path) -> None:
    """Valid JSON, but not a tokenizer genai can load: caught by the staged-package load check."""
    (c / "tokenizer.json").write_text(json.dumps({"model": {"type": "nonsense"}}))


CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "fewer layers in config than in checkpoint": (lambda c: _config(c, num_hidden_layers=2), "num_hidden_layers 2, but the checkpoint holds layers 0..3"),
    "more layers in config than in checkpoint": (lambda c: _config(c, num_hidden_layers=6), "num_hidden_layers 6, but the checkpoint holds layers 0..3"),
    "num_hidden_layers 1e9 (float)": (lambda c: _config(c, num_hidden_layers=1e9), "num_hidden_layers must be an integer"),
    "num_hidden_layers 10**9 (int)": (lambda c: _config(c, num_hidden_layers=10**9), "num_hidden_layers 1000000000, but the checkpoint holds"),
    "max_position_embeddings 1e9 (float)": (lambda c: _config(c, max_position_embeddings=1e9), "max_position_embeddings must be an integer"),
    "max_position_embeddings 10**9 (int)": (lambda c: _config(c, max_position_embeddings=10**9, original_max_position_embeddings=10**9),
                                            "this machine has"),
    "hidden_act gelu": (lambda c: _config(c, hidden_act="gelu_new"), "hidden_act 'gelu_new' is not supported"),
    "hidden not divisible by heads": (lambda c: _config(c, num_attention_heads=7), "not divisible by num_attention_heads"),
    "heads not divisible by kv heads": (lambda c: _config(c, num_key_value_heads=3), "not divisible by num_key_value_heads"),
    "Llama architecture with model_type phi3": (lambda c: _config(c, architectures=["LlamaForCausalLM"]), "unsupported architecture LlamaForCausalLM"),
    "float size truncated": (lambda c: _config(c, intermediate_size=512.7), "intermediate_size must be an integer, got 512.7"),
    "no tokenizer files": (_no_tokenizer, "has no tokenizer"),
    "tokenizer genai cannot load": (_broken_tokenizer, "does not load in onnxruntime-genai"),
    "overlapping data offsets": (_overlap, "overlaps the tensor before it"),
    "negative data offset": (lambda c: _edit_first_tensor(c, lambda t: t.update(data_offsets=[-8, t["data_offsets"][1]])), "has data_offsets"),
    "byte count disagrees with dtype x shape": (lambda c: _edit_first_tensor(c, lambda t: t.update(shape=[t["shape"][0] + 1, *t["shape"][1:]])), "bytes, but"),
    "missing dtype": (lambda c: _edit_first_tensor(c, lambda t: t.pop("dtype")), "needs dtype, shape and data_offsets"),
    "same tensor in two shards": (_duplicate_tensor, "is in two shards"),
    "unknown extra tensor": (_extra_tensor, "unknown checkpoint tensor 'model.layers.0.self_attn.rotary_emb.inv_freq'"),
    "index shard path with ..": (lambda c: _index_points(c, "../elsewhere.safetensors"), "not a file name inside the checkpoint folder"),
    "index shard path absolute": (lambda c: _index_points(c, "/etc/passwd"), "not a file name inside the checkpoint folder"),
    "shard symlinked out of the folder": (_symlink_out, "resolves outside the checkpoint folder"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_checkpoint_is_refused_before_writing(case: str, tiny_ckpt: Path, tmp_path: Path, capsys) -> None:
    breakage, needle = CASES[case]
    ckpt = _copy(tiny_ckpt, tmp_path / "ckpt")
    breakage(ckpt)
    before = sorted(p.name for p in tmp_path.iterdir())
    started = time.monotonic()
    code = main(["export", "--model", str(ckpt), "--target", "int4-cpu", "--output", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "internal" not in err, err
    assert needle in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "nothing may be written"
    assert time.monotonic() - started < 30, "refused up front, not after allocating"


def test_dry_run_refuses_an_unholdable_context_without_allocating(tiny_ckpt: Path, tmp_path: Path, capsys) -> None:
    ckpt = _copy(tiny_ckpt, tmp_path / "ckpt")
    _config(ckpt, max_position_embeddings=10**9, original_max_position_embeddings=10**9)
    code = main(["export", "-m", str(ckpt), "-t", "int4-cpu", "-o", str(tmp_path / "out"), "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and "use --context-length" in err, err
    # the way out the message names works
    code = main(["export", "-m", str(ckpt), "-t", "int4-cpu", "-o", str(tmp_path / "out"), "--dry-run", "--context-length", "4096"])
    assert code == 0, capsys.readouterr().err


# ----------------------------------------------------------------------------- fuzzing: config.json

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
FIELDS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
          "vocab_size", "max_position_embeddings", "original_max_position_embeddings", "rope_theta", "rms_norm_eps",
          "sliding_window", "rope_scaling", "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings",
          "hidden_act", "architectures", "model_type", "head_dim", "partial_rotary_factor"]


@pytest.fixture(scope="module")
def fuzz_ckpt(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _copy(tiny_ckpt, tmp_path_factory.mktemp("fuzz") / "ckpt")


@settings(max_examples=FUZZ, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(FIELDS), value=JSON_VALUES)
def test_fuzz_config_field_is_clean_error_or_correct(fuzz_ckpt: Path, tmp_path_factory, field: str, value) -> None:
    original = (fuzz_ckpt / "config.json").read_text()
    try:
        cfg = json.loads(original) | {field: value}
        (fuzz_ckpt / "config.json").write_text(json.dumps(cfg))
        try:
            plan, _ = plan_export(str(fuzz_ckpt), "int4-cpu", tmp_path_factory.mktemp("o") / "out", ExportOptions())
        except Phi3OnnxError as exc:
            assert "\n" not in str(exc) and str(exc)
            return
        # accepted: the spec says what the config says
        spec = plan.spec
        if field in ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size", "max_position_embeddings"):
            name = {"num_attention_heads": "num_heads"}.get(field, field)
            assert getattr(spec, name) == value
        if field == "num_hidden_layers":
            assert spec.num_layers == value == 4
    finally:
        (fuzz_ckpt / "config.json").write_text(original)


# ----------------------------------------------------------------------------- fuzzing: safetensors headers

DTYPES = {"F32": 4, "F16": 2, "BF16": 2}


@st.composite
def headers(draw) -> tuple[dict, int]:
    """A mostly well-formed header (then perhaps broken in one way) and its data length."""
    n = draw(st.integers(1, 3))
    header, at = {}, 0
    for i in range(n):
        dtype = draw(st.sampled_from(list(DTYPES)))
        shape = draw(st.lists(st.integers(0, 4), min_size=1, max_size=3))
        size = int(np.prod(shape)) * DTYPES[dtype]
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + size]}
        at += size
    data_len = at
    breakage = draw(st.sampled_from(["none", "dtype", "shape", "offsets", "key", "extra", "short", "long", "meta"]))
    victim = header[f"t{draw(st.integers(0, n - 1))}"]
    if breakage == "dtype":
        victim["dtype"] = draw(st.sampled_from(["I64", "F64", "", 7, None]))
    elif breakage == "shape":
        victim["shape"] = draw(st.sampled_from([[-1], ["2"], 3, [1.5], [True]]))
    elif breakage == "offsets":
        victim["data_offsets"] = draw(st.lists(st.integers(-4, data_len + 8), min_size=0, max_size=3))
    elif breakage == "key":
        victim.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])))
    elif breakage == "extra":
        victim["extra"] = 1
    elif breakage == "short":
        data_len = max(0, data_len - draw(st.integers(1, 8)))
    elif breakage == "long":
        data_len += draw(st.integers(1, 8))
    elif breakage == "meta":
        header["__metadata__"] = draw(st.sampled_from([{"a": "b"}, {"a": 1}, "x", None]))
    return header, data_len


@settings(max_examples=FUZZ * 3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=headers())
def test_fuzz_safetensors_header_matches_the_library(tmp_path: Path, case) -> None:
    """Our reader accepts exactly what the safetensors library accepts (for the dtypes we read), with the same shapes."""
    from safetensors import safe_open

    header, data_len = case
    path = tmp_path / "x.safetensors"
    _write(path, header, bytes(data_len))
    try:
        ours = {k: e.shape for k, e in _read_header(path).items()}
    except Phi3OnnxError as exc:
        assert "\n" not in str(exc)
        ours = None
    try:
        with safe_open(str(path), "np") as f:
            theirs = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception:
        theirs = None
    dtypes = {v.get("dtype") for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
    if theirs is not None and not dtypes <= set(DTYPES):
        theirs = None  # a valid file in a dtype phi3-onnx does not read (I64, F64...): refused cleanly
    assert ours == theirs, (header, data_len)


def test_valid_checkpoint_reads_like_the_library(tiny_ckpt: Path) -> None:
    from safetensors.numpy import load_file

    ckpt = SafetensorsCheckpoint(tiny_ckpt)
    spec = spec_from_folder(tiny_ckpt)
    assert spec.num_layers == 4
    for shard in sorted(tiny_ckpt.glob("*.safetensors")):
        import ml_dtypes  # noqa: F401  (bf16 as numpy)
        from safetensors import safe_open

        with safe_open(str(shard), "pt") as f:
            for name in f.keys():
                np.testing.assert_array_equal(ckpt.read(name), f.get_tensor(name).float().numpy())
    assert load_file  # the numpy loader exists in the installed library
