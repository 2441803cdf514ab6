//! A queue consumer that receives the same booking message three times (the
//! broker redelivers what it did not see acknowledged) and books once.
//!
//! ```text
//! cargo run --example redelivery_consumer
//! cargo run --example redelivery_consumer -- --consumer-dies
//! ```
//!
//! With `--consumer-dies`, the first consumer books and then stops before
//! it records the booking (its process hangs, or dies, before the broker
//! sees the message handled); the redelivery takes its claim over once the
//! lease has lapsed, finds the booking the first one made, and books
//! nothing: `deliveries: 2, bookings: 1`.
//!
//! Each message carries an id chosen by its producer, once per intent; the
//! consumer runs its booking through [`AtMostOnce`] keyed by that id, so a
//! redelivery (even one that arrives while the first delivery is still
//! booking) gets the recorded booking instead of a second one. On a fleet of
//! consumers, give `AtMostOnce` a shared store (Redis, PostgreSQL).

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tower_idempotency::{
    MemoryStore,
    once::{AtMostOnce, OnceError},
};

/// A message as the broker delivers it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct BookingMessage {
    message_id: String,
    caller: String,
    slot: String,
    provider: String,
}

/// What booking produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Booking {
    id: u64,
    caller: String,
    slot: String,
    /// The message that made it, kept with the row (as a unique column):
    /// how an execution that took over a stalled one finds its booking.
    message_id: String,
}

#[derive(Default)]
struct PracticeSystem {
    rows: Mutex<Vec<Booking>>,
}

impl PracticeSystem {
    /// The booking an earlier delivery of `message` made, if any.
    fn find(&self, message: &BookingMessage) -> Option<Booking> {
        let rows = self.rows.lock().unwrap_or_else(|e| e.into_inner());
        rows.iter()
            .find(|row| row.message_id == message.message_id)
            .cloned()
    }

    async fn book(&self, message: &BookingMessage) -> Result<Booking, std::io::Error> {
        // The practice system takes a while to commit.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut rows = self.rows.lock().unwrap_or_else(|e| e.into_inner());
        let booking = Booking {
            id: rows.len() as u64 + 1,
            caller: message.caller.clone(),
            slot: message.slot.clone(),
            message_id: message.message_id.clone(),
        };
        rows.push(booking.clone());
        Ok(booking)
    }
}

#[tokio::main]
async fn main() {
    match std::env::args().nth(1).as_deref() {
        None => redeliveries().await,
        Some("--consumer-dies") => a_consumer_dies().await,
        Some(other) => {
            eprintln!("unknown argument {other:?}; usage: redelivery_consumer [--consumer-dies]");
            std::process::exit(64);
        }
    }
}

/// Two deliveries at once, then a late one: one booking.
async fn redeliveries() {
    let practice = Arc::new(PracticeSystem::default());
    // Duplicates that arrive while the first delivery books wait for it.
    let once = AtMostOnce::new(MemoryStore::default()).with_wait(Duration::from_secs(10));
    let message = BookingMessage {
        message_id: "msg-2026-12-01-0007".into(),
        caller: "ada".into(),
        slot: "2026-12-01T09:00".into(),
        provider: "dr-who".into(),
    };

    // Two deliveries at once (a redelivery racing the first), then a late one.
    let deliveries: Vec<_> = (1..=2)
        .map(|delivery| {
            let (once, practice, message) = (once.clone(), practice.clone(), message.clone());
            tokio::spawn(async move { consume(&once, &practice, delivery, &message).await })
        })
        .collect();
    for delivery in deliveries {
        delivery.await.expect("a delivery task ran");
    }
    consume(&once, &practice, 3, &message).await;
    // A process that exits waits for records the store was slow to take:
    // otherwise its next start would book again.
    let drained = once.drain(Duration::from_secs(10)).await;
    if !drained.is_complete() {
        eprintln!("not every booking was recorded: {drained}");
        std::process::exit(1);
    }

    let rows = practice
        .rows
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .len();
    println!("deliveries: 3, bookings: {rows}");
    if rows != 1 {
        std::process::exit(1);
    }
}

/// The first consumer books, then stops before its booking is recorded;
/// the redelivery, after the lease, takes over and finds the booking.
async fn a_consumer_dies() {
    let practice = Arc::new(PracticeSystem::default());
    let once = AtMostOnce::new(MemoryStore::default()).with_lease(Duration::from_millis(600));
    let message = BookingMessage {
        message_id: "msg-2026-12-01-0008".into(),
        caller: "grace".into(),
        slot: "2026-12-01T10:00".into(),
        provider: "dr-who".into(),
    };
    let dying = once.run("bookings-queue", &message.message_id, &message, |_ctx| {
        let practice = practice.clone();
        let message = message.clone();
        async move {
            let booking = practice.book(&message).await?;
            // Booked, then the consumer hangs before it can record it.
            std::future::pending::<()>().await;
            Ok::<Booking, std::io::Error>(booking)
        }
    });
    let _ = tokio::time::timeout(Duration::from_millis(500), dying).await;
    eprintln!("delivery 1: the consumer stopped after booking, before recording it");
    tokio::time::sleep(Duration::from_millis(800)).await;
    consume(&once, &practice, 2, &message).await;
    let rows = practice
        .rows
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .len();
    println!("deliveries: 2, bookings: {rows}");
    if rows != 1 {
        std::process::exit(1);
    }
}

async fn consume(
    once: &AtMostOnce<MemoryStore>,
    practice: &PracticeSystem,
    delivery: u32,
    message: &BookingMessage,
) {
    let result = once
        .run("bookings-queue", &message.message_id, message, |ctx| async move {
            if ctx.took_over() {
                // An earlier consumer stopped mid-booking: it may have
                // booked before it stopped. Look before booking again.
                if let Some(booking) = practice.find(message) {
                    eprintln!("delivery {delivery}: an earlier consumer stopped mid-booking; its booking stands");
                    return Ok(booking);
                }
                eprintln!("delivery {delivery}: an earlier consumer stopped before booking; booking now");
            }
            practice.book(message).await
        })
        .await;
    match result {
        Ok(booking) => println!(
            "delivery {delivery}: booking {} for {} at {}",
            booking.id, booking.caller, booking.slot
        ),
        // It booked, but lost its claim while it did: another delivery may
        // have booked too. Never report it as a plain success.
        Err(OnceError::Fenced(fenced)) => match fenced.output::<Booking>() {
            Ok(booking) => eprintln!(
                "delivery {delivery}: booked {} but lost the claim meanwhile: check for a second booking",
                booking.id
            ),
            Err(err) => eprintln!("delivery {delivery}: lost the claim: {err}"),
        },
        Err(err) => eprintln!("delivery {delivery}: not booked: {err}"),
    }
}
