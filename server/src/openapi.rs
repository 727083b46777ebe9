//! The OpenAPI 3.1 document of the HTTP API, served at `/openapi.json`.
//!
//! Written by hand from [`ROUTES`], the list the router test checks against,
//! so a route cannot be added to one without the other.

use serde_json::{json, Map, Value};

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    None,
    /// `Authorization: Bearer <agent credential>` from enrolment.
    Agent,
    /// `Authorization: Bearer <admin_token>` from the server config.
    Admin,
}

/// Every route: method, path template, who may call it, request body type, summary.
pub const ROUTES: &[(&str, &str, Auth, Option<&str>, &str)] = &[
    (
        "post",
        "/v1/enroll",
        Auth::None,
        Some("Enroll"),
        "Enrol an agent with a token; returns its credential and the server key",
    ),
    (
        "post",
        "/v1/heartbeat",
        Auth::Agent,
        Some("Facts"),
        "Heartbeat with hardware facts, addresses and subnets",
    ),
    (
        "put",
        "/v1/inventory",
        Auth::Agent,
        Some("Inventory"),
        "Report content held, in full or as byte ranges",
    ),
    (
        "post",
        "/v1/traffic",
        Auth::Agent,
        Some("TrafficReport"),
        "Add bytes moved on the LAN, over the WAN link and from the origin",
    ),
    (
        "get",
        "/v1/content/{id}/sources",
        Auth::Agent,
        None,
        "Ranked sources for a content: peers, site RVP, parent RVP, origin",
    ),
    (
        "post",
        "/v1/assignments",
        Auth::Agent,
        Some("AssignmentsRequest"),
        "Contents this agent should fetch for its site as its RVP (long poll up to wait_ms)",
    ),
    (
        "get",
        "/v1/content/{id}/manifest",
        Auth::Agent,
        None,
        "The Ed25519-signed manifest of a content",
    ),
    (
        "get",
        "/v1/content/{id}/table",
        Auth::Agent,
        None,
        "The encoded BLAKE3 block table (verify with the content id)",
    ),
    (
        "get",
        "/v1/names/{name}",
        Auth::Agent,
        None,
        "The content id of the highest version of a name that is not retired (404 unknown, 410 all retired)",
    ),
    (
        "get",
        "/v1/names/{name}/{version}",
        Auth::Agent,
        None,
        "The content id of one version of a name (404 unknown, 410 retired)",
    ),
    (
        "get",
        "/v1/server-key",
        Auth::None,
        None,
        "The server's Ed25519 public key",
    ),
    (
        "get",
        "/files/{id}",
        Auth::None,
        None,
        "Origin copy of a stored content, with HTTP Range support",
    ),
    (
        "get",
        "/v1/admin/content",
        Auth::Admin,
        None,
        "List content (?all=true includes retired)",
    ),
    (
        "post",
        "/v1/admin/content",
        Auth::Admin,
        Some("PublishRequest"),
        "Publish from a server-local path or an http:// URL",
    ),
    ("get", "/v1/admin/content/{id}", Auth::Admin, None, "Show one content"),
    (
        "post",
        "/v1/admin/content/{id}/retire",
        Auth::Admin,
        None,
        "Retire a content",
    ),
    ("get", "/v1/admin/tokens", Auth::Admin, None, "List enrolment tokens"),
    (
        "post",
        "/v1/admin/tokens",
        Auth::Admin,
        Some("TokenRequest"),
        "Create an enrolment token",
    ),
    (
        "delete",
        "/v1/admin/tokens/{id}",
        Auth::Admin,
        None,
        "Revoke an enrolment token",
    ),
    (
        "post",
        "/v1/admin/deployment-key/rotate",
        Auth::Admin,
        None,
        "Rotate the P2P deployment key (the old one stays accepted until the next rotation; ?drop_previous=true: not at all)",
    ),
    (
        "get",
        "/v1/admin/agents",
        Auth::Admin,
        None,
        "List agents with status and facts",
    ),
    ("get", "/v1/admin/agents/{id}", Auth::Admin, None, "Show one agent"),
    (
        "post",
        "/v1/admin/agents/{id}/revoke",
        Auth::Admin,
        None,
        "Revoke an agent's credential",
    ),
    (
        "get",
        "/v1/admin/topology",
        Auth::Admin,
        None,
        "Export the topology as CSV",
    ),
    (
        "put",
        "/v1/admin/topology",
        Auth::Admin,
        Some("TopologyCsv"),
        "Import a topology CSV (all or nothing, line-numbered errors)",
    ),
    (
        "get",
        "/v1/admin/topology/proposal",
        Auth::Admin,
        None,
        "A topology CSV proposed from the subnets agents report",
    ),
    (
        "get",
        "/v1/admin/sites/{site}/content/{id}/election",
        Auth::Admin,
        None,
        "RVP, serving peers and bench of a site for a content",
    ),
    (
        "get",
        "/v1/admin/traffic",
        Auth::Admin,
        None,
        "Bytes per site and link reported by agents",
    ),
    ("get", "/metrics", Auth::None, None, "Prometheus metrics"),
    ("get", "/openapi.json", Auth::None, None, "This document"),
    ("get", "/healthz", Auth::None, None, "Liveness and database check"),
];

fn schemas() -> Value {
    let id =
        json!({"type": "string", "pattern": "^[0-9a-f]{64}$", "description": "BLAKE3 hash of the content (b3sum)"});
    json!({
        "Error": {"type": "object", "required": ["error"], "properties": {
            "error": {"type": "string"},
            "errors": {"type": "array", "items": {"type": "object", "properties": {"line": {"type": "integer"}, "message": {"type": "string"}}}}}},
        "Enroll": {"type": "object", "required": ["token"], "properties": {"token": {"type": "string"}, "hostname": {"type": "string"}}},
        "Facts": {"type": "object", "properties": {
            "hostname": {"type": "string"}, "addresses": {"type": "array", "items": {"type": "string"}},
            "subnets": {"type": "array", "items": {"type": "string", "description": "CIDR"}}, "port": {"type": "integer"},
            "disk_free_bytes": {"type": "integer"}, "disk_usable_bytes": {"type": "integer"},
            "chassis": {"enum": ["desktop", "server", "vm", "laptop", "unknown"]}, "os_type": {"enum": ["server", "workstation", "unknown"]},
            "uptime_secs": {"type": "integer"}, "preferred": {"type": "boolean"}, "site_override": {"type": ["string", "null"]},
            "serves": {"type": "boolean", "default": true, "description": "serves peers now (false: uploads_max = 0, on battery, busy); elections take an agent that does not serve only when none of its site does"}}},
        "Inventory": {"type": "object", "required": ["items"], "properties": {
            "replace": {"type": "boolean"},
            "items": {"type": "array", "items": {"type": "object", "required": ["content"], "properties": {
                "content": id, "complete": {"type": "boolean"},
                "ranges": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2}}}}}}},
        "TrafficReport": {"type": "object", "properties": {"lan_bytes": {"type": "integer"}, "wan_bytes": {"type": "integer"}, "origin_bytes": {"type": "integer"}}},
        "AssignmentsRequest": {"type": "object", "properties": {
            "wait_ms": {"type": "integer", "description": "long poll: wait up to this long (at most 25000) for an assignment not in running"},
            "running": {"type": "array", "items": id}}},
        "PublishRequest": {"type": "object", "required": ["name", "version"], "properties": {
            "name": {"type": "string"}, "version": {"type": "string"}, "path": {"type": "string"}, "url": {"type": "string"},
            "origins": {"type": "array", "items": {"type": "string"}}, "store": {"type": "boolean", "default": true}}},
        "TokenRequest": {"type": "object", "properties": {"uses": {"type": "integer", "default": 1}, "ttl_hours": {"type": "integer"}, "note": {"type": "string"}}},
        "TopologyCsv": {"type": "string", "description": "id,name,parent,type,subnets,wan_up_kbps,wan_down_kbps"},
    })
}

/// The OpenAPI document.
pub fn document() -> Value {
    let mut paths = Map::new();
    for &(method, path, auth, body, summary) in ROUTES {
        let mut op = Map::new();
        op.insert("summary".into(), json!(summary));
        let params: Vec<Value> = path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        if !params.is_empty() {
            op.insert("parameters".into(), Value::Array(params));
        }
        match auth {
            Auth::None => {}
            Auth::Agent => {
                op.insert("security".into(), json!([{"agent": []}]));
            }
            Auth::Admin => {
                op.insert("security".into(), json!([{"admin": []}]));
            }
        }
        if let Some(b) = body {
            let media = if b == "TopologyCsv" {
                "text/csv"
            } else {
                "application/json"
            };
            op.insert("requestBody".into(), json!({"required": true, "content": {media: {"schema": {"$ref": format!("#/components/schemas/{b}")}}}}));
        }
        let err = json!({"description": "the reason, in words", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
        op.insert(
            "responses".into(),
            json!({"200": {"description": "success"}, "400": err, "401": err, "403": err, "404": err, "410": err, "413": err, "422": err}),
        );
        let entry = paths
            .entry(path.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        entry
            .as_object_mut()
            .expect("path entries are objects")
            .insert(method.into(), Value::Object(op));
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Lowtide server API", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Agent and admin API of the Lowtide server. Errors are JSON objects with an `error` string."},
        "paths": paths,
        "components": {
            "schemas": schemas(),
            "securitySchemes": {
                "agent": {"type": "http", "scheme": "bearer", "description": "agent credential lt1.<id>.<secret> from /v1/enroll"},
                "admin": {"type": "http", "scheme": "bearer", "description": "admin_token from the server configuration"}
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openapi_lists_every_route_and_resolves_refs() {
        let doc = document();
        for (m, p, ..) in ROUTES {
            assert!(doc["paths"][p][m].is_object(), "{m} {p} missing");
        }
        let text = doc.to_string();
        for (_, _, _, body, _) in ROUTES {
            if let Some(b) = body {
                assert!(doc["components"]["schemas"][b].is_object(), "schema {b} missing");
            }
        }
        assert!(text.contains("\"openapi\":\"3.1.0\""));
    }
}
