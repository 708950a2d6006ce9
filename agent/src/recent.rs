//! A few hot keys found before a map is asked: the exporter's RED keys and names, a thread's
//! calls out. Two slots a key, chosen by a mixed hash: with one, two hot keys that shared a slot
//! took turns missing (one build's addresses did that to the two RED keys of every request:
//! +445 exporter instructions a request, `instructions-per-request.sh`).

pub(crate) struct Recent<K, V, const N: usize> {
    slots: [Option<(K, V)>; N],
}

impl<K: Copy + Eq, V: Copy, const N: usize> Recent<K, V, N> {
    /// Empty. `N` is a power of two.
    pub(crate) const fn new() -> Self {
        assert!(N.is_power_of_two() && N >= 2);
        Self {
            slots: [const { None }; N],
        }
    }

    /// The first of the key's two slots (a pair: the even slot and the one after it), from
    /// `hash` (any mix of the key's parts). Keys whose hashes fall on either slot of a pair
    /// share the pair: were the first slot the hash's own, a key put in the pair's odd slot
    /// would push one in its even slot out, and two hot keys would take turns missing.
    fn pair(hash: u64) -> usize {
        (hash.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (u64::BITS - N.trailing_zeros())) as usize & !1
    }

    pub(crate) fn get(&self, hash: u64, key: &K) -> Option<V> {
        let pair = Self::pair(hash);
        // Compared in place: copying a slot out first (`Option::filter`) moved the whole key.
        [pair, pair + 1].into_iter().find_map(|at| match &self.slots[at] {
            Some((seen, value)) if seen == key => Some(*value),
            _ => None,
        })
    }

    /// Keeps `key` first in its pair; what was first moves second, the second goes.
    pub(crate) fn put(&mut self, hash: u64, key: K, value: V) {
        let pair = Self::pair(hash);
        self.slots[pair + 1] = self.slots[pair].replace((key, value));
    }

    pub(crate) fn clear(&mut self) {
        self.slots = [const { None }; N];
    }
}

impl<K: Copy + Eq, V: Copy, const N: usize> Default for Recent<K, V, N> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_keys_of_one_slot_both_stay_and_a_third_displaces_the_older() {
        let mut recent: Recent<u32, u32, 8> = Recent::new();
        // Same hash: same slots.
        recent.put(7, 1, 10);
        recent.put(7, 2, 20);
        assert_eq!((recent.get(7, &1), recent.get(7, &2)), (Some(10), Some(20)));
        recent.put(7, 3, 30);
        assert_eq!(
            (recent.get(7, &1), recent.get(7, &2), recent.get(7, &3)),
            (None, Some(20), Some(30))
        );
        assert_eq!(recent.get(8, &4), None);
        recent.clear();
        assert_eq!(recent.get(7, &3), None);
        // Hashes whose slots are the two of one pair: the keys share the pair and both stay.
        let (mut even, mut odd) = (None, None);
        for hash in 0..10_000u64 {
            let slot = (hash.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 61) as usize;
            match slot {
                4 => even = even.or(Some(hash)),
                5 => odd = odd.or(Some(hash)),
                _ => {}
            }
        }
        let (even, odd) = (even.unwrap(), odd.unwrap());
        recent.put(even, 1, 10);
        recent.put(odd, 2, 20);
        assert_eq!((recent.get(even, &1), recent.get(odd, &2)), (Some(10), Some(20)));
        recent.put(even, 1, 11);
        recent.put(odd, 3, 30);
        assert_eq!(recent.get(odd, &2), None, "the older of the pair goes");
        assert_eq!((recent.get(even, &1), recent.get(odd, &3)), (Some(11), Some(30)));
        recent.clear();
        assert_eq!(recent.get(7, &3), None);
    }
}
