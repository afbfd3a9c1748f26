"""A storage-cost report: one HTML page and PNG charts, from the index alone.

Needs matplotlib (``pip install deltackpt[report]``). The page
(``index.html``) shows the totals, cumulative stored bytes against full copies,
the bytes each save wrote by component, a heat-map of which entries changed at
which step, the what-if table (:mod:`deltackpt.whatif`) and the entries that cost
the most. Every figure comes from the index (:mod:`deltackpt.stats`); no block data
is read.
"""

from __future__ import annotations

import datetime as _dt
import html
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import DeltackptError, InvalidInputError
from .stats import snapshot, store_stats, top_entries
from .units import human
from .whatif import DEFAULT_PRICE, Policy, whatif

if TYPE_CHECKING:
    from .store import Store

#: heat-map resolution: entries and steps beyond these are binned (means of neighbours)
MAX_ROWS = 60
MAX_COLS = 300


@dataclass
class ReportResult:
    """Files a report wrote (the HTML page first) and the figures it shows."""

    files: list[str]
    stats: dict[str, Any]
    whatif: list[dict[str, Any]]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise DeltackptError("the report needs matplotlib: pip install 'deltackpt[report]'") \
            from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _unit(top: float) -> tuple[float, str]:
    """(divisor, unit) that puts ``top`` bytes between 1 and 1024 units: data are plotted
    divided by it, so that ticks fall on round numbers of the unit."""
    unit, div = "B", 1.0
    for u, d in (("KiB", 2**10), ("MiB", 2**20), ("GiB", 2**30), ("TiB", 2**40)):
        if top >= d:
            unit, div = u, float(d)
    return div, unit


def _money(x: float) -> str:
    return f"${x:,.2f}" if x >= 0.01 or x == 0 else f"${x:.2g}"


def change_matrix(snap: Any) -> tuple[np.ndarray, list[str]]:
    """(paths × steps) fraction of each entry's blocks its step wrote (NaN: entry absent),
    rows in path order; and the row labels."""
    new = snap.new_refs()
    per_entry = np.bincount(snap.ref_entry[new], minlength=snap.entry_step.size)
    frac = np.where(snap.entry_nblocks > 0, per_entry / np.maximum(snap.entry_nblocks, 1), 0.0)
    order = sorted(range(len(snap.paths)), key=lambda p: snap.paths[p])
    row_of = np.empty(len(snap.paths), dtype=np.int64)
    row_of[order] = np.arange(len(order))
    m = np.full((len(order), snap.steps.size), np.nan)
    m[row_of[snap.entry_path], snap.entry_step] = frac
    return m, [snap.paths[p] for p in order]


def _binned(m: np.ndarray, labels: list[str]) -> tuple[np.ndarray, list[str]]:
    def bins(n: int, limit: int) -> list[np.ndarray]:
        return np.array_split(np.arange(n), limit) if n > limit else [np.array([i])
                                                                        for i in range(n)]

    rows, cols = bins(m.shape[0], MAX_ROWS), bins(m.shape[1], MAX_COLS)
    out = np.full((len(rows), len(cols)), np.nan)
    for i, r in enumerate(rows):
        part = m[r]
        for j, c in enumerate(cols):
            block = part[:, c]
            if not np.isnan(block).all():
                out[i, j] = np.nanmean(block)
    names = [labels[r[0]] if len(r) == 1 else f"{labels[r[0]]} … (+{len(r) - 1})" for r in rows]
    return out, names


def report(store: Store, out_dir: str | os.PathLike, *, price_per_gb_month: float = DEFAULT_PRICE,
           policies: list[Policy] | None = None, top: int = 15,
           progress: Any = None) -> ReportResult:
    """Write ``index.html`` and its PNG charts into ``out_dir`` (created when missing).

    ``progress``: an object with tqdm's ``total`` and ``update(n)``, advanced per chart.
    """
    plt = _pyplot()
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InvalidInputError(f"{out_dir}: exists and is not a directory")
    snap = snapshot(store)
    if snap.steps.size == 0:
        raise InvalidInputError(f"{store.location}: the store has no steps to report on")
    os.makedirs(out_dir, exist_ok=True)
    if progress is not None:
        progress.total = 5
    stats = store_stats(store)
    rows = whatif(store, policies, price_per_gb_month, snap)
    tops = top_entries(store, top, snap=snap)
    steps = snap.steps
    files: list[str] = []

    def save(fig: Any, name: str) -> str:
        path = os.path.join(out_dir, name)
        fig.savefig(path + ".partial", dpi=110, format="png", bbox_inches="tight")
        plt.close(fig)
        os.replace(path + ".partial", path)
        files.append(path)
        if progress is not None:
            progress.update(1)
        return name

    # 1: cumulative stored bytes vs full copies
    cum = np.array([s["cumulative_stored_bytes"] for s in stats["steps"]], dtype=float)
    full = np.array([s["full_copies_bytes"] for s in stats["steps"]], dtype=float)
    div, unit = _unit(float(full.max()))
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(steps, full / div, label="full copies (torch.save of every step)", color="#c44e52",
            lw=2)
    ax.plot(steps, cum / div, label="deltackpt: bytes written so far", color="#4c72b0", lw=2)
    ax.fill_between(steps, cum / div, color="#4c72b0", alpha=0.15)
    ax.set_xlabel("step")
    ax.set_ylabel(unit)
    ax.set_title("Cumulative bytes: deltackpt vs full copies")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    cumulative_png = save(fig, "cumulative.png")

    # 2: bytes per save by component
    names = list(stats["components"])
    if any("(dropped)" in s["components"] for s in stats["steps"]):
        names.append("(dropped)")
    per = np.array([[s["components"].get(c, {}).get("written_bytes", 0) for s in stats["steps"]]
                    for c in names], dtype=float)
    div, unit = _unit(float(per.sum(axis=0).max()) if per.size else 1.0)
    per /= div
    fig, ax = plt.subplots(figsize=(9, 4))
    colors = plt.get_cmap("tab10").colors
    x = np.arange(steps.size)
    bottom = np.zeros(steps.size)
    for i, c in enumerate(names):
        ax.bar(x, per[i], bottom=bottom, width=0.85 if steps.size < 200 else 1.0,
               label=c, color=colors[i % len(colors)], linewidth=0)
        bottom += per[i]
    ticks = np.unique(np.linspace(0, steps.size - 1, min(steps.size, 12)).astype(int))
    ax.set_xticks(ticks, [str(steps[t]) for t in ticks])
    ax.set_xlabel("step")
    ax.set_title("Bytes written by each save, by component")
    ax.set_ylabel(unit)
    ax.legend(loc="upper right", fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    per_save_png = save(fig, "per_save.png")

    # 3: heat-map entries x steps
    m, labels = change_matrix(snap)
    hm, hl = _binned(m, labels)
    fig, ax = plt.subplots(figsize=(10, max(3.0, 0.18 * len(hl) + 1.5)))
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")
    im = ax.imshow(np.ma.masked_invalid(hm), aspect="auto", cmap=cmap, vmin=0, vmax=1,
                   interpolation="nearest")
    ax.set_yticks(range(len(hl)), [lb if len(lb) <= 48 else "…" + lb[-47:] for lb in hl],
                  fontsize=7)
    cols = hm.shape[1]
    cticks = np.unique(np.linspace(0, cols - 1, min(cols, 10)).astype(int))
    step_at = np.array_split(steps, cols) if steps.size > cols else [[s] for s in steps]
    ax.set_xticks(cticks, [str(step_at[c][0]) for c in cticks])
    ax.set_xlabel("step")
    ax.set_title("Share of each entry's blocks written by each save (grey: entry absent)")
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02)
    heatmap_png = save(fig, "heatmap.png")

    # 4: what-if bars
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.2))
    labels_w = [r["policy"] + (" (estimate)" if r["estimate"] else "") for r in rows]
    vals = np.array([r["stored_bytes"] for r in rows], dtype=float)
    div, unit = _unit(float(vals.max()))
    ax.barh(range(len(rows)), vals / div, color=["#4c72b0"] + ["#55a868"] * (len(rows) - 1))
    ax.set_yticks(range(len(rows)), labels_w)
    ax.invert_yaxis()
    ax.set_xlabel(unit)
    ax.set_title("Stored bytes under other policies")
    ax.grid(axis="x", alpha=0.3)
    whatif_png = save(fig, "whatif.png")

    page = _html(store, stats, rows, tops, price_per_gb_month,
                 [cumulative_png, per_save_png, heatmap_png, whatif_png])
    index = os.path.join(out_dir, "index.html")
    with open(index + ".partial", "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(index + ".partial", index)
    if progress is not None:
        progress.update(1)
    return ReportResult([index, *files], stats, rows)


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid
#ddd;padding-bottom:.2em} .sub{color:#666;margin-top:0}
.cards{display:flex;flex-wrap:wrap;gap:1em;margin:1em 0}
.card{background:#f5f7fa;border-radius:8px;padding:.8em 1.2em;min-width:150px}
.card b{display:block;font-size:1.4em} .card span{color:#666;font-size:.85em}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}
th,td{padding:.3em .8em;border-bottom:1px solid #e5e5e5;text-align:right}
th{background:#f0f0f0} td:first-child,th:first-child{text-align:left}
td.path{font-family:ui-monospace,monospace;font-size:.85em}
img{max-width:100%;border:1px solid #eee;margin:.5em 0} .note{color:#555;font-size:.85em}
"""


def _html(store: Store, stats: dict, rows: list[dict], tops: list[dict], price: float,
          images: list[str]) -> str:
    e = html.escape
    t = stats["total"]
    cum = stats["steps"][-1]["cumulative_stored_bytes"] if stats["steps"] else 0
    full = stats["steps"][-1]["full_copies_bytes"] if stats["steps"] else 0
    cards = [
        (str(t["steps"]), "steps"),
        (human(t["logical_bytes"]), "logical (full copies)"),
        (human(t["stored_bytes"]), "stored now (packs)"),
        (f"{t['stored_fraction']:.1%}", "stored / full copies"),
        (human(cum), "written by all saves"),
        (f"{full / cum:.1f}×" if cum else "–", "full copies / written"),
    ]
    out = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>deltackpt report: {e(store.location)}</title><style>{_CSS}</style></head><body>",
        "<h1>Storage-cost report</h1>",
        f"<p class='sub'>{e(store.location)} — generated "
        f"{e(_dt.datetime.now().strftime('%Y-%m-%d %H:%M'))}</p>",
        "<div class='cards'>"
        + "".join(f"<div class='card'><b>{e(v)}</b><span>{e(k)}</span></div>" for v, k in cards)
        + "</div>",
        "<h2>Cumulative bytes</h2>", f"<img src='{e(images[0])}' alt='cumulative bytes'>",
        "<h2>Bytes per save, by component</h2>",
        f"<img src='{e(images[1])}' alt='bytes per save by component'>",
    ]
    comp_rows = "".join(
        f"<tr><td>{e(c)}</td><td>{human(v['logical_bytes'])}</td>"
        f"<td>{human(v['written_bytes'])}</td>"
        f"<td>{(v['written_bytes'] / v['logical_bytes'] if v['logical_bytes'] else 0):.1%}</td>"
        "</tr>" for c, v in t["components"].items())
    out.append("<table><tr><th>component</th><th>logical, all steps</th><th>written</th>"
               f"<th>written / logical</th></tr>{comp_rows}</table>")
    out += ["<h2>What changed, entry by entry</h2>",
            f"<img src='{e(images[2])}' alt='change heat-map'>"]
    wi = "".join(
        f"<tr><td>{e(r['policy'])}{' *' if r['estimate'] else ''}</td><td>{r['steps_kept']}</td>"
        f"<td>{human(r['stored_bytes'])}</td><td>{r['vs_now']:.1%}</td>"
        f"<td>{human(r['full_copies_bytes'])}</td><td>{_money(r['monthly_cost'])}</td></tr>"
        for r in rows)
    out += [
        "<h2>What if: other retention and save policies</h2>",
        f"<img src='{e(images[3])}' alt='what-if'>",
        "<table><tr><th>policy</th><th>steps</th><th>stored</th><th>vs now</th>"
        f"<th>full copies of those steps</th><th>per month at ${price:g}/GB</th></tr>{wi}</table>",
        "<p class='note'>Stored = frame bytes of every block the kept steps reference, plus "
        "the delta bases those blocks need (what delete + gc would leave). "
        "* save-every rows are estimates: the blocks those saves would reference, at their "
        "stored frame sizes, without intermediate bases. keep-every also keeps the latest step. "
        "GB = 2<sup>30</sup> bytes.</p>",
    ]
    tr = "".join(
        f"<tr><td class='path'>{e(x['path'])}</td><td>{human(x['written_bytes'])}</td>"
        f"<td>{x['steps_changed']} / {x['steps']}</td><td>{human(x['logical_bytes'])}</td></tr>"
        for x in tops)
    out += ["<h2>Entries that cost the most</h2>",
            "<table><tr><th>entry</th><th>written</th><th>steps that wrote it</th>"
            f"<th>size</th></tr>{tr}</table>", "</body></html>"]
    return "\n".join(out)
