//! The `eval`, `generate`, `train` and `bench` binaries: their flags are a contract other tools
//! call. The wgpu runs use Mesa's lavapipe on machines without a GPU.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn run(bin: &str, args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("HF_HUB_CACHE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("binary runs")
}

/// As [`run`], but a binary still running after `limit` is killed and fails the test (a hang, a
/// deadlock say, must not stall CI).
fn run_limited(bin: &str, args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(bin)
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("HF_HUB_CACHE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("binary runs");
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            buf
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let err = stderr.join().unwrap();
            panic!(
                "{bin} {args:?} still running after {limit:?}; killed. stderr:\n{}",
                String::from_utf8_lossy(&err)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// Limit of one `bench` run in the tests (lavapipe compiles every shader on first use).
const BENCH_LIMIT: Duration = Duration::from_secs(900);

fn json_of(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

const EVAL: &str = env!("CARGO_BIN_EXE_eval");
const GENERATE: &str = env!("CARGO_BIN_EXE_generate");
const TRAIN: &str = env!("CARGO_BIN_EXE_train");
const BENCH: &str = env!("CARGO_BIN_EXE_bench");

/// Agreement asked of the kernels against the reference.
const REL_TOL: f64 = 1e-4;

fn token_file(dir: &Path, r: &Reference) -> std::path::PathBuf {
    let p = dir.join("ids.json");
    std::fs::write(&p, serde_json::to_string(&r.json["input_ids"]).unwrap()).unwrap();
    p
}

#[test]
fn eval_matches_transformers_loss() {
    let case = "mamba2_g2_untied_bias_limit";
    let r = Reference::load(case);
    let tmp = tempfile::tempdir().unwrap();
    let ids = token_file(tmp.path(), &r);
    let model = r.dir.to_str().unwrap();
    for (norm, key) in [
        ("hf", "loss_all_tokens"),
        ("grouped", "grouped_loss_all_tokens"),
    ] {
        let out = run(
            EVAL,
            &[
                "--model",
                model,
                "--token-ids",
                ids.to_str().unwrap(),
                "--device",
                "cpu",
                "--norm",
                norm,
                "--json",
            ],
            &[],
        );
        let v = json_of(&out);
        let loss = v["loss"].as_f64().unwrap();
        let want = r.f64(key);
        assert!(
            ((loss - want) / want).abs() <= 1e-5,
            "--norm {norm}: {loss} vs transformers {want}"
        );
        assert!((v["perplexity"].as_f64().unwrap() - loss.exp()).abs() < 1e-9);
        assert_eq!(v["tokens"], 2 * 36);
    }
}

#[test]
fn generate_matches_transformers_greedy() {
    for case in ["mamba2_g1_tied", "mamba1_untied_f16"] {
        let r = Reference::load(case);
        let prompt: Vec<String> = r.u32s("prompt_ids").iter().map(|i| i.to_string()).collect();
        let want = r.u32s("greedy_cached");
        let n = (want.len() - prompt.len()).to_string();
        for extra in [&[][..], &["--no-cache"][..]] {
            let mut args = vec![
                "--model",
                r.dir.to_str().unwrap(),
                "--max-new-tokens",
                &n,
                "--greedy",
                "--ignore-eos",
                "--device",
                "cpu",
                "--norm",
                "hf",
                "--json",
            ];
            let joined = prompt.join(",");
            args.extend(["--prompt-ids", &joined]);
            args.extend(extra);
            let v = json_of(&run(GENERATE, &args, &[]));
            let ids: Vec<u32> = serde_json::from_value(v["ids"].clone()).unwrap();
            assert_eq!(ids, want, "{case} {extra:?}");
        }
    }
}

/// A randomly initialised Mamba2 with the GPT-NeoX vocabulary, saved with the bundled
/// tokenizer beside it: a model directory a text prompt can go through.
fn text_model() -> tempfile::TempDir {
    use mamba_burn::hf::checkpoint::SaveDtype;
    use mamba_burn::model::MambaLM;
    let dir = tempfile::tempdir().unwrap();
    let config = mamba_burn::hf::config::load_config(&model_config("mamba2-tiny.json")).unwrap();
    let model = MambaLM::<Cpu>::init(&config, &Default::default()).unwrap();
    mamba_burn::hf::save_model(&model, dir.path(), SaveDtype::F32).unwrap();
    std::fs::copy(
        repo_root().join("tokenizers/gpt-neox-20b/tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    dir
}

/// Text in, text out: the prompt is tokenized with the model's tokenizer, the continuation
/// streams to stdout as text, and `--json` reports ids and text that agree with the tokenizer.
#[test]
fn generate_text_round_trip() {
    let dir = text_model();
    let tok = mamba_burn::data::Tokenizer::from_file(&dir.path().join("tokenizer.json")).unwrap();
    let prompt = "Plants create energy through a process known as";
    let want_prompt = tok.encode(prompt).unwrap();
    assert_eq!(
        tok.decode(&want_prompt).unwrap(),
        prompt,
        "tokenizer round trip"
    );
    let model = dir.path().to_str().unwrap();
    let base = [
        "--model",
        model,
        "--prompt",
        prompt,
        "--max-new-tokens",
        "6",
        "--device",
        "cpu",
    ];
    let mut args = base.to_vec();
    args.extend(["--ignore-eos", "--json"]);
    let v = json_of(&run(GENERATE, &args, &[]));
    let ids: Vec<u32> = serde_json::from_value(v["ids"].clone()).unwrap();
    assert_eq!(ids[..want_prompt.len()], want_prompt[..]);
    assert_eq!(v["new_tokens"], 6);
    let new = &ids[want_prompt.len()..];
    assert_eq!(new.len(), 6);
    let text = v["text"].as_str().unwrap();
    assert_eq!(text, tok.decode_skip_special(new).unwrap());
    assert_eq!(v["prompt"], prompt);
    // Streamed: the prompt, then the same continuation.
    let mut args = base.to_vec();
    args.push("--ignore-eos");
    let out = run(GENERATE, &args, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("{prompt}{text}\n")
    );
    // A prompt file of two prompts (JSONL): one left-padded batch, one object each.
    let file = dir.path().join("prompts.jsonl");
    std::fs::write(
        &file,
        format!("{{\"q\": \"{prompt}\"}}\n{{\"q\": \"The sky\"}}\n"),
    )
    .unwrap();
    let args = [
        "--model",
        model,
        "--prompt-file",
        file.to_str().unwrap(),
        "--field",
        "q",
        "--max-new-tokens",
        "6",
        "--ignore-eos",
        "--device",
        "cpu",
        "--json",
    ];
    let out = run(GENERATE, &args, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(
        lines[0]["ids"], v["ids"],
        "a batched row equals its prompt alone"
    );
    assert_eq!(lines[1]["prompt"], "The sky");
}

/// Bad decoding flags and prompts are refused with messages that name them.
#[test]
fn generate_bad_flags_are_clear_errors() {
    let dir = text_model();
    let model = dir.path().to_str().unwrap();
    let cases: [(&[&str], &str); 5] = [
        (
            &["--prompt", "Hi", "--do-sample", "--top-p", "0"],
            "top_p = 0",
        ),
        (
            &["--prompt", "Hi", "--do-sample", "--top-p", "1.5"],
            "(0, 1]",
        ),
        (
            &["--prompt", "Hi", "--do-sample", "--temperature", "0"],
            "temperature",
        ),
        (&["--prompt", ""], "empty"),
        (&["--prompt-ids", "1,99999999"], "outside the vocabulary"),
    ];
    for (extra, want) in cases {
        let mut args = vec!["--model", model, "--device", "cpu"];
        args.extend(extra);
        let out = run(GENERATE, &args, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?} succeeded");
        assert!(err.contains(want), "{extra:?}: {err}");
    }
}

/// A hub id resolves through the standard cache layout under HF_HOME, offline.
#[test]
fn hub_id_from_local_cache_offline() {
    let r = Reference::load("mamba1_tied");
    let home = tempfile::tempdir().unwrap();
    let repo = home.path().join("hub/models--test-org--tiny-mamba");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(r.dir.join(f), snap.join(f)).unwrap();
    }
    let ids = token_file(home.path(), &r);
    let args = [
        "--model",
        "test-org/tiny-mamba",
        "--token-ids",
        ids.to_str().unwrap(),
        "--device",
        "cpu",
        "--json",
    ];
    let v = json_of(&run(EVAL, &args, &[("HF_HOME", home.path())]));
    let want = r.f64("loss_all_tokens");
    assert!(((v["loss"].as_f64().unwrap() - want) / want).abs() <= 1e-5);

    // Same through HF_HUB_CACHE pointing at the hub folder directly.
    let v = json_of(&run(
        EVAL,
        &args,
        &[
            ("HF_HUB_CACHE", &home.path().join("hub")),
            ("HF_HOME", Path::new("/nonexistent")),
        ],
    ));
    assert!(((v["loss"].as_f64().unwrap() - want) / want).abs() <= 1e-5);

    // An id not in the cache, offline: a clear error naming the cache.
    let args = [
        "--model",
        "test-org/absent",
        "--token-ids",
        ids.to_str().unwrap(),
        "--device",
        "cpu",
        "--json",
    ];
    let out = run(EVAL, &args, &[("HF_HOME", home.path())]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("test-org/absent")
            && err.contains("HF_HUB_OFFLINE")
            && err.contains(&home.path().join("hub").display().to_string()),
        "{err}"
    );
}

#[test]
fn bad_token_files_are_named() {
    let r = Reference::load("mamba1_tied");
    let tmp = tempfile::tempdir().unwrap();
    let model = r.dir.to_str().unwrap();
    for (content, want) in [
        (
            "[[1, 2, 3], [4, 5]]",
            "sequence 1 has 2 tokens but sequence 0 has 3",
        ),
        (
            "[[1, 2, 300]]",
            "token 300 (sequence 0, position 2) is out of range for the model's vocab_size 96",
        ),
        ("[]", "the list of sequences is empty"),
        ("[[1]]", "at least 2 tokens"),
        ("{\"ids\": 1}", "expected a JSON list of lists"),
    ] {
        let p = tmp.path().join("bad.json");
        std::fs::write(&p, content).unwrap();
        let out = run(
            EVAL,
            &[
                "--model",
                model,
                "--token-ids",
                p.to_str().unwrap(),
                "--device",
                "cpu",
                "--json",
            ],
            &[],
        );
        assert!(!out.status.success(), "{content} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(want) && err.contains("bad.json"),
            "{content}: {err}"
        );
    }
    // Greedy is the default when not sampling, as in transformers; `--greedy` says so, and
    // contradicts `--do-sample`.
    let gen = |extra: &[&str]| {
        let mut args = vec![
            "--model",
            model,
            "--prompt-ids",
            "1,2",
            "--device",
            "cpu",
            "--json",
        ];
        args.extend(extra);
        run(GENERATE, &args, &[])
    };
    assert_eq!(
        json_of(&gen(&[]))["ids"],
        json_of(&gen(&["--greedy"]))["ids"]
    );
    fails_with(&gen(&["--greedy", "--do-sample"]), "--do-sample");
}

fn fails_with(out: &Output, want: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "expected a failure naming {want:?}");
    assert!(err.contains(want), "expected {want:?} in:\n{err}");
    err
}

fn positive(v: &Value, what: &str) -> f64 {
    let x = v
        .as_f64()
        .unwrap_or_else(|| panic!("{what}: not a number: {v}"));
    assert!(x > 0.0 && x.is_finite(), "{what}: {x}");
    x
}

/// `eval --ops`: `kernels` on the CPU is an error naming the flag; on wgpu, kernels and reference
/// give the same loss.
#[test]
fn eval_ops_switch() {
    let tmp = tempfile::tempdir().unwrap();
    for case in ["mamba2_g2_untied_bias_limit", "mamba1_tied"] {
        let r = Reference::load(case);
        let ids = token_file(tmp.path(), &r);
        let loss = |device: &str, ops: &str| {
            let args = [
                "--model",
                r.dir.to_str().unwrap(),
                "--token-ids",
                ids.to_str().unwrap(),
                "--device",
                device,
                "--ops",
                ops,
                "--json",
            ];
            let out = run(EVAL, &args, &[]);
            if device == "cpu" && ops == "kernels" {
                fails_with(&out, "--ops");
                return f64::NAN;
            }
            json_of(&out)["loss"].as_f64().unwrap()
        };
        loss("cpu", "kernels");
        let reference = loss("wgpu", "reference");
        let kernels = loss("wgpu", "kernels");
        assert!(
            ((kernels - reference) / reference).abs() <= REL_TOL,
            "{case}: --ops kernels {kernels} vs --ops reference {reference}"
        );
        let auto = loss("cpu", "auto");
        assert!(((auto - reference) / reference).abs() <= REL_TOL);
    }
    let out = run(EVAL, &["--model", "x", "--ops", "fast"], &[]);
    fails_with(&out, "--ops");
}

/// `device.ops` in a run config: an unknown value, or `kernels` on the CPU, is an error naming
/// the key (before any data is read).
#[test]
fn train_device_ops_is_checked() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let train = |sets: &[&str]| {
        let mut cmd = Command::new(TRAIN);
        cmd.current_dir(repo)
            .args(["--config", "configs/quickstart.toml", "--device", "cpu"])
            .env("HF_HUB_OFFLINE", "1");
        for s in sets {
            cmd.args(["--set", s]);
        }
        cmd.output().expect("binary runs")
    };
    let err = fails_with(&train(&["device.ops=fast"]), "`device.ops`");
    assert!(err.contains("fast") && err.contains("reference"), "{err}");
    fails_with(&train(&["device.ops=kernels"]), "`device.ops`");
}

/// `bench kernels` at the small shapes on wgpu: every op, positive timings for both
/// implementations, and the kernels within `REL_TOL` of the reference on every output and
/// gradient.
#[test]
fn bench_kernels_small_on_wgpu() {
    let out = run_limited(
        BENCH,
        &[
            "kernels",
            "--device",
            "wgpu",
            "--shapes",
            "small",
            "--json",
            "--iters",
            "2",
            "--warmup",
            "1",
            "--max-err",
            "1e-4",
        ],
        BENCH_LIMIT,
    );
    let v = json_of(&out);
    assert_eq!(v["bench"], "kernels");
    assert_eq!(v["device"], "wgpu");
    assert!(v["timestamp"].is_string());
    let results = v["results"].as_array().unwrap();
    for op in ["ssd", "conv", "scan"] {
        assert!(results.iter().any(|r| r["op"] == op), "no {op} result: {v}");
    }
    for r in results {
        let what = format!("{} {}", r["op"], r["shape"]);
        // `--ssd-dtype` defaults to f32, and every op says the dtype it ran in.
        assert_eq!(r["dtype"], "f32", "{what}");
        for side in ["kernels", "reference"] {
            for t in ["fwd_ms", "fwd_bwd_ms"] {
                positive(&r[side][t], &format!("{what} {side}.{t}"));
            }
        }
        let err = r["max_rel_err"]
            .as_f64()
            .unwrap_or_else(|| panic!("{what}: max_rel_err {}", r["max_rel_err"]));
        assert!(
            err <= REL_TOL,
            "{what}: max_rel_err {err:e} ({})",
            r["worst_tensor"]
        );
        // Outputs and every input's gradient were compared.
        let errs = r["rel_errs"].as_object().unwrap();
        let want = match r["op"].as_str().unwrap() {
            "ssd" => 2 + 7,
            "conv" => 2 + 3,
            _ => 2 + 8,
        };
        assert_eq!(errs.len(), want, "{what}: {errs:?}");
        if r["op"] == "conv" {
            let b = &r["bandwidth"];
            positive(&b["copy_gbps"], &format!("{what} copy_gbps"));
            positive(&r["kernels"]["fwd_gbps"], &format!("{what} fwd_gbps"));
            positive(
                &r["kernels"]["fwd_bwd_copy_fraction"],
                &format!("{what} fwd_bwd_copy_fraction"),
            );
        }
    }
}

/// `--max-err` fails the run when a kernel is further than that from the reference, after the
/// report: the SSD kernels on wgpu agree with the reference to ~1e-7, not to 1e-12.
#[test]
fn bench_kernels_max_err_fails_past_the_tolerance() {
    let out = run_limited(
        BENCH,
        &[
            "kernels",
            "--device",
            "wgpu",
            "--shapes",
            "small",
            "--only",
            "ssd",
            "--json",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--max-err",
            "1e-12",
        ],
        BENCH_LIMIT,
    );
    assert!(!out.status.success(), "a 1e-12 tolerance passed");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--max-err 1e-12 exceeded") && err.contains("ssd "),
        "stderr: {err}"
    );
    // The report was printed before the failure, with the errors that failed it.
    let v: Value = serde_json::from_slice(&out.stdout).expect("the report on stdout");
    for r in v["results"].as_array().unwrap() {
        let e = r["max_rel_err"].as_f64().unwrap();
        assert!(e > 1e-12 && e <= REL_TOL, "ssd error {e:e}");
    }
}

/// `--ssd-dtype` takes f32 or bf16 and names itself when given anything else, or bf16 on a
/// backend without bf16 tensors (wgpu).
#[test]
fn bench_kernels_bad_ssd_dtype_is_a_clear_error() {
    let out = run_limited(
        BENCH,
        &["kernels", "--device", "cpu", "--ssd-dtype", "f16"],
        BENCH_LIMIT,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--ssd-dtype") && err.contains("f16") && err.contains("f32 or bf16"),
        "{err}"
    );
    let out = run_limited(
        BENCH,
        &[
            "kernels",
            "--device",
            "wgpu",
            "--ssd-dtype",
            "bf16",
            "--shapes",
            "small",
        ],
        BENCH_LIMIT,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--ssd-dtype: the wgpu backend has no bf16 tensors"),
        "{err}"
    );
}

/// On the CPU `bench kernels` measures the reference only.
#[test]
fn bench_kernels_cpu_is_reference_only() {
    let out = run_limited(
        BENCH,
        &[
            "kernels", "--device", "cpu", "--shapes", "small", "--json", "--iters", "2",
            "--warmup", "1",
        ],
        BENCH_LIMIT,
    );
    let v = json_of(&out);
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 2 + 2 + 2, "{v}");
    for r in results {
        assert!(r["kernels"].is_null(), "{r}");
        assert!(r["max_rel_err"].is_null(), "{r}");
        positive(&r["reference"]["fwd_ms"], "reference.fwd_ms");
        positive(&r["reference"]["fwd_bwd_ms"], "reference.fwd_bwd_ms");
    }
}

/// `bench gemm` at the small shapes on the CPU: every transpose flag and operand layout (44
/// cases), `matmul_t` and burn's matmul both checked against f64 rows, the report naming what
/// ran the products; bf16 on a backend without it is an error naming `--dtypes`.
#[test]
fn bench_gemm_small_on_the_cpu() {
    let out = run_limited(
        BENCH,
        &[
            "gemm", "--device", "cpu", "--shapes", "small", "--dtypes", "f32", "--json", "--iters",
            "1", "--warmup", "0",
        ],
        BENCH_LIMIT,
    );
    let v = json_of(&out);
    assert_eq!(v["bench"], "gemm");
    assert_eq!(v["matmul"], "burn", "{v}");
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 36 + 3 + 3 + 2, "{v}");
    for r in results {
        for key in ["rel_err", "burn_rel_err"] {
            let e = r[key].as_f64().unwrap_or_else(|| panic!("{key}: {r}"));
            assert!(e < 1e-6, "{key} {e}: {r}");
        }
        positive(&r["ms"], "ms");
    }
    let out = run_limited(
        BENCH,
        &[
            "gemm", "--device", "cpu", "--shapes", "small", "--dtypes", "bf16",
        ],
        BENCH_LIMIT,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--dtypes") && err.contains("bf16"), "{err}");
}

/// `bench model` on wgpu with tiny configs: the loss and every parameter gradient with the
/// kernels match the reference.
#[test]
fn bench_model_kernels_match_reference_on_wgpu() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    for config in [
        repo.join("configs/models/mamba2-tiny.json"),
        fixtures().join("mamba1_tied/config.json"),
    ] {
        let out = run_limited(
            BENCH,
            &[
                "model",
                "--device",
                "wgpu",
                "--config",
                config.to_str().unwrap(),
                "--batch",
                "1",
                "--seq",
                "40",
                "--iters",
                "1",
                "--warmup",
                "0",
                "--json",
            ],
            BENCH_LIMIT,
        );
        let v = json_of(&out);
        let what = config.display();
        positive(&v["kernels"]["fwd_bwd_ms"], "kernels.fwd_bwd_ms");
        positive(&v["reference"]["fwd_bwd_ms"], "reference.fwd_bwd_ms");
        let loss = v["loss_rel_err"].as_f64().unwrap();
        let grad = v["max_grad_rel_err"].as_f64().unwrap();
        assert!(loss <= REL_TOL, "{what}: loss rel err {loss:e}");
        assert!(
            grad <= REL_TOL,
            "{what}: grad rel err {grad:e} ({})",
            v["worst_param"]
        );
        // Every parameter has a gradient: embeddings, per layer norm + mixer, norm_f.
        assert!(v["grads_compared"].as_u64().unwrap() >= 2 + 2 * 6, "{v}");
        assert!(v["notes"].as_array().unwrap().is_empty(), "{v}");
    }
}
