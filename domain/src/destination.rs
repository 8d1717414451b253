//! Where the service may ring: the toll-fraud rules, checked when a call is requested, when it
//! is scheduled, and again by the dialer.
//!
//! A number is refused when it starts with a blocked prefix (premium-rate, shared-cost,
//! satellite and other ranges that pay the callee), or when its country is not allowed. The
//! country comes from the calling code; inside the North American Numbering Plan (+1) from the
//! area code, since +1 also reaches two dozen Caribbean and Pacific countries whose numbers are
//! the classic toll-fraud destinations.

use std::collections::BTreeSet;
use std::fmt;

use crate::values::PhoneNumber;

/// `CALL_ALLOWED_COUNTRIES` when unset.
pub const DEFAULT_ALLOWED_COUNTRIES: &str = "US,CA";

/// `CALL_BLOCKED_PREFIXES` when unset: premium and shared-cost ranges, personal and
/// international networks, satellite.
pub const DEFAULT_BLOCKED_PREFIXES: &str = "+1900,+1976,+1500,+1533,+1544,+1566,+1577,+1588,\
+881,+882,+883,+870,+878,+979,+808,+800,+388,+4470,+4484,+4487,+449,+33890,+33891,+33892,\
+33897,+33899,+49900,+49137,+49180,+3989,+3489,+3480,+6119,+6113";

/// Canadian area codes (NANP); `+1` numbers in `NANP_OTHER` belong to the country named; every
/// other `+1` number is the United States (territories included).
const CANADA: [&str; 42] = [
    "204", "226", "236", "249", "250", "263", "289", "306", "343", "354", "365", "367", "368",
    "382", "403", "416", "418", "428", "431", "437", "438", "450", "468", "474", "506", "514",
    "519", "548", "579", "581", "584", "587", "604", "613", "639", "647", "672", "683", "705",
    "709", "742", "778",
];
const CANADA_MORE: [&str; 12] = [
    "780", "782", "807", "819", "825", "867", "873", "879", "902", "905", "600", "622",
];
const NANP_OTHER: [(&str, &str); 20] = [
    ("242", "BS"),
    ("246", "BB"),
    ("264", "AI"),
    ("268", "AG"),
    ("284", "VG"),
    ("345", "KY"),
    ("441", "BM"),
    ("473", "GD"),
    ("649", "TC"),
    ("658", "JM"),
    ("664", "MS"),
    ("721", "SX"),
    ("758", "LC"),
    ("767", "DM"),
    ("784", "VC"),
    ("809", "DO"),
    ("829", "DO"),
    ("849", "DO"),
    ("868", "TT"),
    ("869", "KN"),
];
const NANP_MORE: [(&str, &str); 1] = [("876", "JM")];

/// Calling codes outside +1, longest first where they overlap.
const CALLING_CODES: [(&str, &str); 60] = [
    ("44", "GB"),
    ("33", "FR"),
    ("49", "DE"),
    ("34", "ES"),
    ("39", "IT"),
    ("31", "NL"),
    ("32", "BE"),
    ("41", "CH"),
    ("43", "AT"),
    ("45", "DK"),
    ("46", "SE"),
    ("47", "NO"),
    ("48", "PL"),
    ("351", "PT"),
    ("353", "IE"),
    ("354", "IS"),
    ("358", "FI"),
    ("30", "GR"),
    ("420", "CZ"),
    ("36", "HU"),
    ("40", "RO"),
    ("7", "RU"),
    ("90", "TR"),
    ("380", "UA"),
    ("972", "IL"),
    ("971", "AE"),
    ("966", "SA"),
    ("20", "EG"),
    ("27", "ZA"),
    ("234", "NG"),
    ("254", "KE"),
    ("212", "MA"),
    ("91", "IN"),
    ("92", "PK"),
    ("880", "BD"),
    ("86", "CN"),
    ("852", "HK"),
    ("886", "TW"),
    ("81", "JP"),
    ("82", "KR"),
    ("65", "SG"),
    ("60", "MY"),
    ("66", "TH"),
    ("84", "VN"),
    ("62", "ID"),
    ("63", "PH"),
    ("61", "AU"),
    ("64", "NZ"),
    ("52", "MX"),
    ("55", "BR"),
    ("54", "AR"),
    ("56", "CL"),
    ("57", "CO"),
    ("51", "PE"),
    ("58", "VE"),
    ("53", "CU"),
    ("98", "IR"),
    ("93", "AF"),
    ("964", "IQ"),
    ("963", "SY"),
];

/// The ISO 3166 country a number rings in, when known.
pub fn country_of(phone: &PhoneNumber) -> Option<&'static str> {
    let digits = phone.as_str().trim_start_matches('+');
    if let Some(national) = digits.strip_prefix('1') {
        let npa = national.get(..3)?;
        if CANADA.contains(&npa) || CANADA_MORE.contains(&npa) {
            return Some("CA");
        }
        if let Some((_, c)) = NANP_OTHER.iter().chain(&NANP_MORE).find(|(a, _)| *a == npa) {
            return Some(c);
        }
        return Some("US");
    }
    (1..=3)
        .rev()
        .filter_map(|n| digits.get(..n))
        .find_map(|code| CALLING_CODES.iter().find(|(c, _)| *c == code))
        .map(|(_, country)| *country)
}

/// Why a destination is refused: the rule, named as the operator configures it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The number starts with a blocked prefix.
    BlockedPrefix(String),
    /// The number's country (if known) is not allowed.
    Country(Option<&'static str>),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::BlockedPrefix(p) => write!(
                f,
                "numbers starting {p} are not called (CALL_BLOCKED_PREFIXES: premium-rate, \
                 shared-cost and satellite ranges)"
            ),
            Refusal::Country(Some(c)) => {
                write!(f, "numbers in {c} are not called (CALL_ALLOWED_COUNTRIES)")
            }
            Refusal::Country(None) => write!(
                f,
                "numbers of an unknown country are not called (CALL_ALLOWED_COUNTRIES)"
            ),
        }
    }
}

/// The destinations the service may ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationPolicy {
    allowed_countries: BTreeSet<String>,
    blocked_prefixes: Vec<String>,
}

impl Default for DestinationPolicy {
    fn default() -> Self {
        DestinationPolicy::parse(None, None).expect("the defaults parse")
    }
}

impl DestinationPolicy {
    /// From `CALL_ALLOWED_COUNTRIES` (ISO codes, comma-separated; `*` for any) and
    /// `CALL_BLOCKED_PREFIXES` (`+` and digits, comma-separated; empty for none).
    pub fn parse(allowed: Option<&str>, blocked: Option<&str>) -> Result<Self, String> {
        let allowed_countries = allowed
            .unwrap_or(DEFAULT_ALLOWED_COUNTRIES)
            .split(',')
            .map(|c| c.trim().to_ascii_uppercase())
            .filter(|c| !c.is_empty())
            .map(|c| {
                if c == "*" || (c.len() == 2 && c.bytes().all(|b| b.is_ascii_uppercase())) {
                    Ok(c)
                } else {
                    Err(format!("{c:?} is not a two-letter ISO country code (or *)"))
                }
            })
            .collect::<Result<_, _>>()?;
        let blocked_prefixes = blocked
            .unwrap_or(DEFAULT_BLOCKED_PREFIXES)
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| {
                let digits = p.strip_prefix('+').unwrap_or("");
                if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
                    Ok(p.to_string())
                } else {
                    Err(format!("{p:?} is not a + and digits"))
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(DestinationPolicy {
            allowed_countries,
            blocked_prefixes,
        })
    }

    /// Whether the service may ring `phone`; else the rule that refuses it.
    pub fn check(&self, phone: &PhoneNumber) -> Result<(), Refusal> {
        if let Some(p) = self
            .blocked_prefixes
            .iter()
            .find(|p| phone.as_str().starts_with(p.as_str()))
        {
            return Err(Refusal::BlockedPrefix(p.clone()));
        }
        if self.allowed_countries.contains("*") {
            return Ok(());
        }
        match country_of(phone) {
            Some(c) if self.allowed_countries.contains(c) => Ok(()),
            other => Err(Refusal::Country(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phone(s: &str) -> PhoneNumber {
        PhoneNumber::parse("phone", s).unwrap()
    }

    #[test]
    fn north_america_is_allowed_by_default() {
        let p = DestinationPolicy::default();
        for ok in [
            "+14155550123",
            "+12125550100",
            "+14165550123",
            "+16045550123",
        ] {
            assert_eq!(p.check(&phone(ok)), Ok(()), "{ok}");
        }
    }

    #[test]
    fn premium_satellite_and_caribbean_numbers_are_refused() {
        let p = DestinationPolicy::default();
        for (bad, rule) in [
            ("+19005550123", Refusal::BlockedPrefix("+1900".into())),
            ("+19765550123", Refusal::BlockedPrefix("+1976".into())),
            ("+881612345678", Refusal::BlockedPrefix("+881".into())),
            ("+88213456789", Refusal::BlockedPrefix("+882".into())),
            ("+8835100012345", Refusal::BlockedPrefix("+883".into())),
            ("+18765550123", Refusal::Country(Some("JM"))),
            ("+18095550123", Refusal::Country(Some("DO"))),
            ("+442079460123", Refusal::Country(Some("GB"))),
            ("+9999999999", Refusal::Country(None)),
        ] {
            assert_eq!(p.check(&phone(bad)), Err(rule), "{bad}");
        }
    }

    #[test]
    fn the_operator_configures_both_lists() {
        let p = DestinationPolicy::parse(Some("us,gb"), Some("+4490,+1415")).unwrap();
        assert_eq!(p.check(&phone("+442079460123")), Ok(()));
        assert!(matches!(
            p.check(&phone("+14155550123")),
            Err(Refusal::BlockedPrefix(_))
        ));
        assert!(DestinationPolicy::parse(Some("USA"), None).is_err());
        assert!(DestinationPolicy::parse(None, Some("900")).is_err());
        let any = DestinationPolicy::parse(Some("*"), Some("")).unwrap();
        assert_eq!(any.check(&phone("+9999999999")), Ok(()));
    }
}
