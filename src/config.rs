//! The optional config file, `ferry.toml`: flat TOML whose keys are the subcommand's long
//! flags (`secret-file = "/etc/ferry/secret"`, `max-rate = "2M"`, `verbose = true`).
//!
//! Which file: the one `--config FILE` names (it must exist), else `<root>/.ferry/config.toml`
//! if there is one ([`find`]). Reading it is pure ([`File::parse`]). The command line then
//! merges it in through a [`Merge`], which holds the rules: a setting given on the command line
//! wins, the file fills what the command line left out, and the caller applies the built-in
//! defaults to whatever is still unset. A key the caller never asked for, or a value of the
//! wrong type, is an error naming the key and the file; so the keys a subcommand accepts are
//! exactly the ones its merge asks for, and `cli`'s tests check those are its flags.
//!
//! Relative paths in the file are taken from the file's directory, not the working directory:
//! a file is read by agents started from anywhere (systemd, Termux:Boot).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use toml::de::{DeTable, DeValue};

/// Where a replica's own config file is looked for, under its root. `.ferry/` is never synced.
pub const IN_ROOT: &str = ".ferry/config.toml";

/// The config file to use: `explicit` (`--config`), which must exist; else `root`'s
/// `.ferry/config.toml` if it exists; else none.
pub fn find(explicit: Option<&Path>, root: Option<&Path>) -> anyhow::Result<Option<File>> {
    if let Some(path) = explicit {
        return File::load(path).map(Some);
    }
    match root.map(|r| r.join(IN_ROOT)) {
        Some(path) if path.exists() => File::load(&path).map(Some),
        _ => Ok(None),
    }
}

/// Finds the config file ([`find`]) and, if there is one, lets `merge` take what it needs
/// from it; then refuses any key `merge` did not ask for. Returns the file's path.
pub fn merge_into(
    explicit: Option<&Path>,
    root: Option<&Path>,
    merge: impl FnOnce(&mut Merge<'_>) -> anyhow::Result<()>,
) -> anyhow::Result<Option<PathBuf>> {
    let Some(file) = find(explicit, root)? else {
        return Ok(None);
    };
    let mut m = Merge::new(&file);
    merge(&mut m)?;
    m.finish()?;
    Ok(Some(file.path))
}

/// A parsed config file.
#[derive(Debug)]
pub struct File {
    /// Where it came from, for messages and for resolving relative paths.
    path: PathBuf,
    table: std::collections::BTreeMap<String, Value>,
}

/// A value in the file, as far as ferry reads one: the keys are flags, so they take scalars.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    String(String),
    Integer(i64),
    Boolean(bool),
    /// Anything else (a float, a date, an array, a table), described for messages.
    Other(String),
}

impl Value {
    fn new(v: &DeValue<'_>) -> Value {
        match v {
            DeValue::String(s) => Value::String(s.to_string()),
            DeValue::Integer(i) => match i64::from_str_radix(i.as_str(), i.radix()) {
                Ok(i) => Value::Integer(i),
                Err(_) => Value::Other(format!("the integer {i}, out of range")),
            },
            DeValue::Boolean(b) => Value::Boolean(*b),
            DeValue::Float(f) => Value::Other(format!("the float {f}")),
            DeValue::Datetime(_) => Value::Other("a date".into()),
            DeValue::Array(_) => Value::Other("an array".into()),
            DeValue::Table(_) => Value::Other("a table".into()),
        }
    }

    /// The value for messages: its type, and itself.
    fn describe(&self) -> String {
        match self {
            Value::String(s) => format!("the string {s:?}"),
            Value::Integer(i) => format!("the integer {i}"),
            Value::Boolean(b) => format!("{b}"),
            Value::Other(what) => what.clone(),
        }
    }
}

impl File {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> anyhow::Result<File> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        File::parse(path, &text)
    }

    /// Parses `text`, the contents of `path`.
    pub fn parse(path: &Path, text: &str) -> anyhow::Result<File> {
        // The parser's own document tree, not serde's `toml::Table`: ferry needs only scalars,
        // and skipping serde's deserializer keeps the binary smaller.
        let doc = DeTable::parse(text)
            .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.to_string().trim_end()))?;
        let table = doc
            .get_ref()
            .iter()
            .map(|(k, v)| (k.get_ref().to_string(), Value::new(v.get_ref())))
            .collect();
        Ok(File {
            path: path.to_path_buf(),
            table,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A type a config value can be read as.
pub trait FromToml: Sized {
    /// What the file must hold, for messages: "a string", "a non-negative integer".
    const EXPECTED: &'static str;
    /// `v` as `Self`, or `None` if it is the wrong type. `dir` is the file's directory.
    fn from_toml(v: &Value, dir: &Path) -> Option<Self>;
}

impl FromToml for String {
    const EXPECTED: &'static str = "a string";
    fn from_toml(v: &Value, _: &Path) -> Option<Self> {
        match v {
            Value::String(s) => Some(s.clone()),
            _ => None,
        }
    }
}

impl FromToml for PathBuf {
    const EXPECTED: &'static str = "a string (a path)";
    fn from_toml(v: &Value, dir: &Path) -> Option<Self> {
        match v {
            Value::String(s) => Some(dir.join(s)),
            _ => None,
        }
    }
}

impl FromToml for bool {
    const EXPECTED: &'static str = "true or false";
    fn from_toml(v: &Value, _: &Path) -> Option<Self> {
        match v {
            Value::Boolean(b) => Some(*b),
            _ => None,
        }
    }
}

impl FromToml for u64 {
    const EXPECTED: &'static str = "a non-negative integer";
    fn from_toml(v: &Value, _: &Path) -> Option<Self> {
        match v {
            Value::Integer(i) => (*i).try_into().ok(),
            _ => None,
        }
    }
}

impl FromToml for usize {
    const EXPECTED: &'static str = "a non-negative integer";
    fn from_toml(v: &Value, _: &Path) -> Option<Self> {
        match v {
            Value::Integer(i) => (*i).try_into().ok(),
            _ => None,
        }
    }
}

/// Merges one file into what the command line gave, key by key, and remembers which keys
/// were asked for: the file may hold no others ([`Merge::finish`]).
#[derive(Debug)]
pub struct Merge<'a> {
    file: &'a File,
    known: Vec<&'static str>,
}

impl<'a> Merge<'a> {
    pub fn new(file: &'a File) -> Merge<'a> {
        Merge {
            file,
            known: Vec::new(),
        }
    }

    /// The keys asked for so far.
    pub fn known(&self) -> &[&'static str] {
        &self.known
    }

    /// The file's value for `key`, if it has one of the right type (an error if it has one
    /// of another type).
    pub fn get<T: FromToml>(&mut self, key: &'static str) -> anyhow::Result<Option<T>> {
        self.known.push(key);
        let Some(v) = self.file.table.get(key) else {
            return Ok(None);
        };
        let dir = self.file.path.parent().unwrap_or(Path::new(""));
        match T::from_toml(v, dir) {
            Some(t) => Ok(Some(t)),
            None => bail!(
                "{}: key \"{key}\" must be {}, not {}",
                self.file.path.display(),
                T::EXPECTED,
                v.describe()
            ),
        }
    }

    /// Sets `slot` from the file unless the command line already did.
    pub fn fill<T: FromToml>(
        &mut self,
        key: &'static str,
        slot: &mut Option<T>,
    ) -> anyhow::Result<()> {
        let v = self.get(key)?;
        if slot.is_none() {
            *slot = v;
        }
        Ok(())
    }

    /// `fill` for a setting the command line reads with `parse` (such as a rate, `2M`): the
    /// file holds the same text as a string, or an integer.
    pub fn fill_parsed<T>(
        &mut self,
        key: &'static str,
        slot: &mut Option<T>,
        parse: fn(&str) -> Result<T, String>,
    ) -> anyhow::Result<()> {
        self.known.push(key);
        let text = match self.file.table.get(key) {
            None => return Ok(()),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Integer(i)) => i.to_string(),
            Some(v) => bail!(
                "{}: key \"{key}\" must be a string or an integer, not {}",
                self.file.path.display(),
                v.describe()
            ),
        };
        let v = parse(&text)
            .map_err(|e| anyhow::anyhow!("{}: key \"{key}\": {e}", self.file.path.display()))?;
        if slot.is_none() {
            *slot = Some(v);
        }
        Ok(())
    }

    /// Switches that together make one setting, such as `-v` and `-q` (the log level): if the
    /// command line gave any of them, it decides and the file's are ignored; otherwise the
    /// file sets them. (A switch cannot say "off" on the command line, so without this rule
    /// `-q` could not override `verbose = true`.)
    pub fn fill_switches<const N: usize>(
        &mut self,
        switches: [(&'static str, &mut bool); N],
    ) -> anyhow::Result<()> {
        let from_command_line = switches.iter().any(|(_, on)| **on);
        for (key, slot) in switches {
            let v = self.get::<bool>(key)?;
            if !from_command_line {
                *slot = v.unwrap_or(false);
            }
        }
        Ok(())
    }

    /// Fails on the first key in the file that was not asked for.
    pub fn finish(self) -> anyhow::Result<()> {
        let Some(key) = self
            .file
            .table
            .keys()
            .find(|k| !self.known.contains(&k.as_str()))
        else {
            return Ok(());
        };
        let dashed = key.replace('_', "-");
        let hint = if self.known.contains(&dashed.as_str()) {
            format!("; did you mean \"{dashed}\"?")
        } else {
            String::new()
        };
        bail!(
            "{}: unknown key \"{key}\" (known keys: {}){hint}",
            self.file.path.display(),
            self.known.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> File {
        File::parse(Path::new("/etc/ferry/ferry.toml"), text).unwrap()
    }

    /// What the command line gave, what the file says, and what a merge makes of them.
    #[test]
    fn command_line_wins_the_file_fills_the_rest() {
        let table: &[(&str, Option<u64>, &str, Option<u64>)] = &[
            ("neither", None, "", None),
            ("file only", None, "n = 5", Some(5)),
            ("command line only", Some(7), "", Some(7)),
            ("both: the command line wins", Some(7), "n = 5", Some(7)),
            ("zero is a value, not absence", None, "n = 0", Some(0)),
        ];
        for (name, cli, text, want) in table {
            let f = file(text);
            let mut m = Merge::new(&f);
            let mut slot = *cli;
            m.fill("n", &mut slot).unwrap();
            m.finish().unwrap();
            assert_eq!(slot, *want, "{name}");
        }
    }

    /// (-v, -q) on the command line, `verbose`/`quiet` in the file, and the result.
    #[test]
    fn switches_are_one_setting() {
        let table: &[(&str, [bool; 2], &str, [bool; 2])] = &[
            ("neither", [false, false], "", [false, false]),
            (
                "file verbose",
                [false, false],
                "verbose = true",
                [true, false],
            ),
            ("file quiet", [false, false], "quiet = true", [false, true]),
            (
                "-v beats file quiet",
                [true, false],
                "quiet = true",
                [true, false],
            ),
            (
                "-q beats file verbose",
                [false, true],
                "verbose = true",
                [false, true],
            ),
            (
                "-v and file verbose = false",
                [true, false],
                "verbose = false",
                [true, false],
            ),
            (
                "file false is off",
                [false, false],
                "verbose = false",
                [false, false],
            ),
        ];
        for (name, cli, text, want) in table {
            let f = file(text);
            let mut m = Merge::new(&f);
            let [mut v, mut q] = *cli;
            m.fill_switches([("verbose", &mut v), ("quiet", &mut q)])
                .unwrap();
            m.finish().unwrap();
            assert_eq!([v, q], *want, "{name}");
        }
        let f = file("verbose = 1");
        let err = Merge::new(&f)
            .fill_switches([("verbose", &mut true), ("quiet", &mut false)])
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("\"verbose\" must be true or false"),
            "{err}"
        );
    }

    #[test]
    fn values_by_type() {
        let f =
            file("s = \"x\"\nrel = \"secret\"\nabs = \"/srv/share\"\nb = true\nu = 30\nz = 100000");
        let mut m = Merge::new(&f);
        assert_eq!(m.get::<String>("s").unwrap().as_deref(), Some("x"));
        assert_eq!(
            m.get::<PathBuf>("rel").unwrap(),
            Some(PathBuf::from("/etc/ferry/secret")),
            "relative paths are taken from the file's directory"
        );
        assert_eq!(
            m.get::<PathBuf>("abs").unwrap(),
            Some(PathBuf::from("/srv/share"))
        );
        assert_eq!(m.get::<bool>("b").unwrap(), Some(true));
        assert_eq!(m.get::<u64>("u").unwrap(), Some(30));
        assert_eq!(m.get::<usize>("z").unwrap(), Some(100_000));
        m.finish().unwrap();
        let f = file("under = 1_000\nhex = 0x10\nhuge = 9_223_372_036_854_775_807");
        let mut m = Merge::new(&f);
        assert_eq!(m.get::<u64>("under").unwrap(), Some(1000));
        assert_eq!(m.get::<u64>("hex").unwrap(), Some(16));
        assert_eq!(m.get::<u64>("huge").unwrap(), Some(i64::MAX as u64));
        m.finish().unwrap();
    }

    #[test]
    fn wrong_types_name_key_file_and_expected_type() {
        fn err<T: FromToml + std::fmt::Debug>(text: &str) -> String {
            let f = file(text);
            let mut m = Merge::new(&f);
            format!("{:#}", m.get::<T>("k").unwrap_err())
        }
        let table: &[(&str, String, &str)] = &[
            (
                "string for integer",
                err::<u64>("k = \"fast\""),
                "a non-negative integer, not the string \"fast\"",
            ),
            (
                "negative",
                err::<u64>("k = -1"),
                "a non-negative integer, not the integer -1",
            ),
            (
                "float",
                err::<usize>("k = 1.5"),
                "a non-negative integer, not the float 1.5",
            ),
            (
                "integer for string",
                err::<String>("k = 3"),
                "a string, not the integer 3",
            ),
            (
                "string for bool",
                err::<bool>("k = \"yes\""),
                "true or false, not the string \"yes\"",
            ),
            (
                "array for path",
                err::<PathBuf>("k = [\"a\"]"),
                "a string (a path), not an array",
            ),
            (
                "table",
                err::<String>("[k]\nx = 1"),
                "a string, not a table",
            ),
        ];
        for (name, got, want) in table {
            assert!(
                got.starts_with("/etc/ferry/ferry.toml: key \"k\" must be ") && got.ends_with(want),
                "{name}: {got}"
            );
        }
    }

    /// A bad value in the file is an error even when the command line overrides it: the file
    /// is broken either way.
    #[test]
    fn wrong_type_is_an_error_even_when_overridden() {
        let f = file("n = \"x\"");
        let mut m = Merge::new(&f);
        assert!(m.fill("n", &mut Some(1u64)).is_err());
    }

    #[test]
    fn unknown_keys_are_errors() {
        let table: &[(&str, &str, &str)] = &[
            (
                "typo",
                "max-rat = 1",
                "unknown key \"max-rat\" (known keys: max-rate, name)",
            ),
            (
                "underscores",
                "max_rate = 1",
                "unknown key \"max_rate\" (known keys: max-rate, name); did you mean \"max-rate\"?",
            ),
            (
                "a section",
                "[server]\nname = \"x\"",
                "unknown key \"server\"",
            ),
            (
                "the config flag itself",
                "config = \"other.toml\"",
                "unknown key \"config\"",
            ),
        ];
        for (name, text, want) in table {
            let f = file(text);
            let mut m = Merge::new(&f);
            m.fill_parsed("max-rate", &mut None, |s| {
                s.parse::<u64>().map_err(|e| e.to_string())
            })
            .unwrap();
            m.fill::<String>("name", &mut None).unwrap();
            let err = format!("{:#}", m.finish().unwrap_err());
            assert!(
                err.starts_with("/etc/ferry/ferry.toml: ") && err.contains(want),
                "{name}: {err}"
            );
        }
    }

    #[test]
    fn parsed_values_take_strings_or_numbers() {
        fn double(s: &str) -> Result<u64, String> {
            s.parse::<u64>()
                .map(|n| n * 2)
                .map_err(|_| format!("bad number {s:?}"))
        }
        /// The slot after the merge, or a part of the error.
        type Want = Result<Option<u64>, &'static str>;
        let table: &[(&str, &str, Option<u64>, Want)] = &[
            ("absent", "", None, Ok(None)),
            ("string", "r = \"21\"", None, Ok(Some(42))),
            ("number", "r = 21", None, Ok(Some(42))),
            ("command line wins", "r = 21", Some(1), Ok(Some(1))),
            (
                "parser's error",
                "r = \"2X\"",
                None,
                Err("key \"r\": bad number \"2X\""),
            ),
            (
                "wrong type",
                "r = true",
                None,
                Err("key \"r\" must be a string or an integer, not true"),
            ),
        ];
        for (name, text, cli, want) in table {
            let f = file(text);
            let mut m = Merge::new(&f);
            let mut slot = *cli;
            match (m.fill_parsed("r", &mut slot, double), want) {
                (Ok(()), Ok(w)) => assert_eq!(slot, *w, "{name}"),
                (Err(e), Err(w)) => assert!(format!("{e:#}").contains(w), "{name}: {e:#}"),
                (got, _) => panic!("{name}: {got:?}"),
            }
        }
    }

    #[test]
    fn syntax_errors_name_the_file() {
        let err = File::parse(Path::new("/x/ferry.toml"), "name = ").unwrap_err();
        assert!(err.to_string().starts_with("/x/ferry.toml: "), "{err}");
        let err = File::parse(Path::new("/x/ferry.toml"), "a = 1\na = 2").unwrap_err();
        assert!(err.to_string().contains("duplicate"), "{err}");
    }

    #[test]
    fn finding_the_file() {
        let dir = std::env::temp_dir().join(format!("ferry-config-find-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join(".ferry")).unwrap();
        let explicit = dir.join("ferry.toml");

        assert!(find(None, None).unwrap().is_none(), "no root, no --config");
        assert!(
            find(None, Some(&dir)).unwrap().is_none(),
            "no file in the root"
        );
        let err = find(Some(&explicit), Some(&dir)).unwrap_err();
        assert!(
            format!("{err:#}").contains("cannot read config file")
                && format!("{err:#}").contains("ferry.toml"),
            "--config must exist: {err:#}"
        );

        std::fs::write(dir.join(IN_ROOT), "name = \"in-root\"").unwrap();
        let f = find(None, Some(&dir)).unwrap().unwrap();
        assert_eq!(f.path(), dir.join(IN_ROOT));

        std::fs::write(&explicit, "name = \"explicit\"").unwrap();
        let f = find(Some(&explicit), Some(&dir)).unwrap().unwrap();
        assert_eq!(f.path(), explicit, "--config comes before the root's file");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
