#!/usr/bin/env bash
# nbd-vs-nbdkit.sh: snapd serving a plain file (snapd serve --origin FILE, no
# snapshot) against nbdkit's file plugin serving the same file, with the same
# fio job file over a unix socket:
#   randread-4k   4 KiB random reads, iodepth 64, 4 jobs (4 connections): IOPS
#   seqread-1m    1 MiB sequential reads, iodepth 8: MiB/s
#   seqwrite-1m   1 MiB sequential writes, iodepth 8: MiB/s
# and prints snapd/nbdkit (target >= 1.0; higher is better for all three).
#
# Environment: SIZE (file size, default 1GiB), RUNTIME (seconds per fio job,
# default 10), ROUNDS (runs per server, alternating, median reported; default
# 1), SNAPD (a snapd binary; built from this checkout if unset),
# BENCH_TMPDIR (where the scratch directory goes, default /var/tmp).
set -euo pipefail

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_init

file=$BENCH_DIR/disk.img
sock=$BENCH_DIR/nbd.sock
jobs=$BENCH_DIR/plain.fio
workloads=(randread-4k seqread-1m seqwrite-1m)

# One job file for every server; only ${NBD_URI} differs between runs.
cat >"$jobs" <<EOF
[global]
ioengine=nbd
uri=\${NBD_URI}
size=$SIZE_BYTES
time_based=1
runtime=$RUNTIME
group_reporting=1

[randread-4k]
rw=randread
bs=4k
iodepth=64
numjobs=4

[seqread-1m]
rw=read
bs=1m
iodepth=8

[seqwrite-1m]
rw=write
bs=1m
iodepth=8
EOF

fill_file "$file" "$SIZE_BYTES"

# bench_server NAME ROUND URI CMD...: one server, all workloads; fio's JSON
# goes to $BENCH_DIR/NAME-WORKLOAD-rNNN.json.
bench_server() {
	local name=$1 round=$2 uri=$3 w strict='' tag
	shift 3
	printf -v tag 'r%03d' "$round"
	[[ $name == snapd ]] && strict=strict
	settle "$file"
	rm -f "$sock"
	start_server "$BENCH_DIR/$name.log" "$uri" "$@"
	for w in "${workloads[@]}"; do
		echo "  round $round: $name $w" >&2
		run_fio "$jobs" "$w" "$uri" "$BENCH_DIR/$name-$w-$tag.json"
	done
	stop_server $strict
}

# Servers alternate round by round, so drift in the machine's speed falls on both.
for ((round = 1; round <= ROUNDS; round++)); do
	bench_server snapd "$round" "nbd+unix:///origin?socket=$sock" \
		"$SNAPD" serve --origin "$file" --listen "" --socket "$sock"
	bench_server nbdkit "$round" "nbd+unix:///?socket=$sock" \
		nbdkit -f --exit-with-parent --unix "$sock" file "$file"
done

bench_header
echo "# median of $ROUNDS round(s); higher is better; ratio = snapd/nbdkit, target >= 1.0"
printf '%-13s %-7s %9s %9s %7s   %s\n' workload unit snapd nbdkit ratio "each round (snapd; nbdkit)"
for w in "${workloads[@]}"; do
	case $w in
	randread-4k) unit=IOPS metric=(fio_iops read) ;;
	seqread-1m) unit=MiB/s metric=(fio_mibs read) ;;
	seqwrite-1m) unit=MiB/s metric=(fio_mibs write) ;;
	esac
	s=$(median_of "${metric[@]}" "$BENCH_DIR/snapd-$w-"r*.json)
	p=$(median_of "${metric[@]}" "$BENCH_DIR/nbdkit-$w-"r*.json)
	printf '%-13s %-7s %9.0f %9.0f %7s   %s; %s\n' "$w" "$unit" "$s" "$p" "$(ratio "$s" "$p")" \
		"$(each_of "${metric[@]}" "$BENCH_DIR/snapd-$w-"r*.json)" "$(each_of "${metric[@]}" "$BENCH_DIR/nbdkit-$w-"r*.json)"
done
