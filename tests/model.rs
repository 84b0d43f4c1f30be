//! Model behaviour on random models: causality, recurrent decoding against the full forward,
//! multi-token continuation from a cache, save → load round trips.

mod common;

use burn::tensor::{Int, Tensor, TensorData};
use common::*;
use mamba_burn::hf::{load_model_dir, save_model, SaveDtype};
use mamba_burn::model::{ForwardArgs, Mamba1Config, Mamba2Config, MambaLM, ModelConfig, NormMode};

fn mamba2_config(groups: usize) -> ModelConfig {
    ModelConfig::Mamba2(Mamba2Config {
        vocab_size: 50,
        hidden_size: 32,
        num_heads: 4,
        head_dim: 16,
        state_size: 8,
        n_groups: groups,
        chunk_size: 8,
        num_hidden_layers: 2,
        time_step_rank: 2,
        tie_word_embeddings: false,
        ..Mamba2Config::default()
    })
    .with_norm(NormMode::Grouped)
}

fn mamba1_config() -> ModelConfig {
    ModelConfig::Mamba1(Mamba1Config {
        vocab_size: 50,
        hidden_size: 32,
        intermediate_size: 64,
        state_size: 8,
        num_hidden_layers: 2,
        time_step_rank: 2,
        ..Mamba1Config::default()
    })
}

fn configs() -> Vec<(&'static str, ModelConfig)> {
    vec![
        ("mamba2 g1", mamba2_config(1)),
        ("mamba2 g2", mamba2_config(2)),
        ("mamba1", mamba1_config()),
    ]
}

fn ids(rows: &[Vec<i64>]) -> Tensor<Cpu, 2, Int> {
    int_tensor(rows, &Default::default())
}

fn random_ids(n: usize, seed: u64) -> Vec<i64> {
    // A small LCG: deterministic and independent of any crate's RNG.
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) % 50) as i64
        })
        .collect()
}

fn model(config: &ModelConfig) -> MambaLM<Cpu> {
    MambaLM::init(config, &Default::default()).unwrap()
}

/// Changing token t leaves the logits before t unchanged, and changes them from t on.
#[test]
fn causal() {
    for (name, config) in configs() {
        let m = model(&config);
        let a = random_ids(21, 1);
        let t = 13;
        let mut b = a.clone();
        b[t] = (a[t] + 7) % 50;
        let la = m.forward(ids(&[a]));
        let lb = m.forward(ids(&[b]));
        let before = max_abs(
            &values(la.clone().narrow(1, 0, t)),
            &values(lb.clone().narrow(1, 0, t)),
        );
        assert_eq!(
            before, 0.0,
            "{name}: logits before the change moved by {before}"
        );
        let at = max_abs(&values(la.narrow(1, t, 1)), &values(lb.narrow(1, t, 1)));
        assert!(at > 1e-4, "{name}: the changed token had no effect");
    }
}

/// Prefill a prefix, then step token by token: every step's logits match the full forward.
#[test]
fn step_matches_full_forward() {
    for (name, config) in configs() {
        let m = model(&config);
        let seq = random_ids(19, 2);
        let full = m.forward(ids(std::slice::from_ref(&seq))); // [1, 19, V]
        let prefix = 5;
        let (logits, mut cache) = m.prefill(ids(&[seq[..prefix].to_vec()]));
        let want = values(full.clone().narrow(1, prefix - 1, 1));
        assert!(
            max_abs(&values(logits), &want) <= 1e-4,
            "{name}: prefill logits"
        );
        for (t, &tok) in seq.iter().enumerate().skip(prefix) {
            let tok = Tensor::<Cpu, 1, Int>::from_data(
                TensorData::new(vec![tok], [1]),
                &Default::default(),
            );
            let (logits, c) = m.step(tok, cache);
            cache = c;
            let want = values(full.clone().narrow(1, t, 1));
            let err = max_abs(&values(logits), &want);
            assert!(err <= 1e-4, "{name}: step at {t} differs by {err:e}");
        }
    }
}

/// A multi-token forward from a cache continues the sequence exactly; any split point, across
/// chunk boundaries, batch of two.
#[test]
fn cache_continuation_matches_full_forward() {
    for (name, config) in configs() {
        let m = model(&config);
        let rows = vec![random_ids(30, 3), random_ids(30, 4)];
        let full = m.forward(ids(&rows));
        for split in [1, 7, 8, 17] {
            let head: Vec<Vec<i64>> = rows.iter().map(|r| r[..split].to_vec()).collect();
            let tail: Vec<Vec<i64>> = rows.iter().map(|r| r[split..].to_vec()).collect();
            let first = m.forward_with(
                ids(&head),
                ForwardArgs {
                    return_cache: true,
                    ..Default::default()
                },
            );
            let rest = m.forward_with(
                ids(&tail),
                ForwardArgs {
                    cache: first.cache,
                    ..Default::default()
                },
            );
            let err = max_abs(
                &values(rest.logits),
                &values(full.clone().narrow(1, split, 30 - split)),
            );
            assert!(
                err <= 1e-4,
                "{name}: continuation after {split} differs by {err:e}"
            );
        }
    }
}

/// Save → load gives bit-identical logits in f32; bf16 storage loads back with bf16 rounding.
#[test]
fn save_load_round_trip() {
    for (name, config) in configs() {
        let m = model(&config);
        let dir = tempfile::tempdir().unwrap();
        save_model(&m, dir.path(), SaveDtype::F32).unwrap();
        let back: MambaLM<Cpu> =
            load_model_dir(dir.path(), NormMode::Grouped, &Default::default()).unwrap();
        let x = ids(&[random_ids(12, 5)]);
        assert_eq!(
            values(m.forward(x.clone())),
            values(back.forward(x.clone())),
            "{name}"
        );
        assert_eq!(back.config, m.config, "{name}: config round trip");

        save_model(&m, dir.path(), SaveDtype::Bf16).unwrap();
        let bf: MambaLM<Cpu> =
            load_model_dir(dir.path(), NormMode::Grouped, &Default::default()).unwrap();
        let err = rel_err(&values(bf.forward(x.clone())), &values(m.forward(x)));
        assert!(
            err > 0.0 && err < 2e-2,
            "{name}: bf16 round trip rel {err:e}"
        );
        let cfg = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
        assert!(cfg.contains("\"dtype\": \"bfloat16\""), "{cfg}");
    }
}

/// A fixture re-saved by us is the same checkpoint: same keys, shapes and values (f32 fixture).
#[test]
fn resave_keeps_transformers_keys_and_values() {
    let src = fixtures().join("mamba2_g2_untied_bias_limit");
    let m: MambaLM<Cpu> = load_model_dir(&src, NormMode::Hf, &Default::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    save_model(&m, dir.path(), SaveDtype::F32).unwrap();
    let ours =
        mamba_burn::hf::checkpoint::TensorSource::open(&[dir.path().join("model.safetensors")])
            .unwrap();
    let theirs =
        mamba_burn::hf::checkpoint::TensorSource::open(&[src.join("model.safetensors")]).unwrap();
    let a: Vec<&String> = ours.keys().collect();
    let b: Vec<&String> = theirs.keys().collect();
    assert_eq!(a, b);
    for k in a {
        assert_eq!(
            ours.read_f32(k).unwrap(),
            theirs.read_f32(k).unwrap(),
            "{k}"
        );
    }
    // The config keeps every field transformers wrote that we model.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["model_type"], "mamba2");
    assert_eq!(cfg["n_groups"], 2);
    assert_eq!(cfg["time_step_limit"][1], 0.08);
    assert_eq!(cfg["tie_word_embeddings"], false);
}

/// Padded batches: a left-padded row with the mask gives the same last logits as the unpadded
/// row alone (the padded positions are zeroed before the conv and the scan).
#[test]
fn left_padding_with_mask_matches_unpadded() {
    for (name, config) in configs() {
        let m = model(&config);
        let row = random_ids(11, 6);
        let alone = m.forward(ids(std::slice::from_ref(&row)));
        let mut padded = vec![0i64; 4];
        padded.extend(&row);
        let other = random_ids(15, 7);
        let mask = vec![
            vec![0, 0, 0, 0]
                .into_iter()
                .chain(vec![1; 11])
                .collect::<Vec<i64>>(),
            vec![1; 15],
        ];
        let out = m.forward_with(
            ids(&[padded, other]),
            ForwardArgs {
                attention_mask: Some(float_tensor(&mask, &Default::default())),
                ..Default::default()
            },
        );
        let got = out.logits.narrow(0, 0, 1).narrow(1, 4, 11);
        let err = max_abs(&values(got), &values(alone));
        assert!(err <= 1e-4, "{name}: left-padded row differs by {err:e}");
    }
}
