//! Names made at run time (an operation from a route template and method, the BT a naming rule
//! gives it) kept once for the life of the process, so that a request names its spans without
//! allocating, and the exporter, on another thread, frees nothing of them.
//!
//! There are few such names (routes x methods, BTs), but a service that builds names from raw
//! input could make them without end: past [`MAX_NAMES`] or [`MAX_BYTES`] nothing more is kept
//! and callers use owned names, as before.

use std::sync::RwLock;

use rustc_hash::FxHashSet;

/// The most distinct names kept.
pub(crate) const MAX_NAMES: usize = 4096;
/// The most bytes of names kept.
pub(crate) const MAX_BYTES: usize = 256 << 10;

struct Interned {
    names: FxHashSet<&'static str>,
    bytes: usize,
}

static INTERNED: RwLock<Option<Interned>> = RwLock::new(None);

/// `name`, kept for the life of the process; `None` once the bounds are reached.
pub(crate) fn intern(name: &str) -> Option<&'static str> {
    if let Some(kept) = INTERNED.read().ok()?.as_ref().and_then(|i| i.names.get(name)) {
        return Some(kept);
    }
    let mut guard = INTERNED.write().ok()?;
    let interned = guard.get_or_insert_with(|| Interned {
        names: FxHashSet::default(),
        bytes: 0,
    });
    if let Some(kept) = interned.names.get(name) {
        return Some(kept);
    }
    if interned.names.len() >= MAX_NAMES || interned.bytes + name.len() > MAX_BYTES {
        return None;
    }
    let kept: &'static str = Box::leak(name.into());
    interned.names.insert(kept);
    interned.bytes += name.len();
    Some(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_kept_once_and_the_bounds_hold() {
        let first = intern("GET /users/{id}").unwrap();
        let again = intern(&String::from("GET /users/{id}")).unwrap();
        assert!(std::ptr::eq(first, again), "one copy per name");
        let mut kept = 1;
        for i in 0.. {
            if intern(&format!("GET /raw/{i}")).is_none() {
                break;
            }
            kept += 1;
        }
        assert!(kept <= MAX_NAMES);
        assert!(intern("GET /one/more").is_none(), "nothing new past the bound");
        assert!(intern("GET /users/{id}").is_some(), "names kept before stay");
    }
}
