"""`screening evaluate`: measure model versions on this tenant's exams with outcomes (see
`screening outcomes import`), wait, and print what the evaluation found. `screening drift`:
the weekly drift figures (are this site's scores and images still like the model's
reference?)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cli.remote import UsageError, _client, _connection_flags


def add_evaluate_command(commands: Any) -> None:
    evaluate = commands.add_parser(
        "evaluate", help="measure model versions on your exams with outcomes"
    )
    evaluate.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="VERSION_ID",
        help="a model version (twice: compare two); default the active one",
    )
    evaluate.add_argument(
        "--batch",
        action="append",
        default=[],
        metavar="BATCH_ID",
        help="only these batches' exams (default: every exam with an outcome)",
    )
    evaluate.add_argument("--from", dest="outcomes_from", help="outcomes dated from (YYYY-MM-DD)")
    evaluate.add_argument("--to", dest="outcomes_to", help="outcomes dated to (YYYY-MM-DD)")
    evaluate.add_argument("--seed", type=int, default=0, help="of the bootstrap intervals")
    evaluate.add_argument("--timeout", type=float, default=3600)
    evaluate.add_argument("--json", type=Path, help="also write the whole evaluation here")
    _connection_flags(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)

    drift = commands.add_parser(
        "drift", help="weekly score drift against the model's reference, and the inputs' summary"
    )
    drift.add_argument("--weeks", type=int, default=12, help="how many recent weeks")
    drift.add_argument("--json", type=Path, help="also write the figures here")
    _connection_flags(drift)
    drift.set_defaults(func=cmd_drift)


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def summary(evaluation: dict[str, Any]) -> list[str]:
    """The evaluation as lines for a terminal."""
    if evaluation["status"] == "failed":
        error = evaluation["error"] or {}
        return [
            f"evaluation {evaluation['id']} failed: {error.get('code')}: {error.get('message')}"
        ]
    figures = evaluation["figures"]
    lines = [f"evaluation {evaluation['id']}"]
    for version in figures["versions"]:
        low, high = version["exam_auc_ci95"]
        lines.append(
            f"{version['model_version']['name']}: {version['exams']} exams "
            f"({version['malignant_exams']} malignant), exam AUC {version['exam_auc']:.3f} "
            f"(95% CI {low:.3f}-{high:.3f}), calibration error "
            f"{version['calibration']['error']:.3f}"
        )
        point = version["at_model_threshold"]
        if point:
            lines.append(
                f"  at the model's threshold {point['threshold']:.4f}: sensitivity "
                f"{_rate(point['sensitivity'])}, specificity {_rate(point['specificity'])}, "
                f"PPV {_rate(point['ppv'])}, recall rate {point['recall_rate']:.3f}"
            )
        for attribute, groups in version["by"].items():
            shown = ", ".join(
                f"{value} {g['exams']} exams AUC {_rate(g['exam_auc'])}"
                for value, g in groups.items()
            )
            lines.append(f"  by {attribute.replace('_', ' ')}: {shown}")
    comparison = figures.get("comparison")
    if comparison:
        low, high = comparison["auc_difference_ci95"]
        lines.append(
            f"{comparison['a']} - {comparison['b']}: AUC difference "
            f"{comparison['auc_difference']:+.3f} (paired 95% CI {low:+.3f} to {high:+.3f})"
        )
    return lines


def cmd_evaluate(args: argparse.Namespace) -> int:
    if len(args.model) > 2:
        raise UsageError("--model at most twice: one version, or two to compare")
    with _client(args) as client:
        asked = client.evaluate(
            model_versions=args.model,
            batch_ids=args.batch,
            outcomes_from=args.outcomes_from,
            outcomes_to=args.outcomes_to,
            seed=args.seed,
        )
        print(f"evaluation {asked['id']} queued; waiting", file=sys.stderr)
        evaluation = client.wait_evaluation(asked["id"], timeout=args.timeout)
    if args.json:
        args.json.write_text(json.dumps(evaluation, indent=2))
    print("\n".join(summary(evaluation)))
    return 0 if evaluation["status"] == "completed" else 1


def drift_lines(report: dict[str, Any]) -> list[str]:
    """The drift figures as lines for a terminal, newest week first."""
    if not report["weeks"]:
        return ["no drift figures yet: the workers compute them every few minutes"]
    lines = []
    for week in report["weeks"]:
        inputs = week["inputs"]
        if week["psi"] is None:
            index = "no reference for this version"
        elif week["alarm"]:
            index = f"PSI {week['psi']:.3f}  ALARM (above {report['psi_threshold']:g})"
        elif week["exams"] < report["min_exams"]:
            index = f"PSI {week['psi']:.3f}  (fewer than {report['min_exams']} exams: no alarm)"
        else:
            index = f"PSI {week['psi']:.3f}"
        makers = ", ".join(f"{name} {share:.0%}" for name, share in inputs["manufacturers"].items())
        lines.append(
            f"week of {week['week_start']}  {week['model_version']['name']}  "
            f"{week['exams']} exams  {index}"
        )
        lines.append(
            f"  inputs: breast intensity {_rate(inputs['median_breast_intensity'])}, "
            f"flagged {_rate(inputs['flagged_share'])}, pixel spacing "
            f"{_rate(inputs['median_pixel_spacing_mm'])} mm, manufacturers {makers or '-'}"
        )
    return lines


def cmd_drift(args: argparse.Namespace) -> int:
    with _client(args) as client:
        report = client.drift(weeks=args.weeks)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print("\n".join(drift_lines(report)))
    return 3 if any(week["alarm"] for week in report["weeks"]) else 0
