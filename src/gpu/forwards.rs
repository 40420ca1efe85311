//! Which forward a cache belongs to. The stateful layers keep the statistics of their last
//! forward on the device (no allocation per call, so a CUDA graph can capture them); a backward
//! checks that its cache is of that forward.

use crate::error::{Error, Result};
use std::sync::atomic::{AtomicU64, Ordering};

/// Source of layer ids.
static NEXT_LAYER_ID: AtomicU64 = AtomicU64::new(0);

/// A layer's count of the forwards whose statistics it kept.
#[derive(Debug)]
pub(crate) struct ForwardLog {
    layer: u64,
    forwards: u64,
}

/// One forward of one layer, as a cache records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Ticket {
    layer: u64,
    forward: u64,
}

impl ForwardLog {
    /// The log of a new layer, with an id no other layer has.
    pub(crate) fn new() -> Self {
        Self {
            layer: NEXT_LAYER_ID.fetch_add(1, Ordering::Relaxed),
            forwards: 0,
        }
    }

    /// Counts a forward whose statistics the layer now holds.
    pub(crate) fn record(&mut self) -> Ticket {
        self.forwards += 1;
        Ticket {
            layer: self.layer,
            forward: self.forwards,
        }
    }

    /// Ends every ticket issued so far (the kept statistics were replaced).
    pub(crate) fn forget(&mut self) {
        self.forwards += 1;
    }

    /// The kept statistics are those of `ticket`'s forward.
    pub(crate) fn check(&self, ticket: &Ticket) -> Result<()> {
        let reason = if ticket.layer != self.layer {
            "the cache comes from another layer"
        } else if ticket.forward != self.forwards {
            "another forward of this layer ran since the one the cache belongs to"
        } else {
            return Ok(());
        };
        Err(Error::MissingSavedStats { reason })
    }
}
