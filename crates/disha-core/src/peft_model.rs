//! Model-level adapters: apply a [`PeftConfig`] to a whole model by module name, count trainable
//! parameters, merge / unmerge everything, and load / save PEFT adapter directories.
//!
//! A model opts in by implementing [`AdaptableModel`]: it lists its [`AdaptedLinear`] layers
//! with their HF module names (`model.layers.0.self_attn.q_proj`), which are what PEFT's
//! `target_modules` match and what adapter files key their tensors by. Everything else comes from
//! the blanket [`PeftModelExt`] trait.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use burn::module::{Module, ParamGroup};
use burn::tensor::{Tensor, TensorData};

use crate::adapted_linear::AdaptedLinear;
use crate::adapter::Adapter;
use crate::convert::miss_to_lora;
use crate::error::{DishaError, Result};
use crate::peft_config::{PeftConfig, PeftMethod};
use crate::peft_files::{HostTensor, KEY_PREFIX, read_adapter_dir, write_adapter_dir};
use crate::spec::AdapterSpec;
pub use crate::targets::LinearRole;
use crate::targets::TargetMatcher;

/// Where an adaptable linear layer sits in a model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinearSite {
    /// HF / PEFT module name, e.g. `model.layers.0.self_attn.q_proj`. `target_modules` match it and
    /// adapter files key tensors by `base_model.model.<name>.<param>`.
    pub name: String,
    /// The Burn module path of the layer, e.g. `layers.0.attention.wq`.
    pub path: String,
    /// Hidden layer or output head.
    pub role: LinearRole,
}

impl LinearSite {
    /// A hidden (non-head) linear layer.
    pub fn hidden(name: impl Into<String>, path: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            path: path.into(),
            role: LinearRole::Hidden,
        }
    }

    /// The output head.
    pub fn output_head(name: impl Into<String>, path: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            path: path.into(),
            role: LinearRole::OutputHead,
        }
    }
}

/// A model whose linear layers are [`AdaptedLinear`]s, each with an HF module name.
///
/// Implement the two visitors over the same layers in the same order:
///
/// ```
/// use disha_core::{AdaptableModel, AdaptedLinear, AdaptedLinearConfig, LinearSite};
/// # use burn::tensor::Device;
/// struct Block { q: AdaptedLinear, v: AdaptedLinear }
/// impl AdaptableModel for Block {
///     fn visit_linears(&self, f: &mut dyn FnMut(&LinearSite, &AdaptedLinear)) {
///         f(&LinearSite::hidden("attn.q_proj", "q"), &self.q);
///         f(&LinearSite::hidden("attn.v_proj", "v"), &self.v);
///     }
///     fn visit_linears_mut(&mut self, f: &mut dyn FnMut(&LinearSite, &mut AdaptedLinear)) {
///         f(&LinearSite::hidden("attn.q_proj", "q"), &mut self.q);
///         f(&LinearSite::hidden("attn.v_proj", "v"), &mut self.v);
///     }
/// }
/// ```
pub trait AdaptableModel {
    /// Calls `f` for every adaptable linear layer.
    fn visit_linears(&self, f: &mut dyn FnMut(&LinearSite, &AdaptedLinear));

    /// Calls `f` for every adaptable linear layer, mutably, in the same order.
    fn visit_linears_mut(&mut self, f: &mut dyn FnMut(&LinearSite, &mut AdaptedLinear));

    /// PEFT's default `target_modules` for this architecture, used when a config has none
    /// (Llama: `["q_proj", "v_proj"]`).
    fn default_target_modules(&self) -> Option<Vec<String>> {
        None
    }
}

/// Trainable and total parameter counts, displayed like PEFT's `print_trainable_parameters`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParameterCount {
    /// Parameters of the active adapters.
    pub trainable: usize,
    /// Every parameter of the model, adapters included.
    pub total: usize,
}

impl fmt::Display for ParameterCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pct = if self.total == 0 {
            0.0
        } else {
            100.0 * self.trainable as f64 / self.total as f64
        };
        write!(
            f,
            "trainable params: {} || all params: {} || trainable%: {pct:.4}",
            thousands(self.trainable),
            thousands(self.total)
        )
    }
}

fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A matched layer: its site, shape and the tensor keys it reads or writes.
struct Plan {
    site: LinearSite,
    d_input: usize,
    d_output: usize,
}

/// The PEFT key of parameter `param` (`miss_block`, `lora_A.weight`, ...) of module `name`.
pub fn peft_key(module_name: &str, param: &str) -> String {
    format!("{KEY_PREFIX}{module_name}.{param}")
}

/// Parameter names (PEFT) of an adapter spec, in [`AdapterSpec::tensor_shapes`] order.
fn param_names(spec: &AdapterSpec) -> &'static [&'static str] {
    match spec.method {
        crate::spec::AdapterMethod::Lora { .. } => &["lora_A.weight", "lora_B.weight"],
        _ => &["miss_block"],
    }
}

fn host_tensor(t: Tensor<3>, shape: Vec<usize>) -> HostTensor {
    let values = t
        .into_data()
        .try_to_vec_as::<f32>()
        .expect("f32 data converts to Vec<f32>");
    HostTensor::new(shape, values)
}

/// The layers `config` targets, validated for `spec` (no model change).
fn plan_adapter<M: AdaptableModel + ?Sized>(
    model: &M,
    name: &str,
    config: &PeftConfig,
) -> Result<Vec<Plan>> {
    let matcher = TargetMatcher::new(config, model.default_target_modules())?;
    let spec = config.spec();
    let mut plans = Vec::new();
    let mut modules = Vec::new();
    let mut error = None;
    model.visit_linears(&mut |site, linear| {
        modules.push(site.name.clone());
        if error.is_some() || !matcher.matches(&site.name, site.role) {
            return;
        }
        if linear.adapter(name).is_some() {
            error = Some(DishaError::AdapterExists {
                layer: site.name.clone(),
                adapter: name.to_string(),
            });
            return;
        }
        if let Err(e) = spec.validate(&site.name, linear.d_input(), linear.d_output()) {
            error = Some(e);
            return;
        }
        plans.push(Plan {
            site: site.clone(),
            d_input: linear.d_input(),
            d_output: linear.d_output(),
        });
    });
    if let Some(e) = error {
        return Err(e);
    }
    if plans.is_empty() {
        return Err(DishaError::NoTargetMatched {
            targets: config
                .target_modules
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_else(|| format!("{:?} (model default)", model.default_target_modules())),
            exclude: config.exclude_modules.as_ref().map(ToString::to_string),
            modules,
        });
    }
    Ok(plans)
}

/// Applies `op` to every layer `selected` picks. On the first failure, `undo` is applied to the
/// layers already changed (best effort) and the error is returned, so the model is left as it
/// was. Returns how many layers were changed.
fn for_each_layer_or_roll_back<M: AdaptableModel + ?Sized>(
    model: &mut M,
    selected: impl Fn(&AdaptedLinear) -> bool,
    op: impl Fn(&mut AdaptedLinear) -> Result<()>,
    undo: impl Fn(&mut AdaptedLinear) -> Result<()>,
) -> Result<usize> {
    let mut done = Vec::new();
    let mut error = None;
    model.visit_linears_mut(&mut |site, linear| {
        if error.is_some() || !selected(linear) {
            return;
        }
        match op(linear) {
            Ok(()) => done.push(site.name.clone()),
            Err(e) => error = Some(e),
        }
    });
    let Some(error) = error else {
        return Ok(done.len());
    };
    model.visit_linears_mut(&mut |site, linear| {
        if done.contains(&site.name)
            && let Err(e) = undo(linear)
        {
            tracing::error!(layer = %site.name, %e, "could not roll back this layer");
        }
    });
    Err(error)
}

/// Everything [`AdaptableModel`]s can do with adapters; implemented for every such model.
pub trait PeftModelExt: AdaptableModel {
    /// Every adaptable layer with its `(site, d_input, d_output)`.
    fn linear_sites(&self) -> Vec<(LinearSite, usize, usize)> {
        let mut out = Vec::new();
        self.visit_linears(&mut |site, linear| {
            out.push((site.clone(), linear.d_input(), linear.d_output()))
        });
        out
    }

    /// Adds adapter `name` (freshly initialized from `config`) to every layer the config targets
    /// (PEFT `add_adapter` / `get_peft_model`). Returns the adapted module names.
    ///
    /// The model is changed only if every targeted layer accepts the adapter.
    ///
    /// # Errors
    /// No layer matched (the error lists the model's module names), a layer that cannot take the
    /// adapter (e.g. BAT on a non-divisible layer, naming it), or a duplicate name.
    fn add_adapter(&mut self, name: &str, config: &PeftConfig) -> Result<Vec<String>> {
        let plans = plan_adapter(self, name, config)?;
        let spec = config.spec();
        let targets: BTreeMap<String, ()> =
            plans.iter().map(|p| (p.site.name.clone(), ())).collect();
        let mut error = None;
        self.visit_linears_mut(&mut |site, linear| {
            if error.is_none() && targets.contains_key(&site.name) {
                error = linear.add_adapter(name, &spec).err();
            }
        });
        match error {
            Some(e) => Err(e),
            None => Ok(targets.into_keys().collect()),
        }
    }

    /// Loads the PEFT adapter directory `dir` as adapter `name` (PEFT `load_adapter`): reads the
    /// config (legacy `BONE` included), matches its targets, checks every tensor against the
    /// config and its layer, and attaches the adapters. Returns the config read.
    ///
    /// Nothing changes unless the whole directory is consistent with the model.
    ///
    /// # Errors
    /// Any file error; a missing tensor or one whose shape disagrees with the config and its
    /// layer (naming the key, expected and actual shape); tensors that map to no targeted layer.
    fn load_adapter(&mut self, dir: &Path, name: &str) -> Result<PeftConfig> {
        let files = read_adapter_dir(dir)?;
        let config = files.config.clone();
        // A config that does not fit this model is the config file's problem: name it. (An
        // adapter name already in use is the caller's.)
        let plans = plan_adapter(self, name, &config).map_err(|e| match e {
            DishaError::AdapterExists { .. } => e,
            e => DishaError::InFile {
                path: dir.join(crate::peft_files::CONFIG_FILE),
                source: Box::new(e),
            },
        })?;
        let spec = config.spec();
        let weights = files.weights_path();
        let mut unused: BTreeMap<&str, ()> =
            files.tensors.keys().map(|k| (k.as_str(), ())).collect();
        let mut staged: BTreeMap<String, Vec<HostTensor>> = BTreeMap::new();
        for plan in &plans {
            let shapes = spec.tensor_shapes(plan.d_input, plan.d_output);
            let mut tensors = Vec::new();
            for (param, expected) in param_names(&spec).iter().zip(shapes) {
                let key = peft_key(&plan.site.name, param);
                let tensor = files
                    .tensors
                    .get(&key)
                    .ok_or_else(|| DishaError::MissingTensor {
                        path: weights.clone(),
                        key: key.clone(),
                        layer: plan.site.name.clone(),
                    })?;
                if tensor.shape != expected {
                    return Err(DishaError::TensorShape {
                        path: weights.clone(),
                        key,
                        expected,
                        actual: tensor.shape.clone(),
                        reason: format!(
                            "layer [in={}, out={}] with {} r = {}",
                            plan.d_input,
                            plan.d_output,
                            spec.method_name(),
                            spec.r
                        ),
                    });
                }
                unused.remove(key.as_str());
                tensors.push(tensor.clone());
            }
            staged.insert(plan.site.name.clone(), tensors);
        }
        if !unused.is_empty() {
            return Err(DishaError::UnexpectedTensors {
                path: weights,
                keys: unused.into_keys().map(str::to_string).collect(),
            });
        }
        let mut error = None;
        self.visit_linears_mut(&mut |site, linear| {
            let Some(tensors) = staged.remove(&site.name) else {
                return;
            };
            if error.is_some() {
                return;
            }
            let device = linear.weight.device();
            let tensors = tensors
                .into_iter()
                .map(|t| {
                    let dims = match t.shape.len() {
                        3 => [t.shape[0], t.shape[1], t.shape[2]],
                        _ => [1, t.shape[0], t.shape[1]],
                    };
                    Tensor::<3>::from_data(TensorData::new(t.values, dims), &device)
                })
                .collect();
            error = linear
                .add_adapter(name, &spec)
                .and_then(|()| linear.load_adapter_tensors(name, tensors))
                .err();
        });
        match error {
            Some(e) => Err(e),
            None => Ok(config),
        }
    }

    /// The tensors of adapter `name` keyed as PEFT saves them (F32, PEFT orientation).
    ///
    /// # Errors
    /// No layer has an adapter called `name`.
    fn adapter_tensors(&self, name: &str) -> Result<BTreeMap<String, HostTensor>> {
        let mut out = BTreeMap::new();
        self.visit_linears(&mut |site, linear| {
            let (Some(adapter), Some(spec)) = (linear.adapter(name), linear.adapter_spec(name))
            else {
                return;
            };
            let shapes = spec.tensor_shapes(linear.d_input(), linear.d_output());
            for ((param, tensor), shape) in adapter.peft_tensors().into_iter().zip(shapes) {
                out.insert(peft_key(&site.name, param), host_tensor(tensor, shape));
            }
        });
        if out.is_empty() {
            return Err(DishaError::AdapterNotFound {
                layer: "<model>".into(),
                adapter: name.to_string(),
                available: self.adapter_names(),
            });
        }
        Ok(out)
    }

    /// Names of the adapters present on any layer.
    fn adapter_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        self.visit_linears(&mut |_, linear| {
            for n in linear.adapter_names() {
                if !names.contains(&n) {
                    names.push(n);
                }
            }
        });
        names
    }

    /// Writes adapter `name` as a PEFT directory (`adapter_config.json` + F32
    /// `adapter_model.safetensors`, each written atomically) that HF PEFT loads onto the
    /// corresponding transformers model.
    ///
    /// # Errors
    /// No layer has the adapter, `config` describes a different adapter than the layers hold, or
    /// an I/O error.
    fn save_adapter(&self, name: &str, config: &PeftConfig, dir: &Path) -> Result<()> {
        let wanted = config.spec();
        let mut mismatch = None;
        self.visit_linears(&mut |site, linear| {
            if let Some(spec) = linear.adapter_spec(name)
                && (spec.method != wanted.method || spec.r != wanted.r)
                && mismatch.is_none()
            {
                mismatch = Some(format!(
                    "layer `{}` holds a {} r = {} adapter `{name}` but the config describes {} r = {}",
                    site.name,
                    spec.method_name(),
                    spec.r,
                    wanted.method_name(),
                    wanted.r
                ));
            }
        });
        if let Some(message) = mismatch {
            return Err(DishaError::config("peft_type / init_weights / r", message));
        }
        let tensors = self.adapter_tensors(name)?;
        write_adapter_dir(dir, config, &tensors)
    }

    /// Writes a Bone / mini adapter as an exactly equivalent PEFT **LoRA** directory
    /// (`lora_A[j, i] = [i mod r = j]`, `lora_B = B_fullᵀ`, `lora_alpha = r`; method.md §2.3).
    ///
    /// # Errors
    /// BAT adapters (no exact low-rank form), unknown adapter, I/O.
    fn save_adapter_as_lora(&self, name: &str, config: &PeftConfig, dir: &Path) -> Result<()> {
        let PeftMethod::Miss { .. } = config.method else {
            return self.save_adapter(name, config, dir);
        };
        let mut tensors = BTreeMap::new();
        let mut error = None;
        self.visit_linears(&mut |site, linear| {
            let Some(adapter) = linear.adapter(name) else {
                return;
            };
            match miss_to_lora(adapter, linear.d_input(), linear.d_output()) {
                Ok(lora) => {
                    let r = lora.r();
                    tensors.insert(
                        peft_key(&site.name, "lora_A.weight"),
                        host_tensor(lora.lora_a.val().unsqueeze(), vec![r, linear.d_input()]),
                    );
                    tensors.insert(
                        peft_key(&site.name, "lora_B.weight"),
                        host_tensor(lora.lora_b.val().unsqueeze(), vec![linear.d_output(), r]),
                    );
                }
                Err(e) => {
                    error.get_or_insert(DishaError::Unsupported(format!(
                        "layer `{}`: {e}",
                        site.name
                    )));
                }
            }
        });
        if let Some(e) = error {
            return Err(e);
        }
        if tensors.is_empty() {
            return Err(DishaError::AdapterNotFound {
                layer: "<model>".into(),
                adapter: name.to_string(),
                available: self.adapter_names(),
            });
        }
        let mut lora = PeftConfig::lora(
            config.r,
            config.r as f64,
            config
                .target_modules
                .clone()
                .unwrap_or(crate::TargetModules::Names(
                    self.default_target_modules().unwrap_or_default(),
                )),
        );
        lora.exclude_modules = config.exclude_modules.clone();
        lora.layers_to_transform = config.layers_to_transform.clone();
        lora.layers_pattern = config.layers_pattern.clone();
        lora.task_type = config.task_type.clone();
        lora.base_model_name_or_path = config.base_model_name_or_path.clone();
        lora.revision = config.revision.clone();
        write_adapter_dir(dir, &lora, &tensors)
    }

    /// Makes exactly `names` active on every layer that has them (PEFT `set_adapter`).
    ///
    /// # Errors
    /// A name no layer has, or merged layers.
    fn set_active_adapters(&mut self, names: &[&str]) -> Result<()> {
        let known = self.adapter_names();
        if let Some(missing) = names.iter().find(|n| !known.iter().any(|k| k == *n)) {
            return Err(DishaError::AdapterNotFound {
                layer: "<model>".into(),
                adapter: missing.to_string(),
                available: known,
            });
        }
        let mut error = None;
        self.visit_linears_mut(&mut |_, linear| {
            if error.is_some() || linear.adapter_names().is_empty() {
                return;
            }
            let here: Vec<&str> = names
                .iter()
                .copied()
                .filter(|n| linear.adapter(n).is_some())
                .collect();
            error = linear.set_active_adapters(&here).err();
        });
        error.map_or(Ok(()), Err)
    }

    /// Merges the active adapters of every layer (PEFT `merge_adapter`).
    ///
    /// # Errors
    /// Nothing to merge anywhere, or a layer whose merge fails; layers merged by this call are
    /// unmerged again before the error is returned.
    fn merge_adapters(&mut self) -> Result<()> {
        let merged = for_each_layer_or_roll_back(
            self,
            AdaptedLinear::has_pending_adapters,
            AdaptedLinear::merge,
            AdaptedLinear::unmerge,
        )?;
        if merged == 0 {
            return Err(DishaError::InvalidState {
                layer: "<model>".into(),
                message: "no layer has an active, unmerged adapter to merge".into(),
            });
        }
        Ok(())
    }

    /// Unmerges every merged layer (PEFT `unmerge_adapter`).
    ///
    /// # Errors
    /// Nothing merged, or a layer whose unmerge fails (singular BAT block); layers unmerged by
    /// this call are merged again before the error is returned.
    fn unmerge_adapters(&mut self) -> Result<()> {
        let unmerged = for_each_layer_or_roll_back(
            self,
            AdaptedLinear::is_merged,
            AdaptedLinear::unmerge,
            AdaptedLinear::merge,
        )?;
        if unmerged == 0 {
            return Err(DishaError::InvalidState {
                layer: "<model>".into(),
                message: "no layer is merged; nothing to unmerge".into(),
            });
        }
        Ok(())
    }

    /// Disables all adapters (unmerging merged layers first): the model computes its base
    /// function (PEFT `disable_adapter`).
    ///
    /// # Errors
    /// The unmerge errors of [`unmerge_adapters`](Self::unmerge_adapters).
    fn disable_adapters(&mut self) -> Result<()> {
        let any_merged = {
            let mut merged = false;
            self.visit_linears(&mut |_, l| merged |= l.is_merged());
            merged
        };
        if any_merged {
            self.unmerge_adapters()?;
        }
        self.visit_linears_mut(&mut |_, linear| {
            linear
                .disable_adapters()
                .expect("unmerged above, so disabling cannot fail");
        });
        Ok(())
    }

    /// Re-enables the adapters.
    fn enable_adapters(&mut self) {
        self.visit_linears_mut(&mut |_, linear| linear.enable_adapters());
    }

    /// Deletes adapter `name` from every layer.
    ///
    /// # Errors
    /// No layer has it, or it is merged somewhere (nothing is deleted then).
    fn delete_adapter(&mut self, name: &str) -> Result<()> {
        let mut found = false;
        let mut merged_in = None;
        self.visit_linears(&mut |site, linear| {
            found |= linear.adapter(name).is_some();
            if linear.merged_adapters().iter().any(|m| m == name) {
                merged_in.get_or_insert_with(|| site.name.clone());
            }
        });
        if !found {
            return Err(DishaError::AdapterNotFound {
                layer: "<model>".into(),
                adapter: name.to_string(),
                available: self.adapter_names(),
            });
        }
        if let Some(layer) = merged_in {
            return Err(DishaError::InvalidState {
                layer,
                message: format!("adapter `{name}` is merged; unmerge before deleting it"),
            });
        }
        self.visit_linears_mut(&mut |_, linear| {
            if linear.adapter(name).is_some() {
                linear.delete_adapter(name).expect("checked above");
            }
        });
        Ok(())
    }

    /// Trainable (active-adapter) and total parameters (PEFT `get_nb_trainable_parameters`).
    ///
    /// Like PEFT, "trainable" means the parameters of the active adapters: everything else is
    /// frozen by [`freeze_all_but_active_adapters`]. A quantized base counts its weights (not the
    /// bytes of its codes; PEFT does the same for 4-bit bases).
    fn parameter_count(&self) -> ParameterCount
    where
        Self: Module + Sized,
    {
        let (mut trainable, mut dense, mut stored) = (0, 0, 0);
        self.visit_linears(&mut |_, linear| {
            trainable += linear.num_active_adapter_params();
            // A quantized base counts its weights, not its stored codes and scales.
            if let Some(q) = &linear.quantized {
                let [rows, cols] = q.dims();
                dense += rows * cols;
                stored += q.num_params();
            }
        });
        ParameterCount {
            trainable,
            total: self.num_params() + dense - stored,
        }
    }
}

impl<M: AdaptableModel + ?Sized> PeftModelExt for M {}

/// Freezes every parameter of `model` except those of the active adapters (PEFT's
/// `_mark_only_adapters_as_trainable`): base weights, embeddings, norms and inactive adapters get
/// no gradient and no optimizer state.
pub fn freeze_all_but_active_adapters<M: Module + AdaptableModel>(model: M) -> M {
    let mut active: Vec<Adapter> = Vec::new();
    model.visit_linears(&mut |_, linear| {
        for name in linear.active_adapters() {
            if let Some(a) = linear.adapter(name) {
                active.push(a.clone());
            }
        }
    });
    let group = active
        .into_iter()
        .map(ParamGroup::ids_from_module)
        .reduce(|a, b| a.fuse(&b))
        .unwrap_or_else(|| ParamGroup::from_ids(Vec::new()));
    model.no_grad().set_require_grad_group(group, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_count_prints_like_peft() {
        let c = ParameterCount {
            trainable: 9_728,
            total: 1_234_567,
        };
        assert_eq!(
            c.to_string(),
            "trainable params: 9,728 || all params: 1,234,567 || trainable%: 0.7880"
        );
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(100), "100");
        assert_eq!(thousands(1000), "1,000");
    }
}
