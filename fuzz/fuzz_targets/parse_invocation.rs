//! Fuzzes everything the plugin does with its input before it touches a kernel: the CNI
//! environment, the command, the config bytes, version negotiation, config validation, the
//! interception plan and ADD's answer.
//!
//! Input: `NAME=VALUE` lines (the environment), a NUL byte, then the config bytes (stdin).
//! Without a NUL, the whole input is the config of an ADD with a well-formed environment.
//! A panic, or an answer that is not one JSON object, is a finding.

#![no_main]

use intercept_cni::cmd::{self, Trace};
use intercept_cni::cni::config::NetConf;
use intercept_cni::cni::env::{CniEnv, Command};
use intercept_cni::cni::error::Result;
use intercept_cni::cni::result;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use std::collections::HashMap;
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

const DEFAULT_ENV: &[u8] =
    b"CNI_COMMAND=ADD\nCNI_CONTAINERID=c0ffee\nCNI_IFNAME=eth0\nCNI_NETNS=/run/netns/pod\n";

fuzz_target!(|data: &[u8]| {
    let (env_block, stdin) = match data.iter().position(|&b| b == 0) {
        Some(nul) => (&data[..nul], &data[nul + 1..]),
        None => (DEFAULT_ENV, data),
    };
    let vars: HashMap<String, OsString> = env_block
        .split(|&b| b == b'\n')
        .filter_map(|line| {
            let eq = line.iter().position(|&b| b == b'=')?;
            let name = String::from_utf8(line[..eq].to_vec()).ok()?;
            Some((name, OsString::from_vec(line[eq + 1..].to_vec())))
        })
        .collect();
    let mut trace = Trace::default();
    let outcome = cmd::guarded(&mut trace, |trace| invocation(&vars, stdin, trace));
    let (answer, success) = cmd::final_answer(outcome, &trace);
    if let Some(answer) = answer {
        let printed = serde_json::to_string(&answer).expect("an answer serializes");
        let reparsed: Value = serde_json::from_str(&printed).expect("an answer parses back");
        assert!(reparsed.is_object(), "answer is not an object: {printed}");
        if !success {
            let code = reparsed["code"].as_u64().expect("an error has a code");
            assert_ne!(code, 199, "a panic was caught: {printed}");
            assert!(reparsed["msg"].as_str().is_some_and(|m| !m.is_empty()));
        }
    }
});

/// `main`'s and `cmd::run`'s steps up to the kernel, in the same order.
fn invocation(
    vars: &HashMap<String, OsString>,
    stdin: &[u8],
    trace: &mut Trace,
) -> Result<Option<Value>> {
    let raw_command = vars.get("CNI_COMMAND").and_then(|c| c.to_str());
    let Some(command) = Command::from_env(raw_command)? else {
        return Ok(None);
    };
    let env = CniEnv::read(command, |name| vars.get(name).cloned())?;
    if env.command == Command::Version {
        return cmd::version_answer(stdin).map(Some);
    }
    let (obj, cni_version) = cmd::negotiate(env.command, stdin, trace)?;
    let conf = NetConf::from_object(&obj, &cni_version)?;
    match env.command {
        Command::Add | Command::Check => {
            let (_plan, prev) = cmd::plan_for(&env, &conf, trace)?;
            let answer = result::passthrough(prev, &conf.cni_version)?;
            assert_eq!(
                answer["cniVersion"],
                Value::String(conf.cni_version.clone())
            );
            Ok(Some(answer))
        }
        _ => Ok(None),
    }
}
