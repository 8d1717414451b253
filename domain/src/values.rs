//! Validated value types, built once at the edge ("parse, don't validate").

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::privacy::ERASED;

/// A rule a value broke, naming the field so the API can point at it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    pub field: &'static str,
    pub message: String,
}

impl Invalid {
    pub fn new(field: &'static str, message: impl Into<String>) -> Self {
        Invalid {
            field,
            message: message.into(),
        }
    }
}

/// An email address, trimmed and lower-cased. Read back (an event, a payload) through
/// [`Email::parse`], so none is ever built invalid; the one other value it can hold is an
/// erased one ([`crate::privacy::ERASED`]: its owner's key was destroyed), which says so
/// ([`Email::is_erased`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct Email(String);

impl Email {
    pub fn parse(raw: &str) -> Result<Email, Invalid> {
        let email = raw.trim().to_lowercase();
        let invalid = || Invalid::new("email", "must be a valid email address");
        if email.len() > 254 || email.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(invalid());
        }
        let (local, domain) = email.rsplit_once('@').ok_or_else(invalid)?;
        if local.is_empty()
            || local.contains('@')
            || domain.len() < 3
            || !domain.contains('.')
            || domain.starts_with('.')
            || domain.ends_with('.')
            || domain.contains("..")
        {
            return Err(invalid());
        }
        Ok(Email(email))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is an erased address (its owner's data key was destroyed).
    pub fn is_erased(&self) -> bool {
        self.0 == ERASED
    }

    /// `j***@example.com`, for logs.
    pub fn masked(&self) -> String {
        match self.0.split_once('@') {
            Some((local, domain)) => {
                let first: String = local.chars().take(1).collect();
                format!("{first}***@{domain}")
            }
            None => "***".into(),
        }
    }
}

impl fmt::Display for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A phone number in E.164: `+` then 8 to 15 digits, the first not 0. Read back through
/// [`PhoneNumber::parse`] as [`Email`] is, an erased number ([`crate::privacy::ERASED`]) the
/// one other value it can hold ([`PhoneNumber::is_erased`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct PhoneNumber(String);

impl PhoneNumber {
    pub fn parse(field: &'static str, raw: &str) -> Result<PhoneNumber, Invalid> {
        let s = raw.trim();
        let digits = s.strip_prefix('+').unwrap_or("");
        let ok = (8..=15).contains(&digits.len())
            && digits.bytes().all(|b| b.is_ascii_digit())
            && !digits.starts_with('0');
        if ok {
            Ok(PhoneNumber(s.to_string()))
        } else {
            Err(Invalid::new(
                field,
                "must be an E.164 phone number such as +14155550123",
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is an erased number (its owner's data key was destroyed).
    pub fn is_erased(&self) -> bool {
        self.0 == ERASED
    }

    /// `+1415*****23`, for logs.
    pub fn masked(&self) -> String {
        let n = self.0.len();
        self.0
            .char_indices()
            .map(|(i, c)| if i >= 5 && i + 2 < n { '*' } else { c })
            .collect()
    }
}

impl fmt::Display for PhoneNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Reading back: a stored address goes through its parser again, or is the erased marker.
impl TryFrom<String> for Email {
    type Error = Invalid;

    fn try_from(raw: String) -> Result<Self, Invalid> {
        if raw == ERASED {
            return Ok(Email(raw));
        }
        Email::parse(&raw)
    }
}

impl From<Email> for String {
    fn from(email: Email) -> String {
        email.0
    }
}

/// Reading back: a stored number goes through its parser again, or is the erased marker.
impl TryFrom<String> for PhoneNumber {
    type Error = Invalid;

    fn try_from(raw: String) -> Result<Self, Invalid> {
        if raw == ERASED {
            return Ok(PhoneNumber(raw));
        }
        PhoneNumber::parse("phone", &raw)
    }
}

impl From<PhoneNumber> for String {
    fn from(phone: PhoneNumber) -> String {
        phone.0
    }
}

/// `raw` without surrounding white space, `min` to `max` characters long: the length rule of
/// names and free text alike.
fn trimmed_within<'a>(
    field: &'static str,
    raw: &'a str,
    min: usize,
    max: usize,
) -> Result<&'a str, Invalid> {
    let s = raw.trim();
    let n = s.chars().count();
    if n < min || n > max {
        return Err(Invalid::new(
            field,
            format!("must be {min} to {max} characters"),
        ));
    }
    Ok(s)
}

/// A person's display name: 1 to 100 characters, no control characters.
pub fn parse_name(
    field: &'static str,
    raw: &str,
    min: usize,
    max: usize,
) -> Result<String, Invalid> {
    let s = trimmed_within(field, raw, min, max)?;
    if s.chars().any(|c| c.is_control() || c == '<' || c == '>') {
        return Err(Invalid::new(
            field,
            "must not contain control characters or angle brackets",
        ));
    }
    Ok(s.to_string())
}

/// Free text (descriptions, prompts): length-checked, control characters other than newlines
/// and tabs refused.
pub fn parse_text(
    field: &'static str,
    raw: &str,
    min: usize,
    max: usize,
) -> Result<String, Invalid> {
    let s = trimmed_within(field, raw, min, max)?;
    if s.chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t' && c != '\r')
    {
        return Err(Invalid::new(field, "must not contain control characters"));
    }
    Ok(s.to_string())
}

/// A password that meets the policy: 8 to 128 characters with an upper-case letter, a
/// lower-case letter, a digit and a symbol. Any Unicode letter counts as a letter and any
/// other printable character (punctuation, `!"\{}$`, emoji) as a symbol; nothing is escaped or
/// trimmed, so what the user typed is what gets hashed. It never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    pub fn parse(raw: &str) -> Result<Password, Invalid> {
        let n = raw.chars().count();
        if !(8..=128).contains(&n) {
            return Err(Invalid::new("password", "must be 8 to 128 characters"));
        }
        if raw.chars().any(char::is_control) {
            return Err(Invalid::new(
                "password",
                "must not contain control characters",
            ));
        }
        let upper = raw.chars().any(char::is_uppercase);
        let lower = raw.chars().any(char::is_lowercase);
        let digit = raw.chars().any(|c| c.is_numeric());
        let symbol = raw.chars().any(|c| !c.is_alphanumeric());
        if !(upper && lower && digit && symbol) {
            return Err(Invalid::new(
                "password",
                "must contain an upper-case letter, a lower-case letter, a digit and a symbol",
            ));
        }
        Ok(Password(raw.to_string()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(***)")
    }
}

/// Money in integer US cents. Never floats.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Cents(pub i64);

impl std::ops::Add for Cents {
    type Output = Cents;
    fn add(self, other: Cents) -> Cents {
        Cents(self.0 + other.0)
    }
}

impl std::ops::Sub for Cents {
    type Output = Cents;
    fn sub(self, other: Cents) -> Cents {
        Cents(self.0 - other.0)
    }
}

impl fmt::Display for Cents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        write!(f, "{sign}${}.{:02}", abs / 100, abs % 100)
    }
}

/// A time bound given as a time with an offset (ISO 8601), or as a date (`2026-11-29`, the
/// whole day in UTC: its start, or with `end` the start of the next day, so an end bound is
/// exclusive).
pub fn parse_time_bound(
    field: &'static str,
    raw: &str,
    end: bool,
) -> Result<chrono::DateTime<chrono::Utc>, Invalid> {
    use chrono::{NaiveDate, NaiveTime, TimeZone, Utc};
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(raw) {
        return Ok(t.with_timezone(&Utc));
    }
    let day = NaiveDate::parse_from_str(raw, "%Y-%m-%d").map_err(|_| {
        Invalid::new(
            field,
            format!("{field}: a date (YYYY-MM-DD) or an ISO 8601 time"),
        )
    })?;
    let day = if end {
        day.succ_opt().unwrap_or(day)
    } else {
        day
    };
    Ok(Utc.from_utc_datetime(&day.and_time(NaiveTime::MIN)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_and_phone_numbers_are_read_back_through_their_parsers_or_as_erased() {
        let email: Email = serde_json::from_str(r#""jo@example.com""#).unwrap();
        let phone: PhoneNumber = serde_json::from_str(r#""+14155550123""#).unwrap();
        assert_eq!(
            (email.as_str(), phone.as_str()),
            ("jo@example.com", "+14155550123")
        );
        assert!(!email.is_erased() && !phone.is_erased());
        assert_eq!(
            serde_json::to_string(&email).unwrap(),
            r#""jo@example.com""#
        );
        assert_eq!(serde_json::to_string(&phone).unwrap(), r#""+14155550123""#);

        let email: Email = serde_json::from_str(r#""[erased]""#).unwrap();
        let phone: PhoneNumber = serde_json::from_str(r#""[erased]""#).unwrap();
        assert!(email.is_erased() && phone.is_erased());
        assert_eq!(serde_json::to_string(&phone).unwrap(), r#""[erased]""#);

        for bad in [r#""jo""#, r#""jo@x""#] {
            let err = serde_json::from_str::<Email>(bad).unwrap_err().to_string();
            assert!(
                err.contains("must be a valid email address"),
                "{bad}: {err}"
            );
        }
        for bad in [r#""4155550123""#, r#""+0123456789""#, r#""call me""#] {
            let err = serde_json::from_str::<PhoneNumber>(bad)
                .unwrap_err()
                .to_string();
            assert!(err.contains("E.164"), "{bad}: {err}");
        }
    }

    #[test]
    fn emails_are_normalised_to_lower_case() {
        assert_eq!(
            Email::parse("  Jo@Example.COM ").unwrap().as_str(),
            "jo@example.com"
        );
        for bad in [
            "", "jo", "jo@", "@x.io", "jo@x", "jo@.io", "j o@x.io", "jo@x..io",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn phones_must_be_e164() {
        assert!(PhoneNumber::parse("phone", "+14155550123").is_ok());
        for bad in [
            "14155550123",
            "+0123456789",
            "+1",
            "+1415555012a",
            "+1234567890123456",
        ] {
            assert!(PhoneNumber::parse("phone", bad).is_err(), "{bad} accepted");
        }
        assert_eq!(
            PhoneNumber::parse("phone", "+14155550123")
                .unwrap()
                .masked(),
            "+1415*****23"
        );
    }

    #[test]
    fn passwords_need_four_kinds_of_character_and_keep_every_one() {
        for good in [
            "Passw0rd!",
            r#"Aa1!"\{}$"#,
            "Ünïcødé9§x",
            "Пароль1$пароль",
            "Zz9 spaced out",
            "Emoji🙂Pass1",
        ] {
            let p = Password::parse(good).unwrap_or_else(|e| panic!("{good}: {e}"));
            assert_eq!(p.expose(), good, "the password is kept as typed");
        }
        for bad in [
            "Sh0rt!",
            "alllower1!",
            "ALLUPPER1!",
            "NoDigits!!",
            "NoSymbol12",
            "Tab\tinside1!",
        ] {
            assert!(Password::parse(bad).is_err(), "{bad} accepted");
        }
        assert_eq!(
            format!("{:?}", Password::parse("Passw0rd!").unwrap()),
            "Password(***)"
        );
    }

    #[test]
    fn cents_print_as_dollars() {
        assert_eq!(Cents(265).to_string(), "$2.65");
        assert_eq!(Cents(-5).to_string(), "-$0.05");
    }
}
