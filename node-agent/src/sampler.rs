//! Samples the host: load average, CPU %, memory %, cores.
//!
//! sysinfo reads `/proc` synchronously, so every refresh runs on the blocking pool, never on
//! the async worker threads that also drive heartbeats and the AMI connection.

use std::sync::{Arc, Mutex};

use sysinfo::System;

/// One reading of the host.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct HostSample {
    /// One-minute load average.
    pub load1: f64,
    /// CPU use across all cores since the previous sample, 0–100.
    pub cpu_pct: f64,
    /// Memory not available to new work, 0–100.
    pub mem_pct: f64,
    /// Logical cores.
    pub cores: u32,
}

impl HostSample {
    /// The load fraction that shedding tiers compare against: the busier of CPU use and
    /// load per core, so a node saturated by I/O wait sheds as well as a CPU-bound one.
    pub fn load_fraction(&self) -> f64 {
        let per_core = if self.cores == 0 {
            0.0
        } else {
            self.load1 / f64::from(self.cores)
        };
        (self.cpu_pct / 100.0).max(per_core)
    }
}

/// Keeps the sysinfo state between samples (CPU % is a difference of two readings).
#[derive(Debug, Clone)]
pub struct Sampler {
    system: Arc<Mutex<System>>,
}

/// The host cannot be sampled at all (no `/proc`).
#[derive(Debug, thiserror::Error)]
#[error("cannot read host statistics: {0}")]
pub struct SamplerError(String);

impl Sampler {
    /// Takes a first reading so the next CPU % covers a real interval.
    pub fn new() -> Result<Self, SamplerError> {
        let mut system = System::new().map_err(|err| SamplerError(err.to_string()))?;
        system.refresh_cpu_usage();
        system.refresh_memory();
        Ok(Self {
            system: Arc::new(Mutex::new(system)),
        })
    }

    /// Reads the host on the blocking pool.
    pub async fn sample(&self) -> HostSample {
        let system = Arc::clone(&self.system);
        tokio::task::spawn_blocking(move || {
            let mut system = system.lock().unwrap_or_else(|poison| poison.into_inner());
            system.refresh_cpu_usage();
            system.refresh_memory();
            let total = system.total_memory();
            let mem_pct = if total == 0 {
                0.0
            } else {
                100.0 * (total.saturating_sub(system.available_memory())) as f64 / total as f64
            };
            HostSample {
                load1: System::load_average().map(|l| l.one).unwrap_or(0.0),
                cpu_pct: f64::from(system.global_cpu_usage()),
                mem_pct,
                cores: u32::try_from(system.cpus().len()).unwrap_or(u32::MAX),
            }
        })
        .await
        .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn samples_the_real_host() {
        let sampler = Sampler::new().expect("this host has /proc");
        let sample = sampler.sample().await;
        assert!(sample.cores >= 1, "{sample:?}");
        assert!(
            (0.0..=100.0).contains(&sample.mem_pct) && sample.mem_pct > 0.0,
            "{sample:?}"
        );
        assert!((0.0..=100.0).contains(&sample.cpu_pct), "{sample:?}");
    }

    #[test]
    fn load_fraction_is_the_busier_measure() {
        let io_bound = HostSample {
            load1: 3.0,
            cpu_pct: 10.0,
            mem_pct: 0.0,
            cores: 2,
        };
        assert!((io_bound.load_fraction() - 1.5).abs() < 1e-9);
        let cpu_bound = HostSample {
            load1: 0.2,
            cpu_pct: 90.0,
            mem_pct: 0.0,
            cores: 4,
        };
        assert!((cpu_bound.load_fraction() - 0.9).abs() < 1e-9);
    }
}
