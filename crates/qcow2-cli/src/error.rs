//! The CLI's error type: one message line (printed as `qcow2: <message>`) and an exit code.

/// An error that ends a command. Its `Display` is the whole message line (without the `qcow2: ` prefix).
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad command line (unknown option, missing file name, bad value).
    #[error("{0}")]
    Usage(String),
    /// An image could not be opened.
    #[error("Could not open '{path}': {reason}")]
    Open {
        /// The name as given.
        path: String,
        /// Why (the engine's message).
        reason: String,
    },
    /// Block status failed.
    #[error("{path}: could not read block status at offset {offset}: {reason}")]
    Status {
        /// The image.
        path: String,
        /// Guest offset.
        offset: u64,
        /// Why.
        reason: String,
    },
    /// Reading guest data failed.
    #[error("{path}: error while reading at byte {offset}: {reason}")]
    Read {
        /// The image.
        path: String,
        /// Guest offset.
        offset: u64,
        /// Why.
        reason: String,
    },
    /// Writing the output failed.
    #[error("{path}: error while writing at byte {offset}: {reason}")]
    Write {
        /// The output file.
        path: String,
        /// Offset in the output.
        offset: u64,
        /// Why.
        reason: String,
    },
    /// Any other failure, with its full message.
    #[error("{0}")]
    Other(String),
}

impl CliError {
    /// A [`CliError::Other`] from anything printable.
    pub fn other(msg: impl std::fmt::Display) -> Self {
        CliError::Other(msg.to_string())
    }
}
