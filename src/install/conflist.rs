//! Pure part of the installer: which file of the conf dir is the active network, and how its JSON
//! changes on install and uninstall. No filesystem access here, so every rule is unit-tested.
//!
//! The choice follows the runtimes: containerd (go-cni) and CRI-O (ocicni) list `*.conf`,
//! `*.conflist` and `*.json`, sort the names bytewise and take the first that libcni loads: a
//! `.conflist` must have a string `name` and a `plugins` array of objects with a `type`; a
//! `.conf`/`.json` is a single plugin and must have a `type`. Like CRI-O we skip a file that does
//! not load (containerd refuses the whole dir instead, so until that file is fixed there is no
//! network for us to miss).

use super::splice;
use crate::cni::error::{Code, Error, Result};
use crate::cni::{config, version};
use crate::trusted_path;
use serde_json::{Map, Value};

/// The `type` of our plugin entry, and the name of the binary in the CNI bin dir.
pub const PLUGIN_TYPE: &str = "intercept-cni";
/// The capability that makes containerd and CRI-O hand us the pod's annotations (issue 7).
pub const POD_ANNOTATIONS_CAPABILITY: &str = "io.kubernetes.cri.pod-annotations";

const LIST_EXTENSION: &str = ".conflist";
const SINGLE_EXTENSIONS: [&str; 2] = [".conf", ".json"];

/// How a runtime reads a file; decided by the extension alone, as libcni does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    List,
    Single,
}

impl FileKind {
    /// `None` for a name the runtimes never read as a network.
    pub fn of(file_name: &str) -> Option<FileKind> {
        if file_name.ends_with(LIST_EXTENSION) {
            Some(FileKind::List)
        } else if SINGLE_EXTENSIONS.iter().any(|ext| file_name.ends_with(ext)) {
            Some(FileKind::Single)
        } else {
            None
        }
    }
}

/// A file of the conf dir as read from disk.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConfFile {
    pub name: String,
    pub bytes: Vec<u8>,
    /// The name is a symbolic link, or one of several hard links (read through, as runtimes
    /// do; never written).
    pub symlink: bool,
    /// Device and inode of what was read, to tell a replaced file from an unchanged one.
    pub identity: (u64, u64),
}

impl ConfFile {
    pub fn new(name: &str, bytes: &[u8]) -> ConfFile {
        ConfFile {
            name: name.into(),
            bytes: bytes.to_vec(),
            ..ConfFile::default()
        }
    }
}

/// A file that a runtime would load as a network.
#[derive(Debug, Clone, PartialEq)]
pub struct Network {
    pub file_name: String,
    pub kind: FileKind,
    pub doc: Map<String, Value>,
    /// The file's text, which install and uninstall edit without re-serialising.
    pub text: String,
    pub symlink: bool,
}

/// Parses `file` the way libcni does; the error says why a runtime would skip it.
pub fn load_network(file: &ConfFile) -> std::result::Result<Network, String> {
    let kind = FileKind::of(&file.name).ok_or("not a CNI config file name")?;
    let text = std::str::from_utf8(&file.bytes).map_err(|_| "not UTF-8 text")?;
    let doc = match super::deep_json::parse(text) {
        Ok(Value::Object(doc)) => doc,
        Ok(_) => return Err("not a JSON object".into()),
        Err(e) => return Err(format!("invalid JSON: {e}")),
    };
    match kind {
        FileKind::List => check_list(&doc)?,
        FileKind::Single => check_plugin(&doc)?,
    }
    Ok(Network {
        file_name: file.name.clone(),
        kind,
        doc,
        text: text.to_owned(),
        symlink: file.symlink,
    })
}
fn check_list(doc: &Map<String, Value>) -> std::result::Result<(), String> {
    if !matches!(doc.get("name"), Some(Value::String(_))) {
        return Err("conflist without a string \"name\"".into());
    }
    if doc.get("cniVersion").is_some_and(|v| !v.is_string()) {
        return Err("\"cniVersion\" is not a string".into());
    }
    if doc.get("disableCheck").is_some_and(|v| !v.is_boolean()) {
        return Err("\"disableCheck\" is not a boolean".into());
    }
    let plugins = match doc.get("plugins") {
        Some(Value::Array(plugins)) => plugins,
        Some(_) => return Err("\"plugins\" is not an array".into()),
        None => return Err("conflist without \"plugins\"".into()),
    };
    if plugins.is_empty() {
        return Err("conflist with no plugins".into());
    }
    for plugin in plugins {
        match plugin {
            Value::Object(plugin) => check_plugin(plugin)?,
            _ => return Err("a plugin is not a JSON object".into()),
        }
    }
    Ok(())
}

fn check_plugin(plugin: &Map<String, Value>) -> std::result::Result<(), String> {
    for key in ["name", "cniVersion"] {
        if plugin.get(key).is_some_and(|v| !v.is_string()) {
            return Err(format!("\"{key}\" is not a string"));
        }
    }
    match plugin.get("type") {
        Some(Value::String(t)) if !t.is_empty() => Ok(()),
        _ => Err("plugin without a \"type\"".into()),
    }
}

/// The active network: the first file, in bytewise name order, that loads. Skipped files are
/// returned with the reason so the caller can log them.
pub fn active_network(files: &[ConfFile]) -> (Option<Network>, Vec<(String, String)>) {
    let mut sorted: Vec<&ConfFile> = files
        .iter()
        .filter(|f| FileKind::of(&f.name).is_some())
        .collect();
    sorted.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
    let mut skipped = Vec::new();
    for file in sorted {
        match load_network(file) {
            Ok(network) => return (Some(network), skipped),
            Err(why) => skipped.push((file.name.clone(), why)),
        }
    }
    (None, skipped)
}

/// The key of our entry that records which installer wrote it (see `Stamp`).
pub const STAMP_KEY: &str = "installer";

/// Which installer wrote an entry. Two installers on one conf dir (a rolling update with surge)
/// keep the entry of the higher stamp: the higher `generation` (the DaemonSet's
/// pod-template-generation), then the later start. The other one leaves the conf dir and the
/// binary alone while that entry is there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Stamp {
    pub generation: u64,
    /// Microseconds since the epoch when the installer started.
    pub started: u64,
}

impl Stamp {
    fn to_value(self) -> Value {
        serde_json::json!({"generation": self.generation, "started": self.started})
    }

    /// The stamp of one of our entries; an entry without one (written by hand, or by an older
    /// installer) ranks lowest.
    fn of(plugin: &Value) -> Stamp {
        let field = |key: &str| {
            plugin
                .get(STAMP_KEY)
                .and_then(|s| s.get(key))
                .and_then(Value::as_u64)
                .unwrap_or(0)
        };
        Stamp {
            generation: field("generation"),
            started: field("started"),
        }
    }
}

/// The entry an installer chains: the validated plugin config and its stamp.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub config: Map<String, Value>,
    pub stamp: Stamp,
}

impl Entry {
    pub fn value(&self) -> Value {
        let mut obj = self.config.clone();
        obj.insert(STAMP_KEY.into(), self.stamp.to_value());
        Value::Object(obj)
    }
}

/// Our plugin entry: the operator's JSON object (or the defaults) with `"type": "intercept-cni"`
/// first and the pod-annotations capability always declared. Refused, with the reason, when
/// the plugin would refuse it at ADD or when a key is unknown (a misspelt key would be ignored).
pub fn plugin_entry(operator_json: Option<&[u8]>) -> Result<Map<String, Value>> {
    let given = match operator_json {
        None => Map::new(),
        Some(bytes) => match serde_json::from_slice::<Value>(bytes) {
            Ok(Value::Object(obj)) => obj,
            Ok(_) => return Err(Error::config("plugin config must be a JSON object")),
            Err(e) => {
                return Err(Error::config(format!(
                    "plugin config is not valid JSON: {e}"
                )))
            }
        },
    };
    match given.get("type") {
        None => {}
        Some(Value::String(t)) if t == PLUGIN_TYPE => {}
        Some(other) => {
            return Err(Error::config(format!(
                "plugin config has \"type\": {other}, expected \"{PLUGIN_TYPE}\""
            )))
        }
    }
    let mut entry = Map::new();
    entry.insert("type".into(), PLUGIN_TYPE.into());
    for (key, value) in given {
        if key == STAMP_KEY {
            log::warn!("plugin config sets {STAMP_KEY:?}: ignored, the installer sets it");
        } else if key != "type" {
            entry.insert(key, value);
        }
    }
    let capabilities = entry
        .entry("capabilities")
        .or_insert_with(|| Value::Object(Map::new()));
    let Value::Object(capabilities) = capabilities else {
        return Err(Error::config(
            "plugin config \"capabilities\" must be a JSON object",
        ));
    };
    if capabilities.get(POD_ANNOTATIONS_CAPABILITY) == Some(&Value::Bool(false)) {
        log::warn!("plugin config disables {POD_ANNOTATIONS_CAPABILITY}: enabling it, the plugin decides per pod from the annotations");
    }
    capabilities.insert(POD_ANNOTATIONS_CAPABILITY.into(), Value::Bool(true));
    validate_entry(&entry)?;
    Ok(entry)
}

/// What ADD would say about this config, with the plugin's own parser, plus unknown keys.
fn validate_entry(entry: &Map<String, Value>) -> Result<()> {
    let unknown: Vec<String> = config::unknown_keys(entry)
        .map(|key| match config::suggest_key(key) {
            Some(known) => format!("{key:?} (did you mean {known:?}?)"),
            None => format!("{key:?}"),
        })
        .collect();
    if !unknown.is_empty() {
        return Err(Error::config(format!(
            "plugin config: unknown key {}",
            unknown.join(", unknown key ")
        )));
    }
    let conf = config::NetConf::from_object(entry, version::LATEST)
        .map_err(|e| Error::config(format!("plugin config: {}", e.msg)))?;
    // A stateDir the plugin refuses (`/`, `/proc`, another program's directory) fails every
    // ADD with code 7. Judged here only when set (the default is made by the plugin itself),
    // and only what would be refused: an I/O problem costs ADD just its cache.
    if entry.contains_key("stateDir") {
        match trusted_path::check_private_dir(&conf.state_dir, crate::host::is_our_entry) {
            Err(e) if e.code == Code::InvalidConfig => {
                return Err(Error::config(format!("plugin config: stateDir: {}", e.msg)))
            }
            _ => {}
        }
    }
    Ok(())
}

fn has_our_type(plugin: &Map<String, Value>) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

fn is_ours(plugin: &Value) -> bool {
    plugin.as_object().is_some_and(has_our_type)
}

/// The plugins of a loaded conflist with their spans in its text.
struct Plugins {
    array: splice::PluginsArray,
    values: Vec<Value>,
}

impl Plugins {
    fn of(text: &str) -> Result<Plugins> {
        let parsed = splice::plugins_array(text).and_then(|array| {
            let values = array
                .elements
                .iter()
                .map(|&(s, e)| super::deep_json::parse(&text[s..e]).ok())
                .collect::<Option<Vec<Value>>>()?;
            Some(Plugins { array, values })
        });
        parsed.ok_or_else(|| Error::new(Code::Internal, "cannot find the plugins of a conflist"))
    }

    fn ours(&self) -> impl Iterator<Item = &Value> {
        self.values.iter().filter(|v| is_ours(v))
    }
}

/// `text` without any entry of ours.
fn without_ours(text: &str) -> Result<String> {
    let mut text = text.to_owned();
    loop {
        let plugins = Plugins::of(&text)?;
        let Some(index) = plugins.values.iter().position(is_ours) else {
            return Ok(text);
        };
        text = splice::remove_element(&text, &plugins.array, index);
    }
}

/// True when `network` is a conflist whose last plugin is ours, and the only one of ours.
pub fn chains_us_last(network: &Network) -> bool {
    network.kind == FileKind::List
        && Plugins::of(&network.text)
            .is_ok_and(|p| p.ours().count() == 1 && p.values.last().is_some_and(is_ours))
}

/// What install does to the conf dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallPlan {
    /// The conflist to write, by name in the conf dir.
    pub file_name: String,
    pub content: Vec<u8>,
    /// The single-plugin file that this conflist replaces, removed once it is written.
    pub replaces: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// The active file already chains the entry as wanted.
    Unchanged {
        file_name: String,
    },
    /// A higher-stamped installer's entry is in place: leave the file and the binary to it.
    Superseded {
        file_name: String,
        by: Stamp,
    },
    Write(InstallPlan),
}

/// Chains `entry` last into `network`, the active one among `files` (the whole conf dir).
/// A conflist keeps its name and every byte outside our entry; a `.conf`/`.json` becomes
/// `STEM.conflist` (same network name and cniVersion, its text kept as the first plugin) so that
/// it stays first in the runtime's order and can hold a chain. `restamp`: an entry with the same
/// config but a lower stamp is rewritten with ours (a watcher claims it; a one-shot install
/// leaves it be). `live`: whether the installer of a stamp still runs; the entry of one that is
/// gone never holds back a live one (a DaemonSet re-created starts its generations over).
pub fn plan_install(
    network: &Network,
    files: &[ConfFile],
    entry: &Entry,
    restamp: bool,
    live: &dyn Fn(Stamp) -> bool,
) -> Result<Plan> {
    if network.symlink {
        return Err(symlink_refused(&network.file_name));
    }
    match network.kind {
        FileKind::List => plan_list(
            &network.file_name,
            &network.text,
            entry,
            restamp,
            live,
            None,
        ),
        FileKind::Single => {
            if has_our_type(&network.doc) {
                return Err(no_primary(&network.file_name));
            }
            let target = conflist_name(&network.file_name);
            let existing = check_conversion_target(&network.file_name, &target, files)?;
            if let Some(by) = existing.and_then(|f| higher_stamp(&f.bytes, entry.stamp, live)) {
                return Ok(Plan::Superseded {
                    file_name: target,
                    by,
                });
            }
            let (text, conversion) = converted_text(network);
            let Plan::Write(plan) = plan_list(&target, &text, entry, true, live, Some(conversion))?
            else {
                return Err(Error::new(Code::Internal, "conversion planned no write"));
            };
            Ok(Plan::Write(InstallPlan {
                replaces: Some(network.file_name.clone()),
                ..plan
            }))
        }
    }
}

fn plan_list(
    file_name: &str,
    text: &str,
    entry: &Entry,
    restamp: bool,
    live: &dyn Fn(Stamp) -> bool,
    conversion: Option<Value>,
) -> Result<Plan> {
    let plugins = Plugins::of(text)?;
    if let Some(by) = higher_stamp(text.as_bytes(), entry.stamp, live) {
        return Ok(Plan::Superseded {
            file_name: file_name.into(),
            by,
        });
    }
    // A conflist we made from a `.conf` keeps the record of it, for uninstall to put it back.
    let conversion = conversion.or_else(|| plugins.ours().find_map(|p| conversion_of(p).cloned()));
    let mut wanted = entry.value();
    if let Some(conversion) = conversion {
        wanted[STAMP_KEY][CONVERTED_KEY] = conversion;
    }
    let in_place = plugins.ours().count() == 1
        && plugins.values.last().is_some_and(|last| {
            is_ours(last) && (*last == wanted || (!restamp && config_of(last) == entry.config))
        });
    if in_place {
        return Ok(Plan::Unchanged {
            file_name: file_name.into(),
        });
    }
    let text = without_ours(text)?;
    let plugins = Plugins::of(&text)?;
    if plugins.values.is_empty() {
        return Err(no_primary(file_name));
    }
    Ok(Plan::Write(InstallPlan {
        file_name: file_name.into(),
        content: splice::append_element(&text, &plugins.array, &wanted).into_bytes(),
        replaces: None,
    }))
}

fn config_of(plugin: &Value) -> Map<String, Value> {
    let mut config = plugin.as_object().cloned().unwrap_or_default();
    config.remove(STAMP_KEY);
    config
}

/// The highest stamp above `ours` of a live installer's entry in a conflist's bytes.
fn higher_stamp(bytes: &[u8], ours: Stamp, live: &dyn Fn(Stamp) -> bool) -> Option<Stamp> {
    let text = std::str::from_utf8(bytes).ok()?;
    let plugins = Plugins::of(text).ok()?;
    plugins
        .ours()
        .map(Stamp::of)
        .filter(|s| *s > ours && live(*s))
        .max()
}

/// A conflist holding the single plugin's text as it was, untouched.
/// ... and the record of what it was made from: the `.conf`'s name and the spacing around its
/// JSON, so that uninstall can write back its exact bytes.
fn converted_text(network: &Network) -> (String, Value) {
    let mut header = String::new();
    if let Some(version) = network.doc.get("cniVersion") {
        header.push_str(&format!("  \"cniVersion\": {version},\n"));
    }
    let name = match network.doc.get("name") {
        Some(name) => name.clone(),
        // libcni needs a list name; CRI-O names a nameless network after its file too.
        None => Value::String(file_stem(&network.file_name).to_owned()),
    };
    header.push_str(&format!("  \"name\": {name},\n"));
    let body = network.text.trim();
    let before = &network.text[..network.text.len() - network.text.trim_start().len()];
    let after = &network.text[network.text.trim_end().len()..];
    let text = format!("{{\n{header}  \"plugins\": [\n    {body}\n  ]\n}}\n");
    let conversion =
        serde_json::json!({"name": network.file_name, "before": before, "after": after});
    (text, conversion)
}

const CONVERTED_KEY: &str = "convertedFrom";

fn conversion_of(plugin: &Value) -> Option<&Value> {
    plugin.get(STAMP_KEY)?.get(CONVERTED_KEY)
}

fn symlink_refused(file_name: &str) -> Error {
    Error::config(format!(
        "the active network {file_name} is a symbolic link or has other hard links: not \
         modified (replacing the link would hide the owner's later edits, and its target is \
         not ours to write); chain \
         {PLUGIN_TYPE} in the file's source instead, or let the primary agent write a regular file"
    ))
}

fn no_primary(file_name: &str) -> Error {
    Error::config(format!(
        "the active network {file_name} has no plugin besides {PLUGIN_TYPE}: nothing to chain after"
    ))
}

fn file_stem(file_name: &str) -> &str {
    file_name
        .rsplit_once('.')
        .map_or(file_name, |(stem, _)| stem)
}

fn conflist_name(file_name: &str) -> String {
    format!("{}{LIST_EXTENSION}", file_stem(file_name))
}

/// The converted file must neither overwrite a file that is not ours nor lose first place.
/// Returns the existing conflist of ours it would replace.
fn check_conversion_target<'a>(
    source: &str,
    target: &str,
    files: &'a [ConfFile],
) -> Result<Option<&'a ConfFile>> {
    let existing = files.iter().find(|f| f.name == target);
    if let Some(existing) = existing {
        let ours = !existing.symlink
            && load_network(existing)
                .ok()
                .and_then(|n| n.doc.get("plugins").cloned())
                .and_then(|p| p.as_array().map(|p| p.iter().any(is_ours)))
                .unwrap_or(false);
        if !ours {
            return Err(Error::config(format!(
                "cannot convert {source} to {target}: {target} exists and was not written by the installer"
            )));
        }
    }
    let overtaken_by = files.iter().find(|f| {
        f.name != source
            && f.name != target
            && f.name.as_bytes() < target.as_bytes()
            && load_network(f).is_ok()
    });
    if let Some(other) = overtaken_by {
        return Err(Error::config(format!(
            "cannot convert {source} to {target}: {} would sort before it and become the active network",
            other.name
        )));
    }
    Ok(existing)
}

/// What uninstall does to one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Uninstall {
    /// The conflist without our entries, byte for byte as it was before they were added.
    Rewrite(Vec<u8>),
    /// The conflist was made by install from the single-plugin file `name`: write that back
    /// with its exact bytes (unless the primary agent wrote it again) and remove the conflist.
    Restore { name: String, content: Vec<u8> },
}

/// What to do about our entries in `file`; `None` when it is not a conflist holding one, or is
/// a symbolic link (never written by us). A list holding nothing but our entries is left
/// alone: we never write one, so it is not ours.
/// `only`: remove them only if every one carries this stamp (another installer owns the rest).
pub fn plan_uninstall(file: &ConfFile, only: Option<Stamp>) -> Result<Option<Uninstall>> {
    let Ok(network) = load_network(file) else {
        return Ok(None);
    };
    if network.kind != FileKind::List || network.symlink {
        return Ok(None);
    }
    let plugins = Plugins::of(&network.text)?;
    if plugins.ours().next().is_none() || plugins.values.iter().all(is_ours) {
        return Ok(None);
    }
    if let Some(stamp) = only {
        if plugins.ours().any(|p| Stamp::of(p) != stamp) {
            return Ok(None);
        }
    }
    let text = without_ours(&network.text)?;
    if let Some(restore) = restore_of(&network, &plugins, &text)? {
        return Ok(Some(restore));
    }
    Ok(Some(Uninstall::Rewrite(text.into_bytes())))
}

/// The single-plugin file a conflist of ours was made from, if it still is just that: its name
/// matches, it holds no key we did not write, and one plugin is left.
fn restore_of(network: &Network, plugins: &Plugins, text: &str) -> Result<Option<Uninstall>> {
    let Some(conversion) = plugins.ours().find_map(conversion_of) else {
        return Ok(None);
    };
    let field = |key: &str| conversion.get(key).and_then(Value::as_str);
    let (Some(name), Some(before), Some(after)) = (field("name"), field("before"), field("after"))
    else {
        return Ok(None);
    };
    let only_ours = network
        .doc
        .keys()
        .all(|k| matches!(k.as_str(), "cniVersion" | "name" | "plugins"));
    let spacing = |s: &str| s.bytes().all(|b| b.is_ascii_whitespace());
    if FileKind::of(name) != Some(FileKind::Single)
        || conflist_name(name) != network.file_name
        || !only_ours
        || !spacing(before)
        || !spacing(after)
    {
        return Ok(None);
    }
    let left = Plugins::of(text)?;
    let [(start, end)] = left.array.elements[..] else {
        return Ok(None);
    };
    Ok(Some(Uninstall::Restore {
        name: name.to_owned(),
        content: format!("{before}{}{after}", &text[start..end]).into_bytes(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn file(name: &str, value: Value) -> ConfFile {
        ConfFile::new(name, &serde_json::to_vec(&value).unwrap())
    }

    fn raw(name: &str, text: &str) -> ConfFile {
        ConfFile::new(name, text.as_bytes())
    }

    fn bridge_conf() -> Value {
        json!({"cniVersion": "1.0.0", "name": "kind", "type": "bridge", "ipam": {"type": "host-local"}})
    }

    fn bridge_list() -> Value {
        json!({"cniVersion": "1.0.0", "name": "kind", "plugins": [
            {"type": "bridge", "ipam": {"type": "host-local"}},
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]})
    }

    const STAMP: Stamp = Stamp {
        generation: 1,
        started: 100,
    };

    fn entry_with(config: Map<String, Value>, stamp: Stamp) -> Entry {
        Entry { config, stamp }
    }

    fn default_entry() -> Entry {
        entry_with(plugin_entry(None).unwrap(), STAMP)
    }

    fn parse(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).unwrap()
    }

    /// The plan of a pass that must write.
    fn write_plan(files: &[ConfFile], entry: &Entry) -> InstallPlan {
        let network = active_network(files).0.unwrap();
        match plan_install(&network, files, entry, true, &|_| true).unwrap() {
            Plan::Write(plan) => plan,
            other => panic!("expected a write, got {other:?}"),
        }
    }

    fn written(plan: &InstallPlan) -> ConfFile {
        ConfFile::new(&plan.file_name, &plan.content)
    }

    #[test]
    fn kind_is_decided_by_extension() {
        assert_eq!(FileKind::of("10-a.conflist"), Some(FileKind::List));
        assert_eq!(FileKind::of("10-a.conf"), Some(FileKind::Single));
        assert_eq!(FileKind::of("10-a.json"), Some(FileKind::Single));
        assert_eq!(FileKind::of("10-a.conf.bak"), None);
        assert_eq!(FileKind::of(".10-a.conflist.1.intercept-cni-tmp"), None);
    }

    #[test]
    fn validity_follows_libcni() {
        assert!(load_network(&file("a.conflist", bridge_list())).is_ok());
        assert!(load_network(&file("a.conf", bridge_conf())).is_ok());
        assert!(load_network(&file("a.json", bridge_conf())).is_ok());
        // A list in a .conf file has no top-level type: runtimes reject it.
        assert!(load_network(&file("a.conf", bridge_list())).is_err());
        // A single plugin in a .conflist has no plugins key.
        assert!(load_network(&file("a.conflist", bridge_conf())).is_err());
        let bad = [
            raw(
                "a.conflist",
                "{\"name\": \"x\", \"plugins\": [{\"type\": \"bridge\"}",
            ),
            raw("a.conflist", "[]"),
            file("a.conflist", json!({"plugins": [{"type": "bridge"}]})),
            file(
                "a.conflist",
                json!({"name": 3, "plugins": [{"type": "bridge"}]}),
            ),
            file(
                "a.conflist",
                json!({"name": "x", "cniVersion": 1, "plugins": [{"type": "bridge"}]}),
            ),
            file("a.conflist", json!({"name": "x", "plugins": []})),
            file(
                "a.conflist",
                json!({"name": "x", "plugins": {"type": "bridge"}}),
            ),
            file("a.conflist", json!({"name": "x", "plugins": ["bridge"]})),
            file(
                "a.conflist",
                json!({"name": "x", "plugins": [{"ipam": {}}]}),
            ),
            file("a.conf", json!({"name": "x", "type": ""})),
            file("a.conf", json!({"name": "x"})),
            raw("a.conf", ""),
        ];
        for f in &bad {
            assert!(
                load_network(f).is_err(),
                "{}",
                String::from_utf8_lossy(&f.bytes)
            );
        }
    }

    #[test]
    fn first_loadable_file_in_bytewise_order_is_active() {
        let files = vec![
            file("20-z.conflist", bridge_list()),
            raw("05-broken.conflist", "{"),
            file("10-b.conf", bridge_conf()),
            raw("00-readme.txt", "not a config"),
            file(
                "10-B.conflist",
                json!({"name": "no-plugins", "plugins": []}),
            ),
            file("10-a.json", bridge_conf()),
        ];
        let (active, skipped) = active_network(&files);
        assert_eq!(active.unwrap().file_name, "10-a.json");
        let skipped: Vec<&str> = skipped.iter().map(|(n, _)| n.as_str()).collect();
        // Uppercase sorts before lowercase, as Go's sort.Strings does.
        assert_eq!(skipped, ["05-broken.conflist", "10-B.conflist"]);
        assert_eq!(active_network(&[raw("a.conf", "{")]).0, None);
        assert_eq!(active_network(&[]).0, None);
    }

    #[test]
    fn default_entry_declares_the_annotations_capability() {
        assert_eq!(
            default_entry().value(),
            json!({"type": "intercept-cni", "capabilities": {"io.kubernetes.cri.pod-annotations": true},
                   "installer": {"generation": 1, "started": 100}})
        );
    }

    #[test]
    fn operator_entry_gets_type_first_and_the_capability() {
        let entry = plugin_entry(Some(
            br#"{"podSelection": "annotated", "capabilities": {"portMappings": true, "io.kubernetes.cri.pod-annotations": false}}"#,
        ))
        .unwrap();
        let keys: Vec<&str> = entry.keys().map(String::as_str).collect();
        assert_eq!(keys, ["type", "podSelection", "capabilities"]);
        assert_eq!(
            entry["capabilities"],
            json!({"portMappings": true, "io.kubernetes.cri.pod-annotations": true})
        );
        let typed =
            plugin_entry(Some(br#"{"type": "intercept-cni", "inboundPort": 15006}"#)).unwrap();
        assert_eq!(typed["inboundPort"], 15006);
    }

    #[test]
    fn operator_entry_errors() {
        for bad in [
            &b"[1]"[..],
            b"{",
            br#"{"type": "bridge"}"#,
            br#"{"type": 1}"#,
            br#"{"capabilities": []}"#,
        ] {
            let err = plugin_entry(Some(bad)).unwrap_err();
            assert_eq!(err.code, crate::cni::error::Code::InvalidConfig);
        }
    }

    #[test]
    fn configs_the_plugin_would_refuse_are_refused_with_the_reason() {
        for (bad, says) in [
            (&br#"{"inboundPort": 0}"#[..], "inboundPort"),
            (br#"{"backend": "nftabels"}"#, "backend"),
            (
                br#"{"excludeNamespace": ["kube-system"]}"#,
                "\"excludeNamespace\" (did you mean \"excludeNamespaces\"?)",
            ),
            (br#"{"whatever": 1}"#, "unknown key \"whatever\""),
        ] {
            let err = plugin_entry(Some(bad)).unwrap_err();
            assert_eq!(err.code, crate::cni::error::Code::InvalidConfig);
            assert!(
                err.msg.contains(says),
                "{}: {}",
                String::from_utf8_lossy(bad),
                err.msg
            );
        }
    }

    #[test]
    fn conflist_gets_entry_last_and_every_other_byte_kept() {
        let text = "{\"plugins\": [{\"type\": \"calico\", \"mtu\": 0, \"big\": 123456789012345678901234567890, \"e\": 1e3, \"z\": -0},\n {\"type\": \"intercept-cni\", \"old\": 1}, {\"type\": \"portmap\"}], \"name\": \"k8s-pod-network\", \"cniVersion\": \"0.3.1\"}";
        let files = vec![raw("10-calico.conflist", text)];
        let plan = write_plan(&files, &default_entry());
        assert_eq!(plan.file_name, "10-calico.conflist");
        assert_eq!(plan.replaces, None);
        let out = String::from_utf8(plan.content.clone()).unwrap();
        let expected_prefix = "{\"plugins\": [{\"type\": \"calico\", \"mtu\": 0, \"big\": 123456789012345678901234567890, \"e\": 1e3, \"z\": -0}, {\"type\": \"portmap\"},";
        assert!(out.starts_with(expected_prefix), "{out}");
        assert!(out.ends_with("], \"name\": \"k8s-pod-network\", \"cniVersion\": \"0.3.1\"}"));
        assert_eq!(parse(&plan.content)["plugins"][2], default_entry().value());
    }

    #[test]
    fn install_then_uninstall_gives_the_original_bytes() {
        let text = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("testdata/install/10-numbers.conflist"),
        )
        .unwrap();
        let files = vec![raw("10-numbers.conflist", &text)];
        let plan = write_plan(&files, &default_entry());
        let back = plan_uninstall(&written(&plan), None).unwrap().unwrap();
        assert_eq!(back, Uninstall::Rewrite(text.into_bytes()));
    }

    #[test]
    fn install_is_a_fixed_point() {
        let files = vec![file("10-kind.conflist", bridge_list())];
        let first = write_plan(&files, &default_entry());
        let again = vec![written(&first)];
        let network = active_network(&again).0.unwrap();
        assert_eq!(
            plan_install(&network, &again, &default_entry(), true, &|_| true).unwrap(),
            Plan::Unchanged {
                file_name: "10-kind.conflist".into()
            }
        );
    }

    #[test]
    fn the_higher_stamp_keeps_the_entry() {
        let files = vec![file("10-kind.conflist", bridge_list())];
        let mut other = plugin_entry(None).unwrap();
        other.insert("podSelection".into(), json!("all"));
        let newer = Stamp {
            generation: 2,
            started: 50,
        };
        let installed = vec![written(&write_plan(
            &files,
            &entry_with(other.clone(), newer),
        ))];
        let network = active_network(&installed).0.unwrap();
        // The older installer leaves it, whatever its config.
        assert_eq!(
            plan_install(&network, &installed, &default_entry(), true, &|_| true).unwrap(),
            Plan::Superseded {
                file_name: "10-kind.conflist".into(),
                by: newer
            }
        );
        // ...unless that installer is gone.
        assert!(matches!(
            plan_install(&network, &installed, &default_entry(), true, &|_| false).unwrap(),
            Plan::Write(_)
        ));
        // A newer one takes it over; with the same config a one-shot install leaves it be.
        let newest = Stamp {
            generation: 2,
            started: 60,
        };
        assert!(matches!(
            plan_install(
                &network,
                &installed,
                &entry_with(other.clone(), newest),
                true,
                &|_| true
            )
            .unwrap(),
            Plan::Write(_)
        ));
        assert!(matches!(
            plan_install(
                &network,
                &installed,
                &entry_with(other, newest),
                false,
                &|_| true
            )
            .unwrap(),
            Plan::Unchanged { .. }
        ));
        // Removal on exit takes only an entry of one's own stamp.
        assert_eq!(plan_uninstall(&installed[0], Some(STAMP)).unwrap(), None);
        assert!(plan_uninstall(&installed[0], Some(newer))
            .unwrap()
            .is_some());
    }

    #[test]
    fn a_symlinked_network_is_refused_and_never_written() {
        let mut link = file("10-kind.conflist", bridge_list());
        link.symlink = true;
        let files = vec![link.clone()];
        let network = active_network(&files).0.unwrap();
        let err = plan_install(&network, &files, &default_entry(), true, &|_| true).unwrap_err();
        assert!(err.msg.contains("symbolic link"), "{err}");
        let mut installed = written(&write_plan(
            &[file("10-kind.conflist", bridge_list())],
            &default_entry(),
        ));
        installed.symlink = true;
        assert_eq!(plan_uninstall(&installed, None).unwrap(), None);
    }

    #[test]
    fn single_conf_becomes_conflist_with_same_name_and_version() {
        let files = vec![file("10-bridge.conf", bridge_conf())];
        let plan = write_plan(&files, &default_entry());
        assert_eq!(plan.file_name, "10-bridge.conflist");
        assert_eq!(plan.replaces.as_deref(), Some("10-bridge.conf"));
        let mut entry = default_entry().value();
        entry["installer"]["convertedFrom"] =
            json!({"name": "10-bridge.conf", "before": "", "after": ""});
        assert_eq!(
            parse(&plan.content),
            json!({"cniVersion": "1.0.0", "name": "kind", "plugins": [bridge_conf(), entry]})
        );
        let text = String::from_utf8(plan.content.clone()).unwrap();
        assert!(text.contains(std::str::from_utf8(&files[0].bytes).unwrap()));
        assert!(load_network(&written(&plan)).is_ok());
    }

    #[test]
    fn a_converted_conf_comes_back_byte_for_byte() {
        let original = "\n  {\"cniVersion\": \"1.0.0\", \"name\": \"kind\", \"type\": \"bridge\", \"mtu\": 1e3}\n\n";
        let files = vec![raw("10-bridge.conf", original)];
        let plan = write_plan(&files, &default_entry());
        // A watcher's later pass keeps the record of the conversion.
        let newer = entry_with(
            plugin_entry(None).unwrap(),
            Stamp {
                generation: 1,
                started: 200,
            },
        );
        let again = write_plan(&[written(&plan)], &newer);
        assert_eq!(
            plan_uninstall(&written(&again), None).unwrap(),
            Some(Uninstall::Restore {
                name: "10-bridge.conf".into(),
                content: original.as_bytes().to_vec()
            })
        );
        // A key added by someone else: only our entry goes.
        let mut doc = parse(&again.content);
        doc["disableCheck"] = json!(true);
        let edited = file("10-bridge.conflist", doc);
        assert!(matches!(
            plan_uninstall(&edited, None).unwrap(),
            Some(Uninstall::Rewrite(_))
        ));
    }

    #[test]
    fn nameless_conf_is_named_after_its_file() {
        let files = vec![file("10-x.json", json!({"type": "ptp"}))];
        let plan = write_plan(&files, &default_entry());
        assert_eq!(plan.file_name, "10-x.conflist");
        assert_eq!(parse(&plan.content)["name"], "10-x");
        assert!(parse(&plan.content).get("cniVersion").is_none());
    }

    #[test]
    fn conversion_may_replace_only_our_own_conflist() {
        let entry = default_entry();
        let ours = write_plan(&[file("10-bridge.conf", bridge_conf())], &entry);
        // The primary agent wrote its .conf again next to the conflist we made from it.
        let files = vec![file("10-bridge.conf", bridge_conf()), written(&ours)];
        let network = active_network(&files).0.unwrap();
        assert_eq!(network.file_name, "10-bridge.conf");
        assert_eq!(write_plan(&files, &entry), ours);

        let foreign = vec![
            file("10-bridge.conf", bridge_conf()),
            raw("10-bridge.conflist", "{ broken"),
        ];
        let network = active_network(&foreign).0.unwrap();
        let err = plan_install(&network, &foreign, &entry, true, &|_| true).unwrap_err();
        assert!(
            err.msg.contains("was not written by the installer"),
            "{err}"
        );
    }

    #[test]
    fn conversion_must_stay_first() {
        let files = vec![
            file("10-a.conf", bridge_conf()),
            file("10-a.conf-b.conflist", bridge_list()),
        ];
        let network = active_network(&files).0.unwrap();
        let err = plan_install(&network, &files, &default_entry(), true, &|_| true).unwrap_err();
        assert!(
            err.msg.contains("10-a.conf-b.conflist would sort before"),
            "{err}"
        );
    }

    #[test]
    fn a_network_of_only_our_plugin_is_refused() {
        let entry = default_entry();
        let lone = vec![file(
            "00-x.conflist",
            json!({"name": "x", "plugins": [{"type": "intercept-cni"}]}),
        )];
        let network = active_network(&lone).0.unwrap();
        assert!(plan_install(&network, &lone, &entry, true, &|_| true).is_err());
        let single = vec![file(
            "00-x.conf",
            json!({"name": "x", "type": "intercept-cni"}),
        )];
        let network = active_network(&single).0.unwrap();
        assert!(plan_install(&network, &single, &entry, true, &|_| true).is_err());
    }

    #[test]
    fn uninstall_removes_only_our_entries() {
        let original = file("10-kind.conflist", bridge_list());
        let installed = write_plan(std::slice::from_ref(&original), &default_entry());
        let back = plan_uninstall(&written(&installed), None).unwrap().unwrap();
        assert_eq!(back, Uninstall::Rewrite(original.bytes));
        let mut conf_naming_us = bridge_conf();
        conf_naming_us["plugins"] = json!([{"type": "intercept-cni"}, {"type": "x"}]);
        for untouched in [
            file("10-kind.conflist", bridge_list()),
            file("10-kind.conf", conf_naming_us),
            raw("10-kind.conflist", "{"),
        ] {
            assert_eq!(plan_uninstall(&untouched, None).unwrap(), None);
        }
        let lone = file(
            "00-x.conflist",
            json!({"name": "x", "plugins": [{"type": "intercept-cni"}]}),
        );
        assert_eq!(plan_uninstall(&lone, None).unwrap(), None);
    }
}
