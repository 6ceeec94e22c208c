"""`GET /dashboard/<project>`: one server-rendered HTML page about a project's model.

It reads only small files: each kept version's meta.json and the dashboard.json its job wrote
(`ml_backend.dashboard_data`), plus the queue state /metrics reports. Charts are inline SVG,
so the page needs no script, no front-end build and no second request except thumbnails,
which the annotator's browser loads from Label Studio as in the Data Manager.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from ml_backend.dashboard_data import read_summary
from ml_backend.registry import ModelRegistry

REFRESH_S = 30
_COLOURS = {"unlabelled": "#8a8f98", "normal": "#2f6db5", "anomaly": "#d1462f",
            "auroc": "#2f6db5", "ap": "#d1462f", "precision_top_1pct": "#2a9d5c",
            "loss": "#333333", "loss_x": "#2f6db5", "loss_u": "#d1462f",
            "mask_rate": "#2a9d5c", "pseudo_anomaly_rate": "#d1462f"}
_W, _H, _PAD = 380, 230, 42


def render_dashboard(registry: ModelRegistry, project_id: int, state: Mapping[str, Any],
                     label_studio_url: str = "") -> str:
    """The page for `project_id`; `state` is the project's /metrics entry (queue, re-ranking,
    serving version). Versions whose files are missing or broken are listed as such."""
    versions = registry.versions(project_id)
    metas = {v: registry.read_meta(project_id, v) for v in versions}
    summaries = {v: read_summary(registry.version_dir(project_id, v)) for v in versions}
    current = state.get("model_version")
    current = current if current in metas else None
    summary = summaries.get(current) if current else None
    ls = label_studio_url.rstrip("/")
    parts = [_head(project_id), _header(project_id, ls), _status(state, metas.get(current))]
    if current is None:
        parts.append("<section><h2>No model yet</h2><p>The first ranking appears once the "
                     "project has one label of each kind; a training cycle follows when it "
                     "has the minimum set (AMLS_MIN_ANOMALIES, AMLS_MIN_NORMALS).</p></section>")
    elif summary is None:
        parts.append(f"<section><h2>Version {_e(current)}</h2><p>This version has no "
                     "dashboard summary (it predates the dashboard, or its file could not be "
                     "read); the next job writes one.</p></section>")
    else:
        parts.append(_scores_section(summary))
        parts.append(_quality_section(versions, metas, summaries, summary))
        parts.append(_training_section(current, metas, summaries))
        parts.append(_gallery(summary, project_id, ls))
    parts.append(_versions_table(versions, metas, summaries, current))
    parts.append("</main></body></html>")
    return "\n".join(parts)


# ---- page parts ---------------------------------------------------------------------------

def _head(project_id: int) -> str:
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_S}">
<title>AnomalyMatch · project {project_id}</title>
<style>
body{{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222;background:#f6f7f9}}
main{{max-width:1240px;margin:0 auto;padding:16px}}
h1{{font-size:20px;margin:4px 0}} h2{{font-size:16px;margin:0 0 8px}}
section{{background:#fff;border:1px solid #dde;border-radius:6px;padding:12px;margin:12px 0}}
.cards{{display:flex;flex-wrap:wrap;gap:12px}} .card{{flex:1 1 220px}}
.card b{{display:block;font-size:12px;color:#667;text-transform:uppercase}}
.charts{{display:flex;flex-wrap:wrap;gap:12px}}
table{{border-collapse:collapse;width:100%}} td,th{{padding:3px 8px;border-bottom:1px solid #eee;
text-align:left;font-variant-numeric:tabular-nums}}
.gallery{{display:grid;grid-template-columns:repeat(auto-fill,minmax(132px,1fr));gap:8px}}
.gallery a{{text-decoration:none;color:#222;font-size:12px}}
.gallery img{{width:128px;height:128px;object-fit:contain;background:#000;display:block}}
.err{{color:#b00}} .muted{{color:#667}}
</style></head><body><main>"""


def _header(project_id: int, ls: str) -> str:
    link = (f' · <a href="{_e(ls)}/projects/{project_id}/data">open in Label Studio</a>'
            if ls else "")
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return (f"<h1>AnomalyMatch · project {project_id}</h1><div class='muted'>{now}; refreshes "
            f"every {REFRESH_S} s{link}</div>")


def _status(state: Mapping[str, Any], meta: Mapping[str, Any] | None) -> str:
    queue = state.get("queue") or {}
    if queue.get("running"):
        progress = queue.get("progress") or {}
        done, total = progress.get("done"), progress.get("total")
        job = (f"running: {_e(progress.get('stage') or 'starting')} {done}/{total}"
               if total else "running")
        job += f" (since {_e(progress.get('started') or '?')})"
    else:
        job = "queued" if queue.get("queued") else "idle"
    last = (f"last job {_num(queue.get('last_duration_s'), 1)} s, finished "
            f"{_e(queue.get('last_finished') or '—')}")
    error = (f"<div class='err'>last error: {_e(queue['last_error'])}</div>"
             if queue.get("last_error") else "")
    rerank = state.get("rerank") or {}
    rerank_line = (f"instant re-ranking: {_num(rerank.get('last_duration_s'), 1)} s, "
                   f"{_e(rerank.get('last_finished') or '—')}" if rerank else "")
    rerank_error = (f"<div class='err'>re-ranking error: {_e(rerank['last_error'])}</div>"
                    if rerank.get("last_error") else "")
    meta = meta or {}
    counts = meta.get("label_counts") or state.get("label_counts") or {}
    label_text = ", ".join(f"{_e(k)} {int(v)}" for k, v in counts.items()) or "none yet"
    version = state.get("model_version") or "untrained"
    kind = meta.get("kind", "fixmatch") if meta else ""
    return f"""<section class="cards">
<div class="card"><b>Serving version</b>{_e(version)}<div class="muted">{_e(_kind_text(kind))}{
_e(_branch_text(meta))}
{_e(meta.get('created', ''))}</div></div>
<div class="card"><b>Labels it learned from</b>{label_text}</div>
<div class="card"><b>Training</b>{job}<div class="muted">{last}</div>{error}
<div class="muted">{rerank_line}</div>{rerank_error}</div></section>"""


def _kind_text(kind: str) -> str:
    return {"fixmatch": "FixMatch cycle", "fast": "re-ranked on the newest labels",
            "imagenet": "first ranking (ImageNet features)"}.get(kind, kind)


def _branch_text(meta: dict[str, Any] | None) -> str:
    """What the serving version reads besides its own backbone."""
    if not meta or not meta.get("imagenet_branch"):
        return ""
    return (" and ImageNet features, with nearest labelled neighbours"
            if meta.get("neighbour_term") else " and ImageNet features")


def _scores_section(summary: Mapping[str, Any]) -> str:
    hist = summary.get("histogram") or {}
    q = summary.get("unlabelled_quantiles") or {}
    quantiles = (f"unlabelled: median {_num(q.get('p50'), 3)}, 90th percentile "
                 f"{_num(q.get('p90'), 3)}, 99th {_num(q.get('p99'), 3)}; "
                 f"{_num(100 * q.get('share_above_half', 0.0), 1)} % score ≥ 0.5"
                 if q else "no unlabelled tasks")
    return (f"<section><h2>Scores of the serving version</h2><div class='charts'>"
            f"{_histogram_svg(hist)}<p class='muted'>{summary.get('scored', 0)} tasks scored; "
            f"{quantiles}. Counts on a log scale.</p></div></section>")


def _quality_section(versions: Sequence[str], metas: Mapping[str, Mapping[str, Any]],
                     summaries: Mapping[str, Mapping[str, Any] | None],
                     summary: Mapping[str, Any]) -> str:
    held = summary.get("held_out")
    if held:
        m = held.get("metrics") or {}
        charts = [
            _line_svg("ROC", {"ROC": held.get("roc") or []}, "false positive rate",
                      "true positive rate", diagonal=True),
            _line_svg("Precision-recall", {"PR": held.get("pr") or []}, "recall", "precision"),
            _line_svg("Anomaly detection efficiency", {"found": held.get("efficiency") or []},
                      "fraction inspected", "anomalies found", diagonal=True),
        ]
        series: dict[str, list[list[float]]] = {"auroc": [], "ap": [],
                                                "precision_top_1pct": []}
        for i, v in enumerate(versions):
            past = ((summaries.get(v) or {}).get("held_out") or {}).get("metrics") or {}
            for key in series:
                if isinstance(past.get(key), int | float):
                    series[key].append([i + 1, float(past[key])])
        charts.append(_line_svg("Across kept versions", series, "version", "metric",
                                x_range=(1, max(len(versions), 2))))
        text = (f"On {m.get('n', 0)} ground-truth tasks ({m.get('n_anomalies', 0)} anomalies): "
                f"AUROC {_num(m.get('auroc'), 3)}, AP {_num(m.get('ap'), 3)}, top-1 % "
                f"precision {_num(m.get('precision_top_1pct'), 3)}.")
    else:
        charts, text = [], ("No ground-truth tasks with both classes, so no AUROC. Mark some "
                            "annotations as ground truth in Label Studio to measure it; what "
                            "can be said without them is below.")
    versus = summary.get("versus_previous")
    if versus and versus.get("reviewed"):
        text += (f" Of the previous version's top {versus['previous_top']}, annotators have "
                 f"reviewed {versus['reviewed']} and confirmed {versus['confirmed']} as "
                 f"anomalies ({_num(100 * versus['confirmed'] / versus['reviewed'], 0)} %).")
    if versus and versus.get("still_open"):
        text += (f" {versus['still_on_top']} of its {versus['still_open']} unreviewed top "
                 "candidates are still in the top now.")
    text += (f" Labels in the last hour: {summary.get('labels_last_hour', 0)}; last day: "
             f"{summary.get('labels_last_day', 0)}.")
    return (f"<section><h2>Ranking quality</h2><p>{_e(text)}</p>"
            f"<div class='charts'>{''.join(charts)}</div></section>")


def _training_section(current: str, metas: Mapping[str, Mapping[str, Any]],
                      summaries: Mapping[str, Mapping[str, Any] | None]) -> str:
    """The curves of the cycle the serving version rests on (itself or a fast version's
    parent, which pruning keeps)."""
    meta = metas.get(current) or {}
    cycle = str(meta.get("parent")) if meta.get("kind") == "fast" else current
    steps = (summaries.get(cycle) or {}).get("steps")
    if not steps:
        return ("<section><h2>Training</h2><p class='muted'>The serving version is not a "
                "training cycle with recorded steps.</p></section>")
    xs = steps.get("step") or []

    def series(*names: str) -> dict[str, list[list[float]]]:
        return {n: [[x, y] for x, y in zip(xs, steps.get(n) or [], strict=False)]
                for n in names}

    return (f"<section><h2>Training cycle {_e(cycle)}</h2><div class='charts'>"
            + _line_svg("Losses", series("loss", "loss_x", "loss_u"), "step", "nats")
            + _line_svg("Pseudo-labels", series("mask_rate", "pseudo_anomaly_rate"), "step",
                        "fraction", y_range=(0.0, 1.0))
            + "</div></section>")


def _gallery(summary: Mapping[str, Any], project_id: int, ls: str) -> str:
    cells = []
    for item in summary.get("top") or []:
        task = int(item.get("task", 0))
        src = _image_url(str(item.get("image", "")), ls)
        image = f'<img src="{_e(src)}" alt="task {task}" loading="lazy">' if src else ""
        caption = f"task {task} · {_num(item.get('score'), 3)}"
        href = f"{ls}/projects/{project_id}/data?task={task}" if ls else ""
        cells.append(f'<a href="{_e(href)}">{image}{caption}</a>' if href
                     else f"<div>{image}{caption}</div>")
    body = "".join(cells) or "<p class='muted'>No unlabelled tasks.</p>"
    return (f"<section><h2>Top unlabelled candidates</h2><div class='gallery'>{body}</div>"
            "</section>")


def _versions_table(versions: Sequence[str], metas: Mapping[str, Mapping[str, Any]],
                    summaries: Mapping[str, Mapping[str, Any] | None],
                    current: str | None) -> str:
    rows = []
    for v in reversed(versions):
        meta, summary = metas.get(v) or {}, summaries.get(v) or {}
        held = ((summary.get("held_out") or {}).get("metrics")) or {}
        versus = summary.get("versus_previous") or {}
        reviewed = (f"{versus['confirmed']}/{versus['reviewed']}" if versus.get("reviewed")
                    else "—")
        counts = ", ".join(f"{_e(k)} {v}" for k, v in (meta.get("label_counts") or {}).items())
        mark = " ★" if v == current else ""
        rows.append(f"<tr><td>{_e(v)}{mark}</td><td>{_e(_kind_text(meta.get('kind', 'fixmatch')))}"
                    f"</td><td>{_e(meta.get('created', ''))}</td><td>{counts}</td>"
                    f"<td>{_num(held.get('auroc'), 3)}</td><td>{_num(held.get('ap'), 3)}</td>"
                    f"<td>{reviewed}</td></tr>")
    body = "".join(rows) or "<tr><td colspan='7' class='muted'>none yet</td></tr>"
    return ("<section><h2>Kept versions</h2><table><tr><th>version (★ serving)</th><th>kind</th>"
            "<th>created</th><th>labels</th><th>AUROC</th><th>AP</th>"
            "<th>previous top confirmed</th></tr>"
            f"{body}</table><p class='muted'>Roll back with <code>amls versions rollback "
            "--project P VERSION</code>; newer versions are kept.</p></section>")


# ---- SVG ------------------------------------------------------------------------------------

def _histogram_svg(hist: Mapping[str, Sequence[int]]) -> str:
    """Bars per score bin, one colour per group, side by side; log(1 + count) heights."""
    groups = [g for g in ("unlabelled", "normal", "anomaly") if hist.get(g)]
    bins = max((len(hist[g]) for g in groups), default=0)
    top = max((math.log1p(c) for g in groups for c in hist[g]), default=0.0) or 1.0
    plot_w, plot_h = _W - 2 * _PAD, _H - 2 * _PAD
    bars = []
    for gi, group in enumerate(groups):
        for b, count in enumerate(hist[group]):
            if count <= 0:
                continue
            width = plot_w / bins / len(groups)
            x = _PAD + b * plot_w / bins + gi * width
            h = plot_h * math.log1p(count) / top
            bars.append(f'<rect x="{x:.1f}" y="{_PAD + plot_h - h:.1f}" width="{width:.1f}" '
                        f'height="{h:.1f}" fill="{_COLOURS[group]}"><title>{group} '
                        f"{b / bins:.2f}–{(b + 1) / bins:.2f}: {count}</title></rect>")
    return _frame("Score histogram", "P(anomaly)", "tasks (log)", (0.0, 1.0), None,
                  "".join(bars), groups)


def _line_svg(title: str, series: Mapping[str, Sequence[Sequence[float]]], xlabel: str,
              ylabel: str, *, diagonal: bool = False,
              x_range: tuple[float, float] | None = None,
              y_range: tuple[float, float] | None = None) -> str:
    points = [p for s in series.values() for p in s]
    if not points:
        return _frame(title, xlabel, ylabel, (0.0, 1.0), (0.0, 1.0),
                      f'<text x="{_W / 2}" y="{_H / 2}" text-anchor="middle" fill="#667">'
                      "no data</text>", [])
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    xr = x_range or (min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1)
    yr = y_range or ((0.0, 1.0) if min(ys) >= 0 and max(ys) <= 1
                     else (min(0.0, min(ys)), max(ys) if max(ys) > 0 else 1.0))
    body = []
    if diagonal:
        body.append(f'<line x1="{_sx(xr[0], xr)}" y1="{_sy(yr[0], yr)}" x2="{_sx(xr[1], xr)}" '
                    f'y2="{_sy(yr[1], yr)}" stroke="#bbb" stroke-dasharray="4 3"/>')
    for name, pts in series.items():
        if not pts:
            continue
        path = " ".join(f"{_sx(x, xr):.1f},{_sy(y, yr):.1f}" for x, y in pts)
        marker = "".join(f'<circle cx="{_sx(x, xr):.1f}" cy="{_sy(y, yr):.1f}" r="2.5" '
                         f'fill="{_COLOURS.get(name, "#333")}"/>' for x, y in pts
                         ) if len(pts) <= 12 else ""
        body.append(f'<polyline fill="none" stroke="{_COLOURS.get(name, "#333")}" '
                    f'stroke-width="1.6" points="{path}"/>{marker}')
    return _frame(title, xlabel, ylabel, xr, yr, "".join(body),
                  [n for n in series if len(series) > 1])


def _frame(title: str, xlabel: str, ylabel: str, xr: tuple[float, float],
           yr: tuple[float, float] | None, body: str, legend: Sequence[str]) -> str:
    ticks = []
    for frac in (0.0, 0.5, 1.0):
        x = xr[0] + frac * (xr[1] - xr[0])
        ticks.append(f'<text x="{_sx(x, xr):.1f}" y="{_H - _PAD + 14}" text-anchor="middle" '
                     f'font-size="10">{_tick(x)}</text>')
        if yr is not None:
            y = yr[0] + frac * (yr[1] - yr[0])
            ticks.append(f'<text x="{_PAD - 4}" y="{_sy(y, yr) + 3:.1f}" text-anchor="end" '
                         f'font-size="10">{_tick(y)}</text>')
    keys = "".join(f'<text x="{_W - _PAD}" y="{_PAD + 12 * i + 4}" text-anchor="end" '
                   f'font-size="10" fill="{_COLOURS.get(n, "#333")}">{_e(n)}</text>'
                   for i, n in enumerate(legend))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" '
            f'role="img" aria-label="{_e(title)}">'
            f'<text x="{_W / 2}" y="16" text-anchor="middle" font-weight="600">{_e(title)}</text>'
            f'<rect x="{_PAD}" y="{_PAD}" width="{_W - 2 * _PAD}" height="{_H - 2 * _PAD}" '
            f'fill="none" stroke="#ccc"/>{body}{"".join(ticks)}{keys}'
            f'<text x="{_W / 2}" y="{_H - 8}" text-anchor="middle" font-size="11">'
            f'{_e(xlabel)}</text><text x="12" y="{_H / 2}" font-size="11" text-anchor="middle" '
            f'transform="rotate(-90 12 {_H / 2})">{_e(ylabel)}</text></svg>')


def _sx(x: float, xr: tuple[float, float]) -> float:
    return _PAD + (x - xr[0]) / (xr[1] - xr[0]) * (_W - 2 * _PAD)


def _sy(y: float, yr: tuple[float, float]) -> float:
    return _H - _PAD - (y - yr[0]) / (yr[1] - yr[0]) * (_H - 2 * _PAD)


def _tick(value: float) -> str:
    return f"{value:.0f}" if abs(value - round(value)) < 1e-9 else f"{value:.2g}"


# ---- text -----------------------------------------------------------------------------------

def _image_url(url: str, ls: str) -> str:
    """A thumbnail URL the browser may load: Label Studio's relative URLs made absolute,
    http(s) as is, anything else (javascript:, s3://, server paths) dropped."""
    if url.startswith("/") and not url.startswith("//"):
        return f"{ls}{url}" if ls else url
    if url.lower().startswith(("http://", "https://")):
        return url
    return ""


def _num(value: Any, digits: int) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "—"
    return f"{value:.{digits}f}"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)
