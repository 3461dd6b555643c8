"""A bench document as a printed table, a Markdown table and (with matplotlib, the `[bench]` extra) a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from phi3_onnx.errors import Phi3OnnxError

COLUMNS = ("variant", "ep", "threads", "prompt", "new", "prefill tok/s", "TTFT ms", "decode tok/s", "× first",
           "peak RSS GiB", "load s", "model MiB")


def _fmt(value: Any, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def table_rows(doc: dict[str, Any]) -> list[list[str]]:
    """The rows as text; `× first` is decode speed relative to the first variant at the same prompt length."""
    first: dict[int, float] = {}
    out = []
    for row in doc["rows"]:
        decode = row.get("decode_tokens_per_s")
        base = first.setdefault(row["prompt_tokens"], decode) if decode else None
        rss = row.get("peak_rss_bytes")
        out.append([
            row["variant"] + ("" if row["status"] == "ok" else f" ({row['status']})"), str(row.get("ep") or "—"),
            str(row.get("threads") or "—"), str(row["prompt_tokens"]), str(row["new_tokens"]),
            _fmt(row.get("prefill_tokens_per_s")), _fmt(row.get("time_to_first_token_ms")), _fmt(decode, 2),
            _fmt(decode / base if decode and base else None, 2), _fmt(rss / 2**30 if rss else None, 2),
            _fmt(row.get("load_s"), 2), _fmt(row["model_bytes"] / 2**20, 0),
        ])
    return out


def print_table(doc: dict[str, Any], file: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"phi3-onnx bench {doc['package']} (medians of {doc['settings']['repeats']} rounds)")
    for i, name in enumerate(COLUMNS):
        table.add_column(name, justify="left" if i < 2 else "right")
    for cells in table_rows(doc):
        table.add_row(*cells)
    Console(file=file, width=160).print(table)
    for row in doc["rows"]:
        if row.get("error"):
            print(f"error: {row['variant']}: {row['error']}", file=file)


def to_markdown(doc: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(doc)]
    return "\n".join(lines) + "\n"


def require_matplotlib() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise Phi3OnnxError("--plot needs matplotlib: pip install 'phi3-onnx[bench]'") from None
    return plt


def plot(doc: dict[str, Any], path: Path) -> None:
    """Grouped bars: decode and prefill tokens/s per variant, one group per prompt length."""
    plt = require_matplotlib()
    variants = list(dict.fromkeys(r["variant"] for r in doc["rows"]))
    lengths = list(dict.fromkeys(r["prompt_tokens"] for r in doc["rows"]))
    by = {(r["variant"], r["prompt_tokens"]): r for r in doc["rows"]}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(variants)
    for ax, metric, label in ((axes[0], "decode_tokens_per_s", "decode tokens/s"),
                              (axes[1], "prefill_tokens_per_s", "prefill tokens/s")):
        for i, v in enumerate(variants):
            values = [by[(v, p)].get(metric) or 0 for p in lengths if (v, p) in by]
            ax.bar([j + i * width for j in range(len(values))], values, width, label=v)
        ax.set_xticks([j + width * (len(variants) - 1) / 2 for j in range(len(lengths))])
        ax.set_xticklabels([f"prompt {p}" for p in lengths])
        ax.set_ylabel(label)
    axes[0].legend(fontsize="small")
    fig.suptitle(f"{Path(doc['package']).name}: {doc['machine']['cpu']}, {doc['rows'][0].get('threads')} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
