//! The `-o key=value,...` options of `qcow2 create` and `qcow2 convert -O qcow2`, as qemu-img reads
//! them: splitting (`,,` is a literal comma, a key alone means `on`), the per-format keys and their
//! value types, the `Formatting` line, and the engine's [`CreateOptions`] built from them. Pure
//! functions, no I/O: the fuzz target `opts` (`fuzz/`) runs them on arbitrary strings.

use qcow2_engine::{CompressionType, CreateOptions, ImageFormat, Preallocation, Version};

use crate::size::parse_size;

/// qemu-img's message for a malformed size-type option value.
const SIZE_HINT: &str = "expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.";

/// `qemu-img create -f qcow2 -o help`.
const QCOW2_HELP: &str = "Supported qcow2 options:
  backing_file=<str>     - File name of a base image
  backing_fmt=<str>      - Image format of the base image
  cluster_size=<size>    - qcow2 cluster size
  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])
  compression_type=<str> - Compression method used for image cluster compression
  data_file=<str>        - File name of an external data file
  data_file_raw=<bool (on/off)> - The external data file must stay valid as a raw image
  extended_l2=<bool (on/off)> - Extended L2 tables
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  preallocation=<str>    - Preallocation mode (allowed values: off, metadata, falloc, full)
  refcount_bits=<num>    - Width of a reference count entry in bits
  size=<size>            - Virtual disk size
";

/// `qemu-img create -f raw -o help` (preallocation belongs to the protocol level there, so it is
/// not listed, though accepted).
const RAW_HELP: &str = "Supported raw options:
  size=<size>            - Virtual disk size
";

/// The `-o` keys of a format, in the order qemu-img prints them on the `Formatting` line.
fn keys(format: ImageFormat) -> &'static [&'static str] {
    match format {
        ImageFormat::Qcow2 => &[
            "cluster_size",
            "extended_l2",
            "preallocation",
            "compression_type",
            "size",
            "compat",
            "backing_file",
            "backing_fmt",
            "data_file",
            "data_file_raw",
            "lazy_refcounts",
            "refcount_bits",
        ],
        ImageFormat::Raw => &["size", "preallocation"],
    }
}

/// Defaults qemu-img prints even when not given.
fn default_value(format: ImageFormat, key: &str) -> Option<&'static str> {
    match (format, key) {
        (ImageFormat::Qcow2, "cluster_size") => Some("65536"),
        (ImageFormat::Qcow2, "extended_l2") => Some("off"),
        (ImageFormat::Qcow2, "compression_type") => Some("zlib"),
        (ImageFormat::Qcow2, "lazy_refcounts") => Some("off"),
        (ImageFormat::Qcow2, "refcount_bits") => Some("16"),
        _ => None,
    }
}

/// The `-o` options as given: key, value (last one wins), in the order first given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OptionList {
    items: Vec<(String, String)>,
}

impl OptionList {
    /// The value of `key`, if given.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.items
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Sets `key` to `value` (replacing an earlier value, keeping the first position).
    pub fn set(&mut self, key: &str, value: String) {
        match self.items.iter_mut().find(|(k, _)| k == key) {
            Some(item) => item.1 = value,
            None => self.items.push((key.to_string(), value)),
        }
    }
}

/// Whether `-o` asks for the option list (`help` or `?`).
pub fn wants_help(options: &[String]) -> bool {
    options
        .iter()
        .flat_map(|o| o.split(','))
        .any(|k| k == "help" || k == "?")
}

/// The help text of `-o help` for `format`.
pub fn help_text(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Qcow2 => QCOW2_HELP,
        ImageFormat::Raw => RAW_HELP,
    }
}

/// Splits `a=b,c=d` as QEMU's option parser does: `,,` is a literal comma, a key without `=` means
/// `on`.
pub fn split_options(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = text.chars().peekable();
    let mut parts = Vec::new();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                parts.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    for p in parts {
        if p.is_empty() {
            continue;
        }
        match p.split_once('=') {
            Some((k, v)) => out.push((k.to_string(), v.to_string())),
            None => out.push((p, "on".to_string())),
        }
    }
    out
}

/// Parses a boolean option value as QEMU does.
pub fn parse_bool(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(format!("Parameter '{key}' expects 'on' or 'off'")),
    }
}

/// Parses the `-o` strings of `format` into an [`OptionList`], refusing unknown keys and values of the
/// wrong type as qemu-img does before it prints anything. Errors are the message without the file name.
pub fn parse_options(format: ImageFormat, options: &[String]) -> Result<OptionList, String> {
    let mut list = OptionList::default();
    for text in options {
        for (k, v) in split_options(text) {
            if !keys(format).contains(&k.as_str()) {
                if k == "encryption" || k.starts_with("encrypt.") {
                    return Err("encrypted images are not supported".into());
                }
                return Err(format!("Invalid parameter '{k}'"));
            }
            let value = match k.as_str() {
                "size" | "cluster_size" => parse_size(&v)
                    .map_err(|_| format!("Parameter '{k}' {SIZE_HINT}"))?
                    .to_string(),
                "refcount_bits" => {
                    v.parse::<u64>()
                        .map_err(|_| format!("Parameter '{k}' expects a number"))?;
                    v
                }
                "extended_l2" | "lazy_refcounts" | "data_file_raw" => {
                    parse_bool(&k, &v)?;
                    v
                }
                _ => v,
            };
            list.set(&k, value);
        }
    }
    Ok(list)
}

/// Builds the engine's options from a parsed list. Values that qemu-img refuses only in the driver
/// (after the `Formatting` line) are refused here too, so call this after printing it.
pub fn to_create_options(format: ImageFormat, list: &OptionList) -> Result<CreateOptions, String> {
    let mut o = match format {
        ImageFormat::Qcow2 => CreateOptions::qcow2(0),
        ImageFormat::Raw => CreateOptions::raw(0),
    };
    o.size = list.get("size").and_then(|s| s.parse().ok());
    if let Some(v) = list.get("preallocation") {
        o.preallocation = match Preallocation::from_name(v) {
            Some(p) => p,
            None if format == ImageFormat::Raw => {
                return Err(format!("invalid parameter value: {v}"));
            }
            None => {
                return Err(format!(
                    "Parameter 'preallocation' does not accept value '{v}'"
                ))
            }
        };
    }
    if format == ImageFormat::Raw {
        return Ok(o);
    }
    if let Some(v) = list.get("cluster_size") {
        o.cluster_size = v.parse().unwrap_or(0);
    }
    if let Some(v) = list.get("refcount_bits") {
        o.refcount_bits = v.parse().unwrap_or(0);
    }
    let flag = |k: &str| list.get(k).map(|v| parse_bool(k, v)).transpose();
    o.extended_l2 = flag("extended_l2")?.unwrap_or(false);
    o.lazy_refcounts = flag("lazy_refcounts")?.unwrap_or(false);
    o.data_file_raw = flag("data_file_raw")?.unwrap_or(false);
    if let Some(v) = list.get("compat") {
        o.compat = match v {
            "0.10" | "v2" => Version::V2,
            "1.1" | "v3" => Version::V3,
            _ => return Err(format!("Parameter 'version' does not accept value '{v}'")),
        };
    }
    if let Some(v) = list.get("compression_type") {
        o.compression_type = match v {
            "zlib" => CompressionType::Zlib,
            "zstd" => CompressionType::Zstd,
            _ => {
                return Err(format!(
                    "Parameter 'compression-type' does not accept value '{v}'"
                ))
            }
        };
    }
    o.backing_file = list.get("backing_file").map(str::to_string);
    if let Some(v) = list.get("backing_fmt") {
        o.backing_fmt = Some(
            ImageFormat::from_name(v)
                .ok_or_else(|| format!("Unknown driver '{v}'\nCould not open backing image."))?,
        );
    }
    o.data_file = list.get("data_file").map(str::to_string);
    Ok(o)
}

/// The `Formatting '...', fmt=... ` line qemu-img prints (without the newline).
pub fn formatting_line(img: &str, format: ImageFormat, list: &OptionList) -> String {
    let mut line = format!("Formatting '{img}', fmt={}", format.name());
    for key in keys(format) {
        let value = list.get(key).or_else(|| default_value(format, key));
        if let Some(v) = value {
            line.push_str(&format!(" {key}={v}"));
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn formatting_line_matches_qemu() {
        let mut l = parse_options(
            ImageFormat::Qcow2,
            &s(&["cluster_size=4k,preallocation=off,lazy_refcounts=true,compat=v3,refcount_bits=64,compression_type=zlib,extended_l2=on,data_file=x.raw,data_file_raw=off"]),
        )
        .unwrap();
        l.set("size", "1572864".into());
        assert_eq!(
            formatting_line("x.qcow2", ImageFormat::Qcow2, &l),
            "Formatting 'x.qcow2', fmt=qcow2 cluster_size=4096 extended_l2=on preallocation=off \
             compression_type=zlib size=1572864 compat=v3 data_file=x.raw data_file_raw=off \
             lazy_refcounts=true refcount_bits=64"
        );
    }

    #[test]
    fn option_syntax() {
        assert_eq!(
            parse_options(ImageFormat::Qcow2, &s(&["foo=bar"])),
            Err("Invalid parameter 'foo'".into())
        );
        assert_eq!(
            parse_options(ImageFormat::Qcow2, &s(&["lazy_refcounts=maybe"])),
            Err("Parameter 'lazy_refcounts' expects 'on' or 'off'".into())
        );
        let l = parse_options(
            ImageFormat::Qcow2,
            &s(&["compat=1.1,compat=0.10", "lazy_refcounts,data_file=a,,b"]),
        )
        .unwrap();
        assert_eq!(l.get("compat"), Some("0.10"));
        assert_eq!(l.get("lazy_refcounts"), Some("on"));
        assert_eq!(l.get("data_file"), Some("a,b"));
        assert!(parse_options(ImageFormat::Raw, &s(&["cluster_size=4k"])).is_err());
    }
}
