"""How every benchmark reports: one JSON file, and the same figures printed as a table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_and_print(figures: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        shown = f"{value:.3f}" if isinstance(value, float) else value
        print(f"{key:<{width}}  {shown}")
    print(f"written to {out}")
