"""Turn pytest-benchmark JSON files into a Markdown table of medians and ratios.

    python -m pytest benchmarks/bench_step.py --benchmark-only --benchmark-json=run1.json
    python benchmarks/report.py run1.json [run2.json ...] [--baseline numpy] [--flops]

For every group (one operation at one shape) it prints each implementation's median
and its speed relative to the baseline implementation(s) of the same group
(ratio > 1 means faster than the baseline: t_baseline / t_impl).  Given several runs
(the machine is noisy), each cell is the median over the runs of the per-run medians,
and each ratio the median of the per-run ratios with its range over the runs in
brackets.  A per-run ratio pairs two implementations measured in the same run (the
same JSON file), never times from different runs; runs that lack either are left out
of that ratio.  With ``--flops``, groups whose benchmarks carry
``extra_info["flops"]`` also get GFLOP/s.
"""

import argparse
import json
import re
import statistics
from collections import OrderedDict


def impl_of(bench):
    params = bench.get("params") or {}
    if "impl" in params:
        return str(params["impl"])
    m = re.search(r"\[(\w+)", bench["name"])
    return m.group(1) if m else bench["name"]


def fmt_time(s):
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def _runs_by_group(runs):
    """group -> impl -> {run index: (median seconds, benchmark)}.  A run that holds the
    same implementation twice in a group counts it once, with the median of its
    medians."""
    groups = OrderedDict()
    for k, data in enumerate(runs):
        seen = {}
        for b in data["benchmarks"]:
            seen.setdefault((b["group"], impl_of(b)), []).append((b["stats"]["median"], b))
        for (group, impl), entries in seen.items():
            med = statistics.median(t for t, _ in entries)
            groups.setdefault(group, OrderedDict()).setdefault(impl, {})[k] = (med, entries[0][1])
    return groups


def paired_ratios(g, impl, base):
    """Per-run speed of ``impl`` relative to ``base`` (t_base / t_impl, so > 1 means
    ``impl`` is faster), from the runs that measured both: a ratio never pairs one
    run's time with another run's."""
    runs = sorted(set(g.get(impl, {})) & set(g.get(base, {})))
    return [g[base][k][0] / g[impl][k][0] for k in runs]


def table(runs, baselines, flops):
    if isinstance(runs, dict):
        runs = [runs]
    groups = _runs_by_group(runs)
    impls = []
    for g in groups.values():
        for k in g:
            if k not in impls:
                impls.append(k)
    head = ["group"] + [f"{i} median" for i in impls]
    if flops:
        head += [f"{i} GFLOP/s" for i in impls]
    ratio_cols = [(i, base) for base in baselines if base in impls  # (baselines run)
                  for i in impls if i != base]
    head += [f"{i}/{base} speed" for i, base in ratio_cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, g in groups.items():
        med = {i: statistics.median(t for t, _ in g[i].values()) for i in g}
        row = [name] + [fmt_time(med[i]) if i in g else "" for i in impls]
        if flops:
            for i in impls:
                f = None
                if i in g:
                    f = next((b.get("extra_info", {}).get("flops") for _, b in g[i].values()
                              if b.get("extra_info", {}).get("flops")), None)
                row.append(f"{f / med[i] / 1e9:.1f}" if f else "")
        for i, base in ratio_cols:
            ratios = paired_ratios(g, i, base)
            if ratios:
                cell = f"{statistics.median(ratios):.2f}x"
                if len(ratios) > 1:
                    cell += f" [{min(ratios):.2f}-{max(ratios):.2f}]"
                row.append(cell)
            else:
                row.append("")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("json", nargs="+")
    ap.add_argument("--baseline", action="append", help="baseline implementation(s)")
    ap.add_argument("--flops", action="store_true")
    args = ap.parse_args(argv)
    runs = []
    for path in args.json:
        with open(path) as f:
            runs.append(json.load(f))
    print(table(runs, args.baseline or ["numpy", "torch"], args.flops))


if __name__ == "__main__":
    main()
