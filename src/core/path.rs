//! `RelPath`: the only way a file is named on the wire or handed to `apply`.
//!
//! Its constructor is the one gate every network path goes through (see DESIGN.md, "Paths and
//! names"): relative, `/`-separated, UTF-8, no empty, `.` or `..` component, no NUL, CR or LF,
//! never inside ferry's state directory, and no component longer than a filesystem allows.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::text::SharedStr;

/// The name of the state directory at the top of every synced root; never synced.
pub const STATE_DIR: &str = ".ferry";

/// Longest component most Linux filesystems accept (NAME_MAX).
pub const MAX_COMPONENT: usize = 255;

/// Longest whole path we accept (PATH_MAX, less room for the root it is joined to).
pub const MAX_PATH: usize = 3072;

/// A validated path relative to a synced root, e.g. `photos/2026/cat.jpg`.
///
/// Shared, not copied: an agent holds each path in several maps (tree, index or base) and in
/// every change that names it, so a clone only counts a reference (8 bytes a copy: the text's
/// length is kept with it, not in the pointer as `Arc<str>` keeps it; the text once).
/// Compared, ordered and hashed by its text, and on the wire a plain string.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelPath(SharedStr);

impl Serialize for RelPath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// Why a path was refused; the message names the path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadPath {
    /// The refused path (shown escaped, so control characters stay visible in logs).
    pub path: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl fmt::Display for BadPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "refused path {:?}: {}", self.path, self.reason)
    }
}

impl std::error::Error for BadPath {}

impl RelPath {
    /// Validates `s` as a wire path. The text is copied once, straight into the shared
    /// allocation (no temporary `String`: one allocation per path decoded or scanned).
    pub fn new(s: impl AsRef<str>) -> Result<RelPath, BadPath> {
        let s = s.as_ref();
        match check(s) {
            Ok(()) => Ok(RelPath(SharedStr::new(s))),
            Err(reason) => Err(BadPath {
                path: s.to_string(),
                reason,
            }),
        }
    }

    /// A path already checked (read back from where a checked one was stored).
    pub(crate) fn trusted(s: &str) -> RelPath {
        debug_assert_eq!(check(s), Ok(()), "{s:?}");
        RelPath(SharedStr::new(s))
    }

    /// The path as a `/`-separated string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The parent path, `None` for a top-level name.
    pub fn parent(&self) -> Option<RelPath> {
        self.0
            .rfind('/')
            .map(|i| RelPath(SharedStr::new(&self.0[..i])))
    }

    /// The last component.
    pub fn file_name(&self) -> &str {
        match self.0.rfind('/') {
            Some(i) => &self.0[i + 1..],
            None => &self.0,
        }
    }

    /// `self/name`, validating `name` as one component.
    pub fn join(&self, name: &str) -> Result<RelPath, BadPath> {
        RelPath::new(format!("{}/{}", self.0, name))
    }

    /// True if `self` is `other` or lies beneath it.
    pub fn starts_with(&self, other: &RelPath) -> bool {
        self.0 == other.0
            || (self.0.len() > other.0.len()
                && self.0.starts_with(&*other.0)
                && self.0.as_bytes()[other.0.len()] == b'/')
    }

    /// Replaces the leading `from` (which `self` must start with) by `to`: where `self` goes
    /// when `from` is renamed to `to`. Refused, like any path, if the result is too long.
    pub fn rebase(&self, from: &RelPath, to: &RelPath) -> Result<RelPath, BadPath> {
        debug_assert!(self.starts_with(from));
        let moved = format!("{}{}", to.0, &self.0[from.0.len()..]);
        // Only the length can be wrong: every component comes from a valid path, and `to`
        // is never empty, so `.ferry` cannot become the first component.
        if moved.len() > MAX_PATH {
            return Err(BadPath {
                path: moved,
                reason: "path too long",
            });
        }
        Ok(RelPath(SharedStr::new(&moved)))
    }

    /// Number of components; parents sort before children when ordered by this.
    pub fn depth(&self) -> usize {
        self.0.bytes().filter(|&b| b == b'/').count() + 1
    }
}

/// `path` and every key beneath it in a map ordered by path.
pub fn keys_under<V>(map: &std::collections::BTreeMap<RelPath, V>, path: &RelPath) -> Vec<RelPath> {
    // Children sort between "path/" and "path0" ('0' follows '/').
    let (lo, hi) = (format!("{path}/"), format!("{path}0"));
    let mut keys: Vec<RelPath> = map
        .get_key_value(path)
        .map(|(k, _)| k.clone())
        .into_iter()
        .collect();
    keys.extend(
        map.range::<str, _>((
            std::ops::Bound::Included(lo.as_str()),
            std::ops::Bound::Excluded(hi.as_str()),
        ))
        .map(|(k, _)| k.clone()),
    );
    keys
}

fn check(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("empty path");
    }
    if s.len() > MAX_PATH {
        return Err("path too long");
    }
    if s.starts_with('/') {
        return Err("absolute path");
    }
    if s.contains('\0') {
        return Err("contains a NUL byte");
    }
    if s.contains('\r') || s.contains('\n') {
        return Err("contains CR or LF");
    }
    if s.contains('\\') {
        return Err("contains a backslash");
    }
    for (i, part) in s.split('/').enumerate() {
        match part {
            "" => return Err("empty component"),
            "." | ".." => return Err("`.` or `..` component"),
            STATE_DIR if i == 0 => return Err("names ferry's state directory"),
            _ if part.len() > MAX_COMPONENT => return Err("component longer than 255 bytes"),
            _ => {}
        }
    }
    Ok(())
}

impl FromStr for RelPath {
    type Err = BadPath;
    fn from_str(s: &str) -> Result<Self, BadPath> {
        RelPath::new(s)
    }
}

impl TryFrom<String> for RelPath {
    type Error = BadPath;
    fn try_from(s: String) -> Result<Self, BadPath> {
        RelPath::new(s)
    }
}

/// A plain string on the wire, validated as it is read, from the frame's bytes when the format
/// lends them (postcard does): no `String` in between.
impl<'de> Deserialize<'de> for RelPath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Text;
        impl serde::de::Visitor<'_> for Text {
            type Value = RelPath;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a relative path")
            }
            /// Remembers the refusal so the frame decoder, whose format drops custom error
            /// text, can still name the path in its error.
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<RelPath, E> {
                RelPath::new(s)
                    .inspect_err(|bad| LAST_REFUSED.with(|l| *l.borrow_mut() = Some(bad.clone())))
                    .map_err(E::custom)
            }
        }
        d.deserialize_str(Text)
    }
}

thread_local! {
    static LAST_REFUSED: std::cell::RefCell<Option<BadPath>> = const { std::cell::RefCell::new(None) };
}

/// The path most recently refused while deserializing on this thread, if any (taken).
pub fn take_last_refused() -> Option<BadPath> {
    LAST_REFUSED.with(|l| l.borrow_mut().take())
}

impl From<RelPath> for String {
    fn from(p: RelPath) -> String {
        p.0.to_string()
    }
}

/// Lets ordered maps keyed by `RelPath` be searched by `&str` ranges (same ordering).
impl AsRef<str> for RelPath {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl std::borrow::Borrow<str> for RelPath {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One pointer, so a map keyed by paths pays 8 bytes a key for it, and an absent one
    /// (`Option<RelPath>`) nothing more.
    #[test]
    fn a_path_is_one_pointer() {
        use std::mem::size_of;
        assert_eq!(size_of::<RelPath>(), size_of::<usize>());
        assert_eq!(size_of::<Option<RelPath>>(), size_of::<usize>());
    }

    #[test]
    fn accepted_paths() {
        for ok in [
            "a",
            "a/b/c.txt",
            "name with spaces.txt",
            "ünïcødé/日本.txt",
            ".hidden",
            "a/.ferry",
            ".ferryignore",
            "..foo",
            "foo..",
        ] {
            assert!(RelPath::new(ok).is_ok(), "{ok:?} should be accepted");
        }
    }

    #[test]
    fn refused_paths() {
        let long = "x".repeat(256);
        let table: &[(&str, &str)] = &[
            ("empty", ""),
            ("absolute", "/etc/passwd"),
            ("parent", ".."),
            ("parent inside", "a/../../b"),
            ("dot", "./a"),
            ("empty component", "a//b"),
            ("trailing slash", "a/"),
            ("nul", "a\0b"),
            ("crlf injection", "a\r\nDELE x"),
            ("lf", "a\nb"),
            ("backslash", "a\\..\\b"),
            ("state dir", ".ferry"),
            ("inside state dir", ".ferry/staging/x"),
            ("over-long component", &long),
        ];
        for (name, bad) in table {
            let err = RelPath::new(*bad).expect_err(name);
            assert!(err.to_string().contains("refused path"), "{name}: {err}");
        }
    }

    #[test]
    fn wire_decode_validates() {
        let bytes = postcard::to_allocvec(&"../x".to_string()).unwrap();
        assert!(postcard::from_bytes::<RelPath>(&bytes).is_err());
        let bytes = postcard::to_allocvec(&"ok/x".to_string()).unwrap();
        assert_eq!(
            postcard::from_bytes::<RelPath>(&bytes).unwrap().as_str(),
            "ok/x"
        );
    }

    #[test]
    fn prefix_helpers() {
        let a: RelPath = "a".parse().unwrap();
        let ab: RelPath = "a/b".parse().unwrap();
        let abc: RelPath = "abc".parse().unwrap();
        assert!(ab.starts_with(&a));
        assert!(!abc.starts_with(&a));
        assert_eq!(ab.parent(), Some(a.clone()));
        assert_eq!(
            ab.rebase(&a, &"z/y".parse().unwrap()).unwrap().as_str(),
            "z/y/b"
        );
        assert_eq!(ab.file_name(), "b");
        assert_eq!(ab.depth(), 2);
    }

    /// Found by fuzzing (fuzz/fuzz_targets/plan.rs): a rename to a longer name used to give
    /// the paths beneath it names longer than `MAX_PATH`, which no peer could decode.
    #[test]
    fn rebase_refuses_what_would_be_too_long() {
        let deep = format!("{}/{}", vec!["d".repeat(250); 12].join("/"), "f".repeat(60));
        let deep: RelPath = deep.parse().unwrap();
        assert_eq!(deep.as_str().len(), MAX_PATH);
        let (from, short, long): (RelPath, RelPath, RelPath) = (
            "d".repeat(250).parse().unwrap(),
            "e".parse().unwrap(),
            "e".repeat(255).parse().unwrap(),
        );
        let moved = deep.rebase(&from, &short).unwrap();
        assert_eq!(RelPath::new(moved.as_str()), Ok(moved));
        let err = deep.rebase(&from, &long).unwrap_err();
        assert_eq!(err.reason, "path too long");
        assert!(RelPath::new(err.path).is_err());
    }
}
