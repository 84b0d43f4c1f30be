//! Training end to end on the CPU at CI size: from scratch, LoRA on that export, resume after a
//! kill, bad input. Uses the binaries as a user would.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use burn::module::AutodiffModule;
use common::*;
use mamba_burn::hf::checkpoint::export_grads;
use mamba_burn::hf::load_model_dir;
use mamba_burn::model::lora::{adapters, apply_lora, merge, LoraConfig, LoraTargets};
use mamba_burn::model::{ForwardArgs, MambaLM, NormMode};
use serde_json::Value;

const TRAIN: &str = env!("CARGO_BIN_EXE_train");
const EVAL: &str = env!("CARGO_BIN_EXE_eval");

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The quickstart config at CI size.
fn small(out: &Path) -> Vec<String> {
    [
        "train.steps=25",
        "train.batch_size=4",
        "train.lr=1e-2",
        "train.warmup_steps=3",
        "train.eval_every=0",
        "train.eval_batches=4",
        "train.log_every=1",
        "train.checkpoint_every=0",
        "data.seq_len=32",
        "data.max_examples=300",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("output.dir=\"{}\"", out.display())])
    .collect()
}

fn train(config: &str, sets: &[String], extra: &[&str]) -> Command {
    let mut cmd = Command::new(TRAIN);
    cmd.current_dir(repo())
        .args(["--config", config, "--device", "cpu"])
        .args(extra);
    for s in sets {
        cmd.args(["--set", s]);
    }
    cmd.env("HF_HUB_OFFLINE", "1");
    cmd
}

fn ok(out: Output) -> Value {
    assert!(
        out.status.success(),
        "failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// Run the quickstart config with `sets`; the validation loss must fall by more than `margin`.
/// Returns the run's summary.
fn train_lowers_val_loss(sets: &[String], margin: f64, what: &str) -> Value {
    let s = ok(train("configs/quickstart.toml", sets, &[])
        .output()
        .unwrap());
    let before = s["initial_val_loss"].as_f64().unwrap();
    let after = s["final_val_loss"].as_f64().unwrap();
    assert!(
        after < before - margin,
        "{what}: validation loss {before} → {after}"
    );
    s
}

fn eval_loss(model: &Path, adapter: Option<&Path>) -> f64 {
    let data = quotes();
    let mut cmd = Command::new(EVAL);
    cmd.args([
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--template",
        "{quote} — {author}",
        "--split",
        "validation",
    ])
    .args(["--max-examples", "300"])
    .args(["--seq-len", "32", "--device", "cpu", "--json"]);
    if let Some(a) = adapter {
        cmd.args(["--adapter", a.to_str().unwrap()]);
    }
    ok(cmd.output().unwrap())["loss"].as_f64().unwrap()
}

#[test]
fn quickstart_then_lora_on_its_export() {
    let tmp = tempfile::tempdir().unwrap();
    // 1. A small Mamba2 from scratch: validation loss falls.
    let qs = tmp.path().join("quickstart");
    train_lowers_val_loss(&small(&qs), 0.3, "from scratch");
    for f in [
        "model/config.json",
        "model/model.safetensors",
        "model/tokenizer.json",
        "metrics.jsonl",
        "loss.png",
        "summary.json",
    ] {
        assert!(qs.join(f).is_file(), "missing {f}");
    }
    // Every logged step carries tokens/s over the recent window and since the start.
    let logged: Vec<Value> = std::fs::read_to_string(qs.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &Value| v.get("loss").is_some())
        .collect();
    assert_eq!(logged.len(), 25);
    for v in &logged {
        for key in ["tokens_per_s", "tokens_per_s_cumulative", "step_s"] {
            assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key} in {v}");
        }
    }

    // 2. Full fine-tuning of that export on a new format: validation loss falls.
    let full = tmp.path().join("full");
    let mut sets = small(&full);
    sets.extend([
        "model.init=".to_string(),
        format!("model.source=\"{}\"", qs.join("model").display()),
        "data.field=".into(),
        "data.template=\"{quote} — {author}\"".into(),
        "train.steps=10".into(),
        "train.lr=3e-3".into(),
    ]);
    let s = train_lowers_val_loss(&sets, 0.05, "full fine-tuning");
    assert_eq!(s["trainable_params"], s["total_params"]);
    assert!(full.join("model/model.safetensors").is_file());

    // 3. LoRA on that export: validation loss falls, only adapters train.
    let lora = tmp.path().join("lora");
    let mut sets = small(&lora);
    sets.extend([
        "model.init=".into(),
        format!("model.source=\"{}\"", qs.join("model").display()),
        "lora.enabled=true".into(),
        "lora.r=4".into(),
        "lora.alpha=8".into(),
        // A new format to learn on the same split: quotes with their authors.
        "data.field=".into(),
        "data.template=\"{quote} — {author}\"".into(),
        "lora.target_modules=[\"in_proj\", \"out_proj\", \"embeddings\"]".into(),
        "train.steps=20".into(),
    ]);
    let s = train_lowers_val_loss(&sets, 0.05, "LoRA");
    assert!(s["trainable_params"].as_u64().unwrap() < s["total_params"].as_u64().unwrap() / 5);

    // PEFT files.
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(lora.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (
            cfg["peft_type"].as_str(),
            cfg["r"].as_u64(),
            cfg["lora_alpha"].as_f64()
        ),
        (Some("LORA"), Some(4), Some(8.0))
    );
    let st = mamba_burn::hf::checkpoint::TensorSource::open(&[
        lora.join("adapter/adapter_model.safetensors")
    ])
    .unwrap();
    let keys: Vec<String> = st
        .keys()
        .map(|k| k.trim_start_matches("backbone.").to_string())
        .collect();
    assert!(
        keys.contains(
            &"base_model.model.backbone.layers.0.mixer.in_proj.lora_A.weight".to_string()
        ),
        "{keys:?}"
    );
    assert!(
        keys.contains(&"base_model.model.backbone.embeddings.lora_embedding_B".to_string()),
        "{keys:?}"
    );
    assert_eq!(keys.len(), 2 + 2 * 2 * 2, "{keys:?}");

    // 4. Base + adapter and the merged export evaluate to the same loss (the full validation
    //    split, through the eval binary), better than the base.
    let with_adapter = eval_loss(&qs.join("model"), Some(&lora.join("adapter")));
    let merged = eval_loss(&lora.join("merged"), None);
    assert!(
        ((with_adapter - merged) / merged).abs() < 1e-5,
        "adapter {with_adapter} vs merged {merged}"
    );
    let base = eval_loss(&qs.join("model"), None);
    assert!(
        merged < base,
        "merged {merged} is not better than the base {base}"
    );

    // 5. `eval --run` evaluates the run on exactly its own validation split and settings: the
    //    run's final validation loss.
    let got = ok(Command::new(EVAL)
        .current_dir(repo())
        .args(["--run", lora.to_str().unwrap(), "--device", "cpu", "--json"])
        .output()
        .unwrap())["loss"]
        .as_f64()
        .unwrap();
    let want = s["final_val_loss"].as_f64().unwrap();
    assert!(
        ((got - want) / want).abs() < 1e-6,
        "eval --run {got} vs the run's final validation loss {want}"
    );
}

/// Every LoRA target gets a gradient, the base gets none, and merging is exact.
#[test]
fn every_lora_target_trains_and_merges_exactly() {
    for case in [
        "mamba1_untied_f16",
        "mamba2_g2_untied_bias_limit",
        "mamba2_g1_tied",
    ] {
        let device = Default::default();
        let model: MambaLM<CpuAd> =
            load_model_dir(&fixtures().join(case), NormMode::Hf, &device).unwrap();
        let names: Vec<String> = if case.starts_with("mamba1") {
            [
                "in_proj",
                "x_proj",
                "dt_proj",
                "out_proj",
                "embeddings",
                "lm_head",
            ]
            .map(String::from)
            .to_vec()
        } else if case.ends_with("tied") {
            ["in_proj", "out_proj", "embeddings"]
                .map(String::from)
                .to_vec()
        } else {
            ["in_proj", "out_proj", "embeddings", "lm_head"]
                .map(String::from)
                .to_vec()
        };
        let cfg = LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            use_rslora: false,
            targets: LoraTargets::Names(names),
        };
        let (model, keys) = apply_lora(model, &cfg, &device).unwrap();
        let r = Reference::load(case);
        let ids = int_tensor(&r.ids("input_ids"), &device);
        let out = model.forward_with(
            ids.clone(),
            ForwardArgs {
                labels: Some(ids.clone()),
                ..Default::default()
            },
        );
        let grads = out.loss.unwrap().backward();
        assert!(
            export_grads::<CpuAd>(&model, &grads).is_empty(),
            "{case}: a frozen base weight got a gradient"
        );
        let (linears, emb) = adapters(&model);
        assert_eq!(linears.len() + emb.iter().count(), keys.len());
        for (key, l) in &linears {
            // B starts at zero, so dL/dA is zero at init and dL/dB carries the signal.
            let g =
                l.b.val()
                    .grad(&grads)
                    .unwrap_or_else(|| panic!("{case}: no gradient for {key}.lora_B"));
            assert!(
                values(g).iter().any(|v| v.abs() > 0.0),
                "{case}: zero gradient for {key}.lora_B"
            );
        }
        let e = emb.expect("embeddings adapted");
        let g =
            e.a.val()
                .grad(&grads)
                .expect("no gradient for lora_embedding_A");
        assert!(
            values(g).iter().any(|v| v.abs() > 0.0),
            "{case}: zero gradient for lora_embedding_A"
        );

        // Give every B a value, then merge: the merged model computes the same function.
        let model = model.valid();
        let model = perturb_adapters(model);
        let ids = int_tensor(&r.ids("input_ids"), &device);
        let with = values(model.forward(ids.clone()));
        let tied = model.lm_head.is_none();
        let merged = merge(model);
        assert!(adapters(&merged).0.is_empty() && adapters(&merged).1.is_none());
        assert!(
            merged.lm_head.is_some(),
            "{case}: a merged embedding adapter unties the head"
        );
        assert!(
            !merged.config.tie_word_embeddings(),
            "{case} (tied before: {tied})"
        );
        let err = rel_err(&values(merged.forward(ids)), &with);
        assert!(err < 1e-5, "{case}: merged differs by {err:e}");
    }
}

fn perturb_adapters(mut model: MambaLM<Cpu>) -> MambaLM<Cpu> {
    use burn::module::Param;
    use burn::tensor::{Distribution, Tensor};
    let noisy = |p: &Param<Tensor<Cpu, 2>>| {
        Param::from_tensor(Tensor::random(
            p.dims(),
            Distribution::Normal(0.0, 0.05),
            &Default::default(),
        ))
    };
    let visit = |l: &mut mamba_burn::model::nn::Linear<Cpu>| {
        if let Some(a) = l.lora.as_mut() {
            a.b = noisy(&a.b);
        }
    };
    for layer in model.layers.iter_mut() {
        match &mut layer.mixer {
            mamba_burn::model::Mixer::Mamba2(m) => {
                visit(&mut m.in_proj);
                visit(&mut m.out_proj);
            }
            mamba_burn::model::Mixer::Mamba1(m) => {
                visit(&mut m.in_proj);
                visit(&mut m.x_proj);
                visit(&mut m.dt_proj);
                visit(&mut m.out_proj);
            }
        }
    }
    if let Some(h) = model.lm_head.as_mut() {
        visit(h);
    }
    if let Some(e) = model.embeddings.lora.as_mut() {
        e.a = noisy(&e.a);
    }
    model
}

/// Kill a run (with `extra` settings) after its first checkpoint; `--resume` continues the same
/// loss curve. Returns the temporary directory and the interrupted run's output directory.
fn resume_case(extra: &[&str]) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let sets = |dir: &Path| -> Vec<String> {
        let mut s = small(dir);
        s.extend([
            "train.steps=12".to_string(),
            "train.checkpoint_every=4".into(),
            "data.max_examples=120".into(),
        ]);
        s.extend(extra.iter().map(|e| e.to_string()));
        s
    };
    let whole = tmp.path().join("whole");
    ok(train("configs/quickstart.toml", &sets(&whole), &[])
        .output()
        .unwrap());

    let cut = tmp.path().join("cut");
    let mut child = train("configs/quickstart.toml", &sets(&cut), &[])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let first = cut.join("checkpoints/step-00000004/state.json");
    let t0 = Instant::now();
    while !first.is_file() {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "no checkpoint appeared"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !cut.join("summary.json").exists(),
        "the run finished before the kill"
    );

    // Without --resume the directory is refused rather than overwritten.
    let out = train("configs/quickstart.toml", &sets(&cut), &[])
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--resume"));

    ok(train("configs/quickstart.toml", &sets(&cut), &["--resume"])
        .output()
        .unwrap());
    let (a, b) = (
        losses(&whole.join("metrics.jsonl")),
        losses(&cut.join("metrics.jsonl")),
    );
    assert_eq!(
        a.iter().map(|x| x.0).collect::<Vec<_>>(),
        (1..=12).collect::<Vec<_>>()
    );
    assert_eq!(a.len(), b.len(), "{b:?}");
    for ((sa, la), (sb, lb)) in a.iter().zip(&b) {
        assert_eq!(sa, sb);
        assert!(
            ((la - lb) / la).abs() < 1e-5,
            "step {sa}: {la} uninterrupted vs {lb} resumed"
        );
    }
    (tmp, cut)
}

#[test]
fn resume_after_kill_continues_the_same_curve() {
    resume_case(&[]);
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                dir_bytes(&e.path())
            } else {
                m.len()
            }
        })
        .sum()
}

/// A LoRA run with gradient checkpointing: its checkpoints hold the adapters and their
/// optimizer state, not the base; resume continues the same curve and refuses another base.
#[test]
fn lora_checkpoints_hold_adapters_and_resume_exactly() {
    let lora = [
        "lora.enabled=true",
        "lora.r=4",
        "lora.target_modules=[\"in_proj\", \"out_proj\"]",
        "train.gradient_checkpointing=true",
    ];
    let (_tmp, cut) = resume_case(&lora);
    let ckpt = cut.join("checkpoints/step-00000012");
    assert!(ckpt.join("trainable.safetensors").is_file());
    assert!(
        !ckpt.join("model.mpk").exists(),
        "the base model was written"
    );
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(cut.join("summary.json")).unwrap()).unwrap();
    let model_bytes = 4 * summary["total_params"].as_u64().unwrap();
    let bytes = dir_bytes(&ckpt);
    assert!(
        bytes * 50 < model_bytes,
        "checkpoint {bytes} bytes for a model of {model_bytes} bytes"
    );
    // The same run directory with another adapter rank is another model: refused.
    let mut sets = small(&cut);
    sets.extend([
        "train.steps=12".to_string(),
        "train.checkpoint_every=4".into(),
        "data.max_examples=120".into(),
    ]);
    sets.extend(lora.iter().map(|s| s.replace("lora.r=4", "lora.r=2")));
    let err = fails_with(
        &mut train("configs/quickstart.toml", &sets, &["--resume"]),
        "trained on another base model",
    );
    assert!(err.contains("trainable"), "{err}");
}

/// A device allocation failure mid-run stops with sizes and advice, and the last checkpoint
/// stays loadable: `--resume` finishes the run.
#[test]
fn out_of_memory_is_a_clear_error_and_keeps_the_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("oom");
    let mut sets = small(&out);
    sets.extend([
        "train.steps=6".to_string(),
        "train.checkpoint_every=2".into(),
        "data.max_examples=120".into(),
    ]);
    let err = fails_with(
        train("configs/quickstart.toml", &sets, &[]).env("MAMBA_SIMULATE_OOM_AT_STEP", "5"),
        "out of device memory at step 5",
    );
    for want in [
        "micro-batch 4 x 32 tokens",
        "can't allocate buffer",
        "train.gradient_checkpointing = true",
        "grad_accum",
        "step-00000004",
        "estimated to need",
    ] {
        assert!(err.contains(want), "`{want}` missing from: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    assert!(out.join("checkpoints/step-00000004/state.json").is_file());
    assert!(!out.join("summary.json").exists());
    let s = ok(train("configs/quickstart.toml", &sets, &["--resume"])
        .output()
        .unwrap());
    assert_eq!(s["steps"].as_u64(), Some(6));
}

fn fails_with(cmd: &mut Command, want: &str) -> String {
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "expected failure containing {want:?}"
    );
    assert!(err.contains(want), "expected {want:?} in:\n{err}");
    err
}

#[test]
fn bad_input_stops_with_a_clear_message() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let with = |extra: &[&str]| -> Vec<String> {
        let mut s = small(&out);
        s.extend(extra.iter().map(|x| x.to_string()));
        s
    };
    fails_with(
        &mut train(
            "configs/quickstart.toml",
            &with(&["data.source=\"/nonexistent/quotes.jsonl\""]),
            &[],
        ),
        "/nonexistent/quotes.jsonl",
    );
    fails_with(
        &mut train(
            "configs/quickstart.toml",
            &with(&["train.learning_rate=1"]),
            &[],
        ),
        "learning_rate",
    );
    fails_with(
        &mut train("configs/quickstart.toml", &with(&["data.seq_len=1"]), &[]),
        "`data.seq_len`: must be at least 2",
    );
    fails_with(
        &mut train(
            "configs/quickstart.toml",
            &with(&["data.field=\"nope\""]),
            &[],
        ),
        "line 1: missing field `nope`",
    );
    let empty = tmp.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    fails_with(
        &mut train(
            "configs/quickstart.toml",
            &with(&[&format!("data.source=\"{}\"", empty.display())]),
            &[],
        ),
        "the dataset is empty",
    );
    fails_with(
        &mut train("/nonexistent.toml", &[], &[]),
        "/nonexistent.toml",
    );

    // A diverging run stops at the first non-finite loss and keeps its last checkpoint.
    let err = fails_with(
        &mut train(
            "configs/quickstart.toml",
            &with(&[
                "train.lr=1e30",
                "train.max_grad_norm=0",
                "train.warmup_steps=0",
                "train.checkpoint_every=1",
            ]),
            &[],
        ),
        "the loss is",
    );
    assert!(err.contains("left intact"), "{err}");
    let kept = out.join("checkpoints");
    let cps: Vec<_> = std::fs::read_dir(&kept)
        .unwrap()
        .flatten()
        .filter(|e| e.path().join("state.json").is_file())
        .collect();
    assert!(
        !cps.is_empty(),
        "no complete checkpoint left in {}",
        kept.display()
    );
}

/// As in PEFT, a target list may name modules another architecture has (`x_proj` on a Mamba2)
/// as long as something matches; nothing matching at all is an error naming the modules.
#[test]
fn lora_targets_follow_peft_matching() {
    use mamba_burn::model::lora::unmatched_targets;
    let device = Default::default();
    let model: MambaLM<Cpu> =
        load_model_dir(&fixtures().join("mamba2_g1_tied"), NormMode::Hf, &device).unwrap();
    let names = |v: &[&str]| LoraTargets::Names(v.iter().map(|s| s.to_string()).collect());
    let cfg = |t| LoraConfig {
        r: 2,
        alpha: 4.0,
        dropout: 0.0,
        use_rslora: false,
        targets: t,
    };
    assert_eq!(
        unmatched_targets(&model, &names(&["x_proj", "in_proj"])),
        vec!["x_proj"]
    );
    let (_, keys) = apply_lora(model, &cfg(names(&["x_proj", "in_proj"])), &device).unwrap();
    assert_eq!(
        keys,
        vec![
            "backbone.layers.0.mixer.in_proj",
            "backbone.layers.1.mixer.in_proj"
        ]
    );
    let model: MambaLM<Cpu> =
        load_model_dir(&fixtures().join("mamba2_g1_tied"), NormMode::Hf, &device).unwrap();
    let e = apply_lora(model, &cfg(names(&["x_proj", "dt_proj"])), &device)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("x_proj, dt_proj") && e.contains("in_proj"),
        "{e}"
    );
    let model: MambaLM<Cpu> =
        load_model_dir(&fixtures().join("mamba2_g1_tied"), NormMode::Hf, &device).unwrap();
    let (_, keys) = apply_lora(
        model,
        &cfg(LoraTargets::Regex(
            r"backbone\.layers\.1\.mixer\.(in|out)_proj".into(),
        )),
        &device,
    )
    .unwrap();
    assert_eq!(keys.len(), 2);
}

/// A hub dataset id resolves through the standard cache layout (offline).
#[test]
fn hub_dataset_id_from_local_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let commit = "89abcdef0123456789abcdef0123456789abcdef";
    let repo = tmp.path().join("hf/hub/datasets--Abirate--english_quotes");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::copy(quotes(), snap.join("quotes.jsonl")).unwrap();
    let out = tmp.path().join("run");
    let mut sets = small(&out);
    sets.extend([
        "data.source=\"Abirate/english_quotes\"".to_string(),
        "data.file=\"quotes.jsonl\"".into(),
        "train.steps=2".into(),
        "data.max_examples=60".into(),
    ]);
    let mut cmd = train("configs/quickstart.toml", &sets, &[]);
    cmd.env("HF_HOME", tmp.path().join("hf"))
        .env_remove("HF_HUB_CACHE");
    let s = ok(cmd.output().unwrap());
    assert_eq!(s["steps"], 2);

    // Without `data.file` the error says what to set.
    let mut sets = small(&out);
    sets.push("data.source=\"Abirate/english_quotes\"".into());
    let mut cmd = train("configs/quickstart.toml", &sets, &[]);
    cmd.env("HF_HOME", tmp.path().join("hf"));
    fails_with(&mut cmd, "set `data.file`");
}

/// The main command with an empty hub cache and the hub unreachable: the model error says what
/// happened and how to go on offline; with a local model, the bundled english_quotes stands in
/// for the hub dataset.
#[test]
fn main_command_without_the_hub() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |sets: &[String]| {
        let mut cmd = Command::new(TRAIN);
        cmd.current_dir(repo())
            .args(["--config", "configs/lora.toml", "--device", "cpu"])
            .env("HF_HOME", tmp.path().join("hf"))
            .env("HF_HUB_CACHE", tmp.path().join("hf/hub"))
            .env("HF_ENDPOINT", "http://127.0.0.1:9")
            .env_remove("HF_HUB_OFFLINE")
            .env_remove("TRANSFORMERS_OFFLINE");
        for s in sets {
            cmd.args(["--set", s]);
        }
        cmd
    };
    let out = format!("output.dir=\"{}\"", tmp.path().join("run").display());
    let err = fails_with(
        &mut run(std::slice::from_ref(&out)),
        "cannot reach the Hugging Face hub",
    );
    assert!(err.contains("state-spaces/mamba-130m-hf"), "{err}");
    assert!(err.contains("configs/quickstart.toml"), "{err}");

    // Offline mode without the model cached says so.
    let err = fails_with(
        run(std::slice::from_ref(&out)).env("HF_HUB_OFFLINE", "1"),
        "offline (HF_HUB_OFFLINE is set) and not in the Hugging Face cache",
    );
    assert!(err.contains("model.source"), "{err}");

    // With a local model the run goes on, on the bundled copy of the dataset.
    let mut sets = small(&tmp.path().join("run2"));
    sets.extend([
        "model.source=".to_string(),
        "model.init=\"configs/models/mamba2-tiny.json\"".into(),
        "tokenizer.source=\"tokenizers/gpt-neox-20b/tokenizer.json\"".into(),
        "train.steps=2".into(),
        "lora.target_modules=[\"in_proj\"]".into(),
        "output.export_merged=false".into(),
    ]);
    let out = run(&sets).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("Abirate/english_quotes is not available from the hub or its cache")
            && err.contains("bundled with mamba-burn"),
        "{err}"
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

/// The quickstart needs nothing outside the checkout: run from a directory holding only the
/// repository's `configs/`, `datasets/` and `tokenizers/` (no `../shared` beside it), it trains
/// and exports.
#[test]
fn quickstart_runs_from_the_checkout_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("checkout");
    for d in ["configs", "datasets", "tokenizers"] {
        copy_dir(&repo().join(d), &root.join(d));
    }
    assert!(!root.join("../shared").exists());
    let mut sets = small(&root.join("runs/quickstart"));
    sets.extend(["train.steps=2".to_string(), "data.max_examples=60".into()]);
    let mut cmd = Command::new(TRAIN);
    cmd.current_dir(&root)
        .args(["--config", "configs/quickstart.toml", "--device", "cpu"])
        .env("HF_HUB_OFFLINE", "1");
    for s in &sets {
        cmd.args(["--set", s]);
    }
    let s = ok(cmd.output().unwrap());
    assert_eq!(s["steps"].as_u64(), Some(2));
    assert!(root
        .join("runs/quickstart/model/model.safetensors")
        .is_file());
    assert!(root.join("runs/quickstart/model/tokenizer.json").is_file());
}
