//! Config formats and bad input: every error names the file, key and expected value.

mod common;

use std::path::Path;

use common::*;
use mamba_burn::hf::checkpoint::{to_safetensors_bytes, write_atomic, TensorSource};
use mamba_burn::hf::{load_config, load_model_dir};
use mamba_burn::model::{MambaLM, ModelConfig, NormMode};

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn err_of(r: Result<impl std::fmt::Debug, mamba_burn::hf::HfError>) -> String {
    r.expect_err("expected an error").to_string()
}

#[test]
fn shared_configs_load() {
    // Bare `Infinity` token (older transformers).
    let m2 = load_config(&model_config("mamba2-130m-hf.json")).unwrap();
    let ModelConfig::Mamba2(c) = m2 else {
        panic!("not mamba2")
    };
    assert_eq!(
        (
            c.num_heads,
            c.head_dim,
            c.state_size,
            c.n_groups,
            c.vocab_size
        ),
        (24, 64, 128, 1, 50288)
    );
    assert_eq!(c.time_step_limit, (0.0, f64::INFINITY));
    assert!(c.tie_word_embeddings);

    let m1 = load_config(&model_config("mamba-130m-hf.json")).unwrap();
    let ModelConfig::Mamba1(c) = m1 else {
        panic!("not mamba")
    };
    assert_eq!(
        (
            c.hidden_size,
            c.intermediate_size,
            c.time_step_rank,
            c.vocab_size
        ),
        (768, 1536, 48, 50280)
    );

    let cs = load_config(&model_config("mamba-codestral-7b-shape.json")).unwrap();
    let ModelConfig::Mamba2(c) = cs else {
        panic!("not mamba2")
    };
    assert_eq!(
        (c.num_heads, c.n_groups, c.num_hidden_layers, c.vocab_size),
        (128, 8, 64, 32768)
    );
    assert!(!c.tie_word_embeddings);
}

#[test]
fn float_object_infinity_and_transformers_defaults() {
    // Written by transformers 5.17 as {"__float__": "Infinity"}.
    let c = load_config(&fixtures().join("mamba2_g1_tied/config.json")).unwrap();
    let ModelConfig::Mamba2(c) = c else { panic!() };
    assert_eq!(c.time_step_limit, (0.0, f64::INFINITY));
    assert_eq!(c.chunk_size, 16);

    // Our defaults are transformers' defaults, field by field.
    let defaults = mamba_burn::hf::config::parse_json_lenient(
        &std::fs::read_to_string(fixtures().join("transformers_defaults.json")).unwrap(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (model_type, ours) in [
        (
            "mamba2",
            serde_json::to_value(mamba_burn::model::Mamba2Config::default()).unwrap(),
        ),
        (
            "mamba",
            serde_json::to_value(mamba_burn::model::Mamba1Config::default()).unwrap(),
        ),
    ] {
        let theirs = &defaults[model_type];
        for (k, v) in ours.as_object().unwrap() {
            assert_eq!(
                &theirs[k], v,
                "{model_type}.{k}: transformers default {} vs ours {v}",
                theirs[k]
            );
        }
        // And a config.json holding only model_type gets them.
        let p = write(
            dir.path(),
            "config.json",
            &format!("{{\"model_type\": \"{model_type}\"}}"),
        );
        let loaded = load_config(&p).unwrap();
        match (model_type, loaded) {
            ("mamba2", ModelConfig::Mamba2(c)) => {
                assert_eq!(c, mamba_burn::model::Mamba2Config::default())
            }
            ("mamba", ModelConfig::Mamba1(c)) => {
                assert_eq!(c, mamba_burn::model::Mamba1Config::default())
            }
            (t, c) => panic!("{t}: {c:?}"),
        }
    }
}

#[test]
fn mamba_ssm_config_format() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "config.json",
        r#"{"d_model": 768, "d_intermediate": 0, "n_layer": 24, "vocab_size": 50277,
            "ssm_cfg": {"layer": "Mamba2"}, "attn_layer_idx": [], "attn_cfg": {},
            "rms_norm": true, "residual_in_fp32": true, "fused_add_norm": true,
            "pad_vocab_size_multiple": 16, "tie_embeddings": true}"#,
    );
    let ModelConfig::Mamba2(c) = load_config(&p).unwrap() else {
        panic!()
    };
    assert_eq!(c.vocab_size, 50288, "50277 padded to a multiple of 16");
    assert_eq!(
        (
            c.num_heads,
            c.head_dim,
            c.state_size,
            c.n_groups,
            c.chunk_size
        ),
        (24, 64, 128, 1, 256)
    );

    let p = write(
        dir.path(),
        "config.json",
        r#"{"d_model": 768, "n_layer": 24, "vocab_size": 50277, "ssm_cfg": {}, "pad_vocab_size_multiple": 8}"#,
    );
    let ModelConfig::Mamba1(c) = load_config(&p).unwrap() else {
        panic!()
    };
    assert_eq!(
        (
            c.vocab_size,
            c.state_size,
            c.time_step_rank,
            c.intermediate_size
        ),
        (50280, 16, 48, 1536)
    );

    let p = write(
        dir.path(),
        "config.json",
        r#"{"d_model": 64, "n_layer": 2, "vocab_size": 10, "attn_layer_idx": [1]}"#,
    );
    let e = err_of(load_config(&p));
    assert!(e.contains("attn_layer_idx"), "{e}");
}

#[test]
fn codestral_params_json() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "params.json",
        r#"{"dim": 4096, "n_layers": 64, "vocab_size": 32768, "n_groups": 8, "rms_norm": true,
            "residual_in_fp32": true, "fused_add_norm": true, "pad_vocab_size_multiple": 1,
            "tie_embeddings": false, "model_type": "mamba"}"#,
    );
    let ModelConfig::Mamba2(c) = load_config(&p).unwrap() else {
        panic!("params.json is a Mamba2")
    };
    let want = load_config(&model_config("mamba-codestral-7b-shape.json")).unwrap();
    let ModelConfig::Mamba2(w) = want else {
        panic!()
    };
    assert_eq!(
        (
            c.num_heads,
            c.head_dim,
            c.state_size,
            c.n_groups,
            c.vocab_size,
            c.tie_word_embeddings,
            c.bos_token_id,
            c.eos_token_id
        ),
        (
            w.num_heads,
            w.head_dim,
            w.state_size,
            w.n_groups,
            w.vocab_size,
            w.tie_word_embeddings,
            w.bos_token_id,
            w.eos_token_id
        )
    );
}

#[test]
fn malformed_and_inconsistent_configs() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("{\"model_type\": \"mamba2\",", "malformed JSON"),
        ("{\"model_type\": \"llama\"}", "unsupported model_type `llama`"),
        ("{\"hidden_size\": 64}", "`model_type` missing"),
        ("{\"model_type\": \"mamba2\", \"hidden_size\": 64, \"num_heads\": 3, \"head_dim\": 16}", "`num_heads`"),
        ("{\"model_type\": \"mamba2\", \"hidden_size\": 64, \"num_heads\": 8, \"head_dim\": 16, \"n_groups\": 3}", "`n_groups` must divide num_heads = 8, got 3"),
        ("{\"model_type\": \"mamba2\", \"time_step_limit\": [0.1]}", "`time_step_limit` expected [min, max]"),
        ("{\"model_type\": \"mamba2\", \"hidden_size\": \"big\"}", "`hidden_size` invalid type: string \"big\", expected usize"),
        ("{\"model_type\": \"mamba\", \"hidden_size\": 64, \"intermediate_size\": 100}", "`intermediate_size` must equal expand × hidden_size = 2 × 64 = 128, got 100"),
        ("{\"model_type\": \"mamba\", \"hidden_act\": \"gelu\"}", "`hidden_act` must be `silu`, got `gelu`"),
        ("[1, 2]", "expected a JSON object"),
    ];
    for (text, want) in cases {
        let p = write(dir.path(), "config.json", text);
        let e = err_of(load_config(&p));
        assert!(
            e.contains(want),
            "for {text}: got `{e}`, expected it to contain `{want}`"
        );
        assert!(
            e.contains("config.json"),
            "error does not name the file: {e}"
        );
    }
}

fn copy_fixture(case: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures().join(case).join(f), dir.path().join(f)).unwrap();
    }
    dir
}

/// Rewrite the checkpoint through `edit` (rename, drop, reshape tensors).
fn rewrite(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<f32>)>)) {
    let src = TensorSource::open(&[dir.join("model.safetensors")]).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = src
        .keys()
        .map(|k| {
            let (v, s) = src.read_f32(k).unwrap();
            (k.clone(), s, v)
        })
        .collect();
    drop(src);
    edit(&mut tensors);
    write_atomic(
        &dir.join("model.safetensors"),
        &to_safetensors_bytes(&tensors, Default::default()).unwrap(),
    )
    .unwrap();
}

fn load(dir: &Path) -> Result<MambaLM<Cpu>, mamba_burn::hf::HfError> {
    load_model_dir(dir, NormMode::Hf, &Default::default())
}

#[test]
fn missing_extra_and_misshapen_tensors_are_listed() {
    let dir = copy_fixture("mamba2_g1_tied");
    rewrite(dir.path(), |t| {
        t.retain(|(k, _, _)| k != "backbone.layers.1.mixer.D");
        for (k, s, _) in t.iter_mut() {
            if k == "backbone.layers.0.mixer.A_log" {
                *s = vec![2, 4];
            }
        }
        t.push(("backbone.layers.0.mixer.extra".into(), vec![1], vec![0.0]));
    });
    let e = err_of(load(dir.path()));
    assert!(
        e.contains("missing tensors (1):\n    backbone.layers.1.mixer.D"),
        "{e}"
    );
    assert!(
        e.contains("unexpected tensors (1):\n    backbone.layers.0.mixer.extra"),
        "{e}"
    );
    assert!(
        e.contains("backbone.layers.0.mixer.A_log: expected [8], found [2, 4]"),
        "{e}"
    );
    assert!(e.contains(&dir.path().display().to_string()), "{e}");
}

#[test]
fn untied_config_without_head_is_missing_it() {
    let dir = copy_fixture("mamba2_g2_untied_bias_limit");
    rewrite(dir.path(), |t| t.retain(|(k, _, _)| k != "lm_head.weight"));
    let e = err_of(load(dir.path()));
    assert!(
        e.contains("missing tensors (1):\n    lm_head.weight"),
        "{e}"
    );
}

#[test]
fn mamba_ssm_key_names_and_unprefixed_keys_load() {
    let r = Reference::load("mamba2_g1_tied");
    let ids = int_tensor(&r.ids("input_ids"), &Default::default());
    let want = values(
        load(&fixtures().join("mamba2_g1_tied"))
            .unwrap()
            .forward(ids.clone()),
    );

    let dir = copy_fixture("mamba2_g1_tied");
    rewrite(dir.path(), |t| {
        for (k, _, _) in t.iter_mut() {
            *k = k.replace("backbone.embeddings.", "backbone.embedding.");
        }
    });
    assert_eq!(
        values(load(dir.path()).unwrap().forward(ids.clone())),
        want,
        "`embedding` key"
    );

    rewrite(dir.path(), |t| {
        for (k, _, _) in t.iter_mut() {
            *k = k.trim_start_matches("backbone.").to_string();
        }
    });
    assert_eq!(
        values(load(dir.path()).unwrap().forward(ids)),
        want,
        "base-model keys"
    );
}

#[test]
fn missing_weights_and_config_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let e = err_of(load(dir.path()));
    assert!(e.contains("no config.json or params.json"), "{e}");
    std::fs::copy(
        fixtures().join("mamba1_tied/config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let e = err_of(load(dir.path()));
    assert!(e.contains("no model.safetensors"), "{e}");
    std::fs::write(
        dir.path().join("model.safetensors"),
        b"not a safetensors file",
    )
    .unwrap();
    let e = err_of(load(dir.path()));
    assert!(e.contains("model.safetensors"), "{e}");
}
