//! The values that cross every seam of the hot/cold expert split, in one crate that
//! `graph`, `ipc-proto`, `placement`, `expert-worker` and the daemon all depend on (it depends
//! on none of them, nor on ggml or processes):
//!
//! * [`ExpertSet`]: per layer, a set of expert ids of a model with `n_expert` experts — the
//!   experts a backend holds (hot), the ones a worker owns, a placement's hot or cold side;
//! * [`ExpertPairs`]: per token of a micro-batch, the experts it is routed to, flat — the
//!   cold (token, expert) pairs from the router's custom op through the `ColdExperts` seam to
//!   the `Eval` frame, whose layout (counts, ids) it is;
//! * [`RouteStats`]: per layer, per expert, the tokens routed to it — written by the graph
//!   (`--route-stats-out`), read by the placement (`profile:FILE`).

mod error;
mod pairs;
mod route_stats;
mod set;

pub use error::{ExpertsError, Result};
pub use pairs::ExpertPairs;
pub use route_stats::RouteStats;
pub use set::ExpertSet;
