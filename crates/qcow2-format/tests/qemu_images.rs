//! Cross-checks against images made by QEMU's own tools (skipped when qemu-img is missing):
//! a tiny reader built only on this crate's API must read every image exactly as
//! `qemu-img convert -O raw` does, and re-serialising the header cluster must give QEMU's
//! bytes back.

use std::path::{Path, PathBuf};

use qcow2_format::compressed::decompress;
use qcow2_format::extensions::qemu_feature_table;
use qcow2_format::header::{peek_cluster_bits, Version, HEADER_MIN_READ};
use qcow2_format::image_header::ImageHeader;
use qcow2_format::l1::{parse_l1_table, L1Entry};
use qcow2_format::l2::{decode_l2_with, subcluster_state, SubclusterState};
use qcow2_format::refcount::{decode_reftable_entry, get_refcount, parse_reftable};
use qcow2_format::snapshot::{parse_snapshot_table, serialize_snapshot_table};
use qcow2_testkit::{create_qcow2, qemu_img};

/// `qemu-io -f qcow2 -c CMD... IMG`.
fn qemu_io(img: &Path, cmds: &[&str]) {
    qcow2_testkit::qemu_io(cwd(img), &["-f", "qcow2"], s(img), cmds);
}

/// The directory holding `img`, as the working directory of the tools.
fn cwd(img: &Path) -> &Path {
    img.parent().unwrap_or(Path::new("."))
}

/// A deterministic mix of compressible and incompressible data.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|i| {
            if (i / 8192) % 3 == 0 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            } else if (i / 8192) % 3 == 1 {
                0
            } else {
                (i / 64) as u8
            }
        })
        .collect()
}

/// Reads the whole guest disk of an image without backing file, using only this crate.
fn read_guest(path: &Path) -> (ImageHeader, Vec<u8>) {
    let file = std::fs::read(path).unwrap();
    let cb = peek_cluster_bits(&file[..file.len().min(HEADER_MIN_READ)]).unwrap();
    let cs = 1usize << cb;
    let ih = ImageHeader::parse(&file[..file.len().min(cs)]).unwrap();
    let g = ih.geometry();
    let data = ih
        .data_file()
        .map(|n| std::fs::read(n).unwrap())
        .unwrap_or_else(|| file.clone());
    let size = ih.virtual_size() as usize;
    let mut out = vec![0u8; size];
    let l1off = ih.l1_table_offset().0 as usize;
    let l1 = parse_l1_table(&file[l1off..l1off + ih.l1_table_bytes() as usize]);
    let scs = g.subcluster_size() as usize;
    for (i, &raw) in l1.iter().enumerate() {
        let Some(l2off) = L1Entry::decode(raw, g).unwrap().l2_offset else {
            continue;
        };
        let l2 = &file[l2off.0 as usize..l2off.0 as usize + cs];
        for j in 0..g.l2_entries() as usize {
            let guest = (i * g.l2_entries() as usize + j) * cs;
            if guest >= size {
                break;
            }
            let (entry, bm) = decode_l2_with(l2, j, g, ih.has_data_file()).unwrap();
            let mut cluster_buf: Option<Vec<u8>> = None;
            for sc in 0..g.subclusters() as usize {
                let goff = guest + sc * scs;
                if goff >= size {
                    break;
                }
                let len = scs.min(size - goff);
                let dst = &mut out[goff..goff + len];
                match subcluster_state(&entry, bm, sc as u32).unwrap() {
                    SubclusterState::Normal { host } => {
                        let h = host.0 as usize + sc * scs;
                        dst.copy_from_slice(&data[h..h + len]);
                    }
                    SubclusterState::Compressed(d) => {
                        let buf = cluster_buf.get_or_insert_with(|| {
                            let (o, l) = d.host_range();
                            let start = o.0 as usize;
                            let end = (start + l as usize).min(file.len());
                            let mut c = vec![0u8; cs];
                            decompress(ih.compression_type(), &file[start..end], &mut c).unwrap();
                            c
                        });
                        dst.copy_from_slice(&buf[sc * scs..sc * scs + len]);
                    }
                    _ => dst.fill(0),
                }
            }
        }
    }
    (ih, out)
}

/// Checks our reading against QEMU's and the header round trip against QEMU's bytes.
fn check(img: &Path, dir: &Path) -> ImageHeader {
    let (ih, ours) = read_guest(img);
    let theirs = qcow2_testkit::qemu_img_raw(dir, s(img), None);
    assert!(ours == theirs, "guest data differs for {}", img.display());
    let file = std::fs::read(img).unwrap();
    let cs = ih.cluster_size() as usize;
    let mut first = file[..file.len().min(cs)].to_vec();
    first.resize(cs, 0);
    assert!(
        ih.serialize(cs as u64).unwrap() == first,
        "header cluster differs for {}",
        img.display()
    );
    if ih.version() == Version::V3 && cs >= 8192 {
        // QEMU 10 writes the feature name table only with clusters of 8 KiB and more.
        assert_eq!(
            ih.feature_table(),
            Some(&qemu_feature_table()[..]),
            "{}",
            img.display()
        );
    }
    // Refcount of the header cluster is 1.
    let rt_off = ih.refcount_table_offset().0 as usize;
    let rt = parse_reftable(&file[rt_off..rt_off + ih.refcount_table_bytes() as usize]);
    let rb = decode_reftable_entry(rt[0], ih.geometry())
        .unwrap()
        .unwrap()
        .0 as usize;
    assert_eq!(
        get_refcount(&file[rb..rb + cs], 0, ih.refcount_order()).unwrap(),
        1
    );
    ih
}

fn s(p: &Path) -> &str {
    qcow2_testkit::path_str(p)
}

#[test]
fn compressed_images() {
    qcow2_testkit::skip_without_qemu!();
    let d = qcow2_testkit::temp_dir();
    let src = d.path().join("src.raw");
    std::fs::write(&src, pattern(6 << 20, 7)).unwrap();
    for ct in ["zlib", "zstd"] {
        for cs in ["512", "4k", "64k", "2M"] {
            let img = d.path().join(format!("c-{ct}-{cs}.qcow2"));
            let opts = format!("cluster_size={cs},compression_type={ct}");
            qemu_img(
                d.path(),
                &[
                    "convert",
                    "-c",
                    "-f",
                    "raw",
                    "-O",
                    "qcow2",
                    "-o",
                    &opts,
                    s(&src),
                    s(&img),
                ],
            );
            let ih = check(&img, d.path());
            assert_eq!(ih.compression_type().name(), ct);
            // Partly overwritten afterwards.
            qemu_io(&img, &["write -P 0x5a 4096 70000", "write -z 1M 64k"]);
            check(&img, d.path());
        }
    }
}

#[test]
fn refcount_widths_and_versions() {
    qcow2_testkit::skip_without_qemu!();
    let d = qcow2_testkit::temp_dir();
    for (compat, rb, cs) in [
        ("0.10", 16, "512"),
        ("0.10", 16, "64k"),
        ("1.1", 1, "4k"),
        ("1.1", 2, "64k"),
        ("1.1", 4, "64k"),
        ("1.1", 8, "2M"),
        ("1.1", 32, "64k"),
        ("1.1", 64, "512"),
    ] {
        let img = d.path().join(format!("r-{compat}-{rb}-{cs}.qcow2"));
        let opts = format!("compat={compat},refcount_bits={rb},cluster_size={cs}");
        create_qcow2(d.path(), s(&img), "5M", &opts, None);
        qemu_io(
            &img,
            &[
                "write -P 0x11 0 100k",
                "write -P 0x22 1M 3000",
                "write -z 200k 64k",
                "discard 0 64k",
                "write -P 0x33 4M 1M",
            ],
        );
        let ih = check(&img, d.path());
        assert_eq!(ih.refcount_bits(), rb);
        assert_eq!(ih.version().compat(), compat);
    }
}

#[test]
fn extended_l2_subclusters() {
    qcow2_testkit::skip_without_qemu!();
    let d = qcow2_testkit::temp_dir();
    for cs in ["16k", "64k", "2M"] {
        let img = d.path().join(format!("x-{cs}.qcow2"));
        let opts = format!("extended_l2=on,cluster_size={cs}");
        create_qcow2(d.path(), s(&img), "8M", &opts, None);
        qemu_io(
            &img,
            &[
                "write -P 0xaa 4k 4k",
                "write -P 0xbb 100k 2k",
                "write -z 16k 8k",
                "write -z -u 2M 1M",
                "write -P 0xcc 5M 300k",
                "discard 5M 64k",
                "write -z 6M 512",
            ],
        );
        let ih = check(&img, d.path());
        assert!(ih.extended_l2());
    }
}

#[test]
fn data_files_snapshots_dirty_prealloc() {
    qcow2_testkit::skip_without_qemu!();
    let d = qcow2_testkit::temp_dir();
    // External data file, raw and not.
    for raw in ["on", "off"] {
        let img = d.path().join(format!("df-{raw}.qcow2"));
        let data: PathBuf = d.path().join(format!("df-{raw}.data"));
        let opts = format!("data_file={},data_file_raw={raw}", s(&data));
        create_qcow2(d.path(), s(&img), "3M", &opts, None);
        qemu_io(&img, &["write -P 0x44 0 100k", "write -z 1M 64k"]);
        let ih = check(&img, d.path());
        assert_eq!(ih.data_file(), Some(s(&data)));
        assert_eq!(ih.data_file_raw(), raw == "on");
    }
    // Internal snapshot, overwritten afterwards.
    let img = d.path().join("snap.qcow2");
    create_qcow2(d.path(), s(&img), "2M", "", None);
    qemu_io(&img, &["write -P 0x55 0 200k"]);
    qemu_img(d.path(), &["snapshot", "-c", "first snap", s(&img)]);
    qemu_io(&img, &["write -P 0x66 64k 64k"]);
    qemu_img(d.path(), &["snapshot", "-c", "second", s(&img)]);
    let ih = check(&img, d.path());
    let file = std::fs::read(&img).unwrap();
    let off = ih.header.snapshots_offset as usize;
    let (snaps, len) = parse_snapshot_table(&file[off..], ih.header.nb_snapshots).unwrap();
    assert_eq!(snaps.len(), 2);
    assert_eq!(snaps[0].name, "first snap");
    assert_eq!(snaps[1].id, "2");
    assert_eq!(snaps[0].disk_size, Some(2 << 20));
    let again = serialize_snapshot_table(&snaps, 0).unwrap();
    assert!(
        again == file[off..off + len],
        "snapshot table differs from QEMU's"
    );
    // Dirty lazy-refcounts image.
    let img = d.path().join("dirty.qcow2");
    create_qcow2(d.path(), s(&img), "2M", "lazy_refcounts=on", None);
    // qemu-io exits with an error after `abort`; only the image it leaves matters.
    let _ = qcow2_testkit::run(
        d.path(),
        "qemu-io",
        &qcow2_testkit::qemu_io_args(&["-f", "qcow2"], s(&img), &["write -P 0x77 0 64k", "abort"]),
    );
    let (ih, _) = read_guest(&img);
    assert!(ih.is_dirty() && ih.lazy_refcounts());
    // Metadata preallocation.
    let img = d.path().join("prealloc.qcow2");
    create_qcow2(d.path(), s(&img), "3M", "preallocation=metadata", None);
    check(&img, d.path());
    // Backing file and format.
    let base = d.path().join("base.qcow2");
    create_qcow2(d.path(), s(&base), "1M", "", None);
    let top = d.path().join("top.qcow2");
    create_qcow2(d.path(), s(&top), "", "", Some(("base.qcow2", "qcow2")));
    let file = std::fs::read(&top).unwrap();
    let ih = ImageHeader::parse(&file[..65536]).unwrap();
    assert_eq!(ih.backing_file(), Some("base.qcow2"));
    assert_eq!(ih.backing_format(), Some("qcow2"));
    assert!(ih.serialize(65536).unwrap() == file[..65536]);
}
