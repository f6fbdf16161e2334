//! The client's byte stream: plain TCP, or TLS over it with rustls's blocking `StreamOwned`.
//! Both offer the two calls `Conn` needs: a send that says whether it had to wait (pacing), and
//! a read bounded by a timeout (or non-blocking).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::ClientError;
use crate::tls::ClientTls;

type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
}

/// Writes to a socket without blocking (a flag on the call, not on the socket).
struct DontWait<'a>(&'a TcpStream);

impl Write for DontWait<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        socket2::SockRef::from(self.0).send_with_flags(buf, libc::MSG_DONTWAIT)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One `recv` that does not wait: `WouldBlock` when nothing is there.
fn recv_dontwait(socket: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the duration of the call, and
    // recv writes at most that many.
    let n = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            buf.as_mut_ptr().cast::<libc::c_void>(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// The rustls error inside an I/O error, if it is one (a TLS alert, a bad record).
pub(crate) fn tls_cause(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

impl Stream {
    /// Wraps a connected socket; with `tls`, runs the handshake within `deadline` and
    /// verifies the engine's certificate for `server` (or the configured name).
    pub(crate) fn open(
        socket: TcpStream,
        tls: Option<&ClientTls>,
        server: &str,
        deadline: Instant,
    ) -> Result<Stream, ClientError> {
        let Some(tls) = tls else {
            return Ok(Stream::Plain(socket));
        };
        let failed = |reason: String| ClientError::Tls {
            addr: server.to_string(),
            reason,
        };
        let name = tls.name_for(server).map_err(|e| failed(e.to_string()))?;
        let mut conn = rustls::ClientConnection::new(tls.config.clone(), name)
            .map_err(|e| failed(e.to_string()))?;
        let mut socket = socket;
        while conn.is_handshaking() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(failed("no TLS handshake within the connect timeout".into()));
            }
            socket.set_read_timeout(Some(left))?;
            socket.set_write_timeout(Some(left))?;
            if let Err(e) = conn.complete_io(&mut socket) {
                let reason = match tls_cause(&e) {
                    Some(tls) => tls.to_string(),
                    None if e.kind() == io::ErrorKind::UnexpectedEof => {
                        "the engine closed the connection during the handshake".into()
                    }
                    None => e.to_string(),
                };
                return Err(failed(reason));
            }
        }
        Ok(Stream::Tls(Box::new(rustls::StreamOwned::new(
            conn, socket,
        ))))
    }

    /// The TCP socket underneath.
    pub(crate) fn socket(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => &s.sock,
        }
    }

    /// Writes all of `bytes`; returns how long it had to wait for the kernel to take them
    /// (`None`: taken at once, see `Conn::send`).
    pub(crate) fn send(&mut self, bytes: &[u8]) -> io::Result<Option<Duration>> {
        match self {
            Stream::Plain(stream) => {
                let sent = match DontWait(stream).write(bytes) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
                    Err(e) => return Err(e),
                };
                if sent < bytes.len() {
                    let started = Instant::now();
                    stream.write_all(&bytes[sent..])?;
                    Ok(Some(started.elapsed()))
                } else {
                    Ok(None)
                }
            }
            Stream::Tls(tls) => {
                let (conn, socket) = (&mut tls.conn, &tls.sock);
                let mut waited = None;
                let mut taken = 0;
                while taken < bytes.len() || conn.wants_write() {
                    if taken < bytes.len() {
                        taken += conn.writer().write(&bytes[taken..])?;
                    }
                    while conn.wants_write() {
                        match conn.write_tls(&mut DontWait(socket)) {
                            Ok(_) => {}
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                let started = Instant::now();
                                let mut blocking = socket;
                                while conn.wants_write() {
                                    conn.write_tls(&mut blocking)?;
                                }
                                let total: Duration = waited.unwrap_or_default();
                                waited = Some(total + started.elapsed());
                            }
                            Err(e) => return Err(e),
                        }
                    }
                }
                Ok(waited)
            }
        }
    }

    /// One read: blocking up to `timeout`, or non-blocking when it is `None`. `Ok(0)` is the
    /// end of the stream.
    pub(crate) fn read(&mut self, buf: &mut [u8], timeout: Option<Duration>) -> io::Result<usize> {
        match timeout {
            // Plain TCP: one `recv` with MSG_DONTWAIT (a flag on the call, as `DontWait` does
            // for writes), not three syscalls that switch the socket to non-blocking and back.
            None => match self {
                Stream::Plain(s) => recv_dontwait(s, buf),
                Stream::Tls(_) => {
                    self.socket().set_nonblocking(true)?;
                    let r = self.read_now(buf);
                    self.socket().set_nonblocking(false)?;
                    r
                }
            },
            Some(t) => {
                // A zero read timeout means "block forever" to the OS: never pass one.
                self.socket()
                    .set_read_timeout(Some(t.max(Duration::from_micros(100))))?;
                self.read_now(buf)
            }
        }
    }

    fn read_now(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => match s.read(buf) {
                // The engine closed without close_notify (it cut the connection): an end of
                // stream like any other for this protocol, whose frames are self-delimiting.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
                other => other,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A non-blocking read of a plain stream says `WouldBlock` when nothing waits, takes what
    /// came, and leaves the socket blocking for the timed reads.
    #[test]
    fn a_plain_read_without_timeout_does_not_wait_and_leaves_the_socket_blocking() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut peer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (socket, _) = listener.accept().unwrap();
        let mut stream = Stream::Plain(socket);
        let mut buf = [0u8; 16];
        let started = Instant::now();
        let e = stream.read(&mut buf, None).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert!(started.elapsed() < Duration::from_secs(1));
        peer.write_all(b"hello").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let n = loop {
            match stream.read(&mut buf, None) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::yield_now()
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(&buf[..n], b"hello");
        // Still blocking: a timed read waits its timeout instead of failing at once.
        let started = Instant::now();
        let e = stream
            .read(&mut buf, Some(Duration::from_millis(50)))
            .unwrap_err();
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "{e}"
        );
        assert!(started.elapsed() >= Duration::from_millis(40));
    }
}
