//! The training loop: AdamW on the adapter parameters only, gradient accumulation with the loss
//! normalized over every target token of the effective batch, global gradient-norm clipping,
//! warmup + decay schedules, NaN / Inf guards and per-step metrics.

use std::time::Instant;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::{
    AdamWConfig, GradientsAccumulator, GradientsParams, ModuleOptimizer, OptimizerRecord,
};
use burn::tensor::{Int, Tensor, TensorData};
use disha_models::llama::{Llama, causal_lm_loss_sum};
use serde::{Deserialize, Serialize};

use crate::TrainError;
use crate::data::{DataLoader, HostBatch};
use crate::schedule::LrSchedule;

/// Optimizer and loop settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LearnerConfig {
    /// Optimizer steps to run.
    pub max_steps: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Learning-rate schedule.
    pub schedule: LrSchedule,
    /// AdamW β₁.
    pub beta1: f32,
    /// AdamW β₂.
    pub beta2: f32,
    /// AdamW ε (transformers' default 1e-8).
    pub eps: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
    /// Clip the global L2 norm of all adapter gradients to this value.
    pub max_grad_norm: Option<f64>,
}

impl LearnerConfig {
    /// Checks every range.
    ///
    /// # Errors
    /// A zero step / accumulation count, a non-positive learning rate, betas outside `[0, 1)`,
    /// a non-positive clipping norm.
    pub fn validate(&self) -> Result<(), TrainError> {
        if self.max_steps == 0 {
            return Err(TrainError::config("max_steps", 0, "must be >= 1"));
        }
        if self.grad_accum == 0 {
            return Err(TrainError::config("grad_accum", 0, "must be >= 1"));
        }
        if !(self.schedule.peak > 0.0 && self.schedule.peak.is_finite()) {
            return Err(TrainError::config("lr", self.schedule.peak, "must be > 0"));
        }
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(TrainError::config(name, b, "must be in [0, 1)"));
            }
        }
        if let Some(n) = self.max_grad_norm
            && (n.is_nan() || n <= 0.0)
        {
            return Err(TrainError::config("max_grad_norm", n, "must be > 0"));
        }
        Ok(())
    }
}

/// What one optimizer step did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Optimizer step, 1-based.
    pub step: usize,
    /// Mean cross-entropy over the step's target tokens.
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global L2 norm of the adapter gradients before clipping.
    pub grad_norm: f64,
    /// Tokens processed (padding excluded) in this step.
    pub tokens: usize,
    /// Tokens per second over this step.
    pub tokens_per_sec: f64,
    /// Peak resident memory of the process so far, MB (Linux `VmHWM`; `None` elsewhere).
    pub peak_memory_mb: Option<f64>,
}

/// Peak resident set size of this process in MB, from `/proc/self/status` (Linux).
pub fn peak_memory_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Sums the squared gradients of the trainable parameters.
struct GradNormSq<'a> {
    grads: &'a GradientsParams,
    sum: f64,
}

impl ModuleVisitor for GradNormSq<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.get::<D>(param.id) {
            self.sum += g.square().sum().into_scalar::<f64>();
        }
    }
}

/// Multiplies every gradient by `scale`.
struct ScaleGrads<'a> {
    grads: &'a mut GradientsParams,
    scale: f64,
}

impl ModuleVisitor for ScaleGrads<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.remove::<D>(param.id) {
            self.grads.register(param.id, g.mul_scalar(self.scale));
        }
    }
}

/// Global L2 norm of the gradients of `model`'s parameters in `grads`.
pub fn global_grad_norm<M: Module>(model: &M, grads: &GradientsParams) -> f64 {
    let mut norm = GradNormSq { grads, sum: 0.0 };
    model.visit(&mut norm);
    norm.sum.sqrt()
}

/// Scales `grads` so their global L2 norm is at most `max_norm` (PyTorch's
/// `clip_grad_norm_`: factor `max / (norm + 1e-6)` when the norm exceeds `max`). Returns the
/// norm before clipping.
pub fn clip_grad_norm<M: Module>(model: &M, grads: &mut GradientsParams, max_norm: f64) -> f64 {
    let norm = global_grad_norm(model, grads);
    if norm > max_norm {
        model.visit(&mut ScaleGrads {
            grads,
            scale: max_norm / (norm + 1e-6),
        });
    }
    norm
}

/// Collects the ids of the parameters that require gradients, in visiting order.
struct TrainableIds(Vec<u64>);

impl ModuleVisitor for TrainableIds {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if param.val().is_require_grad() {
            self.0.push(param.id.val());
        }
    }
}

/// Gives the trainable parameters the ids of `ids`, in visiting order.
struct AssignIds<'a> {
    ids: &'a [u64],
    next: usize,
}

impl ModuleMapper for AssignIds<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if !param.val().is_require_grad() || self.next >= self.ids.len() {
            return param;
        }
        let (_, tensor, mapper) = param.consume();
        let id = ParamId::from(self.ids[self.next]);
        self.next += 1;
        Param::from_mapped_value(id, tensor, mapper)
    }
}

/// The ids of `model`'s trainable parameters (what optimizer state is keyed by).
pub fn trainable_param_ids<M: Module>(model: &M) -> Vec<u64> {
    let mut ids = TrainableIds(Vec::new());
    model.visit(&mut ids);
    ids.0
}

/// A model, its optimizer and the step counter.
pub struct Learner {
    model: Option<Llama>,
    optim: ModuleOptimizer,
    config: LearnerConfig,
    step: usize,
}

impl std::fmt::Debug for Learner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Learner")
            .field("config", &self.config)
            .field("step", &self.step)
            .finish_non_exhaustive()
    }
}

impl Learner {
    /// A learner for `model`, which must live on an autodiff device with only the adapter
    /// parameters requiring gradients (see `disha_core::freeze_all_but_active_adapters`).
    ///
    /// # Errors
    /// An invalid config.
    pub fn new(model: Llama, config: LearnerConfig) -> Result<Self, TrainError> {
        config.validate()?;
        let optim = AdamWConfig::new()
            .with_beta_1(config.beta1)
            .with_beta_2(config.beta2)
            .with_epsilon(config.eps)
            .with_weight_decay(config.weight_decay)
            .init();
        Ok(Self {
            model: Some(model),
            optim,
            config,
            step: 0,
        })
    }

    /// Continues a run: `model` with the checkpoint's adapter, the optimizer state saved by
    /// [`Self::optimizer_state`], the step count, and the trainable-parameter ids of the saved
    /// run ([`trainable_param_ids`]), which the optimizer state is keyed by.
    ///
    /// # Errors
    /// An invalid config, an unreadable optimizer state, or a model whose trainable parameters
    /// do not match the saved ones in number.
    pub fn resume(
        model: Llama,
        config: LearnerConfig,
        step: usize,
        param_ids: &[u64],
        optimizer_state: Vec<u8>,
    ) -> Result<Self, TrainError> {
        let current = trainable_param_ids(&model).len();
        if current != param_ids.len() {
            return Err(TrainError::config(
                "resume",
                format!("{current} trainable tensors"),
                format!("the checkpoint was saved with {}", param_ids.len()),
            ));
        }
        let model = model.map(&mut AssignIds {
            ids: param_ids,
            next: 0,
        });
        let record =
            OptimizerRecord::from_bytes(burn::tensor::Bytes::from_bytes_vec(optimizer_state))
                .map_err(|e| {
                    TrainError::config(
                        "optimizer state",
                        "<checkpoint>",
                        format!("unreadable: {e:?}"),
                    )
                })?;
        let mut learner = Self::new(model, config)?;
        learner.optim = learner.optim.load_record(record);
        learner.step = step;
        Ok(learner)
    }

    /// The optimizer state as bytes (Burn's burnpack record), for checkpoints.
    ///
    /// # Errors
    /// The record cannot be serialized.
    pub fn optimizer_state(&self) -> Result<Vec<u8>, TrainError> {
        self.optim
            .to_record()
            .into_bytes()
            .map(|b| b.to_vec())
            .map_err(|e| TrainError::config("optimizer state", "<record>", format!("{e:?}")))
    }

    /// Optimizer steps taken.
    pub fn step(&self) -> usize {
        self.step
    }

    /// The model being trained.
    pub fn model(&self) -> &Llama {
        self.model.as_ref().expect("the model is always put back")
    }

    /// Ends training, returning the model.
    pub fn into_model(self) -> Llama {
        self.model.expect("the model is always put back")
    }

    /// Runs one optimizer step over `grad_accum` micro-batches from `data`.
    ///
    /// # Errors
    /// [`TrainError::NonFinite`] when the loss or the gradient norm is NaN / Inf; the model and
    /// optimizer are left as they were before the step.
    pub fn train_step(&mut self, data: &mut DataLoader) -> Result<StepMetrics, TrainError> {
        let start = Instant::now();
        let batches: Vec<HostBatch> = (0..self.config.grad_accum)
            .map(|_| data.next_batch())
            .collect();
        // Normalize by every target of the effective batch, so accumulation gives exactly the
        // gradient of the mean loss over all its tokens (not a mean of micro-batch means).
        let targets: usize = batches.iter().map(|b| b.targets).sum::<usize>().max(1);
        let tokens: usize = batches.iter().map(|b| b.tokens).sum();
        let model = self.model.take().expect("the model is always put back");
        let device = model.device();
        let mut accumulator = GradientsAccumulator::<Llama>::new();
        let mut loss_sum = 0.0;
        for batch in &batches {
            let ids = Tensor::<2, Int>::from_data(
                TensorData::new(batch.input_ids.clone(), batch.shape),
                &device,
            );
            let labels = Tensor::<2, Int>::from_data(
                TensorData::new(batch.labels.clone(), batch.shape),
                &device,
            );
            let logits = match &batch.segments {
                Some(segments) => model.forward_packed(ids, segments),
                None => model.forward(ids),
            };
            let loss = causal_lm_loss_sum(logits, labels).div_scalar(targets as f64);
            loss_sum += loss.clone().into_scalar::<f64>();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            accumulator.accumulate(&model, grads);
        }
        let step = self.step + 1;
        let mut grads = accumulator.grads();
        let grad_norm = global_grad_norm(&model, &grads);
        for (what, value) in [("loss", loss_sum), ("gradient norm", grad_norm)] {
            if !value.is_finite() {
                self.model = Some(model);
                return Err(TrainError::NonFinite { step, what, value });
            }
        }
        if let Some(max) = self.config.max_grad_norm {
            clip_grad_norm(&model, &mut grads, max);
        }
        let lr = self.config.schedule.lr(self.step);
        self.model = Some(self.optim.step(lr, model, grads));
        self.step = step;
        let seconds = start.elapsed().as_secs_f64();
        Ok(StepMetrics {
            step,
            loss: loss_sum,
            perplexity: loss_sum.exp(),
            lr,
            grad_norm,
            tokens,
            tokens_per_sec: tokens as f64 / seconds.max(1e-9),
            peak_memory_mb: peak_memory_mb(),
        })
    }
}
