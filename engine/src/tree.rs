//! Directory trees: one tree blob per directory, listing its entries sorted by name with their metadata.
//! Serialised with postcard (deterministic, so an unchanged directory produces the same blob and dedups).
//!
//! Names are raw bytes (non-UTF-8 names survive). A tree is validated on decode: every name is a single
//! path component (not empty, `.`, `..`, and without `/` or NUL), and names are strictly ascending, so a
//! tree cannot hold two entries of the same name. Restore relies on this to never leave its target.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::BlobId;

/// Tree format version.
pub const TREE_VERSION: u32 = 1;

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeKind {
    /// A regular file; its content is the concatenation of these chunks.
    File {
        /// Chunk ids in order.
        content: Vec<BlobId>,
    },
    /// A directory and its tree.
    Dir {
        /// Id of the subtree blob.
        subtree: BlobId,
    },
    /// A symbolic link (target as raw bytes, never followed).
    Symlink {
        /// Link target.
        target: Vec<u8>,
    },
    /// A named pipe.
    Fifo,
    /// A character device.
    CharDevice {
        /// Device number.
        rdev: u64,
    },
    /// A block device (as a device node, not its content).
    BlockDevice {
        /// Device number.
        rdev: u64,
    },
    /// A Unix socket (recorded, not restored).
    Socket,
}

/// One directory entry with its metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Name within its directory (raw bytes).
    pub name: Vec<u8>,
    /// Type and type-specific data.
    pub kind: NodeKind,
    /// Permission bits and set-id/sticky bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size in bytes (files).
    pub size: u64,
    /// Modification time, seconds since the epoch.
    pub mtime_sec: i64,
    /// Modification time, nanoseconds.
    pub mtime_nsec: u32,
    /// Extended attributes (name, value), sorted; ACLs and SELinux labels are among them.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// For a file with several hard links: a group number, the same for every link to one inode. Groups are
    /// numbered in walk order, so they do not depend on inode numbers and a clone of a tree dedups.
    pub hardlink: Option<u64>,
}

impl Node {
    /// The name for messages.
    pub fn display_name(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }
}

/// A directory's entries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tree {
    /// [`TREE_VERSION`].
    pub version: u32,
    /// Entries sorted by name.
    pub nodes: Vec<Node>,
}

/// Checks a name is one safe path component.
pub fn check_name(name: &[u8]) -> Result<()> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(Error::UnsafePath(format!(
            "entry name {:?}",
            String::from_utf8_lossy(name)
        )));
    }
    Ok(())
}

impl Tree {
    /// A tree of `nodes` (sorted here).
    pub fn new(mut nodes: Vec<Node>) -> Self {
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        Tree {
            version: TREE_VERSION,
            nodes,
        }
    }

    /// Serialises the tree.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        postcard::to_stdvec(self).map_err(|e| Error::Format(format!("tree: {e}")))
    }

    /// Parses and validates a tree.
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        let t: Tree = postcard::from_bytes(b).map_err(|e| Error::Format(format!("tree: {e}")))?;
        if t.version != TREE_VERSION {
            return Err(Error::Format(format!(
                "tree version {} is not supported",
                t.version
            )));
        }
        for (i, n) in t.nodes.iter().enumerate() {
            check_name(&n.name)?;
            if i > 0 && t.nodes[i - 1].name >= n.name {
                return Err(Error::UnsafePath(format!(
                    "tree entries not strictly sorted at {:?} (duplicate names?)",
                    n.display_name()
                )));
            }
        }
        Ok(t)
    }

    /// Finds an entry by name.
    pub fn find(&self, name: &[u8]) -> Option<&Node> {
        self.nodes
            .binary_search_by(|n| n.name.as_slice().cmp(name))
            .ok()
            .map(|i| &self.nodes[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// postcard varint of `n`.
    fn varint(mut n: u64) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(b);
                return out;
            }
            out.push(b | 0x80);
        }
    }

    /// Hostile counts (a tree, an index segment claiming 2^60 entries in a few bytes) are a clear format
    /// error, never an allocation of what they claim.
    #[test]
    fn huge_counts_are_format_errors() {
        let mut b = varint(u64::from(TREE_VERSION));
        b.extend(varint(1 << 60));
        b.extend([0u8; 16]);
        assert!(matches!(Tree::from_bytes(&b), Err(Error::Format(_))));
        let mut b = varint(u64::from(crate::index::INDEX_VERSION));
        b.extend(varint(1 << 60));
        b.extend([0u8; 16]);
        assert!(matches!(
            crate::index::IndexSegment::from_bytes(&b),
            Err(Error::Format(_))
        ));
    }

    fn node(name: &[u8]) -> Node {
        Node {
            name: name.to_vec(),
            kind: NodeKind::Fifo,
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: 0,
            mtime_sec: 0,
            mtime_nsec: 0,
            xattrs: vec![],
            hardlink: None,
        }
    }

    #[test]
    fn round_trip_and_find() {
        let t = Tree::new(vec![node(b"b"), node(b"a\xff"), node(b"a")]);
        let back = Tree::from_bytes(&t.to_bytes().expect("enc")).expect("dec");
        assert_eq!(back, t);
        assert!(back.find(b"a\xff").is_some());
        assert!(back.find(b"c").is_none());
    }

    #[test]
    fn rejects_unsafe_names_and_duplicates() {
        for bad in [&b".."[..], b".", b"", b"a/b", b"/etc", b"x\0"] {
            let t = Tree {
                version: TREE_VERSION,
                nodes: vec![node(bad)],
            };
            assert!(
                Tree::from_bytes(&t.to_bytes().expect("enc")).is_err(),
                "{bad:?}"
            );
        }
        let dup = Tree {
            version: TREE_VERSION,
            nodes: vec![node(b"a"), node(b"a")],
        };
        assert!(Tree::from_bytes(&dup.to_bytes().expect("enc")).is_err());
    }
}
