//! `metrics.jsonl` (one JSON object per logged step or evaluation), the throughput window the
//! progress line and the log report, and the terminal's progress bar.

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};

pub struct Metrics {
    path: PathBuf,
    /// `None`: records are dropped (the nodes of a several-process run other than node 0).
    file: Option<std::fs::File>,
}

impl Metrics {
    /// Open `metrics.jsonl`, keeping only the records up to `keep_until` (the resumed step).
    pub fn open(out: &Path, keep_until: u64) -> Result<Self> {
        let path = out.join("metrics.jsonl");
        if keep_until == 0 {
            mamba_hf::checkpoint::write_atomic(&path, b"")?;
        } else if path.exists() {
            let text = std::fs::read_to_string(&path)?;
            let kept: String = text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| s <= keep_until)
                })
                .map(|l| format!("{l}\n"))
                .collect();
            mamba_hf::checkpoint::write_atomic(&path, kept.as_bytes())?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self {
            path,
            file: Some(file),
        })
    }

    /// Metrics that write nothing (a process that does not own the output directory).
    pub fn discard(out: &Path) -> Self {
        Self {
            path: out.join("metrics.jsonl"),
            file: None,
        }
    }

    pub fn write(&mut self, v: serde_json::Value) -> Result<()> {
        match &mut self.file {
            Some(f) => {
                writeln!(f, "{v}").with_context(|| format!("writing {}", self.path.display()))
            }
            None => Ok(()),
        }
    }
}

/// Tokens per second over the last `window` steps (the first step, which compiles and
/// autotunes kernels on a GPU, leaves the window once `window` more have run), and since the
/// start.
pub struct Throughput {
    window: usize,
    steps: VecDeque<(f64, usize)>,
    started: Instant,
    total_tokens: usize,
    last: Instant,
}

impl Throughput {
    pub fn new(window: usize) -> Self {
        let now = Instant::now();
        Self {
            window: window.max(1),
            steps: VecDeque::new(),
            started: now,
            total_tokens: 0,
            last: now,
        }
    }

    /// Records a step of `tokens` that ended now; returns its duration in seconds.
    pub fn step(&mut self, tokens: usize) -> f64 {
        let now = Instant::now();
        let dt = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.total_tokens += tokens;
        self.steps.push_back((dt, tokens));
        while self.steps.len() > self.window {
            self.steps.pop_front();
        }
        dt
    }

    /// Tokens/s over the window.
    pub fn windowed(&self) -> f64 {
        let (t, n) = self
            .steps
            .iter()
            .fold((0.0, 0usize), |(t, n), (dt, k)| (t + dt, n + k));
        n as f64 / t.max(1e-9)
    }

    /// Seconds per step over the window.
    pub fn step_seconds(&self) -> f64 {
        let t: f64 = self.steps.iter().map(|s| s.0).sum();
        t / self.steps.len().max(1) as f64
    }

    /// Tokens/s since the start (first step included).
    pub fn cumulative(&self) -> f64 {
        self.total_tokens as f64 / self.started.elapsed().as_secs_f64().max(1e-9)
    }

    pub fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }
}

/// The terminal's view of a run: a progress bar (step, loss, tokens/s over the window, ETA from
/// it) when stderr is a terminal, with log lines printed above it; plain log lines otherwise.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    pub fn new(total_steps: u64, start: u64) -> Self {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total_steps).with_position(start);
            let style = indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
                .expect("a valid template");
            bar.set_style(style);
            bar
        });
        Self { bar }
    }

    /// A log line (above the bar, when there is one).
    pub fn line(&self, text: &str) {
        match &self.bar {
            Some(b) => b.println(text),
            None => eprintln!("{text}"),
        }
    }

    /// The bar after step `done`; nothing without a terminal.
    pub fn step(&self, done: u64, message: String) {
        if let Some(b) = &self.bar {
            b.set_position(done);
            b.set_message(message);
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
