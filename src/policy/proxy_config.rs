//! The entries of Istio's `proxy.istio.io/config` annotation that change interception:
//! `proxyMetadata.ISTIO_META_DNS_CAPTURE`, `proxyMetadata.INVALID_DROP` and
//! `proxyMetadata.ISTIO_DUAL_STACK` (IPv6 rules). Istio's injector
//! copies `proxyMetadata` into the proxy container's environment, where istio-cni reads them
//! (with Go's `strconv.ParseBool`).
//!
//! The annotation is a whole ProxyConfig in YAML or JSON. Only `proxyMetadata` is read and
//! nothing else in it is judged, so no YAML library is pulled in for two strings: JSON is parsed
//! with serde_json; YAML is read in the forms the annotation takes in practice (a block mapping
//! at the top level whose `proxyMetadata` is a block or a one-line flow mapping of plain or
//! quoted scalars). When one of the two keys appears in a form this reader does not follow
//! (anchors, multi-line scalars, nested flows), the annotation is refused rather than guessed at.

use serde_json::Value;

/// Larger annotations are refused (Kubernetes allows 256 KiB for all of a pod's annotations).
pub const MAX_BYTES: usize = 16 * 1024;

const DNS_CAPTURE: &str = "ISTIO_META_DNS_CAPTURE";
const INVALID_DROP: &str = "INVALID_DROP";
const DUAL_STACK: &str = "ISTIO_DUAL_STACK";
/// Every key read here.
const KEYS: [&str; 3] = [DNS_CAPTURE, INVALID_DROP, DUAL_STACK];
const METADATA: &str = "proxyMetadata";

/// What the pod's proxy asks for; `None` where it says nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyMetadata {
    pub dns_capture: Option<bool>,
    pub drop_invalid: Option<bool>,
    pub dual_stack: Option<bool>,
}

impl ProxyMetadata {
    pub fn parse(text: &str) -> Result<ProxyMetadata, String> {
        if text.len() > MAX_BYTES {
            return Err(format!("longer than {MAX_BYTES} bytes"));
        }
        // Neither key anywhere: nothing to read, whatever the rest says.
        if !KEYS.iter().any(|k| text.contains(k)) {
            return Ok(ProxyMetadata::default());
        }
        let entries = if text.trim_start().starts_with('{') {
            json_metadata(text)?
        } else {
            yaml_metadata(text)?
        };
        let flag = |key: &str| -> Result<Option<bool>, String> {
            let mut found = None;
            for (k, v) in entries.iter().filter(|(k, _)| k == key) {
                if found.is_some() {
                    return Err(format!("{METADATA}.{k} is given twice"));
                }
                found = Some(go_bool(v).ok_or_else(|| {
                    format!("{METADATA}.{k} must be true or false (Go's ParseBool), not {v:?}")
                })?);
            }
            Ok(found)
        };
        let metadata = ProxyMetadata {
            dns_capture: flag(DNS_CAPTURE)?,
            drop_invalid: flag(INVALID_DROP)?,
            dual_stack: flag(DUAL_STACK)?,
        };
        if metadata == ProxyMetadata::default() {
            return Err(format!(
                "{DNS_CAPTURE}, {INVALID_DROP} or {DUAL_STACK} appears outside a {METADATA} this reader \
                 follows (a top-level block or one-line flow mapping of plain or quoted strings)"
            ));
        }
        Ok(metadata)
    }
}

/// `strconv.ParseBool`, which istio-cni applies to the proxy's environment.
fn go_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

fn json_metadata(text: &str) -> Result<Vec<(String, String)>, String> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| format!("not a JSON ProxyConfig: {e}"))?;
    let Value::Object(config) = value else {
        return Err("not a JSON object".into());
    };
    let metadata = match config.get(METADATA) {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(format!("{METADATA} must be an object")),
    };
    let mut entries = Vec::new();
    for key in KEYS {
        match metadata.get(key) {
            None => {}
            Some(Value::String(s)) => entries.push((key.to_string(), s.clone())),
            Some(Value::Bool(b)) => entries.push((key.to_string(), b.to_string())),
            Some(_) => return Err(format!("{METADATA}.{key} must be a string")),
        }
    }
    Ok(entries)
}

/// The entries of a top-level `proxyMetadata` block or flow mapping.
fn yaml_metadata(text: &str) -> Result<Vec<(String, String)>, String> {
    let lines: Vec<(usize, &str)> = text
        .lines()
        .map(|l| l.trim_end())
        .filter(|l| !l.trim_start().is_empty() && !l.trim_start().starts_with('#'))
        .filter(|l| *l != "---")
        .map(|l| (l.len() - l.trim_start().len(), l.trim_start()))
        .collect();
    if lines.iter().any(|(_, l)| l.starts_with('\t')) {
        return Err("YAML does not allow tabs for indentation".into());
    }
    let top = lines.iter().map(|(i, _)| *i).min().unwrap_or(0);
    let mut entries = Vec::new();
    let mut seen = false;
    let mut i = 0;
    while i < lines.len() {
        let (indent, line) = lines[i];
        i += 1;
        if indent != top {
            continue;
        }
        let Some((key, rest)) = split_entry(line)? else {
            continue;
        };
        if key != METADATA {
            continue;
        }
        if seen {
            return Err(format!("{METADATA} is given twice"));
        }
        seen = true;
        if rest.starts_with('{') {
            entries.extend(flow_mapping(rest)?);
            continue;
        }
        if !rest.is_empty() {
            return Err(format!("{METADATA} must be a mapping"));
        }
        // The block: every line indented deeper, all at the first one's indentation.
        let child = match lines.get(i) {
            Some(&(indent, _)) if indent > top => indent,
            _ => continue,
        };
        while let Some(&(indent, line)) = lines.get(i) {
            if indent <= top {
                break;
            }
            i += 1;
            if indent != child {
                // A continuation of the entry before: only harmless for keys we ignore.
                if entries_mention_ours(line) || last_is_ours(&entries) {
                    return Err(format!("{METADATA} holds a multi-line value"));
                }
                continue;
            }
            match split_entry(line)? {
                Some((key, value)) => entries.push(entry(key, value)?),
                None => return Err(format!("{METADATA} must be a mapping of strings")),
            }
        }
    }
    Ok(entries
        .into_iter()
        .filter(|(k, _)| KEYS.contains(&k.as_str()))
        .collect())
}

/// An entry of `proxyMetadata`: only our keys' values are read (others may take any form).
fn entry(key: String, value: &str) -> Result<(String, String), String> {
    if KEYS.contains(&key.as_str()) {
        let value = scalar(value)?;
        Ok((key, value))
    } else {
        Ok((key, String::new()))
    }
}

fn entries_mention_ours(line: &str) -> bool {
    KEYS.iter().any(|k| line.contains(k))
}

fn last_is_ours(entries: &[(String, String)]) -> bool {
    entries
        .last()
        .is_some_and(|(k, _)| KEYS.contains(&k.as_str()))
}

/// `key: rest` (rest trimmed, empty for a nested block); `None` for a line that is no entry
/// (a list item, a flow continuation).
fn split_entry(line: &str) -> Result<Option<(String, &str)>, String> {
    let (key, rest) = if let Some(quote @ ('"' | '\'')) = line.chars().next() {
        let end = line[1..].find(quote).ok_or("an unterminated quoted key")? + 1;
        let after = line[end + 1..].trim_start();
        let Some(rest) = after.strip_prefix(':') else {
            return Ok(None);
        };
        (line[1..end].to_string(), rest)
    } else {
        // A plain key ends at the first ": " (or a ':' that ends the line).
        let colon = line
            .match_indices(':')
            .map(|(at, _)| at)
            .find(|&at| line[at + 1..].is_empty() || line[at + 1..].starts_with(' '));
        match colon {
            Some(at) => (line[..at].trim_end().to_string(), &line[at + 1..]),
            None => return Ok(None),
        }
    };
    Ok(Some((key, rest.trim())))
}

/// A one-line scalar: `"..."` (with `\"` and `\\`), `'...'` (with `''`), or plain (up to a
/// ` #` comment).
fn scalar(value: &str) -> Result<String, String> {
    match value.chars().next() {
        Some('"') => {
            let mut out = String::new();
            let mut chars = value[1..].chars();
            loop {
                match chars.next() {
                    None => return Err("an unterminated double-quoted value".into()),
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some(c @ ('"' | '\\')) => out.push(c),
                        _ => return Err("an escape this reader does not follow".into()),
                    },
                    Some(c) => out.push(c),
                }
            }
            trailing_comment_only(chars.as_str())?;
            Ok(out)
        }
        Some('\'') => {
            let body = &value[1..];
            let mut out = String::new();
            let mut rest = body;
            loop {
                let at = rest
                    .find('\'')
                    .ok_or("an unterminated single-quoted value")?;
                out.push_str(&rest[..at]);
                rest = &rest[at + 1..];
                match rest.strip_prefix('\'') {
                    Some(after) => {
                        out.push('\'');
                        rest = after;
                    }
                    None => break,
                }
            }
            trailing_comment_only(rest)?;
            Ok(out)
        }
        Some('&' | '*' | '|' | '>' | '!' | '[' | '{') => {
            Err("a value form this reader does not follow (anchor, tag, block or flow)".into())
        }
        _ => Ok(value
            .split(" #")
            .next()
            .unwrap_or_default()
            .trim()
            .to_string()),
    }
}

fn trailing_comment_only(rest: &str) -> Result<(), String> {
    let rest = rest.trim();
    if rest.is_empty() || rest.starts_with('#') {
        Ok(())
    } else {
        Err(format!("unexpected {rest:?} after a quoted value"))
    }
}

/// `{A: "x", B: y}` on one line, of scalars without commas or braces.
fn flow_mapping(text: &str) -> Result<Vec<(String, String)>, String> {
    let inner = text
        .strip_prefix('{')
        .and_then(|t| t.split(" #").next())
        .map(str::trim_end)
        .and_then(|t| t.strip_suffix('}'))
        .ok_or_else(|| format!("{METADATA} is a flow mapping that does not end on its line"))?;
    if inner.contains(['{', '[', '}']) {
        return Err(format!("{METADATA} holds a nested flow"));
    }
    let mut entries = Vec::new();
    for item in inner.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        match split_entry(item)? {
            Some((key, value)) => entries.push(entry(key, value)?),
            None => return Err(format!("{METADATA} must be a mapping of strings")),
        }
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> ProxyMetadata {
        ProxyMetadata::parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
    }

    const ON: ProxyMetadata = ProxyMetadata {
        dns_capture: Some(true),
        drop_invalid: None,
        dual_stack: None,
    };

    #[test]
    fn the_forms_istio_users_write() {
        for text in [
            "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n",
            "holdApplicationUntilProxyStarts: true\nproxyMetadata:\n  ISTIO_META_DNS_AUTO_ALLOCATE: 'true'\n  ISTIO_META_DNS_CAPTURE: true # on\ntracing: {}\n",
            "  proxyMetadata:\n    ISTIO_META_DNS_CAPTURE: 'True'\n",
            "proxyMetadata: {ISTIO_META_DNS_CAPTURE: \"true\", OTHER: x}\n",
            "{\"proxyMetadata\": {\"ISTIO_META_DNS_CAPTURE\": \"true\"}, \"concurrency\": 2}",
            "proxyMetadata:\n  OTHER: |\n    a\n    b\n  ISTIO_META_DNS_CAPTURE: \"1\"\n",
            "# comment\n---\nproxyMetadata:\n  \"ISTIO_META_DNS_CAPTURE\": \"t\"\n",
        ] {
            assert_eq!(parsed(text), ON, "{text:?}");
        }
        assert_eq!(
            parsed("proxyMetadata:\n  INVALID_DROP: \"false\"\n  ISTIO_META_DNS_CAPTURE: \"0\"\n"),
            ProxyMetadata {
                dns_capture: Some(false),
                drop_invalid: Some(false),
                dual_stack: None,
            }
        );
        assert_eq!(
            parsed("{\"proxyMetadata\": {\"ISTIO_DUAL_STACK\": \"true\"}}").dual_stack,
            Some(true)
        );
        // Nothing of ours: whatever else it says is not judged.
        for text in ["concurrency: 2", "{not json", ": : :", "[1, 2]", ""] {
            assert_eq!(parsed(text), ProxyMetadata::default(), "{text:?}");
        }
    }

    #[test]
    fn what_cannot_be_read_safely_is_refused() {
        for text in [
            "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: yes\n",
            "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true; rm -rf\"\n",
            "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n  ISTIO_META_DNS_CAPTURE: \"false\"\n",
            "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: |\n    true\n",
            "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: &a true\n",
            "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"tru\\x65\"\n",
            "proxyMetadata: {ISTIO_META_DNS_CAPTURE: {a: b}}\n",
            "proxyMetadata: {ISTIO_META_DNS_CAPTURE: \"true\"\n",
            "proxyMetadata: [ISTIO_META_DNS_CAPTURE]\n",
            "other:\n  proxyMetadata:\n    ISTIO_META_DNS_CAPTURE: \"true\"\n",
            "{\"proxyMetadata\": {\"ISTIO_META_DNS_CAPTURE\": 1}}",
            "{\"proxyMetadata\": \"ISTIO_META_DNS_CAPTURE\"}",
            "{\"proxyMetadata\": {\"ISTIO_META_DNS_CAPTURE\": \"true\"}",
        ] {
            assert!(ProxyMetadata::parse(text).is_err(), "{text:?} accepted");
        }
        let huge = format!(
            "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n{}",
            "# pad\n".repeat(MAX_BYTES)
        );
        assert!(ProxyMetadata::parse(&huge).is_err());
    }
}
