//! [`LossScaler`]: dynamic loss scaling for training in f16 compute.
//!
//! f16 keeps 5 exponent bits: normal numbers stop at 6.1e-5 and subnormals at 6e-8, so the
//! small activation gradients of a real model's backward round to zero. Scaling the loss by `S`
//! before backward scales every gradient by `S` and lifts them into range; the adapter
//! gradients (f32) are divided by `S` before clipping and the optimizer step, so the update is
//! the unscaled one. bf16 has f32's range and needs none.
//!
//! The scale follows torch's `GradScaler` defaults: it starts at 2¹⁶, halves when a backward
//! overflows (a non-finite gradient), and doubles after 2,000 steps in a row without one. Where
//! `GradScaler` then skips the optimizer step, the learner runs the step's micro-batches again
//! at the halved scale: no batch is dropped, and the optimizer's step count stays the step
//! count (Training chapter of the docs).

use serde::{Deserialize, Serialize};

/// The scale an f16 run starts at (torch's `GradScaler` default).
pub const INITIAL_LOSS_SCALE: f64 = 65536.0;
/// Steps without an overflow after which the scale doubles (torch's default).
pub const GROWTH_INTERVAL: u32 = 2000;
/// The largest scale: doubling stops here (f32's gradients of a scaled loss stay finite).
pub const MAX_LOSS_SCALE: f64 = 16_777_216.0;
/// The smallest scale: a backward that overflows even at 1 is not a scaling problem.
pub const MIN_LOSS_SCALE: f64 = 1.0;

/// The dynamic loss scale of an f16 run and its count of steps since the last change.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    scale: f64,
    good_steps: u32,
}

impl Default for LossScaler {
    fn default() -> Self {
        Self::new(INITIAL_LOSS_SCALE)
    }
}

impl LossScaler {
    /// A scaler starting at `scale`, clamped to [`MIN_LOSS_SCALE`]`..=`[`MAX_LOSS_SCALE`] and
    /// rounded down to a power of two (so scaling and unscaling are exact).
    pub fn new(scale: f64) -> Self {
        let scale = if scale.is_finite() {
            scale.clamp(MIN_LOSS_SCALE, MAX_LOSS_SCALE)
        } else {
            MAX_LOSS_SCALE
        };
        Self {
            scale: 2f64.powi(scale.log2().floor() as i32),
            good_steps: 0,
        }
    }

    /// The factor the loss is multiplied by before backward.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Steps since the scale last changed.
    pub fn good_steps(&self) -> u32 {
        self.good_steps
    }

    /// After a backward whose gradients overflowed: halves the scale. `false` when it is
    /// already at [`MIN_LOSS_SCALE`] (the overflow is not the scale's doing).
    pub fn backoff(&mut self) -> bool {
        self.good_steps = 0;
        if self.scale <= MIN_LOSS_SCALE {
            return false;
        }
        self.scale = (self.scale / 2.0).max(MIN_LOSS_SCALE);
        true
    }

    /// After a step whose gradients were finite: doubles the scale every
    /// [`GROWTH_INTERVAL`] such steps in a row, up to [`MAX_LOSS_SCALE`].
    pub fn record_finite_step(&mut self) {
        self.good_steps += 1;
        if self.good_steps >= GROWTH_INTERVAL {
            self.good_steps = 0;
            self.scale = (self.scale * 2.0).min(MAX_LOSS_SCALE);
        }
    }

    /// Checks a scaler read from a checkpoint: a power-of-two scale in range and a step count
    /// below the growth interval.
    ///
    /// # Errors
    /// A message naming the bad value.
    pub fn validate(&self) -> Result<(), String> {
        let power_of_two = self.scale.is_finite() && self.scale.log2().fract() == 0.0;
        if !(MIN_LOSS_SCALE..=MAX_LOSS_SCALE).contains(&self.scale) || !power_of_two {
            return Err(format!(
                "loss scale {} is not a power of two in {MIN_LOSS_SCALE}..={MAX_LOSS_SCALE}",
                self.scale
            ));
        }
        if self.good_steps >= GROWTH_INTERVAL {
            return Err(format!(
                "loss-scale step count {} is not below the growth interval {GROWTH_INTERVAL}",
                self.good_steps
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_on_overflow_and_doubles_after_the_growth_interval() {
        let mut s = LossScaler::default();
        assert_eq!(s.scale(), 65536.0);
        assert!(s.backoff());
        assert_eq!(s.scale(), 32768.0);
        for _ in 0..GROWTH_INTERVAL - 1 {
            s.record_finite_step();
        }
        assert_eq!((s.scale(), s.good_steps()), (32768.0, GROWTH_INTERVAL - 1));
        s.record_finite_step();
        assert_eq!((s.scale(), s.good_steps()), (65536.0, 0));
        // An overflow resets the run of finite steps.
        s.record_finite_step();
        assert!(s.backoff());
        assert_eq!((s.scale(), s.good_steps()), (32768.0, 0));
    }

    #[test]
    fn stays_within_its_bounds() {
        let mut s = LossScaler::new(3.0);
        assert_eq!(s.scale(), 2.0, "rounded down to a power of two");
        assert!(s.backoff());
        assert!(!s.backoff(), "nothing below 1");
        assert_eq!(s.scale(), MIN_LOSS_SCALE);
        let mut s = LossScaler::new(f64::INFINITY);
        assert_eq!(s.scale(), MAX_LOSS_SCALE);
        for _ in 0..GROWTH_INTERVAL {
            s.record_finite_step();
        }
        assert_eq!(s.scale(), MAX_LOSS_SCALE);
        assert_eq!(LossScaler::new(0.0).scale(), MIN_LOSS_SCALE);
    }

    #[test]
    fn validate_rejects_what_a_scaler_cannot_hold() {
        assert!(LossScaler::default().validate().is_ok());
        for (scale, good_steps) in [
            (3.0, 0),
            (0.5, 0),
            (f64::NAN, 0),
            (2.0 * MAX_LOSS_SCALE, 0),
            (1024.0, GROWTH_INTERVAL),
        ] {
            let s = LossScaler { scale, good_steps };
            assert!(s.validate().is_err(), "{s:?}");
        }
    }
}
