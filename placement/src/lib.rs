//! Hot/cold expert placement: which routed experts live on the daemon's fast backend (hot)
//! and which run in CPU worker processes (cold), and how the cold ones are split over
//! workers. Pure functions of the model's shape (experts per layer, bytes per expert), the
//! options and optional routing statistics.
//!
//! Policies (`--experts-hot`):
//!
//! * `all` / `none`;
//! * `uniform:K`: experts `0..K` of every layer;
//! * `budget`: from a byte budget (`--expert-budget-mb`, or the device's free memory minus
//!   everything else: [`budget_from_device`]): `K = budget / Σ_layers bytes_per_expert` experts
//!   `0..K` in every layer, then one more expert per layer, layer 0 first, while the remainder
//!   holds it;
//! * `profile:FILE`: from a route-stats file ([`RouteStats`], the `experts` crate's): the
//!   (layer, expert) pairs by routed tokens per byte, most first (ties: lower layer, then lower
//!   id), each taken when it still fits in the budget;
//! * `adaptive[:RATIO]`: the starting placement of a hot set that follows the live routing
//!   (the graph's `Model::replace_experts` swaps experts between steps, keeping each layer's
//!   number of held experts): with RATIO `round(RATIO · n_expert)` experts per layer (the
//!   most routed ones when stats are given, ties: lower id, else `0..K`), without it the
//!   layers `budget` gives; `--adaptive-from FILE` (route stats) starts it instead from the
//!   most routed experts (with RATIO) or the `profile:FILE` placement. The cold executor must then hold every expert of a partly held
//!   layer: [`ExpertPlacement::executor_experts`].
//!
//! Then `--cpu-moe` makes everything cold and `--n-cpu-moe N` the experts of layers `0..N`.
//! A placement is written and read as the JSON of its hot [`ExpertSet`] (layer → ids).
//!
//! The daemon decides the placement; the graph loads the hot side, the workers the cold one.

use std::path::PathBuf;

use experts::ExpertSet;
pub use experts::RouteStats;

/// A policy, a budget, route stats or a placement file that cannot be used; each names the
/// bad value.
#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    #[error("placement policy {policy:?}: {reason}")]
    Policy { policy: String, reason: String },
    #[error(transparent)]
    Experts(#[from] experts::ExpertsError),
    #[error("expert workers: expected at least 1, found 0")]
    NoWorkers,
    #[error("--expert-budget-mb {0}: expected a finite number of MiB, at least 0")]
    Budget(f64),
}

pub type Result<T, E = PlacementError> = std::result::Result<T, E>;

/// What placement needs to know about a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelShape {
    pub n_expert: u32,
    /// Bytes of one routed expert of each layer (gate + up + down).
    pub expert_bytes: Vec<u64>,
}

impl ModelShape {
    pub fn n_layer(&self) -> u32 {
        self.expert_bytes.len() as u32
    }

    fn bytes(&self, layer: u32) -> u64 {
        self.expert_bytes[layer as usize]
    }
}

/// A hot-set policy (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub enum Policy {
    All,
    None,
    Uniform(u32),
    Budget,
    Profile(PathBuf),
    /// The starting ratio; None: from the budget.
    Adaptive(Option<f64>),
}

impl Policy {
    /// Whether the hot set follows the live routing.
    pub fn is_adaptive(&self) -> bool {
        matches!(self, Policy::Adaptive(_))
    }
}

impl std::str::FromStr for Policy {
    type Err = PlacementError;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |reason: &str| PlacementError::Policy { policy: s.to_string(), reason: reason.to_string() };
        let (name, arg) = match s.split_once(':') {
            Some((n, a)) => (n, Some(a)),
            None => (s, None),
        };
        match (name, arg) {
            ("all", None) => Ok(Policy::All),
            ("none", None) => Ok(Policy::None),
            ("budget", None) => Ok(Policy::Budget),
            ("uniform", Some(k)) => k.parse().map(Policy::Uniform).map_err(|_| bad("expected uniform:K with K an integer >= 0")),
            ("profile", Some(f)) if !f.is_empty() => Ok(Policy::Profile(PathBuf::from(f))),
            ("adaptive", None) => Ok(Policy::Adaptive(None)),
            ("adaptive", Some(r)) => match r.parse::<f64>() {
                Ok(r) if (0.0..=1.0).contains(&r) => Ok(Policy::Adaptive(Some(r))),
                _ => Err(bad("expected adaptive:RATIO with RATIO in [0, 1]")),
            },
            _ => Err(bad("expected all, none, uniform:K, budget, profile:FILE, adaptive or adaptive:RATIO")),
        }
    }
}

/// The budget for hot experts from the device: its free memory minus the non-expert weights,
/// the KV cache, the compute buffers and a reserve (0 when they do not fit).
pub fn budget_from_device(free: u64, other_weights: u64, kv_cache: u64, compute: u64, reserve: u64) -> u64 {
    free.saturating_sub(other_weights.saturating_add(kv_cache).saturating_add(compute).saturating_add(reserve))
}

/// Everything that decides a placement (the daemon's flags).
#[derive(Debug, Clone, PartialEq)]
pub struct PlacementOptions {
    pub policy: Policy,
    /// `--expert-budget-mb`, in bytes; overrides the device budget.
    pub budget_bytes: Option<u64>,
    pub cpu_moe: bool,
    pub n_cpu_moe: u32,
    /// `--adaptive-from FILE`: route stats an adaptive placement starts from.
    pub adaptive_from: Option<PathBuf>,
}

/// The placement flags, ready to flatten into a clap command.
#[derive(clap::Args, Debug, Clone)]
pub struct PlacementArgs {
    /// Hot experts: all, none, uniform:K, budget, profile:FILE (route stats), or adaptive[:RATIO]
    /// (starts from uniform RATIO · n_expert per layer, or from `budget`, and follows the
    /// live routing while serving).
    #[arg(long = "experts-hot", default_value = "all")]
    pub experts_hot: String,
    /// Byte budget for hot experts, MiB, fractions allowed (default for
    /// budget/profile/adaptive: free device memory minus weights, KV cache, compute buffers
    /// and a reserve).
    #[arg(long = "expert-budget-mb")]
    pub expert_budget_mb: Option<f64>,
    /// Every routed expert cold (computed by the CPU workers).
    #[arg(long = "cpu-moe")]
    pub cpu_moe: bool,
    /// Every routed expert of the first N layers cold.
    #[arg(long = "n-cpu-moe", default_value_t = 0)]
    pub n_cpu_moe: u32,
    /// With `--experts-hot adaptive[:RATIO]`: start from these route stats (as
    /// `--route-stats-out` writes them) instead of `uniform`/`budget`: the RATIO · n_expert
    /// most routed experts per layer, or without RATIO the `profile:FILE` placement.
    #[arg(long = "adaptive-from", value_name = "FILE")]
    pub adaptive_from: Option<PathBuf>,
}

impl PlacementArgs {
    pub fn options(&self) -> Result<PlacementOptions> {
        Ok(PlacementOptions {
            policy: self.experts_hot.parse()?,
            budget_bytes: self.expert_budget_mb.map(budget_bytes).transpose()?,
            cpu_moe: self.cpu_moe,
            n_cpu_moe: self.n_cpu_moe,
            adaptive_from: self.adaptive_from.clone(),
        })
    }
}

/// `--expert-budget-mb` in bytes (rounded down; saturating at `u64::MAX`).
fn budget_bytes(mb: f64) -> Result<u64> {
    if !mb.is_finite() || mb < 0.0 {
        return Err(PlacementError::Budget(mb));
    }
    // `as` saturates at u64::MAX.
    Ok((mb * f64::from(1u32 << 20)) as u64)
}

/// Per layer, the hot experts; the rest are cold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertPlacement {
    hot: ExpertSet,
}

impl ExpertPlacement {
    pub fn from_hot(hot: ExpertSet) -> Self {
        ExpertPlacement { hot }
    }

    pub fn all(shape: &ModelShape) -> Self {
        Self::from_hot(ExpertSet::full(shape.n_layer(), shape.n_expert))
    }

    pub fn none(shape: &ModelShape) -> Self {
        Self::from_hot(ExpertSet::empty(shape.n_layer(), shape.n_expert))
    }

    /// Experts `0..k` of every layer.
    pub fn uniform(shape: &ModelShape, k: u32) -> Result<Self> {
        if k > shape.n_expert {
            return Err(PlacementError::Policy {
                policy: format!("uniform:{k}"),
                reason: format!("K must be at most the model's {} experts", shape.n_expert),
            });
        }
        Ok(Self::from_hot(ExpertSet::from_fn(shape.n_layer(), shape.n_expert, |_, e| e < k)))
    }

    /// `K = budget / Σ bytes` experts per layer, then one more per layer (layer 0 first)
    /// while the remainder holds it.
    pub fn budget(shape: &ModelShape, budget: u64) -> Self {
        let per_layer: u64 = shape.expert_bytes.iter().sum();
        let k = budget.checked_div(per_layer).unwrap_or(u64::MAX).min(u64::from(shape.n_expert)) as u32;
        let mut left = budget - per_layer * u64::from(k);
        let per_layer_k: Vec<u32> = (0..shape.n_layer())
            .map(|l| {
                let mut n = k;
                if n < shape.n_expert && shape.bytes(l) <= left {
                    left -= shape.bytes(l);
                    n += 1;
                }
                n
            })
            .collect();
        Self::from_hot(ExpertSet::from_fn(shape.n_layer(), shape.n_expert, |l, e| e < per_layer_k[l as usize]))
    }

    /// Greedy by routed tokens per byte (most first; ties: lower layer, lower id); an item
    /// that does not fit in what is left is skipped.
    pub fn profile(shape: &ModelShape, stats: &RouteStats, budget: u64) -> Self {
        let mut items: Vec<(u32, u32, u64, u64)> = (0..shape.n_layer())
            .flat_map(|l| (0..shape.n_expert).map(move |e| (l, e)))
            .map(|(l, e)| (l, e, stats.count(l, e), shape.bytes(l)))
            .collect();
        // a.count / a.bytes > b.count / b.bytes  <=>  a.count * b.bytes > b.count * a.bytes
        items.sort_by(|a, b| {
            let (x, y) = (u128::from(a.2) * u128::from(b.3), u128::from(b.2) * u128::from(a.3));
            y.cmp(&x).then(a.0.cmp(&b.0)).then(a.1.cmp(&b.1))
        });
        let mut held = vec![vec![false; shape.n_expert as usize]; shape.n_layer() as usize];
        let mut left = budget;
        for (l, e, _, bytes) in items {
            if bytes <= left {
                left -= bytes;
                held[l as usize][e as usize] = true;
            }
        }
        Self::from_hot(ExpertSet::from_fn(shape.n_layer(), shape.n_expert, |l, e| held[l as usize][e as usize]))
    }

    /// `round(ratio · n_expert)` experts per layer: the most routed (ties: lower id) with
    /// stats, else `0..K`.
    pub fn adaptive(shape: &ModelShape, ratio: f64, stats: Option<&RouteStats>) -> Result<Self> {
        if !(0.0..=1.0).contains(&ratio) {
            return Err(PlacementError::Policy { policy: format!("adaptive:{ratio}"), reason: "RATIO must be in [0, 1]".into() });
        }
        let k = (ratio * f64::from(shape.n_expert)).round() as usize;
        let held: Vec<Vec<bool>> = (0..shape.n_layer())
            .map(|l| {
                let mut ids: Vec<u32> = (0..shape.n_expert).collect();
                if let Some(s) = stats {
                    ids.sort_by(|&a, &b| s.count(l, b).cmp(&s.count(l, a)).then(a.cmp(&b)));
                }
                let mut held = vec![false; shape.n_expert as usize];
                for &e in &ids[..k] {
                    held[e as usize] = true;
                }
                held
            })
            .collect();
        Ok(Self::from_hot(ExpertSet::from_fn(shape.n_layer(), shape.n_expert, |l, e| held[l as usize][e as usize])))
    }

    /// The placement the options ask for. `device_budget` (see [`budget_from_device`]) is
    /// used by `budget`, `profile` and `adaptive` (without RATIO) when no
    /// `--expert-budget-mb` is given.
    pub fn resolve(shape: &ModelShape, opts: &PlacementOptions, device_budget: Option<u64>) -> Result<Self> {
        if opts.adaptive_from.is_some() && !opts.policy.is_adaptive() {
            return Err(PlacementError::Policy { policy: format!("{:?}", opts.policy), reason: "--adaptive-from needs --experts-hot adaptive[:RATIO]".into() });
        }
        let budget = |what: &str| {
            opts.budget_bytes.or(device_budget).ok_or_else(|| PlacementError::Policy {
                policy: what.to_string(),
                reason: "needs --expert-budget-mb or a device to take the budget from".into(),
            })
        };
        let mut p = match &opts.policy {
            Policy::All => Self::all(shape),
            Policy::None => Self::none(shape),
            Policy::Uniform(k) => Self::uniform(shape, *k)?,
            Policy::Budget => Self::budget(shape, budget("budget")?),
            Policy::Profile(file) => {
                let stats = RouteStats::read_json(file, shape.n_layer(), shape.n_expert)?;
                Self::profile(shape, &stats, budget(&format!("profile:{}", file.display()))?)
            }
            Policy::Adaptive(r) => {
                let stats = match &opts.adaptive_from {
                    Some(file) => Some(RouteStats::read_json(file, shape.n_layer(), shape.n_expert)?),
                    None => None,
                };
                match (r, stats) {
                    (Some(r), stats) => Self::adaptive(shape, *r, stats.as_ref())?,
                    (None, Some(stats)) => Self::profile(shape, &stats, budget("adaptive")?),
                    (None, None) => Self::budget(shape, budget("adaptive")?),
                }
            }
        };
        p.apply_cpu_moe(opts.cpu_moe, opts.n_cpu_moe);
        Ok(p)
    }

    /// `--cpu-moe` (everything cold) and `--n-cpu-moe N` (layers `0..N` cold).
    pub fn apply_cpu_moe(&mut self, cpu_moe: bool, n_cpu_moe: u32) {
        let n = if cpu_moe { self.hot.n_layer() } else { n_cpu_moe.min(self.hot.n_layer()) };
        for l in 0..n {
            self.hot.clear_layer(l);
        }
    }

    /// Make cold every layer that holds some but fewer than `min` experts (a partly held
    /// layer must hold at least as many experts as a token uses); returns those layers.
    pub fn drop_layers_below(&mut self, min: usize) -> Vec<u32> {
        let small: Vec<u32> = (0..self.hot.n_layer()).filter(|&l| (1..min).contains(&self.hot.layer(l).len())).collect();
        for &l in &small {
            self.hot.clear_layer(l);
        }
        small
    }

    pub fn hot(&self) -> &ExpertSet {
        &self.hot
    }

    pub fn cold(&self) -> ExpertSet {
        self.hot.complement()
    }

    /// What the cold executor must be able to compute: the cold experts, or under an adaptive
    /// placement (where any expert of a partly held layer may become cold) every expert of
    /// each layer not wholly held.
    pub fn executor_experts(&self, adaptive: bool) -> ExpertSet {
        if adaptive {
            ExpertSet::from_fn(self.hot.n_layer(), self.hot.n_expert(), |l, _| !self.hot.is_full_layer(l))
        } else {
            self.cold()
        }
    }

    pub fn is_hot(&self, layer: u32, expert: u32) -> bool {
        self.hot.contains(layer, expert)
    }

    /// Bytes of the hot experts.
    pub fn hot_bytes(&self, shape: &ModelShape) -> u64 {
        set_bytes(&self.hot, shape)
    }

    pub fn to_json(&self) -> String {
        self.hot.to_json()
    }

    pub fn from_json(text: &str, shape: &ModelShape, what: &str) -> Result<Self> {
        Ok(Self::from_hot(ExpertSet::from_json(text, shape.n_layer(), shape.n_expert, what)?))
    }
}

fn set_bytes(m: &ExpertSet, shape: &ModelShape) -> u64 {
    (0..m.n_layer()).map(|l| m.layer(l).len() as u64 * shape.bytes(l)).sum()
}

/// Splits `cold` over `workers` workers balanced by bytes: layer by layer, each expert in id
/// order goes to the worker holding the fewest bytes so far (ties: lower worker index), which
/// also spreads every layer's experts over the workers.
pub fn split_cold(cold: &ExpertSet, shape: &ModelShape, workers: usize) -> Result<Vec<ExpertSet>> {
    if workers == 0 {
        return Err(PlacementError::NoWorkers);
    }
    // owner[l][e]: the worker that computes cold expert e of layer l.
    let mut owner = vec![vec![None; cold.n_expert() as usize]; cold.n_layer() as usize];
    let mut bytes = vec![0u64; workers];
    for l in 0..cold.n_layer() {
        for &e in cold.layer(l) {
            let w = (0..workers).min_by_key(|&w| (bytes[w], w)).unwrap_or(0);
            bytes[w] += shape.bytes(l);
            owner[l as usize][e as usize] = Some(w);
        }
    }
    Ok((0..workers).map(|w| ExpertSet::from_fn(cold.n_layer(), cold.n_expert(), |l, e| owner[l as usize][e as usize] == Some(w))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 3 layers of 4 experts; one expert is 100, 100, 200 bytes.
    fn shape() -> ModelShape {
        ModelShape { n_expert: 4, expert_bytes: vec![100, 100, 200] }
    }

    fn stats() -> RouteStats {
        RouteStats::from_counts(vec![vec![10, 0, 5, 1], vec![3, 3, 0, 0], vec![40, 2, 0, 0]])
    }

    fn layers(p: &ExpertPlacement) -> Vec<Vec<u32>> {
        p.hot().layers().to_vec()
    }

    #[test]
    fn policy_parsing() {
        assert_eq!("all".parse::<Policy>().unwrap(), Policy::All);
        assert_eq!("uniform:8".parse::<Policy>().unwrap(), Policy::Uniform(8));
        assert_eq!("profile:r.json".parse::<Policy>().unwrap(), Policy::Profile("r.json".into()));
        assert_eq!("adaptive:0.25".parse::<Policy>().unwrap(), Policy::Adaptive(Some(0.25)));
        assert_eq!("adaptive".parse::<Policy>().unwrap(), Policy::Adaptive(None));
        for bad in ["uniform", "uniform:-1", "adaptive:1.5", "profile:", "hot", "all:1"] {
            let e = bad.parse::<Policy>().unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn all_and_none() {
        assert_eq!(layers(&ExpertPlacement::all(&shape())), vec![vec![0, 1, 2, 3]; 3]);
        assert!(ExpertPlacement::none(&shape()).hot().is_empty());
        assert_eq!(ExpertPlacement::none(&shape()).cold(), ExpertSet::full(3, 4));
    }

    #[test]
    fn uniform() {
        assert_eq!(layers(&ExpertPlacement::uniform(&shape(), 2).unwrap()), vec![vec![0, 1]; 3]);
        let e = ExpertPlacement::uniform(&shape(), 5).unwrap_err().to_string();
        assert!(e.contains("uniform:5") && e.contains("at most the model's 4"), "{e}");
    }

    #[test]
    fn budget() {
        // 400 bytes per layer-wide expert: 850 -> K = 2, 50 left holds nothing more.
        assert_eq!(layers(&ExpertPlacement::budget(&shape(), 850)), vec![vec![0, 1]; 3]);
        // 1000 -> K = 2, 200 left: one more in layer 0 (100) and layer 1 (100).
        assert_eq!(layers(&ExpertPlacement::budget(&shape(), 1000)), vec![vec![0, 1, 2], vec![0, 1, 2], vec![0, 1]]);
        // 1250 -> K = 3, 50 left.
        assert_eq!(ExpertPlacement::budget(&shape(), 1250).hot_bytes(&shape()), 1200);
        assert_eq!(ExpertPlacement::budget(&shape(), 99), ExpertPlacement::none(&shape()));
        assert_eq!(ExpertPlacement::budget(&shape(), 1 << 40), ExpertPlacement::all(&shape()));
        assert_eq!(budget_from_device(10_000, 3000, 1000, 500, 1000), 4500);
        assert_eq!(budget_from_device(1000, 3000, 1000, 500, 1000), 0);
    }

    #[test]
    fn layers_holding_fewer_than_k_experts_go_cold() {
        // 1000 -> [0, 1, 2], [0, 1, 2], [0, 1]; with k = 3 the last layer goes cold.
        let mut p = ExpertPlacement::budget(&shape(), 1000);
        assert_eq!(p.drop_layers_below(3), vec![2]);
        assert_eq!(layers(&p), vec![vec![0, 1, 2], vec![0, 1, 2], vec![]]);
        // Full and empty layers stay as they are.
        let mut all = ExpertPlacement::all(&shape());
        assert!(all.drop_layers_below(4).is_empty());
        assert_eq!(all, ExpertPlacement::all(&shape()));
    }

    #[test]
    fn profile() {
        // Tokens per byte: L2e0 .2, L0e0 .1, L0e2 .05, L1e0 .03, L1e1 .03, L0e3 .01, L2e1 .01, zeros.
        let p = ExpertPlacement::profile(&shape(), &stats(), 500);
        assert_eq!(layers(&p), vec![vec![0, 2], vec![0], vec![0]]);
        let p = ExpertPlacement::profile(&shape(), &stats(), 650);
        assert_eq!(layers(&p), vec![vec![0, 2], vec![0, 1], vec![0]]);
        // 350: L2e0 (150 left), L0e0 (50 left); nothing else fits.
        let p = ExpertPlacement::profile(&shape(), &stats(), 350);
        assert_eq!(layers(&p), vec![vec![0], vec![], vec![0]]);
        // 700: after L1e1 100 are left: L0e3 takes them; L2e1 and the zeros no longer fit.
        let p = ExpertPlacement::profile(&shape(), &stats(), 700);
        assert_eq!(layers(&p), vec![vec![0, 2, 3], vec![0, 1], vec![0]]);
        assert_eq!(ExpertPlacement::profile(&shape(), &stats(), 1600), ExpertPlacement::all(&shape()));
    }

    #[test]
    fn adaptive() {
        let p = ExpertPlacement::adaptive(&shape(), 0.5, Some(&stats())).unwrap();
        assert_eq!(layers(&p), vec![vec![0, 2], vec![0, 1], vec![0, 1]]);
        let p = ExpertPlacement::adaptive(&shape(), 0.3, None).unwrap();
        assert_eq!(layers(&p), vec![vec![0]; 3]);
        assert!(ExpertPlacement::adaptive(&shape(), 1.5, None).is_err());
    }

    #[test]
    fn adaptive_starts_from_the_ratio_or_the_budget_and_its_executor_holds_partly_held_layers() {
        let opts = |policy, budget_bytes| PlacementOptions { policy, budget_bytes, cpu_moe: false, n_cpu_moe: 1, adaptive_from: None };
        let p = ExpertPlacement::resolve(&shape(), &opts(Policy::Adaptive(Some(0.5)), None), None).unwrap();
        assert_eq!(layers(&p), vec![vec![], vec![0, 1], vec![0, 1]]);
        let p = ExpertPlacement::resolve(&shape(), &opts(Policy::Adaptive(None), Some(1000)), None).unwrap();
        assert_eq!(layers(&p), vec![vec![], vec![0, 1, 2], vec![0, 1]]);
        let e = ExpertPlacement::resolve(&shape(), &opts(Policy::Adaptive(None), None), None).unwrap_err().to_string();
        assert!(e.contains("\"adaptive\"") && e.contains("--expert-budget-mb"), "{e}");
        // Layer 0 all cold, 1 and 2 partly held: the executor holds all of their experts.
        assert_eq!(p.executor_experts(false).layers(), &[vec![0, 1, 2, 3], vec![3], vec![2, 3]]);
        assert_eq!(p.executor_experts(true), ExpertSet::full(3, 4));
        let mut full = ExpertPlacement::all(&shape());
        full.apply_cpu_moe(false, 1);
        assert_eq!(full.executor_experts(true).layers(), &[vec![0, 1, 2, 3], vec![], vec![]]);
        assert!("adaptive".parse::<Policy>().unwrap().is_adaptive() && !Policy::Budget.is_adaptive());

        // --adaptive-from: the most routed per layer with RATIO, the profile without.
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("stats.json");
        std::fs::write(&f, stats().to_json()).unwrap();
        let from = |policy, budget_bytes, file: Option<PathBuf>| PlacementOptions { policy, budget_bytes, cpu_moe: false, n_cpu_moe: 0, adaptive_from: file };
        let p = ExpertPlacement::resolve(&shape(), &from(Policy::Adaptive(Some(0.5)), None, Some(f.clone())), None).unwrap();
        assert_eq!(p, ExpertPlacement::adaptive(&shape(), 0.5, Some(&stats())).unwrap());
        let p = ExpertPlacement::resolve(&shape(), &from(Policy::Adaptive(None), Some(650), Some(f.clone())), None).unwrap();
        assert_eq!(p, ExpertPlacement::profile(&shape(), &stats(), 650));
        let e = ExpertPlacement::resolve(&shape(), &from(Policy::Budget, Some(650), Some(f)), None).unwrap_err().to_string();
        assert!(e.contains("--adaptive-from needs --experts-hot adaptive"), "{e}");
    }

    #[test]
    fn cpu_moe_flags_and_resolve() {
        let opts = |policy, cpu_moe, n_cpu_moe| PlacementOptions { policy, budget_bytes: None, cpu_moe, n_cpu_moe, adaptive_from: None };
        let p = ExpertPlacement::resolve(&shape(), &opts(Policy::All, true, 0), None).unwrap();
        assert!(p.hot().is_empty());
        let p = ExpertPlacement::resolve(&shape(), &opts(Policy::All, false, 2), None).unwrap();
        assert_eq!(layers(&p), vec![vec![], vec![], vec![0, 1, 2, 3]]);
        let p = ExpertPlacement::resolve(&shape(), &opts(Policy::All, false, 9), None).unwrap();
        assert!(p.hot().is_empty());
        let e = ExpertPlacement::resolve(&shape(), &opts(Policy::Budget, false, 0), None).unwrap_err().to_string();
        assert!(e.contains("--expert-budget-mb"), "{e}");
        let p = ExpertPlacement::resolve(&shape(), &opts(Policy::Budget, false, 0), Some(1000)).unwrap();
        assert_eq!(p, ExpertPlacement::budget(&shape(), 1000));
        let mut o = opts(Policy::Budget, false, 0);
        o.budget_bytes = Some(850);
        assert_eq!(ExpertPlacement::resolve(&shape(), &o, Some(1000)).unwrap(), ExpertPlacement::budget(&shape(), 850));

        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("stats.json");
        std::fs::write(&f, stats().to_json()).unwrap();
        let mut o = opts(Policy::Profile(f.clone()), false, 0);
        o.budget_bytes = Some(500);
        assert_eq!(layers(&ExpertPlacement::resolve(&shape(), &o, None).unwrap()), vec![vec![0, 2], vec![0], vec![0]]);
        std::fs::write(&f, r#"{"0": [1, 2, 3]}"#).unwrap();
        let e = ExpertPlacement::resolve(&shape(), &o, None).unwrap_err().to_string();
        assert!(e.contains("expected 4 counts") && e.contains("found 3"), "{e}");
    }

    #[test]
    fn budget_flag_in_mib_with_fractions() {
        let args = |mb: f64| PlacementArgs { experts_hot: "budget".into(), expert_budget_mb: Some(mb), cpu_moe: false, n_cpu_moe: 0, adaptive_from: None };
        assert_eq!(args(1.0).options().unwrap().budget_bytes, Some(1 << 20));
        assert_eq!(args(0.25).options().unwrap().budget_bytes, Some(1 << 18));
        assert_eq!(args(0.0).options().unwrap().budget_bytes, Some(0));
        for bad in [-1.0, f64::NAN, f64::INFINITY] {
            let e = args(bad).options().unwrap_err().to_string();
            assert!(e.contains("--expert-budget-mb") && e.contains("finite number of MiB"), "{e}");
        }
    }

    #[test]
    fn json_round_trip() {
        let p = ExpertPlacement::profile(&shape(), &stats(), 650);
        assert_eq!(p.to_json(), r#"{"0":[0,2],"1":[0,1],"2":[0]}"#);
        assert_eq!(ExpertPlacement::from_json(&p.to_json(), &shape(), "t").unwrap(), p);
        assert_eq!(RouteStats::from_json(&stats().to_json(), 3, 4, "t").unwrap(), stats());
    }

    #[test]
    fn split_cold_balances_bytes() {
        let cold = ExpertSet::from_layers(4, vec![vec![0, 1, 2, 3], vec![1], vec![0, 1]]).unwrap();
        let w = split_cold(&cold, &shape(), 2).unwrap();
        assert_eq!(w[0].layers(), &[vec![0, 2], vec![1], vec![1]]);
        assert_eq!(w[1].layers(), &[vec![1, 3], vec![], vec![0]]);
        assert_eq!((set_bytes(&w[0], &shape()), set_bytes(&w[1], &shape())), (500, 400));
        assert_eq!(split_cold(&cold, &shape(), 1).unwrap(), vec![cold.clone()]);
        let w = split_cold(&cold, &shape(), 4).unwrap();
        assert_eq!(w.iter().map(|m| set_bytes(m, &shape())).collect::<Vec<_>>(), vec![200, 300, 300, 100]);
        assert!(split_cold(&cold, &shape(), 0).is_err());
    }
}
