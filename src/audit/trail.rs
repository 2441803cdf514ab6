//! [`Trail`]: one request's place in the chain.

use std::time::SystemTime;

use tokio::{sync::mpsc::OwnedPermit, time::Instant};

use super::{AuditLog, entry::Pending};
use crate::Fingerprint;

/// The decisions of one request (or one at-most-once call), with the place
/// in the queue it reserved before it could execute.
pub(crate) struct Trail {
    log: AuditLog,
    permit: Option<OwnedPermit<Pending>>,
    started: Instant,
    scope: Option<[u8; 32]>,
    key: Option<[u8; 32]>,
    fingerprint: Option<[u8; 32]>,
}

impl Trail {
    pub(super) fn new(
        log: AuditLog,
        permit: Option<OwnedPermit<Pending>>,
        scope: Option<[u8; 32]>,
        key: Option<[u8; 32]>,
    ) -> Self {
        Trail {
            log,
            permit,
            started: Instant::now(),
            scope,
            key,
            fingerprint: None,
        }
    }

    pub(crate) fn fingerprint(&mut self, fingerprint: &Fingerprint) {
        self.fingerprint = Some(*fingerprint.as_bytes());
    }

    /// Another place for the same request, for a second decision (a take
    /// over before the execution's own). `Err` as for
    /// [`AuditLog::trail`].
    pub(crate) fn another(&self) -> Result<Trail, ()> {
        let permit = self.log.reserve()?;
        Ok(Trail {
            log: self.log.clone(),
            permit,
            started: self.started,
            scope: self.scope,
            key: self.key,
            fingerprint: self.fingerprint,
        })
    }

    /// Writes the decision.
    pub(crate) fn record(
        mut self,
        decision: &'static str,
        status: Option<u16>,
        response: Option<[u8; 32]>,
    ) {
        let pending = Pending {
            time: SystemTime::now(),
            decision,
            scope: self.scope,
            key: self.key,
            fingerprint: self.fingerprint,
            status,
            duration_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            response,
            count: None,
        };
        self.log.send(self.permit.take(), pending);
    }
}
