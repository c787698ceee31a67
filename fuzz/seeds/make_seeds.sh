#!/usr/bin/env bash
# Builds seed inputs for the fuzz targets from real qemu-img images (QEMU 10).
#   fuzz/seeds/make_seeds.sh OUTDIR
# writes OUTDIR/header/* (the first 4 KiB of images made by qemu-img create variants) and
# OUTDIR/rw_check/* (whole small images: 512 B clusters where possible, 1 MiB virtual size, with
# data, compressed clusters, a snapshot, lazy refcounts, refcount_bits=1, extended L2, a backing
# file name, bitmaps). Add them to a corpus with `cargo fuzz run TARGET OUTDIR/TARGET -- -runs=0`
# or by copying, then minimise with `cargo fuzz cmin TARGET`.
set -euo pipefail
out=$(realpath -m "$1")
mkdir -p "$out/header" "$out/rw_check"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
qemu-img create -q -f raw base.raw 1M
qemu-img create -q -f qcow2 base.qcow2 1M

n=0
hdr() { # name, options...
    local name=$1; shift
    qemu-img create -q -f qcow2 "$@" "h-$name.qcow2" 1M
    head -c 4096 "h-$name.qcow2" > "$out/header/qemu-$name"
    n=$((n + 1))
}
hdr default
hdr v2 -o compat=0.10
hdr c512 -o cluster_size=512
hdr c2m -o cluster_size=2M
hdr c8k -o cluster_size=8k
hdr xl2 -o extended_l2=on
hdr xl2-c2m -o extended_l2=on,cluster_size=2M
hdr lazy -o lazy_refcounts=on
hdr rc1 -o refcount_bits=1
hdr rc64 -o refcount_bits=64
hdr rc8-c512 -o refcount_bits=8,cluster_size=512
hdr zstd -o compression_type=zstd
hdr backing -b base.raw -F raw
hdr backing-qcow2 -b base.qcow2 -F qcow2
hdr backing-v2 -o compat=0.10 -b base.raw -F raw
hdr backing-long -b "$(printf 'b%.0s' $(seq 1 300)).raw" -F raw -u
hdr datafile -o data_file=data.raw
hdr datafile-raw -o data_file=data2.raw,data_file_raw=on
hdr prealloc -o preallocation=metadata,cluster_size=512
# Bitmaps extension: add a persistent bitmap to an image.
qemu-img create -q -f qcow2 h-bitmap.qcow2 1M
qemu-img bitmap --add h-bitmap.qcow2 b0
qemu-img bitmap --add -g 512k h-bitmap.qcow2 b1
head -c 4096 h-bitmap.qcow2 > "$out/header/qemu-bitmap"
n=$((n + 1))
echo "header: $n seeds"

m=0
# The request script rw_check reads from the last 64 bytes of its input (see src/fuzzing.rs,
# rw_script): 8 requests of [kind, offset/512 (be32), length-1 (be16), pattern]; kind % 5: 0 read,
# 1 write, 2 zero write (bit 7: unmap), 3 discard, 4 flush. Appended to each image (bytes past the
# image's last cluster do not change what it holds).
script() {
    python3 - <<'PY'
import struct, sys
ops = [(1, 0, 4095, 0xa1), (2, 128, 65535, 0), (3, 1024, 8191, 0), (4, 0, 0, 0),
       (1, 1000, 2999, 0xa2), (0, 0, 8191, 0), (0x82, 64, 1023, 0), (1, 2040, 511, 0xa3)]
sys.stdout.buffer.write(b"".join(struct.pack(">BIHB", *o) for o in ops))
PY
}
img() { # name: copy a finished image, with the request script appended, into the rw_check seeds
    cat "$1" <(script) > "$out/rw_check/qemu-${1%.qcow2}"
    m=$((m + 1))
}
io() { qemu-io -f qcow2 "$@" >/dev/null; }
c=cluster_size=512
qemu-img create -q -f qcow2 -o $c plain.qcow2 1M
io -c 'write -P 0x11 0 4k' -c 'write -P 0x22 512k 1536' -c 'write -z 64k 8k' -c 'discard 0 512' plain.qcow2
img plain.qcow2
qemu-img create -q -f qcow2 -o $c empty.qcow2 1M
img empty.qcow2
qemu-img create -q -f qcow2 -o $c,refcount_bits=1 rc1.qcow2 1M
io -c 'write -P 0x33 0 16k' -c 'write -P 0x44 900k 2k' rc1.qcow2
img rc1.qcow2
qemu-img create -q -f qcow2 -o $c,refcount_bits=64 rc64.qcow2 1M
io -c 'write -P 0x35 4k 4k' rc64.qcow2
img rc64.qcow2
qemu-img create -q -f qcow2 -o $c,lazy_refcounts=on lazy.qcow2 1M
io -c 'write -P 0x55 0 8k' lazy.qcow2
img lazy.qcow2
# A lazy-refcounts image left dirty (qemu-io aborts without closing).
qemu-img create -q -f qcow2 -o $c,lazy_refcounts=on dirty.qcow2 1M
(qemu-io -f qcow2 -c "write -P 0x56 0 8k" -c abort dirty.qcow2 >/dev/null 2>&1) 2>/dev/null || true
img dirty.qcow2
qemu-img create -q -f qcow2 -o cluster_size=16k,extended_l2=on xl2.qcow2 1M
io -c 'write -P 0x66 0 512' -c 'write -P 0x67 20k 1k' -c 'write -z 40k 2k' xl2.qcow2
img xl2.qcow2
qemu-img create -q -f raw src.raw 1M
qemu-io -f raw -c 'write -P 0x77 0 64k' -c 'write -P 0x78 256k 4k' src.raw >/dev/null
qemu-img convert -q -c -O qcow2 -o $c src.raw comp.qcow2
img comp.qcow2
qemu-img convert -q -c -O qcow2 -o $c,compression_type=zstd src.raw zstd.qcow2
img zstd.qcow2
qemu-img create -q -f qcow2 -o $c snap.qcow2 1M
io -c 'write -P 0x88 0 4k' snap.qcow2
qemu-img snapshot -c s1 snap.qcow2
io -c 'write -P 0x89 0 1k' -c 'write -P 0x8a 8k 1k' snap.qcow2
img snap.qcow2
qemu-img create -q -f qcow2 -o $c,compat=0.10 v2.qcow2 1M
io -c 'write -P 0x99 1k 3k' v2.qcow2
img v2.qcow2
qemu-img create -q -f qcow2 -o $c -b base.raw -F raw backed.qcow2 1M
io -c 'write -P 0xaa 2k 1k' backed.qcow2
img backed.qcow2
qemu-img create -q -f qcow2 -o $c bitmap.qcow2 1M
qemu-img bitmap --add bitmap.qcow2 b0
io -c 'write -P 0xbb 0 2k' bitmap.qcow2
img bitmap.qcow2
qemu-img create -q -f qcow2 -o $c,preallocation=metadata prealloc.qcow2 64k
img prealloc.qcow2
echo "rw_check: $m seeds"
