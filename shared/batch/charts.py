"""Inline SVG charts for the report: no JavaScript, no CDN, so the page works offline.

Values are converted to float for drawing only; every number shown as text stays exact.
"""

from __future__ import annotations

from html import escape

PALETTE = {"batch": "#2563eb", "stream": "#f97316", "mismatch": "#fecaca", "bar": "#6366f1"}


def bar_chart(
    items: list[tuple[str, float]], *, width: int = 560, height: int = 220, title: str = ""
) -> str:
    """Vertical bars with labels underneath and values on top."""
    if not items:
        return '<p class="empty">nothing to show</p>'
    top = max(v for _, v in items) or 1
    pad_l, pad_t = 10, 24
    slot = (width - pad_l * 2) / len(items)
    # Labels wider than their slot (~6.5 px a character at the page's label size) alternate
    # between two rows, so that neighbours do not print over each other.
    staggered = max(len(label) for label, _ in items) * 6.5 > slot
    pad_b = 54 if staggered else 40
    bars = []
    for n, (label, value) in enumerate(items):
        h = (height - pad_b - pad_t) * value / top
        x = pad_l + n * slot + slot * 0.15
        y = height - pad_b - h
        label_y = height - pad_b + 16 + (14 if staggered and n % 2 else 0)
        bars.append(
            f'<rect class="bar" x="{x:.1f}" y="{y:.1f}" width="{slot * 0.7:.1f}" '
            f'height="{h:.1f}" fill="{PALETTE["bar"]}"><title>{escape(label)}: {value:g}'
            f"</title></rect>"
            f'<text x="{x + slot * 0.35:.1f}" y="{y - 4:.1f}" text-anchor="middle">{value:g}'
            f"</text>"
            f'<text x="{x + slot * 0.35:.1f}" y="{label_y}" text-anchor="middle" '
            f'class="label">{escape(label)}</text>'
        )
    return (
        f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" aria-label="{escape(title)}">{"".join(bars)}</svg>'
    )


def line_chart(
    series: dict[str, list[tuple[float, float]]],
    *,
    highlights=(),
    width: int = 720,
    height: int = 240,
    title: str = "",
    x_labels: tuple[str, str] = ("", ""),
) -> str:
    """Lines per series over a shared x axis; ``highlights`` are x ranges shaded in red."""
    points = [p for line in series.values() for p in line]
    if not points:
        return '<p class="empty">nothing to show</p>'
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    pad = 36

    def sx(x):
        return pad + (x - x0) / (x1 - x0) * (width - 2 * pad)

    def sy(y):
        return height - pad - (y - y0) / (y1 - y0) * (height - 2 * pad)

    parts = []
    for lo, hi in highlights:
        parts.append(
            f'<rect class="mismatch" x="{sx(lo):.1f}" y="{pad}" '
            f'width="{max(2.0, sx(hi) - sx(lo)):.1f}" height="{height - 2 * pad}" '
            f'fill="{PALETTE["mismatch"]}"/>'
        )
    for name, line in series.items():
        if not line:
            continue
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in sorted(line))
        dash = ' stroke-dasharray="5,3"' if name == "stream" else ""
        parts.append(
            f'<polyline class="series series-{escape(name)}" fill="none" stroke-width="2" '
            f'stroke="{PALETTE.get(name, "#111")}"{dash} points="{path}"/>'
        )
    parts.append(
        f'<text x="{pad}" y="{height - 8}" class="label">{escape(x_labels[0])}</text>'
        f'<text x="{width - pad}" y="{height - 8}" text-anchor="end" class="label">'
        f"{escape(x_labels[1])}</text>"
        f'<text x="4" y="{pad - 8}" class="label">{y1:g}</text>'
        f'<text x="4" y="{height - pad + 14}" class="label">{y0:g}</text>'
    )
    legend = "".join(
        f'<text x="{width - pad - 140 + n * 70}" y="16" style="fill:{PALETTE.get(name, "#111")}">'
        f"■ {escape(name)}</text>"
        for n, name in enumerate(series)
    )
    return (
        f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" aria-label="{escape(title)}">{"".join(parts)}{legend}</svg>'
    )
