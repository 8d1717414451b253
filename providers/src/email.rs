//! Email over SMTP (`SMTP_URL`: `smtp://host:port` in the clear, `smtp://…?tls=required` for
//! STARTTLS, `smtps://user:pass@host` for implicit TLS), with lettre as the client: it speaks
//! SMTP, STARTTLS and AUTH as every mail server expects, which is not worth writing again.

use lettre::message::header::ContentTransferEncoding;
use lettre::message::{Body, Mailbox, SinglePart};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

/// A message could not be built or handed to the server.
#[derive(Debug, thiserror::Error)]
pub enum EmailError {
    #[error("SMTP_URL: {0}")]
    Url(String),
    #[error("address {0:?}: not a mailbox")]
    Address(String),
    #[error("building the message: {0}")]
    Build(String),
    #[error("the SMTP server refused or could not be reached: {0}")]
    Smtp(String),
}

/// Sends plain-text email through one SMTP server.
#[derive(Clone)]
pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

impl std::fmt::Debug for Mailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mailer(from {})", self.from)
    }
}

impl Mailer {
    /// A mailer for the server at `url`, sending as `from` (`Name <address>` or an address).
    pub fn new(url: &str, from: &str) -> Result<Mailer, EmailError> {
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
            .map_err(|e| EmailError::Url(e.to_string()))?
            .timeout(Some(std::time::Duration::from_secs(10)))
            .build();
        let from = from
            .parse()
            .map_err(|_| EmailError::Address(from.to_string()))?;
        Ok(Mailer { transport, from })
    }

    /// Sends plain `text`: 7-bit when it is ASCII (links and codes stay whole on their line),
    /// otherwise in the encoding lettre picks (quoted-printable or base64).
    pub async fn send(&self, to: &str, subject: &str, text: &str) -> Result<(), EmailError> {
        let to: Mailbox = to
            .parse()
            .map_err(|_| EmailError::Address(to.to_string()))?;
        let body = Body::new_with_encoding(text.to_string(), ContentTransferEncoding::SevenBit)
            .unwrap_or_else(|_| Body::new(text.to_string()));
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(subject)
            .singlepart(
                SinglePart::builder()
                    .header(lettre::message::header::ContentType::TEXT_PLAIN)
                    .body(body),
            )
            .map_err(|e| EmailError::Build(e.to_string()))?;
        self.transport
            .send(message)
            .await
            .map(|_| ())
            .map_err(|e| EmailError::Smtp(e.to_string()))
    }
}
