//! Softmax cross-entropy, fused and in place (the logits buffer becomes the
//! probabilities, then the logits' gradient), so a `[b*t, V]` buffer is held once.

use super::real::{exp_shift_sum, max_of};
use super::Real;
use rayon::prelude::*;

/// logits\[n,v\] -> probs in place; losses\[n\] = logsumexp(logits) - logits\[target\].
pub fn softmax_xent_forward<T: Real>(logits_to_probs: &mut [T], losses: &mut [T], targets: &[u32]) {
    let n = losses.len();
    assert!(n > 0 && targets.len() == n && logits_to_probs.len().is_multiple_of(n));
    let v = logits_to_probs.len() / n;
    logits_to_probs
        .par_chunks_mut(v)
        .zip(losses.par_iter_mut())
        .zip(targets.par_iter())
        .for_each(|((row, loss), &tg)| {
            let maxv = max_of(row);
            let target_logit = row[tg as usize];
            let sum = exp_shift_sum(row, maxv);
            let inv = T::ONE / sum;
            row.iter_mut().for_each(|x| *x *= inv);
            *loss = sum.ln() + maxv - target_logit;
        });
}

/// probs\[n,v\] -> dlogits = (probs - onehot(target)) * dloss, in place.
pub fn softmax_xent_backward<T: Real>(probs_to_dlogits: &mut [T], targets: &[u32], dloss: T) {
    let n = targets.len();
    assert!(n > 0 && probs_to_dlogits.len().is_multiple_of(n));
    let v = probs_to_dlogits.len() / n;
    probs_to_dlogits
        .par_chunks_mut(v)
        .zip(targets.par_iter())
        .for_each(|(row, &tg)| {
            row[tg as usize] -= T::ONE;
            row.iter_mut().for_each(|x| *x *= dloss);
        });
}
