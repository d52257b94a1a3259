//! The protobuf codec of every gRPC surface: prost's, except that a request
//! that does not decode is the caller's mistake (INVALID_ARGUMENT), not a
//! server fault (tonic-prost says INTERNAL).

use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::{Code, Status};
use tonic_prost::{ProstCodec, ProstDecoder};

/// Named by `build.rs` (`codec_path`) for every generated client and server.
pub struct ProtoCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for ProtoCodec<T, U> {
    fn default() -> Self {
        Self(ProstCodec::default())
    }
}

impl<T, U> Codec for ProtoCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = ProtoDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProtoDecoder(self.0.decoder())
    }
}

pub struct ProtoDecoder<U>(ProstDecoder<U>);

impl<U: Message + Default> Decoder for ProtoDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // prost's decoder fails only on a malformed message.
        self.0.decode(buf).map_err(|s| match s.code() {
            Code::Internal => {
                Status::invalid_argument(format!("malformed protobuf message: {}", s.message()))
            }
            _ => s,
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// Longest part of a `grpc-message` the servers keep, in bytes of its
/// percent-encoding (the "…" mark adds 9). gRPC clients refuse received
/// metadata past 16 KiB by default: a message quoting a long input (a name
/// of 20 000 characters) would reach the client as RESOURCE_EXHAUSTED
/// instead of the error.
const STATUS_MESSAGE_BYTES: usize = 1024;

/// How tonic's `grpc-message` starts (percent-encoded) when a request
/// message is over the server's limit.
const TOO_LARGE: &[u8] = b"Error,%20decoded%20message%20length%20too%20large";

/// Tidies an error's status, sent as headers when the call fails before any
/// message (a stream that fails later sends it in trailers, which this does
/// not see):
/// - a request over the size limit is RESOURCE_EXHAUSTED, as gRPC's status
///   code table and other servers say (tonic says OUT_OF_RANGE);
/// - `grpc-message` is cut to [`STATUS_MESSAGE_BYTES`], marked with "…",
///   never splitting an escape or a multi-byte character.
pub fn clamp_status_message<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers_mut();
    let Some(message) = headers.get("grpc-message") else {
        return response;
    };
    if message.as_bytes().starts_with(TOO_LARGE)
        && headers
            .get("grpc-status")
            .is_some_and(|c| c.as_bytes() == b"11")
    {
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
    }
    let Some(message) = headers.get("grpc-message") else {
        return response;
    };
    let bytes = message.as_bytes();
    if bytes.len() <= STATUS_MESSAGE_BYTES {
        return response;
    }
    let cut = clamp_at(bytes, STATUS_MESSAGE_BYTES);
    let mut clamped = bytes[..cut].to_vec();
    clamped.extend_from_slice(b"%E2%80%A6");
    if let Ok(value) = http::HeaderValue::from_bytes(&clamped) {
        headers.insert("grpc-message", value);
    }
    response
}

/// Where to cut percent-encoded `bytes` at most `limit` long.
fn clamp_at(bytes: &[u8], limit: usize) -> usize {
    // Escapes before the limit, as (start, byte value).
    let mut escapes = Vec::new();
    let mut i = 0;
    while i < limit {
        if bytes[i] == b'%' {
            if i + 3 > limit {
                break;
            }
            let value = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .unwrap_or(0);
            escapes.push((i, value));
            i += 3;
        } else {
            i += 1;
        }
    }
    char_start(&escapes, i)
}

/// `at`, or the start of the multi-byte character whose escapes end there
/// unfinished (or of continuation bytes with no lead byte before them).
fn char_start(escapes: &[(usize, u8)], at: usize) -> usize {
    let (mut cut, mut continuation) = (at, 0);
    for &(start, value) in escapes.iter().rev() {
        if start + 3 != cut {
            break;
        }
        match value {
            0x80..=0xbf => {
                continuation += 1;
                cut = start;
            }
            0xc0..=0xff => {
                let needed = match value {
                    0xf0.. => 3,
                    0xe0.. => 2,
                    _ => 1,
                };
                return if continuation >= needed { at } else { start };
            }
            _ => break,
        }
    }
    cut
}

#[cfg(test)]
mod status_message_tests {
    use super::*;

    fn clamped(message: &str) -> String {
        let response = http::Response::builder()
            .header("grpc-message", message)
            .body(())
            .unwrap();
        let out = clamp_status_message(response);
        out.headers()["grpc-message"].to_str().unwrap().to_string()
    }

    #[test]
    fn a_long_message_is_cut_to_the_limit_and_marked() {
        let long = "a".repeat(20_000);
        let out = clamped(&long);
        assert_eq!(
            out,
            format!("{}%E2%80%A6", "a".repeat(STATUS_MESSAGE_BYTES))
        );
        assert_eq!(clamped("short%20one"), "short%20one");
    }

    #[test]
    fn the_cut_splits_no_escape_and_no_character() {
        // (ASCII bytes short of the limit, what follows them, what of it is
        // kept before the mark). "é" is %C3%A9, "€" %E2%82%AC.
        let cases = [
            // A two-byte character that would end past the limit goes whole.
            (4, "%C3%A9".repeat(10), ""),
            // Whole characters before the limit are kept.
            (6, "%C3%A9".repeat(10), "%C3%A9"),
            (9, "%E2%82%AC".repeat(10), "%E2%82%AC"),
            // A three-byte character cut after two of its bytes goes whole.
            (7, "%E2%82%AC".repeat(10), ""),
            // An ASCII escape may end right at the limit.
            (3, format!("%20{}", "b".repeat(10)), "%20"),
            // One that would cross it is left out whole.
            (2, format!("%20{}", "b".repeat(10)), ""),
        ];
        for (short, tail, kept) in cases {
            let head = "a".repeat(STATUS_MESSAGE_BYTES - short);
            assert_eq!(
                clamped(&format!("{head}{tail}")),
                format!("{head}{kept}%E2%80%A6"),
                "{short} short of the limit, then {tail}"
            );
        }
    }
}

#[cfg(test)]
mod status_code_tests {
    use super::*;

    fn status_of(code: &str, message: &str) -> String {
        let response = http::Response::builder()
            .header("grpc-status", code)
            .header("grpc-message", message)
            .body(())
            .unwrap();
        let out = clamp_status_message(response);
        out.headers()["grpc-status"].to_str().unwrap().to_string()
    }

    #[test]
    fn a_request_over_the_limit_is_resource_exhausted() {
        let too_large =
            "Error,%20decoded%20message%20length%20too%20large:%20found%2070000%20bytes";
        assert_eq!(status_of("11", too_large), "8");
        // Other OUT_OF_RANGE errors, and other codes, stay as they are.
        assert_eq!(status_of("11", "index%20past%20the%20end"), "11");
        assert_eq!(status_of("3", too_large), "3");
    }
}
