//! The pure parts of the `qcow2` command-line tool, as a library so that they can be fuzzed and
//! tested on their own: the `-o` option parser ([`options`]) and the size syntax ([`size`]). The
//! commands themselves live in the binary (`src/main.rs`).

pub mod options;
pub mod size;

#[doc(hidden)]
pub mod fuzzing {
    //! Body of the `opts` fuzz target (`fuzz/fuzz_targets/opts.rs`), shared with the stable corpus
    //! replay (`tests/fuzz_corpus.rs` of the root crate).

    use qcow2_engine::ImageFormat;

    use crate::options::{
        formatting_line, parse_bool, parse_options, split_options, to_create_options, wants_help,
    };
    use crate::size::{parse_size, SizeError};

    /// Runs the `-o` parser on arbitrary text: `data[0]` picks the format (qcow2 or raw), the rest
    /// (lossily decoded as UTF-8) is split at newlines into several `-o` arguments. Nothing may panic,
    /// and every step is deterministic (the same input parses to the same result twice). Also checks
    /// the size parser: accepted sizes are at most `i64::MAX` and print back to the same value, and
    /// splitting keeps no empty item.
    pub fn opts(data: &[u8]) {
        let Some((&sel, rest)) = data.split_first() else {
            return;
        };
        let format = if sel & 1 == 0 {
            ImageFormat::Qcow2
        } else {
            ImageFormat::Raw
        };
        let text = String::from_utf8_lossy(rest);
        let options: Vec<String> = text.split('\n').map(str::to_string).collect();
        let _ = wants_help(&options);
        for o in &options {
            let split = split_options(o);
            assert_eq!(split, split_options(o), "split_options is deterministic");
            for (k, v) in &split {
                let _ = parse_bool(k, v);
            }
            check_size(o);
        }
        let parsed = parse_options(format, &options);
        assert_eq!(
            parsed,
            parse_options(format, &options),
            "parse_options is deterministic"
        );
        let Ok(list) = parsed else {
            return;
        };
        let line = formatting_line("fuzz.img", format, &list);
        assert_eq!(line, formatting_line("fuzz.img", format, &list));
        let created = to_create_options(format, &list);
        assert_eq!(
            created,
            to_create_options(format, &list),
            "to_create_options is deterministic"
        );
    }

    fn check_size(text: &str) {
        let r = parse_size(text);
        assert_eq!(r, parse_size(text), "parse_size is deterministic");
        match r {
            Ok(v) => {
                assert!(v <= i64::MAX as u64, "accepted size {v} above i64::MAX");
                assert_eq!(parse_size(&v.to_string()), Ok(v), "a size prints back");
            }
            Err(SizeError::Invalid(_)) | Err(SizeError::TooLarge(_)) => {}
        }
    }
}
