//! Where the tensors live: `model.device` / `--device cpu|cuda|cuda:N`.
//!
//! The CPU is the default and needs nothing. `cuda[:N]` runs on candle's CUDA backend (cuBLAS
//! matmuls, candle's kernels) and needs a build with the cargo feature `cuda`
//! (`bash scripts/build-cuda.sh`, README "GPU") and an NVIDIA driver. On a CUDA device the
//! CPU-only fused ops of ropo (`cpu_fwd` alone) are not used: every call site asks
//! [`cpu_kernels`] and otherwise takes the composed path built from candle's differentiable
//! ops, the path the equivalence tests compare with the fused one.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};

static CPU_KERNELS: AtomicBool = AtomicBool::new(true);

/// Whether ropo's CPU kernels (its custom ops, `cpu_fwd` alone, and the CPU-only fast paths)
/// serve `t`: `t` is on the CPU and they are not turned off ([`set_cpu_kernels`]). Every call
/// site of such a kernel asks this and otherwise takes the composed path of candle's
/// differentiable ops, the one a CUDA device runs.
pub fn cpu_kernels(t: &Tensor) -> bool {
    t.device().is_cpu() && CPU_KERNELS.load(Ordering::Relaxed)
}

/// Turns ropo's CPU kernels off (or back on) process-wide, so that the CPU runs exactly the
/// path of a device without them (tests/composed_path.rs checks that path against the golden
/// values and finite differences on the CPU).
pub fn set_cpu_kernels(on: bool) {
    CPU_KERNELS.store(on, Ordering::Relaxed);
}

/// A device as named on the command line or in a config: `cpu`, `cuda` (GPU 0) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The host CPU (default).
    #[default]
    Cpu,
    /// CUDA GPU number `N` (`cuda` = `cuda:0`), in the order of `nvidia-smi` /
    /// `CUDA_VISIBLE_DEVICES`.
    Cuda(usize),
}

impl DeviceSpec {
    /// Whether this build can open CUDA devices (the cargo feature `cuda`).
    pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

    /// Open the device. Errors (clear messages, never a panic): `cuda` in a build without the
    /// `cuda` feature (how to build it); no usable CUDA device `N` (no driver, no GPU, N out of
    /// range), with candle's reason.
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => {
                if let Some(why) = self.unavailable_in_this_build() {
                    return Err(Error::Msg(format!("device {self}: {why}")));
                }
                Device::new_cuda(n).map_err(|e| {
                    // the driver's reason, without candle's captured backtrace
                    let e = match e {
                        candle_core::Error::WithBacktrace { inner, .. } => *inner,
                        e => e,
                    };
                    Error::Msg(format!(
                        "device {self}: no usable CUDA device ({e}); check that an NVIDIA driver is installed and the GPU is \
                         visible (nvidia-smi, CUDA_VISIBLE_DEVICES), or use the device \"cpu\""
                    ))
                })
            }
        }
    }

    /// Why this build cannot open the device, if it cannot: `cuda` without the `cuda` feature
    /// (the message says how to build it). Checked by the config before any work.
    pub fn unavailable_in_this_build(self) -> Option<String> {
        (matches!(self, DeviceSpec::Cuda(_)) && !Self::CUDA_BUILT).then(|| {
            "this ropo was built without CUDA support; build it with `bash scripts/build-cuda.sh` (cargo feature `cuda`, \
             README \"GPU\") or use the device \"cpu\""
                .to_string()
        })
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = String;

    /// `cpu`, `cuda` or `cuda:N` (N a GPU number), case-insensitive.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => match t.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceSpec::Cuda(n)),
                _ => Err(format!("unknown device {s:?}: expected \"cpu\", \"cuda\" or \"cuda:N\" (N a GPU number)")),
            },
        }
    }
}

impl Serialize for DeviceSpec {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_the_device_names() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("CUDA".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert_eq!(DeviceSpec::Cuda(3).to_string(), "cuda:3");
        assert_eq!(DeviceSpec::default().to_string(), "cpu");
        for bad in ["", "tpu", "gpu", "cuda:", "cuda:-1", "cuda:x", "metal"] {
            let e = bad.parse::<DeviceSpec>().unwrap_err();
            assert!(e.contains("expected \"cpu\", \"cuda\" or \"cuda:N\""), "{bad}: {e}");
        }
    }

    #[test]
    fn the_cpu_opens_everywhere() {
        assert!(DeviceSpec::Cpu.open().unwrap().is_cpu());
    }

    /// Without the `cuda` feature, `cuda` is a clear error naming how to build it (no panic).
    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_build_it() {
        let e = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
        assert!(e.contains("device cuda:0") && e.contains("built without CUDA support") && e.contains("scripts/build-cuda.sh"), "{e}");
    }
}
