//! CPU and NUMA pinning of a worker process: the affinity is set on the main thread before
//! the worker loads its experts and starts ggml's threads, which inherit it; memory the
//! worker then touches first (its expert weights) is allocated on the NUMA node of those CPUs
//! by the kernel's first-touch policy.
use std::path::Path;

use crate::ranges::{parse_ranges, RangeError};
use crate::{Result, WorkerError};

fn bad(spec: &str, reason: impl Into<String>) -> WorkerError {
    WorkerError::Pinning { spec: spec.trim().to_string(), reason: reason.into() }
}

/// Parses a Linux CPU list (`0-3,8,10-11`, as in `/sys/.../cpulist` and `taskset -c`):
/// sorted, distinct CPU numbers.
pub fn parse_cpu_list(spec: &str) -> Result<Vec<usize>> {
    let set = libc::CPU_SETSIZE as usize;
    let mut cpus = parse_ranges(spec, set).map_err(|e| match e {
        RangeError::NotANumber(t) => bad(spec, format!("{t:?} is not a CPU number")),
        RangeError::Backwards(r) => bad(spec, format!("range {r:?} runs backwards")),
        RangeError::TooLarge(c) => bad(spec, format!("CPU {c} is beyond the {set} this system call can name")),
    })?;
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

/// The CPUs of NUMA node `node` (from sysfs).
pub fn numa_node_cpus(node: usize) -> Result<Vec<usize>> {
    numa_node_cpus_in(Path::new("/sys/devices/system/node"), node)
}

fn numa_node_cpus_in(root: &Path, node: usize) -> Result<Vec<usize>> {
    let path = root.join(format!("node{node}/cpulist"));
    let text = std::fs::read_to_string(&path).map_err(|source| WorkerError::Io { what: "read", path: path.clone(), source })?;
    let cpus = parse_cpu_list(&text)?;
    if cpus.is_empty() {
        return Err(bad(&text, format!("NUMA node {node} has no CPUs")));
    }
    Ok(cpus)
}

/// Number of NUMA nodes (1 where sysfs does not list any).
pub fn numa_node_count() -> usize {
    let Ok(dir) = std::fs::read_dir("/sys/devices/system/node") else { return 1 };
    let n = dir
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.strip_prefix("node").is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))))
        .count();
    n.max(1)
}

/// Where one worker runs: the worker's `--cpus` or `--numa-node`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pin {
    Cpus(Vec<usize>),
    NumaNode(usize),
}

impl Pin {
    /// The worker command-line arguments for this pin.
    pub fn to_args(&self) -> [String; 2] {
        match self {
            Pin::Cpus(c) => ["--cpus".into(), c.iter().map(usize::to_string).collect::<Vec<_>>().join(",")],
            Pin::NumaNode(n) => ["--numa-node".into(), n.to_string()],
        }
    }

    /// The daemon's `--worker-cpus` for `n_workers` workers: `numa` (worker i on NUMA node
    /// i mod nodes) or one CPU list per worker separated by `/` (`0-3/4-7`).
    pub fn parse_per_worker(spec: &str, n_workers: usize) -> Result<Vec<Pin>> {
        if spec == "numa" {
            let nodes = numa_node_count();
            return Ok((0..n_workers).map(|i| Pin::NumaNode(i % nodes)).collect());
        }
        let pins = spec.split('/').map(|l| parse_cpu_list(l).map(Pin::Cpus)).collect::<Result<Vec<_>>>()?;
        if pins.len() != n_workers {
            return Err(bad(spec, format!("{} CPU lists for {n_workers} workers (one per worker, separated by '/', or 'numa')", pins.len())));
        }
        Ok(pins)
    }
}

/// Restricts the calling thread (and the threads it starts afterwards) to `cpus`.
pub fn pin_to_cpus(cpus: &[usize]) -> Result<()> {
    if cpus.is_empty() {
        return Err(bad("", "no CPUs to pin to"));
    }
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET is given numbers below
    // CPU_SETSIZE (checked by parse_cpu_list, and here again).
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        if c >= libc::CPU_SETSIZE as usize {
            return Err(bad(&format!("{cpus:?}"), format!("CPU {c} is out of range")));
        }
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: pid 0 is the calling thread; the set is initialized above.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(bad(&format!("{cpus:?}"), format!("sched_setaffinity: {e}")));
    }
    tracing::info!(?cpus, "worker pinned");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_like_sysfs_and_bad_ones_are_named() {
        assert_eq!(parse_cpu_list("0-3,8,10-11\n").unwrap_or_default(), vec![0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(parse_cpu_list("5").unwrap_or_default(), vec![5]);
        assert_eq!(parse_cpu_list("3,1-2,2").unwrap_or_default(), vec![1, 2, 3]);
        for (spec, says) in [("3-1", "backwards"), ("a", "\"a\" is not a CPU number"), ("1,,2", "\"\" is not a CPU number"), ("99999", "beyond")] {
            let e = parse_cpu_list(spec).expect_err(spec).to_string();
            assert!(e.contains(says) && e.contains(spec), "{spec}: {e}");
        }
    }

    #[test]
    fn per_worker_pins_need_one_list_per_worker() {
        let pins = Pin::parse_per_worker("0-1/2,3", 2).unwrap_or_default();
        assert_eq!(pins, vec![Pin::Cpus(vec![0, 1]), Pin::Cpus(vec![2, 3])]);
        assert_eq!(pins[1].to_args(), ["--cpus".to_string(), "2,3".to_string()]);
        let e = Pin::parse_per_worker("0-1", 2).expect_err("one list for two workers").to_string();
        assert!(e.contains("1 CPU lists for 2 workers"), "{e}");
        let numa = Pin::parse_per_worker("numa", 3).unwrap_or_default();
        assert_eq!(numa.len(), 3);
        assert_eq!(numa[0], Pin::NumaNode(0));
    }

    #[test]
    fn numa_node_cpus_come_from_the_node_cpulist() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("node1")).expect("mkdir");
        std::fs::write(dir.path().join("node1/cpulist"), "16-19,48\n").expect("write");
        assert_eq!(numa_node_cpus_in(dir.path(), 1).unwrap_or_default(), vec![16, 17, 18, 19, 48]);
        let e = numa_node_cpus_in(dir.path(), 2).expect_err("no node 2").to_string();
        assert!(e.contains("node2/cpulist"), "{e}");
    }
}
