"""Per-kernel GPU times of the last batch of a `bench` run, from Nsight Compute's CSV.

    ncu --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
        build-gpu/tokenformer bench infer ... > ncu.csv
    python3 scripts/experiments/kernel_times.py ncu.csv [first-kernel-substring]

A batch starts at the input normalisation (images_normalize); the kernels from its last launch
to the end of the run are grouped by name (with the grid, which tells the Pattention widths
apart) and printed with their count, total and mean time. ncu runs kernels one at a time, so
the sum is the batch's time without any overlap (and without the gaps between launches).
"""
import csv
import sys
from collections import OrderedDict


def main():
    path = sys.argv[1]
    marker = sys.argv[2] if len(sys.argv) > 2 else "images_normalize"
    rows = []
    with open(path, newline="") as f:
        lines = [line for line in f if line.startswith('"')]
    for record in csv.DictReader(lines):
        if record.get("Metric Name") != "gpu__time_duration.sum":
            continue
        rows.append((record["Kernel Name"], record["Grid Size"], float(record["Metric Value"].replace(",", ""))))
    starts = [i for i, (name, _, _) in enumerate(rows) if marker in name]
    if not starts:
        sys.exit(f"{path}: no kernel named like '{marker}' among {len(rows)}")
    batch = rows[starts[-1]:]
    groups = OrderedDict()
    for name, grid, ns in batch:
        key = (name[:90], grid)
        count, total = groups.get(key, (0, 0.0))
        groups[key] = (count + 1, total + ns)
    total_ms = sum(ns for _, _, ns in batch) / 1e6
    print(f"{len(batch)} kernels in the last batch, {total_ms:.3f} ms summed")
    for (name, grid), (count, total) in sorted(groups.items(), key=lambda kv: -kv[1][1]):
        print(f"{total / 1e6:8.3f} ms {100 * total / 1e6 / total_ms:5.1f}% {count:4d} x {total / count / 1e3:8.1f} us"
              f"  {grid:>16}  {name}")


if __name__ == "__main__":
    main()
