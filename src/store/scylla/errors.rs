//! Failures: the [`StoreError`] of a failed request (with a hint when the schema is
//! missing), and the retry policy that retries a request at most `retries` times on errors
//! that may pass.

use scylla::errors::{DbError, ExecutionError, PrepareError, RequestAttemptError};
use scylla::policies::retry::{RequestInfo, RetryDecision, RetryPolicy, RetrySession};

use crate::bridge::BridgeError;
use crate::history::StoreError;

/// A failed request: nothing acked. Names what failed, and the timeout when it was one.
pub(super) fn unavailable(what: &str, e: &ExecutionError) -> StoreError {
    match e {
        ExecutionError::RequestTimeout(d) => StoreError::Unavailable(format!(
            "cannot {what}: ScyllaDB did not answer within {} ms",
            d.as_millis()
        )),
        e => StoreError::Unavailable(format!("cannot {what}: {e}{}", schema_hint(e))),
    }
}

/// A hint when a request failed because the schema is missing.
pub(super) fn schema_hint(e: &ExecutionError) -> &'static str {
    match e {
        ExecutionError::LastAttemptError(RequestAttemptError::DbError(DbError::Invalid, _))
        | ExecutionError::PrepareError(PrepareError::AllAttemptsFailed {
            first_attempt: RequestAttemptError::DbError(DbError::Invalid, _),
        }) => " (is the schema applied? run `corelay schema apply`)",
        _ => "",
    }
}

/// Data that does not decode as the schema says.
pub(super) fn corrupt(room: &str, e: &dyn std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!(
        "room {room:?}: unexpected answer from ScyllaDB: {e}"
    ))
}

/// The bridge could not run a call.
pub(super) fn bridge_error(e: BridgeError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Retries a failed idempotent request at most `max` times, on errors that may pass:
/// unavailable / overloaded / bootstrapping coordinators and broken connections (on the
/// next node of the plan), server-side timeouts and failures (on the same node). The
/// profile's `request_timeout` bounds the whole, retries included.
#[derive(Debug)]
pub(super) struct BoundedRetry {
    pub(super) max: u32,
}

impl RetryPolicy for BoundedRetry {
    fn new_session(&self) -> Box<dyn RetrySession> {
        Box::new(BoundedRetrySession {
            max: self.max,
            used: 0,
        })
    }
}

/// The retry state of one request.
struct BoundedRetrySession {
    max: u32,
    used: u32,
}

impl RetrySession for BoundedRetrySession {
    fn decide_should_retry(&mut self, info: RequestInfo<'_>) -> RetryDecision {
        if !info.is_idempotent || info.consistency.is_serial() || self.used >= self.max {
            return RetryDecision::DontRetry;
        }
        let decision = match info.error {
            RequestAttemptError::BrokenConnectionError(_)
            | RequestAttemptError::UnableToAllocStreamId => RetryDecision::RetryNextTarget(None),
            RequestAttemptError::DbError(db, _) => match db {
                DbError::Unavailable { .. } | DbError::Overloaded | DbError::IsBootstrapping => {
                    RetryDecision::RetryNextTarget(None)
                }
                DbError::ReadTimeout { .. }
                | DbError::WriteTimeout { .. }
                | DbError::ReadFailure { .. }
                | DbError::WriteFailure { .. }
                | DbError::ServerError => RetryDecision::RetrySameTarget(None),
                _ => RetryDecision::DontRetry,
            },
            _ => RetryDecision::DontRetry,
        };
        if decision != RetryDecision::DontRetry {
            self.used += 1;
        }
        decision
    }

    fn reset(&mut self) {
        self.used = 0;
    }
}
