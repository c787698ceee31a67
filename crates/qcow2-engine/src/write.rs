//! The write path: writes, zero writes, discards, flush and close.
//!
//! SKELETON (issue 3): the lead implements.

use bytes::Bytes;
use qcow2_io::Backend;

use crate::error::{Error, Result};
use crate::image::Image;

fn unsupported<B>(img: &Image<B>) -> Error {
    Error::Unsupported {
        path: img.inner.info.filename.clone(),
        what: "writing".into(),
    }
}

pub(crate) async fn write<B: Backend>(img: &Image<B>, offset: u64, data: Bytes) -> Result<()> {
    let _ = (offset, data);
    Err(unsupported(img))
}

pub(crate) async fn write_zeroes<B: Backend>(
    img: &Image<B>,
    offset: u64,
    len: u64,
    unmap: bool,
) -> Result<()> {
    let _ = (offset, len, unmap);
    Err(unsupported(img))
}

pub(crate) async fn discard<B: Backend>(img: &Image<B>, offset: u64, len: u64) -> Result<()> {
    let _ = (offset, len);
    Err(unsupported(img))
}

pub(crate) async fn flush<B: Backend>(img: &Image<B>) -> Result<()> {
    Err(unsupported(img))
}

pub(crate) async fn close<B: Backend>(img: &Image<B>) -> Result<()> {
    Err(unsupported(img))
}
