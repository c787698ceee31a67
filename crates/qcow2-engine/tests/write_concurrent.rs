//! Concurrent writers on one image, at the API level: many tasks write disjoint 512-byte-aligned
//! blocks that share clusters (so their allocations meet in the in-flight tracker), some zero-write
//! or re-write their own blocks, with flushes in between; on the multi-threaded runtime with the
//! thread-pool backend. The result must equal the model byte for byte (our read and qemu-img's), and
//! `qemu-img check` must find no corruption and no leak.

use std::sync::Arc;

use qcow2_engine::{Image, OpenOptions};
use qcow2_io::StdFileBackend;
use qcow2_testkit::{
    create_qcow2, path_str, qemu_img_raw, qemu_io, run, skip_without_qemu, temp_dir,
};

fn pattern(task: u64, block: u64, round: u64) -> u8 {
    (task * 31 + block * 7 + round * 13) as u8 | 1
}

fn run_case(opts: &str, block: u64, tasks: u64, backing: bool) {
    skip_without_qemu!();
    let dir = temp_dir();
    let d = dir.path();
    let size: u64 = 16 << 20;
    if backing {
        create_qcow2(d, "base.qcow2", "16M", "", None);
        qemu_io(
            d,
            &["-f", "qcow2"],
            "base.qcow2",
            &["write -q -P 0x5b 0 16M"],
        );
    }
    create_qcow2(
        d,
        "t.qcow2",
        if backing { "" } else { "16M" },
        opts,
        backing.then_some(("base.qcow2", "qcow2")),
    );
    let path = d.join("t.qcow2");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let blocks = size / block;
    let model: Vec<u8> = rt.block_on(async {
        let img = Image::<StdFileBackend>::open(
            &path,
            &OpenOptions {
                read_only: false,
                ..OpenOptions::default()
            },
        )
        .await
        .unwrap();
        let mut handles = Vec::new();
        for t in 0..tasks {
            let img = img.clone();
            handles.push(tokio::spawn(async move {
                // Task t owns blocks b with b % tasks == t.
                let mut mine = Vec::new();
                for round in 0..3u64 {
                    let mut b = t;
                    while b < blocks {
                        let off = b * block;
                        let what = (b / tasks + round) % 5;
                        match what {
                            0 if round > 0 => {
                                img.write_zeroes(off, block, round == 2).await.unwrap();
                                mine.push((b, None));
                            }
                            _ => {
                                let p = pattern(t, b, round);
                                img.write(off, &vec![p; block as usize]).await.unwrap();
                                mine.push((b, Some(p)));
                            }
                        }
                        b += tasks;
                    }
                    if t % 7 == 0 {
                        img.flush().await.unwrap();
                    }
                }
                mine
            }));
        }
        let mut model = if backing {
            vec![0x5bu8; size as usize]
        } else {
            vec![0u8; size as usize]
        };
        let mut last: std::collections::HashMap<u64, Option<u8>> = Default::default();
        for h in handles {
            for (b, p) in h.await.unwrap() {
                last.insert(b, p);
            }
        }
        for (b, p) in last {
            let s = (b * block) as usize;
            model[s..s + block as usize].fill(p.unwrap_or(0));
        }
        let img = Arc::new(img);
        let mut buf = vec![0u8; size as usize];
        img.read(0, &mut buf).await.unwrap();
        assert!(buf == model, "{opts}: our read differs from the model");
        img.close().await.unwrap();
        model
    });
    let theirs = qemu_img_raw(d, path_str(&path), Some("qcow2"));
    assert!(
        theirs == model,
        "{opts}: qemu-img's read differs from the model"
    );
    let out = run(d, "qemu-img", &["check", "--output=json", "t.qcow2"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in ["corruptions", "leaks", "check-errors"] {
        assert_eq!(
            json.get(key).and_then(|v| v.as_u64()).unwrap_or(0),
            0,
            "{opts}: {key}: {json}"
        );
    }
}

#[test]
fn concurrent_64k() {
    run_case("", 4096, 32, false);
}

#[test]
fn concurrent_512_clusters() {
    run_case("cluster_size=512", 512, 16, false);
}

#[test]
fn concurrent_extended_l2_backing() {
    run_case("extended_l2=on", 4096, 32, true);
}

#[test]
fn concurrent_backing_refcount1() {
    run_case("refcount_bits=1,cluster_size=4096", 1024, 24, true);
}
