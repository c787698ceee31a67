//! `map` output: merging block-status extents and printing them exactly as `qemu-img map` does.
//!
//! qemu-img asks for the block status of the rest of the image (at most 1 GiB at a time), and merges each
//! answer into the current entry when depth, present, zero, data and compressed agree, both or neither
//! have a host offset, the host file is the same, and the host offsets are contiguous. The JSON format
//! prints one object per line inside `[` ... `]`; the human format prints only entries that hold data
//! (data and not zero) and, to coalesce more, treats every entry after one it printed as "zero" unless
//! it is plain data.

use std::io::{self, Write};

/// How `map` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// `Offset Length Mapped to File` table.
    Human,
    /// One JSON object per extent.
    Json,
}

/// One extent, as `qemu-img map` describes it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MapEntry {
    /// Guest offset.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Layer of the backing chain that answers (0 = the image itself).
    pub depth: u32,
    /// Allocated in some layer of the chain.
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Holds data.
    pub data: bool,
    /// Stored compressed.
    pub compressed: bool,
    /// Host offset, when the data sits at a known place in a host file.
    pub offset: Option<u64>,
    /// The host file holding the data (only with an offset).
    pub filename: Option<String>,
}

/// Why a map could not be printed.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// The human format cannot describe this extent (no host offset for data).
    #[error("File contains external, encrypted or compressed clusters.")]
    Unmappable,
    /// Writing the output failed.
    #[error("error writing the map: {0}")]
    Output(#[from] io::Error),
}

fn mergeable(curr: &MapEntry, next: &MapEntry) -> bool {
    if curr.length == 0 {
        return false;
    }
    if curr.zero != next.zero
        || curr.data != next.data
        || curr.compressed != next.compressed
        || curr.depth != next.depth
        || curr.present != next.present
    {
        return false;
    }
    if curr.filename != next.filename {
        return false;
    }
    match (curr.offset, next.offset) {
        (None, None) => true,
        (Some(a), Some(b)) => a.checked_add(curr.length) == Some(b),
        _ => false,
    }
}

/// Streams extents in guest order, merging and printing them as qemu-img does.
pub struct Mapper<W: Write> {
    out: W,
    format: OutputFormat,
    curr: MapEntry,
}

impl<W: Write> Mapper<W> {
    /// Starts a map at guest offset `start`; prints the header (`[` or the table heading).
    pub fn new(mut out: W, format: OutputFormat, start: u64) -> Result<Self, MapError> {
        match format {
            OutputFormat::Human => writeln!(
                out,
                "{:<16}{:<16}{:<16}File",
                "Offset", "Length", "Mapped to"
            )?,
            OutputFormat::Json => write!(out, "[")?,
        }
        Ok(Mapper {
            out,
            format,
            curr: MapEntry {
                start,
                ..Default::default()
            },
        })
    }

    /// Where the next extent must start.
    pub fn next_offset(&self) -> u64 {
        self.curr.start.saturating_add(self.curr.length)
    }

    /// Adds the next extent (which must start at [`Mapper::next_offset`]).
    pub fn push(&mut self, mut next: MapEntry) -> Result<(), MapError> {
        if mergeable(&self.curr, &next) {
            self.curr.length = self.curr.length.saturating_add(next.length);
            return Ok(());
        }
        if self.curr.length > 0 {
            let curr = self.curr.clone();
            self.dump(&curr, Some(&mut next))?;
        }
        self.curr = next;
        Ok(())
    }

    /// Prints the last entry and the closing bracket; returns the writer.
    pub fn finish(mut self) -> Result<W, MapError> {
        let curr = self.curr.clone();
        self.dump(&curr, None)?;
        if self.format == OutputFormat::Json {
            writeln!(self.out, "]")?;
        }
        self.out.flush()?;
        Ok(self.out)
    }

    fn dump(&mut self, e: &MapEntry, next: Option<&mut MapEntry>) -> Result<(), MapError> {
        match self.format {
            OutputFormat::Human => {
                if e.data && e.offset.is_none() {
                    return Err(MapError::Unmappable);
                }
                if e.data && !e.zero {
                    writeln!(
                        self.out,
                        "{:<16}{:<16}{:<16}{}",
                        alt_hex(e.start),
                        alt_hex(e.length),
                        alt_hex(e.offset.unwrap_or(0)),
                        e.filename.as_deref().unwrap_or("")
                    )?;
                }
                if let Some(next) = next {
                    if !next.data || next.zero {
                        next.data = false;
                        next.zero = true;
                    }
                }
            }
            OutputFormat::Json => {
                write!(
                    self.out,
                    "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
                    e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
                )?;
                if let Some(off) = e.offset {
                    write!(self.out, ", \"offset\": {off}")?;
                }
                write!(self.out, "}}")?;
                if next.is_some() {
                    writeln!(self.out, ",")?;
                }
            }
        }
        Ok(())
    }
}

/// C's `%#x`: `0` for zero, else `0x` and lower-case hex.
fn alt_hex(v: u64) -> String {
    if v == 0 {
        "0".to_string()
    } else {
        format!("{v:#x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(clippy::too_many_arguments)]
    fn e(
        start: u64,
        length: u64,
        depth: u32,
        present: bool,
        zero: bool,
        data: bool,
        off: Option<u64>,
        f: &str,
    ) -> MapEntry {
        MapEntry {
            start,
            length,
            depth,
            present,
            zero,
            data,
            compressed: false,
            offset: off,
            filename: off.map(|_| f.to_string()),
        }
    }

    /// The extents our engine would report for the `top.qcow2` example (cluster by cluster), and
    /// qemu-img's output for it.
    fn top_extents() -> Vec<MapEntry> {
        vec![
            e(0, 65536, 0, true, false, true, Some(327680), "top.qcow2"),
            e(
                65536,
                65536,
                0,
                true,
                false,
                true,
                Some(393216),
                "top.qcow2",
            ),
            e(131072, 917504, 1, false, true, false, None, ""),
            e(1048576, 65536, 1, true, true, false, None, ""),
            e(1114112, 65536, 1, true, true, false, None, ""),
            e(1179648, 3014656, 1, false, true, false, None, ""),
            e(
                4194304,
                2097152,
                1,
                true,
                false,
                true,
                Some(393216),
                "mid.qcow2",
            ),
            e(
                6291456,
                1048576,
                1,
                true,
                false,
                true,
                Some(393216 + 2097152),
                "mid.qcow2",
            ),
            e(7340032, 59768832, 1, false, true, false, None, ""),
        ]
    }

    fn run(format: OutputFormat, extents: Vec<MapEntry>) -> Result<String, MapError> {
        let mut m = Mapper::new(Vec::new(), format, 0)?;
        for x in extents {
            assert_eq!(m.next_offset(), x.start);
            m.push(x)?;
        }
        Ok(String::from_utf8(m.finish()?).unwrap_or_default())
    }

    #[test]
    fn json_merges_like_qemu() {
        let out = run(OutputFormat::Json, top_extents()).ok();
        let expected = r#"[{ "start": 0, "length": 131072, "depth": 0, "present": true, "zero": false, "data": true, "compressed": false, "offset": 327680},
{ "start": 131072, "length": 917504, "depth": 1, "present": false, "zero": true, "data": false, "compressed": false},
{ "start": 1048576, "length": 131072, "depth": 1, "present": true, "zero": true, "data": false, "compressed": false},
{ "start": 1179648, "length": 3014656, "depth": 1, "present": false, "zero": true, "data": false, "compressed": false},
{ "start": 4194304, "length": 3145728, "depth": 1, "present": true, "zero": false, "data": true, "compressed": false, "offset": 393216},
{ "start": 7340032, "length": 59768832, "depth": 1, "present": false, "zero": true, "data": false, "compressed": false}]
"#;
        assert_eq!(out.as_deref(), Some(expected));
    }

    #[test]
    fn human_matches_qemu() {
        let out = run(OutputFormat::Human, top_extents()).ok();
        let expected = "Offset          Length          Mapped to       File
0               0x20000         0x50000         top.qcow2
0x400000        0x300000        0x60000         mid.qcow2
";
        assert_eq!(out.as_deref(), Some(expected));
    }

    #[test]
    fn non_contiguous_offsets_do_not_merge() {
        let out = run(
            OutputFormat::Json,
            vec![
                e(0, 512, 0, true, false, true, Some(0x10000), "a"),
                e(512, 512, 0, true, false, true, Some(0x30000), "a"),
            ],
        )
        .ok()
        .unwrap_or_default();
        assert_eq!(out.lines().count(), 2);
    }

    #[test]
    fn single_entry_and_empty_image() {
        let out = run(
            OutputFormat::Json,
            vec![e(0, 1024, 0, true, false, true, Some(0), "base.raw")],
        )
        .ok();
        assert_eq!(
            out.as_deref(),
            Some("[{ \"start\": 0, \"length\": 1024, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true, \"compressed\": false, \"offset\": 0}]\n")
        );
        // An empty image: qemu-img prints the zero-length initial entry.
        let out = run(OutputFormat::Json, vec![]).ok();
        assert_eq!(
            out.as_deref(),
            Some("[{ \"start\": 0, \"length\": 0, \"depth\": 0, \"present\": false, \"zero\": false, \"data\": false, \"compressed\": false}]\n")
        );
    }

    #[test]
    fn human_refuses_compressed_data() {
        let mut c = e(0, 65536, 0, true, false, true, None, "");
        c.compressed = true;
        assert!(matches!(
            run(OutputFormat::Human, vec![c]),
            Err(MapError::Unmappable)
        ));
    }

    #[test]
    fn human_coalesces_zero_like_entries() {
        // zero-with-offset followed by unallocated: qemu's flag rewrite makes them merge.
        let out = run(
            OutputFormat::Human,
            vec![
                e(0, 4096, 0, true, false, true, Some(0x50000), "x"),
                e(4096, 4096, 0, true, true, false, None, ""),
                e(8192, 4096, 0, true, true, false, None, ""),
                e(12288, 4096, 0, true, false, true, Some(0x60000), "x"),
            ],
        )
        .ok();
        assert_eq!(
            out.as_deref(),
            Some("Offset          Length          Mapped to       File\n0               0x1000          0x50000         x\n0x3000          0x1000          0x60000         x\n")
        );
    }
}
