//! Edits of a conflist's raw text that touch only its `plugins` array: every byte outside the
//! entries we add or remove stays as the primary agent wrote it (numbers such as `1e3` or
//! `123456789012345678901234567890`, key order, spacing), and removing what we added gives back
//! the original bytes exactly.
//!
//! The scanner only finds spans; it runs on text serde_json has already accepted, so it need not
//! diagnose malformed JSON (it returns `None` instead of panicking if it meets any).

/// Where the top-level `plugins` array and its elements are, as byte offsets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginsArray {
    /// Just after the `[`.
    pub open: usize,
    /// Each element's `[start, end)`.
    pub elements: Vec<(usize, usize)>,
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

/// End of the string starting at `b[i] == '"'`.
fn string_end(b: &[u8], mut i: usize) -> Option<usize> {
    i += 1;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

/// End of the JSON value starting at `b[i]`.
fn value_end(b: &[u8], i: usize) -> Option<usize> {
    match b.get(i)? {
        b'"' => string_end(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            while j < b.len() {
                match b[j] {
                    b'"' => {
                        j = string_end(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            None
        }
        _ => {
            let mut j = i;
            while j < b.len() && !matches!(b[j], b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
            {
                j += 1;
            }
            Some(j)
        }
    }
}

/// The last top-level `"plugins"` member's array (the one a JSON decoder keeps).
pub fn plugins_array(text: &str) -> Option<PluginsArray> {
    let b = text.as_bytes();
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_ws(b, i + 1);
    let mut found = None;
    while b.get(i) == Some(&b'"') {
        let key_end = string_end(b, i)?;
        let key: String = serde_json::from_str(&text[i..key_end]).ok()?;
        i = skip_ws(b, key_end);
        if b.get(i) != Some(&b':') {
            return None;
        }
        let start = skip_ws(b, i + 1);
        let end = value_end(b, start)?;
        if key == "plugins" && b.get(start) == Some(&b'[') {
            found = Some(array_elements(b, start)?);
        }
        i = skip_ws(b, end);
        if b.get(i) == Some(&b',') {
            i = skip_ws(b, i + 1);
        }
    }
    found
}

fn array_elements(b: &[u8], open_bracket: usize) -> Option<PluginsArray> {
    let open = open_bracket + 1;
    let mut elements = Vec::new();
    let mut i = skip_ws(b, open);
    while b.get(i) != Some(&b']') {
        let end = value_end(b, i)?;
        elements.push((i, end));
        i = skip_ws(b, end);
        if b.get(i) == Some(&b',') {
            i = skip_ws(b, i + 1);
        }
    }
    Some(PluginsArray { open, elements })
}

/// `text` without element `index`: from the end of the element before it (its comma, the
/// spacing, the element), or for the first one up to the next element.
pub fn remove_element(text: &str, array: &PluginsArray, index: usize) -> String {
    let (start, end) = array.elements[index];
    let range = if index > 0 {
        array.elements[index - 1].1..end
    } else if let Some(next) = array.elements.get(1) {
        start..next.0
    } else {
        start..end
    };
    let mut out = String::with_capacity(text.len());
    out.push_str(&text[..range.start]);
    out.push_str(&text[range.end..]);
    out
}

/// `text` with `value` appended to a non-empty array, laid out like the element before it.
pub fn append_element(text: &str, array: &PluginsArray, value: &serde_json::Value) -> String {
    let Some(&(last_start, last_end)) = array.elements.last() else {
        // Never called so: a list needs a primary plugin before ours.
        return text.to_owned();
    };
    // The spacing in front of the last element, after its comma or the `[`.
    let before = &text[array.open..last_start];
    let spacing = before.rsplit(',').next().unwrap_or(before);
    let rendered = match spacing.rfind('\n') {
        Some(nl) => {
            let indent = &spacing[nl + 1..];
            let pretty = serde_json::to_string_pretty(value).unwrap_or_default();
            pretty.replace('\n', &format!("\n{indent}"))
        }
        None => serde_json::to_string(value).unwrap_or_default(),
    };
    let mut out = String::with_capacity(text.len() + rendered.len() + spacing.len() + 1);
    out.push_str(&text[..last_end]);
    out.push(',');
    out.push_str(spacing);
    out.push_str(&rendered);
    out.push_str(&text[last_end..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spans<'a>(text: &'a str, a: &PluginsArray) -> Vec<&'a str> {
        a.elements.iter().map(|&(s, e)| &text[s..e]).collect()
    }

    #[test]
    fn finds_the_last_top_level_plugins_array() {
        let text = r#" {"x": {"plugins": [1]}, "s": "a\"]}", "plugins": [ {"type":"a","n":1e3} ,-0,"]" ,[1,[2]] ], "z": null}"#;
        let a = plugins_array(text).unwrap();
        assert_eq!(
            spans(text, &a),
            [r#"{"type":"a","n":1e3}"#, "-0", r#""]""#, "[1,[2]]"]
        );
        assert_eq!(plugins_array(r#"{"plugins": []}"#).unwrap().elements, []);
        assert_eq!(plugins_array(r#"{"plugins": {}}"#), None);
        assert_eq!(plugins_array("[]"), None);
    }

    #[test]
    fn append_then_remove_gives_the_original_bytes() {
        for text in [
            "{\n  \"plugins\": [\n    {\"type\": \"a\", \"big\": 123456789012345678901234567890}\n  ]\n}\n",
            "{\"plugins\":[{\"type\":\"a\"},{\"type\":\"b\",\"x\":-0}]}",
            "{\"plugins\": [\n\t{\"type\": \"a\"},\n\t{\"type\": \"b\", \"n\": 1e3}\n], \"name\": \"n\"}",
        ] {
            let a = plugins_array(text).unwrap();
            let with = append_element(text, &a, &json!({"type": "ours", "k": [1]}));
            let parsed: serde_json::Value = serde_json::from_str(&with).unwrap();
            assert_eq!(parsed["plugins"].as_array().unwrap().last().unwrap()["type"], "ours");
            let a2 = plugins_array(&with).unwrap();
            let back = remove_element(&with, &a2, a2.elements.len() - 1);
            assert_eq!(back, text);
        }
    }

    #[test]
    fn pretty_layout_follows_the_last_element() {
        let text = "{\"plugins\": [\n    {\"type\": \"a\"}\n  ]}";
        let a = plugins_array(text).unwrap();
        let with = append_element(text, &a, &json!({"type": "ours"}));
        assert_eq!(
            with,
            "{\"plugins\": [\n    {\"type\": \"a\"},\n    {\n      \"type\": \"ours\"\n    }\n  ]}"
        );
    }

    #[test]
    fn removing_the_first_element_keeps_the_rest() {
        let text = r#"{"plugins": [ {"type":"ours"}, {"type":"a"} ]}"#;
        let a = plugins_array(text).unwrap();
        assert_eq!(
            remove_element(text, &a, 0),
            r#"{"plugins": [ {"type":"a"} ]}"#
        );
        let text = r#"{"plugins": [ {"type":"ours"} ]}"#;
        let a = plugins_array(text).unwrap();
        assert_eq!(remove_element(text, &a, 0), r#"{"plugins": [  ]}"#);
    }
}
