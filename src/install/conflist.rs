//! Pure part of the installer: which file of the conf dir is the active network, and how its JSON
//! changes on install and uninstall. No filesystem access here, so every rule is unit-tested.
//!
//! The choice follows the runtimes: containerd (go-cni) and CRI-O (ocicni) list `*.conf`,
//! `*.conflist` and `*.json`, sort the names bytewise and take the first that libcni loads: a
//! `.conflist` must have a string `name` and a `plugins` array of objects with a `type`; a
//! `.conf`/`.json` is a single plugin and must have a `type`. Like CRI-O we skip a file that does
//! not load (containerd refuses the whole dir instead, so until that file is fixed there is no
//! network for us to miss).

use crate::cni::error::{Code, Error, Result};
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfFile {
    pub name: String,
    pub bytes: Vec<u8>,
}

/// A file that a runtime would load as a network.
#[derive(Debug, Clone, PartialEq)]
pub struct Network {
    pub file_name: String,
    pub kind: FileKind,
    pub doc: Map<String, Value>,
}

/// Parses `file` the way libcni does; the error says why a runtime would skip it.
pub fn load_network(file: &ConfFile) -> std::result::Result<Network, String> {
    let kind = FileKind::of(&file.name).ok_or("not a CNI config file name")?;
    let doc = match serde_json::from_slice::<Value>(&file.bytes) {
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

/// Our plugin entry: the operator's JSON object (or the defaults) with `"type": "intercept-cni"`
/// first and the pod-annotations capability always declared.
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
        if key != "type" {
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
    Ok(entry)
}

fn has_our_type(plugin: &Map<String, Value>) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

fn is_ours(plugin: &Value) -> bool {
    plugin.as_object().is_some_and(has_our_type)
}

/// The same JSON always gives the same bytes: pretty, key order as read, final newline.
pub fn render(doc: &Map<String, Value>) -> Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec_pretty(doc).map_err(|e| {
        Error::new(
            Code::Internal,
            format!("cannot serialize a CNI config: {e}"),
        )
    })?;
    bytes.push(b'\n');
    Ok(bytes)
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

/// Chains `entry` last into `network`, the active one among `files` (the whole conf dir).
/// A conflist keeps its name; a `.conf`/`.json` becomes `STEM.conflist` (same network name and
/// cniVersion) so that it stays first in the runtime's order and can hold a chain.
pub fn plan_install(
    network: &Network,
    files: &[ConfFile],
    entry: &Map<String, Value>,
) -> Result<InstallPlan> {
    match network.kind {
        FileKind::List => {
            let mut doc = network.doc.clone();
            let plugins = chain_with_entry(&doc, entry, &network.file_name)?;
            doc.insert("plugins".into(), Value::Array(plugins));
            Ok(InstallPlan {
                file_name: network.file_name.clone(),
                content: render(&doc)?,
                replaces: None,
            })
        }
        FileKind::Single => {
            if has_our_type(&network.doc) {
                return Err(no_primary(&network.file_name));
            }
            let target = conflist_name(&network.file_name);
            check_conversion_target(&network.file_name, &target, files)?;
            let mut doc = Map::new();
            if let Some(version) = network.doc.get("cniVersion") {
                doc.insert("cniVersion".into(), version.clone());
            }
            let name = match network.doc.get("name") {
                Some(name) => name.clone(),
                // libcni needs a list name; CRI-O names a nameless network after its file too.
                None => Value::String(file_stem(&network.file_name).to_owned()),
            };
            doc.insert("name".into(), name);
            doc.insert(
                "plugins".into(),
                Value::Array(vec![
                    Value::Object(network.doc.clone()),
                    Value::Object(entry.clone()),
                ]),
            );
            Ok(InstallPlan {
                file_name: target,
                content: render(&doc)?,
                replaces: Some(network.file_name.clone()),
            })
        }
    }
}

/// The list's plugins without any entry of ours, then `entry`.
fn chain_with_entry(
    doc: &Map<String, Value>,
    entry: &Map<String, Value>,
    file_name: &str,
) -> Result<Vec<Value>> {
    let mut plugins: Vec<Value> = doc
        .get("plugins")
        .and_then(Value::as_array)
        .map(|plugins| plugins.iter().filter(|p| !is_ours(p)).cloned().collect())
        .unwrap_or_default();
    if plugins.is_empty() {
        return Err(no_primary(file_name));
    }
    plugins.push(Value::Object(entry.clone()));
    Ok(plugins)
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
fn check_conversion_target(source: &str, target: &str, files: &[ConfFile]) -> Result<()> {
    if let Some(existing) = files.iter().find(|f| f.name == target) {
        let ours = load_network(existing)
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
    Ok(())
}

/// The conflist without our entries, or `None` when `file` is not a conflist holding one.
/// A list holding nothing but our entries is left alone: we never write one, so it is not ours.
pub fn plan_uninstall(file: &ConfFile) -> Result<Option<Vec<u8>>> {
    let Ok(network) = load_network(file) else {
        return Ok(None);
    };
    if network.kind != FileKind::List {
        return Ok(None);
    }
    let Some(plugins) = network.doc.get("plugins").and_then(Value::as_array) else {
        return Ok(None);
    };
    if !plugins.iter().any(is_ours) || plugins.iter().all(is_ours) {
        return Ok(None);
    }
    let kept: Vec<Value> = plugins.iter().filter(|p| !is_ours(p)).cloned().collect();
    let mut doc = network.doc.clone();
    doc.insert("plugins".into(), Value::Array(kept));
    render(&doc).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn file(name: &str, value: Value) -> ConfFile {
        ConfFile {
            name: name.into(),
            bytes: serde_json::to_vec(&value).unwrap(),
        }
    }

    fn raw(name: &str, text: &str) -> ConfFile {
        ConfFile {
            name: name.into(),
            bytes: text.as_bytes().to_vec(),
        }
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

    fn default_entry() -> Map<String, Value> {
        plugin_entry(None).unwrap()
    }

    fn parse(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).unwrap()
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
            Value::Object(default_entry()),
            json!({"type": "intercept-cni", "capabilities": {"io.kubernetes.cri.pod-annotations": true}})
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
    fn conflist_gets_entry_last_and_keeps_key_order() {
        let text = r#"{"plugins": [{"type": "calico", "mtu": 0}, {"type": "intercept-cni", "old": 1}, {"type": "portmap"}], "name": "k8s-pod-network", "cniVersion": "0.3.1"}"#;
        let files = vec![raw("10-calico.conflist", text)];
        let network = active_network(&files).0.unwrap();
        let plan = plan_install(&network, &files, &default_entry()).unwrap();
        assert_eq!(plan.file_name, "10-calico.conflist");
        assert_eq!(plan.replaces, None);
        let out = parse(&plan.content);
        let keys: Vec<&str> = out
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys, ["plugins", "name", "cniVersion"]);
        assert_eq!(
            out["plugins"],
            json!([{"type": "calico", "mtu": 0}, {"type": "portmap"}, Value::Object(default_entry())])
        );
    }

    #[test]
    fn install_is_a_fixed_point() {
        let files = vec![file("10-kind.conflist", bridge_list())];
        let network = active_network(&files).0.unwrap();
        let first = plan_install(&network, &files, &default_entry()).unwrap();
        let again = vec![raw(
            "10-kind.conflist",
            std::str::from_utf8(&first.content).unwrap(),
        )];
        let network = active_network(&again).0.unwrap();
        let second = plan_install(&network, &again, &default_entry()).unwrap();
        assert_eq!(first.content, second.content);
    }

    #[test]
    fn single_conf_becomes_conflist_with_same_name_and_version() {
        let files = vec![file("10-bridge.conf", bridge_conf())];
        let network = active_network(&files).0.unwrap();
        let plan = plan_install(&network, &files, &default_entry()).unwrap();
        assert_eq!(plan.file_name, "10-bridge.conflist");
        assert_eq!(plan.replaces.as_deref(), Some("10-bridge.conf"));
        assert_eq!(
            parse(&plan.content),
            json!({"cniVersion": "1.0.0", "name": "kind", "plugins": [bridge_conf(), Value::Object(default_entry())]})
        );
        let converted = ConfFile {
            name: plan.file_name.clone(),
            bytes: plan.content.clone(),
        };
        assert!(load_network(&converted).is_ok());
    }

    #[test]
    fn nameless_conf_is_named_after_its_file() {
        let files = vec![file("10-x.json", json!({"type": "ptp"}))];
        let network = active_network(&files).0.unwrap();
        let plan = plan_install(&network, &files, &default_entry()).unwrap();
        assert_eq!(plan.file_name, "10-x.conflist");
        assert_eq!(parse(&plan.content)["name"], "10-x");
        assert!(parse(&plan.content).get("cniVersion").is_none());
    }

    #[test]
    fn conversion_may_replace_only_our_own_conflist() {
        let entry = default_entry();
        let ours = plan_install(
            &load_network(&file("10-bridge.conf", bridge_conf())).unwrap(),
            &[],
            &entry,
        )
        .unwrap();
        // The primary agent wrote its .conf again next to the conflist we made from it.
        let files = vec![
            file("10-bridge.conf", bridge_conf()),
            ConfFile {
                name: ours.file_name.clone(),
                bytes: ours.content.clone(),
            },
        ];
        let network = active_network(&files).0.unwrap();
        assert_eq!(network.file_name, "10-bridge.conf");
        assert_eq!(plan_install(&network, &files, &entry).unwrap(), ours);

        let foreign = vec![
            file("10-bridge.conf", bridge_conf()),
            raw("10-bridge.conflist", "{ broken"),
        ];
        let network = active_network(&foreign).0.unwrap();
        let err = plan_install(&network, &foreign, &entry).unwrap_err();
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
        let err = plan_install(&network, &files, &default_entry()).unwrap_err();
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
        assert!(plan_install(&network, &lone, &entry).is_err());
        let single = vec![file(
            "00-x.conf",
            json!({"name": "x", "type": "intercept-cni"}),
        )];
        let network = active_network(&single).0.unwrap();
        assert!(plan_install(&network, &single, &entry).is_err());
    }

    #[test]
    fn uninstall_removes_only_our_entries() {
        let files = vec![file("10-kind.conflist", bridge_list())];
        let network = active_network(&files).0.unwrap();
        let installed = plan_install(&network, &files, &default_entry()).unwrap();
        let back = plan_uninstall(&ConfFile {
            name: "10-kind.conflist".into(),
            bytes: installed.content,
        })
        .unwrap()
        .unwrap();
        assert_eq!(back, render(bridge_list().as_object().unwrap()).unwrap());
        let mut conf_naming_us = bridge_conf();
        conf_naming_us["plugins"] = json!([{"type": "intercept-cni"}, {"type": "x"}]);
        for untouched in [
            file("10-kind.conflist", bridge_list()),
            file("10-kind.conf", conf_naming_us),
            raw("10-kind.conflist", "{"),
        ] {
            assert_eq!(plan_uninstall(&untouched).unwrap(), None);
        }
        let lone = file(
            "00-x.conflist",
            json!({"name": "x", "plugins": [{"type": "intercept-cni"}]}),
        );
        assert_eq!(plan_uninstall(&lone).unwrap(), None);
    }
}
