//! Where a module's state comes from: files only, read under a host root, never the kernel's own
//! answer to a load (that is the functional probe's job). See the precedence in `host`'s docs.

use super::ModuleState;
use flate2::read::GzDecoder;
use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The directory the host's `/` is visible at: `/` itself, or where a container mounted it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRoot {
    dir: PathBuf,
}

impl HostRoot {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        HostRoot { dir: dir.into() }
    }

    /// The running system itself.
    pub fn real() -> Self {
        HostRoot::new("/")
    }

    /// `path` (absolute on the host) as seen from here.
    pub fn join(&self, path: &str) -> PathBuf {
        self.dir.join(path.trim_start_matches('/'))
    }
}

/// What a kernel config says about one symbol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tristate {
    Builtin,
    Module,
    NotSet,
}

/// Why a module has the state it has; the remedy for a missing one depends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Evidence {
    /// Some source shows it loaded, built in or loadable.
    Present,
    /// The kernel config says it was not built.
    NotBuilt,
    /// Built as a module (`=m`), but this kernel's module index has no file for it.
    NoModuleFile,
    /// Both module indexes were read and neither lists it.
    NotInIndex,
    /// No readable source can confirm it either way (the functional probe decides).
    Unverified,
}

/// One module's state, the source that decided it, and the kind of evidence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub state: ModuleState,
    pub source: String,
    pub evidence: Evidence,
}

/// A kernel config, with the path it was read from.
struct KernelConfig {
    path: String,
    symbols: HashMap<String, Tristate>,
}

/// Every source read once; lookups after that touch only `/sys/module`.
pub struct Sources {
    root: HostRoot,
    pub release: Option<String>,
    /// Name -> loaded (false while unloading); `None` when `/proc/modules` is unreadable.
    proc_modules: Option<HashMap<String, bool>>,
    modules_dir: String,
    builtin_index: Option<HashSet<String>>,
    dep_index: Option<HashSet<String>>,
    config: Option<KernelConfig>,
    sys_module_readable: bool,
}

/// No kernel config or module index comes near this; more is a broken or hostile file.
const MAX_SOURCE_BYTES: u64 = 64 << 20;

impl Sources {
    pub fn read(root: &HostRoot) -> Self {
        let release = read_text(&root.join("/proc/sys/kernel/osrelease"))
            .map(|s| s.trim().to_string())
            .filter(|s| is_plain_release(s));
        let modules_dir = match &release {
            Some(r) => format!("/lib/modules/{r}"),
            None => "/lib/modules/(unknown release)".to_string(),
        };
        let index = |file: &str| -> Option<HashSet<String>> {
            release.as_ref()?;
            let text = read_text(&root.join(&format!("{modules_dir}/{file}")))?;
            Some(parse_module_index(&text))
        };
        let builtin_index = index("modules.builtin");
        let dep_index = index("modules.dep");
        let config = read_config(root, release.as_deref());
        Sources {
            release,
            proc_modules: read_text(&root.join("/proc/modules")).map(|t| parse_proc_modules(&t)),
            modules_dir,
            builtin_index,
            dep_index,
            config,
            sys_module_readable: root.join("/sys/module").is_dir(),
            root: root.clone(),
        }
    }

    /// The config's word on `symbol`: `None` when no config was read, `Some(None)` when the
    /// config does not mention it (Kconfig omits symbols whose dependencies are unmet).
    pub fn config_says(&self, symbol: &str) -> Option<Option<Tristate>> {
        self.config.as_ref().map(|c| c.symbols.get(symbol).copied())
    }

    /// The state of module `name` (built by `CONFIG_<symbol>`), strongest evidence first.
    pub fn find(&self, name: &str, symbol: &str) -> Finding {
        let present = |state, source: String| Finding {
            state,
            source,
            evidence: Evidence::Present,
        };
        if self.proc_modules.as_ref().and_then(|m| m.get(name)) == Some(&true) {
            return present(ModuleState::Loaded, "/proc/modules".into());
        }
        let sys = format!("/sys/module/{name}");
        let sys_dir = self.sys_module_readable && self.root.join(&sys).is_dir();
        if sys_dir {
            if let Some(init) = read_text(&self.root.join(&format!("{sys}/initstate"))) {
                if matches!(init.trim(), "live" | "coming") {
                    return present(ModuleState::Loaded, format!("{sys}/initstate"));
                }
            }
        }
        if self
            .builtin_index
            .as_ref()
            .is_some_and(|i| i.contains(name))
        {
            let source = format!("{}/modules.builtin", self.modules_dir);
            return present(ModuleState::Builtin, source);
        }
        let config = self.config_says(symbol);
        let config_path = self.config.as_ref().map_or("", |c| c.path.as_str());
        if config == Some(Some(Tristate::Builtin)) {
            let source = format!("{config_path}: CONFIG_{symbol}=y");
            return present(ModuleState::Builtin, source);
        }
        if sys_dir && !self.root.join(&format!("{sys}/initstate")).exists() {
            return present(ModuleState::Builtin, format!("{sys} without initstate"));
        }
        if self.dep_index.as_ref().is_some_and(|i| i.contains(name)) {
            let source = format!("{}/modules.dep", self.modules_dir);
            return present(ModuleState::Loadable, source);
        }
        let missing = |evidence, source: String| Finding {
            state: ModuleState::Missing,
            source,
            evidence,
        };
        match config {
            Some(Some(Tristate::Module)) if self.dep_index.is_some() => missing(
                Evidence::NoModuleFile,
                format!("{config_path}: CONFIG_{symbol}=m, but no {name} in modules.dep"),
            ),
            Some(Some(Tristate::Module)) => present(
                ModuleState::Loadable,
                format!("{config_path}: CONFIG_{symbol}=m"),
            ),
            Some(Some(Tristate::NotSet)) => missing(
                Evidence::NotBuilt,
                format!("{config_path}: CONFIG_{symbol} is not set"),
            ),
            Some(None) => missing(
                Evidence::NotBuilt,
                format!("{config_path} has no CONFIG_{symbol}"),
            ),
            Some(Some(Tristate::Builtin)) | None => {
                if self.dep_index.is_some() && self.builtin_index.is_some() {
                    missing(
                        Evidence::NotInIndex,
                        format!(
                            "neither modules.dep nor modules.builtin in {} lists it",
                            self.modules_dir
                        ),
                    )
                } else {
                    missing(Evidence::Unverified, self.unverified_source())
                }
            }
        }
    }

    /// Says which sources were missing, so the operator knows why nothing could decide.
    fn unverified_source(&self) -> String {
        let mut absent = Vec::new();
        if self.config.is_none() {
            absent.push("no kernel config".to_string());
        }
        if self.dep_index.is_none() || self.builtin_index.is_none() {
            absent.push(format!("no module index in {}", self.modules_dir));
        }
        format!("not listed anywhere; unverified ({})", absent.join(", "))
    }
}

/// A release names a directory under /lib/modules and /boot: no separators, no `..`.
fn is_plain_release(release: &str) -> bool {
    !release.is_empty()
        && !release.starts_with('.')
        && release
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+~-".contains(&b))
}

fn read_text(path: &Path) -> Option<String> {
    let file = fs::File::open(path).ok()?;
    let mut text = String::new();
    file.take(MAX_SOURCE_BYTES).read_to_string(&mut text).ok()?;
    Some(text)
}

/// `/proc/config.gz` is the running kernel's own; `/boot/config-RELEASE` is the next best.
fn read_config(root: &HostRoot, release: Option<&str>) -> Option<KernelConfig> {
    let gz = "/proc/config.gz";
    if let Ok(file) = fs::File::open(root.join(gz)) {
        let mut text = String::new();
        let decoded = GzDecoder::new(file)
            .take(MAX_SOURCE_BYTES)
            .read_to_string(&mut text);
        match decoded {
            Ok(_) => {
                return Some(KernelConfig {
                    path: gz.into(),
                    symbols: parse_config(&text),
                })
            }
            Err(e) => log::warn!("ignoring {gz}: {e}"),
        }
    }
    let path = format!("/boot/config-{}", release?);
    let text = read_text(&root.join(&path))?;
    Some(KernelConfig {
        path,
        symbols: parse_config(&text),
    })
}

/// `CONFIG_X=y`, `CONFIG_X=m` and `# CONFIG_X is not set`, keyed by `X`; other values are
/// strings or numbers that say nothing about modules.
fn parse_config(text: &str) -> HashMap<String, Tristate> {
    let mut symbols = HashMap::new();
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("CONFIG_") {
            let value = match rest.split_once('=') {
                Some((sym, "y")) => Some((sym, Tristate::Builtin)),
                Some((sym, "m")) => Some((sym, Tristate::Module)),
                _ => None,
            };
            if let Some((sym, value)) = value {
                symbols.insert(sym.to_string(), value);
            }
        } else if let Some(sym) = line
            .strip_prefix("# CONFIG_")
            .and_then(|r| r.strip_suffix(" is not set"))
        {
            symbols.insert(sym.to_string(), Tristate::NotSet);
        }
    }
    symbols
}

/// `/proc/modules`: `name size refs deps state address`; a module being unloaded is not usable.
fn parse_proc_modules(text: &str) -> HashMap<String, bool> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let name = fields.next()?;
            let state = fields.nth(3);
            Some((name.to_string(), state != Some("Unloading")))
        })
        .collect()
}

/// `modules.builtin` lines are paths; `modules.dep` lines are `path: deps`. Module names use
/// `_` where file names may use `-`.
fn parse_module_index(text: &str) -> HashSet<String> {
    text.lines()
        .filter_map(|line| {
            let path = line.split(':').next()?.trim();
            let file = path.rsplit('/').next()?;
            let name = &file[..file.find(".ko")?];
            (!name.is_empty()).then(|| name.replace('-', "_"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::GzEncoder;
    use flate2::Compression;
    use std::io::Write;

    /// A host tree in a temp dir, built file by file.
    struct Tree(tempfile::TempDir);

    impl Tree {
        fn new(release: &str) -> Self {
            let t = Tree(tempfile::tempdir().unwrap());
            t.file("/proc/sys/kernel/osrelease", &format!("{release}\n"));
            t
        }
        fn file(&self, path: &str, text: &str) -> &Self {
            let p = self.root().join(path);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, text).unwrap();
            self
        }
        fn dir(&self, path: &str) -> &Self {
            fs::create_dir_all(self.root().join(path)).unwrap();
            self
        }
        fn config_gz(&self, text: &str) -> &Self {
            let mut gz = GzEncoder::new(Vec::new(), Compression::default());
            gz.write_all(text.as_bytes()).unwrap();
            let p = self.root().join("/proc/config.gz");
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, gz.finish().unwrap()).unwrap();
            self
        }
        fn root(&self) -> HostRoot {
            HostRoot::new(self.0.path())
        }
        fn find(&self, name: &str, symbol: &str) -> Finding {
            Sources::read(&self.root()).find(name, symbol)
        }
    }

    #[test]
    fn proc_modules_shows_loaded_but_not_unloading() {
        let t = Tree::new("6.1.0");
        t.file(
            "/proc/modules",
            "nf_tables 352256 0 - Live 0x0000000000000000\n\
             nft_ct 24576 0 - Unloading 0x0000000000000000\n",
        );
        let f = t.find("nf_tables", "NF_TABLES");
        assert_eq!(
            (f.state, f.source.as_str()),
            (ModuleState::Loaded, "/proc/modules")
        );
        assert_eq!(t.find("nft_ct", "NFT_CT").state, ModuleState::Missing);
    }

    #[test]
    fn sysfs_initstate_live_is_loaded_and_no_initstate_is_builtin() {
        let t = Tree::new("6.1.0");
        t.file("/sys/module/nft_nat/initstate", "live\n")
            .file("/sys/module/nft_ct/initstate", "going\n")
            .dir("/sys/module/nf_conntrack/parameters");
        let f = t.find("nft_nat", "NFT_NAT");
        assert_eq!(f.state, ModuleState::Loaded);
        assert_eq!(f.source, "/sys/module/nft_nat/initstate");
        let f = t.find("nf_conntrack", "NF_CONNTRACK");
        assert_eq!(f.state, ModuleState::Builtin);
        assert_eq!(f.source, "/sys/module/nf_conntrack without initstate");
        // Going away, and nothing else says anything: unverified.
        let f = t.find("nft_ct", "NFT_CT");
        assert_eq!(
            (f.state, f.evidence),
            (ModuleState::Missing, Evidence::Unverified)
        );
    }

    #[test]
    fn module_indexes_give_builtin_and_loadable_with_normalized_names() {
        let t = Tree::new("6.1.0-18-amd64");
        t.file(
            "/lib/modules/6.1.0-18-amd64/modules.builtin",
            "kernel/net/netfilter/x_tables.ko\n",
        )
        .file(
            "/lib/modules/6.1.0-18-amd64/modules.dep",
            "kernel/net/netfilter/nft_ct.ko.xz: kernel/net/netfilter/nf_tables.ko.xz\n\
             kernel/net/netfilter/xt-owner.ko.zst:\n",
        );
        let f = t.find("x_tables", "NETFILTER_XTABLES");
        assert_eq!(f.state, ModuleState::Builtin);
        assert_eq!(f.source, "/lib/modules/6.1.0-18-amd64/modules.builtin");
        assert_eq!(t.find("nft_ct", "NFT_CT").state, ModuleState::Loadable);
        assert_eq!(
            t.find("xt_owner", "NETFILTER_XT_MATCH_OWNER").state,
            ModuleState::Loadable
        );
        let f = t.find("nft_tproxy", "NFT_TPROXY");
        assert_eq!(
            (f.state, f.evidence),
            (ModuleState::Missing, Evidence::NotInIndex)
        );
    }

    #[test]
    fn config_gz_decides_builtin_loadable_and_not_built() {
        let t = Tree::new("6.18.0");
        t.config_gz(
            "CONFIG_NF_TABLES=y\nCONFIG_NFT_CT=m\n# CONFIG_NFT_TPROXY is not set\n\
             CONFIG_NF_CONNTRACK_MARK=y\nCONFIG_LOCALVERSION=\"-x\"\n",
        );
        let f = t.find("nf_tables", "NF_TABLES");
        assert_eq!(f.state, ModuleState::Builtin);
        assert_eq!(f.source, "/proc/config.gz: CONFIG_NF_TABLES=y");
        let f = t.find("nft_ct", "NFT_CT");
        assert_eq!(f.state, ModuleState::Loadable);
        assert_eq!(f.source, "/proc/config.gz: CONFIG_NFT_CT=m");
        let f = t.find("nft_tproxy", "NFT_TPROXY");
        assert_eq!(
            (f.state, f.evidence),
            (ModuleState::Missing, Evidence::NotBuilt)
        );
        let f = t.find("nft_socket", "NFT_SOCKET");
        assert_eq!(
            (f.state, f.evidence),
            (ModuleState::Missing, Evidence::NotBuilt)
        );
        assert_eq!(f.source, "/proc/config.gz has no CONFIG_NFT_SOCKET");
    }

    #[test]
    fn boot_config_is_used_when_proc_config_gz_is_absent_or_broken() {
        let t = Tree::new("5.14.0-362.el9.x86_64");
        t.file("/boot/config-5.14.0-362.el9.x86_64", "CONFIG_NFT_NAT=m\n")
            .file("/proc/config.gz", "not gzip at all");
        let f = t.find("nft_nat", "NFT_NAT");
        assert_eq!(f.state, ModuleState::Loadable);
        assert_eq!(
            f.source,
            "/boot/config-5.14.0-362.el9.x86_64: CONFIG_NFT_NAT=m"
        );
    }

    #[test]
    fn config_module_without_a_file_in_modules_dep_is_missing() {
        let t = Tree::new("6.8.0-31-generic");
        t.file("/boot/config-6.8.0-31-generic", "CONFIG_NFT_TPROXY=m\n")
            .file(
                "/lib/modules/6.8.0-31-generic/modules.dep",
                "kernel/x/nft_ct.ko:\n",
            );
        let f = t.find("nft_tproxy", "NFT_TPROXY");
        assert_eq!(
            (f.state, f.evidence),
            (ModuleState::Missing, Evidence::NoModuleFile)
        );
    }

    #[test]
    fn stronger_evidence_wins_when_sources_disagree() {
        let t = Tree::new("6.1.0");
        // The config says "not built", but the module is loaded (an out-of-tree build).
        t.config_gz("# CONFIG_NFT_CT is not set\nCONFIG_NFT_NAT=m\n")
            .file("/proc/modules", "nft_ct 1 0 - Live 0x0\n")
            // The index lists a DKMS module the config does not know.
            .file(
                "/lib/modules/6.1.0/modules.dep",
                "updates/dkms/nft_socket.ko:\n",
            )
            .file(
                "/lib/modules/6.1.0/modules.builtin",
                "kernel/net/netfilter/nft_nat.ko\n",
            );
        assert_eq!(t.find("nft_ct", "NFT_CT").state, ModuleState::Loaded);
        assert_eq!(
            t.find("nft_socket", "NFT_SOCKET").state,
            ModuleState::Loadable
        );
        // modules.builtin beats an outdated `=m`.
        assert_eq!(t.find("nft_nat", "NFT_NAT").state, ModuleState::Builtin);
    }

    #[test]
    fn nothing_readable_means_unverified_and_release_may_be_unknown() {
        let t = Tree(tempfile::tempdir().unwrap());
        let s = Sources::read(&t.root());
        assert_eq!(s.release, None);
        let f = s.find("nf_tables", "NF_TABLES");
        assert_eq!(
            (f.state, f.evidence),
            (ModuleState::Missing, Evidence::Unverified)
        );
        assert!(f.source.contains("no kernel config"), "{}", f.source);
    }

    #[test]
    fn config_parser_reads_only_tristates() {
        let c = parse_config(
            "CONFIG_A=y\nCONFIG_B=m\n# CONFIG_C is not set\nCONFIG_D=\"x\"\nCONFIG_E=16\n",
        );
        assert_eq!(c.get("A"), Some(&Tristate::Builtin));
        assert_eq!(c.get("B"), Some(&Tristate::Module));
        assert_eq!(c.get("C"), Some(&Tristate::NotSet));
        assert_eq!(c.get("D"), None);
        assert_eq!(c.get("E"), None);
    }
}
