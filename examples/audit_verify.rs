//! Checks an audit chain written by the layer.
//!
//! ```text
//! cargo run --example audit_verify -- PATH [PATH...] --public-key FILE [--public-key FILE...]
//!   [--checkpoint FILE...] [--latest-checkpoint OUT] [--instance NAME]
//!   [--history KEY_HASH] [--receipt FILE]
//! ```
//!
//! - exit 0: every entry verified and covered by a checkpoint signed by one
//!   of the keys, and the chain holds the tree of every `--checkpoint` given
//!   (notes kept elsewhere): prints `ok: N entries, signed through N`;
//! - exit 1: something was changed, removed, inserted, forged, duplicated or
//!   rolled back: prints `line L: REASON` for the first bad line (for a
//!   rollback, the saved checkpoint's file is named);
//! - exit 3: intact but incomplete: entries after the last checkpoint (a
//!   crash before they were signed, or lines added since), a last line torn
//!   by a crash, entries a restarted writer adopted unsigned, or no entries
//!   at all; prints
//!   `incomplete: N entries, signed through M` and a line per run of
//!   entries, `lines A-B: REASON`;
//! - exit 2: bad arguments or an unreadable file.
//!
//! Several PATHs are the files of one rotated chain, oldest first
//! (`PATH.<seq>` files, then `PATH`): each after the first must begin with a
//! `continued` entry naming the final checkpoint of the one before.
//!
//! `--latest-checkpoint OUT` writes the last verified checkpoint note to
//! OUT (what an operator hands to a witness or keeps elsewhere, for a later
//! `--checkpoint`). `--instance` refuses entries of another instance.
//! `--history` lists, after the verdict, the decisions about the key with
//! that hash (SHA-256 hex of the key, or a prefix of at least 8 digits).
//! `--receipt FILE` holds the chain to a receipt a response carried (the
//! `Idempotency-Receipt` header's value, or its note text): after the
//! verdict it prints `receipt: line L (seq S, DECISION) holds it, signed
//! through N`; a receipt the keys did not sign, or whose entry says
//! something else or is missing though the log was closed after it, is
//! exit 1 with `receipt: REASON`; an entry not signed yet, or missing while
//! the log has not been closed since, or lost in a crash a later restart
//! records, leaves the verdict incomplete (exit 3, `receipt: REASON`).

use std::{path::PathBuf, process::ExitCode};

use tower_idempotency::audit::{
    AuditVerifier, Receipt, ReceiptError, Trust, VerifiedChain, VerifyError, check_receipt_files,
    history_files_with, verify_files_with,
};

const USAGE: &str = "usage: audit_verify PATH [PATH...] --public-key FILE [--public-key FILE...] \
[--checkpoint FILE...] [--latest-checkpoint OUT] [--instance NAME] [--history KEY_HASH] [--receipt FILE]";

#[derive(Default)]
struct Args {
    paths: Vec<PathBuf>,
    keys: Vec<PathBuf>,
    checkpoints: Vec<PathBuf>,
    latest: Option<PathBuf>,
    instance: Option<String>,
    history: Option<String>,
    receipt: Option<PathBuf>,
}

fn parse(mut args: impl Iterator<Item = std::ffi::OsString>) -> Result<Args, String> {
    let mut parsed = Args::default();
    while let Some(arg) = args.next() {
        let arg = arg
            .into_string()
            .map_err(|raw| format!("an argument that is not UTF-8: {raw:?}"))?;
        let mut value = |flag: &str, what: &str| -> Result<String, String> {
            args.next()
                .ok_or_else(|| format!("{flag} needs {what}"))?
                .into_string()
                .map_err(|raw| format!("{flag}: not UTF-8: {raw:?}"))
        };
        match arg.as_str() {
            "--public-key" => parsed.keys.push(value("--public-key", "a FILE")?.into()),
            "--checkpoint" => parsed
                .checkpoints
                .push(value("--checkpoint", "a FILE")?.into()),
            "--latest-checkpoint" => {
                if parsed.latest.is_some() {
                    return Err("--latest-checkpoint given twice".into());
                }
                parsed.latest = Some(value("--latest-checkpoint", "an OUT file")?.into());
            }
            "--instance" => {
                if parsed.instance.is_some() {
                    return Err("--instance given twice".into());
                }
                parsed.instance = Some(value("--instance", "a NAME")?);
            }
            "--receipt" => {
                if parsed.receipt.is_some() {
                    return Err("--receipt given twice".into());
                }
                parsed.receipt = Some(value("--receipt", "a FILE")?.into());
            }
            "--history" => {
                let hash = value("--history", "a KEY_HASH")?;
                if hash.len() < 8 || hash.len() > 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit())
                {
                    return Err(format!(
                        "--history takes the key's SHA-256 in hex (8 to 64 digits), not {hash:?}"
                    ));
                }
                parsed.history = Some(hash.to_ascii_lowercase());
            }
            "-h" | "--help" => return Err(String::new()),
            flag if flag.starts_with('-') && flag.len() > 1 => {
                return Err(format!("unknown option {flag}"));
            }
            _ => parsed.paths.push(PathBuf::from(arg)),
        }
    }
    if parsed.paths.is_empty() {
        return Err("no PATH given".into());
    }
    if parsed.keys.is_empty() {
        return Err(
            "no --public-key given: a chain is verified against the keys that signed it".into(),
        );
    }
    Ok(parsed)
}

/// A key, checkpoint or receipt file: small, so read up to a bound (a
/// device or a huge file is refused, not read to the end).
fn read(file: &PathBuf) -> Result<String, String> {
    use std::io::Read;
    const LIMIT: u64 = 64 * 1024;
    let named = |err: std::io::Error| format!("{}: {err}", file.display());
    // A FIFO or a device would block or never end.
    if !std::fs::metadata(file).map_err(named)?.is_file() {
        return Err(format!("{}: not a regular file", file.display()));
    }
    let mut text = String::new();
    std::fs::File::open(file)
        .map_err(named)?
        .take(LIMIT + 1)
        .read_to_string(&mut text)
        .map_err(named)?;
    if text.len() as u64 > LIMIT {
        return Err(format!(
            "{}: larger than {LIMIT} bytes: not a key, checkpoint or receipt",
            file.display()
        ));
    }
    Ok(text)
}

/// Whether `out` names a file this run reads as a chain, key or receipt:
/// `--latest-checkpoint` must never overwrite the evidence.
fn read_here(args: &Args, out: &std::path::Path) -> Option<PathBuf> {
    let out = identity(out)?;
    args.paths
        .iter()
        .chain(&args.keys)
        .chain(&args.receipt)
        .find(|file| identity(file).is_some_and(|file| file == out))
        .cloned()
}

/// Why `out` is no file a checkpoint may replace: it exists and is not a
/// checkpoint `trust`'s keys signed (a chain, a key, anything else).
fn not_a_checkpoint(out: &std::path::Path, trust: &Trust) -> Option<String> {
    let meta = std::fs::symlink_metadata(out).ok()?;
    if !meta.is_file() {
        return Some("not a regular file".into());
    }
    match read(&out.to_path_buf()) {
        Ok(text) if trust.clone().with_checkpoint("out", &text).is_ok() => None,
        _ => Some("it exists and is not a checkpoint the given keys signed".into()),
    }
}

/// The tree size a checkpoint note states.
fn note_size(note: &str) -> Option<u64> {
    note.lines().nth(1)?.parse().ok()
}

/// Writes the checkpoint to a new file beside `out` (created afresh, never
/// through a link planted there), then renames it over `out`: the name is
/// replaced, never the contents of a file it linked to. A saved checkpoint
/// of a larger tree is not replaced by a smaller one.
fn save_checkpoint(out: &std::path::Path, note: &str) -> Result<(), String> {
    use std::io::Write;
    if let (Ok(saved), Some(new)) = (read(&out.to_path_buf()), note_size(note))
        && let Some(size) = note_size(&saved).filter(|size| *size > new)
    {
        return Err(format!(
            "it holds a checkpoint of {size} entries, more than this chain's {new}: not replaced (hold the chain against it with --checkpoint)"
        ));
    }
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut temporary = out.as_os_str().to_owned();
    temporary.push(format!(".{}-{nonce}.tmp", std::process::id()));
    let temporary = PathBuf::from(temporary);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temporary)
        .map_err(|err| format!("{}: {err}", temporary.display()))?;
    let written = file
        .write_all(note.as_bytes())
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&temporary, out));
    written.map_err(|err| {
        let _ = std::fs::remove_file(&temporary);
        err.to_string()
    })
}

/// What names a file whatever path reaches it (a symlink, a hard link):
/// its device and inode where there are such, else its canonical path.
fn identity(path: &std::path::Path) -> Option<(u64, u64, PathBuf)> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).ok()?;
        Some((meta.dev(), meta.ino(), PathBuf::new()))
    }
    #[cfg(not(unix))]
    {
        Some((0, 0, std::fs::canonicalize(path).ok()?))
    }
}

/// The keys, saved checkpoints and instance, or why they cannot be used.
fn trust(args: &Args) -> Result<Trust, String> {
    let mut trust = Trust::new();
    for file in &args.keys {
        let key: AuditVerifier = read(file)?
            .parse()
            .map_err(|err| format!("{}: {err}", file.display()))?;
        trust = trust.with_key(key);
    }
    for file in &args.checkpoints {
        trust = trust.with_checkpoint(file.display().to_string(), &read(file)?)?;
    }
    if let Some(instance) = &args.instance {
        trust = trust.with_instance(instance.clone());
    }
    Ok(trust)
}

fn main() -> ExitCode {
    let args = match parse(std::env::args_os().skip(1)) {
        Ok(args) => args,
        Err(why) if why.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(why) => {
            eprintln!("audit_verify: {why}");
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    if let Some(out) = &args.latest
        && let Some(read) = read_here(&args, out)
    {
        eprintln!(
            "audit_verify: --latest-checkpoint {} is {}, a file this run reads: refusing to overwrite it",
            out.display(),
            read.display()
        );
        return ExitCode::from(2);
    }
    let trust = match trust(&args) {
        Ok(trust) => trust,
        Err(why) => {
            eprintln!("audit_verify: {why}");
            return ExitCode::from(2);
        }
    };
    if let Some(out) = &args.latest
        && let Some(why) = not_a_checkpoint(out, &trust)
    {
        eprintln!(
            "audit_verify: --latest-checkpoint {}: {why}: refusing to overwrite it",
            out.display()
        );
        return ExitCode::from(2);
    }
    let receipt = match args.receipt.as_ref().map(|file| {
        read(file).and_then(|text| {
            Receipt::parse(&text).map_err(|err| format!("{}: {err}", file.display()))
        })
    }) {
        None => None,
        Some(Ok(receipt)) => Some(receipt),
        Some(Err(why)) => {
            eprintln!("audit_verify: --receipt {why}");
            return ExitCode::from(2);
        }
    };
    let paths = &args.paths;
    let path = paths.last().expect("checked in parse");
    if let Some(odd) = paths
        .iter()
        .find(|p| std::fs::metadata(p).is_ok_and(|m| !m.is_file()))
    {
        eprintln!("audit_verify: {}: not a regular file", odd.display());
        return ExitCode::from(2);
    }
    for (i, a) in paths.iter().enumerate() {
        if let Some(b) = paths[i + 1..]
            .iter()
            .find(|b| identity(a).is_some_and(|a| identity(b) == Some(a)))
        {
            eprintln!(
                "audit_verify: {} and {} are the same file: give each file of the chain once",
                a.display(),
                b.display()
            );
            return ExitCode::from(2);
        }
    }
    let mut held = None;
    let result = match (&args.history, &receipt) {
        (None, None) => verify_files_with(paths, &trust).map(|chain| (chain, None)),
        (Some(hash), _) => history_files_with(paths, hash, &trust).map(|(c, h)| (c, Some(h))),
        (None, Some(receipt)) => {
            check_receipt_files(paths, &trust, receipt).map(|(chain, found)| {
                held = Some(found);
                (chain, None)
            })
        }
    };
    if let (Some(receipt), None, Ok(_)) = (&receipt, &held, &result) {
        match check_receipt_files(paths, &trust, receipt) {
            Ok((_, found)) => held = Some(found),
            Err(err) => {
                eprintln!("audit_verify: {}: {err}", path.display());
                return ExitCode::from(2);
            }
        }
    }
    let (chain, decisions) = match result {
        Ok(found) => found,
        Err(VerifyError::Broken(broken)) => {
            println!("{broken}");
            return ExitCode::from(1);
        }
        Err(err) => {
            eprintln!("audit_verify: {}: {err}", path.display());
            return ExitCode::from(2);
        }
    };
    if let (Some(out), Some(note)) = (&args.latest, &chain.last_checkpoint)
        && let Err(err) = save_checkpoint(out, note)
    {
        eprintln!("audit_verify: {}: {err}", out.display());
        return ExitCode::from(2);
    }
    if chain.first_seq > 1 {
        eprintln!(
            "audit_verify: note: the files given begin at seq {} (after a rotation): the entries before it are not checked; give the closed files before it too, oldest first",
            chain.first_seq
        );
    }
    if let Some(Err(why)) = &held
        && !matches!(why, ReceiptError::Unwritten(_))
    {
        println!("receipt: {why}");
        return ExitCode::from(1);
    }
    let code = verdict(&chain);
    if let Some(Err(why)) = &held {
        // Intact, and short of the receipt's entry by a crash or a log
        // still open: incomplete.
        println!("receipt: {why}");
        return ExitCode::from(3);
    }
    if let Some(Ok(found)) = &held {
        if found.signed {
            println!(
                "receipt: line {} (seq {}, {}) holds it, signed through {}",
                found.line,
                found.seq,
                found.decision,
                chain.signed_through.unwrap_or(0)
            );
        } else {
            println!(
                "receipt: line {} (seq {}, {}) holds it, not signed by a checkpoint yet",
                found.line, found.seq, found.decision
            );
        }
    }
    for decision in decisions.into_iter().flatten() {
        println!("{decision}");
    }
    code
}

/// Prints the verdict on an intact chain: complete, or what is missing.
fn verdict(chain: &VerifiedChain) -> ExitCode {
    let through = chain.signed_through.unwrap_or(0);
    if chain.entries > 0 && chain.is_complete() {
        println!("ok: {} entries, signed through {through}", chain.entries);
        return ExitCode::SUCCESS;
    }
    println!(
        "incomplete: {} entries, signed through {through}",
        chain.entries
    );
    if chain.entries == 0 {
        println!(
            "no entries: nothing is signed (an emptied file looks the same; hold it against a saved --checkpoint)"
        );
    }
    for (first, last) in &chain.adopted {
        println!(
            "lines {first}-{last}: found after the last checkpoint by a restarted writer and adopted unsigned (a crash's unsigned batch, or lines added while no writer ran)"
        );
    }
    for (line, bytes) in &chain.cut {
        println!(
            "line {line}: a restarted writer cut {bytes} bytes of a torn last line before it (a write a crash cut short: its decisions may be missing)"
        );
    }
    if let Some(line) = chain.torn_line {
        println!(
            "line {line}: torn: the last write was cut short (a crash); its writer cuts it off when it starts again"
        );
    }
    if let Some((first, last)) = chain.unsigned_lines {
        println!(
            "lines {first}-{last}: after the last checkpoint, not signed (a crash before they were signed, or lines added since)"
        );
    }
    ExitCode::from(3)
}
