//! Where a model runs: `cpu`, `cpu:N` (one core), `cuda:N`.

use std::fmt;
use std::str::FromStr;

use crate::ModelError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The CPU; with a core number, pinned to that core and single-threaded.
    Cpu(Option<usize>),
    /// A CUDA device by index (bound through `CUDA_VISIBLE_DEVICES`).
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            ModelError::Device(format!(
                "unknown device '{s}': expected cpu, cpu:N (a core number) or cuda:N"
            ))
        };
        let (kind, index) = match s.split_once(':') {
            Some((k, i)) => (k, Some(i.parse::<usize>().map_err(|_| bad())?)),
            None => (s, None),
        };
        match kind {
            "cpu" => Ok(Self::Cpu(index)),
            "cuda" => Ok(Self::Cuda(index.unwrap_or(0))),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu(None) => f.write_str("cpu"),
            Self::Cpu(Some(c)) => write!(f, "cpu:{c}"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl DeviceSpec {
    /// Checks that this build and machine can run on the device.
    pub fn check_available(&self) -> Result<(), ModelError> {
        match self {
            Self::Cpu(Some(core)) => {
                let cores = std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1);
                let online = std::fs::read_to_string("/sys/devices/system/cpu/online").ok();
                let max_core = online
                    .as_deref()
                    .and_then(|s| {
                        s.trim()
                            .rsplit(['-', ','])
                            .next()
                            .and_then(|n| n.parse::<usize>().ok())
                    })
                    .unwrap_or(cores.saturating_sub(1));
                if *core > max_core {
                    return Err(ModelError::Device(format!(
                        "core {core} does not exist: this machine has cores 0..={max_core}"
                    )));
                }
                Ok(())
            }
            Self::Cpu(None) => Ok(()),
            Self::Cuda(_) if cfg!(feature = "cuda") => Err(ModelError::Device(
                "the CUDA forward pass is not implemented yet; run on cpu:N".into(),
            )),
            Self::Cuda(_) => Err(ModelError::Device(
                "this amusd was built without CUDA; rebuild with `--features cuda` or use cpu:N"
                    .into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_devices() {
        for s in ["cpu", "cpu:1", "cuda:0"] {
            assert_eq!(s.parse::<DeviceSpec>().unwrap().to_string(), s);
        }
        for s in ["gpu:0", "cpu:x", "cpu:-1", ""] {
            assert!(s.parse::<DeviceSpec>().is_err(), "{s}");
        }
        assert!("cpu:100000"
            .parse::<DeviceSpec>()
            .unwrap()
            .check_available()
            .is_err());
        assert!("cpu:0"
            .parse::<DeviceSpec>()
            .unwrap()
            .check_available()
            .is_ok());
    }
}
