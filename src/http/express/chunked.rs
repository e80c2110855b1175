//! A strict scanner for an HTTP/1.1 `Transfer-Encoding: chunked` message body
//! (RFC 9112 §7.1).
//!
//! The proxy passes a response body through byte for byte, without decoding it, but it
//! still has to know exactly where the body ends: the bytes after it belong to the next
//! message on the same connection, which can only be reused if the end is certain. So
//! [`ChunkedScanner`] follows the chunk framing (sizes, the CRLFs around the data, the
//! trailer section) and reports how many bytes of each read belong to the body, skipping
//! chunk data by count rather than looking at it.
//!
//! Framing that two parsers could read differently is the stuff of request smuggling and
//! response splitting, so the scanner refuses anything outside the grammar instead of
//! guessing: bare LF or bare CR line endings, whitespace other than before a chunk
//! extension, control characters in extensions or trailers, folded trailer lines, sizes
//! that overflow, and unbounded size lines or trailer sections. A refused body ends the
//! connection; it is never forwarded as if it were well formed.

/// The longest chunk-size line accepted: the size digits and any extensions, without the
/// CRLF.
pub(crate) const MAX_LINE: usize = 4096;

/// The largest trailer section accepted, in bytes, counting every CRLF in it (the final,
/// empty line's included).
pub(crate) const MAX_TRAILERS: usize = 16 * 1024;

/// Why a chunked body was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ChunkedError {
    /// The size line does not start with a hexadecimal digit, or something other than
    /// whitespace followed by `;`, a `;` or CRLF follows the digits (a bare LF included).
    #[error("chunk size is not hexadecimal")]
    BadSize,
    /// The chunk size does not fit in 64 bits (more than 16 significant hex digits).
    #[error("chunk size too large")]
    SizeOverflow,
    /// The size line (digits and extensions, without the CRLF) is longer than
    /// [`MAX_LINE`].
    #[error("chunk size line too long")]
    LineTooLong,
    /// The chunk data is not followed by exactly CRLF.
    #[error("chunk data not followed by CRLF")]
    MissingCrlf,
    /// A chunk extension holds a control character other than HTAB (a bare LF included),
    /// or a CR that is not followed by LF.
    #[error("bad chunk extension")]
    BadExtension,
    /// The trailer section is larger than [`MAX_TRAILERS`].
    #[error("trailer section too large")]
    TrailersTooLarge,
    /// A trailer line is folded (starts with SP or HTAB), has no `:` after a non-empty
    /// name, holds a control character other than HTAB, or does not end with CRLF.
    #[error("bad trailer line")]
    BadTrailer,
}

/// Where the scanner is in the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// In the size digits. `len` counts the bytes of the size line so far, `digits`
    /// whether there has been at least one.
    Size {
        value: u64,
        len: usize,
        digits: bool,
    },
    /// After the digits, in whitespace that must lead to a `;`.
    SizeSpace { value: u64, len: usize },
    /// In the chunk extensions (after the first `;`).
    Extension { value: u64, len: usize },
    /// After the CR that ends the size line; `extension` says whether it had any.
    SizeLf { value: u64, extension: bool },
    /// In the chunk data, with `remaining` (never 0) bytes of it still to come.
    Data { remaining: u64 },
    /// After the chunk data, expecting its CR.
    DataCr,
    /// After the chunk data's CR, expecting LF.
    DataLf,
    /// At the start of a trailer line (or of the final, empty line). `total` counts the
    /// bytes of the trailer section so far, here and in the states below.
    TrailerStart { total: usize },
    /// Inside a trailer field line; `colon` says whether its `:` has been seen.
    TrailerLine { total: usize, colon: bool },
    /// After the CR ending a trailer field line.
    TrailerLf { total: usize },
    /// After the CR of the final, empty line.
    FinalLf { total: usize },
    /// The whole body has been scanned.
    Done,
    /// The body was refused.
    Failed(ChunkedError),
}

/// Follows the framing of a chunked body fed to it in pieces of any size, to find where
/// it ends (see the module documentation).
///
/// The outcome does not depend on how the body is split across calls to
/// [`scan`](Self::scan): one byte at a time gives the same result as all at once.
#[derive(Debug)]
pub(crate) struct ChunkedScanner {
    state: State,
}

impl Default for ChunkedScanner {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedScanner {
    /// A scanner at the start of a chunked body.
    pub(crate) fn new() -> Self {
        Self {
            state: State::Size {
                value: 0,
                len: 0,
                digits: false,
            },
        }
    }

    /// Scans the next bytes of the body. Returns how many bytes of `input` belong to the
    /// body: all of them, unless the body ends inside `input`, in which case the count
    /// stops right after the final CRLF (the bytes after it belong to the next message
    /// and are not looked at). After the end has been reached, returns `Ok(0)`. An error
    /// is final (later calls return it again).
    ///
    /// Chunk data is skipped by count, so the work done is proportional to the framing
    /// bytes in `input`, not to its length.
    pub(crate) fn scan(&mut self, input: &[u8]) -> Result<usize, ChunkedError> {
        let mut pos = 0;
        while pos < input.len() {
            match self.state {
                State::Done => return Ok(pos),
                State::Failed(error) => return Err(error),
                State::Data { remaining } => {
                    let available = input.len() - pos;
                    // Both casts are lossless: `taken` is at most `available`, a usize.
                    let taken = remaining.min(available as u64);
                    pos += taken as usize;
                    self.state = match remaining - taken {
                        0 => State::DataCr,
                        remaining => State::Data { remaining },
                    };
                }
                state => {
                    let byte = input[pos];
                    pos += 1;
                    self.state = match step(state, byte) {
                        Ok(next) => next,
                        Err(error) => {
                            self.state = State::Failed(error);
                            return Err(error);
                        }
                    };
                }
            }
        }
        match self.state {
            State::Failed(error) => Err(error),
            _ => Ok(pos),
        }
    }

    /// True once the last chunk (size 0), the trailer section and the final CRLF have
    /// been scanned.
    pub(crate) fn is_done(&self) -> bool {
        self.state == State::Done
    }
}

/// The state after `byte`, for every state but `Data`, `Done` and `Failed` (which
/// [`ChunkedScanner::scan`] handles itself).
fn step(state: State, byte: u8) -> Result<State, ChunkedError> {
    Ok(match state {
        State::Size { value, len, digits } => match byte {
            b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                if value > u64::MAX >> 4 {
                    return Err(ChunkedError::SizeOverflow);
                }
                State::Size {
                    value: (value << 4) | u64::from(hex_value(byte)),
                    len: grow_line(len)?,
                    digits: true,
                }
            }
            _ if !digits => return Err(ChunkedError::BadSize),
            b' ' | b'\t' => State::SizeSpace {
                value,
                len: grow_line(len)?,
            },
            b';' => State::Extension {
                value,
                len: grow_line(len)?,
            },
            b'\r' => State::SizeLf {
                value,
                extension: false,
            },
            _ => return Err(ChunkedError::BadSize),
        },
        State::SizeSpace { value, len } => match byte {
            b' ' | b'\t' => State::SizeSpace {
                value,
                len: grow_line(len)?,
            },
            b';' => State::Extension {
                value,
                len: grow_line(len)?,
            },
            _ => return Err(ChunkedError::BadSize),
        },
        State::Extension { value, len } => match byte {
            b'\r' => State::SizeLf {
                value,
                extension: true,
            },
            b'\t' => State::Extension {
                value,
                len: grow_line(len)?,
            },
            0x00..=0x1f | 0x7f => return Err(ChunkedError::BadExtension),
            _ => State::Extension {
                value,
                len: grow_line(len)?,
            },
        },
        State::SizeLf { value, extension } => match byte {
            b'\n' if value == 0 => State::TrailerStart { total: 0 },
            b'\n' => State::Data { remaining: value },
            _ if extension => return Err(ChunkedError::BadExtension),
            _ => return Err(ChunkedError::BadSize),
        },
        State::DataCr => match byte {
            b'\r' => State::DataLf,
            _ => return Err(ChunkedError::MissingCrlf),
        },
        State::DataLf => match byte {
            b'\n' => State::Size {
                value: 0,
                len: 0,
                digits: false,
            },
            _ => return Err(ChunkedError::MissingCrlf),
        },
        State::TrailerStart { total } => match byte {
            b'\r' => State::FinalLf {
                total: grow_trailers(total)?,
            },
            // Folded lines (obs-fold), names that are empty, and control characters.
            b' ' | b'\t' | b':' | 0x00..=0x1f | 0x7f => return Err(ChunkedError::BadTrailer),
            _ => State::TrailerLine {
                total: grow_trailers(total)?,
                colon: false,
            },
        },
        State::TrailerLine { total, colon } => match byte {
            b'\r' if colon => State::TrailerLf {
                total: grow_trailers(total)?,
            },
            b'\t' => State::TrailerLine {
                total: grow_trailers(total)?,
                colon,
            },
            0x00..=0x1f | 0x7f => return Err(ChunkedError::BadTrailer),
            _ => State::TrailerLine {
                total: grow_trailers(total)?,
                colon: colon || byte == b':',
            },
        },
        State::TrailerLf { total } => match byte {
            b'\n' => State::TrailerStart {
                total: grow_trailers(total)?,
            },
            _ => return Err(ChunkedError::BadTrailer),
        },
        State::FinalLf { total } => match byte {
            b'\n' => {
                grow_trailers(total)?;
                State::Done
            }
            _ => return Err(ChunkedError::BadTrailer),
        },
        // Handled by `scan`; kept unchanged should they ever get here.
        State::Data { .. } | State::Done | State::Failed(_) => state,
    })
}

/// The value of a hexadecimal digit (0 for anything else, which callers rule out).
fn hex_value(byte: u8) -> u8 {
    match byte {
        b'0'..=b'9' => byte - b'0',
        b'a'..=b'f' => byte - b'a' + 10,
        b'A'..=b'F' => byte - b'A' + 10,
        _ => 0,
    }
}

/// The size line's length after one more byte, if still within [`MAX_LINE`].
fn grow_line(len: usize) -> Result<usize, ChunkedError> {
    if len >= MAX_LINE {
        Err(ChunkedError::LineTooLong)
    } else {
        Ok(len + 1)
    }
}

/// The trailer section's size after one more byte, if still within [`MAX_TRAILERS`].
fn grow_trailers(total: usize) -> Result<usize, ChunkedError> {
    if total >= MAX_TRAILERS {
        Err(ChunkedError::TrailersTooLarge)
    } else {
        Ok(total + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The outcome of scanning `parts` in turn: the number of body bytes (or the error)
    /// and whether the body ended. Checks the invariants of every call on the way.
    fn scan_parts(parts: &[&[u8]]) -> (Result<usize, ChunkedError>, bool) {
        let mut scanner = ChunkedScanner::new();
        let mut total = 0;
        for part in parts {
            match scanner.scan(part) {
                Ok(n) => {
                    assert!(n <= part.len());
                    if n < part.len() {
                        assert!(scanner.is_done(), "stopped short without being done");
                    }
                    total += n;
                }
                Err(error) => {
                    assert!(!scanner.is_done());
                    // Errors are final.
                    assert_eq!(scanner.scan(b""), Err(error));
                    assert_eq!(scanner.scan(b"0\r\n\r\n"), Err(error));
                    return (Err(error), false);
                }
            }
        }
        if scanner.is_done() {
            assert_eq!(scanner.scan(b""), Ok(0));
            assert_eq!(scanner.scan(b"0\r\n\r\n"), Ok(0));
        }
        (Ok(total), scanner.is_done())
    }

    fn scan_once(input: &[u8]) -> (Result<usize, ChunkedError>, bool) {
        scan_parts(&[input])
    }

    /// Scans `input` in one call, one byte at a time, and split in two at every position
    /// (for long inputs: every position near either end and a spread of others), checks
    /// that all give the same outcome, and returns it.
    fn scan_any_split(input: &[u8]) -> (Result<usize, ChunkedError>, bool) {
        let whole = scan_once(input);
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(scan_parts(&bytes), whole, "byte by byte: {input:?}");
        let len = input.len();
        let splits =
            (0..=len).filter(|&at| len <= 1024 || at < 64 || len - at < 64 || at % 97 == 0);
        for at in splits {
            let (head, tail) = input.split_at(at);
            assert_eq!(scan_parts(&[head, tail]), whole, "split at {at}: {input:?}");
        }
        whole
    }

    fn assert_body(input: &[u8]) {
        assert_eq!(scan_any_split(input), (Ok(input.len()), true), "{input:?}");
    }

    fn assert_error(input: &[u8], error: ChunkedError) {
        assert_eq!(scan_any_split(input), (Err(error), false), "{input:?}");
    }

    #[test]
    fn single_chunk() {
        assert_body(b"5\r\nhello\r\n0\r\n\r\n");
    }

    #[test]
    fn empty_body_is_just_the_last_chunk() {
        assert_body(b"0\r\n\r\n");
    }

    #[test]
    fn several_chunks() {
        assert_body(b"5\r\nhello\r\n1\r\n,\r\n6\r\n world\r\n0\r\n\r\n");
    }

    #[test]
    fn chunk_data_is_not_looked_at() {
        // CR, LF, NUL and things that look like framing, inside the data.
        assert_body(b"a\r\n\r\n0\r\n\r\n\0\n\r\r\n0\r\n\r\n");
    }

    #[test]
    fn extensions() {
        assert_body(b"5;name=value\r\nhello\r\n0\r\n\r\n");
        assert_body(b"5;a;b=1;c=\"q \\\" ;s\"\r\nhello\r\n0;last\r\n\r\n");
        assert_body(b"5 ;a\r\nhello\r\n0\t \t;x=y\r\n\r\n");
        assert_body(b"5;a = b\tc\r\nhello\r\n0\r\n\r\n");
        assert_body(b"5;\r\nhello\r\n0\r\n\r\n");
        assert_body(b"5;\x80\xff\xe2\x82\xac\r\nhello\r\n0\r\n\r\n");
    }

    #[test]
    fn trailers() {
        assert_body(b"0\r\nExpires: never\r\n\r\n");
        assert_body(b"5\r\nhello\r\n0\r\nA: 1\r\nChecksum:abc\r\nEmpty:\r\nT:\tx\ty \r\n\r\n");
        assert_body(b"0\r\nX-Bin: \x80\xff\r\n\r\n");
        assert_body(b"0\r\nname:with:colons\r\n\r\n");
    }

    #[test]
    fn hex_digits_in_either_case() {
        let mut body = b"a\r\n0123456789\r\nB\r\n0123456789a\r\nfF\r\n".to_vec();
        body.extend_from_slice(&[b'x'; 0xff]);
        body.extend_from_slice(b"\r\n0\r\n\r\n");
        assert_body(&body);
    }

    #[test]
    fn leading_zeros() {
        assert_body(b"0005\r\nhello\r\n000\r\n\r\n");
        // Leading zeros do not count towards the 16 significant digits.
        let mut scanner = ChunkedScanner::new();
        let line = format!("{}ffffffffffffffff\r\n", "0".repeat(100));
        assert_eq!(scanner.scan(line.as_bytes()), Ok(line.len()));
        assert_eq!(
            scanner.state,
            State::Data {
                remaining: u64::MAX
            }
        );
    }

    #[test]
    fn large_chunks_are_skipped_by_count() {
        let mut scanner = ChunkedScanner::new();
        assert_eq!(scanner.scan(b"100000\r\n"), Ok(8));
        let data = vec![b'\n'; 0x10_0000];
        assert_eq!(scanner.scan(&data[..0x8_0000]), Ok(0x8_0000));
        assert_eq!(
            scanner.state,
            State::Data {
                remaining: 0x8_0000
            }
        );
        assert_eq!(scanner.scan(&data[0x8_0000..]), Ok(0x8_0000));
        assert_eq!(scanner.state, State::DataCr);
        assert_eq!(scanner.scan(b"\r\n0\r\n\r\nnext"), Ok(7));
        assert!(scanner.is_done());

        // The largest size there is: never done, every byte is data.
        let mut scanner = ChunkedScanner::new();
        assert_eq!(scanner.scan(b"FFFFFFFFFFFFFFFF\r\n"), Ok(18));
        for _ in 0..4 {
            assert_eq!(scanner.scan(&data), Ok(data.len()));
        }
        assert!(!scanner.is_done());
        assert_eq!(
            scanner.state,
            State::Data {
                remaining: u64::MAX - 4 * 0x10_0000
            }
        );
    }

    #[test]
    fn stops_right_after_the_final_crlf() {
        let body = b"5\r\nhello\r\n0\r\nA: b\r\n\r\n";
        let mut input = body.to_vec();
        input.extend_from_slice(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(scan_any_split(&input), (Ok(body.len()), true));

        // Garbage after the end is not looked at.
        let mut input = b"0\r\n\r\n".to_vec();
        input.extend_from_slice(b"\0\n\r junk");
        assert_eq!(scan_any_split(&input), (Ok(5), true));
    }

    #[test]
    fn returns_zero_once_done() {
        let mut scanner = ChunkedScanner::new();
        assert!(!scanner.is_done());
        assert_eq!(scanner.scan(b"3\r\nabc\r\n0\r\n\r\n"), Ok(13));
        assert!(scanner.is_done());
        assert_eq!(scanner.scan(b"3\r\nabc\r\n"), Ok(0));
        assert_eq!(scanner.scan(b"\n\n\n"), Ok(0));
        assert_eq!(scanner.scan(b""), Ok(0));
        assert!(scanner.is_done());
    }

    #[test]
    fn incomplete_bodies_are_not_done() {
        for input in [
            &b""[..],
            b"5",
            b"5\r",
            b"5\r\nhel",
            b"5\r\nhello",
            b"5\r\nhello\r",
            b"5\r\nhello\r\n",
            b"5;ext",
            b"0\r\n",
            b"0\r\nA: b",
            b"0\r\nA: b\r\n",
            b"0\r\n\r",
        ] {
            assert_eq!(scan_any_split(input), (Ok(input.len()), false), "{input:?}");
        }
        assert!(!ChunkedScanner::default().is_done());
    }

    #[test]
    fn bad_size() {
        for input in [
            &b"\r\n"[..],
            b";ext\r\n",
            b" 5\r\n",
            b"\t5\r\n",
            b"x\r\n",
            b"g\r\n",
            b"-5\r\n",
            b"+5\r\n",
            b"0x5\r\n",
            b"5x\r\n",
            b"5 5\r\n",
            // Whitespace must lead to an extension.
            b"5 \r\n",
            b"5\t\r\n",
            b"5 x\r\n",
            // CR not followed by LF.
            b"5\rX",
            b"5\r\r\n",
            b"5\r\nhello\r\n\r\n",
        ] {
            assert_error(input, ChunkedError::BadSize);
        }
    }

    #[test]
    fn bare_lf_is_refused_everywhere() {
        assert_error(b"5\nhello\r\n0\r\n\r\n", ChunkedError::BadSize);
        assert_error(b"\n", ChunkedError::BadSize);
        assert_error(b"5 \nhello", ChunkedError::BadSize);
        assert_error(b"5;ext\nhello\r\n0\r\n\r\n", ChunkedError::BadExtension);
        assert_error(b"5\r\nhello\n0\r\n\r\n", ChunkedError::MissingCrlf);
        assert_error(b"5\r\nhello\r\n0\n\r\n", ChunkedError::BadSize);
        assert_error(b"5\r\nhello\r\n0\r\n\n", ChunkedError::BadTrailer);
        assert_error(b"0\r\nA: b\n\r\n", ChunkedError::BadTrailer);
        assert_error(b"0\r\nA: b\r\n\n", ChunkedError::BadTrailer);
    }

    #[test]
    fn size_overflow() {
        assert_error(b"fffffffffffffffff\r\n", ChunkedError::SizeOverflow);
        assert_error(b"10000000000000000\r\n", ChunkedError::SizeOverflow);
        assert_error(b"0001ffffffffffffffff\r\n", ChunkedError::SizeOverflow);
        // Sixteen significant digits fit.
        assert_eq!(scan_any_split(b"ffffffffffffffff\r\n"), (Ok(18), false));
        assert_eq!(
            scan_any_split(b"00000000000000000000\r\n\r\n"),
            (Ok(24), true)
        );
    }

    #[test]
    fn line_too_long() {
        let at_limit = format!("5;{}\r\nhello\r\n0\r\n\r\n", "a".repeat(MAX_LINE - 2));
        assert_body(at_limit.as_bytes());
        let over = format!("5;{}\r\nhello\r\n0\r\n\r\n", "a".repeat(MAX_LINE - 1));
        assert_error(over.as_bytes(), ChunkedError::LineTooLong);

        let zeros = format!("{}\r\n\r\n", "0".repeat(MAX_LINE));
        assert_body(zeros.as_bytes());
        let zeros = format!("{}\r\n\r\n", "0".repeat(MAX_LINE + 1));
        assert_error(zeros.as_bytes(), ChunkedError::LineTooLong);

        let spaces = format!("5{};a\r\n", " ".repeat(MAX_LINE));
        assert_error(spaces.as_bytes(), ChunkedError::LineTooLong);
    }

    #[test]
    fn missing_crlf_after_data() {
        for input in [
            &b"5\r\nhelloX"[..],
            b"5\r\nhello0\r\n\r\n",
            b"5\r\nhello\rX",
            b"5\r\nhello\r\r\n",
            b"5\r\nhello \r\n",
            b"5\r\nhello\n\r\n",
            b"1\r\nab\r\n0\r\n\r\n",
        ] {
            assert_error(input, ChunkedError::MissingCrlf);
        }
    }

    #[test]
    fn bad_extension() {
        for input in [
            &b"5;a\0b\r\n"[..],
            b"5;\x01\r\n",
            b"5;a=\x1b[0m\r\n",
            b"5;a\x7f\r\n",
            b"5;a\x0b\r\n",
            b"5;a\nb\r\n",
            b"5;a\rb\r\n",
            b"5;a\r\r\n",
            b"0;a\rX",
        ] {
            assert_error(input, ChunkedError::BadExtension);
        }
    }

    #[test]
    fn trailers_too_large() {
        // "X:" + value + CRLF + the final CRLF.
        let fits = format!("0\r\nX:{}\r\n\r\n", "v".repeat(MAX_TRAILERS - 6));
        assert_body(fits.as_bytes());
        let over = format!("0\r\nX:{}\r\n\r\n", "v".repeat(MAX_TRAILERS - 5));
        assert_error(over.as_bytes(), ChunkedError::TrailersTooLarge);

        // Many small lines add up.
        let many = format!("0\r\n{}\r\n", "A: b\r\n".repeat(MAX_TRAILERS / 6 + 1));
        assert_error(many.as_bytes(), ChunkedError::TrailersTooLarge);
    }

    #[test]
    fn bad_trailer() {
        for input in [
            // obs-fold, on the first line and as a continuation.
            &b"0\r\n Foo: x\r\n\r\n"[..],
            b"0\r\n\tFoo: x\r\n\r\n",
            b"0\r\nFoo: x\r\n  y\r\n\r\n",
            b"0\r\nFoo: x\r\n\ty\r\n\r\n",
            // No colon, or no name before it.
            b"0\r\nNoColon\r\n\r\n",
            b"0\r\n: value\r\n\r\n",
            b"0\r\n:\r\n\r\n",
            // Control characters, bare CR.
            b"0\r\nA: b\x01\r\n\r\n",
            b"0\r\nA: b\0\r\n\r\n",
            b"0\r\nA: b\x7f\r\n\r\n",
            b"0\r\nA\x1b: b\r\n\r\n",
            b"0\r\nA: b\rc\r\n\r\n",
            b"0\r\nA: b\r\r\n",
            b"0\r\n\rX",
            b"0\r\n\r\r\n",
            b"0\r\n\x01A: b\r\n\r\n",
        ] {
            assert_error(input, ChunkedError::BadTrailer);
        }
    }

    #[test]
    fn errors_are_final() {
        let mut scanner = ChunkedScanner::new();
        assert_eq!(scanner.scan(b"5\r\nhello"), Ok(8));
        assert_eq!(
            scanner.scan(b"X\r\n0\r\n\r\n"),
            Err(ChunkedError::MissingCrlf)
        );
        assert_eq!(
            scanner.scan(b"\r\n0\r\n\r\n"),
            Err(ChunkedError::MissingCrlf)
        );
        assert_eq!(scanner.scan(b""), Err(ChunkedError::MissingCrlf));
        assert!(!scanner.is_done());
    }

    #[test]
    fn errors_have_messages() {
        assert_eq!(
            ChunkedError::BadSize.to_string(),
            "chunk size is not hexadecimal"
        );
        assert_eq!(
            ChunkedError::TrailersTooLarge.to_string(),
            "trailer section too large"
        );
    }

    #[test]
    fn same_outcome_split_anywhere() {
        use ChunkedError::*;
        let cases: &[(&[u8], Result<usize, ChunkedError>, bool)] = &[
            (b"5\r\nhello\r\n0\r\n\r\n", Ok(15), true),
            (
                b"3;a=b\r\nabc\r\nA \t;x\r\n0123456789\r\n0\r\nT: v\r\nU:w\r\n\r\nNEXT",
                Ok(47),
                true,
            ),
            (b"0\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n", Ok(5), true),
            (b"2\r\n\r\n\r\n0\r\n\r\n", Ok(12), true),
            (b"0000\r\n\r\n", Ok(8), true),
            (b"5\r\nhel", Ok(6), false),
            (b"5\nhello\r\n0\r\n\r\n", Err(BadSize), false),
            (b"5\r\nhello\n0\r\n\r\n", Err(MissingCrlf), false),
            (b"5;a\rb\r\nhello\r\n0\r\n\r\n", Err(BadExtension), false),
            (b"0\r\n folded: x\r\n\r\n", Err(BadTrailer), false),
            (b"0\r\nA: b\r\nnocolon\r\n\r\n", Err(BadTrailer), false),
            (b"fffffffffffffffff\r\n", Err(SizeOverflow), false),
            (b"5 \r\nhello\r\n0\r\n\r\n", Err(BadSize), false),
            (b"1\r\nx\r\n0\r\n\n", Err(BadTrailer), false),
        ];
        for &(input, result, done) in cases {
            assert_eq!(scan_any_split(input), (result, done), "{input:?}");
        }
    }

    /// One chunk of a generated body: its data, how its size is written (upper case,
    /// leading zeros) and an optional extension.
    fn chunk() -> impl Strategy<Value = (Vec<u8>, bool, usize, Option<String>)> {
        (
            proptest::collection::vec(any::<u8>(), 1..300),
            any::<bool>(),
            0..3usize,
            proptest::option::of("[ \t]{0,2};[!-~ \t]{0,20}"),
        )
    }

    fn body() -> impl Strategy<Value = Vec<u8>> {
        (
            proptest::collection::vec(chunk(), 0..6),
            proptest::option::of("[ \t]{0,2};[!-~ \t]{0,20}"),
            proptest::collection::vec(("[A-Za-z0-9-]{1,12}", "[ -~\t]{0,30}"), 0..4),
        )
            .prop_map(|(chunks, last_extension, trailers)| {
                let mut body = Vec::new();
                for (data, upper, zeros, extension) in chunks {
                    let size = if upper {
                        format!("{:X}", data.len())
                    } else {
                        format!("{:x}", data.len())
                    };
                    body.extend_from_slice("0".repeat(zeros).as_bytes());
                    body.extend_from_slice(size.as_bytes());
                    body.extend_from_slice(extension.unwrap_or_default().as_bytes());
                    body.extend_from_slice(b"\r\n");
                    body.extend_from_slice(&data);
                    body.extend_from_slice(b"\r\n");
                }
                body.push(b'0');
                body.extend_from_slice(last_extension.unwrap_or_default().as_bytes());
                body.extend_from_slice(b"\r\n");
                for (name, value) in trailers {
                    body.extend_from_slice(format!("{name}:{value}\r\n").as_bytes());
                }
                body.extend_from_slice(b"\r\n");
                body
            })
    }

    proptest! {
        #[test]
        fn valid_bodies_scan_to_their_length(
            body in body(),
            next in proptest::collection::vec(any::<u8>(), 0..20),
            first in any::<prop::sample::Index>(),
            second in any::<prop::sample::Index>(),
        ) {
            let mut input = body.clone();
            input.extend_from_slice(&next);
            let (a, b) = {
                let (x, y) = (first.index(input.len() + 1), second.index(input.len() + 1));
                (x.min(y), x.max(y))
            };
            let expected = (Ok(body.len()), true);
            prop_assert_eq!(scan_once(&input), expected);
            prop_assert_eq!(scan_parts(&[&input[..a], &input[a..b], &input[b..]]), expected);
            let bytes: Vec<&[u8]> = input.chunks(1).collect();
            prop_assert_eq!(scan_parts(&bytes), expected);
        }

        #[test]
        fn any_bytes_give_the_same_outcome_however_split(
            input in proptest::collection::vec(
                prop::sample::select(&b"0159aFfgx;: \t\r\n\x01\x7f\x80"[..]), 0..60),
            at in any::<prop::sample::Index>(),
        ) {
            let whole = scan_once(&input);
            let at = at.index(input.len() + 1);
            prop_assert_eq!(scan_parts(&[&input[..at], &input[at..]]), whole);
            let bytes: Vec<&[u8]> = input.chunks(1).collect();
            prop_assert_eq!(scan_parts(&bytes), whole);
        }
    }
}
