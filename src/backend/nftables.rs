//! nftables backend: one table owned by the plugin, `table inet intercept-cni`, programmed
//! in-process over netlink (rustables) and sent as one atomic batch. Nothing else in the
//! namespace is touched.
//!
//! The plan is first turned into a small, pure [`Ruleset`] (our own matches and actions), which
//! renders two ways: rustables expressions for the kernel, and nft-syntax text equal to what
//! `nft list table inet intercept-cni` prints (golden files, demo, CHECK messages). For the default
//! dual-stack plan the table is:
//!
//! ```text
//! table inet intercept-cni {
//!     chain prerouting {
//!         type nat hook prerouting priority dstnat; policy accept;
//!         tcp dport 15006 return
//!         tcp dport 15001 return
//!         meta l4proto tcp dnat ip to ip daddr:15006
//!         meta l4proto tcp dnat ip6 to ip6 daddr:15006
//!     }
//!
//!     chain output {
//!         type nat hook output priority -100; policy accept;
//!         meta skuid 1337 return
//!         ip daddr 127.0.0.0/8 return
//!         ip6 daddr ::1 return
//!         meta l4proto tcp meta nfproto ipv4 dnat ip to 127.0.0.1:15001
//!         meta l4proto tcp meta nfproto ipv6 dnat ip6 to [::1]:15001
//!     }
//! }
//! ```
//!
//! Both chains are nat base chains, so they see only the first packet of each connection;
//! conntrack applies the translation to the rest and keeps the original destination for
//! `SO_ORIGINAL_DST`. rustables 0.9 has no `redirect` expression, so REDIRECT is spelled as DNAT:
//! inbound to the packet's own destination address (loaded from the header) with the proxy's
//! port, outbound to loopback with the proxy's port. Exclusions come first as `return` rules;
//! included ports and CIDRs select the DNAT rules themselves. Rules are only written for the
//! families the pod has addresses in; `InboundPorts::None` leaves out the prerouting chain.
//!
//! A port or CIDR list of one entry is a plain comparison; a longer one is a named interval set
//! (`sets`, hand-encoded through `wire` since rustables 0.9 cannot send interval elements)
//! looked up by one rule, so the rule count stays constant however long the lists are. Sets go
//! into the same batch, before the rules that use them.
//!
//! `apply` sends one batch: a first ADD only creates the table; when the table already exists
//! the batch is "add, delete, add table + sets + chains + rules", replacing it atomically.
//! `check` dumps tables, chains, rules, sets and set elements and compares every expression and
//! element with what `apply` would send.
//! `remove` deletes the table; an absent table is success.

pub(crate) mod listing;
mod sets;
pub(crate) mod transport;
mod wire;

use super::Backend;
use crate::cni::error::{Code, Error, Result};
use crate::plan::{InboundPorts, InterceptPlan, OutboundCidrs, PortRange};
use ipnetwork::IpNetwork;
use nix::errno::Errno;
use nix::libc;
use rustables::error::QueryError;
use rustables::expr::{
    Bitwise, Cmp, CmpOp, HighLevelPayload, IPv4HeaderField, IPv6HeaderField, Immediate, Lookup,
    Meta, MetaType, Nat, NatType, NetworkHeaderField, RawExpression, Register, TCPHeaderField,
    TransportHeaderField, VerdictKind,
};
use rustables::{
    sys, Batch, Chain, ChainPolicy, ChainType, Hook, HookClass, MsgType, ProtocolFamily,
};
use sets::{KeyKind, SetSpec};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use transport::{Existing, Failure};

/// The one table this plugin owns in each pod netns (family inet).
pub const TABLE_NAME: &str = "intercept-cni";

/// Priority of both nat chains: where iptables' nat table sits (NF_IP_PRI_NAT_DST).
const NAT_PRIORITY: i32 = -100;

/// Programs the plugin's own nftables table over netlink (no `nft` binary needed).
pub struct Nftables;

impl Backend for Nftables {
    fn name(&self) -> &'static str {
        "nftables"
    }

    fn apply(&self, plan: &InterceptPlan) -> Result<()> {
        let ruleset = Ruleset::from_plan(plan);
        // Optimistic: the batch that creates the table fails as a whole when the table is
        // already there (a repeated ADD), and only then comes the batch that replaces it.
        // Replacing means deleting a hooked table, for which the kernel waits a grace period
        // (~10-15 ms), so a first ADD never does it; asking first would cost a round trip.
        let (create, steps) = ruleset.apply_batch(false)?;
        match transport::send(create.finalize(), Existing::Refuse) {
            Ok(()) => {
                log::debug!("nftables: created table inet {TABLE_NAME}");
                return Ok(());
            }
            Err(Failure::Refused {
                seq: 1,
                errno: Errno::EEXIST,
            }) => {}
            Err(f) => {
                return Err(batch_error(
                    "cannot install the nftables ruleset",
                    f,
                    &steps,
                ))
            }
        }
        let (replace, steps) = ruleset.apply_batch(true)?;
        log::debug!("nftables: table inet {TABLE_NAME} exists; replacing it");
        transport::send(replace.finalize(), Existing::AsBatched)
            .map_err(|f| batch_error("cannot install the nftables ruleset", f, &steps))
    }

    fn check(&self, plan: &InterceptPlan) -> Result<()> {
        let drift = Ruleset::from_plan(plan).drift()?;
        if drift.is_empty() {
            return Ok(());
        }
        Err(Error::new(
            Code::Drift,
            format!(
                "nftables table inet {TABLE_NAME} differs from the plan: {}",
                drift.join("; ")
            ),
        ))
    }

    fn remove(&self) -> Result<()> {
        // An aborted delete waits for the same grace period as a real one: look first.
        if !our_table_exists()? {
            return Ok(());
        }
        let mut batch = Batch::new();
        batch.add(&table(), MsgType::Del);
        match batch.send() {
            Ok(()) => Ok(()),
            // Already gone: DEL is idempotent.
            Err(QueryError::NetlinkError(e)) if e.error == libc::ENOENT => Ok(()),
            Err(e) => Err(kernel_error(
                "cannot delete the nftables table",
                e,
                &[Step::Table],
            )),
        }
    }

    fn installed(&self) -> Result<bool> {
        our_table_exists()
    }
}

/// Whether the plugin's table is in the current netns: a table dump costs tens of
/// microseconds, while a batch touching a hooked table waits ~10-15 ms for the kernel even when
/// it aborts.
fn our_table_exists() -> Result<bool> {
    Ok(rustables::list_tables()
        .map_err(|e| kernel_error("cannot list nftables tables", e, &[]))?
        .iter()
        .any(is_our_table))
}

/// The nft-syntax text of the table `apply(plan)` installs, as `nft list table` prints it.
pub fn render_text(plan: &InterceptPlan) -> String {
    Ruleset::from_plan(plan).to_string()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    fn of(addr: IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::Ipv4,
            IpAddr::V6(_) => Family::Ipv6,
        }
    }

    fn enabled(plan: &InterceptPlan) -> Vec<Family> {
        let mut families = Vec::new();
        if plan.families.ipv4 {
            families.push(Family::Ipv4);
        }
        if plan.families.ipv6 {
            families.push(Family::Ipv6);
        }
        families
    }

    /// The `ip`/`ip6` keyword of nft syntax.
    fn keyword(self) -> &'static str {
        match self {
            Family::Ipv4 => "ip",
            Family::Ipv6 => "ip6",
        }
    }

    fn nfproto(self) -> ProtocolFamily {
        match self {
            Family::Ipv4 => ProtocolFamily::Ipv4,
            Family::Ipv6 => ProtocolFamily::Ipv6,
        }
    }

    fn loopback(self) -> IpNetwork {
        match self {
            Family::Ipv4 => IpNetwork::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), 8),
            Family::Ipv6 => IpNetwork::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 128),
        }
        .unwrap_or_else(|_| unreachable!("constant prefixes are valid"))
    }

    fn pick(self, v4: &'static str, v6: &'static str) -> &'static str {
        match self {
            Family::Ipv4 => v4,
            Family::Ipv6 => v6,
        }
    }

    fn key(self) -> KeyKind {
        match self {
            Family::Ipv4 => KeyKind::Ipv4,
            Family::Ipv6 => KeyKind::Ipv6,
        }
    }

    fn localhost(self) -> IpAddr {
        match self {
            Family::Ipv4 => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Family::Ipv6 => IpAddr::V6(Ipv6Addr::LOCALHOST),
        }
    }
}

/// One condition of a rule. Each carries the protocol dependency its header load needs, the way
/// nft adds one implicitly, so every rule is correct on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Match {
    /// `meta l4proto tcp`
    Tcp,
    /// `meta nfproto ipv4`
    Family(Family),
    /// `tcp dport 80`, `tcp dport 8000-8100`
    TcpDport(PortRange),
    /// `ip saddr 10.0.0.0/8`
    Saddr(IpNetwork),
    /// `ip6 daddr ::1`
    Daddr(IpNetwork),
    /// `meta skuid 1337`
    SkUid(u32),
    /// `meta skgid 1337`
    SkGid(u32),
    /// `tcp dport @name`
    TcpDportIn(&'static str),
    /// `ip saddr @name`, `ip6 daddr @name`
    AddrIn {
        family: Family,
        source: bool,
        set: &'static str,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    /// Leave this chain: the connection is not intercepted.
    Return,
    /// REDIRECT for arriving traffic: DNAT to the packet's own destination address, new port.
    DnatOwnDaddr { family: Family, port: u16 },
    /// REDIRECT for local traffic: DNAT to loopback and the proxy's port.
    DnatTo { addr: IpAddr, port: u16 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct RuleSpec {
    matches: Vec<Match>,
    action: Action,
}

impl RuleSpec {
    fn new(matches: Vec<Match>, action: Action) -> Self {
        RuleSpec { matches, action }
    }

    fn ret(matches: Vec<Match>) -> Self {
        RuleSpec::new(matches, Action::Return)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NatHook {
    Prerouting,
    Output,
}

impl NatHook {
    fn name(self) -> &'static str {
        match self {
            NatHook::Prerouting => "prerouting",
            NatHook::Output => "output",
        }
    }

    fn class(self) -> HookClass {
        match self {
            NatHook::Prerouting => HookClass::PreRouting,
            NatHook::Output => HookClass::Out,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ChainSpec {
    name: &'static str,
    hook: NatHook,
    rules: Vec<RuleSpec>,
}

/// Everything the plugin installs, in order: the pure model both renderings come from.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ruleset {
    sets: Vec<SetSpec>,
    chains: Vec<ChainSpec>,
}

/// The sets a ruleset needs, made while its rules are: a list of one entry stays a plain
/// comparison, a longer one becomes a set matched by one lookup.
#[derive(Default)]
struct Lists(Vec<SetSpec>);

impl Lists {
    fn ports(&mut self, name: &'static str, ranges: &[PortRange]) -> Option<Match> {
        match ranges {
            [] => None,
            [range] => Some(Match::TcpDport(*range)),
            _ => {
                self.0.push(SetSpec::ports(name, ranges));
                Some(Match::TcpDportIn(name))
            }
        }
    }

    /// The match for the networks of `family` among `nets` (others can never match).
    fn addrs(
        &mut self,
        name: &'static str,
        family: Family,
        source: bool,
        nets: &[IpNetwork],
    ) -> Option<Match> {
        let mut mine = nets.iter().filter(|n| Family::of(n.ip()) == family);
        match (mine.next(), mine.next()) {
            (None, _) => None,
            (Some(&net), None) if source => Some(Match::Saddr(net)),
            (Some(&net), None) => Some(Match::Daddr(net)),
            _ => {
                self.0.push(SetSpec::nets(name, family.key(), nets));
                Some(Match::AddrIn {
                    family,
                    source,
                    set: name,
                })
            }
        }
    }
}

impl Ruleset {
    fn from_plan(plan: &InterceptPlan) -> Ruleset {
        let families = Family::enabled(plan);
        let mut sets = Lists::default();
        let mut chains = Vec::new();

        // Inbound.
        if plan.inbound_ports != InboundPorts::None {
            let mut rules = Vec::new();
            let mut own_ports = vec![plan.inbound_port, plan.outbound_port];
            own_ports.dedup();
            for port in own_ports {
                if let Ok(range) = PortRange::single(port) {
                    rules.push(RuleSpec::ret(vec![Match::TcpDport(range)]));
                }
            }
            for &family in &families {
                let name = family.pick("in_excluded_sources_v4", "in_excluded_sources_v6");
                if let Some(m) = sets.addrs(name, family, true, &plan.exclude_inbound_sources) {
                    rules.push(RuleSpec::ret(vec![m]));
                }
            }
            let redirect = |family| Action::DnatOwnDaddr {
                family,
                port: plan.inbound_port,
            };
            match &plan.inbound_ports {
                InboundPorts::AllExcept(excluded) => {
                    if let Some(m) = sets.ports("in_excluded_ports", excluded) {
                        rules.push(RuleSpec::ret(vec![m]));
                    }
                    for &family in &families {
                        rules.push(RuleSpec::new(vec![Match::Tcp], redirect(family)));
                    }
                }
                InboundPorts::Only(included) => {
                    if let Some(m) = sets.ports("in_included_ports", included) {
                        for &family in &families {
                            rules.push(RuleSpec::new(vec![m.clone()], redirect(family)));
                        }
                    }
                }
                InboundPorts::None => {}
            }
            chains.push(ChainSpec {
                name: "prerouting",
                hook: NatHook::Prerouting,
                rules,
            });
        }

        // Outbound.
        let mut rules = vec![RuleSpec::ret(vec![Match::SkUid(plan.proxy_uid)])];
        if let Some(gid) = plan.proxy_gid {
            rules.push(RuleSpec::ret(vec![Match::SkGid(gid)]));
        }
        for &family in &families {
            rules.push(RuleSpec::ret(vec![Match::Daddr(family.loopback())]));
        }
        if let Some(m) = sets.ports("out_excluded_ports", &plan.exclude_outbound_ports) {
            rules.push(RuleSpec::ret(vec![m]));
        }
        let redirect = |family: Family| Action::DnatTo {
            addr: family.localhost(),
            port: plan.outbound_port,
        };
        let (include, exclude) = match &plan.outbound_cidrs {
            OutboundCidrs::AllExcept(excluded) => (None, excluded),
            OutboundCidrs::Only { include, exclude } => (Some(include), exclude),
        };
        for &family in &families {
            let name = family.pick("out_excluded_v4", "out_excluded_v6");
            if let Some(m) = sets.addrs(name, family, false, exclude) {
                rules.push(RuleSpec::ret(vec![m]));
            }
        }
        for &family in &families {
            match include {
                None => rules.push(RuleSpec::new(
                    vec![Match::Tcp, Match::Family(family)],
                    redirect(family),
                )),
                Some(include) => {
                    let name = family.pick("out_included_v4", "out_included_v6");
                    if let Some(m) = sets.addrs(name, family, false, include) {
                        rules.push(RuleSpec::new(vec![Match::Tcp, m], redirect(family)));
                    }
                }
            }
        }
        chains.push(ChainSpec {
            name: "output",
            hook: NatHook::Output,
            rules,
        });
        Ruleset {
            sets: sets.0,
            chains,
        }
    }

    /// The one batch that installs the table, atomically. With `replace`, it starts with add
    /// (so the delete cannot fail even if the table just vanished) and delete, then builds the
    /// table again from scratch. `steps[i]` describes the message with sequence `i + 1`.
    fn apply_batch(&self, replace: bool) -> Result<(wire::Batch, Vec<Step>)> {
        let table = table();
        let mut batch = wire::Batch::new();
        let mut steps = Vec::new();
        if replace {
            batch.add(&table, MsgType::Add);
            steps.push(Step::Table);
            batch.add(&table, MsgType::Del);
            steps.push(Step::Table);
        }
        batch.add(&table, MsgType::Add);
        steps.push(Step::Table);
        // Sets and their elements before the rules that look them up (a constant set takes
        // no elements once a rule is bound to it).
        for (id, set) in (1..).zip(&self.sets) {
            set.messages(id, |msg| {
                batch.push(msg);
                steps.push(Step::Set(set.name));
            });
        }
        for spec in &self.chains {
            let chain = spec.to_chain();
            batch.add(&chain, MsgType::Add);
            steps.push(Step::Chain(spec.name));
            for (index, rule) in spec.rules.iter().enumerate() {
                batch.add(&rule.to_rule(&chain)?, MsgType::Add);
                steps.push(Step::Rule {
                    chain: spec.name,
                    index,
                    rule: rule.clone(),
                });
            }
        }
        Ok((batch, steps))
    }
}

impl Ruleset {
    /// Reads the table back over netlink and lists every difference from this ruleset.
    fn drift(&self) -> Result<Vec<String>> {
        let listing = |e| kernel_error("cannot list the nftables ruleset", e, &[]);
        let Some(installed) = rustables::list_tables()
            .map_err(listing)?
            .into_iter()
            .find(is_our_table)
        else {
            return Ok(vec![format!("table inet {TABLE_NAME} is missing")]);
        };
        let mut drift = Vec::new();
        if installed
            .get_flags()
            .is_some_and(|flags| flags & TABLE_F_DORMANT != 0)
        {
            drift.push("the table is dormant".to_string());
        }
        let chains: Vec<Chain> = rustables::list_chains_for_table(&installed)
            .map_err(listing)?
            .into_iter()
            .filter(is_inet_chain)
            .collect();
        // One dump of every rule in the namespace, not one per chain: a filtered dump stops at
        // the first table of that name, whatever its family (an `ip intercept-cni` would hide ours).
        let mut all_rules = Vec::new();
        rustables::query::list_objects_with_data(
            libc::NFT_MSG_GETRULE as u16,
            &|rule: rustables::Rule, rules: &mut Vec<rustables::Rule>| {
                rules.push(rule);
                Ok(())
            },
            None,
            &mut all_rules,
        )
        .map_err(listing)?;
        let raw = listing::base_chains()?;
        let is_ours = |c: &listing::BaseChain| c.family == listing::INET && c.table == TABLE_NAME;
        for warning in listing::bypasses(&raw, is_ours) {
            log::warn!("nftables: {warning}");
        }
        for spec in &self.chains {
            let want = spec.to_chain();
            let Some(found) = chains.iter().find(|c| c.get_name() == want.get_name()) else {
                drift.push(format!("chain {} is missing", spec.name));
                continue;
            };
            // The policy as the kernel sent it: rustables reads NF_DROP back as accept.
            let policy = raw
                .iter()
                .find(|c| is_ours(c) && c.name == spec.name)
                .and_then(|c| c.policy);
            if found.get_hook() != want.get_hook()
                || found.get_type() != want.get_type()
                || policy != Some(listing::NF_ACCEPT)
            {
                drift.push(format!(
                    "chain {} is not a nat chain at {} priority {NAT_PRIORITY} with policy accept",
                    spec.name,
                    spec.hook.name()
                ));
            }
            let rules: Vec<&rustables::Rule> = all_rules
                .iter()
                .filter(|r| is_inet_rule(r, &want))
                .collect();
            for (index, rule) in spec.rules.iter().enumerate() {
                let expected = rule.to_rule(&want)?;
                match rules.get(index) {
                    None => drift.push(format!(
                        "chain {} rule {} is missing (`{rule}`)",
                        spec.name,
                        index + 1
                    )),
                    Some(found) if found.get_expressions() != expected.get_expressions() => drift
                        .push(format!(
                            "chain {} rule {} differs from `{rule}`",
                            spec.name,
                            index + 1
                        )),
                    Some(_) => {}
                }
            }
            if rules.len() > spec.rules.len() {
                drift.push(format!(
                    "chain {} has {} extra rule(s) after rule {}",
                    spec.name,
                    rules.len() - spec.rules.len(),
                    spec.rules.len()
                ));
            }
        }
        for chain in &chains {
            let name = chain.get_name().map_or("", String::as_str);
            if !self.chains.iter().any(|spec| spec.name == name) {
                drift.push(format!("unexpected chain {name}"));
            }
        }
        drift.extend(self.set_drift()?);
        Ok(drift)
    }

    /// Compares the table's sets, and every element, with this ruleset's.
    fn set_drift(&self) -> Result<Vec<String>> {
        let listing = |f| batch_error("cannot list the nftables sets", f, &[]);
        let mut request = wire::Msg::new(sys::NFT_MSG_GETSET as u16, ProtocolFamily::Inet, 0);
        request.str(sys::NFTA_SET_TABLE, TABLE_NAME);
        let mut drift = Vec::new();
        let mut seen = Vec::new();
        for set in transport::dump(request).map_err(listing)? {
            let name = wire::attr_str(&set, sys::NFTA_SET_NAME).unwrap_or("");
            let Some(spec) = self.sets.iter().find(|s| s.name == name) else {
                drift.push(format!("unexpected set {name}"));
                continue;
            };
            seen.push(spec.name);
            let flags = wire::attr_be32(&set, sys::NFTA_SET_FLAGS);
            let key_len = wire::attr_be32(&set, sys::NFTA_SET_KEY_LEN);
            if flags != Some(sets::SET_FLAGS) || key_len != Some(spec.key.len() as u32) {
                drift.push(format!(
                    "set {name} is not a constant interval set of its type"
                ));
                continue;
            }
            let mut request =
                wire::Msg::new(sys::NFT_MSG_GETSETELEM as u16, ProtocolFamily::Inet, 0);
            request
                .str(sys::NFTA_SET_ELEM_LIST_TABLE, TABLE_NAME)
                .str(sys::NFTA_SET_ELEM_LIST_SET, name);
            let mut elements = Vec::new();
            for part in transport::dump(request).map_err(listing)? {
                let Some(list) = wire::attr(&part, sys::NFTA_SET_ELEM_LIST_ELEMENTS) else {
                    continue;
                };
                for (_, elem) in wire::attrs(list) {
                    match sets::decode_element(elem, spec.key) {
                        Some(e) => elements.push(e),
                        None => drift.push(format!("set {name} holds a malformed element")),
                    }
                }
            }
            let (missing, extra) = spec.differences(&elements);
            if !missing.is_empty() {
                drift.push(format!("set {name} lacks {}", few(&missing)));
            }
            if !extra.is_empty() {
                drift.push(format!("set {name} has extra {}", few(&extra)));
            }
        }
        for spec in &self.sets {
            if !seen.contains(&spec.name) {
                drift.push(format!("set {} is missing", spec.name));
            }
        }
        Ok(drift)
    }
}

/// The first few items of a list, and how many more.
fn few(items: &[String]) -> String {
    const SHOWN: usize = 5;
    let mut text = items[..items.len().min(SHOWN)].join(", ");
    if items.len() > SHOWN {
        text.push_str(&format!(" and {} more", items.len() - SHOWN));
    }
    text
}

/// NFT_TABLE_F_DORMANT: the table exists but none of its chains are hooked.
const TABLE_F_DORMANT: u32 = 1;

// rustables keeps an object's family private; a listed object is inet when it equals a copy of
// itself built in the inet table.

fn is_our_table(listed: &rustables::Table) -> bool {
    let mut probe = table();
    if let Some(flags) = listed.get_flags() {
        probe.set_flags(*flags);
    }
    if let Some(userdata) = listed.get_userdata() {
        probe.set_userdata(userdata.clone());
    }
    *listed == probe
}

fn is_inet_chain(listed: &Chain) -> bool {
    let mut probe = Chain::new(&table());
    if let Some(name) = listed.get_name() {
        probe.set_name(name.as_str());
    }
    if let Some(hook) = listed.get_hook() {
        probe.set_hook(hook.clone());
    }
    if let Some(policy) = listed.get_policy() {
        probe.set_policy(*policy);
    }
    if let Some(kind) = listed.get_type() {
        probe.set_type(*kind);
    }
    if let Some(flags) = listed.get_flags() {
        probe.set_flags(*flags);
    }
    if let Some(userdata) = listed.get_userdata() {
        probe.set_userdata(userdata.clone());
    }
    *listed == probe
}

fn is_inet_rule(listed: &rustables::Rule, chain: &Chain) -> bool {
    let Ok(mut probe) = rustables::Rule::new(chain) else {
        return false;
    };
    if let Some(handle) = listed.get_handle() {
        probe.set_handle(*handle);
    }
    if let Some(exprs) = listed.get_expressions() {
        probe.set_expressions(exprs.clone());
    }
    if let Some(position) = listed.get_position() {
        probe.set_position(*position);
    }
    if let Some(userdata) = listed.get_userdata() {
        probe.set_userdata(userdata.clone());
    }
    if let Some(id) = listed.get_id() {
        probe.set_id(*id);
    }
    *listed == probe
}

fn table() -> rustables::Table {
    rustables::Table::new(ProtocolFamily::Inet).with_name(TABLE_NAME)
}

impl ChainSpec {
    fn to_chain(&self) -> Chain {
        Chain::new(&table())
            .with_name(self.name)
            .with_hook(Hook::new(self.hook.class(), NAT_PRIORITY))
            .with_type(ChainType::Nat)
            .with_policy(ChainPolicy::Accept)
    }
}

impl RuleSpec {
    fn to_rule(&self, chain: &Chain) -> Result<rustables::Rule> {
        let mut rule = rustables::Rule::new(chain)
            .map_err(|e| Error::backend(format!("cannot build an nftables rule: {e}")))?;
        for m in &self.matches {
            for expr in m.expressions()? {
                rule.add_expr(expr);
            }
        }
        for expr in self.action.expressions() {
            rule.add_expr(expr);
        }
        Ok(rule)
    }
}

fn meta_eq(key: MetaType, value: impl Into<Vec<u8>>) -> [RawExpression; 2] {
    [Meta::new(key).into(), Cmp::new(CmpOp::Eq, value).into()]
}

fn nfproto_eq(family: Family) -> [RawExpression; 2] {
    meta_eq(MetaType::NfProto, [family.nfproto() as u8])
}

fn ip_bytes(addr: IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// Loads the source or destination address of the packet into register 1.
fn load_addr(family: Family, source: bool) -> RawExpression {
    let field = match (family, source) {
        (Family::Ipv4, true) => NetworkHeaderField::IPv4(IPv4HeaderField::Saddr),
        (Family::Ipv4, false) => NetworkHeaderField::IPv4(IPv4HeaderField::Daddr),
        (Family::Ipv6, true) => NetworkHeaderField::IPv6(IPv6HeaderField::Saddr),
        (Family::Ipv6, false) => NetworkHeaderField::IPv6(IPv6HeaderField::Daddr),
    };
    HighLevelPayload::Network(field).build().into()
}

/// Loads the TCP destination port into register 1.
fn load_dport() -> RawExpression {
    HighLevelPayload::Transport(TransportHeaderField::Tcp(TCPHeaderField::Dport))
        .build()
        .into()
}

/// Matches when register 1 is in the named set.
fn lookup(set: &str) -> RawExpression {
    Lookup::default()
        .with_set(set)
        .with_sreg(Register::Reg1)
        .into()
}

impl Match {
    fn expressions(&self) -> Result<Vec<RawExpression>> {
        let tcp = || meta_eq(MetaType::L4Proto, [libc::IPPROTO_TCP as u8]);
        Ok(match self {
            Match::Tcp => tcp().into(),
            Match::Family(family) => nfproto_eq(*family).into(),
            Match::TcpDportIn(set) => {
                let mut exprs = tcp().to_vec();
                exprs.push(load_dport());
                exprs.push(lookup(set));
                exprs
            }
            Match::AddrIn {
                family,
                source,
                set,
            } => {
                let mut exprs = nfproto_eq(*family).to_vec();
                exprs.push(load_addr(*family, *source));
                exprs.push(lookup(set));
                exprs
            }
            Match::TcpDport(range) => {
                let mut exprs = tcp().to_vec();
                exprs.push(load_dport());
                if range.is_single() {
                    exprs.push(Cmp::new(CmpOp::Eq, range.start().to_be_bytes()).into());
                } else {
                    // Big-endian bytes compare (memcmp) in numeric order.
                    exprs.push(Cmp::new(CmpOp::Gte, range.start().to_be_bytes()).into());
                    exprs.push(Cmp::new(CmpOp::Lte, range.end().to_be_bytes()).into());
                }
                exprs
            }
            Match::Saddr(net) | Match::Daddr(net) => {
                let family = Family::of(net.ip());
                let mut exprs = nfproto_eq(family).to_vec();
                exprs.push(load_addr(family, matches!(self, Match::Saddr(_))));
                if net.prefix() < max_prefix(net) {
                    let mask = ip_bytes(net.mask());
                    let zero = vec![0u8; mask.len()];
                    let bitwise = Bitwise::new(mask, zero).map_err(|e| {
                        Error::backend(format!("cannot build a prefix match for {net}: {e}"))
                    })?;
                    exprs.push(bitwise.into());
                }
                exprs.push(Cmp::new(CmpOp::Eq, ip_bytes(net.network())).into());
                exprs
            }
            // The kernel keeps socket UIDs and GIDs in host byte order.
            Match::SkUid(uid) => meta_eq(MetaType::SkUid, uid.to_ne_bytes()).into(),
            Match::SkGid(gid) => meta_eq(MetaType::SkGid, gid.to_ne_bytes()).into(),
        })
    }
}

fn max_prefix(net: &IpNetwork) -> u8 {
    match net {
        IpNetwork::V4(_) => 32,
        IpNetwork::V6(_) => 128,
    }
}

impl Action {
    fn expressions(&self) -> Vec<RawExpression> {
        // DNAT reads the address from register 1 and the port (2 bytes, big-endian) from 2.
        let dnat = |family: Family, port: u16| -> [RawExpression; 2] {
            [
                Immediate::new_data(port.to_be_bytes().to_vec(), Register::Reg2).into(),
                Nat::default()
                    .with_nat_type(NatType::DNat)
                    .with_family(family.nfproto())
                    .with_ip_register(Register::Reg1)
                    .with_port_register(Register::Reg2)
                    .into(),
            ]
        };
        match self {
            Action::Return => vec![Immediate::new_verdict(VerdictKind::Return).into()],
            Action::DnatOwnDaddr { family, port } => {
                let mut exprs = nfproto_eq(*family).to_vec();
                exprs.push(load_addr(*family, false));
                exprs.extend(dnat(*family, *port));
                exprs
            }
            Action::DnatTo { addr, port } => {
                let mut exprs = vec![Immediate::new_data(ip_bytes(*addr), Register::Reg1).into()];
                exprs.extend(dnat(Family::of(*addr), *port));
                exprs
            }
        }
    }
}

/// Prints a network the way nft does: no `/32` or `/128` on a single address.
fn fmt_net(f: &mut fmt::Formatter<'_>, net: &IpNetwork) -> fmt::Result {
    if net.prefix() == max_prefix(net) {
        write!(f, "{}", net.ip())
    } else {
        write!(f, "{}/{}", net.network(), net.prefix())
    }
}

impl fmt::Display for Match {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Match::Tcp => write!(f, "meta l4proto tcp"),
            Match::Family(Family::Ipv4) => write!(f, "meta nfproto ipv4"),
            Match::Family(Family::Ipv6) => write!(f, "meta nfproto ipv6"),
            Match::TcpDport(range) => write!(f, "tcp dport {range}"),
            Match::Saddr(net) | Match::Daddr(net) => {
                let dir = if matches!(self, Match::Saddr(_)) {
                    "saddr"
                } else {
                    "daddr"
                };
                write!(f, "{} {dir} ", Family::of(net.ip()).keyword())?;
                fmt_net(f, net)
            }
            Match::SkUid(uid) => write!(f, "meta skuid {uid}"),
            Match::SkGid(gid) => write!(f, "meta skgid {gid}"),
            Match::TcpDportIn(set) => write!(f, "tcp dport @{set}"),
            Match::AddrIn {
                family,
                source,
                set,
            } => {
                let dir = if *source { "saddr" } else { "daddr" };
                write!(f, "{} {dir} @{set}", family.keyword())
            }
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Return => write!(f, "return"),
            Action::DnatOwnDaddr { family, port } => {
                let kw = family.keyword();
                write!(f, "dnat {kw} to {kw} daddr:{port}")
            }
            Action::DnatTo {
                addr: IpAddr::V4(a),
                port,
            } => write!(f, "dnat ip to {a}:{port}"),
            Action::DnatTo {
                addr: IpAddr::V6(a),
                port,
            } => write!(f, "dnat ip6 to [{a}]:{port}"),
        }
    }
}

impl fmt::Display for RuleSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for m in &self.matches {
            write!(f, "{m} ")?;
        }
        write!(f, "{}", self.action)
    }
}

impl fmt::Display for Ruleset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "table inet {TABLE_NAME} {{")?;
        for set in &self.sets {
            writeln!(f, "{set}")?;
        }
        for (i, chain) in self.chains.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            // nft names priority -100 `dstnat` only at prerouting.
            let priority = match chain.hook {
                NatHook::Prerouting => "dstnat".to_string(),
                NatHook::Output => NAT_PRIORITY.to_string(),
            };
            let hook = chain.hook.name();
            writeln!(f, "\tchain {} {{", chain.name)?;
            writeln!(
                f,
                "\t\ttype nat hook {hook} priority {priority}; policy accept;"
            )?;
            for rule in &chain.rules {
                writeln!(f, "\t\t{rule}")?;
            }
            writeln!(f, "\t}}")?;
        }
        writeln!(f, "}}")
    }
}

/// What one message of a batch does, to name it when the kernel refuses it.
#[derive(Debug, Clone)]
enum Step {
    Table,
    Chain(&'static str),
    /// The set or a part of its elements.
    Set(&'static str),
    Rule {
        chain: &'static str,
        index: usize,
        rule: RuleSpec,
    },
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Table => write!(f, "table inet {TABLE_NAME}"),
            Step::Chain(name) => write!(f, "nat chain {name}"),
            Step::Set(name) => write!(f, "set {name}"),
            Step::Rule { chain, index, rule } => {
                write!(f, "rule {} of chain {chain} (`{rule}`)", index + 1)
            }
        }
    }
}

/// A kernel refusal as a Backend error naming what was refused and the kernel feature most
/// likely missing. `steps` describes the batch's messages; empty for a dump.
fn kernel_error(what: &str, err: QueryError, steps: &[Step]) -> Error {
    match err {
        QueryError::NetlinkError(nlerr) => refusal(
            what,
            Errno::from_raw(nlerr.error),
            nlerr.msg.nlmsg_seq,
            steps,
        ),
        QueryError::NetlinkOpenError(e) => batch_error(
            what,
            Failure::Socket(
                "cannot open a netfilter netlink socket",
                Errno::from_raw(e as i32),
            ),
            steps,
        ),
        err => Error::backend(format!("{what}: {err}")),
    }
}

/// The error for a batch the kernel did not take.
fn batch_error(what: &str, failure: Failure, steps: &[Step]) -> Error {
    match failure {
        Failure::Refused { seq, errno } => refusal(what, errno, seq, steps),
        Failure::Socket(context, errno) => {
            let hint = if errno == Errno::EPROTONOSUPPORT || errno == Errno::EAFNOSUPPORT {
                " (is nfnetlink/nf_tables available in this kernel?)"
            } else {
                ""
            };
            Error::backend(format!("{what}: {context}: {errno}{hint}"))
        }
    }
}

/// The kernel refused the message with sequence number `seq` (`steps[seq - 1]`; 0 is the batch).
fn refusal(what: &str, errno: Errno, seq: u32, steps: &[Step]) -> Error {
    let step = (seq as usize).checked_sub(1).and_then(|i| steps.get(i));
    let hint = match (errno, step) {
        (Errno::EPERM, _) => {
            "CAP_NET_ADMIN in the pod's network namespace is needed, or another program owns the table (flags owner)"
        }
        (Errno::EOPNOTSUPP, Some(Step::Chain(_))) => {
            "nat chains in inet tables need Linux >= 5.2 with nft_chain_nat"
        }
        (Errno::EOPNOTSUPP | Errno::ENOENT, Some(Step::Set(_))) => {
            "interval sets are missing (nf_tables set backends, Linux >= 4.1)"
        }
        (Errno::EOPNOTSUPP, _) => "the kernel lacks nf_tables (module nf_tables)",
        (Errno::ENOENT, Some(Step::Chain(_))) => {
            "the nat chain type is missing (module nft_chain_nat, Linux >= 5.2 for inet)"
        }
        (Errno::ENOENT, Some(Step::Rule { rule, .. })) if rule.action != Action::Return => {
            "the nat expression is missing (module nft_nat)"
        }
        (Errno::ENOENT, Some(Step::Rule { .. })) => "an nf_tables expression module is missing",
        _ => "the kernel refused it",
    };
    match step {
        Some(step) => Error::backend(format!("{what}: {step}: {errno} ({hint})")),
        None => Error::backend(format!("{what}: {errno} ({hint})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Families;

    fn rules_text(ruleset: &Ruleset, chain: &str) -> Vec<String> {
        ruleset
            .chains
            .iter()
            .find(|c| c.name == chain)
            .map(|c| c.rules.iter().map(|r| r.to_string()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn proxy_ports_are_returned_once_when_equal() {
        let plan = InterceptPlan {
            outbound_port: 15006,
            ..InterceptPlan::with_defaults(Families::BOTH)
        };
        let rules = rules_text(&Ruleset::from_plan(&plan), "prerouting");
        assert_eq!(
            rules.iter().filter(|r| r.contains("dport 15006")).count(),
            1
        );
    }

    #[test]
    fn no_inbound_means_no_prerouting_chain() {
        let plan = InterceptPlan {
            inbound_ports: InboundPorts::None,
            ..InterceptPlan::with_defaults(Families::BOTH)
        };
        let ruleset = Ruleset::from_plan(&plan);
        let names: Vec<_> = ruleset.chains.iter().map(|c| c.name).collect();
        assert_eq!(names, ["output"]);
    }

    #[test]
    fn port_ranges_compare_big_endian_bounds() {
        let range = PortRange::new(8000, 8100).unwrap();
        let exprs = Match::TcpDport(range).expressions().unwrap();
        let cmps: Vec<_> = exprs
            .iter()
            .filter_map(|e| match e.get_data() {
                Some(rustables::expr::ExpressionVariant::Cmp(c)) => Some(c.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(
            cmps,
            [
                Cmp::new(CmpOp::Eq, [libc::IPPROTO_TCP as u8]),
                Cmp::new(CmpOp::Gte, 8000u16.to_be_bytes()),
                Cmp::new(CmpOp::Lte, 8100u16.to_be_bytes()),
            ]
        );
    }

    #[test]
    fn host_bits_of_a_cidr_are_ignored() {
        let net: IpNetwork = "10.1.2.3/8".parse().unwrap();
        assert_eq!(Match::Daddr(net).to_string(), "ip daddr 10.0.0.0/8");
        let exprs = Match::Daddr(net).expressions().unwrap();
        assert_eq!(
            exprs.last().unwrap(),
            &RawExpression::from(Cmp::new(CmpOp::Eq, [10, 0, 0, 0]))
        );
    }
}
