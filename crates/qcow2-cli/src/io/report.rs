//! qemu-io's output lines: the two-line report after each request, and the hex dump of `read -v`.
//!
//! The report is
//! ```text
//! wrote 4096/4096 bytes at offset 0
//! 4 KiB, 1 ops; 00.00 sec (806.299 KiB/sec and 201.5749 ops/sec)
//! ```
//! with qemu-io's number formatting (three decimals for KiB and larger units, six for bytes, a `.000`
//! fraction dropped) and its time format (`SS.ss sec` under a second, `H:MM:SS.ss` from one second on),
//! so that outputs can be compared with qemu-io's after masking the timing values.

use std::time::Duration;

/// A byte count or rate as qemu-io prints it: `4 KiB`, `1.500 KiB`, `512 bytes`, `1.157200 bytes`.
pub fn cvtstr(value: f64) -> String {
    const UNITS: [(&str, i32); 6] = [
        (" EiB", 60),
        (" PiB", 50),
        (" TiB", 40),
        (" GiB", 30),
        (" MiB", 20),
        (" KiB", 10),
    ];
    let (mut text, suffix) = match UNITS.iter().find(|(_, s)| value >= 2f64.powi(*s)) {
        Some((suffix, shift)) => (format!("{:.3}", value / 2f64.powi(*shift)), *suffix),
        None => (format!("{value:.6}"), " bytes"),
    };
    if let Some(i) = text.find(".000") {
        text.truncate(i);
    }
    text.push_str(suffix);
    text
}

/// An elapsed time as qemu-io prints it: `00.00 sec` below one second, else `H:MM:SS.ss`.
pub fn timestr(t: Duration) -> String {
    let secs = t.as_secs();
    let frac = f64::from(t.subsec_nanos()) / 1e9;
    if secs == 0 {
        format!("{frac:05.2} sec")
    } else {
        let s = (secs % 60) as f64 + frac;
        format!("{}:{:02}:{s:05.2}", secs / 3600, (secs / 60) % 60)
    }
}

/// The two report lines (each ending in a newline) of a request of `len` bytes at `offset` that took
/// `t`; `op` is `read`, `wrote` or `discard`.
pub fn report(op: &str, t: Duration, offset: u64, len: u64) -> String {
    let secs = t.as_secs_f64();
    // qemu-io divides by the time as is; a zero time prints "inf" there, which a real request never has.
    let per_sec = |v: f64| if secs > 0.0 { v / secs } else { 0.0 };
    format!(
        "{op} {len}/{len} bytes at offset {offset}\n{}, 1 ops; {} ({}/sec and {:.4} ops/sec)\n",
        cvtstr(len as f64),
        timestr(t),
        cvtstr(per_sec(len as f64)),
        per_sec(1.0)
    )
}

/// `read -v`'s hex dump: 16 bytes a line, `%08x:  ` guest offset, hex bytes, then the bytes as text
/// (alphanumerics as is, anything else as `.`).
pub fn dump(buf: &[u8], offset: u64) -> String {
    let mut s = String::with_capacity(buf.len() * 4 + 16);
    for (i, line) in buf.chunks(16).enumerate() {
        s.push_str(&format!("{:08x}:  ", offset + 16 * i as u64));
        for b in line {
            s.push_str(&format!("{b:02x} "));
        }
        s.push(' ');
        for &b in line {
            s.push(if b.is_ascii_alphanumeric() {
                b as char
            } else {
                '.'
            });
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_as_qemu_io_prints_them() {
        assert_eq!(cvtstr(4096.0), "4 KiB");
        assert_eq!(cvtstr(1536.0), "1.500 KiB");
        assert_eq!(cvtstr(512.0), "512 bytes");
        assert_eq!(cvtstr(0.0), "0 bytes");
        assert_eq!(cvtstr(1.1572), "1.157200 bytes");
        assert_eq!(cvtstr(65536.0 * 1024.0), "64 MiB");
        assert_eq!(timestr(Duration::from_millis(10)), "00.01 sec");
        assert_eq!(timestr(Duration::from_millis(3_723_450)), "1:02:03.45");
        let r = report("wrote", Duration::from_millis(500), 0, 4096);
        assert_eq!(
            r,
            "wrote 4096/4096 bytes at offset 0\n4 KiB, 1 ops; 00.50 sec (8 KiB/sec and 2.0000 ops/sec)\n"
        );
    }

    #[test]
    fn hex_dump() {
        let mut b = vec![1u8; 17];
        b[16] = b'a';
        assert_eq!(
            dump(&b, 0x20),
            "00000020:  01 01 01 01 01 01 01 01 01 01 01 01 01 01 01 01  ................\n\
             00000030:  61  a\n"
        );
    }
}
