//! Block devices through every file backend: a loop device over a small file stands in for an LVM
//! volume or a raw disk. Their `st_size` is 0, so lengths must come from the device; they are never
//! truncated. Needs root and `losetup`; each test is skipped with a note otherwise.

use std::path::{Path, PathBuf};
use std::process::Command;

use bytes::{Bytes, BytesMut};
use qcow2_io::{
    start_local, uring_available, Backend, BackendOpen, OpenFlags, StdFileBackend, UringBackend,
};

/// Device size: not a multiple of 4096, so `O_DIRECT` read-modify-write near the end must stop at the
/// device end.
const SIZE: u64 = (1 << 20) + 512;

const RW: OpenFlags = OpenFlags {
    read_only: false,
    create: false,
    direct: false,
};

/// A loop device over a patterned file; detached when dropped.
struct Loop {
    dev: PathBuf,
    data: Vec<u8>,
    _dir: tempfile::TempDir,
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// Attaches a loop device, or `None` with a note.
fn attach(test: &str) -> Option<Loop> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("backing");
    let data: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
    std::fs::write(&path, &data).unwrap();
    match Command::new("losetup")
        .arg("-f")
        .arg("--show")
        .arg(&path)
        .output()
    {
        Ok(o) if o.status.success() => Some(Loop {
            dev: PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()),
            data,
            _dir: dir,
        }),
        Ok(o) => {
            eprintln!(
                "note: {test} skipped, losetup failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            None
        }
        Err(e) => {
            eprintln!("note: {test} skipped, cannot run losetup: {e}");
            None
        }
    }
}

/// Whether the device can be opened with `O_DIRECT`.
fn direct_ok(dev: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .is_ok()
}

/// The checks every backend must pass on the device.
async fn check<B: Backend>(b: &B, data: &mut [u8], direct: bool) {
    assert_eq!(b.len().await.unwrap(), SIZE, "direct={direct}");
    // Reads at the end: data up to the device end, zeros past it.
    let (res, got) = b.read_at(BytesMut::zeroed(600), SIZE - 500).await;
    assert_eq!(res.unwrap(), 500);
    assert!(got[..500] == data[(SIZE - 500) as usize..]);
    assert!(got[500..].iter().all(|&x| x == 0));
    let st = b.host_status(0, 1 << 30).await.unwrap();
    assert!(st.data && st.len > 0 && st.len <= SIZE, "{st:?}");
    // An unaligned write near the end (read-modify-write with O_DIRECT) keeps the size.
    b.write_at(Bytes::from_static(b"hello"), SIZE - 7)
        .await
        .unwrap();
    assert_eq!(b.len().await.unwrap(), SIZE);
    let (res, got) = b.read_at(BytesMut::zeroed(7), SIZE - 7).await;
    assert_eq!(res.unwrap(), 7);
    assert_eq!(&got[..5], b"hello");
    assert_eq!(&got[5..], &data[(SIZE - 2) as usize..]);
    data[(SIZE - 7) as usize..(SIZE - 2) as usize].copy_from_slice(b"hello");
    // Never resized: its own size is accepted, anything else refused.
    b.set_len(SIZE).await.unwrap();
    let err = b.set_len(SIZE + 4096).await.unwrap_err();
    assert!(err.to_string().contains("cannot be resized"), "{err}");
    assert!(b.set_len(0).await.is_err());
    assert_eq!(b.len().await.unwrap(), SIZE);
}

#[test]
fn std_backend_on_block_device() {
    let Some(lo) = attach("std_backend_on_block_device") else {
        return;
    };
    let mut data = lo.data.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let b = StdFileBackend::open_blocking(&lo.dev, RW).unwrap();
        check(&b, &mut data, false).await;
        if direct_ok(&lo.dev) {
            let b =
                StdFileBackend::open_blocking(&lo.dev, OpenFlags { direct: true, ..RW }).unwrap();
            check(&b, &mut data, true).await;
        }
    });
}

#[test]
fn uring_backend_on_block_device() {
    if !uring_available() {
        eprintln!("note: io_uring unavailable: skipping uring_backend_on_block_device");
        return;
    }
    let Some(lo) = attach("uring_backend_on_block_device") else {
        return;
    };
    let mut data = lo.data.clone();
    start_local(async {
        let b = UringBackend::open(&lo.dev, RW).await.unwrap();
        check(&b, &mut data, false).await;
        if direct_ok(&lo.dev) {
            let b = UringBackend::open(&lo.dev, OpenFlags { direct: true, ..RW })
                .await
                .unwrap();
            check(&b, &mut data, true).await;
        }
    })
    .unwrap();
}
