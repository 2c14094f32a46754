//! [`AdaptedLinear`]: a drop-in replacement for `burn::nn::Linear` that carries named adapters.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::tensor::{DType, Device, Tensor};

use crate::adapter::{Adapter, AdapterSet};
use crate::bat::block_affine_linear;
use crate::error::{DishaError, Result};
use crate::fused::{frozen_matmul, takes_frozen_matmul};
use crate::kernels::{KernelPolicy, kernel_policy};
use crate::quantized::{QuantFormat, QuantizedMatrix};
use crate::spec::AdapterSpec;

/// Configuration to create an [`AdaptedLinear`] with a freshly initialized base, mirroring
/// [`LinearConfig`]. Most users build one from an existing layer with
/// [`AdaptedLinear::from_linear`] instead.
#[derive(Config, Debug)]
pub struct AdaptedLinearConfig {
    /// Input features.
    pub d_input: usize,
    /// Output features.
    pub d_output: usize,
    /// Whether the base layer has a bias.
    #[config(default = true)]
    pub bias: bool,
    /// Initializer of the (frozen) base weight and bias.
    /// Defaults to `LinearConfig`'s: kaiming-uniform with gain `1/√3`, i.e. `U(−1/√in, 1/√in)`.
    #[config(
        default = "Initializer::KaimingUniform{gain:0.577_350_269_189_625_8, fan_out_only:false}"
    )]
    pub initializer: Initializer,
}

impl AdaptedLinearConfig {
    /// Creates the layer on `device`; the base weight and bias are frozen and it has no adapter.
    pub fn init(&self, device: &Device) -> AdaptedLinear {
        let linear = LinearConfig::new(self.d_input, self.d_output)
            .with_bias(self.bias)
            .with_initializer(self.initializer.clone())
            .init(device);
        AdaptedLinear::from_linear(linear)
    }
}

/// Adapter bookkeeping of one layer; not part of records (a PEFT directory persists adapters).
#[derive(Clone, Debug, Default)]
struct AdapterState {
    /// Name used in error messages and logs (the module path when a model sets it).
    label: String,
    /// The spec each adapter was created from, in insertion order.
    specs: Vec<(String, AdapterSpec)>,
    /// Names of the active adapters, in the order they were activated.
    active: Vec<String>,
    /// Names of the merged adapters, in merge order (unmerge pops from the end).
    merged: Vec<String>,
    /// `true` while adapters are disabled (PEFT `disable_adapter`).
    disabled: bool,
}

/// A linear layer `y = x·W + b` (Burn `[in, out]` layout) with a frozen base and any number of
/// named adapters (Bone, BAT, mini, LoRA).
///
/// It is a drop-in for [`burn::nn::Linear`]: the same `forward` on `[..., in]` inputs, constructible
/// from one with [`from_linear`](Self::from_linear). The base weight and bias never receive
/// gradients or optimizer state; adapter tensors do.
///
/// # Forward
/// With the layer enabled, the active adapters that are not merged apply in a fixed, canonical
/// order: BAT adapters first, in activation order, each transforming the running weight (a
/// sequential, order-dependent composition, as in PEFT); then Bone / mini / LoRA, each adding its
/// activation-space term (these commute). [`merge`](Self::merge) folds adapters into the stored
/// weight in that same order, so merged and unmerged forwards compute the same function.
///
/// | method | forward | extra cost |
/// |---|---|---|
/// | Bone | `x·W + S(x̃)·B` | `M·in + 2·M·r·out` FLOPs, keeps `S` (`[M, r]`) |
/// | mini | `x·W + tile(S(x̃)·B_m)` | `M·(in + out) + 2·M·r·mini_r` |
/// | LoRA | `x·W + s·(x Aᵀ) Bᵀ` | `2·M·r·(in + out)` |
/// | BAT | `x·T_D(W)` via [`block_affine_linear`] | materializes `W'` (the kernel seam) |
///
/// # State transitions
/// Every transition is checked: merging an adapter twice, unmerging an unmerged layer, changing the
/// active set or deleting an adapter while merged are errors; disabling a merged layer unmerges it
/// first (and fails, leaving the layer merged, if a BAT block is singular).
///
/// # Quantized base
/// A layer built with [`from_quantized`](Self::from_quantized) or turned by
/// [`quantize_base`](Self::quantize_base) keeps its frozen weight block-quantized
/// ([`QuantizedMatrix`], ggml Q8_0 / Q4_0 / Q4_1) in `quantized`, and `weight` is then an empty
/// `[0, 0]` tensor. Products dequantize one block at a time ([`QuantizedMatrix::matmul_transposed`]);
/// adapters train on top exactly as on a dense base (QLoRA's scheme). Merging into a quantized
/// base is refused (it would requantize `W'`); [`merged_weight`](Self::merged_weight) gives the
/// dense merged weight.
///
/// # Shapes
/// - input: `[..., d_input]`
/// - output: `[..., d_output]`
#[derive(Module, Debug)]
pub struct AdaptedLinear {
    /// Frozen base weight `[d_input, d_output]`; holds `W'` while adapters are merged. Empty
    /// (`[0, 0]`) when the base is quantized.
    pub weight: Param<Tensor<2>>,
    /// Frozen base bias `[d_output]`.
    pub bias: Option<Param<Tensor<1>>>,
    /// The block-quantized frozen weight `[d_output, d_input]` (checkpoint layout), when the
    /// base is quantized.
    pub quantized: Option<QuantizedMatrix>,
    /// The named adapters.
    pub adapters: AdapterSet,
    #[module(skip)]
    state: AdapterState,
}

impl From<Linear> for AdaptedLinear {
    fn from(linear: Linear) -> Self {
        Self::from_linear(linear)
    }
}

impl AdaptedLinear {
    /// Wraps an existing layer, freezing its weight and bias. The layer has no adapter yet and
    /// computes exactly what `linear` computed.
    pub fn from_linear(linear: Linear) -> Self {
        let [d_input, d_output] = linear.weight.dims();
        Self {
            weight: linear.weight.set_require_grad(false),
            bias: linear.bias.map(|b| b.set_require_grad(false)),
            quantized: None,
            adapters: AdapterSet::default(),
            state: AdapterState {
                label: format!("linear[{d_input}->{d_output}]"),
                ..Default::default()
            },
        }
    }

    /// Builds a layer from a base weight `[d_input, d_output]` (Burn layout) and optional bias.
    pub fn from_weights(weight: Tensor<2>, bias: Option<Tensor<1>>) -> Self {
        Self::from_linear(Linear {
            weight: Param::from_tensor(weight),
            bias: bias.map(Param::from_tensor),
        })
    }

    /// Builds a layer whose frozen weight is the block-quantized `weight` `[d_output, d_input]`
    /// (checkpoint layout), with an optional bias `[d_output]`.
    pub fn from_quantized(weight: QuantizedMatrix, bias: Option<Tensor<1>>) -> Self {
        let [d_output, d_input] = weight.dims();
        let device = weight.device();
        let mut layer = Self::from_weights(Tensor::zeros([0, 0], &device), bias);
        layer.quantized = Some(weight);
        layer.state.label = format!("linear[{d_input}->{d_output}]");
        layer
    }

    /// Quantizes the frozen base weight in place (ggml's reference quantizer of `format`), so
    /// that it takes 8.5 (Q8) or 4.5 (Q4) bits per weight instead of 16 or 32; see the type's
    /// docs. A no-op for an already quantized base of the same format.
    ///
    /// # Errors
    /// Merged adapters (quantize the unmerged base), a base already quantized in another
    /// format, or a non-finite weight.
    pub fn quantize_base(&mut self, format: QuantFormat) -> Result<()> {
        if let Some(q) = &self.quantized {
            if q.layout().format == format {
                return Ok(());
            }
            return Err(self.invalid_state(format!(
                "the base is already quantized as {}; requantizing to {format} would compound \
                 the rounding",
                q.layout().format
            )));
        }
        if self.is_merged() {
            return Err(
                self.invalid_state("adapters are merged; unmerge before quantizing the base")
            );
        }
        let weight = self.weight.val();
        let device = weight.device();
        let [d_input, d_output] = weight.dims();
        let values = weight
            .cast(DType::F32)
            .transpose()
            .into_data()
            .try_into_vec::<f32>()
            .expect("an f32 tensor after to_f32");
        let quantized = QuantizedMatrix::quantize(
            &values,
            [d_output, d_input],
            format,
            &self.state.label,
            &device,
        )?;
        self.quantized = Some(quantized);
        replace_param_value(&mut self.weight, Tensor::zeros([0, 0], &device));
        Ok(())
    }

    /// The base weight `[d_input, d_output]` as a dense tensor: the stored weight, or the
    /// quantized one dequantized to f32 (a full-size copy).
    pub fn dense_base_weight(&self) -> Tensor<2> {
        match &self.quantized {
            Some(q) => q.dequantize().transpose(),
            None => self.weight.val(),
        }
    }

    fn base_device(&self) -> Device {
        match &self.quantized {
            Some(q) => q.device(),
            None => self.weight.device(),
        }
    }

    /// Sets the name used in errors and logs (models set the module path).
    pub fn with_label(mut self, label: impl Into<String>) -> Self {
        self.state.label = label.into();
        self
    }

    /// The name used in errors and logs.
    pub fn label(&self) -> &str {
        &self.state.label
    }

    /// Input features.
    pub fn d_input(&self) -> usize {
        match &self.quantized {
            Some(q) => q.dims()[1],
            None => self.weight.dims()[0],
        }
    }

    /// Output features.
    pub fn d_output(&self) -> usize {
        match &self.quantized {
            Some(q) => q.dims()[0],
            None => self.weight.dims()[1],
        }
    }

    /// Names of every adapter, in insertion order.
    pub fn adapter_names(&self) -> Vec<String> {
        self.adapters.names()
    }

    /// The adapter called `name`.
    pub fn adapter(&self, name: &str) -> Option<&Adapter> {
        self.adapters.get(name)
    }

    /// The spec the adapter called `name` was created from.
    pub fn adapter_spec(&self, name: &str) -> Option<&AdapterSpec> {
        self.state
            .specs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s)
    }

    /// Names of the active adapters.
    pub fn active_adapters(&self) -> &[String] {
        &self.state.active
    }

    /// Names of the merged adapters, in merge order.
    pub fn merged_adapters(&self) -> &[String] {
        &self.state.merged
    }

    /// `true` while any adapter is merged into the weight.
    pub fn is_merged(&self) -> bool {
        !self.state.merged.is_empty()
    }

    /// `true` when enabled, active adapters are waiting to be merged (what [`merge`](Self::merge)
    /// would fold in).
    pub fn has_pending_adapters(&self) -> bool {
        !self.pending().is_empty()
    }

    /// `true` unless adapters are disabled.
    pub fn adapters_enabled(&self) -> bool {
        !self.state.disabled
    }

    /// Number of trainable parameters of the active adapters.
    pub fn num_active_adapter_params(&self) -> usize {
        self.state
            .active
            .iter()
            .filter_map(|n| self.adapters.get(n))
            .map(Module::num_params)
            .sum()
    }

    fn not_found(&self, name: &str) -> DishaError {
        DishaError::AdapterNotFound {
            layer: self.state.label.clone(),
            adapter: name.to_string(),
            available: self.adapters.names(),
        }
    }

    fn invalid_state(&self, message: impl Into<String>) -> DishaError {
        DishaError::InvalidState {
            layer: self.state.label.clone(),
            message: message.into(),
        }
    }

    /// Creates an adapter from `spec` on the weight's device and attaches it as `name`.
    ///
    /// The first adapter of a layer becomes active; later ones stay inactive until
    /// [`set_active_adapters`](Self::set_active_adapters) (PEFT's behaviour).
    ///
    /// # Errors
    /// A duplicate name, or any validation error of [`AdapterSpec::validate`], naming this layer.
    pub fn add_adapter(&mut self, name: impl Into<String>, spec: &AdapterSpec) -> Result<()> {
        let name = name.into();
        let adapter = spec.init(
            &self.state.label,
            self.d_input(),
            self.d_output(),
            &self.base_device(),
        )?;
        self.insert_adapter(name, spec.clone(), adapter)
    }

    /// Attaches an already-built adapter (e.g. one whose tensors were loaded from a file).
    ///
    /// # Errors
    /// A duplicate name, a spec that does not fit this layer, or an adapter whose tensor shapes
    /// do not match `spec`.
    pub fn insert_adapter(
        &mut self,
        name: impl Into<String>,
        spec: AdapterSpec,
        adapter: Adapter,
    ) -> Result<()> {
        let name = name.into();
        if self.adapters.get(&name).is_some() {
            return Err(DishaError::AdapterExists {
                layer: self.state.label.clone(),
                adapter: name,
            });
        }
        spec.validate(&self.state.label, self.d_input(), self.d_output())?;
        let expected = spec.tensor_shapes(self.d_input(), self.d_output());
        let actual: Vec<Vec<usize>> = adapter
            .peft_tensors()
            .into_iter()
            .map(|(_, t)| {
                let [a, b, c] = t.dims();
                if expected.first().is_some_and(|s| s.len() == 3) {
                    vec![a, b, c]
                } else {
                    vec![b, c]
                }
            })
            .collect();
        let scale_differs = match &adapter {
            Adapter::Lora(lora) => (lora.scale - spec.scale()).abs() > 1e-12 * spec.scale().abs(),
            _ => false,
        };
        if actual != expected || adapter_kind_differs(&spec, &adapter) || scale_differs {
            return Err(self.invalid_state(format!(
                "adapter `{name}` ({actual:?}) does not match its {} spec (r = {}, tensors \
                 {expected:?}, scale {})",
                spec.method_name(),
                spec.r,
                spec.scale()
            )));
        }
        if self.state.active.is_empty() && self.state.merged.is_empty() {
            self.state.active.push(name.clone());
        }
        self.state.specs.push((name.clone(), spec));
        self.adapters.insert(name, adapter);
        Ok(())
    }

    /// Makes exactly `names` active, in this order (the order BAT adapters compose in).
    ///
    /// # Errors
    /// An unknown name, or a merged layer (unmerge first: the merged weights belong to the
    /// current active set).
    pub fn set_active_adapters(&mut self, names: &[&str]) -> Result<()> {
        if let Some(missing) = names.iter().find(|n| self.adapters.get(n).is_none()) {
            return Err(self.not_found(missing));
        }
        if self.is_merged() {
            return Err(self.invalid_state(format!(
                "cannot change the active adapters while {:?} are merged; unmerge first",
                self.state.merged
            )));
        }
        let mut active: Vec<String> = Vec::with_capacity(names.len());
        for name in names {
            if !active.iter().any(|a| a == name) {
                active.push((*name).to_string());
            }
        }
        self.state.active = active;
        Ok(())
    }

    /// Re-enables the adapters after [`disable_adapters`](Self::disable_adapters).
    pub fn enable_adapters(&mut self) {
        self.state.disabled = false;
    }

    /// Disables every adapter: the layer computes its base function. A merged layer is
    /// unmerged first (method.md §4.5).
    ///
    /// # Errors
    /// The unmerge errors of [`unmerge`](Self::unmerge); the layer then stays merged and enabled.
    pub fn disable_adapters(&mut self) -> Result<()> {
        if self.is_merged() {
            self.unmerge()?;
        }
        self.state.disabled = true;
        Ok(())
    }

    /// Removes the adapter `name` and returns it.
    ///
    /// # Errors
    /// An unknown name, or a merged adapter (unmerge first).
    pub fn delete_adapter(&mut self, name: &str) -> Result<Adapter> {
        if self.adapters.get(name).is_none() {
            return Err(self.not_found(name));
        }
        if self.state.merged.iter().any(|m| m == name) {
            return Err(self.invalid_state(format!(
                "adapter `{name}` is merged; unmerge before deleting it"
            )));
        }
        self.state.active.retain(|a| a != name);
        self.state.specs.retain(|(n, _)| n != name);
        Ok(self.adapters.remove(name).expect("checked above"))
    }

    /// The active, enabled, not-yet-merged adapters in canonical order: BAT first (activation
    /// order), then the additive ones.
    fn pending(&self) -> Vec<(&str, &Adapter)> {
        if self.state.disabled {
            return Vec::new();
        }
        let unmerged: Vec<(&str, &Adapter)> = self
            .state
            .active
            .iter()
            .filter(|n| !self.state.merged.contains(n))
            .filter_map(|n| self.adapters.get(n).map(|a| (n.as_str(), a)))
            .collect();
        let (mut order, additive): (Vec<_>, Vec<_>) =
            unmerged.into_iter().partition(|(_, a)| a.is_weight_space());
        order.extend(additive);
        order
    }

    /// Applies the layer.
    ///
    /// # Shapes
    /// - input: `[..., d_input]`
    /// - output: `[..., d_output]`, in the input's dtype (adapter terms are computed in f32).
    pub fn forward<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        let in_dtype = input.dtype();
        let bias = self.bias.as_ref().map(|b| b.val());
        let pending = self.pending();
        let split = pending
            .iter()
            .position(|(_, a)| !a.is_weight_space())
            .unwrap_or(pending.len());
        let (bat, additive) = pending.split_at(split);
        let frozen = !self.weight.is_require_grad();
        let weight = match (&self.quantized, bat.is_empty()) {
            // BAT forms `W'` from a dense `W`: dequantized for this forward.
            (Some(q), false) => q.dequantize().transpose(),
            _ => self.weight.val(),
        };
        // A base stored in another dtype than the input's (a bf16 base under f32 compute), or
        // quantized.
        let mixed = weight.dtype() != in_dtype || self.quantized.is_some();
        let d_output = self.d_output();
        // Under the single-pass policy, with no BAT adapter, one Bone adapter folds into the base
        // product. Otherwise Bone stays in plain ops: the op would compute the same products and
        // keep the same `S(x̃)`, and plain ops fuse better with their neighbours (kernels docs).
        // The fold computes the base product in f32 (the adapter's precision), so half compute
        // keeps plain ops: its base product is a half GEMM, as in PEFT.
        let single_pass = frozen
            && !mixed
            && in_dtype == DType::F32
            && kernel_policy() == KernelPolicy::SinglePass;
        let fused_bone = match bat.is_empty() && single_pass {
            true => additive.iter().position(|(_, a)| match a {
                Adapter::Bone(bone) => bone.is_fusable(d_output),
                _ => false,
            }),
            false => None,
        };
        let mut y = match (bat.split_last(), fused_bone) {
            (None, None) => match &self.quantized {
                Some(q) => {
                    let y = q.matmul_transposed(input.clone());
                    match bias {
                        Some(b) => y + b.cast(in_dtype).unsqueeze(),
                        None => y,
                    }
                }
                None => base_linear(input.clone(), weight, bias, frozen),
            },
            (None, Some(k)) => match additive[k].1 {
                Adapter::Bone(bone) => bone.fused_linear(input.clone(), weight, bias),
                _ => unreachable!("fused_bone indexes a Bone adapter"),
            },
            (Some(((_, Adapter::Bat(last)), before)), _) => {
                // BAT forms `W'` from `W` in the compute dtype (a converted copy for this layer,
                // which its backward keeps; Memory chapter of the docs).
                let weight = before
                    .iter()
                    .fold(weight.cast(in_dtype), |w, (_, adapter)| {
                        adapter.merge_into(w)
                    });
                block_affine_linear(
                    input.clone(),
                    weight,
                    bias,
                    last,
                    before.is_empty() && frozen,
                )
            }
            (Some(_), _) => unreachable!("pending() puts only BAT adapters first"),
        };
        if additive.len() > usize::from(fused_bone.is_some()) {
            y = y.cast(DType::F32);
            for (k, (_, adapter)) in additive.iter().enumerate() {
                if Some(k) == fused_bone {
                    continue;
                }
                y = match adapter {
                    Adapter::Bone(a) | Adapter::Mini(a) => a.add_to_output(input.clone(), y),
                    Adapter::Lora(a) => a.add_to_output(input.clone(), y),
                    Adapter::Bat(_) => unreachable!("pending() puts BAT adapters first"),
                };
            }
        }
        y.cast(in_dtype)
    }

    /// The weight the layer would have with every pending adapter merged (Burn layout, base
    /// dtype), without changing the layer. Use it to export a merged model while keeping the
    /// adapters.
    pub fn merged_weight(&self) -> Tensor<2> {
        let names: Vec<String> = self
            .pending()
            .into_iter()
            .map(|(n, _)| n.to_string())
            .collect();
        self.fold_adapters(&names)
    }

    /// `W` with the named adapters merged in order, computed in f32, detached, in base dtype.
    fn fold_adapters(&self, names: &[String]) -> Tensor<2> {
        let base = self.dense_base_weight();
        let dtype = base.dtype();
        let merged = names
            .iter()
            .filter_map(|n| self.adapters.get(n))
            .fold(base.cast(DType::F32), |w, adapter| adapter.merge_into(w))
            .detach();
        merged.cast(dtype)
    }

    fn store_weight(&mut self, weight: Tensor<2>) {
        replace_param_value(&mut self.weight, weight);
    }

    /// Merges every active adapter that is not merged yet into the weight (PEFT `merge_adapter`),
    /// in canonical order. The result is checked for NaN / Inf before it is stored.
    ///
    /// # Errors
    /// Nothing to merge (no active adapter, or all already merged), adapters disabled, or
    /// non-finite merged weights; the layer is unchanged on error.
    pub fn merge(&mut self) -> Result<()> {
        let names: Vec<String> = self
            .pending()
            .into_iter()
            .map(|(n, _)| n.to_string())
            .collect();
        if self.state.disabled {
            return Err(self.invalid_state("adapters are disabled; enable them before merging"));
        }
        if let Some(q) = &self.quantized {
            return Err(self.invalid_state(format!(
                "the base is quantized ({}); merging would requantize the merged weight and \
                 lose the adapter's precision: merge into the unquantized checkpoint \
                 (`disha merge`) or take `merged_weight()`",
                q.layout().format
            )));
        }
        if names.is_empty() {
            return Err(self.invalid_state(if self.is_merged() {
                format!(
                    "already merged ({:?}); nothing left to merge",
                    self.state.merged
                )
            } else {
                "no active adapter to merge".to_string()
            }));
        }
        let merged = self.fold_adapters(&names);
        if !all_finite(&merged) {
            return Err(DishaError::NonFiniteMerge {
                layer: self.state.label.clone(),
                adapter: names.join(", "),
            });
        }
        self.store_weight(merged);
        self.state.merged.extend(names);
        Ok(())
    }

    /// Unmerges every merged adapter, last merged first (PEFT `unmerge_adapter`).
    ///
    /// Bone / mini / LoRA subtract their delta; BAT inverts its map with
    /// `W = (W' − D)(I + D)⁻¹` (batched inverse in f64 on the host).
    ///
    /// # Errors
    /// Nothing merged, or a singular `I + D` block; the layer is unchanged on error.
    pub fn unmerge(&mut self) -> Result<()> {
        if !self.is_merged() {
            return Err(self.invalid_state("not merged; nothing to unmerge"));
        }
        let base = self.weight.val();
        let dtype = base.dtype();
        let mut weight = base.cast(DType::F32);
        for name in self.state.merged.iter().rev() {
            let adapter = self.adapters.get(name).expect("merged adapters exist");
            weight = match adapter {
                Adapter::Bone(a) | Adapter::Mini(a) => a.apply_delta(weight, -1.0),
                Adapter::Lora(a) => a.apply_delta(weight, -1.0),
                Adapter::Bat(a) => {
                    a.inverse_transform_weight(weight)
                        .map_err(|e| DishaError::SingularBlock {
                            layer: self.state.label.clone(),
                            adapter: name.clone(),
                            block: e.index,
                            pivot: e.pivot,
                        })?
                }
            };
        }
        self.store_weight(weight.detach().cast(dtype));
        self.state.merged.clear();
        Ok(())
    }

    /// Merges the pending adapters and returns a plain [`Linear`] (PEFT `merge_and_unload`).
    /// The adapters are dropped; use [`merged_weight`](Self::merged_weight) to keep them.
    ///
    /// # Errors
    /// Non-finite merged weights.
    pub fn merge_and_unload(self) -> Result<Linear> {
        let weight = self.merged_weight();
        if !all_finite(&weight) {
            return Err(DishaError::NonFiniteMerge {
                layer: self.state.label.clone(),
                adapter: self.state.active.join(", "),
            });
        }
        let mut base = self.weight;
        replace_param_value(&mut base, weight);
        Ok(Linear {
            weight: base,
            bias: self.bias,
        })
    }

    /// The dense `ΔW_B` (`[in, out]`, f32) the adapter `name` adds to the current weight.
    ///
    /// For BAT, which is weight-dependent, the delta is `T_D(W) − W` on the current stored weight.
    ///
    /// # Errors
    /// An unknown name.
    pub fn delta_weight(&self, name: &str) -> Result<Tensor<2>> {
        let adapter = self
            .adapters
            .get(name)
            .ok_or_else(|| self.not_found(name))?;
        let weight = self.dense_base_weight().cast(DType::F32);
        Ok(adapter.merge_into(weight.clone()).sub(weight).detach())
    }

    /// Replaces the tensors of adapter `name` (PEFT orientation), keeping parameter ids and
    /// gradient settings. Used when loading trained adapters.
    ///
    /// # Errors
    /// An unknown name, a merged adapter, or a shape that differs from the current tensors.
    pub fn load_adapter_tensors(&mut self, name: &str, tensors: Vec<Tensor<3>>) -> Result<()> {
        if self.state.merged.iter().any(|m| m == name) {
            return Err(self.invalid_state(format!(
                "adapter `{name}` is merged; unmerge before replacing its tensors"
            )));
        }
        let label = self.state.label.clone();
        let adapter = self
            .adapters
            .get(name)
            .ok_or_else(|| self.not_found(name))?;
        let current: Vec<Vec<usize>> = adapter
            .peft_tensors()
            .iter()
            .map(|(_, t)| t.dims().to_vec())
            .collect();
        let given: Vec<Vec<usize>> = tensors.iter().map(|t| t.dims().to_vec()).collect();
        if current != given {
            return Err(DishaError::InvalidState {
                layer: label,
                message: format!(
                    "adapter `{name}`: new tensors {given:?} do not match the existing {current:?}"
                ),
            });
        }
        let mut adapter = adapter.clone();
        let mut tensors = tensors.into_iter().map(|t| t.cast(DType::F32));
        let mut next = || tensors.next().expect("counted above");
        match &mut adapter {
            Adapter::Bone(a) | Adapter::Mini(a) => {
                replace_param_value(&mut a.block, next().squeeze_dim(0))
            }
            Adapter::Bat(a) => replace_param_value(&mut a.blocks, next()),
            Adapter::Lora(a) => {
                replace_param_value(&mut a.lora_a, next().squeeze_dim(0));
                replace_param_value(&mut a.lora_b, next().squeeze_dim(0));
            }
        }
        self.adapters.replace(name, adapter);
        Ok(())
    }
}

/// `x · W + b` for the base weight. A frozen weight stored in another dtype than `x` (a bf16
/// base under f32 compute), or in the same half-precision dtype, goes through
/// [`frozen_matmul`] ([`takes_frozen_matmul`]): cast for this product, and again in the
/// backward, never kept converted. A trainable weight in another dtype is cast as a tracked op
/// (its gradient flows back in its own dtype).
fn base_linear<const D: usize>(
    input: Tensor<D>,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
    frozen: bool,
) -> Tensor<D> {
    let dtype = input.dtype();
    let bias = bias.map(|b| b.cast(dtype));
    if !frozen || !takes_frozen_matmul(dtype, weight.dtype()) {
        return burn::tensor::module::linear(input, weight.cast(dtype), bias);
    }
    let y = frozen_matmul(input, weight);
    match bias {
        Some(b) => y + b.unsqueeze(),
        None => y,
    }
}

/// `true` when the family of `adapter` is the one `spec` describes.
fn adapter_kind_differs(spec: &AdapterSpec, adapter: &Adapter) -> bool {
    use crate::spec::AdapterMethod as M;
    !matches!(
        (spec.method, adapter),
        (M::Bone, Adapter::Bone(_))
            | (M::Mini { .. }, Adapter::Mini(_))
            | (M::Lora { .. }, Adapter::Lora(_))
    ) && !matches!((spec.method, adapter), (M::Bat(o), Adapter::Bat(a)) if o == a.orientation)
}

/// Replaces a parameter's value, keeping its id and its gradient setting, on the parameter's
/// device (autodiff or not, whatever the value's own association).
pub fn replace_param_value<const D: usize>(param: &mut Param<Tensor<D>>, value: Tensor<D>) {
    let require_grad = param.is_require_grad();
    let device = param.device();
    // `to_device` keeps the source's autodiff association; match the parameter's instead.
    let value = value.to_device(&device);
    let value = if device.is_autodiff() {
        value.autodiff()
    } else {
        value.without_autodiff()
    };
    let value = value.set_require_grad(require_grad);
    *param = param.clone().map(|_| value);
}

/// Host check that a tensor holds no NaN or infinity (one reduction, one sync).
fn all_finite(t: &Tensor<2>) -> bool {
    t.clone().is_finite().all().into_scalar::<bool>()
}
