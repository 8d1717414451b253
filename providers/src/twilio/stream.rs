//! Twilio Media Streams messages (the bidirectional `<Connect><Stream>` WebSocket): one enum,
//! tagged by `event`, for both directions. Inbound messages are parsed borrowed from the text
//! frame (the base64 payload of a `media` message is not copied); the hot outbound message, a
//! `media` frame, is written by [`MediaFrames`] straight into a string, without a JSON tree.
//!
//! Shapes as Twilio documents them ("Media Streams — WebSocket Messages"): every message has
//! `event`; Twilio's own messages carry `sequenceNumber` and (except `connected`) `streamSid`;
//! numbers inside are strings (`"sequenceNumber": "2"`, `"chunk": "1"`).

use std::borrow::Cow;
use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// A Media Streams message, either way.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum StreamMessage<'a> {
    /// Twilio → us, first.
    Connected {
        #[serde(borrow, default)]
        protocol: Cow<'a, str>,
        #[serde(borrow, default)]
        version: Cow<'a, str>,
    },
    /// Twilio → us: the stream's and call's ids and our `<Parameter>`s.
    Start {
        #[serde(
            borrow,
            rename = "sequenceNumber",
            default,
            skip_serializing_if = "Option::is_none"
        )]
        sequence_number: Option<Cow<'a, str>>,
        #[serde(
            borrow,
            rename = "streamSid",
            default,
            skip_serializing_if = "Option::is_none"
        )]
        stream_sid: Option<Cow<'a, str>>,
        start: Start,
    },
    /// Either way: 20 ms of 8 kHz μ-law, base64.
    Media {
        #[serde(
            borrow,
            rename = "sequenceNumber",
            default,
            skip_serializing_if = "Option::is_none"
        )]
        sequence_number: Option<Cow<'a, str>>,
        #[serde(borrow, rename = "streamSid", default)]
        stream_sid: Cow<'a, str>,
        #[serde(borrow)]
        media: Media<'a>,
    },
    /// Us → Twilio: tell me when the audio before this has played; Twilio → us: it has.
    Mark {
        #[serde(
            borrow,
            rename = "sequenceNumber",
            default,
            skip_serializing_if = "Option::is_none"
        )]
        sequence_number: Option<Cow<'a, str>>,
        #[serde(borrow, rename = "streamSid", default)]
        stream_sid: Cow<'a, str>,
        #[serde(borrow)]
        mark: Mark<'a>,
    },
    /// Us → Twilio: drop the audio you buffered (marks come back at once).
    Clear {
        #[serde(borrow, rename = "streamSid", default)]
        stream_sid: Cow<'a, str>,
    },
    /// Twilio → us: a key pressed.
    Dtmf {
        #[serde(
            borrow,
            rename = "sequenceNumber",
            default,
            skip_serializing_if = "Option::is_none"
        )]
        sequence_number: Option<Cow<'a, str>>,
        #[serde(borrow, rename = "streamSid", default)]
        stream_sid: Cow<'a, str>,
        #[serde(borrow)]
        dtmf: Dtmf<'a>,
    },
    /// Twilio → us, last: the stream stopped (the call ended or the stream was stopped).
    Stop {
        #[serde(
            borrow,
            rename = "sequenceNumber",
            default,
            skip_serializing_if = "Option::is_none"
        )]
        sequence_number: Option<Cow<'a, str>>,
        #[serde(borrow, rename = "streamSid", default)]
        stream_sid: Cow<'a, str>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stop: Option<Stop>,
    },
    /// Anything else (an event this code does not know).
    #[serde(other, skip_serializing)]
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Start {
    #[serde(default)]
    pub account_sid: String,
    #[serde(default)]
    pub stream_sid: String,
    #[serde(default)]
    pub call_sid: String,
    #[serde(default)]
    pub tracks: Vec<String>,
    #[serde(default)]
    pub custom_parameters: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_format: Option<MediaFormat>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MediaFormat {
    pub encoding: String,
    pub sample_rate: u32,
    pub channels: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Media<'a> {
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub track: Option<Cow<'a, str>>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub chunk: Option<Cow<'a, str>>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub payload: Cow<'a, str>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mark<'a> {
    #[serde(borrow)]
    pub name: Cow<'a, str>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dtmf<'a> {
    #[serde(borrow, default)]
    pub track: Cow<'a, str>,
    #[serde(borrow)]
    pub digit: Cow<'a, str>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Stop {
    #[serde(default)]
    pub account_sid: String,
    #[serde(default)]
    pub call_sid: String,
}

impl<'a> StreamMessage<'a> {
    /// Parses one text frame, borrowing from it. `None` when it is not a message.
    pub fn parse(text: &'a str) -> Option<Self> {
        serde_json::from_str(text).ok()
    }

    /// The message as a text frame.
    pub fn to_text(&self) -> String {
        serde_json::to_string(self).expect("a stream message serialises")
    }

    /// The `streamSid` the message names, if any.
    pub fn stream_sid(&self) -> Option<&str> {
        match self {
            StreamMessage::Start {
                stream_sid, start, ..
            } => Some(stream_sid.as_deref().unwrap_or(&start.stream_sid)),
            StreamMessage::Media { stream_sid, .. }
            | StreamMessage::Mark { stream_sid, .. }
            | StreamMessage::Clear { stream_sid }
            | StreamMessage::Dtmf { stream_sid, .. }
            | StreamMessage::Stop { stream_sid, .. } => Some(stream_sid),
            StreamMessage::Connected { .. } | StreamMessage::Unknown => None,
        }
    }

    pub fn media(stream_sid: &'a str, payload: String) -> Self {
        StreamMessage::Media {
            sequence_number: None,
            stream_sid: stream_sid.into(),
            media: Media {
                track: None,
                chunk: None,
                timestamp: None,
                payload: payload.into(),
            },
        }
    }

    pub fn mark(stream_sid: &'a str, name: &'a str) -> Self {
        StreamMessage::Mark {
            sequence_number: None,
            stream_sid: stream_sid.into(),
            mark: Mark { name: name.into() },
        }
    }

    pub fn clear(stream_sid: &'a str) -> Self {
        StreamMessage::Clear {
            stream_sid: stream_sid.into(),
        }
    }
}

/// A media-stream message as its reader uses it, 50 times a second (our session reading
/// Twilio's, the simulator reading ours): one pass over the text, borrowed, only these fields
/// (the rest skipped without being kept). Cheaper than
/// [`StreamMessage`], whose internally tagged enum buffers every field before it knows the
/// variant.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Inbound<'a> {
    #[serde(borrow)]
    pub event: Cow<'a, str>,
    #[serde(borrow, default, rename = "streamSid")]
    pub stream_sid: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub media: Option<InboundMedia<'a>>,
    #[serde(borrow, default)]
    pub mark: Option<Mark<'a>>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct InboundMedia<'a> {
    #[serde(borrow)]
    pub payload: Cow<'a, str>,
}

impl<'a> Inbound<'a> {
    /// `None` when the text is not a JSON object with an `event`.
    pub fn parse(text: &'a str) -> Option<Self> {
        serde_json::from_str(text).ok()
    }
}

/// Writes outbound `media` messages for one stream: the JSON around the payload is made once,
/// each frame costs one string and a base64 encoding into it.
#[derive(Debug, Clone)]
pub struct MediaFrames {
    head: String,
}

const MEDIA_TAIL: &str = "\"}}";

impl MediaFrames {
    pub fn new(stream_sid: &str) -> Self {
        let sid = serde_json::to_string(stream_sid).expect("a string serialises");
        MediaFrames {
            head: format!(r#"{{"event":"media","streamSid":{sid},"media":{{"payload":""#),
        }
    }

    /// `{"event":"media","streamSid":…,"media":{"payload":"<base64 of audio>"}}`.
    pub fn frame(&self, audio: &[u8]) -> String {
        let mut text =
            String::with_capacity(self.head.len() + audio.len().div_ceil(3) * 4 + MEDIA_TAIL.len());
        text.push_str(&self.head);
        BASE64.encode_string(audio, &mut text);
        text.push_str(MEDIA_TAIL);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twilio_messages_parse_borrowed() {
        let media = r#"{"event":"media","sequenceNumber":"3","media":{"track":"inbound","chunk":"1","timestamp":"5","payload":"/////w=="},"streamSid":"MZ1"}"#;
        let Some(StreamMessage::Media {
            stream_sid, media, ..
        }) = StreamMessage::parse(media)
        else {
            panic!("a media message");
        };
        assert_eq!(stream_sid, "MZ1");
        assert!(matches!(media.payload, Cow::Borrowed("/////w==")));
        let start = r#"{"event":"start","sequenceNumber":"1","start":{"accountSid":"AC1","streamSid":"MZ1","callSid":"CA1","tracks":["inbound"],"customParameters":{"call_id":"x"},"mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}},"streamSid":"MZ1"}"#;
        let Some(StreamMessage::Start { start, .. }) = StreamMessage::parse(start) else {
            panic!("a start message");
        };
        assert_eq!(start.call_sid, "CA1");
        assert_eq!(start.custom_parameters["call_id"], "x");
        let mark =
            r#"{"event":"mark","sequenceNumber":"4","streamSid":"MZ1","mark":{"name":"2:15"}}"#;
        assert_eq!(
            StreamMessage::parse(mark),
            Some(StreamMessage::Mark {
                sequence_number: Some("4".into()),
                stream_sid: "MZ1".into(),
                mark: Mark {
                    name: "2:15".into()
                }
            })
        );
        assert!(matches!(
            StreamMessage::parse(
                r#"{"event":"stop","sequenceNumber":"9","streamSid":"MZ1","stop":{"accountSid":"AC1","callSid":"CA1"}}"#
            ),
            Some(StreamMessage::Stop { .. })
        ));
        assert_eq!(
            StreamMessage::parse(r#"{"event":"something-new","streamSid":"MZ1"}"#),
            Some(StreamMessage::Unknown)
        );
        assert_eq!(StreamMessage::parse("not json"), None);
        // An escaped string is still read (owned).
        assert_eq!(
            StreamMessage::parse(r#"{"event":"mark","streamSid":"MZ1","mark":{"name":"a\"b"}}"#)
                .and_then(|m| match m {
                    StreamMessage::Mark { mark, .. } => Some(mark.name.into_owned()),
                    _ => None,
                }),
            Some("a\"b".to_string())
        );
    }

    #[test]
    fn inbound_messages_read_only_what_the_session_uses() {
        let media = r#"{"event":"media","sequenceNumber":"3","media":{"track":"inbound","chunk":"1","timestamp":"5","payload":"/////w=="},"streamSid":"MZ1"}"#;
        let m = Inbound::parse(media).expect("a message");
        assert_eq!(m.event, "media");
        assert_eq!(m.stream_sid.as_deref(), Some("MZ1"));
        assert!(matches!(
            m.media.map(|m| m.payload),
            Some(Cow::Borrowed("/////w=="))
        ));
        let mark = Inbound::parse(
            r#"{"event":"mark","sequenceNumber":"4","streamSid":"MZ1","mark":{"name":"2:15"}}"#,
        )
        .expect("a message");
        assert_eq!(
            (mark.event.as_ref(), mark.mark.map(|m| m.name)),
            ("mark", Some("2:15".into()))
        );
        let stop = Inbound::parse(
            r#"{"event":"stop","sequenceNumber":"9","streamSid":"MZ1","stop":{"accountSid":"AC1","callSid":"CA1"}}"#,
        )
        .expect("a message");
        assert_eq!(stop.event, "stop");
        assert_eq!(Inbound::parse("not json"), None);
        assert_eq!(Inbound::parse(r#"{"streamSid":"MZ1"}"#), None);
    }

    #[test]
    fn outbound_frames_are_the_messages_twilio_reads() {
        let frames = MediaFrames::new("MZ\"1");
        let audio = [0xFFu8, 0x7F, 0x00, 0x12];
        let text = frames.frame(&audio);
        let parsed: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        let expected = serde_json::to_value(StreamMessage::media("MZ\"1", BASE64.encode(audio)))
            .expect("JSON");
        assert_eq!(parsed, expected);
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&StreamMessage::clear("MZ1").to_text())
                .expect("JSON"),
            serde_json::json!({"event": "clear", "streamSid": "MZ1"})
        );
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&StreamMessage::mark("MZ1", "1:2").to_text())
                .expect("JSON"),
            serde_json::json!({"event": "mark", "streamSid": "MZ1", "mark": {"name": "1:2"}})
        );
    }
}
