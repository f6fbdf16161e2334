//! A TLS connection's state beside its socket: rustls's sans-IO `ServerConnection`, fed and
//! drained through any `Read`/`Write` (the reactor's `TcpStream`, or memory in the tests).
//! The fan-out core never sees it: it is handed plaintext by the driver, and writes plaintext
//! through the driver's `Transport`, which encrypts here.
//!
//! **The driver's duties.**
//! - Reading: [`TlsLink::take_plaintext`] until it has nothing, then [`TlsLink::read_from`] the
//!   socket once, then [`TlsLink::flush_to`] the socket (the handshake answers), and again; stop
//!   at the socket's `WouldBlock`. Plaintext is always taken out before more ciphertext is read,
//!   so rustls's own buffers stay at one record or so.
//! - After each read, [`TlsLink::poll_peer_names`]: once the handshake has verified a client
//!   certificate, its names (for the identity), exactly once.
//! - Writing: [`TlsLink::flush_to`] first; only when that has written everything,
//!   [`TlsLink::write_plain`] (at most [`TLS_SEND_LIMIT`] bytes are taken at a time), then
//!   `flush_to` again. Ciphertext left by a `WouldBlock` waits for the socket's next writable
//!   event, when the driver must call `flush_to` even if the core has nothing new to write.
//! - A [`TlsIoError::Tls`] (bad handshake, bad record, refused certificate): `flush_to` once
//!   more, best effort, to send rustls's alert, then close the connection.

use std::io::{self, IoSlice, Read, Write};
use std::sync::Arc;

/// Plaintext (and its ciphertext) a connection may have waiting inside rustls before
/// [`TlsLink::write_plain`] takes no more: half of one flush's `MAX_WRITE_BYTES`, so a
/// subscriber that stops reading holds this much in TLS buffers besides its outbox.
pub(crate) const TLS_SEND_LIMIT: usize = 256 * 1024;

/// Why reading from a TLS connection failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsIoError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
}

/// What [`TlsLink::take_plaintext`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Plain {
    /// This many decrypted bytes were copied out.
    Bytes(usize),
    /// None waiting: read more ciphertext.
    Empty,
    /// The peer sent close_notify: a clean end of the stream.
    Closed,
}

pub(crate) struct TlsLink {
    conn: rustls::ServerConnection,
    names_given: bool,
}

impl TlsLink {
    pub(crate) fn new(config: Arc<rustls::ServerConfig>) -> Result<TlsLink, rustls::Error> {
        let mut conn = rustls::ServerConnection::new(config)?;
        conn.set_buffer_limit(Some(TLS_SEND_LIMIT));
        Ok(TlsLink {
            conn,
            names_given: false,
        })
    }

    /// One read of ciphertext from `socket`, processed: returns the bytes read, 0 at the end of
    /// the stream. rustls reads at most about one record's worth per call.
    pub(crate) fn read_from(&mut self, socket: &mut impl Read) -> Result<usize, TlsIoError> {
        let n = self.conn.read_tls(socket)?;
        self.conn.process_new_packets()?;
        Ok(n)
    }

    /// Copies decrypted bytes into `buf` (which must not be empty).
    pub(crate) fn take_plaintext(&mut self, buf: &mut [u8]) -> Plain {
        debug_assert!(!buf.is_empty());
        match self.conn.reader().read(buf) {
            Ok(0) => Plain::Closed,
            Ok(n) => Plain::Bytes(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Plain::Empty,
            // UnexpectedEof: the socket ended without close_notify. The socket's own EOF
            // (read_from → 0) tells the driver; nothing more to take here.
            Err(_) => Plain::Empty,
        }
    }

    /// Once, after the handshake: the names of the client certificate it verified
    /// (`crate::tls::certificate_names`), `Some(empty)` when the client sent none.
    pub(crate) fn poll_peer_names(&mut self) -> Option<Vec<String>> {
        if self.names_given || self.conn.is_handshaking() {
            return None;
        }
        self.names_given = true;
        Some(
            self.conn
                .peer_certificates()
                .and_then(<[_]>::first)
                .map(|leaf| crate::tls::certificate_names(leaf))
                .unwrap_or_default(),
        )
    }

    /// Whether the handshake is still going on.
    #[cfg(test)]
    pub(crate) fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// Encrypts what rustls takes of `slices` (up to [`TLS_SEND_LIMIT`] waiting) and returns
    /// how many plaintext bytes it took.
    pub(crate) fn write_plain(&mut self, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        self.conn.writer().write_vectored(slices)
    }

    /// Writes waiting ciphertext to `socket`: `Ok(true)` once all of it is written, `Ok(false)`
    /// when the socket would block with some left.
    pub(crate) fn flush_to(&mut self, socket: &mut impl Write) -> io::Result<bool> {
        while self.conn.wants_write() {
            match self.conn.write_tls(socket) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Queues close_notify (the caller flushes it, then shuts the socket's write side).
    pub(crate) fn close(&mut self) {
        self.conn.send_close_notify();
    }
}

#[cfg(test)]
mod tests {
    //! The wrapper driven against a rustls client through memory, with no socket: the reactor's
    //! calls in the reactor's order.
    use super::*;
    use std::collections::VecDeque;

    /// One direction of a pretend socket: a byte queue that says WouldBlock when empty, or
    /// when `room` is spent for writes.
    #[derive(Default)]
    struct Pipe {
        bytes: VecDeque<u8>,
        room: Option<usize>,
    }

    impl Read for Pipe {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.bytes.is_empty() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.bytes.len());
            for (dst, src) in buf.iter_mut().zip(self.bytes.drain(..n)) {
                *dst = src;
            }
            Ok(n)
        }
    }

    impl Write for Pipe {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = self.room.map_or(buf.len(), |room| room.min(buf.len()));
            if n == 0 && !buf.is_empty() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            if let Some(room) = self.room.as_mut() {
                *room -= n;
            }
            self.bytes.extend(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct Pki {
        server: Arc<rustls::ServerConfig>,
        client: Arc<rustls::ClientConfig>,
    }

    fn pki(client_cert_cn: Option<&str>) -> Pki {
        let provider = crate::tls::provider;
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let leaf = |names: Vec<String>, cn: Option<&str>| {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(names).unwrap();
            if let Some(cn) = cn {
                params
                    .distinguished_name
                    .push(rcgen::DnType::CommonName, cn);
            }
            let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
            (
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
        };
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der().clone()).unwrap();
        let roots = Arc::new(roots);
        let (server_chain, server_key) = leaf(vec!["localhost".into()], None);
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .allow_unauthenticated()
                .build()
                .unwrap();
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(server_chain, server_key)
            .unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let client = match client_cert_cn {
            None => client.with_no_client_auth(),
            Some(cn) => {
                let (chain, key) = leaf(vec![], Some(cn));
                client.with_client_auth_cert(chain, key).unwrap()
            }
        };
        Pki {
            server: Arc::new(server),
            client: Arc::new(client),
        }
    }

    /// Runs the handshake and one exchange; returns the server link and the client.
    fn connected(
        pki: &Pki,
        to_server: &mut Pipe,
        to_client: &mut Pipe,
    ) -> (TlsLink, rustls::ClientConnection, Option<Vec<String>>) {
        let mut link = TlsLink::new(pki.server.clone()).unwrap();
        let mut client =
            rustls::ClientConnection::new(pki.client.clone(), "localhost".try_into().unwrap())
                .unwrap();
        let mut names = None;
        for _ in 0..10 {
            while client.wants_write() {
                client.write_tls(to_server).unwrap();
            }
            if !to_server.bytes.is_empty() {
                link.read_from(to_server).unwrap();
                assert!(link.flush_to(to_client).unwrap());
                if let Some(n) = link.poll_peer_names() {
                    assert!(names.is_none(), "names are given once");
                    names = Some(n);
                }
            }
            if !to_client.bytes.is_empty() {
                client.read_tls(to_client).unwrap();
                client.process_new_packets().unwrap();
            }
            if !client.is_handshaking() && !link.is_handshaking() && !client.wants_write() {
                break;
            }
        }
        assert!(!link.is_handshaking());
        (link, client, names)
    }

    #[test]
    fn plaintext_crosses_both_ways_and_the_certificate_names_come_once() {
        let pki = pki(Some("gateway1"));
        let (mut to_server, mut to_client) = (Pipe::default(), Pipe::default());
        let (mut link, mut client, names) = connected(&pki, &mut to_server, &mut to_client);
        assert_eq!(names, Some(vec!["gateway1".to_string()]));
        client.writer().write_all(b"HELLO").unwrap();
        client.write_tls(&mut to_server).unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(link.take_plaintext(&mut buf), Plain::Empty);
        assert!(link.read_from(&mut to_server).unwrap() > 0);
        assert_eq!(link.take_plaintext(&mut buf), Plain::Bytes(5));
        assert_eq!(&buf[..5], b"HELLO");
        assert_eq!(link.poll_peer_names(), None);

        let taken = link
            .write_plain(&[IoSlice::new(b"WEL"), IoSlice::new(b"COME")])
            .unwrap();
        assert_eq!(taken, 7);
        assert!(link.flush_to(&mut to_client).unwrap());
        client.read_tls(&mut to_client).unwrap();
        client.process_new_packets().unwrap();
        let mut got = [0u8; 16];
        let n = client.reader().read(&mut got).unwrap();
        assert_eq!(&got[..n], b"WELCOME");

        client.send_close_notify();
        client.write_tls(&mut to_server).unwrap();
        link.read_from(&mut to_server).unwrap();
        assert_eq!(link.take_plaintext(&mut buf), Plain::Closed);
    }

    #[test]
    fn no_client_certificate_gives_no_names() {
        let pki = pki(None);
        let (mut to_server, mut to_client) = (Pipe::default(), Pipe::default());
        let (_, _, names) = connected(&pki, &mut to_server, &mut to_client);
        assert_eq!(names, Some(vec![]));
    }

    #[test]
    fn a_full_socket_keeps_ciphertext_and_the_send_limit_bounds_it() {
        let pki = pki(None);
        let (mut to_server, mut to_client) = (Pipe::default(), Pipe::default());
        let (mut link, mut client, _) = connected(&pki, &mut to_server, &mut to_client);
        to_client.room = Some(1000);
        let big = vec![7u8; 1024 * 1024];
        let taken = link.write_plain(&[IoSlice::new(&big)]).unwrap();
        assert!(taken <= TLS_SEND_LIMIT, "took {taken}");
        assert!(taken > 0);
        assert!(
            !link.flush_to(&mut to_client).unwrap(),
            "the socket is full"
        );
        // No more is taken than the socket made room for: rustls's buffer stays at the limit.
        let more = link.write_plain(&[IoSlice::new(&big)]).unwrap();
        assert!(more <= 1000, "took {more} more");
        let taken = taken + more;
        // The socket drains: the rest of the ciphertext goes, and decrypts to what was taken.
        to_client.room = None;
        assert!(link.flush_to(&mut to_client).unwrap());
        let mut received = 0;
        let mut got = vec![0u8; 64 * 1024];
        while !to_client.bytes.is_empty() {
            client.read_tls(&mut to_client).unwrap();
            client.process_new_packets().unwrap();
            while let Ok(n) = client.reader().read(&mut got) {
                if n == 0 {
                    break;
                }
                assert!(got[..n].iter().all(|&b| b == 7));
                received += n;
            }
        }
        assert_eq!(received, taken);
    }

    #[test]
    fn plaintext_or_garbage_where_a_handshake_belongs_is_a_tls_error_with_an_alert() {
        let pki = pki(None);
        for junk in [
            &b"\x00\x00\x00\x1aHELLO-in-the-clear......."[..],
            b"GET / HTTP/1.1\r\n\r\n",
            &[0x16, 0x03, 0x01, 0xff, 0xff, 1, 2, 3],
        ] {
            let mut link = TlsLink::new(pki.server.clone()).unwrap();
            let mut to_server = Pipe::default();
            to_server.bytes.extend(junk);
            let err = link.read_from(&mut to_server).unwrap_err();
            assert!(matches!(err, TlsIoError::Tls(_)), "{err:?}");
            let mut to_client = Pipe::default();
            assert!(link.flush_to(&mut to_client).unwrap());
            assert_eq!(to_client.bytes.front(), Some(&0x15), "an alert record");
        }
    }
}
