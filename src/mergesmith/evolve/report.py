"""The end of a search: the best candidate against the start recipe (and the input models) on the search and the
held-out split, as a table, STORAGE/report.json and STORAGE/scores.svg (score per evaluation)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from mergesmith.errors import MergeError
from mergesmith.evolve.tasks import SPLITS, fitness, gap_share

# the search split's last column: the score the search used (`score:` in the config)
_SCORE_NAMES = {"sum": "score", "gap": "gap score"}


def _rows(prep, journal) -> List[Dict[str, Any]]:
    """What the report scores: the input models (for the gap), the start recipe and the best candidate."""
    g = prep.genome
    rows = [{"name": "base", "model": g.base_model}] if g.base_model else []
    rows += [{"name": Path(m).name, "model": m} for m in g.models]
    best = journal.best()
    rows += [
        {"name": "start", "recipe": g.recipe(prep.x0)},
        {"name": f"best (#{best['index']})", "recipe": best["recipe"], "index": best["index"]},
    ]
    return rows


def score_rows(pool, rows: List[Dict[str, Any]], splits: Sequence[str], every_metric: bool) -> None:
    """Scores each row (a "model" path or a "recipe") on the splits with the search's workers: row[split] is
    {task: {metric: value, ...}}."""
    jobs = [
        {
            "index": f"{k}/{split}",
            "split": split,
            "every_metric": every_metric,
            "recipe": r.get("recipe"),
            "model": r.get("model"),
        }
        for k, r in enumerate(rows)
        for split in splits
    ]
    got: Dict[str, Dict[str, Any]] = {}
    pool.run(jobs, lambda res: got.__setitem__(res["index"], res))
    for k, r in enumerate(rows):
        for split in splits:
            r[split] = got[f"{k}/{split}"]["scores"]


def input_scores(prep, pool) -> Dict[str, Any]:
    """`score: gap`'s reference points: the base model and every input model scored on the search split, as the
    candidates are: {"base": scores, "models": {path: scores}}."""
    g = prep.genome
    rows = [{"model": m} for m in (g.base_model, *g.models)]
    score_rows(pool, rows, ("search",), every_metric=False)
    return {"base": rows[0]["search"], "models": {m: r["search"] for m, r in zip(g.models, rows[1:])}}


def final_report(prep, journal, pool, storage: Path, baseline: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Scores the report's rows on both splits, writes report.json and scores.svg; `baseline` is `score: gap`'s."""
    rows = _rows(prep, journal)
    score_rows(pool, rows, SPLITS, every_metric=True)
    specs = prep.setup["tasks"]
    for r in rows:
        r["score"] = fitness(specs, r["search"], baseline)
    base = rows[0] if prep.genome.base_model else None
    inputs = [r for r in rows if "model" in r and r is not base]
    for r in rows:
        r["recovered"] = recovered(
            r["heldout"], base["heldout"] if base else None, [i["heldout"] for i in inputs], specs
        )
    report = {
        "rows": [{k: v for k, v in r.items() if k != "recipe"} for r in rows],
        "evaluations": len(journal.entries),
        "best": journal.best()["index"],
        "score": prep.config.score,
        "table": format_report(rows, specs, prep.config.score),
    }
    _write(storage / "report.json", json.dumps(report, indent=1))
    _write(
        storage / "scores.svg",
        svg_scores(
            [e["score"] for e in journal.entries],
            rows[-2]["score"],
            f"mergesmith evolve: {_SCORE_NAMES[prep.config.score]} per evaluation",
        ),
    )
    return report


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise MergeError(f"cannot write {path}: {e.strerror}") from None


def recovered(
    merged: Dict[str, Any],
    base: Optional[Dict[str, Any]],
    inputs: Sequence[Dict[str, Any]],
    specs: Sequence[Dict[str, Any]],
) -> Optional[float]:
    """Mean over tasks of (merged - base) / (best input - base) in the task's metric (perplexity: its log, lower is
    better): the share of the gap to the best input model that the merge closed, as `mergesmith demo` measures."""
    if base is None:
        return None
    shares = [x for x in (gap_share(s, merged, base, inputs) for s in specs) if x is not None]
    return sum(shares) / len(shares) if shares else None


def format_report(rows: List[Dict[str, Any]], specs: Sequence[Dict[str, Any]], score: str = "sum") -> str:
    """The end-of-search table: per split, each row's task scores, exact match and the search's score (`score`: sum or
    gap) or gap recovered."""
    names = [s["name"] for s in specs]
    lines = []
    for split in SPLITS:
        lines += _split_table(rows, specs, names, split, _SCORE_NAMES[score])
    return "\n".join(lines).rstrip()


def _split_table(rows, specs, names: List[str], split: str, score_name: str) -> List[str]:
    """One split's lines of the table (none when no row has a score on it)."""
    short = [n.split(":")[-1][:9] for n in names]
    shown = [n for n in names if any(n in r[split] for r in rows)]
    if not shown:
        return []
    metric = {s["name"]: s["metric"] for s in specs}
    em = [n for n in shown if "exact_match" in rows[0][split].get(n, {}) and metric[n] != "exact_match"]
    lines = [
        f"{split} split: {', '.join(sorted({metric[n] for n in shown}))}"
        + (" | exact match" if em else "")
        + (f" | {score_name}" if split == "search" else " | recovered")
    ]
    head = (
        f"{'':18s}"
        + "".join(f"{short[names.index(n)]:>10s}" for n in shown)
        + " |"
        + "".join(f"{short[names.index(n)]:>10s}" for n in em)
        + " |"
    )
    lines += [head, "-" * (len(head) + 10)]
    for r in rows:
        lines.append(_report_row(r, split, shown, em, metric))
    return lines + [""]


def _report_row(r: Dict[str, Any], split: str, shown: List[str], em: List[str], metric: Dict[str, str]) -> str:
    row = (
        f"{r['name'][:18]:18s}"
        + "".join(f"{r[split][n][metric[n]]:10.3f}" for n in shown)
        + " |"
        + "".join(f"{r[split][n]['exact_match']:10.3f}" for n in em)
        + " |"
    )
    last = r["score"] if split == "search" else r.get("recovered")
    return row + (f" {last:8.3f}" if split == "search" else (f" {last:8.0%}" if last is not None else "        -"))


def svg_scores(scores: Sequence[float], start: Optional[float], title: str) -> str:
    """Score per evaluation (dots), the best so far (line) and the start recipe's score (dashed): SVG, no plotting
    library needed."""
    from xml.sax.saxutils import escape

    W, H, left, right, top, bottom = 720, 360, 70, 20, 40, 50
    pw, ph = W - left - right, H - top - bottom
    vals = list(scores) + ([start] if start is not None else [])
    lo, hi = min(vals), max(vals)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    pad = (hi - lo) * 0.05
    lo, hi = lo - pad, hi + pad
    n = max(1, len(scores) - 1)
    x = lambda i: left + pw * i / n  # noqa: E731
    y = lambda v: top + ph * (hi - v) / (hi - lo)  # noqa: E731
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
        'font-family="sans-serif" font-size="11">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="14">{escape(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>',
    ]
    for k in range(5):
        v = lo + (hi - lo) * k / 4
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.3f}</text>')
    out += [
        f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="2.5" fill="#1f77b4" fill-opacity="0.6"/>'
        for i, v in enumerate(scores)
    ]
    best, pts = float("-inf"), []
    for i, v in enumerate(scores):
        best = max(best, v)
        pts.append(f"{x(i):.1f},{y(best):.1f}")
    out.append(f'<polyline fill="none" stroke="#d62728" stroke-width="2" points="{" ".join(pts)}"/>')
    if start is not None:
        out.append(
            f'<line x1="{left}" x2="{left + pw}" y1="{y(start):.1f}" y2="{y(start):.1f}" stroke="#555" '
            'stroke-dasharray="5,4"/>'
        )
    out += [
        f'<text x="{left + pw / 2}" y="{H - 15}" text-anchor="middle">evaluation</text>',
        f'<text x="{left + 8}" y="{top + 14}" fill="#d62728">best so far</text>',
        f'<text x="{left + 8}" y="{top + 28}" fill="#1f77b4">candidate</text>',
        f'<text x="{left + 8}" y="{top + 42}" fill="#555">start recipe (dashed)</text>',
        "</svg>",
    ]
    return "\n".join(out)
