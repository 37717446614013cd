//! The `[role]` section of `blockrep.toml`.
//!
//! The lead embeds [`Config`] as the `role` field of the whole configuration; [`Config::from_toml`] parses a
//! document whose top level is the section itself (used by tests and the example binary), and
//! [`Config::validate`] must be called on any `Config` obtained otherwise (the CLI's loader).
//!
//! ```toml
//! [role]
//! state_dir = "/var/lib/blockrep/role"    # must not be on a replicated volume
//! interface = "eth0"
//! vip = "10.77.0.50/24"                  # or a list, IPv4 and/or IPv6: ["10.77.0.50/24", "fd77::50/64"]
//! gateway = "10.77.0.254"                 # optional default gateway(s), one per family, added on promote
//! routes = [{ to = "10.78.0.0/16", via = "10.77.0.254" }, { to = "fd78::/48", via = "fe80::1" }]
//! notify = ["/usr/local/bin/page-oncall"] # BLOCKREP_EVENT, BLOCKREP_NODE, BLOCKREP_REASON in the environment
//! reboot = false
//! [role.garp]
//! count = 3
//! interval_ms = 100
//! refresh_s = 60
//! refresh_interval_s = 10
//! [role.boot_target]
//! kind = "grub-env"
//! path = "/boot/grub/grubenv"
//! primary_entry = "blockrep-primary"
//! standby_entry = "blockrep-standby"
//! [role.services]
//! standby_only = ["blockrep-serve.service"]
//! primary_only = ["postgresql.service", { hook = "/usr/local/bin/app-ctl", timeout_s = 30 }]
//! ```

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

/// Default timeout of a service start/stop or hook, in seconds.
pub const DEFAULT_SERVICE_TIMEOUT_S: u64 = 90;
/// Default timeout of a notify hook, in seconds.
pub const DEFAULT_NOTIFY_TIMEOUT_S: u64 = 10;
/// Longest interface name Linux accepts (IFNAMSIZ - 1).
pub const MAX_IFNAME_LEN: usize = 15;
/// Largest gratuitous ARP or probe count accepted.
pub const MAX_ARP_COUNT: u32 = 100;
/// Most virtual IPs in one configuration.
pub const MAX_VIPS: usize = 16;

/// Errors of reading or checking the `[role]` configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The TOML text could not be parsed into the role section.
    #[error("could not parse the [role] configuration; fix the file and try again")]
    Parse(#[source] toml::de::Error),
    /// A field has a value that cannot work.
    #[error("invalid [role] setting `{field}`: {problem}")]
    Invalid {
        /// The offending field.
        field: &'static str,
        /// What is wrong and what to write instead.
        problem: String,
    },
}

/// An IPv4 or IPv6 address with prefix length, written `10.77.0.50/24` or `fd77::50/64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    /// The address.
    pub addr: IpAddr,
    /// The prefix length (0..=32 for IPv4, 0..=128 for IPv6).
    pub prefix: u8,
}

impl IpNet {
    /// Whether this is an IPv6 address.
    pub fn is_ipv6(&self) -> bool {
        self.addr.is_ipv6()
    }

    /// The network address (host bits cleared).
    pub fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        }
    }

    /// The IPv4 broadcast address of the network; `None` for /31, /32 and IPv6 (which has no broadcast).
    pub fn broadcast(&self) -> Option<Ipv4Addr> {
        match self.addr {
            IpAddr::V4(a) if self.prefix < 31 => {
                let host = u32::MAX >> u32::from(self.prefix);
                Some(Ipv4Addr::from(u32::from(a) | host))
            }
            _ => None,
        }
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for IpNet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr =
            a.parse().map_err(|_| format!("`{s}` is not an IP address like 10.77.0.50/24 or fd77::50/64"))?;
        let max = if addr.is_ipv6() { 128 } else { 32 };
        let prefix = match p {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => return Err(format!("`{s}` has a prefix length that is not 0..={max}")),
            },
        };
        Ok(IpNet { addr, prefix })
    }
}

impl<'de> Deserialize<'de> for IpNet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for IpNet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// One value or a list of values: `vip = "10.77.0.50/24"` or `vip = ["10.77.0.50/24", "fd77::50/64"]`. Each
/// value is parsed from its string, so a bad one keeps its own error message.
fn one_or_many<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct OneOrMany<T>(std::marker::PhantomData<T>);

    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for OneOrMany<T> {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an address, or a list of addresses")
        }

        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Vec<T>, E> {
            use serde::de::IntoDeserializer;
            T::deserialize(s.into_deserializer()).map(|v| vec![v])
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut out = Vec::new();
            while let Some(v) = seq.next_element()? {
                out.push(v);
            }
            Ok(out)
        }
    }

    d.deserialize_any(OneOrMany(std::marker::PhantomData))
}

/// The `[role]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This node's name for notify hooks and status (default: the host name).
    #[serde(default)]
    pub node: Option<String>,
    /// Directory of the role state file. Must not be on a replicated volume.
    pub state_dir: PathBuf,
    /// Interface that carries the virtual IP.
    pub interface: String,
    /// The virtual (service) IPs with prefix: one (`"10.77.0.50/24"`, `"fd77::50/64"`) or a list; a list with
    /// both families is dual stack. All of them move together.
    #[serde(deserialize_with = "one_or_many")]
    pub vip: Vec<IpNet>,
    /// Optional default gateways added on promote and removed on demote: one address or a list, at most one per
    /// address family.
    #[serde(default, deserialize_with = "one_or_many")]
    pub gateway: Vec<IpAddr>,
    /// Static routes added on promote and removed on demote.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// Gratuitous ARP (IPv4) and unsolicited neighbour advertisement (IPv6) settings.
    #[serde(default)]
    pub garp: Garp,
    /// ARP probe (IPv4) and duplicate address detection (IPv6) settings of the split-brain guard.
    #[serde(default)]
    pub probe: Probe,
    /// What to change so that the next boot comes up in the new role.
    #[serde(default)]
    pub boot_target: BootTarget,
    /// Services to stop/start on role change.
    #[serde(default)]
    pub services: Services,
    /// Commands run (with `sh -c`) after a role change, with BLOCKREP_EVENT, BLOCKREP_NODE, BLOCKREP_REASON set.
    #[serde(default)]
    pub notify: Vec<String>,
    /// Timeout of each notify command in seconds.
    #[serde(default = "default_notify_timeout")]
    pub notify_timeout_s: u64,
    /// Reboot at the end of promote.
    #[serde(default)]
    pub reboot: bool,
    /// Command (argv) used for `reboot = true`.
    #[serde(default = "default_reboot_command")]
    pub reboot_command: Vec<String>,
    /// Command (argv) used by demote with `poweroff`.
    #[serde(default = "default_poweroff_command")]
    pub poweroff_command: Vec<String>,
}

fn default_notify_timeout() -> u64 {
    DEFAULT_NOTIFY_TIMEOUT_S
}

fn default_reboot_command() -> Vec<String> {
    vec!["/usr/bin/systemctl".into(), "reboot".into()]
}

fn default_poweroff_command() -> Vec<String> {
    vec!["/usr/bin/systemctl".into(), "poweroff".into()]
}

/// A static route: `{ to = "10.78.0.0/16", via = "10.77.0.254" }` or `{ to = "fd78::/48", via = "fe80::1" }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Destination network.
    pub to: IpNet,
    /// Next hop, of the same address family as `to`.
    pub via: IpAddr,
}

/// Announcement settings: gratuitous ARP for IPv4 VIPs, unsolicited neighbour advertisements for IPv6 VIPs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Garp {
    /// Announcements sent right after taking the VIP.
    pub count: u32,
    /// Pause between those announcements.
    pub interval_ms: u64,
    /// How long a primary keeps re-announcing (see [`crate::arp::refresh`]); 0 disables.
    pub refresh_s: u64,
    /// Pause between re-announcements.
    pub refresh_interval_s: u64,
}

impl Default for Garp {
    fn default() -> Self {
        Garp { count: 3, interval_ms: 100, refresh_s: 60, refresh_interval_s: 10 }
    }
}

/// Probe settings of the "VIP already in use" guard: ARP probes for IPv4 VIPs (RFC 5227 style), duplicate address
/// detection solicitations for IPv6 VIPs (RFC 4862 5.4); both shortened so that promote stays fast.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Probe {
    /// Probes sent.
    pub count: u32,
    /// Pause between probes.
    pub interval_ms: u64,
    /// Time to wait for answers after the last probe.
    pub wait_ms: u64,
}

impl Default for Probe {
    fn default() -> Self {
        Probe { count: 3, interval_ms: 50, wait_ms: 200 }
    }
}

/// Boot target backend.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum BootTarget {
    /// Leave the boot configuration alone.
    #[default]
    None,
    /// Set `saved_entry` (or `next_entry`) in a GRUB environment block.
    GrubEnv {
        /// The environment block file, usually `/boot/grub/grubenv`.
        path: PathBuf,
        /// Menu entry booted as primary.
        primary_entry: String,
        /// Menu entry booted as standby.
        standby_entry: String,
        /// Set `next_entry` (one boot only) instead of `saved_entry`.
        #[serde(default)]
        one_shot: bool,
    },
    /// Swap shadow and production LV names so that the next boot mounts the replicated volumes.
    LvRename {
        /// Volume group.
        vg: String,
        /// LV pairs to swap.
        pairs: Vec<LvPair>,
        /// Suffix of the temporary name used during a swap.
        #[serde(default = "default_temp_suffix")]
        temp_suffix: String,
    },
}

fn default_temp_suffix() -> String {
    "_blockrep_swap".into()
}

/// One production/shadow LV pair of the `lv-rename` backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LvPair {
    /// The LV name the boot configuration mounts.
    pub production: String,
    /// The LV that receives replication.
    pub shadow: String,
}

/// Services stopped/started on role change.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Services {
    /// Running only on the standby (stopped by promote in reverse order, started by demote in order).
    #[serde(default)]
    pub standby_only: Vec<Service>,
    /// Running only on the primary (started by promote in order, stopped by demote in reverse order).
    #[serde(default)]
    pub primary_only: Vec<Service>,
}

/// A systemd unit name, or a hook command run as `sh -c HOOK` with BLOCKREP_ACTION=start|stop.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    untagged,
    expecting = "a systemd unit name, { unit = \"name.service\", timeout_s = N } or { hook = \"command\", timeout_s = N }"
)]
pub enum Service {
    /// `"postgresql.service"`.
    Unit(String),
    /// `{ unit = "postgresql.service", timeout_s = 30 }`.
    UnitWithTimeout(UnitSpec),
    /// `{ hook = "/usr/local/bin/app-ctl", timeout_s = 30 }`.
    Hook(HookSpec),
}

/// A systemd unit with its own timeout.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnitSpec {
    /// Unit name.
    pub unit: String,
    /// Timeout in seconds.
    #[serde(default)]
    pub timeout_s: Option<u64>,
}

/// A hook command.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookSpec {
    /// Shell command; it reads BLOCKREP_ACTION (`start` or `stop`).
    pub hook: String,
    /// Timeout in seconds.
    #[serde(default)]
    pub timeout_s: Option<u64>,
}

impl Service {
    /// A short label for reports and the journal.
    pub fn label(&self) -> String {
        match self {
            Service::Unit(u) | Service::UnitWithTimeout(UnitSpec { unit: u, .. }) => u.clone(),
            Service::Hook(h) => format!("hook `{}`", h.hook),
        }
    }

    /// The timeout in seconds.
    pub fn timeout_s(&self) -> u64 {
        match self {
            Service::Unit(_) => DEFAULT_SERVICE_TIMEOUT_S,
            Service::UnitWithTimeout(u) => u.timeout_s.unwrap_or(DEFAULT_SERVICE_TIMEOUT_S),
            Service::Hook(h) => h.timeout_s.unwrap_or(DEFAULT_SERVICE_TIMEOUT_S),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wrapper {
    role: Config,
}

impl Config {
    /// Parses a TOML document containing a `[role]` table and validates it.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let w: Wrapper = toml::from_str(text).map_err(ConfigError::Parse)?;
        w.role.validate()?;
        Ok(w.role)
    }

    /// Checks values serde cannot check.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, problem: &str| Err(ConfigError::Invalid { field, problem: problem.to_string() });
        if self.interface.is_empty() || self.interface.len() > MAX_IFNAME_LEN || self.interface.contains('/') {
            return invalid("interface", "must be a Linux interface name of 1 to 15 characters, like eth0");
        }
        if self.vip.is_empty() || self.vip.len() > MAX_VIPS {
            return invalid(
                "vip",
                "must name 1 to 16 addresses, like \"10.77.0.50/24\" or [\"10.77.0.50/24\", \"fd77::50/64\"]",
            );
        }
        for (i, v) in self.vip.iter().enumerate() {
            match v.addr {
                IpAddr::V4(a) if a.is_unspecified() || a.is_broadcast() || a.is_multicast() => {
                    return invalid("vip", &format!("{v} is not a unicast IPv4 address; write one like 10.77.0.50/24"));
                }
                IpAddr::V6(a)
                    if a.is_unspecified() || a.is_multicast() || a.is_loopback() || a.to_ipv4_mapped().is_some() =>
                {
                    return invalid("vip", &format!("{v} is not a unicast IPv6 address; write one like fd77::50/64"));
                }
                _ => {}
            }
            if self.vip[..i].iter().any(|w| w.addr == v.addr) {
                return invalid("vip", &format!("{} is listed twice", v.addr));
            }
        }
        if self.gateway.iter().filter(|g| g.is_ipv4()).count() > 1
            || self.gateway.iter().filter(|g| g.is_ipv6()).count() > 1
        {
            return invalid("gateway", "names at most one IPv4 and one IPv6 default gateway");
        }
        for g in &self.gateway {
            if g.is_unspecified() || g.is_multicast() {
                return invalid("gateway", &format!("{g} is not a unicast address"));
            }
        }
        for r in &self.routes {
            if r.to.is_ipv6() != r.via.is_ipv6() {
                return invalid("routes", &format!("route to {} via {}: both must be IPv4 or both IPv6", r.to, r.via));
            }
        }
        if self.state_dir.as_os_str().is_empty() || !self.state_dir.is_absolute() {
            return invalid("state_dir", "must be an absolute path on a local, non-replicated filesystem");
        }
        if self.garp.count == 0 || self.garp.count > MAX_ARP_COUNT {
            return invalid("garp.count", "must be between 1 and 100");
        }
        if self.garp.refresh_s > 0 && self.garp.refresh_interval_s == 0 {
            return invalid("garp.refresh_interval_s", "must be at least 1 when garp.refresh_s is set");
        }
        if self.probe.count == 0 || self.probe.count > MAX_ARP_COUNT {
            return invalid("probe.count", "must be between 1 and 100");
        }
        if self.reboot && self.reboot_command.is_empty() {
            return invalid("reboot_command", "must name a command when reboot = true");
        }
        if self.poweroff_command.is_empty() {
            return invalid("poweroff_command", "must name a command, e.g. [\"/usr/bin/systemctl\", \"poweroff\"]");
        }
        for s in self.services.standby_only.iter().chain(&self.services.primary_only) {
            match s {
                Service::Unit(u) | Service::UnitWithTimeout(UnitSpec { unit: u, .. }) => {
                    if u.is_empty() || u.starts_with('-') || u.contains(char::is_whitespace) {
                        return invalid(
                            "services",
                            "a unit name must be non-empty, without spaces, not start with '-'",
                        );
                    }
                }
                Service::Hook(h) if h.hook.trim().is_empty() => {
                    return invalid("services", "a hook must be a non-empty shell command");
                }
                Service::Hook(_) => {}
            }
            if s.timeout_s() == 0 {
                return invalid("services", "timeout_s must be at least 1");
            }
        }
        match &self.boot_target {
            BootTarget::None => {}
            BootTarget::GrubEnv { primary_entry, standby_entry, .. } => {
                for e in [primary_entry, standby_entry] {
                    if e.is_empty() || e.contains('\n') {
                        return invalid("boot_target", "GRUB entries must be non-empty single-line names");
                    }
                }
            }
            BootTarget::LvRename { vg, pairs, temp_suffix } => {
                if vg.is_empty() || pairs.is_empty() || temp_suffix.is_empty() {
                    return invalid("boot_target", "lv-rename needs vg, at least one pair and a temp_suffix");
                }
            }
        }
        Ok(())
    }

    /// The node name: `node` if set, else the host name.
    pub fn node_name(&self) -> String {
        if let Some(n) = &self.node {
            return n.clone();
        }
        nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "unknown".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
[role]
node = "a"
state_dir = "/var/lib/blockrep/role"
interface = "eth0"
vip = "10.77.0.50/24"
gateway = "10.77.0.254"
routes = [{ to = "10.78.0.0/16", via = "10.77.0.254" }]
notify = ["logger blockrep"]
reboot = false
[role.garp]
count = 5
interval_ms = 10
refresh_s = 60
refresh_interval_s = 10
[role.boot_target]
kind = "grub-env"
path = "/boot/grub/grubenv"
primary_entry = "p"
standby_entry = "s"
[role.services]
standby_only = ["blockrep-serve.service"]
primary_only = ["pg.service", { unit = "x.service", timeout_s = 5 }, { hook = "/bin/true", timeout_s = 3 }]
"#;

    #[test]
    fn full_section_parses() {
        let c = Config::from_toml(FULL).unwrap();
        assert_eq!(c.vip.len(), 1);
        assert_eq!(c.vip[0].to_string(), "10.77.0.50/24");
        assert_eq!(c.vip[0].network(), IpAddr::V4(Ipv4Addr::new(10, 77, 0, 0)));
        assert_eq!(c.vip[0].broadcast(), Some(Ipv4Addr::new(10, 77, 0, 255)));
        assert_eq!(c.gateway, vec![IpAddr::V4(Ipv4Addr::new(10, 77, 0, 254))]);
        assert_eq!(c.garp.count, 5);
        assert_eq!(c.routes[0].to.prefix, 16);
        assert!(matches!(c.boot_target, BootTarget::GrubEnv { .. }));
        assert_eq!(c.services.primary_only.len(), 3);
        assert_eq!(c.services.primary_only[1].timeout_s(), 5);
        assert!(matches!(c.services.primary_only[2], Service::Hook(_)));
    }

    #[test]
    fn unknown_fields_are_rejected() {
        for bad in [
            FULL.replace("reboot = false", "rebot = false"),
            FULL.replace("count = 5", "count = 5\ncuont = 1"),
            FULL.replace("primary_entry = \"p\"", "primary_entry = \"p\"\nextra = 1"),
            FULL.replace("kind = \"grub-env\"", "kind = \"grub\""),
            FULL.replace("{ hook = \"/bin/true\"", "{ hok = \"/bin/true\""),
        ] {
            assert!(Config::from_toml(&bad).is_err(), "accepted: {bad}");
        }
    }

    #[test]
    fn bad_values_name_the_field() {
        let e = Config::from_toml(&FULL.replace("10.77.0.50/24", "10.77.0.50/33")).unwrap_err();
        assert!(format!("{:?}", e).contains("prefix"), "{e:?}");
        let e = Config::from_toml(&FULL.replace("\"eth0\"", "\"an-interface-name-too-long\"")).unwrap_err();
        assert!(e.to_string().contains("interface"), "{e}");
        let e = Config::from_toml(&FULL.replace("/var/lib/blockrep/role", "relative")).unwrap_err();
        assert!(e.to_string().contains("state_dir"), "{e}");
    }

    #[test]
    fn a_misspelt_service_says_what_is_expected() {
        let e = Config::from_toml(&FULL.replace("{ hook = \"/bin/true\"", "{ hok = \"/bin/true\"")).unwrap_err();
        let msg = format!("{:?}", e);
        assert!(msg.contains("a systemd unit name"), "{msg}");
    }

    #[test]
    fn minimal_section_gets_defaults() {
        let c = Config::from_toml("[role]\nstate_dir = \"/s\"\ninterface = \"eth0\"\nvip = \"10.77.0.50\"\n").unwrap();
        assert_eq!(c.vip[0].prefix, 32);
        assert!(c.gateway.is_empty());
        assert!(matches!(c.boot_target, BootTarget::None));
        assert_eq!(c.garp.count, 3);
        assert!(c.services.primary_only.is_empty());
    }

    #[test]
    fn dual_stack_vips_gateways_and_routes_parse() {
        let text = FULL
            .replace("vip = \"10.77.0.50/24\"", "vip = [\"10.77.0.50/24\", \"fd77::50/64\"]")
            .replace("gateway = \"10.77.0.254\"", "gateway = [\"10.77.0.254\", \"fe80::1\"]")
            .replace(
                "routes = [{ to = \"10.78.0.0/16\", via = \"10.77.0.254\" }]",
                "routes = [{ to = \"10.78.0.0/16\", via = \"10.77.0.254\" }, { to = \"fd78::/48\", via = \"fe80::1\" }]",
            );
        let c = Config::from_toml(&text).unwrap();
        assert_eq!(c.vip.len(), 2);
        assert!(!c.vip[0].is_ipv6() && c.vip[1].is_ipv6());
        assert_eq!(c.vip[1].to_string(), "fd77::50/64");
        assert_eq!(c.vip[1].network(), "fd77::".parse::<IpAddr>().unwrap());
        assert_eq!(c.vip[1].broadcast(), None, "IPv6 has no broadcast address");
        assert_eq!(c.gateway.len(), 2);
        assert_eq!(c.routes[1].to.to_string(), "fd78::/48");
        let only6 =
            Config::from_toml("[role]\nstate_dir = \"/s\"\ninterface = \"eth0\"\nvip = \"fd77::50\"\n").unwrap();
        assert_eq!(only6.vip[0].prefix, 128);
    }

    #[test]
    fn bad_addresses_name_the_field_and_the_value() {
        for (from, to, field) in [
            ("10.77.0.50/24", "fd77::50/129", "129"),
            ("10.77.0.50/24", "ff02::1/64", "unicast IPv6"),
            ("10.77.0.50/24", "::ffff:10.77.0.50/64", "unicast IPv6"),
            ("\"10.77.0.50/24\"", "[\"10.77.0.50/24\", \"10.77.0.50/16\"]", "listed twice"),
            ("\"10.77.0.50/24\"", "[]", "1 to 16"),
            ("\"10.77.0.50/24\"", "[\"10.77.0.50/24\", \"nonsense\"]", "`nonsense` is not an IP address"),
            ("gateway = \"10.77.0.254\"", "gateway = [\"10.77.0.254\", \"10.77.0.253\"]", "at most one IPv4"),
            ("via = \"10.77.0.254\" }]", "via = \"fe80::1\" }]", "both must be IPv4 or both IPv6"),
        ] {
            let text = FULL.replacen(from, to, 1);
            let e = Config::from_toml(&text).unwrap_err();
            let msg = format!("{e}: {:?}", e);
            assert!(msg.contains(field), "{to}: {msg}");
        }
    }
}
