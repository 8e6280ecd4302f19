"""The demo's figure, drawn as SVG with the standard library only (no plotting dependency).

Three rows of panels, all from the run's `results.json` content:

1. completion loss and greedy exact match of every row (bar = mean over seeds, dots = seeds);
2. the rotation search's per-layer choices (R2 / R3 / R4 on in how many seeds) at each bit setting;
3. outlier statistics of the FP SFT model at the inputs of the quantized linears, per layer, before and
   after rotation (typical = median over tokens of max|x| / median|x|, worst = max over tokens; log scale).
"""

from __future__ import annotations

import math
from xml.sax.saxutils import escape

COLORS = {"fp_sft": "#888888", "sft_rtn": "#cc4444", "sft_rot_rtn": "#e08844", "ste": "#4488cc", "roste": "#2a6f3a"}
BEFORE, AFTER = "#cc4444", "#4488cc"


class _Svg:
    def __init__(self, width: int, height: int) -> None:
        self.width, self.height, self.items = width, height, []

    def rect(self, x, y, w, h, fill, stroke="none", title: str | None = None) -> None:
        t = f"<title>{escape(title)}</title>" if title else ""
        self.items.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(w, 0):.1f}" height="{max(h, 0):.1f}" '
                          f'fill="{fill}" stroke="{stroke}">{t}</rect>')

    def line(self, x1, y1, x2, y2, stroke="#000", width=1.0) -> None:
        self.items.append(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{stroke}" '
                          f'stroke-width="{width}"/>')

    def circle(self, x, y, r, fill="#000") -> None:
        self.items.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}" fill="{fill}"/>')

    def text(self, x, y, s, size=11, anchor="start", rotate: float | None = None, weight="normal", cls="") -> None:
        tr = f' transform="rotate({rotate} {x:.1f} {y:.1f})"' if rotate is not None else ""
        c = f' class="{cls}"' if cls else ""
        self.items.append(f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
                          f'font-weight="{weight}"{tr}{c}>{escape(str(s))}</text>')

    def render(self) -> str:
        head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width}" height="{self.height}" '
                f'viewBox="0 0 {self.width} {self.height}" font-family="sans-serif">')
        return "\n".join([head, f'<rect width="{self.width}" height="{self.height}" fill="white"/>', *self.items,
                          "</svg>"]) + "\n"


def _bars(svg: _Svg, x0, y0, w, h, rows: list[dict], key: str, scale: float, title: str) -> None:
    svg.text(x0, y0 - 8, title, size=12, weight="bold")
    vals = [scale * v for r in rows for v in r[f"{key}_per_seed"]] + [0.0]
    top = max(vals) * 1.1 or 1.0
    svg.line(x0, y0 + h, x0 + w, y0 + h)
    svg.line(x0, y0, x0, y0 + h)
    for frac in (0.0, 0.5, 1.0):
        y = y0 + h - frac * h
        svg.text(x0 - 4, y + 4, f"{frac * top:.3g}", size=9, anchor="end")
    slot = w / max(len(rows), 1)
    for i, r in enumerate(rows):
        x = x0 + i * slot + 0.15 * slot
        bw = 0.7 * slot
        mean = scale * r[key]
        svg.rect(x, y0 + h - h * mean / top, bw, h * mean / top, COLORS.get(r["method"], "#666"),
                 title=f"{r['label']} {r['scheme']}: {mean:.4g}")
        for v in r[f"{key}_per_seed"]:
            svg.circle(x + bw / 2, y0 + h - h * scale * v / top, 2.2)
        svg.text(x + bw / 2, y0 + h + 10, f"{r['label']} {r['scheme']}", size=8, anchor="end", rotate=-50)


def _rotation_grid(svg: _Svg, x0, y0, result: dict) -> float:
    """Per bit setting: layers x (R2, R3, R4), shade = share of seeds with the rotation on."""
    svg.text(x0, y0 - 8, "rotation search: rotations kept per layer (RoSTE QA-SFT; k/n = seeds with it on)", size=12,
             weight="bold")
    x, bottom = x0, y0
    for scheme in result["settings"]["schemes"]:
        per_seed = [r for r in result["runs"] if r["scheme"] == scheme and r["method"] == "roste"
                    and r.get("rotation_layers")]
        if not per_seed:
            continue
        n_layers = len(per_seed[0]["rotation_layers"])
        r1 = sum(bool(r.get("rotation_r1")) for r in per_seed)
        svg.text(x, y0 + 8, f"{scheme} (R1 on in {r1}/{len(per_seed)} seeds)", size=10)
        for j, kind in enumerate(("R2", "R3", "R4")):
            svg.text(x + 40 + j * 46 + 21, y0 + 24, kind, size=10, anchor="middle")
        for li in range(n_layers):
            y = y0 + 30 + li * 20
            svg.text(x + 34, y + 14, f"layer {li}", size=9, anchor="end")
            for j, kind in enumerate(("R2", "R3", "R4")):
                k = sum(bool(r["rotation_layers"][li][kind]) for r in per_seed)
                share = k / len(per_seed)
                shade = int(235 - 160 * share)
                svg.rect(x + 40 + j * 46, y, 42, 18, f"rgb({shade},{int(235 - 90 * share)},{shade})", stroke="#999",
                         title=f"{scheme} layer {li} {kind}: on in {k}/{len(per_seed)} seeds")
                svg.text(x + 40 + j * 46 + 21, y + 13, f"{k}/{len(per_seed)}", size=9, anchor="middle",
                         cls="rotation-cell")
            bottom = max(bottom, y + 20)
        x += 200
    return bottom


def _outlier_panels(svg: _Svg, x0, y0, w, h, table: list[dict]) -> None:
    from .outliers import MODULES

    svg.text(x0, y0 - 22, "outliers at the quantized linears' inputs of the FP SFT model (seed 0): per token max|x| / "
             "median|x|; bar = typical (median over tokens), tick = worst (max); log scale", size=12, weight="bold")
    svg.rect(x0, y0 - 16, 10, 8, BEFORE)
    svg.text(x0 + 14, y0 - 8, "before rotation (what RTN quantizes)", size=9)
    svg.rect(x0 + 230, y0 - 16, 10, 8, AFTER)
    svg.text(x0 + 244, y0 - 8, "after all rotations (R1, R2, online R4)", size=9)
    vals = [table[li][m][k][s] for li in range(len(table)) for m in MODULES for k in ("before", "after")
            for s in ("median", "max")]
    top = math.log10(max(vals) * 1.5)
    lo = 0.0  # ratio >= 1 always
    pw = (w - 30 * (len(MODULES) - 1)) / len(MODULES)

    def ypos(v: float) -> float:
        return y0 + h - h * (math.log10(max(v, 1.0)) - lo) / (top - lo)

    for mi, m in enumerate(MODULES):
        px = x0 + mi * (pw + 30)
        svg.text(px + pw / 2, y0 + h + 26, f"{m} input", size=10, anchor="middle")
        svg.line(px, y0 + h, px + pw, y0 + h)
        svg.line(px, y0, px, y0 + h)
        for dec in range(0, int(top) + 1):
            svg.text(px - 3, ypos(10 ** dec) + 3, f"{10 ** dec:g}", size=8, anchor="end")
        slot = pw / len(table)
        for li, row in enumerate(table):
            for k, (kind, color) in enumerate((("before", BEFORE), ("after", AFTER))):
                st = row[m][kind]
                bx = px + li * slot + 0.1 * slot + k * 0.4 * slot
                svg.rect(bx, ypos(st["median"]), 0.38 * slot, y0 + h - ypos(st["median"]), color,
                         title=f"layer {li} {m} {kind}: typical {st['median']:.3g}, worst {st['max']:.3g}")
                svg.line(bx, ypos(st["max"]), bx + 0.38 * slot, ypos(st["max"]), stroke=color, width=2)
            svg.text(px + li * slot + 0.5 * slot, y0 + h + 12, str(li), size=8, anchor="middle")


def render_svg(result: dict) -> str:
    """The whole figure as an SVG document."""
    rows = result["rows"]
    width = 1200
    svg = _Svg(width, 10)
    s = result["settings"]
    svg.text(20, 24, f"hf-roste demo: {s['seeds']} seed(s), {s['steps']} steps, lr {s['learning_rate']}; "
             "bars = mean, dots = seeds; grey FP, red/orange PTQ after SFT, blue STE, green RoSTE", size=13,
             weight="bold")
    _bars(svg, 60, 60, 500, 200, rows, "completion_loss", 1.0, "completion loss (lower is better)")
    _bars(svg, 660, 60, 500, 200, rows, "exact_match", 100.0, "greedy exact match % (higher is better)")
    y = 470
    bottom = _rotation_grid(svg, 30, y, result)
    if result.get("outliers"):
        _outlier_panels(svg, 60, bottom + 70, width - 100, 180, result["outliers"])
        bottom += 70 + 180 + 40
    svg.height = int(bottom + 20)
    return svg.render()
