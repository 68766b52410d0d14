//! What a reload deploys, and the sockets it leaves behind.
//!
//! A reload re-reads the config file (see `config::reload`); its `listen`
//! list is planned against the listeners nogap holds (`sockets::set`):
//! kept sockets stay the same sockets, new addresses are bound before the
//! new generation starts, and the templates, hand-off forms and probe are
//! checked against the new generation's sockets. Anything that fails fails
//! the reload with a one-line reason, and what was bound for it is closed
//! again: the serving generation is untouched. A listener the new
//! generation does not have is closed once the policy says no generation
//! uses it ([`close`]).

use crate::config::RunConfig;
use crate::error::Error;
use crate::monitor::Integrity;
use crate::policy::{Event, Settings, WaiterId};
use crate::probe::Prober;
use crate::sockets::steer::Steering;
use crate::sockets::{set, Listeners};
use crate::worker::Launcher;

/// What a reload works on: the loop's sockets, launcher and prober.
pub struct Parts<'a> {
    pub listeners: &'a mut Listeners,
    pub steering: &'a mut Steering,
    pub launcher: &'a mut Launcher,
    pub prober: &'a mut Prober,
}

/// The event a reload asked for by `waiter` becomes: a plain `Reload`
/// without a config file, `Deploy` with the new generation's settings
/// (`newest`: the newest generation's), or `ReloadRejected` with why.
pub fn reload(p: Parts<'_>, newest: &Settings, waiter: Option<WaiterId>) -> Event {
    let new = match crate::config::reload::reread(p.launcher.config()) {
        Ok(None) => return Event::Reload { waiter },
        Ok(Some(new)) => new,
        Err(e) => return rejected(waiter, e),
    };
    match deploy(p, newest, new) {
        Ok(settings) => Event::Deploy {
            waiter,
            settings: Box::new(settings),
        },
        Err(e) => rejected(waiter, e),
    }
}

fn rejected(waiter: Option<WaiterId>, e: Error) -> Event {
    Event::ReloadRejected {
        waiter,
        reason: e.to_string(),
    }
}

fn deploy(p: Parts<'_>, newest: &Settings, new: RunConfig) -> Result<Settings, Error> {
    let file = new.config_file.as_ref().map(|f| f.display().to_string());
    let per_slot = new.per_worker_sockets;
    let plan = set::plan(
        p.listeners,
        &newest.listeners,
        &new.listen,
        new.fd_store,
        per_slot,
    )
    .map_err(|e| Error::Usage(format!("{}: {e}", file.unwrap_or_default())))?;
    Launcher::check(&new, &plan.named(p.listeners))?;
    let before = p.listeners.len();
    let set = p
        .listeners
        .deploy(&plan, new.backlog, new.reuseport, new.steer)?;
    // A probe or canary the sockets cannot take fails the reload, as at start.
    let probe = new.probe.as_ref();
    let canary = new.canary.as_ref();
    let usable = Prober::usable_on(probe, p.listeners, p.steering, &set)
        .and_then(|()| Prober::usable_canary_on(canary, p.listeners, p.steering, &set));
    if let Err(e) = usable {
        for i in before..p.listeners.len() {
            drop(p.listeners.take(i));
        }
        return Err(e);
    }
    let added: Vec<_> = (before..p.listeners.len())
        .map(|i| &p.listeners[i])
        .collect();
    if new.launch.fds_as.contains(&crate::spec::HandOff::Nginx) {
        added
            .iter()
            .for_each(|l| crate::sockets::nonblocking_for_nginx(std::slice::from_ref(*l)));
    }
    for l in &added {
        p.steering.added(l);
    }
    if new.fd_store {
        crate::sockets::store(added);
    }
    p.prober.deployed(p.listeners, p.steering, &set);
    p.launcher.deploy(new);
    let names = p.listeners.names();
    let mut settings = Settings::new(p.launcher.config(), p.steering.active(), names);
    settings.listeners = set;
    Ok(settings)
}

/// Close the listeners `gone`, which no generation uses any more: their
/// steered pools, their descriptors' baselines, and with `fd_store` their
/// place in systemd's fd store go with them.
pub fn close(
    listeners: &mut Listeners,
    steering: &mut Steering,
    integrity: &mut Integrity,
    gone: &[usize],
    fd_store: bool,
) {
    for &i in gone {
        if listeners.get(i).is_none() {
            continue;
        }
        let fds = steering.forget(listeners, i);
        let Some(l) = listeners.take(i) else { continue };
        for fd in fds.into_iter().chain([l.raw_fd()]) {
            integrity.forget(fd);
        }
        tracing::info!(socket = %l.name, addr = %l.endpoint, "socket closed: no generation uses it");
        if fd_store && l.listed() {
            crate::sockets::intake::unstore(&l.name);
            // That took out every socket of the name: one that kept the
            // name at another address goes back in.
            let same = listeners
                .iter()
                .map(|(_, o)| o)
                .filter(|o| o.name == l.name);
            crate::sockets::store(same);
        }
    }
}
