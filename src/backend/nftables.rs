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

mod compact;
mod expr;
pub(crate) mod listing;
mod modes;
mod sets;
pub(crate) mod transport;
mod wire;

use super::Backend;
use crate::cni::error::{Code, Error, Result};
use crate::plan::rules::{self, IpFamily, Program};
use crate::plan::{IfName, InterceptPlan, PortRange};
use ipnetwork::IpNetwork;
use nix::errno::Errno;
use nix::libc;
use rustables::error::QueryError;
use rustables::{
    sys, Batch, Chain, ChainPolicy, ChainType, Hook, HookClass, MsgType, ProtocolFamily,
};
use sets::{KeyKind, SetSpec};
use std::fmt;
use std::net::IpAddr;
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
        let (create, steps) = ruleset.apply_batch(false);
        match transport::send(create, Existing::Refuse) {
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
        let (replace, steps) = ruleset.apply_batch(true);
        log::debug!("nftables: table inet {TABLE_NAME} exists; replacing it");
        transport::send(replace, Existing::AsBatched)
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

    fn key(self) -> KeyKind {
        match self {
            Family::Ipv4 => KeyKind::Ipv4,
            Family::Ipv6 => KeyKind::Ipv6,
        }
    }
}

impl From<IpFamily> for Family {
    fn from(f: IpFamily) -> Family {
        match f {
            IpFamily::V4 => Family::Ipv4,
            IpFamily::V6 => Family::Ipv6,
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
    /// `meta nfproto != ipv4`
    NotFamily(Family),
    /// `tcp dport != 15008`
    TcpDportNot(u16),
    /// `ip daddr != 127.0.0.1`
    DaddrNot(IpNetwork),
    /// `meta skuid != 1337`
    SkUidNot(u32),
    /// `meta skgid != 1337`
    SkGidNot(u32),
    /// `iifname "eth1"`
    Iifname(IfName),
    /// `oifname "lo"`
    Oifname(IfName),
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
    /// REDIRECT to this port (to the arriving interface's address, or loopback for local
    /// traffic), exactly as iptables' REDIRECT.
    Redirect(u16),
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
    /// The chains of DNS capture, TPROXY and INVALID drop (`modes`), after ours.
    modes: Vec<modes::ModeChain>,
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

impl Lists {
    /// The nft matches for one condition of `plan::rules`.
    fn translate(&mut self, m: &rules::Match) -> Match {
        match m {
            rules::Match::InIface(name) => Match::Iifname(name.clone()),
            rules::Match::OutIface(name) => Match::Oifname(name.clone()),
            rules::Match::Source(list) | rules::Match::Dest(list) => {
                let source = matches!(m, rules::Match::Source(_));
                let family = Family::of(list.nets[0].ip());
                match self.addrs(list.name, family, source, &list.nets) {
                    Some(m) => m,
                    None => unreachable!("lists of plan::rules are never empty"),
                }
            }
            rules::Match::NotDest(net) => Match::DaddrNot(*net),
            rules::Match::DestPorts(list) => match self.ports(list.name, &list.ports) {
                Some(m) => m,
                None => unreachable!("lists of plan::rules are never empty"),
            },
            rules::Match::NotDestPort(port) => Match::TcpDportNot(*port),
            rules::Match::Uid(id) => Match::SkUid(*id),
            rules::Match::NotUid(id) => Match::SkUidNot(*id),
            rules::Match::Gid(id) => Match::SkGid(*id),
            rules::Match::NotGid(id) => Match::SkGidNot(*id),
        }
    }
}

impl Ruleset {
    /// The rules of `plan::rules`, one for one. A plan of one family starts each chain by
    /// returning the other family; a redirect names TCP, as iptables' REDIRECT needs `-p tcp`.
    fn from_plan(plan: &InterceptPlan) -> Ruleset {
        let families = Family::enabled(plan);
        let program = Program::of(plan);
        let mut sets = Lists::default();
        let mut chains = Vec::new();
        for (name, hook, rules) in [
            ("prerouting", NatHook::Prerouting, &program.inbound),
            ("output", NatHook::Output, &program.outbound),
        ] {
            if rules.is_empty() {
                continue;
            }
            let mut specs = Vec::new();
            if let [only] = families[..] {
                specs.push(RuleSpec::ret(vec![Match::NotFamily(only)]));
            }
            for rule in &compact::compact(rules) {
                let mut matches = Vec::new();
                let names_address = rule.matches.iter().any(|m| {
                    matches!(
                        m,
                        rules::Match::Source(_) | rules::Match::Dest(_) | rules::Match::NotDest(_)
                    )
                });
                if let (Some(family), false, 2) = (rule.family, names_address, families.len()) {
                    matches.push(Match::Family(Family::from(family)));
                }
                let names_port = rule.matches.iter().any(|m| {
                    matches!(m, rules::Match::DestPorts(_) | rules::Match::NotDestPort(_))
                });
                let action = match rule.action {
                    rules::Action::Return => Action::Return,
                    rules::Action::ToInbound => Action::Redirect(plan.inbound_port),
                    rules::Action::ToOutbound => Action::Redirect(plan.outbound_port),
                };
                if action != Action::Return && !names_port {
                    matches.push(Match::Tcp);
                }
                matches.extend(rule.matches.iter().map(|m| sets.translate(m)));
                specs.push(RuleSpec::new(matches, action));
            }
            chains.push(ChainSpec {
                name,
                hook,
                rules: specs,
            });
        }
        Ruleset {
            sets: sets.0,
            chains,
            modes: modes::chains(plan),
        }
    }

    /// The one batch that installs the table, atomically. With `replace`, it starts with add
    /// (so the delete cannot fail even if the table just vanished) and delete, then builds the
    /// table again from scratch. `steps[i]` describes the message with sequence `i + 1`.
    /// The chains come first, then the sets with their elements (a constant set takes no
    /// elements once a rule is bound to it), then every rule, encoded by `expr`.
    fn apply_batch(&self, replace: bool) -> (Vec<u8>, Vec<Step>) {
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
        for spec in &self.chains {
            batch.add(&spec.to_chain(), MsgType::Add);
            steps.push(Step::Chain(spec.name));
        }
        for chain in &self.modes {
            batch.add(&chain.to_chain(&table), MsgType::Add);
            steps.push(Step::Chain(chain.name));
        }
        for (id, set) in (1..).zip(&self.sets) {
            set.messages(id, |msg| {
                batch.push(msg);
                steps.push(Step::Set(set.name));
            });
        }
        for spec in &self.chains {
            for (index, rule) in spec.rules.iter().enumerate() {
                batch.push_encoded(&rule.message(spec.name));
                steps.push(Step::Rule {
                    chain: spec.name,
                    index,
                    rule: rule.clone(),
                });
            }
        }
        for chain in &self.modes {
            for ((index, rule), message) in
                chain.rules.iter().enumerate().zip(chain.rule_messages())
            {
                batch.push_encoded(&message);
                steps.push(Step::ModeRule {
                    chain: chain.name,
                    index,
                    text: rule.text.clone(),
                });
            }
        }
        (batch.finalize(), steps)
    }

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
        // One dump of the inet family's rules, read by our own parser: rustables fails a whole
        // dump on a `ct zone` key, and a filtered dump could stop at another family's table.
        let request = wire::Msg::new(sys::NFT_MSG_GETRULE as u16, ProtocolFamily::Inet, 0);
        let all_rules: Vec<expr::ParsedRule> = transport::dump(request)
            .map_err(|f| batch_error("cannot list the nftables ruleset", f, &[]))?
            .iter()
            .map(|body| expr::parse_rule(body))
            .filter(|rule| rule.table == TABLE_NAME)
            .collect();
        let raw = listing::base_chains()?;
        let is_ours = |c: &listing::BaseChain| c.family == listing::INET && c.table == TABLE_NAME;
        for warning in listing::bypasses(&raw, is_ours) {
            log::warn!("nftables: {warning}");
        }
        let compare = |name: &str,
                       want: Chain,
                       kind: String,
                       expected: Vec<(String, Vec<expr::Canonical>)>,
                       drift: &mut Vec<String>| {
            let Some(found) = chains.iter().find(|c| c.get_name() == want.get_name()) else {
                drift.push(format!("chain {name} is missing"));
                return;
            };
            // The policy as the kernel sent it: rustables reads NF_DROP back as accept. A
            // regular chain (a mode's jump target) has none.
            let policy = raw
                .iter()
                .find(|c| is_ours(c) && c.name == name)
                .and_then(|c| c.policy);
            let wanted_policy = want.get_hook().map(|_| listing::NF_ACCEPT);
            if found.get_hook() != want.get_hook()
                || found.get_type() != want.get_type()
                || policy != wanted_policy
            {
                drift.push(format!("chain {name} is not {kind}"));
            }
            let rules: Vec<&expr::ParsedRule> =
                all_rules.iter().filter(|r| r.chain == name).collect();
            for (index, (text, exprs)) in expected.iter().enumerate() {
                match rules.get(index) {
                    None => drift.push(format!(
                        "chain {name} rule {} is missing (`{text}`)",
                        index + 1
                    )),
                    Some(found) if &found.exprs != exprs => drift.push(format!(
                        "chain {name} rule {} differs from `{text}`",
                        index + 1
                    )),
                    Some(_) => {}
                }
            }
            if rules.len() > expected.len() {
                drift.push(format!(
                    "chain {name} has {} extra rule(s) after rule {}",
                    rules.len() - expected.len(),
                    expected.len()
                ));
            }
        };
        for spec in &self.chains {
            let want = spec.to_chain();
            let mut expected = Vec::new();
            for rule in &spec.rules {
                expected.push((rule.to_string(), canonical(&rule.message(spec.name))));
            }
            let kind = format!(
                "a nat chain at {} priority {NAT_PRIORITY} with policy accept",
                spec.hook.name()
            );
            compare(spec.name, want, kind, expected, &mut drift);
        }
        for chain in &self.modes {
            let expected = chain
                .rules
                .iter()
                .zip(chain.rule_messages())
                .map(|(rule, msg)| (rule.text.clone(), canonical(&msg)))
                .collect();
            let kind = chain.kind();
            compare(
                chain.name,
                chain.to_chain(&table()),
                kind,
                expected,
                &mut drift,
            );
        }
        for chain in &chains {
            let name = chain.get_name().map_or("", String::as_str);
            if !self.chains.iter().any(|spec| spec.name == name)
                && !self.modes.iter().any(|m| m.name == name)
            {
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

/// A rule message's expressions as `expr::parse_rules` reads them, to compare with a dump.
fn canonical(message: &[u8]) -> Vec<expr::Canonical> {
    expr::parse_rules(message)
        .pop()
        .map(|r| r.exprs)
        .unwrap_or_default()
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

impl RuleSpec {}

impl Match {
    /// This match's expressions, in the order nft would write them.
    fn exprs(&self) -> Vec<expr::Expr> {
        let meta =
            |key: u32, op: u32, value: &[u8]| vec![expr::meta_load(key), expr::cmp(op, value)];
        let tcp = || meta(expr::META_L4PROTO, expr::CMP_EQ, &[libc::IPPROTO_TCP as u8]);
        let dport = || {
            let mut exprs = tcp();
            exprs.push(expr::payload(expr::PAYLOAD_TRANSPORT, 2, 2));
            exprs
        };
        match self {
            Match::Tcp => tcp(),
            Match::Family(family) => family_is(*family),
            Match::NotFamily(family) => {
                meta(expr::META_NFPROTO, expr::CMP_NEQ, &[family.nfproto() as u8])
            }
            Match::TcpDportIn(set) => {
                let mut exprs = dport();
                exprs.push(expr::lookup(set));
                exprs
            }
            Match::AddrIn {
                family,
                source,
                set,
            } => {
                let mut exprs = load_address(*family, *source);
                exprs.push(expr::lookup(set));
                exprs
            }
            Match::TcpDport(range) => {
                let mut exprs = dport();
                exprs.extend(expr::port_cmps(range));
                exprs
            }
            Match::TcpDportNot(port) => {
                let mut exprs = dport();
                exprs.push(expr::cmp(expr::CMP_NEQ, &port.to_be_bytes()));
                exprs
            }
            Match::Saddr(net) => address(net, true, expr::CMP_EQ),
            Match::Daddr(net) => address(net, false, expr::CMP_EQ),
            Match::DaddrNot(net) => address(net, false, expr::CMP_NEQ),
            // The kernel keeps socket UIDs and GIDs in host byte order.
            Match::SkUid(uid) => meta(expr::META_SKUID, expr::CMP_EQ, &uid.to_ne_bytes()),
            Match::SkGid(gid) => meta(expr::META_SKGID, expr::CMP_EQ, &gid.to_ne_bytes()),
            Match::SkUidNot(uid) => meta(expr::META_SKUID, expr::CMP_NEQ, &uid.to_ne_bytes()),
            Match::SkGidNot(gid) => meta(expr::META_SKGID, expr::CMP_NEQ, &gid.to_ne_bytes()),
            // Names compare over the whole IFNAMSIZ buffer, zero-padded, as nft sends them.
            Match::Iifname(name) => meta(
                expr::META_IIFNAME,
                expr::CMP_EQ,
                &expr::ifname(name.as_str()),
            ),
            Match::Oifname(name) => meta(
                expr::META_OIFNAME,
                expr::CMP_EQ,
                &expr::ifname(name.as_str()),
            ),
        }
    }
}

/// `meta nfproto ipv4`: the dependency of any address match.
fn family_is(family: Family) -> Vec<expr::Expr> {
    vec![
        expr::meta_load(expr::META_NFPROTO),
        expr::cmp(expr::CMP_EQ, &[family.nfproto() as u8]),
    ]
}

/// The family dependency, then the load of the source or destination address into register 1.
fn load_address(family: Family, source: bool) -> Vec<expr::Expr> {
    let mut exprs = family_is(family);
    exprs.push(expr::load_address(family == Family::Ipv6, source));
    exprs
}

/// `ip saddr 10.0.0.0/8`, `ip6 daddr != ::1`: the family dependency and the comparison.
fn address(net: &IpNetwork, source: bool, op: u32) -> Vec<expr::Expr> {
    let mut exprs = family_is(Family::of(net.ip()));
    exprs.extend(expr::address_cmp(net, source, op));
    exprs
}

impl Action {
    fn exprs(&self) -> Vec<expr::Expr> {
        match self {
            Action::Return => vec![expr::verdict(expr::NFT_RETURN, None)],
            Action::Redirect(port) => vec![
                expr::immediate(expr::REG_1, &port.to_be_bytes()),
                expr::redir(),
            ],
        }
    }
}

impl RuleSpec {
    /// The NFT_MSG_NEWRULE appending this rule to `chain` of our table.
    fn message(&self, chain: &str) -> Vec<u8> {
        let mut exprs: Vec<expr::Expr> = self.matches.iter().flat_map(Match::exprs).collect();
        exprs.extend(self.action.exprs());
        expr::rule_message(TABLE_NAME, chain, &exprs)
    }
}

impl Match {}

fn max_prefix(net: &IpNetwork) -> u8 {
    match net {
        IpNetwork::V4(_) => 32,
        IpNetwork::V6(_) => 128,
    }
}

impl Action {}

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
            Match::SkUidNot(uid) => write!(f, "meta skuid != {uid}"),
            Match::SkGidNot(gid) => write!(f, "meta skgid != {gid}"),
            Match::NotFamily(Family::Ipv4) => write!(f, "meta nfproto != ipv4"),
            Match::NotFamily(Family::Ipv6) => write!(f, "meta nfproto != ipv6"),
            Match::TcpDportNot(port) => write!(f, "tcp dport != {port}"),
            Match::DaddrNot(net) => {
                write!(f, "{} daddr != ", Family::of(net.ip()).keyword())?;
                fmt_net(f, net)
            }
            Match::Iifname(name) => write!(f, "iifname \"{name}\""),
            Match::Oifname(name) => write!(f, "oifname \"{name}\""),
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
            Action::Redirect(port) => write!(f, "redirect to :{port}"),
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
        for chain in &self.modes {
            writeln!(f)?;
            write!(f, "{chain}")?;
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
    ModeRule {
        chain: &'static str,
        index: usize,
        text: String,
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
            Step::ModeRule { chain, index, text } => {
                write!(f, "rule {} of chain {chain} (`{text}`)", index + 1)
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
        (Errno::ENOENT | Errno::EOPNOTSUPP, Some(Step::ModeRule { .. })) => {
            "an nf_tables expression module is missing (nft_ct with conntrack zones, nft_tproxy, nf_tproxy_ipv4/6)"
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
    use crate::plan::{Families, InboundPorts};

    fn rules_text(ruleset: &Ruleset, chain: &str) -> Vec<String> {
        ruleset
            .chains
            .iter()
            .find(|c| c.name == chain)
            .map(|c| c.rules.iter().map(|r| r.to_string()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn one_family_guards_each_chain_and_redirects_name_tcp() {
        let plan = InterceptPlan::with_defaults(Families {
            ipv4: false,
            ipv6: true,
        });
        let ruleset = Ruleset::from_plan(&plan);
        for chain in ["prerouting", "output"] {
            let rules = rules_text(&ruleset, chain);
            assert_eq!(rules[0], "meta nfproto != ipv6 return", "{rules:?}");
            for rule in rules.iter().filter(|r| r.contains("redirect")) {
                assert!(rule.starts_with("meta l4proto tcp "), "{rule}");
            }
        }
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
        assert_eq!(
            Match::TcpDport(range).exprs(),
            [
                expr::meta_load(expr::META_L4PROTO),
                expr::cmp(expr::CMP_EQ, &[libc::IPPROTO_TCP as u8]),
                expr::payload(expr::PAYLOAD_TRANSPORT, 2, 2),
                expr::cmp(expr::CMP_GTE, &8000u16.to_be_bytes()),
                expr::cmp(expr::CMP_LTE, &8100u16.to_be_bytes()),
            ]
        );
    }

    #[test]
    fn host_bits_of_a_cidr_are_ignored() {
        let net: IpNetwork = "10.1.2.3/8".parse().unwrap();
        assert_eq!(Match::Daddr(net).to_string(), "ip daddr 10.0.0.0/8");
        let exprs = Match::Daddr(net).exprs();
        assert_eq!(exprs.last(), Some(&expr::cmp(expr::CMP_EQ, &[10, 0, 0, 0])));
    }
}
