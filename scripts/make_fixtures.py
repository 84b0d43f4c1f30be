#!/usr/bin/env python3
"""Write the reference fixtures for mamba-burn's parity tests.

Run on a machine with torch + transformers (the GPU machine of the device tool):

    python3 scripts/make_fixtures.py --out tests/fixtures

For each case it writes `<out>/<case>/` with
  - config.json + model.safetensors (or shards + index) exactly as `save_pretrained` writes them,
  - reference.json: input ids, labels, attention mask, the loss, greedy continuations
    (cached and uncached), the versions that produced them,
  - reference.safetensors: logits, masked logits, logits_to_keep logits and gradients (f32).

Everything runs on the CPU in float32 so that no TF32 convolution or matmul creeps into the
reference. The tiny shapes keep the committed files small.
"""
import argparse
import json
import zlib
import os
import sys

import torch
import transformers
from safetensors.torch import save_file
from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

SEQ_LEN = 37  # not a multiple of the chunk size (16) used below
BATCH = 2
PROMPT_LEN = 6
NEW_TOKENS = 10


def grouped_gated_norm_forward(self, hidden_states, gate=None):
    """mamba_ssm's RMSNormGated (norm_before_gate=False): gate first, then RMS per group."""
    input_dtype = hidden_states.dtype
    h = hidden_states.to(torch.float32)
    if gate is not None:
        h = h * torch.nn.functional.silu(gate.to(torch.float32))
    groups = self._mb_groups
    shape = h.shape
    h = h.view(*shape[:-1], groups, shape[-1] // groups)
    var = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(var + self.variance_epsilon)
    h = h.view(shape)
    return self.weight * h.to(input_dtype)


def set_grouped_norm(model, groups):
    from transformers.models.mamba2 import modeling_mamba2

    cls = modeling_mamba2.MambaRMSNormGated
    for m in model.modules():
        if isinstance(m, cls):
            m._mb_groups = groups
    saved = cls.forward
    cls.forward = grouped_gated_norm_forward
    return lambda: setattr(cls, "forward", saved)


def make_inputs(vocab, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (BATCH, SEQ_LEN), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100  # ignored positions, including the first
    labels[1, 20:24] = -100
    mask = torch.ones(BATCH, SEQ_LEN, dtype=torch.long)
    mask[1, :5] = 0  # left padding on the second row
    return ids, labels, mask


def grads_of(model, names):
    params = dict(model.named_parameters())
    out = {}
    for n in names:
        p = params[n]
        assert p.grad is not None, n
        out["grad." + n] = p.grad.detach().clone().float().contiguous()
    return out


def greedy(model, prompt, use_cache):
    with torch.no_grad():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            use_cache=use_cache,
            pad_token_id=0,
            eos_token_id=None,
        )
    return out[0].tolist()


def run_case(name, model, out_dir, grad_names, store_dtype=None, shard=None, groups=1, extra_grouped=False):
    torch.manual_seed(0)
    case_dir = os.path.join(out_dir, name)
    os.makedirs(case_dir, exist_ok=True)
    model = model.float().eval()
    if store_dtype is not None:
        # Round the weights to the storage dtype first, so that the f32 reference is exactly what a
        # loader that upcasts the stored file computes.
        model = model.to(store_dtype).float()
    vocab = model.config.vocab_size
    ids, labels, mask = make_inputs(vocab, seed=zlib.crc32(name.encode()) % 1000)

    save_kwargs = {"safe_serialization": True}
    if shard:
        save_kwargs["max_shard_size"] = shard
    to_save = model.to(store_dtype) if store_dtype is not None else model
    to_save.save_pretrained(case_dir, **save_kwargs)
    model = model.float()

    tensors = {}
    # 1. logits + loss, and gradients of the loss
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    tensors["logits"] = out.logits.detach().float().contiguous()
    tensors.update(grads_of(model, grad_names))
    loss = out.loss.item()
    model.zero_grad(set_to_none=True)

    with torch.no_grad():
        # 2. left padding through the attention mask
        masked = model(input_ids=ids, attention_mask=mask)
        tensors["logits_masked"] = masked.logits.float().contiguous()
        # 3. logits_to_keep
        kept = model(input_ids=ids, logits_to_keep=5)
        tensors["logits_keep5"] = kept.logits.float().contiguous()

    with torch.no_grad():
        # 4. every next token counted (what the `eval` binary reports)
        loss_all = model(input_ids=ids, labels=ids).loss.item()

    prompt = ids[:1, :PROMPT_LEN]
    ref = {
        "loss_all_tokens": loss_all,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "model_type": model.config.model_type,
        "input_ids": ids.tolist(),
        "labels": labels.tolist(),
        "attention_mask": mask.tolist(),
        "loss": loss,
        "prompt_ids": prompt[0].tolist(),
        "greedy_cached": greedy(model, prompt, True),
        "greedy_uncached": greedy(model, prompt, False),
        "grad_names": grad_names,
        "stored_dtype": str(store_dtype or torch.float32).replace("torch.", ""),
    }

    if extra_grouped:
        restore = set_grouped_norm(model, groups)
        try:
            model.zero_grad(set_to_none=True)
            out = model(input_ids=ids, labels=labels)
            out.loss.backward()
            tensors["grouped.logits"] = out.logits.detach().float().contiguous()
            for k, v in grads_of(model, grad_names).items():
                tensors["grouped." + k] = v
            ref["grouped_loss"] = out.loss.item()
            with torch.no_grad():
                ref["grouped_loss_all_tokens"] = model(input_ids=ids, labels=ids).loss.item()
            model.zero_grad(set_to_none=True)
            ref["grouped_greedy_cached"] = greedy(model, prompt, True)
        finally:
            restore()

    save_file(tensors, os.path.join(case_dir, "reference.safetensors"))
    with open(os.path.join(case_dir, "reference.json"), "w") as f:
        json.dump(ref, f, indent=1)
    print(f"{name}: loss {loss:.6f} greedy {ref['greedy_cached'][PROMPT_LEN:]}", flush=True)
    if ref["greedy_cached"] != ref["greedy_uncached"]:
        print(f"  note: transformers' cached and uncached greedy differ for {name}", flush=True)


def mamba2(n_groups, tie, use_bias=False, time_step_limit=(0.0, float("inf")), vocab=96, layers=2):
    cfg = Mamba2Config(
        vocab_size=vocab,
        hidden_size=64,
        num_heads=8,
        head_dim=16,
        expand=2,
        state_size=16,
        n_groups=n_groups,
        num_hidden_layers=layers,
        chunk_size=16,
        conv_kernel=4,
        use_bias=use_bias,
        use_conv_bias=True,
        tie_word_embeddings=tie,
        time_step_limit=time_step_limit,
        layer_norm_epsilon=1e-5,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(1234 + n_groups + 10 * int(tie))
    m = Mamba2ForCausalLM(cfg)
    # Move the parameters that init leaves at constants away from them, so that the
    # gradients and the norms are exercised with non-trivial values.
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith(".D"):
                p.add_(0.5 * torch.randn_like(p))
            if name.endswith("conv1d.bias") or name.endswith("_proj.bias"):
                p.add_(0.1 * torch.randn_like(p))
    return m


def mamba1(tie=True, vocab=96, layers=2):
    cfg = MambaConfig(
        vocab_size=vocab,
        hidden_size=64,
        state_size=16,
        num_hidden_layers=layers,
        expand=2,
        conv_kernel=4,
        use_bias=False,
        use_conv_bias=True,
        time_step_rank="auto",
        tie_word_embeddings=tie,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(99)
    m = MambaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith(".D"):
                p.add_(0.5 * torch.randn_like(p))
            if name.endswith("conv1d.bias"):
                p.add_(0.1 * torch.randn_like(p))
    return m


M2_GRADS = [
    "backbone.embeddings.weight",
    "backbone.layers.0.mixer.A_log",
    "backbone.layers.0.mixer.dt_bias",
    "backbone.layers.0.mixer.D",
    "backbone.layers.0.mixer.conv1d.weight",
    "backbone.layers.0.mixer.conv1d.bias",
    "backbone.layers.0.mixer.in_proj.weight",
    "backbone.layers.0.mixer.norm.weight",
    "backbone.layers.0.mixer.out_proj.weight",
    "backbone.layers.1.norm.weight",
    "backbone.norm_f.weight",
]
M1_GRADS = [
    "backbone.embeddings.weight",
    "backbone.layers.0.mixer.A_log",
    "backbone.layers.0.mixer.D",
    "backbone.layers.0.mixer.conv1d.weight",
    "backbone.layers.0.mixer.conv1d.bias",
    "backbone.layers.0.mixer.in_proj.weight",
    "backbone.layers.0.mixer.x_proj.weight",
    "backbone.layers.0.mixer.dt_proj.weight",
    "backbone.layers.0.mixer.dt_proj.bias",
    "backbone.layers.0.mixer.out_proj.weight",
    "backbone.layers.1.norm.weight",
    "backbone.norm_f.weight",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures")
    args = ap.parse_args()
    torch.set_num_threads(8)
    os.makedirs(args.out, exist_ok=True)

    run_case("mamba2_g1_tied", mamba2(1, True), args.out, M2_GRADS)
    untied = M2_GRADS + ["lm_head.weight", "backbone.layers.0.mixer.in_proj.bias"]
    run_case(
        "mamba2_g2_untied_bias_limit",
        mamba2(2, False, use_bias=True, time_step_limit=(0.002, 0.08)),
        args.out,
        untied,
        groups=2,
        extra_grouped=True,
    )
    run_case("mamba2_g4_bf16_sharded", mamba2(4, True), args.out, M2_GRADS,
             store_dtype=torch.bfloat16, shard="20KB", groups=4, extra_grouped=True)
    run_case("mamba1_tied", mamba1(True), args.out, M1_GRADS)
    run_case("mamba1_untied_f16", mamba1(False), args.out, M1_GRADS + ["lm_head.weight"],
             store_dtype=torch.float16)

    defaults = {
        "mamba2": Mamba2Config().to_dict(),
        "mamba": MambaConfig().to_dict(),
    }
    with open(os.path.join(args.out, "transformers_defaults.json"), "w") as f:
        json.dump(defaults, f, indent=1, default=str)
    print("done", file=sys.stderr)


if __name__ == "__main__":
    main()
