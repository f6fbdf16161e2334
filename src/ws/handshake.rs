//! The HTTP/1.1 upgrade request that opens a WebSocket (RFC 6455 §4.2), parsed by `httparse`,
//! and the server's answer: `101 Switching Protocols` with the accept key and the chosen
//! subprotocol, or a refusal (`400` with the reason, `403` for an Origin outside the allow-list,
//! `431` for a head larger than [`MAX_REQUEST_BYTES`]). Sans-IO: bytes in, bytes out.

use base64::Engine as _;

use super::Subprotocol;

/// Largest request head (request line and headers) the engine buffers; a longer one gets 431.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Most headers a request may carry (browsers send about 15).
const MAX_HEADERS: usize = 48;

/// Which pages may open a WebSocket: the `Origin` a browser sends must be one of these.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OriginPolicy {
    /// Exact origins (`scheme://host[:port]`, compared without regard to ASCII case); `*`
    /// allows any. A request without `Origin` is not a browser's and is always allowed: the
    /// header protects users' browsers from other sites' pages, not the engine from programs.
    pub allowed: Vec<String>,
}

impl OriginPolicy {
    pub fn allows(&self, origin: &str) -> bool {
        let origin = origin.trim().trim_end_matches('/');
        self.allowed
            .iter()
            .any(|a| a == "*" || a.trim_end_matches('/').eq_ignore_ascii_case(origin))
    }
}

/// What a buffered request head amounts to so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Upgrade {
    /// The head is not complete yet.
    NeedMore,
    /// A valid upgrade: send `response`; the first `used` bytes were the head (what follows
    /// is WebSocket frames).
    Accepted {
        used: usize,
        subprotocol: Subprotocol,
        response: Vec<u8>,
    },
}

/// A refused upgrade: the status line and the reason given to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: String,
}

impl Refusal {
    fn bad(reason: impl Into<String>) -> Refusal {
        Refusal {
            status: 400,
            reason: reason.into(),
        }
    }

    /// The HTTP response: the reason as a one-line plain-text body; the connection closes.
    pub fn response(&self) -> Vec<u8> {
        let status_text = match self.status {
            403 => "Forbidden",
            431 => "Request Header Fields Too Large",
            _ => "Bad Request",
        };
        let body = format!("{}\n", self.reason);
        let mut out = format!(
            "HTTP/1.1 {} {status_text}\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Length: {}\r\nConnection: close\r\n",
            self.status,
            body.len()
        );
        if self.status == 400 && self.reason.contains("Sec-WebSocket-Version") {
            out.push_str("Sec-WebSocket-Version: 13\r\n");
        }
        out.push_str("\r\n");
        out.push_str(&body);
        out.into_bytes()
    }
}

/// Parses the request head at the start of `buf` and decides. The subprotocol is the first
/// of the client's `Sec-WebSocket-Protocol` offers that the engine speaks.
pub fn handle_request(buf: &[u8], origins: &OriginPolicy) -> Result<Upgrade, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let used = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_REQUEST_BYTES => {
            return Err(Refusal {
                status: 431,
                reason: format!("request head longer than {MAX_REQUEST_BYTES} bytes"),
            })
        }
        Ok(httparse::Status::Partial) => return Ok(Upgrade::NeedMore),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refusal {
                status: 431,
                reason: format!("more than {MAX_HEADERS} headers"),
            })
        }
        Err(e) => return Err(Refusal::bad(format!("malformed HTTP request: {e}"))),
    };
    if used > MAX_REQUEST_BYTES {
        return Err(Refusal {
            status: 431,
            reason: format!("request head longer than {MAX_REQUEST_BYTES} bytes"),
        });
    }
    if req.method != Some("GET") {
        return Err(Refusal::bad(format!(
            "a WebSocket upgrade is a GET, not {}",
            req.method.unwrap_or("?")
        )));
    }
    if req.version != Some(1) {
        return Err(Refusal::bad("a WebSocket upgrade needs HTTP/1.1"));
    }
    let headers: &[httparse::Header<'_>] = req.headers;
    let values = |name: &'static str| {
        headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| std::str::from_utf8(h.value).unwrap_or(""))
    };
    let has_token = |name: &'static str, token: &str| {
        values(name)
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if !has_token("upgrade", "websocket") {
        return Err(Refusal::bad(
            "not a WebSocket upgrade: no `Upgrade: websocket` header",
        ));
    }
    if !has_token("connection", "upgrade") {
        return Err(Refusal::bad(
            "not a WebSocket upgrade: no `Connection: Upgrade` header",
        ));
    }
    if values("sec-websocket-version").map(str::trim).next() != Some("13") {
        return Err(Refusal::bad(
            "unsupported Sec-WebSocket-Version: this engine speaks 13 (RFC 6455)",
        ));
    }
    let key = values("sec-websocket-key").next().unwrap_or("").trim();
    let key_ok = base64::engine::general_purpose::STANDARD
        .decode(key)
        .is_ok_and(|k| k.len() == 16);
    if !key_ok {
        return Err(Refusal::bad(
            "Sec-WebSocket-Key must be 16 bytes in base64 (RFC 6455 §4.1)",
        ));
    }
    if let Some(origin) = values("origin").next() {
        if !origins.allows(origin) {
            return Err(Refusal {
                status: 403,
                reason: format!("origin {origin:?} is not in websocket.origins"),
            });
        }
    }
    let subprotocol = values("sec-websocket-protocol")
        .flat_map(|v| v.split(','))
        .find_map(|offer| Subprotocol::from_name(offer.trim()));
    let Some(subprotocol) = subprotocol else {
        return Err(Refusal::bad(format!(
            "no supported subprotocol: offer `{}` or `{}` in Sec-WebSocket-Protocol",
            Subprotocol::Mqtt.name(),
            Subprotocol::Json.name()
        )));
    };
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: {}\r\n\r\n",
        subprotocol.name()
    )
    .into_bytes();
    Ok(Upgrade::Accepted {
        used,
        subprotocol,
        response,
    })
}
