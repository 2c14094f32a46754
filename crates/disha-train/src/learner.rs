//! The training loop: AdamW on the adapter parameters only, gradient accumulation with the loss
//! normalized over every target token of the effective batch, global gradient-norm clipping,
//! warmup + decay schedules, dynamic loss scaling in f16 compute ([`LossScaler`]), NaN / Inf
//! guards and per-step metrics.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::time::Instant;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::{GradientsAccumulator, GradientsParams, ModuleOptimizer, OptimizerRecord};
use burn::tensor::{Bytes, DType, Int, Tensor, TensorData};
use disha_core::freeze_all_but_active_adapters;
use disha_models::{CausalLm, causal_lm_loss_sum};
use serde::{Deserialize, Serialize};

use crate::TrainError;
use crate::adamw::FusedAdamW;
use crate::data::{DataLoader, HostBatch, IGNORE_INDEX};
use crate::loss_scale::LossScaler;
use crate::schedule::LrSchedule;
use crate::settings::TrainPart;

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
    /// a non-positive clipping norm, a non-positive ε, a negative weight decay.
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
        if !(self.eps > 0.0 && self.eps.is_finite()) {
            return Err(TrainError::config(
                "eps",
                self.eps,
                "must be a finite number > 0",
            ));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return Err(TrainError::config(
                "weight_decay",
                self.weight_decay,
                "must be a finite number >= 0",
            ));
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
    /// The device memory pool's reserved bytes after this step, MB, on backends that report
    /// their pools (CubeCL's WGPU / CUDA; `None` on Flex). A pool keeps the pages it reserved,
    /// so this is its high-water mark so far.
    #[serde(default)]
    pub device_memory_mb: Option<f64>,
    /// The loss scale this step's gradients were computed at (f16 compute; `None` otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f64>,
}

/// Peak resident set size of this process in MB, from `/proc/self/status` (Linux).
pub fn peak_memory_mb() -> Option<f64> {
    process_status_mb("VmHWM:")
}

/// Current resident set size of this process in MB, from `/proc/self/status` (Linux).
pub fn resident_memory_mb() -> Option<f64> {
    process_status_mb("VmRSS:")
}

/// A kB field of `/proc/self/status` (`VmHWM:`, `VmRSS:`) in MB; `None` off Linux.
fn process_status_mb(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
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

/// Freezes every parameter of `model` except those of its active adapters and the base
/// tensors `parts` names ([`TrainPart::Ln`]: RWKV-7's LayerNorms) — the trainable set a
/// [`Learner`] expects.
///
/// # Errors
/// A part the model's family does not have (`ln` on a Llama model).
pub fn mark_trainable(model: CausalLm, parts: &[TrainPart]) -> Result<CausalLm, TrainError> {
    let model = freeze_all_but_active_adapters(model);
    if parts.is_empty() {
        return Ok(model);
    }
    match model {
        CausalLm::Rwkv7(rwkv) => Ok(CausalLm::Rwkv7(rwkv.set_layer_norms_trainable(true))),
        other => Err(TrainError::config(
            "train_parts",
            "ln",
            format!(
                "trains RWKV-7's LayerNorms (RWKV-PEFT's --train_parts ln); this model is {}",
                other.family()
            ),
        )),
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

/// Collects the shapes of the parameters that require gradients, in visiting order.
struct TrainableShapes(Vec<Vec<usize>>);

impl ModuleVisitor for TrainableShapes {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let value = param.val();
        if value.is_require_grad() {
            self.0.push(value.dims().to_vec());
        }
    }
}

/// The shapes of `model`'s trainable parameters, in the order of [`trainable_param_ids`].
pub fn trainable_param_shapes<M: Module>(model: &M) -> Vec<Vec<usize>> {
    let mut shapes = TrainableShapes(Vec::new());
    model.visit(&mut shapes);
    shapes.0
}

/// The AdamW state tensors of one parameter, as Burn's optimizer record names them
/// (`{param_id}.{field}`).
const ADAMW_MOMENTS: [&str; 2] = ["momentum.moment_1", "momentum.moment_2"];

/// Checks a burnpack optimizer record against the parameters it must restore: `expected` maps
/// each parameter id to its shape; every id needs both AdamW moments (f32, that shape), its
/// rank scalar and an AdamW step count equal to `step`, and nothing else may be present.
/// Burn's own loader would panic on a missing id or rank, and fail mid-step on a wrong shape.
fn check_optimizer_state(
    bytes: &[u8],
    expected: &BTreeMap<u64, &[usize]>,
    step: usize,
) -> Result<(), String> {
    let reader = burn_pack::Reader::from_bytes(Bytes::from_bytes_vec(bytes.to_vec()))
        .map_err(|e| format!("unreadable optimizer state: {e}"))?;
    let scalars = reader.scalars().clone();
    let tensors = reader
        .into_tensors()
        .map_err(|e| format!("unreadable optimizer state: {e}"))?;
    let mut found: BTreeMap<(u64, &str), ()> = BTreeMap::new();
    for tensor in &tensors {
        let name = &tensor.name;
        let id = tensor
            .param_id
            .ok_or_else(|| format!("state tensor `{name}` has no parameter id"))?;
        let shape = expected.get(&id).ok_or_else(|| {
            format!("state tensor `{name}` is for parameter {id}, not one of this adapter's")
        })?;
        let field = name
            .strip_prefix(&format!("{id}."))
            .and_then(|f| ADAMW_MOMENTS.iter().find(|m| **m == f))
            .ok_or_else(|| {
                format!("unexpected state tensor `{name}` (AdamW keeps {ADAMW_MOMENTS:?})")
            })?;
        if tensor.dtype != burn_pack::DType::F32 || tensor.shape.as_slice() != *shape {
            return Err(format!(
                "state tensor `{name}` is {:?} {:?}; the parameter is F32 {shape:?}",
                tensor.dtype,
                tensor.shape.as_slice()
            ));
        }
        found.insert((id, field), ());
    }
    let scalar = |key: &str| scalars.get(key).and_then(|v| u64::try_from(*v).ok());
    for (&id, shape) in expected {
        for moment in ADAMW_MOMENTS {
            if !found.contains_key(&(id, moment)) {
                return Err(format!("no `{id}.{moment}` for parameter {id}"));
            }
        }
        if scalar(&format!("{id}.__rank")) != Some(shape.len() as u64) {
            return Err(format!(
                "parameter {id}: rank is not recorded as {}",
                shape.len()
            ));
        }
        let time = scalar(&format!("{id}.momentum.time"));
        if time != Some(step as u64) {
            return Err(format!(
                "parameter {id}: AdamW has taken {time:?} steps, the checkpoint says {step}"
            ));
        }
    }
    if let Some(key) = scalars.keys().find(|k| {
        k.split_once('.')
            .and_then(|(id, _)| id.parse::<u64>().ok())
            .is_none_or(|id| !expected.contains_key(&id))
    }) {
        return Err(format!("unexpected state entry `{key}`"));
    }
    Ok(())
}

/// Checks a host batch's ids and labels against the model's vocabulary (labels may also be
/// [`IGNORE_INDEX`]): an id past the embedding table would fail inside the backend.
///
/// # Errors
/// [`disha_models::ModelError::TokenOutOfRange`] for the first bad id or label.
pub fn check_batch(model: &CausalLm, batch: &HostBatch) -> Result<(), TrainError> {
    model.check_ids(&batch.input_ids)?;
    if let Some(position) = batch
        .labels
        .iter()
        .position(|&l| l != IGNORE_INDEX && (l < 0 || l as usize >= model.vocab_size()))
    {
        return Err(disha_models::ModelError::TokenOutOfRange {
            id: batch.labels[position],
            position,
            vocab_size: model.vocab_size(),
        }
        .into());
    }
    Ok(())
}

/// A model, its optimizer and the step counter.
pub struct Learner {
    model: Option<CausalLm>,
    optim: ModuleOptimizer,
    config: LearnerConfig,
    step: usize,
    loss_scaler: Option<LossScaler>,
}

impl std::fmt::Debug for Learner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Learner")
            .field("config", &self.config)
            .field("step", &self.step)
            .field("loss_scaler", &self.loss_scaler)
            .finish_non_exhaustive()
    }
}

impl Learner {
    /// A learner for `model`, which must live on an autodiff device with only the adapter
    /// parameters requiring gradients (see `disha_core::freeze_all_but_active_adapters`). A
    /// model computing in f16 gets a [`LossScaler`] at its initial scale.
    ///
    /// # Errors
    /// An invalid config.
    pub fn new(model: CausalLm, config: LearnerConfig) -> Result<Self, TrainError> {
        config.validate()?;
        let optim =
            FusedAdamW::new(config.beta1, config.beta2, config.eps, config.weight_decay).init();
        let loss_scaler = (model.compute_dtype() == DType::F16).then(LossScaler::default);
        Ok(Self {
            model: Some(model),
            optim,
            config,
            step: 0,
            loss_scaler,
        })
    }

    /// The dynamic loss scale (f16 compute), `None` for a run that needs none.
    pub fn loss_scaler(&self) -> Option<LossScaler> {
        self.loss_scaler
    }

    /// Replaces the loss scale (a resumed run's, or a test's starting point).
    ///
    /// # Errors
    /// A learner whose model does not compute in f16 (it has no loss scale to replace), or a
    /// scaler that [`LossScaler::validate`] rejects.
    pub fn set_loss_scaler(&mut self, scaler: LossScaler) -> Result<(), TrainError> {
        scaler
            .validate()
            .map_err(|message| TrainError::config("loss scale", scaler.scale(), message))?;
        match &mut self.loss_scaler {
            Some(current) => {
                *current = scaler;
                Ok(())
            }
            None => Err(TrainError::config(
                "loss scale",
                scaler.scale(),
                "only a run computing in f16 scales its loss",
            )),
        }
    }

    /// Continues a run: `model` with the checkpoint's adapter, the optimizer state file saved
    /// from [`Self::optimizer_state`], the step count, and the trainable-parameter ids of the
    /// saved run ([`trainable_param_ids`]), which the optimizer state is keyed by.
    ///
    /// The optimizer file is bounded by the size this adapter's state can have and checked
    /// before Burn sees it: one AdamW state per trainable tensor, each moment f32 with the
    /// parameter's shape, the rank recorded, and the AdamW step count equal to `step`.
    ///
    /// # Errors
    /// An invalid config; a model whose trainable parameters do not match the saved ones in
    /// number; an optimizer state that is too large, unreadable or does not belong to this
    /// adapter and step ([`TrainError::File`] naming the file and the first disagreement).
    pub fn resume(
        model: CausalLm,
        config: LearnerConfig,
        step: usize,
        param_ids: &[u64],
        optimizer_state: &Path,
    ) -> Result<Self, TrainError> {
        let shapes = trainable_param_shapes(&model);
        if shapes.len() != param_ids.len() {
            return Err(TrainError::config(
                "resume",
                format!("{} trainable tensors", shapes.len()),
                format!("the checkpoint was saved with {}", param_ids.len()),
            ));
        }
        let bad = |message: String| TrainError::File {
            path: optimizer_state.to_path_buf(),
            message,
        };
        // Two f32 moments per element, plus per-tensor names, alignment and a small header.
        let elements: u64 = shapes
            .iter()
            .map(|s| s.iter().product::<usize>() as u64)
            .sum();
        let bound = 8 * elements + 1024 * shapes.len() as u64 + (1 << 20);
        let size = std::fs::metadata(optimizer_state)
            .map_err(|e| TrainError::io(optimizer_state, e))?
            .len();
        if size > bound {
            return Err(bad(format!(
                "{size} bytes, more than the {bound} bytes the optimizer state of this adapter \
                 can take"
            )));
        }
        let mut bytes = Vec::with_capacity(size as usize);
        std::fs::File::open(optimizer_state)
            .and_then(|f| std::io::Read::take(f, bound).read_to_end(&mut bytes))
            .map_err(|e| TrainError::io(optimizer_state, e))?;
        let expected: BTreeMap<u64, &[usize]> = param_ids
            .iter()
            .copied()
            .zip(shapes.iter().map(Vec::as_slice))
            .collect();
        check_optimizer_state(&bytes, &expected, step).map_err(bad)?;
        let model = model.map(&mut AssignIds {
            ids: param_ids,
            next: 0,
        });
        let record = OptimizerRecord::from_bytes(Bytes::from_bytes_vec(bytes))
            .map_err(|e| bad(format!("unreadable optimizer state: {e:?}")))?;
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
    pub fn model(&self) -> &CausalLm {
        self.model.as_ref().expect("the model is always put back")
    }

    /// Ends training, returning the model.
    pub fn into_model(self) -> CausalLm {
        self.model.expect("the model is always put back")
    }

    /// Runs one optimizer step over `grad_accum` micro-batches from `data`.
    ///
    /// In f16 compute the loss is scaled before backward and the gradients unscaled before
    /// clipping; a backward that overflows halves the scale and runs the step's micro-batches
    /// again ([`LossScaler`]).
    ///
    /// # Errors
    /// A batch with an id or label outside the model's vocabulary; [`TrainError::NonFinite`]
    /// when the loss or the gradient norm is NaN / Inf (in f16 compute: still at the smallest
    /// loss scale). The model and optimizer are left as they were before the step.
    pub fn train_step(&mut self, data: &mut DataLoader) -> Result<StepMetrics, TrainError> {
        let start = Instant::now();
        let batches: Vec<HostBatch> = (0..self.config.grad_accum)
            .map(|_| data.next_batch())
            .collect();
        // Normalize by every target of the effective batch, so accumulation gives exactly the
        // gradient of the mean loss over all its tokens (not a mean of micro-batch means).
        let targets: usize = batches.iter().map(|b| b.targets).sum::<usize>().max(1);
        let tokens: usize = batches.iter().map(|b| b.tokens).sum();
        for batch in &batches {
            check_batch(self.model(), batch)?;
        }
        let model = self.model.take().expect("the model is always put back");
        let device = model.device();
        let step = self.step + 1;
        let (mut grads, loss_sum, grad_norm, scale) = loop {
            let scale = self.loss_scaler.map_or(1.0, |s| s.scale());
            let (grads, loss_sum) = self.accumulate(&model, &batches, targets, scale);
            // The norm of the unscaled gradients (the scale is a power of two: exact).
            let grad_norm = global_grad_norm(&model, &grads) / scale;
            if !loss_sum.is_finite() {
                self.model = Some(model);
                return Err(TrainError::NonFinite {
                    step,
                    what: "loss",
                    value: loss_sum,
                });
            }
            if grad_norm.is_finite() {
                break (grads, loss_sum, grad_norm, scale);
            }
            // An overflow in the scaled backward: halve the scale and run the batches again.
            if !self.loss_scaler.as_mut().is_some_and(LossScaler::backoff) {
                self.model = Some(model);
                return Err(TrainError::NonFinite {
                    step,
                    what: "gradient norm",
                    value: grad_norm,
                });
            }
            tracing::debug!(
                step,
                scale = scale / 2.0,
                "f16 gradients overflowed; loss scale halved"
            );
        };
        if let Some(scaler) = &mut self.loss_scaler {
            model.visit(&mut ScaleGrads {
                grads: &mut grads,
                scale: 1.0 / scale,
            });
            scaler.record_finite_step();
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
            device_memory_mb: device
                .memory_pool_usage()
                .map(|usage| usage.bytes_reserved as f64 / (1024.0 * 1024.0)),
            loss_scale: self.loss_scaler.is_some().then_some(scale),
        })
    }

    /// Forward and backward over `batches` with the loss (normalized by `targets`) scaled by
    /// `scale`; returns the accumulated gradients and the unscaled loss.
    fn accumulate(
        &self,
        model: &CausalLm,
        batches: &[HostBatch],
        targets: usize,
        scale: f64,
    ) -> (GradientsParams, f64) {
        let device = model.device();
        let mut accumulator = GradientsAccumulator::<CausalLm>::new();
        let mut loss_sum = 0.0;
        for batch in batches {
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
            let loss = if scale == 1.0 {
                loss
            } else {
                loss.mul_scalar(scale)
            };
            let grads = GradientsParams::from_grads(loss.backward(), model);
            accumulator.accumulate(model, grads);
        }
        (accumulator.grads(), loss_sum)
    }
}
