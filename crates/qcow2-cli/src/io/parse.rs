//! Parsing one `qcow2 io` command line (`read -P 0xab 0 4k`) the way qemu-io 10 does.
//!
//! qemu-io splits a command at spaces, looks the first word up in its command table (names and one-letter
//! aliases), checks the argument count, then runs the command's `getopt` loop (GNU style: options may
//! follow the operands, may be grouped as `-zu`, and take their value attached or as the next word).
//! Every refusal prints qemu-io's message on the stream qemu-io uses, so that scripts and their expected
//! outputs written for qemu-io work unchanged; a refused command makes the exit status 1.

use crate::size::{parse_size, SizeError};

/// Largest request qemu accepts (`BDRV_REQUEST_MAX_BYTES`: `INT_MAX` rounded down to 512 bytes).
pub const MAX_REQUEST: u64 = 2_147_483_136;

/// The byte qemu-io fills write buffers with when no `-P` is given.
pub const DEFAULT_WRITE_PATTERN: u8 = 0xcd;

/// Which bytes of a read to check against a `-P` pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PatternCheck {
    /// The expected byte.
    pub byte: u8,
    /// First checked byte, relative to the start of the read (`-s`).
    pub offset: u64,
    /// Number of checked bytes (`-l`; the rest of the read by default).
    pub len: u64,
}

/// What a `write` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteData {
    /// `len` copies of this byte (`-P`, default 0xcd).
    Pattern(u8),
    /// Zeros without a data buffer (`-z`); `unmap` (`-u`) lets the host clusters go.
    Zeroes {
        /// `-u`.
        unmap: bool,
    },
}

/// One parsed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoCommand {
    /// `read [-qv] [-P pattern [-s off] [-l len]] off len`
    Read {
        /// Guest offset.
        offset: u64,
        /// Bytes.
        len: u64,
        /// `-P`: verify the data.
        check: Option<PatternCheck>,
        /// `-v`: hex dump.
        verbose: bool,
        /// `-q`: no report line.
        quiet: bool,
    },
    /// `write [-qzu] [-c] [-P pattern] off len`
    Write {
        /// Guest offset.
        offset: u64,
        /// Bytes.
        len: u64,
        /// Pattern or zeros.
        data: WriteData,
        /// `-c`: a compressed write (refused when run: the engine writes no compressed clusters).
        compressed: bool,
        /// `-q`.
        quiet: bool,
    },
    /// `aio_write [-qzu] [-P pattern] off len [len...]`: issued, not awaited.
    AioWrite {
        /// Guest offset.
        offset: u64,
        /// Bytes (the sum of the lengths given, as qemu-io's I/O vector).
        len: u64,
        /// Pattern or zeros.
        data: WriteData,
        /// `-q`.
        quiet: bool,
    },
    /// `aio_flush`: waits for every issued aio request (no flush to disk, as in qemu-io).
    AioFlush,
    /// `flush`: makes completed writes durable.
    Flush,
    /// `discard [-q] off len`
    Discard {
        /// Guest offset.
        offset: u64,
        /// Bytes.
        len: u64,
        /// `-q`.
        quiet: bool,
    },
    /// `quit`: stop reading commands.
    Quit,
}

impl IoCommand {
    /// Whether the command needs write permission (qemu-io refuses it on a read-only image before
    /// even parsing its options).
    pub fn needs_write(name: &str) -> bool {
        matches!(
            canonical(name),
            Some("write") | Some("aio_write") | Some("discard")
        )
    }
}

/// Why a command line was refused: the text qemu-io prints, on its stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Refusal {
    /// Lines for standard output (each ending in a newline).
    pub stdout: String,
    /// Lines for standard error (each ending in a newline).
    pub stderr: String,
}

impl Refusal {
    fn out(text: impl Into<String>) -> Refusal {
        Refusal {
            stdout: format!("{}\n", text.into()),
            stderr: String::new(),
        }
    }

    fn err(text: impl Into<String>) -> Refusal {
        Refusal {
            stdout: String::new(),
            stderr: format!("{}\n", text.into()),
        }
    }
}

/// A command's table entry: its name, argument bounds (max `None`: unbounded) and usage text.
struct Spec {
    name: &'static str,
    min: usize,
    max: Option<usize>,
    usage: &'static str,
}

const SPECS: &[Spec] = &[
    Spec {
        name: "read",
        min: 2,
        max: None,
        usage: "[-qv] [-P pattern [-s off] [-l len]] off len -- reads a number of bytes at a specified offset",
    },
    Spec {
        name: "write",
        min: 2,
        max: None,
        usage: "[-cquz] [-P pattern] off len -- writes a number of bytes at a specified offset",
    },
    Spec {
        name: "aio_write",
        min: 2,
        max: None,
        usage: "[-quz] [-P pattern] off len [len..] -- asynchronously writes a number of bytes",
    },
    Spec {
        name: "aio_flush",
        min: 0,
        max: Some(0),
        usage: " -- completes all outstanding aio requests",
    },
    Spec {
        name: "flush",
        min: 0,
        max: Some(0),
        usage: " -- flush all in-core file state to disk",
    },
    Spec {
        name: "discard",
        min: 2,
        max: None,
        usage: "[-q] off len -- discards a number of bytes at a specified offset",
    },
    Spec {
        name: "quit",
        min: 0,
        max: Some(0),
        usage: " -- exit the program",
    },
];

/// The command a name or alias stands for (qemu-io's aliases: `r`, `w`, `f`, `d`, `q`).
fn canonical(name: &str) -> Option<&'static str> {
    Some(match name {
        "read" | "r" => "read",
        "write" | "w" => "write",
        "aio_write" => "aio_write",
        "aio_flush" => "aio_flush",
        "flush" | "f" => "flush",
        "discard" | "d" => "discard",
        "quit" | "q" => "quit",
        _ => return None,
    })
}

fn spec(name: &str) -> Option<&'static Spec> {
    SPECS.iter().find(|s| s.name == name)
}

/// qemu-io's usage line of a command (printed on stdout when its options or operands are wrong).
fn usage(spec: &Spec) -> Refusal {
    if spec.usage.starts_with(' ') {
        Refusal::out(format!("{}{}", spec.name, spec.usage))
    } else {
        Refusal::out(format!("{} {}", spec.name, spec.usage))
    }
}

/// Splits a command line into words at spaces (and tabs), as qemu-io's `breakline` (no quoting).
pub fn words(line: &str) -> Vec<&str> {
    line.trim_end_matches(['\n', '\r'])
        .split([' ', '\t'])
        .filter(|w| !w.is_empty())
        .collect()
}

/// The options found by [`getopt`] (in order) and the operands.
type Parsed<'a> = (Vec<(char, Option<&'a str>)>, Vec<&'a str>);

/// GNU `getopt` over `args` (the words after the command name) with the option string `optstring`
/// (`"P:qv"`: a colon marks an option with a value). Options and operands may be mixed; `--` ends
/// the options. Errors carry getopt's message on stderr plus the command's usage on stdout.
fn getopt<'a>(
    cmd: &str,
    spec: &Spec,
    args: &[&'a str],
    optstring: &str,
) -> Result<Parsed<'a>, Refusal> {
    let takes_value = |c: char| -> Option<bool> {
        let i = optstring.find(c)?;
        Some(optstring[i + c.len_utf8()..].starts_with(':'))
    };
    let mut opts = Vec::new();
    let mut operands = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = args[i];
        i += 1;
        if a == "--" {
            operands.extend_from_slice(&args[i..]);
            break;
        }
        let Some(flags) = a.strip_prefix('-').filter(|f| !f.is_empty()) else {
            operands.push(a);
            continue;
        };
        for (pos, c) in flags.char_indices() {
            match takes_value(c) {
                None => {
                    let mut r = usage(spec);
                    r.stderr = format!("{cmd}: invalid option -- '{c}'\n");
                    return Err(r);
                }
                Some(false) => opts.push((c, None)),
                Some(true) => {
                    let rest = &flags[pos + c.len_utf8()..];
                    if !rest.is_empty() {
                        opts.push((c, Some(rest)));
                    } else if i < args.len() {
                        opts.push((c, Some(args[i])));
                        i += 1;
                    } else {
                        let mut r = usage(spec);
                        r.stderr = format!("{cmd}: option requires an argument -- '{c}'\n");
                        return Err(r);
                    }
                    break;
                }
            }
        }
    }
    Ok((opts, operands))
}

/// qemu-io's `cvtnum`: a byte count with an optional k/M/G/T/P/E suffix (`1.5k` allowed), or hex
/// (`0x200`). The error is qemu-io's message.
pub fn cvtnum(arg: &str) -> Result<u64, Refusal> {
    let parsed = match arg.strip_prefix("0x").or_else(|| arg.strip_prefix("0X")) {
        Some(hex) => parse_hex_size(hex, arg),
        None => parse_size(arg),
    };
    parsed.map_err(|e| match e {
        SizeError::TooLarge(_) => {
            Refusal::out(format!("Parsing error: argument too large -- {arg}"))
        }
        SizeError::Invalid(_) => Refusal::out(format!(
            "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {arg}"
        )),
    })
}

/// A hexadecimal number with an optional unit suffix (no fraction, as qemu's `qemu_strtosz`).
fn parse_hex_size(hex: &str, arg: &str) -> Result<u64, SizeError> {
    let end = hex
        .find(|c: char| !c.is_ascii_hexdigit())
        .unwrap_or(hex.len());
    let (digits, suffix) = hex.split_at(end);
    if digits.is_empty() {
        return Err(SizeError::Invalid(arg.to_string()));
    }
    let value =
        u64::from_str_radix(digits, 16).map_err(|_| SizeError::TooLarge(arg.to_string()))?;
    let shift = match suffix {
        "" | "b" | "B" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => return Err(SizeError::Invalid(arg.to_string())),
    };
    let scaled = u128::from(value) << shift;
    if scaled > i64::MAX as u128 {
        return Err(SizeError::TooLarge(arg.to_string()));
    }
    Ok(scaled as u64)
}

/// qemu-io's `parse_pattern`: a C integer (decimal, `0x` hex or `0` octal, optional sign) in 0..=255.
pub fn parse_pattern(arg: &str) -> Result<u8, Refusal> {
    let bad = || Refusal::out(format!("{arg} is not a valid pattern byte"));
    let (negative, body) = match arg.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, arg.strip_prefix('+').unwrap_or(arg)),
    };
    let value = if let Some(h) = body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else if body.len() > 1 && body.starts_with('0') {
        u64::from_str_radix(&body[1..], 8).ok()
    } else if !body.is_empty() && body.bytes().all(|b| b.is_ascii_digit()) {
        body.parse::<u64>().ok()
    } else {
        None
    }
    .ok_or_else(bad)?;
    // Hex and octal bodies must be all digits too (from_str_radix refuses signs inside).
    if body.contains(['+', '-']) {
        return Err(bad());
    }
    match (negative, u8::try_from(value)) {
        (false, Ok(b)) => Ok(b),
        (true, _) if value == 0 => Ok(0),
        _ => Err(bad()),
    }
}

/// `cvtnum` for a request length, with qemu-io's limit message (`suffix` is `" without -n"` for
/// `write`).
fn length(arg: &str, suffix: &str) -> Result<u64, Refusal> {
    let n = cvtnum(arg)?;
    if n > MAX_REQUEST {
        return Err(Refusal::out(format!(
            "length cannot exceed {MAX_REQUEST}{suffix}, given {arg}"
        )));
    }
    Ok(n)
}

/// Parses one command line. `Ok(None)`: an empty line (nothing to do).
pub fn parse(line: &str) -> Result<Option<IoCommand>, Refusal> {
    let w = words(line);
    let Some((&cmd, args)) = w.split_first() else {
        return Ok(None);
    };
    let Some(spec) = canonical(cmd).and_then(spec) else {
        return Err(Refusal::err(format!("command \"{cmd}\" not found")));
    };
    check_count(cmd, spec, args.len())?;
    match spec.name {
        "read" => parse_read(cmd, spec, args).map(Some),
        "write" => parse_write(cmd, spec, args).map(Some),
        "aio_write" => parse_aio_write(cmd, spec, args).map(Some),
        "discard" => {
            let (opts, ops) = getopt(cmd, spec, args, "q")?;
            let [off, len] = ops[..] else {
                return Err(usage(spec));
            };
            let offset = cvtnum(off)?;
            let len = length(len, "")?;
            Ok(Some(IoCommand::Discard {
                offset,
                len,
                quiet: !opts.is_empty(),
            }))
        }
        "aio_flush" => Ok(Some(IoCommand::AioFlush)),
        "flush" => Ok(Some(IoCommand::Flush)),
        _ => Ok(Some(IoCommand::Quit)),
    }
}

/// qemu-io's argument count check (before the options are parsed: `-q` counts as an argument).
fn check_count(cmd: &str, spec: &Spec, n: usize) -> Result<(), Refusal> {
    let ok = n >= spec.min && spec.max.is_none_or(|m| n <= m);
    if ok {
        return Ok(());
    }
    let expected = match spec.max {
        None => format!("at least {} arguments", spec.min),
        Some(m) if m == spec.min => format!("{m} arguments"),
        Some(m) => format!("between {} and {m} arguments", spec.min),
    };
    Err(Refusal::err(format!(
        "bad argument count {n} to {cmd}, expected {expected}"
    )))
}

fn parse_read(cmd: &str, spec: &Spec, args: &[&str]) -> Result<IoCommand, Refusal> {
    let (opts, ops) = getopt(cmd, spec, args, "P:qvs:l:")?;
    let (mut pattern, mut quiet, mut verbose) = (None, false, false);
    let (mut p_off, mut p_len) = (None, None);
    for (c, v) in opts {
        let v = v.unwrap_or_default();
        match c {
            'P' => pattern = Some(parse_pattern(v)?),
            'q' => quiet = true,
            'v' => verbose = true,
            's' => p_off = Some(cvtnum(v)?),
            _ => p_len = Some(cvtnum(v)?),
        }
    }
    let [off, len] = ops[..] else {
        return Err(usage(spec));
    };
    let offset = cvtnum(off)?;
    let len = length(len, "")?;
    if pattern.is_none() && (p_off.is_some() || p_len.is_some()) {
        return Err(usage(spec));
    }
    let check = match pattern {
        None => None,
        Some(byte) => {
            let off = p_off.unwrap_or(0);
            let n = match p_len {
                Some(n) => Some(n),
                None => len.checked_sub(off),
            };
            match n {
                Some(n) if off.checked_add(n).is_some_and(|end| end <= len) => Some(PatternCheck {
                    byte,
                    offset: off,
                    len: n,
                }),
                _ => {
                    return Err(Refusal::out(
                        "pattern verification range exceeds end of read data",
                    ))
                }
            }
        }
    };
    Ok(IoCommand::Read {
        offset,
        len,
        check,
        verbose,
        quiet,
    })
}

/// The options `write` and `aio_write` share.
struct WriteOpts {
    pattern: Option<u8>,
    zero: bool,
    unmap: bool,
    compressed: bool,
    quiet: bool,
}

fn write_opts(opts: Vec<(char, Option<&str>)>) -> Result<WriteOpts, Refusal> {
    let mut w = WriteOpts {
        pattern: None,
        zero: false,
        unmap: false,
        compressed: false,
        quiet: false,
    };
    for (c, v) in opts {
        match c {
            'P' => w.pattern = Some(parse_pattern(v.unwrap_or_default())?),
            'z' => w.zero = true,
            'u' => w.unmap = true,
            'c' => w.compressed = true,
            _ => w.quiet = true,
        }
    }
    if w.zero && w.pattern.is_some() {
        return Err(Refusal::out(
            "Only one of -z, -P, and -s can be specified at the same time",
        ));
    }
    if w.unmap && !w.zero {
        return Err(Refusal::out("-u requires -z to be specified"));
    }
    Ok(w)
}

impl WriteOpts {
    fn data(&self) -> WriteData {
        if self.zero {
            WriteData::Zeroes { unmap: self.unmap }
        } else {
            WriteData::Pattern(self.pattern.unwrap_or(DEFAULT_WRITE_PATTERN))
        }
    }
}

fn parse_write(cmd: &str, spec: &Spec, args: &[&str]) -> Result<IoCommand, Refusal> {
    let (opts, ops) = getopt(cmd, spec, args, "cP:quz")?;
    let [off, len] = ops[..] else {
        return Err(usage(spec));
    };
    let w = write_opts(opts)?;
    let offset = cvtnum(off)?;
    let len = length(len, " without -n")?;
    Ok(IoCommand::Write {
        offset,
        len,
        data: w.data(),
        compressed: w.compressed,
        quiet: w.quiet,
    })
}

fn parse_aio_write(cmd: &str, spec: &Spec, args: &[&str]) -> Result<IoCommand, Refusal> {
    let (opts, ops) = getopt(cmd, spec, args, "P:quz")?;
    let Some((off, lens)) = ops.split_first().filter(|(_, l)| !l.is_empty()) else {
        return Err(usage(spec));
    };
    let w = write_opts(opts)?;
    if w.zero && lens.len() != 1 {
        return Err(usage(spec));
    }
    let offset = cvtnum(off)?;
    let mut total: u64 = 0;
    for l in lens {
        let n = cvtnum(l)?;
        if n > MAX_REQUEST {
            return Err(Refusal::out(format!(
                "Argument '{l}' exceeds maximum size {MAX_REQUEST}"
            )));
        }
        total = total.saturating_add(n);
        if total > MAX_REQUEST {
            return Err(Refusal::out(format!(
                "The total number of bytes exceed the maximum size {MAX_REQUEST}"
            )));
        }
    }
    Ok(IoCommand::AioWrite {
        offset,
        len: total,
        data: w.data(),
        quiet: w.quiet,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_and_options() {
        assert_eq!(
            parse("read -P 0xab -v 1k 4k"),
            Ok(Some(IoCommand::Read {
                offset: 1024,
                len: 4096,
                check: Some(PatternCheck {
                    byte: 0xab,
                    offset: 0,
                    len: 4096
                }),
                verbose: true,
                quiet: false,
            }))
        );
        // Options after the operands and grouped options, as GNU getopt allows.
        assert_eq!(
            parse("write 0 64k -zu"),
            Ok(Some(IoCommand::Write {
                offset: 0,
                len: 65536,
                data: WriteData::Zeroes { unmap: true },
                compressed: false,
                quiet: false,
            }))
        );
        assert_eq!(
            parse("w -P7 0x200 512"),
            Ok(Some(IoCommand::Write {
                offset: 512,
                len: 512,
                data: WriteData::Pattern(7),
                compressed: false,
                quiet: false,
            }))
        );
        assert_eq!(
            parse("aio_write -q 0 512 512"),
            Ok(Some(IoCommand::AioWrite {
                offset: 0,
                len: 1024,
                data: WriteData::Pattern(0xcd),
                quiet: true,
            }))
        );
        assert_eq!(parse("   "), Ok(None));
        assert_eq!(parse("q"), Ok(Some(IoCommand::Quit)));
        assert_eq!(parse("aio_flush"), Ok(Some(IoCommand::AioFlush)));
    }

    #[test]
    fn qemu_io_messages() {
        let out = |l: &str| parse(l).err().map(|r| r.stdout).unwrap_or_default();
        let err = |l: &str| parse(l).err().map(|r| r.stderr).unwrap_or_default();
        assert_eq!(err("foo"), "command \"foo\" not found\n");
        assert_eq!(
            err("read 0"),
            "bad argument count 1 to read, expected at least 2 arguments\n"
        );
        assert_eq!(
            err("flush x"),
            "bad argument count 1 to flush, expected 0 arguments\n"
        );
        assert_eq!(
            out("read 0 x"),
            "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- x\n"
        );
        assert_eq!(
            out("read 0 1.5"),
            "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- 1.5\n"
        );
        assert_eq!(
            out("read 1024 18446744073709551615"),
            "Parsing error: argument too large -- 18446744073709551615\n"
        );
        assert_eq!(
            out("read 0 3G"),
            "length cannot exceed 2147483136, given 3G\n"
        );
        assert_eq!(
            out("write 0 3G"),
            "length cannot exceed 2147483136 without -n, given 3G\n"
        );
        assert_eq!(
            out("aio_write 0 3G"),
            "Argument '3G' exceeds maximum size 2147483136\n"
        );
        assert_eq!(out("write -P 300 0 1"), "300 is not a valid pattern byte\n");
        assert_eq!(out("write -P 0x 0 1"), "0x is not a valid pattern byte\n");
        assert_eq!(out("write -u 0 1"), "-u requires -z to be specified\n");
        assert_eq!(
            out("write -z -P 1 0 1"),
            "Only one of -z, -P, and -s can be specified at the same time\n"
        );
        assert_eq!(err("write -x 0 1"), "write: invalid option -- 'x'\n");
        assert!(out("write -x 0 1").starts_with("write ["));
        assert!(out("read 10 10 10").starts_with("read ["));
        assert_eq!(parse_pattern("07").ok(), Some(7));
        assert_eq!(parse_pattern("08").ok(), None);
        assert_eq!(parse_pattern("255").ok(), Some(255));
        assert_eq!(parse_pattern("-1").ok(), None);
    }
}
