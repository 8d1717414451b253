//! An SMTP server on loopback (RFC 5321: EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT) that
//! keeps every message it accepts in a mailbox, writes each to the log, and answers as a mail
//! relay would. It is the development mailbox: the tests read it through [`SmtpSim::messages`].
//! It reads only the wire: the envelope and the message's own headers.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::Faults;

/// A message as it arrived.
#[derive(Debug, Clone)]
pub struct Mail {
    pub from: String,
    pub to: Vec<String>,
    /// The `Subject:` header.
    pub subject: String,
    /// The body after the headers, dot-unstuffed, decoded from its transfer encoding
    /// (quoted-printable or base64), lines joined with `\n`.
    pub body: String,
    /// The whole message as sent.
    pub raw: String,
}

/// The simulator: its mailbox and faults (`SIM_SMTP_LATENCY_MS`, `SIM_SMTP_FAIL_EVERY`: every
/// n-th message is refused with a 451 at the end of DATA).
#[derive(Clone, Default)]
pub struct SmtpSim {
    mailbox: Arc<Mutex<Vec<Mail>>>,
    faults: Faults,
}

/// Longest command line accepted (RFC 5321 allows 512; generous for long addresses).
const MAX_LINE: usize = 4096;
/// Largest message accepted.
const MAX_MESSAGE: usize = 1 << 20;

impl SmtpSim {
    pub fn new(faults: Faults) -> SmtpSim {
        SmtpSim {
            mailbox: Arc::default(),
            faults,
        }
    }

    /// Every message accepted so far, oldest first.
    pub fn messages(&self) -> Vec<Mail> {
        self.mailbox.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// The messages sent to `address` (case-insensitive), oldest first.
    pub fn messages_to(&self, address: &str) -> Vec<Mail> {
        self.messages()
            .into_iter()
            .filter(|m| m.to.iter().any(|t| t.eq_ignore_ascii_case(address)))
            .collect()
    }

    /// Listens on a random loopback port until `shutdown`; returns `smtp://127.0.0.1:<port>`.
    pub async fn serve(
        &self,
        shutdown: CancellationToken,
        tasks: &tokio_util::task::TaskTracker,
    ) -> std::io::Result<String> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let sim = self.clone();
        let inner = tasks.clone();
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    accepted = listener.accept() => match accepted {
                        Ok((socket, _)) => {
                            let sim = sim.clone();
                            inner.spawn(async move {
                                if let Err(e) = sim.session(socket).await {
                                    tracing::debug!(error = %e, "smtp simulator: session ended");
                                }
                            });
                        }
                        Err(e) => tracing::warn!(error = %e, "smtp simulator: accept"),
                    },
                }
            }
        });
        tracing::info!(simulator = "smtp", %addr, "simulator listening");
        Ok(format!("smtp://{addr}"))
    }

    async fn session(&self, socket: TcpStream) -> std::io::Result<()> {
        let (read, mut write) = socket.into_split();
        let mut lines = BufReader::new(read);
        write.write_all(b"220 smtp.sim ESMTP ready\r\n").await?;
        let mut from: Option<String> = None;
        let mut to: Vec<String> = Vec::new();
        let mut greeted = false;
        loop {
            let Some(line) = read_line(&mut lines).await? else {
                return Ok(());
            };
            let upper = line.to_ascii_uppercase();
            let verb = upper.split_whitespace().next().unwrap_or("");
            let reply: &[u8] = match verb {
                "EHLO" => {
                    greeted = true;
                    b"250-smtp.sim greets you\r\n250-8BITMIME\r\n250-SIZE 1048576\r\n250 SMTPUTF8\r\n"
                }
                "HELO" => {
                    greeted = true;
                    b"250 smtp.sim\r\n"
                }
                "MAIL" if !greeted => b"503 5.5.1 say EHLO first\r\n",
                "MAIL" => match path_after(&line, "FROM:") {
                    Some(path) => {
                        from = Some(path);
                        to.clear();
                        b"250 2.1.0 sender ok\r\n"
                    }
                    None => b"501 5.5.4 syntax: MAIL FROM:<address>\r\n",
                },
                "RCPT" if from.is_none() => b"503 5.5.1 need MAIL first\r\n",
                "RCPT" => match path_after(&line, "TO:") {
                    Some(path) if path.contains('@') => {
                        to.push(path);
                        b"250 2.1.5 recipient ok\r\n"
                    }
                    _ => b"501 5.1.3 bad recipient address\r\n",
                },
                "DATA" if to.is_empty() => b"503 5.5.1 need RCPT first\r\n",
                "DATA" => {
                    write
                        .write_all(b"354 end data with <CR><LF>.<CR><LF>\r\n")
                        .await?;
                    let raw = read_data(&mut lines).await?;
                    let fail = self.faults.apply().await;
                    let reply: &[u8] = match raw {
                        None => b"552 5.3.4 message too big\r\n",
                        Some(_) if fail => b"451 4.3.0 simulated failure, try again\r\n",
                        Some(raw) => {
                            let mail = parse(from.take().unwrap_or_default(), &to, raw);
                            tracing::info!(
                                simulator = "smtp",
                                to = ?mail.to,
                                subject = %mail.subject,
                                body = %mail.body,
                                "development mailbox: message received"
                            );
                            if let Ok(mut mailbox) = self.mailbox.lock() {
                                mailbox.push(mail);
                            }
                            b"250 2.0.0 queued\r\n"
                        }
                    };
                    to.clear();
                    from = None;
                    reply
                }
                "RSET" => {
                    from = None;
                    to.clear();
                    b"250 2.0.0 reset\r\n"
                }
                "NOOP" => b"250 2.0.0 ok\r\n",
                "QUIT" => {
                    write.write_all(b"221 2.0.0 bye\r\n").await?;
                    return Ok(());
                }
                "" => b"500 5.5.2 empty command\r\n",
                _ => b"502 5.5.1 command not implemented\r\n",
            };
            write.write_all(reply).await?;
        }
    }
}

/// One CRLF-terminated line without its terminator; None at the end of the stream.
async fn read_line(
    lines: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    let n = (&mut *lines)
        .take(MAX_LINE as u64)
        .read_until(b'\n', &mut buf)
        .await?;
    if n == 0 {
        return Ok(None);
    }
    while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        buf.pop();
    }
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

/// The message after DATA, up to the lone `.`, dot-unstuffed; None when too big (the rest is
/// still read, so the session stays in step).
async fn read_data(
    lines: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
) -> std::io::Result<Option<String>> {
    let mut out = String::new();
    let mut too_big = false;
    loop {
        let Some(line) = read_line(lines).await? else {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        };
        if line == "." {
            return Ok((!too_big).then_some(out));
        }
        let line = line.strip_prefix('.').unwrap_or(&line);
        if out.len() + line.len() > MAX_MESSAGE {
            too_big = true;
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
}

/// The address in `MAIL FROM:<a@b> SIZE=…` or `RCPT TO:<a@b>`.
fn path_after(line: &str, keyword: &str) -> Option<String> {
    let upper = line.to_ascii_uppercase();
    let at = upper.find(keyword)? + keyword.len();
    let rest = line[at..].trim_start();
    let rest = rest.strip_prefix('<')?;
    let end = rest.find('>')?;
    Some(rest[..end].to_string())
}

fn parse(from: String, to: &[String], raw: String) -> Mail {
    let (headers, body) = raw.split_once("\n\n").unwrap_or((&raw, ""));
    let subject = headers
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("subject")
                .then(|| value.trim().to_string())
        })
        .unwrap_or_default();
    let encoding = headers
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-transfer-encoding")
                .then(|| value.trim().to_ascii_lowercase())
        })
        .unwrap_or_default();
    let body = match encoding.as_str() {
        "base64" => {
            use base64::Engine as _;
            let compact: String = body.split_whitespace().collect();
            base64::engine::general_purpose::STANDARD
                .decode(compact)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_else(|_| body.to_string())
        }
        "quoted-printable" => quoted_printable(body),
        _ => body.to_string(),
    };
    Mail {
        from,
        to: to.to_vec(),
        subject,
        body: body.trim_end_matches('\n').to_string(),
        raw: raw.clone(),
    }
}

/// RFC 2045 quoted-printable: `=XX` bytes and `=` soft line breaks.
fn quoted_printable(text: &str) -> String {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'=' if bytes.get(i + 1) == Some(&b'\n') => i += 2,
            b'=' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok());
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'=');
                        i += 1;
                    }
                }
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_read_from_the_envelope_commands() {
        assert_eq!(
            path_after("MAIL FROM:<a@b.example> SIZE=120", "FROM:").as_deref(),
            Some("a@b.example")
        );
        assert_eq!(
            path_after("rcpt to: <Jo@Example.com>", "TO:").as_deref(),
            Some("Jo@Example.com")
        );
        assert_eq!(path_after("RCPT TO:jo@example.com", "TO:"), None);
    }

    #[test]
    fn quoted_printable_bodies_are_decoded() {
        assert_eq!(quoted_printable("J=C3=B6 long=\nline"), "Jö longline");
    }

    #[tokio::test]
    async fn a_message_sent_with_lettre_lands_in_the_mailbox() {
        let sim = SmtpSim::default();
        let shutdown = CancellationToken::new();
        let tasks = tokio_util::task::TaskTracker::new();
        let url = sim.serve(shutdown.clone(), &tasks).await.unwrap();
        let mailer =
            cmb_providers::email::Mailer::new(&url, "Call Me Back <no-reply@cmb.test>").unwrap();
        mailer
            .send(
                "jo@example.com",
                "Reset your password",
                "Hello\n.leading dot\nhttps://x.test/reset?token=abc",
            )
            .await
            .unwrap();
        let got = sim.messages_to("JO@example.com");
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].subject, "Reset your password");
        assert_eq!(got[0].from, "no-reply@cmb.test");
        assert!(got[0].body.contains(".leading dot"), "{}", got[0].body);
        assert!(got[0].body.contains("token=abc"), "{}", got[0].body);
        // Not ASCII: sent encoded, read back as written.
        mailer
            .send("jo@example.com", "Hi", "Hallo Jörg, ça va?")
            .await
            .unwrap();
        assert_eq!(
            sim.messages_to("jo@example.com")[1].body,
            "Hallo Jörg, ça va?"
        );
        shutdown.cancel();
    }
}
