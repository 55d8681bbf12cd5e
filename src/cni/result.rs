//! The previous plugin's result: ADD passes it through, and its addresses decide which IP
//! families get rules. It stays raw JSON: the runtime already hands it over in the config's
//! version, so converting between result versions would only risk losing fields.

use super::error::{Error, Result};
use crate::plan::Families;
use serde_json::Value;
use std::net::IpAddr;

/// `prevResult` is mandatory for a chained plugin's ADD (and CHECK, which must compare against
/// what ADD would install).
pub fn require(prev_result: Option<&Value>) -> Result<&Value> {
    prev_result.ok_or_else(|| {
        Error::config(
            "prevResult is missing: intercept-cni is a chained plugin and must follow a plugin \
             that creates the interface (list it after the main plugin in the conflist)",
        )
    })
}

/// What ADD prints: `prevResult` unchanged except `cniVersion`, set to the config's version.
pub fn passthrough(prev_result: &Value, cni_version: &str) -> Result<Value> {
    let mut result = prev_result.clone();
    let Value::Object(obj) = &mut result else {
        return Err(Error::config("prevResult must be a JSON object"));
    };
    obj.insert("cniVersion".into(), Value::String(cni_version.into()));
    Ok(result)
}

/// The families the pod has addresses in; both when the result lists none (the safe side:
/// rules for an unused family intercept nothing).
pub fn families(prev_result: &Value) -> Result<Families> {
    let ips = match prev_result.get("ips") {
        None | Some(Value::Null) => return Ok(Families::BOTH),
        Some(Value::Array(ips)) => ips,
        Some(other) => {
            return Err(Error::config(format!(
                "prevResult.ips: invalid value {other}: must be a list"
            )))
        }
    };
    let mut found = Families {
        ipv4: false,
        ipv6: false,
    };
    for (i, ip) in ips.iter().enumerate() {
        let address = ip.get("address").and_then(Value::as_str);
        let addr = address
            .and_then(|a| a.split_once('/').map_or(Some(a), |(addr, _)| Some(addr)))
            .and_then(|a| a.parse::<IpAddr>().ok())
            .ok_or_else(|| {
                Error::config(format!(
                    "prevResult.ips[{i}].address: invalid value {}: must be an address in CIDR notation",
                    ip.get("address").unwrap_or(&Value::Null)
                ))
            })?;
        match addr {
            IpAddr::V4(_) => found.ipv4 = true,
            IpAddr::V6(_) => found.ipv6 = true,
        }
    }
    if !found.ipv4 && !found.ipv6 {
        return Ok(Families::BOTH);
    }
    Ok(found)
}

/// Whether the pod's first address is IPv6 (istio-cni then programs IPv6 without dual-stack).
pub fn ipv6_first(prev_result: &Value) -> bool {
    prev_result
        .get("ips")
        .and_then(Value::as_array)
        .and_then(|ips| ips.first())
        .and_then(|ip| ip.get("address"))
        .and_then(Value::as_str)
        .is_some_and(|a| a.contains(':'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cni::version::SUPPORTED;
    use serde_json::json;

    /// A result as a main plugin of `version` returns it: 0.3.x/0.4.0 IPs carry `"version"`.
    fn prev_result(version: &str) -> Value {
        let mut ips = vec![
            json!({"address": "10.1.0.5/24", "gateway": "10.1.0.1", "interface": 2}),
            json!({"address": "fd00::5/64", "interface": 2}),
        ];
        if version.starts_with("0.") {
            ips[0]["version"] = json!("4");
            ips[1]["version"] = json!("6");
        }
        json!({
            "cniVersion": version,
            "interfaces": [
                {"name": "cni0", "mac": "00:11:22:33:44:55"},
                {"name": "veth1", "mac": "55:44:33:22:11:11"},
                {"name": "eth0", "mac": "99:88:77:66:55:44", "sandbox": "/var/run/netns/pod"}
            ],
            "ips": ips,
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {"nameservers": ["10.1.0.1"]}
        })
    }

    #[test]
    fn passthrough_changes_nothing_but_cni_version_for_every_version() {
        for v in SUPPORTED {
            let prev = prev_result(v);
            let out = passthrough(&prev, v).unwrap();
            assert_eq!(out, prev, "{v}");
            let has_ip_version = out["ips"][0].get("version").is_some();
            assert_eq!(has_ip_version, v.starts_with("0."), "{v}");
        }
    }

    #[test]
    fn passthrough_sets_the_configs_version() {
        let mut prev = prev_result("1.0.0");
        prev.as_object_mut().unwrap().remove("cniVersion");
        let out = passthrough(&prev, "1.0.0").unwrap();
        assert_eq!(out["cniVersion"], "1.0.0");
        assert_eq!(out["ips"], prev["ips"]);
        assert!(passthrough(&json!([1]), "1.0.0").is_err());
    }

    #[test]
    fn missing_prev_result_is_code_7() {
        let e = require(None).unwrap_err();
        assert_eq!(e.code, crate::cni::error::Code::InvalidConfig);
        assert!(e.msg.contains("prevResult"));
    }

    #[test]
    fn families_follow_the_addresses() {
        for v in SUPPORTED {
            assert_eq!(families(&prev_result(v)).unwrap(), Families::BOTH);
        }
        let v4 = json!({"ips": [{"address": "10.0.0.2/32"}]});
        assert_eq!(
            families(&v4).unwrap(),
            Families {
                ipv4: true,
                ipv6: false
            }
        );
        let v6 = json!({"ips": [{"version": "6", "address": "2001:db8::2/64"}]});
        assert_eq!(
            families(&v6).unwrap(),
            Families {
                ipv4: false,
                ipv6: true
            }
        );
        assert_eq!(families(&json!({})).unwrap(), Families::BOTH);
        assert_eq!(families(&json!({"ips": []})).unwrap(), Families::BOTH);
        for bad in [
            json!({"ips": "10.0.0.1"}),
            json!({"ips": [{"address": "nope/24"}]}),
            json!({"ips": [{}]}),
        ] {
            assert!(families(&bad).is_err(), "{bad}");
        }
    }
}
