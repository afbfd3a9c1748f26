"""Storage-cost analysis: stats, diff, report (docs/analysis.md)."""

from __future__ import annotations

import csv
import io

import click

from ..progress import bar
from ..units import human
from ._common import (
    STEP,
    emit_json,
    handle_errors,
    json_option,
    open_existing,
    path_argument,
    table,
)

quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress bar.")


def _ratio(x: float) -> str:
    return f"{x:.2f}x"


@click.command("stats")
@path_argument
@json_option
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV (one row per step and component).")
@click.option("--by-entry", is_flag=True, help="Show the entries that cost the most instead.")
@click.option("--top", default=20, show_default=True, type=int, help="Entries shown by --by-entry.")
@click.option("--from", "first", type=STEP, default=None, help="First step of --by-entry's range.")
@click.option("--to", "last", type=STEP, default=None, help="Last step of --by-entry's range.")
@handle_errors
def stats_cmd(path: str, as_json: bool, as_csv: bool, by_entry: bool, top: int,
              first: int | None, last: int | None) -> None:
    """Logical, written and stored bytes per step and component; dedup and compression."""
    from ..stats import DROPPED, store_stats, top_entries

    if as_json and as_csv:
        raise click.UsageError("--json and --csv exclude each other")
    if not by_entry and (first is not None or last is not None):
        raise click.UsageError("--from/--to go with --by-entry")
    if top < 1:
        raise click.BadParameter("must be at least 1", param_hint="--top")
    with open_existing(path) as store:
        if by_entry:
            rows = top_entries(store, top, first, last)
            _print_entries(rows, as_json, as_csv)
            return
        stats = store_stats(store)
    if as_json:
        emit_json(stats)
    elif as_csv:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["step", "component", "logical_bytes", "written_bytes",
                    "cumulative_stored_bytes", "full_copies_bytes", "dedup_ratio",
                    "compression_ratio"])
        for s in stats["steps"]:
            w.writerow([s["step"], "", s["logical_bytes"], s["written_bytes"],
                        s["cumulative_stored_bytes"], s["full_copies_bytes"],
                        f"{s['dedup_ratio']:.6f}", f"{s['compression_ratio']:.6f}"])
            for c, v in s["components"].items():
                w.writerow([s["step"], c, v["logical_bytes"], v["written_bytes"], "", "", "", ""])
        click.echo(buf.getvalue(), nl=False)
    else:
        comps = list(stats["components"])
        if DROPPED in stats["total"]["components"]:
            comps.append(DROPPED)  # so that the columns add up to "written"
        rows = []
        for s in stats["steps"]:
            rows.append([
                s["step"], human(s["logical_bytes"]), human(s["written_bytes"]),
                *[human(s["components"].get(c, {}).get("written_bytes", 0)) for c in comps],
                human(s["cumulative_stored_bytes"]), human(s["full_copies_bytes"]),
                f"{s['dedup_ratio']:.1%}", _ratio(s["compression_ratio"]),
            ])
        click.echo(table(["step", "logical", "written", *[f"{c} wr." for c in comps],
                          "cumulative", "full copies", "dedup", "compression"], rows))
        t = stats["total"]
        click.echo(
            f"\n{t['steps']} steps, {human(t['logical_bytes'])} logical, "
            f"{human(t['stored_bytes'])} stored ({t['stored_fraction']:.1%} of full copies)")
        for c, v in t["components"].items():
            click.echo(f"  {c}: {human(v['logical_bytes'])} logical, "
                       f"{human(v['written_bytes'])} written")


def _print_entries(rows: list[dict], as_json: bool, as_csv: bool) -> None:
    if as_json:
        emit_json(rows)
        return
    keys = ["path", "written_bytes", "steps_changed", "steps", "logical_bytes"]
    if as_csv:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(keys)
        for r in rows:
            w.writerow([r[k] for k in keys])
        click.echo(buf.getvalue(), nl=False)
        return
    click.echo(table(["entry", "written", "steps changed", "size"],
                     [[r["path"], human(r["written_bytes"]), f"{r['steps_changed']}/{r['steps']}",
                       human(r["logical_bytes"])] for r in rows]))


def _num(x: float | None, fmt: str = "{:.4g}") -> str:
    return "-" if x is None else fmt.format(x)


@click.command("diff")
@path_argument
@click.argument("a", type=STEP)
@click.argument("b", type=STEP)
@click.option("--select", multiple=True, help="Compare only this subtree (repeatable).")
@click.option("--no-data", is_flag=True, help="Index only: no decoding, no numeric change.")
@click.option("--all", "show_all", is_flag=True, help="List unchanged entries too.")
@json_option
@quiet_option
@handle_errors
def diff_cmd(path: str, a: int, b: int, select: tuple[str, ...], no_data: bool, show_all: bool,
             as_json: bool, quiet: bool) -> None:
    """Per entry: blocks changed, bytes a delta from A to B costs, L2/max/relative change."""
    from ..diff import diff

    with open_existing(path) as store, bar(0, f"diff {a}..{b}", quiet=quiet or as_json) as pbar:
        r = diff(store, a, b, data=not no_data, select=list(select) or None, progress=pbar)
    if as_json:
        emit_json(r)
        return
    rows = []
    for e in r["entries"]:
        if not show_all and not e["blocks_changed"]:
            continue
        rows.append([e["path"], e["dtype"], f"{e['blocks_changed']}/{e['blocks']}",
                     human(e["stored_bytes"]),
                     *([] if no_data else [human(e["delta_bytes"]), _num(e["l2"]),
                                           _num(e["max_abs"]), _num(e["relative"], "{:.3%}")])])
    headers = ["entry", "dtype", "changed", "stored"] + (
        [] if no_data else ["delta", "L2", "max abs", "relative"])
    if rows:
        click.echo(table(headers, rows, right=set(range(2, len(headers)))))
    for kind in ("added", "removed"):
        for e in r[kind]:
            click.echo(f"{kind}: {e['path']} ({e['dtype']} {e['shape']}, {human(e['nbytes'])})")
    for e in r["retyped"]:
        f, t = e["from"], e["to"]
        click.echo(f"retyped: {e['path']} ({f['kind']} {f['dtype']} {f['shape']} -> "
                   f"{t['kind']} {t['dtype']} {t['shape']})")
    t = r["total"]
    click.echo(f"\n{t['entries_changed']} of {t['entries']} entries changed "
               f"({t['blocks_changed']}/{t['blocks']} blocks); step {b} stores "
               f"{human(t['stored_bytes'])} that step {a} does not"
               + ("" if no_data else f"; a delta from {a} costs {human(t['delta_bytes'])}")
               + f"; {t['added']} added, {t['removed']} removed, {t['retyped']} retyped")


def _policies(keep_last: tuple[int, ...], keep_every: tuple[int, ...],
              save_every: tuple[int, ...]):
    from ..whatif import Policy

    if not (keep_last or keep_every or save_every):
        return None
    return ([Policy("keep_last", n) for n in keep_last]
            + [Policy("keep_every", n) for n in keep_every]
            + [Policy("save_every", n) for n in save_every])


@click.command("report")
@path_argument
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="Directory to write index.html and the PNG charts into.")
@click.option("--price", default=0.023, show_default=True, type=float,
              help="Storage price per GB-month (GB = 2^30 bytes) for the what-if table.")
@click.option("--keep-last", multiple=True, type=click.IntRange(min=1),
              help="What-if: keep the newest N steps (repeatable).")
@click.option("--keep-every", multiple=True, type=click.IntRange(min=1),
              help="What-if: keep steps divisible by M (repeatable).")
@click.option("--save-every", multiple=True, type=click.IntRange(min=1),
              help="What-if: had saved only steps divisible by K (estimate; repeatable).")
@json_option
@quiet_option
@handle_errors
def report_cmd(path: str, output: str, price: float, keep_last: tuple[int, ...],
               keep_every: tuple[int, ...], save_every: tuple[int, ...], as_json: bool,
               quiet: bool) -> None:
    """Write an HTML storage-cost report with charts and a what-if table to OUTPUT."""
    from ..report import report

    if not 0 <= price < float("inf"):
        raise click.BadParameter("must be a finite number >= 0", param_hint="--price")
    policies = _policies(keep_last, keep_every, save_every)
    with open_existing(path) as store, bar(0, "report", unit="chart",
                                           quiet=quiet or as_json) as pbar:
        r = report(store, output, price_per_gb_month=price, policies=policies, progress=pbar)
    if as_json:
        emit_json({"files": r.files, "whatif": r.whatif})
        return
    click.echo(table(["policy", "steps", "stored", "vs now", "per month"],
                     [[w["policy"] + (" *" if w["estimate"] else ""), w["steps_kept"],
                       human(w["stored_bytes"]), f"{w['vs_now']:.1%}",
                       f"${w['monthly_cost']:,.2f}"] for w in r.whatif]))
    click.echo(f"\nwrote {r.files[0]} ({len(r.files) - 1} charts)")


COMMANDS = [stats_cmd, diff_cmd, report_cmd]
