//! Learning-rate schedules: linear warmup, then constant, linear decay or cosine decay (the
//! shapes of transformers' `get_{constant,linear,cosine}_schedule_with_warmup`).

use serde::{Deserialize, Serialize};

/// What happens after warmup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// Stay at the peak.
    Constant,
    /// Decay linearly to 0 at the last step.
    Linear,
    /// Half a cosine from the peak to 0 at the last step.
    Cosine,
}

/// A warmup + decay schedule over `total_steps` optimizer steps.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    /// Peak learning rate.
    pub peak: f64,
    /// Linear warmup steps (from 0 to the peak).
    pub warmup_steps: usize,
    /// Steps of the whole run.
    pub total_steps: usize,
    /// Shape after warmup.
    pub kind: ScheduleKind,
}

impl LrSchedule {
    /// The learning rate of optimizer step `step` (0-based), as transformers computes it.
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.peak * step as f64 / self.warmup_steps.max(1) as f64;
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / decay_steps).min(1.0);
        match self.kind {
            ScheduleKind::Constant => self.peak,
            ScheduleKind::Linear => self.peak * (1.0 - progress),
            ScheduleKind::Cosine => {
                self.peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay_like_transformers() {
        let s = |kind| LrSchedule {
            peak: 1e-3,
            warmup_steps: 10,
            total_steps: 110,
            kind,
        };
        let cos = s(ScheduleKind::Cosine);
        assert_eq!(cos.lr(0), 0.0);
        assert!((cos.lr(5) - 5e-4).abs() < 1e-15);
        assert_eq!(cos.lr(10), 1e-3);
        assert!((cos.lr(60) - 5e-4).abs() < 1e-12);
        assert!(cos.lr(110).abs() < 1e-15);
        let lin = s(ScheduleKind::Linear);
        assert!((lin.lr(35) - 7.5e-4).abs() < 1e-12);
        assert_eq!(s(ScheduleKind::Constant).lr(100), 1e-3);
    }
}
