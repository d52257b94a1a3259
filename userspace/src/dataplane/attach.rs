//! Attaching programs to interfaces: XDP by bpf_link, TC by netlink on clsact.

use std::{fmt, path::Path};

use aya::{
    maps::Array,
    programs::{
        links::{FdLink, PinnedLink},
        tc::{self, NlOptions, TcAttachOptions},
        tc::{SchedClassifierLink, SchedClassifierLinkId},
        xdp::XdpLinkId,
        Program, ProgramError, SchedClassifier, TcAttachType, TracePoint, Xdp,
        XdpMode as AyaXdpMode,
    },
    Ebpf,
};
use tapmesh_common::{map_names, program_names};

use super::DataplaneError;
use crate::{config::XdpMode, net::qdisc};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Xdp,
    TcIngress,
    TcEgress,
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Hook::Xdp => "xdp",
            Hook::TcIngress => "tc-ingress",
            Hook::TcEgress => "tc-egress",
        })
    }
}

/// A program attached to an interface, as reported by `tapmesh status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub interface: String,
    pub hook: Hook,
    pub program: &'static str,
    /// XDP: "native" or "generic", followed by ", kept link replaced" when
    /// a kept link took the new program.
    pub mode: String,
    /// TC: the clsact qdisc was created by us and is removed on stop.
    pub created_clsact: bool,
    /// The interface's index when attached (a re-created interface has another).
    pub ifindex: Option<u32>,
    /// Made at start (uplinks, `tc_interfaces`): readiness needs it.
    pub at_start: bool,
}

/// Whether the kernel still runs `a`'s program on its hook: something
/// else may have detached it, or removed the interface (a re-created one
/// has another index and none of our programs). Only what the kernel
/// answered counts as gone: a lookup that failed, or an interface with
/// XDP programs in two modes (the kernel then names neither), reads as
/// still there.
pub fn in_kernel(a: &Attachment) -> bool {
    let link = match crate::net::link::by_name(&a.interface) {
        Ok(link) => link,
        Err(crate::net::NetError::NoInterface(_)) => return false,
        Err(_) => return true,
    };
    if a.ifindex.is_some_and(|index| index != link.index) {
        return false;
    }
    // The kernel keeps a program's name to 15 bytes.
    let ours = |name: &str| name.as_bytes() == &a.program.as_bytes()[..a.program.len().min(15)];
    match a.hook {
        Hook::Xdp if link.xdp_mode == Some("multiple") => true,
        Hook::Xdp => link.xdp_program.is_some_and(|id| {
            aya::programs::loaded_programs()
                .flatten()
                .find(|p| p.id() == id)
                .and_then(|p| p.name_as_str().map(ours))
                .unwrap_or(true)
        }),
        Hook::TcIngress | Hook::TcEgress => {
            match crate::net::qdisc::bpf_filters(&a.interface, a.hook == Hook::TcEgress) {
                Ok(filters) => filters.iter().any(|f| ours(&f.name)),
                Err(_) => true,
            }
        }
    }
}

/// Links this daemon owns, by the interface they are on.
#[derive(Default)]
pub struct Links {
    pub xdp: Vec<(String, XdpLinkId)>,
    pub tc: Vec<(String, &'static str, SchedClassifierLinkId)>,
    /// `tm_xdp_mirror` on mirror ring interfaces (never kept: rings go with the daemon).
    pub mirror: Vec<(String, XdpLinkId)>,
    /// Uplink links pinned when attached (keep_dataplane): they outlive
    /// the process however it ends.
    pub pinned: Vec<(String, PinnedLink)>,
}

impl Links {
    /// Unpins and so detaches the pinned links (a start that failed).
    pub fn unpin_all(&mut self) {
        for (interface, link) in self.pinned.drain(..) {
            if let Err(e) = link.unpin() {
                tracing::warn!(interface, "unpinning the XDP link: {e}");
            }
        }
    }
}

/// Every program the daemon loads, the longest to verify first.
const PROGRAMS: [&str; 14] = [
    program_names::XDP_UPLINK,
    program_names::TC_SERVICE,
    program_names::TC_INGRESS,
    program_names::TC_TAP_OUT,
    program_names::TC_CONDUIT,
    program_names::TC_EGRESS,
    program_names::XDP_PORT_NAT,
    program_names::TC_TAP_IN,
    program_names::XDP_FLOOR,
    program_names::XDP_MIRROR,
    program_names::TC_FLOOR,
    program_names::TP_XMIT,
    program_names::TP_REDIRECT_ERR,
    program_names::TP_BULK_TX,
];

/// Loads every program of the object into the kernel (the verifier runs
/// here), each on its own thread: verification is most of a start (the
/// uplink alone takes seconds), and the kernel verifies privileged loads in
/// parallel, so a start or a kept restart takes about the longest program's
/// time rather than the sum.
pub fn load_programs(ebpf: &mut Ebpf) -> Result<(), DataplaneError> {
    let mut found: Vec<(&'static str, &mut Program)> = Vec::with_capacity(PROGRAMS.len());
    for (name, program) in ebpf.programs_mut() {
        if let Some(&name) = PROGRAMS.iter().find(|&&n| n == name) {
            found.push((name, program));
        }
    }
    if let Some(&name) = PROGRAMS
        .iter()
        .find(|&&n| !found.iter().any(|(f, _)| *f == n))
    {
        return Err(DataplaneError::Map {
            name,
            message: "program missing from the object".into(),
        });
    }
    found.sort_by_key(|(name, _)| PROGRAMS.iter().position(|n| n == name));
    let results: Vec<(&'static str, Result<(), ProgramError>)> = std::thread::scope(|scope| {
        let running: Vec<_> = found
            .into_iter()
            .map(|(name, program)| (name, scope.spawn(move || load_one(name, program))))
            .collect();
        running
            .into_iter()
            .map(|(name, thread)| {
                let result = thread
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                (name, result)
            })
            .collect()
    });
    for (name, result) in results {
        result.map_err(|source| DataplaneError::Program { name, source })?;
    }
    install_tails(ebpf)
}

fn load_one(name: &'static str, program: &mut Program) -> Result<(), ProgramError> {
    match program {
        Program::Xdp(p) => p.load(),
        Program::SchedClassifier(p) => p.load(),
        Program::TracePoint(p) => p.load(),
        other => {
            tracing::error!(
                program = name,
                "unexpected program type {:?}",
                other.prog_type()
            );
            Err(ProgramError::UnexpectedProgramType)
        }
    }
}

/// Loads the uplink's tail programs and puts them in `tm_xdp_tails`
/// (before the uplink is attached: until then its port NAT packets drop).
pub fn install_tails(ebpf: &mut Ebpf) -> Result<(), DataplaneError> {
    let name = program_names::XDP_PORT_NAT;
    let program = xdp_program(ebpf, name)?;
    if program.fd().is_err() {
        program
            .load()
            .map_err(|source| DataplaneError::Program { name, source })?;
    }
    let fd = program
        .fd()
        .map_err(|source| DataplaneError::Program { name, source })?
        .try_clone()
        .map_err(|e| DataplaneError::Map {
            name,
            message: format!("duplicating its descriptor: {e}"),
        })?;
    let tails = map_names::XDP_TAILS;
    let mut array: aya::maps::ProgramArray<_> = ebpf
        .map_mut(tails)
        .ok_or(DataplaneError::Map {
            name: tails,
            message: "map missing from the object".into(),
        })?
        .try_into()
        .map_err(|e: aya::maps::MapError| DataplaneError::Map {
            name: tails,
            message: e.to_string(),
        })?;
    array
        .set(tapmesh_common::lb::TAIL_PORT_NAT, &fd, 0)
        .map_err(|e| DataplaneError::Map {
            name: tails,
            message: e.to_string(),
        })
}

fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, DataplaneError> {
    let program = ebpf.program_mut(name).ok_or(DataplaneError::Map {
        name,
        message: "program missing from the object".into(),
    })?;
    program
        .try_into()
        .map_err(|source| DataplaneError::Program { name, source })
}

fn tc_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, DataplaneError> {
    let program = ebpf.program_mut(name).ok_or(DataplaneError::Map {
        name,
        message: "program missing from the object".into(),
    })?;
    program
        .try_into()
        .map_err(|source| DataplaneError::Program { name, source })
}

fn link_pin(pin_dir: &Path, interface: &str) -> std::path::PathBuf {
    pin_dir.join("links").join(format!("xdp_{interface}"))
}

/// Attaches the uplink program. A link kept by an earlier daemon is replaced
/// atomically; otherwise native mode is tried first when `mode` is auto.
pub fn xdp(
    ebpf: &mut Ebpf,
    links: &mut Links,
    interface: &str,
    mode: XdpMode,
    pin_dir: &Path,
    keep: bool,
) -> Result<Attachment, DataplaneError> {
    let attachment = xdp_link(ebpf, links, interface, mode, pin_dir)?;
    if keep {
        // Pinned now, not at stop: a daemon killed without a stop leaves the
        // program attached, and the next start replaces it through the pin.
        let (_, id) = links.xdp.pop().expect("xdp_link pushed its link");
        let program = xdp_program(ebpf, program_names::XDP_UPLINK)?;
        let fail = |message: String| DataplaneError::Attach {
            hook: Hook::Xdp,
            interface: interface.into(),
            message,
        };
        let link = program.take_link(id).map_err(|e| fail(e.to_string()))?;
        let fd_link: FdLink = link
            .try_into()
            .map_err(|e| fail(format!("not a bpf_link: {e}")))?;
        let pin = link_pin(pin_dir, interface);
        if let Some(dir) = pin.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| fail(format!("creating {}: {e}", dir.display())))?;
        }
        let pinned = fd_link
            .pin(&pin)
            .map_err(|e| fail(format!("pinning the link at {}: {e}", pin.display())))?;
        links.pinned.push((interface.into(), pinned));
    }
    Ok(attachment)
}

fn xdp_link(
    ebpf: &mut Ebpf,
    links: &mut Links,
    interface: &str,
    mode: XdpMode,
    pin_dir: &Path,
) -> Result<Attachment, DataplaneError> {
    let name = program_names::XDP_UPLINK;
    let program = xdp_program(ebpf, name)?;
    let mut attachment = Attachment {
        interface: interface.into(),
        hook: Hook::Xdp,
        program: name,
        mode: String::new(),
        created_clsact: false,
        ifindex: crate::net::link::index(interface),
        at_start: false,
    };

    let kept_pin = link_pin(pin_dir, interface);
    if let Ok(pinned) = PinnedLink::from_pin(&kept_pin) {
        // A link keeps the mode it was attached in: one the configuration
        // no longer allows is dropped (a moment without XDP) and the program
        // attached afresh in the mode asked for.
        let kept_mode = crate::net::link::by_name(interface)
            .ok()
            .and_then(|l| l.xdp_mode);
        let wanted = match mode {
            XdpMode::Auto => None,
            XdpMode::Native => Some("native"),
            XdpMode::Generic => Some("generic"),
        };
        if let (Some(kept), Some(wanted)) = (kept_mode, wanted) {
            if kept != wanted {
                tracing::warn!(
                    interface,
                    kept,
                    wanted,
                    "the kept XDP link runs in another mode than xdp_mode asks: detaching it \
                     and attaching the program afresh"
                );
                let _ = std::fs::remove_file(&kept_pin);
                drop(FdLink::from(pinned));
                return xdp_attach(program, links, attachment, interface, mode);
            }
        }
        // The pin stays until the replacement worked, so a failure keeps the old program.
        let replaced = FdLink::from(pinned)
            .try_into()
            .map_err(|e: aya::programs::links::LinkError| e.to_string())
            .and_then(|link| program.attach_to_link(link).map_err(|e| e.to_string()));
        match replaced {
            Ok(id) => {
                let _ = std::fs::remove_file(&kept_pin);
                links.xdp.push((interface.into(), id));
                attachment.mode = match kept_mode {
                    Some(kept) => format!("{kept}, kept link replaced"),
                    None => "kept link replaced".into(),
                };
                return Ok(attachment);
            }
            Err(e) => {
                // A link whose interface was deleted and re-created cannot be updated.
                tracing::warn!(interface, "kept XDP link is stale ({e}); attaching afresh");
                let _ = std::fs::remove_file(&kept_pin);
            }
        }
    }
    xdp_attach(program, links, attachment, interface, mode)
}

/// Attaches the uplink program in `mode` (auto: native, else generic).
fn xdp_attach(
    program: &mut Xdp,
    links: &mut Links,
    mut attachment: Attachment,
    interface: &str,
    mode: XdpMode,
) -> Result<Attachment, DataplaneError> {
    let fail = |message: String| DataplaneError::Attach {
        hook: Hook::Xdp,
        interface: interface.into(),
        message,
    };

    let tries: &[(AyaXdpMode, &str)] = match mode {
        XdpMode::Auto => &[(AyaXdpMode::Driver, "native"), (AyaXdpMode::Skb, "generic")],
        XdpMode::Native => &[(AyaXdpMode::Driver, "native")],
        XdpMode::Generic => &[(AyaXdpMode::Skb, "generic")],
    };
    let mut errors = Vec::new();
    for (aya_mode, label) in tries {
        match program.attach(interface, *aya_mode) {
            Ok(id) => {
                links.xdp.push((interface.into(), id));
                attachment.mode = (*label).into();
                return Ok(attachment);
            }
            Err(e) => errors.push(format!("{label}: {}", crate::causes(&e))),
        }
    }
    Err(fail(errors.join("; ")))
}

/// The full TC programs (parse, count, mirror).
pub const TC_FULL: [&str; 2] = [program_names::TC_INGRESS, program_names::TC_EGRESS];
/// A container's host-side veth: service translation out, mirror copies in.
pub const TC_CONTAINER: [&str; 2] = [program_names::TC_SERVICE, program_names::TC_TAP_IN];
/// Mirror copies only (a source port that is not one of ours).
pub const TC_TAP: [&str; 2] = [program_names::TC_TAP_OUT, program_names::TC_TAP_IN];
/// On a conduit's node-side veth: port NAT of replies (and mirror copies both ways).
pub const TC_CONDUIT: [&str; 2] = [program_names::TC_CONDUIT, program_names::TC_TAP_IN];

/// Attaches the TC ingress and egress programs (adding clsact if needed),
/// appending to `attachments` as it goes so a failure can be undone.
pub fn tc(
    ebpf: &mut Ebpf,
    links: &mut Links,
    attachments: &mut Vec<Attachment>,
    interface: &str,
) -> Result<(), DataplaneError> {
    tc_programs(ebpf, links, attachments, interface, TC_FULL)
}

/// Attaches `[ingress, egress]`; if egress fails, ingress is detached again.
pub fn tc_programs(
    ebpf: &mut Ebpf,
    links: &mut Links,
    attachments: &mut Vec<Attachment>,
    interface: &str,
    [ingress, egress]: [&'static str; 2],
) -> Result<(), DataplaneError> {
    tc_hooks(
        ebpf,
        links,
        attachments,
        interface,
        &[(Hook::TcIngress, ingress), (Hook::TcEgress, egress)],
    )
}

/// An uplink's TC ingress: `tm_tc_tap_out`, which takes the frames its XDP
/// program passes for tapped ports to them (`ebpf/src/detour.rs`) and the
/// uplink's own OUT copies. Its egress stays bare until a tap flow needs it.
pub fn uplink_tc(
    ebpf: &mut Ebpf,
    links: &mut Links,
    attachments: &mut Vec<Attachment>,
    interface: &str,
) -> Result<(), DataplaneError> {
    tc_hooks(
        ebpf,
        links,
        attachments,
        interface,
        &[(Hook::TcIngress, program_names::TC_TAP_OUT)],
    )
}

/// A new random key for the uplinks' detour marks (`tm_detour_key`): what
/// the TC side trusts, which a veth peer's XDP program cannot know. Written
/// before anything is attached; a kept dataplane's programs read the new one.
pub fn write_detour_key(ebpf: &mut Ebpf) -> Result<(), DataplaneError> {
    let name = tapmesh_common::map_names::DETOUR_KEY;
    let fail = |message: String| DataplaneError::Map { name, message };
    let map = ebpf
        .map_mut(name)
        .ok_or_else(|| fail("missing from the object".into()))?;
    let mut keys: Array<_, u64> = Array::try_from(map).map_err(|e| fail(e.to_string()))?;
    // 0 means "no key": detours off.
    let key = rand::random::<u64>().max(1);
    keys.set(0, key, 0).map_err(|e| fail(e.to_string()))
}

/// A tap flow on an uplink: `tm_tc_tap_in` on its egress, beside the
/// ingress program it always carries (which stays attached: frames its XDP
/// program detours would be lost in a gap).
pub fn uplink_tap_egress(
    ebpf: &mut Ebpf,
    links: &mut Links,
    attachments: &mut Vec<Attachment>,
    interface: &str,
) -> Result<(), DataplaneError> {
    tc_hooks(
        ebpf,
        links,
        attachments,
        interface,
        &[(Hook::TcEgress, program_names::TC_TAP_IN)],
    )
}

/// Detaches the program on one TC hook of `interface` (a gone interface is
/// fine); the clsact qdisc stays with the other hook's attachment.
pub fn detach_tc_hook(
    ebpf: &mut Ebpf,
    links: &mut Links,
    attachments: &mut Vec<Attachment>,
    interface: &str,
    hook: Hook,
) -> Result<(), DataplaneError> {
    let Some(name) = attachments
        .iter()
        .find(|a| a.interface == interface && a.hook == hook)
        .map(|a| a.program)
    else {
        return Ok(());
    };
    let mut kept = Vec::new();
    for (ifname, program, id) in std::mem::take(&mut links.tc) {
        if ifname == interface && program == name {
            // An error here means the interface (and the filter with it) is gone.
            let _ = tc_program(ebpf, program)?.detach(id);
        } else {
            kept.push((ifname, program, id));
        }
    }
    links.tc = kept;
    attachments.retain(|a| !(a.interface == interface && a.hook == hook));
    Ok(())
}

/// Attaches each (hook, program) in turn; on a failure, what this call attached is detached again.
fn tc_hooks(
    ebpf: &mut Ebpf,
    links: &mut Links,
    attachments: &mut Vec<Attachment>,
    interface: &str,
    hooks: &[(Hook, &'static str)],
) -> Result<(), DataplaneError> {
    let created_clsact = match tc::qdisc_add_clsact(interface) {
        Ok(()) => true,
        Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => false,
        Err(e) => {
            return Err(DataplaneError::Attach {
                hook: Hook::TcIngress,
                interface: interface.into(),
                message: format!("adding the clsact qdisc: {e}"),
            })
        }
    };
    for (index, &(hook, name)) in hooks.iter().enumerate() {
        let kind = match hook {
            Hook::TcEgress => TcAttachType::Egress,
            _ => TcAttachType::Ingress,
        };
        let owned = links
            .tc
            .iter()
            .any(|(i, n, _)| i == interface && *n == name);
        // Not this daemon's own filter (attached again): that one is no
        // earlier daemon's to take over.
        let kept = (!owned)
            .then(|| kept_filter(interface, kind, name))
            .flatten();
        let attached = tc_program(ebpf, name).and_then(|program| {
            // A filter left by an earlier daemon (keep_dataplane) gets this
            // program in place: the kernel swaps it at the same priority and
            // handle, so no frame finds the hook empty, as XDP's pinned link
            // gives. Detach, then attach, only if that fails. (The link is
            // made here: one dropped unused would delete the filter.)
            if let Some((priority, handle)) = kept {
                let link =
                    SchedClassifierLink::attached(interface, kind, priority, handle.into(), None);
                match link
                    .map_err(ProgramError::from)
                    .and_then(|l| program.attach_to_link(l))
                {
                    Ok(id) => return Ok(id),
                    Err(e) => tracing::warn!(
                        interface,
                        program = name,
                        "the kept TC filter could not take the new program in place ({e}); \
                         replacing it"
                    ),
                }
            }
            let _ = tc::qdisc_detach_program(interface, kind, name);
            program
                .attach_with_options(
                    interface,
                    kind,
                    TcAttachOptions::Netlink(NlOptions::default()),
                )
                .map_err(|e| DataplaneError::Attach {
                    hook,
                    interface: interface.into(),
                    message: e.to_string(),
                })
        });
        match attached {
            Ok(id) => {
                links.tc.push((interface.into(), name, id));
                attachments.push(Attachment {
                    interface: interface.into(),
                    hook,
                    program: name,
                    mode: String::new(),
                    created_clsact: created_clsact && index == 0,
                    ifindex: crate::net::link::index(interface),
                    at_start: false,
                });
            }
            Err(e) => {
                if index > 0 {
                    // Undo the earlier hooks (and the clsact their attachment carries).
                    let _ = detach_tc(ebpf, links, attachments, interface);
                } else if created_clsact {
                    let _ = qdisc::delete_clsact(interface);
                }
                return Err(e);
            }
        }
    }
    Ok(())
}

/// The priority and handle of the filter of program `name` an earlier
/// daemon left on the hook; others of that name (none unless by hand) are
/// removed.
fn kept_filter(interface: &str, kind: TcAttachType, name: &str) -> Option<(u16, u32)> {
    let egress = kind == TcAttachType::Egress;
    let mut ours = qdisc::bpf_filters(interface, egress)
        .ok()?
        .into_iter()
        .filter(|f| f.name == name);
    let first = ours.next()?;
    for extra in ours {
        if let Ok(link) = SchedClassifierLink::attached(
            interface,
            kind,
            extra.priority,
            extra.handle.into(),
            None,
        ) {
            let _ = aya::programs::links::Link::detach(link);
        }
    }
    Some((first.priority, first.handle))
}

/// Leaves everything attached after the process exits: XDP links are pinned
/// (the uplinks' already are, since their attach), TC filters (netlink)
/// stay on their own.
pub fn keep(ebpf: &mut Ebpf, links: Links, pin_dir: &Path) -> Result<(), DataplaneError> {
    let links_dir = pin_dir.join("links");
    std::fs::create_dir_all(&links_dir)
        .map_err(|e| DataplaneError::Bpffs(format!("creating {}: {e}", links_dir.display())))?;
    let program = xdp_program(ebpf, program_names::XDP_UPLINK)?;
    for (interface, id) in links.xdp {
        let fail = |message: String| DataplaneError::Attach {
            hook: Hook::Xdp,
            interface: interface.clone(),
            message,
        };
        let link = program.take_link(id).map_err(|e| fail(e.to_string()))?;
        let fd_link: FdLink = link
            .try_into()
            .map_err(|e| fail(format!("not a bpf_link: {e}")))?;
        fd_link
            .pin(link_pin(pin_dir, &interface))
            .map_err(|e| fail(format!("pinning the link: {e}")))?;
    }
    for (_, name, id) in links.tc {
        if let Ok(link) = tc_program(ebpf, name)?.take_link(id) {
            // A netlink filter outlives the process unless detached.
            std::mem::forget(link);
        }
    }
    Ok(())
}

/// Removes the clsact qdiscs this daemon added, once they are empty: a
/// filter another tool added since keeps its qdisc (and itself).
pub fn cleanup(attachments: &[Attachment]) {
    for a in attachments.iter().filter(|a| a.created_clsact) {
        // A gone interface took its qdisc with it.
        if crate::net::link::index(&a.interface).is_none() {
            continue;
        }
        match qdisc::delete_clsact_if_empty(&a.interface) {
            Ok(true) => {}
            Ok(false) => tracing::info!(
                interface = %a.interface,
                "clsact left in place: it holds filters that are not tapmesh's"
            ),
            Err(e) => tracing::warn!(interface = %a.interface, "removing clsact: {e}"),
        }
    }
}

/// Detaches the TC programs from `interface` (an interface that is gone is
/// fine) and removes the clsact qdisc if we added it.
pub fn detach_tc(
    ebpf: &mut Ebpf,
    links: &mut Links,
    attachments: &mut Vec<Attachment>,
    interface: &str,
) -> Result<(), DataplaneError> {
    let mut kept = Vec::new();
    for (ifname, name, id) in std::mem::take(&mut links.tc) {
        if ifname == interface {
            // An error here means the interface (and the filter with it) is gone.
            let _ = tc_program(ebpf, name)?.detach(id);
        } else {
            kept.push((ifname, name, id));
        }
    }
    links.tc = kept;
    let ours: Vec<Attachment> = attachments
        .iter()
        .filter(|a| a.interface == interface && matches!(a.hook, Hook::TcIngress | Hook::TcEgress))
        .cloned()
        .collect();
    attachments.retain(|a| {
        !(a.interface == interface && matches!(a.hook, Hook::TcIngress | Hook::TcEgress))
    });
    cleanup(&ours);
    Ok(())
}

/// Attaches `tm_xdp_mirror` to a mirror ring's interface (native, else generic).
pub fn xdp_mirror(
    ebpf: &mut Ebpf,
    links: &mut Links,
    interface: &str,
) -> Result<Attachment, DataplaneError> {
    let name = program_names::XDP_MIRROR;
    let program = xdp_program(ebpf, name)?;
    let mut errors = Vec::new();
    for (mode, label) in [(AyaXdpMode::Driver, "native"), (AyaXdpMode::Skb, "generic")] {
        match program.attach(interface, mode) {
            Ok(id) => {
                links.mirror.push((interface.into(), id));
                return Ok(Attachment {
                    interface: interface.into(),
                    hook: Hook::Xdp,
                    program: name,
                    mode: label.into(),
                    created_clsact: false,
                    ifindex: crate::net::link::index(interface),
                    at_start: false,
                });
            }
            Err(e) => errors.push(format!("{label}: {}", crate::causes(&e))),
        }
    }
    Err(DataplaneError::Attach {
        hook: Hook::Xdp,
        interface: interface.into(),
        message: errors.join("; "),
    })
}

/// Detaches `tm_xdp_mirror` from `interface`.
pub fn detach_xdp_mirror(
    ebpf: &mut Ebpf,
    links: &mut Links,
    attachments: &mut Vec<Attachment>,
    interface: &str,
) -> Result<(), DataplaneError> {
    let program = xdp_program(ebpf, program_names::XDP_MIRROR)?;
    let mut kept = Vec::new();
    for (ifname, id) in std::mem::take(&mut links.mirror) {
        if ifname == interface {
            let _ = program.detach(id);
        } else {
            kept.push((ifname, id));
        }
    }
    links.mirror = kept;
    attachments.retain(|a| !(a.interface == interface && a.program == program_names::XDP_MIRROR));
    Ok(())
}

/// Counts the frames the uplinks' XDP redirected that the receiving device
/// refused (`redirect_failed`): marks the uplinks in `tm_uplink_bits` and
/// attaches `tm_tp_xmit` and `tm_tp_redir_err` to `xdp:xdp_devmap_xmit` and
/// `xdp:xdp_redirect_err` (tracefs is mounted if it is not). Runs while this daemon runs; a kernel without the tracepoint only
/// loses this counter, so a failure is a warning.
pub fn redirect_failures(ebpf: &mut Ebpf, uplinks: &[Attachment]) {
    let marked = (|| {
        let map = ebpf
            .map_mut(tapmesh_common::map_names::UPLINK_BITS)
            .ok_or("map missing")?;
        let mut bits: Array<_, u64> = Array::try_from(map).map_err(|e| e.to_string())?;
        for ifindex in uplinks.iter().filter_map(|a| a.ifindex) {
            let (word, bit) = tapmesh_common::mirror::filter_bit(ifindex);
            let old = bits.get(&word, 0).map_err(|e| e.to_string())?;
            bits.set(word, old | bit, 0).map_err(|e| e.to_string())?;
        }
        Ok::<(), String>(())
    })();
    if let Err(e) = marked {
        tracing::warn!("redirect_failed will not count: tm_uplink_bits: {e}");
        return;
    }
    if !Path::new("/sys/kernel/tracing/events").exists() {
        mount_tracefs();
    }
    for (name, event) in [
        (program_names::TP_XMIT, "xdp_devmap_xmit"),
        (program_names::TP_REDIRECT_ERR, "xdp_redirect_err"),
        (program_names::TP_BULK_TX, "xdp_bulk_tx"),
    ] {
        let attached = ebpf
            .program_mut(name)
            .and_then(|p| <&mut TracePoint>::try_from(p).ok())
            .ok_or_else(|| "program missing".to_string())
            .and_then(|p| p.attach("xdp", event).map_err(|e| e.to_string()));
        if let Err(e) = attached {
            tracing::warn!("redirect_failed will not count all: attaching to xdp:{event}: {e}");
        }
    }
}

fn mount_tracefs() {
    let (src, dst) = (c"tracefs", c"/sys/kernel/tracing");
    // SAFETY: valid C strings; no data argument.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            src.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        tracing::debug!("mounting tracefs: {}", std::io::Error::last_os_error());
    }
}
