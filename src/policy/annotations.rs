//! Reading pod annotations: the map the runtime passes, and parsing each value into typed
//! ports, ranges, CIDRs and IDs. Every error names the annotation and quotes its value escaped.

use crate::cni::error::{Error, Result};
use crate::install::conflist::POD_ANNOTATIONS_CAPABILITY;
use crate::plan::{IfName, PortRange};
use ipnetwork::IpNetwork;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// A list annotation longer than this is refused: no workload needs more, and each entry can
/// cost a rule.
pub const MAX_LIST_ITEMS: usize = 256;

/// How much of an invalid value an error message quotes.
pub(super) const QUOTE_LIMIT: usize = 64;

/// The pod's annotations, every value known to be a string.
pub(super) struct Annotations<'a>(pub(super) BTreeMap<&'a str, &'a str>);

impl<'a> Annotations<'a> {
    /// `None` when the runtime passed none at all (the capability is not enabled). A null map
    /// is a pod without annotations: Go runtimes marshal an empty map as null.
    pub(super) fn from_runtime_config(runtime_config: Option<&'a Value>) -> Result<Option<Self>> {
        let raw = match runtime_config {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Object(rc)) => match rc.get(POD_ANNOTATIONS_CAPABILITY) {
                None => return Ok(None),
                Some(raw) => raw,
            },
            Some(_) => return Err(Error::config("runtimeConfig must be a JSON object")),
        };
        let map = match raw {
            Value::Null => return Ok(Some(Annotations(BTreeMap::new()))),
            Value::Object(map) => map,
            _ => {
                return Err(Error::config(format!(
                    "runtimeConfig[\"{POD_ANNOTATIONS_CAPABILITY}\"] must be an object of \
                     annotation names to strings"
                )))
            }
        };
        map.iter()
            .map(|(key, value)| match value {
                Value::String(v) => Ok((key.as_str(), v.as_str())),
                _ => Err(Error::config(format!(
                    "pod annotation {}: the value must be a string",
                    quote(key)
                ))),
            })
            .collect::<Result<_>>()
            .map(|map| Some(Annotations(map)))
    }

    pub(super) fn get(&self, key: &str) -> Option<&'a str> {
        self.0.get(key).copied()
    }
}

#[derive(Clone, Copy)]
pub(super) enum ListForm {
    /// `*` is every port or address (no restriction), "" is none: Istio's include lists.
    Include,
    /// "" is the empty list; `*` is refused.
    Exclude,
}

/// CIDRs from a mesh's annotations may have host bits set, as Istio and Linkerd accept them
/// (iptables masks them); ours are refused like the netconf's.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum HostBits {
    Mask,
    Refuse,
}

/// Reads annotations for one overlay, recording which ones it used.
pub(super) struct Reader<'a, 'b> {
    pub(super) annotations: &'b Annotations<'a>,
    /// Linkerd reads an empty value as no override at all.
    pub(super) empty_is_unset: bool,
    pub(super) used: &'b mut Vec<String>,
}

impl<'a> Reader<'a, '_> {
    pub(super) fn value(&mut self, key: &str) -> Option<&'a str> {
        let v = self.annotations.get(key)?;
        if self.empty_is_unset && v.trim().is_empty() {
            return None;
        }
        self.used.push(key.to_string());
        Some(v)
    }

    pub(super) fn number<T: FromStr>(&mut self, key: &str, what: &str) -> Result<Option<T>> {
        let Some(v) = self.value(key) else {
            return Ok(None);
        };
        parse_number(v)
            .ok_or_else(|| invalid(key, v, what))
            .map(Some)
    }

    pub(super) fn port(&mut self, key: &str) -> Result<Option<u16>> {
        match self.number::<u16>(key, "must be a port in 1-65535")? {
            Some(0) => Err(invalid(key, "0", "must be a port in 1-65535")),
            other => Ok(other),
        }
    }

    pub(super) fn id(&mut self, key: &str) -> Result<Option<u32>> {
        self.number(key, "must be a numeric ID in 0-4294967295")
    }

    /// One numeric ID or a comma-separated list of them.
    pub(super) fn ids(&mut self, key: &str) -> Result<Option<Vec<u32>>> {
        let list = self.list(key, ListForm::Exclude, |item| {
            parse_number::<u32>(item)
                .ok_or_else(|| format!("{} is not a numeric ID in 0-4294967295", quote(item)))
        })?;
        match list.flatten() {
            Some(ids) if ids.is_empty() => {
                Err(invalid(key, "", "must be a numeric ID or a list of them"))
            }
            other => Ok(other),
        }
    }

    pub(super) fn interfaces(&mut self, key: &str) -> Result<Option<Vec<IfName>>> {
        Ok(self
            .list(key, ListForm::Exclude, |item| item.trim().parse::<IfName>())?
            .flatten())
    }

    /// `Some(None)` is `*` for an include list.
    pub(super) fn ports(
        &mut self,
        key: &str,
        form: ListForm,
    ) -> Result<Option<Option<Vec<PortRange>>>> {
        self.list(key, form, |item| {
            item.parse::<PortRange>().map_err(|why| {
                // `PortRange` quotes what it got; a long entry is quoted here, cut.
                if item.len() <= QUOTE_LIMIT {
                    why
                } else {
                    format!("{} is not a port or a port range", quote(item))
                }
            })
        })
    }

    pub(super) fn excluded_ports(&mut self, key: &str) -> Result<Option<Vec<PortRange>>> {
        Ok(self.ports(key, ListForm::Exclude)?.flatten())
    }

    pub(super) fn excluded_cidrs(
        &mut self,
        key: &str,
        host_bits: HostBits,
    ) -> Result<Option<Vec<IpNetwork>>> {
        Ok(self.cidrs(key, ListForm::Exclude, host_bits)?.flatten())
    }

    pub(super) fn cidrs(
        &mut self,
        key: &str,
        form: ListForm,
        host_bits: HostBits,
    ) -> Result<Option<Option<Vec<IpNetwork>>>> {
        self.list(key, form, |item| {
            // ipnetwork's errors repeat the input unescaped: say it here instead.
            let net = item.trim().parse::<IpNetwork>().map_err(|_| {
                format!(
                    "{} is not an address or a network in CIDR notation",
                    quote(item)
                )
            })?;
            let masked = IpNetwork::new(net.network(), net.prefix()).map_err(|e| e.to_string())?;
            if masked != net && host_bits == HostBits::Refuse {
                return Err(format!(
                    "{} has host bits set (did you mean {masked} or a single address?)",
                    quote(item)
                ));
            }
            Ok(masked)
        })
    }

    pub(super) fn list<T>(
        &mut self,
        key: &str,
        form: ListForm,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Option<Option<Vec<T>>>> {
        let Some(v) = self.value(key) else {
            return Ok(None);
        };
        let trimmed = v.trim();
        match (form, trimmed) {
            (ListForm::Include, "*") => return Ok(Some(None)),
            (_, "") => return Ok(Some(Some(Vec::new()))),
            (ListForm::Exclude, "*") => {
                return Err(invalid(key, v, "\"*\" is not allowed in an exclusion list"))
            }
            _ => {}
        }
        if trimmed.split(',').nth(MAX_LIST_ITEMS).is_some() {
            return Err(invalid(
                key,
                v,
                format!("more than {MAX_LIST_ITEMS} entries"),
            ));
        }
        trimmed
            .split(',')
            .map(|item| {
                if item.trim().is_empty() {
                    return Err(invalid(key, v, "has an empty entry"));
                }
                parse(item).map_err(|why| invalid(key, v, why))
            })
            .collect::<Result<Vec<_>>>()
            .map(|list| Some(Some(list)))
    }
}

/// Unsigned decimal digits only (no sign, no blanks inside), as a `T`.
pub(super) fn parse_number<T: FromStr>(v: &str) -> Option<T> {
    let v = v.trim();
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

pub(super) fn invalid(key: &str, value: &str, why: impl fmt::Display) -> Error {
    Error::config(format!(
        "pod annotation {key}: invalid value {}: {why}",
        quote(value)
    ))
}

/// A workload's string, safe for a log line or an error: escaped, and cut if long.
pub(super) fn quote(s: &str) -> String {
    match s.char_indices().nth(QUOTE_LIMIT) {
        Some((cut, _)) => format!("{:?}... ({} bytes)", &s[..cut], s.len()),
        None => format!("{s:?}"),
    }
}
