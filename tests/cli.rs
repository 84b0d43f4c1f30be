//! The `eval` and `generate` binaries: their flags are a contract other tools call.

mod common;

use std::path::Path;
use std::process::{Command, Output};

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
    let out = run(
        GENERATE,
        &["--model", model, "--prompt-ids", "1,2", "--json"],
        &[],
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("pass --greedy"));
}
