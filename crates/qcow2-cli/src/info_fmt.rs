//! `info` output: the JSON of `qemu-img info --output=json` and its human-readable form.
//!
//! The JSON member order is qemu-img's (QEMU prints a hash table, so its order is fixed but not the
//! declaration order): `children`, `backing-filename-format`, `snapshots`, `virtual-size`, `filename`,
//! `cluster-size`, `format`, `actual-size`, `format-specific`, `full-backing-filename`,
//! `backing-filename`, `dirty-flag`. The `qcow2` format-specific data lists `compat`, `compression-type`,
//! `lazy-refcounts`, `refcount-bits`, `data-file`, `data-file-raw`, `corrupt`, `extended-l2`; compat 0.10
//! images show only `compat`, `compression-type` and `refcount-bits`, and the data-file members appear only
//! when the image has a data file. The protocol node (`children`, named `file`) describes the host file.

use qcow2_engine::Snapshot;

use crate::qjson::Json;
use crate::size::size_to_str;

/// Everything `info` prints about one image (one layer of a chain).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct InfoRecord {
    /// The image's name as given (or as found in the overlay for backing files).
    pub filename: String,
    /// `qcow2` or `raw`.
    pub format: String,
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// Host bytes allocated for the image file, when known.
    pub actual_size: Option<u64>,
    /// Cluster size (qcow2 only).
    pub cluster_size: Option<u64>,
    /// The image was not closed cleanly (qcow2 dirty bit, lazy refcounts).
    pub dirty: bool,
    /// Backing file name as stored in the image.
    pub backing_filename: Option<String>,
    /// Backing file name resolved relative to the image.
    pub full_backing_filename: Option<String>,
    /// Backing file format as stored in the image.
    pub backing_format: Option<String>,
    /// Internal snapshots (qcow2).
    pub snapshots: Vec<Snapshot>,
    /// qcow2-specific data.
    pub qcow2: Option<Qcow2Record>,
    /// The protocol (host file) node.
    pub file: Option<FileRecord>,
}

/// The `format-specific` data of a qcow2 image.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Qcow2Record {
    /// `"0.10"` (version 2) or `"1.1"` (version 3).
    pub compat: String,
    /// `"zlib"` or `"zstd"`.
    pub compression_type: String,
    /// Lazy refcounts (compatible feature bit 0).
    pub lazy_refcounts: bool,
    /// Refcount width in bits.
    pub refcount_bits: u64,
    /// The corrupt bit (incompatible feature bit 1).
    pub corrupt: bool,
    /// Extended L2 entries (sub-clusters).
    pub extended_l2: bool,
    /// External data file name, when the image has one.
    pub data_file: Option<String>,
    /// Whether the data file is kept a valid raw image; `None` when the image has no external data file
    /// (qemu-img prints `data-file-raw` whenever the data-file bit is set, even without a name).
    pub data_file_raw: Option<bool>,
}

/// The host file underneath an image (`Child node '/file'`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FileRecord {
    /// Host file name.
    pub filename: String,
    /// File length in bytes.
    pub length: u64,
    /// Host bytes allocated, when known.
    pub actual_size: Option<u64>,
    /// QEMU's protocol driver for the file: `"file"`, or `"host_device"` for block and character devices.
    pub protocol: &'static str,
}

impl InfoRecord {
    /// The JSON object qemu-img prints for this image.
    pub fn to_json(&self) -> Json {
        let mut o = Json::object();
        let children = match &self.file {
            Some(file) => {
                let mut child = Json::object();
                child.push("name", Json::Str("file".into()));
                child.push("info", file.to_json());
                vec![child]
            }
            None => vec![],
        };
        o.push("children", Json::Array(children));
        o.push_opt(
            "backing-filename-format",
            self.backing_format.clone().map(Json::Str),
        );
        if !self.snapshots.is_empty() {
            o.push(
                "snapshots",
                Json::Array(self.snapshots.iter().map(snapshot_json).collect()),
            );
        }
        o.push("virtual-size", Json::UInt(self.virtual_size));
        o.push("filename", Json::Str(self.filename.clone()));
        o.push_opt("cluster-size", self.cluster_size.map(Json::UInt));
        o.push("format", Json::Str(self.format.clone()));
        o.push_opt("actual-size", self.actual_size.map(Json::UInt));
        if let Some(q) = &self.qcow2 {
            let mut fs = Json::object();
            fs.push("type", Json::Str("qcow2".into()));
            fs.push("data", q.to_json());
            o.push("format-specific", fs);
        }
        o.push_opt(
            "full-backing-filename",
            self.full_backing_filename.clone().map(Json::Str),
        );
        o.push_opt(
            "backing-filename",
            self.backing_filename.clone().map(Json::Str),
        );
        o.push("dirty-flag", Json::Bool(self.dirty));
        o
    }

    /// The human-readable report, as `qemu-img info` prints it (ends with a newline).
    pub fn to_human(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!("image: {}\n", self.filename));
        s.push_str(&format!("file format: {}\n", self.format));
        s.push_str(&format!(
            "virtual size: {} ({} bytes)\n",
            size_to_str(self.virtual_size),
            self.virtual_size
        ));
        s.push_str(&format!("disk size: {}\n", disk_size(self.actual_size)));
        if let Some(cs) = self.cluster_size {
            s.push_str(&format!("cluster_size: {cs}\n"));
        }
        if self.dirty {
            s.push_str("cleanly shut down: no\n");
        }
        if let Some(b) = &self.backing_filename {
            s.push_str(&format!("backing file: {b}"));
            match &self.full_backing_filename {
                None => s.push_str(" (cannot determine actual path)"),
                Some(full) if full != b => s.push_str(&format!(" (actual path: {full})")),
                Some(_) => {}
            }
            s.push('\n');
        }
        if let Some(f) = &self.backing_format {
            s.push_str(&format!("backing file format: {f}\n"));
        }
        if !self.snapshots.is_empty() {
            s.push_str("Snapshot list:\n");
            s.push_str(&snapshot_row(
                "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT",
            ));
            for sn in &self.snapshots {
                s.push_str(&snapshot_human_row(sn));
            }
        }
        if let Some(q) = &self.qcow2 {
            s.push_str("Format specific information:\n");
            for (key, value) in q.members() {
                let value = match value {
                    Json::Str(v) => v,
                    Json::Bool(b) => b.to_string(),
                    Json::UInt(u) => u.to_string(),
                    other => other.to_pretty(),
                };
                s.push_str(&format!("    {}: {}\n", key.replace('-', " "), value));
            }
        }
        if let Some(f) = &self.file {
            s.push_str("Child node '/file':\n");
            s.push_str(&format!("    filename: {}\n", f.filename));
            s.push_str(&format!("    protocol type: {}\n", f.protocol));
            s.push_str(&format!(
                "    file length: {} ({} bytes)\n",
                size_to_str(f.length),
                f.length
            ));
            s.push_str(&format!("    disk size: {}\n", disk_size(f.actual_size)));
        }
        s
    }
}

fn disk_size(actual: Option<u64>) -> String {
    match actual {
        Some(a) => size_to_str(a),
        None => "unavailable".to_string(),
    }
}

impl Qcow2Record {
    /// The members of `format-specific.data`, in qemu-img's order.
    pub fn members(&self) -> Vec<(&'static str, Json)> {
        let mut m = vec![
            ("compat", Json::Str(self.compat.clone())),
            ("compression-type", Json::Str(self.compression_type.clone())),
        ];
        let v3 = self.compat != "0.10";
        if v3 {
            m.push(("lazy-refcounts", Json::Bool(self.lazy_refcounts)));
        }
        m.push(("refcount-bits", Json::UInt(self.refcount_bits)));
        if v3 {
            if let Some(df) = &self.data_file {
                m.push(("data-file", Json::Str(df.clone())));
            }
            if let Some(raw) = self.data_file_raw {
                m.push(("data-file-raw", Json::Bool(raw)));
            }
            m.push(("corrupt", Json::Bool(self.corrupt)));
            m.push(("extended-l2", Json::Bool(self.extended_l2)));
        }
        m
    }

    fn to_json(&self) -> Json {
        Json::Object(
            self.members()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        )
    }
}

impl FileRecord {
    fn to_json(&self) -> Json {
        let mut o = Json::object();
        o.push("children", Json::Array(vec![]));
        o.push("virtual-size", Json::UInt(self.length));
        o.push("filename", Json::Str(self.filename.clone()));
        o.push("format", Json::Str(self.protocol.into()));
        o.push_opt("actual-size", self.actual_size.map(Json::UInt));
        let mut fs = Json::object();
        fs.push("type", Json::Str("file".into()));
        fs.push("data", Json::object());
        o.push("format-specific", fs);
        o.push("dirty-flag", Json::Bool(false));
        o
    }
}

/// One entry of the JSON `snapshots` array (qemu-img's member order).
fn snapshot_json(sn: &Snapshot) -> Json {
    let mut o = Json::object();
    o.push_opt("icount", sn.icount.map(Json::UInt));
    o.push(
        "vm-clock-nsec",
        Json::UInt(sn.vm_clock_nsec % 1_000_000_000),
    );
    o.push("name", Json::Str(sn.name.clone()));
    o.push("date-sec", Json::UInt(u64::from(sn.date_sec)));
    o.push("date-nsec", Json::UInt(u64::from(sn.date_nsec)));
    o.push("vm-clock-sec", Json::UInt(sn.vm_clock_nsec / 1_000_000_000));
    o.push("id", Json::Str(sn.id.clone()));
    o.push("vm-state-size", Json::UInt(sn.vm_state_size));
    o
}

/// One row of the human `Snapshot list:` table.
fn snapshot_human_row(sn: &Snapshot) -> String {
    let secs = sn.vm_clock_nsec / 1_000_000_000;
    let clock = format!(
        "{:04}:{:02}:{:02}.{:03}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60,
        (sn.vm_clock_nsec / 1_000_000) % 1000
    );
    let icount = sn.icount.map(|i| i.to_string()).unwrap_or_default();
    snapshot_row(
        &sn.id,
        &sn.name,
        &size_to_str(sn.vm_state_size),
        &crate::localtime::format_local(u64::from(sn.date_sec)),
        &clock,
        &icount,
    )
}

fn snapshot_row(id: &str, tag: &str, size: &str, date: &str, clock: &str, icount: &str) -> String {
    format!("{id:<7} {tag:<16} {size:>8}{date:>20}{clock:>16}{icount:>11}\n")
}

/// The JSON document for `info --output=json`: one object, or an array for `--backing-chain`.
pub fn render_json(records: &[InfoRecord], chain: bool) -> String {
    let doc = if chain {
        Json::Array(records.iter().map(InfoRecord::to_json).collect())
    } else {
        match records.first() {
            Some(r) => r.to_json(),
            None => Json::Array(vec![]),
        }
    };
    let mut s = doc.to_pretty();
    s.push('\n');
    s
}

/// The human report for `info`: images separated by an empty line.
pub fn render_human(records: &[InfoRecord]) -> String {
    records
        .iter()
        .map(InfoRecord::to_human)
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn top() -> InfoRecord {
        InfoRecord {
            filename: "top.qcow2".into(),
            format: "qcow2".into(),
            virtual_size: 67108864,
            actual_size: Some(397312),
            cluster_size: Some(65536),
            dirty: false,
            backing_filename: Some("mid.qcow2".into()),
            full_backing_filename: Some("mid.qcow2".into()),
            backing_format: Some("qcow2".into()),
            snapshots: vec![],
            qcow2: Some(Qcow2Record {
                compat: "1.1".into(),
                compression_type: "zlib".into(),
                lazy_refcounts: false,
                refcount_bits: 16,
                corrupt: false,
                extended_l2: false,
                data_file: None,
                data_file_raw: None,
            }),
            file: Some(FileRecord {
                protocol: "file",
                filename: "top.qcow2".into(),
                length: 458752,
                actual_size: Some(397312),
            }),
        }
    }

    // Captured from qemu-img 10.0.2.
    const TOP_JSON: &str = r#"{
    "children": [
        {
            "name": "file",
            "info": {
                "children": [
                ],
                "virtual-size": 458752,
                "filename": "top.qcow2",
                "format": "file",
                "actual-size": 397312,
                "format-specific": {
                    "type": "file",
                    "data": {
                    }
                },
                "dirty-flag": false
            }
        }
    ],
    "backing-filename-format": "qcow2",
    "virtual-size": 67108864,
    "filename": "top.qcow2",
    "cluster-size": 65536,
    "format": "qcow2",
    "actual-size": 397312,
    "format-specific": {
        "type": "qcow2",
        "data": {
            "compat": "1.1",
            "compression-type": "zlib",
            "lazy-refcounts": false,
            "refcount-bits": 16,
            "corrupt": false,
            "extended-l2": false
        }
    },
    "full-backing-filename": "mid.qcow2",
    "backing-filename": "mid.qcow2",
    "dirty-flag": false
}
"#;

    const TOP_HUMAN: &str = "image: top.qcow2
file format: qcow2
virtual size: 64 MiB (67108864 bytes)
disk size: 388 KiB
cluster_size: 65536
backing file: mid.qcow2
backing file format: qcow2
Format specific information:
    compat: 1.1
    compression type: zlib
    lazy refcounts: false
    refcount bits: 16
    corrupt: false
    extended l2: false
Child node '/file':
    filename: top.qcow2
    protocol type: file
    file length: 448 KiB (458752 bytes)
    disk size: 388 KiB
";

    #[test]
    fn json_matches_qemu_img() {
        assert_eq!(render_json(&[top()], false), TOP_JSON);
    }

    #[test]
    fn human_matches_qemu_img() {
        assert_eq!(render_human(&[top()]), TOP_HUMAN);
    }

    #[test]
    fn chain_is_an_array_and_human_separated_by_blank_line() {
        let recs = [top(), top()];
        let j = render_json(&recs, true);
        assert!(j.starts_with("[\n    {\n        \"children\": [\n"));
        assert!(j.ends_with("    }\n]\n"));
        let h = render_human(&recs);
        assert!(h.contains("disk size: 388 KiB\n\nimage: top.qcow2\n"));
    }

    #[test]
    fn v2_shows_three_members_and_raw_has_no_cluster_size() {
        let mut r = top();
        r.backing_filename = None;
        r.full_backing_filename = None;
        r.backing_format = None;
        if let Some(q) = r.qcow2.as_mut() {
            q.compat = "0.10".into();
        }
        let j = render_json(&[r], false);
        assert!(j.contains(
            "\"data\": {\n            \"compat\": \"0.10\",\n            \"compression-type\": \"zlib\",\n            \"refcount-bits\": 16\n        }"
        ));
        let raw = InfoRecord {
            filename: "base.raw".into(),
            format: "raw".into(),
            virtual_size: 1024,
            actual_size: Some(4096),
            file: Some(FileRecord {
                protocol: "file",
                filename: "base.raw".into(),
                length: 1024,
                actual_size: Some(4096),
            }),
            ..Default::default()
        };
        let h = raw.to_human();
        assert_eq!(
            h,
            "image: base.raw\nfile format: raw\nvirtual size: 1 KiB (1024 bytes)\ndisk size: 4 KiB\nChild node '/file':\n    filename: base.raw\n    protocol type: file\n    file length: 1 KiB (1024 bytes)\n    disk size: 4 KiB\n"
        );
        let j = raw.to_json().to_pretty();
        assert!(!j.contains("cluster-size"));
        assert!(!j.contains("\"format-specific\": {\n        \"type\": \"qcow2\""));
    }

    #[test]
    fn data_file_and_dirty_and_actual_path() {
        let mut r = top();
        r.dirty = true;
        r.full_backing_filename = Some("d/mid.qcow2".into());
        if let Some(q) = r.qcow2.as_mut() {
            q.data_file = Some("data.raw".into());
            q.data_file_raw = Some(true);
        }
        let h = r.to_human();
        assert!(h.contains("cluster_size: 65536\ncleanly shut down: no\nbacking file: mid.qcow2 (actual path: d/mid.qcow2)\n"));
        assert!(h.contains("    refcount bits: 16\n    data file: data.raw\n    data file raw: true\n    corrupt: false\n"));
        let j = r.to_json().to_pretty();
        assert!(j.contains("\"refcount-bits\": 16,\n            \"data-file\": \"data.raw\",\n            \"data-file-raw\": true,\n            \"corrupt\": false,"));
    }

    #[test]
    fn snapshot_table_layout() {
        let sn = Snapshot {
            l1_table_offset: 0,
            l1_size: 0,
            id: "1".into(),
            name: "s1".into(),
            date_sec: 0,
            date_nsec: 0,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            icount: Some(0),
            disk_size: None,
            extra_unknown: Vec::new(),
        };
        let header = snapshot_row("ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT");
        assert_eq!(
            header,
            "ID      TAG               VM_SIZE                DATE        VM_CLOCK     ICOUNT\n"
        );
        let row = snapshot_human_row(&sn);
        assert_eq!(row.len(), 81);
        assert!(row.starts_with("1       s1                    0 B "));
        assert!(row.ends_with("  0000:00:00.000          0\n"));
    }
}
