//! The behavioural test suite every backend must pass, generic over `B: Backend`.
//!
//! Each test drives one fresh, empty backend. Where a backend cannot report holes (memory), `sparse` is
//! false and host-status checks expect data everywhere inside the file.

#![allow(dead_code)] // each test binary uses a different subset

use bytes::{Bytes, BytesMut};
use qcow2_io::{Backend, HostStatus};

const MIB: u64 = 1 << 20;

/// What the suite may expect of a backend.
#[derive(Debug, Clone, Copy)]
pub struct Expect {
    /// Punched holes show up in `host_status`.
    pub sparse: bool,
}

async fn read<B: Backend>(b: &B, offset: u64, len: usize) -> (usize, Vec<u8>) {
    // Pre-fill with garbage to check that the tail past EOF is zeroed.
    let mut buf = BytesMut::with_capacity(len);
    buf.resize(len, 0x5A);
    let (res, buf) = b.read_at(buf, offset).await;
    let n = res.expect("read_at");
    assert_eq!(buf.len(), len, "read_at must hand back the whole buffer");
    (n, buf.to_vec())
}

async fn check_model<B: Backend>(b: &B, model: &[u8], what: &str) {
    assert_eq!(b.len().await.unwrap(), model.len() as u64, "{what}: len");
    let (n, got) = read(b, 0, model.len() + 4096).await;
    assert_eq!(n, model.len(), "{what}: bytes read");
    assert!(got[..model.len()] == *model, "{what}: contents differ");
    assert!(
        got[model.len()..].iter().all(|&x| x == 0),
        "{what}: tail not zeroed"
    );
}

/// Runs every check on `b`, which must be empty.
pub async fn run_all<B: Backend>(b: &B, expect: Expect) {
    read_write_past_eof(b).await;
    writev(b).await;
    writev_many_iovecs(b).await;
    zero_range(b).await;
    punch_hole_and_host_status(b, expect).await;
    set_len_and_len(b).await;
    flush_and_sizes(b).await;
    bad_ranges(b).await;
    model_based(b, 0x1234_5678).await;
}

pub async fn read_write_past_eof<B: Backend>(b: &B) {
    b.set_len(0).await.unwrap();
    assert_eq!(b.len().await.unwrap(), 0);
    let (n, got) = read(b, 0, 100).await;
    assert_eq!(n, 0);
    assert!(got.iter().all(|&x| x == 0));
    let (n, got) = read(b, 0, 0).await;
    assert_eq!((n, got.len()), (0, 0));

    b.write_at(Bytes::from_static(b"hello"), 10).await.unwrap();
    assert_eq!(b.len().await.unwrap(), 15);
    let (n, got) = read(b, 5, 20).await;
    assert_eq!(n, 10);
    let mut want = vec![0u8; 20];
    want[5..10].copy_from_slice(b"hello");
    assert_eq!(got, want);

    // Entirely past EOF.
    let (n, got) = read(b, 1000, 10).await;
    assert_eq!(n, 0);
    assert_eq!(got, vec![0; 10]);

    // An empty write changes nothing, even far away.
    b.write_at(Bytes::new(), 1 << 40).await.unwrap();
    assert_eq!(b.len().await.unwrap(), 15);

    // A larger unaligned write straddling blocks, read back with an unaligned read.
    let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    b.write_at(Bytes::from(data.clone()), 4000).await.unwrap();
    let (n, got) = read(b, 4001, 9_999).await;
    assert_eq!(n, 9_999);
    assert_eq!(got, data[1..]);
    assert_eq!(b.len().await.unwrap(), 14_000);
}

pub async fn writev<B: Backend>(b: &B) {
    b.set_len(0).await.unwrap();
    let parts = vec![
        Bytes::from_static(b"abc"),
        Bytes::new(),
        Bytes::from(vec![7u8; 5000]),
        Bytes::from_static(b"z"),
    ];
    b.writev_at(parts, 4090).await.unwrap();
    let (n, got) = read(b, 4090, 5004).await;
    assert_eq!(n, 5004);
    assert_eq!(&got[..3], b"abc");
    assert!(got[3..5003].iter().all(|&x| x == 7));
    assert_eq!(got[5003], b'z');
    assert_eq!(b.len().await.unwrap(), 4090 + 5004);
    let (n, head) = read(b, 0, 4090).await;
    assert_eq!(n, 4090);
    assert!(head.iter().all(|&x| x == 0));
    b.writev_at(Vec::new(), 0).await.unwrap();
    assert_eq!(b.len().await.unwrap(), 4090 + 5004);
}

/// More buffers than one `writev` accepts (IOV_MAX = 1024).
pub async fn writev_many_iovecs<B: Backend>(b: &B) {
    b.set_len(0).await.unwrap();
    let parts: Vec<Bytes> = (0..2500u32)
        .map(|i| Bytes::from(vec![(i % 256) as u8; 3]))
        .collect();
    b.writev_at(parts, 1).await.unwrap();
    let (n, got) = read(b, 1, 7500).await;
    assert_eq!(n, 7500);
    for (i, chunk) in got.chunks(3).enumerate() {
        assert!(chunk.iter().all(|&x| x == (i % 256) as u8), "buffer {i}");
    }
}

pub async fn zero_range<B: Backend>(b: &B) {
    b.set_len(0).await.unwrap();
    b.write_at(Bytes::from(vec![0xAB; 65536]), 0).await.unwrap();
    b.zero_range(4096, 8192).await.unwrap();
    b.zero_range(100, 7).await.unwrap();
    b.zero_range(0, 0).await.unwrap();
    let (n, got) = read(b, 0, 65536).await;
    assert_eq!(n, 65536);
    for (i, &x) in got.iter().enumerate() {
        let zero = (4096..12288).contains(&i) || (100..107).contains(&i);
        assert_eq!(x, if zero { 0 } else { 0xAB }, "byte {i}");
    }
    // Zeroing past the end extends the file (as fallocate(ZERO_RANGE) without KEEP_SIZE does).
    b.zero_range(65536 + 1000, 5000).await.unwrap();
    assert_eq!(b.len().await.unwrap(), 65536 + 6000);
    let (n, got) = read(b, 65536, 6000).await;
    assert_eq!(n, 6000);
    assert!(got.iter().all(|&x| x == 0));
}

pub async fn punch_hole_and_host_status<B: Backend>(b: &B, expect: Expect) {
    b.set_len(0).await.unwrap();
    b.write_at(Bytes::from(vec![0xCD; 3 * MIB as usize]), 0)
        .await
        .unwrap();
    b.flush().await.unwrap();
    b.punch_hole(MIB, MIB).await.unwrap();
    assert_eq!(b.len().await.unwrap(), 3 * MIB, "punch_hole keeps the size");
    let (n, got) = read(b, MIB - 10, MIB as usize + 20).await;
    assert_eq!(n, MIB as usize + 20);
    assert!(got[..10].iter().all(|&x| x == 0xCD));
    assert!(got[10..10 + MIB as usize].iter().all(|&x| x == 0));
    assert!(got[10 + MIB as usize..].iter().all(|&x| x == 0xCD));

    let whole = b.host_status(0, 3 * MIB).await.unwrap();
    let mid = b.host_status(MIB, 2 * MIB).await.unwrap();
    let last = b.host_status(2 * MIB, 10 * MIB).await.unwrap();
    if expect.sparse {
        assert_eq!(
            whole,
            HostStatus {
                data: true,
                len: MIB
            }
        );
        assert_eq!(
            mid,
            HostStatus {
                data: false,
                len: MIB
            }
        );
        assert_eq!(
            last,
            HostStatus {
                data: true,
                len: MIB
            }
        );
        let inside = b.host_status(MIB + 5, 100).await.unwrap();
        assert_eq!(
            inside,
            HostStatus {
                data: false,
                len: 100
            }
        );
    } else {
        assert_eq!(
            whole,
            HostStatus {
                data: true,
                len: 3 * MIB
            }
        );
        assert_eq!(
            mid,
            HostStatus {
                data: true,
                len: 2 * MIB
            }
        );
        assert_eq!(
            last,
            HostStatus {
                data: true,
                len: MIB
            }
        );
    }
    let capped = b.host_status(0, 10).await.unwrap();
    assert_eq!(
        capped,
        HostStatus {
            data: true,
            len: 10
        }
    );
    // Past EOF is a hole.
    let past = b.host_status(3 * MIB, 77).await.unwrap();
    assert_eq!(
        past,
        HostStatus {
            data: false,
            len: 77
        }
    );
    let far = b.host_status(u64::MAX / 4, 77).await.unwrap();
    assert_eq!(
        far,
        HostStatus {
            data: false,
            len: 77
        }
    );
    assert_eq!(b.host_status(0, 0).await.unwrap().len, 0);

    // Punching past the end neither fails nor grows the file.
    b.punch_hole(3 * MIB - 5, MIB).await.unwrap();
    b.punch_hole(10 * MIB, MIB).await.unwrap();
    b.punch_hole(0, 0).await.unwrap();
    assert_eq!(b.len().await.unwrap(), 3 * MIB);
    let (n, got) = read(b, 3 * MIB - 6, 6).await;
    assert_eq!(n, 6);
    assert_eq!(got, [0xCD, 0, 0, 0, 0, 0]);

    // A file extended by set_len ends in a hole.
    b.set_len(5 * MIB).await.unwrap();
    let tail = b.host_status(4 * MIB, MIB).await.unwrap();
    if expect.sparse {
        assert_eq!(
            tail,
            HostStatus {
                data: false,
                len: MIB
            }
        );
    } else {
        assert_eq!(
            tail,
            HostStatus {
                data: true,
                len: MIB
            }
        );
    }
}

pub async fn set_len_and_len<B: Backend>(b: &B) {
    b.set_len(0).await.unwrap();
    b.write_at(Bytes::from(vec![1u8; 10_000]), 0).await.unwrap();
    b.set_len(5000).await.unwrap();
    assert_eq!(b.len().await.unwrap(), 5000);
    let (n, got) = read(b, 4000, 2000).await;
    assert_eq!(n, 1000);
    assert!(got[..1000].iter().all(|&x| x == 1));
    assert!(got[1000..].iter().all(|&x| x == 0));
    b.set_len(20_000).await.unwrap();
    assert_eq!(b.len().await.unwrap(), 20_000);
    let (n, got) = read(b, 4000, 2000).await;
    assert_eq!(n, 2000);
    assert!(
        got[1000..].iter().all(|&x| x == 0),
        "extension reads as zeros"
    );
    b.set_len(0).await.unwrap();
    assert_eq!(b.len().await.unwrap(), 0);
}

pub async fn flush_and_sizes<B: Backend>(b: &B) {
    b.set_len(0).await.unwrap();
    b.write_at(Bytes::from(vec![9u8; 8192]), 0).await.unwrap();
    b.flush().await.unwrap();
    let alloc = b.allocated_size().await.unwrap();
    if let Some(a) = alloc {
        assert!(a >= 8192, "allocated size {a} below written data");
    }
}

/// Offsets whose end overflows or exceeds any file size fail cleanly instead of panicking.
pub async fn bad_ranges<B: Backend>(b: &B) {
    let (res, buf) = b.read_at(BytesMut::zeroed(16), u64::MAX - 3).await;
    assert!(res.is_err());
    assert_eq!(buf.len(), 16);
    assert!(b
        .write_at(Bytes::from_static(b"xy"), u64::MAX)
        .await
        .is_err());
    assert!(b
        .writev_at(vec![Bytes::from_static(b"xy")], u64::MAX - 1)
        .await
        .is_err());
    assert!(b.zero_range(u64::MAX, 2).await.is_err());
    assert!(b.punch_hole(u64::MAX - 1, 5).await.is_err());
    assert!(b.set_len(u64::MAX).await.is_err());
}

/// Deterministic xorshift generator (no external crates needed).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Random writes, vectored writes, zeroing, hole punching and truncation at unaligned offsets, checked
/// against a plain vector after every step.
pub async fn model_based<B: Backend>(b: &B, seed: u64) {
    b.set_len(0).await.unwrap();
    let mut model: Vec<u8> = Vec::new();
    let mut rng = Rng(seed | 1);
    const SPAN: u64 = 256 * 1024;
    for step in 0..120u32 {
        let off = rng.below(SPAN);
        let len = rng.below(20_000) as usize;
        let fill = (rng.next() & 0xFF) as u8 | 1;
        let end = off as usize + len;
        match rng.below(6) {
            0 | 1 => {
                b.write_at(Bytes::from(vec![fill; len]), off).await.unwrap();
                if len > 0 {
                    if model.len() < end {
                        model.resize(end, 0);
                    }
                    model[off as usize..end].fill(fill);
                }
            }
            2 => {
                let cut = len / 3;
                let parts = vec![
                    Bytes::from(vec![fill; cut]),
                    Bytes::from(vec![fill.wrapping_add(1); len - cut]),
                ];
                b.writev_at(parts, off).await.unwrap();
                if len > 0 {
                    if model.len() < end {
                        model.resize(end, 0);
                    }
                    model[off as usize..off as usize + cut].fill(fill);
                    model[off as usize + cut..end].fill(fill.wrapping_add(1));
                }
            }
            3 => {
                b.zero_range(off, len as u64).await.unwrap();
                if len > 0 {
                    if model.len() < end {
                        model.resize(end, 0);
                    }
                    model[off as usize..end].fill(0);
                }
            }
            4 => {
                b.punch_hole(off, len as u64).await.unwrap();
                let stop = end.min(model.len());
                if (off as usize) < stop {
                    model[off as usize..stop].fill(0);
                }
            }
            _ => {
                let new_len = rng.below(SPAN) as usize;
                b.set_len(new_len as u64).await.unwrap();
                model.resize(new_len, 0);
            }
        }
        // Spot-check an unaligned window, then everything every few steps.
        let roff = rng.below(SPAN);
        let rlen = rng.below(10_000) as usize;
        let (n, got) = read(b, roff, rlen).await;
        let have = model.len().saturating_sub(roff as usize).min(rlen);
        assert_eq!(n, have, "step {step}: read count at {roff}+{rlen}");
        if have > 0 {
            assert!(
                got[..have] == model[roff as usize..roff as usize + have],
                "step {step}: window at {roff}+{rlen}"
            );
        }
        assert!(got[have..].iter().all(|&x| x == 0), "step {step}: tail");
        if step % 10 == 9 {
            check_model(b, &model, &format!("step {step}")).await;
        }
    }
    check_model(b, &model, "end").await;
}
