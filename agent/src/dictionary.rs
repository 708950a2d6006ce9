//! The exporter's string table: a name (operation, component, peer, BT, attribute key, error
//! type, caller) becomes an id once and keeps it for the exporter's life.
//!
//! Spans are encoded with these ids when the exporter takes them from the threads, long before
//! they are sent, and a batch may be sent on more than one stream (again after a reconnect).
//! So ids cannot be a stream's: each stream is instead told every string the table holds, in
//! id order, before the first message that could name one ([`Dictionary::start_stream`],
//! [`Dictionary::unsent`]). The collector's per-stream table then has the same ids.
//!
//! Names an agent makes are few (routes, peers, keys), but nothing stops a caller from naming
//! spans by user id: past [`MAX_STRINGS`] a new name becomes [`OVERFLOW_NAME`] and is counted.

use rustc_hash::FxHashMap;

use crate::{
    recent::Recent,
    span::{Name, SharedName},
};

/// Distinct names kept; the collector refuses a stream past 1,000,000.
pub(crate) const MAX_STRINGS: usize = 100_000;
/// What a name past [`MAX_STRINGS`] is sent as.
pub(crate) const OVERFLOW_NAME: &str = "(sightline: too many distinct names)";

/// Static names found before the map.
const RECENT_SLOTS: usize = 256;

#[derive(Default)]
pub(crate) struct Dictionary {
    /// Text to id; id `i` is `strings[i - 1]`, id 0 the empty string.
    index: FxHashMap<String, u32>,
    strings: Vec<String>,
    /// Ids of static names by address and length: no hashing and comparing of their text (an
    /// address of a `&'static str` never holds other text).
    statics: FxHashMap<(usize, usize), u32>,
    recent: Recent<(usize, usize), u32, RECENT_SLOTS>,
    /// How many of `strings` the current stream has been told.
    sent: usize,
    /// Names that became [`OVERFLOW_NAME`].
    overflowed: u64,
}

/// A static name's hash for [`Dictionary::recent`]: its address and length mixed, so that
/// names packed side by side do not share slots.
fn recent_hash((address, len): (usize, usize)) -> u64 {
    (address ^ len.rotate_left(40)) as u64
}

impl Dictionary {
    pub(crate) fn id_static(&mut self, s: &'static str) -> u32 {
        // A server span has no component or peer.
        if s.is_empty() {
            return 0;
        }
        let key = (s.as_ptr() as usize, s.len());
        // A few names make most spans: found by address before the map.
        let hash = recent_hash(key);
        if let Some(i) = self.recent.get(hash, &key) {
            return i;
        }
        let i = match self.statics.get(&key) {
            Some(&i) => i,
            None => {
                let i = self.id(s);
                self.statics.insert(key, i);
                i
            }
        };
        self.recent.put(hash, key, i);
        i
    }

    pub(crate) fn id_name(&mut self, name: &Name) -> u32 {
        match name {
            Name::Borrowed(s) => self.id_static(s),
            Name::Owned(s) => self.id(s),
        }
    }

    pub(crate) fn id_shared(&mut self, name: &SharedName) -> u32 {
        match name {
            SharedName::Static(s) => self.id_static(s),
            SharedName::Shared(s) => self.id(s),
        }
    }

    pub(crate) fn id(&mut self, s: &str) -> u32 {
        if s.is_empty() {
            return 0;
        }
        if let Some(&i) = self.index.get(s) {
            return i;
        }
        if self.strings.len() >= MAX_STRINGS {
            self.overflowed += 1;
            if let Some(&i) = self.index.get(OVERFLOW_NAME) {
                return i;
            }
            if self.overflowed == 1 {
                tracing::warn!(
                    "sightline: more than {MAX_STRINGS} distinct span names, attribute keys or peers; \
                     new ones are sent as {OVERFLOW_NAME:?}"
                );
            }
            return self.insert(OVERFLOW_NAME);
        }
        self.insert(s)
    }

    fn insert(&mut self, s: &str) -> u32 {
        self.strings.push(s.to_string());
        let i = self.strings.len() as u32;
        self.index.insert(s.to_string(), i);
        i
    }

    /// The id [`Dictionary::id_name`] gave `name` (0 if it gave none).
    pub(crate) fn known(&self, name: &Name) -> u32 {
        if name.is_empty() {
            return 0;
        }
        let found = match name {
            Name::Borrowed(s) => self.statics.get(&(s.as_ptr() as usize, s.len())).copied(),
            Name::Owned(s) => self.index.get(s.as_str()).copied(),
        };
        // A name past the limit was given the overflow name's id.
        found.or_else(|| self.index.get(OVERFLOW_NAME).copied()).unwrap_or(0)
    }

    /// The text of an id given out here ("" for 0 or an unknown id).
    pub(crate) fn text(&self, id: u32) -> &str {
        id.checked_sub(1)
            .and_then(|i| self.strings.get(i as usize))
            .map_or("", String::as_str)
    }

    /// A new stream knows no strings yet.
    pub(crate) fn start_stream(&mut self) {
        self.sent = 0;
    }

    /// The strings the current stream has not been told, in id order; from now on it has.
    /// Every message takes them before it goes, so any id it holds is known on arrival.
    pub(crate) fn unsent(&mut self) -> &[String] {
        let unsent = &self.strings[self.sent..];
        self.sent = self.strings.len();
        unsent
    }

    /// Whether the current stream has been told `id`.
    pub(crate) fn is_sent(&self, id: u32) -> bool {
        id as usize <= self.sent
    }

    /// Overflowed names so far.
    #[cfg(test)]
    pub(crate) fn overflowed(&self) -> u64 {
        self.overflowed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_last_across_streams_and_each_stream_is_told_every_string_once() {
        let mut dictionary = Dictionary::default();
        let login = dictionary.id_static("Login");
        let get = dictionary.id("GET /a");
        assert_eq!((login, get), (1, 2));
        assert_eq!(
            dictionary.id_name(&Name::Owned("Login".into())),
            login,
            "text, not address"
        );
        assert_eq!(dictionary.id(""), 0);
        assert_eq!(dictionary.unsent(), ["Login", "GET /a"]);
        assert!(dictionary.unsent().is_empty());
        let peer = dictionary.id("redis");
        assert!(!dictionary.is_sent(peer));
        assert_eq!(dictionary.unsent(), ["redis"]);
        assert!(dictionary.is_sent(peer));
        // A reconnect: the new stream hears everything again, ids unchanged.
        dictionary.start_stream();
        assert!(!dictionary.is_sent(login));
        assert_eq!(dictionary.unsent(), ["Login", "GET /a", "redis"]);
        assert_eq!(dictionary.id("GET /a"), get);
        assert_eq!(dictionary.text(get), "GET /a");
        assert_eq!(dictionary.text(0), "");
    }

    #[test]
    fn names_past_the_limit_become_one_overflow_name_and_are_counted() {
        let mut dictionary = Dictionary::default();
        for i in 0..MAX_STRINGS {
            dictionary.id(&format!("user {i}"));
        }
        let first = dictionary.id("user 0");
        let over = dictionary.id("one too many");
        assert_eq!(dictionary.text(over), OVERFLOW_NAME);
        assert_eq!(dictionary.id("two too many"), over);
        assert_eq!(dictionary.id("user 0"), first, "known names keep their ids");
        assert_eq!(dictionary.overflowed(), 2);
        assert_eq!(dictionary.unsent().len(), MAX_STRINGS + 1);
    }
}
