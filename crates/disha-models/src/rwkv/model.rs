//! The RWKV-7 model: embedding, `ln0`, blocks of time mix and channel mix, `ln_out`, head.

use burn::module::{Module, Param};
use burn::nn::{Embedding, LayerNorm, LayerNormConfig};
use burn::tensor::activation::{relu, sigmoid};
use burn::tensor::{DType, Device, Int, Tensor};
use disha_core::fused::{frozen_matmul, takes_frozen_matmul};
use disha_core::kernels::kernel_policy;
use disha_core::{AdaptableModel, AdaptedLinear, HostTensor, LinearSite};

use super::config::{DECAY_SCALE, GROUP_NORM_EPS, L2_NORM_EPS, LAYER_NORM_EPS, RwkvConfig};
use super::state::{RwkvLayerState, RwkvState};
use super::wkv::{DEFAULT_WKV_CHUNK_LEN, MAX_WKV_CHUNK_LEN, wkv7_chunked};
use crate::error::{ModelError, Result};
use crate::weights::{
    WeightSource, base_matrix, check_all_taken, dense_linear, device_tensor, linear, take,
};

/// A frozen parameter.
fn frozen<const D: usize>(t: Tensor<D>) -> Param<Tensor<D>> {
    Param::from_tensor(t).set_require_grad(false)
}

/// A `[1, 1, C]` checkpoint vector as a frozen `[C]` parameter.
fn vector(
    source: &mut dyn WeightSource,
    name: &str,
    c: usize,
    device: &Device,
) -> Result<Param<Tensor<1>>> {
    let t = take(source, name, &[1, 1, c])?;
    Ok(frozen(device_tensor(
        HostTensor::new(vec![c], t.values),
        device,
    )))
}

/// A frozen matrix kept in the checkpoint's layout (the low-rank `w1 … g2` are used as
/// `x · W`, already `[in, out]`).
fn matrix(
    source: &mut dyn WeightSource,
    name: &str,
    shape: [usize; 2],
    device: &Device,
) -> Result<Param<Tensor<2>>> {
    Ok(frozen(device_tensor(take(source, name, &shape)?, device)))
}

/// A frozen LayerNorm (eps 1e-5) from `{name}.weight` / `{name}.bias`.
fn layer_norm(
    source: &mut dyn WeightSource,
    name: &str,
    c: usize,
    device: &Device,
) -> Result<LayerNorm> {
    let mut norm = LayerNormConfig::new(c)
        .with_epsilon(LAYER_NORM_EPS)
        .init(device);
    norm.gamma = frozen(device_tensor(
        take(source, &format!("{name}.weight"), &[c])?,
        device,
    ));
    norm.beta = Some(frozen(device_tensor(
        take(source, &format!("{name}.bias"), &[c])?,
        device,
    )));
    Ok(norm)
}

/// A LayerNorm computed in f32 and rounded once to the input's dtype (what PyTorch's
/// `layer_norm` does for a half input).
fn layer_norm_rounded(norm: &LayerNorm, x: Tensor<3>) -> Tensor<3> {
    let dtype = x.dtype();
    norm.forward(x.cast(DType::F32)).cast(dtype)
}

/// Token shift: the previous position's input (the carried one for position 0) minus the
/// current one, and the last position (the next call's carried input, kept in f32 as the
/// state is: exact for a half-precision `x`).
///
/// # Shapes
/// - x: `[batch, seq, C]`, prev: `[batch, C]` → (`[batch, seq, C]`, `[batch, C]`)
fn token_shift(x: &Tensor<3>, prev: Tensor<2>) -> (Tensor<3>, Tensor<2>) {
    let [b, t, c] = x.dims();
    let prev = prev.cast(x.dtype()).reshape([b, 1, c]);
    let shifted = if t == 1 {
        prev
    } else {
        Tensor::cat(vec![prev, x.clone().narrow(1, 0, t - 1)], 1)
    };
    let last = x
        .clone()
        .narrow(1, t - 1, 1)
        .reshape([b, c])
        .cast(DType::F32);
    (shifted - x.clone(), last)
}

/// `x · A`, then `f`, then `· B` over the last dimension (the low-rank MLPs), in `x`'s dtype;
/// a frozen `A` or `B` under half compute through [`frozen_matmul`] (summed in f32).
fn low_rank(
    x: Tensor<3>,
    a: &Param<Tensor<2>>,
    b: &Param<Tensor<2>>,
    f: impl Fn(Tensor<2>) -> Tensor<2>,
) -> Tensor<3> {
    let [batch, t, c] = x.dims();
    let out = b.dims()[1];
    let product = |x: Tensor<2>, w: &Param<Tensor<2>>| {
        let (dtype, w) = (x.dtype(), w.val());
        match !w.is_require_grad() && takes_frozen_matmul(dtype, w.dtype()) {
            true => frozen_matmul(x, w),
            false => x.matmul(w.cast(dtype)),
        }
    };
    product(f(product(x.reshape([batch * t, c]), a)), b).reshape([batch, t, out])
}

/// A `[C]` parameter as `[1, 1, C]` (f32, as stored).
fn row(p: &Param<Tensor<1>>) -> Tensor<3> {
    let c = p.dims()[0];
    p.val().reshape([1, 1, c])
}

/// A `[C]` parameter as `[1, 1, C]` in `dtype` (the token-shift lerps in the compute dtype).
fn row_in(p: &Param<Tensor<1>>, dtype: DType) -> Tensor<3> {
    row(p).cast(dtype)
}

/// The time mix (`att`): token-shift lerps, the WKV-7 recurrence, GroupNorm, bonus, gate.
#[derive(Module, Debug)]
pub struct RwkvTimeMix {
    /// Token-shift lerp coefficients `μ_r, μ_w, μ_k, μ_v, μ_a, μ_g`, each `[C]`.
    pub x_r: Param<Tensor<1>>,
    /// See [`x_r`](Self::x_r).
    pub x_w: Param<Tensor<1>>,
    /// See [`x_r`](Self::x_r).
    pub x_k: Param<Tensor<1>>,
    /// See [`x_r`](Self::x_r).
    pub x_v: Param<Tensor<1>>,
    /// See [`x_r`](Self::x_r).
    pub x_a: Param<Tensor<1>>,
    /// See [`x_r`](Self::x_r).
    pub x_g: Param<Tensor<1>>,
    /// Decay bias `[C]`.
    pub w0: Param<Tensor<1>>,
    /// Decay MLP `[C, D_w]`.
    pub w1: Param<Tensor<2>>,
    /// Decay MLP `[D_w, C]`.
    pub w2: Param<Tensor<2>>,
    /// In-context learning-rate bias `[C]`.
    pub a0: Param<Tensor<1>>,
    /// In-context learning-rate MLP `[C, D_a]`.
    pub a1: Param<Tensor<2>>,
    /// In-context learning-rate MLP `[D_a, C]`.
    pub a2: Param<Tensor<2>>,
    /// Value-residual gate bias `[C]` (absent or unused in layer 0).
    pub v0: Option<Param<Tensor<1>>>,
    /// Value-residual MLP `[C, D_v]`.
    pub v1: Option<Param<Tensor<2>>>,
    /// Value-residual MLP `[D_v, C]`.
    pub v2: Option<Param<Tensor<2>>>,
    /// Output-gate MLP `[C, D_g]`.
    pub g1: Param<Tensor<2>>,
    /// Output-gate MLP `[D_g, C]`.
    pub g2: Param<Tensor<2>>,
    /// Removal-key scale `[C]`.
    pub k_k: Param<Tensor<1>>,
    /// How much `a` modulates the key `[C]`.
    pub k_a: Param<Tensor<1>>,
    /// Per-head bonus weights `[H, N]`.
    pub r_k: Param<Tensor<2>>,
    /// `W_r`.
    pub receptance: AdaptedLinear,
    /// `W_k`.
    pub key: AdaptedLinear,
    /// `W_v`.
    pub value: AdaptedLinear,
    /// `W_o`.
    pub output: AdaptedLinear,
    /// GroupNorm weight `[C]`.
    pub ln_x_weight: Param<Tensor<1>>,
    /// GroupNorm bias `[C]`.
    pub ln_x_bias: Param<Tensor<1>>,
    #[module(skip)]
    layer: usize,
}

impl RwkvTimeMix {
    /// The time mix of normalized inputs `x`, continuing `state` (its token-shift input and WKV
    /// state are updated). Layer 0 sets `v_first`; later layers read it.
    ///
    /// The lerps and every projection run in `x`'s dtype. The recurrence's inputs are formed in
    /// f32 from the rounded projections, and the recurrence, GroupNorm and bonus stay in f32
    /// (the state is f32 whatever the model's dtype); their sum is rounded once before the gate.
    ///
    /// # Shapes
    /// - x: `[batch, seq, C]` → `[batch, seq, C]`
    fn forward(
        &self,
        x: Tensor<3>,
        state: &mut RwkvLayerState,
        v_first: &mut Option<Tensor<3>>,
        chunk_len: usize,
    ) -> Tensor<3> {
        let [b, t, c] = x.dims();
        let [h, n] = self.r_k.dims();
        let dtype = x.dtype();
        let f32 = |z: Tensor<3>| z.cast(DType::F32);
        let (delta, last) = token_shift(&x, state.att_x_prev.clone());
        state.att_x_prev = last;
        let mix = |mu: &Param<Tensor<1>>| x.clone() + delta.clone() * row_in(mu, dtype);
        let r = f32(self.receptance.forward(mix(&self.x_r)));
        let omega = row(&self.w0) + f32(low_rank(mix(&self.x_w), &self.w1, &self.w2, |z| z.tanh()));
        let w = sigmoid(omega).mul_scalar(-DECAY_SCALE).exp();
        let k = f32(self.key.forward(mix(&self.x_k)));
        let xv = mix(&self.x_v);
        let mut v = f32(self.value.forward(xv.clone()));
        match (self.layer, v_first.as_ref(), &self.v0, &self.v1, &self.v2) {
            (0, _, _, _, _) => *v_first = Some(v.clone()),
            (_, Some(first), Some(v0), Some(v1), Some(v2)) => {
                let gate = sigmoid(row(v0) + f32(low_rank(xv, v1, v2, |z| z)));
                v = v.clone() + (first.clone() - v) * gate;
            }
            _ => unreachable!("layers after 0 are built with v0/v1/v2, layer 0 sets v_first"),
        }
        let a = sigmoid(row(&self.a0) + f32(low_rank(mix(&self.x_a), &self.a1, &self.a2, |z| z)));
        let g = low_rank(mix(&self.x_g), &self.g1, &self.g2, sigmoid);
        let heads = |z: Tensor<3>| z.reshape([b, t, h, n]);
        let kk = heads(k.clone() * row(&self.k_k));
        let norm = kk
            .clone()
            .powi_scalar(2)
            .sum_dim(3)
            .sqrt()
            .clamp_min(L2_NORM_EPS);
        let kk = kk / norm;
        let k = k * (a.clone().sub_scalar(1.0) * row(&self.k_a)).add_scalar(1.0);
        let (r, k, v, a) = (heads(r), heads(k), heads(v), heads(a));
        // The fused op (one node, kernels on Flex and Cube backends) unless the kernel policy
        // asks for the tensor-op formulation under Burn's autodiff. A single token (RNN
        // decoding) takes the plain step: the op's per-call overhead (gathering the heads,
        // packing the state) exceeds one token's work.
        let wkv = match kernel_policy().uses_ops() && t > 1 {
            true => disha_core::wkv::wkv7,
            false => wkv7_chunked,
        };
        let (y, s) = wkv(
            r.clone(),
            heads(w),
            k.clone(),
            v.clone(),
            kk.clone().neg(),
            kk * a,
            state.att_kv.clone(),
            chunk_len,
        );
        state.att_kv = s;
        // GroupNorm over each head's N channels (biased variance), then the per-channel affine.
        let mean = y.clone().mean_dim(3);
        let centered = y - mean;
        let var = centered.clone().powi_scalar(2).mean_dim(3);
        let y = (centered / var.add_scalar(GROUP_NORM_EPS).sqrt()).reshape([b, t, c])
            * row(&self.ln_x_weight)
            + row(&self.ln_x_bias);
        let bonus = (r * k * self.r_k.val().reshape([1, 1, h, n])).sum_dim(3) * v;
        self.output
            .forward((y + bonus.reshape([b, t, c])).cast(dtype) * g)
    }
}

/// The channel mix (`ffn`): `value(ReLU(key(x^k))²)`.
#[derive(Module, Debug)]
pub struct RwkvChannelMix {
    /// Token-shift lerp coefficient `[C]`.
    pub x_k: Param<Tensor<1>>,
    /// Up-projection `C → F`.
    pub key: AdaptedLinear,
    /// Down-projection `F → C`.
    pub value: AdaptedLinear,
}

impl RwkvChannelMix {
    fn forward(&self, x: Tensor<3>, state: &mut RwkvLayerState) -> Tensor<3> {
        let (delta, last) = token_shift(&x, state.ffn_x_prev.clone());
        state.ffn_x_prev = last;
        let mu = row_in(&self.x_k, x.dtype());
        let k = relu(self.key.forward(x + delta * mu)).powi_scalar(2);
        self.value.forward(k)
    }
}

/// One block: pre-LN time mix and pre-LN channel mix, each with a residual.
#[derive(Module, Debug)]
pub struct RwkvBlock {
    /// LayerNorm before the time mix.
    pub ln1: LayerNorm,
    /// LayerNorm before the channel mix.
    pub ln2: LayerNorm,
    /// Time mix.
    pub att: RwkvTimeMix,
    /// Channel mix.
    pub ffn: RwkvChannelMix,
}

/// An RWKV-7 ("x070") language model, every large linear (`att.receptance/key/value/output`,
/// `ffn.key/value`, and the head) an [`AdaptedLinear`] under its BlinkDL name
/// (`blocks.{L}.att.receptance`, …), as RWKV-PEFT names them.
///
/// Sequence (GPT) mode and RNN mode are the same computation: [`forward_with_state`]
/// (Self::forward_with_state) over any number of tokens continues a [`RwkvState`], so a
/// prompt prefilled in one call continues token by token.
///
/// # Shapes
/// - input ids: `[batch, seq]` (Int)
/// - logits: `[batch, seq, vocab]`
#[derive(Module, Debug)]
pub struct Rwkv7 {
    /// Token embeddings `[V, C]` (frozen).
    pub emb: Embedding,
    /// LayerNorm after the embedding (`blocks.0.ln0`).
    pub ln0: LayerNorm,
    /// Blocks.
    pub blocks: Vec<RwkvBlock>,
    /// Final LayerNorm.
    pub ln_out: LayerNorm,
    /// Output head `C → V` (untied).
    pub head: AdaptedLinear,
    #[module(skip)]
    config: RwkvConfig,
    #[module(skip)]
    wkv_chunk_len: usize,
    /// The dtype activations are computed in ([`with_compute_dtype`](Self::with_compute_dtype)).
    #[module(skip)]
    compute_dtype: DType,
}

impl Rwkv7 {
    /// Builds the model from `source` (BlinkDL keys and shapes, see
    /// [`RwkvConfig::tensor_shapes`]). Every base parameter is frozen.
    ///
    /// # Errors
    /// A missing tensor or a shape that disagrees with `config` (both named), a weight that is
    /// not finite, or tensors left over that belong to no module.
    pub fn from_source(
        config: &RwkvConfig,
        source: &mut dyn WeightSource,
        device: &Device,
    ) -> Result<Self> {
        let (v, c, f) = (config.vocab_size, config.hidden_size, config.ffn_size);
        let emb = Embedding {
            weight: frozen(base_matrix(source, "emb.weight", [v, c], device)?),
        };
        let ln0 = layer_norm(source, "blocks.0.ln0", c, device)?;
        let mut blocks = Vec::with_capacity(config.num_layers);
        for l in 0..config.num_layers {
            let p = |s: &str| format!("blocks.{l}.{s}");
            let has_v = l > 0 || config.layer0_value_residual;
            let (v0, v1, v2) = if has_v {
                (
                    Some(vector(source, &p("att.v0"), c, device)?),
                    Some(matrix(
                        source,
                        &p("att.v1"),
                        [c, config.value_rank],
                        device,
                    )?),
                    Some(matrix(
                        source,
                        &p("att.v2"),
                        [config.value_rank, c],
                        device,
                    )?),
                )
            } else {
                (None, None, None)
            };
            let att = RwkvTimeMix {
                x_r: vector(source, &p("att.x_r"), c, device)?,
                x_w: vector(source, &p("att.x_w"), c, device)?,
                x_k: vector(source, &p("att.x_k"), c, device)?,
                x_v: vector(source, &p("att.x_v"), c, device)?,
                x_a: vector(source, &p("att.x_a"), c, device)?,
                x_g: vector(source, &p("att.x_g"), c, device)?,
                w0: vector(source, &p("att.w0"), c, device)?,
                w1: matrix(source, &p("att.w1"), [c, config.decay_rank], device)?,
                w2: matrix(source, &p("att.w2"), [config.decay_rank, c], device)?,
                a0: vector(source, &p("att.a0"), c, device)?,
                a1: matrix(source, &p("att.a1"), [c, config.iclr_rank], device)?,
                a2: matrix(source, &p("att.a2"), [config.iclr_rank, c], device)?,
                v0,
                v1,
                v2,
                g1: matrix(source, &p("att.g1"), [c, config.gate_rank], device)?,
                g2: matrix(source, &p("att.g2"), [config.gate_rank, c], device)?,
                k_k: vector(source, &p("att.k_k"), c, device)?,
                k_a: vector(source, &p("att.k_a"), c, device)?,
                r_k: matrix(
                    source,
                    &p("att.r_k"),
                    [config.num_heads, config.head_size],
                    device,
                )?,
                receptance: linear(source, &p("att.receptance"), [c, c], false, device)?,
                key: linear(source, &p("att.key"), [c, c], false, device)?,
                value: linear(source, &p("att.value"), [c, c], false, device)?,
                output: linear(source, &p("att.output"), [c, c], false, device)?,
                ln_x_weight: frozen(device_tensor(
                    take(source, &p("att.ln_x.weight"), &[c])?,
                    device,
                )),
                ln_x_bias: frozen(device_tensor(
                    take(source, &p("att.ln_x.bias"), &[c])?,
                    device,
                )),
                layer: l,
            };
            let ffn = RwkvChannelMix {
                x_k: vector(source, &p("ffn.x_k"), c, device)?,
                key: linear(source, &p("ffn.key"), [f, c], false, device)?,
                value: linear(source, &p("ffn.value"), [c, f], false, device)?,
            };
            blocks.push(RwkvBlock {
                ln1: layer_norm(source, &p("ln1"), c, device)?,
                ln2: layer_norm(source, &p("ln2"), c, device)?,
                att,
                ffn,
            });
        }
        let ln_out = layer_norm(source, "ln_out", c, device)?;
        let head = dense_linear(source, "head", [v, c], false, device)?;
        check_all_taken(source)?;
        Ok(Self {
            emb,
            ln0,
            blocks,
            ln_out,
            head,
            config: config.clone(),
            wkv_chunk_len: DEFAULT_WKV_CHUNK_LEN,
            compute_dtype: DType::F32,
        })
    }

    /// Computes the activations in `dtype`: f32 (the default), or bf16 / f16 in the manner of
    /// BlinkDL's half-precision training (half tensors around a WKV kernel that sums in f32),
    /// with the recurrence's inputs kept in f32 too: the residual stream, the token-shift lerps
    /// and every projection (the adapted linears, the low-rank MLPs, the head) in that dtype;
    /// the LayerNorms computed in f32 and rounded once; the WKV recurrence with its inputs,
    /// decay, GroupNorm and bonus in f32 (the state is f32 in every dtype), rounded once before
    /// the output gate. The logits are returned in f32 (holding the rounded values); the
    /// carried state stays f32. Adapter terms are computed in f32 and rounded once, as in the
    /// Llama models. For inference and mixed-precision training (RWKV-7 chapter,
    /// "Half-precision compute").
    ///
    /// # Panics
    /// A dtype other than F32, BF16 or F16 (a programmer error).
    pub fn with_compute_dtype(mut self, dtype: DType) -> Self {
        assert!(
            matches!(dtype, DType::F32 | DType::BF16 | DType::F16),
            "Rwkv7::with_compute_dtype: {dtype:?} is not a float dtype to compute in"
        );
        self.compute_dtype = dtype;
        self
    }

    /// The dtype activations are computed in (f32 unless
    /// [`with_compute_dtype`](Self::with_compute_dtype) said otherwise).
    pub fn compute_dtype(&self) -> DType {
        self.compute_dtype
    }

    /// The dimensions.
    pub fn config(&self) -> &RwkvConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.emb.weight.device()
    }

    /// Tokens per WKV chunk in sequence mode (default 16; see [`wkv7_chunked`]).
    pub fn wkv_chunk_len(&self) -> usize {
        self.wkv_chunk_len
    }

    /// Sets the WKV chunk length: longer chunks do more work per chunk in parallel and keep
    /// fewer states; the result is the same up to f32 rounding.
    ///
    /// # Errors
    /// A length outside `1..=64` ([`MAX_WKV_CHUNK_LEN`](super::MAX_WKV_CHUNK_LEN)).
    pub fn set_wkv_chunk_len(&mut self, chunk_len: usize) -> Result<()> {
        if !(1..=MAX_WKV_CHUNK_LEN).contains(&chunk_len) {
            return Err(ModelError::InvalidArgument {
                name: "wkv_chunk_len".into(),
                value: chunk_len.to_string(),
                message: format!("must be in 1..={MAX_WKV_CHUNK_LEN}"),
            });
        }
        self.wkv_chunk_len = chunk_len;
        Ok(())
    }

    /// The zero state for `batch` sequences on the model's device.
    pub fn zero_state(&self, batch: usize) -> RwkvState {
        RwkvState::zeros(&self.config, batch, &self.device())
    }

    /// Logits for every position, from the zero state.
    ///
    /// # Shapes
    /// - input_ids: `[batch, seq]` → `[batch, seq, vocab]`
    pub fn forward(&self, input_ids: Tensor<2, Int>) -> Tensor<3> {
        let mut state = self.zero_state(input_ids.dims()[0]);
        self.forward_with_state(input_ids, &mut state)
    }

    /// Logits for every position, continuing `state` (which is advanced past the tokens).
    ///
    /// # Shapes
    /// - input_ids: `[batch, seq]` → `[batch, seq, vocab]`
    ///
    /// # Panics
    /// `state` is for another batch size (a programmer error).
    pub fn forward_with_state(
        &self,
        input_ids: Tensor<2, Int>,
        state: &mut RwkvState,
    ) -> Tensor<3> {
        self.head
            .forward(self.run(input_ids, state))
            .cast(DType::F32)
    }

    /// Logits of the last position only, continuing `state` (RNN-mode generation).
    ///
    /// # Shapes
    /// - input_ids: `[batch, new]` → `[batch, vocab]`
    pub fn forward_last(&self, input_ids: Tensor<2, Int>, state: &mut RwkvState) -> Tensor<2> {
        let h = self.run(input_ids, state);
        let [b, t, c] = h.dims();
        let logits = self.head.forward(h.narrow(1, t - 1, 1).reshape([b, c]));
        logits.cast(DType::F32).reshape([b, self.config.vocab_size])
    }

    /// Logits of packed rows: each sequence of `segments[b]` starts from the zero state (as if
    /// alone), and padding after the last one is run as its own sequence.
    ///
    /// # Shapes
    /// - input_ids: `[batch, seq]` → `[batch, seq, vocab]`
    ///
    /// # Panics
    /// `segments` has not one entry per row, or a row's lengths add up to more than `seq`.
    pub fn forward_packed(&self, input_ids: Tensor<2, Int>, segments: &[Vec<usize>]) -> Tensor<3> {
        let [batch, seq] = input_ids.dims();
        assert_eq!(segments.len(), batch, "one segment list per row");
        let rows = segments
            .iter()
            .enumerate()
            .map(|(b, lengths)| {
                let row = input_ids.clone().narrow(0, b, 1);
                let used: usize = lengths.iter().sum();
                assert!(used <= seq, "segments longer than the row");
                let mut start = 0;
                let mut pieces = Vec::new();
                for &len in lengths.iter().chain([seq - used].iter()) {
                    if len > 0 {
                        pieces.push(self.forward(row.clone().narrow(1, start, len)));
                        start += len;
                    }
                }
                Tensor::cat(pieces, 1)
            })
            .collect();
        Tensor::cat(rows, 0)
    }

    /// Embeddings through every block and `ln_out`, continuing `state`; the hidden states in
    /// the compute dtype.
    fn run(&self, input_ids: Tensor<2, Int>, state: &mut RwkvState) -> Tensor<3> {
        let [b, t] = input_ids.dims();
        assert_eq!(state.batch(), b, "the state's batch size");
        // The embedding rows (of any stored dtype) through `ln0` in f32, rounded once.
        let rows = self.emb.forward(input_ids).cast(DType::F32);
        let mut x = self.ln0.forward(rows).cast(self.compute_dtype);
        let mut v_first = None;
        for (block, layer) in self.blocks.iter().zip(state.layers.iter_mut()) {
            let xx = layer_norm_rounded(&block.ln1, x.clone());
            x = x + block
                .att
                .forward(xx, layer, &mut v_first, self.wkv_chunk_len);
            let xx = layer_norm_rounded(&block.ln2, x.clone());
            x = x + block.ffn.forward(xx, layer);
        }
        state.len += t;
        layer_norm_rounded(&self.ln_out, x)
    }

    /// Every tensor under its BlinkDL name and shape, adapters merged into the linears (the
    /// weights of a merged export), in [`RwkvConfig::tensor_shapes`] order.
    pub(crate) fn merged_tensors(&self, push: &mut dyn FnMut(String, Vec<usize>, Tensor<2>)) {
        let c = self.config.hidden_size;
        let vec3 = |p: &Param<Tensor<1>>| (vec![1, 1, c], p.val().reshape([1, c]));
        let flat = |p: &Param<Tensor<1>>| (vec![c], p.val().reshape([1, c]));
        let mat = |p: &Param<Tensor<2>>| (p.dims().to_vec(), p.val());
        // Burn keeps [in, out]; BlinkDL (PyTorch nn.Linear) stores [out, in].
        let lin = |l: &AdaptedLinear| {
            let w = l.merged_weight().transpose();
            (w.dims().to_vec(), w)
        };
        let mut put = |name: String, (shape, t): (Vec<usize>, Tensor<2>)| push(name, shape, t);
        put("emb.weight".into(), mat(&self.emb.weight));
        put("blocks.0.ln0.weight".into(), flat(&self.ln0.gamma));
        if let Some(beta) = &self.ln0.beta {
            put("blocks.0.ln0.bias".into(), flat(beta));
        }
        for (l, block) in self.blocks.iter().enumerate() {
            let p = |s: &str| format!("blocks.{l}.{s}");
            for (name, ln) in [("ln1", &block.ln1), ("ln2", &block.ln2)] {
                put(p(&format!("{name}.weight")), flat(&ln.gamma));
                if let Some(beta) = &ln.beta {
                    put(p(&format!("{name}.bias")), flat(beta));
                }
            }
            let a = &block.att;
            for (name, mu) in [
                ("x_r", &a.x_r),
                ("x_w", &a.x_w),
                ("x_k", &a.x_k),
                ("x_v", &a.x_v),
                ("x_a", &a.x_a),
                ("x_g", &a.x_g),
            ] {
                put(p(&format!("att.{name}")), vec3(mu));
            }
            put(p("att.w0"), vec3(&a.w0));
            put(p("att.w1"), mat(&a.w1));
            put(p("att.w2"), mat(&a.w2));
            put(p("att.a0"), vec3(&a.a0));
            put(p("att.a1"), mat(&a.a1));
            put(p("att.a2"), mat(&a.a2));
            if let (Some(v0), Some(v1), Some(v2)) = (&a.v0, &a.v1, &a.v2) {
                put(p("att.v0"), vec3(v0));
                put(p("att.v1"), mat(v1));
                put(p("att.v2"), mat(v2));
            }
            put(p("att.g1"), mat(&a.g1));
            put(p("att.g2"), mat(&a.g2));
            put(p("att.k_k"), vec3(&a.k_k));
            put(p("att.k_a"), vec3(&a.k_a));
            put(p("att.r_k"), mat(&a.r_k));
            put(p("att.receptance.weight"), lin(&a.receptance));
            put(p("att.key.weight"), lin(&a.key));
            put(p("att.value.weight"), lin(&a.value));
            put(p("att.output.weight"), lin(&a.output));
            put(p("att.ln_x.weight"), flat(&a.ln_x_weight));
            put(p("att.ln_x.bias"), flat(&a.ln_x_bias));
            put(p("ffn.x_k"), vec3(&block.ffn.x_k));
            put(p("ffn.key.weight"), lin(&block.ffn.key));
            put(p("ffn.value.weight"), lin(&block.ffn.value));
        }
        put("ln_out.weight".into(), flat(&self.ln_out.gamma));
        if let Some(beta) = &self.ln_out.beta {
            put("ln_out.bias".into(), flat(beta));
        }
        put("head.weight".into(), lin(&self.head));
    }
}

/// The adaptable linears of one block, with their BlinkDL names (RWKV-PEFT's targets).
pub const PROJECTION_NAMES: [&str; 6] = [
    "att.receptance",
    "att.key",
    "att.value",
    "att.output",
    "ffn.key",
    "ffn.value",
];

impl RwkvBlock {
    fn linears(&self) -> [&AdaptedLinear; 6] {
        let (a, f) = (&self.att, &self.ffn);
        [&a.receptance, &a.key, &a.value, &a.output, &f.key, &f.value]
    }

    fn linears_mut(&mut self) -> [&mut AdaptedLinear; 6] {
        let (a, f) = (&mut self.att, &mut self.ffn);
        [
            &mut a.receptance,
            &mut a.key,
            &mut a.value,
            &mut a.output,
            &mut f.key,
            &mut f.value,
        ]
    }
}

fn block_sites(l: usize) -> [LinearSite; 6] {
    PROJECTION_NAMES.map(|name| {
        let full = format!("blocks.{l}.{name}");
        LinearSite::hidden(full.clone(), full)
    })
}

impl AdaptableModel for Rwkv7 {
    fn visit_linears(&self, f: &mut dyn FnMut(&LinearSite, &AdaptedLinear)) {
        for (l, block) in self.blocks.iter().enumerate() {
            for (site, linear) in block_sites(l).iter().zip(block.linears()) {
                f(site, linear);
            }
        }
        f(&LinearSite::output_head("head", "head"), &self.head);
    }

    fn visit_linears_mut(&mut self, f: &mut dyn FnMut(&LinearSite, &mut AdaptedLinear)) {
        for (l, block) in self.blocks.iter_mut().enumerate() {
            for (site, linear) in block_sites(l).iter().zip(block.linears_mut()) {
                f(site, linear);
            }
        }
        f(&LinearSite::output_head("head", "head"), &mut self.head);
    }

    fn default_target_modules(&self) -> Option<Vec<String>> {
        // RWKV-PEFT's targets: the four time-mix linears and both channel-mix linears.
        Some(PROJECTION_NAMES.map(String::from).to_vec())
    }
}
