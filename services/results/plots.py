"""An evaluation's curves as inline SVG for the viewer: the ROC curve of each version (with
its operating points) and the reliability diagram. Drawn here, no script library: the page
works offline, and what it shows is exactly the stored figures."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import Any

SIZE = 320  # plot area, pixels
MARGIN = 44
COLOURS = ("#6cf", "#fb6", "#9e8", "#f8a")


def _x(value: float) -> float:
    return MARGIN + value * SIZE


def _y(value: float) -> float:
    return MARGIN + (1 - value) * SIZE


def _frame(x_label: str, y_label: str) -> list[str]:
    parts = [
        f'<rect x="{MARGIN}" y="{MARGIN}" width="{SIZE}" height="{SIZE}" fill="#181818" '
        'stroke="#555"/>',
        f'<line x1="{_x(0)}" y1="{_y(0)}" x2="{_x(1)}" y2="{_y(1)}" stroke="#555" '
        'stroke-dasharray="4 4"/>',
    ]
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        parts.append(
            f'<text x="{_x(tick)}" y="{_y(0) + 16}" fill="#aaa" font-size="11" '
            f'text-anchor="middle">{tick:g}</text>'
        )
        parts.append(
            f'<text x="{MARGIN - 6}" y="{_y(tick) + 4}" fill="#aaa" font-size="11" '
            f'text-anchor="end">{tick:g}</text>'
        )
    parts.append(
        f'<text x="{_x(0.5)}" y="{_y(0) + 34}" fill="#ddd" font-size="12" '
        f'text-anchor="middle">{escape(x_label)}</text>'
    )
    parts.append(
        f'<text x="12" y="{_y(0.5)}" fill="#ddd" font-size="12" text-anchor="middle" '
        f'transform="rotate(-90 12 {_y(0.5)})">{escape(y_label)}</text>'
    )
    return parts


def _svg(element_id: str, title: str, parts: Sequence[str], legend: Sequence[str]) -> str:
    height = SIZE + 2 * MARGIN + 18 * len(legend)
    # Wide enough for the longest legend line (about 7 px a character at 12 px).
    width = max(SIZE + 2 * MARGIN, MARGIN + 16 + 7 * max((len(e) for e in legend), default=0))
    lines = [
        f'<svg id="{element_id}" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" role="img" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        *parts,
    ]
    for i, entry in enumerate(legend):
        y = SIZE + 2 * MARGIN + 12 + 18 * i
        lines.append(
            f'<rect x="{MARGIN}" y="{y - 9}" width="10" height="10" '
            f'fill="{COLOURS[i % len(COLOURS)]}"/>'
        )
        lines.append(
            f'<text x="{MARGIN + 16}" y="{y}" fill="#ddd" font-size="12">{escape(entry)}</text>'
        )
    lines.append("</svg>")
    return "\n".join(lines)


def roc_svg(versions: Sequence[dict[str, Any]], site_thresholds: dict[str, float]) -> str:
    """Each version's ROC curve; a dot where its own threshold sits, a ring at the tenant's."""
    parts = _frame("1 - specificity (false positive rate)", "sensitivity")
    legend = []
    for i, version in enumerate(versions):
        colour = COLOURS[i % len(COLOURS)]
        roc = version["roc"]
        points = " ".join(
            f"{_x(f):.1f},{_y(t):.1f}" for f, t in zip(roc["fpr"], roc["tpr"], strict=True)
        )
        parts.append(
            f'<polyline class="roc" points="{points}" fill="none" stroke="{colour}" '
            'stroke-width="2"/>'
        )
        for threshold, css, shape in (
            ((version.get("at_model_threshold") or {}).get("threshold"), "model-point", "fill"),
            (site_thresholds.get(version["model_version"]["id"]), "site-point", "ring"),
        ):
            point = _point_at(roc, threshold)
            if point is None:
                continue
            fill = colour if shape == "fill" else "none"
            parts.append(
                f'<circle class="{css}" cx="{_x(point[0]):.1f}" cy="{_y(point[1]):.1f}" r="5" '
                f'fill="{fill}" stroke="{colour}" stroke-width="2"/>'
            )
        low, high = version["exam_auc_ci95"]
        legend.append(
            f"{version['model_version']['name']}: AUC {version['exam_auc']:.3f} "
            f"(95% CI {low:.3f}-{high:.3f}), {version['exams']} exams"
        )
    return _svg("roc-plot", "ROC curve", parts, legend)


def _point_at(roc: dict[str, list[Any]], threshold: float | None) -> tuple[float, float] | None:
    """The curve's point for a threshold: the last one whose threshold is at least it."""
    if threshold is None:
        return None
    found = None
    for t, fpr, tpr in zip(roc["thresholds"], roc["fpr"], roc["tpr"], strict=True):
        if t is not None and t >= threshold:
            found = (fpr, tpr)
    return found or (0.0, 0.0)


def reliability_svg(versions: Sequence[dict[str, Any]]) -> str:
    """Observed malignant fraction against mean predicted probability per bin; dot area by
    exams in the bin."""
    parts = _frame("mean predicted probability", "observed malignant fraction")
    legend = []
    for i, version in enumerate(versions):
        colour = COLOURS[i % len(COLOURS)]
        curve = version["calibration"]["curve"]
        points = " ".join(f"{_x(b['mean_predicted']):.1f},{_y(b['observed']):.1f}" for b in curve)
        parts.append(
            f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="1.5"/>'
        )
        for b in curve:
            radius = 2 + min(8.0, b["exams"] ** 0.5)
            parts.append(
                f'<circle class="bin" cx="{_x(b["mean_predicted"]):.1f}" '
                f'cy="{_y(b["observed"]):.1f}" r="{radius:.1f}" fill="{colour}" opacity="0.7"/>'
            )
        calibration = version["calibration"]
        kind = "calibrated probability" if calibration["calibrated"] else "raw score"
        legend.append(
            f"{version['model_version']['name']}: {kind}, expected calibration error "
            f"{calibration['error']:.3f}"
        )
    return _svg("calibration-plot", "Reliability diagram", parts, legend)
