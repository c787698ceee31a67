#!/usr/bin/env bash
# Side-by-side write benchmark: `qemu-img bench -w` and `qcow2 bench -w` with the same flags, each run on a
# fresh image made by qemu-img (1 GiB by default, 64 KiB clusters, so every run allocates the same way),
# alternating runs, median of ROUNDS each. Prints one line per configuration with both times and the
# ratio (qemu time / our time: above 1 means we are faster). The measured time is the tools' own
# "Run completed in" figure (requests only; the final flush/close happens after it in both).
#
#   benches/compare_write.sh [IMAGE_SIZE] [ROUNDS]      e.g. COUNT=100000 benches/compare_write.sh 1G 5
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-1G}
ROUNDS=${2:-3}
COUNT=${COUNT:-100000}
cargo build --release -q -p qcow2-cli
OURS=${CARGO_TARGET_DIR:-target}/release/qcow2
DIR=$(mktemp -d -p "${BENCH_DIR:-/var/tmp}")
trap 'rm -rf "$DIR"' EXIT
IMG=$DIR/bench.qcow2

fresh() { rm -f "$IMG"; qemu-img create -q -f qcow2 -o cluster_size=65536 "$IMG" "$SIZE"; }
secs() { sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p'; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
check() {
  # Every run must leave a clean image behind (no error, no leak).
  qemu-img check -q "$IMG" || { echo "qemu-img check failed after: $*" >&2; exit 1; }
}

printf '%-44s %10s %10s %8s\n' "configuration (-w -c $COUNT)" "qemu-img" "qcow2" "ratio"
for flags in "-d 32 -s 4096 -t none -i io_uring" "-d 32 -s 4096 -t writeback -i io_uring" \
             "-d 32 -s 4096 -t writeback -i threads" "-d 32 -s 4096 -t none -i threads"; do
  q=(); o=()
  for _ in $(seq "$ROUNDS"); do
    fresh
    # shellcheck disable=SC2086
    q+=("$(qemu-img bench -w -f qcow2 -c "$COUNT" $flags "$IMG" | secs)")
    fresh
    # shellcheck disable=SC2086
    o+=("$($OURS bench -w -f qcow2 -c "$COUNT" $flags "$IMG" | secs)")
    check "$OURS bench -w $flags"
  done
  qm=$(printf '%s\n' "${q[@]}" | median); om=$(printf '%s\n' "${o[@]}" | median)
  printf '%-44s %9.3fs %9.3fs %7.2fx\n' "$flags" "$qm" "$om" "$(echo "$qm / $om" | bc -l)"
done
