//! The listeners nogap holds, by a number that never changes, and what a
//! reload does to them.
//!
//! A listener keeps its index for as long as nogap runs: steering pools,
//! watched queues and each generation's socket list name it by index. A
//! reload that adds a `listen` entry binds a new listener at the next
//! index; one that drops an entry leaves the listener open while any
//! generation that has it is alive (the policy decides, `Action::
//! CloseSockets`), and its slot is then empty for good.
//!
//! [`plan`] is pure: it matches the re-read `listen` list against the open
//! listeners (same name and address: the same socket, never rebound),
//! refuses what nogap cannot change while it runs, and says what to bind.
//! [`Listeners::deploy`] binds it, all or nothing.

use std::ops::{Index, IndexMut};
use std::os::fd::RawFd;

use super::{bind, Listener};
use crate::config::ListenSpec;
use crate::error::Error;

/// The listeners, by index; a closed one leaves its index empty.
#[derive(Debug, Default)]
pub struct Listeners(Vec<Option<Listener>>);

impl From<Vec<Listener>> for Listeners {
    fn from(v: Vec<Listener>) -> Listeners {
        Listeners(v.into_iter().map(Some).collect())
    }
}

impl From<Vec<Option<Listener>>> for Listeners {
    fn from(v: Vec<Option<Listener>>) -> Listeners {
        Listeners(v)
    }
}

impl Index<usize> for Listeners {
    type Output = Listener;
    /// Listener `i`, which must be open: whoever names an index got it
    /// from a generation alive or from the steering, which forget it first.
    fn index(&self, i: usize) -> &Listener {
        self.0[i].as_ref().expect("an open listener")
    }
}

impl IndexMut<usize> for Listeners {
    fn index_mut(&mut self, i: usize) -> &mut Listener {
        self.0[i].as_mut().expect("an open listener")
    }
}

impl Listeners {
    /// The open listeners with their indices.
    pub fn iter(&self) -> impl Iterator<Item = (usize, &Listener)> {
        self.0
            .iter()
            .enumerate()
            .filter_map(|(i, l)| Some((i, l.as_ref()?)))
    }

    pub fn get(&self, i: usize) -> Option<&Listener> {
        self.0.get(i)?.as_ref()
    }

    /// Indices ever given out (open or closed).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(Option::is_none)
    }

    /// The open listeners' indices, in order.
    pub fn open(&self) -> Vec<usize> {
        self.iter().map(|(i, _)| i).collect()
    }

    /// Every index's name (a closed one: `#i`), for logs and status.
    pub fn names(&self) -> Vec<String> {
        (0..self.len())
            .map(|i| self.get(i).map_or(format!("#{i}"), |l| l.name.clone()))
            .collect()
    }

    /// Every index's descriptor, -1 where closed.
    pub fn raw_fds(&self) -> Vec<RawFd> {
        self.0
            .iter()
            .map(|l| l.as_ref().map_or(-1, Listener::raw_fd))
            .collect()
    }

    /// Hold `l` at the next index.
    pub fn push(&mut self, l: Listener) -> usize {
        self.0.push(Some(l));
        self.0.len() - 1
    }

    /// Take listener `i` out (to close it); its index stays empty.
    pub fn take(&mut self, i: usize) -> Option<Listener> {
        self.0.get_mut(i)?.take()
    }

    /// The sockets of a generation whose listeners are `set`, in its
    /// hand-off order: the descriptor each gets (`fds`, by index) and the
    /// listener. An index that is closed is an error naming it.
    pub fn hand_off(
        &self,
        set: &[usize],
        fds: &[RawFd],
    ) -> Result<Vec<(RawFd, &Listener)>, String> {
        set.iter()
            .map(|&i| match (self.get(i), fds.get(i)) {
                (Some(l), Some(&fd)) => Ok((fd, l)),
                _ => Err(format!("socket #{i} of this generation is closed")),
            })
            .collect()
    }

    /// Bind what `plan` asks for (all or nothing: on an error, what was
    /// bound is closed again) and return the new generation's listeners.
    pub fn deploy(
        &mut self,
        plan: &Plan,
        backlog: i32,
        reuseport: bool,
        steer: bool,
    ) -> Result<Vec<usize>, Error> {
        let mut bound = Vec::new();
        for entry in &plan.entries {
            if let Entry::Bind(spec) = entry {
                bound.push(bind::bind(spec, backlog, reuseport, steer)?);
            }
        }
        let mut bound = bound.into_iter();
        let mut set = Vec::new();
        for entry in &plan.entries {
            set.push(match entry {
                Entry::Keep(i) => *i,
                Entry::Bind(_) => {
                    let l = bound.next().expect("one bound per Bind");
                    tracing::info!(socket = %l.name, addr = %l.endpoint, "listening (added by a reload)");
                    self.push(l)
                }
            });
        }
        Ok(set)
    }
}

/// One socket of the new generation, in hand-off order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// An open listener, kept (same name and address).
    Keep(usize),
    /// A new address to bind.
    Bind(ListenSpec),
}

/// What a reload does to the listeners.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub entries: Vec<Entry>,
}

impl Plan {
    /// The new generation's sockets as name and address, in hand-off order
    /// (what the templates and hand-off forms are checked against).
    pub fn named<'a>(&'a self, held: &'a Listeners) -> Vec<(&'a str, &'a crate::spec::Endpoint)> {
        self.entries
            .iter()
            .map(|e| match e {
                Entry::Keep(i) => (held[*i].name.as_str(), &held[*i].endpoint),
                Entry::Bind(s) => (s.name.as_str(), &s.endpoint),
            })
            .collect()
    }

    /// Whether anything is bound, or the order changed.
    pub fn changes(&self, newest: &[usize]) -> bool {
        self.entries.iter().any(|e| matches!(e, Entry::Bind(_)))
            || self
                .entries
                .iter()
                .map(|e| match e {
                    Entry::Keep(i) => Some(*i),
                    Entry::Bind(_) => None,
                })
                .ne(newest.iter().map(|&i| Some(i)))
    }
}

/// Whether `spec` asks for the socket `l` is: the same name and address
/// (port 0, "any port", is the port it was given).
fn same(spec: &ListenSpec, l: &Listener) -> bool {
    use crate::spec::Endpoint::{Tcp, Udp};
    let any_port =
        |a: &std::net::SocketAddr, b: &std::net::SocketAddr| a.port() == 0 && a.ip() == b.ip();
    spec.name == l.name
        && match (&spec.endpoint, &l.endpoint) {
            (Tcp(a), Tcp(b)) | (Udp(a), Udp(b)) => a == b || any_port(a, b),
            (a, b) => a == b,
        }
}

/// What systemd owns, nogap cannot close or move: a socket it passed that
/// `--listen` did not ask for (socket unit), and without `--fd-store` one
/// it passed that `--listen` did ask for (socket unit too; with the fd
/// store it is nogap's own, taken back).
fn systemd_owns(l: &Listener, fd_store: bool) -> bool {
    !l.listed() || (l.inherited() && !fd_store)
}

/// The new generation's sockets for the `listen` list `specs`, given the
/// open listeners `held` and the newest generation's `newest` (indices, in
/// hand-off order): the sockets systemd passed that `--listen` did not ask
/// for come first, as at start, then `specs` in order, each an open
/// listener of the same name and address or a new one to bind. Refused,
/// with a message naming the socket: removing or re-addressing a socket
/// systemd owns (see `systemd_owns`), a new name on an address nogap
/// already listens on, and with `per_slot` (`--reuseport-per-worker`) any
/// change to the set of sockets.
pub fn plan(
    held: &Listeners,
    newest: &[usize],
    specs: &[ListenSpec],
    fd_store: bool,
    per_slot: bool,
) -> Result<Plan, String> {
    let by_name = |name: &str| held.iter().find(|(_, l)| l.name == name);
    let mut entries: Vec<Entry> = newest
        .iter()
        .filter(|&&i| !held[i].listed())
        .map(|&i| Entry::Keep(i))
        .collect();
    for spec in specs {
        if let Some((i, _)) = held.iter().find(|(_, l)| same(spec, l)) {
            if !entries.contains(&Entry::Keep(i)) {
                entries.push(Entry::Keep(i));
            }
            continue;
        }
        if let Some((_, l)) = by_name(&spec.name) {
            if systemd_owns(l, fd_store) && newest.iter().any(|&i| held[i].name == l.name) {
                return Err(format!(
                    "socket {l} was passed by systemd (socket activation): nogap cannot give it another address (change the socket unit and restart)"
                ));
            }
        }
        if let Some((_, l)) = held.iter().find(|(_, l)| l.endpoint == spec.endpoint) {
            return Err(format!(
                "listen {}={}: nogap listens on that address already as socket '{}' (renaming a socket needs a restart)",
                spec.name, spec.endpoint, l.name
            ));
        }
        entries.push(Entry::Bind(spec.clone()));
    }
    for &i in newest {
        let kept = entries.contains(&Entry::Keep(i));
        if !kept && systemd_owns(&held[i], fd_store) {
            return Err(format!(
                "socket {} was passed by systemd (socket activation): nogap cannot remove it (change the socket unit and restart)",
                held[i]
            ));
        }
    }
    let plan = Plan { entries };
    if per_slot {
        let mut old: Vec<usize> = newest.to_vec();
        let mut new: Vec<Option<usize>> = plan
            .entries
            .iter()
            .map(|e| match e {
                Entry::Keep(i) => Some(*i),
                Entry::Bind(_) => None,
            })
            .collect();
        old.sort_unstable();
        new.sort_unstable();
        if new != old.into_iter().map(Some).collect::<Vec<_>>() {
            return Err("listen cannot change with reuseport-per-worker: each worker slot holds its own copy of every socket, made at start (restart nogap to change it)".into());
        }
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sockets::Origin;

    fn listener(name: &str, addr: &str, origin: Origin) -> Listener {
        let fd = std::os::fd::OwnedFd::from(std::net::UdpSocket::bind("127.0.0.1:0").unwrap());
        Listener::new(name.into(), tcp(addr), origin, fd)
    }

    fn tcp(addr: &str) -> crate::spec::Endpoint {
        crate::spec::Endpoint::Tcp(addr.parse().unwrap())
    }

    fn spec(name: &str, addr: &str) -> ListenSpec {
        ListenSpec {
            name: name.into(),
            endpoint: tcp(addr),
            unix: Default::default(),
        }
    }

    fn held() -> Listeners {
        Listeners::from(vec![
            listener("http", "127.0.0.1:8080", Origin::Bound),
            listener("admin", "127.0.0.1:9000", Origin::Bound),
        ])
    }

    #[test]
    fn kept_sockets_are_the_same_and_new_ones_are_bound_in_order() {
        let h = held();
        let p = plan(
            &h,
            &[0, 1],
            &[
                spec("extra", "127.0.0.1:9001"),
                spec("http", "127.0.0.1:8080"),
            ],
            false,
            false,
        )
        .unwrap();
        assert_eq!(
            p.entries,
            [Entry::Bind(spec("extra", "127.0.0.1:9001")), Entry::Keep(0)]
        );
        assert!(p.changes(&[0, 1]));
        let same = plan(
            &h,
            &[0, 1],
            &[
                spec("http", "127.0.0.1:8080"),
                spec("admin", "127.0.0.1:9000"),
            ],
            false,
            false,
        )
        .unwrap();
        assert!(!same.changes(&[0, 1]));
        let swapped = plan(
            &h,
            &[0, 1],
            &[
                spec("admin", "127.0.0.1:9000"),
                spec("http", "127.0.0.1:8080"),
            ],
            false,
            false,
        )
        .unwrap();
        assert_eq!(swapped.entries, [Entry::Keep(1), Entry::Keep(0)]);
    }

    #[test]
    fn a_new_address_under_a_kept_name_is_a_new_socket() {
        let p = plan(
            &held(),
            &[0, 1],
            &[spec("http", "127.0.0.1:8081")],
            false,
            false,
        )
        .unwrap();
        assert_eq!(p.entries, [Entry::Bind(spec("http", "127.0.0.1:8081"))]);
    }

    #[test]
    fn a_taken_address_under_another_name_is_refused() {
        let e = plan(
            &held(),
            &[0, 1],
            &[spec("web", "127.0.0.1:8080")],
            false,
            false,
        )
        .unwrap_err();
        assert!(
            e.contains("listen web=tcp://127.0.0.1:8080") && e.contains("'http'"),
            "{e}"
        );
    }

    #[test]
    fn systemd_sockets_stay_first_and_cannot_be_removed_or_moved() {
        let mut h = held();
        h.push(listener("activated", "127.0.0.1:7000", Origin::Inherited));
        h.push(listener("unit", "127.0.0.1:7001", Origin::Restored));
        let p = plan(
            &h,
            &[2, 3, 0],
            &[
                spec("unit", "127.0.0.1:7001"),
                spec("http", "127.0.0.1:8080"),
            ],
            false,
            false,
        )
        .unwrap();
        assert_eq!(p.entries, [Entry::Keep(2), Entry::Keep(3), Entry::Keep(0)]);
        let e = plan(
            &h,
            &[2, 3, 0],
            &[spec("http", "127.0.0.1:8080")],
            false,
            false,
        )
        .unwrap_err();
        assert!(
            e.starts_with("socket unit=tcp://127.0.0.1:7001 was passed by systemd"),
            "{e}"
        );
        let e = plan(
            &h,
            &[2, 3, 0],
            &[spec("unit", "127.0.0.1:7002")],
            false,
            false,
        )
        .unwrap_err();
        assert!(e.contains("cannot give it another address"), "{e}");
        // With the fd store, a restored socket is nogap's own.
        let p = plan(
            &h,
            &[2, 3, 0],
            &[spec("http", "127.0.0.1:8080")],
            true,
            false,
        )
        .unwrap();
        assert_eq!(p.entries, [Entry::Keep(2), Entry::Keep(0)]);
    }

    #[test]
    fn per_slot_copies_allow_only_another_order() {
        let h = held();
        let swapped = [
            spec("admin", "127.0.0.1:9000"),
            spec("http", "127.0.0.1:8080"),
        ];
        assert!(plan(&h, &[0, 1], &swapped, false, true).is_ok());
        let e = plan(&h, &[0, 1], &swapped[..1], false, true).unwrap_err();
        assert!(e.contains("reuseport-per-worker"), "{e}");
    }

    #[test]
    fn a_closed_index_stays_empty() {
        let mut h = held();
        assert!(h.take(0).is_some());
        assert_eq!(h.open(), [1]);
        assert_eq!(h.names(), ["#0", "admin"]);
        assert_eq!(h.raw_fds()[0], -1);
        assert!(h.hand_off(&[0], &h.raw_fds()).is_err());
        let l = listener("new", "127.0.0.1:9002", Origin::Bound);
        assert_eq!(h.push(l), 2);
    }
}
