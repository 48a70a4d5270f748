"""The result table: one row per figure, with its reference, ratio, target and verdict."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HOLDS = "holds"
FAILS = "fails"
BOUND = "bound by generator"
INFO = "info"

# A reference running at this share of the generator's own ceiling measures the
# generator, not the server.
GENERATOR_BOUND_SHARE = 0.9


@dataclass
class Row:
    scenario: str
    figure: str  # what is measured, e.g. "a2ad p50"
    measured: float | None
    unit: str
    reference_name: str = ""
    reference: float | None = None
    target: str = ""  # e.g. "≤ 1.15×", "≥ 0.9×", "≤ 5 ms"
    verdict: str = INFO
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.measured is None or not self.reference:
            return None
        return self.measured / self.reference


def _bound(reference_rate: float | None, ceiling_rate: float | None) -> bool:
    return bool(reference_rate and ceiling_rate) and (
        reference_rate >= GENERATOR_BOUND_SHARE * ceiling_rate  # type: ignore[operator]
    )


def ratio_row(
    scenario: str,
    figure: str,
    measured: float | None,
    unit: str,
    reference_name: str,
    reference: float | None,
    *,
    at_most: float | None = None,
    at_least: float | None = None,
    reference_rate: float | None = None,
    ceiling_rate: float | None = None,
    note: str = "",
) -> Row:
    """A figure judged as a ratio to its reference (or only reported, with no limit)."""
    row = Row(scenario, figure, measured, unit, reference_name, reference, note=note)
    ratio = row.ratio
    if at_most is not None:
        row.target = f"≤ {at_most:g}×"
        row.verdict = HOLDS if ratio is not None and ratio <= at_most else FAILS
    elif at_least is not None:
        row.target = f"≥ {at_least:g}×"
        row.verdict = HOLDS if ratio is not None and ratio >= at_least else FAILS
    if row.verdict != INFO and _bound(reference_rate, ceiling_rate):
        row.verdict = BOUND
        row.note = (row.note + "; " if row.note else "") + (
            f"reference at {reference_rate / ceiling_rate:.0%} of the generator's ceiling"  # type: ignore[operator]
        )
    return row


def limit_row(
    scenario: str,
    figure: str,
    measured: float | None,
    unit: str,
    *,
    at_most: float | None = None,
    at_least: float | None = None,
    note: str = "",
) -> Row:
    """A figure judged against an absolute limit."""
    row = Row(scenario, figure, measured, unit, note=note)
    if at_most is not None:
        row.target = f"≤ {at_most:g} {unit}"
        row.verdict = HOLDS if measured is not None and measured <= at_most else FAILS
    elif at_least is not None:
        row.target = f"≥ {at_least:,.0f} {unit}"
        row.verdict = HOLDS if measured is not None and measured >= at_least else FAILS
    return row


def _num(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, int):
        return f"{value:,} {unit}"
    if unit in ("ms",):
        return f"{value:.2f} {unit}"
    if abs(value) >= 100:
        return f"{value:,.0f} {unit}"
    return f"{value:.2f} {unit}"


def table(rows: list[Row]) -> str:
    header = ("scenario", "figure", "measured", "reference", "ratio", "target", "verdict")
    lines: list[tuple[str, ...]] = [header]
    for row in rows:
        ref = f"{_num(row.reference, row.unit)} {row.reference_name}" if row.reference_name else ""
        ratio = f"{row.ratio:.2f}×" if row.ratio is not None else ""
        verdict = row.verdict + (f" ({row.note})" if row.note else "")
        lines.append(
            (
                row.scenario,
                row.figure,
                _num(row.measured, row.unit),
                ref,
                ratio,
                row.target,
                verdict,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    out = []
    for n, line in enumerate(lines):
        cells = [cell.ljust(w) for cell, w in zip(line[:-1], widths, strict=True)]
        out.append("  ".join([*cells, line[-1]]).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in [*widths, 7]))
    return "\n".join(out)


def markdown(rows: list[Row]) -> str:
    """The same table as Markdown, for the README."""
    out = [
        "| scenario | figure | measured | reference | ratio | target | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        ref = f"{_num(row.reference, row.unit)} {row.reference_name}" if row.reference_name else ""
        ratio = f"{row.ratio:.2f}×" if row.ratio is not None else ""
        verdict = row.verdict + (f" ({row.note})" if row.note else "")
        out.append(
            f"| {row.scenario} | {row.figure} | {_num(row.measured, row.unit)} | {ref} | {ratio}"
            f" | {row.target} | {verdict} |"
        )
    return "\n".join(out)


def write_json(path: Path, meta: dict[str, Any], raw: dict[str, Any], rows: list[Row]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "meta": meta,
        "rows": [asdict(r) | {"ratio": r.ratio} for r in rows],
        "raw": raw,
    }
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
