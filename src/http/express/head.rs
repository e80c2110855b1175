//! Message heads on the express lane: a client's request head read and checked once,
//! the edge's response head read for its framing, both written out again in canonical
//! form.
//!
//! The lane carries only the plain case and says so by declining: anything it does not
//! read as a plain HTTP/1.1 request (a parse error, a body it would have to decode, an
//! upgrade, `Expect`, a second `Content-Length`) goes to hyper, whose answers to such
//! requests (400, 417, upgrades) are the ones to keep. Heads are re-serialized, never
//! copied: the edge receives one spelling of each field, whatever the client sent.

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, StatusCode, Uri, Version};
use std::fmt::Write as _;
use std::mem::MaybeUninit;

use super::Handover;
use crate::http::proxy::hop_by_hop::{self, is_hop_by_hop};
use crate::http::proxy::strip_hop_by_hop;

/// Field lines a head may have on the lane; more, and hyper (whose limit is
/// [`Limits::max_headers`](crate::http::server::Limits)) decides.
const MAX_FIELDS: usize = 100;

/// What reading the bytes buffered so far as a request head gave.
// Made once per request and taken apart at once: boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(super) enum RequestHead {
    /// Not a whole head yet.
    Partial,
    /// A plain HTTP/1.1 request the lane can carry.
    Plain(PlainRequest),
    /// Anything else: hyper serves the connection from this head on.
    Decline(Handover),
}

/// A request head the lane carries: hop-by-hop fields already removed.
#[derive(Debug)]
pub(super) struct PlainRequest {
    pub(super) parts: Parts,
    /// The head as the client sent it (for hyper, should the route decline).
    pub(super) head: Bytes,
    /// The body's length (`Content-Length`, 0 without one).
    pub(super) body_len: u64,
    /// The client asked to close after this exchange (`Connection: close`).
    pub(super) close: bool,
}

/// What reading request heads reuses from one request to the next: the last request's
/// field map (given back with [`HeadRoom::recycle`]) and the fields' places.
#[derive(Default)]
pub(super) struct HeadRoom {
    headers: HeaderMap,
    fields: Vec<(Span, Span)>,
}

impl HeadRoom {
    /// Keeps the field map of a request for the next one, emptied now: its values share
    /// the read buffer, which can then be reused in place.
    pub(super) fn recycle(&mut self, mut headers: HeaderMap) {
        headers.clear();
        self.headers = headers;
    }
}

/// Reads `buf` as a request head; see [`RequestHead`]. A plain request's head is split
/// off `buf`, and its fields are built in the map kept in `room`. The head's bytes are
/// taken, not copied: the target and every field value are slices of one shared buffer.
pub(super) fn parse_request(buf: &mut BytesMut, room: &mut HeadRoom) -> RequestHead {
    if is_http2_preface(buf) {
        return RequestHead::Decline(Handover::Http2);
    }
    // Left uninitialised: httparse writes the fields it reads, and 3 KiB of zeros per
    // head would be most of the parse.
    let mut fields = [const { MaybeUninit::uninit() }; MAX_FIELDS];
    let mut request = httparse::Request::new(&mut []);
    let head_len = match request.parse_with_uninit_headers(buf, &mut fields) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return RequestHead::Partial,
        Err(httparse::Error::Version) => return RequestHead::Decline(Handover::Version),
        Err(_) => return RequestHead::Decline(Handover::Malformed),
    };
    if u32::try_from(head_len).is_err() {
        return RequestHead::Decline(Handover::HeadTooLarge);
    }
    let layout = match Layout::check(&request, buf.as_ptr(), &mut room.fields) {
        Ok(layout) => layout,
        Err(reason) => return RequestHead::Decline(reason),
    };
    let head = buf.split_to(head_len).freeze();
    match layout.build(&head, room) {
        Ok(plain) => RequestHead::Plain(plain),
        Err(reason) => {
            // Not reached (the checks are the ones building repeats), but hyper must
            // still find the head where it was.
            unread(buf, &head);
            RequestHead::Decline(reason)
        }
    }
}

/// Puts a `head` split off `buf` back in front of the bytes read after it.
pub(super) fn unread(buf: &mut BytesMut, head: &[u8]) {
    let mut restored = BytesMut::with_capacity(head.len() + buf.len());
    restored.extend_from_slice(head);
    restored.extend_from_slice(buf);
    *buf = restored;
}

/// HTTP/2's connection preface (prior knowledge): hyper's to serve.
fn is_http2_preface(buf: &[u8]) -> bool {
    buf.starts_with(b"PRI * HTTP/2")
}

/// Where a request's parts lie in its head: what [`parse_request`] checks while the head
/// is still part of the read buffer, to build from once it is split off.
struct Layout {
    method: Method,
    target: Span,
    body_len: Option<u64>,
}

/// A range of the head's bytes (a head is far below 4 GiB: the lane's limit bounds it).
#[derive(Clone, Copy)]
pub(super) struct Span {
    start: u32,
    end: u32,
}

impl Span {
    /// Where `part`, a slice of the buffer starting at `base`, lies in it.
    fn of(part: &[u8], base: *const u8) -> Self {
        let start = part.as_ptr() as usize - base as usize;
        let end = start + part.len();
        Self {
            start: u32::try_from(start).unwrap_or(u32::MAX),
            end: u32::try_from(end).unwrap_or(u32::MAX),
        }
    }

    fn range(self) -> std::ops::Range<usize> {
        self.start as usize..self.end as usize
    }

    fn slice(self, head: &Bytes) -> Bytes {
        head.slice(self.range())
    }
}

impl Layout {
    /// Checks `request`, a head in the buffer at `base`, and notes where its fields are
    /// in `fields`.
    fn check(
        request: &httparse::Request<'_, '_>,
        base: *const u8,
        fields: &mut Vec<(Span, Span)>,
    ) -> Result<Self, Handover> {
        if request.version != Some(1) {
            return Err(Handover::Version);
        }
        let method = request
            .method
            .and_then(|method| Method::from_bytes(method.as_bytes()).ok())
            .ok_or(Handover::Malformed)?;
        if method == Method::CONNECT {
            return Err(Handover::TargetForm);
        }
        let target = request.path.ok_or(Handover::Malformed)?;
        // Origin form only: absolute form and `*` are rare enough to leave to hyper.
        if !target.starts_with('/') {
            return Err(Handover::TargetForm);
        }
        let mut layout = Layout {
            method,
            target: Span::of(target.as_bytes(), base),
            body_len: None,
        };
        fields.clear();
        let mut hosts = 0;
        for field in request.headers.iter() {
            let name = field.name;
            if !field.value.iter().all(|&byte| is_value_byte(byte)) {
                return Err(Handover::Malformed);
            }
            if name.eq_ignore_ascii_case("content-length") {
                if layout.body_len.is_some() {
                    return Err(Handover::Framing);
                }
                layout.body_len = Some(decimal(field.value).ok_or(Handover::Malformed)?);
            } else if name.eq_ignore_ascii_case("host") {
                hosts += 1;
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                return Err(Handover::Framing);
            } else if name.eq_ignore_ascii_case("expect") {
                return Err(Handover::Expect);
            } else if name.eq_ignore_ascii_case("upgrade")
                || name.eq_ignore_ascii_case("http2-settings")
            {
                return Err(Handover::Upgrade);
            }
            fields.push((Span::of(name.as_bytes(), base), Span::of(field.value, base)));
        }
        if hosts != 1 {
            return Err(Handover::Host);
        }
        Ok(layout)
    }

    /// The request, its target and field values slices of `head`.
    fn build(self, head: &Bytes, room: &mut HeadRoom) -> Result<PlainRequest, Handover> {
        let uri =
            Uri::from_maybe_shared(self.target.slice(head)).map_err(|_| Handover::Malformed)?;
        let mut headers = std::mem::take(&mut room.headers);
        headers.clear();
        // Room for what the route adds (forwarding headers) without growing.
        headers.reserve(room.fields.len() + 6);
        let mut hop_by_hop = false;
        for &(name, value) in &room.fields {
            let name =
                HeaderName::from_bytes(&head[name.range()]).map_err(|_| Handover::Malformed)?;
            let value = HeaderValue::from_maybe_shared(value.slice(head))
                .map_err(|_| Handover::Malformed)?;
            hop_by_hop |= is_hop_by_hop(&name);
            headers.append(name, value);
        }
        // Most heads have no hop-by-hop field (and so no `Connection` naming others):
        // nothing to look up and remove.
        let close = hop_by_hop
            && hop_by_hop::tokens(&headers, header::CONNECTION)
                .any(|token| token.eq_ignore_ascii_case("close"));
        if hop_by_hop {
            strip_hop_by_hop(&mut headers, false);
        }
        // The framing is the lane's, not the client's to name away with `Connection`: the
        // body is forwarded by this count, so the edge must be told it.
        if let Some(length) = self.body_len {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
        }
        let (mut parts, ()) = Request::new(()).into_parts();
        parts.method = self.method;
        parts.uri = uri;
        parts.version = Version::HTTP_11;
        parts.headers = headers;
        Ok(PlainRequest {
            parts,
            head: head.clone(),
            body_len: self.body_len.unwrap_or(0),
            close,
        })
    }
}

/// What a field value may hold ([`HeaderValue`]'s rule): visible bytes, space and tab.
fn is_value_byte(byte: u8) -> bool {
    (byte >= 0x20 && byte != 0x7f) || byte == b'\t'
}

/// A `Content-Length` value: digits only, no sign, no list, no overflow.
fn decimal(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// Writes `parts` as an HTTP/1.1 request head (origin form) to `out`, with the field
/// lines `more` (serialized already) after its own.
pub(super) fn write_request(parts: &Parts, more: &[u8], out: &mut impl BufMut) {
    out.put_slice(parts.method.as_str().as_bytes());
    out.put_u8(b' ');
    let target = parts.uri.path_and_query().map_or("/", |path| path.as_str());
    out.put_slice(target.as_bytes());
    out.put_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        put_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    out.put_slice(more);
    out.put_slice(b"\r\n");
}

/// How a response's body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    /// No body (a response to HEAD, 204, 304).
    Empty,
    /// `Content-Length` bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`, passed through as it is.
    Chunked,
    /// Until the edge's stream ends; the client's connection closes after it.
    UntilClose,
}

/// A response head read from the edge, ready to be written to the client.
#[derive(Debug)]
pub(super) struct ResponseHead {
    pub(super) status: StatusCode,
    pub(super) head_len: usize,
    pub(super) framing: Framing,
    /// The edge's stream can carry another request after this response.
    pub(super) reusable: bool,
}

/// Why the edge's response head was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(super) enum BadResponse {
    #[error("the response head is malformed")]
    Malformed,
    #[error("the response head has too many fields")]
    TooManyFields,
    #[error("the response switched protocols unasked")]
    Unasked101,
    #[error("the response's Content-Length is invalid or repeated")]
    BadLength,
}

/// Fields that concern one hop only (as the full path's `strip_hop_by_hop`), besides
/// those `Connection` names; the framing fields are the lane's to write.
const RESPONSE_HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
    "http2-settings",
    "proxy-connection",
];

/// Reads `buf` as a response head to a `method` request: `Ok(None)` if incomplete.
/// The field lines the client is to receive (hop-by-hop ones left out, the framing
/// written once) are appended to `fields`, serialized.
pub(super) fn parse_response(
    buf: &[u8],
    method: &Method,
    fields: &mut BytesMut,
) -> Result<Option<ResponseHead>, BadResponse> {
    let mut parsed = [const { MaybeUninit::uninit() }; MAX_FIELDS];
    let mut response = httparse::Response::new(&mut []);
    let parser = httparse::ParserConfig::default();
    let head_len = match parser.parse_response_with_uninit_headers(&mut response, buf, &mut parsed)
    {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(BadResponse::TooManyFields),
        Err(_) => return Err(BadResponse::Malformed),
    };
    let code = response.code.ok_or(BadResponse::Malformed)?;
    let status = StatusCode::from_u16(code).map_err(|_| BadResponse::Malformed)?;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err(BadResponse::Unasked101);
    }
    let lines = &*response.headers;
    let mut length = None;
    let mut chunked = None;
    let mut close = false;
    for field in lines {
        let name = field.name;
        if name.eq_ignore_ascii_case("content-length") {
            let parsed = decimal(field.value).ok_or(BadResponse::BadLength)?;
            if length.is_some_and(|seen| seen != parsed) {
                return Err(BadResponse::BadLength);
            }
            length = Some(parsed);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // The last coding decides: chunked is the framing only if it comes last.
            let last = field
                .value
                .rsplit(|byte| *byte == b',')
                .next()
                .unwrap_or(&[]);
            chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case("connection") {
            close |= tokens(field.value).any(|token| token.eq_ignore_ascii_case(b"close"));
        }
    }
    let keep_alive = response.version == Some(1) && !close;
    let framing = if status.is_informational()
        || *method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::Empty
    } else {
        match (chunked, length) {
            (Some(true), _) => Framing::Chunked,
            (Some(false), _) => Framing::UntilClose,
            (None, Some(length)) => Framing::Length(length),
            (None, None) => Framing::UntilClose,
        }
    };
    for field in lines {
        let name = field.name;
        let passed = if name.eq_ignore_ascii_case("content-length")
            || name.eq_ignore_ascii_case("transfer-encoding")
        {
            // A length is written below, from what was read. Transfer codings pass when
            // they frame the body (chunked last), or when the body, delimited by the
            // close, is coded (`gzip` alone): without them it could not be decoded.
            name.eq_ignore_ascii_case("transfer-encoding")
                && (framing == Framing::Chunked
                    || (framing == Framing::UntilClose && chunked == Some(false)))
        } else {
            !RESPONSE_HOP_BY_HOP
                .iter()
                .any(|hop| name.eq_ignore_ascii_case(hop))
                && !named_by_connection(lines, name)
        };
        if passed {
            put_field(fields, name.as_bytes(), field.value);
        }
    }
    if let (Some(length), Framing::Length(_) | Framing::Empty, false) =
        (length, framing, status.is_informational())
    {
        fields.put_slice(b"content-length: ");
        // Written in place: no string made per response.
        let _ = write!(fields, "{length}");
        fields.put_slice(b"\r\n");
    }
    Ok(Some(ResponseHead {
        status,
        head_len,
        framing,
        reusable: keep_alive && framing != Framing::UntilClose,
    }))
}

/// The comma-separated items of a field value, trimmed, empty ones left out.
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|byte| *byte == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|token| !token.is_empty())
}

/// True if a `Connection` field of `lines` names the field `name`.
fn named_by_connection(lines: &[httparse::Header<'_>], name: &str) -> bool {
    lines
        .iter()
        .filter(|field| field.name.eq_ignore_ascii_case("connection"))
        .flat_map(|field| tokens(field.value))
        .any(|token| token.eq_ignore_ascii_case(name.as_bytes()))
}

fn put_field(out: &mut impl BufMut, name: &[u8], value: &[u8]) {
    out.put_slice(name);
    out.put_slice(b": ");
    out.put_slice(value);
    out.put_slice(b"\r\n");
}

/// Writes a response head with the serialized `fields` to `out`, with
/// `Connection: close` if `closing`.
pub(super) fn write_response(
    head: &ResponseHead,
    fields: &[u8],
    closing: bool,
    out: &mut impl BufMut,
) {
    out.put_slice(b"HTTP/1.1 ");
    out.put_slice(head.status.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(head.status.canonical_reason().unwrap_or("").as_bytes());
    out.put_slice(b"\r\n");
    if closing {
        out.put_slice(b"connection: close\r\n");
    }
    out.put_slice(fields);
    out.put_slice(b"\r\n");
}

/// A short plain-text response the lane answers with itself (502, 504), closing.
pub(super) fn write_failure(status: StatusCode, message: &str, out: &mut impl BufMut) {
    let body = format!("{message}\n");
    out.put_slice(
        format!(
            "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            status.as_str(),
            status.canonical_reason().unwrap_or(""),
            body.len()
        )
        .as_bytes(),
    );
    out.put_slice(body.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> RequestHead {
        parse_request(&mut BytesMut::from(raw), &mut HeadRoom::default())
    }

    fn plain(raw: &str) -> PlainRequest {
        match parse(raw.as_bytes()) {
            RequestHead::Plain(plain) => plain,
            other => panic!("expected a plain request, got {other:?}"),
        }
    }

    fn declined(raw: &str) -> bool {
        matches!(parse(raw.as_bytes()), RequestHead::Decline(_))
    }

    #[test]
    fn a_plain_request_is_read_with_its_length_and_without_hop_by_hop_fields() {
        let raw = "POST /upload?x=1 HTTP/1.1\r\nHost: demo.localhost\r\nContent-Length: 5\r\n\
                   Connection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\n\r\nhello";
        let request = plain(raw);
        assert_eq!(request.parts.method, Method::POST);
        assert_eq!(request.parts.uri, "/upload?x=1");
        assert_eq!(request.body_len, 5);
        assert_eq!(request.head.len(), raw.len() - 5);
        assert!(!request.close);
        let headers = &request.parts.headers;
        assert_eq!(headers["host"], "demo.localhost");
        assert!(headers.get("connection").is_none());
        assert!(headers.get("x-secret").is_none());
        assert!(headers.get("keep-alive").is_none());

        let mut out = Vec::new();
        write_request(&request.parts, b"", &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /upload?x=1 HTTP/1.1\r\nhost: demo.localhost\r\ncontent-length: 5\r\n\r\n"
        );
    }

    #[test]
    fn a_plain_head_is_split_off_and_its_field_map_reused() {
        let raw =
            "POST /a?b=c HTTP/1.1\r\nHost: demo\r\nX-One: 1\r\nContent-Length: 4\r\n\r\nbodyGET";
        let mut buf = BytesMut::from(raw.as_bytes());
        let mut spare = HeaderMap::with_capacity(40);
        spare.insert("x-stale", HeaderValue::from_static("old"));
        let room = spare.capacity();
        let mut head_room = HeadRoom::default();
        head_room.recycle(spare);
        let RequestHead::Plain(request) = parse_request(&mut buf, &mut head_room) else {
            panic!("expected a plain request");
        };
        // What follows the head stays for the lane: the body and a pipelined request.
        assert_eq!(&buf[..], b"bodyGET");
        assert_eq!(request.head, raw[..raw.len() - 7]);
        assert_eq!(request.parts.uri, "/a?b=c");
        let headers = &request.parts.headers;
        assert!(headers.get("x-stale").is_none(), "{headers:?}");
        assert!(headers.capacity() >= room);
        assert_eq!(headers["x-one"], "1");
        assert_eq!(headers["host"], "demo");
    }

    mod reads_like_field_by_field {
        //! The lane builds a request from places in its read buffer; these properties
        //! hold it to what building field by field from copies gives.
        use super::*;
        use proptest::prelude::*;

        /// Field names: standard and not, hop-by-hop ones, and some a `Connection` may
        /// name (none that makes the lane decline: Host is added, lengths separately).
        fn name() -> impl Strategy<Value = &'static str> {
            prop::sample::select(vec![
                "Accept",
                "accept-language",
                "User-Agent",
                "X-Custom",
                "x-trace-id",
                "Cookie",
                "Connection",
                "Keep-Alive",
                "TE",
                "Proxy-Authorization",
                "Sec-Fetch-Mode",
                "DNT",
            ])
        }

        /// Values with inner spaces and tabs, none at either end (httparse trims them).
        fn value() -> impl Strategy<Value = String> {
            "[!-~]([ -~\\t]{0,24}[!-~])?"
        }

        fn raw_head(target: &str, fields: &[(&str, String)], body: &[u8]) -> Vec<u8> {
            let mut raw = format!("GET {target} HTTP/1.1\r\nHost: demo.test\r\n");
            for (name, value) in fields {
                raw.push_str(&format!("{name}: {value}\r\n"));
            }
            if !body.is_empty() {
                raw.push_str(&format!("Content-Length: {}\r\n", body.len()));
            }
            raw.push_str("\r\n");
            let mut raw = raw.into_bytes();
            raw.extend_from_slice(body);
            raw
        }

        /// The request as a field-by-field build from copies reads it.
        fn expected(fields: &[(&str, String)], body_len: usize) -> (HeaderMap, bool) {
            let mut headers = HeaderMap::new();
            headers.append(header::HOST, HeaderValue::from_static("demo.test"));
            for (name, value) in fields {
                let name = HeaderName::from_bytes(name.as_bytes()).unwrap();
                headers.append(name, HeaderValue::from_bytes(value.as_bytes()).unwrap());
            }
            let close = hop_by_hop::tokens(&headers, header::CONNECTION)
                .any(|token| token.eq_ignore_ascii_case("close"));
            strip_hop_by_hop(&mut headers, false);
            if body_len > 0 {
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body_len));
            }
            (headers, close)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(500))]

            /// Two heads in a row through one `HeadRoom`, each followed by its body and
            /// the start of the next: the same method, target, fields and framing as
            /// built from copies, and the bytes after each head left in the buffer.
            #[test]
            fn a_head_reads_as_built_from_copies(
                heads in prop::collection::vec(
                    (
                        "/[a-z0-9/?=&%.-]{0,40}",
                        prop::collection::vec((name(), value()), 0..16),
                        prop::collection::vec(any::<u8>(), 0..32),
                    ),
                    2,
                ),
            ) {
                let mut room = HeadRoom::default();
                for (target, fields, body) in &heads {
                    let raw = raw_head(target, fields, body);
                    let mut buf = BytesMut::from(&raw[..]);
                    buf.extend_from_slice(b"GET /next");
                    let RequestHead::Plain(request) = parse_request(&mut buf, &mut room) else {
                        panic!("not a plain request: {}", String::from_utf8_lossy(&raw));
                    };
                    let (headers, close) = expected(fields, body.len());
                    prop_assert_eq!(&request.parts.method, &Method::GET);
                    prop_assert_eq!(request.parts.uri.to_string(), target.clone());
                    prop_assert_eq!(&request.parts.headers, &headers);
                    prop_assert_eq!(request.close, close);
                    prop_assert_eq!(request.body_len, body.len() as u64);
                    prop_assert_eq!(request.head.len(), raw.len() - body.len());
                    let mut rest = body.clone();
                    rest.extend_from_slice(b"GET /next");
                    prop_assert_eq!(&buf[..], &rest[..]);
                    room.recycle(request.parts.headers);
                }
            }
        }
    }

    #[test]
    fn a_declined_head_is_left_in_the_buffer() {
        for raw in [
            &b"GET / HTTP/1.1\r\nHost: a\r\nX-Bad: a\x7fb\r\n\r\nrest"[..],
            b"GET / HTTP/1.1\r\nHost: a\r\nX-Bad: a\x01b\r\n\r\nrest",
            b"GET / HTTP/1.1\r\nX-None: 1\r\n\r\nrest",
        ] {
            let mut buf = BytesMut::from(raw);
            let head = parse_request(&mut buf, &mut HeadRoom::default());
            assert!(matches!(head, RequestHead::Decline(_)), "{head:?}");
            assert_eq!(&buf[..], raw);
        }
    }

    #[test]
    fn connection_cannot_name_the_framing_away() {
        let request = plain(
            "POST / HTTP/1.1\r\nHost: a\r\nConnection: content-length\r\nContent-Length: 3\r\n\r\n",
        );
        assert_eq!(request.body_len, 3);
        assert_eq!(request.parts.headers["content-length"], "3");
        let length = response(
            "HTTP/1.1 200 OK\r\nConnection: content-length, transfer-encoding\r\nContent-Length: 2\r\n\r\n",
            &Method::GET,
        );
        assert_eq!(length.framing, Framing::Length(2));
        assert_eq!(length.fields["content-length"], "2");
        let chunked = response(
            "HTTP/1.1 200 OK\r\nConnection: transfer-encoding\r\nTransfer-Encoding: chunked\r\n\r\n",
            &Method::GET,
        );
        assert_eq!(chunked.fields["transfer-encoding"], "chunked");
    }

    #[test]
    fn a_head_split_anywhere_is_partial_until_its_last_byte() {
        let raw = "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
        for end in 0..raw.len() {
            assert!(
                matches!(parse(&raw.as_bytes()[..end]), RequestHead::Partial),
                "{end}"
            );
        }
        assert!(plain(raw).close);
    }

    #[test]
    fn what_the_lane_does_not_carry_is_declined_for_hyper() {
        for raw in [
            "GET / HTTP/1.0\r\nHost: a\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
            "GET / HTTP/1.1\r\nHost : a\r\n\r\n",
            "G\0T / HTTP/1.1\r\nHost: a\r\n\r\n",
        ] {
            assert!(declined(raw), "not declined: {raw:?}");
        }
    }

    /// A response head as parsed, with the fields the client is to receive.
    struct Parsed {
        head: ResponseHead,
        fields: HeaderMap,
        raw_fields: BytesMut,
    }

    impl std::ops::Deref for Parsed {
        type Target = ResponseHead;
        fn deref(&self) -> &ResponseHead {
            &self.head
        }
    }

    fn response(raw: &str, method: &Method) -> Parsed {
        let mut raw_fields = BytesMut::new();
        let head = parse_response(raw.as_bytes(), method, &mut raw_fields)
            .expect("valid")
            .expect("complete");
        let mut fields = HeaderMap::new();
        for line in raw_fields[..].split(|byte| *byte == b'\n') {
            if line.is_empty() {
                continue;
            }
            let line = line.strip_suffix(b"\r").expect("CRLF");
            let text = std::str::from_utf8(line).expect("text");
            let (name, value) = text.split_once(": ").expect("a field line");
            fields.append(
                HeaderName::from_bytes(name.as_bytes()).expect("a name"),
                HeaderValue::from_str(value).expect("a value"),
            );
        }
        Parsed {
            head,
            fields,
            raw_fields,
        }
    }

    fn refused(raw: &[u8], method: &Method) -> Result<Option<ResponseHead>, BadResponse> {
        parse_response(raw, method, &mut BytesMut::new())
    }

    #[test]
    fn a_response_is_framed_as_rfc_9112_says() {
        let get = Method::GET;
        let length = response("HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n", &get);
        assert_eq!(
            (length.framing, length.reusable),
            (Framing::Length(12), true)
        );
        let chunked = response(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            &get,
        );
        assert_eq!(chunked.framing, Framing::Chunked);
        assert!(chunked.fields.get("content-length").is_none());
        assert_eq!(chunked.fields["transfer-encoding"], "chunked");
        let until_close = response("HTTP/1.1 200 OK\r\n\r\n", &get);
        assert_eq!(
            (until_close.framing, until_close.reusable),
            (Framing::UntilClose, false)
        );
        let gzip_only = response("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", &get);
        assert_eq!(gzip_only.framing, Framing::UntilClose);
        assert_eq!(
            gzip_only.fields["transfer-encoding"], "gzip",
            "a coded body delimited by the close keeps its coding"
        );
        let head = response(
            "HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n",
            &Method::HEAD,
        );
        assert_eq!(head.framing, Framing::Empty);
        for code in [204, 304, 103] {
            let raw = format!("HTTP/1.1 {code} X\r\nContent-Length: 7\r\n\r\n");
            assert_eq!(response(&raw, &get).framing, Framing::Empty, "{code}");
        }
        let closing = response(
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
            &get,
        );
        assert!(!closing.reusable);
        let old = response("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", &get);
        assert!(!old.reusable);
        let same_twice = response(
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n",
            &get,
        );
        assert_eq!(same_twice.framing, Framing::Length(2));
        assert_eq!(
            same_twice.fields.get_all("content-length").iter().count(),
            1
        );
    }

    #[test]
    fn ambiguous_or_malformed_responses_are_refused() {
        let get = Method::GET;
        for (raw, why) in [
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
                BadResponse::BadLength,
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
                BadResponse::BadLength,
            ),
            (
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
                BadResponse::Unasked101,
            ),
            ("HTTP/1.1 2000 OK\r\n\r\n", BadResponse::Malformed),
            (
                "HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
                BadResponse::Malformed,
            ),
            ("NOT HTTP\r\n\r\n", BadResponse::Malformed),
        ] {
            assert_eq!(refused(raw.as_bytes(), &get).unwrap_err(), why, "{raw:?}");
        }
        assert!(refused(b"HTTP/1.1 200 OK\r\nContent-Le", &get)
            .unwrap()
            .is_none());
    }

    #[test]
    fn a_response_head_is_written_canonically_without_hop_by_hop_fields() {
        let head = response(
            "HTTP/1.1 404 Whatever\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\
             Content-Length: 0\r\nX-Kept: yes\r\n\r\n",
            &Method::GET,
        );
        let mut out = Vec::new();
        write_response(&head, &head.raw_fields, true, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 404 Not Found\r\nconnection: close\r\nX-Kept: yes\r\ncontent-length: 0\r\n\r\n"
        );
    }
}
