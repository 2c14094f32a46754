//! The RWKV-7 ("x070") family: BlinkDL checkpoints, sequence and RNN mode over one recurrent
//! state, every large linear adaptable under its BlinkDL name.

mod base_tensors;
mod config;
mod cpp_file;
mod model;
mod peft;
mod state;
mod wkv;

pub use config::{DECAY_SCALE, GROUP_NORM_EPS, L2_NORM_EPS, LAYER_NORM_EPS, RwkvConfig};
pub use cpp_file::{RWKV_CPP_MAGIC, RwkvCppWeights, is_rwkv_cpp};
pub use model::{PROJECTION_NAMES, Rwkv7, RwkvBlock, RwkvChannelMix, RwkvTimeMix};
pub use peft::{ADAPTER_SUFFIXES, RwkvPeftCheckpoint, RwkvPeftLoaded};
pub use state::{RwkvLayerState, RwkvState, RwkvStateData};
pub use wkv::{DEFAULT_WKV_CHUNK_LEN, MAX_WKV_CHUNK_LEN, wkv7, wkv7_chunked};
