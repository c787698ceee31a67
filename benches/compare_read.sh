#!/usr/bin/env bash
# Side-by-side read benchmark: `qemu-img bench` and `qcow2 bench` with the same flags on the same fully
# written image, alternating runs, median of ROUNDS each. Prints one line per configuration with both
# times and the ratio (qemu time / our time: above 1 means we are faster).
#
#   benches/compare_read.sh [IMAGE_SIZE] [ROUNDS]      e.g. benches/compare_read.sh 1G 3
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-1G}
ROUNDS=${2:-3}
COUNT=${COUNT:-200000}
cargo build --release -q -p qcow2-cli
OURS=target/release/qcow2
DIR=$(mktemp -d -p "${BENCH_DIR:-/var/tmp}")
trap 'rm -rf "$DIR"' EXIT
IMG=$DIR/bench.qcow2
qemu-img create -q -f qcow2 -o cluster_size=65536 "$IMG" "$SIZE"
qemu-io -c "write -P 0xa5 0 $SIZE" "$IMG" >/dev/null   # fully written

secs() { sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p'; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

printf '%-40s %10s %10s %8s\n' "configuration" "qemu-img" "qcow2" "ratio"
for flags in "-d 32 -s 4096 -t none -i io_uring" "-d 32 -s 4096 -t writeback -i io_uring" \
             "-d 32 -s 4096 -t none -i threads" "-d 32 -s 4096 -t writeback -i threads" \
             "-d 32 -s 65536 -t none -i io_uring" "-d 32 -s 65536 -t writeback -i threads" \
             "-d 1 -s 4096 -t writeback -i threads"; do
  q=(); o=()
  for _ in $(seq "$ROUNDS"); do
    # shellcheck disable=SC2086
    q+=("$(qemu-img bench -f qcow2 -c "$COUNT" $flags "$IMG" | secs)")
    # shellcheck disable=SC2086
    o+=("$($OURS bench -f qcow2 -c "$COUNT" $flags "$IMG" | secs)")
  done
  qm=$(printf '%s\n' "${q[@]}" | median); om=$(printf '%s\n' "${o[@]}" | median)
  printf '%-40s %9.3fs %9.3fs %7.2fx\n' "$flags" "$qm" "$om" "$(echo "$qm / $om" | bc -l)"
done
