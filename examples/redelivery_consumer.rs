//! A queue consumer that receives the same booking message three times (the
//! broker redelivers what it did not see acknowledged) and books once.
//!
//! ```text
//! cargo run --example redelivery_consumer
//! ```
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
use tower_idempotency::{MemoryStore, once::AtMostOnce};

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
}

#[derive(Default)]
struct PracticeSystem {
    rows: Mutex<Vec<Booking>>,
}

impl PracticeSystem {
    async fn book(&self, message: &BookingMessage) -> Result<Booking, std::io::Error> {
        // The practice system takes a while to commit.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut rows = self.rows.lock().unwrap_or_else(|e| e.into_inner());
        let booking = Booking {
            id: rows.len() as u64 + 1,
            caller: message.caller.clone(),
            slot: message.slot.clone(),
        };
        rows.push(booking.clone());
        Ok(booking)
    }
}

#[tokio::main]
async fn main() {
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

async fn consume(
    once: &AtMostOnce<MemoryStore>,
    practice: &PracticeSystem,
    delivery: u32,
    message: &BookingMessage,
) {
    let result = once
        .run("bookings-queue", &message.message_id, message, |ctx| async move {
            if ctx.took_over() {
                eprintln!("delivery {delivery}: an earlier consumer died mid-booking; checking before booking");
            }
            practice.book(message).await
        })
        .await;
    match result {
        Ok(booking) => println!(
            "delivery {delivery}: booking {} for {} at {}",
            booking.id, booking.caller, booking.slot
        ),
        Err(err) => eprintln!("delivery {delivery}: not booked: {err}"),
    }
}
