//! The subcommands: each parses its flags and drives the model, the engine or the server.
pub mod bench;
pub mod devices;
pub mod inspect;
pub mod logits;
pub mod run;
pub mod serve;
