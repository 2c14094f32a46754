//! # disha-train
//!
//! Fine-tuning for disha: instruction data with the prompt masked out of the loss
//! ([`data`]), learning-rate schedules ([`schedule`]) and the training loop ([`learner`]) —
//! AdamW on the adapter parameters only, gradient accumulation, global gradient-norm clipping,
//! NaN / Inf guards, per-step metrics — and a whole run as one call ([`run`]: data, adapter or
//! resume, checkpoints, evaluation, saved and verified adapter). The `disha` binary (same
//! crate) drives it.
#![warn(missing_docs)]

pub mod adamw;
pub mod allocator;
pub mod checkpoint;
pub mod data;
pub mod demo;
pub mod evaluate;
pub mod learner;
pub mod loss_scale;
pub mod plot;
pub mod run;
pub mod schedule;
pub mod settings;
mod train_error;

pub use train_error::TrainError;
