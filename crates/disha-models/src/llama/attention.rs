//! Grouped-query causal self-attention with rotate-half RoPE and a KV cache.

use burn::module::Module;
use burn::tensor::{Bool, DType, Tensor, TensorData};
use disha_core::AdaptedLinear;
use disha_core::fused::softmax_last;

use super::rope::apply_rotary;

/// Keys and values of one layer for the positions seen so far.
///
/// # Shapes
/// - keys, values: `[batch, kv_heads, seen, head_dim]` (keys after RoPE)
#[derive(Clone, Debug)]
pub struct LayerKv {
    /// Rotated keys.
    pub keys: Tensor<4>,
    /// Values.
    pub values: Tensor<4>,
}

/// Llama self-attention: `q_proj`, `k_proj`, `v_proj`, `o_proj`, each an adaptable linear.
#[derive(Module, Debug)]
pub struct LlamaAttention {
    /// Query projection `[hidden, heads·head_dim]`.
    pub q_proj: AdaptedLinear,
    /// Key projection `[hidden, kv_heads·head_dim]`.
    pub k_proj: AdaptedLinear,
    /// Value projection `[hidden, kv_heads·head_dim]`.
    pub v_proj: AdaptedLinear,
    /// Output projection `[heads·head_dim, hidden]`.
    pub o_proj: AdaptedLinear,
    #[module(skip)]
    num_heads: usize,
    #[module(skip)]
    num_kv_heads: usize,
    #[module(skip)]
    head_dim: usize,
}

/// Where the tokens of one forward pass are: their rotary tables and, for packed rows, which
/// keys each query may see.
///
/// # Shapes
/// - cos, sin: `[1 or batch, 1, seq, head_dim]`
/// - mask: `[batch, 1, seq, seq]`, `true` where query `i` must not see key `j`; `None` is the
///   plain causal mask over the cached and new positions
#[derive(Clone, Debug)]
pub struct PositionContext {
    /// Cosines of the rotary angles.
    pub cos: Tensor<4>,
    /// Sines of the rotary angles.
    pub sin: Tensor<4>,
    /// Block-diagonal causal mask of packed rows.
    pub mask: Option<Tensor<4, Bool>>,
}

/// Scores of masked (future) positions. Finite, so no `inf - inf` can appear in backward;
/// `exp(-1e9 - max)` is exactly 0 in f32, as `-inf` would be.
const MASKED_SCORE: f32 = -1.0e9;

impl LlamaAttention {
    /// Assembles the layer from its projections.
    pub fn new(
        [q_proj, k_proj, v_proj, o_proj]: [AdaptedLinear; 4],
        num_heads: usize,
        num_kv_heads: usize,
        head_dim: usize,
    ) -> Self {
        Self {
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            num_heads,
            num_kv_heads,
            head_dim,
        }
    }

    /// Attends from the new positions to the cached ones plus themselves (causally), or, with
    /// a packed mask in `positions`, to the earlier tokens of the same sequence only.
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]`
    /// - output: `[batch, seq, hidden]`
    pub fn forward(
        &self,
        x: Tensor<3>,
        positions: &PositionContext,
        cache: Option<&mut Option<LayerKv>>,
    ) -> Tensor<3> {
        let (cos, sin) = (&positions.cos, &positions.sin);
        let [batch, seq, _] = x.dims();
        let (h, kvh, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let heads = |t: Tensor<3>, n: usize| t.reshape([batch, seq, n, hd]).swap_dims(1, 2);
        // The 1/√d scale goes into the queries' rotation (`cos` and `sin` are `[.., seq, hd]`)
        // rather than on the scores (`[.., seq, seq + past]`): the same product, with no pass of
        // its own forward or backward.
        // In a half-precision compute dtype the tables are rounded to it, as transformers
        // does (with a power-of-two scale, `round(q · round(cos · s))` is then `s · round(q ·
        // round(cos))`: transformers' scaled scores, exactly).
        let dtype = x.dtype();
        let scale = (hd as f64).powf(-0.5);
        let (q_cos, q_sin) = (
            cos.clone().mul_scalar(scale).cast(dtype),
            sin.clone().mul_scalar(scale).cast(dtype),
        );
        let (cos, sin) = (&cos.clone().cast(dtype), &sin.clone().cast(dtype));
        let q = apply_rotary(heads(self.q_proj.forward(x.clone()), h), &q_cos, &q_sin);
        let mut k = apply_rotary(heads(self.k_proj.forward(x.clone()), kvh), cos, sin);
        let mut v = heads(self.v_proj.forward(x), kvh);
        let mut past = 0;
        if let Some(slot) = cache {
            if let Some(prev) = slot.take() {
                past = prev.keys.dims()[2];
                k = Tensor::cat(vec![prev.keys, k], 2);
                v = Tensor::cat(vec![prev.values, v], 2);
            }
            *slot = Some(LayerKv {
                keys: k.clone(),
                values: v.clone(),
            });
        }
        let total = past + seq;
        let (k, v) = (repeat_kv(k, h / kvh), repeat_kv(v, h / kvh));
        let scores = q.matmul(k.swap_dims(2, 3));
        let scores = match &positions.mask {
            Some(mask) => scores.mask_fill(mask.clone(), MASKED_SCORE),
            None if seq > 1 => {
                let mask = causal_mask(seq, past, total, &scores.device());
                scores.mask_fill(mask.unsqueeze::<4>(), MASKED_SCORE)
            }
            None => scores,
        };
        // transformers' softmax is computed in f32 whatever the compute dtype.
        let probs = match dtype {
            DType::F32 => softmax_last(scores),
            _ => softmax_last(scores.cast(DType::F32)).cast(dtype),
        };
        let out = probs.matmul(v);
        let out = out.swap_dims(1, 2).reshape([batch, seq, h * hd]);
        self.o_proj.forward(out)
    }
}

/// `true` where query `i` (at position `past + i`) must not see key `j`.
fn causal_mask(
    seq: usize,
    past: usize,
    total: usize,
    device: &burn::tensor::Device,
) -> Tensor<2, Bool> {
    let data: Vec<bool> = (0..seq)
        .flat_map(|i| (0..total).map(move |j| j > past + i))
        .collect();
    Tensor::from_data(TensorData::new(data, [seq, total]), device)
}

/// Repeats each key/value head `n_rep` times (GQA → MHA layout).
///
/// # Shapes
/// `[batch, kv_heads, seq, head_dim]` → `[batch, kv_heads·n_rep, seq, head_dim]`
fn repeat_kv(x: Tensor<4>, n_rep: usize) -> Tensor<4> {
    if n_rep == 1 {
        return x;
    }
    let [b, kvh, s, hd] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, kvh, n_rep, s, hd])
        .reshape([b, kvh * n_rep, s, hd])
}
