//! `dflash --backend-ipc-mode=moe-expert --model M --socket PATH --experts SPEC [--threads T]`.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Parser, ValueEnum};

use crate::error::Result;

/// The flag that turns the `dflash` binary into a worker.
pub const MODE_FLAG: &str = "--backend-ipc-mode";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum IpcMode {
    /// Serve a subset of the routed experts on the CPU to a daemon.
    MoeExpert,
}

/// A moe-expert worker process (normally spawned by the daemon; runnable by hand).
#[derive(Parser, Debug)]
#[command(name = "dflash --backend-ipc-mode=moe-expert", version)]
pub struct WorkerArgs {
    /// Worker kind.
    #[arg(long = "backend-ipc-mode", value_enum)]
    pub mode: IpcMode,
    /// The deepseek4 GGUF (the daemon's model: checked at the handshake).
    #[arg(long)]
    pub model: PathBuf,
    /// Unix socket to listen on (its directory should be private, mode 0700).
    #[arg(long)]
    pub socket: PathBuf,
    /// Experts to serve: `all`, `IDS` (every layer, e.g. `0-15`), `LAYERS:IDS;...`
    /// (e.g. `0-2:0-7;3:1,5`), or a `.json` file of layer -> ids.
    #[arg(long)]
    pub experts: String,
    /// CPU threads for the expert compute (default: available cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Pin the worker (its compute threads included) to these CPUs (`0-3,8`), before it
    /// loads its experts (which are then allocated on those CPUs' NUMA node).
    #[arg(long, conflicts_with = "numa_node")]
    pub cpus: Option<String>,
    /// Pin the worker to the CPUs of this NUMA node (and so its memory to that node).
    #[arg(long = "numa-node")]
    pub numa_node: Option<usize>,
    /// Spin this many microseconds on the socket before blocking while waiting for the next
    /// request (lower latency when the worker has a core to itself).
    #[arg(long = "spin-us", default_value_t = 0)]
    pub spin_us: u64,
}

/// Whether the command line asks for a worker (`--backend-ipc-mode` anywhere).
pub fn is_worker_invocation<I, T>(args: I) -> bool
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    args.into_iter().any(|a| {
        let a: OsString = a.into();
        let s = a.to_string_lossy();
        s == MODE_FLAG || s.starts_with(&format!("{MODE_FLAG}="))
    })
}

/// Parses the worker command line (clap exits on `--help` or a usage error), opens the
/// model, resolves the expert spec against it and runs the worker until Shutdown or EOF.
pub fn cli_main<I, T>(args: I) -> Result<()>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let a = WorkerArgs::parse_from(args);
    // Before anything starts a thread or touches the expert memory.
    let pin = match (&a.cpus, a.numa_node) {
        (Some(list), _) => Some(crate::pinning::parse_cpu_list(list)?),
        (None, Some(node)) => Some(crate::pinning::numa_node_cpus(node)?),
        (None, None) => None,
    };
    if let Some(cpus) = pin {
        crate::pinning::pin_to_cpus(&cpus)?;
    }
    let mf = loader::ModelFile::open(&a.model)?;
    let experts = crate::experts::parse_spec(&a.experts, mf.config.n_layer as u32, mf.config.n_expert as u32)?;
    let threads = a.threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    let faults = crate::faults::TestFaults::from_env()?;
    crate::serve::run_worker_on(&a.socket, &mf, &experts, threads, std::time::Duration::from_micros(a.spin_us), &faults)
}
