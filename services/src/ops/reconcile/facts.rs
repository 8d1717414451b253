//! The call facts the event store keeps beside each call event (the generated columns and the
//! covering index `events_call_facts`, migrations/20261130214600_call_facts.sql), read as
//! Postgres sends them — `COPY … TO STDOUT (FORMAT binary)`, decoded in place — and folded
//! into a [`Reconciler`] call by call, in each call's sequence order.
//!
//! A call whose rows do not all read as facts this build folds exactly as the decoded event
//! would be (an unknown type or version, a value missing or out of range) is not folded here:
//! it is returned, to be folded from its whole events.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use cmb_domain::call::{Outcome, Reversal};
use serde::Deserialize as _;
use uuid::Uuid;

use super::{CallFact, CopyError, Error, Reconciler};
use crate::backbone::outbox::CommitPosition;

/// What a fact row holds, in order (the request's place in the log and time on requests only).
pub(super) const CALL_FACTS_COLUMNS: &str = "aggregate_id, fact_kind, fact_text, fact_text2, \
     fact_int, fact_int2, CASE WHEN fact_kind = 1 THEN xact_id END, \
     CASE WHEN fact_kind = 1 THEN global_position END, \
     CASE WHEN fact_kind = 1 THEN recorded_at END";
const COLUMNS: usize = 9;

/// The rows of `events_call_facts`'s predicate (as written there, so the planner reads the
/// index alone).
pub(super) const CALL_FACTS_ROWS: &str = "(fact_kind <> 0 OR (fact_kind = 0 AND sequence = 1))";

/// One row's fields, NULL as None.
type Fields<'a> = [Option<&'a [u8]>; COLUMNS];

/// A decoder of Postgres's binary `COPY` format for rows of [`COLUMNS`] fields, fed chunks as
/// they arrive (a row may span chunks).
#[derive(Default)]
pub(super) struct CopyBinary {
    /// The start of a row (or of the header) that the last chunk cut.
    rest: Vec<u8>,
    header_read: bool,
    ended: bool,
}

/// The binary `COPY` signature.
const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

impl CopyBinary {
    /// Decodes the rows `chunk` completes, handing each to `each`.
    pub fn push(
        &mut self,
        chunk: &[u8],
        mut each: impl FnMut(&Fields) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let joined;
        let data: &[u8] = if self.rest.is_empty() {
            chunk
        } else {
            let mut all = std::mem::take(&mut self.rest);
            all.extend_from_slice(chunk);
            joined = all;
            &joined
        };
        let mut at = 0;
        if !self.header_read {
            let Some(len) = header_len(data)? else {
                self.rest = data.to_vec();
                return Ok(());
            };
            at = len;
            self.header_read = true;
        }
        while at < data.len() {
            if self.ended {
                return Err(CopyError::AfterTrailer.into());
            }
            match row(&data[at..])? {
                Row::Whole(len, fields) => {
                    each(&fields)?;
                    at += len;
                }
                Row::Trailer => {
                    self.ended = true;
                    at += 2;
                }
                Row::Cut => break,
            }
        }
        self.rest = data[at..].to_vec();
        Ok(())
    }

    /// Checks the data ended with the trailer.
    pub fn finish(&self) -> Result<(), CopyError> {
        if !(self.ended && self.rest.is_empty()) {
            return Err(CopyError::CutShort);
        }
        Ok(())
    }
}

/// The header's length, or None when `data` does not hold all of it yet.
fn header_len(data: &[u8]) -> Result<Option<usize>, CopyError> {
    let fixed = SIGNATURE.len() + 8;
    let Some(&[a, b, c, d]) = data.get(fixed - 4..fixed) else {
        return Ok(None);
    };
    if !data.starts_with(SIGNATURE) {
        return Err(CopyError::NotBinary);
    }
    let extension = u32::from_be_bytes([a, b, c, d]) as usize;
    Ok((data.len() >= fixed + extension).then_some(fixed + extension))
}

enum Row<'a> {
    /// A whole row of this many bytes.
    Whole(usize, Fields<'a>),
    Trailer,
    /// Not all of the row is here yet.
    Cut,
}

fn row(data: &[u8]) -> Result<Row<'_>, CopyError> {
    let Some(count) = data.get(..2) else {
        return Ok(Row::Cut);
    };
    let count = i16::from_be_bytes([count[0], count[1]]);
    if count == -1 {
        return Ok(Row::Trailer);
    }
    if count as usize != COLUMNS {
        return Err(CopyError::Fields {
            count,
            expected: COLUMNS,
        });
    }
    let mut fields: Fields = [None; COLUMNS];
    let mut at = 2;
    for field in &mut fields {
        let Some(&[a, b, c, d]) = data.get(at..at + 4) else {
            return Ok(Row::Cut);
        };
        let len = i32::from_be_bytes([a, b, c, d]);
        at += 4;
        if len < 0 {
            continue;
        }
        let Some(value) = data.get(at..at + len as usize) else {
            return Ok(Row::Cut);
        };
        *field = Some(value);
        at += len as usize;
    }
    Ok(Row::Whole(at, fields))
}

fn text(field: Option<&[u8]>) -> Option<&str> {
    std::str::from_utf8(field?).ok()
}

fn int8(field: Option<&[u8]>) -> Option<i64> {
    Some(i64::from_be_bytes(field?.try_into().ok()?))
}

/// An event's place in commit order as one number (see [`Reconciler`]).
pub(super) fn position(at: CommitPosition) -> u128 {
    ((at.commit_xid as u64 as u128) << 64) | at.global_position as u64 as u128
}

/// Microseconds from 2000-01-01 (Postgres's epoch) to 1970-01-01's.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// The fact a row tells, at its place in the log; None when it is not one this path reads
/// exactly as the decoded event (the call is then folded from its events).
fn fact(f: &Fields) -> Option<(u128, CallFact<'static>)> {
    let kind = i16::from_be_bytes(f[1]?.try_into().ok()?);
    let owned = |s: &str| Cow::Owned(s.to_string());
    let fact = match kind {
        0 => CallFact::Other,
        1 => {
            let user_id = Uuid::parse_str(text(f[2])?).ok()?;
            let payment_intent = match int8(f[4])? {
                0 => None,
                1 => Some(owned(text(f[3])?)),
                _ => return None,
            };
            let at_log = CommitPosition {
                commit_xid: int8(f[6])?,
                global_position: int8(f[7])?,
            };
            let at = DateTime::<Utc>::from_timestamp_micros(int8(f[8])? + PG_EPOCH_MICROS)?;
            let fact = CallFact::Requested {
                at,
                user_id,
                payment_intent,
            };
            return Some((position(at_log), fact));
        }
        2 => CallFact::Placed {
            call_sid: owned(text(f[2])?),
        },
        3 => CallFact::Ended {
            outcome: Outcome::deserialize(serde::de::value::StrDeserializer::<
                serde::de::value::Error,
            >::new(text(f[2])?))
            .ok()?,
            answered_secs: u32::try_from(int8(f[5])?).ok()?,
            price_cents: int8(f[4])?,
        },
        4 => CallFact::Cost {
            service: owned(text(f[2])?),
            total_micros: int8(f[4])?,
            billed: match int8(f[5])? {
                0 => false,
                1 => true,
                _ => return None,
            },
        },
        5 => CallFact::Settled {
            charged_cents: int8(f[4])?,
        },
        6 => CallFact::Reversed {
            kind: Reversal::deserialize(
                serde::de::value::StrDeserializer::<serde::de::value::Error>::new(text(f[2])?),
            )
            .ok()?,
            amount_cents: int8(f[4])?,
        },
        _ => return None,
    };
    Some((0, fact))
}

/// Folds fact rows (in call and sequence order) into a reconciler, a call at a time.
pub(super) struct CallFold {
    pub reconciler: Reconciler,
    /// Calls to fold from their events instead.
    pub refold: Vec<String>,
    call: String,
    facts: Vec<(u128, CallFact<'static>)>,
    odd: bool,
}

impl CallFold {
    pub fn new(reconciler: Reconciler) -> Self {
        CallFold {
            reconciler,
            refold: Vec::new(),
            call: String::new(),
            facts: Vec::new(),
            odd: false,
        }
    }

    /// Adds a row of [`CALL_FACTS_COLUMNS`].
    pub fn row(&mut self, f: &Fields) -> Result<(), Error> {
        let id = text(f[0]).ok_or(Error::CallId)?;
        if id != self.call {
            self.end_call();
            self.call.push_str(id);
        }
        if !self.odd {
            match fact(f) {
                Some(fact) => self.facts.push(fact),
                None => self.odd = true,
            }
        }
        Ok(())
    }

    /// Folds the call whose rows have all come (or sets it aside).
    fn end_call(&mut self) {
        if self.odd {
            self.refold.push(std::mem::take(&mut self.call));
            self.facts.clear();
        } else {
            for (at, fact) in self.facts.drain(..) {
                self.reconciler.add_call_fact(at, &self.call, fact);
            }
        }
        self.call.clear();
        self.odd = false;
    }

    pub fn finish(mut self) -> (Reconciler, Vec<String>) {
        self.end_call();
        (self.reconciler, self.refold)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(out: &mut Vec<u8>, value: Option<&[u8]>) {
        match value {
            Some(v) => {
                out.extend_from_slice(&(v.len() as i32).to_be_bytes());
                out.extend_from_slice(v);
            }
            None => out.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }

    /// Rows as Postgres writes them: a call's request (card), a cost, and an event this path
    /// does not read (kind -1) of another call.
    fn copy_data() -> Vec<u8> {
        let mut out = SIGNATURE.to_vec();
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(&4u32.to_be_bytes());
        out.extend_from_slice(b"ext!");
        let user = Uuid::from_u128(7).to_string();
        let rows: [[Option<Vec<u8>>; COLUMNS]; 3] = [
            [
                Some(b"c1".to_vec()),
                Some(1i16.to_be_bytes().to_vec()),
                Some(user.into_bytes()),
                Some(b"pi_1".to_vec()),
                Some(1i64.to_be_bytes().to_vec()),
                None,
                Some(9i64.to_be_bytes().to_vec()),
                Some(3i64.to_be_bytes().to_vec()),
                Some(0i64.to_be_bytes().to_vec()),
            ],
            [
                Some(b"c1".to_vec()),
                Some(4i16.to_be_bytes().to_vec()),
                Some(b"twilio".to_vec()),
                None,
                Some(15_000i64.to_be_bytes().to_vec()),
                Some(0i64.to_be_bytes().to_vec()),
                None,
                None,
                None,
            ],
            [
                Some(b"c2".to_vec()),
                Some((-1i16).to_be_bytes().to_vec()),
                None,
                None,
                None,
                None,
                None,
                None,
                None,
            ],
        ];
        for r in &rows {
            out.extend_from_slice(&(COLUMNS as i16).to_be_bytes());
            for v in r {
                field(&mut out, v.as_deref());
            }
        }
        out.extend_from_slice(&(-1i16).to_be_bytes());
        out
    }

    /// However the data is cut into chunks, the same rows; the fold reads the request and the
    /// cost, and sets aside the call it cannot read.
    #[test]
    fn binary_copy_rows_are_read_across_chunks() {
        let data = copy_data();
        for size in [1, 2, 3, 7, 19, 64, data.len()] {
            let mut copy = CopyBinary::default();
            let mut fold = CallFold::new(Reconciler::default());
            for chunk in data.chunks(size) {
                copy.push(chunk, |f| fold.row(f)).unwrap();
            }
            copy.finish().unwrap();
            let (r, refold) = fold.finish();
            assert_eq!(refold, vec!["c2".to_string()], "chunks of {size}");
            let report = r.report();
            assert_eq!(report.calls.len(), 1);
            let line = &report.calls[0];
            assert_eq!(line.payment_intent.as_deref(), Some("pi_1"));
            assert_eq!(line.requested_at.unwrap().timestamp(), 946_684_800);
            assert_eq!(line.cost_cents["twilio"], 2);
        }
        let mut copy = CopyBinary::default();
        copy.push(&data[..data.len() - 2], |_| Ok(())).unwrap();
        assert!(copy.finish().is_err(), "no trailer: cut short");
    }
}
