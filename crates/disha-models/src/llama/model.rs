//! The Llama decoder: embeddings, decoder layers, final norm and (optionally tied) output head.

use burn::module::{Module, Param};
use burn::nn::{Embedding, RmsNorm, RmsNormConfig};
use burn::tensor::{Bool, DType, Device, Int, Tensor, TensorData};
use disha_core::fused::{frozen_matmul_transposed, rms_norm, takes_frozen_matmul};
use disha_core::{AdaptableModel, AdaptedLinear, LinearSite};

use super::attention::{LayerKv, LlamaAttention, PositionContext};
use super::config::LlamaConfig;
use super::mlp::LlamaMlp;
use super::rope::RotaryEmbedding;
use crate::error::Result;
use crate::weights::{
    WeightSource, base_matrix, check_all_taken, dense_linear, device_tensor, linear, take,
};

/// One decoder layer: pre-norm attention and pre-norm MLP, each with a residual.
#[derive(Module, Debug)]
pub struct LlamaDecoderLayer {
    /// `q/k/v/o` projections.
    pub self_attn: LlamaAttention,
    /// `gate/up/down` projections.
    pub mlp: LlamaMlp,
    /// Norm before attention (`input_layernorm`).
    pub input_layernorm: RmsNorm,
    /// Norm before the MLP (`post_attention_layernorm`).
    pub post_attention_layernorm: RmsNorm,
}

impl LlamaDecoderLayer {
    fn forward(
        &self,
        x: Tensor<3>,
        positions: &PositionContext,
        cache: Option<&mut Option<LayerKv>>,
    ) -> Tensor<3> {
        let h = x.clone()
            + self
                .self_attn
                .forward(norm(&self.input_layernorm, x), positions, cache);
        h.clone() + self.mlp.forward(norm(&self.post_attention_layernorm, h))
    }
}

/// The per-layer key/value cache of an incremental decode.
#[derive(Clone, Debug, Default)]
pub struct LlamaCache {
    layers: Vec<Option<LayerKv>>,
    len: usize,
}

impl LlamaCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Positions already processed.
    pub fn len(&self) -> usize {
        self.len
    }

    /// No position processed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Up to this many rows (tokens of a batch), the tied output head computes `(E · hᵀ)ᵀ` when
/// no gradient flows through it (decoding, evaluation); above it, and whenever it is trained
/// through, `h · Eᵀ`. Measured on Flex with SmolLM2's `[49152, 576]` embedding, 2 threads:
/// 1 row 5.7 vs 6.4 ms, 16 rows 12.6 vs 13.2 ms, 64 rows 33 vs 24 ms, 512 rows 258 vs 172 ms —
/// the first order's row-major copy of its `[vocab, rows]` result grows with the rows. A
/// training step always takes `h · Eᵀ`, the order a half-precision embedding's product
/// ([`frozen_matmul_transposed`]) has, so a bf16 base computes the same products as an f32 one.
const TIED_HEAD_TRANSPOSED_ROWS: usize = 32;

/// A Llama-family causal language model whose seven projections per layer (and an untied
/// `lm_head`) are [`AdaptedLinear`]s, named as in transformers so PEFT adapters apply by name.
///
/// Burn module paths mirror the HF names without the `model.` prefix:
/// `layers.0.self_attn.q_proj` is HF's `model.layers.0.self_attn.q_proj`.
///
/// # Shapes
/// - input ids: `[batch, seq]` (Int)
/// - logits: `[batch, seq, vocab]`
#[derive(Module, Debug)]
pub struct Llama {
    /// Token embeddings `[vocab, hidden]` (frozen).
    pub embed_tokens: Embedding,
    /// Decoder layers.
    pub layers: Vec<LlamaDecoderLayer>,
    /// Final norm.
    pub norm: RmsNorm,
    /// Output head `[hidden, vocab]`; `None` when tied to the embeddings.
    pub lm_head: Option<AdaptedLinear>,
    #[module(skip)]
    config: LlamaConfig,
    #[module(skip)]
    rope: RotaryEmbedding,
    /// The dtype activations are computed in ([`with_compute_dtype`](Self::with_compute_dtype)).
    #[module(skip)]
    compute_dtype: DType,
}

/// HF names of the seven projections of layer `i`, with their `[out, in]` shapes.
pub(crate) fn layer_projections(config: &LlamaConfig, i: usize) -> [(String, [usize; 2], bool); 7] {
    let (h, q, kv, m) = (
        config.hidden_size,
        config.q_dim(),
        config.kv_dim(),
        config.intermediate_size,
    );
    let (ab, mb) = (config.attention_bias, config.mlp_bias);
    let shapes = [
        ([q, h], ab),
        ([kv, h], ab),
        ([kv, h], ab),
        ([h, q], ab),
        ([m, h], mb),
        ([m, h], mb),
        ([h, m], mb),
    ];
    let mut k = 0;
    shapes.map(|(shape, bias)| {
        let name = format!("model.layers.{i}.{}", PROJECTIONS[k]);
        k += 1;
        (name, shape, bias)
    })
}

/// `module`'s RMS norm as one fused op (the same formula as `RmsNorm::forward`, one pass each way
/// on Flex).
///
/// In a half-precision compute dtype it is transformers' `LlamaRMSNorm`: normalized in f32,
/// rounded, then scaled by the (rounded) weight in that dtype.
fn norm(module: &RmsNorm, x: Tensor<3>) -> Tensor<3> {
    let dtype = x.dtype();
    let gamma = module.gamma.val();
    if dtype == DType::F32 {
        return rms_norm(x, gamma, module.epsilon);
    }
    let ones = Tensor::ones(gamma.dims(), &gamma.device());
    let normed = rms_norm(x.cast(DType::F32), ones, module.epsilon).cast(dtype);
    normed * gamma.cast(dtype).unsqueeze::<3>()
}

fn load_rms_norm(
    source: &mut dyn WeightSource,
    name: &str,
    config: &LlamaConfig,
    device: &Device,
) -> Result<RmsNorm> {
    let gamma = take(source, name, &[config.hidden_size])?;
    let mut norm = RmsNormConfig::new(config.hidden_size)
        .with_epsilon(config.rms_norm_eps)
        .init(device);
    norm.gamma = Param::from_tensor(device_tensor(gamma, device)).set_require_grad(false);
    Ok(norm)
}

impl Llama {
    /// Builds the model from `source` (HF tensor names, PyTorch `[out, in]` layout, q/k rows in
    /// the rotate-half layout). Every base parameter is frozen.
    ///
    /// # Errors
    /// A missing tensor or a shape that disagrees with `config` (both named), or tensors left
    /// over that belong to no module.
    pub fn from_source(
        config: &LlamaConfig,
        source: &mut dyn WeightSource,
        device: &Device,
    ) -> Result<Self> {
        let (v, h) = (config.vocab_size, config.hidden_size);
        let embed = base_matrix(source, "model.embed_tokens.weight", [v, h], device)?;
        let embed_tokens = Embedding {
            weight: Param::from_tensor(embed).set_require_grad(false),
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let [q, k, vp, o, gate, up, down] = layer_projections(config, i)
                .map(|(name, shape, bias)| linear(source, &name, shape, bias, device));
            layers.push(LlamaDecoderLayer {
                self_attn: LlamaAttention::new(
                    [q?, k?, vp?, o?],
                    config.num_attention_heads,
                    config.num_key_value_heads,
                    config.head_dim,
                ),
                mlp: LlamaMlp {
                    gate_proj: gate?,
                    up_proj: up?,
                    down_proj: down?,
                },
                input_layernorm: load_rms_norm(
                    source,
                    &format!("model.layers.{i}.input_layernorm.weight"),
                    config,
                    device,
                )?,
                post_attention_layernorm: load_rms_norm(
                    source,
                    &format!("model.layers.{i}.post_attention_layernorm.weight"),
                    config,
                    device,
                )?,
            });
        }
        let norm = load_rms_norm(source, "model.norm.weight", config, device)?;
        let lm_head = if config.tie_word_embeddings {
            // Some tied checkpoints still store a copy of the head; it is the embedding.
            source.take("lm_head.weight")?;
            None
        } else {
            Some(dense_linear(source, "lm_head", [v, h], false, device)?)
        };
        check_all_taken(source)?;
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            config: config.clone(),
            rope: RotaryEmbedding::new(config),
            compute_dtype: DType::F32,
        })
    }

    /// Computes the activations in `dtype`: f32 (the default), or bf16 / f16 as transformers
    /// runs a model loaded with `torch_dtype=torch.bfloat16`: every product and element-wise op
    /// rounded to that dtype, the RMS norms and the attention softmax computed in f32 and
    /// rounded once, the logits returned in f32 (holding the rounded values). Adapter terms
    /// are still computed in f32 and rounded once (PEFT's autocast rule). For inference
    /// (logits, generation, evaluation) and mixed-precision training, whose backward rounds
    /// the activation gradients the same way while adapters stay f32 (Memory chapter).
    ///
    /// # Panics
    /// A dtype other than F32, BF16 or F16 (a programmer error).
    pub fn with_compute_dtype(mut self, dtype: DType) -> Self {
        assert!(
            matches!(dtype, DType::F32 | DType::BF16 | DType::F16),
            "Llama::with_compute_dtype: {dtype:?} is not a float dtype to compute in"
        );
        self.compute_dtype = dtype;
        self
    }

    /// The dtype activations are computed in (f32 unless
    /// [`with_compute_dtype`](Self::with_compute_dtype) said otherwise).
    pub fn compute_dtype(&self) -> DType {
        self.compute_dtype
    }

    /// The architecture.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.embed_tokens.weight.device()
    }

    /// Logits for every position.
    ///
    /// # Shapes
    /// - input_ids: `[batch, seq]` → `[batch, seq, vocab]`
    pub fn forward(&self, input_ids: Tensor<2, Int>) -> Tensor<3> {
        self.head(self.run(input_ids, None, None, None))
    }

    /// Logits of packed rows: row `b` holds the sequences of lengths `segments[b]` one after
    /// the other (then padding). Each sequence attends only to its own earlier tokens and its
    /// positions restart at 0, so its logits are those of running it alone (transformers'
    /// `position_ids`-based packing, e.g. `DataCollatorWithFlattening`). Padding after the last
    /// sequence attends only to itself.
    ///
    /// # Shapes
    /// - input_ids: `[batch, seq]` → `[batch, seq, vocab]`
    ///
    /// # Panics
    /// `segments` has not one entry per row, or a row's lengths add up to more than `seq`
    /// (a programmer error: the data pipeline builds both together).
    pub fn forward_packed(&self, input_ids: Tensor<2, Int>, segments: &[Vec<usize>]) -> Tensor<3> {
        let [batch, seq] = input_ids.dims();
        assert_eq!(segments.len(), batch, "one segment list per row");
        let device = input_ids.device();
        let mut positions = Vec::with_capacity(batch * seq);
        let mut mask = Vec::with_capacity(batch * seq * seq);
        for lengths in segments {
            // Segment id of every token; padding gets one id per token.
            let mut ids = Vec::with_capacity(seq);
            for (k, &len) in lengths.iter().enumerate() {
                positions.extend(0..len);
                ids.extend(std::iter::repeat_n(k, len));
            }
            assert!(ids.len() <= seq, "segments longer than the row");
            let used = ids.len();
            positions.extend(std::iter::repeat_n(0, seq - used));
            ids.extend((used..seq).map(|i| lengths.len() + i));
            for i in 0..seq {
                mask.extend((0..seq).map(|j| j > i || ids[j] != ids[i]));
            }
        }
        let (cos, sin) = self.rope.cos_sin_at(&positions, &device);
        let d = self.config.head_dim;
        let context = PositionContext {
            cos: cos.reshape([batch, 1, seq, d]),
            sin: sin.reshape([batch, 1, seq, d]),
            mask: Some(Tensor::<4, Bool>::from_data(
                TensorData::new(mask, [batch, 1, seq, seq]),
                &device,
            )),
        };
        self.head(self.run(input_ids, None, None, Some(context)))
    }

    /// Logits of the new positions, extending `cache` (incremental decoding).
    ///
    /// # Shapes
    /// - input_ids: `[batch, new]` → `[batch, new, vocab]`
    pub fn forward_cached(&self, input_ids: Tensor<2, Int>, cache: &mut LlamaCache) -> Tensor<3> {
        self.head(self.run(input_ids, Some(cache), None, None))
    }

    /// Logits of the last position only, extending `cache` (what generation needs: the head is
    /// applied to one position instead of all).
    ///
    /// # Shapes
    /// - input_ids: `[batch, new]` → `[batch, vocab]`
    pub fn forward_last(&self, input_ids: Tensor<2, Int>, cache: &mut LlamaCache) -> Tensor<2> {
        let h = self.run(input_ids, Some(cache), None, None);
        let [b, s, _] = h.dims();
        self.head(h.narrow(1, s - 1, 1))
            .reshape([b, self.config.vocab_size])
    }

    /// Every hidden state as transformers returns them with `output_hidden_states=True`:
    /// index 0 is the embeddings, `i` the output of layer `i`, and the last one is after the
    /// final norm (`num_hidden_layers + 1` tensors).
    ///
    /// # Shapes
    /// - each: `[batch, seq, hidden]`
    pub fn hidden_states(&self, input_ids: Tensor<2, Int>) -> Vec<Tensor<3>> {
        let mut states = Vec::with_capacity(self.layers.len() + 1);
        let last = self.run(input_ids, None, Some(&mut states), None);
        states.pop();
        states.push(last);
        states
    }

    /// Applies the output head (tied or not) to hidden states; the logits are f32 whatever
    /// the compute dtype.
    ///
    /// # Shapes
    /// - `[batch, seq, hidden]` → `[batch, seq, vocab]`
    pub fn head(&self, hidden: Tensor<3>) -> Tensor<3> {
        self.head_in_compute_dtype(hidden).cast(DType::F32)
    }

    fn head_in_compute_dtype(&self, hidden: Tensor<3>) -> Tensor<3> {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => {
                let [b, s, d] = hidden.dims();
                let vocab = self.config.vocab_size;
                let embed = self.embed_tokens.weight.val();
                let rows = hidden.reshape([b * s, d]);
                if takes_frozen_matmul(rows.dtype(), embed.dtype())
                    && !self.embed_tokens.weight.is_require_grad()
                {
                    // A half-precision embedding under f32 compute (cast for this product
                    // only), or under half compute (summed in f32).
                    frozen_matmul_transposed(rows, embed).reshape([b, s, vocab])
                } else if b * s <= TIED_HEAD_TRANSPOSED_ROWS && !rows.is_require_grad() {
                    // `(E · hᵀ)ᵀ`: for a few rows the transposed result is (nearly) free.
                    embed
                        .matmul(rows.transpose())
                        .transpose()
                        .reshape([b, s, vocab])
                } else {
                    // `h · Eᵀ`, the transposed view read in place by the 2-D matmul; the other
                    // order would copy a `[rows, vocab]` result into row order.
                    rows.matmul(embed.transpose()).reshape([b, s, vocab])
                }
            }
        }
    }

    /// Runs embeddings, layers and the final norm; returns the normed hidden states.
    /// `positions` overrides the consecutive positions after the cache (packed rows).
    fn run(
        &self,
        input_ids: Tensor<2, Int>,
        cache: Option<&mut LlamaCache>,
        mut collect: Option<&mut Vec<Tensor<3>>>,
        positions: Option<PositionContext>,
    ) -> Tensor<3> {
        let [_, seq] = input_ids.dims();
        let device = input_ids.device();
        let start = cache.as_ref().map_or(0, |c| c.len);
        let positions = positions.unwrap_or_else(|| {
            let (cos, sin) = self.rope.cos_sin(start, seq, &device);
            PositionContext {
                cos: cos.unsqueeze::<4>(),
                sin: sin.unsqueeze::<4>(),
                mask: None,
            }
        });
        // Rows of the embedding, in the dtype the model computes in.
        let mut x = self
            .embed_tokens
            .forward(input_ids)
            .cast(self.compute_dtype);
        let mut slots = cache;
        if let Some(c) = slots.as_deref_mut()
            && c.layers.len() != self.layers.len()
        {
            c.layers = vec![None; self.layers.len()];
        }
        for (i, layer) in self.layers.iter().enumerate() {
            if let Some(states) = collect.as_deref_mut() {
                states.push(x.clone());
            }
            let slot = slots.as_deref_mut().map(|c| &mut c.layers[i]);
            x = layer.forward(x, &positions, slot);
        }
        if let Some(states) = collect {
            states.push(x.clone());
        }
        if let Some(c) = slots {
            c.len += seq;
        }
        norm(&self.norm, x)
    }

    /// Checks that every id is inside the vocabulary.
    ///
    /// # Errors
    /// [`crate::ModelError::TokenOutOfRange`] naming the first bad id and its position.
    pub fn check_ids(&self, ids: &[i64]) -> Result<()> {
        crate::causal_lm::check_ids(ids, self.config.vocab_size)
    }
}

impl AdaptableModel for Llama {
    fn visit_linears(&self, f: &mut dyn FnMut(&LinearSite, &AdaptedLinear)) {
        for (i, layer) in self.layers.iter().enumerate() {
            for (site, linear) in layer_sites(i).iter().zip(layer.linears()) {
                f(site, linear);
            }
        }
        if let Some(head) = &self.lm_head {
            f(&LinearSite::output_head("lm_head", "lm_head"), head);
        }
    }

    fn visit_linears_mut(&mut self, f: &mut dyn FnMut(&LinearSite, &mut AdaptedLinear)) {
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for (site, linear) in layer_sites(i).iter().zip(layer.linears_mut()) {
                f(site, linear);
            }
        }
        if let Some(head) = &mut self.lm_head {
            f(&LinearSite::output_head("lm_head", "lm_head"), head);
        }
    }

    fn default_target_modules(&self) -> Option<Vec<String>> {
        // PEFT's TRANSFORMERS_MODELS_TO_*_TARGET_MODULES_MAPPING for llama.
        Some(vec!["q_proj".into(), "v_proj".into()])
    }
}

/// The seven projection names, in `linears()` order.
const PROJECTIONS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// The module names of the seven projections (`q_proj` … `down_proj`), what PEFT's
/// `target_modules` lists to adapt all of them (the DiSHA papers' setting).
pub fn projection_names() -> [&'static str; 7] {
    PROJECTIONS.map(|p| p.rsplit('.').next().expect("non-empty"))
}

fn layer_sites(i: usize) -> [LinearSite; 7] {
    PROJECTIONS
        .map(|p| LinearSite::hidden(format!("model.layers.{i}.{p}"), format!("layers.{i}.{p}")))
}

impl LlamaDecoderLayer {
    fn linears(&self) -> [&AdaptedLinear; 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &m.gate_proj,
            &m.up_proj,
            &m.down_proj,
        ]
    }

    fn linears_mut(&mut self) -> [&mut AdaptedLinear; 7] {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        [
            &mut a.q_proj,
            &mut a.k_proj,
            &mut a.v_proj,
            &mut a.o_proj,
            &mut m.gate_proj,
            &mut m.up_proj,
            &mut m.down_proj,
        ]
    }
}

/// Every tensor of an HF Llama checkpoint for `config`, with its PyTorch-layout shape, in the
/// order the model builder reads them.
pub fn hf_tensor_shapes(config: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let (v, h) = (config.vocab_size, config.hidden_size);
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
    for i in 0..config.num_hidden_layers {
        for (name, [o, inp], bias) in layer_projections(config, i) {
            out.push((format!("{name}.weight"), vec![o, inp]));
            if bias {
                out.push((format!("{name}.bias"), vec![o]));
            }
        }
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            out.push((format!("model.layers.{i}.{norm}.weight"), vec![h]));
        }
    }
    out.push(("model.norm.weight".into(), vec![h]));
    if !config.tie_word_embeddings {
        out.push(("lm_head.weight".into(), vec![v, h]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llama::config::tests_support::tiny_config;
    use crate::weights::RandomWeights;
    use burn::tensor::Distribution;

    fn logits(model: &Llama, ids: &[i64], rows: usize) -> Vec<f32> {
        let device = model.device();
        let t = Tensor::<2, Int>::from_data(
            TensorData::new(ids.to_vec(), [rows, ids.len() / rows]),
            &device,
        );
        model.forward(t).into_data().try_to_vec_as::<f32>().unwrap()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn packed_rows_equal_each_sequence_alone() {
        let c = tiny_config();
        let model =
            Llama::from_source(&c, &mut RandomWeights::new(&c, 0.3, 11), &Device::default())
                .unwrap();
        let v = c.vocab_size;
        let (a, b, d): (Vec<i64>, Vec<i64>, Vec<i64>) =
            (vec![1, 5, 9, 2, 7], vec![3, 8, 4], vec![6, 2, 11, 30]);
        // Row 0: a, b, 2 padding tokens; row 1: d, 6 padding tokens.
        let mut ids: Vec<i64> = [a.clone(), b.clone(), vec![0, 0]].concat();
        ids.extend([d.clone(), vec![0; 6]].concat());
        let device = model.device();
        let packed = model
            .forward_packed(
                Tensor::from_data(TensorData::new(ids.clone(), [2, 10]), &device),
                &[vec![5, 3], vec![4]],
            )
            .into_data()
            .try_to_vec_as::<f32>()
            .unwrap();
        let at = |row: usize, start: usize, len: usize| {
            packed[(row * 10 + start) * v..(row * 10 + start + len) * v].to_vec()
        };
        // Same arithmetic on differently shaped tensors: f32 summation-order noise only
        // (logits are O(1)).
        let tol = 1e-5;
        assert!(max_diff(&at(0, 0, 5), &logits(&model, &a, 1)) < tol);
        assert!(max_diff(&at(0, 5, 3), &logits(&model, &b, 1)) < tol);
        assert!(max_diff(&at(1, 0, 4), &logits(&model, &d, 1)) < tol);
        // Without the mask and position reset, `b` would see `a`: the test can tell.
        let unmasked = logits(&model, &ids[..10], 1);
        assert!(max_diff(&unmasked[5 * v..8 * v], &logits(&model, &b, 1)) > 1e-3);
    }

    /// The tied head's two product orders (few rows of untracked hidden states: `(E · hᵀ)ᵀ`;
    /// many rows, or hidden states a gradient flows through: `h · Eᵀ`) against the plain
    /// `h · Eᵀ` of the whole batch, in value and in the hidden states' and the embedding's
    /// gradients. Same dot products of 16 O(1) terms in either order: f32 noise.
    #[test]
    fn tied_head_orders_agree_in_value_and_gradient() {
        let c = LlamaConfig {
            tie_word_embeddings: true,
            ..tiny_config()
        };
        let device = Device::default().autodiff();
        let mut model =
            Llama::from_source(&c, &mut RandomWeights::new(&c, 0.3, 12), &device).unwrap();
        model.embed_tokens.weight = model.embed_tokens.weight.set_require_grad(true);
        let embed = model.embed_tokens.weight.val();
        let (v, d) = (c.vocab_size, c.hidden_size);
        let values = |t: Tensor<3>| t.into_data().try_to_vec_as::<f32>().unwrap();
        for rows in [3, TIED_HEAD_TRANSPOSED_ROWS + 5] {
            // Untracked hidden states (decoding): the few-rows order for 3 rows.
            let untracked = Tensor::<3>::random([1, rows, d], Distribution::Default, &device);
            let plain = (untracked.clone().reshape([rows, d]))
                .matmul(embed.clone().transpose())
                .reshape([1, rows, v]);
            let ours = model.head(untracked);
            let diff = max_diff(&values(ours.inner()), &values(plain.inner()));
            assert!(diff < 1e-5, "{rows} untracked rows: logits {diff}");
            let hidden =
                Tensor::<3>::random([1, rows, d], Distribution::Default, &device).require_grad();
            let weights = Tensor::<3>::random([1, rows, v], Distribution::Default, &device);
            let ours = model.head(hidden.clone());
            let plain = (hidden.clone().reshape([rows, d]))
                .matmul(embed.clone().transpose())
                .reshape([1, rows, v]);
            let diff = max_diff(
                &values(ours.clone().inner()),
                &values(plain.clone().inner()),
            );
            assert!(diff < 1e-5, "{rows} rows: logits {diff}");
            let g_ours = (ours * weights.clone()).sum().backward();
            let g_plain = (plain * weights).sum().backward();
            for (name, a, b) in [
                ("hidden", hidden.grad(&g_ours), hidden.grad(&g_plain)),
                (
                    "embedding",
                    embed.grad(&g_ours).map(|g| g.unsqueeze()),
                    embed.grad(&g_plain).map(|g| g.unsqueeze()),
                ),
            ] {
                let diff = max_diff(&values(a.unwrap()), &values(b.unwrap()));
                assert!(diff < 1e-5, "{rows} rows: {name} gradient {diff}");
            }
        }
    }
}
