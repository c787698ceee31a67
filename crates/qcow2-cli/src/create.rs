//! `qcow2 create [-q] [-f FMT] [-b BACKING] [-F BACKING_FMT] [-o OPTIONS] FILENAME [SIZE]`, as
//! `qemu-img create`: the same `-o key=value,...` keys, checks and messages, and the same
//! `Formatting '...', fmt=... ` line.
//!
//! qemu-img reports problems in three stages, and so do we: command-line and `-o` syntax errors
//! (unknown key, a value that is not a number or a boolean), then the backing file (opened to check it
//! and, without SIZE, to take its size), all before the `Formatting` line; then the image driver's
//! checks (cluster size, compatibility level, ...), which [`qcow2_engine::Image::create`] does after
//! the line is printed. [`parse_options`] is shared with `convert -O qcow2 -o ...`.

use qcow2_engine::{CreateError, CreateOptions, Image, ImageFormat};
use qcow2_io::BackendOpen;

use crate::args::CreateArgs;
use crate::error::CliError;
use crate::size::parse_size;
pub use qcow2_cli::options::{
    formatting_line, help_text, parse_options, to_create_options, wants_help,
};

/// `qcow2 create`.
pub async fn create<B: BackendOpen>(a: &CreateArgs) -> Result<i32, CliError> {
    let format = match a.format.as_deref() {
        None => ImageFormat::Raw,
        Some(f) => ImageFormat::from_name(f)
            .ok_or_else(|| CliError::Usage(format!("Unknown file format '{f}'")))?,
    };
    if wants_help(&a.options) {
        print!("{}", help_text(format));
        println!("\nThe protocol level may support further options.");
        println!("Specify the target filename to include those options.");
        return Ok(0);
    }
    let (img, size_arg) = match a.files.as_slice() {
        [img] => (img.as_str(), None),
        [img, size] => (img.as_str(), Some(size.as_str())),
        [] => return Err(CliError::Usage("Expecting image file name".into())),
        [_, _, extra, ..] => return Err(CliError::Usage(format!("Unexpected argument: {extra}"))),
    };
    let in_img = |m: String| CliError::Other(format!("{img}: {m}"));
    let mut list = parse_options(format, &a.options).map_err(in_img)?;
    if let Some(b) = &a.backing {
        list.set("backing_file", b.clone());
    }
    if let Some(f) = &a.backing_format {
        list.set("backing_fmt", f.clone());
    }
    if format == ImageFormat::Raw && list.get("backing_file").is_some() {
        return Err(in_img(
            "Backing file not supported for file format 'raw'".into(),
        ));
    }
    if let Some(s) = size_arg {
        if list.get("size").is_some() {
            return Err(in_img("The image size must be specified only once".into()));
        }
        let size = match parse_size(s) {
            Ok(v) => v,
            Err(crate::size::SizeError::TooLarge(_)) => {
                return Err(CliError::Usage(
                    "Invalid image size specified. Must be between 0 and 9223372036854775807."
                        .into(),
                ))
            }
            Err(_) => {
                return Err(CliError::Usage(format!(
                    "Invalid image size specified: '{s}'."
                )))
            }
        };
        list.set("size", size.to_string());
    }
    // The backing file: checked (and its size taken) before anything is printed.
    if let Some(b) = list.get("backing_file").map(str::to_string) {
        let fmt = match list.get("backing_fmt") {
            None => None,
            Some(f) => Some(ImageFormat::from_name(f).ok_or_else(|| {
                in_img(format!(
                    "Unknown driver '{f}'\nCould not open backing image."
                ))
            })?),
        };
        let probe = CreateOptions {
            backing_file: Some(b),
            backing_fmt: fmt,
            ..CreateOptions::qcow2(0)
        };
        let size = probe
            .backing_size::<B>(img)
            .await
            .map_err(|e| CliError::Other(e.to_string()))?;
        if list.get("size").is_none() {
            if let Some(s) = size {
                list.set("size", s.to_string());
            }
        }
    }
    if list.get("size").is_none() {
        return Err(in_img("Image creation needs a size parameter".into()));
    }
    if !a.quiet {
        println!("{}", formatting_line(img, format, &list));
    }
    // From here on qemu-img's qcow2 driver has created the files; when it then refuses the options
    // it deletes them again, also files that existed before. The engine itself never touches files
    // on refusal; this mirrors qemu-img's visible result.
    let data_file = list.get("data_file").map(str::to_string);
    let opts = match to_create_options(format, &list) {
        Ok(o) => o,
        Err(m) => {
            if format == ImageFormat::Qcow2 {
                remove_created(img, data_file.as_deref());
            }
            return Err(in_img(m));
        }
    };
    match Image::<B>::create(img, &opts).await {
        Ok(()) => Ok(0),
        Err(e) => {
            if let qcow2_engine::Error::Create { source, .. } = &e {
                if format == ImageFormat::Qcow2 && is_driver_refusal(source) {
                    remove_created(img, data_file.as_deref());
                }
            }
            Err(CliError::Other(e.to_string()))
        }
    }
}

/// Whether qemu-img reports this refusal from its qcow2 driver, after creating the files.
fn is_driver_refusal(e: &CreateError) -> bool {
    !matches!(
        e,
        CreateError::NeedsSize
            | CreateError::BackingOpen { .. }
            | CreateError::BackingWithoutFormat { .. }
            | CreateError::CreateFile { .. }
            | CreateError::Internal(_)
    )
}

/// Removes the image and data file as qemu-img does after a driver-stage refusal (errors ignored:
/// the files may not exist).
fn remove_created(img: &str, data_file: Option<&str>) {
    let _ = std::fs::remove_file(img);
    if let Some(d) = data_file {
        let _ = std::fs::remove_file(d);
    }
}
