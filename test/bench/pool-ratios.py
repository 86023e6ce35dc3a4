#!/usr/bin/env python3
"""Pool the rounds of several saved nbd-vs-nbdkit.sh tables into one estimate.

One run of nbd-vs-nbdkit.sh gives a handful of paired rounds, and on a small
machine a single round's snapd/nbdkit ratio can swing by 20% either way, so a
ratio near 1.0 from one run says little. This script reads the tables of
several runs (files given as arguments; none or - is stdin), takes every round's ratio
again from the two servers' own figures, groups the rounds by transport and
workload, and prints for each group: how many rounds, in how many snapd was
ahead, the median ratio and the geometric mean ratio, each with a 95%
bootstrap interval (rounds resampled with replacement; fixed seed, so the same
input gives the same output).

    test/bench/nbd-vs-nbdkit.sh > run1.txt   # ... several times, then
    test/bench/pool-ratios.py run*.txt

Only pool runs of the same code on the same machine: the interval treats the
rounds as one sample.
"""

import math
import random
import re
import statistics
import sys

RESAMPLES = 10000
SEED = 1

# A workload row: name, unit, medians, ratios, "ahead", then
# "S1/S2/...; N1/N2/...; R1/R2/..." (snapd's rounds; nbdkit's; ratios).
ROW = re.compile(
    r"^(?P<workload>\S+)\s+(?:IOPS|MiB/s)\s+\S+\s+\S+\s+\S+\s+\S+\s+\d+/\d+\s+"
    r"(?P<snapd>[\d./]+); (?P<nbdkit>[\d./]+); [\d./]+\s*$"
)
TRANSPORT = re.compile(r"^# transport: (?P<transport>\S+)")


def rounds_of(lines, source):
    """Yield (transport, workload, ratio) for every round in one table."""
    transport = "unix"  # tables from before TRANSPORT existed
    for line in lines:
        m = TRANSPORT.match(line)
        if m:
            transport = m["transport"]
            continue
        m = ROW.match(line)
        if not m:
            continue
        snapd = [float(v) for v in m["snapd"].split("/")]
        nbdkit = [float(v) for v in m["nbdkit"].split("/")]
        if len(snapd) != len(nbdkit):
            sys.exit(f"{source}: {m['workload']}: {len(snapd)} snapd rounds against {len(nbdkit)} nbdkit rounds")
        for s, n in zip(snapd, nbdkit):
            if n <= 0 or s <= 0:
                sys.exit(f"{source}: {m['workload']}: a round with no throughput ({s} against {n})")
            yield transport, m["workload"], s / n


def interval(ratios, statistic, rng):
    """The 95% percentile bootstrap interval of statistic over ratios."""
    samples = sorted(statistic(rng.choices(ratios, k=len(ratios))) for _ in range(RESAMPLES))
    return samples[int(0.025 * RESAMPLES)], samples[int(0.975 * RESAMPLES) - 1]


def geometric_mean(ratios):
    """The geometric mean: the right average of ratios (1.25 and 0.8 make 1.0)."""
    return math.exp(statistics.fmean(math.log(r) for r in ratios))


def main(paths):
    """Read the tables in paths (stdin if none, or "-") and print the pooled estimates."""
    groups = {}
    runs = 0
    for source in paths or ["-"]:
        if source == "-":
            source = "stdin"
            found = list(rounds_of(sys.stdin, source))
        else:
            try:
                with open(source, encoding="utf-8") as f:
                    found = list(rounds_of(f, source))
            except OSError as e:
                sys.exit(f"{source}: {e.strerror}")
        if not found:
            sys.exit(f"{source}: no nbd-vs-nbdkit.sh table found")
        runs += 1
        for transport, workload, ratio in found:
            groups.setdefault((transport, workload), []).append(ratio)

    print(f"# pooled over {runs} run(s); ratio = snapd/nbdkit in each round, higher is better, target >= 1.0")
    print(f"# [95% bootstrap interval: {RESAMPLES} resamples of the rounds, seed {SEED}]")
    print(f"{'transport':<10} {'workload':<13} {'rounds':>6} {'ahead':>7} {'median':>7} {'[interval]':<13} {'geomean':>7} [interval]")
    for (transport, workload), ratios in sorted(groups.items()):
        rng = random.Random(SEED)
        med_lo, med_hi = interval(ratios, statistics.median, rng)
        gm_lo, gm_hi = interval(ratios, geometric_mean, rng)
        ahead = sum(r > 1 for r in ratios)
        print(
            f"{transport:<10} {workload:<13} {len(ratios):>6} {f'{ahead}/{len(ratios)}':>7} "
            f"{statistics.median(ratios):>7.3f} {f'{med_lo:.3f}-{med_hi:.3f}':<13} "
            f"{geometric_mean(ratios):>7.3f} {gm_lo:.3f}-{gm_hi:.3f}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
