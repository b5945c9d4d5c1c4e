//! Token (+ learned position) embeddings.

use super::Real;
use rayon::prelude::*;

/// out\[b*t, c\] = wte\[tokens\] (+ wpe\[pos\]). Token ids must be `< V` (the trainer checks
/// them with a clear error before any op runs).
pub fn encoder_forward<T: Real>(
    out: &mut [T],
    tokens: &[u32],
    wte: &[T],
    wpe: Option<&[T]>,
    t: usize,
    c: usize,
) {
    assert_eq!(out.len(), tokens.len() * c);
    out.par_chunks_mut(c).enumerate().for_each(|(r, o)| {
        let tok = tokens[r] as usize;
        o.copy_from_slice(&wte[tok * c..(tok + 1) * c]);
        if let Some(wpe) = wpe {
            let pos = r % t;
            for (o, &p) in o.iter_mut().zip(&wpe[pos * c..(pos + 1) * c]) {
                *o += p;
            }
        }
    });
}

/// dwte\[tok\] += dout, dwpe\[pos\] += dout. Serial: a scatter-add whose cost (b*t*c) is
/// negligible, and a fixed order keeps it reproducible.
pub fn encoder_backward<T: Real>(
    dwte: &mut [T],
    mut dwpe: Option<&mut [T]>,
    dout: &[T],
    tokens: &[u32],
    t: usize,
    c: usize,
) {
    assert_eq!(dout.len(), tokens.len() * c);
    for (r, dy) in dout.chunks(c).enumerate() {
        let tok = tokens[r] as usize;
        for (d, &g) in dwte[tok * c..(tok + 1) * c].iter_mut().zip(dy) {
            *d += g;
        }
        if let Some(dwpe) = dwpe.as_deref_mut() {
            let pos = r % t;
            for (d, &g) in dwpe[pos * c..(pos + 1) * c].iter_mut().zip(dy) {
                *d += g;
            }
        }
    }
}
