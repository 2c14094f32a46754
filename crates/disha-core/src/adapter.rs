//! [`Adapter`]: one adapter of any family, and [`AdapterSet`]: the named adapters of one layer.

use burn::module::{
    Content, Devices, Module, ModuleDisplay, ModuleDisplayDefault, ModuleMapper, ModuleVisitor,
};
use burn::tensor::{Device, Tensor};

use crate::bat::BatAdapter;
use crate::bone::BoneAdapter;
use crate::lora::LoraAdapter;
use crate::spec::BatOrientation;

/// One adapter attached to a linear layer.
#[derive(Module, Debug)]
pub enum Adapter {
    /// Bone / MiSS standard (`[r, out]` block).
    Bone(BoneAdapter),
    /// MiSS-mini (`[r, mini_r]` block tiled over `ΔW`).
    Mini(BoneAdapter),
    /// BAT (`[out/r, r, r]` or `[in/r, r, r]`).
    Bat(BatAdapter),
    /// LoRA (`lora_A [r, in]`, `lora_B [out, r]`).
    Lora(LoraAdapter),
}

impl Adapter {
    /// The shard / block size or LoRA rank.
    pub fn r(&self) -> usize {
        match self {
            Adapter::Bone(a) | Adapter::Mini(a) => a.r(),
            Adapter::Bat(a) => a.r(),
            Adapter::Lora(a) => a.r(),
        }
    }

    /// `true` for adapters that act in weight space (BAT): their forward transforms the weight
    /// instead of adding a term to the output.
    pub fn is_weight_space(&self) -> bool {
        matches!(self, Adapter::Bat(_))
    }

    /// The adapter's tensors with their PEFT parameter names (`miss_block`, `lora_A.weight`,
    /// `lora_B.weight`), in PEFT orientation.
    pub fn peft_tensors(&self) -> Vec<(&'static str, Tensor<3>)> {
        match self {
            Adapter::Bone(a) | Adapter::Mini(a) => {
                vec![("miss_block", a.block.val().unsqueeze::<3>())]
            }
            Adapter::Bat(a) => vec![("miss_block", a.blocks.val())],
            Adapter::Lora(a) => vec![
                ("lora_A.weight", a.lora_a.val().unsqueeze::<3>()),
                ("lora_B.weight", a.lora_b.val().unsqueeze::<3>()),
            ],
        }
    }

    /// `W'` after merging this adapter into `W` (Burn layout, f32).
    pub(crate) fn merge_into(&self, weight: Tensor<2>) -> Tensor<2> {
        match self {
            Adapter::Bone(a) | Adapter::Mini(a) => a.apply_delta(weight, 1.0),
            Adapter::Bat(a) => a.transform_weight(weight),
            Adapter::Lora(a) => a.apply_delta(weight, 1.0),
        }
    }

    /// Orientation of a BAT adapter, `None` for the others.
    pub fn bat_orientation(&self) -> Option<BatOrientation> {
        match self {
            Adapter::Bat(a) => Some(a.orientation),
            _ => None,
        }
    }
}

/// The named adapters of one layer, in insertion order.
///
/// Module paths of the adapter parameters are `<layer>.adapters.<name>.<Variant>.<param>`, e.g.
/// `layers.0.attention.wq.adapters.default.Bone.block`, so records and parameter groups can
/// address one adapter by name.
#[derive(Clone, Debug, Default)]
pub struct AdapterSet {
    entries: Vec<(String, Adapter)>,
}

impl AdapterSet {
    /// Number of adapters.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// `true` when the layer has no adapter.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The adapter names, in insertion order.
    pub fn names(&self) -> Vec<String> {
        self.entries.iter().map(|(n, _)| n.clone()).collect()
    }

    /// The adapter called `name`.
    pub fn get(&self, name: &str) -> Option<&Adapter> {
        self.entries.iter().find(|(n, _)| n == name).map(|(_, a)| a)
    }

    /// The adapter called `name`, mutably (e.g. to load trained values into it).
    pub fn get_mut(&mut self, name: &str) -> Option<&mut Adapter> {
        self.entries
            .iter_mut()
            .find(|(n, _)| n == name)
            .map(|(_, a)| a)
    }

    /// Iterates over `(name, adapter)` in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Adapter)> {
        self.entries.iter().map(|(n, a)| (n.as_str(), a))
    }

    pub(crate) fn insert(&mut self, name: String, adapter: Adapter) {
        self.entries.push((name, adapter));
    }

    pub(crate) fn replace(&mut self, name: &str, adapter: Adapter) {
        if let Some(slot) = self.get_mut(name) {
            *slot = adapter;
        }
    }

    pub(crate) fn remove(&mut self, name: &str) -> Option<Adapter> {
        let index = self.entries.iter().position(|(n, _)| n == name)?;
        Some(self.entries.remove(index).1)
    }

    fn map_entries(self, f: impl Fn(Adapter) -> Adapter) -> Self {
        Self {
            entries: self.entries.into_iter().map(|(n, a)| (n, f(a))).collect(),
        }
    }
}

impl Module for AdapterSet {
    fn collect_devices(&self, mut devices: Devices) -> Devices {
        for (_, adapter) in &self.entries {
            devices = adapter.collect_devices(devices);
        }
        devices
    }

    fn fork(self, device: &Device) -> Self {
        self.map_entries(|a| a.fork(device))
    }

    fn to_device(self, device: &Device) -> Self {
        self.map_entries(|a| a.to_device(device))
    }

    fn train(self) -> Self {
        self.map_entries(Module::train)
    }

    fn valid(&self) -> Self {
        Self {
            entries: self
                .entries
                .iter()
                .map(|(n, a)| (n.clone(), a.valid()))
                .collect(),
        }
    }

    fn materialize(self) -> Self {
        self.map_entries(Module::materialize)
    }

    fn visit<V: ModuleVisitor>(&self, visitor: &mut V) {
        for (name, adapter) in &self.entries {
            visitor.enter_module(name, "AdapterSet");
            adapter.visit(visitor);
            visitor.exit_module(name, "AdapterSet");
        }
    }

    fn map<M: ModuleMapper>(self, mapper: &mut M) -> Self {
        Self {
            entries: self
                .entries
                .into_iter()
                .map(|(name, adapter)| {
                    mapper.enter_module(&name, "AdapterSet");
                    let adapter = adapter.map(mapper);
                    mapper.exit_module(&name, "AdapterSet");
                    (name, adapter)
                })
                .collect(),
        }
    }
}

impl ModuleDisplayDefault for AdapterSet {
    fn content(&self, content: Content) -> Option<Content> {
        self.entries
            .iter()
            .fold(content, |acc, (name, adapter)| acc.add(name, adapter))
            .set_top_level_type("AdapterSet")
            .optional()
    }
}

impl ModuleDisplay for AdapterSet {}
