//! Unit tests of the fault-injecting backend.

use std::collections::BTreeSet;

use super::*;

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("test runtime")
        .block_on(f)
}

const BASE: u8 = 0xee;
const WRITES: usize = 8;
/// Each test write covers two sectors, so a torn write is visible as one sector kept and one not.
const WLEN: usize = 2 * SECTOR_SIZE as usize;

/// A backend whose durable image is `WRITES * WLEN` bytes of `BASE`, with `WRITES` disjoint unflushed
/// writes, write `i` filling its range with `i + 1`.
async fn epoch_of_disjoint_writes() -> FaultBackend {
    let b = FaultBackend::new(vec![BASE; WRITES * WLEN]);
    for i in 0..WRITES {
        b.write_at(Bytes::from(vec![i as u8 + 1; WLEN]), (i * WLEN) as u64)
            .await
            .unwrap();
    }
    b
}

/// Per write: which of its sectors the image holds (`true` = new data); panics on any other byte.
fn sectors_kept(img: &[u8]) -> Vec<[bool; 2]> {
    assert_eq!(img.len(), WRITES * WLEN);
    (0..WRITES)
        .map(|i| {
            let mut kept = [false; 2];
            for (s, k) in kept.iter_mut().enumerate() {
                let start = i * WLEN + s * SECTOR_SIZE as usize;
                let sector = &img[start..start + SECTOR_SIZE as usize];
                let v = sector[0];
                assert!(sector.iter().all(|&x| x == v), "sector torn inside");
                assert!(v == BASE || v == i as u8 + 1, "foreign byte {v:#x}");
                *k = v != BASE;
            }
            kept
        })
        .collect()
}

#[test]
fn power_cut_modes_keep_exactly_their_subsets() {
    block_on(async {
        let b = epoch_of_disjoint_writes().await;
        assert_eq!(b.power_cut(CutMode::Nothing, 1), b.durable());
        assert_eq!(b.durable(), vec![BASE; WRITES * WLEN]);
        assert_eq!(b.power_cut(CutMode::All, 1), b.contents());
        let (mut prefixes, mut subsets, mut torn) = (BTreeSet::new(), 0, 0);
        for seed in 0..200 {
            // Prefix: writes 0..k whole, nothing after.
            let kept = sectors_kept(&b.power_cut(CutMode::Prefix, seed));
            let k = kept.iter().take_while(|s| s[0] && s[1]).count();
            assert!(kept[k..].iter().all(|s| !s[0] && !s[1]), "not a prefix");
            prefixes.insert(k);
            // Subset: any writes, each whole.
            let kept = sectors_kept(&b.power_cut(CutMode::Subset, seed));
            assert!(kept.iter().all(|s| s[0] == s[1]), "subset tore a write");
            let whole: Vec<bool> = kept.iter().map(|s| s[0]).collect();
            if whole.windows(2).any(|w| !w[0] && w[1]) {
                subsets += 1; // not a prefix: a reordering happened
            }
            // Torn: any sectors (checked by sectors_kept); count writes torn in half.
            let kept = sectors_kept(&b.power_cut(CutMode::Torn, seed));
            torn += kept.iter().filter(|s| s[0] != s[1]).count();
            // Any: one of the above, so at least well-formed sectors; same seed, same image.
            sectors_kept(&b.power_cut(CutMode::Any, seed));
            assert_eq!(
                b.power_cut(CutMode::Any, seed),
                b.power_cut(CutMode::Any, seed)
            );
        }
        assert_eq!(prefixes.len(), WRITES + 1, "every prefix length occurs");
        assert!(subsets > 20, "subsets reorder: {subsets}");
        assert!(torn > 100, "torn cuts tear writes: {torn}");
        // The cut does not change the backend.
        assert_eq!(b.durable(), vec![BASE; WRITES * WLEN]);
    });
}

#[test]
fn cut_applies_kept_ops_in_completion_order_and_keeps_non_writes_whole() {
    block_on(async {
        let b = FaultBackend::new(vec![1; 1024]);
        b.write_at(Bytes::from(vec![2; 1024]), 0).await.unwrap();
        b.write_at(Bytes::from(vec![3; 1024]), 0).await.unwrap();
        b.set_len(4096).await.unwrap();
        b.zero_range(0, 1024).await.unwrap();
        let mut seen = BTreeSet::new();
        for seed in 0..300 {
            for mode in [CutMode::Prefix, CutMode::Subset] {
                let img = b.power_cut(mode, seed);
                assert!(img.len() == 1024 || img.len() == 4096, "set_len torn");
                let v = img[0];
                assert!(img[..1024].iter().all(|&x| x == v));
                assert!(img[1024..].iter().all(|&x| x == 0));
                seen.insert((img.len(), v));
                if mode == CutMode::Prefix && v == 2 {
                    assert_eq!(
                        img.len(),
                        1024,
                        "prefix kept set_len but not the second write"
                    );
                }
            }
            // Torn (and Any, which may tear): every sector holds a value some kept op gave it.
            for img in [
                b.power_cut(CutMode::Torn, seed),
                b.power_cut(CutMode::Any, seed),
            ] {
                assert!(img.len() == 1024 || img.len() == 4096);
                for sector in img[..1024].chunks(SECTOR_SIZE as usize) {
                    assert!(sector.iter().all(|&x| x == sector[0]));
                    assert!([0, 1, 2, 3].contains(&sector[0]));
                }
            }
        }
        for v in [0, 1, 2, 3] {
            assert!(seen.contains(&(4096, v)) || seen.contains(&(1024, v)));
        }
        assert!(seen.contains(&(1024, 1)) && seen.contains(&(4096, 0)));
    });
}

#[test]
fn flush_makes_the_epoch_durable() {
    block_on(async {
        let b = FaultBackend::new(vec![0; 512]);
        b.write_at(Bytes::from(vec![7; 512]), 512).await.unwrap();
        assert_eq!(b.durable().len(), 512);
        b.flush().await.unwrap();
        assert_eq!(b.durable(), b.contents());
        for seed in 0..20 {
            assert_eq!(b.power_cut(CutMode::Any, seed), b.contents());
        }
        assert_eq!(b.op_counts(), (0, 2, 1));
    });
}

#[test]
fn flush_covers_only_ops_completed_before_it_was_issued() {
    use std::future::Future;
    use std::task::{Context, Waker};
    let b = FaultBackend::new(vec![0; 512]).with_schedule(3, 1000);
    let mut flush = std::pin::pin!(b.flush());
    // First poll: the flush is issued and starts its seeded delay.
    let first = flush.as_mut().poll(&mut Context::from_waker(Waker::noop()));
    assert!(first.is_pending(), "seed 3 delays the flush");
    block_on(async {
        b.write_at(Bytes::from(vec![1; 512]), 0).await.unwrap();
        flush.as_mut().await.unwrap();
    });
    assert_eq!(b.contents(), vec![1; 512]);
    assert_eq!(
        b.durable(),
        vec![0; 512],
        "the write completed after the flush was issued"
    );
    assert_eq!(b.power_cut(CutMode::Nothing, 0), vec![0; 512]);
    block_on(b.flush()).unwrap();
    assert_eq!(b.durable(), vec![1; 512]);
}

#[test]
fn failed_flush_is_sticky_and_leaves_the_epoch_not_durable() {
    block_on(async {
        let b = FaultBackend::new(vec![0; 512]);
        b.fail_op(OpKind::Flush, 0, InjectedError::Eio);
        b.write_at(Bytes::from(vec![5; 512]), 0).await.unwrap();
        let e = b.flush().await.unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        assert!(b.flush_failed());
        for _ in 0..3 {
            b.write_at(Bytes::from(vec![6; 512]), 0).await.unwrap();
            assert_eq!(b.flush().await.unwrap_err().raw_os_error(), Some(libc::EIO));
        }
        assert_eq!(b.durable(), vec![0; 512]);
        assert_eq!(b.power_cut(CutMode::Nothing, 0), vec![0; 512]);
        assert_eq!(b.power_cut(CutMode::All, 0), vec![6; 512]);
        // Reads and writes still work: only durability is lost.
        assert_eq!(b.contents(), vec![6; 512]);
    });
}

#[test]
fn lossy_flush_failure_drops_its_writes_and_reports_once() {
    block_on(async {
        let b = FaultBackend::new(vec![0; 1024]).with_lossy_flush_failures();
        b.write_at(Bytes::from(vec![1; 512]), 0).await.unwrap();
        b.fail_op(OpKind::Flush, 0, InjectedError::Eio);
        assert!(b.flush().await.is_err());
        assert!(b.flush_failed());
        b.write_at(Bytes::from(vec![2; 512]), 512).await.unwrap();
        b.flush().await.unwrap();
        let mut want = vec![0; 1024];
        want[512..].fill(2);
        assert_eq!(
            b.durable(),
            want,
            "the failed flush's write is lost for good"
        );
        assert_eq!(b.power_cut(CutMode::All, 0), want);
        assert_eq!(&b.contents()[..512], &[1; 512][..], "but still visible");
    });
}

#[test]
fn fail_op_fails_the_nth_op_of_its_kind_without_effect() {
    block_on(async {
        let b = FaultBackend::new(vec![0; 1024]);
        b.fail_op(OpKind::Write, 1, InjectedError::Enospc);
        b.fail_op(OpKind::AnyWrite, 3, InjectedError::Eio);
        b.fail_op(OpKind::Read, 0, InjectedError::Eio);
        let w = |v: u8, off: u64| b.write_at(Bytes::from(vec![v; 256]), off);
        w(1, 0).await.unwrap(); // write 0, any-write 0
        let e = w(2, 256).await.unwrap_err(); // write 1: fails ENOSPC; any-write 1
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        b.zero_range(0, 10).await.unwrap(); // any-write 2
        b.flush().await.unwrap(); // not an any-write
        let e = b.punch_hole(0, 512).await.unwrap_err(); // any-write 3: fails EIO
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        assert_eq!(b.armed_failures(), 1, "the read failure is still armed");
        w(3, 512).await.unwrap();
        let (r, buf) = b.read_at(BytesMut::zeroed(16), 0).await;
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EIO));
        assert_eq!(buf.len(), 16, "the buffer comes back");
        let (r, buf) = b.read_at(BytesMut::zeroed(1024), 0).await;
        assert_eq!(r.unwrap(), 1024);
        let mut want = vec![0u8; 1024];
        want[10..256].fill(1);
        want[512..768].fill(3);
        assert_eq!(&buf[..], &want[..]);
        assert_eq!(b.contents(), want);
        assert_eq!(b.armed_failures(), 0);
        b.fail_op(OpKind::Read, 0, InjectedError::Eio);
        b.clear_failures();
        assert!(b.read_at(BytesMut::zeroed(1), 0).await.0.is_ok());
    });
}

#[test]
fn crash_after_takes_the_image_and_then_fails_everything() {
    block_on(async {
        let b = FaultBackend::new(vec![0; 512]);
        b.write_at(Bytes::from(vec![1; 512]), 0).await.unwrap();
        b.crash_after(2, CutMode::All, 9);
        b.write_at(Bytes::from(vec![2; 512]), 0).await.unwrap(); // op 0
        b.flush().await.unwrap(); // op 1 (flushes count)
        let before = b.contents();
        assert!(b.crash_image().is_none() && !b.crashed());
        let e = b.write_at(Bytes::from(vec![3; 512]), 0).await.unwrap_err(); // op 2: crash
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        assert_eq!(b.crash_image(), Some(before.clone()));
        assert_eq!(b.contents(), before, "the crashing op has no effect");
        assert!(b.read_at(BytesMut::zeroed(8), 0).await.0.is_err());
        assert!(b.flush().await.is_err());
        assert!(b.len().await.is_err());
        assert!(b.zero_range(0, 8).await.is_err());
        assert_eq!(b.crash_image(), Some(before));

        // With Nothing, the crash image is the durable state.
        let b = FaultBackend::new(vec![0; 512]);
        b.crash_after(1, CutMode::Nothing, 0);
        b.write_at(Bytes::from(vec![4; 512]), 0).await.unwrap();
        assert!(b.set_len(0).await.is_err());
        assert_eq!(b.crash_image(), Some(vec![0; 512]));
    });
}

/// Runs `tasks` concurrent writers on a current-thread runtime with the schedule `seed`; returns the
/// order in which their writes completed.
fn completion_order(seed: u64, tasks: u8) -> Vec<u8> {
    block_on(async {
        let b = FaultBackend::new(Vec::new()).with_schedule(seed, 8);
        let order = Arc::new(Mutex::new(Vec::new()));
        let handles: Vec<_> = (0..tasks)
            .map(|t| {
                let (b, order) = (b.clone(), order.clone());
                tokio::spawn(async move {
                    for i in 0..3u64 {
                        b.write_at(Bytes::from(vec![t; 16]), u64::from(t) * 64 + i * 16)
                            .await
                            .unwrap();
                        order.lock().unwrap().push(t);
                    }
                })
            })
            .collect();
        for h in handles {
            h.await.unwrap();
        }
        let v = order.lock().unwrap().clone();
        v
    })
}

#[test]
fn schedule_replays_per_seed_and_varies_across_seeds() {
    let a = completion_order(42, 6);
    assert_eq!(a.len(), 18);
    assert_eq!(a, completion_order(42, 6), "same seed, same order");
    let distinct: BTreeSet<Vec<u8>> = (0..10).map(|s| completion_order(s, 6)).collect();
    assert!(
        distinct.len() >= 5,
        "seeds explore orders: {}",
        distinct.len()
    );
    // Without a schedule, tasks run in spawn order.
    let plain = block_on(async {
        let b = FaultBackend::new(Vec::new());
        b.write_at(Bytes::from_static(b"x"), 0).await.unwrap();
        b.op_counts()
    });
    assert_eq!(plain, (0, 1, 0));
}

#[test]
fn max_size_bounds_growth_and_reads_past_eof_zero_fill() {
    block_on(async {
        let b = FaultBackend::new(vec![9; 100]).with_max_size(1 << 20);
        assert!(b.write_at(Bytes::from_static(b"x"), 1 << 40).await.is_err());
        assert!(b
            .write_at(Bytes::from_static(b"x"), u64::MAX)
            .await
            .is_err());
        assert!(b.zero_range(1 << 40, 1).await.is_err());
        assert!(b.zero_range(u64::MAX, 2).await.is_err());
        assert!(b.set_len(1 << 40).await.is_err());
        assert!(b.punch_hole(u64::MAX, 2).await.is_err());
        b.punch_hole(1 << 40, 1 << 40).await.unwrap();
        let (r, _) = b.read_at(BytesMut::zeroed(16), u64::MAX - 3).await;
        assert!(r.is_err());
        let (r, buf) = b.read_at(BytesMut::from(&[1u8; 16][..]), 96).await;
        assert_eq!(r.unwrap(), 4);
        assert_eq!(&buf[..], &[9, 9, 9, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(b.len().await.unwrap(), 100);
        b.write_at(Bytes::from_static(b"ok"), (1 << 20) - 2)
            .await
            .unwrap();
        assert_eq!(b.len().await.unwrap(), 1 << 20);
        assert_eq!(
            b.host_status(1 << 20, 10).await.unwrap(),
            HostStatus {
                data: false,
                len: 10
            }
        );
        assert_eq!(b.power_cut(CutMode::Nothing, 0).len(), 100);
    });
}

#[test]
fn futures_are_send() {
    fn send<T: Send>(_: T) {}
    let b = FaultBackend::new(Vec::new());
    send(b.read_at(BytesMut::new(), 0));
    send(b.writev_at(Vec::new(), 0));
    send(b.flush());
    send(b.zero_range(0, 0));
    send(b.punch_hole(0, 0));
    send(b.set_len(0));
    send(b.len());
    send(b.host_status(0, 0));
    send(b.allocated_size());
}
