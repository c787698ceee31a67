//! Reads of images made by qemu-img / qemu-io compared with `qemu-img convert -O raw`, and block status
//! compared with `qemu-img map --output=json`.

mod common;

use common::*;
use qcow2_engine::{Error, ImageFormat, OpenOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_64k_clusters() {
    skip_without_qemu!();
    let t = temp_dir();
    let d = t.path();
    create_qcow2(d, "a.qcow2", "20M", "", None);
    qemu_io(
        d,
        "a.qcow2",
        &[
            "write -P 0x11 0 64k",
            "write -P 0x22 100k 300k",
            "write -P 0x33 5M 1M",
            "write -z 5M 128k",
            "write -z -u 5500k 64k",
            "discard 5632k 64k",
            "write -P 0x44 19M 1000k",
            "write -P 0x55 12345 1000",
        ],
    );
    assert_same_as_qemu(d, "a.qcow2").await;
    let img = open(d, "a.qcow2", &OpenOptions::default()).await;
    let info = img.info();
    assert_eq!(info.format, ImageFormat::Qcow2);
    assert_eq!(info.cluster_size, Some(65536));
    assert_eq!(info.virtual_size, 20 << 20);
    assert_eq!(info.qcow2.unwrap().compat, "1.1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_sizes_and_compat() {
    skip_without_qemu!();
    let t = temp_dir();
    let d = t.path();
    for (i, opts) in [
        "cluster_size=512",
        "cluster_size=4096,refcount_bits=1",
        "cluster_size=2M,refcount_bits=64",
        "compat=0.10",
        "cluster_size=4096,compat=0.10",
    ]
    .iter()
    .enumerate()
    {
        let name = format!("c{i}.qcow2");
        create_qcow2(d, &name, "9000k", opts, None);
        qemu_io(
            d,
            &name,
            &[
                "write -P 0x61 1k 3k",
                "write -P 0x62 2M 2100k",
                "write -z 2500k 10k",
                "write -P 0x63 8999k 1k",
            ],
        );
        assert_same_as_qemu(d, &name).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_virtual_size_rounds_up() {
    skip_without_qemu!();
    let t = temp_dir();
    let d = t.path();
    create_qcow2(d, "a.qcow2", "1000", "", None);
    let img = open(d, "a.qcow2", &OpenOptions::default()).await;
    assert_eq!(img.virtual_size(), 1024);
    std::fs::write(d.join("r.raw"), vec![7u8; 1000]).unwrap();
    let raw = open(d, "r.raw", &OpenOptions::default()).await;
    assert_eq!(raw.format(), ImageFormat::Raw);
    assert_eq!(raw.virtual_size(), 1024);
    assert_same_as_qemu(d, "r.raw").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_deep_chain_with_raw_base_and_subdir() {
    skip_without_qemu!();
    let t = temp_dir();
    let d = t.path();
    std::fs::create_dir(d.join("sub")).unwrap();
    // Raw base of 3 MiB + 1000 bytes (not a multiple of 512).
    let mut base = vec![0u8; (3 << 20) + 1000];
    for (i, b) in base.iter_mut().enumerate() {
        *b = (i % 251) as u8 + 1;
    }
    std::fs::write(d.join("sub/base.raw"), &base).unwrap();
    create_qcow2(d, "sub/mid.qcow2", "2M", "", Some(("base.raw", "raw")));
    qemu_io(
        d,
        "sub/mid.qcow2",
        &["write -P 0x71 64k 64k", "write -z 1M 64k"],
    );
    create_qcow2(d, "top.qcow2", "5M", "", Some(("sub/mid.qcow2", "qcow2")));
    qemu_io(
        d,
        "top.qcow2",
        &["write -P 0x72 100k 8k", "write -P 0x73 4M 100k"],
    );
    assert_same_as_qemu(d, "top.qcow2").await;
    let img = open(d, "top.qcow2", &OpenOptions::default()).await;
    assert_eq!(img.chain().len(), 3);
    let info = img.info();
    assert_eq!(info.backing_filename.as_deref(), Some("sub/mid.qcow2"));
    assert_eq!(info.backing_format.as_deref(), Some("qcow2"));
    let mid = img.backing().unwrap();
    assert!(mid.filename().ends_with("sub/mid.qcow2"));
    assert!(mid.backing().unwrap().filename().ends_with("sub/base.raw"));
    // Without following the chain, unallocated clusters read as zeros.
    let opts = OpenOptions {
        follow_backing: false,
        ..OpenOptions::default()
    };
    let lone = open(d, "top.qcow2", &opts).await;
    assert!(lone.backing().is_none());
    let mut buf = vec![1u8; 4096];
    lone.read(0, &mut buf).await.unwrap();
    assert!(buf.iter().all(|&b| b == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_zlib_and_zstd() {
    skip_without_qemu!();
    let t = temp_dir();
    let d = t.path();
    let mut src = vec![0u8; 6 << 20];
    for (i, b) in src.iter_mut().enumerate() {
        // Compressible, but not constant; leave a zero gap.
        if !(2 << 20..3 << 20).contains(&i) {
            *b = ((i / 7) % 13) as u8 ^ ((i >> 12) as u8);
        }
    }
    std::fs::write(d.join("src.raw"), &src).unwrap();
    for (i, (ct, cs)) in [
        ("zlib", "4k"),
        ("zstd", "64k"),
        ("zlib", "2M"),
        ("zstd", "2M"),
        ("zlib", "64k"),
    ]
    .iter()
    .enumerate()
    {
        let name = format!("c{i}.qcow2");
        let o = format!("compression_type={ct},cluster_size={cs}");
        qemu_img(
            d,
            &[
                "convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o", &o, "src.raw", &name,
            ],
        );
        if i == 4 {
            qemu_io(d, &name, &["write -P 0x99 100k 3k", "write -z 1M 64k"]);
        }
        assert_same_as_qemu(d, &name).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_l2_over_backing() {
    skip_without_qemu!();
    let t = temp_dir();
    let d = t.path();
    create_qcow2(d, "base.qcow2", "4M", "", None);
    qemu_io(d, "base.qcow2", &["write -P 0x10 0 4M"]);
    create_qcow2(
        d,
        "x.qcow2",
        "",
        "extended_l2=on,cluster_size=64k",
        Some(("base.qcow2", "qcow2")),
    );
    qemu_io(
        d,
        "x.qcow2",
        &[
            "write -P 0x20 2k 2k",
            "write -P 0x21 70k 5k",
            "write -z 140k 4k",
            "write -z 200k 64k",
            "discard 256k 64k",
            "write -P 0x22 1M 200k",
            "discard 1M 64k",
        ],
    );
    assert_same_as_qemu(d, "x.qcow2").await;
    create_qcow2(d, "y.qcow2", "4M", "extended_l2=on,cluster_size=1M", None);
    qemu_io(
        d,
        "y.qcow2",
        &["write -P 0x30 33k 70k", "write -z 500k 100k"],
    );
    assert_same_as_qemu(d, "y.qcow2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_data_files() {
    skip_without_qemu!();
    let t = temp_dir();
    let d = t.path();
    for (name, raw) in [("d0.qcow2", "off"), ("d1.qcow2", "on")] {
        let o = format!("data_file={name}.data,data_file_raw={raw}");
        create_qcow2(d, name, "3M", &o, None);
        qemu_io(
            d,
            name,
            &[
                "write -P 0x41 0 64k",
                "write -P 0x42 1M 100k",
                "write -z 2M 64k",
            ],
        );
        // The data file name is relative to the CWD, as in QEMU: run from `d`.
        let expected = qemu_raw(d, name);
        let prev = std::env::current_dir().unwrap();
        std::env::set_current_dir(d).unwrap();
        let img = open(d, name, &OpenOptions::default()).await;
        let got = read_all(&img, 100_000).await;
        let map = our_map(&img).await;
        std::env::set_current_dir(prev).unwrap();
        assert_eq!(got, expected, "{name}");
        assert_eq!(map, qemu_map(d, name), "{name}");
        let q = img.info().qcow2.unwrap();
        assert_eq!(
            q.data_file.as_deref(),
            Some(format!("{name}.data").as_str())
        );
        assert_eq!(q.data_file_raw, raw == "on");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prealloc_metadata_and_snapshot() {
    skip_without_qemu!();
    let t = temp_dir();
    let d = t.path();
    create_qcow2(d, "p.qcow2", "8M", "preallocation=metadata", None);
    qemu_io(d, "p.qcow2", &["write -P 0x51 1M 64k"]);
    assert_same_as_qemu(d, "p.qcow2").await;
    create_qcow2(d, "s.qcow2", "4M", "", None);
    qemu_io(d, "s.qcow2", &["write -P 0x61 0 1M"]);
    qemu_img(d, &["snapshot", "-c", "snap1", "s.qcow2"]);
    qemu_img(d, &["snapshot", "-c", "second", "s.qcow2"]);
    qemu_io(d, "s.qcow2", &["write -P 0x62 512k 1M"]);
    assert_same_as_qemu(d, "s.qcow2").await;
    let img = open(d, "s.qcow2", &OpenOptions::default()).await;
    let names: Vec<String> = img
        .info()
        .snapshots
        .iter()
        .map(|s| s.name.clone())
        .collect();
    assert_eq!(names, ["snap1", "second"]);
    assert_eq!(img.info().snapshots[1].id, "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dirty_image_reads_as_is_and_small_cache() {
    skip_without_qemu!();
    let t = temp_dir();
    let d = t.path();
    create_qcow2(d, "l.qcow2", "4M", "lazy_refcounts=on", None);
    let out = qcow2_testkit::run(
        d,
        "qemu-io",
        &qcow2_testkit::qemu_io_args(&[], "l.qcow2", &["write -P 0x5a 0 1M", "abort"]),
    );
    assert!(!out.status.success());
    let img = open(d, "l.qcow2", &OpenOptions::default()).await;
    assert!(img.info().dirty);
    let mut buf = vec![0u8; 1 << 20];
    img.read(0, &mut buf).await.unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));
    let rw = OpenOptions {
        read_only: false,
        ..OpenOptions::default()
    };
    // A read-write open rebuilds the refcounts and clears the dirty bit: qemu-img check is then clean
    // without repairing anything, and the data is untouched.
    let w = qcow2_engine::Image::<qcow2_io::StdFileBackend>::open(d.join("l.qcow2"), &rw)
        .await
        .unwrap();
    w.close().await.unwrap();
    drop(w);
    let img = open(d, "l.qcow2", &OpenOptions::default()).await;
    assert!(!img.info().dirty);
    img.read(0, &mut buf).await.unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));
    let out = qcow2_testkit::run(d, "qemu-img", &["check", "--output=json", "l.qcow2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Hundreds of L2 tables (512 B clusters: one L2 table maps 32 KiB) with a tiny cache.
    create_qcow2(d, "m.qcow2", "16M", "cluster_size=512", None);
    let cmds: Vec<String> = (0..300)
        .map(|i| format!("write -P {} {}k 512", i % 200 + 1, i * 53))
        .collect();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(d, "m.qcow2", &cmds);
    let expected = qemu_raw(d, "m.qcow2");
    let small = OpenOptions {
        l2_cache_bytes: Some(8192),
        ..OpenOptions::default()
    };
    let img = open(d, "m.qcow2", &small).await;
    assert_eq!(read_all(&img, 70_000).await, expected);
    let st = img.l2_cache_stats().await.unwrap();
    assert!(st.capacity <= 16, "{st:?}");
    assert!(st.misses >= 300, "{st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_bit_and_loops() {
    skip_without_qemu!();
    let t = temp_dir();
    let d = t.path();
    create_qcow2(d, "a.qcow2", "1M", "", None);
    create_qcow2(d, "b.qcow2", "", "", Some(("a.qcow2", "qcow2")));
    // Make a.qcow2 point at b.qcow2: a loop.
    qemu_img(
        d,
        &["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2"],
    );
    let e = qcow2_engine::Image::<qcow2_io::StdFileBackend>::open(
        d.join("b.qcow2"),
        &OpenOptions::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::BackingLoop { .. }), "{e}");

    // Set the corrupt bit (incompatible features, byte 79 bit 1).
    create_qcow2(d, "c.qcow2", "1M", "", None);
    let mut bytes = std::fs::read(d.join("c.qcow2")).unwrap();
    bytes[79] |= 2;
    std::fs::write(d.join("c.qcow2"), &bytes).unwrap();
    let img = open(d, "c.qcow2", &OpenOptions::default()).await;
    assert!(img.info().qcow2.unwrap().corrupt);
    let rw = OpenOptions {
        read_only: false,
        ..OpenOptions::default()
    };
    let e = qcow2_engine::Image::<qcow2_io::StdFileBackend>::open(d.join("c.qcow2"), &rw)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::CorruptBitSet { .. }), "{e}");
    assert!(e.to_string().contains("qcow2 check -r all"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_with_backing_sparse_raw_base_and_direct_io() {
    skip_without_qemu!();
    let t = temp_dir();
    let d = t.path();
    // A sparse raw base: data at 1 MiB and at the end, holes elsewhere.
    let f = std::fs::File::create(d.join("base.raw")).unwrap();
    f.set_len(6 << 20).unwrap();
    drop(f);
    qemu_io(
        d,
        "base.raw",
        &["write -P 0x31 1M 192k", "write -P 0x32 6000k 144k"],
    );
    create_qcow2(d, "v2.qcow2", "", "compat=0.10", Some(("base.raw", "raw")));
    qemu_io(
        d,
        "v2.qcow2",
        &[
            "write -P 0x41 0 100k",
            "write -z 1M 64k",
            "discard 0 64k",
            "write -P 0x42 5M 64k",
        ],
    );
    assert_same_as_qemu(d, "v2.qcow2").await;
    // The same through O_DIRECT.
    let expected = qemu_raw(d, "v2.qcow2");
    let opts = OpenOptions {
        direct: true,
        ..OpenOptions::default()
    };
    let img = open(d, "v2.qcow2", &opts).await;
    assert_eq!(read_all(&img, 77_777).await, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_sparse_disk_maps_quickly() {
    skip_without_qemu!();
    let t = temp_dir();
    let d = t.path();
    create_qcow2(d, "h.qcow2", "100T", "", None);
    qemu_io(
        d,
        "h.qcow2",
        &["write -P 0x1 50T 64k", "write -P 0x2 99T 4k"],
    );
    let img = open(d, "h.qcow2", &OpenOptions::default()).await;
    let start = std::time::Instant::now();
    assert_map_same_as_qemu(d, "h.qcow2", &img).await;
    assert!(
        start.elapsed().as_secs() < 20,
        "map took {:?}",
        start.elapsed()
    );
    let mut buf = vec![0u8; 8192];
    img.read((50 << 40) + 60 * 1024, &mut buf).await.unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 1) && buf[4096..].iter().all(|&b| b == 0));
}
