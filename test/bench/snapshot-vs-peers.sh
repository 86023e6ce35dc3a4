#!/usr/bin/env bash
# snapshot-vs-peers.sh: writes to a fresh snapshot of one origin file, served
# by snapd (snapshot export over a persistent COW from `snapd create`) and by
# its peers, each given a fresh COW/overlay, with the same fio job file:
#   first-write  4 KiB random writes, iodepth 16, fio fsync=64, each 4 KiB
#                block of the origin written exactly once (fio's random map,
#                no time limit): every write allocates a chunk
#   rewrite      the same writes again for RUNTIME seconds: every write lands
#                on an allocated chunk
#   randread     4 KiB random reads, iodepth 16, for RUNTIME seconds
# Peers (PEERS, default all four):
#   qemu-nbd-4k    qemu-nbd, qcow2 overlay with 4 KiB clusters (snapd's chunk
#                  size, so both allocate on every first write)
#   qemu-nbd       qemu-nbd, qcow2 overlay with qemu-img's default 64 KiB clusters
#   nbdkit-cow-4k  nbdkit --filter=cow cow-block-size=4096 (not persistent)
#   nbdkit-cow     nbdkit --filter=cow, default 64 KiB blocks (not persistent)
# qemu-nbd runs with its defaults (--cache=writeback, --aio=threads): writes
# go to the page cache and an NBD flush becomes a qcow2 metadata flush plus
# fdatasync, as snapd (no --direct) syncs its COW on a flush.
# Prints IOPS per server and snapd/peer (target >= 1.0 against qemu-nbd),
# and the number of flushes fio sent to each (see README.md: fio's fsync=64
# on an async engine sends more flushes than one per 64 writes, and how many
# depends on timing).
#
# Environment: SIZE (origin size, default 1GiB), RUNTIME (seconds for the
# rewrite and randread jobs, default 10), ROUNDS (runs per server, taking
# turns, median reported; default 1), PEERS, SNAPD, BENCH_TMPDIR (see
# nbd-vs-nbdkit.sh).
set -euo pipefail

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_init

chunk=4096
origin=$BENCH_DIR/origin.img
sock=$BENCH_DIR/nbd.sock
jobs=$BENCH_DIR/snapshot.fio
uri="nbd+unix:///snap?socket=$sock"
workloads=(first-write rewrite randread)
read -r -a peers <<<"${PEERS:-qemu-nbd-4k qemu-nbd nbdkit-cow-4k nbdkit-cow}"

# One job file for every server; only ${NBD_URI} differs between runs.
cat >"$jobs" <<EOF
[global]
ioengine=nbd
uri=\${NBD_URI}
size=$SIZE_BYTES
bs=4k
iodepth=16
group_reporting=1

[first-write]
rw=randwrite
fsync=64

[rewrite]
rw=randwrite
fsync=64
time_based=1
runtime=$RUNTIME

[randread]
rw=randread
time_based=1
runtime=$RUNTIME
EOF

fill_file "$origin" "$SIZE_BYTES"
origin_sum=$(sha256sum <"$origin")

# The COW holds a header chunk, then areas of one metadata chunk and
# chunk/16 data chunks: room for every origin chunk plus a spare area.
data_chunks=$((SIZE_BYTES / chunk))
cow_bytes=$(((1 + data_chunks + data_chunks / (chunk / 16) + 2) * chunk))

declare -A checks

# bench_server NAME ROUND CMD...: one server, all workloads, over $uri; fio's
# JSON goes to $BENCH_DIR/NAME-WORKLOAD-rNNN.json.
bench_server() {
	local name=$1 round=$2 w strict='' tag
	shift 2
	printf -v tag 'r%03d' "$round"
	[[ $name == snapd ]] && strict=strict
	settle "$origin"
	rm -f "$sock"
	start_server "$BENCH_DIR/$name.log" "$uri" "$@"
	for w in "${workloads[@]}"; do
		echo "  round $round: $name $w" >&2
		run_fio "$jobs" "$w" "$uri" "$BENCH_DIR/$name-$w-$tag.json"
	done
	stop_server $strict
}

# qcow2_allocated IMAGE prints the MiB allocated in the overlay itself.
qcow2_allocated() {
	qemu-img map --output=json "$1" | jq '[.[] | select(.data and .depth == 0) | .length] | add / 1048576 | floor'
}

# run_server NAME ROUND: a fresh COW or overlay for NAME, the workloads, and
# a check of what the server allocated (in checks[NAME]).
run_server() {
	local name=$1 round=$2 opts=() overlay cow
	case $name in
	snapd)
		# A fresh persistent COW, sized to hold every chunk.
		cow=$BENCH_DIR/snap.cow
		rm -f "$cow"
		"$SNAPD" create --origin "$origin" --cow "$cow" --cow-size "$cow_bytes" --chunk-size "$chunk" >"$BENCH_DIR/create.log"
		bench_server snapd "$round" "$SNAPD" serve --origin "$origin" --snapshot "snap=$cow" --listen "" --socket "$sock"
		checks[snapd]=$(grep -o 'snapshot snap: [0-9]* exceptions' "$BENCH_DIR/snapd.log" | awk '{print $3 " exceptions"}')
		rm -f "$cow"
		;;
	qemu-nbd-4k | qemu-nbd)
		overlay=$BENCH_DIR/$name.qcow2
		[[ $name == qemu-nbd-4k ]] && opts=(-o "cluster_size=$chunk")
		rm -f "$overlay"
		qemu-img create -q -f qcow2 -b "$origin" -F raw "${opts[@]}" "$overlay"
		bench_server "$name" "$round" qemu-nbd --socket "$sock" --persistent --shared=0 -x snap -f qcow2 "$overlay"
		checks[$name]="$(qcow2_allocated "$overlay") MiB allocated"
		rm -f "$overlay"
		;;
	nbdkit-cow-4k | nbdkit-cow)
		[[ $name == nbdkit-cow-4k ]] && opts=("cow-block-size=$chunk")
		# The filter's overlay is a deleted temporary file under TMPDIR.
		TMPDIR=$BENCH_DIR bench_server "$name" "$round" nbdkit -f --exit-with-parent --unix "$sock" --filter=cow file "$origin" "${opts[@]}"
		checks[$name]="-"
		;;
	*) bench_die "PEERS: unknown peer $name" ;;
	esac
}

# Servers take turns within each round, and the turn order rotates from round
# to round (snapd first in round 1, second in round 2, ...), so that drift in
# the machine's speed, and whatever the first server of a round pays for the
# one before it, falls on all alike.
servers=(snapd "${peers[@]}")
for ((round = 1; round <= ROUNDS; round++)); do
	for ((i = 0; i < ${#servers[@]}; i++)); do
		run_server "${servers[(i + round - 1) % ${#servers[@]}]}" "$round"
	done
done

[[ $(sha256sum <"$origin") == "$origin_sum" ]] || bench_die "the origin changed: a snapshot write reached it"

bench_header
echo "# each server ran on its own fresh COW/overlay per round; the origin is unchanged afterwards"
echo "# IOPS of reads or writes (flushes not counted), median of $ROUNDS round(s); ratio = snapd/peer"
printf '%-12s %-14s %8s %8s %6s %13s   %s\n' workload peer snapd peer ratio "flushes s/p" "each round (snapd; peer)"
for w in "${workloads[@]}"; do
	case $w in
	randread) dir="read" ;;
	*) dir="write" ;;
	esac
	sruns=("$BENCH_DIR/snapd-$w-"r*.json)
	s=$(median_of fio_iops $dir "${sruns[@]}")
	sf=$(median_of fio_flushes - "${sruns[@]}")
	for peer in "${peers[@]}"; do
		pruns=("$BENCH_DIR/$peer-$w-"r*.json)
		p=$(median_of fio_iops $dir "${pruns[@]}")
		pf=$(median_of fio_flushes - "${pruns[@]}")
		printf '%-12s %-14s %8.0f %8.0f %6s %13s   %s; %s\n' "$w" "$peer" "$s" "$p" "$(ratio "$s" "$p")" "$(printf '%.0f/%.0f' "$sf" "$pf")" \
			"$(each_of fio_iops $dir "${sruns[@]}")" "$(each_of fio_iops $dir "${pruns[@]}")"
	done
done
echo "# first-write wall time (s, median): snapd $(median_of fio_secs - "$BENCH_DIR"/snapd-first-write-r*.json)$(for p in "${peers[@]}"; do printf ', %s %s' "$p" "$(median_of fio_secs - "$BENCH_DIR/$p-first-write-"r*.json)"; done)"
echo "# allocated after the last round: snapd ${checks[snapd]} (origin has $data_chunks chunks)$(for p in "${peers[@]}"; do printf ', %s %s' "$p" "${checks[$p]}"; done)"
