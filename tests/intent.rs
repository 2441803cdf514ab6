//! Intent keys: the cross-language vectors, and properties over generated
//! identities.

use proptest::prelude::*;
use serde_json::{Value, json};
use tower_idempotency::client::{IntentKey, IntentKeyError};

/// Computed independently with Python's `json.dumps(sort_keys=True,
/// separators=(",", ":"), ensure_ascii=False)` and `hashlib.sha256`.
#[test]
fn the_documented_vectors_hold() {
    let vectors = [
        (
            "book",
            json!({"caller": "ada", "slot": "2026-12-01T09:00", "provider": "dr-who", "session": "default"}),
            "e7164c52a3bb021a8bc9b437ea0fb882",
        ),
        (
            "pay",
            json!({"customer": "cus_42", "amount": 12.5, "currency": "EUR", "invoice": {"lines": [1, 2, 3], "id": "inv-7"}}),
            "b591cf84f6364963582a4ea795d0f725",
        ),
        (
            "book",
            json!({"caller": "Zoë Åkesson", "slot": "2026-12-01T09:00", "provider": "dr-müller", "session": "turn-3"}),
            "8f75b5620b818f9d38535066da76bc87",
        ),
        (
            "refund",
            json!({"amount": -0.5, "count": 3, "max": 9007199254740991u64, "note": "日本語"}),
            "0649768a3a922d3b62676e240f6b9144",
        ),
    ];
    for (action, fields, key) in vectors {
        assert_eq!(
            IntentKey::derive(action, &fields).unwrap().as_str(),
            key,
            "{action} {fields}"
        );
    }
}

#[test]
fn a_struct_and_its_json_give_one_key() {
    #[derive(serde::Serialize)]
    struct Booking<'a> {
        slot: &'a str,
        caller: &'a str,
        provider: &'a str,
        session: &'a str,
    }
    let from_struct = IntentKey::derive(
        "book",
        &Booking {
            slot: "2026-12-01T09:00",
            caller: "ada",
            provider: "dr-who",
            session: "default",
        },
    )
    .unwrap();
    assert_eq!(from_struct.as_str(), "e7164c52a3bb021a8bc9b437ea0fb882");
}

#[test]
fn bad_identities_are_named() {
    assert!(matches!(
        IntentKey::derive("book", &json!(["a"])),
        Err(IntentKeyError::NotAnObject)
    ));
    assert!(matches!(
        IntentKey::derive("book", &"ada"),
        Err(IntentKeyError::NotAnObject)
    ));
    let big = IntentKey::derive("pay", &json!({"amount": 9007199254740992u64})).unwrap_err();
    assert!(matches!(&big, IntentKeyError::UnsafeInteger(n) if n == "9007199254740992"));
    assert!(big.to_string().contains("as a string"));
    assert!(matches!(
        IntentKey::derive("pay", &json!({"nested": [{"n": -9007199254740992i64}]})),
        Err(IntentKeyError::UnsafeInteger(_))
    ));
    let mut non_string_keys = std::collections::HashMap::new();
    non_string_keys.insert(vec![1u8], 1);
    assert!(matches!(
        IntentKey::derive("x", &non_string_keys),
        Err(IntentKeyError::Unserializable(_))
    ));
    assert!(matches!(
        IntentKey::from_existing(""),
        Err(IntentKeyError::InvalidKey)
    ));
    assert!(matches!(
        IntentKey::from_existing("has space"),
        Err(IntentKeyError::InvalidKey)
    ));
    assert_eq!(
        IntentKey::from_existing("kept-7").unwrap().as_str(),
        "kept-7"
    );
}

#[test]
fn random_keys_are_uuid_v7_and_distinct() {
    let (a, b) = (IntentKey::random(), IntentKey::random());
    assert_ne!(a, b);
    assert_eq!(a.as_str().len(), 36);
    assert_eq!(&a.as_str()[14..15], "7", "version 7: {a}");
    assert!(a.header_value().to_str().is_ok());
}

/// An arbitrary JSON identity: nested objects and arrays of strings
/// (non-ASCII included), safe integers, decimals and booleans.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(Value::Bool),
        (-(1i64 << 53) + 1..(1i64 << 53)).prop_map(|n| json!(n)),
        (-1e6f64..1e6).prop_map(|f| json!(f)),
        "[a-zA-Z0-9 äöüßé日本]{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{1,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn fields() -> impl Strategy<Value = serde_json::Map<String, Value>> {
    prop::collection::btree_map("[a-z]{1,6}", json_value(), 1..5)
        .prop_map(|m| m.into_iter().collect())
}

/// The same members in another order, at every level.
fn reversed(value: &Value) -> Value {
    match value {
        Value::Object(members) => {
            let mut out = serde_json::Map::new();
            for (k, v) in members.iter().rev() {
                out.insert(k.clone(), reversed(v));
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(reversed).collect()),
        other => other.clone(),
    }
}

proptest! {
    #[test]
    fn order_and_whitespace_never_change_a_key(fields in fields()) {
        let value = Value::Object(fields);
        let key = IntentKey::derive("act", &value).unwrap();
        prop_assert_eq!(&IntentKey::derive("act", &reversed(&value)).unwrap(), &key);
        // Pretty-printed and parsed back: the same identity.
        let pretty: Value = serde_json::from_str(&serde_json::to_string_pretty(&value).unwrap()).unwrap();
        prop_assert_eq!(&IntentKey::derive("act", &pretty).unwrap(), &key);
    }

    #[test]
    fn changing_any_field_changes_the_key(fields in fields(), pick in any::<prop::sample::Index>(), extra in "[a-z]{1,4}") {
        let value = Value::Object(fields.clone());
        let key = IntentKey::derive("act", &value).unwrap();
        let name = pick.get(&fields.keys().cloned().collect::<Vec<_>>()).clone();
        let mut changed = fields.clone();
        let old = changed[&name].clone();
        changed.insert(name, json!([old, extra]));
        prop_assert_ne!(IntentKey::derive("act", &Value::Object(changed)).unwrap(), key.clone());
        prop_assert_ne!(IntentKey::derive("other", &value).unwrap(), key);
    }
}

/// Integers beyond 2^53 that arrive as JSON text are read as doubles, and
/// two of them share one: refused like the integers, never one key for two
/// orders. `10` and `10.0` are one number (RFC 8785), so one key.
#[test]
fn big_integers_from_json_text_are_refused_and_ten_is_ten_point_zero() {
    for text in [
        r#"{"order":123456789012345678901234}"#,
        r#"{"order":-123456789012345678901234}"#,
        r#"{"order":9007199254740993.0}"#,
        r#"{"order":[1e300]}"#,
    ] {
        let fields: Value = serde_json::from_str(text).unwrap();
        assert!(
            matches!(
                IntentKey::derive("pay", &fields),
                Err(IntentKeyError::UnsafeInteger(_))
            ),
            "{text}"
        );
    }
    let key = |text: &str| {
        let fields: Value = serde_json::from_str(text).unwrap();
        IntentKey::derive("pay", &fields).unwrap()
    };
    assert_eq!(key(r#"{"amount":10}"#), key(r#"{"amount":10.0}"#));
    assert_eq!(key(r#"{"amount":0.5}"#), key(r#"{"amount":5e-1}"#));
    assert_ne!(key(r#"{"amount":10}"#), key(r#"{"amount":10.5}"#));
    assert_eq!(
        key(r#"{"max":9007199254740991}"#),
        key(r#"{"max":9007199254740991.0}"#)
    );
}
