"""manifest.json: the saved form of Target + ModelSpec, plus versions and file checksums.

The runtime reads only this file (and the genai files beside it); it imports nothing from the
exporter or quantizers, so a package can be loaded with just onnxruntime + onnxruntime-genai.

Also the one place that opens what the exporter wrote, for the runtime and the eval alike:
`discover` (a package or a bundle's variants, as `Variant`s) and `check_package` (file sizes,
sha256s, the files a package needs). Every file name read from manifest.json, bundle.json or
genai_config.json is resolved by `inside`: relative, no `..`, and symlinks followed only while
they stay in the folder, so nothing outside a package is ever stat'ed, hashed or loaded.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from phi3_onnx.errors import Phi3OnnxError
from phi3_onnx.spec import ModelSpec
from phi3_onnx.targets import Target
from phi3_onnx.targets.providers import PROVIDERS as PROVIDER_REGISTRY

MANIFEST = "manifest.json"
FORMAT = "phi3-onnx/1"
BUNDLE = "bundle.json"
BUNDLE_FORMAT = "phi3-onnx-bundle/1"
GENAI_CONFIG = "genai_config.json"
# Tokenizer files onnxruntime-genai reads when present; a package has tokenizer.json or tokenizer.model.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "chat_template.jinja")
PROVIDERS = tuple(PROVIDER_REGISTRY)
IO_DTYPES = ("float32", "float16")
SHA256 = re.compile(r"[0-9a-f]{64}")
DECODER_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*\.onnx")
MAX_SYMLINK_HOPS = 40
# The oldest runtimes a package is loaded with (manifest.json `requires`, shown by `info`): the one
# source of truth; pyproject's [cpu]/[cuda]/[directml] extras repeat these lower bounds and
# tests/test_cli_polish.py fails when the two disagree.
MIN_VERSIONS = {"onnxruntime": "1.22.0", "onnxruntime-genai": "0.8.0"}


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    target: Target
    model: ModelSpec
    max_length: int
    files: dict[str, FileEntry]
    tool_versions: dict[str, str]
    requires: dict[str, str]
    source: str
    # what actually ran: the quantizer's record (method, block size, calibration file + sha256, ...)
    # and the context/KV sizes the package was built for
    recipe: dict[str, Any] = field(default_factory=dict)
    # a copy of the decoder without the sliding window, exact while a sequence fits it (package.window_free)
    window_free_decoder: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "source": self.source,
            "target": self.target.to_dict(),
            "model": self.model.to_dict(),
            "max_length": self.max_length,
            "requires": self.requires,
            "tool_versions": self.tool_versions,
            "recipe": self.recipe,
            "window_free_decoder": self.window_free_decoder,
            "files": {k: {"size": v.size, "sha256": v.sha256} for k, v in sorted(self.files.items())},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        if not isinstance(data, dict):
            raise ValueError(f"is a JSON {type(data).__name__}, not an object")
        if data.get("format") != FORMAT:
            raise Phi3OnnxError(f"manifest format {data.get('format')!r} is not {FORMAT!r}")
        manifest = cls(
            target=Target.from_dict(_field(data, "target", dict)),
            model=ModelSpec.from_dict(_field(data, "model", dict)),
            max_length=_field(data, "max_length", int),
            files=_file_entries(_field(data, "files", dict)),
            tool_versions=_str_map(data, "tool_versions"),
            requires=_str_map(data, "requires"),
            source=str(data.get("source", "")),
            recipe=dict(data.get("recipe") or {}),
            window_free_decoder=data.get("window_free_decoder"),
        )
        _check_fields(manifest)
        return manifest


def _field(data: dict[str, Any], key: str, kind: type) -> Any:
    """data[key], which must be a `kind` (bool is never an int here)."""
    if key not in data:
        raise KeyError(key)
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"field {key!r} must be a JSON {_json_kind(kind)}, got {value!r:.80}")
    return value


def _json_kind(kind: type) -> str:
    return {dict: "object", int: "integer", str: "string", list: "array"}.get(kind, kind.__name__)


def _str_map(data: dict[str, Any], key: str) -> dict[str, str]:
    value = data.get(key, {})
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError(f"field {key!r} must be an object of strings")
    return dict(value)


def _file_entries(files: dict[str, Any]) -> dict[str, FileEntry]:
    """files: {relative path: {size, sha256}}; the paths are checked against the folder by `inside`."""
    entries = {}
    for name, entry in files.items():
        if not isinstance(entry, dict):
            raise ValueError(f"files[{name!r}] must be an object {{size, sha256}}")
        size, digest = _field(entry, "size", int), _field(entry, "sha256", str)
        if size < 0 or not SHA256.fullmatch(digest):
            raise ValueError(f"files[{name!r}] needs a size >= 0 and a 64-hex-digit sha256")
        entries[name] = FileEntry(size, digest)
    return entries


def _check_fields(m: Manifest) -> None:
    """The fields the runtime and eval compute with: positive sizes, known provider and dtype."""
    spec = m.model
    extra = m.window_free_decoder
    if extra is not None and (not isinstance(extra, str) or not DECODER_FILE.fullmatch(extra) or extra not in m.files
                              or spec.attention_window is None):
        raise ValueError(f"field 'window_free_decoder' must name a .onnx file of the package (and the model have a "
                         f"sliding window), got {extra!r:.80}")
    sizes = {"max_length": m.max_length, "model.hidden_size": spec.hidden_size, "model.num_layers": spec.num_layers,
             "model.num_heads": spec.num_heads, "model.num_kv_heads": spec.num_kv_heads,
             "model.vocab_size": spec.vocab_size, "model.max_position_embeddings": spec.max_position_embeddings,
             "model.original_max_position_embeddings": spec.original_max_position_embeddings,
             "model.intermediate_size": spec.intermediate_size}
    for key, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"field {key!r} must be a positive integer, got {value!r:.80}")
    ids = (spec.bos_token_id, spec.pad_token_id, *spec.eos_token_ids)
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError("token ids (model.bos_token_id, eos_token_ids, pad_token_id) must be integers >= 0")
    if m.target.provider not in PROVIDERS or m.target.io_dtype not in IO_DTYPES:
        raise ValueError(f"target provider/io_dtype must be one of {PROVIDERS} / {IO_DTYPES}")
    if not isinstance(m.target.name, str) or not all(math.isfinite(float(x)) for x in
                                                      (spec.rope_theta, spec.rms_norm_eps)):
        raise ValueError("target.name must be a string and model.rope_theta / rms_norm_eps finite")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entries(folder: Path) -> dict[str, FileEntry]:
    """Size and sha256 of every file in the package folder (the manifest itself excluded)."""
    return {
        p.relative_to(folder).as_posix(): FileEntry(p.stat().st_size, sha256_file(p))
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    path = folder / MANIFEST
    path.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    return path


def read_manifest(folder: Path) -> Manifest:
    path = inside(real_folder(folder), MANIFEST, f"{folder}")
    if not path.is_file():
        raise Phi3OnnxError(f"{folder} is not a phi3-onnx package (no {MANIFEST})")
    try:
        return Manifest.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise Phi3OnnxError(f"{path} is corrupt ({type(exc).__name__}: {_one_line(exc)})") from None
    except RecursionError:
        raise Phi3OnnxError(f"{path} is corrupt (nested too deeply)") from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def bundle_document(source: str, variants: list[tuple[str, Manifest]]) -> dict[str, Any]:
    """bundle.json: the variant folders (named by target) with enough to list them without opening each."""
    return {
        "format": BUNDLE_FORMAT,
        "source": source,
        "variants": [
            {"name": name, "path": name, "provider": m.target.provider, "io_dtype": m.target.io_dtype,
             "weights": m.target.weight_dtype, "quant": m.target.quant.method if m.target.quant else None}
            for name, m in variants
        ],
    }


# --- containment: every file name a package holds stays inside its folder --------------------------
def real_folder(folder: str | os.PathLike) -> Path:
    """The folder the user named, symlinks resolved (the user's own path is trusted, its contents are not)."""
    return Path(os.path.realpath(folder))


def inside(root: Path, name: object, where: str) -> Path:
    """`root / name`, refused (Phi3OnnxError naming `where` and the entry) unless it stays inside `root`.

    `root` is a real path (see `real_folder`). `name` must be a relative POSIX path without `..`;
    symlinks are followed one component at a time and only while they stay inside `root`, so
    nothing outside is ever stat'ed. The file need not exist (callers report missing files).
    """
    parts = _relative_parts(name, where)
    return Path(_walk(str(root), parts, lambda why: _refuse(where, name, why)))


def _relative_parts(name: object, where: str) -> list[str]:
    if not isinstance(name, str) or not name or any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        _refuse(where, name, "is not a file name (empty, or control characters)")
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        _refuse(where, name, "is an absolute path")
    parts = name.split("/")
    if ".." in parts or "\\" in name:
        _refuse(where, name, "leaves the folder ('..' or a backslash)")
    if any(p in ("", ".") for p in parts):
        _refuse(where, name, "is not a normalized relative path")
    return parts


def _walk(root: str, parts: list[str], refuse: Any) -> str:
    """Resolve `parts` under `root` like realpath, but lstat only paths inside `root`."""
    current, todo, hops = root, list(parts), 0
    while todo:
        part = todo.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if current == root:
                refuse("is a symlink that leaves the folder")
            current = os.path.dirname(current)
            continue
        candidate = os.path.join(current, part)
        if not os.path.islink(candidate):
            current = candidate
            continue
        hops += 1
        if hops > MAX_SYMLINK_HOPS:
            refuse("is a symlink loop")
        target = os.readlink(candidate)
        todo = _link_parts(root, target, refuse) + todo
        current = root if os.path.isabs(target) else current
    return current


def _link_parts(root: str, target: str, refuse: Any) -> list[str]:
    """A symlink's target as components to walk: relative ones from the link's folder, absolute ones
    only when they start with `root` itself."""
    if not os.path.isabs(target):
        return target.split(os.sep)
    root_parts, parts = Path(root).parts, Path(target).parts
    if parts[:len(root_parts)] != root_parts:
        refuse("is a symlink that leaves the folder")
    return list(parts[len(root_parts):])


def _refuse(where: str, name: object, why: str) -> None:
    raise Phi3OnnxError(f"{where}: entry {name!r:.200} {why}; a package may only name files inside its own folder")


# --- genai_config.json: the file names onnxruntime-genai will open --------------------------------
# Keys whose string values genai (0.18) treats as a file or folder name: decoder/embedding/vision
# "filename", "encoder_filename", "custom_ops_library", session "*file_path" entries, profiling prefixes.
FILE_KEY = re.compile(r"(^|[._])(filename|file|filepath|file_path|path|dir|library|enable_profiling)$", re.I)


def genai_files(folder: Path) -> dict[str, Path]:
    """Every file name in genai_config.json ({json path: resolved path}), each checked by `inside`."""
    root = real_folder(folder)
    path = inside(root, GENAI_CONFIG, str(folder))
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise Phi3OnnxError(f"{folder} has no {GENAI_CONFIG}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise Phi3OnnxError(f"{path} is not valid JSON ({_one_line(exc)})") from None
    where = str(Path(folder) / GENAI_CONFIG)
    return {key: inside(root, value, f"{where}: {key}") for key, value in _file_values(doc, "")}


def _file_values(doc: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    """(json path, value) of every value under a file-name key, at any depth."""
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in items:
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(key, str) and FILE_KEY.search(key) and not isinstance(value, (dict, list, bool)):
            if key.lower() != "enable_profiling" or isinstance(value, str):
                yield path, value
        else:
            yield from _file_values(value, path)


def decoder_file(folder: Path) -> str:
    """The decoder graph genai loads (genai_config.json model.decoder.filename)."""
    files = genai_files(folder)
    path = files.get("model.decoder.filename")
    if path is None:
        raise Phi3OnnxError(f"{Path(folder) / GENAI_CONFIG}: model.decoder.filename is missing")
    return path.relative_to(real_folder(folder)).as_posix()


# --- opening a package: sizes always, sha256s and completeness with verify ------------------------
def package_files(folder: Path, manifest: Manifest) -> dict[str, Path]:
    """The manifest's files {name: resolved path}, each checked by `inside`; nothing is stat'ed."""
    if not manifest.files:
        raise Phi3OnnxError(f"{Path(folder) / MANIFEST} lists no files")
    root, where = real_folder(folder), str(Path(folder) / MANIFEST)
    return {name: inside(root, name, f"{where}: files") for name in sorted(manifest.files)}


def check_package(folder: Path, manifest: Manifest, verify: bool = False) -> None:
    """Containment of every named file (manifest and genai_config), then sizes; with verify also
    every sha256 and that the manifest lists every file the package needs."""
    files = package_files(folder, manifest)
    genai = genai_files(folder)
    for name, path in files.items():
        _check_size(path, name, manifest.files[name])
    if verify:
        _check_needed(folder, manifest, genai)
        for name, path in files.items():
            if sha256_file(path) != manifest.files[name].sha256:
                raise Phi3OnnxError(f"{path} does not match its sha256 in {MANIFEST}: the package is corrupt")


def _check_size(path: Path, name: str, entry: FileEntry) -> None:
    if not path.is_file():
        raise Phi3OnnxError(f"{path} is missing (listed in {MANIFEST} as {name!r})")
    size = path.stat().st_size
    if size != entry.size:
        raise Phi3OnnxError(f"{path} is {size} bytes but {MANIFEST} says {entry.size}: copy the package again")


def needed_files(folder: Path, genai: dict[str, Path]) -> dict[str, Path]:
    """What loading reads: genai_config.json, the files it names, the decoder's external data and the
    tokenizer files present ({name: path})."""
    root = real_folder(folder)
    needed = {GENAI_CONFIG: inside(root, GENAI_CONFIG, str(folder))}
    needed |= {_rel(root, p, folder): p for p in genai.values() if p.is_file()}
    decoder = genai.get("model.decoder.filename")
    if decoder is not None and decoder.is_file():
        needed |= {name: inside(root, name, f"{decoder}: external data") for name in external_data(decoder)}
    tokenizers = {n: inside(root, n, str(folder)) for n in TOKENIZER_FILES}
    needed |= {n: p for n, p in tokenizers.items() if p.is_file()}
    if "tokenizer.json" not in needed and "tokenizer.model" not in needed:
        raise Phi3OnnxError(f"{folder} has no tokenizer (tokenizer.json or tokenizer.model)")
    return needed


def _rel(root: Path, path: Path, folder: Path) -> str:
    return path.relative_to(root).as_posix()


def _check_needed(folder: Path, manifest: Manifest, genai: dict[str, Path]) -> None:
    listed = {p for p in package_files(folder, manifest).values()}
    for name, path in sorted(needed_files(folder, genai).items()):
        if path not in listed:
            raise Phi3OnnxError(f"{Path(folder) / MANIFEST} does not list {name!r}, which the package needs: "
                                "its sha256 is unchecked; re-export the package")


def external_data(model_path: Path) -> list[str]:
    """The external-data file names of an ONNX graph, read from its protobuf without the onnx package
    (the runtime needs only onnxruntime) and without loading any weights."""
    try:
        graph = _fields(model_path.read_bytes()).get(7, [])
        return sorted({name for g in graph for name in _graph_locations(g)})
    except (IndexError, ValueError, RecursionError):
        raise Phi3OnnxError(f"{model_path} is not a readable ONNX graph") from None


def _graph_locations(graph: bytes) -> Iterator[str]:
    """GraphProto: initializer (5) tensors, and node (1) attributes' tensors and subgraphs."""
    fields = _fields(graph)
    for tensor in fields.get(5, []):
        yield from _tensor_locations(tensor)
    for node in fields.get(1, []):
        for attr in _fields(node).get(5, []):
            a = _fields(attr)
            for tensor in a.get(5, []) + a.get(10, []):
                yield from _tensor_locations(tensor)
            for sub in a.get(6, []) + a.get(11, []):
                yield from _graph_locations(sub)


def _tensor_locations(tensor: bytes) -> Iterator[str]:
    """TensorProto.external_data (13) entries {key (1): value (2)} with key "location"."""
    for entry in _fields(tensor).get(13, []):
        kv = _fields(entry)
        if kv.get(1) == [b"location"]:
            yield kv.get(2, [b""])[0].decode("utf-8", "replace")


def _fields(buf: bytes) -> dict[int, list[bytes]]:
    """The length-delimited fields of one protobuf message {field number: [payloads]}; others skipped."""
    out: dict[int, list[bytes]] = {}
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(buf, pos)
        elif wire == 1 or wire == 5:
            pos += 8 if wire == 1 else 4
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > len(buf):
                raise ValueError("truncated field")
            out.setdefault(number, []).append(buf[pos:pos + size])
            pos += size
        else:
            raise ValueError(f"wire type {wire}")
    return out


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7


# --- one rule for what a folder holds: a package, or a bundle of packages -------------------------
@dataclass(frozen=True)
class Variant:
    """One package: the folder itself, or one variant folder of a bundle (named by bundle.json, or by
    its folder for a bundle without one)."""

    name: str
    path: Path
    manifest: Manifest


@dataclass(frozen=True)
class Variants:
    items: tuple[Variant, ...]
    bundle: bool


def discover(path: str | os.PathLike) -> Variants:
    """A package (manifest.json), a bundle (bundle.json: its variants, in its order) or a folder of
    packages without bundle.json (subfolders holding manifest.json, in name order).

    Every variant's manifest is read and every file name it and its genai_config.json hold is
    checked to stay inside its folder, so a bad entry is refused even in a variant not chosen.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise Phi3OnnxError(f"package {folder} does not exist")
    root = real_folder(folder)
    if inside(root, MANIFEST, str(folder)).is_file():
        return Variants((_variant(folder.name, folder),), bundle=False)
    entries = _bundle_entries(folder, root) if inside(root, BUNDLE, str(folder)).is_file() else _subfolders(folder, root)
    items = tuple(_variant(name, sub) for name, sub in entries)
    _check_same_model(items)
    return Variants(items, bundle=True)


def _variant(name: str, folder: Path) -> Variant:
    manifest = read_manifest(folder)
    package_files(folder, manifest)
    genai_files(folder)
    return Variant(name, folder, manifest)


def _bundle_entries(folder: Path, root: Path) -> list[tuple[str, Path]]:
    """(name, folder) of bundle.json's variants; each path must be a subfolder of the bundle."""
    doc_path = folder / BUNDLE
    try:
        doc = json.loads(doc_path.read_text(encoding="utf-8"))
        if not isinstance(doc, dict) or doc.get("format") != BUNDLE_FORMAT:
            raise ValueError(f"format {doc.get('format') if isinstance(doc, dict) else doc!r:.80} is not {BUNDLE_FORMAT!r}")
        raw = [(v["name"], v["path"]) for v in _field(doc, "variants", list)]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, RecursionError) as exc:
        raise Phi3OnnxError(f"{doc_path} is corrupt ({type(exc).__name__}: {_one_line(exc)})") from None
    if not raw:
        raise Phi3OnnxError(f"{doc_path} lists no variants")
    entries = [(_variant_name(doc_path, name), inside(root, rel, f"{doc_path}: variants[{i}].path"))
               for i, (name, rel) in enumerate(raw)]
    _check_unique(doc_path, entries)
    return entries


def _variant_name(doc_path: Path, name: object) -> str:
    if not isinstance(name, str) or not name:
        raise Phi3OnnxError(f"{doc_path}: a variant's name must be a non-empty string, got {name!r:.80}")
    return name


def _check_unique(doc_path: Path, entries: list[tuple[str, Path]]) -> None:
    names, paths = [n for n, _ in entries], [p for _, p in entries]
    for label, values in (("name", names), ("path", paths)):
        dupes = sorted({str(v) for v in values if values.count(v) > 1})
        if dupes:
            raise Phi3OnnxError(f"{doc_path}: variant {label} listed twice: {', '.join(dupes)}")


def _subfolders(folder: Path, root: Path) -> list[tuple[str, Path]]:
    """A bundle without bundle.json: its subfolders that hold manifest.json (symlinks must stay inside)."""
    names = sorted(p.name for p in folder.iterdir())
    subs = [(n, inside(root, n, str(folder))) for n in names]
    found = [(n, p) for n, p in subs if p.is_dir() and (p / MANIFEST).is_file()]
    if not found:
        raise Phi3OnnxError(f"{folder} is not a phi3-onnx package (no {MANIFEST}) nor a bundle ({BUNDLE}, or subfolders with {MANIFEST})")
    return found


def _check_same_model(items: tuple[Variant, ...]) -> None:
    """Variants of one bundle are exports of one model (the eval compares them on one tokenization)."""
    first = items[0]
    for v in items[1:]:
        if v.manifest.model != first.manifest.model:
            raise Phi3OnnxError(f"bundle variants {first.name} and {v.name} are exports of different models")
