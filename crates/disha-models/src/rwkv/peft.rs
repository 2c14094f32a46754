//! RWKV-PEFT adapter checkpoints (JL-er/RWKV-PEFT, `--peft disha` and the older `--peft bone`):
//! a `.pth` holding one tensor per adapted linear, `blocks.{L}.{att|ffn}.{name}.disha` (or
//! `.bone`), plus the base tensors the run also trained (`--train_parts`, e.g.
//! `blocks.{L}.ln1.weight`), which replace the base model's.
//!
//! A 2-D tensor `[r, out]` is Bone (the same values as PEFT's `miss_block`); a 3-D tensor
//! `[in/r, r, r]` is BAT in RWKV-PEFT's orientation, `D[b]` shared by input-block column `b`
//! (`W'_ab = W_ab (I + D[b]) + D[b]`), which no PEFT BAT can express. See the book's RWKV page.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::{Tensor, TensorData};
use disha_core::{
    AdaptableModel, AdaptedLinear, AdapterMethod, AdapterSpec, BatOrientation, DishaError,
    HostTensor, MissInit, PeftConfig, PeftModelExt, TargetModules,
};

use super::model::Rwkv7;
use crate::error::{ModelError, Result};
use crate::export::host;
use crate::pth::PthWeights;

/// The adapter-tensor suffixes: `disha` (RWKV-PEFT since the DiSHA rename) and `bone` (before).
pub const ADAPTER_SUFFIXES: [&str; 2] = ["disha", "bone"];

/// An RWKV-PEFT adapter checkpoint, read and checked on its own (the model checks it again
/// against its layers when it is applied).
#[derive(Clone, Debug)]
pub struct RwkvPeftCheckpoint {
    /// The file read.
    pub path: PathBuf,
    /// Bone, or BAT in RWKV-PEFT orientation, with the `r` the tensors imply.
    pub spec: AdapterSpec,
    /// The suffix the file uses (`disha` or `bone`).
    pub suffix: &'static str,
    /// Adapter tensor per adapted linear, by BlinkDL module name (`blocks.0.att.key`), in
    /// PyTorch orientation (`[r, out]` or `[in/r, r, r]`).
    pub adapters: BTreeMap<String, HostTensor>,
    /// Base tensors the checkpoint replaces, by BlinkDL name (`blocks.0.ln1.weight`).
    pub overlay: BTreeMap<String, HostTensor>,
}

impl RwkvPeftCheckpoint {
    /// Reads `path` (a torch zip or legacy pickle `.pth`; f32, f16 or bf16), every tensor
    /// bounded by [`disha_core::limits`] and checked finite.
    ///
    /// # Errors
    /// The `.pth` reader's errors; no adapter tensor; adapter tensors that mix Bone and BAT, or
    /// disagree on `r`, or a BAT tensor whose blocks are not square (each named).
    pub fn read(path: &Path) -> Result<Self> {
        let tensors = PthWeights::open(path)?.take_all()?;
        let error = |message: String| ModelError::Pytorch {
            path: path.to_path_buf(),
            message,
        };
        let mut adapters = BTreeMap::new();
        let mut overlay = BTreeMap::new();
        let mut kind: Option<(String, AdapterSpec, &'static str)> = None;
        for (name, tensor) in tensors {
            let Some((module, suffix)) = ADAPTER_SUFFIXES
                .iter()
                .find_map(|s| name.strip_suffix(&format!(".{s}")).map(|m| (m, *s)))
            else {
                overlay.insert(name, tensor);
                continue;
            };
            let spec = match tensor.shape.as_slice() {
                [r, _out] => AdapterSpec::bone(*r),
                [_blocks, r, r2] if r == r2 => AdapterSpec::bat(*r, BatOrientation::RwkvPeft),
                shape => {
                    return Err(error(format!(
                        "adapter tensor `{name}` has shape {shape:?}; expected Bone `[r, out]` \
                         or BAT `[in/r, r, r]`"
                    )));
                }
            };
            match &kind {
                None => kind = Some((name.clone(), spec.clone(), suffix)),
                Some((first, first_spec, first_suffix)) => {
                    if first_spec.method != spec.method || first_spec.r != spec.r {
                        return Err(error(format!(
                            "adapter tensor `{name}` is {} r = {} but `{first}` is {} r = {}; \
                             one checkpoint holds one adapter",
                            spec.method_name(),
                            spec.r,
                            first_spec.method_name(),
                            first_spec.r
                        )));
                    }
                    if *first_suffix != suffix {
                        return Err(error(format!(
                            "adapter tensor `{name}` ends in `.{suffix}` but `{first}` in \
                             `.{first_suffix}`; one checkpoint uses one suffix"
                        )));
                    }
                }
            }
            adapters.insert(module.to_string(), tensor);
        }
        let Some((_, spec, suffix)) = kind else {
            return Err(error(format!(
                "no adapter tensor (a name ending in {}); tensors: {}",
                ADAPTER_SUFFIXES.map(|s| format!("`.{s}`")).join(" or "),
                preview(overlay.keys())
            )));
        };
        Ok(Self {
            path: path.to_path_buf(),
            spec,
            suffix,
            adapters,
            overlay,
        })
    }
}

impl RwkvPeftCheckpoint {
    /// The adapter as a PEFT config: MiSS with `init_weights` `true` (Bone) or `"bat_rwkv"`
    /// (BAT in RWKV-PEFT orientation, a disha extension PEFT refuses), `r`, and the adapted
    /// modules by name.
    pub fn peft_config(&self) -> PeftConfig {
        let init = match self.spec.method {
            AdapterMethod::Bat(_) => MissInit::BatRwkv,
            _ => MissInit::Standard,
        };
        PeftConfig::miss_with(
            self.spec.r,
            init,
            TargetModules::Names(self.adapters.keys().cloned().collect()),
        )
    }
}

/// The first few names of a list, for error messages.
fn preview<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let names: Vec<&String> = names.collect();
    let shown: Vec<&str> = names.iter().take(8).map(|s| s.as_str()).collect();
    match names.len() {
        0 => "none".into(),
        n if n > shown.len() => format!("{}, … ({n} in all)", shown.join(", ")),
        _ => shown.join(", "),
    }
}

/// What [`Rwkv7::load_rwkv_peft`] attached and replaced.
#[derive(Clone, Debug, PartialEq)]
pub struct RwkvPeftLoaded {
    /// The adapter's spec (Bone, or BAT in RWKV-PEFT orientation, and `r`).
    pub spec: AdapterSpec,
    /// The adapted linears, by BlinkDL name.
    pub layers: Vec<String>,
    /// The base tensors the checkpoint replaced, by BlinkDL name.
    pub replaced: Vec<String>,
}

impl Rwkv7 {
    /// Loads an RWKV-PEFT adapter checkpoint (see the [module docs](self)) as adapter `name`:
    /// attaches Bone, or BAT in RWKV-PEFT orientation, to every linear the file names, and
    /// replaces the base tensors it also holds (trained LayerNorms), as RWKV-PEFT's
    /// `merge_disha.py` does before merging. [`merge_adapters`](PeftModelExt::merge_adapters)
    /// then gives that script's merged weights.
    ///
    /// Replaced base tensors are part of the model from then on: disabling or deleting the
    /// adapter does not restore them.
    ///
    /// Nothing changes unless the whole file fits the model.
    ///
    /// # Errors
    /// The reader's errors ([`RwkvPeftCheckpoint::read`]); an adapter name already in use; an
    /// adapter tensor for a module this model does not have or whose shape does not fit its
    /// layer; a replaced tensor that is not a base tensor of this model, has another shape, or
    /// is the weight of a linear with a merged adapter (each naming the file and tensor).
    pub fn load_rwkv_peft(&mut self, path: &Path, name: &str) -> Result<RwkvPeftLoaded> {
        let checkpoint = RwkvPeftCheckpoint::read(path)?;
        self.apply_rwkv_peft(&checkpoint, name)
    }

    /// [`load_rwkv_peft`](Self::load_rwkv_peft) for a checkpoint already read.
    ///
    /// # Errors
    /// As [`load_rwkv_peft`](Self::load_rwkv_peft), after reading.
    pub fn apply_rwkv_peft(
        &mut self,
        checkpoint: &RwkvPeftCheckpoint,
        name: &str,
    ) -> Result<RwkvPeftLoaded> {
        let path = &checkpoint.path;
        let spec = &checkpoint.spec;
        let suffix = checkpoint.suffix;
        // Check everything before changing anything.
        let mut sites = BTreeMap::new();
        self.visit_linears(&mut |site, linear| {
            sites.insert(
                site.name.clone(),
                (
                    linear.d_input(),
                    linear.d_output(),
                    linear.adapter(name).is_some(),
                ),
            );
        });
        let mut unknown = Vec::new();
        for (module, tensor) in &checkpoint.adapters {
            let key = format!("{module}.{suffix}");
            let Some(&(d_input, d_output, exists)) = sites.get(module) else {
                unknown.push(key);
                continue;
            };
            if exists {
                return Err(DishaError::AdapterExists {
                    layer: module.clone(),
                    adapter: name.to_string(),
                }
                .into());
            }
            spec.validate(module, d_input, d_output)
                .map_err(|e| DishaError::InFile {
                    path: path.clone(),
                    source: Box::new(e),
                })?;
            let expected = spec.tensor_shapes(d_input, d_output).remove(0);
            if tensor.shape != expected {
                return Err(ModelError::TensorShape {
                    path: path.clone(),
                    name: key,
                    expected,
                    actual: tensor.shape.clone(),
                });
            }
        }
        let (missing, base_error) = self.check_base_tensors(path, &checkpoint.overlay);
        unknown.extend(missing);
        if let Some(e) = base_error {
            return Err(e);
        }
        if !unknown.is_empty() {
            return Err(ModelError::UnusedTensors {
                path: path.clone(),
                names: unknown,
            });
        }

        let mut error = None;
        self.visit_linears_mut(&mut |site, linear: &mut AdaptedLinear| {
            let Some(tensor) = checkpoint.adapters.get(&site.name) else {
                return;
            };
            if error.is_some() {
                return;
            }
            let device = linear.weight.device();
            let dims = match *tensor.shape.as_slice() {
                [a, b, c] => [a, b, c],
                [r, out] => [1, r, out],
                _ => unreachable!("ranks checked when read"),
            };
            let value =
                Tensor::<3>::from_data(TensorData::new(tensor.values.clone(), dims), &device);
            error = linear
                .add_adapter(name, spec)
                .and_then(|()| linear.load_adapter_tensors(name, vec![value]))
                .err();
        });
        if let Some(e) = error {
            // Validated above: only a programmer error gets here. Leave no half-attached adapter.
            let _ = self.delete_adapter(name);
            return Err(e.into());
        }
        let replaced = self.replace_checked_base_tensors(&checkpoint.overlay);
        Ok(RwkvPeftLoaded {
            spec: spec.clone(),
            layers: checkpoint.adapters.keys().cloned().collect(),
            replaced,
        })
    }
}

impl Rwkv7 {
    /// Writes adapter `name` as an RWKV-PEFT checkpoint (`blocks.{L}.{module}.disha`, f32,
    /// PyTorch orientation), atomically, for RWKV-PEFT's `merge_disha.py` or
    /// [`load_rwkv_peft`](Self::load_rwkv_peft), with the base tensors trained alongside
    /// ([`trainable_base_tensors`](Self::trainable_base_tensors): the LayerNorms when
    /// [`set_layer_norms_trainable`](Self::set_layer_norms_trainable)), as RWKV-PEFT saves its
    /// `--train_parts`. Returns how many tensors were written.
    ///
    /// # Errors
    /// No layer has the adapter; an adapter RWKV-PEFT cannot represent (LoRA, MiSS-mini, BAT in
    /// PEFT orientation), naming the layer; I/O errors naming the file.
    pub fn save_rwkv_peft(&self, name: &str, path: &Path) -> Result<usize> {
        let mut tensors = Vec::new();
        let mut error = None;
        self.visit_linears(&mut |site, linear| {
            let (Some(adapter), Some(spec)) = (linear.adapter(name), linear.adapter_spec(name))
            else {
                return;
            };
            if !matches!(
                spec.method,
                AdapterMethod::Bone | AdapterMethod::Bat(BatOrientation::RwkvPeft)
            ) {
                error.get_or_insert_with(|| {
                    DishaError::Unsupported(format!(
                        "layer `{}`: adapter `{name}` is {}{}; RWKV-PEFT checkpoints hold Bone \
                         or BAT in RWKV-PEFT orientation",
                        site.name,
                        spec.method_name(),
                        if matches!(spec.method, AdapterMethod::Bat(BatOrientation::Peft)) {
                            " in PEFT orientation"
                        } else {
                            ""
                        }
                    ))
                });
                return;
            }
            let shape = spec
                .tensor_shapes(linear.d_input(), linear.d_output())
                .remove(0);
            for (_, tensor) in adapter.peft_tensors() {
                let values = host(tensor);
                tensors.push((
                    format!("{}.{}", site.name, ADAPTER_SUFFIXES[0]),
                    shape.clone(),
                    values,
                ));
            }
        });
        if let Some(e) = error {
            return Err(e.into());
        }
        let adapter_tensors = tensors.len();
        // Base tensors trained with the adapter (LayerNorms), as RWKV-PEFT saves `--train_parts`.
        tensors.extend(self.trainable_base_tensors());
        if adapter_tensors == 0 {
            return Err(DishaError::AdapterNotFound {
                layer: "<model>".into(),
                adapter: name.to_string(),
                available: self.adapter_names(),
            }
            .into());
        }
        crate::pth_writer::write_pth(path, &tensors)?;
        Ok(tensors.len())
    }
}
