//! Recurrent inference state: per layer, the conv window and the SSM state.

use burn::tensor::backend::Backend;

use crate::mamba1::Mamba1State;
use crate::mamba2::Mamba2State;

#[derive(Debug, Clone)]
pub enum LayerState<B: Backend> {
    Mamba1(Mamba1State<B>),
    Mamba2(Mamba2State<B>),
}

impl<B: Backend> LayerState<B> {
    pub(crate) fn into_mamba2(self) -> Mamba2State<B> {
        match self {
            Self::Mamba2(s) => s,
            Self::Mamba1(_) => panic!("a Mamba1 layer state was passed to a Mamba2 layer"),
        }
    }
    pub(crate) fn into_mamba1(self) -> Mamba1State<B> {
        match self {
            Self::Mamba1(s) => s,
            Self::Mamba2(_) => panic!("a Mamba2 layer state was passed to a Mamba1 layer"),
        }
    }
}

/// The states of all layers after some prefix of the sequence. A forward pass with this cache
/// continues the sequence as if the prefix were prepended.
#[derive(Debug, Clone)]
pub struct ModelCache<B: Backend> {
    pub layers: Vec<LayerState<B>>,
}
