"""What a merge did to each part of the model: how far it moved from the base, and how much of each input's change
it kept.

For every tensor the merged model shares (same name and shape) with its base and inputs, with the inputs' task
vectors D_i = model_i - base and the merge's M = merged - base, sums over the tensor in float64 (row blocks, so
memory stays at one block per model):

- change = ||M|| / ||base||: how far the merge moved the weights;
- untouched: the share of elements where merged == base exactly (what sparsifying methods leave alone);
- effective weights c: the least-squares fit M ~ sum_i c_i D_i (normal equations G c = b, G_ij = <D_i, D_j>,
  b_i = <M, D_i>). A linear or task-arithmetic merge gives back its recipe's weights; TIES/DARE/DELLA show how much
  of each model's change survived sparsification and sign election;
- fit = c.b / ||M||^2: the share of the merge's change that such a weighted sum explains (1 for linear merges);
- cosine(M, D_i).

Groups (embeddings, each layer, head and norm; or module kinds; or tensors) add their tensors' sums before the
fit, so a group's weights are those of one least-squares problem over all its elements. Without a base the inputs
themselves play the D_i (a `linear` merge of models, not task vectors).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from mergesmith.errors import MergeError
from mergesmith.io.index import ModelIndex
from mergesmith.params import is_embedding, layer_index
from mergesmith.plan import BLOCK_ELEMENTS

CONFIG_NAMES = ("mergesmith_config.yml", "mergekit_config.yml")


@dataclass
class Sums:
    """Float64 sums over a set of elements (one tensor or a group of them); k inputs."""

    k: int
    n: int = 0
    tensors: int = 0
    base_sq: float = 0.0
    merged_sq: float = 0.0
    untouched: int = 0
    gram: np.ndarray = field(default=None)  # type: ignore[assignment]
    cross: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self):
        if self.gram is None:
            self.gram = np.zeros((self.k, self.k))
        if self.cross is None:
            self.cross = np.zeros(self.k)

    def add(self, other: "Sums") -> None:
        self.n += other.n
        self.tensors += other.tensors
        self.base_sq += other.base_sq
        self.merged_sq += other.merged_sq
        self.untouched += other.untouched
        self.gram += other.gram
        self.cross += other.cross

    def summary(self) -> Dict[str, object]:
        """change, untouched, weights, fit, cosines (None where undefined: no base, or nothing changed)."""
        out: Dict[str, object] = {"tensors": self.tensors, "elements": self.n}
        out["change"] = float(np.sqrt(self.merged_sq / self.base_sq)) if self.base_sq > 0 else None
        out["untouched"] = self.untouched / self.n if self.n and self.base_sq > 0 else None
        if self.merged_sq > 0 and np.any(np.diag(self.gram) > 0):
            c = np.linalg.lstsq(self.gram, self.cross, rcond=None)[0]
            out["weights"] = [float(x) for x in c]
            out["fit"] = float(min(1.0, max(0.0, c @ self.cross / self.merged_sq)))
            d = np.sqrt(np.diag(self.gram) * self.merged_sq)
            out["cosine"] = [float(x / y) if y > 0 else None for x, y in zip(self.cross, d)]
        else:
            out["weights"] = out["fit"] = out["cosine"] = None
        return out


def tensor_sums(merged: torch.Tensor, base: Optional[torch.Tensor], inputs: Sequence[torch.Tensor]) -> Sums:
    """Sums of one block of rows (or a whole tensor); all arguments the same shape."""
    s = Sums(len(inputs), n=merged.numel())
    m = merged.reshape(-1).to(torch.float64)
    d = torch.stack([x.reshape(-1).to(torch.float64) for x in inputs])
    if base is not None:
        b = base.reshape(-1).to(torch.float64)
        s.base_sq = float(b @ b)
        s.untouched = int((m == b).sum())
        m = m - b
        d -= b
    s.merged_sq = float(m @ m)
    s.gram = (d @ d.T).numpy()
    s.cross = (d @ m).numpy()
    return s


def group_of(name: str, by: str) -> str:
    """The row a tensor is counted in: `layer` (embeddings / layer N / head & norm), `module` (the name with its
    layer number as *), or `tensor`."""
    if by == "tensor":
        return name
    i = layer_index(name)
    if by == "module":
        return re.sub(r"\.(\d+)\.", ".*.", name, count=1) if i is not None else name
    if i is not None:
        return f"layer {i}"
    return "embeddings" if is_embedding(name) and "lm_head" not in name else "head & norm"


def _order(group: str) -> Tuple[int, int, str]:
    if group == "embeddings":
        return (0, 0, group)
    m = re.fullmatch(r"layer (\d+)", group)
    if m:
        return (1, int(m.group(1)), group)
    return (2 if group == "head & norm" else 3, 0, group)


def inspect_merge(
    merged: ModelIndex,
    base: Optional[ModelIndex],
    inputs: Sequence[ModelIndex],
    by: str = "layer",
    progress: bool = False,
) -> Dict[str, object]:
    """Per-group summaries (see the module docstring), in model order, plus the whole model and what was skipped."""
    from tqdm import tqdm

    groups: Dict[str, Sums] = {}
    total = Sums(len(inputs))
    skipped: List[str] = []
    names = list(merged.tensors)
    for name in tqdm(names, desc="inspecting", unit="tensor", disable=None if progress else True):
        info = merged.tensors[name]
        shape = tuple(info.shape)
        others = ([base] if base is not None else []) + list(inputs)
        if not info.dtype.is_floating_point or any(
            name not in o.tensors or tuple(o.tensors[name].shape) != shape for o in others
        ):
            skipped.append(name)
            continue
        rows = shape[0] if shape else 1
        per = max(1, BLOCK_ELEMENTS // max(1, info.numel // max(1, rows)))
        s = Sums(len(inputs))
        for a in range(0, rows, per):
            r = (a, min(rows, a + per)) if rows > per else None
            part = tensor_sums(
                merged.read(name, rows=r),
                base.read(name, rows=r) if base is not None else None,
                [x.read(name, rows=r) for x in inputs],
            )
            s.add(part)
        s.tensors = 1
        groups.setdefault(group_of(name, by), Sums(len(inputs))).add(s)
        total.add(s)
    order = sorted(groups, key=_order)
    return {
        "groups": [dict(group=g, **groups[g].summary()) for g in order],
        "total": dict(group="whole model", **total.summary()),
        "skipped": skipped,
    }


# ----------------------------------------------------------------------------------------------- finding inputs


def recipe_inputs(folder: Path) -> Tuple[Optional[str], List[str], Dict[str, str], str]:
    """(base_model, [model refs], {ref: path resolved when merged}, config file name) from a merged folder's
    mergesmith_config.yml (or mergekit's mergekit_config.yml)."""
    from mergesmith.recipe import parse_recipe

    for fname in CONFIG_NAMES:
        f = folder / fname
        if f.exists():
            break
    else:
        raise MergeError(
            f"{folder}: no {' or '.join(CONFIG_NAMES)} to say which models were merged; pass --base and --model"
        )
    text = f.read_text(encoding="utf-8")
    recipe = parse_recipe(text, str(f))
    c = recipe.config
    if c.slices or c.modules:
        raise MergeError(
            f"{f}: this merge was built from slices (layers moved or repeated), so its tensors do not "
            "pair with its inputs' by name; pass --base and --model to compare it with models of "
            "its own layout"
        )
    return c.base_model, [m.model for m in c.models or []], recipe.found_at(), fname


def labels(refs: Sequence[str]) -> List[str]:
    """Short, distinct names for the inputs: the last part of each path or Hub id."""
    short = [re.split(r"[\\/]", r.rstrip("/\\"))[-1] or r for r in refs]
    return [s if short.count(s) == 1 else f"{s}#{i + 1}" for i, s in enumerate(short)]


# ----------------------------------------------------------------------------------------------- showing


def format_table(report: Dict[str, object], names: Sequence[str]) -> str:
    """A fixed-width table: one row per group, then the whole model."""
    rows = list(report["groups"]) + [report["total"]]  # type: ignore[operator]
    head = ["group", "change", "untouched"] + [f"w:{n}" for n in names] + ["fit"]
    out = []
    for r in rows:
        w = r["weights"] or [None] * len(names)
        out.append(
            [r["group"], _pct(r["change"], 2), _pct(r["untouched"], 1)] + [_num(x) for x in w] + [_pct(r["fit"], 1)]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(head, *out)]
    fmt = lambda cells: "  ".join(  # noqa: E731
        str(c).ljust(wd) if i == 0 else str(c).rjust(wd) for i, (c, wd) in enumerate(zip(cells, widths))
    )
    lines = [fmt(head)] + [fmt(r) for r in out[:-1]] + ["-" * len(fmt(head)), fmt(out[-1])]
    lines += [
        "",
        "change: ||merged - base|| / ||base||; untouched: elements equal to the base's; w: effective "
        "weight of each input's task vector (least-squares fit of the merge's change); fit: share of the "
        "change that fit explains.",
    ]
    if report["skipped"]:
        lines.append(
            f"skipped {len(report['skipped'])} tensor(s) that the inputs do not all hold at the merged "
            f"shape (e.g. {report['skipped'][0]})"
        )
    return "\n".join(lines)


def _pct(x: Optional[float], digits: int) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def _num(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.3f}"


def _ticks(lo: float, hi: float) -> List[float]:
    """Round axis ticks (steps of 1, 2 or 5 times a power of ten) covering [lo, hi], about five of them."""
    import math

    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    raw = (hi - lo) / 5
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(i * step, 12) for i in range(first, last + 1)]


COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def _svg_panel(out: List[str], box, y0: float, series: List[Tuple[str, str, List[Optional[float]]]], ylabel: str,
               pct: bool) -> None:  # fmt: skip
    """One panel of svg_plot at height y0: ticks, a line per series with its legend. box: (left, width, height,
    x of each group)."""
    from xml.sax.saxutils import escape

    left, plot_w, panel, xs = box
    vals = [v for _, _, s in series for v in s if v is not None] + [0.0]
    ticks = _ticks(min(vals), max(vals))
    lo, hi = ticks[0], ticks[-1]
    y = lambda v: y0 + panel * (hi - v) / (hi - lo)  # noqa: E731
    out.append(f'<rect x="{left}" y="{y0}" width="{plot_w}" height="{panel}" fill="none" stroke="#888"/>')
    for v in ticks:
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#eee"/>')
        label = f"{100 * v:.4g}%" if pct else f"{v:.4g}"
        out.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{label}</text>')
    if lo < 0 < hi:
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(0):.1f}" y2="{y(0):.1f}" stroke="#888"/>')
    out.append(
        f'<text x="18" y="{y0 + panel / 2}" transform="rotate(-90 18 {y0 + panel / 2})" '
        f'text-anchor="middle">{escape(ylabel)}</text>'
    )
    for k, (label, color, s) in enumerate(series):
        pts = " ".join(f"{x:.1f},{y(v):.1f}" for x, v in zip(xs, s) if v is not None)
        if pts:
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{pts}"/>')
            for x, v in zip(xs, s):
                if v is not None:
                    out.append(f'<circle cx="{x:.1f}" cy="{y(v):.1f}" r="2.5" fill="{color}"/>')
        ly = y0 + 14 + 16 * k
        out.append(
            f'<line x1="{left + plot_w + 12}" x2="{left + plot_w + 32}" y1="{ly - 4}" y2="{ly - 4}" '
            f'stroke="{color}" stroke-width="2"/>'
        )
        out.append(f'<text x="{left + plot_w + 38}" y="{ly}">{escape(label)}</text>')


def svg_plot(report: Dict[str, object], names: Sequence[str], title: str) -> str:
    """Two panels over the groups: each input's effective weight, and the change from the base (SVG, no
    plotting library needed)."""
    from xml.sax.saxutils import escape

    groups = list(report["groups"])  # type: ignore[arg-type]
    W, left, right, top, panel, gap = 760, 70, 170, 40, 220, 60
    plot_w = W - left - right
    H = top + 2 * panel + gap + 70
    xs = [left + (plot_w * (i + 0.5) / max(1, len(groups))) for i in range(len(groups))]
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
        'font-family="sans-serif" font-size="11">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="14">{escape(title)}</text>',
    ]

    weights = [
        (n, COLORS[i % len(COLORS)], [(g["weights"] or [None] * len(names))[i] for g in groups])
        for i, n in enumerate(names)
    ]
    box = (left, plot_w, panel, xs)
    _svg_panel(out, box, top, weights, "effective weight", False)
    change = [("change", "#333", [g["change"] for g in groups])]
    _svg_panel(out, box, top + panel + gap, change, "||merged - base|| / ||base||", True)
    out.append(
        f'<text x="{left + plot_w / 2}" y="{H - 8}" text-anchor="middle">'
        f"{'layer' if any(g['group'].startswith('layer ') for g in groups) else ''}</text>"
    )
    step = max(1, len(groups) // 16)
    for i, g in enumerate(groups):
        if i % step == 0 or i == len(groups) - 1:
            label = g["group"].replace("layer ", "") if g["group"].startswith("layer ") else g["group"]
            ty = top + 2 * panel + gap + 16
            out.append(
                f'<text x="{xs[i]:.1f}" y="{ty}" text-anchor="end" '
                f'transform="rotate(-35 {xs[i]:.1f} {ty})">{escape(label[-28:])}</text>'
            )
    out.append("</svg>")
    return "\n".join(out) + "\n"
