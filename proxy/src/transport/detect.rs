//! Protocol detection on a connection's first bytes, without consuming them: HTTP/2 prior
//! knowledge (the connection preface), HTTP/1.x (a request line's method), a TLS ClientHello
//! (with its SNI and ALPN), or else opaque TCP. A client that sends nothing within the detection
//! timeout is taken to be talking to a server-first protocol (SMTP, MySQL, …) and left opaque.

use std::time::Duration;

use tokio::net::TcpStream;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: &[&[u8]] =
    &[b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"CONNECT ", b"OPTIONS ", b"TRACE ", b"PATCH "];

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Detected {
    Http1,
    Http2,
    Tls {
        sni: Option<String>,
        alpn: Vec<String>,
    },
    /// Bytes that are none of the above, or none within the timeout.
    Opaque,
}

impl Detected {
    pub fn label(&self) -> &'static str {
        match self {
            Detected::Http1 | Detected::Http2 => "http",
            Detected::Tls { .. } => "tls",
            Detected::Opaque => "tcp",
        }
    }
}

/// What the bytes seen so far say, or `None` if more are needed to tell.
pub fn classify(buf: &[u8]) -> Option<Detected> {
    if buf.is_empty() {
        return None;
    }
    if H2_PREFACE.starts_with(&buf[..buf.len().min(H2_PREFACE.len())]) {
        return (buf.len() >= H2_PREFACE.len()).then_some(Detected::Http2);
    }
    match http1(buf) {
        Some(true) => return Some(Detected::Http1),
        None => return None,
        Some(false) => {}
    }
    if buf[0] == 0x16 {
        if buf.len() < 5 {
            return None;
        }
        if buf[1] == 0x03 && buf[2] <= 0x04 {
            let record_len = u16::from_be_bytes([buf[3], buf[4]]) as usize;
            if buf.len() < 5 + record_len {
                // The whole ClientHello (SNI, ALPN) fits one record in practice; wait for it.
                return if record_len <= 16 * 1024 {
                    None
                } else {
                    Some(Detected::Tls { sni: None, alpn: vec![] })
                };
            }
            let (sni, alpn) = parse_client_hello(&buf[5..5 + record_len]).unwrap_or((None, vec![]));
            return Some(Detected::Tls { sni, alpn });
        }
    }
    Some(Detected::Opaque)
}

/// Whether `buf` starts an HTTP/1.x request: `Some(true)` it does, `Some(false)` it cannot,
/// `None` it may (more bytes tell). Generous on purpose: whatever an HTTP server would parse as a
/// request must be parsed here too, or its headers (a forged `x-forwarded-client-cert`) would
/// reach the app unchecked. So empty lines before the request line are skipped (RFC 9112 §2.2),
/// and any method token is taken — the common ones at once, others once the request line ends
/// in `HTTP/1.x`.
fn http1(buf: &[u8]) -> Option<bool> {
    let mut b = buf;
    let mut empty_lines = 0;
    while let Some(rest) = b.strip_prefix(b"\r\n").or_else(|| b.strip_prefix(b"\n")) {
        b = rest;
        empty_lines += 1;
        if empty_lines > 8 {
            return Some(false);
        }
    }
    if b.is_empty() || b == b"\r" {
        return None;
    }
    let token = b
        .iter()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b'!' | b'~'))
        .count();
    if token == 0 || token > 32 {
        return Some(false);
    }
    if token == b.len() {
        // A token still being written: a method, or the start of something else.
        return b.iter().all(|c| c.is_ascii_uppercase()).then_some(()).map_or(Some(false), |()| None);
    }
    if b[token] != b' ' {
        return Some(false);
    }
    if METHODS.iter().any(|m| b.starts_with(m)) {
        return Some(true);
    }
    match b.iter().position(|c| *c == b'\n') {
        Some(end) => {
            let line = b[..end].strip_suffix(b"\r").unwrap_or(&b[..end]);
            Some(line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0"))
        }
        None if b.len() > 8 * 1024 => Some(false),
        None => None,
    }
}

/// SNI and ALPN of a ClientHello handshake message (RFC 8446 §4.1.2, RFC 6066, RFC 7301).
fn parse_client_hello(msg: &[u8]) -> Option<(Option<String>, Vec<String>)> {
    let mut r = Reader(msg);
    if r.u8()? != 1 {
        return None; // not a ClientHello
    }
    let body = r.vec24()?;
    let mut r = Reader(body);
    r.take(2 + 32)?; // legacy_version, random
    let sid = r.u8()? as usize;
    r.take(sid)?;
    let suites = r.u16()? as usize;
    r.take(suites)?;
    let comp = r.u8()? as usize;
    r.take(comp)?;
    let mut exts = Reader(r.vec16()?);
    let (mut sni, mut alpn) = (None, Vec::new());
    while !exts.0.is_empty() {
        let kind = exts.u16()?;
        let mut data = Reader(exts.vec16()?);
        match kind {
            0 => {
                let mut list = Reader(data.vec16()?);
                while !list.0.is_empty() {
                    let name_type = list.u8()?;
                    let name = list.vec16()?;
                    if name_type == 0 {
                        sni = String::from_utf8(name.to_vec()).ok();
                    }
                }
            }
            16 => {
                let mut list = Reader(data.vec16()?);
                while !list.0.is_empty() {
                    let p = list.vec8()?;
                    alpn.push(String::from_utf8_lossy(p).into_owned());
                }
            }
            _ => {}
        }
    }
    Some((sni, alpn))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3).map(|b| (b[0] as usize) << 16 | (b[1] as usize) << 8 | b[2] as usize)
    }
    /// A length-prefixed vector (8-, 16- or 24-bit length).
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()? as usize;
        self.take(n)
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()? as usize;
        self.take(n)
    }
    fn vec24(&mut self) -> Option<&'a [u8]> {
        let n = self.u24()?;
        self.take(n)
    }
}

/// Peeks at `stream` until its first bytes tell the protocol, the client closes, or `timeout`.
pub async fn detect(stream: &TcpStream, timeout: Duration) -> Detected {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = vec![0u8; 16 * 1024 + 5];
    let mut seen = 0;
    // Out of time with bytes that may still be an HTTP request (a client writing its request
    // line slowly): HTTP, so that its headers are read, not passed through.
    let undecided = |buf: &[u8], seen: usize| {
        if seen > 0 && http1(&buf[..seen]).is_none() { Detected::Http1 } else { Detected::Opaque }
    };
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            Ok(Err(_)) => return Detected::Opaque,
            Err(_) => return undecided(&buf, seen),
        };
        if n == 0 {
            return Detected::Opaque;
        }
        if let Some(d) = classify(&buf[..n]) {
            return d;
        }
        if n == buf.len() {
            return Detected::Opaque;
        }
        if n == seen {
            // Nothing new yet: wait a little for the rest of the first flight.
            if tokio::time::timeout_at(deadline, tokio::time::sleep(Duration::from_millis(2))).await.is_err()
            {
                return undecided(&buf, seen);
            }
        }
        seen = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_is_told_from_its_first_bytes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"DELETE /x"), Some(Detected::Http1));
        assert_eq!(classify(b"GE"), None, "a prefix of a method needs more bytes");
        assert_eq!(classify(H2_PREFACE), Some(Detected::Http2));
        assert_eq!(classify(&H2_PREFACE[..10]), None);
        // Was `GETX` → opaque; any token can be a method, so a token waits for what follows.
        assert_eq!(classify(b"GETX\r\n"), Some(Detected::Opaque));
        assert_eq!(classify(b"\x00\x01binary"), Some(Detected::Opaque));
        assert_eq!(classify(b"SSH-2.0-OpenSSH"), Some(Detected::Opaque));
    }

    #[test]
    fn whatever_a_server_would_parse_as_http_is_http() {
        // Empty lines before the request line (servers skip them).
        assert_eq!(classify(b"\r\nGET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"\r\n"), None);
        // Methods beyond the common ones, once the request line says HTTP/1.x.
        assert_eq!(classify(b"PROPFIND /dav HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"PURGE /x"), None);
        // Lines that are not requests stay opaque: Redis inline commands, SMTP, binary.
        assert_eq!(classify(b"SET key value\r\n"), Some(Detected::Opaque));
        assert_eq!(classify(b"PING\r\n"), Some(Detected::Opaque));
        assert_eq!(classify(b"*1\r\n$4\r\nPING\r\n"), Some(Detected::Opaque));
        assert_eq!(http1(b"GE"), None, "a method being written is undecided (HTTP if time runs out)");
        assert_eq!(http1(b"ge"), Some(false));
    }
}
