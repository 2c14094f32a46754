#!/usr/bin/env python3
"""The PyTorch + PEFT side of the one-shot GPU benchmark (`cargo xtask bench gpu`).

Measures, on the same GPU and with the same shapes as disha's `benches/gpu.rs`:
- `kernels`: the plain frozen layer in bf16, `x @ W` forward and `dY @ W^T` (cuBLAS through
  PyTorch), 4096 tokens on Llama-2-7B's shapes, as TFLOP/s over the nominal 4*M*in*out FLOPs;
- `llama_3_2_1b`: one training step (forward, causal-LM loss, backward, gradient-norm clip at 1,
  AdamW) of a Llama-3.2-1B-shaped model with random weights, 2 x 1024 tokens, the base in bf16,
  adapters and optimizer state f32 (PEFT's default adapter upcast), bf16 autocast: the frozen
  forward + loss alone, MiSS (Bone) r64, MiSS-BAT r64 and LoRA r32 (alpha 64) on all seven
  projections. Peak memory is torch's max_memory_allocated over the case.

Each timing is the median of 3 runs after one warm-up run, each ended by a device sync. Prints
one JSON on stdout (and rewrites --out after every row); progress on stderr. --smoke runs tiny
shapes (on CPU when there is no GPU) to check the script.
"""

import argparse
import json
import os
import statistics
import sys
import time

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RUNS = 3
START = time.perf_counter()


def progress(line):
    print(f"[{time.perf_counter() - START:7.1f} s] {line}", file=sys.stderr, flush=True)


class Report:
    """The JSON report; rewritten to `path` (temp file, then rename) after every change."""

    def __init__(self, path):
        self.path = path
        self.fields = {}

    def set(self, key, value):
        self.fields[key] = value
        if self.path:
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.fields, f, indent=2)
            os.replace(tmp, self.path)


def median_secs(torch, device, f):
    def run():
        start = time.perf_counter()
        f()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    run()
    return statistics.median(run() for _ in range(RUNS))


def kernels(torch, device, smoke):
    tokens, shapes = (128, [(256, 256), (256, 384)]) if smoke else (
        4096,
        [(4096, 4096), (4096, 11008), (11008, 4096)],
    )
    dtype = torch.bfloat16
    rows = []
    for d_in, d_out in shapes:
        progress(f"kernels: {tokens} x {d_in} x {d_out}, plain")
        x = torch.randn(tokens, d_in, device=device, dtype=dtype, requires_grad=True)
        w = (torch.randn(d_in, d_out, device=device) * 0.02).to(dtype)
        cot = torch.randn(tokens, d_out, device=device, dtype=dtype)

        def step():
            y = x @ w
            (y * cot).sum().backward()
            x.grad = None

        secs = median_secs(torch, device, step)
        flops = 4.0 * tokens * d_in * d_out
        rows.append(
            {"tokens": tokens, "in": d_in, "out": d_out, "case": "plain (PyTorch)",
             "dtype": "bf16", "ms": secs * 1e3, "tflops": flops / secs / 1e12}
        )
    return rows


def llama_config(transformers, smoke):
    if smoke:
        shape = dict(vocab_size=1024, hidden_size=128, intermediate_size=256,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    else:
        shape = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                     num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8)
    return transformers.LlamaConfig(
        **shape, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=4096,
        tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
    )


def adapter_config(peft, method):
    if method == "bone r64":
        return peft.MissConfig(r=64, target_modules=TARGETS, init_weights=True)
    if method == "bat r64":
        return peft.MissConfig(r=64, target_modules=TARGETS, init_weights="bat")
    if method == "lora r32":
        return peft.LoraConfig(r=32, lora_alpha=64, lora_dropout=0.0, target_modules=TARGETS)
    return None


def train_steps(torch, transformers, peft, device, smoke, report):
    batch, seq = (1, 64) if smoke else (2, 1024)
    config = llama_config(transformers, smoke)
    rows = []
    for method in ["frozen base (forward + loss)", "bone r64", "bat r64", "lora r32"]:
        progress(f"Llama train step: {method}, bf16, {batch} x {seq} tokens")
        try:
            torch.manual_seed(7)
            with device:  # initialized on the device: seconds, not a minute on the host
                model = transformers.LlamaForCausalLM(config).to(dtype=torch.bfloat16)
            gen = torch.Generator().manual_seed(11)
            ids = torch.randint(3, config.vocab_size, (batch, seq), generator=gen).to(device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16)
            spec = adapter_config(peft, method)
            loss = [0.0]
            if spec is None:
                model.eval()

                def step():
                    with torch.no_grad(), autocast:
                        loss[0] = model(input_ids=ids, labels=ids).loss.item()
            else:
                model = peft.get_peft_model(model, spec)
                model.train()
                params = [p for p in model.parameters() if p.requires_grad]
                optim = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                                          weight_decay=0.0)

                def step():
                    with autocast:
                        out = model(input_ids=ids, labels=ids).loss
                    out.backward()
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    optim.step()
                    optim.zero_grad(set_to_none=True)
                    loss[0] = out.item()

            secs = median_secs(torch, device, step)
            row = {"method": method, "compute": "bf16 autocast", "batch": batch, "seq": seq,
                   "step_ms": secs * 1e3, "tokens_per_s": batch * seq / secs, "loss": loss[0],
                   "peak_allocated_mb": torch.cuda.max_memory_allocated() / 1e6
                   if device.type == "cuda" else None}
        except Exception as e:  # one failing case costs its row, not the run
            row = {"method": method, "error": f"{type(e).__name__}: {e}"}
        rows.append(row)
        report.set("llama_3_2_1b", rows)
        del model
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=None, help="file rewritten with the rows so far")
    args = parser.parse_args()

    import torch
    import transformers
    import peft

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        sys.exit("peft_gpu.py: no CUDA device; the full shapes are for a GPU (use --smoke)")
    report = Report(args.out)
    report.set("device", torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
    report.set("versions", {"torch": torch.__version__, "transformers": transformers.__version__,
                            "peft": peft.__version__})
    report.set("kernels", kernels(torch, device, args.smoke))
    train_steps(torch, transformers, peft, device, args.smoke, report)
    report.set("seconds", time.perf_counter() - START)
    print(json.dumps(report.fields, indent=2))


if __name__ == "__main__":
    main()
