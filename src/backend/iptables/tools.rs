//! Running the iptables binaries: found by absolute path, spawned without a shell from the
//! calling thread (so inside its netns), with a per-netns xtables lock.

use super::chains::Family;
use super::save::NatTable;
use crate::backend::IptablesMode;
use crate::cni::error::{Code, Error, Result};
use crate::trusted_path;
use nix::fcntl::{Flock, FlockArg, OFlag};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, PoisonError};

/// Where the binaries are looked for when `iptablesPath` is not set.
const SEARCH_DIRS: [&str; 4] = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"];
/// Per-netns lock files live here; the host-wide /run/xtables.lock would serialize every pod
/// start on the node behind any iptables user (istio/istio#47002).
const LOCK_DIR: &str = "/run/intercept-cni";
/// Seconds iptables-legacy-restore waits for the (per-netns) lock.
const LOCK_WAIT_SECONDS: u32 = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    Save,
    Restore,
}

/// `iptables-legacy-save`, `ip6tables-nft-restore`, ...
pub fn binary_name(mode: IptablesMode, family: Family, tool: Tool) -> String {
    let family = match family {
        Family::V4 => "iptables",
        Family::V6 => "ip6tables",
    };
    format!("{family}-{}-{}", mode_name(mode), tool_name(tool))
}

pub fn mode_name(mode: IptablesMode) -> &'static str {
    match mode {
        IptablesMode::Legacy => "legacy",
        IptablesMode::Nft => "nft",
    }
}

fn tool_name(tool: Tool) -> &'static str {
    match tool {
        Tool::Save => "save",
        Tool::Restore => "restore",
    }
}

/// The binaries of one installation: the configured directory, or the usual ones.
#[derive(Debug, Clone, Copy)]
pub struct Tools<'a> {
    pub dir: Option<&'a Path>,
}

impl Tools<'_> {
    /// The absolute path of `name`, if an executable file of that name is there; an error when
    /// it is, but someone other than root could change it (see `trusted_path`): it would run
    /// as root, in the host netns too (`iptablesMode: auto`).
    pub fn locate(&self, name: &str) -> Result<Option<PathBuf>> {
        let candidates: Vec<PathBuf> = match self.dir {
            Some(dir) => vec![dir.join(name)],
            None => SEARCH_DIRS
                .iter()
                .map(|d| Path::new(d).join(name))
                .collect(),
        };
        let Some(found) = candidates
            .into_iter()
            .find(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0))
        else {
            return Ok(None);
        };
        // Once judged trusted, only root can change that: judged once per process.
        static TRUSTED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
        let mut trusted = TRUSTED.lock().unwrap_or_else(PoisonError::into_inner);
        if !trusted.contains(&found) {
            trusted_path::trusted_executable(&found)?;
            trusted.push(found.clone());
        }
        Ok(Some(found))
    }

    pub fn require(&self, mode: IptablesMode, family: Family, tool: Tool) -> Result<PathBuf> {
        let name = binary_name(mode, family, tool);
        self.locate(&name)?.ok_or_else(|| match self.dir {
            Some(dir) => Error::config(format!(
                "iptablesPath {}: no executable {name} there",
                dir.display()
            )),
            None => Error::new(
                Code::HostPrerequisites,
                format!(
                    "{name} not found in {}; install the iptables package or set iptablesPath",
                    SEARCH_DIRS.join(", ")
                ),
            ),
        })
    }

    /// True when both binaries of this mode and family exist (and may be run).
    pub fn present(&self, mode: IptablesMode, family: Family) -> bool {
        [Tool::Save, Tool::Restore]
            .iter()
            .all(|&t| matches!(self.locate(&binary_name(mode, family, t)), Ok(Some(_))))
    }

    /// The nat table, given whether it exists (from `tables_present`). Without a nat table there
    /// is nothing of ours, and spawning -save (a few ms) would tell no more. Listing a legacy
    /// table would also instantiate it in the netns.
    pub fn read_nat_if(
        &self,
        mode: IptablesMode,
        family: Family,
        exists: bool,
    ) -> Result<NatTable> {
        self.read_table_if(mode, family, "nat", exists)
    }

    /// `read_nat_if` for any table.
    pub fn read_table_if(
        &self,
        mode: IptablesMode,
        family: Family,
        table: &str,
        exists: bool,
    ) -> Result<NatTable> {
        let save = self.require(mode, family, Tool::Save)?;
        if !exists {
            return Ok(NatTable::default());
        }
        let out = run(&save, &["-t", table], family)?;
        if !out.status.success() {
            return Err(Error::backend(format!(
                "{} -t {table} failed ({})",
                binary_name(mode, family, Tool::Save),
                out.status
            ))
            .with_details(String::from_utf8_lossy(&out.stderr).trim().to_string()));
        }
        Ok(NatTable::parse_table(
            &String::from_utf8_lossy(&out.stdout),
            table,
        ))
    }

    /// `*-save` of every table, for the mode detection in the host netns.
    pub fn save_all(&self, mode: IptablesMode, family: Family) -> Result<String> {
        let save = self.require(mode, family, Tool::Save)?;
        let out = run(&save, &[], family)?;
        if !out.status.success() {
            return Err(Error::backend(format!(
                "{} failed ({})",
                binary_name(mode, family, Tool::Save),
                out.status
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Feeds `input` to `*-restore --noflush`: the whole table changes at once or not at all.
    pub fn restore(&self, mode: IptablesMode, family: Family, input: &str) -> Result<()> {
        self.spawn_restore(mode, family)?.feed(input)?.finish()
    }

    /// Starts `ip(6)tables-<mode>-restore --noflush`, which waits for its input: it spends its
    /// first millisecond loading libraries, in which the caller can work out what to send.
    pub fn spawn_restore(&self, mode: IptablesMode, family: Family) -> Result<PendingRestore> {
        let restore = self.require(mode, family, Tool::Restore)?;
        let wait = format!("--wait={LOCK_WAIT_SECONDS}");
        let mut args = vec!["--noflush"];
        // Only the legacy variant takes the xtables lock; nft commits are atomic in the kernel.
        if mode == IptablesMode::Legacy {
            args.push(&wait);
        }
        let child = start(&restore, &args, Stdio::piped(), family)?;
        Ok(PendingRestore {
            child: Some(child),
            binary: restore,
            mode,
            family,
        })
    }
}

/// A `*-restore` started but not given its input yet. Dropped unfed, it is stopped before it
/// has its whole input (and so its COMMIT): it changes nothing.
pub struct PendingRestore {
    /// Taken by `feed`; still here when dropped unfed.
    child: Option<Child>,
    binary: PathBuf,
    mode: IptablesMode,
    family: Family,
}

impl PendingRestore {
    /// Sends the whole input; the restore applies it once its stdin closes.
    pub fn feed(mut self, input: &str) -> Result<Restore<'_>> {
        let child = self.child.as_mut().expect("fed once");
        let mut pipe = child.stdin.take().expect("stdin is piped");
        // Restore reads all its input before writing anything, so this cannot deadlock.
        pipe.write_all(input.as_bytes())
            .map_err(|e| Error::io(format!("cannot run {}", self.binary.display()), e))?;
        drop(pipe);
        Ok(Restore {
            child: self.child.take().expect("fed once"),
            binary: std::mem::take(&mut self.binary),
            mode: self.mode,
            family: self.family,
            input,
        })
    }
}

impl Drop for PendingRestore {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A running `*-restore`.
pub struct Restore<'i> {
    child: Child,
    binary: PathBuf,
    mode: IptablesMode,
    family: Family,
    input: &'i str,
}

impl Restore<'_> {
    /// Waits for the restore; a refusal names the rule and the module it likely needs.
    pub fn finish(self) -> Result<()> {
        let out = self
            .child
            .wait_with_output()
            .map_err(|e| Error::io(format!("cannot run {}", self.binary.display()), e))?;
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        Err(rejection(self.mode, self.family, self.input, &stderr).with_details(stderr))
    }
}

fn legacy_tables(family: Family) -> String {
    // thread-self, not self: /proc/self/net is the netns of the process's main thread.
    let names = match family {
        Family::V4 => "/proc/thread-self/net/ip_tables_names",
        Family::V6 => "/proc/thread-self/net/ip6_tables_names",
    };
    std::fs::read_to_string(names).unwrap_or_default()
}

/// Whether the current netns has each of `tables` in this mode, for IPv4 and IPv6
/// (`Family::index`), from one look (a file read per family for legacy, one
/// netlink dump for nft).
pub fn tables_present(mode: IptablesMode, tables: &[&str]) -> Vec<[bool; 2]> {
    match mode {
        IptablesMode::Legacy => {
            let names = Family::ALL.map(legacy_tables);
            tables
                .iter()
                .map(|table| names.clone().map(|n| n.lines().any(|l| l.trim() == *table)))
                .collect()
        }
        IptablesMode::Nft => nft_tables_exist(tables),
    }
}

/// Whether the current netns has the `ip <table>` and `ip6 <table>` nftables tables that
/// iptables-nft writes to. One netlink dump, far cheaper than spawning -save; when the listing
/// fails, -save decides (true).
fn nft_tables_exist(names: &[&str]) -> Vec<[bool; 2]> {
    let tables = match rustables::list_tables() {
        Ok(tables) => tables,
        Err(e) => {
            log::debug!("cannot list nftables tables, asking -save instead: {e}");
            return vec![[true; 2]; names.len()];
        }
    };
    names
        .iter()
        .map(|name| {
            Family::ALL.map(|family| {
                let nfproto = match family {
                    Family::V4 => rustables::ProtocolFamily::Ipv4,
                    Family::V6 => rustables::ProtocolFamily::Ipv6,
                };
                // rustables keeps a table's family private: compare with a probe built in
                // that family.
                tables.iter().any(|listed| {
                    let mut probe = rustables::Table::new(nfproto).with_name(*name);
                    if let Some(flags) = listed.get_flags() {
                        probe.set_flags(*flags);
                    }
                    if let Some(userdata) = listed.get_userdata() {
                        probe.set_userdata(userdata.clone());
                    }
                    *listed == probe
                })
            })
        })
        .collect()
}

/// Holds the current netns for this plugin's iptables operations: an exclusive flock on the
/// namespace's own inode (nsfs), which every open of the namespace shares and which needs no
/// file of ours. Parallel ADDs, or an ADD racing a DEL, in one pod then run one after the
/// other, both families as one step, as the kernel serialises nftables batches.
pub fn lock_netns() -> Result<Flock<std::fs::File>> {
    let what = "cannot lock the network namespace for iptables";
    let ns = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(OFlag::O_CLOEXEC.bits())
        .open("/proc/thread-self/ns/net")
        .map_err(|e| Error::io(what, e))?;
    Flock::lock(ns, FlockArg::LockExclusive).map_err(|(_, e)| Error::io(what, e))
}

/// The lock file for the netns the calling thread is in, named by the namespace's inode. The
/// IPv4 and IPv6 tables are separate in the kernel, so each family has its own lock and their
/// restores do not wait for each other.
fn lock_path(family: Family) -> Result<PathBuf> {
    let ino = std::fs::metadata("/proc/thread-self/ns/net")
        .map_err(|e| Error::io("cannot identify the current network namespace", e))?
        .ino();
    let name = match family {
        Family::V4 => format!("xtables-{ino}.lock"),
        Family::V6 => format!("xtables6-{ino}.lock"),
    };
    Ok(Path::new(LOCK_DIR).join(name))
}

/// `lock_path`, with its directory made. Only the legacy tools create the file itself.
fn lock_file(family: Family) -> Result<PathBuf> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(LOCK_DIR)
        .map_err(|e| Error::io(format!("cannot create {LOCK_DIR}"), e))?;
    lock_path(family)
}

/// Removes the current netns's lock files (one per family); DEL calls this once the rules are
/// gone, so pods that come and go leave no files behind. Unlinking a lock file is safe only when
/// nobody waits on it: the runtime runs no other operation on the same container meanwhile
/// (SPEC.md), and one that holds the lock right now keeps it, file and all. If DEL never runs in
/// the namespace (it vanished first), GC removes the file (`sweep_lock_files`).
pub fn remove_lock_file() -> Result<()> {
    let errors = Family::ALL
        .into_iter()
        .filter_map(|family| lock_path(family).and_then(|path| remove_lock(&path)).err())
        .collect();
    Error::collect(errors).map_or(Ok(()), Err)
}

/// Removes the lock files of namespaces not in `live` (their DEL found the namespace gone), and
/// returns how many went. A file in use stays; so does anything not named like a lock file.
pub fn sweep_lock_files(live: &std::collections::HashSet<u64>) -> Result<usize> {
    let entries = match std::fs::read_dir(LOCK_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io(format!("cannot list {LOCK_DIR}"), e)),
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(inode) = name.to_str().and_then(lock_file_inode) else {
            continue;
        };
        if !live.contains(&inode) {
            remove_lock(&entry.path())?;
            removed += usize::from(!entry.path().exists());
        }
    }
    Ok(removed)
}

/// The namespace inode in a lock file's name (`xtables-N.lock`, `xtables6-N.lock`).
pub fn lock_file_inode(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(".lock")?;
    let digits = stem
        .strip_prefix("xtables-")
        .or_else(|| stem.strip_prefix("xtables6-"))?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn remove_lock(path: &Path) -> Result<()> {
    let what = || format!("cannot remove {}", path.display());
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC).bits())
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(what(), e)),
    };
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(_held) => match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(what(), e)),
            _ => Ok(()),
        },
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            log::debug!("{} is in use; left in place", path.display());
            Ok(())
        }
        Err((_, e)) => Err(Error::io(what(), e)),
    }
}

/// Runs a `*-save` (nothing on stdin) to completion.
fn run(binary: &Path, args: &[&str], family: Family) -> Result<std::process::Output> {
    start(binary, args, Stdio::null(), family)?
        .wait_with_output()
        .map_err(|e| Error::io(format!("cannot run {}", binary.display()), e))
}

/// Spawns `binary` in the current netns with a clean environment; its output stays in the
/// pipes until waited for (restore and save print little, far below a pipe's capacity).
fn start(binary: &Path, args: &[&str], stdin: Stdio, family: Family) -> Result<Child> {
    Command::new(binary)
        .args(args)
        .env_clear()
        .env("PATH", SEARCH_DIRS.join(":"))
        .env("LC_ALL", "C")
        .env("XTABLES_LOCKFILE", lock_file(family)?)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::io(format!("cannot run {}", binary.display()), e))
}

/// Turns a refused restore into an error naming the rule and the kernel module it likely needs.
fn rejection(mode: IptablesMode, family: Family, input: &str, stderr: &str) -> Error {
    let tool = binary_name(mode, family, Tool::Restore);
    let line = failed_line(stderr).and_then(|n| input.lines().nth(n.checked_sub(1)?));
    let modules = likely_modules(mode, family, line);
    let at = line.map(|l| format!(" at `{l}`")).unwrap_or_default();
    Error::backend(format!(
        "{tool} rejected the {} rules{at}, so nothing was changed; if a kernel module is missing, it is likely among: {}",
        family.label(),
        modules.join(", ")
    ))
}

/// `iptables-restore: line 7 failed` (legacy) or `line 6: RULE_APPEND failed` (nft).
fn failed_line(stderr: &str) -> Option<usize> {
    let rest = &stderr[stderr.find("line ")? + 5..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn likely_modules(mode: IptablesMode, family: Family, line: Option<&str>) -> Vec<&'static str> {
    let table = match (mode, family) {
        (IptablesMode::Legacy, Family::V4) => "iptable_nat",
        (IptablesMode::Legacy, Family::V6) => "ip6table_nat",
        (IptablesMode::Nft, _) => "nft_chain_nat",
    };
    let features = [
        ("-m owner", "xt_owner"),
        ("-m multiport", "xt_multiport"),
        ("-m tcp", "xt_tcpudp"),
        ("-m udp", "xt_tcpudp"),
        ("REDIRECT", "xt_REDIRECT"),
        ("-j CT", "xt_CT"),
        ("-m conntrack", "xt_conntrack"),
        ("TPROXY", "xt_TPROXY"),
        ("MARK", "xt_mark"),
        ("-m mark", "xt_mark"),
        ("CONNMARK", "xt_connmark"),
        ("-m connmark", "xt_connmark"),
    ];
    let mut modules: Vec<&'static str> = match line {
        Some(l) if l.starts_with("-A ") || l.starts_with("-D ") => features
            .iter()
            .filter(|(m, _)| l.contains(m))
            .map(|f| f.1)
            .collect(),
        Some(_) => Vec::new(),
        None => features.iter().map(|f| f.1).collect(),
    };
    // Table and chain lines, jumps from the built-in chains (which is when iptables-nft creates
    // them), and unknown lines all need the nat table itself.
    let on_builtin = |l: &str| l.starts_with("-A PREROUTING ") || l.starts_with("-A OUTPUT ");
    if modules.is_empty() || line.is_none_or(on_builtin) {
        modules.insert(0, table);
    }
    // iptables-nft runs the xt matches and targets through nft_compat.
    if mode == IptablesMode::Nft {
        modules.push("nft_compat");
    }
    modules
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_file_names_give_their_namespace() {
        assert_eq!(lock_file_inode("xtables-4026532177.lock"), Some(4026532177));
        assert_eq!(
            lock_file_inode("xtables6-4026532177.lock"),
            Some(4026532177)
        );
        for other in [
            "host-check.lock",
            "xtables-.lock",
            "xtables--1.lock",
            "xtables-12.lock.tmp",
            "xtables7-12.lock",
            "xtables-1a.lock",
        ] {
            assert_eq!(lock_file_inode(other), None, "{other}");
        }
    }

    #[test]
    fn binary_names() {
        assert_eq!(
            binary_name(IptablesMode::Legacy, Family::V4, Tool::Save),
            "iptables-legacy-save"
        );
        assert_eq!(
            binary_name(IptablesMode::Nft, Family::V6, Tool::Restore),
            "ip6tables-nft-restore"
        );
    }

    #[test]
    fn rejections_name_the_rule_and_module() {
        let input = "*nat\n:ICNI_OUTBOUND - [0:0]\n-A ICNI_OUTBOUND -m owner --uid-owner 1337 -j RETURN\nCOMMIT\n";
        let e = rejection(
            IptablesMode::Legacy,
            Family::V4,
            input,
            "iptables-restore: line 3 failed",
        );
        assert_eq!(e.code, Code::Backend);
        assert!(e.msg.contains("--uid-owner 1337"), "{}", e.msg);
        assert!(e.msg.contains("xt_owner"), "{}", e.msg);
        let e = rejection(
            IptablesMode::Nft,
            Family::V6,
            input,
            "line 2: CHAIN_USER_ADD failed (No such file or directory)",
        );
        assert!(e.msg.contains("nft_chain_nat") && e.msg.contains("nft_compat"));
        let e = rejection(IptablesMode::Legacy, Family::V6, input, "odd");
        assert!(e.msg.contains("ip6table_nat") && e.msg.contains("xt_REDIRECT"));
    }

    #[test]
    fn missing_binary_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let tools = Tools {
            dir: Some(dir.path()),
        };
        let e = tools
            .require(IptablesMode::Nft, Family::V4, Tool::Restore)
            .unwrap_err();
        assert_eq!(e.code, Code::InvalidConfig);
        assert!(e.msg.contains("iptables-nft-restore"), "{}", e.msg);
    }
}
