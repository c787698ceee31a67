//! A small ordered JSON value and the exact pretty-printer of QEMU's `qobject_to_json_pretty()`.
//!
//! qemu-img prints `info --output=json` through QEMU's own JSON writer, whose layout differs from
//! serde_json's pretty printer: four-space indentation, empty containers printed as `{` / `[` and the
//! closing bracket on its own line, and every character outside printable ASCII escaped as `\uXXXX`
//! (upper-case hex, surrogate pairs above U+FFFF). Object members keep the order they were added in, so
//! the caller decides the key order (qemu-img's order comes from its hash table and is reproduced by the
//! callers).

use std::fmt::Write as _;

/// A JSON value with ordered object members.
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    /// `true` / `false`.
    Bool(bool),
    /// An unsigned integer (printed in full, as QEMU prints its `uint64` fields).
    UInt(u64),
    /// A string (escaped on output).
    Str(String),
    /// An array.
    Array(Vec<Json>),
    /// An object, members in insertion order.
    Object(Vec<(String, Json)>),
}

impl Json {
    /// An empty object, to be filled with [`Json::push`].
    pub fn object() -> Json {
        Json::Object(Vec::new())
    }

    /// Appends a member to an object; does nothing on other values.
    pub fn push(&mut self, key: &str, value: Json) {
        if let Json::Object(members) = self {
            members.push((key.to_string(), value));
        }
    }

    /// Appends a member when `value` is `Some`.
    pub fn push_opt(&mut self, key: &str, value: Option<Json>) {
        if let Some(v) = value {
            self.push(key, v);
        }
    }

    /// Renders the value as QEMU's pretty printer does (no trailing newline).
    pub fn to_pretty(&self) -> String {
        let mut out = String::new();
        self.write_pretty(&mut out, 0);
        out
    }

    fn write_pretty(&self, out: &mut String, level: usize) {
        match self {
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::UInt(u) => {
                let _ = write!(out, "{u}");
            }
            Json::Str(s) => write_string(out, s),
            Json::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    newline_indent(out, level + 1);
                    item.write_pretty(out, level + 1);
                }
                newline_indent(out, level);
                out.push(']');
            }
            Json::Object(members) => {
                out.push('{');
                for (i, (key, value)) in members.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    newline_indent(out, level + 1);
                    write_string(out, key);
                    out.push_str(": ");
                    value.write_pretty(out, level + 1);
                }
                newline_indent(out, level);
                out.push('}');
            }
        }
    }
}

fn newline_indent(out: &mut String, level: usize) {
    out.push('\n');
    for _ in 0..level {
        out.push_str("    ");
    }
}

/// Writes `s` as a JSON string literal with QEMU's escaping rules.
pub fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{:04X}", unit);
                }
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_containers_match_qemu() {
        let mut o = Json::object();
        o.push("children", Json::Array(vec![]));
        let mut fs = Json::object();
        fs.push("type", Json::Str("file".into()));
        fs.push("data", Json::object());
        o.push("format-specific", fs);
        o.push("dirty-flag", Json::Bool(false));
        o.push("virtual-size", Json::UInt(458752));
        let expected = "{\n    \"children\": [\n    ],\n    \"format-specific\": {\n        \"type\": \"file\",\n        \"data\": {\n        }\n    },\n    \"dirty-flag\": false,\n    \"virtual-size\": 458752\n}";
        assert_eq!(o.to_pretty(), expected);
    }

    #[test]
    fn arrays_of_objects() {
        let mut a = Json::object();
        a.push("x", Json::UInt(1));
        let v = Json::Array(vec![a.clone(), a]);
        assert_eq!(
            v.to_pretty(),
            "[\n    {\n        \"x\": 1\n    },\n    {\n        \"x\": 1\n    }\n]"
        );
    }

    #[test]
    fn string_escapes_match_qemu() {
        let mut out = String::new();
        write_string(&mut out, "w\u{e9}\"i\\rd\u{7f}\u{1}.q\n\t\u{1F600}");
        assert_eq!(
            out,
            "\"w\\u00E9\\\"i\\\\rd\\u007F\\u0001.q\\n\\t\\uD83D\\uDE00\""
        );
    }
}
