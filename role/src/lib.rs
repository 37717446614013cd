//! blockrep's role manager: makes a node primary or standby, safely and resumably.
//!
//! `promote` runs an ordered, journaled plan (guards, stop accepting syncs, boot target, virtual IPs via netlink,
//! gratuitous ARP / unsolicited neighbour advertisements, services, notify hooks, role primary, optional reboot);
//! `demote` runs the reverse. Every step
//! is idempotent and recorded in a small state file, so running the command again after a crash finishes it.
//! The split-brain guard probes each virtual IP, IPv4 with ARP (RFC 5227 style) and IPv6 with duplicate address
//! detection (RFC 4862, [`ndp`]), and names the MAC that answers; the
//! engine and network checks come from the caller through [`Guards`].
//!
//! ```no_run
//! let cfg = role::Config::from_toml(&std::fs::read_to_string("/etc/blockrep/blockrep.toml")?)?;
//! role::check_state_dir(&cfg.state_dir, &[])?;
//! let opts = role::Options { reason: "maintenance".into(), ..Default::default() };
//! let report = role::promote(&cfg, &role::NoGuards, &opts)?;
//! println!("{report}");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! `serve` asks [`accepts_syncs`] before applying a sync; `status` is [`status`], serializable as JSON.
#![deny(missing_docs)]

pub mod arp;
pub mod boot;
pub mod config;
pub mod exec;
pub mod grubenv;
pub mod ndp;
pub mod netlink;
mod packet;
pub mod plan;
pub mod state;
pub mod switchover;

pub use boot::LvRenamer;
pub use config::Config;
pub use plan::{demote, missing_vips, promote, Guards, NoGuards, Options, PlanError, Report};
pub use state::{accepts_syncs, check_state_dir, mark_first_full_sync, status, Role, RoleState, Status};
pub use switchover::{
    quiesce_done, resume_interrupted_quiesce, start_primary_services, stop_primary_services, switchover, Peer,
    PeerError, QuiesceError, SwitchoverError,
};
