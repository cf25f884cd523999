//! Reading the files users name (configs, prefix lists): regular files only,
//! never more than a size limit, never blocking. `/dev/zero`, a FIFO, or a
//! symlink to either is refused at once instead of filling memory or
//! hanging whoever reads it (the agent reads files named in configs).

use std::{
    fs::File,
    io::Read as _,
    os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

/// How large a file sluice reads by default: 256 MiB (a million IPv6
/// prefixes, one per line, take about 40 MiB).
pub const DEFAULT_FILE_SIZE_LIMIT: u64 = 256 << 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("{path} is {kind}, not a regular file; sluice reads only regular files")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error(
        "{path} is larger than the file size limit ({size} bytes > {limit}); raise \
         `[agent] file_size_limit` (or the CLI's --file-size-limit) if it is meant to be"
    )]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("{path} is not UTF-8 text")]
    NotText { path: PathBuf },
}

impl FileError {
    /// The error without the file's name, for messages that name it already
    /// (a config diagnostic is prefixed with its file).
    #[must_use]
    pub fn without_path(&self) -> String {
        let text = self.to_string();
        let path = match self {
            Self::Io { path, .. }
            | Self::NotRegular { path, .. }
            | Self::TooLarge { path, .. }
            | Self::NotText { path } => path.display().to_string(),
        };
        match self {
            Self::Io { reason, .. } => format!("cannot read: {reason}"),
            _ => text
                .strip_prefix(&path)
                .map_or(text.clone(), |t| t.trim_start().to_string()),
        }
    }
}

fn kind_of(t: std::fs::FileType) -> &'static str {
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Reads `path` as text: a regular file (symlinks followed) of at most
/// `limit` bytes.
pub fn read_text(path: &Path, limit: u64) -> Result<String, FileError> {
    let io = |e: std::io::Error| FileError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    // O_NONBLOCK: opening a FIFO with no writer would block otherwise.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.file_type().is_file() {
        return Err(FileError::NotRegular {
            path: path.to_path_buf(),
            kind: kind_of(meta.file_type()),
        });
    }
    if meta.len() > limit {
        return Err(FileError::TooLarge {
            path: path.to_path_buf(),
            size: meta.len(),
            limit,
        });
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    // A file that grows while it is read still stops at the limit.
    File::take(file, limit + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > limit {
        return Err(FileError::TooLarge {
            path: path.to_path_buf(),
            size: bytes.len() as u64,
            limit,
        });
    }
    String::from_utf8(bytes).map_err(|_| FileError::NotText {
        path: path.to_path_buf(),
    })
}

/// Parses a size such as `268435456`, `256MiB`, `64M` or `1GiB` (bytes).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bounded_regular_files_are_read() {
        let dir = std::env::temp_dir().join(format!("sluice-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("list.txt");
        std::fs::write(&f, "198.18.0.0/24\n").unwrap();
        assert_eq!(read_text(&f, 100).unwrap(), "198.18.0.0/24\n");
        assert!(matches!(
            read_text(&f, 5),
            Err(FileError::TooLarge { size: 14, .. })
        ));
        assert!(matches!(
            read_text(Path::new("/dev/zero"), 1 << 20),
            Err(FileError::NotRegular {
                kind: "a character device",
                ..
            })
        ));
        let link = dir.join("zero");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        assert!(matches!(
            read_text(&link, 1 << 20),
            Err(FileError::NotRegular { .. })
        ));
        let fifo = dir.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let started = std::time::Instant::now();
        assert!(matches!(
            read_text(&fifo, 1 << 20),
            Err(FileError::NotRegular { kind: "a FIFO", .. })
        ));
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        assert!(matches!(
            read_text(&dir, 100),
            Err(FileError::NotRegular { .. } | FileError::Io { .. })
        ));
        assert_eq!(parse_size("256MiB"), Some(256 << 20));
        assert_eq!(parse_size("1024"), Some(1024));
        assert_eq!(parse_size("1 GiB"), Some(1 << 30));
        assert_eq!(parse_size("12x"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
