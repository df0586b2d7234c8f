//! The inline pseudonym type events carry. It is part of the event model; the privacy crate
//! computes pseudonyms.

/// The longest key id a key ring accepts, in bytes.
pub const MAX_KEY_ID: usize = 16;

/// The longest pseudonym: a key id, `.`, a period (at most 20 characters), `.`, 24 hex digits.
const PSEUDONYM_MAX: usize = MAX_KEY_ID + 1 + 20 + 1 + 24;

/// A pseudonym (`<key-id>.<period>.<24 hex digits>`), stored inline.
///
/// Events carry three, for identifiers of high cardinality (users, sessions). As a shared
/// string each cost two cache misses per event, the reference count going up when the event
/// was decoded and down when it was dropped, on memory the streaming input keeps evicting; a
/// pseudonym is a plain value, copied with the event. It dereferences, compares, hashes and
/// serializes as the string.
#[derive(Clone, Copy)]
pub struct Pseudonym {
    len: u8,
    bytes: [u8; PSEUDONYM_MAX],
}

impl Pseudonym {
    /// The pseudonym `<prefix><24 hex digits>` of a keyed hash: `prefix` is
    /// `<key-id>.<period>.` (truncated if longer than a key id and a period can be), the hex
    /// digits are the first 12 bytes of `digest`. Built inline, without an allocation.
    #[inline]
    pub fn from_digest(prefix: &str, digest: &[u8; 32]) -> Pseudonym {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = Pseudonym {
            len: 0,
            bytes: [0; PSEUDONYM_MAX],
        };
        let (head, tail) = out.bytes.split_at_mut(prefix.len().min(PSEUDONYM_MAX - 24));
        head.copy_from_slice(&prefix.as_bytes()[..head.len()]);
        for (pair, &b) in tail.chunks_exact_mut(2).zip(&digest[..12]) {
            pair[0] = HEX[usize::from(b >> 4)];
            pair[1] = HEX[usize::from(b & 15)];
        }
        out.len = (head.len() + 24) as u8;
        out
    }

    /// The pseudonym as a string.
    #[inline]
    pub fn as_str(&self) -> &str {
        // Only ever built from a `&str` (`TryFrom`) or from ASCII (`Pseudonym::from_digest`).
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl std::ops::Deref for Pseudonym {
    type Target = str;

    #[inline]
    fn deref(&self) -> &str {
        self.as_str()
    }
}

/// A string too long to be a [`Pseudonym`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("a pseudonym is at most {PSEUDONYM_MAX} bytes, this one is {0}")]
pub struct PseudonymTooLong(pub usize);

impl TryFrom<&str> for Pseudonym {
    type Error = PseudonymTooLong;

    fn try_from(text: &str) -> Result<Pseudonym, PseudonymTooLong> {
        let mut out = Pseudonym {
            len: 0,
            bytes: [0; PSEUDONYM_MAX],
        };
        let slot = out
            .bytes
            .get_mut(..text.len())
            .ok_or(PseudonymTooLong(text.len()))?;
        slot.copy_from_slice(text.as_bytes());
        out.len = text.len() as u8;
        Ok(out)
    }
}

impl PartialEq for Pseudonym {
    fn eq(&self, other: &Pseudonym) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Pseudonym {}

impl PartialOrd for Pseudonym {
    fn partial_cmp(&self, other: &Pseudonym) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Pseudonym {
    fn cmp(&self, other: &Pseudonym) -> std::cmp::Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl std::hash::Hash for Pseudonym {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

impl std::fmt::Debug for Pseudonym {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for Pseudonym {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for Pseudonym {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Pseudonym {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Pseudonym, D::Error> {
        let text = crate::Text::deserialize(deserializer)?;
        Pseudonym::try_from(&*text.0).map_err(serde::de::Error::custom)
    }
}
