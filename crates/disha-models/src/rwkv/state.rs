//! The RWKV-7 recurrent state: what RNN mode carries from one token to the next.

use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::config::RwkvConfig;
use crate::error::{ModelError, Result};

/// One block's state.
///
/// # Shapes
/// - `att_x_prev`, `ffn_x_prev`: `[batch, C]`
/// - `att_kv`: `[batch, H, N, N]`, indexed `[b, head, value i, key j]`
#[derive(Clone, Debug)]
pub struct RwkvLayerState {
    /// The time mix's normalized input (LN1 output) of the last token.
    pub att_x_prev: Tensor<2>,
    /// The WKV state `S`.
    pub att_kv: Tensor<4>,
    /// The channel mix's normalized input (LN2 output) of the last token.
    pub ffn_x_prev: Tensor<2>,
}

/// The state of every block; the zero state starts a sequence. Feeding a sequence in one call,
/// one token per call or in chunks with the state carried gives the same logits and state.
#[derive(Clone, Debug)]
pub struct RwkvState {
    /// Per block, in order.
    pub layers: Vec<RwkvLayerState>,
    /// Tokens processed since the zero state.
    pub len: usize,
}

/// [`RwkvState`] on the host, for serde (a prompt's state saved and resumed later).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RwkvStateData {
    /// `[batch, H, N]` of the model the state belongs to.
    pub batch: usize,
    /// Heads.
    pub num_heads: usize,
    /// Channels per head.
    pub head_size: usize,
    /// Tokens processed.
    pub len: usize,
    /// Per block: `att_x_prev`, `att_kv`, `ffn_x_prev`, row-major f32.
    pub layers: Vec<[Vec<f32>; 3]>,
}

impl RwkvState {
    /// The zero state of `config` for `batch` sequences.
    pub fn zeros(config: &RwkvConfig, batch: usize, device: &Device) -> Self {
        let (c, h, n) = (config.hidden_size, config.num_heads, config.head_size);
        Self {
            layers: (0..config.num_layers)
                .map(|_| RwkvLayerState {
                    att_x_prev: Tensor::zeros([batch, c], device),
                    att_kv: Tensor::zeros([batch, h, n, n], device),
                    ffn_x_prev: Tensor::zeros([batch, c], device),
                })
                .collect(),
            len: 0,
        }
    }

    /// Sequences in the batch.
    pub fn batch(&self) -> usize {
        self.layers.first().map_or(0, |l| l.att_x_prev.dims()[0])
    }

    /// The state on the host.
    pub fn to_data(&self) -> RwkvStateData {
        let host = |t: TensorData| t.try_to_vec::<f32>().expect("the state is f32");
        let [batch, num_heads, head_size, _] =
            self.layers.first().map_or([0; 4], |l| l.att_kv.dims());
        RwkvStateData {
            batch,
            num_heads,
            head_size,
            len: self.len,
            layers: self
                .layers
                .iter()
                .map(|l| {
                    [
                        host(l.att_x_prev.to_data()),
                        host(l.att_kv.to_data()),
                        host(l.ffn_x_prev.to_data()),
                    ]
                })
                .collect(),
        }
    }

    /// A state read back from [`to_data`](Self::to_data), checked against `config`.
    ///
    /// # Errors
    /// [`ModelError::InvalidArgument`] when the state's layer count, heads, head size or any
    /// tensor's length do not belong to `config`, or a value is not finite.
    pub fn from_data(data: &RwkvStateData, config: &RwkvConfig, device: &Device) -> Result<Self> {
        let bad = |what: String| ModelError::invalid("RWKV state", what, "does not fit the model");
        if data.layers.len() != config.num_layers
            || data.num_heads != config.num_heads
            || data.head_size != config.head_size
        {
            return Err(bad(format!(
                "{} layers of {} heads × {}",
                data.layers.len(),
                data.num_heads,
                data.head_size
            )));
        }
        let (b, c, h, n) = (
            data.batch,
            config.hidden_size,
            config.num_heads,
            config.head_size,
        );
        let mut layers = Vec::with_capacity(data.layers.len());
        for (i, [x_att, kv, x_ffn]) in data.layers.iter().enumerate() {
            let expected = [b * c, b * h * n * n, b * c];
            let lengths = [x_att.len(), kv.len(), x_ffn.len()];
            if lengths != expected {
                return Err(bad(format!(
                    "layer {i}: lengths {lengths:?}, expected {expected:?}"
                )));
            }
            if [x_att, kv, x_ffn]
                .iter()
                .any(|v| v.iter().any(|x| !x.is_finite()))
            {
                return Err(bad(format!("layer {i}: a value that is not finite")));
            }
            layers.push(RwkvLayerState {
                att_x_prev: Tensor::from_data(TensorData::new(x_att.clone(), [b, c]), device),
                att_kv: Tensor::from_data(TensorData::new(kv.clone(), [b, h, n, n]), device),
                ffn_x_prev: Tensor::from_data(TensorData::new(x_ffn.clone(), [b, c]), device),
            });
        }
        Ok(Self {
            layers,
            len: data.len,
        })
    }
}
