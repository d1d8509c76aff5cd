//! Names of volumes, snapshots, images, clones and sources, and the export names built
//! from them.
//!
//! A name is 1 to 63 characters from `A-Z a-z 0-9 - _ .`, starts with a letter or a
//! digit, and is not all digits (so it never looks like a revision number). `@` separates a
//! volume from one of its snapshots in export names (`db@monday`).

use std::fmt;

pub const MAX_NAME_CHARS: usize = 63;

/// A validated name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} name {given:?}: {reason}")]
pub struct NameError {
    pub what: &'static str,
    pub given: String,
    pub reason: &'static str,
}

impl Name {
    /// Validates `s` as the name of a `what` ("volume", "snapshot", ...).
    pub fn parse(what: &'static str, s: &str) -> Result<Name, NameError> {
        let err = |reason| NameError {
            what,
            given: s.chars().take(80).collect(),
            reason,
        };
        if s.is_empty() {
            return Err(err(
                "it is empty; use 1 to 63 letters, digits, '-', '_' or '.'",
            ));
        }
        if s.chars().count() > MAX_NAME_CHARS {
            return Err(err("it is longer than 63 characters"));
        }
        if let Some(bad) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || "-_.".contains(*c)))
        {
            return Err(if bad == '@' {
                err(
                    "'@' separates a volume from a snapshot (VOLUME@SNAP) and cannot be part of a name",
                )
            } else {
                err("only letters, digits, '-', '_' and '.' are allowed")
            });
        }
        if !s.starts_with(|c: char| c.is_ascii_alphanumeric()) {
            return Err(err("it must start with a letter or a digit"));
        }
        if s.chars().all(|c| c.is_ascii_digit()) {
            return Err(err("it must not be all digits"));
        }
        Ok(Name(s.to_owned()))
    }

    /// A name the control plane derives from a user's name (`img.NAME`, `cln.NAME`):
    /// the same characters, up to 80 of them to leave room for the prefix.
    pub fn internal(s: &str) -> Result<Name, NameError> {
        if s.chars().count() > MAX_NAME_CHARS + 17 {
            return Err(NameError {
                what: "internal",
                given: s.chars().take(80).collect(),
                reason: "it is too long",
            });
        }
        let probe: String = s.chars().take(MAX_NAME_CHARS).collect();
        Name::parse("internal", &probe)?;
        if s.chars()
            .any(|c| !(c.is_ascii_alphanumeric() || "-_.".contains(c)))
        {
            return Err(NameError {
                what: "internal",
                given: s.into(),
                reason: "only letters, digits, '-', '_' and '.' are allowed",
            });
        }
        Ok(Name(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_good_names() {
        for s in [
            "db",
            "db-1",
            "pg_15.main",
            "9lives",
            "a".repeat(63).as_str(),
        ] {
            assert!(Name::parse("volume", s).is_ok(), "{s}");
        }
    }

    #[test]
    fn rejects_bad_names_with_reason() {
        for (s, needle) in [
            ("", "empty"),
            ("12345", "all digits"),
            ("-x", "start with"),
            (".hidden", "start with"),
            ("a/b", "only letters"),
            ("a b", "only letters"),
            ("db@snap", "'@'"),
            (&"a".repeat(64), "longer than 63"),
            ("é", "only letters"),
        ] {
            let e = Name::parse("volume", s).expect_err(s);
            assert!(e.to_string().contains(needle), "{s}: {e}");
        }
    }
}
