//! The base tensors of an [`Rwkv7`] by their BlinkDL names: replacing some (an RWKV-PEFT
//! checkpoint's trained LayerNorms, a training checkpoint's), training the LayerNorms with an
//! adapter (RWKV-PEFT's `--train_parts ln`), and reading back the ones that were trained.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Tensor, TensorData};
use disha_core::{AdaptableModel, DishaError, HostTensor, replace_param_value};

use super::model::Rwkv7;
use crate::error::{ModelError, Result};
use crate::export::host;
use crate::pth_writer::PthTensor;

/// The BlinkDL name of a Burn parameter path of [`Rwkv7`] (`blocks.0.ln1.gamma` →
/// `blocks.0.ln1.weight`, `blocks.0.att.ln_x_bias` → `blocks.0.att.ln_x.bias`, the model-level
/// `ln0.gamma` → `blocks.0.ln0.weight`); other paths are the same in both.
fn blinkdl_name(burn_path: &str) -> String {
    let name = burn_path
        .replace("ln_x_weight", "ln_x.weight")
        .replace("ln_x_bias", "ln_x.bias");
    let name = match name.strip_prefix("ln0.") {
        Some(rest) => format!("blocks.0.ln0.{rest}"),
        None => name,
    };
    if let Some(ln) = name.strip_suffix(".gamma") {
        format!("{ln}.weight")
    } else if let Some(ln) = name.strip_suffix(".beta") {
        format!("{ln}.bias")
    } else {
        name
    }
}

/// `true` for a LayerNorm tensor (`ln0`, `ln1`, `ln2`, the time mix's GroupNorm `ln_x`,
/// `ln_out`): what RWKV-PEFT's `--train_parts ln` trains.
fn is_layer_norm(name: &str) -> bool {
    name.split('.').any(|part| part.starts_with("ln"))
}

/// The module names of the model's linears (their weights are `[out, in]` in BlinkDL files,
/// `[in, out]` here).
fn linear_names(model: &Rwkv7) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    model.visit_linears(&mut |site, _| {
        names.insert(site.name.clone());
    });
    names
}

/// The Burn path of the parameter being visited.
#[derive(Default)]
struct ParamPath(Vec<String>);

impl ParamPath {
    fn name(&self) -> String {
        blinkdl_name(&self.0.join("."))
    }
}

/// Replaces the parameters named in `tensors`, keeping ids and gradient settings.
struct Replace<'a> {
    path: ParamPath,
    tensors: &'a BTreeMap<String, HostTensor>,
    linears: BTreeSet<String>,
    replaced: Vec<String>,
}

impl ModuleMapper for Replace<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.0.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.0.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let name = self.path.name();
        let Some(host) = self.tensors.get(&name) else {
            return param;
        };
        let dims = param.dims();
        let device = param.device();
        let dtype = param.val().dtype();
        let is_linear_weight = name
            .strip_suffix(".weight")
            .is_some_and(|module| self.linears.contains(module));
        let value = if is_linear_weight {
            let stored: [usize; D] = std::array::from_fn(|i| dims[D - 1 - i]);
            Tensor::<D>::from_data(TensorData::new(host.values.clone(), stored), &device)
                .transpose()
        } else {
            Tensor::<D>::from_data(TensorData::new(host.values.clone(), dims), &device)
        };
        self.replaced.push(name);
        let mut param = param;
        replace_param_value(&mut param, value.cast(dtype));
        param
    }
}

/// Sets the gradient setting of every LayerNorm parameter.
struct LayerNormsTrainable {
    path: ParamPath,
    trainable: bool,
}

impl ModuleMapper for LayerNormsTrainable {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.0.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.0.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if is_layer_norm(&self.path.name()) {
            param.set_require_grad(self.trainable)
        } else {
            param
        }
    }
}

/// Collects the base parameters that require gradients, under BlinkDL names and shapes.
struct Trainable<'a> {
    path: ParamPath,
    shapes: &'a BTreeMap<String, Vec<usize>>,
    linears: BTreeSet<String>,
    found: Vec<PthTensor>,
}

impl ModuleVisitor for Trainable<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.0.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.0.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let name = self.path.name();
        // Adapter parameters have no BlinkDL name; frozen ones were not trained.
        let Some(shape) = self.shapes.get(&name) else {
            return;
        };
        if !param.is_require_grad() {
            return;
        }
        let is_linear_weight = name
            .strip_suffix(".weight")
            .is_some_and(|module| self.linears.contains(module));
        let value = if is_linear_weight {
            param.val().transpose()
        } else {
            param.val()
        };
        let values = host(value);
        self.found.push((name, shape.clone(), values));
    }
}

impl Rwkv7 {
    /// Checks `tensors` (BlinkDL names, from `source`) as replacements of this model's base
    /// tensors. Returns the names that are no base tensor of this model, and the first other
    /// error: a shape that differs from the model's, or the weight of a linear whose adapter is
    /// merged.
    pub(crate) fn check_base_tensors(
        &self,
        source: &Path,
        tensors: &BTreeMap<String, HostTensor>,
    ) -> (Vec<String>, Option<ModelError>) {
        let shapes: BTreeMap<String, Vec<usize>> =
            self.config().tensor_shapes().into_iter().collect();
        let mut merged = BTreeSet::new();
        self.visit_linears(&mut |site, linear| {
            if linear.is_merged() {
                merged.insert(site.name.clone());
            }
        });
        let mut unknown = Vec::new();
        for (name, tensor) in tensors {
            let Some(expected) = shapes.get(name) else {
                unknown.push(name.clone());
                continue;
            };
            if &tensor.shape != expected {
                let e = ModelError::TensorShape {
                    path: source.to_path_buf(),
                    name: name.clone(),
                    expected: expected.clone(),
                    actual: tensor.shape.clone(),
                };
                return (unknown, Some(e));
            }
            if let Some(module) = name.strip_suffix(".weight")
                && merged.contains(module)
            {
                let e = DishaError::InvalidState {
                    layer: module.to_string(),
                    message: format!(
                        "{} replaces `{name}`, but the layer has a merged adapter; unmerge first",
                        source.display()
                    ),
                };
                return (unknown, Some(e.into()));
            }
        }
        (unknown, None)
    }

    /// Replaces base tensors already checked by [`check_base_tensors`](Self::check_base_tensors).
    /// Returns the names replaced.
    pub(crate) fn replace_checked_base_tensors(
        &mut self,
        tensors: &BTreeMap<String, HostTensor>,
    ) -> Vec<String> {
        if tensors.is_empty() {
            return Vec::new();
        }
        let mut replace = Replace {
            path: ParamPath::default(),
            tensors,
            linears: linear_names(self),
            replaced: Vec::new(),
        };
        *self = self.clone().map(&mut replace);
        assert_eq!(
            replace.replaced.len(),
            tensors.len(),
            "every checked base tensor names a parameter of the model"
        );
        replace.replaced
    }

    /// Replaces base tensors by BlinkDL name and shape (`blocks.0.ln1.weight` `[C]`,
    /// `blocks.0.att.x_r` `[1, 1, C]`, linears `[out, in]`), keeping each parameter's id and
    /// gradient setting. `source` names where they come from, for errors.
    ///
    /// Nothing changes unless every tensor fits.
    ///
    /// # Errors
    /// A name that is no base tensor of this model, another shape, or the weight of a linear
    /// whose adapter is merged.
    pub fn replace_base_tensors(
        &mut self,
        source: &Path,
        tensors: &BTreeMap<String, HostTensor>,
    ) -> Result<Vec<String>> {
        let (unknown, error) = self.check_base_tensors(source, tensors);
        if let Some(e) = error {
            return Err(e);
        }
        if !unknown.is_empty() {
            return Err(ModelError::UnusedTensors {
                path: source.to_path_buf(),
                names: unknown,
            });
        }
        Ok(self.replace_checked_base_tensors(tensors))
    }

    /// Makes every LayerNorm weight and bias (`ln0`, `ln1`, `ln2`, `att.ln_x`, `ln_out`)
    /// trainable, or frozen again — RWKV-PEFT's `--train_parts ln`. Call it after
    /// [`freeze_all_but_active_adapters`](disha_core::freeze_all_but_active_adapters), which
    /// freezes them.
    pub fn set_layer_norms_trainable(self, trainable: bool) -> Self {
        self.map(&mut LayerNormsTrainable {
            path: ParamPath::default(),
            trainable,
        })
    }

    /// The base tensors that require gradients (trained with the adapter, e.g. the LayerNorms
    /// after [`set_layer_norms_trainable`](Self::set_layer_norms_trainable)), under their
    /// BlinkDL names and shapes, as f32.
    pub fn trainable_base_tensors(&self) -> Vec<PthTensor> {
        let shapes: BTreeMap<String, Vec<usize>> =
            self.config().tensor_shapes().into_iter().collect();
        let mut visitor = Trainable {
            path: ParamPath::default(),
            shapes: &shapes,
            linears: linear_names(self),
            found: Vec::new(),
        };
        self.visit(&mut visitor);
        visitor.found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burn_paths_map_to_blinkdl_names() {
        for (burn, blinkdl) in [
            ("blocks.0.ln1.gamma", "blocks.0.ln1.weight"),
            ("ln0.gamma", "blocks.0.ln0.weight"),
            ("ln0.beta", "blocks.0.ln0.bias"),
            ("ln_out.beta", "ln_out.bias"),
            ("blocks.3.att.ln_x_weight", "blocks.3.att.ln_x.weight"),
            ("blocks.3.att.ln_x_bias", "blocks.3.att.ln_x.bias"),
            ("blocks.1.att.x_r", "blocks.1.att.x_r"),
            ("blocks.1.att.key.weight", "blocks.1.att.key.weight"),
            ("emb.weight", "emb.weight"),
        ] {
            assert_eq!(blinkdl_name(burn), blinkdl);
        }
        for name in [
            "blocks.0.ln0.weight",
            "blocks.1.ln2.bias",
            "blocks.1.att.ln_x.weight",
            "ln_out.weight",
        ] {
            assert!(is_layer_norm(name), "{name}");
        }
        for name in ["blocks.1.att.x_r", "blocks.1.att.key.weight", "head.weight"] {
            assert!(!is_layer_norm(name), "{name}");
        }
    }
}
