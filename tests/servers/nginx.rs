//! A stock nginx from Debian (`daemon off;`), handed its socket in `NGINX`
//! as on a binary upgrade, 10 reloads.

use std::path::Path;

use crate::common::free_addr;
use crate::util::{
    assert_runs_as_test_user, children_of, reloads_under_load, require_setup, scratch, start,
    user_dir, worker_pids, NGINX, TEST_USER,
};

/// nginx.conf for `listen ADDR`; temp files in `run`.
pub fn nginx_conf(dir: &Path, listen: &str) -> std::path::PathBuf {
    nginx_conf_for(dir, &[listen])
}

/// nginx.conf with a `listen` per entry of `listen`.
pub fn nginx_conf_for(dir: &Path, listen: &[&str]) -> std::path::PathBuf {
    let run = user_dir(dir, "run");
    let r = run.display();
    let listen: String = listen
        .iter()
        .map(|l| format!("        listen {l};\n"))
        .collect();
    let conf = format!(
        r#"daemon off;
worker_processes 2;
error_log stderr notice;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {r}/body;
    proxy_temp_path {r}/proxy;
    fastcgi_temp_path {r}/fastcgi;
    uwsgi_temp_path {r}/uwsgi;
    scgi_temp_path {r}/scgi;
    server {{
{listen}        location / {{
            add_header X-Pid $pid;
            return 200 "pid $pid\n";
        }}
    }}
}}
"#
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    path
}

#[test]
fn nginx_inherits_through_nginx_variable_10_reloads() {
    require_setup();
    let dir = scratch();
    let addr = free_addr();
    let conf = nginx_conf(dir.path(), &addr.to_string());
    let pid = format!("pid {}/run/nginx-{{generation}}.pid;", dir.path().display());
    let args: Vec<String> = [
        "-l",
        &format!("http={addr}"),
        "--fds-as",
        "nginx",
        "--stop-signal",
        "QUIT",
        "--user",
        TEST_USER,
        "--nofile",
        "5000",
        "--ready",
        "alive:500ms",
        "--drain-timeout",
        "20s",
        "--",
        NGINX,
        "-e",
        "stderr",
        "-p",
        dir.path().to_str().unwrap(),
        "-c",
        conf.to_str().unwrap(),
        "-g",
        &pid,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let nogap = start(dir.path(), &args);
    let out = reloads_under_load(&nogap, addr, 10);
    out.assert_clean();
    let master = worker_pids(&nogap, 11);
    let workers: Vec<i32> = master.iter().flat_map(|&p| children_of(p)).collect();
    assert_eq!(workers.len(), 2, "nginx should have 2 worker processes");
    assert!(out.last_pids.iter().all(|p| workers.contains(&(*p as i32))));
    assert_runs_as_test_user(master.into_iter().chain(workers), 5000);
    assert_eq!(nogap.count_log("using inherited sockets from \"3;\""), 11);
}
