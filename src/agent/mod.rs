//! The node agent's services beside the install/watch loop of `install --watch`: readiness and
//! liveness endpoints, Prometheus metrics, the relay of the plugin's events to stdout, and the
//! repair of running pods (`repair`). Each runs in a thread of its own, started before the watch
//! loop; only the repair writes, and only into pod netns, through the node tool.

pub mod events;
pub mod http;
pub mod metrics;
pub mod ready;
pub mod repair;

use crate::cni::error::{Error, Result};
use crate::install::{self, watch};
use http::Response;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;

/// The agent's flags of `install --watch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// `--listen ADDR:PORT` (or `:PORT` for every address): /healthz, /readyz, /metrics.
    pub listen: Option<String>,
    /// `--events-socket PATH`; `None` after `--events-socket ""`.
    pub events_socket: Option<PathBuf>,
    /// `--host-root DIR`: the host's `/` as mounted in the agent's container.
    pub host_root: Option<PathBuf>,
    /// `--repair-interval SECONDS`: audit and repair the node's pods this often, and whenever
    /// the plugin gets chained; 0 for never.
    pub repair_interval: u64,
    /// `--cri-socket PATH`: the runtime's CRI socket, for the repair.
    pub cri_socket: PathBuf,
    /// Whether any of these flags was given (they need `--watch`).
    pub given: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            listen: None,
            events_socket: Some(PathBuf::from(events::DEFAULT_SOCKET)),
            host_root: None,
            repair_interval: repair::DEFAULT_INTERVAL_SECS,
            cri_socket: PathBuf::from(repair::DEFAULT_CRI_SOCKET),
            given: false,
        }
    }
}

impl Options {
    /// Takes the agent's flags (`--flag VALUE` or `--flag=VALUE`) out of `words`; the rest is
    /// left for the installer's parser.
    pub fn extract(words: &[String]) -> std::result::Result<(Options, Vec<String>), String> {
        let mut options = Options::default();
        let mut seen = Vec::new();
        let mut rest = Vec::new();
        let mut words = words.iter();
        while let Some(word) = words.next() {
            let (flag, inline) = match word.split_once('=') {
                Some((flag, value)) => (flag, Some(value.to_owned())),
                None => (word.as_str(), None),
            };
            if !matches!(
                flag,
                "--listen"
                    | "--events-socket"
                    | "--host-root"
                    | "--repair-interval"
                    | "--cri-socket"
            ) {
                rest.push(word.clone());
                continue;
            }
            let value = inline
                .or_else(|| words.next().cloned())
                .ok_or_else(|| format!("{flag} needs a value"))?;
            if seen.contains(&flag) {
                return Err(format!("{flag} given twice"));
            }
            seen.push(flag);
            options.given = true;
            match flag {
                "--listen" => {
                    listen_addrs(&value)?;
                    options.listen = Some(value);
                }
                "--events-socket" if value.is_empty() => options.events_socket = None,
                "--events-socket" if value.starts_with('/') => {
                    options.events_socket = Some(PathBuf::from(value))
                }
                "--events-socket" => {
                    return Err(format!(
                        "--events-socket must be an absolute path (or \"\" for none), not {value:?}"
                    ))
                }
                "--repair-interval" => {
                    options.repair_interval = value
                        .parse()
                        .ok()
                        .filter(|secs| *secs <= MAX_REPAIR_INTERVAL_SECS)
                        .ok_or_else(|| {
                            format!("--repair-interval wants whole seconds from 0 to {MAX_REPAIR_INTERVAL_SECS}, not {value:?}")
                        })?
                }
                "--cri-socket" if value.starts_with('/') => {
                    options.cri_socket = PathBuf::from(value)
                }
                "--cri-socket" => {
                    return Err(format!(
                        "--cri-socket must be an absolute path, not {value:?}"
                    ))
                }
                _ => {
                    let dir = PathBuf::from(&value);
                    if value.is_empty() || !dir.is_dir() {
                        return Err(format!("--host-root {value:?} is not a directory"));
                    }
                    options.host_root = Some(dir);
                }
            }
        }
        Ok((options, rest))
    }
}

/// A day: an interval beyond is a typo, not a schedule.
const MAX_REPAIR_INTERVAL_SECS: u64 = 86_400;

/// `ADDR:PORT`, or `:PORT` for every address (IPv6 and IPv4 where the host has IPv6).
fn listen_addrs(value: &str) -> std::result::Result<Vec<SocketAddr>, String> {
    let bad = || format!("--listen wants ADDR:PORT or :PORT, not {value:?}");
    match value.strip_prefix(':') {
        Some(port) => {
            let port: u16 = port.parse().map_err(|_| bad())?;
            Ok(vec![
                SocketAddr::from(([0u16; 8], port)),
                SocketAddr::from(([0u8; 4], port)),
            ])
        }
        None => value.parse().map(|a| vec![a]).map_err(|_| bad()),
    }
}

/// Starts the agent's threads for the watcher of `watch`. The HTTP port must be bound (a probe that can
/// never answer would hide the cause); a failure to listen for events is logged, as the agent's
/// first job is installing.
pub fn start(options: &Options, watch: &watch::Options) -> Result<()> {
    if let Some(path) = &options.events_socket {
        match events::bind(path) {
            Ok(socket) => {
                log::info!("relaying plugin events from {}", path.display());
                spawn("events", move || events::relay(socket))?;
            }
            Err(e) => log::error!("{e}; plugin events will not be relayed"),
        }
    }
    if options.repair_interval > 0 {
        let settings = repair::Settings {
            interval: std::time::Duration::from_secs(options.repair_interval),
            cri_socket: options.cri_socket.clone(),
            conf_dir: watch.conf_dir.clone(),
        };
        log::info!(
            "repairing pods through {} every {} s and whenever the plugin gets chained",
            settings.cri_socket.display(),
            options.repair_interval
        );
        spawn("repair", move || repair::run(settings))?;
    }
    let Some(listen) = &options.listen else {
        return Ok(());
    };
    let listener = bind_first(listen)?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io("cannot read the listening address", e))?;
    log::info!("serving /healthz /readyz /metrics on {addr}");
    let target = ready::Target {
        conf_dir: watch.conf_dir.clone(),
        bin_dir: watch.bin_dir.clone(),
        own_binary: install::SELF_EXE.into(),
        plugin_config: watch.plugin_config.clone(),
        host_root: options.host_root.clone(),
    };
    spawn("http", move || {
        http::serve(listener, move |path| respond(&target, path))
    })
}

fn bind_first(listen: &str) -> Result<TcpListener> {
    let addrs = listen_addrs(listen).map_err(|e| Error::io("--listen", e))?;
    let mut last = None;
    for addr in addrs {
        match TcpListener::bind(addr) {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some(Error::io(format!("cannot listen on {addr}"), e)),
        }
    }
    Err(last.unwrap_or_else(|| Error::io("--listen", "no address")))
}

fn spawn(name: &str, work: impl FnOnce() + Send + 'static) -> Result<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(work)
        .map(drop)
        .map_err(|e| Error::io(format!("cannot start the {name} thread"), e))
}

fn respond(target: &ready::Target, path: &str) -> Response {
    match path {
        "/healthz" | "/livez" => Response::text(200, "ok\n"),
        "/readyz" => {
            let readiness = ready::assess(target);
            let status = if readiness.is_ready() { 200 } else { 503 };
            Response::text(status, readiness.describe())
        }
        "/metrics" => Response {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: metrics::render(&ready::assess(target)),
        },
        "/" => Response::text(200, "intercept-cni agent: /healthz /readyz /metrics\n"),
        _ => Response::text(404, "not found: try /healthz, /readyz or /metrics\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(line: &str) -> Vec<String> {
        line.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn agent_flags_are_taken_out_and_the_rest_kept() {
        let (options, rest) = Options::extract(&words(
            "--cni-conf-dir c --listen 127.0.0.1:0 --watch --events-socket=/run/e.sock --host-root / \
             --repair-interval 0 --cri-socket=/var/run/crio/crio.sock",
        ))
        .unwrap();
        assert_eq!(rest, words("--cni-conf-dir c --watch"));
        assert_eq!(
            options,
            Options {
                listen: Some("127.0.0.1:0".into()),
                events_socket: Some("/run/e.sock".into()),
                host_root: Some("/".into()),
                repair_interval: 0,
                cri_socket: "/var/run/crio/crio.sock".into(),
                given: true,
            }
        );
        let (options, _) = Options::extract(&words("--events-socket=")).unwrap();
        assert_eq!(options.events_socket, None);
        let (options, rest) = Options::extract(&words("--watch")).unwrap();
        assert_eq!((options, rest), (Options::default(), words("--watch")));
        assert_eq!(listen_addrs(":9750").unwrap().len(), 2);
    }

    #[test]
    fn bad_agent_flags_are_usage_errors() {
        for line in [
            "--listen",
            "--listen 9750",
            "--listen localhost:80",
            "--listen :http",
            "--events-socket relative.sock",
            "--host-root /nonexistent-intercept-cni",
            "--listen :1 --listen :2",
            "--repair-interval -1",
            "--repair-interval 1m",
            "--repair-interval 86401",
            "--cri-socket run/containerd/containerd.sock",
            "--cri-socket=",
        ] {
            assert!(Options::extract(&words(line)).is_err(), "{line}");
        }
    }
}
