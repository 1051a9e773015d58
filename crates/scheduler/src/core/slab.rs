//! Task storage: slots in fixed-size chunks. A `Vec` that doubles would hold up to twice the
//! memory the tasks need (and, while it grows, the old buffer as well): at 100k tasks of ~190
//! bytes that was a third of the scheduler's memory per task. Chunks waste at most one chunk.

const CHUNK_BITS: u32 = 10;
const CHUNK: usize = 1 << CHUNK_BITS;

/// Slots addressed by `u32` index; freed slots are `None` and reused by the caller.
pub(crate) struct Slab<T> {
    chunks: Vec<Box<[Option<T>]>>,
    len: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab { chunks: Vec::new(), len: 0 }
    }
}

impl<T> Slab<T> {
    /// Number of slots ever pushed (live or freed).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Appends a slot and returns its index.
    pub(crate) fn push(&mut self, value: T) -> u32 {
        let i = self.len;
        if i.is_multiple_of(CHUNK) {
            self.chunks.push((0..CHUNK).map(|_| None).collect());
        }
        self.chunks[i >> CHUNK_BITS][i % CHUNK] = Some(value);
        self.len += 1;
        u32::try_from(i).expect("at most 2^32 tasks")
    }

    pub(crate) fn slot(&self, i: u32) -> &Option<T> {
        &self.chunks[(i >> CHUNK_BITS) as usize][i as usize % CHUNK]
    }

    pub(crate) fn slot_mut(&mut self, i: u32) -> &mut Option<T> {
        &mut self.chunks[(i >> CHUNK_BITS) as usize][i as usize % CHUNK]
    }

    /// Every slot pushed, in index order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Option<T>> {
        self.chunks.iter().flat_map(|c| c.iter()).take(self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_across_chunks() {
        let mut s = Slab::default();
        for i in 0..(3 * CHUNK as u32 + 5) {
            assert_eq!(s.push(i), i);
        }
        assert_eq!(s.len(), 3 * CHUNK + 5);
        assert_eq!(s.slot(CHUNK as u32), &Some(CHUNK as u32));
        *s.slot_mut(7) = None;
        assert_eq!(s.iter().filter(|x| x.is_none()).count(), 1);
        assert_eq!(s.iter().count(), s.len());
        assert_eq!(s.chunks.len(), 4);
    }
}
