//! Money: cost estimates in integer micro-dollars, so sums in Redis stay exact.

use serde::{Deserialize, Serialize};

/// One US dollar in micro-dollars.
pub const MICROS_PER_USD: u64 = 1_000_000;

/// The provider's price list as klingq knows it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CostModel {
    /// Price per second of generated video, in USD. Kling v3 Pro on Runflow: $0.14.
    pub usd_per_second: f64,
}

impl Default for CostModel {
    fn default() -> Self {
        Self {
            usd_per_second: 0.14,
        }
    }
}

impl CostModel {
    /// The estimated cost of `seconds` of video, in micro-dollars.
    pub fn estimate_micros(&self, seconds: u32) -> u64 {
        usd_to_micros(self.usd_per_second * f64::from(seconds))
    }
}

/// Converts USD to micro-dollars, rounding to the nearest micro-dollar.
pub fn usd_to_micros(usd: f64) -> u64 {
    if usd.is_finite() && usd > 0.0 {
        (usd * MICROS_PER_USD as f64).round() as u64
    } else {
        0
    }
}

/// Converts micro-dollars to USD.
pub fn micros_to_usd(micros: u64) -> f64 {
    micros as f64 / MICROS_PER_USD as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_are_exact_in_micros() {
        let model = CostModel::default();
        assert_eq!(model.estimate_micros(5), 700_000);
        assert_eq!(model.estimate_micros(15), 2_100_000);
        assert_eq!(micros_to_usd(model.estimate_micros(3)), 0.42);
        let total: u64 = (0..1000).map(|_| model.estimate_micros(5)).sum();
        assert_eq!(micros_to_usd(total), 700.0);
        assert_eq!(usd_to_micros(-1.0), 0);
        assert_eq!(usd_to_micros(f64::NAN), 0);
    }
}
