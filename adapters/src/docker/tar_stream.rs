//! Pulls the content of one regular file out of a tar stream as it arrives, without buffering
//! the file: `docker cp`-style downloads (`GET /containers/{id}/archive`) come as a tar archive
//! of the requested path, and the executor only wants the bytes of that one file.
//!
//! Chunks may split headers, content and padding anywhere; content comes out as zero-copy slices
//! of the input chunks. Extended headers (PAX `x`/`g`, GNU long names `L`/`K`) before the file
//! are skipped, except that a PAX `size` record overrides the header's size (files over 8 GiB).

use bytes::{Buf, Bytes, BytesMut};

const BLOCK: usize = 512;
/// PAX records larger than this are not kept (only `size` is read from them).
const MAX_PAX: u64 = 64 * 1024;

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum TarError {
    /// The first entry is not a regular file (a folder, a link, ...).
    NotRegular(u8),
    /// A header is malformed.
    BadHeader(&'static str),
    /// The archive ended before the file did.
    Truncated,
}

impl std::fmt::Display for TarError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotRegular(kind) => {
                write!(f, "not a regular file (tar type {:?})", *kind as char)
            }
            Self::BadHeader(why) => write!(f, "malformed tar header: {why}"),
            Self::Truncated => write!(f, "the archive ended before the file did"),
        }
    }
}

#[derive(Debug)]
enum State {
    /// Collecting a 512-byte header.
    Header,
    /// Collecting a PAX extended header's records (`size` bytes, then padding).
    Pax { remaining: u64, padding: u64 },
    /// Skipping an extended header we do not read.
    Skip { remaining: u64 },
    /// Passing through the file's content.
    Content { remaining: u64 },
    /// The file is complete (or the archive was empty); everything else is ignored.
    Done { found: bool },
}

/// The incremental extractor. Feed it chunks with [`TarFile::push`], call [`TarFile::finish`]
/// at the end of input.
#[derive(Debug)]
pub(crate) struct TarFile {
    state: State,
    /// Partial header or PAX records.
    pending: BytesMut,
    /// A size from a PAX record, for the next regular entry.
    pax_size: Option<u64>,
}

impl Default for TarFile {
    fn default() -> Self {
        Self {
            state: State::Header,
            pending: BytesMut::with_capacity(BLOCK),
            pax_size: None,
        }
    }
}

impl TarFile {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Whether the file's content is complete: later input can be dropped.
    pub(crate) fn is_done(&self) -> bool {
        matches!(self.state, State::Done { .. })
    }

    /// Consumes one chunk of the archive and appends the file content it holds to `out`.
    pub(crate) fn push(&mut self, mut chunk: Bytes, out: &mut Vec<Bytes>) -> Result<(), TarError> {
        while !chunk.is_empty() {
            match &mut self.state {
                State::Done { .. } => return Ok(()),
                State::Header => {
                    let take = (BLOCK - self.pending.len()).min(chunk.len());
                    self.pending.extend_from_slice(&chunk.split_to(take));
                    if self.pending.len() == BLOCK {
                        let header = self.pending.split();
                        self.state = self.on_header(&header)?;
                    }
                }
                State::Pax { remaining, padding } => {
                    if *remaining > 0 {
                        let take = usize_min(*remaining, chunk.len());
                        let part = chunk.split_to(take);
                        if (self.pending.len() as u64) < MAX_PAX {
                            self.pending.extend_from_slice(&part);
                        }
                        *remaining -= take as u64;
                    } else {
                        let take = usize_min(*padding, chunk.len());
                        chunk.advance(take);
                        *padding -= take as u64;
                    }
                    if let State::Pax {
                        remaining: 0,
                        padding: 0,
                    } = self.state
                    {
                        let records = self.pending.split();
                        if let Some(size) = pax_size(&records) {
                            self.pax_size = Some(size);
                        }
                        self.state = State::Header;
                    }
                }
                State::Skip { remaining } => {
                    let take = usize_min(*remaining, chunk.len());
                    chunk.advance(take);
                    *remaining -= take as u64;
                    if *remaining == 0 {
                        self.state = State::Header;
                    }
                }
                State::Content { remaining } => {
                    let take = usize_min(*remaining, chunk.len());
                    out.push(chunk.split_to(take));
                    *remaining -= take as u64;
                    if *remaining == 0 {
                        self.state = State::Done { found: true };
                    }
                }
            }
        }
        // A zero-length file is complete as soon as its header is read.
        if let State::Content { remaining: 0 } = self.state {
            self.state = State::Done { found: true };
        }
        Ok(())
    }

    /// Checks the end of input. `Ok(false)`: the archive held no file at all.
    pub(crate) fn finish(&self) -> Result<bool, TarError> {
        match self.state {
            State::Done { found } => Ok(found),
            State::Content { remaining: 0 } => Ok(true),
            State::Header if self.pending.is_empty() => Ok(false),
            _ => Err(TarError::Truncated),
        }
    }

    fn on_header(&mut self, header: &[u8]) -> Result<State, TarError> {
        if header.iter().all(|b| *b == 0) {
            // End-of-archive marker before any file.
            return Ok(State::Done { found: false });
        }
        check_checksum(header)?;
        let size = parse_size(&header[124..136])?;
        let padded = size.div_ceil(BLOCK as u64) * BLOCK as u64;
        match header[156] {
            b'0' | b'\0' | b'7' => {
                let size = self.pax_size.take().unwrap_or(size);
                Ok(State::Content { remaining: size })
            }
            b'x' if size == 0 => Ok(State::Header),
            b'x' => Ok(State::Pax {
                remaining: size,
                padding: padded - size,
            }),
            b'g' | b'L' | b'K' => Ok(if padded == 0 {
                State::Header
            } else {
                State::Skip { remaining: padded }
            }),
            other => Err(TarError::NotRegular(other)),
        }
    }
}

/// How much of a chunk of `available` bytes belongs to a part with `remaining` bytes left.
/// The result never exceeds `available`, so the cast cannot truncate.
fn usize_min(remaining: u64, available: usize) -> usize {
    remaining.min(available as u64) as usize
}

fn check_checksum(header: &[u8]) -> Result<(), TarError> {
    let stored = parse_octal(&header[148..156]).ok_or(TarError::BadHeader("checksum"))?;
    let sum: u64 = header
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if (148..156).contains(&i) {
                u64::from(b' ')
            } else {
                u64::from(*b)
            }
        })
        .sum();
    if sum == stored {
        Ok(())
    } else {
        Err(TarError::BadHeader("checksum mismatch"))
    }
}

/// Octal (NUL/space terminated) or, when the high bit of the first byte is set, base-256.
fn parse_size(field: &[u8]) -> Result<u64, TarError> {
    if field[0] & 0x80 != 0 {
        let mut value: u64 = u64::from(field[0] & 0x7f);
        for b in &field[1..] {
            value = value
                .checked_mul(256)
                .and_then(|v| v.checked_add(u64::from(*b)))
                .ok_or(TarError::BadHeader("size overflows"))?;
        }
        return Ok(value);
    }
    parse_octal(field).ok_or(TarError::BadHeader("size"))
}

fn parse_octal(field: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(field).ok()?;
    let digits = text.trim_matches(|c: char| c == '\0' || c == ' ');
    if digits.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(digits, 8).ok()
}

/// Reads the `size` record of PAX extended header records (`"<len> <key>=<value>\n"`).
fn pax_size(records: &[u8]) -> Option<u64> {
    let mut rest = records;
    while !rest.is_empty() {
        let space = rest.iter().position(|b| *b == b' ')?;
        let len: usize = std::str::from_utf8(&rest[..space]).ok()?.parse().ok()?;
        if len <= space || len > rest.len() {
            return None;
        }
        let record = &rest[space + 1..len];
        let record = record.strip_suffix(b"\n").unwrap_or(record);
        if let Some(value) = record.strip_prefix(b"size=") {
            return std::str::from_utf8(value).ok()?.parse().ok();
        }
        rest = &rest[len..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(name: &str, content: &[u8]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(content.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, name, content).unwrap();
        builder.into_inner().unwrap()
    }

    /// Feeds `data` in chunks of `size` bytes and returns the extracted content.
    fn extract(data: &[u8], size: usize) -> Result<Option<Vec<u8>>, TarError> {
        let mut tar = TarFile::new();
        let mut out = Vec::new();
        for chunk in data.chunks(size) {
            tar.push(Bytes::copy_from_slice(chunk), &mut out)?;
        }
        let found = tar.finish()?;
        Ok(found.then(|| out.concat()))
    }

    fn content(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn extracts_across_any_chunk_boundary() {
        for len in [0, 1, 511, 512, 513, 5000] {
            let data = content(len);
            let tar = archive("file.bin", &data);
            for size in [1, 2, 7, 100, 511, 512, 513, 1024, 4096, tar.len()] {
                assert_eq!(
                    extract(&tar, size).unwrap().as_deref(),
                    Some(&data[..]),
                    "len {len} chunk {size}"
                );
            }
        }
    }

    #[test]
    fn skips_long_name_headers() {
        let name = format!("{}/file.bin", "d".repeat(150));
        let data = content(2000);
        let tar = archive(&name, &data);
        for size in [1, 300, 512, 4096] {
            assert_eq!(extract(&tar, size).unwrap().as_deref(), Some(&data[..]));
        }
    }

    #[test]
    fn reads_pax_headers_and_their_size() {
        let data = content(3000);
        let mut builder = tar::Builder::new(Vec::new());
        builder
            .append_pax_extensions([("size", b"3000".as_slice()), ("path", b"x/y".as_slice())])
            .unwrap();
        let mut header = tar::Header::new_ustar();
        header.set_size(3000);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, "y", &data[..]).unwrap();
        let tar = builder.into_inner().unwrap();
        for size in [1, 513, 4096] {
            assert_eq!(extract(&tar, size).unwrap().as_deref(), Some(&data[..]));
        }
    }

    #[test]
    fn a_folder_is_not_a_file() {
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_size(0);
        header.set_mode(0o755);
        header.set_cksum();
        builder.append_data(&mut header, "dir/", &[][..]).unwrap();
        let tar = builder.into_inner().unwrap();
        assert_eq!(extract(&tar, 512), Err(TarError::NotRegular(b'5')));
    }

    #[test]
    fn truncation_and_corruption_are_errors() {
        let tar = archive("f", &content(2000));
        assert_eq!(extract(&tar[..1000], 100), Err(TarError::Truncated));
        assert_eq!(extract(&tar[..100], 100), Err(TarError::Truncated));
        let mut bad = tar.clone();
        bad[0] ^= 0xff;
        assert!(matches!(extract(&bad, 512), Err(TarError::BadHeader(_))));
        assert_eq!(extract(&[], 512), Ok(None));
        assert_eq!(extract(&[0; 1024], 512), Ok(None));
    }

    #[test]
    fn parses_base256_sizes() {
        let mut field = [0u8; 12];
        field[0] = 0x80;
        field[11] = 0x01;
        field[10] = 0x02;
        assert_eq!(parse_size(&field), Ok(0x0201));
    }
}
