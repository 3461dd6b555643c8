"""The --json report against its documentation (docs/eval-json.md): same keys, documented types.

The doc's tables are parsed here, so a key added to the report without documenting it (or a
documented key that disappears, or changes type) fails this test.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from phi3_onnx.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "eval-json.md"
HELDOUT = Path(__file__).resolve().parent / "assets" / "corpus" / "heldout.txt"
SECTIONS = {"Top level": (), "`reference`": ("reference",), "`data`": ("data",),
            "`variants[]`": ("variants", 0), "`metrics`": ("variants", 0, "metrics")}
TYPES = {"int": (int,), "float": (float, int), "string": (str,), "bool": (bool,), "object": (dict,),
         "array": (list,), "null": (type(None),)}


def documented_tables() -> dict[str, dict[str, str]]:
    """Section heading -> {key: type text} from the doc's Markdown tables."""
    tables: dict[str, dict[str, str]] = {}
    section = None
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        elif section in SECTIONS and (m := re.match(r"\| `(\w+)` \| ([\w ]+) \|", line)):
            tables.setdefault(section, {})[m.group(1)] = m.group(2).strip()
    return tables


def documented_example() -> dict:
    return json.loads(re.search(r"```json\n(.*?)\n```", DOC.read_text(encoding="utf-8"), re.S).group(1))


def at(doc, path):
    for key in path:
        doc = doc[key]
    return doc


def check_types(report: dict, tables: dict[str, dict[str, str]]) -> None:
    for section, path in SECTIONS.items():
        obj = at(report, path)
        assert set(obj) == set(tables[section]), f"{section}: report keys != documented keys"
        for key, type_text in tables[section].items():
            allowed = tuple(t for word in type_text.split(" or ") for t in TYPES[word])
            value = obj[key]
            assert isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed), (section, key, value)


@pytest.fixture(scope="module")
def report(exported, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("json") / "report.json"
    rc = main(["eval", str(exported("int4-cpu")), "--reference", str(exported("fp32-cpu")), "--data", str(HELDOUT),
               "--max-tokens", "128", "--json", str(out)])
    assert rc == 0
    return json.loads(out.read_text())


def test_report_keys_and_types_match_the_documentation(report):
    assert report["schema_version"] == 1
    check_types(report, documented_tables())


def test_documented_example_follows_the_documented_tables():
    check_types(documented_example(), documented_tables())


def test_metric_names_in_failures_are_the_metric_keys(report):
    """failures[].metric values name keys of `metrics`, so CI can look the value up."""
    doc = DOC.read_text(encoding="utf-8")
    for metric in ("ppl_increase_pct", "kl_mean", "top1"):
        assert f'`"{metric}"`' in doc and metric in report["variants"][0]["metrics"]
