"""Put two or more scored runs side by side: Markdown and HTML pages, bar charts, image grids.

A run is a folder made by `flowgrpo eval generate` (manifest.json and PNGs) and scored by
`flowgrpo eval score` (scores/<metric>/summary.json or scores.json). For every metric that
any run has, the report shows one table (rows: overall, then dimensions or tags; one column
per run, and the difference last minus first), a grouped bar chart, and image grids of the
same prompts: each row is a prompt, each column a run's image j. When the runs used the same
seed and settings, image j of a prompt starts from the same noise in every run, so the grid
compares models and nothing else; the report says when seeds differ.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from PIL import Image

from .benchmarks import EvalError
from .generate import load_manifest


def _load_scores(run_dir: Path) -> dict[str, dict]:
    found: dict[str, dict] = {}
    for p in sorted((run_dir / "scores").glob("*/*.json")):
        if p.name not in ("summary.json", "scores.json"):
            continue
        data = json.loads(p.read_text())
        if isinstance(data, dict) and "metric" in data and "overall" in data:
            found[data["metric"] if data["metric"] not in found else f"{data['metric']} ({p.parent.name})"] = data
    return found


def dimension_rows(summary: dict) -> list[tuple[str, float | None]]:
    """(row label, value) for a metric summary: overall first, then dimensions or tags."""
    rows: list[tuple[str, float | None]] = [("Overall", summary["overall"])]
    if "primary" in summary:  # UniGenBench
        rows += [(p, v["score"]) for p, v in summary["primary"].items()]
        rows += [(f"· {s}", v["score"]) for s, v in summary["sub"].items()]
        rows.append(("Failed images", float(summary["failed_images"])))
    else:
        rows += [(t, v["mean"]) for t, v in summary.get("per_tag", {}).items()]
    return rows


def _fmt(v: float | None, percent: bool, count: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if count:
        return f"{v:.0f}"
    return f"{v:.2f}" if percent else f"{v:.4f}"


def _table(metric: str, runs: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Rows: overall, dimensions; columns: runs, then last minus first."""
    percent = any("primary" in r["scores"].get(metric, {}) for r in runs)
    labels: list[str] = []
    per_run = []
    for r in runs:
        rows = dict(dimension_rows(r["scores"][metric])) if metric in r["scores"] else {}
        per_run.append(rows)
        labels += [k for k in rows if k not in labels]
    header = ["", *[r["name"] for r in runs], "Δ (last − first)"]
    body = []
    for lab in labels:
        count = lab.startswith("Failed")
        vals = [rows.get(lab) for rows in per_run]
        a, b = vals[0], vals[-1]
        delta = b - a if a is not None and b is not None else None
        body.append([lab, *[_fmt(v, percent, count) for v in vals], _fmt(delta, percent, count)])
    return header, body


def _chart(metric: str, runs: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = []
    for r in runs:
        if metric in r["scores"]:
            for lab, _ in dimension_rows(r["scores"][metric]):
                if not lab.startswith(("·", "Failed")) and lab not in labels:
                    labels.append(lab)
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(labels) * max(1, len(runs) / 2)), 4.0))
    for k, r in enumerate(runs):
        rows = dict(dimension_rows(r["scores"][metric])) if metric in r["scores"] else {}
        vals = [rows.get(lab) if rows.get(lab) is not None else float("nan") for lab in labels]
        ax.bar([i + (k - (len(runs) - 1) / 2) * width for i in range(len(labels))], vals, width, label=r["name"])
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_title(metric)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fit(im: Image.Image, cell: int) -> Image.Image:
    im = im.convert("RGB")
    # Upscale tiny images (the shapes world is 32 px) without blurring their edges.
    resample = Image.NEAREST if max(im.size) < cell else Image.LANCZOS
    scale = cell / max(im.size)
    return im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), resample)


def _grid(key: str, runs: list[dict], per_run: int, cell: int, path: Path) -> Path:
    pad = 4
    canvas = Image.new("RGB", (len(runs) * per_run * (cell + pad) + pad, cell + 2 * pad), "white")
    for k, r in enumerate(runs):
        item = r["items"][key]
        for j, f in enumerate(item["files"][:per_run]):
            p = r["dir"] / f
            if not p.is_file():
                continue
            with Image.open(p) as im:
                tile = _fit(im, cell)
            x = pad + (k * per_run + j) * (cell + pad)
            canvas.paste(tile, (x, pad))
    canvas.save(path)
    return path


def _md_table(header: list[str], body: list[list[str]], numeric: bool = True) -> str:
    rule = ["---"] + ["---:" if numeric else "---"] * (len(header) - 1)
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(out)


def _html_table(header: list[str], body: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><tr>{th}</tr>{trs}</table>"


SETTING_KEYS = ("model", "lora", "benchmark", "steps", "guidance", "seed", "height", "images_per_prompt", "dtype")


def report(run_dirs: list[str | Path], out: str | Path, names: list[str] | None = None, n_prompts: int = 8,
           images_per_prompt: int = 2, cell: int = 192) -> Path:
    """Write report.md, report.html, chart_<metric>.png and grids/<key>.png into `out`."""
    if len(run_dirs) < 2:
        raise EvalError("a report compares runs: give at least two run folders")
    if names and len(names) != len(run_dirs):
        raise EvalError(f"{len(names)} names for {len(run_dirs)} runs")
    out = Path(out)
    (out / "grids").mkdir(parents=True, exist_ok=True)
    runs = []
    for i, d in enumerate(run_dirs):
        d = Path(d)
        man = load_manifest(d)
        name = names[i] if names else (d.name or f"run{i}")
        runs.append({"dir": d.resolve(), "name": name, "settings": man["settings"],
                     "items": {it["key"]: it for it in man["items"]}, "order": [it["key"] for it in man["items"]],
                     "scores": _load_scores(d)})
    if len({r["name"] for r in runs}) < len(runs):
        for i, r in enumerate(runs):
            r["name"] = f"{r['name']} [{i}]"
    metrics = list(dict.fromkeys(m for r in runs for m in r["scores"]))

    md = ["# Evaluation report", "", "## Runs", ""]
    settings_rows = [[r["name"], *[str(r["settings"].get(k)) for k in SETTING_KEYS]] for r in runs]
    md.append(_md_table(["run", *SETTING_KEYS], settings_rows, numeric=False))
    html_parts = ["<h1>Evaluation report</h1>", "<h2>Runs</h2>", _html_table(["run", *SETTING_KEYS], settings_rows)]
    if not metrics:
        note = "No scores found: run `flowgrpo eval score RUN_DIR` on each run first."
        md += ["", note]
        html_parts.append(f"<p>{html.escape(note)}</p>")
    for m in metrics:
        header, body = _table(m, runs)
        chart = _chart(m, runs, out / f"chart_{_safe(m)}.png")
        missing = [r["name"] for r in runs if m not in r["scores"]]
        md += ["", f"## {m}", "", _md_table(header, body), "", f"![{m}]({chart.name})"]
        html_parts += [f"<h2>{html.escape(m)}</h2>", _html_table(header, body),
                       f'<p><img src="{html.escape(chart.name)}" alt="{html.escape(m)}"></p>']
        if missing:
            md.append(f"\nNot scored with {m}: {', '.join(missing)}.")
            html_parts.append(f"<p>Not scored with {html.escape(m)}: {html.escape(', '.join(missing))}.</p>")

    common = [k for k in runs[0]["order"] if all(k in r["items"] for r in runs[1:])]
    if common:
        step = max(1, len(common) // max(1, n_prompts))
        shown = common[::step][:n_prompts]
        per_run = max(1, min(images_per_prompt, *(len(r["items"][k]["files"]) for r in runs for k in shown)))
        same_seeds = all(r["items"][k]["seeds"][:per_run] == runs[0]["items"][k]["seeds"][:per_run]
                         for r in runs[1:] for k in shown)
        seed_note = ("Every run starts image j of a prompt from the same noise (same seeds)." if same_seeds else
                     "Warning: the runs used different seeds, so images differ by noise as well as by model.")
        cols = " | ".join(f"{r['name']} (images 0–{per_run - 1})" for r in runs)
        md += ["", "## Same prompts, side by side", "", f"Columns, left to right: {cols}. {seed_note}", ""]
        html_parts += ["<h2>Same prompts, side by side</h2>",
                       f"<p>Columns, left to right: {html.escape(cols)}. {html.escape(seed_note)}</p>"]
        for k in shown:
            g = _grid(k, runs, per_run, cell, out / "grids" / f"{_safe(k)}.png")
            prompt = runs[0]["items"][k]["prompt"]
            md += [f"**{k}**: {prompt}", "", f"![{k}](grids/{g.name})", ""]
            html_parts.append(f'<div class="grid"><p><b>{html.escape(k)}</b>: {html.escape(prompt)}</p>'
                              f'<img src="grids/{html.escape(g.name)}" alt="{html.escape(k)}"></div>')
    else:
        md += ["", "The runs share no prompt, so there are no image grids."]
    (out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}"
             "img{max-width:100%}")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Evaluation report</title>"
            f"<style>{style}</style></head><body>{''.join(html_parts)}</body></html>")
    (out / "report.html").write_text(page, encoding="utf-8")
    return out / "report.md"


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:80]
