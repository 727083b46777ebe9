//! The server's HTTP API end to end, each test on real SQLite and on real PostgreSQL.

mod common;

use common::{data, Db, Resp, ADMIN, H};
use lowtide_engine::content::{BlockTable, ContentId};
use lowtide_server::store::SignedManifest;
use serde_json::{json, Value};

const TOPO: &str = "id,name,parent,type,subnets,wan_up_kbps,wan_down_kbps
hq,Head office,,standard,10.0.0.0/16,,
branch,Branch,hq,standard,10.20.0.0/24,20000,100000
branch-wifi,Branch Wi-Fi,branch,wifi,10.21.0.0/24,,
vpn,VPN users,hq,vpn,172.16.0.0/16,,
";

fn facts(addr: &str, free: u64) -> Value {
    let subnet = match addr.rsplit_once('.') {
        Some((p, _)) => format!("{p}.0/24"),
        None => String::new(),
    };
    json!({"hostname": format!("host-{addr}"), "addresses": [addr], "subnets": [subnet], "port": 7000,
           "disk_free_bytes": free, "disk_usable_bytes": free / 2, "chassis": "desktop", "os_type": "workstation",
           "uptime_secs": 3600, "preferred": false})
}

/// [`facts`] with the heartbeat's `serves` fact said out loud (without it, as from an agent
/// older than the fact, the agent serves).
fn facts_serving(addr: &str, free: u64, serves: bool) -> Value {
    let mut f = facts(addr, free);
    f["serves"] = json!(serves);
    f
}

fn assert_4xx(r: &Resp, status: u16, needle: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    let reason = r.reason();
    assert!(
        reason.to_lowercase().contains(&needle.to_lowercase()),
        "reason {reason:?} lacks {needle:?}"
    );
}

async fn enrol_heartbeat_and_list(db: Db) {
    let Some(h) = H::start(db).await else { return };
    let tok = h.token(2).await;
    let (id, cred) = h.enrol(&tok, "pc-1").await;
    let key = h.get("/v1/server-key", None).await.json()["public_key"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(key.len(), 64);
    let r = h.heartbeat(&cred, facts("10.20.0.5", 5_000_000)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["site"], Value::Null, "no topology yet");
    let agents = h.agents().await;
    assert_eq!(agents.len(), 1);
    let a = &agents[0];
    assert_eq!(a["id"], id.as_str());
    assert_eq!(a["status"], "active");
    assert_eq!(a["disk_free_bytes"], 5_000_000);
    assert_eq!(a["chassis"], "desktop");
    assert_eq!(a["addresses"], json!(["10.20.0.5"]));
    assert_eq!(a["subnets"], json!(["10.20.0.0/24"]));
    // Import a topology: the agent lands in its site at once.
    assert_eq!(h.import_csv(TOPO).await.status, 200);
    assert_eq!(h.agents().await[0]["site"], "branch");
    let r = h.heartbeat(&cred, facts("10.20.0.5", 5_000_000)).await;
    assert_eq!(r.json()["site"], "branch");
    assert_eq!(r.json()["site_kind"], "standard");
    // A site override pins it elsewhere.
    let mut f = facts("10.20.0.5", 5);
    f["site_override"] = json!("vpn");
    assert_eq!(h.heartbeat(&cred, f).await.json()["site"], "vpn");
    // Inactive after the configured time; rows kept.
    h.clock.advance_ms(301_000);
    assert_eq!(h.agents().await[0]["status"], "inactive");
    h.finish().await;
}

async fn bad_credentials_are_refused_and_write_nothing(db: Db) {
    let Some(h) = H::start(db).await else { return };
    let tok = h.token(1).await;
    let (id, cred) = h.enrol(&tok, "pc-1").await;
    // Replayed single-use token.
    let r = h
        .send("POST", "/v1/enroll", None, &json!({"token": tok, "hostname": "evil"}))
        .await;
    assert_4xx(&r, 401, "used up");
    // Forged token secret, unknown token, malformed token.
    let forged_tok = format!(
        "{}{}",
        &tok[..tok.len() - 1],
        if tok.ends_with('0') { '1' } else { '0' }
    );
    assert_4xx(
        &h.send("POST", "/v1/enroll", None, &json!({"token": forged_tok})).await,
        401,
        "wrong secret",
    );
    let unknown_tok = format!("lte1.{}.{}", "ab".repeat(16), "cd".repeat(32));
    assert_4xx(
        &h.send("POST", "/v1/enroll", None, &json!({"token": unknown_tok})).await,
        401,
        "unknown enrolment token",
    );
    assert_4xx(
        &h.send("POST", "/v1/enroll", None, &json!({"token": "hello"})).await,
        401,
        "malformed",
    );
    // Revoked and expired tokens.
    let tok2 = h.token(5).await;
    let tok2_id = tok2.split('.').nth(1).unwrap();
    assert_eq!(
        h.req("DELETE", &format!("/v1/admin/tokens/{tok2_id}"), Some(ADMIN), None, &[])
            .await
            .status,
        204
    );
    assert_4xx(
        &h.send("POST", "/v1/enroll", None, &json!({"token": tok2})).await,
        401,
        "revoked",
    );
    let tok3 = h.token(5).await;
    h.clock.advance_ms(8 * 24 * 3_600_000);
    assert_4xx(
        &h.send("POST", "/v1/enroll", None, &json!({"token": tok3})).await,
        401,
        "expired",
    );
    assert_eq!(h.agents().await.len(), 1, "no agent was created by a refused enrolment");

    let f = facts("10.0.0.9", 77);
    assert_4xx(
        &h.req("POST", "/v1/heartbeat", None, Some(b"{}".to_vec()), &[]).await,
        401,
        "missing Authorization",
    );
    assert_4xx(&h.heartbeat("garbage", f.clone()).await, 401, "malformed");
    let unknown = format!("lt1.{}.{}", "ab".repeat(16), "cd".repeat(32));
    assert_4xx(&h.heartbeat(&unknown, f.clone()).await, 401, "unknown agent");
    let forged = format!("lt1.{id}.{}", "ee".repeat(32));
    assert_4xx(&h.heartbeat(&forged, f.clone()).await, 401, "wrong secret");
    assert_4xx(
        &h.get("/v1/admin/agents", Some("not-the-admin-token")).await,
        401,
        "wrong admin token",
    );
    assert_4xx(&h.get("/v1/admin/agents", None).await, 401, "missing Authorization");
    let a = &h.agents().await[0];
    assert_eq!(a["disk_free_bytes"], 0, "refused heartbeats wrote nothing");
    // Revoked agent: 403 everywhere, credential replay included.
    assert_eq!(h.heartbeat(&cred, f.clone()).await.status, 200);
    assert_eq!(
        h.req("POST", &format!("/v1/admin/agents/{id}/revoke"), Some(ADMIN), None, &[])
            .await
            .status,
        204
    );
    assert_4xx(&h.heartbeat(&cred, facts("10.0.0.9", 99)).await, 403, "revoked");
    let cid = h.publish_bytes("x", b"hello").await;
    assert_4xx(
        &h.get(&format!("/v1/content/{cid}/sources"), Some(&cred)).await,
        403,
        "revoked",
    );
    let a = &h.agents().await[0];
    assert_eq!(a["status"], "revoked");
    assert_eq!(a["disk_free_bytes"], 77, "the revoked agent's heartbeat wrote nothing");
    h.finish().await;
}

async fn malformed_and_oversized_bodies_are_refused(db: Db) {
    let Some(h) = H::start(db).await else { return };
    let tok = h.token(1).await;
    let (_, cred) = h.enrol(&tok, "pc").await;
    let hb = |b: &'static [u8]| {
        h.req(
            "POST",
            "/v1/heartbeat",
            Some(&cred),
            Some(b.to_vec()),
            &[("content-type", "application/json")],
        )
    };
    assert_4xx(&hb(b"{not json").await, 400, "not the JSON");
    assert_4xx(&hb(b"{\"chassis\": \"tablet\"}").await, 400, "unknown variant");
    assert_4xx(&hb(b"{\"colour\": 1}").await, 400, "unknown field");
    assert_4xx(&hb(b"{\"addresses\": [\"300.1.1.1\"]}").await, 400, "not the JSON");
    let big = json!({"hostname": "x".repeat(100 * 1024)});
    assert_4xx(&h.heartbeat(&cred, big).await, 413, "larger than");
    assert_eq!(h.agents().await[0]["hostname"], "pc", "nothing written");
    // Oversized and malformed admin uploads.
    let huge = format!("{TOPO}{}", "# padding\n".repeat(40_000));
    assert_4xx(&h.import_csv(&huge).await, 413, "larger than");
    assert_4xx(
        &h.send("POST", "/v1/admin/tokens", Some(ADMIN), &json!({"uses": "many"}))
            .await,
        400,
        "not the JSON",
    );
    assert_4xx(
        &h.get("/v1/content/not-an-id/sources", Some(&cred)).await,
        400,
        "not a content id",
    );
    // Regression (fuzz target http_bodies, crash-e575b531): a path id that is
    // not UTF-8 was answered by axum in plain text; every error is JSON.
    assert_4xx(
        &h.get("/v1/content/ababababababab%FF%FFbababa/manifest", Some(&cred))
            .await,
        400,
        "utf-8",
    );
    assert_4xx(&h.get("/v1/no-such-route", Some(&cred)).await, 404, "not found");
    let missing = ContentId::of(b"never published");
    assert_4xx(
        &h.get(&format!("/v1/content/{missing}/sources"), Some(&cred)).await,
        404,
        "no content",
    );
    h.finish().await;
}

async fn topology_import_export_and_errors(db: Db) {
    let Some(h) = H::start(db).await else { return };
    assert_eq!(h.import_csv(TOPO).await.status, 200);
    let r = h.get("/v1/admin/topology", Some(ADMIN)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), TOPO);
    // Bad rows: every one reported with its line; nothing applied.
    let bad = "id,name,parent,type,subnets,wan_up_kbps,wan_down_kbps
hq,HQ,,standard,10.0.0.0/16,,
a,A,nowhere,standard,10.1.0.0/24,,
b,B,hq,standard,10.0.3.0/24,,
c,C,hq,standard,10.2.0.1/24,,
d,D,hq,cable,,-5,
";
    let r = h.import_csv(bad).await;
    assert_eq!(r.status, 422, "{}", r.text());
    let errors = r.json()["errors"].as_array().unwrap().clone();
    let lines: Vec<u64> = errors.iter().map(|e| e["line"].as_u64().unwrap()).collect();
    assert_eq!(lines, vec![3, 4, 5, 6, 6], "{errors:?}");
    assert!(errors[0]["message"].as_str().unwrap().contains("nowhere"));
    assert!(errors[1]["message"].as_str().unwrap().contains("overlaps"));
    assert!(errors[2]["message"].as_str().unwrap().contains("host bits"));
    assert!(r.reason().contains("nothing was changed"));
    let cycle = "id,name,parent,type,subnets,wan_up_kbps,wan_down_kbps\nhq,HQ,,standard,,,\nx,X,y,standard,,,\ny,Y,x,standard,,,\n";
    let r = h.import_csv(cycle).await;
    assert_eq!(r.status, 422);
    assert!(r.text().contains("cycle"), "{}", r.text());
    assert_4xx(&h.import_csv("id,name\n").await, 422, "bad line");
    assert_4xx(
        &h.import_csv("id,name,parent,type,subnets,wan_up_kbps,wan_down_kbps\n\"unterminated,x,,standard,,,\n")
            .await,
        422,
        "bad line",
    );
    assert_eq!(
        h.get("/v1/admin/topology", Some(ADMIN)).await.text(),
        TOPO,
        "failed imports changed nothing"
    );
    h.finish().await;
}

async fn topology_proposal_from_agent_subnets(db: Db) {
    let Some(h) = H::start(db).await else { return };
    let tok = h.token(10).await;
    for (i, addr) in ["10.5.1.10", "10.5.1.11", "10.5.1.12", "10.6.0.3", "192.168.8.20"]
        .iter()
        .enumerate()
    {
        let (_, cred) = h.enrol(&tok, &format!("pc{i}")).await;
        assert_eq!(h.heartbeat(&cred, facts(addr, 10)).await.status, 200);
    }
    let r = h.get("/v1/admin/topology/proposal", Some(ADMIN)).await;
    assert_eq!(r.status, 200);
    let csv = r.text();
    assert!(
        csv.starts_with("id,name,parent,type,subnets,wan_up_kbps,wan_down_kbps\nnet-10-5-1-0-24,"),
        "{csv}"
    );
    assert_eq!(csv.lines().count(), 4, "{csv}");
    assert_eq!(h.import_csv(&csv).await.status, 200, "the proposal imports as it is");
    let sites: Vec<String> = h
        .agents()
        .await
        .iter()
        .map(|a| a["site"].as_str().unwrap().to_string())
        .collect();
    assert!(sites.contains(&"net-192-168-8-0-24".to_string()), "{sites:?}");
    h.finish().await;
}

async fn publish_manifest_table_and_origin_ranges(db: Db) {
    let Some(h) = H::start(db).await else { return };
    let body = data(100_000, 3);
    let id = h.publish_bytes("app", &body).await;
    assert_eq!(id, ContentId::of(&body).to_string(), "the id is the BLAKE3 hash");
    let tok = h.token(1).await;
    let enrolled = h.send("POST", "/v1/enroll", None, &json!({"token": tok})).await.json();
    let cred = enrolled["credential"].as_str().unwrap().to_string();
    let key = enrolled["server_public_key"].as_str().unwrap().to_string();
    // Signed manifest verifies; a forged one does not.
    let m: SignedManifest =
        serde_json::from_slice(&h.get(&format!("/v1/content/{id}/manifest"), Some(&cred)).await.body).unwrap();
    let manifest = m.verify(&key).expect("signature verifies");
    assert_eq!(manifest.size, 100_000);
    assert_eq!(manifest.name, "app");
    let mut forged = m.clone();
    forged.manifest = forged.manifest.replace("\"app\"", "\"evil\"");
    assert!(forged.verify(&key).is_err());
    // Block table verifies against the id.
    let t = h.get(&format!("/v1/content/{id}/table"), Some(&cred)).await;
    assert_eq!(t.status, 200);
    let cid: ContentId = id.parse().unwrap();
    let table = BlockTable::decode_verified(&t.body, &cid).expect("table matches the content id");
    assert_eq!(table.geometry().size, 100_000);
    // The origin serves ranges.
    let origin = &manifest.origins[0];
    assert!(origin.ends_with(&format!("/files/{id}")));
    let path = origin.strip_prefix(&h.srv.base).unwrap();
    let r = h.req("GET", path, None, None, &[("range", "bytes=1000-1999")]).await;
    assert_eq!(r.status, 206);
    assert_eq!(r.body, body[1000..2000]);
    assert_eq!(h.get(path, None).await.body, body);
    // Publish again from the URL without storing: same id, the URL becomes an origin.
    let url = origin.clone();
    let r = h
        .send(
            "POST",
            "/v1/admin/content",
            Some(ADMIN),
            &json!({"name": "app", "version": "1.1", "url": url, "store": false}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["id"], id.as_str());
    assert_eq!(r.json()["origins"], json!([url]));
    assert_eq!(
        h.get(&format!("/v1/admin/content/{id}"), Some(ADMIN)).await.json()["version"],
        "1.1"
    );
    // Bad publish requests.
    assert_4xx(
        &h.send(
            "POST",
            "/v1/admin/content",
            Some(ADMIN),
            &json!({"name": "x", "version": "1", "path": "/nonexistent/file"}),
        )
        .await,
        500,
        "/nonexistent/file",
    );
    assert_4xx(
        &h.send(
            "POST",
            "/v1/admin/content",
            Some(ADMIN),
            &json!({"name": "", "version": "1", "path": "/etc/hostname"}),
        )
        .await,
        400,
        "name",
    );
    assert_4xx(
        &h.send(
            "POST",
            "/v1/admin/content",
            Some(ADMIN),
            &json!({"name": "x", "version": "1", "url": "ftp://x"}),
        )
        .await,
        400,
        "http",
    );
    // Retire: gone for agents, hidden from the default list.
    assert_eq!(
        h.send(
            "POST",
            &format!("/v1/admin/content/{id}/retire"),
            Some(ADMIN),
            &json!({})
        )
        .await
        .status,
        200
    );
    assert_4xx(
        &h.get(&format!("/v1/content/{id}/sources"), Some(&cred)).await,
        410,
        "retired",
    );
    assert_eq!(h.get("/v1/admin/content", Some(ADMIN)).await.json(), json!([]));
    assert_eq!(
        h.get("/v1/admin/content?all=true", Some(ADMIN))
            .await
            .json()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_4xx(
        &h.send(
            "POST",
            &format!("/v1/admin/content/{id}/retire"),
            Some(ADMIN),
            &json!({}),
        )
        .await,
        409,
        "already retired",
    );
    h.finish().await;
}

struct Fleet {
    cid: String,
    size: u64,
    creds: Vec<(String, String)>,
}

/// hq: h0 (holds all); branch: b0 (holds all), b1 (holds half), b2 (holds none), b3 (requester); vpn: v0 (holds all), v1.
async fn fleet(h: &H) -> Fleet {
    assert_eq!(h.import_csv(TOPO).await.status, 200);
    let body = data(64 * 1024, 9);
    let cid = h.publish_bytes("pkg", &body).await;
    let tok = h.token(20).await;
    let plan = [
        ("h0", "10.0.0.1", 900, "all"),
        ("b0", "10.20.0.10", 100, "all"),
        ("b1", "10.20.0.11", 500, "half"),
        ("b2", "10.20.0.12", 1000, "none"),
        ("b3", "10.20.0.13", 50, "none"),
        ("v0", "172.16.0.5", 100, "all"),
        ("v1", "172.16.0.6", 100, "none"),
    ];
    let mut creds = Vec::new();
    for (name, addr, free, holds) in plan {
        let (id, cred) = h.enrol(&tok, name).await;
        assert_eq!(h.heartbeat(&cred, facts(addr, free)).await.status, 200);
        let item = match holds {
            "all" => json!({"content": cid, "complete": true}),
            "half" => json!({"content": cid, "ranges": [[0, 16384], [16384, 32768]]}),
            _ => json!({"content": cid, "ranges": []}),
        };
        let r = h
            .send("PUT", "/v1/inventory", Some(&cred), &json!({"items": [item]}))
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        creds.push((id, cred));
    }
    Fleet {
        cid,
        size: body.len() as u64,
        creds,
    }
}

fn kinds(v: &Value) -> Vec<(String, String, String)> {
    v["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let who = s["agent_id"].as_str().or(s["url"].as_str()).unwrap().to_string();
            (
                s["kind"].as_str().unwrap().to_string(),
                s["protocol"].as_str().unwrap().to_string(),
                who,
            )
        })
        .collect()
}

async fn sources_are_ranked_with_reasons(db: Db) {
    let Some(h) = H::start(db).await else { return };
    let f = fleet(&h).await;
    let id = |n: usize| f.creds[n].0.clone();
    let r = h
        .get(&format!("/v1/content/{}/sources", f.cid), Some(&f.creds[4].1))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["site"], "branch");
    assert_eq!(v["size"], f.size);
    assert_eq!(v["you_are_rvp"], false);
    assert_eq!(
        (v["wan_up_kbps"].as_u64(), v["wan_down_kbps"].as_u64()),
        (Some(20000), Some(100000)),
        "the site's WAN limits"
    );
    let k = kinds(&v);
    let origin = format!("{}/files/{}", h.srv.base, f.cid);
    assert_eq!(
        k,
        vec![
            ("site_rvp".into(), "foreground".into(), id(1)),
            ("peer".into(), "foreground".into(), id(2)),
            ("parent_rvp".into(), "background".into(), id(0)),
            ("origin".into(), "background".into(), origin),
        ],
        "{v:#}"
    );
    let s = v["sources"].as_array().unwrap();
    assert_eq!(s[0]["reason"], "same site, site RVP, holds 100%");
    assert_eq!(s[1]["reason"], "same site, holds 50%");
    assert_eq!(s[1]["ranges"], json!([[0, 32768]]), "partial holders list their ranges");
    assert_eq!(s[2]["reason"], "parent site hq RVP, holds 100%");
    assert_eq!(s[2]["addresses"], json!(["10.0.0.1"]));
    assert_eq!(s[3]["reason"], "origin, last resort");
    // The RVP itself is told so, and goes to the parent.
    let v = h
        .get(&format!("/v1/content/{}/sources", f.cid), Some(&f.creds[1].1))
        .await
        .json();
    assert_eq!(v["you_are_rvp"], true);
    assert_eq!(kinds(&v)[0].0, "peer");
    // The top site's agent: origin is on its LAN.
    let v = h
        .get(&format!("/v1/content/{}/sources", f.cid), Some(&f.creds[0].1))
        .await
        .json();
    assert_eq!(
        kinds(&v),
        vec![(
            "origin".into(),
            "foreground".into(),
            format!("{}/files/{}", h.srv.base, f.cid)
        )]
    );
    assert_eq!(v["sources"][0]["reason"], "no peer holds it: origin");
    h.finish().await;
}

async fn vpn_sites_never_serve(db: Db) {
    let Some(h) = H::start(db).await else { return };
    let f = fleet(&h).await;
    let v = h
        .get(&format!("/v1/content/{}/sources", f.cid), Some(&f.creds[6].1))
        .await
        .json();
    assert_eq!(v["site"], "vpn");
    let k = kinds(&v);
    assert!(
        !k.iter().any(|(_, _, who)| who == &f.creds[5].0),
        "a VPN peer must not serve: {v:#}"
    );
    assert_eq!(k[0].0, "parent_rvp");
    assert_eq!(k[0].2, f.creds[0].0);
    let e = h
        .get(&format!("/v1/admin/sites/vpn/content/{}/election", f.cid), Some(ADMIN))
        .await
        .json();
    assert_eq!(e["rvp"], Value::Null);
    assert_eq!(e["serving"], json!([]));
    h.finish().await;
}

async fn rvp_is_re_elected_when_it_goes_inactive(db: Db) {
    let Some(h) = H::start(db).await else { return };
    let f = fleet(&h).await;
    let path = format!("/v1/admin/sites/branch/content/{}/election", f.cid);
    let election = || h.get(&path, Some(ADMIN));
    assert_eq!(election().await.json()["rvp"], f.creds[1].0.as_str());
    // A better-ranked device appears: the RVP stays (no flapping).
    let (_, c) = (f.creds[3].0.clone(), f.creds[3].1.clone());
    h.send(
        "PUT",
        "/v1/inventory",
        Some(&c),
        &json!({"items": [{"content": f.cid, "complete": true}]}),
    )
    .await;
    assert_eq!(election().await.json()["rvp"], f.creds[1].0.as_str());
    // Everyone but the RVP heartbeats past the inactivity limit.
    h.clock.advance_ms(200_000);
    for (i, addr) in [(0, "10.0.0.1"), (2, "10.20.0.11"), (3, "10.20.0.12"), (4, "10.20.0.13")] {
        assert_eq!(h.heartbeat(&f.creds[i].1, facts(addr, 100)).await.status, 200);
    }
    h.clock.advance_ms(200_000);
    let e = election().await.json();
    assert_eq!(e["rvp"], f.creds[3].0.as_str(), "re-elected among active agents: {e:#}");
    let v = h
        .get(&format!("/v1/content/{}/sources", f.cid), Some(&f.creds[4].1))
        .await
        .json();
    assert!(
        !kinds(&v).iter().any(|(_, _, w)| w == &f.creds[1].0),
        "inactive agents are dropped from answers"
    );
    h.finish().await;
}

/// `POST /v1/assignments` without waiting: the contents the agent is told to fetch for its site.
async fn assignments_now(h: &H, cred: &str, running: Vec<String>) -> Vec<String> {
    let r = h
        .send(
            "POST",
            "/v1/assignments",
            Some(cred),
            &json!({"wait_ms": 0, "running": running}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["assignments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["content"].as_str().unwrap().to_string())
        .collect()
}

async fn sites_want_content_and_their_rvps_are_assigned_it(db: Db) {
    let Some(h) = H::start(db).await else { return };
    let f = fleet(&h).await;
    let id = |n: usize| f.creds[n].0.clone();
    let cred = |n: usize| f.creds[n].1.clone();
    let assigned = |n: usize, running: Vec<String>| {
        let c = cred(n);
        let h = &h;
        async move { assignments_now(h, &c, running).await }
    };
    // The fleet's package: branch's RVP b0 and hq's RVP h0 hold it whole: nothing to fetch.
    h.get(&format!("/v1/content/{}/sources", f.cid), Some(&cred(4))).await;
    for n in 0..7 {
        assert!(assigned(n, vec![]).await.is_empty(), "agent {n}");
    }
    // A new package nobody holds: b3 asks. Branch's RVP (b2, the most free disk) is told to
    // fetch it for the site, and hq's RVP (h0) for hq, which branch's RVP fetches from.
    let new = h.publish_bytes("new", &data(40_000, 3)).await;
    h.get(&format!("/v1/content/{new}/sources"), Some(&cred(4))).await;
    let e = h
        .get(&format!("/v1/admin/sites/branch/content/{new}/election"), Some(ADMIN))
        .await
        .json();
    assert_eq!(e["rvp"], id(3).as_str(), "{e}");
    assert_eq!(assigned(3, vec![]).await, vec![new.clone()]);
    assert_eq!(assigned(0, vec![]).await, vec![new.clone()]);
    for n in [1, 2, 4, 5, 6] {
        assert!(assigned(n, vec![]).await.is_empty(), "agent {n} is no RVP of it");
    }
    // Long poll: an agent already fetching everything it is assigned waits, and is answered
    // when a new assignment appears (here: the site comes to want a third package).
    let third = h.publish_bytes("third", &data(30_000, 4)).await;
    let (c3, running) = (cred(3), vec![new.clone()]);
    let waiting = {
        let h = &h;
        async move {
            h.send(
                "POST",
                "/v1/assignments",
                Some(&c3),
                &json!({"wait_ms": 20_000, "running": running}),
            )
            .await
            .json()
        }
    };
    let ask = async {
        tokio::task::yield_now().await;
        h.get(&format!("/v1/content/{third}/sources"), Some(&cred(4))).await
    };
    let (w, _) = tokio::join!(waiting, ask);
    let got: Vec<&str> = w["assignments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["content"].as_str().unwrap())
        .collect();
    assert!(got.contains(&third.as_str()) && got.contains(&new.as_str()), "{w}");
    // Once the RVP holds it whole, the site no longer wants it.
    let r = h
        .send(
            "PUT",
            "/v1/inventory",
            Some(&cred(3)),
            &json!({"items": [{"content": new, "complete": true}]}),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(assigned(3, vec![]).await, vec![third.clone()]);
    // The RVP goes inactive: the next to ask for assignments among the active agents of the
    // site is elected, and told to fetch it.
    h.clock.advance_ms(200_000);
    for (i, addr) in [(0, "10.0.0.1"), (1, "10.20.0.10"), (2, "10.20.0.11"), (4, "10.20.0.13")] {
        assert_eq!(h.heartbeat(&f.creds[i].1, facts(addr, 100)).await.status, 200);
    }
    h.clock.advance_ms(200_000);
    let mut after = Vec::new();
    for n in [1, 2, 4] {
        after.push(assigned(n, vec![]).await);
    }
    assert_eq!(
        after.iter().filter(|a| a.contains(&third)).count(),
        1,
        "exactly one new RVP is assigned it: {after:?}"
    );
    // Bad input.
    assert_4xx(
        &h.send("POST", "/v1/assignments", Some(&cred(3)), &json!({"wait": 1}))
            .await,
        400,
        "not the JSON",
    );
    assert_4xx(
        &h.send("POST", "/v1/assignments", None, &json!({})).await,
        401,
        "Authorization",
    );
    h.finish().await;
}

async fn an_rvp_that_stops_polling_for_assignments_is_replaced(db: Db) {
    let Some(h) = H::start(db).await else { return };
    let f = fleet(&h).await;
    let cred = |n: usize| f.creds[n].1.clone();
    let poll = |n: usize| {
        let c = cred(n);
        let h = &h;
        async move { assignments_now(h, &c, Vec::new()).await }
    };
    // Everyone heartbeats: nobody goes inactive in this test (300 s).
    let heartbeat_all = || async {
        for (i, addr) in [
            (0, "10.0.0.1"),
            (1, "10.20.0.10"),
            (2, "10.20.0.11"),
            (3, "10.20.0.12"),
            (4, "10.20.0.13"),
        ] {
            assert_eq!(h.heartbeat(&cred(i), facts(addr, 100)).await.status, 200);
        }
    };
    let new = h.publish_bytes("new", &data(40_000, 3)).await;
    h.get(&format!("/v1/content/{new}/sources"), Some(&cred(4))).await;
    let path = format!("/v1/admin/sites/branch/content/{new}/election");
    let rvp = || async {
        h.get(&path, Some(ADMIN)).await.json()["rvp"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(rvp().await, f.creds[3].0, "b2 (most free disk) is elected");
    assert_eq!(poll(3).await, vec![new.clone()]);
    // It keeps polling: it stays the RVP however long it takes.
    let step = lowtide_server::store::RVP_POLL_GRACE_MS - 5_000;
    for _ in 0..3 {
        h.clock.advance_ms(step);
        heartbeat_all().await;
        assert_eq!(poll(3).await, vec![new.clone()]);
        assert_eq!(rvp().await, f.creds[3].0);
    }
    // It stops polling (the process is gone; its last heartbeat still counts as active):
    // after the grace another agent of the site is elected and assigned the content.
    h.clock.advance_ms(step);
    assert_eq!(rvp().await, f.creds[3].0, "not yet: within the grace");
    h.clock.advance_ms(10_000);
    let next = rvp().await;
    assert_ne!(next, f.creds[3].0, "re-elected once the RVP stopped polling");
    let n = f.creds.iter().position(|c| c.0 == next).unwrap();
    assert_eq!(poll(n).await, vec![new.clone()], "the new RVP is told to fetch it");
    let v = h
        .get(&format!("/v1/content/{new}/sources"), Some(&cred(4)))
        .await
        .json();
    assert!(
        !kinds(&v).iter().any(|(k, _, w)| k == "site_rvp" && w == &f.creds[3].0),
        "the old RVP is not named as the site's RVP: {v:#}"
    );
    // The old one comes back: it is not the RVP any more and is assigned nothing.
    assert!(poll(3).await.is_empty());
    // An RVP that holds the content whole keeps the role while it polls (with nothing to
    // fetch), and loses it like any other once it stops: gone, it is no source, and the agents
    // of its site and of the sites below would wait for it until its heartbeats lapse.
    let epath = format!("/v1/admin/sites/branch/content/{}/election", f.cid);
    let e0 = h.get(&epath, Some(ADMIN)).await.json();
    assert_eq!(e0["rvp"], f.creds[1].0.as_str(), "b0 holds it whole: {e0:#}");
    for _ in 0..3 {
        h.clock.advance_ms(step);
        heartbeat_all().await;
        let fetch = poll(1).await;
        assert!(
            !fetch.contains(&f.cid),
            "nothing to fetch: it holds it whole: {fetch:?}"
        );
        let e = h.get(&epath, Some(ADMIN)).await.json();
        assert_eq!(e["rvp"], e0["rvp"], "{e0:#} vs {e:#}");
    }
    h.clock.advance_ms(step);
    heartbeat_all().await;
    let e = h.get(&epath, Some(ADMIN)).await.json();
    assert_eq!(e["rvp"], e0["rvp"], "not yet: within the grace {e:#}");
    h.clock.advance_ms(10_000);
    heartbeat_all().await;
    let e1 = h.get(&epath, Some(ADMIN)).await.json();
    assert_ne!(
        e1["rvp"], e0["rvp"],
        "a whole RVP that stopped polling is replaced: {e1:#}"
    );
    let v = h
        .get(&format!("/v1/content/{}/sources", f.cid), Some(&cred(4)))
        .await
        .json();
    assert!(
        !kinds(&v).iter().any(|(k, _, w)| k == "site_rvp" && w == &f.creds[1].0),
        "the old RVP is not named as the site's RVP: {v:#}"
    );
    h.finish().await;
}

async fn an_agent_polling_before_its_first_heartbeat_learns_its_assignments(db: Db) {
    let Some(h) = H::start(db).await else { return };
    assert_eq!(h.import_csv(TOPO).await.status, 200);
    let cid = h.publish_bytes("pkg", &data(5000, 1)).await;
    let tok = h.token(10).await;
    let (_, fresh) = h.enrol(&tok, "fresh").await;
    let (_, asker) = h.enrol(&tok, "asker").await;
    // The agent's assignment loop asks at once, before its first heartbeat placed it in a site;
    // meanwhile it heartbeats, and is elected branch's RVP (most free disk) when asker asks.
    let waiting = {
        let (h, c) = (&h, fresh.clone());
        async move {
            h.send(
                "POST",
                "/v1/assignments",
                Some(&c),
                &json!({"wait_ms": 8_000, "running": []}),
            )
            .await
            .json()
        }
    };
    let meanwhile = async {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert_eq!(h.heartbeat(&fresh, facts("10.20.0.10", 1000)).await.status, 200);
        assert_eq!(h.heartbeat(&asker, facts("10.20.0.11", 1)).await.status, 200);
        h.get(&format!("/v1/content/{cid}/sources"), Some(&asker)).await
    };
    let (w, _) = tokio::join!(waiting, meanwhile);
    assert_eq!(
        w["assignments"][0]["content"],
        cid.as_str(),
        "the poll that began before the site was known is answered: {w}"
    );
    h.finish().await;
}

async fn a_gone_rvp_is_replaced_by_an_agent_that_is_still_heard_from(db: Db) {
    let Some(h) = H::start(db).await else { return };
    assert_eq!(h.import_csv(TOPO).await.status, 200);
    let cid = h.publish_bytes("pkg", &data(5000, 1)).await;
    let tok = h.token(10).await;
    let mut ids = Vec::new();
    for (i, holds) in [true, true, false].into_iter().enumerate() {
        let (id, cred) = h.enrol(&tok, &format!("p{i}")).await;
        h.heartbeat(&cred, facts(&format!("10.20.0.{}", 10 + i), 1000 - i as u64))
            .await;
        let item = if holds {
            json!({"content": cid, "complete": true})
        } else {
            json!({"content": cid, "ranges": []})
        };
        h.send("PUT", "/v1/inventory", Some(&cred), &json!({"items": [item]}))
            .await;
        ids.push((id, cred));
    }
    let path = format!("/v1/admin/sites/branch/content/{cid}/election");
    assert_eq!(h.get(&path, Some(ADMIN)).await.json()["rvp"], ids[0].0.as_str());
    // p0 and p1 go (a switch lost power): their last heartbeats keep them active for
    // inactive_after_secs, but only p2 is still heard from. p0 is replaced after the poll grace
    // by p2, not by p1 (which holds it but would be waited for another grace, and so on).
    h.clock.advance_ms(4 * 60_000);
    h.heartbeat(&ids[2].1, facts("10.20.0.12", 998)).await;
    let e = h.get(&path, Some(ADMIN)).await.json();
    assert_eq!(e["rvp"], ids[2].0.as_str(), "{e:#}");
    h.finish().await;
}

/// Issue 6: an agent that refuses every peer (`uploads_max = 0`, on battery) must not be a
/// site's RVP while another agent of the site serves: its site's agents would wait for it,
/// then cross the WAN to the origin.
async fn an_agent_that_does_not_serve_is_not_elected_while_another_serves(db: Db) {
    let Some(h) = H::start(db).await else { return };
    assert_eq!(h.import_csv(TOPO).await.status, 200);
    let cid = h.publish_bytes("pkg", &data(5000, 1)).await;
    let tok = h.token(10).await;
    // z holds the package whole and has the most disk: it would win. It serves nobody.
    // a says nothing about serving (an older agent): it serves. q asks.
    let plan = [
        ("z", "10.20.0.10", 1000, Some(false), true),
        ("a", "10.20.0.11", 500, None, false),
        ("q", "10.20.0.12", 50, Some(true), false),
    ];
    let mut ids = Vec::new();
    for (name, addr, free, serves, holds) in plan {
        let (id, cred) = h.enrol(&tok, name).await;
        let f = match serves {
            Some(s) => facts_serving(addr, free, s),
            None => facts(addr, free),
        };
        assert_eq!(h.heartbeat(&cred, f).await.status, 200);
        let item = if holds {
            json!({"content": cid, "complete": true})
        } else {
            json!({"content": cid, "ranges": []})
        };
        let r = h
            .send("PUT", "/v1/inventory", Some(&cred), &json!({"items": [item]}))
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        ids.push((id, cred));
    }
    let agents = h.agents().await;
    let serves = |id: &str| agents.iter().find(|a| a["id"] == id).unwrap()["serves"].clone();
    assert_eq!(serves(&ids[0].0), false, "{agents:?}");
    assert_eq!(serves(&ids[1].0), true, "no serves field: serves");
    let v = h
        .get(&format!("/v1/content/{cid}/sources"), Some(&ids[2].1))
        .await
        .json();
    let e = h
        .get(&format!("/v1/admin/sites/branch/content/{cid}/election"), Some(ADMIN))
        .await
        .json();
    assert_eq!(e["rvp"], ids[1].0.as_str(), "a, which serves: {e:#}");
    assert_eq!(e["rvp_serves"], true, "{e:#}");
    assert!(e.get("warning").is_none(), "{e:#}");
    let k = kinds(&v);
    assert!(
        k.iter().any(|(kind, _, w)| kind == "site_rvp" && w == &ids[1].0),
        "a is named the site's RVP: {v:#}"
    );
    // a, not z, is told to fetch it for the site.
    assert_eq!(assignments_now(&h, &ids[1].1, vec![]).await, vec![cid.clone()]);
    assert!(assignments_now(&h, &ids[0].1, vec![]).await.is_empty());

    // A site where nobody serves: its best agent is elected all the same, and the election says so.
    let (hz, hz_cred) = h.enrol(&tok, "hz").await;
    assert_eq!(
        h.heartbeat(&hz_cred, facts_serving("10.0.0.1", 900, false))
            .await
            .status,
        200
    );
    let path = format!("/v1/admin/sites/hq/content/{cid}/election");
    let e = h.get(&path, Some(ADMIN)).await.json();
    assert_eq!(e["rvp"], hz.as_str(), "{e:#}");
    assert_eq!(e["rvp_serves"], false, "{e:#}");
    assert!(e["warning"].as_str().is_some_and(|w| w.contains("serves")), "{e:#}");
    // One that serves turns up: it takes over.
    let (hs, hs_cred) = h.enrol(&tok, "hs").await;
    assert_eq!(h.heartbeat(&hs_cred, facts("10.0.0.2", 10)).await.status, 200);
    let e = h.get(&path, Some(ADMIN)).await.json();
    assert_eq!(e["rvp"], hs.as_str(), "{e:#}");
    assert_eq!(e["rvp_serves"], true, "{e:#}");
    h.finish().await;
}

/// Issue 6: an RVP whose heartbeat says it no longer serves is replaced, as one that went
/// silent is, unless no other agent of the site serves.
async fn an_rvp_that_stops_serving_is_replaced(db: Db) {
    let Some(h) = H::start(db).await else { return };
    let f = fleet(&h).await;
    let id = |n: usize| f.creds[n].0.clone();
    let cred = |n: usize| f.creds[n].1.clone();
    let branch: [(usize, &str, u64); 4] = [
        (1, "10.20.0.10", 100),
        (2, "10.20.0.11", 500),
        (3, "10.20.0.12", 1000),
        (4, "10.20.0.13", 50),
    ];
    let path = format!("/v1/admin/sites/branch/content/{}/election", f.cid);
    let sources = |n: usize| {
        let c = cred(n);
        let h = &h;
        let p = format!("/v1/content/{}/sources", f.cid);
        async move { h.get(&p, Some(&c)).await.json() }
    };
    assert_eq!(
        h.get(&path, Some(ADMIN)).await.json()["rvp"],
        id(1).as_str(),
        "b0 holds it whole"
    );
    // b0 goes on battery: its next heartbeat says so.
    assert_eq!(
        h.heartbeat(&cred(1), facts_serving("10.20.0.10", 100, false))
            .await
            .status,
        200
    );
    let v = sources(4).await;
    assert_eq!(
        kinds(&v)[..2],
        [
            ("site_rvp".to_string(), "foreground".to_string(), id(2)),
            ("peer".to_string(), "foreground".to_string(), id(1)),
        ],
        "b1 (serves, holds the most of those that do) replaces b0, which is listed after it: {v:#}"
    );
    let e = h.get(&path, Some(ADMIN)).await.json();
    assert_eq!(
        (e["rvp"].as_str(), e["rvp_serves"].as_bool()),
        (Some(id(2).as_str()), Some(true)),
        "{e:#}"
    );
    // The new RVP holds half: it is told to fetch the rest for the site; b0 is not.
    assert_eq!(assignments_now(&h, &cred(2), vec![]).await, vec![f.cid.clone()]);
    assert!(assignments_now(&h, &cred(1), vec![]).await.is_empty());
    // b0 is plugged in again: b1 stays (no flapping).
    assert_eq!(h.heartbeat(&cred(1), facts("10.20.0.10", 100)).await.status, 200);
    assert_eq!(h.get(&path, Some(ADMIN)).await.json()["rvp"], id(2).as_str());
    // Everyone in the branch stops serving, b1 too: nobody else can, so b1 stays, and says so.
    for (n, addr, free) in branch {
        assert_eq!(
            h.heartbeat(&cred(n), facts_serving(addr, free, false)).await.status,
            200
        );
    }
    let e = h.get(&path, Some(ADMIN)).await.json();
    assert_eq!(e["rvp"], id(2).as_str(), "{e:#}");
    assert_eq!(e["rvp_serves"], false, "{e:#}");
    assert!(e["warning"].is_string(), "{e:#}");
    let v = sources(4).await;
    assert!(
        kinds(&v).iter().any(|(k, _, w)| k == "site_rvp" && w == &id(2)),
        "{v:#}"
    );
    // b2 serves again: it takes over from the RVP that does not.
    assert_eq!(
        h.heartbeat(&cred(3), facts_serving("10.20.0.12", 1000, true))
            .await
            .status,
        200
    );
    let v = sources(4).await;
    assert!(
        kinds(&v).iter().any(|(k, _, w)| k == "site_rvp" && w == &id(3)),
        "{v:#}"
    );
    assert_eq!(assignments_now(&h, &cred(3), vec![]).await, vec![f.cid.clone()]);
    h.finish().await;
}

/// Issue 6: a child site's RVP is not pointed at a parent site whose RVP serves nobody (it
/// would answer `DeviceBusy`, and the child's RVP would wait 60 s, then use the origin): it
/// gets the nearest ancestor site's RVP that serves, or the origin; and the parent's RVP again
/// once it serves. Site tree hq -> b -> c, one agent each.
async fn a_child_site_skips_a_parent_site_whose_rvp_serves_nobody(db: Db) {
    let Some(h) = H::start(db).await else { return };
    let topo = "id,name,parent,type,subnets,wan_up_kbps,wan_down_kbps
hq,Head office,,standard,10.0.0.0/16,,
b,Branch,hq,standard,10.20.0.0/24,20000,100000
c,Branch annex,b,standard,10.21.0.0/24,10000,50000
";
    assert_eq!(h.import_csv(topo).await.status, 200);
    let cid = h.publish_bytes("pkg", &data(20_000, 5)).await;
    let tok = h.token(10).await;
    let (a0, a0_cred) = h.enrol(&tok, "a0").await;
    let (b0, b0_cred) = h.enrol(&tok, "b0").await;
    let (c0, c0_cred) = h.enrol(&tok, "c0").await;
    let beat = |cred: &str, addr: &'static str, serves: bool| {
        let (h, cred) = (&h, cred.to_string());
        async move {
            let r = h.heartbeat(&cred, facts_serving(addr, 100, serves)).await;
            assert_eq!(r.status, 200, "{}", r.text());
        }
    };
    beat(&a0_cred, "10.0.0.1", true).await;
    beat(&b0_cred, "10.20.0.10", false).await;
    beat(&c0_cred, "10.21.0.10", true).await;
    let r = h
        .send(
            "PUT",
            "/v1/inventory",
            Some(&a0_cred),
            &json!({"items": [{"content": cid, "complete": true}]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let sources = |cid: &str| {
        let (h, p) = (&h, format!("/v1/content/{cid}/sources"));
        let c = c0_cred.clone();
        async move { h.get(&p, Some(&c)).await.json() }
    };
    let upstream = |v: &Value| -> Vec<(String, String)> {
        v["sources"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["kind"] == "parent_rvp")
            .map(|s| {
                (
                    s["agent_id"].as_str().unwrap().to_string(),
                    s["reason"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    // b0 serves nobody: c's RVP is given hq's RVP, across b, at once.
    for _ in 0..3 {
        let v = sources(&cid).await;
        assert_eq!(v["you_are_rvp"], true, "{v:#}");
        let k = kinds(&v);
        assert!(!k.iter().any(|(_, _, w)| w == &b0), "b0 must not be named: {v:#}");
        assert_eq!(
            upstream(&v),
            [(
                a0.clone(),
                "ancestor site hq RVP, holds 100% (the RVP of b serves no peers: skipped)".to_string()
            )],
            "{v:#}"
        );
        assert_eq!(k[0].1, "background", "{v:#}");
    }
    let e = h
        .get(&format!("/v1/admin/sites/b/content/{cid}/election"), Some(ADMIN))
        .await
        .json();
    assert_eq!(
        (e["rvp"].as_str(), e["rvp_serves"].as_bool()),
        (Some(b0.as_str()), Some(false)),
        "{e:#}"
    );
    // c0 fetches it for c; b0 is not told to fetch it on c's behalf (c does not get it from b).
    assert_eq!(assignments_now(&h, &c0_cred, vec![]).await, vec![cid.clone()]);
    assert!(assignments_now(&h, &b0_cred, vec![]).await.is_empty());

    // A package nobody holds: hq's RVP, not b's, is told to fetch it, so that the chain fills
    // from hq down to c.
    let new = h.publish_bytes("new", &data(30_000, 6)).await;
    let v = sources(&new).await;
    assert_eq!(upstream(&v)[0].0, a0, "{v:#}");
    assert_eq!(assignments_now(&h, &a0_cred, vec![]).await, vec![new.clone()]);
    assert!(assignments_now(&h, &b0_cred, vec![]).await.is_empty());

    // Nobody above c serves: the origin, at once, saying why.
    beat(&a0_cred, "10.0.0.1", false).await;
    let v = sources(&cid).await;
    assert!(upstream(&v).is_empty(), "{v:#}");
    let k = kinds(&v);
    assert_eq!(k.len(), 1, "{v:#}");
    assert_eq!(k[0].0, "origin", "{v:#}");
    assert_eq!(
        v["sources"][0]["reason"], "no peer holds it: origin (the RVP of b, hq serves no peers: skipped)",
        "{v:#}"
    );

    // hq serves again, then b: c's RVP is pointed back at b's RVP (which is then told to
    // fetch it for the sites below it), and stays there while nothing changes.
    beat(&a0_cred, "10.0.0.1", true).await;
    assert_eq!(upstream(&sources(&cid).await)[0].0, a0);
    beat(&b0_cred, "10.20.0.10", true).await;
    for _ in 0..3 {
        let v = sources(&cid).await;
        assert_eq!(
            upstream(&v),
            [(b0.clone(), "parent site b RVP, holds 0%".to_string())],
            "{v:#}"
        );
    }
    assert_eq!(assignments_now(&h, &b0_cred, vec![]).await, vec![cid.clone()]);
    // And off again, and on again: the answer follows each heartbeat, no later than the next
    // sources request, with no state left behind either way.
    beat(&b0_cred, "10.20.0.10", false).await;
    assert_eq!(upstream(&sources(&cid).await)[0].0, a0);
    beat(&b0_cred, "10.20.0.10", true).await;
    assert_eq!(upstream(&sources(&cid).await)[0].0, b0);
    let e = h
        .get(&format!("/v1/admin/sites/c/content/{cid}/election"), Some(ADMIN))
        .await
        .json();
    assert_eq!(e["rvp"], c0.as_str(), "{e:#}");
    h.finish().await;
}

async fn serving_cap_puts_the_rest_on_the_bench(db: Db) {
    let Some(h) = H::start_with(db, |c| c.peers_active_max = 2).await else {
        return;
    };
    assert_eq!(h.import_csv(TOPO).await.status, 200);
    let cid = h.publish_bytes("pkg", &data(5000, 1)).await;
    let tok = h.token(10).await;
    let mut ids = Vec::new();
    for i in 0..5u64 {
        let (id, cred) = h.enrol(&tok, &format!("p{i}")).await;
        h.heartbeat(&cred, facts(&format!("10.20.0.{}", 10 + i), 1000 - i))
            .await;
        h.send(
            "PUT",
            "/v1/inventory",
            Some(&cred),
            &json!({"items": [{"content": cid, "complete": true}]}),
        )
        .await;
        ids.push((id, cred));
    }
    let (_, asker) = h.enrol(&tok, "asker").await;
    h.heartbeat(&asker, facts("10.20.0.99", 1)).await;
    let e = h
        .get(&format!("/v1/admin/sites/branch/content/{cid}/election"), Some(ADMIN))
        .await
        .json();
    assert_eq!(e["rvp"], ids[0].0.as_str());
    assert_eq!(e["serving"], json!([ids[0].0, ids[1].0]));
    assert_eq!(e["bench"], json!([ids[2].0, ids[3].0, ids[4].0]));
    let v = h.get(&format!("/v1/content/{cid}/sources"), Some(&asker)).await.json();
    let peers: Vec<String> = kinds(&v).into_iter().filter(|k| k.0 != "origin").map(|k| k.2).collect();
    assert_eq!(peers, vec![ids[0].0.clone(), ids[1].0.clone()]);
    // A serving peer goes quiet: the first on the bench steps in. (The RVP stays: it
    // heartbeats and polls for its assignments, as every live agent does.)
    h.clock.advance_ms(200_000);
    for i in [0usize, 2, 3, 4] {
        h.heartbeat(&ids[i].1, facts(&format!("10.20.0.{}", 10 + i), 1000 - i as u64))
            .await;
    }
    assert!(assignments_now(&h, &ids[0].1, Vec::new()).await.is_empty());
    h.clock.advance_ms(200_000);
    assert!(assignments_now(&h, &ids[0].1, Vec::new()).await.is_empty());
    let e = h
        .get(&format!("/v1/admin/sites/branch/content/{cid}/election"), Some(ADMIN))
        .await
        .json();
    assert_eq!(e["serving"], json!([ids[0].0, ids[2].0]));
    h.finish().await;
}

async fn inventory_and_traffic(db: Db) {
    let Some(h) = H::start(db).await else { return };
    let f = fleet(&h).await;
    let cred = &f.creds[2].1;
    let cid = &f.cid;
    // Bad inventory: nothing written, earlier holdings intact.
    let unknown = ContentId::of(b"nope").to_string();
    let r = h
        .send(
            "PUT",
            "/v1/inventory",
            Some(cred),
            &json!({"items": [{"content": cid, "complete": true}, {"content": unknown, "complete": true}]}),
        )
        .await;
    assert_4xx(&r, 404, "not published");
    let r = h
        .send(
            "PUT",
            "/v1/inventory",
            Some(cred),
            &json!({"items": [{"content": cid, "ranges": [[0, 999999999]]}]}),
        )
        .await;
    assert_4xx(&r, 400, "past the end");
    let v = h
        .get(&format!("/v1/content/{cid}/sources"), Some(&f.creds[4].1))
        .await
        .json();
    let b1 = v["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["agent_id"] == f.creds[2].0.as_str())
        .unwrap()
        .clone();
    assert_eq!(b1["held_percent"], 50);
    // Replace: holds nothing now.
    assert_eq!(
        h.send(
            "PUT",
            "/v1/inventory",
            Some(cred),
            &json!({"items": [], "replace": true})
        )
        .await
        .status,
        200
    );
    let v = h
        .get(&format!("/v1/content/{cid}/sources"), Some(&f.creds[4].1))
        .await
        .json();
    assert!(!kinds(&v).iter().any(|k| k.2 == f.creds[2].0));
    // Traffic adds up per site and link.
    for _ in 0..2 {
        let r = h
            .send(
                "POST",
                "/v1/traffic",
                Some(cred),
                &json!({"lan_bytes": 1000, "wan_bytes": 10, "origin_bytes": 0}),
            )
            .await;
        assert_eq!(r.status, 204, "{}", r.text());
    }
    h.send("POST", "/v1/traffic", Some(&f.creds[0].1), &json!({"origin_bytes": 5}))
        .await;
    assert_4xx(
        &h.send("POST", "/v1/traffic", Some(cred), &json!({"lan_bytes": -1}))
            .await,
        400,
        "not the JSON",
    );
    let t = h.get("/v1/admin/traffic", Some(ADMIN)).await.json();
    assert_eq!(
        t,
        json!([{"site": "branch", "link": "lan", "bytes": 2000}, {"site": "branch", "link": "wan", "bytes": 20},
               {"site": "hq", "link": "origin", "bytes": 5}])
    );
    let m = h.get("/metrics", None).await.text();
    assert!(
        m.contains("lowtide_site_bytes_total{site=\"branch\",link=\"lan\"} 2000"),
        "{m}"
    );
    h.finish().await;
}

async fn metrics_openapi_and_every_route(db: Db) {
    let Some(h) = H::start(db).await else { return };
    let tok = h.token(1).await;
    h.enrol(&tok, "pc").await;
    let m = h.get("/metrics", None).await;
    assert_eq!(m.status, 200);
    let text = m.text();
    assert!(text.contains("lowtide_agents{status=\"active\"} 1"), "{text}");
    assert!(
        text.contains("lowtide_http_requests_total{route=\"/v1/enroll\",status=\"200\"} 1"),
        "{text}"
    );
    assert_eq!(h.get("/healthz", None).await.status, 200);
    let doc = h.get("/openapi.json", None).await.json();
    assert_eq!(doc["openapi"], "3.1.0");
    // Every documented route exists: the router answers with our JSON, not its empty 404/405.
    let cid = ContentId::of(b"x").to_string();
    for (method, path, ..) in lowtide_server::openapi::ROUTES {
        let p = path
            .replace("{id}", &cid)
            .replace("{site}", "hq")
            .replace("{name}", "app")
            .replace("{version}", "1");
        let r = h.req(&method.to_uppercase(), &p, None, Some(b"{}".to_vec()), &[]).await;
        assert!(
            !r.body.is_empty() || r.status == 204,
            "{method} {path}: {} with an empty body: not routed",
            r.status
        );
        assert_ne!(r.status, 405, "{method} {path}");
    }
    h.finish().await;
}

async fn names_resolve_to_the_newest_live_version(db: Db) {
    let Some(h) = H::start(db).await else { return };
    let publish = |version: &'static str, seed: u8| {
        let h = &h;
        async move {
            let p = h.db.dir.path().join(format!("tool-{version}.pkg"));
            std::fs::write(&p, data(20_000, seed)).unwrap();
            let r = h
                .send(
                    "POST",
                    "/v1/admin/content",
                    Some(ADMIN),
                    &json!({"name": "tool kit", "version": version, "path": p}),
                )
                .await;
            assert_eq!(r.status, 201, "{}", r.text());
            r.json()["id"].as_str().unwrap().to_string()
        }
    };
    let v9 = publish("1.9", 1).await;
    let v10 = publish("1.10", 2).await;
    let v2 = publish("1.2", 3).await;
    let tok = h.token(1).await;
    let (_, cred) = h.enrol(&tok, "pc").await;
    // Without a version: the highest one (1.10 > 1.9 > 1.2), whatever the publish order.
    let r = h.get("/v1/names/tool%20kit", Some(&cred)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["id"], v10.as_str());
    assert_eq!(r.json()["version"], "1.10");
    let r = h.get("/v1/names/tool%20kit/1.9", Some(&cred)).await;
    assert_eq!(r.json()["id"], v9.as_str());
    // Retiring the newest makes the next one the answer; asking for it by version says it was retired.
    let r = h
        .send(
            "POST",
            &format!("/v1/admin/content/{v10}/retire"),
            Some(ADMIN),
            &json!({}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        h.get("/v1/names/tool%20kit", Some(&cred)).await.json()["id"],
        v9.as_str()
    );
    assert_4xx(&h.get("/v1/names/tool%20kit/1.10", Some(&cred)).await, 410, "retired");
    // Unknown names and versions: 404 naming what there is.
    let r = h.get("/v1/names/tool%20kit/3.0", Some(&cred)).await;
    assert_4xx(&r, 404, "1.2, 1.9");
    assert_4xx(&h.get("/v1/names/nope", Some(&cred)).await, 404, "no content named");
    // Every version retired: 410.
    for id in [&v9, &v2] {
        h.send(
            "POST",
            &format!("/v1/admin/content/{id}/retire"),
            Some(ADMIN),
            &json!({}),
        )
        .await;
    }
    assert_4xx(&h.get("/v1/names/tool%20kit", Some(&cred)).await, 410, "every version");
    // Agents only.
    assert_eq!(h.get("/v1/names/tool%20kit", None).await.status, 401);
    h.finish().await;
}

async fn two_servers_share_one_database(db: Db) {
    let Some(h) = H::start(db).await else { return };
    let other = common::Server::start(&h.db, h.clock.clone(), |_| {}).await;
    let tok = h.token(10).await;
    let (_, cred) = h.enrol(&tok, "pc").await;
    // Heartbeat through the second server.
    let url = format!("{}/v1/heartbeat", other.base);
    let r = h
        .http
        .post(&url)
        .bearer_auth(&cred)
        .body(facts("10.20.0.5", 1).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // A topology imported through the first reaches the second within its recheck interval.
    assert_eq!(h.import_csv(TOPO).await.status, 200);
    h.clock.advance_ms(lowtide_server::store::TOPOLOGY_RECHECK_MS + 1);
    let r = h
        .http
        .post(&url)
        .bearer_auth(&cred)
        .body(facts("10.20.0.5", 1).to_string())
        .send()
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(v["site"], "branch");
    // Elections raced from both servers agree on one RVP.
    let cid = h.publish_bytes("pkg", b"shared").await;
    let mut creds = Vec::new();
    for i in 0..6 {
        let (_, c) = h.enrol(&tok, &format!("p{i}")).await;
        h.heartbeat(&c, facts(&format!("10.20.0.{}", 20 + i), 100 + i)).await;
        creds.push(c);
    }
    let mut tasks = Vec::new();
    for (i, c) in creds.iter().enumerate() {
        let base = if i % 2 == 0 {
            h.srv.base.clone()
        } else {
            other.base.clone()
        };
        let (http, c, cid) = (h.http.clone(), c.clone(), cid.clone());
        tasks.push(tokio::spawn(async move {
            let r = http
                .get(format!("{base}/v1/content/{cid}/sources"))
                .bearer_auth(c)
                .send()
                .await
                .unwrap();
            let v: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
            v
        }));
    }
    let mut rvps = std::collections::BTreeSet::new();
    for t in tasks {
        let v = t.await.unwrap();
        let rvp = v["sources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["kind"] == "site_rvp")
            .map(|s| s["agent_id"].clone());
        if let Some(r) = rvp {
            rvps.insert(r.to_string());
        }
    }
    assert!(rvps.len() <= 1, "servers disagree on the RVP: {rvps:?}");
    let e1 = h
        .get(&format!("/v1/admin/sites/branch/content/{cid}/election"), Some(ADMIN))
        .await
        .json();
    let e2: Value = serde_json::from_slice(
        &h.http
            .get(format!("{}/v1/admin/sites/branch/content/{cid}/election", other.base))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(e1["rvp"], e2["rvp"]);
    other.stop().await;
    h.finish().await;
}

async fn deployment_key_is_handed_out_and_rotated(db: Db) {
    let Some(h) = H::start(db).await else { return };
    let other = common::Server::start(&h.db, h.clock.clone(), |_| {}).await;
    let tok = h.token(2).await;
    let r = h
        .send("POST", "/v1/enroll", None, &json!({"token": tok, "hostname": "pc"}))
        .await;
    let e = r.json();
    let k1 = e["deployment_key"].as_str().unwrap().to_string();
    assert_eq!(k1.len(), 64, "{e}");
    assert_eq!(e["deployment_key_previous"], Value::Null);
    let cred = e["credential"].as_str().unwrap().to_string();
    let hb_other = || async {
        let r = h
            .http
            .post(format!("{}/v1/heartbeat", other.base))
            .bearer_auth(&cred)
            .body(facts("10.20.0.5", 1).to_string())
            .send()
            .await
            .unwrap();
        serde_json::from_slice::<Value>(&r.bytes().await.unwrap()).unwrap()
    };
    assert_eq!(hb_other().await["deployment_key"], k1.as_str());
    // Only the admin rotates.
    let r = h
        .send("POST", "/v1/admin/deployment-key/rotate", None, &json!({}))
        .await;
    assert_4xx(&r, 401, "authorization");
    let r = h
        .send("POST", "/v1/admin/deployment-key/rotate", Some(ADMIN), &json!({}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        !r.text().contains(&k1),
        "the answer shows fingerprints, never keys: {}",
        r.text()
    );
    // This server answers with the new key at once, the old one as previous.
    let v = h.heartbeat(&cred, facts("10.20.0.5", 1)).await.json();
    let k2 = v["deployment_key"].as_str().unwrap().to_string();
    assert_ne!(k2, k1);
    assert_eq!(v["deployment_key_previous"], k1.as_str());
    // The other server sees the rotation within its recheck interval.
    h.clock
        .advance_ms(lowtide_server::store::DEPLOYMENT_KEYS_RECHECK_MS + 1);
    let v = hb_other().await;
    assert_eq!(
        (v["deployment_key"].as_str(), v["deployment_key_previous"].as_str()),
        (Some(k2.as_str()), Some(k1.as_str()))
    );
    // After a stolen device: a new key, and the old ones are no longer handed out at all.
    let r = h
        .send(
            "POST",
            "/v1/admin/deployment-key/rotate?drop_previous=true",
            Some(ADMIN),
            &json!({}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = h.heartbeat(&cred, facts("10.20.0.5", 1)).await.json();
    let k3 = v["deployment_key"].as_str().unwrap();
    assert!(k3 != k1 && k3 != k2, "{v}");
    assert_eq!(v["deployment_key_previous"], Value::Null, "{v}");
    other.stop().await;
    h.finish().await;
}

both!(
    deployment_key_is_handed_out_and_rotated,
    enrol_heartbeat_and_list,
    bad_credentials_are_refused_and_write_nothing,
    malformed_and_oversized_bodies_are_refused,
    topology_import_export_and_errors,
    topology_proposal_from_agent_subnets,
    publish_manifest_table_and_origin_ranges,
    sources_are_ranked_with_reasons,
    vpn_sites_never_serve,
    rvp_is_re_elected_when_it_goes_inactive,
    sites_want_content_and_their_rvps_are_assigned_it,
    an_rvp_that_stops_polling_for_assignments_is_replaced,
    an_agent_polling_before_its_first_heartbeat_learns_its_assignments,
    a_gone_rvp_is_replaced_by_an_agent_that_is_still_heard_from,
    an_agent_that_does_not_serve_is_not_elected_while_another_serves,
    an_rvp_that_stops_serving_is_replaced,
    a_child_site_skips_a_parent_site_whose_rvp_serves_nobody,
    serving_cap_puts_the_rest_on_the_bench,
    inventory_and_traffic,
    metrics_openapi_and_every_route,
    two_servers_share_one_database,
    names_resolve_to_the_newest_live_version,
);
