//! # fp8lm-collectives: moving tensors between ranks
//!
//! Will own the `Communicator` trait (all-reduce, reduce-scatter, all-gather, broadcast,
//! barrier on f32/bf16/f16/FP8 buffers), its in-process (threads) and MPI implementations,
//! and the FP8-LM gradient all-reduce (automatic scaling, shared minimum scale, FP8 sum
//! with per-hop re-rounding).
