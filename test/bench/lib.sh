# shellcheck shell=bash
# Helpers shared by the benchmark scripts in this directory. Sourced, not run.
#
# bench_init sets up a scratch directory (removed on exit), builds snapd unless
# SNAPD names a binary, and installs the EXIT trap that stops every server
# started with start_server. Servers are polled with nbdinfo until they answer
# (bounded), never waited for with a fixed sleep.

bench_die() {
	echo "bench: $*" >&2
	exit 1
}

# to_bytes 256MiB|1GiB|1G|4096 prints the size in bytes (K/M/G are binary).
to_bytes() {
	local s=${1%B}
	s=${s%i}
	[[ $s =~ ^[0-9]+[KMGT]?$ ]] || bench_die "size $1: want e.g. 256MiB, 1GiB or bytes"
	numfmt --from=iec "$s"
}

bench_init() {
	local t
	for t in fio nbdinfo nbdkit qemu-nbd qemu-img jq numfmt awk go python3; do
		command -v "$t" >/dev/null ||
			bench_die "$t not found (apt-get install -y nbdkit qemu-utils fio libnbd-bin jq python3)"
	done
	fio --enghelp=nbd >/dev/null 2>&1 || bench_die "this fio has no nbd engine"
	BENCH_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
	RUNTIME=${RUNTIME:-10}
	[[ $RUNTIME =~ ^[1-9][0-9]*$ ]] || bench_die "RUNTIME=$RUNTIME: want whole seconds"
	BENCH_LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
	ROUNDS=${ROUNDS:-1}
	[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || bench_die "ROUNDS=$ROUNDS: want a positive count"
	SIZE=${SIZE:-1GiB}
	SIZE_BYTES=$(to_bytes "$SIZE")
	((SIZE_BYTES >= 16 << 20 && SIZE_BYTES % (1 << 20) == 0)) ||
		bench_die "SIZE=$SIZE: want a whole number of MiB, at least 16MiB"
	# The scratch directory is on disk (/var/tmp), not tmpfs, so that flushes
	# cost what they cost; BENCH_TMPDIR moves it.
	BENCH_DIR=$(mktemp -d "${BENCH_TMPDIR:-/var/tmp}/snapd-bench.XXXXXX")
	SERVER_PIDS=()
	trap bench_cleanup EXIT
	trap 'exit 130' INT TERM
	if [[ -n ${SNAPD:-} ]]; then
		[[ -x $SNAPD ]] || bench_die "SNAPD=$SNAPD is not executable"
		SNAPD_FROM="prebuilt $SNAPD"
	else
		SNAPD=$BENCH_DIR/snapd
		(cd "$BENCH_REPO" && go build -o "$SNAPD" ./cmd/snapd) || bench_die "building snapd failed"
		SNAPD_FROM="built from $(cd "$BENCH_REPO" && git rev-parse --short HEAD 2>/dev/null || echo '?')$(cd "$BENCH_REPO" && git diff --quiet HEAD 2>/dev/null || echo ' with uncommitted changes')"
	fi
}

bench_cleanup() {
	local pid
	for pid in "${SERVER_PIDS[@]}"; do
		kill -TERM "$pid" 2>/dev/null || true
	done
	for pid in "${SERVER_PIDS[@]}"; do
		wait "$pid" 2>/dev/null || true
	done
	rm -rf "$BENCH_DIR"
}

# bench_header prints what the figures depend on.
bench_header() {
	echo "# $(date -u '+%Y-%m-%d %H:%M UTC')  $(uname -sr)  $(nproc) CPUs (fio and the server share them)"
	echo "# snapd $SNAPD_FROM, $(go version | awk '{print $3}')"
	echo "# $(fio --version), nbdkit $(nbdkit --version | awk '{print $2}'), $(qemu-nbd --version | head -1)"
	echo "# load average (1/5/15 min) at start $BENCH_LOAD_START, at end $(cut -d' ' -f1-3 /proc/loadavg): other work on the machine skews the figures"
	echo "# SIZE=$SIZE RUNTIME=${RUNTIME}s ROUNDS=$ROUNDS scratch=$(df --output=fstype "$BENCH_DIR" | tail -1) under ${BENCH_TMPDIR:-/var/tmp}"
}

# start_server LOG URI CMD...: runs CMD in the background (output to LOG) and
# polls URI with nbdinfo until the server answers, for at most 20 seconds.
# Sets SERVER_PID.
start_server() {
	local log=$1 uri=$2 i
	shift 2
	"$@" >"$log" 2>&1 &
	SERVER_PID=$!
	SERVER_PIDS+=("$SERVER_PID")
	for ((i = 0; i < 400; i++)); do
		if nbdinfo --size "$uri" >/dev/null 2>&1; then
			return 0
		fi
		if ! kill -0 "$SERVER_PID" 2>/dev/null; then
			cat "$log" >&2
			bench_die "server exited before answering: $*"
		fi
		sleep 0.05
	done
	cat "$log" >&2
	bench_die "server not answering on $uri after 20s: $*"
}

# stop_server [strict]: SIGTERM to SERVER_PID and wait; with "strict" the
# server must exit 0 (snapd does after its final flush).
stop_server() {
	local rc=0 pid=$SERVER_PID p keep=()
	kill -TERM "$pid"
	wait "$pid" || rc=$?
	for p in "${SERVER_PIDS[@]}"; do
		[[ $p == "$pid" ]] || keep+=("$p")
	done
	SERVER_PIDS=("${keep[@]}")
	if [[ ${1:-} == strict && $rc -ne 0 ]]; then
		bench_die "server exited $rc on SIGTERM"
	fi
}

# free_port prints a loopback TCP port that nothing listens on now (the
# kernel's choice for an unbound socket; another process may take it before
# the server binds it, which start_server then reports).
free_port() {
	python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# run_fio JOBFILE SECTION URI OUT: runs one section of the job file against
# URI (the job file reads it as ${NBD_URI}) and writes fio's JSON to OUT.
run_fio() {
	local jobfile=$1 section=$2 uri=$3 out=$4 err
	NBD_URI=$uri fio --section="$section" --output-format=json --output="$out" "$jobfile" >/dev/null ||
		bench_die "fio $section against $uri failed"
	err=$(jq '[.jobs[].error] | max' "$out")
	[[ $err == 0 ]] || bench_die "fio $section against $uri: job error $err"
}

# fio_iops OUT DIR prints the IOPS for direction DIR (read, write) of a run.
fio_iops() { jq -r --arg d "$2" '[.jobs[][$d].iops] | add | floor' "$1"; }

# fio_mibs OUT DIR prints MiB/s for direction DIR of a run.
fio_mibs() { jq -r --arg d "$2" '[.jobs[][$d].bw_bytes] | add / 1048576 | floor' "$1"; }

# fio_flushes OUT prints how many flushes (NBD_CMD_FLUSH) fio issued.
fio_flushes() { jq -r '[.jobs[].sync.total_ios] | add' "$1"; }

# median_of FN DIR OUT...: the median over the runs OUT... of FN OUT DIR.
median_of() {
	local fn=$1 dir=$2 out
	shift 2
	for out in "$@"; do "$fn" "$out" "$dir"; done |
		sort -n | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# each_of FN DIR OUT...: FN OUT DIR for every run, joined with "/".
each_of() {
	local fn=$1 dir=$2 out
	shift 2
	for out in "$@"; do "$fn" "$out" "$dir"; done | paste -sd/
}

# fio_gib OUT DIR prints the GiB moved in direction DIR of a run.
fio_gib() { jq -r --arg d "$2" '[.jobs[][$d].io_bytes] | add / 1073741824' "$1"; }

# server_cpu PID prints the CPU time (user and system) process PID has used,
# in clock ticks.
server_cpu() {
	# Fields after the command name, which is in parentheses; utime and
	# stime are the 14th and 15th of the whole line.
	sed 's/^.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'
}

# cpu_ms_per_gib OUT DIR prints the server CPU time per GiB moved of a run:
# the ticks saved beside OUT (as OUT with .cpu for .json) over fio_gib.
cpu_ms_per_gib() {
	awk -v t="$(cat "${1%.json}.cpu")" -v g="$(fio_gib "$1" "$2")" -v hz="$(getconf CLK_TCK)" \
		'BEGIN { if (g == 0) print 0; else printf "%.0f\n", t * 1000 / hz / g }'
}

# fio_secs OUT prints the run's wall time in seconds.
fio_secs() { jq -r '[.jobs[].job_runtime] | max / 1000' "$1"; }

# ratio A B prints A/B to two places.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "n/a"; else printf "%.2f", a / b }'; }

# fill_file PATH BYTES writes BYTES of random data to PATH, so reads move data
# rather than hitting holes.
fill_file() {
	dd if=/dev/urandom of="$1" bs=1M count=$(($2 >> 20)) iflag=fullblock status=none
}

# settle writes back dirty pages and reads FILE into the page cache, so one
# server does not pay for another's writeback and every server starts warm.
settle() {
	sync
	cat "$1" >/dev/null
}
