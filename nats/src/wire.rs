//! A minimal NATS protocol connection for replays at full speed: deliveries parsed in place
//! from one large read buffer, each message handed out as slices of it (subject, reply,
//! headers, body), so a replay allocates nothing per message.
//!
//! The client library allocates for every message it receives (its subject, reply subject,
//! a header map of owned names and values, and a new read buffer whenever the bodies handed
//! out still hold the last one); at a few hundred thousand messages a second that allocator
//! work was a third of a replay's CPU. This speaks only what a replay needs — `CONNECT`,
//! `SUB`/`UNSUB`, an empty `PUB` (flow-control answers), `PING`/`PONG`, and `MSG`/`HMSG`
//! read — over plain TCP; consumers are made and deleted through the client library (its
//! JetStream API requests, on another connection). A server that wants TLS (or a websocket
//! URL) is [`WireError::Unsupported`]: the caller reads with the client library instead.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("NATS connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("NATS protocol: {0}")]
    Protocol(String),
    #[error("NATS server: {0}")]
    Server(String),
    #[error("NATS URL: {0}")]
    Url(String),
    /// What this connection does not speak (TLS, websockets): read with the client library.
    #[error("not read in place: {0}")]
    Unsupported(&'static str),
}

/// How much a connection reads at once (it grows for a message larger than this).
const READ_BUFFER: usize = 1 << 20;

/// A connection to one NATS server.
pub struct Connection {
    socket: TcpStream,
    /// What the server sent and was not parsed yet.
    pub input: Input,
    /// What to send on the next [`Connection::flush`].
    pub output: Output,
}

/// The received bytes not parsed yet.
pub struct Input {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

/// Protocol operations waiting to be sent.
#[derive(Default)]
pub struct Output {
    bytes: Vec<u8>,
}

/// One operation from the server; a message's parts borrow the read buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Op<'a> {
    Msg(Msg<'a>),
    Ping,
    Pong,
    /// `-ERR` and its text.
    Err(&'a [u8]),
    /// `+OK`, `INFO`: nothing to do.
    Other,
}

/// A delivered message (`MSG` or `HMSG`).
#[derive(Debug, PartialEq, Eq)]
pub struct Msg<'a> {
    pub sid: u64,
    /// Empty when the message has no reply subject.
    pub reply: &'a [u8],
    /// The header block (`NATS/1.0…\r\n…\r\n\r\n`); empty for a `MSG`.
    pub headers: &'a [u8],
    pub payload: &'a [u8],
}

impl Connection {
    /// Connects to the first server of `urls` (a `NATS_URL`: one URL or a comma-separated list)
    /// that answers, with the user and password its URL carries, and waits for the server to
    /// accept the connection.
    pub async fn connect(urls: &str, name: &str) -> Result<Connection, WireError> {
        let addrs = crate::server_addrs(urls).map_err(WireError::Url)?;
        let mut last_error = None;
        for addr in addrs {
            if addr.tls_required() || addr.is_websocket() {
                return Err(WireError::Unsupported("a TLS or websocket URL"));
            }
            let dial = TcpStream::connect((addr.host(), addr.port()));
            let socket = match tokio::time::timeout(Duration::from_secs(5), dial).await {
                Ok(Ok(socket)) => socket,
                Ok(Err(e)) => {
                    last_error = Some(WireError::Io(e));
                    continue;
                }
                Err(_) => {
                    last_error = Some(WireError::Io(std::io::ErrorKind::TimedOut.into()));
                    continue;
                }
            };
            socket.set_nodelay(true)?;
            let mut connection = Connection {
                socket,
                input: Input::new(),
                output: Output::default(),
            };
            connection
                .handshake(name, addr.username(), addr.password())
                .await?;
            return Ok(connection);
        }
        Err(last_error.unwrap_or_else(|| WireError::Url("no NATS server given".into())))
    }

    async fn handshake(
        &mut self,
        name: &str,
        user: Option<&str>,
        pass: Option<&str>,
    ) -> Result<(), WireError> {
        let info = loop {
            if let Some(line) = self.input.line() {
                break line;
            }
            self.fill().await?;
        };
        let info = self.input.buf[info]
            .strip_prefix(b"INFO ")
            .ok_or_else(|| WireError::Protocol("the server did not start with INFO".into()))?;
        let info: serde_json::Value =
            serde_json::from_slice(info).map_err(|e| WireError::Protocol(format!("INFO: {e}")))?;
        if info.get("tls_required").and_then(|v| v.as_bool()) == Some(true) {
            return Err(WireError::Unsupported("a server that requires TLS"));
        }
        let mut connect = serde_json::json!({
            "verbose": false,
            "pedantic": false,
            "lang": "rust",
            "version": env!("CARGO_PKG_VERSION"),
            "protocol": 1,
            "headers": true,
            "no_responders": true,
            "echo": false,
            "name": name,
        });
        if let (Some(user), Some(map)) = (user, connect.as_object_mut()) {
            map.insert("user".into(), user.into());
            map.insert("pass".into(), pass.unwrap_or_default().into());
        }
        self.output.bytes.extend_from_slice(b"CONNECT ");
        self.output
            .bytes
            .extend_from_slice(connect.to_string().as_bytes());
        self.output.bytes.extend_from_slice(b"\r\n");
        self.sync(|_| {}).await
    }

    /// Sends what is waiting and a `PING`, and reads up to the server's `PONG`: everything
    /// sent before it has been processed by the server then (a subscription is in place).
    /// Messages read on the way go to `skipped`.
    pub async fn sync(&mut self, mut skipped: impl FnMut(Msg<'_>)) -> Result<(), WireError> {
        self.output.bytes.extend_from_slice(b"PING\r\n");
        self.flush().await?;
        loop {
            while let Some(op) = self.input.next_op()? {
                match op {
                    Op::Pong => return Ok(()),
                    Op::Ping => self.output.pong(),
                    Op::Err(e) => return Err(server_error(e)),
                    Op::Msg(m) => skipped(m),
                    Op::Other => {}
                }
            }
            self.flush().await?;
            self.fill().await?;
        }
    }

    /// Reads what the server sent next into the buffer (at least one byte).
    pub async fn fill(&mut self) -> Result<(), WireError> {
        let input = &mut self.input;
        if input.start == input.end {
            (input.start, input.end) = (0, 0);
        } else if input.buf.len() - input.end < READ_BUFFER / 4 {
            if input.start > 0 {
                input.buf.copy_within(input.start..input.end, 0);
                (input.start, input.end) = (0, input.end - input.start);
            }
            if input.buf.len() - input.end < READ_BUFFER / 4 {
                // One message larger than the buffer.
                let grown = input.buf.len() * 2;
                input.buf.resize(grown, 0);
            }
        }
        let n = self.socket.read(&mut input.buf[input.end..]).await?;
        if n == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
        input.end += n;
        Ok(())
    }

    /// Sends what is waiting.
    pub async fn flush(&mut self) -> Result<(), WireError> {
        if !self.output.bytes.is_empty() {
            self.socket.write_all(&self.output.bytes).await?;
            self.output.bytes.clear();
        }
        Ok(())
    }
}

/// The error the server's `-ERR` carries.
pub fn server_error(text: &[u8]) -> WireError {
    WireError::Server(String::from_utf8_lossy(text).trim().to_string())
}

impl Output {
    pub fn subscribe(&mut self, subject: &str, sid: u64) {
        self.line(&format!("SUB {subject} {sid}"));
    }

    pub fn unsubscribe(&mut self, sid: u64) {
        self.line(&format!("UNSUB {sid}"));
    }

    /// An empty message to `subject` (the answer to a flow-control request).
    pub fn publish_empty(&mut self, subject: &[u8]) {
        self.bytes.extend_from_slice(b"PUB ");
        self.bytes.extend_from_slice(subject);
        self.bytes.extend_from_slice(b" 0\r\n\r\n");
    }

    pub fn pong(&mut self) {
        self.bytes.extend_from_slice(b"PONG\r\n");
    }

    fn line(&mut self, line: &str) {
        self.bytes.extend_from_slice(line.as_bytes());
        self.bytes.extend_from_slice(b"\r\n");
    }
}

impl Input {
    fn new() -> Input {
        Input {
            buf: vec![0; READ_BUFFER],
            start: 0,
            end: 0,
        }
    }

    /// Where the next whole line is in the buffer (without its `\r\n`), taken out of it.
    fn line(&mut self) -> Option<std::ops::Range<usize>> {
        let data = &self.buf[self.start..self.end];
        let nl = memchr::memchr(b'\n', data)?;
        let line = self.start..self.start + trim_cr(&data[..nl]).len();
        self.start += nl + 1;
        Some(line)
    }

    /// The next whole operation in the buffer, taken out of it; None when the buffer ends
    /// before it does (read more, then ask again).
    pub fn next_op(&mut self) -> Result<Option<Op<'_>>, WireError> {
        let data = &self.buf[self.start..self.end];
        let Some(nl) = memchr::memchr(b'\n', data) else {
            return Ok(None);
        };
        let line = trim_cr(&data[..nl]);
        let (verb, rest) = match line.iter().position(|&b| b == b' ' || b == b'\t') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => (line, &line[..0]),
        };
        let headered = verb.eq_ignore_ascii_case(b"HMSG");
        if !headered && !verb.eq_ignore_ascii_case(b"MSG") {
            let op = if verb.eq_ignore_ascii_case(b"PING") {
                Op::Ping
            } else if verb.eq_ignore_ascii_case(b"PONG") {
                Op::Pong
            } else if verb.eq_ignore_ascii_case(b"-ERR") {
                // Handed out below, from the buffer itself.
                Op::Err(&[])
            } else if verb.eq_ignore_ascii_case(b"+OK") || verb.eq_ignore_ascii_case(b"INFO") {
                Op::Other
            } else {
                let line = String::from_utf8_lossy(line).into_owned();
                return Err(WireError::Protocol(format!("unexpected {line:?}")));
            };
            let text = self.start + (rest.as_ptr() as usize - data.as_ptr() as usize);
            let text = text..text + rest.len();
            self.start += nl + 1;
            return Ok(Some(match op {
                Op::Err(_) => Op::Err(&self.buf[text]),
                op => op,
            }));
        }
        // MSG <subject> <sid> [reply] <size> / HMSG <subject> <sid> [reply] <hdr> <size>
        let mut tokens = [&rest[..0]; 5];
        let mut count = 0;
        for token in rest
            .split(|&b| b == b' ' || b == b'\t')
            .filter(|t| !t.is_empty())
        {
            if count == tokens.len() {
                return Err(bad_line(line));
            }
            tokens[count] = token;
            count += 1;
        }
        let numbers = if headered { 2 } else { 1 };
        if count != 2 + numbers && count != 3 + numbers {
            return Err(bad_line(line));
        }
        let sid = number(tokens[1]).ok_or_else(|| bad_line(line))?;
        let reply = if count == 3 + numbers {
            tokens[2]
        } else {
            &rest[..0]
        };
        let total = number(tokens[count - 1]).ok_or_else(|| bad_line(line))? as usize;
        let header_len = if headered {
            number(tokens[count - 2]).ok_or_else(|| bad_line(line))? as usize
        } else {
            0
        };
        if header_len > total {
            return Err(bad_line(line));
        }
        // The message, its body and the \r\n after it.
        let body_at = nl + 1;
        if data.len() < body_at + total + 2 {
            return Ok(None);
        }
        if &data[body_at + total..body_at + total + 2] != b"\r\n" {
            return Err(bad_line(line));
        }
        let offset = |s: &[u8]| self.start + (s.as_ptr() as usize - data.as_ptr() as usize);
        let reply = offset(reply)..offset(reply) + reply.len();
        let body = self.start + body_at;
        self.start += body_at + total + 2;
        Ok(Some(Op::Msg(Msg {
            sid,
            reply: &self.buf[reply],
            headers: &self.buf[body..body + header_len],
            payload: &self.buf[body + header_len..body + total],
        })))
    }
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn bad_line(line: &[u8]) -> WireError {
    WireError::Protocol(format!(
        "malformed message line {:?}",
        String::from_utf8_lossy(line)
    ))
}

/// A decimal number (ASCII digits only).
pub fn number(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0'))
    })
}

/// The status code of a header block (`NATS/1.0 100 Idle Heartbeat`), None for a plain
/// message's (`NATS/1.0`).
pub fn status(headers: &[u8]) -> Option<u16> {
    let first = headers.split(|&b| b == b'\n').next()?;
    let code = trim_cr(first).strip_prefix(b"NATS/1.0 ")?;
    let code = code.get(..3)?;
    number(code).and_then(|c| u16::try_from(c).ok())
}

/// The value of header `name` in a header block (names compared without case).
pub fn header<'a>(headers: &'a [u8], name: &str) -> Option<&'a [u8]> {
    headers.split(|&b| b == b'\n').skip(1).find_map(|line| {
        let line = trim_cr(line);
        let colon = line.iter().position(|&b| b == b':')?;
        line[..colon]
            .eq_ignore_ascii_case(name.as_bytes())
            .then(|| line[colon + 1..].trim_ascii())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(bytes: &[u8]) -> Input {
        let mut input = Input::new();
        input.buf[..bytes.len()].copy_from_slice(bytes);
        input.end = bytes.len();
        input
    }

    #[test]
    fn messages_are_read_in_place_and_a_cut_one_waits_for_the_rest() {
        let wire = b"INFO {}\r\nMSG a.b 7 5\r\nhello\r\nHMSG a.c 7 $JS.ACK.S.C.1.42.3.0.0 12 14\r\nNATS/1.0\r\n\r\nhi\r\nPING\r\n-ERR 'Permissions Violation'\r\nHMSG x 9 reply 12 12\r\nNATS/1.0\r\n\r\n\r\nMSG a 1 10\r\nabc";
        let mut input = input(wire);
        assert_eq!(input.next_op().unwrap(), Some(Op::Other));
        let Some(Op::Msg(m)) = input.next_op().unwrap() else {
            panic!("a message")
        };
        assert_eq!(
            (m.sid, m.reply, m.headers, m.payload),
            (7, &b""[..], &b""[..], &b"hello"[..])
        );
        let Some(Op::Msg(m)) = input.next_op().unwrap() else {
            panic!("a message with headers")
        };
        assert_eq!(m.reply, b"$JS.ACK.S.C.1.42.3.0.0");
        assert_eq!(m.headers, b"NATS/1.0\r\n\r\n");
        assert_eq!(m.payload, b"hi");
        assert_eq!(status(m.headers), None);
        assert_eq!(input.next_op().unwrap(), Some(Op::Ping));
        assert_eq!(
            input.next_op().unwrap(),
            Some(Op::Err(&b"'Permissions Violation'"[..]))
        );
        let Some(Op::Msg(m)) = input.next_op().unwrap() else {
            panic!("headers only")
        };
        assert_eq!((m.sid, m.payload), (9, &b""[..]));
        // Cut short: nothing taken until the rest arrives.
        assert_eq!(input.next_op().unwrap(), None);
        assert_eq!(input.next_op().unwrap(), None);
        let rest = b"defghij\r\n";
        input.buf[input.end..input.end + rest.len()].copy_from_slice(rest);
        input.end += rest.len();
        let Some(Op::Msg(m)) = input.next_op().unwrap() else {
            panic!("the message completed")
        };
        assert_eq!(m.payload, b"abcdefghij");
        assert_eq!(input.next_op().unwrap(), None);
    }

    #[test]
    fn a_malformed_line_is_an_error_not_a_guess() {
        assert!(input(b"MSG a b 5\r\nhello\r\n").next_op().is_err());
        assert!(input(b"MSG a 1 2\r\nhello\r\n").next_op().is_err());
        assert!(input(b"HMSG a 1 9 5\r\nhello\r\n").next_op().is_err());
        assert!(input(b"WHAT\r\n").next_op().is_err());
    }

    #[test]
    fn status_messages_and_headers_are_read() {
        let heartbeat =
            b"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: 17\r\nNats-Last-Stream: 40\r\nNats-Consumer-Stalled: $JS.FC.x\r\n\r\n";
        assert_eq!(status(heartbeat), Some(100));
        assert_eq!(header(heartbeat, "nats-last-consumer"), Some(&b"17"[..]));
        assert_eq!(
            header(heartbeat, "Nats-Consumer-Stalled"),
            Some(&b"$JS.FC.x"[..])
        );
        assert_eq!(header(heartbeat, "Nats-Msg-Id"), None);
        assert_eq!(
            status(b"NATS/1.0 100 FlowControl Request\r\n\r\n"),
            Some(100)
        );
        assert_eq!(number(b"0123"), Some(123));
        assert_eq!(number(b"12a"), None);
        assert_eq!(number(b""), None);
    }
}
