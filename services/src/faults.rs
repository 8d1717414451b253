//! Crash points for kill tests: `crash_point("dialer.after_twilio")` ends the process there
//! when `CMB_CRASH_AT` names that step (a comma-separated list), as a power cut would. Only in
//! debug builds (the tests' binary); a release build compiles every crash point to nothing.

/// Ends the process at `step` if `CMB_CRASH_AT` names it (debug builds only).
#[cfg(debug_assertions)]
pub fn crash_point(step: &str) {
    let named = std::env::var("CMB_CRASH_AT").is_ok_and(|at| at.split(',').any(|s| s == step));
    if named {
        eprintln!("CMB_CRASH_AT: crashing at {step}");
        std::process::exit(86);
    }
}

/// Nothing: release builds have no crash points.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn crash_point(_step: &str) {}
