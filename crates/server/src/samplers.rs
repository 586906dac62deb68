//! The one table from the samplers clients name to the scheduler that runs: the ModelsLab API names diffusers'
//! scheduler classes directly; AUTOMATIC1111 names a k-diffusion sampler and a schedule type; OpenAI names none
//! (the model's own scheduler runs). Each A1111 sampler maps to the diffusers scheduler diffusers' documentation
//! gives as its equivalent; samplers without one are refused by name.

use serde_json::{json, Value};

/// What a sampler name resolves to: the ModelsLab `scheduler` with its options.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerChoice {
    /// The scheduler class (one of the API's 18 names).
    pub scheduler: &'static str,
    /// Karras sigmas.
    pub use_karras_sigmas: bool,
    /// DPM-Solver algorithm type, for the SDE variants.
    pub algorithm_type: Option<&'static str>,
}

/// One AUTOMATIC1111 sampler.
struct A1111Sampler {
    /// Its name in A1111 (`sampler_name`).
    name: &'static str,
    /// Older names A1111 still accepts.
    aliases: &'static [&'static str],
    /// The diffusers scheduler that runs it; `None` when Pictor has no equivalent.
    scheduler: Option<&'static str>,
    /// DPM-Solver algorithm type.
    algorithm_type: Option<&'static str>,
    /// Whether A1111's "Automatic" schedule type means Karras sigmas for it.
    karras_by_default: bool,
}

const fn sampler(
    name: &'static str,
    aliases: &'static [&'static str],
    scheduler: Option<&'static str>,
    algorithm_type: Option<&'static str>,
    karras_by_default: bool,
) -> A1111Sampler {
    A1111Sampler {
        name,
        aliases,
        scheduler,
        algorithm_type,
        karras_by_default,
    }
}

/// AUTOMATIC1111 1.10's samplers, in its order.
const A1111_SAMPLERS: &[A1111Sampler] = &[
    sampler(
        "DPM++ 2M",
        &["k_dpmpp_2m"],
        Some("DPMSolverMultistepScheduler"),
        None,
        true,
    ),
    sampler("DPM++ SDE", &["k_dpmpp_sde"], None, None, true),
    // A1111's "Automatic" is an exponential schedule here, which Pictor does not have: Karras is used (and
    // said in the README's table).
    sampler(
        "DPM++ 2M SDE",
        &["k_dpmpp_2m_sde_ka"],
        Some("DPMSolverMultistepScheduler"),
        Some("sde-dpmsolver++"),
        true,
    ),
    sampler("DPM++ 2M SDE Heun", &[], None, None, false),
    sampler("DPM++ 2S a", &["k_dpmpp_2s_a"], None, None, false),
    sampler("DPM++ 3M SDE", &[], None, None, false),
    sampler(
        "Euler a",
        &["k_euler_a", "k_euler_ancestral"],
        Some("EulerAncestralDiscreteScheduler"),
        None,
        false,
    ),
    sampler(
        "Euler",
        &["k_euler"],
        Some("EulerDiscreteScheduler"),
        None,
        false,
    ),
    sampler("LMS", &["k_lms"], Some("LMSDiscreteScheduler"), None, false),
    sampler(
        "Heun",
        &["k_heun"],
        Some("HeunDiscreteScheduler"),
        None,
        false,
    ),
    sampler(
        "DPM2",
        &["k_dpm_2"],
        Some("KDPM2DiscreteScheduler"),
        None,
        false,
    ),
    sampler(
        "DPM2 a",
        &["k_dpm_2_a"],
        Some("KDPM2AncestralDiscreteScheduler"),
        None,
        false,
    ),
    sampler("DPM fast", &["k_dpm_fast"], None, None, false),
    sampler("DPM adaptive", &["k_dpm_ad"], None, None, false),
    sampler("Restart", &[], None, None, false),
    sampler("DDIM", &[], Some("DDIMScheduler"), None, false),
    sampler("DDIM CFG++", &[], None, None, false),
    sampler("PLMS", &[], Some("PNDMScheduler"), None, false),
    sampler("UniPC", &[], Some("UniPCMultistepScheduler"), None, false),
    sampler("LCM", &["k_lcm"], Some("LCMScheduler"), None, false),
];

/// A1111's schedule types Pictor can run: (name, label). Automatic is the sampler's own default.
const A1111_SCHEDULES: &[(&str, &str)] = &[
    ("automatic", "Automatic"),
    ("uniform", "Uniform"),
    ("karras", "Karras"),
];

/// The scheduler for A1111's `sampler_name` (old names such as "DPM++ 2M Karras" included) and `scheduler`
/// (schedule type: name or label, any case; `None` = Automatic). The error says what is wrong and what exists.
pub fn from_a1111(sampler: &str, schedule: Option<&str>) -> Result<SchedulerChoice, String> {
    let sampler = sampler.trim();
    // Before 1.9 the schedule was part of the name: "DPM++ 2M Karras".
    let (base, suffix_karras) = match sampler.strip_suffix(" Karras") {
        Some(base) => (base, true),
        None => (sampler, false),
    };
    let found = A1111_SAMPLERS
        .iter()
        .find(|s| {
            s.name.eq_ignore_ascii_case(base)
                || s.aliases.iter().any(|a| a.eq_ignore_ascii_case(base))
        })
        .ok_or_else(|| {
            format!(
                "unknown sampler {sampler:?}; one of: {}",
                a1111_sampler_names().join(", ")
            )
        })?;
    let scheduler = found.scheduler.ok_or_else(|| {
        format!(
            "sampler {:?} has no equivalent in Pictor; use one of: {}",
            found.name,
            a1111_sampler_names().join(", ")
        )
    })?;
    let schedule = schedule.map(str::trim).filter(|s| !s.is_empty());
    let karras = match schedule {
        None => suffix_karras || found.karras_by_default,
        Some(s) => match A1111_SCHEDULES
            .iter()
            .find(|(name, label)| name.eq_ignore_ascii_case(s) || label.eq_ignore_ascii_case(s))
        {
            Some(("automatic", _)) => suffix_karras || found.karras_by_default,
            Some(("karras", _)) => true,
            Some(_) => false,
            None => {
                let known: Vec<&str> = A1111_SCHEDULES.iter().map(|(_, l)| *l).collect();
                return Err(format!(
                    "schedule type {s:?} is not supported; one of: {}",
                    known.join(", ")
                ));
            }
        },
    };
    Ok(SchedulerChoice {
        scheduler,
        use_karras_sigmas: karras,
        algorithm_type: found.algorithm_type,
    })
}

/// The A1111 samplers Pictor runs, by name.
pub fn a1111_sampler_names() -> Vec<&'static str> {
    A1111_SAMPLERS
        .iter()
        .filter(|s| s.scheduler.is_some())
        .map(|s| s.name)
        .collect()
}

/// `GET /sdapi/v1/samplers`: the samplers Pictor runs, in A1111's shape.
pub fn a1111_samplers_json() -> Value {
    Value::Array(
        A1111_SAMPLERS
            .iter()
            .filter(|s| s.scheduler.is_some())
            .map(|s| {
                let mut options = serde_json::Map::new();
                if s.karras_by_default {
                    options.insert("scheduler".into(), json!("karras"));
                }
                json!({"name": s.name, "aliases": s.aliases, "options": options})
            })
            .collect(),
    )
}

/// The A1111 samplers Pictor runs, by name: `{name: {scheduler, algorithm_type}}` (for clients that turn an
/// A1111 infotext back into a ModelsLab request, such as the playground).
pub fn a1111_sampler_map_json() -> Value {
    Value::Object(
        A1111_SAMPLERS
            .iter()
            .filter_map(|s| {
                let scheduler = s.scheduler?;
                Some((
                    s.name.to_string(),
                    json!({"scheduler": scheduler, "algorithm_type": s.algorithm_type}),
                ))
            })
            .collect(),
    )
}

/// `GET /sdapi/v1/schedulers`: the schedule types Pictor runs, in A1111's shape.
pub fn a1111_schedules_json() -> Value {
    Value::Array(
        A1111_SCHEDULES
            .iter()
            .map(|(name, label)| {
                json!({"name": name, "label": label, "aliases": null,
                       "default_rho": if *name == "karras" { 7.0 } else { -1.0 },
                       "need_inner_model": false})
            })
            .collect(),
    )
}

/// The A1111 sampler name and schedule label for a scheduler that ran with `algorithm_type` (for A1111's
/// infotext): the sampler that maps to it, else the class name itself.
pub fn a1111_name_of(
    scheduler: &str,
    algorithm_type: Option<&str>,
    karras: bool,
) -> (String, &'static str) {
    let name = A1111_SAMPLERS
        .iter()
        .find(|s| s.scheduler == Some(scheduler) && s.algorithm_type == algorithm_type)
        .map(|s| s.name.to_string())
        .unwrap_or_else(|| scheduler.to_string());
    (name, if karras { "Karras" } else { "Uniform" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a1111_names_map_to_their_diffusers_equivalents() {
        let choice = |s: &str, k: Option<&str>| from_a1111(s, k).unwrap();
        assert_eq!(
            choice("Euler a", None),
            SchedulerChoice {
                scheduler: "EulerAncestralDiscreteScheduler",
                use_karras_sigmas: false,
                algorithm_type: None
            }
        );
        // DPM++ 2M: Karras by default (A1111's Automatic), Uniform on request; the pre-1.9 name too.
        assert!(choice("DPM++ 2M", None).use_karras_sigmas);
        assert!(choice("DPM++ 2M", Some("automatic")).use_karras_sigmas);
        assert!(!choice("DPM++ 2M", Some("Uniform")).use_karras_sigmas);
        assert_eq!(
            choice("DPM++ 2M Karras", None),
            choice("dpm++ 2m", Some("KARRAS"))
        );
        assert_eq!(
            choice("DPM++ 2M SDE", None).algorithm_type,
            Some("sde-dpmsolver++")
        );
        assert!(choice("Euler", Some("karras")).use_karras_sigmas);
        assert_eq!(choice("k_euler", None).scheduler, "EulerDiscreteScheduler");
        assert_eq!(choice("PLMS", None).scheduler, "PNDMScheduler");
        let err = from_a1111("DPM++ 2S a", None).unwrap_err();
        assert!(err.contains("no equivalent"), "{err}");
        let err = from_a1111("Euler", Some("Exponential")).unwrap_err();
        assert!(
            err.contains("Exponential") && err.contains("Karras"),
            "{err}"
        );
        assert!(from_a1111("Eulerr", None).unwrap_err().contains("unknown"));
        // Every listed sampler resolves; names for infotext go back to A1111's.
        for name in a1111_sampler_names() {
            let c = choice(name, None);
            assert_eq!(a1111_name_of(c.scheduler, c.algorithm_type, false).0, name);
        }
    }
}
