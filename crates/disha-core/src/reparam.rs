//! [`DishaReparameterizer`]: Bone / BAT / mini / LoRA on *any* Burn model, with no code change,
//! through Burn's parameter reparameterization (the mechanism behind `Module::apply_lora`).
//!
//! # Cost: weight space
//! A reparameterization only sees the weight, never the activations, so every forward
//! materializes `W' = W + ΔW` (`in x out`), autodiff keeps the layer input for the `x·W'` matmul,
//! and backward computes the dense `∂W' = Xᵀ·δY` (`2·M·in·out` FLOPs) before reducing it into the
//! adapter — full-fine-tuning-sized work per step (method.md §9). Use it for models you cannot
//! change, for exact merging / export (`model.valid().materialize()`), and as a reference.
//! For training speed use [`AdaptedLinear`](crate::AdaptedLinear), whose Bone forward costs
//! `O(M·(in + r·out))` and keeps only the `[M, r]` shard sum.
//!
//! Weights are assumed to be in `burn::nn::Linear`'s `[in, out]` layout.

use burn::module::{
    Module, ModuleVisitor, Param, ParamGroup, ParamId, Reparameterization, Reparameterizer,
};
use burn::tensor::{DType, Tensor};

use crate::adapter::Adapter;
use crate::error::Result;
use crate::spec::AdapterSpec;

/// The adapter state attached to one reparameterized weight.
#[derive(Module, Debug)]
pub struct DishaReparam {
    /// The adapter; its tensors are ordinary trainable parameters of the model.
    pub adapter: Adapter,
}

impl Reparameterization for DishaReparam {
    const NAME: &'static str = "disha";

    /// `W'` for a rank-2 `[in, out]` base, computed in f32 and returned in the base's dtype.
    fn apply<const D: usize>(&self, base: Tensor<D>) -> Tensor<D> {
        let dims = base.dims();
        assert!(D == 2, "DishaReparam is attached to rank-2 weights only");
        let dtype = base.dtype();
        let weight: Tensor<2> = base.cast(DType::F32).reshape([dims[0], dims[1]]);
        self.adapter.merge_into(weight).cast(dtype).reshape(dims)
    }
}

/// Attaches one adapter per selected rank-2 weight (Burn `Linear` layout `[in, out]`) and freezes
/// every other float parameter, like Burn's [`Lora`](burn::module::Lora).
///
/// ```
/// use burn::module::{Module, ParamGroup};
/// use burn::nn::LinearConfig;
/// use disha_core::{AdapterSpec, DishaReparameterizer};
///
/// let device = Default::default();
/// let layer = LinearConfig::new(16, 8).init(&device);
/// let adapted = DishaReparameterizer::new(AdapterSpec::bone(4))
///     .with_param_group(ParamGroup::from_regex(r"^weight$").unwrap())
///     .apply_to(&layer)
///     .expect("16 >= r");
/// assert_eq!(adapted.num_params(), layer.num_params() + 4 * 8);
/// ```
#[derive(Debug, Clone)]
pub struct DishaReparameterizer {
    spec: AdapterSpec,
    group: ParamGroup,
}

impl DishaReparameterizer {
    /// Adapts every rank-2 parameter with `spec` (narrow it with [`with_param_group`](Self::with_param_group)).
    pub fn new(spec: AdapterSpec) -> Self {
        Self {
            spec,
            group: ParamGroup::all(),
        }
    }

    /// Restricts adaptation to the parameters of `group` (matched on parameter paths such as
    /// `layers.0.attention.wq.weight`; anchor regexes with `^…$`).
    pub fn with_param_group(mut self, group: ParamGroup) -> Self {
        self.group = group;
        self
    }

    /// The selected `(path, [in, out])` weights of `model`.
    pub fn targets<M: Module>(&self, model: &M) -> Vec<(String, [usize; 2])> {
        let mut collector = WeightCollector::default();
        model.visit(&mut collector);
        collector
            .found
            .into_iter()
            .filter(|(path, id, _)| self.group.matches(id, Some(path)))
            .map(|(path, _, dims)| (path, dims))
            .collect()
    }

    /// Checks every selected weight against the spec, then returns an adapted copy of `model`
    /// (the argument is left as it was; Burn tensors are shared, so the copy is cheap).
    ///
    /// # Errors
    /// The first selected weight the spec cannot apply to, named by its parameter path.
    pub fn apply_to<M: Module>(self, model: &M) -> Result<M> {
        for (path, [d_input, d_output]) in self.targets(model) {
            self.spec.validate(&path, d_input, d_output)?;
        }
        Ok(model.clone().apply_reparameterization(self))
    }
}

impl Reparameterizer for DishaReparameterizer {
    type Reparam = DishaReparam;

    /// Selected rank-2 weights that the spec cannot apply to are left unadapted with an error
    /// logged; [`DishaReparameterizer::apply_to`] rejects them up front instead.
    fn reparameterize<const D: usize>(
        &mut self,
        path: &str,
        param: Param<Tensor<D>>,
    ) -> (Param<Tensor<D>>, Option<Self::Reparam>) {
        let id = param.id;
        let shape = param.lazy_shape();
        let device = param.lazy_device();
        let base = param.set_require_grad(false);
        if D != 2 || !self.group.matches(&id, Some(path)) {
            return (base, None);
        }
        match self.spec.init(path, shape[0], shape[1], &device) {
            Ok(adapter) => (base, Some(DishaReparam { adapter })),
            Err(error) => {
                tracing::error!(%error, "weight left without adapter");
                (base, None)
            }
        }
    }
}

/// Collects `(path, id, dims)` of every rank-2 float parameter.
#[derive(Default)]
struct WeightCollector {
    path: Vec<String>,
    found: Vec<(String, ParamId, [usize; 2])>,
}

impl ModuleVisitor for WeightCollector {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if D == 2 {
            let shape = param.lazy_shape();
            self.found
                .push((self.path.join("."), param.id, [shape[0], shape[1]]));
        }
    }
}
