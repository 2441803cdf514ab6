//! A bound on the request bytes the layer holds buffered at once, across
//! every request of every service a layer built.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

/// Bytes of request bodies buffered now, and the most allowed.
#[derive(Debug)]
pub(crate) struct Budget {
    max: usize,
    used: AtomicUsize,
}

impl Budget {
    pub(crate) fn new(max: usize) -> Self {
        Budget {
            max,
            used: AtomicUsize::new(0),
        }
    }

    /// Bytes buffered now, by every request.
    #[cfg(test)]
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

/// The bytes one request holds of a [`Budget`], given back when dropped:
/// by the request path if the request never reaches its service, else by
/// the body the service receives, once it has handed its data over.
#[derive(Debug)]
pub(crate) struct Reservation {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Reservation {
    pub(crate) fn new(budget: Arc<Budget>) -> Self {
        Reservation { budget, bytes: 0 }
    }

    /// Holds `total` bytes in all, or `false` (holding what it held) when
    /// the budget has no room for the rest.
    pub(crate) fn grow_to(&mut self, total: usize) -> bool {
        match total.checked_sub(self.bytes) {
            Some(more) if more > 0 => self.grow(more),
            _ => true,
        }
    }

    /// Takes `bytes` more, or nothing and `false` when the budget has no
    /// room for them.
    pub(crate) fn grow(&mut self, bytes: usize) -> bool {
        let before = self.budget.used.fetch_add(bytes, Ordering::AcqRel);
        if before.saturating_add(bytes) > self.budget.max {
            self.budget.used.fetch_sub(bytes, Ordering::AcqRel);
            return false;
        }
        self.bytes += bytes;
        true
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_are_bounded_and_given_back() {
        let budget = Arc::new(Budget::new(100));
        let mut a = Reservation::new(budget.clone());
        assert!(a.grow(60));
        let mut b = Reservation::new(budget.clone());
        assert!(!b.grow(41), "over the bound");
        assert!(b.grow_to(40));
        assert!(b.grow_to(30), "already held");
        assert!(!a.grow(1));
        drop(a);
        assert_eq!(budget.used(), 40);
        drop(b);
        assert_eq!(budget.used(), 0);
    }
}
