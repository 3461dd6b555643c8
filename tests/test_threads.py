"""CPU threads: packages say all cores, `load(threads=)` reaches the ORT session through og.Config.

The session's thread count is observed from the outside: ONNX Runtime's intra-op pool starts N - 1
threads for intra_op_num_threads N (the caller's thread is the Nth), so a fresh process that loads a
package with threads=3 has two more threads than one that loads it with threads=1.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from phi3_onnx.errors import Phi3OnnxError
from phi3_onnx.runtime.threads import check_threads, physical_cores, resolve_threads, session_overlay
from phi3_onnx.targets import TARGETS

LINUX = sys.platform.startswith("linux")

# Loads a package in a fresh process and prints how many threads the load added.
PROBE = r"""
import os, sys
from phi3_onnx.runtime import load
count = lambda: len(os.listdir("/proc/self/task"))
threads = None if sys.argv[2] == "default" else int(sys.argv[2])
before = count()
model = load(sys.argv[1], device="cpu", threads=threads)
print(count() - before, model.threads)
"""


def _added_threads(pkg: Path, threads: str) -> tuple[int, int | None]:
    out = subprocess.run([sys.executable, "-c", PROBE, str(pkg), threads], capture_output=True, text=True, check=True)
    added, setting = out.stdout.split()
    return int(added), None if setting == "None" else int(setting)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_exported_genai_config_threads(exported, name):
    """CPU targets say 0 (all physical cores of the machine that runs it); GPU targets leave it to genai."""
    session = json.loads((exported(name) / "genai_config.json").read_text())["model"]["decoder"]["session_options"]
    if TARGETS[name].provider == "cpu":
        assert session["intra_op_num_threads"] == 0
    else:
        assert "intra_op_num_threads" not in session


def test_resolve_threads(tmp_path):
    cfg = {"model": {"decoder": {"session_options": {}}}}
    (tmp_path / "genai_config.json").write_text(json.dumps(cfg))
    cores = physical_cores()
    assert resolve_threads(tmp_path, "cpu", None) == cores  # no key (old packages, the builder's): all cores
    assert resolve_threads(tmp_path, "cpu", 0) == resolve_threads(tmp_path, "cuda", 0) == cores
    assert resolve_threads(tmp_path, "cuda", None) is None  # GPU: genai's default
    assert resolve_threads(tmp_path, "cpu", 3) == resolve_threads(tmp_path, "cuda", 3) == 3
    cfg["model"]["decoder"]["session_options"]["intra_op_num_threads"] = 4
    (tmp_path / "genai_config.json").write_text(json.dumps(cfg))
    assert resolve_threads(tmp_path, "cpu", None) == 4  # the package's own choice
    assert resolve_threads(tmp_path, "cpu", 1) == 1  # load(threads=) wins
    assert session_overlay(None) == {}
    assert session_overlay(2) == {"model": {"decoder": {"session_options": {"intra_op_num_threads": 2}}}}
    assert physical_cores() >= 1


@pytest.mark.parametrize("bad", [-1, 1.5, "2", True])
def test_bad_threads(bad, exported):
    from phi3_onnx.runtime import load

    with pytest.raises(Phi3OnnxError, match="threads must be"):
        check_threads(bad)
    with pytest.raises(Phi3OnnxError, match="threads must be"):
        load(exported("int4-cpu"), threads=bad)


@pytest.mark.skipif(not LINUX, reason="counts threads in /proc/self/task")
def test_load_threads_reach_the_session(exported, tmp_path):
    pkg = exported("int4-cpu")
    before = (pkg / "genai_config.json").read_bytes()
    one, setting_one = _added_threads(pkg, "1")
    three, setting_three = _added_threads(pkg, "3")
    default, setting_default = _added_threads(pkg, "default")
    assert (setting_one, setting_three, setting_default) == (1, 3, physical_cores())  # the package's 0, as a count
    assert three - one == 2
    assert default - one == physical_cores() - 1
    assert (pkg / "genai_config.json").read_bytes() == before  # set through og.Config, never the file

    # A package without the key (from before it, or the model builder's) still gets all cores on the CPU EP.
    old = tmp_path / "old"
    shutil.copytree(pkg, old)
    cfg = json.loads((old / "genai_config.json").read_text())
    del cfg["model"]["decoder"]["session_options"]["intra_op_num_threads"]
    (old / "genai_config.json").write_text(json.dumps(cfg))
    _refresh_manifest_entry(old, "genai_config.json")
    old_default, setting_old = _added_threads(old, "default")
    assert setting_old == physical_cores() and old_default == default


def _refresh_manifest_entry(folder: Path, name: str) -> None:
    """Keep the manifest's size check happy after editing a file of a copied package."""
    from phi3_onnx.manifest import sha256_file

    doc = json.loads((folder / "manifest.json").read_text())
    entry = doc["files"][name]
    entry["size"] = (folder / name).stat().st_size
    if "sha256" in entry:
        entry["sha256"] = sha256_file(folder / name)
    (folder / "manifest.json").write_text(json.dumps(doc))


def test_cli_threads(exported, capsys):
    from phi3_onnx.cli import main

    pkg = str(exported("int4-cpu"))
    assert main(["generate", pkg, "-p", "Hi", "--max-new-tokens", "3", "--threads", "1"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["generate", pkg, "-p", "Hi", "--max-new-tokens", "3", "--threads", "-2"]) == 2
    assert "threads must be" in capsys.readouterr().err
