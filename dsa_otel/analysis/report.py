"""Outputs of ``dsa-otel analyze``: analysis.json, Parquet tables, and a self-contained HTML report.

The HTML embeds its plots as PNG data URIs (matplotlib, Agg backend), so it opens anywhere without a server or
network. ``--compare`` puts a second run beside the first in every table and plot.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from typing import Any

import numpy as np

from ..exporters.jsonl import atomic_write_json
from .run import RECORD_COLUMNS, RunAnalysis


class ParquetRecordSink:
    """Streams the per-record table to Parquet in row groups (bounded memory)."""

    def __init__(self, path: str, rows_per_group: int = 200_000) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.pa = pa
        self.schema = pa.schema([("request_id", pa.int64()), ("layer_id", pa.int32()), ("step_idx", pa.int64()),
                                 ("seq_len_current", pa.int64()), ("unique_blocks", pa.int32()),
                                 ("touched_block_ratio", pa.float64()), ("tokens_per_touched_block", pa.float64()),
                                 ("offset_p50", pa.float64()), ("overlap_prev", pa.float64()),
                                 ("jaccard_prev", pa.float64()), ("prefix_share", pa.float64())])
        assert tuple(self.schema.names) == RECORD_COLUMNS
        self.writer = pq.ParquetWriter(path, self.schema)
        self.buf: list[tuple] = []
        self.rows_per_group = rows_per_group
        self.rows = 0

    def write(self, rows: list[tuple]) -> None:
        self.buf.extend(rows)
        if len(self.buf) >= self.rows_per_group:
            self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        cols = list(zip(*self.buf))
        arrays = [self.pa.array(c, type=f.type) for c, f in zip(cols, self.schema)]
        self.writer.write_table(self.pa.Table.from_arrays(arrays, schema=self.schema))
        self.rows += len(self.buf)
        self.buf = []

    def close(self) -> None:
        self.flush()
        self.writer.close()


def write_layer_table(path: str, summary: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = summary["per_layer"]
    table = pa.table({
        "layer_id": [r["layer_id"] for r in rows],
        "records": [r["records"] for r in rows],
        "unique_blocks_mean": [r["unique_blocks"]["mean"] for r in rows],
        "unique_blocks_p95": [r["unique_blocks"]["p95"] for r in rows],
        "touched_block_ratio_mean": [r["touched_block_ratio"]["mean"] for r in rows],
        "tokens_per_touched_block_mean": [r["tokens_per_touched_block"]["mean"] for r in rows],
        "overlap_prev_step": [r["overlap_prev_step"] for r in rows],
        "jaccard_prev_step": [r["jaccard_prev_step"] for r in rows],
        "jaccard_next_layer": [r["jaccard_next_layer"] for r in rows],
    })
    pq.write_table(table, path)


# --------------------------------------------------------------------------------------------------- plots
def _fig_png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _finish(fig: Any, ax: Any, title: str, xlabel: str, ylabel: str, *, xlog: bool = False,
            unit_y: bool = False, legend_size: int | None = 7) -> str:
    """Label, grid and legend an axis the same way in every plot, and return the figure as base64 PNG."""
    if xlog:
        ax.set_xscale("log")
    if unit_y:
        ax.set_ylim(0, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    return _fig_png(fig)


def plots(runs: list[tuple[str, dict[str, Any], RunAnalysis]]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, str] = {}
    # offset CDF (from the offsets sketch)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, s, res in runs:
        sk = res.offsets
        if sk.count:
            cum = np.cumsum(sk.counts)
            nz = np.flatnonzero(sk.counts)
            lows = (nz.astype(np.int32) << sk._shift).view(np.float32)
            ax.step(np.maximum(lows, 0.5), cum[nz] / cum[-1], where="post", label=label)
    out["offset_cdf"] = _finish(fig, ax, "Recency of selected tokens", "offset from the newest token (tokens)",
                                "CDF", xlog=True, legend_size=None)
    # overlap per layer
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, s, _ in runs:
        xs = [r["layer_id"] for r in s["per_layer"] if r["overlap_prev_step"] is not None]
        ax.plot(xs, [r["overlap_prev_step"] for r in s["per_layer"] if r["overlap_prev_step"] is not None],
                marker="o", ms=3, label=f"{label}: |S_t ∩ S_t-1| / |S_t|")
        ax.plot(xs, [r["jaccard_prev_step"] for r in s["per_layer"] if r["jaccard_prev_step"] is not None],
                ls="--", label=f"{label}: Jaccard")
    out["overlap_per_layer"] = _finish(fig, ax, "Temporal locality of touched blocks", "layer",
                                       "overlap with previous step", unit_y=True)
    # hit rate vs budget
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, s, _ in runs:
        c = s.get("cache_what_if")
        if not c:
            continue
        for pol, style in (("lru", "-"), ("lfu", ":"), ("belady", "--")):
            ax.plot(c["budgets"], c[pol], style, marker=".", label=f"{label} {pol.upper()}")
    out["hit_rate_vs_budget"] = _finish(fig, ax, "Cache what-if", "HBM budget (blocks)", "hit rate", xlog=True,
                                        unit_y=True)
    # working set over time
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, s, _ in runs:
        ws = s.get("working_set_blocks")
        if ws:
            ax.plot(ws["mean_by_step"], label=f"{label} (window {ws['window_steps']} steps)")
    out["working_set"] = _finish(fig, ax, "Working set per request", "decode step of the request",
                                 "blocks (sum over layers)")
    # heat map of touched blocks
    for label, s, res in runs[:1]:
        hm = res.heatmap
        if hm and hm["sets"]:
            width = max(hm["total_blocks"], max((max(x) for x in hm["sets"] if x), default=0) + 1)
            img = np.zeros((len(hm["sets"]), width))
            for i, blocks in enumerate(hm["sets"]):
                img[i, blocks] = 1
            fig, ax = plt.subplots(figsize=(6, 3.6))
            ax.imshow(img, aspect="auto", interpolation="nearest", cmap="Greys", origin="lower")
            ax.set_xlabel("logical block")
            ax.set_ylabel("decode step (index)")
            ax.set_title(f"Touched blocks: request {hm['request_id']}, layer {hm['layer_id']}")
            out["heatmap"] = _fig_png(fig)
    return out


# --------------------------------------------------------------------------------------------------- HTML
def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def render_html(runs: list[tuple[str, dict[str, Any], RunAnalysis]], images: dict[str, str]) -> str:
    head = "".join(f"<th>{html.escape(label)}</th>" for label, _, _ in runs)

    def row(name: str, getter: Any) -> str:
        cells = "".join(f"<td>{_fmt(getter(s))}</td>" for _, s, _ in runs)
        return f"<tr><th>{html.escape(name)}</th>{cells}</tr>"

    def cw(s: dict, key: str, q: str) -> Any:
        c = s.get("cache_what_if")
        return c["budget_for"][key][q] if c else None

    rows = [
        row("records", lambda s: s["records"]), row("requests", lambda s: s["requests"]),
        row("decode tokens", lambda s: s["decode_tokens"]),
        row("offset p50 (tokens)", lambda s: s["offsets"]["p50"]),
        row("offset p95 (tokens)", lambda s: s["offsets"]["p95"]),
        row("mean overlap with previous step", lambda s: _mean([r["overlap_prev_step"] for r in s["per_layer"]])),
        row("mean Jaccard with next layer", lambda s: _mean([r["jaccard_next_layer"] for r in s["per_layer"]])),
        row("reuse distance p50 (steps)", lambda s: (s.get("reuse_distance_steps") or {}).get("p50")),
        row("working set p95 (blocks)", lambda s: ((s.get("working_set_blocks") or {})
                                                   .get("per_request_sum_over_layers") or {}).get("p95")),
        row("prefix share of touched blocks", lambda s: s.get("prefix_share_of_touched_blocks")),
        row("LRU budget for 90% hits", lambda s: cw(s, "lru", "0.9")),
        row("LRU budget for 95% hits", lambda s: cw(s, "lru", "0.95")),
        row("LRU budget for 99% hits", lambda s: cw(s, "lru", "0.99")),
        row("Belady budget for 95% hits", lambda s: cw(s, "belady", "0.95")),
    ]
    figs = "".join(f'<figure><img alt="{k}" src="data:image/png;base64,{v}"><figcaption>{k}</figcaption></figure>'
                   for k, v in images.items())
    layer_rows = []
    for _, s, _ in runs[:1]:
        for r in s["per_layer"]:
            layer_rows.append("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in (
                r["layer_id"], r["records"], r["unique_blocks"]["mean"], r["touched_block_ratio"]["mean"],
                r["tokens_per_touched_block"]["mean"], r["overlap_prev_step"], r["jaccard_prev_step"],
                r["jaccard_next_layer"])) + "</tr>")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>dsa-otel analysis</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1300px}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}th{{background:#f4f4f4}}
figure{{display:inline-block;margin:.5em}}img{{max-width:600px}}</style></head><body>
<h1>dsa-otel analysis</h1>
<table><tr><th></th>{head}</tr>{''.join(rows)}</table>
<div id="plots">{figs}</div>
<h2>Per layer ({html.escape(runs[0][0])})</h2>
<table><tr><th>layer</th><th>records</th><th>unique blocks</th><th>touched ratio</th><th>tokens/block</th>
<th>overlap prev step</th><th>Jaccard prev step</th><th>Jaccard next layer</th></tr>{''.join(layer_rows)}</table>
</body></html>"""


def _mean(values: list[Any]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def write_outputs(out_dir: str, runs: list[tuple[str, dict[str, Any], RunAnalysis]]) -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "analysis.json"), "html": os.path.join(out_dir, "report.html")}
    doc = runs[0][1] if len(runs) == 1 else {label: s for label, s, _ in runs}
    atomic_write_json(paths["json"], json.loads(json.dumps(doc, default=float)))
    try:
        write_layer_table(os.path.join(out_dir, "layers.parquet"), runs[0][1])
        paths["layers"] = os.path.join(out_dir, "layers.parquet")
    except ImportError:
        pass
    try:
        images = plots(runs)
    except ImportError:  # matplotlib is the optional "analysis" extra
        import sys

        print("matplotlib not installed: report without plots (pip install 'dsa-otel[analysis]')", file=sys.stderr)
        images = {}
    for name, png in images.items():
        with open(os.path.join(out_dir, f"{name}.png"), "wb") as f:
            f.write(base64.b64decode(png))
    with open(paths["html"], "w") as f:
        f.write(render_html(runs, images))
    return paths
