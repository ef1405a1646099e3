//! Ignore rules: which paths ferry leaves alone.
//!
//! A `.ferryignore` file holds gitignore patterns and applies to its own directory and
//! everything beneath it, as a `.gitignore` does; a deeper file's match (`!` included) wins over
//! a shallower one's, and within a file the last matching line wins. A short built-in list of
//! editor and desktop litter (`BUILT_IN`) comes last, so a `.ferryignore` can re-include any of
//! it with `!`. Nothing beneath an ignored directory is looked at, so a `!` cannot re-include a
//! path whose directory is ignored (git's rule too). `.ferryignore` files themselves are never
//! ignored: they are synced like any file, so every replica shares the rules.
//!
//! The matching is the `ignore` crate's `gitignore` module (ripgrep's). This module keeps one
//! matcher per directory that has a `.ferryignore`, and the hash of the text it was built from,
//! so the scanner (`crate::scan`) can tell when a file changed and the rules must be rebuilt.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ::ignore::gitignore::{Gitignore, GitignoreBuilder};
use ::ignore::Match;

use crate::core::entry::Hash;

/// The name of a rules file.
pub const IGNORE_FILE: &str = ".ferryignore";

/// Ignored everywhere unless a `.ferryignore` re-includes them: editor swap, backup and lock
/// files, and what desktops leave in every folder. (`.ferry/`, the state directory, is never
/// synced in any case: see `crate::core::path::STATE_DIR`.)
pub const BUILT_IN: &[&str] = &[
    "*.swp",       // vim swap files
    "*.swx",       // vim swap files
    "*~",          // emacs, gedit, nano backups
    ".#*",         // emacs lock files
    ".~lock.*#",   // LibreOffice lock files
    "~$*",         // Microsoft Office owner files
    ".DS_Store",   // macOS Finder
    "Thumbs.db",   // Windows Explorer thumbnails
    "desktop.ini", // Windows Explorer folder settings
];

/// A `.ferryignore` larger than this is not read (it is surely not a list of patterns).
const MAX_FILE: u64 = 1 << 20;

/// The rules of one tree: the built-ins and every loaded `.ferryignore`.
#[derive(Clone, Debug)]
pub struct Rules {
    builtin: Gitignore,
    /// By directory relative to the root (`""` for the root itself).
    dirs: BTreeMap<PathBuf, DirRules>,
    /// Whether problems with a file (bad lines, too big) are logged: a second copy of the
    /// same rules (the inotify watcher's) keeps quiet.
    report: bool,
    /// The directory `is_ignored` last looked above, and whether it or one above it is
    /// ignored: paths are mostly asked about a directory at a time. Dropped when rules change.
    last_dir: RefCell<Option<(PathBuf, bool)>>,
}

/// The rules of one directory's `.ferryignore`.
#[derive(Clone, Debug)]
struct DirRules {
    matcher: Gitignore,
    /// BLAKE3 of the text the matcher was built from: the scanner compares it with the file's.
    hash: Hash,
}

impl Default for Rules {
    fn default() -> Rules {
        Rules::new()
    }
}

/// True if `path` names a rules file.
pub fn is_ignore_file(path: &Path) -> bool {
    path.file_name().is_some_and(|n| n == IGNORE_FILE)
}

/// Builds a matcher from gitignore text; bad lines are skipped (and logged, naming `from`, if
/// `report`).
fn build(from: &Path, text: &str, report: bool) -> Gitignore {
    // Candidate paths are always relative (to the directory of the file), so a root no relative
    // path starts with keeps the crate from stripping a prefix off them.
    let mut builder = GitignoreBuilder::new("/");
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    for (n, line) in text.lines().enumerate() {
        match builder.add_line(Some(from.to_path_buf()), line) {
            Err(e) if report => log::warn!(
                "{}: line {}: {e}; the line is skipped",
                from.display(),
                n + 1
            ),
            _ => {}
        }
    }
    builder.build().unwrap_or_else(|e| {
        if report {
            log::warn!("{}: {e}; its rules are not used", from.display());
        }
        Gitignore::empty()
    })
}

impl Rules {
    /// The built-in rules alone.
    pub fn new() -> Rules {
        Rules {
            builtin: build(
                Path::new("(built-in ignore rules)"),
                &BUILT_IN.join("\n"),
                true,
            ),
            dirs: BTreeMap::new(),
            report: true,
            last_dir: RefCell::new(None),
        }
    }

    /// The same rules, logging nothing about the files they are read from.
    pub fn quiet(mut self) -> Rules {
        self.report = false;
        self
    }

    /// Sets the rules of `dir` (relative to the root) from the text of its `.ferryignore`.
    /// Returns true if they changed.
    pub fn set(&mut self, dir: &Path, text: &[u8]) -> bool {
        let hash = *blake3::hash(text).as_bytes();
        self.set_hashed(dir, text, hash)
    }

    fn set_hashed(&mut self, dir: &Path, text: &[u8], hash: Hash) -> bool {
        if self.hash(dir) == Some(&hash) {
            return false;
        }
        let text = String::from_utf8_lossy(text);
        let matcher = build(&dir.join(IGNORE_FILE), &text, self.report);
        self.dirs
            .insert(dir.to_path_buf(), DirRules { matcher, hash });
        self.last_dir.take();
        true
    }

    /// Drops the rules of `dir`; returns true if it had any.
    pub fn remove(&mut self, dir: &Path) -> bool {
        self.last_dir.take();
        self.dirs.remove(dir).is_some()
    }

    /// The hash of the text `dir`'s rules were built from, if it has any.
    pub fn hash(&self, dir: &Path) -> Option<&Hash> {
        self.dirs.get(dir).map(|r| &r.hash)
    }

    /// (Re)reads `<root>/<dir>/.ferryignore` (never through a symlink) and sets or drops
    /// `dir`'s rules from it. Returns true if they changed.
    pub fn load(&mut self, root: &Path, dir: &Path) -> bool {
        let file = root.join(dir).join(IGNORE_FILE);
        match read_limited(&file, self.report) {
            Ok(Some((text, hash))) => self.set_hashed(dir, &text, hash),
            Ok(None) => self.remove(dir),
            Err(e) => {
                if !self.report {
                    return self.remove(dir);
                }
                log::warn!(
                    "cannot read {}: {e}; its rules are not used",
                    file.display()
                );
                self.remove(dir)
            }
        }
    }

    /// True if any directory has rules (beyond the built-ins).
    pub fn has_files(&self) -> bool {
        !self.dirs.is_empty()
    }

    /// Directories that have rules, relative to the root.
    pub fn dirs(&self) -> impl Iterator<Item = &Path> {
        self.dirs.keys().map(PathBuf::as_path)
    }

    /// Drops the rules of `dir` and of every directory beneath it.
    pub fn remove_under(&mut self, dir: &Path) {
        self.last_dir.take();
        self.dirs.retain(|d, _| !d.starts_with(dir));
    }

    /// The rules of `from` and beneath it now belong to the same places under `to`.
    pub fn rename_under(&mut self, from: &Path, to: &Path) {
        self.last_dir.take();
        let moved: Vec<PathBuf> = self
            .dirs
            .keys()
            .filter(|d| d.starts_with(from))
            .cloned()
            .collect();
        let mut taken = Vec::new();
        for d in moved {
            if let Some(r) = self.dirs.remove(&d) {
                let rest = d.strip_prefix(from).unwrap_or(Path::new(""));
                taken.push((to.join(rest), r));
            }
        }
        self.remove_under(to);
        self.dirs.extend(taken);
    }

    /// Whether the rules name `path` (relative to the root) itself; the directories above it
    /// are not looked at (a walk that does not enter ignored directories needs no more).
    pub fn matches(&self, path: &Path, is_dir: bool) -> bool {
        if !is_dir && is_ignore_file(path) {
            return false;
        }
        if !self.dirs.is_empty() {
            // The deepest rules file first: the first one with an opinion decides.
            for dir in path.ancestors().skip(1) {
                let Some(rules) = self.dirs.get(dir) else {
                    continue;
                };
                let rel = path.strip_prefix(dir).unwrap_or(path);
                match rules.matcher.matched(rel, is_dir) {
                    Match::Ignore(_) => return true,
                    Match::Whitelist(_) => return false,
                    Match::None => {}
                }
            }
        }
        self.builtin.matched(path, is_dir).is_ignore()
    }

    /// Whether `path` (relative to the root) is ignored: it, or a directory above it, matches.
    pub fn is_ignored(&self, path: &Path, is_dir: bool) -> bool {
        let parent = path.parent().unwrap_or(Path::new(""));
        self.dir_ignored(parent) || self.matches(path, is_dir)
    }

    /// Whether the directory `dir` (relative to the root; `""` is the root) or one above it
    /// matches the rules.
    fn dir_ignored(&self, dir: &Path) -> bool {
        if let Some((last, ignored)) = &*self.last_dir.borrow() {
            // As bytes: paths here are made from relative paths, and a miss only costs a match.
            if last.as_os_str() == dir.as_os_str() {
                return *ignored;
            }
        }
        let parents: Vec<&Path> = dir
            .ancestors()
            .filter(|p| !p.as_os_str().is_empty())
            .collect();
        let ignored = parents.iter().rev().any(|p| self.matches(p, true));
        *self.last_dir.borrow_mut() = Some((dir.to_path_buf(), ignored));
        ignored
    }
}

/// A rules file's text and the BLAKE3 of all its bytes; `None` if it is absent or not a
/// regular file. Text past `MAX_FILE` is not used (the hash still covers it, so it is
/// reported once, not at every scan).
fn read_limited(path: &Path, report: bool) -> io::Result<Option<(Vec<u8>, Hash)>> {
    let file = match std::fs::File::options()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e)
            if e.kind() == io::ErrorKind::NotFound
                || e.raw_os_error() == Some(nix::libc::ELOOP) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    if !file.metadata()?.is_file() {
        return Ok(None);
    }
    let mut text = Vec::new();
    (&file).take(MAX_FILE + 1).read_to_end(&mut text)?;
    let mut hasher = blake3::Hasher::new();
    hasher.update(&text);
    if text.len() as u64 > MAX_FILE {
        hasher.update_reader(&file)?;
        if report {
            log::warn!(
                "{} is larger than {} KiB; its rules are not used",
                path.display(),
                MAX_FILE / 1024
            );
        }
        text.clear();
    }
    Ok(Some((text, *hasher.finalize().as_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rules from `(directory, .ferryignore text)` pairs.
    fn rules(files: &[(&str, &str)]) -> Rules {
        let mut r = Rules::new();
        for (dir, text) in files {
            assert!(r.set(Path::new(dir), text.as_bytes()));
        }
        r
    }

    /// Checks `(path, is_dir, ignored?)` rows against `r`, naming every failing row.
    #[track_caller]
    fn check(r: &Rules, rows: &[(&str, bool, bool)]) {
        let wrong: Vec<String> = rows
            .iter()
            .filter(|(p, d, want)| r.is_ignored(Path::new(p), *d) != *want)
            .map(|(p, d, want)| format!("{p} (dir: {d}): expected ignored = {want}"))
            .collect();
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    #[test]
    fn built_ins() {
        check(
            &Rules::new(),
            &[
                ("notes.txt.swp", false, true),
                ("deep/er/.notes.txt.swp", false, true),
                (".x.swx", false, true),
                ("draft.odt~", false, true),
                (".#draft.org", false, true),
                (".~lock.report.odt#", false, true),
                ("~$report.docx", false, true),
                (".DS_Store", false, true),
                ("photos/.DS_Store", false, true),
                ("photos/Thumbs.db", false, true),
                ("desktop.ini", false, true),
                // Not litter.
                ("notes.txt", false, false),
                ("swp", false, false),
                ("file.swpx", false, false),
                ("a~b", false, false),
                ("x.#y", false, false),
                ("thumbs.db.bak", false, false),
                (IGNORE_FILE, false, false),
                (".ferryignores", false, false),
                // The randomized end-to-end test's names, and conflict copies of them.
                ("d0/d1/f0", false, false),
                ("f3.txt", false, false),
                ("d2", true, false),
                ("f6.tar.gz", false, false),
                ("f5.conflict-20260101-120000-a.md", false, false),
            ],
        );
    }

    #[test]
    fn gitignore_syntax_in_one_file() {
        let r = rules(&[(
            "",
            "# a comment\n\
             *.log\n\
             !keep.log\n\
             build/\n\
             /top-only\n\
             docs/*.pdf\n\
             **/cache/**\n\
             \\#hash\n\
             trailing-space \n\
             \n",
        )]);
        check(
            &r,
            &[
                ("a.log", false, true),
                ("x/y/a.log", false, true),
                ("keep.log", false, false),
                ("x/keep.log", false, false),
                ("build", true, true),
                ("build/out.o", false, true),
                ("src/build", true, true),
                ("src/build/deep/x", false, true),
                // `build/` names directories only.
                ("build", false, false),
                ("top-only", false, true),
                ("x/top-only", false, false),
                ("docs/a.pdf", false, true),
                ("docs/x/a.pdf", false, false),
                ("x/cache/y", false, true),
                ("#hash", false, true),
                ("trailing-space", false, true),
                ("# a comment", false, false),
                ("a.txt", false, false),
                ("log", false, false),
            ],
        );
    }

    #[test]
    fn files_apply_to_their_directory_and_below() {
        let r = rules(&[
            ("", "*.tmp\n"),
            ("sub", "*.bak\n!important.tmp\n/local\n"),
            ("sub/deeper", "!*.bak\n"),
            ("other", "*\n"),
        ]);
        check(
            &r,
            &[
                ("x.tmp", false, true),
                ("sub/x.tmp", false, true),
                // The deeper file's `!` wins over the root's `*.tmp`.
                ("sub/important.tmp", false, false),
                ("sub/a/important.tmp", false, false),
                ("important.tmp", false, true),
                ("x.bak", false, false),
                ("sub/x.bak", false, true),
                ("sub/a/x.bak", false, true),
                ("sub/deeper/x.bak", false, false),
                // Anchored to the directory of its file.
                ("sub/local", false, true),
                ("sub/a/local", false, false),
                ("local", false, false),
                // A prefix of a directory's name is not that directory.
                ("subway/x.bak", false, false),
                // `*` in other/ ignores everything there, but not its own rules file.
                ("other/a", false, true),
                ("other/d", true, true),
                ("other/.ferryignore", false, false),
                ("other", true, false),
            ],
        );
    }

    #[test]
    fn nothing_beneath_an_ignored_directory_comes_back() {
        let r = rules(&[("", "build/\n"), ("build", "!keep\n")]);
        check(
            &r,
            &[
                ("build/keep", false, true),
                ("build/.ferryignore", false, true),
                ("build/x/y", false, true),
                ("builder/keep", false, false),
            ],
        );
        // `matches` looks at the path alone; `is_ignored` at its directories too.
        assert!(!r.matches(Path::new("build/x/y"), false));
        assert!(r.matches(Path::new("build"), true));
    }

    #[test]
    fn a_ferryignore_can_re_include_built_ins() {
        let r = rules(&[("", "!*.swp\n"), ("vim", "*.swp\n")]);
        check(
            &r,
            &[
                ("a.swp", false, false),
                ("x/a.swp", false, false),
                ("vim/a.swp", false, true),
                (".DS_Store", false, true),
            ],
        );
    }

    #[test]
    fn bad_lines_are_skipped_and_the_rest_applies() {
        let r = rules(&[("", "a{b\n*.log\n")]);
        check(
            &r,
            &[
                ("x.log", false, true),
                ("a{b", false, false),
                ("ab", false, false),
            ],
        );
    }

    #[test]
    fn set_remove_rename_and_hashes() {
        let mut r = Rules::new();
        assert!(r.set(Path::new("a"), b"*.x\n"));
        assert!(!r.set(Path::new("a"), b"*.x\n"), "same text: no change");
        assert_eq!(
            r.hash(Path::new("a")),
            Some(blake3::hash(b"*.x\n").as_bytes())
        );
        assert!(r.set(Path::new("a/b"), b"*.y\n"));
        r.rename_under(Path::new("a"), Path::new("z"));
        assert_eq!(
            r.dirs().collect::<Vec<_>>(),
            [Path::new("z"), Path::new("z/b")]
        );
        check(
            &r,
            &[
                ("z/f.x", false, true),
                ("z/b/f.y", false, true),
                ("a/f.x", false, false),
            ],
        );
        r.remove_under(Path::new("z/b"));
        assert_eq!(r.dirs().collect::<Vec<_>>(), [Path::new("z")]);
        assert!(r.remove(Path::new("z")));
        assert!(!r.remove(Path::new("z")));
        check(&r, &[("z/f.x", false, false)]);
    }

    #[test]
    fn a_directory_remembered_as_not_ignored_is_looked_at_again_when_rules_change() {
        let mut r = rules(&[]);
        check(&r, &[("a/b/f", false, false), ("a/b/g", false, false)]);
        assert!(r.set(Path::new("a"), b"b/\n"));
        check(&r, &[("a/b/f", false, true), ("a/c/f", false, false)]);
        r.rename_under(Path::new("a"), Path::new("x"));
        check(&r, &[("a/b/f", false, false), ("x/b/f", false, true)]);
        r.remove_under(Path::new("x"));
        check(&r, &[("x/b/f", false, false)]);
        assert!(r.set(Path::new(""), b"x\n"));
        check(&r, &[("x/b/f", false, true)]);
        assert!(r.remove(Path::new("")));
        check(&r, &[("x/b/f", false, false), ("x/b/g", true, false)]);
    }

    #[test]
    fn load_reads_the_file_and_notices_changes() {
        let root = std::env::temp_dir().join(format!("ferry-ignore-load-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("d")).unwrap();
        let mut r = Rules::new();
        assert!(!r.load(&root, Path::new("d")), "no file: no rules");
        std::fs::write(root.join("d").join(IGNORE_FILE), "*.o\n").unwrap();
        assert!(r.load(&root, Path::new("d")));
        assert!(!r.load(&root, Path::new("d")), "unchanged");
        check(&r, &[("d/x.o", false, true)]);
        std::fs::write(root.join("d").join(IGNORE_FILE), "*.a\n").unwrap();
        assert!(r.load(&root, Path::new("d")));
        check(&r, &[("d/x.o", false, false), ("d/x.a", false, true)]);
        // A symlink is not followed: it is not synced, so its rules would not be shared.
        std::fs::remove_file(root.join("d").join(IGNORE_FILE)).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", root.join("d").join(IGNORE_FILE)).unwrap();
        assert!(r.load(&root, Path::new("d")));
        assert_eq!(r.dirs().count(), 0);
        // Too big: not used, and reported once.
        std::fs::remove_file(root.join("d").join(IGNORE_FILE)).unwrap();
        std::fs::write(
            root.join("d").join(IGNORE_FILE),
            vec![b'x'; MAX_FILE as usize + 10],
        )
        .unwrap();
        assert!(r.load(&root, Path::new("d")));
        assert!(!r.load(&root, Path::new("d")));
        check(&r, &[("d/x", false, false)]);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
