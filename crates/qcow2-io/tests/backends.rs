//! Runs the shared behavioural suite against every backend, on the runtime each is meant for.

mod suite;

use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use qcow2_io::{
    start_local, uring_available, Backend, BackendOpen, LocalBackend, MemoryBackend, OpenFlags,
    StdFileBackend, UringBackend,
};
use suite::Expect;

const CREATE: OpenFlags = OpenFlags {
    read_only: false,
    create: true,
    direct: false,
};

const CREATE_DIRECT: OpenFlags = OpenFlags {
    read_only: false,
    create: true,
    direct: true,
};

fn assert_send<T: Send>(_: &T) {}

/// `None` (with a note) when the file system refuses `O_DIRECT`.
fn direct_supported(dir: &Path) -> bool {
    let probe = dir.join("direct-probe");
    match StdFileBackend::open_blocking(&probe, CREATE_DIRECT) {
        Ok(_) => true,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            eprintln!(
                "note: O_DIRECT not supported in {}: skipping",
                dir.display()
            );
            false
        }
        Err(e) => panic!("opening {} with O_DIRECT: {e}", probe.display()),
    }
}

/// A tmpfs directory (where fallocate(ZERO_RANGE) is unsupported, so the emulation runs), if any.
fn tmpfs_dir() -> Option<tempfile::TempDir> {
    let shm = PathBuf::from("/dev/shm");
    if !shm.is_dir() {
        eprintln!("note: no /dev/shm: skipping the tmpfs run");
        return None;
    }
    tempfile::tempdir_in(shm).ok()
}

#[tokio::test]
async fn memory_suite() {
    let m = MemoryBackend::new();
    suite::run_all(&m, Expect { sparse: false }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn std_suite_multi_thread() {
    let dir = tempfile::tempdir().unwrap();
    let b = StdFileBackend::open(&dir.path().join("img"), CREATE)
        .await
        .unwrap();
    // The futures must be Send so that engines can run on the multi-threaded runtime.
    assert_send(&b.read_at(BytesMut::zeroed(1), 0));
    assert_send(&b.writev_at(Vec::new(), 0));
    assert_send(&b.host_status(0, 1));
    assert_send(&StdFileBackend::open(Path::new("x"), CREATE));
    assert_send(&MemoryBackend::new().read_at(BytesMut::new(), 0));
    // Code generic over `B: Backend` is Send when instantiated with the std backend: spawn the whole
    // generic suite as a multi-threaded task.
    tokio::spawn(async move { suite::run_all(&b, Expect { sparse: true }).await })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn std_suite_direct() {
    let dir = tempfile::tempdir().unwrap();
    if !direct_supported(dir.path()) {
        return;
    }
    let b = StdFileBackend::open(&dir.path().join("img"), CREATE_DIRECT)
        .await
        .unwrap();
    assert!(b.is_direct());
    suite::run_all(&b, Expect { sparse: true }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn std_suite_tmpfs_emulation() {
    let Some(dir) = tmpfs_dir() else { return };
    let b = StdFileBackend::open(&dir.path().join("img"), CREATE)
        .await
        .unwrap();
    suite::run_all(&b, Expect { sparse: true }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn std_concurrent_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    for flags in [CREATE, CREATE_DIRECT] {
        if flags.direct && !direct_supported(dir.path()) {
            continue;
        }
        let b = StdFileBackend::open(&path, flags).await.unwrap();
        b.set_len(0).await.unwrap();
        let mut tasks = Vec::new();
        for t in 0..16u64 {
            let b = b.clone();
            tasks.push(tokio::spawn(async move {
                // Unaligned, interleaved regions: 16 tasks, each owning every 16th 1000-byte slot.
                for i in 0..20u64 {
                    let slot = i * 16 + t;
                    let fill = (slot % 250) as u8 + 1;
                    b.write_at(Bytes::from(vec![fill; 1000]), slot * 1000)
                        .await
                        .unwrap();
                    let (res, got) = b.read_at(BytesMut::zeroed(1000), slot * 1000).await;
                    assert_eq!(res.unwrap(), 1000);
                    assert!(got.iter().all(|&x| x == fill));
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let total = 16 * 20 * 1000;
        assert_eq!(b.len().await.unwrap(), total);
        let (res, all) = b.read_at(BytesMut::zeroed(total as usize), 0).await;
        assert_eq!(res.unwrap(), total as usize);
        for (slot, chunk) in all.chunks(1000).enumerate() {
            let fill = (slot % 250) as u8 + 1;
            assert!(
                chunk.iter().all(|&x| x == fill),
                "slot {slot} (direct: {})",
                flags.direct
            );
        }
    }
}

#[tokio::test]
async fn std_open_errors_and_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing");
    let err = StdFileBackend::open(&missing, OpenFlags::default())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    let path = dir.path().join("ro");
    std::fs::write(&path, b"data").unwrap();
    let ro = StdFileBackend::open(
        &path,
        OpenFlags {
            read_only: true,
            ..OpenFlags::default()
        },
    )
    .await
    .unwrap();
    assert!(ro.write_at(Bytes::from_static(b"x"), 0).await.is_err());
    let (res, got) = ro.read_at(BytesMut::zeroed(6), 0).await;
    assert_eq!(res.unwrap(), 4);
    assert_eq!(&got[..], b"data\0\0");
}

fn run_uring<F, Fut>(name: &str, f: F)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    if !uring_available() {
        eprintln!("note: io_uring unavailable on this machine: skipping {name}");
        return;
    }
    qcow2_io::start_local(f()).expect("a current-thread runtime starts");
}

#[test]
fn uring_suite() {
    run_uring("uring_suite", || async {
        assert!(qcow2_io::in_uring_runtime());
        let dir = tempfile::tempdir().unwrap();
        let b = UringBackend::open(&dir.path().join("img"), CREATE)
            .await
            .unwrap();
        suite::run_all(&b, Expect { sparse: true }).await;
    });
}

#[test]
fn uring_suite_direct() {
    run_uring("uring_suite_direct", || async {
        let dir = tempfile::tempdir().unwrap();
        if !direct_supported(dir.path()) {
            return;
        }
        let b = UringBackend::open(&dir.path().join("img"), CREATE_DIRECT)
            .await
            .unwrap();
        assert!(b.is_direct());
        suite::run_all(&b, Expect { sparse: true }).await;
    });
}

#[test]
fn uring_suite_tmpfs_emulation() {
    run_uring("uring_suite_tmpfs_emulation", || async {
        let Some(dir) = tmpfs_dir() else { return };
        let b = UringBackend::open(&dir.path().join("img"), CREATE)
            .await
            .unwrap();
        suite::run_all(&b, Expect { sparse: true }).await;
    });
}

#[test]
fn uring_concurrent_local_tasks() {
    run_uring("uring_concurrent_local_tasks", || async {
        let dir = tempfile::tempdir().unwrap();
        let b = UringBackend::open(&dir.path().join("img"), CREATE)
            .await
            .unwrap();
        let mut tasks = Vec::new();
        for t in 0..16u64 {
            let b = b.clone();
            tasks.push(tokio_uring::spawn(async move {
                for i in 0..20u64 {
                    let slot = i * 16 + t;
                    let fill = (slot % 250) as u8 + 1;
                    b.write_at(Bytes::from(vec![fill; 1000]), slot * 1000)
                        .await
                        .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let (res, all) = b.read_at(BytesMut::zeroed(320_000), 0).await;
        assert_eq!(res.unwrap(), 320_000);
        for (slot, chunk) in all.chunks(1000).enumerate() {
            let fill = (slot % 250) as u8 + 1;
            assert!(chunk.iter().all(|&x| x == fill), "slot {slot}");
        }
    });
}

#[test]
fn local_backend_via_start_local() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let expect_uring = uring_available();
    start_local(async {
        let b = LocalBackend::open(&path, CREATE).await.unwrap();
        assert_eq!(b.is_uring(), expect_uring);
        suite::run_all(&b, Expect { sparse: true }).await;
    })
    .unwrap();
}

#[test]
fn local_backend_falls_back_outside_uring() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    // A plain Tokio current-thread runtime: the probe must say "not io_uring" without panicking.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        assert!(!qcow2_io::in_uring_runtime());
        let err = UringBackend::open(&path, CREATE).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::Unsupported);
        let b = LocalBackend::open(&path, CREATE).await.unwrap();
        assert!(!b.is_uring());
        suite::read_write_past_eof(&b).await;
    });
    // And on the multi-threaded runtime.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .unwrap();
    rt.block_on(async {
        assert!(!qcow2_io::in_uring_runtime());
    });
    // And outside any runtime.
    assert!(!qcow2_io::in_uring_runtime());
}
