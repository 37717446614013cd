//! The standby's end of a session: [`serve_session`] reads requests from an authenticated [`Connection`] and
//! drives whatever [`TargetLink`] the node opens for them (the engine's `Target`, wrapped by the node with its own
//! checks), plus the role queries. The node decides policy through the [`Standby`] trait; this module decides only
//! what goes on the wire.

use std::io::{Read, Write};

use link::{LinkError, TargetLink};

use crate::client::remote_code;
use crate::conn::{ConnError, Connection};
use crate::message::{code, Committed, OpenVolume, RoleInfo};
use crate::Message;

/// A refusal the standby sends as an error frame: code (see [`crate::message::code`]) and message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    /// Error code sent to the peer.
    pub code: u16,
    /// Message sent to the peer (and logged).
    pub message: String,
}

impl Refusal {
    /// A refusal with `code`.
    pub fn new(code: u16, message: impl Into<String>) -> Self {
        Refusal { code, message: message.into() }
    }
}

/// What a standby node does with a session's requests.
pub trait Standby {
    /// The target a session drives once a volume is open (released when the session ends or opens another).
    type Target: TargetLink;
    /// Opens a volume for the peer `peer` (its authenticated node name), or refuses.
    fn open_volume(&self, peer: &str, req: &OpenVolume) -> Result<Self::Target, Refusal>;
    /// This node's role.
    fn role(&self) -> Result<RoleInfo, Refusal>;
    /// Demotes this node at the peer's request (planned switchover). Before its demote plan, a primary stops its
    /// services, syncs every volume and calls `confirm` with what it committed: `confirm` sends
    /// [`Message::FinalSynced`] and returns `Ok` once the peer answers [`Message::DemoteConfirm`] (the peer's
    /// refusal, or a failed connection, is the `Err`: then nothing may be demoted).
    fn demote(
        &self,
        peer: &str,
        reason: &str,
        confirm: &mut dyn FnMut(Vec<Committed>) -> Result<(), Refusal>,
    ) -> Result<(), Refusal>;
    /// Takes the service back at the request of the standby acting for this node (automatic fallback): runs a
    /// planned switchover towards this node and returns when it is primary again. Refused by default.
    fn handback(&self, peer: &str, reason: &str) -> Result<(), Refusal> {
        let _ = reason;
        Err(Refusal::new(code::REFUSED, format!("this node does not take a service back at the request of {peer}")))
    }
}

/// Why a session ended other than by the peer's `Bye` or a clean close.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The connection failed.
    #[error(transparent)]
    Conn(#[from] ConnError),
    /// This node refused a request and told the peer so.
    #[error("refused the peer's request: {0}")]
    Refused(Refusal),
}

/// The code sent when a target operation fails: the target's own refusal kind where it has one, else `default`.
fn code_for(e: &LinkError, default: u16) -> u16 {
    match e {
        LinkError::Remote { kind, .. } => remote_code(*kind),
        LinkError::Refused(_) => code::REFUSED,
        _ => default,
    }
}

fn refuse<S: Read + Write>(conn: &mut Connection<S>, r: Refusal) -> SessionError {
    conn.send_error(r.code, &r.message);
    SessionError::Refused(r)
}

fn fail<S: Read + Write>(conn: &mut Connection<S>, e: LinkError, default: u16) -> SessionError {
    let code = code_for(&e, default);
    refuse(conn, Refusal::new(code, link::error_chain(&e)))
}

/// Serves one authenticated session until the peer says `Bye` or closes between frames (`Ok`), or a request is
/// refused or the connection fails (`Err`, after the refusal was sent to the peer).
pub fn serve_session<S: Read + Write, N: Standby>(conn: &mut Connection<S>, node: &N) -> Result<(), SessionError> {
    let mut open: Option<N::Target> = None;
    loop {
        let msg = match conn.recv() {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(()),
            Err(e @ ConnError::Frame(_)) => {
                // Altered, forged or replayed: say so before closing, so the primary reports this instead of a
                // broken pipe.
                conn.send_error(code::PROTOCOL, &format!("the standby refused a frame: {e}"));
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        };
        let reply = match (msg, open.as_mut()) {
            (Message::OpenVolume(o), _) => {
                drop(open.take()); // release the previous volume before opening another
                let peer = conn.peer_node().to_string();
                let mut target = node.open_volume(&peer, &o).map_err(|r| refuse(conn, r))?;
                let info = target.info().map_err(|e| fail(conn, e, code::FAILED))?;
                open = Some(target);
                Message::VolumeInfo(info)
            }
            (Message::Bye, _) => return Ok(()),
            (Message::Keepalive, _) => continue,
            (Message::RoleReq, _) => Message::RoleInfo(node.role().map_err(|r| refuse(conn, r))?),
            (Message::DemoteReq(reason), _) => {
                let peer = conn.peer_node().to_string();
                let mut confirm = |list: Vec<Committed>| -> Result<(), Refusal> {
                    let lost = |e: ConnError| Refusal::new(code::FAILED, link::error_chain(&e));
                    conn.send(&Message::FinalSynced(list)).map_err(lost)?;
                    match conn.recv_expect("the peer's check of the final sync") {
                        Ok(Message::DemoteConfirm) => Ok(()),
                        Ok(other) => Err(Refusal::new(
                            code::PROTOCOL,
                            format!("protocol violation: {} instead of DemoteConfirm", other.frame_type()),
                        )),
                        Err(ConnError::Remote { code, message }) => Err(Refusal::new(code, message)),
                        Err(e) => Err(lost(e)),
                    }
                };
                let done = node.demote(&peer, &reason, &mut confirm);
                done.map_err(|r| refuse(conn, r))?;
                Message::DemoteDone
            }
            (Message::HandbackReq(reason), _) => {
                let peer = conn.peer_node().to_string();
                node.handback(&peer, &reason).map_err(|r| refuse(conn, r))?;
                Message::HandbackDone
            }
            (Message::Begin(b), Some(t)) => Message::BeginAck(t.begin(&b).map_err(|e| fail(conn, e, code::REFUSED))?),
            (Message::BlockHashesReq { first, count }, Some(t)) => {
                Message::BlockHashes(t.block_hashes(first, count).map_err(|e| fail(conn, e, code::FAILED))?)
            }
            (Message::SubHashesReq(blocks), Some(t)) => {
                Message::SubHashes(t.sub_hashes(&blocks).map_err(|e| fail(conn, e, code::FAILED))?)
            }
            (Message::Extent(e), Some(t)) => {
                t.extent(e).map_err(|e| fail(conn, e, code::REFUSED))?;
                continue;
            }
            (Message::Commit(root), Some(t)) => {
                Message::CommitAck(t.commit(root).map_err(|e| fail(conn, e, code::FAILED))?)
            }
            (other, _) => {
                let message = format!("protocol violation: unexpected {} message", other.frame_type());
                return Err(refuse(conn, Refusal::new(code::PROTOCOL, message)));
            }
        };
        conn.send(&reply)?;
    }
}
