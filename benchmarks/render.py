"""The Markdown table of a scale benchmark result file.

``python -m benchmarks.render benchmarks/results/scale.json`` prints it; ``--out FILE`` writes it;
``--targets-into README.md`` rewrites the targets table between the README's markers.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cspml_flows.core.tables import markdown_table

Getter = Callable[[dict[str, Any]], Any]


def _get(*keys: str) -> Getter:
    def get(size: dict[str, Any]) -> Any:
        value: Any = size
        for k in keys:
            if not isinstance(value, dict) or k not in value:
                return None
            value = value[k]
        return value

    return get


def _num(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) or (isinstance(value, float) and value >= 1000):
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def _gb(mb: Any) -> str:
    return "-" if mb is None else f"{mb / 1024:.2f}"


def _in_gb(mb: Any) -> float | None:
    return None if mb is None else mb / 1024


def _load_rate(size: dict[str, Any]) -> str:
    load = _get("stages", "load")(size)
    if load:
        return f"{_num(load['per_s'], 0)} (import, CSV + spglib)"
    pool = size.get("pool") or {}
    parts = []
    if pool.get("generated_per_s"):
        parts.append(f"{_num(pool['generated_per_s'], 0)} generated")
    if pool.get("add_per_s"):
        parts.append(f"{_num(pool['add_per_s'], 0)} TemplateStore.add")
    return ", ".join(parts) or "-"


def _campaign(size: dict[str, Any]) -> str:
    r = _get("stages", "campaign.round")(size)
    if not r:
        return "-"
    index = "" if r.get("index_update_s") is None else f" + {_num(r['index_update_s'])} (index update)"
    return f"{_num(r['round_s'])} (round){index}, {_num(r['seconds'])} (command); {r['relaxed']} relaxed"


def _overhead(size: dict[str, Any]) -> float | None:
    """Round plus the index update before it (only the round where the update was not recorded)."""
    r = _get("stages", "campaign.round")(size)
    return None if not r else r["round_s"] + (r.get("index_update_s") or 0.0)


def _add(key: str) -> Getter:
    def get(size: dict[str, Any]) -> str:
        a = _get("stages", key)(size)
        if not a:
            return "-"
        return f"{_num(a['total_s'])} ({_num(a['store_s'], 2)} store + {_num(a['open_s'])} index)"

    return get


ROWS: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("templates", lambda s: _num(s.get("templates") or _get("pool", "size")(s))),
    ("generated templates", lambda s: _num(_get("pool", "n_generated")(s) or 0)),
    ("prototype clusters (index)", lambda s: _num(s.get("clusters"))),
    ("prototype label groups (bound on clusters)", lambda s: _num(_get("pool", "label_groups")(s))),
    ("load rate, structures/s", _load_rate),
    ("generation, s per 10k generated", lambda s: _num(_get("pool", "seconds_per_10k")(s))),
    ("full index build, s", lambda s: _num(_get("stages", "build", "seconds")(s))),
    ("build peak RSS, GB (largest process)", lambda s: _gb(_get("stages", "build", "peak_rss_mb")(s))),
    ("build peak memory, GB (all processes, PSS)", lambda s: _gb(_get("stages", "build", "tree_pss_mb")(s))),
    (
        "caches on disk after the build, MB",
        lambda s: _num((_get("stages", "build", "cache_bytes")(s) or 0) / 1e6 or None),
    ),
    ("cold start: index + model + 1st prediction, s", lambda s: _num(_get("stages", "cold", "seconds")(s))),
    ("cold start process wall (with imports), s", lambda s: _num(_get("stages", "cold", "wall_s")(s))),
    ("prediction, compositions/s (top-5, dedup)", lambda s: _num(_get("stages", "predict", "per_s")(s), 0)),
    ("predict peak RSS, GB (largest process)", lambda s: _gb(_get("stages", "predict", "peak_rss_mb")(s))),
    ("predict peak memory, GB (all processes, PSS)", lambda s: _gb(_get("stages", "predict", "tree_pss_mb")(s))),
    ("add 100 templates, s", _add("add100")),
    ("add 1,000 templates, s", _add("add1000")),
    ("campaign round, zero relaxations, s", _campaign),
    ("cspml train, s", lambda s: _num(_get("stages", "train", "seconds")(s))),
]


# The targets the scale work is held to on a 2-core machine: (measure, pool size, getter, bound, "<=" or ">=")
TARGETS: list[tuple[str, str, Getter, float, str]] = [
    ("campaign round + index update, zero relaxations, s", "12k", _overhead, 5, "<="),
    ("campaign round + index update, zero relaxations, s", "150k", _overhead, 15, "<="),
    ("add 1,000 templates (store + index), s", "150k", _get("stages", "add1000", "total_s"), 30, "<="),
    ("add 1,000 templates (store + index), s", "1M", _get("stages", "add1000", "total_s"), 60, "<="),
    ("full index build, s", "150k", _get("stages", "build", "seconds"), 600, "<="),
    ("full index build, s", "1M", _get("stages", "build", "seconds"), 3600, "<="),
    ("cold start: index + model + 1st prediction, s", "150k", _get("stages", "cold", "seconds"), 5, "<="),
    ("cold start: index + model + 1st prediction, s", "1M", _get("stages", "cold", "seconds"), 20, "<="),
    ("predict peak RSS, GB", "150k", lambda s: _in_gb(_get("stages", "predict", "peak_rss_mb")(s)), 2, "<="),
    ("predict peak RSS, GB", "1M", lambda s: _in_gb(_get("stages", "predict", "peak_rss_mb")(s)), 8, "<="),
    ("prediction, compositions/s", "150k", _get("stages", "predict", "per_s"), 250, ">="),
    ("prediction, compositions/s", "1M", _get("stages", "predict", "per_s"), 150, ">="),
    ("cspml train, s", "150k", _get("stages", "train", "seconds"), 1800, "<="),
]


def targets(result: dict[str, Any]) -> str:
    """The targets as a Markdown table: bound, measured value, met or not (``-``: not measured)."""
    sizes = result.get("sizes") or {}
    rows = []
    for name, label, get, bound, op in TARGETS:
        value = get(sizes[label]) if label in sizes else None
        met = "-" if value is None else ("yes" if (value <= bound if op == "<=" else value >= bound) else "**no**")
        rows.append([name, label, f"{op} {_num(bound)}", _num(value), met])
    return markdown_table(["target", "pool", "bound", "measured", "met"], rows, align="llrrl") + "\n"


def markdown(result: dict[str, Any]) -> str:
    """The result as a Markdown table: one row per measure, one column per pool size, then notes."""
    sizes = result.get("sizes") or {}
    labels = sorted(sizes, key=lambda k: sizes[k].get("templates") or _get("pool", "size")(sizes[k]) or 0)
    rows = [[name, *(get(sizes[k]) for k in labels)] for name, get in ROWS]
    table = markdown_table(["measure", *labels], rows, align="l" + "r" * len(labels))
    notes = []
    exp = result.get("build_exponent")
    if exp:
        notes.append(
            f"Full build time grows as templates^{exp['exponent']:.2f} (least-squares fit over {exp['points']} sizes)."
        )
    m = result.get("machine") or {}
    workers = {sizes[k].get("workers") for k in labels}
    notes.append(
        f"Machine: {m.get('cpus', '?')} CPUs, {m.get('memory_gb', '?')} GB; workers {', '.join(map(str, workers))}; "
        f"commit {m.get('commit', '?')}; updated {result.get('updated', '?')}."
    )
    loads = [
        f"{k} {max(v.get('load') or 0 for v in sizes[k].get('stages', {}).values()):.1f}"
        for k in labels
        if sizes[k].get("stages")
    ]
    if loads:
        notes.append("Highest 1-minute load average at the start of a stage: " + ", ".join(loads) + ".")
    by_note: dict[str, list[str]] = {}
    for k in labels:
        note = _get("code", "note")(sizes[k])
        if note:
            by_note.setdefault(note, []).append(k)
    notes += [f"Code measured for {', '.join(ks)}: {note}." for note, ks in by_note.items()]
    digests = [f"{k} {_get('stages', 'predict', 'top5_digest')(sizes[k])}" for k in labels]
    notes.append("Top-5 answers digest (compare runs): " + ", ".join(digests) + ".")
    body = table + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    return body + "\nTargets on this machine:\n\n" + targets(result)


BEGIN, END = "<!-- BEGIN scale targets (python -m benchmarks.render) -->", "<!-- END scale targets -->"


def update_block(path: Path, result: dict[str, Any]) -> None:
    """Replace the text between the BEGIN and END markers of ``path`` with the targets table."""
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path} has no '{BEGIN}' ... '{END}' block")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{targets(result)}{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    """Print (or write) the Markdown of a result file; optionally update a file's targets block."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.render", description=__doc__.split("\n\n")[0])
    p.add_argument("result", type=Path, help="scale.json")
    p.add_argument("--out", type=Path, help="write the Markdown here instead of printing it")
    p.add_argument("--targets-into", type=Path, help="also write the targets table into this file's marked block")
    args = p.parse_args(argv)
    result = json.loads(args.result.read_text())
    if args.targets_into:
        update_block(args.targets_into, result)
    text = markdown(result)
    if args.out:
        args.out.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
