//! Which instruction-set tier the fp32 kernels run at: AVX-512, AVX2 with FMA, or plain Rust for the
//! architecture's baseline. The CPU's best tier is detected once; `PICTOR_CPU=portable|avx2|avx512`
//! lowers it for the whole process (never above what the CPU has), and [`run_at`] runs a closure at a
//! given tier on a pool of its own, so one machine can test and time every tier it supports side by side.
//!
//! The tier governs the f32 kernels only. The bf16 products (AMX, AVX-512 BF16) keep their own hardware
//! checks; `--precision bf16` is refused below [`Tier::Avx512`] (see [`super::set_bf16_products`]).

use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

/// An instruction-set tier of the CPU kernels, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    /// Plain Rust compiled for the target's baseline (SSE2 on x86-64): runs on any CPU.
    Portable,
    /// 256-bit vectors with fused multiply-add (AVX2 + FMA, 16 registers): AMD Zen 1–3, Intel Haswell and
    /// later client parts, most cloud instances.
    Avx2,
    /// 512-bit vectors (AVX-512 F and DQ, 32 registers): Intel Xeon since Skylake-SP, AMD Zen 4 and 5.
    Avx512,
}

/// The environment variable that lowers the tier for a process.
pub const ENV: &str = "PICTOR_CPU";

impl Tier {
    /// Every tier, lowest first.
    pub const ALL: [Tier; 3] = [Tier::Portable, Tier::Avx2, Tier::Avx512];

    /// The name `PICTOR_CPU` takes and the logs and benchmarks print.
    pub fn name(self) -> &'static str {
        match self {
            Tier::Portable => "portable",
            Tier::Avx2 => "avx2",
            Tier::Avx512 => "avx512",
        }
    }

    /// The best tier this CPU can run (detected once).
    pub fn best() -> Tier {
        static BEST: OnceLock<Tier> = OnceLock::new();
        *BEST.get_or_init(detect)
    }

    /// The tiers this CPU can run, lowest first.
    pub fn supported() -> Vec<Tier> {
        Tier::ALL
            .into_iter()
            .filter(|&t| t <= Tier::best())
            .collect()
    }

    /// The tier the kernels on this thread run at: [`run_at`]'s while inside it, else the process's
    /// (`PICTOR_CPU` or [`set`], else [`Tier::best`]).
    #[inline]
    pub fn active() -> Tier {
        let local = OVERRIDE.with(Cell::get);
        if local != UNSET {
            return Tier::ALL[local as usize];
        }
        match PROCESS.load(Ordering::Relaxed) {
            UNSET => init_process(),
            tier => Tier::ALL[tier as usize],
        }
    }
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Tier {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Tier::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                format!("unknown CPU tier {s:?}: expected one of portable, avx2, avx512")
            })
    }
}

const UNSET: u8 = u8::MAX;

/// The process's tier, as an index into [`Tier::ALL`] (UNSET until first asked).
static PROCESS: AtomicU8 = AtomicU8::new(UNSET);

thread_local! {
    /// The tier of a [`run_at`] pool's threads (UNSET elsewhere).
    static OVERRIDE: Cell<u8> = const { Cell::new(UNSET) };
}

fn detect() -> Tier {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512dq") && has!("avx2") && has!("fma") {
            return Tier::Avx512;
        }
        if has!("avx2") && has!("fma") {
            return Tier::Avx2;
        }
    }
    Tier::Portable
}

/// Why `tier` cannot run here, if it cannot.
fn check(tier: Tier) -> Result<(), String> {
    if tier > Tier::best() {
        return Err(format!(
            "CPU tier {tier} is above what this CPU has (its best is {})",
            Tier::best()
        ));
    }
    Ok(())
}

/// The tier `PICTOR_CPU` asks for (`None` when it is unset or empty), or why it cannot be used.
pub fn from_env() -> Result<Option<Tier>, String> {
    match std::env::var(ENV) {
        Ok(value) if !value.trim().is_empty() => {
            let tier: Tier = value.parse().map_err(|e| format!("{ENV}: {e}"))?;
            check(tier).map_err(|e| format!("{ENV}={value}: {e}"))?;
            Ok(Some(tier))
        }
        _ => Ok(None),
    }
}

/// First use: the tier from `PICTOR_CPU` (a bad value is logged and ignored; the CLI refuses it before
/// this), else the best one.
#[cold]
fn init_process() -> Tier {
    let tier = from_env().unwrap_or_else(|e| {
        tracing::warn!("{e}; using {}", Tier::best());
        None
    });
    let tier = tier.unwrap_or_else(Tier::best);
    match PROCESS.compare_exchange(UNSET, tier as u8, Ordering::Relaxed, Ordering::Relaxed) {
        Ok(_) => tier,
        Err(set) => Tier::ALL[set as usize],
    }
}

/// Sets the process's tier (the CLI applies `PICTOR_CPU` through this, so a bad value is an error
/// rather than a warning). Fails, with the reason, for a tier above the CPU's best.
pub fn set(tier: Tier) -> Result<(), String> {
    check(tier)?;
    PROCESS.store(tier as u8, Ordering::Relaxed);
    Ok(())
}

/// Runs `work` with every kernel it calls, on every thread, at `tier`: on a fresh rayon pool of as many
/// threads as the global one, whose threads (and the caller's work, which runs on one of them) see
/// `tier`. The process's tier is untouched, so tests of different tiers can run at once.
pub fn run_at<R: Send>(tier: Tier, work: impl FnOnce() -> R + Send) -> Result<R, String> {
    check(tier)?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(rayon::current_num_threads())
        .start_handler(move |_| OVERRIDE.with(|o| o.set(tier as u8)))
        .build()
        .map_err(|e| format!("CPU tier {tier}: no thread pool: {e}"))?;
    Ok(pool.install(work))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_ones_are_refused() {
        for tier in Tier::ALL {
            assert_eq!(tier.name().parse::<Tier>(), Ok(tier));
        }
        assert_eq!(" AVX2 ".parse::<Tier>(), Ok(Tier::Avx2));
        let err = "sse4".parse::<Tier>().unwrap_err();
        assert!(err.contains("portable, avx2, avx512"), "{err}");
    }

    #[test]
    fn run_at_sets_the_tier_on_every_pool_thread_and_refuses_tiers_above_the_cpu() {
        use rayon::prelude::*;
        for tier in Tier::supported() {
            let seen: Vec<Tier> = run_at(tier, || {
                (0..64).into_par_iter().map(|_| Tier::active()).collect()
            })
            .unwrap();
            assert!(seen.iter().all(|&t| t == tier), "{tier}: {seen:?}");
        }
        assert_eq!(Tier::supported()[0], Tier::Portable);
        assert_eq!(*Tier::supported().last().unwrap(), Tier::best());
        if Tier::best() < Tier::Avx512 {
            let err = run_at(Tier::Avx512, || ()).unwrap_err();
            assert!(err.contains("above what this CPU has"), "{err}");
        }
    }
}
