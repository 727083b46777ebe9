//! The `lowtide-server` command line against real databases: each admin
//! subcommand once, on SQLite and on PostgreSQL.

mod common;

use std::process::Command;

use common::{data, Db, TestDb};

struct Cli<'a> {
    db: &'a TestDb,
}

impl Cli<'_> {
    fn run(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_lowtide-server"))
            .args([
                "--state-dir",
                self.db.dir.path().to_str().unwrap(),
                "--database-url",
                &self.db.url,
            ])
            .args(args)
            .env("LOWTIDE_LOG", "warn")
            .env_remove("LOWTIDE_CONFIG")
            .output()
            .expect("run lowtide-server");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn ok(&self, args: &[&str]) -> String {
        let (code, out, err) = self.run(args);
        assert_eq!(code, 0, "lowtide-server {args:?} failed: {err}");
        out
    }
}

async fn admin_commands(db: Db) {
    let Some(db) = TestDb::new(db).await else { return };
    let cli = Cli { db: &db };
    // Topology: a bad file is refused with file:line errors and exit code 2; a good one imports.
    let bad = db.dir.path().join("bad.csv");
    std::fs::write(
        &bad,
        "id,name,parent,type,subnets,wan_up_kbps,wan_down_kbps\nhq,HQ,,standard,10.0.0.0/8,,\nx,X,nope,lan,,,\n",
    )
    .unwrap();
    let (code, _, err) = cli.run(&["topology", "import", bad.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("bad.csv:3: parent \"nope\""), "{err}");
    assert!(err.contains("bad.csv:3: type \"lan\""), "{err}");
    assert_eq!(
        cli.ok(&["topology", "export"]),
        "id,name,parent,type,subnets,wan_up_kbps,wan_down_kbps\n",
        "nothing imported"
    );
    let good = db.dir.path().join("good.csv");
    let csv = "id,name,parent,type,subnets,wan_up_kbps,wan_down_kbps\nhq,HQ,,standard,10.0.0.0/8,,\nwifi,Wi-Fi,hq,wifi,192.168.0.0/24,1000,\n";
    std::fs::write(&good, csv).unwrap();
    cli.ok(&["topology", "import", good.to_str().unwrap()]);
    assert_eq!(cli.ok(&["topology", "export"]), csv);
    assert!(cli.ok(&["topology", "propose"]).starts_with("id,name,parent"));
    // Content: publish, list, show, retire.
    let pkg = db.dir.path().join("pkg.bin");
    let bytes = data(50_000, 4);
    std::fs::write(&pkg, &bytes).unwrap();
    let out = cli.ok(&[
        "publish",
        pkg.to_str().unwrap(),
        "--name",
        "tool",
        "--version",
        "2.0",
        "--origin",
        "https://cdn.example.invalid/tool-2.0",
    ]);
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = info["id"].as_str().unwrap().to_string();
    assert_eq!(id, lowtide_engine::content::ContentId::of(&bytes).to_string());
    assert_eq!(info["origins"][1], "https://cdn.example.invalid/tool-2.0");
    assert!(
        db.dir.path().join("files").join(&id).is_file(),
        "stored in the file store"
    );
    assert!(cli.ok(&["content", "ls"]).contains(&id));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&cli.ok(&["content", "show", &id])).unwrap()["name"],
        "tool"
    );
    cli.ok(&["content", "retire", &id]);
    assert!(!cli.ok(&["content", "ls"]).contains(&id));
    assert!(cli.ok(&["content", "ls", "--all"]).contains("retired"));
    let (code, _, err) = cli.run(&["content", "show", "zz"]);
    assert_ne!(code, 0);
    assert!(err.contains("not a content id"), "{err}");
    // Tokens and agents.
    let t: serde_json::Value =
        serde_json::from_str(&cli.ok(&["token", "create", "--uses", "3", "--note", "lab"])).unwrap();
    assert!(t["token"].as_str().unwrap().starts_with("lte1."));
    let tid = t["id"].as_str().unwrap();
    assert!(cli.ok(&["token", "ls"]).contains(tid));
    cli.ok(&["token", "revoke", tid]);
    // The deployment key: fingerprints only; a rotation keeps the old one as previous
    // unless told to drop it.
    let first = cli.ok(&["deployment-key", "show"]);
    assert!(
        first.starts_with("current ") && first.contains("no previous"),
        "{first}"
    );
    let fp = first
        .split_whitespace()
        .nth(1)
        .unwrap()
        .trim_end_matches(',')
        .to_string();
    assert_eq!(fp.len(), 12, "{first}");
    let rotated = cli.ok(&["deployment-key", "rotate"]);
    assert!(
        rotated.contains(&format!("previous {fp} (still accepted)")),
        "{rotated}"
    );
    let dropped = cli.ok(&["deployment-key", "rotate", "--drop-previous"]);
    assert!(dropped.contains("no previous") && !dropped.contains(&fp), "{dropped}");
    let (code, _, err) = cli.run(&["token", "revoke", tid]);
    assert_ne!(code, 0);
    assert!(err.contains("already revoked"), "{err}");
    let store = lowtide_server::store::Store::open(&db.url, 2).await.unwrap();
    let t2 = store.create_token(1, 60_000, "", common::T0_MS).await.unwrap();
    let (agent, _) = store.enrol(&t2.token, "desk-7", common::T0_MS).await.unwrap();
    store.close().await;
    let ls = cli.ok(&["agents", "ls"]);
    assert!(ls.contains(&agent) && ls.contains("desk-7"), "{ls}");
    cli.ok(&["agents", "revoke", &agent]);
    let agents: serde_json::Value = serde_json::from_str(&cli.ok(&["agents", "ls", "--json"])).unwrap();
    assert_eq!(agents[0]["status"], "revoked");
    db.drop_db().await;
}

both!(admin_commands);
