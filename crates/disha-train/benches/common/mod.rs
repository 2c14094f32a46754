//! What the benchmarks share: seeded random tokens and the optimizer settings of a timed step.
#![allow(dead_code)] // each benchmark binary uses its own part

use disha_models::SplitMix64;
use disha_train::data::{DataLoader, Example};
use disha_train::learner::LearnerConfig;
use disha_train::schedule::{LrSchedule, ScheduleKind};

/// Seeded token ids in `[3, vocab)` (values do not matter for speed; ids 0–2 are skipped so no
/// special token appears).
pub fn random_ids(count: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = SplitMix64::new(seed);
    (0..count)
        .map(|_| 3 + (rng.next_u64() % (vocab as u64 - 3)) as u32)
        .collect()
}

/// One batch of `batch` sequences of `seq` seeded random tokens ([`random_ids`], drawn in
/// order), each its own labels.
pub fn random_token_loader(vocab: usize, batch: usize, seq: usize, seed: u64) -> DataLoader {
    let examples = random_ids(batch * seq, vocab, seed)
        .chunks(seq)
        .map(|ids| Example {
            labels: ids.iter().map(|&i| i64::from(i)).collect(),
            input_ids: ids.to_vec(),
        })
        .collect();
    DataLoader::new(examples, batch, 0, 0)
}

/// AdamW at a constant 1e-4 (β 0.9 / 0.999, ε 1e-8, no weight decay), the gradient norm
/// clipped at 1, for `max_steps` steps: a timed step's settings.
pub fn constant_lr_config(max_steps: usize) -> LearnerConfig {
    LearnerConfig {
        max_steps,
        grad_accum: 1,
        schedule: LrSchedule {
            peak: 1e-4,
            warmup_steps: 0,
            total_steps: max_steps,
            kind: ScheduleKind::Constant,
        },
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        max_grad_norm: Some(1.0),
    }
}
