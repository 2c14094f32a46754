//! The RWKV-7 ("x070") family: BlinkDL checkpoints, sequence and RNN mode over one recurrent
//! state, every large linear adaptable under its BlinkDL name.

mod config;
mod model;
mod state;
mod wkv;

pub use config::{DECAY_SCALE, GROUP_NORM_EPS, L2_NORM_EPS, LAYER_NORM_EPS, RwkvConfig};
pub use model::{Rwkv7, RwkvBlock, RwkvChannelMix, RwkvTimeMix};
pub use state::{RwkvLayerState, RwkvState, RwkvStateData};
pub use wkv::wkv7;
