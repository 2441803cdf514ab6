//! The request path's view of the audit chain: [`Trail`], which is the
//! audit module's when the feature is on, and a type with no values
//! otherwise (so every use of it compiles away).

#[cfg(feature = "audit")]
pub(crate) use crate::audit::Trail;

#[cfg(not(feature = "audit"))]
pub(crate) enum Trail {}

#[cfg(not(feature = "audit"))]
impl Trail {
    pub(crate) fn fingerprint(&mut self, _: &crate::Fingerprint) {
        match *self {}
    }

    pub(crate) fn reserve(&mut self) -> Result<(), ()> {
        match *self {}
    }

    pub(crate) fn another(&self) -> Result<Trail, ()> {
        match *self {}
    }

    pub(crate) fn record(self, _: &'static str, _: Option<u16>, _: Option<[u8; 32]>) {
        match self {}
    }
}
