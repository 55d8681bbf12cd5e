//! Root only: hundreds of mutated configs (bit flips, deleted keys, swapped types, huge numbers,
//! odd unicode, deep nesting, truncation, plausible but different values) through the real
//! binary, against a pod netns that already has interception rules. Every answer must be one
//! valid JSON object (or nothing, where the verb succeeds silently) with a matching exit code;
//! no panic is caught or printed; a config the plugin refuses leaves the netns as it was.
//!
//! Deterministic: the same seed gives the same configs (`ICNI_MUTATION_SEED` picks another
//! for exploration; `ICNI_MUTATIONS` another count).

mod common;

use common::{run_plugin, Lab, INBOUND_PORT};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

const DEFAULT_SEED: u64 = 0x1CE_C0DE;
const DEFAULT_MUTATIONS: usize = 400;
/// CNI error codes for input the plugin refuses before touching the kernel.
const REFUSED_INPUT: [u64; 4] = [1, 4, 6, 7];

/// xorshift64*: enough randomness for mutations, and reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// Every path to a value in `v` (object keys and array indexes), the root excluded.
fn paths(v: &Value, prefix: &mut Vec<Value>, out: &mut Vec<Vec<Value>>) {
    let children: Vec<(Value, &Value)> = match v {
        Value::Object(m) => m.iter().map(|(k, c)| (json!(k), c)).collect(),
        Value::Array(a) => a.iter().enumerate().map(|(i, c)| (json!(i), c)).collect(),
        _ => return,
    };
    for (key, child) in children {
        prefix.push(key);
        out.push(prefix.clone());
        paths(child, prefix, out);
        prefix.pop();
    }
}

fn get_mut<'a>(v: &'a mut Value, path: &[Value]) -> Option<&'a mut Value> {
    path.iter().try_fold(v, |v, key| match key {
        Value::String(k) => v.get_mut(k.as_str()),
        Value::Number(i) => v.get_mut(i.as_u64()? as usize),
        _ => None,
    })
}

fn random_path(rng: &mut Rng, v: &Value) -> Vec<Value> {
    let mut all = Vec::new();
    paths(v, &mut Vec::new(), &mut all);
    rng.pick(&all).clone()
}

/// A placeholder swapped in as a value, then replaced by raw text after serializing: numbers
/// and nesting serde_json itself would not produce.
const RAW: &str = "\u{1}raw\u{1}";

const ODD_VALUES: &[&str] = &[
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775809",
    "1e400",
    "-0",
    "1e-400",
    "65535.0",
    "4294967296",
    "\"\\ud800\"",
    "\"\\u0000\"",
    "NaN",
];

const UNICODE: &[&str] = &[
    "💥",
    "\u{202e}lla\u{202d}",
    "a\u{0300}\u{0301}\u{0302}",
    "\u{0}",
    "line\nbreak",
    "\u{feff}10.0.0.0/8",
    "１５００６",
    "/run/netns/\u{2028}",
    "ADD",
];

const PLAUSIBLE: &[(&str, &str)] = &[
    ("inboundPort", "15106"),
    ("outboundPort", "15006"),
    ("proxyUID", "0"),
    ("proxyGID", "1337"),
    ("excludeInboundPorts", "[\"1-65535\"]"),
    ("excludeOutboundPorts", "[53, \"8000-8080\"]"),
    ("includeInboundPorts", "[]"),
    ("excludeOutboundCIDRs", "[\"0.0.0.0/0\", \"::/0\"]"),
    ("includeOutboundCIDRs", "[\"10.0.0.0/8\"]"),
    ("iptablesMode", "\"legacy\""),
    ("iptablesMode", "\"auto\""),
    ("backend", "\"nftables\""),
    ("backend", "\"auto\""),
    ("podSelection", "\"annotated\""),
    ("cniVersion", "\"0.3.1\""),
    ("cniVersion", "\"0.4.0\""),
    ("cniVersion", "\"1.1.0\""),
    ("logLevel", "\"debug\""),
    ("hostPrerequisites", "\"skip\""),
    ("prevResult", "{\"cniVersion\": \"1.0.0\", \"ips\": []}"),
];

/// One mutated config: structural changes to the JSON, then maybe one to its bytes.
fn mutate(rng: &mut Rng, base: &Value) -> Vec<u8> {
    let mut conf = base.clone();
    let mut raw = Vec::new();
    for _ in 0..=rng.below(3) {
        let path = random_path(rng, &conf);
        let Some(slot) = get_mut(&mut conf, &path) else {
            continue;
        };
        match rng.below(7) {
            0 => {
                // Delete the key (or array element).
                let (last, parent_path) = path.split_last().expect("non-empty path");
                if let Some(parent) = get_mut(&mut conf, parent_path) {
                    match (parent, last) {
                        (Value::Object(m), Value::String(k)) => {
                            m.remove(k);
                        }
                        (Value::Array(a), Value::Number(i)) => {
                            a.remove(i.as_u64().unwrap_or(0) as usize);
                        }
                        _ => {}
                    }
                }
            }
            1 => {
                // Swap the type.
                *slot = rng
                    .pick(&[
                        json!(null),
                        json!(true),
                        json!(0),
                        json!(-1),
                        json!(1.5),
                        json!("15006"),
                        json!([]),
                        json!({}),
                        json!([1, "a", null]),
                        json!({"a": [{}]}),
                    ])
                    .clone();
            }
            2 => {
                *slot = json!(RAW);
                raw.push(rng.pick(ODD_VALUES).to_string());
            }
            3 => *slot = json!(rng.pick(UNICODE)),
            4 => {
                // Deep nesting, sometimes beyond what a JSON parser should accept.
                let depth = rng.pick(&[16, 100, 127, 129, 500, 5000]);
                let (open, close) = if rng.chance(50) {
                    ("[", "]")
                } else {
                    ("{\"a\":", "}")
                };
                *slot = json!(RAW);
                raw.push(format!("{}1{}", open.repeat(*depth), close.repeat(*depth)));
            }
            5 => {
                let (key, value) = rng.pick(PLAUSIBLE);
                if let Value::Object(m) = &mut conf {
                    m.insert(key.to_string(), json!(RAW));
                    raw.push(value.to_string());
                }
            }
            _ => {
                // A numeric value nudged to its edges.
                *slot = json!(rng.pick(&[0, 1, 65535, 65536, 4294967295u64, 15006, 15001]));
            }
        }
    }
    let mut text = conf.to_string();
    for replacement in raw {
        text = text.replacen(&json!(RAW).to_string(), &replacement, 1);
    }
    let mut bytes = text.into_bytes();
    match rng.below(10) {
        0 if !bytes.is_empty() => {
            let at = rng.below(bytes.len());
            bytes[at] ^= 1 << rng.below(8);
        }
        1 => bytes.truncate(rng.below(bytes.len() + 1)),
        2 => bytes.extend_from_slice(b"\0garbage"),
        _ => {}
    }
    bytes
}

/// Mutations must not send the plugin's files outside this test's directory.
fn stays_inside(bytes: &[u8], dir: &Path) -> bool {
    let Ok(Value::Object(conf)) = serde_json::from_slice::<Value>(bytes) else {
        return true;
    };
    ["stateDir", "logFile", "iptablesPath"]
        .iter()
        .all(|key| match conf.get(*key) {
            Some(Value::String(p)) => !p.starts_with('/') || Path::new(p).starts_with(dir),
            _ => true,
        })
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn mutated_configs_get_an_answer_and_refused_ones_change_nothing() {
    let started = Instant::now();
    let lab = Lab::new();
    let dir = tempfile::tempdir().expect("temp dir");
    let netns = lab.pod.path();
    // The preferred backend and an iptables variant, both programmed in the netns from the
    // start; each mutation starts from one of them.
    let bases: Vec<Value> = [
        json!({"backend": "nftables"}),
        json!({"backend": "iptables", "iptablesMode": "nft"}),
    ]
    .into_iter()
    .map(|backend| {
        let mut settings = json!({
            "inboundPort": INBOUND_PORT,
            "excludeInboundPorts": [22, "15020-15021"],
            "excludeOutboundCIDRs": ["169.254.169.254/32"],
            "stateDir": dir.path().join("state"),
            "logFile": dir.path().join("cni.log"),
            "logFileMaxBytes": 65536,
        });
        for (k, v) in backend.as_object().expect("object") {
            settings[k] = v.clone();
        }
        lab.config("1.0.0", settings)
    })
    .collect();
    let restore_rules = || {
        for base in &bases {
            let r = run_plugin("ADD", Some(&netns), base.to_string().as_bytes());
            assert_eq!(r.code, 0, "base ADD failed: {} {}", r.stdout, r.stderr);
        }
    };
    restore_rules();
    let mut state = lab.pod.firewall_state();
    assert!(
        state.contains("ICNI_"),
        "the iptables base ADD installed rules"
    );
    assert!(
        state.contains("intercept-cni"),
        "the nftables base ADD installed rules"
    );

    let seed = env_number("ICNI_MUTATION_SEED", DEFAULT_SEED);
    let count = env_number("ICNI_MUTATIONS", DEFAULT_MUTATIONS as u64) as usize;
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut refused = 0;
    let mut ran = 0;
    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    while ran < count {
        let bytes = mutate(&mut rng, &bases[ran % bases.len()]);
        if !stays_inside(&bytes, dir.path()) {
            continue;
        }
        ran += 1;
        let command = *rng.pick(&[
            "ADD", "ADD", "ADD", "ADD", "ADD", "CHECK", "CHECK", "DEL", "STATUS", "GC", "VERSION",
        ]);
        let r = run_plugin(command, Some(&netns), &bytes);
        let context = format!(
            "seed {seed} mutation {ran} {command} {}",
            String::from_utf8_lossy(&bytes)
        );
        let code = r.protocol(command, &context);
        let now = lab.pod.firewall_state();
        *outcomes
            .entry(code.map_or(format!("{command} ok"), |c| format!("{command} {c}")))
            .or_default() += 1;
        match code {
            Some(c) if REFUSED_INPUT.contains(&c) => {
                refused += 1;
                assert_eq!(
                    now, state,
                    "{context}: refused with {c} but the netns changed"
                );
            }
            // DEL removes despite an invalid config (a runtime retries DEL with the config
            // that failed ADD); put the rules back for the next mutation.
            None if command == "DEL" => {
                let backend_kept = |key: &str, value: &str| {
                    serde_json::from_slice::<Value>(&bytes)
                        .is_ok_and(|c| c.get(key).and_then(Value::as_str) == Some(value))
                };
                // DEL removes what its backend installed (an invalid config: every backend's).
                if !backend_kept("backend", "nftables") {
                    assert!(!now.contains("ICNI_"), "{context}: DEL left iptables rules");
                }
                if !backend_kept("backend", "iptables") {
                    assert!(
                        !now.contains("intercept-cni"),
                        "{context}: DEL left the nftables table"
                    );
                }
                restore_rules();
                state = lab.pod.firewall_state();
            }
            // A valid config (ADD installs its own rules), or a refusal by the kernel or
            // backend, or CHECK's drift: the next comparison starts from here.
            _ => state = now,
        }
    }
    // The log stayed within its bound (plus the rotated file) and has no stray lines.
    let log = std::fs::read_to_string(dir.path().join("cni.log")).expect("log written");
    assert!(log.len() <= 65536 + 4096, "log grew to {} bytes", log.len());
    assert!(
        log.lines().all(|l| l.contains(" intercept-cni[")),
        "stray line in the log"
    );
    assert!(
        refused > count / 2,
        "only {refused} of {count} mutations were refused: mutations too tame"
    );
    eprintln!(
        "{count} mutations (seed {seed}), {refused} refused, in {:?}: {outcomes:?}",
        started.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
}
