//! Blocking framed connection over TCP: reads a whole header, checks it, reads exactly
//! the declared payload, then decodes. Used by the sender and receiver threads.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use super::protocol::{Compression, ErrorCode, FrameHeader, HEADER_LEN, Message, ProtocolError};

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
}

pub struct Conn {
    stream: TcpStream,
    /// Wire bytes written (header + payload).
    pub written: u64,
}

impl Conn {
    pub fn new(stream: TcpStream) -> std::io::Result<Self> {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(Conn { stream, written: 0 })
    }

    pub fn send(&mut self, m: &Message, c: Compression) -> Result<usize, WireError> {
        let frame = m.encode(c);
        self.stream.write_all(&frame)?;
        self.written += frame.len() as u64;
        Ok(frame.len())
    }

    pub fn recv(&mut self) -> Result<Message, WireError> {
        let mut payload = Vec::new();
        let h = self.recv_frame(&mut payload)?;
        Ok(Message::decode(&h, &payload)?)
    }

    /// Reads one whole frame into `payload` (reused across frames) and returns its
    /// checked header; the caller decodes.
    pub fn recv_frame(&mut self, payload: &mut Vec<u8>) -> Result<FrameHeader, WireError> {
        let mut hdr = [0u8; HEADER_LEN];
        self.stream.read_exact(&mut hdr)?;
        let h = FrameHeader::parse(&hdr)?;
        // The header check bounded `length` by the command's limit.
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
        let mut n = 0;
        for p in parts {
            self.stream.write_all(p)?;
            n += p.len();
        }
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
        self.stream.set_nonblocking(true)?;
        let mut b = [0u8; 1];
        let peeked = self.stream.peek(&mut b);
        self.stream.set_nonblocking(false)?;
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
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    pub fn try_clone_stream(&self) -> std::io::Result<TcpStream> {
        self.stream.try_clone()
    }

    pub fn set_read_timeout(&self, t: Duration) -> std::io::Result<()> {
        self.stream.set_read_timeout(Some(t))
    }
}
