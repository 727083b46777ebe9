//! The server's error type: every variant maps to one HTTP status and carries
//! a message a person can act on.

use serde::Serialize;

/// One bad line of an uploaded CSV file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LineError {
    /// 1-based line number in the file (the header is line 1).
    pub line: usize,
    pub message: String,
}

impl std::fmt::Display for LineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Malformed request (bad JSON, bad id, out-of-range field).
    #[error("{0}")]
    BadRequest(String),
    /// Missing, malformed, forged or unknown credential.
    #[error("{0}")]
    Unauthorized(String),
    /// A valid identity that is not allowed (revoked agent, admin API disabled).
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// Content that existed but was retired.
    #[error("{0}")]
    Gone(String),
    #[error("{0}")]
    TooLarge(String),
    /// Well-formed input that fails validation; `errors` lists each bad line.
    #[error("{message}: {}", errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    Invalid { message: String, errors: Vec<LineError> },
    /// The database failed; the operation was not applied.
    #[error("{}", db_message(.0))]
    Db(#[from] sqlx::Error),
    #[error("database migration failed: {0}; check that the database URL points at a Lowtide database")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Upstream(String),
    /// A dependency (the database) is down for now; retry later.
    #[error("{0}")]
    Unavailable(String),
    /// A failure inside the server; the operation was not applied.
    #[error("{0}")]
    Internal(String),
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    /// The HTTP status this error answers with.
    pub fn status(&self) -> u16 {
        match self {
            Self::BadRequest(_) => 400,
            Self::Unauthorized(_) => 401,
            Self::Forbidden(_) => 403,
            Self::NotFound(_) => 404,
            Self::Conflict(_) => 409,
            Self::Gone(_) => 410,
            Self::TooLarge(_) => 413,
            Self::Invalid { .. } => 422,
            Self::Upstream(_) => 502,
            Self::Db(e) if db_unavailable(e) => 503,
            Self::Unavailable(_) => 503,
            Self::Db(_) | Self::Migrate(_) | Self::Io { .. } | Self::Internal(_) => 500,
        }
    }
}

/// The database cannot be reached right now (down, restarting, recovering, or
/// every connection busy): a 503 the client retries, not a bug.
pub(crate) fn db_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => true,
        // SQLSTATE class 08 (connection exception) and 57 (operator intervention:
        // shutdown, crash recovery, "the database system is starting up").
        sqlx::Error::Database(d) => d.code().is_some_and(|c| c.starts_with("08") || c.starts_with("57")),
        _ => false,
    }
}

pub(crate) fn db_message(e: &sqlx::Error) -> String {
    if db_unavailable(e) {
        format!("the database is unavailable ({e}); nothing was changed, retry in a few seconds")
    } else {
        format!("database error: {e}")
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
