//! `-o json`: the replies as they are on the wire, enums by name.

use serde::Serializer;

use crate::proto::nsp::target;

/// How a command prints what it read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Tables for people.
    #[default]
    Text,
    /// One JSON document (the admin API's messages, field names as in the protos).
    Json,
}

/// Renders `value` as `output` asks: `text` by `render`, else pretty JSON.
pub fn show<T: serde::Serialize>(
    output: Output,
    value: &T,
    render: impl Fn(&T) -> String,
) -> String {
    match output {
        Output::Text => render(value),
        Output::Json => {
            let mut out = serde_json::to_string_pretty(value).expect("protos serialize");
            out.push('\n');
            out
        }
    }
}

/// "running", "failed", … rather than the wire number.
pub fn plugin_state<S: Serializer>(state: &i32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&super::status::state_name(*state))
}

pub fn target_status<S: Serializer>(status: &i32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(target::Status::try_from(*status).map_or("?", |v| v.as_str_name()))
}

pub fn target_type<S: Serializer>(kind: &i32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(target::Type::try_from(*kind).map_or("?", |v| v.as_str_name()))
}
