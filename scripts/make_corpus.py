"""Build the small English corpus used to train the tiny Phi-3 test checkpoint.

Why: tests need a real (not random) tiny model whose text we may redistribute. CPython's
standard-library docstrings are English prose under the PSF licence and are present on
every machine with Python, so we extract them deterministically (``ast``, no imports),
keep prose paragraphs only, dedupe, and split them by a content hash into three
disjoint files.  The committed text files are the source of truth; this script only
documents (and can regenerate) how they were made.

    python scripts/make_corpus.py            # writes the three files below

The committed files were made with CPython 3.11.7's standard library; another version's
docstrings give slightly different files (pass --stdlib to point at a specific one).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import re
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "tests/assets/corpus/train.txt"
HELDOUT = ROOT / "tests/assets/corpus/heldout.txt"
CALIB = ROOT / "src/phi3_onnx/data/calibration.txt"
SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "turtledemo",
             "pydoc_data", "ensurepip", "__pycache__", "__phello__"}
BAD = re.compile(r"https?:|www\.|[@$#{}|<>=\\]|\bXXX\b|TODO|Copyright|__|\.\.\.|::|\w\.\w+\(")
ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`~?([^`]+)`")
SYSTEM = "You are a helpful assistant who explains the Python standard library."
QUESTIONS = ("What does {} do?", "Explain {} briefly.", "What is {} for?", "Describe {}.")


def clean(par: str) -> str | None:
    """Return one line of prose, or None when the paragraph looks like code/markup."""
    lines = par.splitlines()
    if any(l[:1].isspace() or l.lstrip().startswith((">>>", "-", "*", "+", "o ")) for l in lines):
        return None  # indented code, doctest, bullet/option lists
    text = ROLE.sub(r"\1", " ".join(l.strip() for l in lines)).replace("``", "").replace("`", "")
    text = re.sub(r"\s+", " ", text).strip()
    words = text.split()
    letters = sum(c.isalpha() or c in " ,.;'-()" for c in text)
    if (len(words) < 8 or len(text) > 1200 or not text[0].isupper() or text[-1] != "."
            or BAD.search(text) or letters < 0.93 * len(text) or not text.isascii()):
        return None
    return text


def docstrings(stdlib: Path) -> list[tuple[str, str]]:
    """(qualified name, docstring) for every module/class/function, in a fixed order."""
    out: list[tuple[str, str]] = []
    files = sorted(p for p in stdlib.rglob("*.py")
                   if not SKIP_DIRS & set(p.relative_to(stdlib).parts))
    for path in files:
        mod = ".".join(path.relative_to(stdlib).with_suffix("").parts).removesuffix(".__init__")
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue

        def walk(node: ast.AST, prefix: str) -> None:
            doc = ast.get_docstring(node, clean=True)  # type: ignore[arg-type]
            if doc:
                out.append((prefix, doc))
            for child in getattr(node, "body", []):
                if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    if not child.name.startswith("_"):
                        walk(child, f"{prefix}.{child.name}")
        walk(tree, mod)
    return out


def bucket(text: str) -> str:
    """Deterministic split by content hash (7% held-out, 5% calibration, 12% unused,
    76% train), so every split samples all modules evenly and sizes need no caps."""
    h = int(hashlib.sha1(text.lower().encode()).hexdigest()[:8], 16) % 100
    return "heldout" if h < 7 else "calib" if h < 12 else "unused" if h < 24 else "train"


def chat(name: str, summary: str, system: bool) -> str:
    """One sample in the Phi-3 chat template (the same string apply_chat_template makes)."""
    q = QUESTIONS[int(hashlib.sha1(name.encode()).hexdigest(), 16) % len(QUESTIONS)]
    head = f"<|system|>\n{SYSTEM}<|end|>\n" if system else ""
    return f"{head}<|user|>\n{q.format(name)}<|end|>\n<|assistant|>\n{summary}<|end|>\n"


def build(stdlib: Path, n_chat: int) -> dict[str, list[str]]:
    """Collect prose paragraphs and chat samples per split."""
    seen: set[str] = set()
    splits: dict[str, list[str]] = {k: [] for k in ("train", "heldout", "calib", "unused")}
    summaries: dict[str, list[tuple[str, str]]] = {k: [] for k in splits}
    for name, doc in docstrings(stdlib):
        for i, par in enumerate(doc.split("\n\n")):
            text = clean(par) if "\n" in par or len(par.split()) >= 8 else None
            if i == 0 and not text and "\n" not in par and 4 <= len(par.split()) <= 30:
                # a short one-line summary: too short for prose, fine as a chat answer
                ok = par[0].isupper() and par.endswith(".") and not BAD.search(par)
                text = par if ok and par.isascii() else None
                short = True
            else:
                short = False
            if not text or text.lower() in seen:
                continue
            seen.add(text.lower())
            split = bucket(text)
            if i == 0 and len(text) <= 200 and "." in name and "._" not in f".{name}":
                summaries[split].append((name, text))  # public API summaries only
            if not short:
                splits[split].append(text)
    # Chat samples are drawn from each split's own summaries, so splits stay disjoint.
    for split, n in (("train", n_chat), ("calib", n_chat // 12)):
        pool = summaries[split]
        step = max(1, len(pool) // max(n, 1))
        picked = pool[::step][:n]
        n_prose = len(splits[split])
        for k, (name, summ) in enumerate(picked):
            # interleave chat with prose so any contiguous slice has both
            pos = (k * n_prose) // max(len(picked), 1) + k
            splits[split].insert(pos, chat(name, summ, system=k % 5 == 0).rstrip("\n"))
    return splits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    ap.add_argument("--chat", type=int, default=360, help="chat samples mixed into train.txt")
    args = ap.parse_args()
    splits = build(args.stdlib, args.chat)
    for split, path in (("train", TRAIN), ("heldout", HELDOUT), ("calib", CALIB)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n\n".join(splits[split]) + "\n", encoding="utf-8")
        print(f"{path.relative_to(ROOT)}: {len(splits[split])} docs, "
              f"{path.stat().st_size / 1000:.0f} KB")


if __name__ == "__main__":
    main()
