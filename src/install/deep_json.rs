//! JSON as a runtime reads it: libcni (Go's encoding/json) accepts nesting up to 10000 levels,
//! serde_json's `Value` only up to 128. A network nested deeper than 128 would otherwise be
//! skipped as invalid while the runtime loads it, and the entry chained into a file the runtime
//! never reads. What the installer looks at is near the top; deeper values are checked for
//! syntax (serde's `IgnoredAny` walks them without recursion) and read as `null`. The file's
//! text, not this `Value`, is what is written back.

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// Go's encoding/json refuses deeper documents.
const RUNTIME_MAX_DEPTH: usize = 10_000;
/// Levels kept as values; far below serde_json's own limit of 128.
const KEPT_DEPTH: usize = 64;

/// Parses `text` as libcni would accept it; values nested deeper than `KEPT_DEPTH` are `null`.
pub fn parse(text: &str) -> Result<Value, String> {
    if depth(text) > RUNTIME_MAX_DEPTH {
        return Err(format!(
            "nested deeper than {RUNTIME_MAX_DEPTH} levels (runtimes refuse it too)"
        ));
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let value = Bounded(KEPT_DEPTH)
        .deserialize(&mut de)
        .and_then(|v| de.end().map(|()| v))
        .map_err(|e| e.to_string())?;
    Ok(value)
}

/// The deepest nesting of arrays and objects, strings skipped.
fn depth(text: &str) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0, false, false);
    for b in text.bytes() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// A value kept to this many more levels of nesting.
struct Bounded(usize);

impl<'de> DeserializeSeed<'de> for Bounded {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Value, D::Error> {
        if self.0 == 0 {
            serde::Deserialize::deserialize(de).map(|IgnoredAny| ())?;
            return Ok(Value::Null);
        }
        de.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Bounded {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(v.into())
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(v.into())
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut values = Vec::new();
        while let Some(v) = seq.next_element_seed(Bounded(self.0 - 1))? {
            values.push(v);
        }
        Ok(Value::Array(values))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut values = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value_seed(Bounded(self.0 - 1))?;
            values.insert(key, value);
        }
        Ok(Value::Object(values))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(levels: usize) -> String {
        format!(
            r#"{{"name":"k8s","plugins":[{{"type":"bridge","x":{}{}}}]}}"#,
            "[".repeat(levels),
            "]".repeat(levels)
        )
    }

    #[test]
    fn deep_documents_parse_as_runtimes_parse_them() {
        for levels in [1, 200, 9_000] {
            let doc = parse(&nested(levels)).unwrap();
            assert_eq!(doc["plugins"][0]["type"], "bridge", "{levels}");
            assert_eq!(doc["name"], "k8s");
        }
        assert!(parse(&nested(10_001)).unwrap_err().contains("deeper"));
        // Syntax is still checked at every depth.
        let broken = nested(300).replacen("[]", "[,]", 1);
        assert!(parse(&broken).is_err());
        assert!(parse(r#"{"a":1} x"#).is_err());
        assert!(parse(r#"{"s":"[[[[\"{{"}"#).is_ok());
        assert_eq!(
            parse(r#"{"a":[1,-2,3.5,"x",true,null,{}]}"#).unwrap(),
            serde_json::json!({"a":[1,-2,3.5,"x",true,null,{}]})
        );
    }
}
