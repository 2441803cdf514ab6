//! [`Trail`]: one request's place in the chain.

use std::{sync::Arc, time::SystemTime};

use tokio::{sync::mpsc::OwnedPermit, time::Instant};

use super::{AuditLog, entry::Pending, receipt::ReceiptSlot};
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
    recorded: bool,
    /// The receipt its response gets, with receipts on.
    receipt: Option<Arc<ReceiptSlot>>,
}

impl Trail {
    pub(super) fn new(
        log: AuditLog,
        permit: Option<OwnedPermit<Pending>>,
        scope: Option<[u8; 32]>,
        key: Option<[u8; 32]>,
        receipt: bool,
    ) -> Self {
        // Only a response carries a receipt: an at-most-once call has none
        // to give, and its entry promises nobody one.
        let receipt = if receipt { log.receipt_slot(key) } else { None };
        if permit.is_some()
            && let Some(slot) = &receipt
        {
            slot.promise();
        }
        Trail {
            log,
            permit,
            started: Instant::now(),
            scope,
            key,
            fingerprint: None,
            recorded: false,
            receipt,
        }
    }

    /// The receipt the request's response gets (with receipts on): given
    /// once the decision has its place in the queue.
    pub(crate) fn receipt(&self) -> Option<Arc<ReceiptSlot>> {
        self.receipt.clone()
    }

    /// Takes the request's place in the queue now (after its body was
    /// read, so slow uploads hold none). `Err` under
    /// [`AuditFailure::Closed`](super::AuditFailure::Closed) when there is
    /// none: the request must not run, and its refusal is counted as lost,
    /// with no entry of its own.
    pub(crate) fn reserve(&mut self) -> Result<(), ()> {
        if self.permit.is_some() {
            return Ok(());
        }
        match self.log.reserve() {
            Ok(permit) => {
                if permit.is_some()
                    && let Some(slot) = &self.receipt
                {
                    slot.promise();
                }
                self.permit = permit;
                Ok(())
            }
            Err(()) => {
                self.recorded = true;
                Err(())
            }
        }
    }

    pub(crate) fn fingerprint(&mut self, fingerprint: &Fingerprint) {
        self.fingerprint = Some(self.log.shared.hasher.rekey(*fingerprint.as_bytes()));
    }

    /// Another place for the same request, for a second decision (a take
    /// over before the execution's own), which takes the receipt with it.
    /// `Err` as for [`AuditLog::trail`].
    pub(crate) fn another(&mut self) -> Result<Trail, ()> {
        let permit = self.log.reserve()?;
        let receipt = self.receipt.take();
        if let Some(slot) = &receipt {
            slot.set_promised(permit.is_some());
        }
        Ok(Trail {
            log: self.log.clone(),
            permit,
            started: self.started,
            scope: self.scope,
            key: self.key,
            fingerprint: self.fingerprint,
            recorded: false,
            receipt,
        })
    }

    /// Writes the decision.
    pub(crate) fn record(
        mut self,
        decision: &'static str,
        status: Option<u16>,
        response: Option<[u8; 32]>,
    ) {
        self.write(decision, status, response);
    }

    fn write(&mut self, decision: &'static str, status: Option<u16>, response: Option<[u8; 32]>) {
        self.recorded = true;
        // Capped where JSON numbers stop being exact.
        let millis = self.started.elapsed().as_millis().min((1 << 53) - 1);
        let promised = self
            .receipt
            .as_ref()
            .filter(|slot| slot.promised_id().is_some());
        // A decision without a status of its own (a request dropped, a
        // claim released after a panic) whose response was already given
        // states the status its receipt did.
        let status = status.or_else(|| promised.and_then(|slot| slot.stamped_status()));
        let pending = Pending {
            time: SystemTime::now(),
            decision,
            scope: self.scope,
            key: self.key,
            fingerprint: self.fingerprint,
            status,
            duration_ms: millis as u64,
            response: response.map(|digest| self.log.shared.hasher.rekey(digest)),
            count: None,
            cut_bytes: None,
            receipt: self.receipt.as_ref().and_then(|slot| slot.promised_id()),
            next_key: None,
            continues: None,
            after_crash: false,
            run: None,
        };
        self.log.send(self.permit.take(), pending);
    }
}

impl Drop for Trail {
    /// A request that ended before any decision (its client went away while
    /// its body was read, or the caller dropped an at-most-once call) still
    /// has its entry: `dropped`.
    fn drop(&mut self) {
        if !self.recorded {
            self.write("dropped", None, None);
        }
    }
}
