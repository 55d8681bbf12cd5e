//! The help texts of the node tool: every subcommand and flag, with its default. `main` prints
//! them for `--help`, `help [SUBCOMMAND]` and `SUBCOMMAND --help`.

pub const TOP: &str = "\
intercept-cni: a chained CNI plugin for transparent service-mesh traffic interception, and the
node tool that installs it.

usage: intercept-cni [SUBCOMMAND [FLAGS]]
       intercept-cni help [SUBCOMMAND]

Without arguments it is the CNI plugin: the runtime sets CNI_COMMAND (ADD, DEL, CHECK, STATUS, GC
or VERSION) and the other CNI_* variables, and passes the network config on stdin.

Subcommands:
  install     copy the plugin into the CNI bin dir and chain it last into the active network
              config; with --watch, keep it there and serve probes, metrics and plugin events
  uninstall   remove the plugin's entries from the network configs, then its binary
  doctor      check whether this host's kernel serves the backend the plugin will use
  audit       find the running pods that should be intercepted but are not (through the
              container runtime's CRI); with --repair, intercept them in place
  version     print the version
  help        print this text, or a subcommand's (`help SUBCOMMAND`)

`intercept-cni SUBCOMMAND --help` describes a subcommand and each of its flags.
Exit status: 0 on success, 1 on failure, 2 on a usage error.
";

pub const INSTALL: &str = "\
usage: intercept-cni install --cni-conf-dir DIR --cni-bin-dir DIR [--plugin-config FILE]
         [--generation N] [--watch [--uninstall-on-exit] [--listen ADDR:PORT]
         [--events-socket PATH] [--host-root DIR] [--repair-interval SECONDS]
         [--cri-socket PATH]]

Copies this executable into the CNI bin dir as `intercept-cni`, then appends the plugin's entry
last to the active network config (the first file of the conf dir, in name order, that a runtime
would load). The plugin config is checked with the plugin's own parser first: one the plugin
would refuse, or with an unknown key, is never chained. Exits 1 when there is no network config
yet; --watch waits for one.

Flags:
  --cni-conf-dir DIR     the runtime's network config dir (required; containerd and CRI-O
                         use /etc/cni/net.d)
  --cni-bin-dir DIR      the runtime's CNI plugin dir (required; usually /opt/cni/bin)
  --plugin-config FILE   a JSON object with the plugin's settings, put in its entry
                         (default: none, the plugin's defaults)
  --generation N         this installer's generation (the DaemonSet's pod-template-generation):
                         of two installers on one node, the higher one's entry stays (default: 0;
                         on a tie, the later started)
  --watch                keep running: put the entry back whenever another agent rewrites the
                         conf dir, the binary back when it is deleted or replaced, and reload the
                         plugin config when it changes, until SIGTERM or SIGINT; then exit leaving
                         entry and binary in place (default: install once and exit)
  --uninstall-on-exit    with --watch: on SIGTERM or SIGINT, remove the entry and the binary if
                         the entry is still this installer's own (default: leave them)
  --listen ADDR:PORT     with --watch: serve /healthz (liveness), /readyz (readiness) and
                         /metrics (Prometheus) over HTTP; `:PORT` listens on every address
                         (default: off)
  --events-socket PATH   with --watch: the unix socket plugin invocations report to; each
                         record is printed as one JSON line on stdout and counted in /metrics
                         (default: /var/run/intercept-cni-agent/events.sock; \"\" for none)
  --host-root DIR        with --watch: the host's / as mounted in this container, read by the
                         host check of /readyz (default: this system's /, with the kernel probe)
  --repair-interval SECONDS
                         with --watch: run `intercept-cni audit --repair` this often, and at
                         once whenever the plugin gets chained, so that pods started while it
                         was not chained are intercepted in place; one audit at a time, in a
                         child process killed after 120 s; a failure (no intercept-cni-node
                         next to this executable, no runtime at the socket) is logged and
                         counted in /metrics, never stops the agent nor changes /readyz
                         (default: 60; 0 turns the repair off)
  --cri-socket PATH      with --watch: the runtime's CRI socket for the repair (default:
                         /run/containerd/containerd.sock; CRI-O: /var/run/crio/crio.sock)
  -h, --help             print this text

Ready (/readyz 200) only when the active network chains the plugin last with the current plugin
config (not a refused one), the plugin in the bin dir is byte for byte this executable, and the
host check passes for the backend that config selects.
";

pub const UNINSTALL: &str = "\
usage: intercept-cni uninstall --cni-conf-dir DIR --cni-bin-dir DIR

Removes every `intercept-cni` entry from the network configs of the conf dir, then the plugin
binary from the bin dir (in that order, and the binary only if no network still names it: a
network naming a missing plugin fails every pod). Every other byte of the configs is restored as
it was, a `.conf` that install turned into a conflist included.

Flags:
  --cni-conf-dir DIR     the runtime's network config dir (required)
  --cni-bin-dir DIR      the runtime's CNI plugin dir (required)
  -h, --help             print this text
";

pub const DOCTOR: &str = "\
usage: intercept-cni doctor [--backend auto|nftables|iptables] [--iptables-mode auto|legacy|nft]
         [--ipv6] [--dns-capture] [--tproxy] [--drop-invalid] [--host-root DIR] [--json]

Checks the kernel modules the backend needs on this host: one row per module with its state,
where that was learned, and the remedy when it is missing. With `auto` it first answers what the
plugin will choose on this node, as the plugin chooses it.

Flags:
  --backend B            auto, nftables or iptables (default: auto, as the plugin's default:
                         nftables when the kernel serves it, else iptables)
  --iptables-mode M      with --backend iptables: auto, legacy or nft (default: auto, the
                         variant the host already uses)
  --ipv6                 also check the IPv6 modules (default: IPv4 only)
  --dns-capture          also require DNS capture's modules (a config with \"dnsCapture\": true,
                         or pods with Istio's ISTIO_META_DNS_CAPTURE; default: not required)
  --tproxy               also require TPROXY's modules (\"interceptionMode\": \"TPROXY\", or pods
                         with sidecar.istio.io/interceptionMode: TPROXY; default: not required)
  --drop-invalid         also require INVALID drop's modules (\"dropInvalid\": true, or pods with
                         Istio's INVALID_DROP; default: not required)
  --host-root DIR        read every host path under DIR, an existing directory where a container
                         has the host's / mounted; skips the kernel probe (default: this system)
  --json                 print the report as JSON: `problems` lists only what stands in the way
                         (each with its remedy), `tips` other advice, `modules[].remedy` each
                         module's remedy (default: a table)
  -h, --help             print this text

Exit status: 0 when every required module is usable, 1 when not, 2 on a usage error.
";

pub const AUDIT: &str = "\
usage: intercept-cni audit [--cri-socket PATH] [--cni-conf-dir DIR] [--netns-dir DIR]...
         [--json] [--repair]

Lists the node's ready pod sandboxes through the runtime's CRI (ListPodSandbox, then each one's
verbose PodSandboxStatus for its annotations, namespace, addresses, netns and sandbox process),
decides each one with the plugin's own ADD policy and the plugin entry of the active network
config, and compares its netns with the plan as the plugin's CHECK does. A pod's netns is entered
only once proven to be the pod's: a file directly in a netns dir, not a symlink, a network
namespace other than the node's own, and the one the sandbox's process lives in; others are
reported as unproven. Runs intercept-cni-node, installed next to this executable.

Each pod is reported as: intercepted, not-selected, missing (should be intercepted, no rules),
drifted (rules differ from the plan), repaired, repair-failed, unexpected (rules although the
policy leaves the pod alone: reported, never removed), refused (ADD would refuse it), skipped
(host network), unproven (its netns not proven the pod's: never entered) or check-failed.

Flags:
  --cri-socket PATH      the runtime's CRI socket (default: /run/containerd/containerd.sock)
  --cni-conf-dir DIR     the runtime's network config dir (default: /etc/cni/net.d)
  --netns-dir DIR        a directory where the runtime pins pod netns; repeatable (default:
                         /run/netns and /var/run/netns)
  --json                 print the report as JSON (default: one line per pod)
  --repair               install the plan in the netns of every missing or drifted pod, with
                         the plugin's own ADD, then CHECK it (default: report only)
  -h, --help             print this text

Exit status: 0 when every pod is as the policy wants (after --repair), 1 when some pod needs
attention or the plugin is not chained, 2 on a usage error or when the runtime or the network
config cannot be read.
";

pub const VERSION: &str = "\
usage: intercept-cni version

Prints `intercept-cni VERSION`. (`intercept-cni --version` does the same.)
";

/// The help of `subcommand`, `None` if there is no such subcommand.
pub fn of(subcommand: &str) -> Option<&'static str> {
    Some(match subcommand {
        "install" => INSTALL,
        "uninstall" => UNINSTALL,
        "doctor" => DOCTOR,
        "audit" => AUDIT,
        "version" => VERSION,
        "help" => TOP,
        _ => return None,
    })
}
