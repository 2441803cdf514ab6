//! The Merkle tree of RFC 6962 / RFC 9162 over an audit log's entries: leaf
//! and node hashes, the root of a growing log, and the inclusion and
//! consistency proofs with their checks.
//!
//! A leaf is one entry's line, without its newline: its hash is
//! `SHA-256(0x00 || line)`; an inner node's is `SHA-256(0x01 || left ||
//! right)`; the tree of `n` leaves splits at the largest power of two below
//! `n`; the empty tree's hash is `SHA-256("")`.

use sha2::{Digest, Sha256};

/// A hash in the tree.
pub type Hash = [u8; 32];

/// The hash of a leaf holding `line`.
pub fn leaf_hash(line: &[u8]) -> Hash {
    let mut hash = Sha256::new();
    hash.update([0x00]);
    hash.update(line);
    hash.finalize().into()
}

/// The hash of an inner node.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut hash = Sha256::new();
    hash.update([0x01]);
    hash.update(left);
    hash.update(right);
    hash.finalize().into()
}

/// The hash of the empty tree.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// The root of a log that grows one leaf at a time, kept in `O(log n)`:
/// the roots of its perfect subtrees, largest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tree {
    size: u64,
    /// `(height, root)` of each perfect subtree, left to right.
    peaks: Vec<(u32, Hash)>,
}

impl Tree {
    /// The empty tree.
    pub fn new() -> Self {
        Tree::default()
    }

    /// Leaves so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The tree with `size` leaves whose perfect subtrees (largest first)
    /// have the roots `peaks`: one per bit set in `size`. `None` when the
    /// count does not match.
    pub fn from_peaks(size: u64, peaks: &[Hash]) -> Option<Self> {
        // A tree that could not grow by one more leaf is no log's.
        if size == u64::MAX || peaks.len() != size.count_ones() as usize {
            return None;
        }
        let heights = (0..u64::BITS).rev().filter(|bit| size >> bit & 1 == 1);
        Some(Tree {
            size,
            peaks: heights.zip(peaks.iter().copied()).collect(),
        })
    }

    /// The roots of the tree's perfect subtrees, largest first: what
    /// [`from_peaks`](Self::from_peaks) takes back.
    pub fn peaks(&self) -> impl Iterator<Item = &Hash> {
        self.peaks.iter().map(|(_, hash)| hash)
    }

    /// Appends the leaf whose hash is `leaf`.
    pub fn push(&mut self, leaf: Hash) {
        let mut node = (0u32, leaf);
        while let Some(&(height, left)) = self.peaks.last() {
            if height != node.0 {
                break;
            }
            self.peaks.pop();
            node = (height + 1, node_hash(&left, &node.1));
        }
        self.peaks.push(node);
        self.size = self.size.saturating_add(1);
    }

    /// The tree's root hash.
    pub fn root(&self) -> Hash {
        let mut peaks = self.peaks.iter().rev();
        let Some(&(_, mut root)) = peaks.next() else {
            return empty_root();
        };
        for (_, left) in peaks {
            root = node_hash(left, &root);
        }
        root
    }
}

/// The largest power of two below `n` (for `n > 1`).
fn split(n: usize) -> usize {
    debug_assert!(n > 1);
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// The root of the tree over `leaves` (leaf hashes).
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => empty_root(),
        1 => leaves[0],
        n => {
            let k = split(n);
            node_hash(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// The inclusion proof of leaf `index` in the tree over `leaves`; `None`
/// when `index` is outside it.
pub fn inclusion_proof(index: u64, leaves: &[Hash]) -> Option<Vec<Hash>> {
    let index = usize::try_from(index).ok().filter(|i| *i < leaves.len())?;
    let mut proof = Vec::new();
    path(index, leaves, &mut proof);
    Some(proof)
}

fn path(m: usize, leaves: &[Hash], out: &mut Vec<Hash>) {
    let n = leaves.len();
    if n <= 1 {
        return;
    }
    let k = split(n);
    if m < k {
        path(m, &leaves[..k], out);
        out.push(root(&leaves[k..]));
    } else {
        path(m - k, &leaves[k..], out);
        out.push(root(&leaves[..k]));
    }
}

/// Whether `proof` shows the leaf `leaf` at `index` in the tree of `size`
/// leaves whose root is `root` (RFC 9162, 2.1.3.2).
pub fn verify_inclusion(index: u64, size: u64, leaf: &Hash, proof: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut f, mut s) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if s == 0 {
            return false;
        }
        if f & 1 == 1 || f == s {
            r = node_hash(p, &r);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        f >>= 1;
        s >>= 1;
    }
    s == 0 && r == *root
}

/// The consistency proof between the tree of the first `first` leaves and
/// the tree over all `leaves`; `None` when `first` is larger.
pub fn consistency_proof(first: u64, leaves: &[Hash]) -> Option<Vec<Hash>> {
    let m = usize::try_from(first).ok().filter(|m| *m <= leaves.len())?;
    let mut proof = Vec::new();
    if m > 0 && m < leaves.len() {
        subproof(m, leaves, true, &mut proof);
    }
    Some(proof)
}

fn subproof(m: usize, leaves: &[Hash], whole: bool, out: &mut Vec<Hash>) {
    let n = leaves.len();
    if m == n {
        if !whole {
            out.push(root(leaves));
        }
        return;
    }
    let k = split(n);
    if m <= k {
        subproof(m, &leaves[..k], whole, out);
        out.push(root(&leaves[k..]));
    } else {
        subproof(m - k, &leaves[k..], false, out);
        out.push(root(&leaves[..k]));
    }
}

/// Whether `proof` shows the tree of `first` leaves with root `first_root`
/// to be the start of the tree of `second` leaves with root `second_root`
/// (RFC 9162, 2.1.4.2).
pub fn verify_consistency(
    first: u64,
    second: u64,
    first_root: &Hash,
    second_root: &Hash,
    proof: &[Hash],
) -> bool {
    if first > second {
        return false;
    }
    if first == second {
        return proof.is_empty() && first_root == second_root;
    }
    if first == 0 {
        // Every tree extends the empty one.
        return proof.is_empty() && *first_root == empty_root();
    }
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if first.is_power_of_two() {
        path.push(*first_root);
    }
    path.extend_from_slice(proof);
    let Some((start, rest)) = path.split_first() else {
        return false;
    };
    let (mut f, mut s) = (first - 1, second - 1);
    while f & 1 == 1 {
        f >>= 1;
        s >>= 1;
    }
    let (mut fr, mut sr) = (*start, *start);
    for c in rest {
        if s == 0 {
            return false;
        }
        if f & 1 == 1 || f == s {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        f >>= 1;
        s >>= 1;
    }
    s == 0 && fr == *first_root && sr == *second_root
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n)
            .map(|i| leaf_hash(format!("entry {i}").as_bytes()))
            .collect()
    }

    fn hex(hash: &Hash) -> String {
        hash.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// RFC 6962's reference test data (as published with the Certificate
    /// Transparency implementations): the roots of the first trees over
    /// the leaves "", 0x00, 0x10, 0x2021, 0x3031, 0x40414243, ...
    #[test]
    fn roots_match_the_published_vectors() {
        let inputs: [&[u8]; 8] = [
            b"",
            &[0x00],
            &[0x10],
            &[0x20, 0x21],
            &[0x30, 0x31],
            &[0x40, 0x41, 0x42, 0x43],
            &[0x50, 0x51, 0x52, 0x53, 0x54, 0x55, 0x56, 0x57],
            &[
                0x60, 0x61, 0x62, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69, 0x6a, 0x6b, 0x6c, 0x6d,
                0x6e, 0x6f,
            ],
        ];
        let expected = [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
            "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
            "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
            "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
            "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
        ];
        assert_eq!(
            hex(&empty_root()),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let hashes: Vec<Hash> = inputs.iter().map(|i| leaf_hash(i)).collect();
        let mut tree = Tree::new();
        for (n, want) in expected.iter().enumerate() {
            tree.push(hashes[n]);
            assert_eq!(hex(&root(&hashes[..=n])), *want, "root of {}", n + 1);
            assert_eq!(hex(&tree.root()), *want, "incremental root of {}", n + 1);
        }
    }

    #[test]
    fn a_tree_rebuilt_from_its_peaks_grows_as_the_original() {
        let all = leaves(45);
        let mut tree = Tree::new();
        for (n, leaf) in all.iter().enumerate() {
            tree.push(*leaf);
            let peaks: Vec<Hash> = tree.peaks().copied().collect();
            let mut rebuilt = Tree::from_peaks(tree.size(), &peaks).unwrap();
            assert_eq!(rebuilt, tree);
            for more in &all[n + 1..] {
                rebuilt.push(*more);
            }
            assert_eq!(rebuilt.root(), root(&all), "rebuilt at {}", n + 1);
        }
        assert!(
            Tree::from_peaks(3, &[[0; 32]]).is_none(),
            "3 leaves have two peaks"
        );
    }

    #[test]
    fn every_inclusion_proof_checks_and_a_wrong_one_does_not() {
        for n in 1..=33 {
            let all = leaves(n);
            let top = root(&all);
            for i in 0..n as u64 {
                let proof = inclusion_proof(i, &all).unwrap();
                assert!(
                    verify_inclusion(i, n as u64, &all[i as usize], &proof, &top),
                    "{i} of {n}"
                );
                let other = leaf_hash(b"forged");
                assert!(!verify_inclusion(i, n as u64, &other, &proof, &top));
                if n > 1 {
                    let moved = (i + 1) % n as u64;
                    assert!(!verify_inclusion(
                        moved,
                        n as u64,
                        &all[i as usize],
                        &proof,
                        &top
                    ));
                }
            }
            assert!(inclusion_proof(n as u64, &all).is_none());
        }
    }

    #[test]
    fn every_consistency_proof_checks_and_a_rewritten_history_does_not() {
        for n in 1..=33usize {
            let all = leaves(n);
            let second = root(&all);
            for m in 0..=n {
                let proof = consistency_proof(m as u64, &all).unwrap();
                let first = root(&all[..m]);
                assert!(
                    verify_consistency(m as u64, n as u64, &first, &second, &proof),
                    "{m} to {n}"
                );
                if m > 0 && m < n {
                    let mut rewritten = all.clone();
                    rewritten[m - 1] = leaf_hash(b"rewritten");
                    let forged = root(&rewritten[..m]);
                    assert!(!verify_consistency(
                        m as u64, n as u64, &forged, &second, &proof
                    ));
                }
            }
            assert!(consistency_proof(n as u64 + 1, &all).is_none());
        }
    }
}
