//! The one error type of the plugin. Every failure maps to a CNI error code and is printed once,
//! as JSON on stdout, by `main`.

use std::fmt;

/// CNI error codes (SPEC.md "Error" section); plugin-specific ones are >= 100.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    IncompatibleVersion = 1,
    UnsupportedField = 2,
    UnknownContainer = 3,
    InvalidEnv = 4,
    Io = 5,
    Decode = 6,
    InvalidConfig = 7,
    TryAgainLater = 11,
    PluginNotAvailable = 50,
    PluginNotAvailableLimitedConnectivity = 51,
    /// The kernel or a backend tool refused the rules.
    Backend = 100,
    /// The host lacks a kernel feature the chosen backend needs.
    HostPrerequisites = 101,
    /// The netns given is the plugin's own (the host's): programming it would capture the node.
    HostNetns = 102,
    /// CHECK found the installed rules differ from what ADD would install now.
    Drift = 103,
    /// A panic was caught; always a bug.
    Internal = 199,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub code: Code,
    pub msg: String,
    pub details: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(code: Code, msg: impl Into<String>) -> Self {
        Error {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    pub fn env(var: &str, why: impl fmt::Display) -> Self {
        Error::new(
            Code::InvalidEnv,
            format!("invalid environment variable {var}: {why}"),
        )
    }

    pub fn config(why: impl Into<String>) -> Self {
        Error::new(Code::InvalidConfig, why)
    }

    pub fn io(what: impl fmt::Display, err: impl fmt::Display) -> Self {
        Error::new(Code::Io, format!("{what}: {err}"))
    }

    pub fn backend(what: impl Into<String>) -> Self {
        Error::new(Code::Backend, what)
    }

    /// A caught panic: always a bug. The payload's message (a `&str` or `String` in practice)
    /// is kept so the answer says what broke; the panic hook has logged where.
    pub fn from_panic(payload: &(dyn std::any::Any + Send)) -> Self {
        let what = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("unknown panic");
        Error::new(
            Code::Internal,
            format!("internal error (a bug; see the plugin's log): {what}"),
        )
    }

    /// Several failures from best-effort work (DEL, GC): all are reported, the first decides the code.
    pub fn collect(errors: Vec<Error>) -> Option<Self> {
        let mut iter = errors.into_iter();
        let first = iter.next()?;
        let rest: Vec<String> = iter.map(|e| e.msg).collect();
        if rest.is_empty() {
            return Some(first);
        }
        let details = if first.details.is_empty() {
            rest.join("; ")
        } else {
            format!("{}; {}", first.details, rest.join("; "))
        };
        Some(Error { details, ..first })
    }

    /// The CNI error object, in the config's version (or the newest when unknown).
    pub fn to_json(&self, cni_version: &str) -> serde_json::Value {
        let mut obj = serde_json::json!({
            "cniVersion": cni_version,
            "code": self.code as u32,
            "msg": self.msg,
        });
        if !self.details.is_empty() {
            obj["details"] = serde_json::Value::String(self.details.clone());
        }
        obj
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.details.is_empty() {
            write!(f, "{}", self.msg)
        } else {
            write!(f, "{}: {}", self.msg, self.details)
        }
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_code_msg_and_details_only_when_set() {
        let e = Error::new(Code::InvalidConfig, "bad port");
        let j = e.to_json("1.0.0");
        assert_eq!(j["code"], 7);
        assert_eq!(j["cniVersion"], "1.0.0");
        assert!(j.get("details").is_none());
        let j = e.with_details("inboundPort=0").to_json("1.1.0");
        assert_eq!(j["details"], "inboundPort=0");
    }

    #[test]
    fn panic_payloads_become_code_199() {
        let str_payload = std::panic::catch_unwind(|| panic!("boom")).unwrap_err();
        let e = Error::from_panic(str_payload.as_ref());
        assert_eq!(e.code, Code::Internal);
        assert!(e.msg.ends_with(": boom"), "{}", e.msg);
        let n = 7;
        let string_payload = std::panic::catch_unwind(|| panic!("bad {n}")).unwrap_err();
        assert!(Error::from_panic(string_payload.as_ref())
            .msg
            .ends_with(": bad 7"));
        let odd_payload = std::panic::catch_unwind(|| std::panic::panic_any(42u8)).unwrap_err();
        assert!(Error::from_panic(odd_payload.as_ref())
            .msg
            .ends_with("unknown panic"));
    }

    #[test]
    fn collect_keeps_first_code_and_all_messages() {
        let all = vec![Error::backend("a"), Error::io("b", "c"), Error::config("d")];
        let e = Error::collect(all).unwrap();
        assert_eq!(e.code, Code::Backend);
        assert_eq!(e.details, "b: c; d");
        assert!(Error::collect(vec![]).is_none());
    }
}
