"""Turn a pytest-benchmark JSON file into a Markdown table of medians and ratios.

    python -m pytest benchmarks/bench_step.py --benchmark-only --benchmark-json=out.json
    python benchmarks/report.py out.json [--baseline numpy] [--flops]

For every group (one operation at one shape) it prints each implementation's median
and its speed relative to the baseline implementation(s) of the same group
(ratio > 1 means faster than the baseline).  With ``--flops``, groups whose
benchmarks carry ``extra_info["flops"]`` also get GFLOP/s.
"""

import argparse
import json
import re
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


def table(data, baselines, flops):
    groups = OrderedDict()
    for b in data["benchmarks"]:
        groups.setdefault(b["group"], {})[impl_of(b)] = b
    impls = []
    for g in groups.values():
        for k in g:
            if k not in impls:
                impls.append(k)
    head = ["group"] + [f"{i} median" for i in impls]
    if flops:
        head += [f"{i} GFLOP/s" for i in impls]
    ratio_cols = [(i, base) for base in baselines for i in impls if i != base]
    head += [f"{i}/{base} speed" for i, base in ratio_cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, g in groups.items():
        row = [name]
        row += [fmt_time(g[i]["stats"]["median"]) if i in g else "" for i in impls]
        if flops:
            for i in impls:
                f = g.get(i, {}).get("extra_info", {}).get("flops")
                row.append(f"{f / g[i]['stats']['median'] / 1e9:.1f}" if f else "")
        for i, base in ratio_cols:
            if i in g and base in g:
                row.append(f"{g[base]['stats']['median'] / g[i]['stats']['median']:.2f}x")
            else:
                row.append("")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("json")
    ap.add_argument("--baseline", action="append", help="baseline implementation(s)")
    ap.add_argument("--flops", action="store_true")
    args = ap.parse_args(argv)
    with open(args.json) as f:
        data = json.load(f)
    print(table(data, args.baseline or ["numpy", "torch"], args.flops))


if __name__ == "__main__":
    main()
