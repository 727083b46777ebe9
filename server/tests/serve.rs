//! `lowtide-server serve` as a process: TOML config plus environment overrides,
//! a real request, and a clean stop on SIGTERM; on SQLite and PostgreSQL.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};

use common::{Db, TestDb};

fn http_get(addr: &str, path: &str, auth: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the server");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {auth}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

async fn serve_uses_config_and_env_and_stops_on_sigterm(db: Db) {
    let Some(tdb) = TestDb::new(db).await else { return };
    let cfg = tdb.dir.path().join("server.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = {:?}\nlisten = \"127.0.0.1:0\"\npeers_active_max = 3\nadmin_token = \"from-the-file-0123456789\"\n",
            tdb.dir.path().join("state")
        ),
    )
    .unwrap();
    let token = "from-the-environment-0123456789";
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lowtide-server"));
    cmd.args(["--config", cfg.to_str().unwrap(), "serve"])
        .env("LOWTIDE_ADMIN_TOKEN", token)
        .env("LOWTIDE_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null());
    if db == Db::Postgres {
        cmd.env("LOWTIDE_DATABASE_URL", &tdb.url);
    } else {
        cmd.env_remove("LOWTIDE_DATABASE_URL");
    }
    let mut child = cmd.spawn().expect("start lowtide-server serve");
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut addr = None;
    let mut log = String::new();
    for _ in 0..50 {
        let mut line = String::new();
        if err.read_line(&mut line).unwrap() == 0 {
            break;
        }
        log.push_str(&line);
        if let Some(i) = line.find("listen=") {
            addr = Some(line[i + 7..].split_whitespace().next().unwrap().to_string());
            break;
        }
    }
    let addr = addr.unwrap_or_else(|| panic!("no listen address in the log:\n{log}"));
    let backend = if db == Db::Postgres { "Postgres" } else { "Sqlite" };
    assert!(log.contains(&format!("backend={backend}")), "{log}");
    // The environment's admin token wins over the file's.
    assert!(http_get(&addr, "/v1/admin/agents", token).starts_with("HTTP/1.1 200"));
    assert!(http_get(&addr, "/v1/admin/agents", "from-the-file-0123456789").starts_with("HTTP/1.1 401"));
    if db == Db::Sqlite {
        assert!(
            tdb.dir.path().join("state/lowtide.db").is_file(),
            "SQLite lives in the configured state_dir"
        );
    }
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    let mut rest = String::new();
    err.read_to_string(&mut rest).unwrap();
    assert!(exit.success(), "exit {exit:?}: {rest}");
    assert!(rest.contains("shutting down") && rest.contains("stopped"), "{rest}");
    tdb.drop_db().await;
}

both!(serve_uses_config_and_env_and_stops_on_sigterm);
