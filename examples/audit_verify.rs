//! Checks an audit chain written by the layer.
//!
//! ```text
//! cargo run --example audit_verify -- PATH [--public-key FILE] [--history KEY_HASH]
//! ```
//!
//! Prints `ok: N entries` and exits 0 for an intact chain; for a broken one
//! prints `line L: REASON` for the first bad line and exits 1. With
//! `--public-key`, every checkpoint's signature is checked too, and a chain
//! without a signed checkpoint is broken. With `--history`, the decisions
//! about the key with that hash (SHA-256 hex of the key, or a prefix of at
//! least 8 digits) follow, in order. Bad arguments or an unreadable file
//! exit 2.

use std::{path::PathBuf, process::ExitCode};

use tower_idempotency::audit::{AuditVerifier, VerifyError, history, verify_file};

const USAGE: &str = "usage: audit_verify PATH [--public-key FILE] [--history KEY_HASH]";

struct Args {
    path: PathBuf,
    public_key: Option<PathBuf>,
    history: Option<String>,
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut path = None;
    let mut public_key = None;
    let mut history = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--public-key" => {
                let file = args.next().ok_or("--public-key needs a FILE")?;
                public_key = Some(PathBuf::from(file));
            }
            "--history" => {
                let hash = args.next().ok_or("--history needs a KEY_HASH")?;
                if hash.len() < 8 || hash.len() > 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit())
                {
                    return Err(format!(
                        "--history takes the key's SHA-256 in hex (8 to 64 digits), not {hash:?}"
                    ));
                }
                history = Some(hash.to_ascii_lowercase());
            }
            "-h" | "--help" => return Err(String::new()),
            flag if flag.starts_with("--") => return Err(format!("unknown option {flag}")),
            _ if path.is_some() => return Err(format!("unexpected argument {arg:?}")),
            _ => path = Some(PathBuf::from(arg)),
        }
    }
    Ok(Args {
        path: path.ok_or("no PATH given")?,
        public_key,
        history,
    })
}

fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(why) => {
            if !why.is_empty() {
                eprintln!("audit_verify: {why}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let key = match &args.public_key {
        None => None,
        Some(file) => {
            let text = match std::fs::read_to_string(file) {
                Ok(text) => text,
                Err(err) => {
                    eprintln!("audit_verify: {}: {err}", file.display());
                    return ExitCode::from(2);
                }
            };
            match text.parse::<AuditVerifier>() {
                Ok(key) => Some(key),
                Err(err) => {
                    eprintln!("audit_verify: {}: {err}", file.display());
                    return ExitCode::from(2);
                }
            }
        }
    };
    let result = match &args.history {
        None => verify_file(&args.path, key.as_ref()).map(|chain| (chain, None)),
        Some(hash) => history(&args.path, hash, key.as_ref()).map(|(c, h)| (c, Some(h))),
    };
    match result {
        Ok((chain, decisions)) => {
            println!("ok: {} entries", chain.entries);
            if !chain.signatures_checked {
                eprintln!("note: signatures not checked (no --public-key)");
            }
            if chain.unsigned_tail() > 0 {
                eprintln!(
                    "note: the last {} entries follow the last checkpoint and are not signed yet",
                    chain.unsigned_tail()
                );
            }
            for decision in decisions.into_iter().flatten() {
                println!("{decision}");
            }
            ExitCode::SUCCESS
        }
        Err(VerifyError::Broken(broken)) => {
            println!("{broken}");
            ExitCode::from(1)
        }
        Err(err) => {
            eprintln!("audit_verify: {}: {err}", args.path.display());
            ExitCode::from(2)
        }
    }
}
