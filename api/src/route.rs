//! What a route table may contain, as both sides check it: the control plane before it sends a
//! table (so that a user's mistake is reported in the route's status, not NACKed by every
//! proxy) and the proxy when it applies one.

/// Header names a route may not edit: framing and connection headers, and the mesh's own.
pub const PROTECTED_HEADERS: &[&str] = &[
    "connection",
    "content-length",
    "transfer-encoding",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "proxy-connection",
    "host",
    "x-mycel-error",
    "x-forwarded-client-cert",
];

/// Whether a route may edit header `name` (any case).
pub fn editable(name: &str) -> bool {
    !PROTECTED_HEADERS.contains(&name.to_ascii_lowercase().as_str())
}

/// What one compiled regular expression may take.
pub const REGEX_SIZE_LIMIT: usize = 64 << 10;

/// Compiles a route's regular expression as the data path runs it: matching the whole value,
/// size-bounded.
pub fn compile_regex(re: &str) -> Result<regex::Regex, regex::Error> {
    regex::RegexBuilder::new(&format!("^(?:{re})$")).size_limit(REGEX_SIZE_LIMIT).build()
}

/// Whether `name` is a cookie name (an RFC 6265 token).
pub fn cookie_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 256
        && name.bytes().all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
}

/// Whether `path` can be a cookie's `Path` attribute (starts with `/`, no `;` or control bytes).
pub fn cookie_path(path: &str) -> bool {
    path.starts_with('/') && path.len() <= 1024 && path.bytes().all(|b| b.is_ascii_graphic() && b != b';')
}
