#!/usr/bin/env bash
# nbd-vs-nbdkit.sh: snapd serving a plain file (snapd serve --origin FILE, no
# snapshot) against nbdkit's file plugin serving the same file, with the same
# fio job file over a unix socket:
#   randread-4k   4 KiB random reads, iodepth 64, 4 jobs (4 connections): IOPS
#   seqread-1m    1 MiB sequential reads, iodepth 8: MiB/s
#   seqwrite-1m   1 MiB sequential writes, iodepth 8: MiB/s
# and prints snapd/nbdkit (target >= 1.0; higher is better for all three):
# the ratio of the medians, and the median of each round's own ratio (the two
# servers run each workload back to back).
#
# Environment: SIZE (file size, default 1GiB), RUNTIME (seconds per fio job,
# default 10), ROUNDS (runs per server and workload, servers alternating,
# median reported; default 1), WORKLOADS (which of the three, space-
# separated; default all), SNAPD (a snapd binary; built from this
# checkout if unset), TRANSPORT (unix, the default, or tcp: loopback TCP on a
# free port), BENCH_TMPDIR (where the scratch directory goes, default
# /var/tmp).
set -euo pipefail

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_init

file=$BENCH_DIR/disk.img
sock=$BENCH_DIR/nbd.sock
jobs=$BENCH_DIR/plain.fio
read -ra workloads <<<"${WORKLOADS:-randread-4k seqread-1m seqwrite-1m}"
TRANSPORT=${TRANSPORT:-unix}
[[ $TRANSPORT == unix || $TRANSPORT == tcp ]] || bench_die "TRANSPORT=$TRANSPORT: want unix or tcp"

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

# bench_run NAME ROUND WORKLOAD: one server, one workload; fio's JSON goes to
# $BENCH_DIR/NAME-WORKLOAD-rNNN.json. Each run gets a fresh server, after the
# previous server's dirty pages are written back and the file is cached.
bench_run() {
	local name=$1 round=$2 w=$3 uri strict='' tag
	printf -v tag 'r%03d' "$round"
	settle "$file"
	rm -f "$sock"
	echo "  round $round: $name $w" >&2
	local port listen=(--listen "" --socket "$sock") kitlisten=(--unix "$sock")
	if [[ $TRANSPORT == tcp ]]; then
		port=$(free_port)
		listen=(--listen "127.0.0.1:$port") kitlisten=(-i 127.0.0.1 -p "$port")
	fi
	case $name in
	snapd)
		uri="nbd+unix:///origin?socket=$sock" strict=strict
		[[ $TRANSPORT == unix ]] || uri="nbd://127.0.0.1:$port/origin"
		start_server "$BENCH_DIR/$name.log" "$uri" \
			"$SNAPD" serve --origin "$file" "${listen[@]}"
		;;
	nbdkit)
		uri="nbd+unix:///?socket=$sock"
		[[ $TRANSPORT == unix ]] || uri="nbd://127.0.0.1:$port/"
		start_server "$BENCH_DIR/$name.log" "$uri" \
			nbdkit -f --exit-with-parent "${kitlisten[@]}" file "$file"
		;;
	esac
	local before
	before=$(server_cpu "$SERVER_PID")
	run_fio "$jobs" "$w" "$uri" "$BENCH_DIR/$name-$w-$tag.json"
	echo $(($(server_cpu "$SERVER_PID") - before)) >"$BENCH_DIR/$name-$w-$tag.cpu"
	stop_server $strict
}

# The two servers run each workload back to back, in alternating order from
# round to round (snapd first in odd rounds), so that drift in the machine's
# speed - other work starting or stopping - falls on both alike, and each
# round gives a paired ratio.
for ((round = 1; round <= ROUNDS; round++)); do
	order=(snapd nbdkit)
	((round % 2)) || order=(nbdkit snapd)
	for w in "${workloads[@]}"; do
		for s in "${order[@]}"; do
			bench_run "$s" "$round" "$w"
		done
	done
done

bench_header
echo "# transport: $TRANSPORT"
echo "# median of $ROUNDS round(s); higher is better; ratio = snapd/nbdkit, target >= 1.0"
echo "# paired: median of the rounds' own ratios (each round runs both servers back to back); ahead: rounds snapd won"
printf '%-13s %-7s %9s %9s %7s %7s %6s   %s\n' workload unit snapd nbdkit ratio paired ahead "each round: snapd; nbdkit; ratio"
for w in "${workloads[@]}"; do
	case $w in
	randread-4k) unit=IOPS metric=(fio_iops read) ;;
	seqread-1m) unit=MiB/s metric=(fio_mibs read) ;;
	seqwrite-1m) unit=MiB/s metric=(fio_mibs write) ;;
	esac
	s=$(median_of "${metric[@]}" "$BENCH_DIR/snapd-$w-"r*.json)
	p=$(median_of "${metric[@]}" "$BENCH_DIR/nbdkit-$w-"r*.json)
	ratios=() ahead=0
	for ((round = 1; round <= ROUNDS; round++)); do
		printf -v tag 'r%03d' "$round"
		rs=$("${metric[0]}" "$BENCH_DIR/snapd-$w-$tag.json" "${metric[1]}")
		rp=$("${metric[0]}" "$BENCH_DIR/nbdkit-$w-$tag.json" "${metric[1]}")
		ratios+=("$(ratio "$rs" "$rp")")
		# From the figures, not the rounded ratio: 1.004 is ahead.
		if ((rs > rp)); then ahead=$((ahead + 1)); fi
	done
	printf '%-13s %-7s %9.0f %9.0f %7s %7s %6s   %s; %s; %s\n' "$w" "$unit" "$s" "$p" "$(ratio "$s" "$p")" \
		"$(printf '%s\n' "${ratios[@]}" | sort -n | awk '{ v[NR] = $1 } END { if (NR % 2) printf "%.2f", v[(NR + 1) / 2]; else printf "%.2f", (v[NR / 2] + v[NR / 2 + 1]) / 2 }')" \
		"$ahead/$ROUNDS" \
		"$(each_of "${metric[@]}" "$BENCH_DIR/snapd-$w-"r*.json)" "$(each_of "${metric[@]}" "$BENCH_DIR/nbdkit-$w-"r*.json)" \
		"$(IFS=/; echo "${ratios[*]}")"
done

# What each server's CPU time bought: on a small machine fio and the server
# share the CPUs, so a server that needs less CPU per GiB leaves fio more.
echo "# server CPU (user and system) per GiB moved, ms; median of the rounds; lower is better"
printf '%-13s %9s %9s %7s\n' workload snapd nbdkit ratio
for w in "${workloads[@]}"; do
	case $w in
	randread-4k | seqread-1m) dir='read' ;;
	seqwrite-1m) dir='write' ;;
	esac
	s=$(median_of cpu_ms_per_gib "$dir" "$BENCH_DIR/snapd-$w-"r*.json)
	p=$(median_of cpu_ms_per_gib "$dir" "$BENCH_DIR/nbdkit-$w-"r*.json)
	printf '%-13s %9.0f %9.0f %7s\n' "$w" "$s" "$p" "$(ratio "$s" "$p")"
done
