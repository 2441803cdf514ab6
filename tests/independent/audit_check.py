#!/usr/bin/env python3
"""An independent check of a tower-idempotency audit chain, written from the
documented formats only: RFC 6962 / RFC 9162 Merkle trees over the entry
lines, C2SP tlog-checkpoint bodies in C2SP signed notes, Ed25519.

usage: audit_check.py CHAIN PUBLIC_KEY_FILE [PROOFS_JSON]

Checks every checkpoint line of CHAIN against the tree of the entries before
it and its signature by the key; with PROOFS_JSON, checks each inclusion
and consistency proof in it, and each receipt with the proof drawn for it
(signed by the key, its entry in the signed tree). Prints "ok: N entries, C checkpoints, P proofs"
and exits 0, or prints what failed and exits 1.
"""

import base64
import hashlib
import json
import sys

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


def leaf(data):
    return hashlib.sha256(b"\x00" + data).digest()


def node(left, right):
    return hashlib.sha256(b"\x01" + left + right).digest()


def mth(leaves):
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return node(mth(leaves[:k]), mth(leaves[k:]))


def peaks(leaves):
    out, start, n = [], 0, len(leaves)
    for bit in reversed(range(64)):
        if n >> bit & 1:
            out.append(mth(leaves[start:start + (1 << bit)]))
            start += 1 << bit
    return out


def verify_inclusion(index, size, leaf_hash, proof, root):
    if index >= size:
        return False
    fn, sn, r = index, size - 1, leaf_hash
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(first, second, first_root, second_root, proof):
    if first > second:
        return False
    if first == second:
        return not proof and first_root == second_root
    if first == 0:
        return not proof
    path = ([first_root] if first & (first - 1) == 0 else []) + list(proof)
    if not path:
        return False
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr, sr = node(c, fr), node(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == first_root and sr == second_root


def read_key(text):
    name, key_id, raw = text.strip().split("+", 2)
    raw = base64.b64decode(raw)
    if raw[0] != 1 or len(raw) != 33:
        raise ValueError("not an Ed25519 key")
    expected = hashlib.sha256(name.encode() + b"\n" + raw).digest()[:4]
    if expected.hex() != key_id:
        raise ValueError("the key id does not match the key")
    return name, expected, Ed25519PublicKey.from_public_bytes(raw[1:])


def signed_by(note, key):
    """The note's body and None if the key signed it, else why not."""
    body, _, signatures = note.partition("\n\n")
    body += "\n"
    name, key_id, public = key
    signed = False
    for line in signatures.rstrip("\n").split("\n"):
        if not line.startswith("\u2014 "):
            return body, "a signature line without its em dash"
        who, sig = line[2:].split(" ", 1)
        raw = base64.b64decode(sig)
        if who != name or raw[:4] != key_id:
            continue
        try:
            public.verify(raw[4:], body.encode())
        except InvalidSignature:
            return body, "a signature by the key that does not verify"
        signed = True
    return body, None if signed else "not signed by the key"


def check_note(note, key, size, root, last):
    body, why = signed_by(note, key)
    lines = body.split("\n")[:-1]
    if len(lines) != 5 or not lines[0].startswith("tower-idempotency/audit/"):
        return "not a five-line checkpoint body"
    if not lines[3].startswith("time "):
        return "no time line"
    if lines[4] != "last " + base64.b64encode(last).decode():
        return "the last line does not name the entry before it"
    if int(lines[1]) != size:
        return f"tree size {lines[1]}, but {size} entries precede it"
    if base64.b64decode(lines[2]) != root:
        return "the root is not the tree's"
    return why


def check_receipt(header, proof, key):
    """A receipt (its header value) and the proof drawn for it: the receipt
    and the checkpoint signed by the key, the entry carrying the receipt's
    id and status, and the entry's inclusion in the checkpoint's tree."""
    body, why = signed_by(base64.b64decode(header).decode(), key)
    if why:
        return "receipt: " + why
    origin, receipt_id, status, key_line, time = body.split("\n")[:-1]
    if not origin.startswith("tower-idempotency/receipt/") or not time.startswith("time "):
        return "receipt: not a five-line receipt body"
    checkpoint, why = signed_by(proof["checkpoint"], key)
    if why:
        return "proof's checkpoint: " + why
    _, size, root, _, _ = checkpoint.split("\n")[:-1]
    entry = json.loads(proof["entry"])
    if entry.get("receipt") != receipt_id or "status " + str(entry.get("status")) != status:
        return "the entry is not the receipt's"
    if key_line != "key " + entry.get("key", "-"):
        return "the entry's key is not the receipt's"
    if origin.split("/", 2)[2] != entry["instance"]:
        return "the entry is another instance's"
    ok = verify_inclusion(entry["seq"] - 1, int(size), leaf(proof["entry"].encode()),
                          [base64.b64decode(p) for p in proof["proof"]], base64.b64decode(root))
    return None if ok else "the inclusion proof does not reach the checkpoint's root"


def main(argv):
    if len(argv) not in (3, 4):
        print(__doc__.strip().split("\n\n")[1])
        return 2
    key = read_key(open(argv[2]).read())
    leaves = []
    checkpoints = []
    for number, text in enumerate(open(argv[1], "rb").read().split(b"\n")[:-1], 1):
        line = json.loads(text)
        if "checkpoint" not in line:
            leaves.append(leaf(text))
            continue
        why = check_note(line["checkpoint"], key, len(leaves), mth(leaves), leaves[-1] if leaves else b"")
        if why is None and [base64.b64decode(p) for p in line["peaks"]] != peaks(leaves):
            why = "the peaks are not the tree's"
        if why is not None:
            print(f"line {number}: {why}")
            return 1
        checkpoints.append(len(leaves))
    proofs = 0
    if len(argv) == 4:
        doc = json.load(open(argv[3]))
        b = lambda items: [base64.b64decode(i) for i in items]
        for p in doc.get("inclusion", []):
            size = p["size"]
            ok = verify_inclusion(p["index"], size, base64.b64decode(p["leaf"]), b(p["proof"]),
                                  mth(leaves[:size]))
            if not ok or base64.b64decode(p["leaf"]) != leaves[p["index"]]:
                print(f"inclusion proof of leaf {p['index']} in {size} does not check")
                return 1
            proofs += 1
        for p in doc.get("consistency", []):
            first, second = p["first"], p["second"]
            if not verify_consistency(first, second, mth(leaves[:first]), mth(leaves[:second]),
                                      b(p["proof"])):
                print(f"consistency proof from {first} to {second} does not check")
                return 1
            proofs += 1
        for r in doc.get("receipts", []):
            why = check_receipt(r["receipt"], r["proof"], key)
            if why is not None:
                print(why)
                return 1
            proofs += 1
    print(f"ok: {len(leaves)} entries, {len(checkpoints)} checkpoints, {proofs} proofs")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
