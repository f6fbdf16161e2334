//! Two private network namespaces joined by a veth pair, for faults loopback cannot show: a
//! link that goes down without a FIN or a reset, so that each side sees only silence.
//!
//! Made with `ip netns add` (root, as in CI), named after this process so that parallel runs
//! never meet; removed on drop (the veth pair goes with them). Addresses are from 192.0.2.0/24
//! (TEST-NET-1, RFC 5737: never routed) and exist only inside the two namespaces, which have no
//! other interface: nothing reaches a host interface. Sockets are made in a namespace by a
//! thread that has joined it with `setns(2)` ([`NetnsPair::run_in`]); child processes are run
//! there with `ip netns exec`.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;

/// The engine's side of the pair.
pub const ENGINE_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// The client's side.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);

pub struct NetnsPair {
    /// Namespace of the engine (`ENGINE_IP` on `engine_if`).
    pub engine_ns: String,
    /// Namespace of the client (`CLIENT_IP` on `client_if`).
    pub client_ns: String,
    pub engine_if: String,
    pub client_if: String,
}

/// Runs `ip ARGS`; `Err` with its stderr if it fails.
pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip`: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl NetnsPair {
    /// Makes the pair, up, addressed and with loopback up on both sides; `Err` says why not
    /// (not root, no `ip`, no netns support), after removing whatever was made.
    pub fn create(tag: &str) -> Result<NetnsPair, String> {
        let id = std::process::id();
        let pair = NetnsPair {
            engine_ns: format!("lanpush-{tag}-{id}-e"),
            client_ns: format!("lanpush-{tag}-{id}-c"),
            // Interface names are at most 15 bytes.
            engine_if: format!("lpe{}", id % 1_000_000),
            client_if: format!("lpc{}", id % 1_000_000),
        };
        let (e, c) = (pair.engine_ns.clone(), pair.client_ns.clone());
        let (ei, ci) = (pair.engine_if.clone(), pair.client_if.clone());
        let (e, c, ei, ci) = (e.as_str(), c.as_str(), ei.as_str(), ci.as_str());
        let engine_addr = format!("{ENGINE_IP}/30");
        let client_addr = format!("{CLIENT_IP}/30");
        let steps: [&[&str]; 10] = [
            &["netns", "add", e],
            &["netns", "add", c],
            &["link", "add", ei, "type", "veth", "peer", "name", ci],
            &["link", "set", ei, "netns", e],
            &["link", "set", ci, "netns", c],
            &["-n", e, "addr", "add", &engine_addr, "dev", ei],
            &["-n", c, "addr", "add", &client_addr, "dev", ci],
            &["-n", e, "link", "set", ei, "up"],
            &["-n", c, "link", "set", ci, "up"],
            &["-n", e, "link", "set", "lo", "up"],
        ];
        for step in steps {
            if let Err(why) = ip(step) {
                drop(pair); // removes what was made
                return Err(why);
            }
        }
        Ok(pair)
    }

    /// Takes the engine's or the client's end of the link down: from then on neither side's
    /// packets reach the other, and nothing (no FIN, no reset, no ICMP) says so.
    pub fn link_down(&self, engine_side: bool) {
        self.set(engine_side, false);
    }

    /// Brings an end of the link back up.
    pub fn link_up(&self, engine_side: bool) {
        self.set(engine_side, true);
    }

    fn set(&self, engine_side: bool, up: bool) {
        if engine_side {
            set_link(&self.engine_ns, &self.engine_if, up);
        } else {
            set_link(&self.client_ns, &self.client_if, up);
        }
    }

    /// Runs `f` on a new thread that has joined namespace `ns` (sockets it makes live there),
    /// and returns its result.
    pub fn run_in<T: Send + 'static>(
        ns: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{ns}");
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: setns(2) with a descriptor we own for the call's duration; it changes the
            // network namespace of this thread only (the test's other threads keep theirs).
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
    }
}

/// Sets interface `dev` of namespace `ns` up or down.
pub fn set_link(ns: &str, dev: &str, up: bool) {
    let state = if up { "up" } else { "down" };
    ip(&["-n", ns, "link", "set", dev, state]).expect("set the link's state");
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth end in it, and with it the peer.
        let _ = ip(&["netns", "del", &self.engine_ns]);
        let _ = ip(&["netns", "del", &self.client_ns]);
        let _ = ip(&["link", "del", &self.engine_if]);
    }
}
