"""Every file name a package holds (manifest.json, bundle.json, genai_config.json) stays inside its folder.

Each case would pass (exit 0) on the code before: `info` stat'ed the named file, `--verify` hashed
it (a sha256 oracle for files outside the package), bundle variant paths were followed anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from phi3_onnx.cli import main
from phi3_onnx.errors import Phi3OnnxError
from phi3_onnx.manifest import (bundle_document, discover, file_entries, inside, read_manifest, real_folder,
                                sha256_file, write_manifest)
from phi3_onnx.runtime import load, plan_load

HELDOUT = Path(__file__).resolve().parent / "assets" / "corpus" / "heldout.txt"


@pytest.fixture(scope="module")
def pkg(exported) -> Path:
    return exported("int4-cpu")


@pytest.fixture
def secret(tmp_path) -> Path:
    """A file outside every package, whose size and sha256 an attacker guessed right."""
    path = tmp_path / "secret.txt"
    path.write_text("hunter2\n")
    return path


def copy_of(pkg: Path, dst: Path) -> Path:
    shutil.copytree(pkg, dst)
    return dst


def edit_json(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def list_file(folder: Path, name: str, target: Path) -> None:
    """Add `name` to the manifest with `target`'s true size and sha256 (the guess is right)."""
    entry = {"size": target.stat().st_size, "sha256": sha256_file(target)}
    edit_json(folder / "manifest.json", lambda d: d["files"].__setitem__(name, entry))


def one_line_error(capsys, argv) -> str:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "internal" not in err
    return err


def relative_to_secret(folder: Path, secret: Path) -> str:
    return os.path.relpath(secret, folder)


@pytest.mark.parametrize("form", ["dotdot", "absolute", "symlink", "symlinked-dir"])
@pytest.mark.parametrize("verb", [["info"], ["info", "--verify"], ["generate", "-p", "hi", "--max-new-tokens", "1"]])
def test_manifest_entry_outside_is_refused(capsys, pkg, tmp_path, secret, form, verb):
    folder = copy_of(pkg, tmp_path / "pkg")
    if form == "dotdot":
        name = relative_to_secret(folder, secret)
    elif form == "absolute":
        name = str(secret)
    elif form == "symlink":
        name = "notes.txt"
        (folder / name).symlink_to(secret)
    else:
        name = "extra/secret.txt"
        (folder / "extra").symlink_to(secret.parent, target_is_directory=True)
    list_file(folder, name, secret)
    err = one_line_error(capsys, [verb[0], folder, *verb[1:]])
    assert "manifest.json" in err and repr(name) in err and "inside its own folder" in err


def test_verify_never_hashes_outside(pkg, tmp_path, secret, monkeypatch):
    folder = copy_of(pkg, tmp_path / "pkg")
    list_file(folder, relative_to_secret(folder, secret), secret)
    hashed: list[Path] = []
    import phi3_onnx.manifest as manifest

    real = manifest.sha256_file
    monkeypatch.setattr(manifest, "sha256_file", lambda p, *a: hashed.append(Path(p)) or real(p, *a))
    with pytest.raises(Phi3OnnxError, match="inside its own folder"):
        load(folder, verify=True)
    assert secret not in hashed and not hashed  # refused before any file was hashed


def test_symlink_inside_the_package_is_fine(pkg, tmp_path):
    folder = copy_of(pkg, tmp_path / "pkg")
    (folder / "sub").mkdir()
    (folder / "tokenizer.json").rename(folder / "sub" / "tokenizer.json")
    (folder / "tokenizer.json").symlink_to("sub/tokenizer.json")
    assert plan_load(folder, verify=True).package.path == folder


def test_symlink_escape_through_a_symlinked_component(tmp_path, secret):
    """root/a -> "evil/../secret.txt" with root/evil -> outside: a lexical normpath says inside, the OS goes out."""
    root = tmp_path / "root"
    (root).mkdir()
    outside = secret.parent / "deep"
    outside.mkdir()
    (root / "evil").symlink_to(outside)
    (root / "a").symlink_to("evil/../secret.txt")
    with pytest.raises(Phi3OnnxError, match="leaves the folder"):
        inside(real_folder(root), "a", "test")


@pytest.mark.parametrize("name", ["", ".", "a//b", "./x", "a\\..\\..\\x", "C:/x", "\x00", 7, None])
def test_names_that_are_not_plain_relative_paths(tmp_path, name):
    with pytest.raises(Phi3OnnxError, match="test: entry"):
        inside(real_folder(tmp_path), name, "test")


def test_unlisted_needed_file_fails_verify_only(capsys, pkg, tmp_path):
    folder = copy_of(pkg, tmp_path / "pkg")
    edit_json(folder / "manifest.json", lambda d: d["files"].pop("model.onnx.data"))
    assert main(["info", str(folder)]) == 0
    capsys.readouterr()
    err = one_line_error(capsys, ["info", folder, "--verify"])
    assert "does not list 'model.onnx.data'" in err


@pytest.mark.parametrize("key,value", [
    (("model", "decoder", "filename"), "../elsewhere/model.onnx"),
    (("model", "decoder", "filename"), "/etc/passwd"),
    (("model", "decoder", "session_options", "custom_ops_library"), "/tmp/evil.so"),
    (("model", "embedding", "filename"), "../embed.onnx"),  # not used by this package: still refused
])
def test_genai_config_file_names_outside_are_refused(capsys, pkg, tmp_path, key, value):
    folder = copy_of(pkg, tmp_path / "pkg")

    def edit(doc):
        node = doc
        for k in key[:-1]:
            node = node.setdefault(k, {})
        node[key[-1]] = value

    edit_json(folder / "genai_config.json", edit)
    write_manifest(folder, __import__("dataclasses").replace(read_manifest(folder), files=file_entries(folder)))
    err = one_line_error(capsys, ["info", folder])
    assert "genai_config.json" in err and ".".join(key) in err and repr(value) in err


def make_bundle(pkg: Path, folder: Path, paths: list[str]) -> Path:
    folder.mkdir()
    copy_of(pkg, folder / "int4-cpu")
    doc = bundle_document("tiny", [("int4-cpu", read_manifest(folder / "int4-cpu"))])
    doc["variants"] = [{**doc["variants"][0], "name": f"v{i}", "path": p} for i, p in enumerate(paths)]
    (folder / "bundle.json").write_text(json.dumps(doc))
    return folder


@pytest.mark.parametrize("bad", ["../elsewhere", "/tmp", ".", "int4-cpu/../../x", "link-out"])
def test_bundle_variant_path_outside_is_refused(capsys, pkg, tmp_path, bad):
    elsewhere = copy_of(pkg, tmp_path / "elsewhere")  # a real package outside the bundle
    bundle = make_bundle(pkg, tmp_path / "bundle", ["int4-cpu", bad])
    (bundle / "link-out").symlink_to(elsewhere, target_is_directory=True)
    err = one_line_error(capsys, ["info", bundle])
    assert "bundle.json: variants[1].path" in err and repr(bad) in err
    err = one_line_error(capsys, ["eval", bundle, "--reference", pkg, "--data", HELDOUT, "--max-tokens", "128"])
    assert "variants[1].path" in err


def test_bundle_without_bundle_json_refuses_a_symlinked_variant_leaving(capsys, pkg, tmp_path):
    elsewhere = copy_of(pkg, tmp_path / "elsewhere")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    copy_of(pkg, bundle / "a")
    (bundle / "b").symlink_to(elsewhere, target_is_directory=True)
    assert "leaves the folder" in one_line_error(capsys, ["info", bundle])


def test_runtime_and_eval_discover_bundles_alike(pkg, tmp_path):
    bundle = make_bundle(pkg, tmp_path / "bundle", ["int4-cpu"])
    found = discover(bundle)
    assert found.bundle and [v.name for v in found.items] == ["v0"]
    assert plan_load(bundle).variant == "v0"
    (bundle / "bundle.json").unlink()  # a folder of packages without bundle.json: named by folder
    assert [v.name for v in discover(bundle).items] == ["int4-cpu"] == [v.name for v in plan_load(bundle).variants]


def test_manifest_entry_outside_is_refused_by_a_real_subprocess(pkg, tmp_path, secret):
    """The exit code as a shell sees it: 2, one line, no traceback; the right guess is no oracle."""
    folder = copy_of(pkg, tmp_path / "pkg")
    list_file(folder, relative_to_secret(folder, secret), secret)
    proc = subprocess.run([sys.executable, "-c", "from phi3_onnx.cli import run; run()", "info", str(folder), "--verify"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "inside its own folder" in proc.stderr
