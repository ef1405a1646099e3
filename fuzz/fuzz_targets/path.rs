//! The path validator (`RelPath`), the one gate every name from the network goes through,
//! on arbitrary bytes: as a string, as postcard and JSON on the wire, and in pairs for the
//! prefix helpers.
//!
//! Input: byte strings separated by 0xff (a byte that never occurs in UTF-8). The first is
//! the path under test; the next two, if valid, are used with it for `starts_with`,
//! `rebase` and `join`.

#![no_main]

use ferry::core::path::{take_last_refused, RelPath, MAX_COMPONENT, MAX_PATH, STATE_DIR};
use libfuzzer_sys::fuzz_target;

/// What DESIGN.md ("Paths and names") and `core::path` promise of every accepted path.
fn assert_valid(p: &RelPath) {
    let s = p.as_str();
    assert!(!s.is_empty(), "empty path accepted");
    assert!(s.len() <= MAX_PATH, "{} byte path accepted", s.len());
    assert!(!s.starts_with('/'), "absolute path accepted: {s:?}");
    for bad in ['\0', '\r', '\n', '\\'] {
        assert!(!s.contains(bad), "{bad:?} accepted in {s:?}");
    }
    let parts: Vec<&str> = s.split('/').collect();
    for part in &parts {
        assert!(!part.is_empty(), "empty component accepted: {s:?}");
        assert!(
            *part != "." && *part != "..",
            "dot component accepted: {s:?}"
        );
        assert!(
            part.len() <= MAX_COMPONENT,
            "long component accepted: {s:?}"
        );
    }
    assert_ne!(parts[0], STATE_DIR, "state directory accepted: {s:?}");

    // Its forms agree with each other and parse back to the same path.
    assert_eq!(p.to_string(), s);
    assert_eq!(format!("{p:?}"), format!("{s:?}"));
    assert_eq!(
        s.parse::<RelPath>().as_ref(),
        Ok(p),
        "display -> parse round trip"
    );
    assert_eq!(p.depth(), parts.len());
    assert_eq!(p.file_name(), *parts.last().unwrap());
    match p.parent() {
        None => assert_eq!(parts.len(), 1),
        Some(parent) => {
            assert_eq!(RelPath::new(parent.as_str()).as_ref(), Ok(&parent));
            assert_eq!(parent.depth() + 1, p.depth());
            assert_eq!(parent.join(p.file_name()).as_ref(), Ok(p));
            assert!(p.starts_with(&parent) && !parent.starts_with(p));
        }
    }

    // The wire forms: postcard (the control channel, the state files) and JSON.
    let wire = postcard::to_allocvec(p).unwrap();
    assert_eq!(
        wire,
        postcard::to_allocvec(s).unwrap(),
        "a path travels as its string"
    );
    assert_eq!(postcard::from_bytes::<RelPath>(&wire).as_ref(), Ok(p));
    let json = serde_json::to_string(p).unwrap();
    assert_eq!(
        serde_json::from_str::<RelPath>(&json).as_ref().ok(),
        Some(p)
    );
}

fn check_str(s: &str) -> Option<RelPath> {
    match RelPath::new(s) {
        Ok(p) => {
            assert_eq!(p.as_str(), s, "accepted paths are not rewritten");
            assert_valid(&p);
            Some(p)
        }
        Err(bad) => {
            assert_eq!(bad.path, s);
            assert!(bad.to_string().starts_with("refused path "), "{bad}");
            assert!(!bad.reason.is_empty());
            // Refused on the wire too, and the decoder can name it.
            take_last_refused();
            let wire = postcard::to_allocvec(s).unwrap();
            assert!(
                postcard::from_bytes::<RelPath>(&wire).is_err(),
                "{s:?} decoded"
            );
            assert_eq!(take_last_refused().as_ref(), Some(&bad));
            let json = serde_json::to_string(s).unwrap();
            assert!(
                serde_json::from_str::<RelPath>(&json).is_err(),
                "{s:?} from JSON"
            );
            None
        }
    }
}

fn check_pair(a: &RelPath, b: &RelPath, c: &RelPath) {
    let (sa, sb) = (a.as_str(), b.as_str());
    let beneath = sa == sb || sa.starts_with(&format!("{sb}/"));
    assert_eq!(a.starts_with(b), beneath, "{sa:?} starts_with {sb:?}");
    if beneath {
        // Moving `b` to `c` moves `a` to the same place beneath `c`; the result is a path
        // like any other, or refused if it cannot be one (too long).
        let want = format!("{}{}", c.as_str(), &sa[sb.len()..]);
        match a.rebase(b, c) {
            Ok(got) => {
                assert_eq!(got.as_str(), want);
                assert_valid(&got);
                assert!(got.starts_with(c));
            }
            Err(bad) => {
                assert_eq!(bad.path, want);
                assert!(RelPath::new(want).is_err(), "rebase refused a valid path");
            }
        }
    }
    match a.join(b.file_name()) {
        Ok(j) => {
            assert_valid(&j);
            assert_eq!(j.parent().as_ref(), Some(a));
        }
        Err(_) => assert!(sa.len() + 1 + b.file_name().len() > MAX_PATH),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|&b| b == 0xff);
    let first = parts.next().unwrap_or_default();
    let main = std::str::from_utf8(first).ok().and_then(check_str);

    // Any bytes as a string on the wire: decoded only if UTF-8 and a valid path.
    let wire = postcard::to_allocvec(data).unwrap(); // same bytes as a string of `data`
    take_last_refused();
    match postcard::from_bytes::<RelPath>(&wire) {
        Ok(p) => {
            assert_eq!(p.as_str().as_bytes(), data);
            assert_valid(&p);
        }
        Err(_) => assert!(std::str::from_utf8(data).map_or(true, |s| RelPath::new(s).is_err())),
    }
    // And the raw input read as postcard, as a frame's body would be.
    if let Ok(p) = postcard::from_bytes::<RelPath>(data) {
        assert_valid(&p);
    }

    let others: Vec<RelPath> = parts
        .take(2)
        .filter_map(|b| std::str::from_utf8(b).ok())
        .filter_map(|s| RelPath::new(s).ok())
        .collect();
    if let Some(a) = &main {
        let b = others.first().unwrap_or(a);
        let c = others.get(1).unwrap_or(b);
        check_pair(a, b, c);
        check_pair(b, a, c);
        if let Some(parent) = a.parent() {
            check_pair(a, &parent, c);
        }
    }
});
