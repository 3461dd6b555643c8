"""Human-readable forms of a Report: a Markdown table (for PR comments / job summaries) and text."""

from __future__ import annotations

from phi3_onnx.evaluate.report import Report, VariantResult

COLUMNS = ("variant", "target", "status", "EP", "ppl", "ref ppl", "Δppl", "Δppl %", "KL mean", "KL p99",
           "top-1", "max |Δlogit|", "tokens", "seconds", "notes")


def _cells(v: VariantResult) -> list[str]:
    m = v.metrics
    nums = ["-"] * 10 if m is None else [
        f"{m.ppl:.4f}", f"{m.ref_ppl:.4f}", f"{m.ppl_increase:+.4f}", f"{m.ppl_increase_pct:+.3f}",
        f"{m.kl_mean:.3g}", f"{m.kl_p99:.3g}", f"{m.top1:.4f}", f"{m.max_abs_dlogit:.3g}", str(m.tokens), f"{v.seconds:.1f}",
    ]
    return [v.name, v.target, v.status.upper(), v.ep or "-", *nums, _notes(v)]


def _notes(v: VariantResult) -> str:
    notes = [f.describe() for f in v.failures]
    notes += [n for n in (v.reason, v.ep_note) if n]
    lim = v.limits.limits
    notes.append(f"limits ({v.limits.source}): Δppl ≤ {lim.max_ppl_increase_pct:g}%, KL ≤ {lim.max_kl:g}, top-1 ≥ {lim.min_top1:g}")
    return "; ".join(notes)


def _header(report: Report) -> list[str]:
    d, r = report.data, report.reference
    verdict = "PASS" if report.passed else "FAIL"
    return [
        f"Accuracy drift: {verdict} — {report.package} vs {r.kind} {r.path} ({r.ep})",
        f"data {d.path}: {d.windows} window(s) of {d.window} tokens, positions {d.positions}",
    ]


def to_markdown(report: Report) -> str:
    rows = [_cells(v) for v in report.variants]
    lines = [f"### {_header(report)[0]}", "", _header(report)[1], "",
             _md_row(COLUMNS), "|" + "---|" * len(COLUMNS)]
    lines += [_md_row(row) for row in rows]
    return "\n".join(lines) + "\n"


def _md_row(cells) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def to_text(report: Report) -> str:
    """Aligned columns without the notes, then one notes line per variant."""
    rows = [COLUMNS[:-1]] + [tuple(_cells(v)[:-1]) for v in report.variants]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = _header(report) + ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines += [f"  {v.name}: {_notes(v)}" for v in report.variants]
    return "\n".join(lines) + "\n"
