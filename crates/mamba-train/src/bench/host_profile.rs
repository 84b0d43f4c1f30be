//! `bench train --host-profile F`: where the host's threads spend the timed steps. A step that
//! issues ~2,000 launches can be bound by the host (the calling thread's burn and autodiff work,
//! cubecl's device thread that compiles, allocates and launches), which no GPU profile shows.
//! A sampling profiler (pprof-rs: `SIGPROF` at 1 kHz of CPU time, every thread) records stacks;
//! `F` gets them collapsed (`thread;outer;…;inner count`, the input of flame-graph tools) and
//! `F.top.txt` a summary: samples by thread, and the functions with the most samples at the top
//! of the stack (self) and anywhere on it (inclusive).
//!
//! Built only with the `host-profile` feature; without it the flag is an error that says so.

use std::path::Path;

use anyhow::Result;

/// A running sampler: [`start`] it before the steps, [`finish`] it after.
pub struct Sampler {
    #[cfg(feature = "host-profile")]
    guard: pprof::ProfilerGuard<'static>,
}

/// Starts sampling every thread of the process.
pub fn start() -> Result<Sampler> {
    #[cfg(feature = "host-profile")]
    {
        let guard = pprof::ProfilerGuardBuilder::default()
            .frequency(1000)
            // Unwinding from inside these while a signal lands can deadlock (pprof's advice).
            .blocklist(&["libc", "libgcc", "pthread", "vdso"])
            .build()
            .map_err(|e| anyhow::anyhow!("host profiler: {e}"))?;
        Ok(Sampler { guard })
    }
    #[cfg(not(feature = "host-profile"))]
    anyhow::bail!(
        "--host-profile needs the `host-profile` feature: cargo build --release --features host-profile --bin bench"
    )
}

/// Stops sampling and writes `path` (collapsed stacks) and `path.top.txt` (the summary).
pub fn finish(sampler: Sampler, path: &Path) -> Result<()> {
    #[cfg(feature = "host-profile")]
    {
        let report = sampler
            .guard
            .report()
            .build()
            .map_err(|e| anyhow::anyhow!("host profiler report: {e}"))?;
        let stacks: Vec<(String, Vec<String>, u64)> = report
            .data
            .iter()
            .map(|(frames, &n)| {
                // pprof keeps the innermost frame first, and in a frame the innermost inlined
                // function first: outermost first here.
                let names = frames
                    .frames
                    .iter()
                    .rev()
                    .flat_map(|f| f.iter().rev().map(|s| clean(&s.name())))
                    .collect();
                (frames.thread_name_or_id(), names, n.max(0) as u64)
            })
            .collect();
        write_reports(&stacks, path)
    }
    #[cfg(not(feature = "host-profile"))]
    {
        let _ = (sampler, path);
        unreachable!("start fails without the feature")
    }
}

/// A symbol without its hash suffix (`::h0123…`).
#[cfg_attr(not(feature = "host-profile"), allow(dead_code))]
fn clean(name: &str) -> String {
    match name.rfind("::h") {
        Some(i) if name.len() - i == 19 && name[i + 3..].bytes().all(|b| b.is_ascii_hexdigit()) => {
            name[..i].to_string()
        }
        _ => name.to_string(),
    }
}

/// The collapsed stacks and the summary, from `(thread, outermost-first names, samples)`.
#[cfg_attr(not(feature = "host-profile"), allow(dead_code))]
fn write_reports(stacks: &[(String, Vec<String>, u64)], path: &Path) -> Result<()> {
    use std::collections::{BTreeMap, HashMap, HashSet};
    use std::fmt::Write;

    let mut collapsed = String::new();
    for (thread, names, n) in stacks {
        let names: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
        writeln!(
            collapsed,
            "{};{} {}",
            thread.replace(';', ":"),
            names.join(";"),
            n
        )?;
    }
    mamba_hf::checkpoint::write_atomic(path, collapsed.as_bytes())?;

    let total: u64 = stacks.iter().map(|s| s.2).sum();
    let mut threads: BTreeMap<&str, u64> = BTreeMap::new();
    let mut own: HashMap<&str, u64> = HashMap::new();
    let mut incl: HashMap<&str, u64> = HashMap::new();
    for (thread, names, n) in stacks {
        *threads.entry(thread.as_str()).or_default() += n;
        if let Some(leaf) = names.last() {
            *own.entry(leaf.as_str()).or_default() += n;
        }
        // A function counts once a stack however often it recurses.
        let seen: HashSet<&str> = names.iter().map(|s| s.as_str()).collect();
        for f in seen {
            *incl.entry(f).or_default() += n;
        }
    }
    let pct = |n: u64| 100.0 * n as f64 / total.max(1) as f64;
    let mut out = String::new();
    writeln!(
        out,
        "{total} samples (1 kHz of CPU time, all threads)\n\nby thread:"
    )?;
    let mut by_thread: Vec<_> = threads.into_iter().collect();
    by_thread.sort_by_key(|t| std::cmp::Reverse(t.1));
    for (t, n) in by_thread {
        writeln!(out, "{:6.1}%  {t}", pct(n))?;
    }
    for (title, map) in [("self (top of stack)", own), ("inclusive", incl)] {
        writeln!(out, "\n{title}:")?;
        let mut v: Vec<_> = map.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        for (f, n) in v.into_iter().take(80) {
            let f: String = f.chars().take(220).collect();
            writeln!(out, "{:6.1}%  {f}", pct(n))?;
        }
    }
    let mut top = path.as_os_str().to_owned();
    top.push(".top.txt");
    mamba_hf::checkpoint::write_atomic(Path::new(&top), out.as_bytes())?;
    Ok(())
}
