"""The results table (Markdown) printed at the end of a run and saved as results.md."""

from __future__ import annotations

import os
import platform
import time


def format_table(metrics: dict) -> str:
    rows = metrics.get("rows", {})
    lines = [
        f"Perplexity on the evaluation split ({metrics.get('model', '?')}), "
        f"{time.strftime('%Y-%m-%d')}, {metrics.get('device', 'cpu')}, {platform.machine()}, "
        f"{os.cpu_count()} CPU cores",
        "",
        "| setting | perplexity |",
        "|---|---|",
    ]
    lines += [f"| {name} | {value:.3f} |" for name, value in rows.items()]
    extra = [f"{k}: {metrics[k]}" for k in ("steps", "train_time_s", "train_tokens_per_s", "wall_time_s") if k in metrics]
    if extra:
        lines += ["", ", ".join(extra)]
    return "\n".join(lines) + "\n"
