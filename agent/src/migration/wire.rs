//! Blocking framed connection over TCP, or TLS over TCP (`--tls-*`): reads a whole
//! header, checks it, reads exactly the declared payload, then decodes. Used by the
//! sender and receiver threads.

use std::io::{IoSlice, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use super::protocol::{
    Command, Compression, ErrorCode, FrameHeader, HEADER_LEN, Message, ProtocolError,
};

/// How long a peer may stay silent before the connection is declared dead. Bounds
/// every wait, so a killed peer or a cut link ends the migration instead of hanging.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("peer sent a malformed frame: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("peer reported {code:?}: {message}")]
    Remote { code: ErrorCode, message: String },
    #[error("peer sent {0:?} where another message was expected")]
    Unexpected(super::protocol::Command),
    /// The header was refused before its payload was read or allocated.
    #[error("peer's frame refused from its header: {0}")]
    Refused(String),
}

/// The frames a sender accepts from a receiver (responses only; each is small, so a
/// receiver cannot make the sender allocate more than a few KiB per frame).
fn response_only(h: &FrameHeader) -> Result<(), String> {
    match h.cmd {
        Command::Challenge | Command::Ok | Command::Error => Ok(()),
        other => Err(format!("{other:?} is not a response")),
    }
}

/// The socket under a TLS stream, read through a buffer: rustls reads records 4 KiB
/// at a time, which would cost a syscall per 4 KiB of a 64 MiB Memory frame.
pub struct BufSock(std::io::BufReader<TcpStream>);

/// Most slices one writev takes (Linux's UIO_MAXIOV).
const IOV_MAX: usize = 1024;

/// Plaintext rustls takes (and encrypts) per write before it must reach the socket:
/// a Memory frame's ranges go out as records of 16 KiB written many per writev.
const TLS_SEND_BUFFER: usize = 1 << 20;

/// Read buffer of [`BufSock`].
const TLS_READ_BUFFER: usize = 256 << 10;

impl BufSock {
    fn new(tcp: TcpStream) -> Self {
        BufSock(std::io::BufReader::with_capacity(TLS_READ_BUFFER, tcp))
    }
}

impl Read for BufSock {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for BufSock {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.get_mut().write(buf)
    }

    /// rustls hands its queued records over as one slice each: one writev for all
    /// of them instead of a write per 16 KiB record.
    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        self.0.get_mut().write_vectored(bufs)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.get_mut().flush()
    }
}

/// The byte stream under a [`Conn`]: plain TCP, or TLS (rustls, blocking) over it.
pub enum Stream {
    Plain(TcpStream),
    /// The sender's side of a TLS connection.
    Client(Box<rustls::StreamOwned<rustls::ClientConnection, BufSock>>),
    /// The receiver's side of a TLS connection.
    Server(Box<rustls::StreamOwned<rustls::ServerConnection, BufSock>>),
}

impl Stream {
    /// A TLS client stream to a receiver named `name` (the handshake runs on first use).
    pub fn client(
        tcp: TcpStream,
        cfg: std::sync::Arc<rustls::ClientConfig>,
        name: rustls::pki_types::ServerName<'static>,
    ) -> std::io::Result<Self> {
        let mut c = rustls::ClientConnection::new(cfg, name).map_err(std::io::Error::other)?;
        c.set_buffer_limit(Some(TLS_SEND_BUFFER));
        Ok(Stream::Client(Box::new(rustls::StreamOwned::new(
            c,
            BufSock::new(tcp),
        ))))
    }

    /// A TLS server stream (the handshake runs on first use: the receiver's first
    /// write, its Challenge, so it is covered by the handshake deadline).
    pub fn server(
        tcp: TcpStream,
        cfg: std::sync::Arc<rustls::ServerConfig>,
    ) -> std::io::Result<Self> {
        let mut c = rustls::ServerConnection::new(cfg).map_err(std::io::Error::other)?;
        c.set_buffer_limit(Some(TLS_SEND_BUFFER));
        Ok(Stream::Server(Box::new(rustls::StreamOwned::new(
            c,
            BufSock::new(tcp),
        ))))
    }

    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Client(s) => s.get_ref().0.get_ref(),
            Stream::Server(s) => s.get_ref().0.get_ref(),
        }
    }

    /// Bytes already read off the socket (TLS records in the read buffer, or
    /// plaintext TLS decrypted): a peek on the socket would not see them.
    fn buffered(&mut self) -> bool {
        fn has<S: rustls::SideData>(c: &mut rustls::ConnectionCommon<S>, sock: &BufSock) -> bool {
            !sock.0.buffer().is_empty()
                || c.process_new_packets()
                    .is_ok_and(|st| st.plaintext_bytes_to_read() > 0)
        }
        match self {
            Stream::Plain(_) => false,
            Stream::Client(s) => has(&mut s.conn, &s.sock),
            Stream::Server(s) => has(&mut s.conn, &s.sock),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Client(s) => s.read(buf),
            Stream::Server(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Client(s) => s.write(buf),
            Stream::Server(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write_vectored(bufs),
            Stream::Client(s) => s.write_vectored(bufs),
            Stream::Server(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Client(s) => s.flush(),
            Stream::Server(s) => s.flush(),
        }
    }
}

pub struct Conn {
    stream: Stream,
    /// Wire bytes written (header + payload; TLS overhead not counted).
    pub written: u64,
}

impl Conn {
    pub fn new(stream: TcpStream) -> std::io::Result<Self> {
        Self::with_stream(Stream::Plain(stream))
    }

    pub fn with_stream(stream: Stream) -> std::io::Result<Self> {
        let tcp = stream.tcp();
        tcp.set_nodelay(true)?;
        tcp.set_read_timeout(Some(IO_TIMEOUT))?;
        tcp.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(Conn { stream, written: 0 })
    }

    pub fn send(&mut self, m: &Message, c: Compression) -> Result<usize, WireError> {
        let frame = m.encode(c);
        self.stream.write_all(&frame)?;
        self.stream.flush()?;
        self.written += frame.len() as u64;
        Ok(frame.len())
    }

    /// Receives one response frame (Challenge, Ok or Error: what a sender reads).
    pub fn recv(&mut self) -> Result<Message, WireError> {
        let mut payload = Vec::new();
        let h = self.recv_frame(&mut payload, response_only)?;
        Ok(Message::decode(&h, &payload)?)
    }

    /// Reads one whole frame into `payload` (reused across frames) and returns its
    /// checked header; the caller decodes. `check` sees the header first (the
    /// protocol state's allowed commands and lengths): a refused header is an error
    /// before a single payload byte is read or allocated.
    pub fn recv_frame(
        &mut self,
        payload: &mut Vec<u8>,
        check: impl FnOnce(&FrameHeader) -> Result<(), String>,
    ) -> Result<FrameHeader, WireError> {
        let mut hdr = [0u8; HEADER_LEN];
        self.stream.read_exact(&mut hdr)?;
        let h = FrameHeader::parse(&hdr)?;
        check(&h).map_err(WireError::Refused)?;
        // Both checks bounded `length`.
        payload.resize(h.length as usize, 0);
        self.stream.read_exact(payload)?;
        Ok(h)
    }

    /// Writes raw parts of one frame (a prefix from `memory_frame_prefix`, then the page
    /// bytes) without assembling them in one buffer.
    pub fn send_parts<'a>(
        &mut self,
        parts: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<usize, WireError> {
        // One writev (plain) or one batch of records (TLS) for a frame of many
        // page ranges, instead of a write - and a TLS record - per range.
        let mut slices: Vec<IoSlice<'a>> = parts
            .into_iter()
            .filter(|p| !p.is_empty())
            .map(IoSlice::new)
            .collect();
        let n: usize = slices.iter().map(|s| s.len()).sum();
        let mut bufs: &mut [IoSlice<'a>] = &mut slices;
        while !bufs.is_empty() {
            // At most IOV_MAX slices per call (the kernel refuses more).
            let k = bufs.len().min(IOV_MAX);
            match self.stream.write_vectored(&bufs[..k]) {
                Ok(0) => return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into()),
                Ok(w) => IoSlice::advance_slices(&mut bufs, w),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.stream.flush()?;
        self.written += n as u64;
        Ok(n)
    }

    /// Receives an `Ok` and returns its payload; an `Error` becomes `WireError::Remote`.
    pub fn expect_ok(&mut self) -> Result<Vec<u8>, WireError> {
        match self.recv()? {
            Message::Ok { payload } => Ok(payload),
            Message::Error { code, message } => Err(WireError::Remote { code, message }),
            other => Err(WireError::Unexpected(other.command())),
        }
    }

    pub fn send_error(&mut self, code: ErrorCode, message: &str) {
        // Best effort: the peer may be gone already; the session ends either way.
        let _ = self.send(
            &Message::Error {
                code,
                message: message.to_string(),
            },
            Compression::None,
        );
    }

    /// For a connection on which the peer has nothing to say: fails if the peer closed
    /// it (EOF or reset) or sent something after all (an Error frame, or garbage).
    pub fn check_idle_peer(&mut self) -> Result<(), WireError> {
        let peeked = if self.stream.buffered() {
            Ok(1)
        } else {
            let tcp = self.stream.tcp();
            tcp.set_nonblocking(true)?;
            let mut b = [0u8; 1];
            let peeked = tcp.peek(&mut b);
            tcp.set_nonblocking(false)?;
            peeked
        };
        match peeked {
            Ok(0) => Err(WireError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the peer closed the connection",
            ))),
            // The peer spoke while it should wait: read what it said.
            Ok(_) => match self.recv()? {
                Message::Error { code, message } => Err(WireError::Remote { code, message }),
                other => Err(WireError::Unexpected(other.command())),
            },
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(WireError::Io(e)),
        }
    }

    pub fn shutdown(&self) {
        let _ = self.stream.tcp().shutdown(std::net::Shutdown::Both);
    }

    /// The TCP socket under the connection (TLS or not), to shut it down from
    /// another thread.
    pub fn try_clone_stream(&self) -> std::io::Result<TcpStream> {
        self.stream.tcp().try_clone()
    }

    pub fn set_read_timeout(&self, t: Duration) -> std::io::Result<()> {
        self.stream.tcp().set_read_timeout(Some(t))
    }
}
