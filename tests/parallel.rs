//! Data parallelism on the CPU: two CPU replicas (`--device cpu,cpu`, burn-collective between
//! them) must train exactly as one device does on the same global batch: the same loss at every
//! step and the same weights at the end, for full and LoRA fine-tuning, with gradient
//! accumulation, with rows of unequal token counts, and across a resume (also onto another device
//! count). The CUDA run uses this code, with `cuda:0,cuda:1` as the device list.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

const TRAIN: &str = env!("CARGO_BIN_EXE_train");

/// The quickstart config, tiny: 5 steps of a global batch of 4 rows × 32 tokens.
fn tiny(out: &Path, extra: &[&str]) -> Vec<String> {
    [
        "train.steps=5",
        "train.batch_size=4",
        "train.lr=1e-2",
        "train.warmup_steps=2",
        "train.eval_every=0",
        "train.eval_batches=2",
        "train.log_every=1",
        "train.checkpoint_every=0",
        "data.seq_len=32",
        "data.max_examples=120",
    ]
    .iter()
    .chain(extra)
    .map(|s| s.to_string())
    .chain([format!("output.dir=\"{}\"", out.display())])
    .collect()
}

fn train(devices: &str, sets: &[String], extra: &[&str]) -> Command {
    let mut cmd = Command::new(TRAIN);
    cmd.current_dir(repo_root())
        .args(["--config", "configs/quickstart.toml", "--device", devices])
        .args(extra)
        .env("HF_HUB_OFFLINE", "1")
        .env_remove(SIMULATE_OOM)
        .env_remove("MAMBA_ALLOW_MULTI_NODE");
    for s in sets {
        cmd.args(["--set", s]);
    }
    cmd
}

const SIMULATE_OOM: &str = "MAMBA_SIMULATE_OOM_AT_STEP";

fn ok(out: Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "failed:\n{stderr}");
    stderr
}

/// Every f32 tensor of a safetensors file, by name.
fn tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
            let v = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (name, v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Two runs' per-step losses and their exported weights (`file` in the output dir) agree to
/// 1e-5 relative.
fn assert_same_run(one: &Path, two: &Path, file: &str, steps: u64) {
    let (a, b) = (
        losses(&one.join("metrics.jsonl")),
        losses(&two.join("metrics.jsonl")),
    );
    assert_eq!(
        a.iter().map(|x| x.0).collect::<Vec<_>>(),
        (1..=steps).collect::<Vec<_>>(),
        "{a:?}"
    );
    assert_eq!(a.len(), b.len(), "{b:?}");
    for ((sa, la), (sb, lb)) in a.iter().zip(&b) {
        assert_eq!(sa, sb);
        assert!(
            ((la - lb) / la).abs() < 1e-5,
            "step {sa}: one device {la}, two {lb}"
        );
    }
    let (wa, wb) = (tensors(&one.join(file)), tensors(&two.join(file)));
    assert_eq!(
        wa.iter().map(|t| &t.0).collect::<Vec<_>>(),
        wb.iter().map(|t| &t.0).collect::<Vec<_>>()
    );
    // All weights as one vector to 1e-5; each tensor to 1e-4, since Adam's first steps move an
    // element by ~lr whatever its gradient's size, so an element whose gradient is near zero
    // can take the other sign from a rounding difference (a 160-element conv bias then shows
    // ~1.5e-5 alone while the whole model agrees to ~4e-6).
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for ((name, x), (_, y)) in wa.iter().zip(&wb) {
        let e = rel_err(y, x);
        assert!(e < 1e-4, "{file} {name}: relative difference {e:.2e}");
        num += x
            .iter()
            .zip(y)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>();
        den += x.iter().map(|a| (*a as f64).powi(2)).sum::<f64>();
    }
    let e = (num / den).sqrt();
    assert!(
        e < 1e-5,
        "{file}: relative difference of all weights {e:.2e}"
    );
}

fn full_model_base(tmp: &Path) -> PathBuf {
    // A base for the LoRA cases: a few steps of the quickstart from scratch.
    let dir = tmp.join("base");
    ok(train("cpu", &tiny(&dir, &[]), &[]).output().unwrap());
    dir.join("model")
}

#[test]
fn two_cpu_replicas_train_as_one_device_full() {
    let tmp = tempfile::tempdir().unwrap();
    // Packed rows (equal token counts), weight decay and clipping as the quickstart has them.
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    ok(train("cpu", &tiny(&one, &[]), &[]).output().unwrap());
    let log = ok(train("cpu,cpu", &tiny(&two, &[]), &[]).output().unwrap());
    assert!(
        log.contains("data parallel: 2 devices") && log.contains("each taking 2 of the 4 rows"),
        "{log}"
    );
    assert_same_run(&one, &two, "model/model.safetensors", 5);

    // Padded rows (each share its own token count) and two micro-batches a step.
    let pad = ["data.layout=\"pad\"", "train.grad_accum=2"];
    let (one, two) = (tmp.path().join("one-pad"), tmp.path().join("two-pad"));
    ok(train("cpu", &tiny(&one, &pad), &[]).output().unwrap());
    ok(train("cpu,cpu", &tiny(&two, &pad), &[]).output().unwrap());
    assert_same_run(&one, &two, "model/model.safetensors", 5);
}

#[test]
fn two_cpu_replicas_train_as_one_device_lora() {
    let tmp = tempfile::tempdir().unwrap();
    let base = full_model_base(tmp.path());
    let source = format!("model.source=\"{}\"", base.display());
    let lora = [
        "model.init=",
        source.as_str(),
        "lora.enabled=true",
        "lora.r=4",
        "lora.target_modules=[\"in_proj\", \"out_proj\", \"embeddings\"]",
        "data.layout=\"pad\"",
        "train.grad_accum=2",
    ];
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    ok(train("cpu", &tiny(&one, &lora), &[]).output().unwrap());
    ok(train("cpu,cpu", &tiny(&two, &lora), &[]).output().unwrap());
    assert_same_run(&one, &two, "adapter/adapter_model.safetensors", 5);
}

#[test]
fn data_parallel_resume_is_exact_and_may_change_the_device_count() {
    let tmp = tempfile::tempdir().unwrap();
    let every2 = ["train.checkpoint_every=2", "data.layout=\"pad\""];
    let whole = tmp.path().join("whole");
    ok(train("cpu,cpu", &tiny(&whole, &every2), &[])
        .output()
        .unwrap());

    // Stopped at step 3 by an out-of-memory on rank 1 alone: the error names that device,
    // and the checkpoint of step 2 is left whole.
    for (name, resume_on) in [("cut", "cpu,cpu"), ("cut-then-one", "cpu")] {
        let cut = tmp.path().join(name);
        let out = train("cpu,cpu", &tiny(&cut, &every2), &[])
            .env(SIMULATE_OOM, "3@1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(
            stderr.contains("out of device memory") && stderr.contains("cpu (replica 1)"),
            "{stderr}"
        );
        assert!(stderr.contains("step-00000002"), "{stderr}");
        let log = ok(train(resume_on, &tiny(&cut, &every2), &["--resume"])
            .output()
            .unwrap());
        if resume_on == "cpu" {
            assert!(
                log.contains("written on 2 device(s), this run has 1"),
                "{log}"
            );
        }
        // metrics.jsonl holds steps 1–2 from the first run and 3–5 from the resumed one.
        assert_same_run(&whole, &cut, "model/model.safetensors", 5);
    }
}

#[test]
fn device_lists_that_cannot_work_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("x");
    // 4 rows do not split over 3 replicas.
    let out = train("cpu,cpu,cpu", &tiny(&out_dir, &[]), &[])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("`train.batch_size` = 4 does not split evenly over 3 devices"),
        "{stderr}"
    );
    // The same through the config's list.
    let mut sets = tiny(&out_dir, &[]);
    sets.push("train.devices=[\"cpu\", \"cpu\", \"cpu\"]".into());
    let mut cmd = Command::new(TRAIN);
    cmd.current_dir(repo_root())
        .args(["--config", "configs/quickstart.toml"])
        .env("HF_HUB_OFFLINE", "1");
    for s in &sets {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("does not split evenly over the 3 devices of `train.devices`"),
        "{stderr}"
    );
    // Several processes: refused, saying why (burn-collective 0.21 hangs there).
    let mut sets = tiny(&out_dir, &[]);
    sets.extend([
        "nodes.count=2".to_string(),
        "nodes.orchestrator=\"ws://127.0.0.1:3000\"".into(),
        "nodes.address=\"ws://127.0.0.1:3001\"".into(),
    ]);
    let out = train("cpu", &sets, &[]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("burn-collective 0.21's cross-process all-reduce"),
        "{stderr}"
    );
    for (list, says) in [
        ("cuda:0,cpu", "every device must be of one kind"),
        ("wgpu,wgpu", "not on `auto` or `wgpu`"),
    ] {
        let out = train(list, &tiny(&out_dir, &[]), &[]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(says),
            "{list}: {stderr}"
        );
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Two processes of `train` on loopback, each with `devices`, joined by burn-collective's
/// orchestrator (node 0 serves it), writing into one output directory (as a shared one would
/// be); returns node 0's and node 1's logs.
fn two_nodes(devices: &str, sets: &[String], logs: &Path) -> (String, String) {
    let orchestrator = free_port();
    let mut children: Vec<_> = (0..2)
        .map(|rank| {
            let mut s = sets.to_vec();
            s.extend([
                "nodes.count=2".to_string(),
                format!("nodes.rank={rank}"),
                format!("nodes.orchestrator=\"ws://127.0.0.1:{orchestrator}\""),
                format!("nodes.address=\"ws://127.0.0.1:{}\"", free_port()),
            ]);
            let log = std::fs::File::create(logs.join(format!("node{rank}.log"))).unwrap();
            train(devices, &s, &[])
                .env("MAMBA_ALLOW_MULTI_NODE", "1")
                .stdout(std::process::Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap()
        })
        .collect();
    let t0 = std::time::Instant::now();
    let mut status = [None, None];
    while status.iter().any(Option::is_none) {
        for (i, c) in children.iter_mut().enumerate() {
            if status[i].is_none() {
                status[i] = c.try_wait().unwrap();
            }
        }
        if t0.elapsed() > std::time::Duration::from_secs(120) {
            for c in &mut children {
                let _ = c.kill();
            }
            panic!("the two nodes did not finish in 120 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let read = |r: usize| std::fs::read_to_string(logs.join(format!("node{r}.log"))).unwrap();
    for (r, s) in status.iter().enumerate() {
        assert!(s.unwrap().success(), "node {r} failed:\n{}", read(r));
    }
    (read(0), read(1))
}

/// What several processes would have to pass. It hangs with burn-collective 0.21 (the second
/// cross-process all-reduce never returns: see `mamba_train::config::NODES_BLOCKED`), so it is
/// ignored and `nodes.count` > 1 is refused; run it with `--ignored` against a fixed
/// burn-collective.
#[test]
#[ignore = "burn-collective 0.21's cross-process all-reduce hangs after its first operation"]
fn two_processes_on_loopback_train_as_one_device() {
    let tmp = tempfile::tempdir().unwrap();
    let pad = ["data.layout=\"pad\""];
    let one = tmp.path().join("one");
    ok(train("cpu", &tiny(&one, &pad), &[]).output().unwrap());
    // Two nodes of one device each, then two nodes of two devices each (1 row a rank).
    for (name, devices, says) in [
        (
            "nodes-1",
            "cpu",
            "data parallel: 2 devices on 2 nodes (this is node 0: ranks 0..1)",
        ),
        (
            "nodes-2",
            "cpu,cpu",
            "data parallel: 4 devices on 2 nodes (this is node 0: ranks 0..2)",
        ),
    ] {
        let two = tmp.path().join(name);
        std::fs::create_dir_all(&two).unwrap();
        let (log0, log1) = two_nodes(devices, &tiny(&two, &pad), tmp.path());
        assert!(log0.contains(says), "{log0}");
        assert!(log1.contains("(this is node 1"), "{log1}");
        // Node 1 wrote nothing: metrics.jsonl holds node 0's five steps, once.
        assert_same_run(&one, &two, "model/model.safetensors", 5);
    }
}
