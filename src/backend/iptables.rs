//! iptables backend: the plugin's own nat-table chains (`ICNI_INBOUND` from PREROUTING,
//! `ICNI_OUTBOUND` from OUTPUT, REDIRECT to the proxy), written with
//! `iptables-{legacy,nft}-restore --noflush`, one atomic restore per family.

mod chains;
mod detect;
mod modes;
mod netlink_removal;
mod render;
mod save;
mod tools;

pub use chains::{CHAIN_PREFIX, INBOUND_CHAIN, OUTBOUND_CHAIN};
pub use detect::{choose_mode, detect_mode, HostRules};

use super::nftables::listing;
use super::{Backend, BackendOptions, IptablesMode};
use crate::cni::error::{Code, Error, Result};
use crate::plan::InterceptPlan;
use chains::Family;
use save::NatTable;
use tools::{binary_name, Tool, Tools};

/// For GC: removes the lock files of namespaces that are gone (DEL found them gone and could not
/// tell which files were theirs); returns how many.
pub fn sweep_stale_lock_files() -> Result<usize> {
    let live = crate::netns::live_namespaces()
        .map_err(|e| Error::io("cannot list the live network namespaces", e))?;
    tools::sweep_lock_files(&live)
}

/// Whether `name` is one of the per-netns lock files (they share the default state dir).
pub fn is_lock_file_name(name: &str) -> bool {
    tools::lock_file_inode(name).is_some()
}

/// For STATUS: the IPv4 save/restore pair ADD would spawn exists (code 50 naming it otherwise).
pub fn restore_binaries_present(mode: IptablesMode, options: &BackendOptions) -> Result<()> {
    let tools = Tools {
        dir: options.iptables_path.as_deref(),
    };
    for tool in [Tool::Save, Tool::Restore] {
        tools
            .require(mode, Family::V4, tool)
            .map_err(|e| Error::new(Code::PluginNotAvailable, e.msg))?;
    }
    Ok(())
}

/// Drives `iptables-{legacy,nft}-restore`/`-save` (and the ip6tables pair) inside the pod netns.
/// What an ADD feeds the IPv4 and IPv6 restores in a netns that holds nothing of ours yet
/// (`None` for a family the plan leaves alone). The benchmark times the bare restores with
/// exactly this input.
pub fn fresh_restore_inputs(plan: &InterceptPlan) -> [Option<String>; 2] {
    let empty = vec![NatTable::default(); modes::EXTRA_TABLES.len()];
    Family::ALL.map(|family| {
        family
            .enabled_in(plan)
            .then(|| render_input(plan, family, &NatTable::default(), &empty))
    })
}

/// The restore input that installs `plan` for one family over its tables as they are: `nat`,
/// and `extra[k]` for `modes::EXTRA_TABLES[k]`. A table neither the plan nor an earlier ADD
/// uses adds nothing.
fn render_input(
    plan: &InterceptPlan,
    family: Family,
    nat: &NatTable,
    extra: &[NatTable],
) -> String {
    let mut input = render::apply_input(plan, family, nat);
    for (table, existing) in modes::EXTRA_TABLES.iter().zip(extra) {
        let (chains, hooks) = modes::table(plan, family, table);
        if chains.is_empty() {
            // Left from an earlier ADD with other modes, if anything.
            input += &render::remove_section(table, existing).unwrap_or_default();
        } else {
            input += &render::section(table, &chains, &hooks, existing);
        }
    }
    input
}

pub struct Iptables {
    mode: IptablesMode,
    options: BackendOptions,
}

impl Iptables {
    pub fn new(mode: IptablesMode, options: &BackendOptions) -> Self {
        Iptables {
            mode,
            options: options.clone(),
        }
    }

    fn tools(&self) -> Tools<'_> {
        Tools {
            dir: self.options.iptables_path.as_deref(),
        }
    }

    /// The restore input that installs `plan` for one family over what is there now
    /// (`present[t][family]`: whether table `TABLES[t]` exists, from `tools::tables_present`).
    /// A table is read only when it exists: a default ADD in a fresh netns spawns no -save.
    fn apply_input(
        &self,
        plan: &InterceptPlan,
        family: Family,
        present: &[[bool; 2]],
    ) -> Result<String> {
        let tools = self.tools();
        let i = family.index();
        let nat = match tools.read_nat_if(self.mode, family, present[0][i]) {
            // A rule made with `nft` that -save cannot print: ours go over netlink (with every
            // jump to them, that rule too if it is one), then the table is read again.
            Err(e) if self.mode == IptablesMode::Nft && e.code == Code::Backend => {
                log::warn!("{e}; removing ours over netlink, then reading again");
                netlink_removal::remove_own(family)?;
                tools.read_nat_if(self.mode, family, present[0][i])?
            }
            other => other?,
        };
        let extra = modes::EXTRA_TABLES
            .iter()
            .zip(&present[1..])
            .map(|(table, exists)| tools.read_table_if(self.mode, family, table, exists[i]))
            .collect::<Result<Vec<_>>>()?;
        Ok(render_input(plan, family, &nat, &extra))
    }

    /// Removes our chains and jumps of one mode and family, in every table, if there are any.
    /// When iptables-nft cannot read or write a table that holds rules made with `nft`, they go
    /// over netlink.
    fn remove_family(&self, mode: IptablesMode, family: Family) -> Result<()> {
        let tools = self.tools();
        let present = tools::tables_present(mode, &TABLES);
        let removed = (|| {
            let mut input = String::new();
            for (table, exists) in TABLES.iter().zip(&present) {
                if !exists[family.index()] {
                    continue;
                }
                let existing = tools.read_table_if(mode, family, table, true)?;
                input += &render::remove_section(table, &existing).unwrap_or_default();
            }
            match input.is_empty() {
                false => tools.restore(mode, family, &input),
                true => Ok(()),
            }
        })();
        match removed {
            Err(e) if mode == IptablesMode::Nft => {
                log::warn!("{e}; removing over netlink instead");
                netlink_removal::remove_own(family)
            }
            other => other,
        }
    }

    /// Removes one family's rules of both variants: the mode may have changed since ADD.
    fn remove_both_modes(&self, family: Family) -> Vec<Error> {
        let mut errors = Vec::new();
        for mode in [self.mode, self.other_mode()] {
            if !self.tools().present(mode, family) {
                if mode == self.mode {
                    // The configured variant must be there; name what is missing.
                    for tool in [Tool::Save, Tool::Restore] {
                        if let Err(e) = self.tools().require(mode, family, tool) {
                            errors.push(e);
                        }
                    }
                } else {
                    log::debug!(
                        "{} not installed; nothing of ours can be there",
                        binary_name(mode, family, Tool::Save)
                    );
                }
                continue;
            }
            if let Err(e) = self.remove_family(mode, family) {
                errors.push(e);
            }
        }
        errors
    }

    /// What CHECK warns about (it fails nothing): rules outside our nat jumps that take a
    /// connection past them. This variant's raw table turning connection tracking off on our
    /// hooks, and nftables chains (other than iptables-nft's own tables, judged through -save)
    /// that translate or untrack connections before ours.
    fn bypasses(&self) -> Vec<String> {
        let mut found = Vec::new();
        for family in Family::ALL {
            // Only tables that exist are listed: reading creates none.
            let Ok(text) = self.tools().save_all(self.mode, family) else {
                continue;
            };
            for chain in ["PREROUTING", "OUTPUT"] {
                for rule in save::notrack_rules(&text, chain) {
                    found.push(format!(
                        "{} raw table rule `-A {chain} {rule}` turns connection tracking off: \
                         the connections it matches are never NATed, so never intercepted",
                        family.label()
                    ));
                }
            }
        }
        // iptables-legacy's nat table runs beside iptables-nft's, at the same priority, and
        // nftables cannot see it.
        if self.mode == IptablesMode::Nft {
            let legacy = IptablesMode::Legacy;
            let present = tools::tables_present(legacy, &["nat"])[0];
            for family in Family::ALL.into_iter().filter(|f| present[f.index()]) {
                let Ok(table) = self.tools().read_nat_if(legacy, family, true) else {
                    continue;
                };
                for base in ["PREROUTING", "OUTPUT"] {
                    if let Some((number, rule)) = table.first_effective(base) {
                        found.push(format!(
                            "{} iptables-legacy nat rule {number} of {base} `{rule}` runs beside \
                             ours: connections it translates first are not intercepted",
                            family.label()
                        ));
                    }
                }
            }
        }
        let own_tables = |c: &listing::BaseChain| {
            self.mode == IptablesMode::Nft
                && matches!(c.family, listing::IPV4 | listing::IPV6)
                && matches!(c.table.as_str(), "nat" | "raw")
        };
        match listing::base_chains() {
            Ok(chains) => found.extend(listing::bypasses(&chains, own_tables)),
            Err(e) => log::debug!("{e}"),
        }
        found
    }

    fn other_mode(&self) -> IptablesMode {
        match self.mode {
            IptablesMode::Legacy => IptablesMode::Nft,
            IptablesMode::Nft => IptablesMode::Legacy,
        }
    }
}

/// Every table this backend writes to.
const TABLES: [&str; 3] = ["nat", modes::EXTRA_TABLES[0], modes::EXTRA_TABLES[1]];

impl Backend for Iptables {
    fn name(&self) -> &'static str {
        match self.mode {
            IptablesMode::Legacy => "iptables-legacy",
            IptablesMode::Nft => "iptables-nft",
        }
    }

    fn apply(&self, plan: &InterceptPlan) -> Result<()> {
        let _serialised = tools::lock_netns()?;
        let (enabled, disabled): (Vec<Family>, Vec<Family>) =
            Family::ALL.into_iter().partition(|f| f.enabled_in(plan));
        // The restores start first: each spends its first millisecond loading its libraries,
        // time in which the current rules are read and the input rendered. The families'
        // tables are separate, so the restores run side by side: a dual-stack ADD waits for
        // one restore, not two.
        // A restore dropped before it is fed is stopped unfed (`PendingRestore`).
        let pending = enabled
            .iter()
            .map(|&family| Ok((family, self.tools().spawn_restore(self.mode, family)?)))
            .collect::<Result<Vec<_>>>()?;
        let present = tools::tables_present(self.mode, &TABLES);
        // A family the pod no longer has keeps nothing from an earlier ADD.
        disabled
            .iter()
            .filter(|family| present.iter().any(|p| p[family.index()]))
            .try_for_each(|&family| self.remove_family(self.mode, family))?;
        let inputs = enabled
            .iter()
            .map(|&family| self.apply_input(plan, family, &present))
            .collect::<Result<Vec<String>>>()?;
        let mut started = Vec::new();
        let mut failed = Vec::new();
        for ((family, restore), input) in pending.into_iter().zip(&inputs) {
            // After a failure the rest are dropped unfed.
            if failed.is_empty() {
                match restore.feed(input) {
                    Ok(restore) => started.push((family, restore)),
                    Err(e) => failed.push(e),
                }
            }
        }
        let mut applied = Vec::new();
        for (family, restore) in started {
            match restore.finish() {
                Ok(()) => applied.push(family),
                Err(e) => failed.push(e),
            }
        }
        if let Some(e) = Error::collect(failed) {
            // Each restore is atomic; undo the families done so ADD is all or nothing.
            for &done in &applied {
                if let Err(undo) = self.remove_family(self.mode, done) {
                    log::warn!("cannot undo {} rules: {undo}", done.label());
                }
            }
            return Err(e);
        }
        log::debug!("{}: interception rules applied", self.name());
        Ok(())
    }

    fn check(&self, plan: &InterceptPlan) -> Result<()> {
        let _serialised = tools::lock_netns()?;
        let mut drift = Vec::new();
        for warning in self.bypasses() {
            log::warn!("{}: {warning}", self.name());
        }
        let present = tools::tables_present(self.mode, &TABLES);
        for family in Family::ALL {
            let enabled = family.enabled_in(plan);
            for (table, exists) in TABLES.iter().zip(&present) {
                let (chains, hooks) = match (enabled, *table) {
                    (false, _) => (Vec::new(), Vec::new()),
                    (true, "nat") => (render::chains(plan, family), render::nat_hooks(plan)),
                    (true, table) => modes::table(plan, family, table),
                };
                let existing =
                    self.tools()
                        .read_table_if(self.mode, family, table, exists[family.index()])?;
                let found = save::drift(&chains, &hooks, &existing, family);
                drift.extend(found.into_iter().map(|d| match *table {
                    "nat" => d,
                    table => format!("{table}: {d}"),
                }));
            }
        }
        match drift.first() {
            None => Ok(()),
            Some(first) => Err(Error::new(
                Code::Drift,
                format!("{} interception rules drifted: {first}", self.name()),
            )
            .with_details(drift.join("; "))),
        }
    }

    fn remove(&self) -> Result<()> {
        let _serialised = tools::lock_netns()?;
        // The families' tables are separate, so each is cleaned on its own thread (a thread
        // starts in its creator's netns): DEL waits for one family's save and restore, not two.
        let mut errors: Vec<Error> = std::thread::scope(|s| {
            let workers = Family::ALL.map(|family| s.spawn(move || self.remove_both_modes(family)));
            workers
                .into_iter()
                .flat_map(|worker| {
                    worker.join().unwrap_or_else(|_| {
                        vec![Error::new(
                            Code::Internal,
                            "internal error while removing iptables rules",
                        )]
                    })
                })
                .collect()
        });
        // The lock files go once the rules are gone (after both families are done).
        if let Err(e) = tools::remove_lock_file() {
            errors.push(e);
        }
        Error::collect(errors).map_or(Ok(()), Err)
    }

    fn installed(&self) -> Result<bool> {
        // What DEL would have to remove is what counts as installed.
        let present = tools::tables_present(self.mode, &TABLES);
        for family in Family::ALL {
            if !self.tools().present(self.mode, family) {
                continue;
            }
            for (table, exists) in TABLES.iter().zip(&present) {
                if exists[family.index()] {
                    let existing = self.tools().read_table_if(self.mode, family, table, true)?;
                    if render::remove_section(table, &existing).is_some() {
                        return Ok(true);
                    }
                }
            }
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Families;

    #[test]
    fn fresh_inputs_are_the_golden_renderings_per_family() {
        let both = InterceptPlan::with_defaults(Families::BOTH);
        let [v4, v6] = fresh_restore_inputs(&both);
        chains::assert_golden("defaults-v4.rules", &v4.unwrap());
        chains::assert_golden("defaults-v6.rules", &v6.unwrap());
        let ipv4_only = InterceptPlan::with_defaults(Families {
            ipv4: true,
            ipv6: false,
        });
        assert!(fresh_restore_inputs(&ipv4_only)[1].is_none());
    }
}
