"""The evaluation report: a Markdown table per set, bar plots, loss curves of the runs, JSON."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np


from biomamba_jax.files import write_text_atomic
from biomamba_jax.evaluation.inputs import REPORT_NOTE, EvalInputError, EvalSet, EvalSettings, ModelEntry


COLUMNS = [("cross_entropy", "CE (nats/token)", "{:.4f}"), ("perplexity", "PPL", "{:.2f}"),
           ("bits_per_byte", "bits/byte", "{:.4f}"), ("strict_accuracy", "SAcc", "{:.1%}"),
           ("lenient_accuracy", "LAcc", "{:.1%}"), ("mrr", "MRR", "{:.3f}"), ("tokens", "tokens", "{:,}")]


def markdown_table(results: list[dict]) -> str:
    lines = []
    for set_name in dict.fromkeys(r["set"] for r in results):
        rows = [r for r in results if r["set"] == set_name]
        columns = [c for c in COLUMNS if any(c[0] in r for r in rows)]
        lines += [f"### {set_name}", "", "| model | " + " | ".join(c[1] for c in columns) + " |",
                  "| --- |" + " ---: |" * len(columns)]
        for r in rows:
            cells = [fmt.format(r[key]) if key in r else "-" for key, _, fmt in columns]
            lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _plot_bars(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    set_names = list(dict.fromkeys(r["set"] for r in results))
    model_names = list(dict.fromkeys(r["model"] for r in results))
    keys = [k for k in ("bits_per_byte", "cross_entropy", "mrr") if any(k in r for r in results)]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    width = 0.8 / max(len(model_names), 1)
    for ax, key in zip(axes[0], keys):
        for index, model in enumerate(model_names):
            values = [next((r.get(key, np.nan) for r in results if r["model"] == model and r["set"] == s), np.nan)
                      for s in set_names]
            ax.bar(np.arange(len(set_names)) + index * width, values, width, label=model)
        ax.set_xticks(np.arange(len(set_names)) + width * (len(model_names) - 1) / 2, set_names, fontsize=8)
        ax.set_title(key)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_loss_curves(run_dirs: Sequence[str], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    plotted = False
    for run_dir in run_dirs:
        file = Path(run_dir) / "metrics.jsonl"
        if not file.is_file():
            raise EvalInputError(f"--run-dir {run_dir} has no metrics.jsonl")
        records = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
        for key, style in (("loss", "-"), ("val_loss", "o--")):
            points = [(r["step"], r[key]) for r in records if key in r and math.isfinite(r[key])]
            if points:
                ax.plot(*zip(*points), style, label=f"{Path(run_dir).name} {key}")
                plotted = True
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    if plotted:
        fig.savefig(path, dpi=100)
    plt.close(fig)
    return plotted


def write_report(results: list[dict], out_dir: str | Path, models: list[ModelEntry], sets: list[EvalSet],
                 run_dirs: Sequence[str] = (), settings: EvalSettings = EvalSettings()) -> dict[str, Path]:
    """report.md, report.json and PNG plots in `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {"json": out_dir / "report.json", "markdown": out_dir / "report.md", "bars": out_dir / "scores.png"}
    _plot_bars(results, written["bars"])
    if run_dirs and plot_loss_curves(run_dirs, out_dir / "loss_curves.png"):
        written["loss_curves"] = out_dir / "loss_curves.png"
    report = {
        "models": [{"name": m.name, "path": str(m.path), "backend": m.backend, "tokenizer": m.tokenizer_source,
                    "vocab_size": m.vocab_size} for m in models],
        "sets": [{"name": s.name, "kind": s.kind, "path": str(s.path), "items": len(s.items),
                  "skipped_too_long": list(s.skipped)} for s in sets],
        "settings": dataclasses.asdict(settings), "note": REPORT_NOTE, "results": results,
    }
    write_text_atomic(written["json"], json.dumps(report, indent=1))
    sets_lines = [f"- `{s.name}`: {len(s.items)} {'factoid questions' if s.kind == 'bioasq' else 'documents'} "
                  f"from `{s.path}`" + (f" ({len(s.skipped)} skipped: question + answer longer than max_tokens "
                                        f"{settings.max_tokens})" if s.skipped else "") for s in sets]
    model_lines = [f"- `{m.name}`: `{m.path}` ({m.backend})" for m in models]
    plots = [f"![{key}]({path.name})" for key, path in written.items() if path.suffix == ".png"]
    write_text_atomic(written["markdown"], "\n".join(["# Evaluation report", "", *model_lines, "", *sets_lines, "",
                                                  REPORT_NOTE, "", markdown_table(results), *plots, ""]))
    return written

