//! The request path's view of the audit chain: [`Trail`], which is the
//! audit module's when the feature is on, and a type with no values
//! otherwise (so every use of it compiles away).

#[cfg(feature = "audit")]
pub(crate) use crate::audit::Trail;

#[cfg(not(feature = "audit"))]
pub(crate) enum Trail {}

/// A request's promised receipt: none without the feature.
#[cfg(not(feature = "audit"))]
pub(crate) enum ReceiptSlot {}

#[cfg(not(feature = "audit"))]
impl ReceiptSlot {
    pub(crate) fn stamp(&self, _: u16, _: &mut http::HeaderMap) {
        match *self {}
    }
}

#[cfg(not(feature = "audit"))]
impl Trail {
    pub(crate) fn fingerprint(&mut self, _: &crate::Fingerprint) {
        match *self {}
    }

    pub(crate) fn reserve(&mut self) -> Result<(), ()> {
        match *self {}
    }

    pub(crate) fn another(&mut self) -> Result<Trail, ()> {
        match *self {}
    }

    pub(crate) fn receipt(&self) -> Option<ReceiptSlot> {
        match *self {}
    }

    pub(crate) fn record(self, _: &'static str, _: Option<u16>, _: Option<[u8; 32]>) {
        match self {}
    }
}
