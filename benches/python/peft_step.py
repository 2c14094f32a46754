#!/usr/bin/env python3
"""The PyTorch + PEFT side of `cargo xtask bench compare`.

Times one training step (forward, causal-LM loss, backward, AdamW) -- or the frozen forward
alone -- of a Llama under transformers + PEFT, with the arguments and the one-line JSON output
of disha's `step_bench` example, so the two can be alternated in one run.

    python benches/python/peft_step.py --config llama512 --method bone
    python benches/python/peft_step.py --config smollm2 --model DIR_OR_GGUF --method lora

`--model` is an HF directory, or a GGUF file that is converted once to an HF directory beside
`--cache` (transformers dequantizes it; the weights' values do not affect speed).
Needs torch, transformers and peft; --threads sets torch's intra-op threads.
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama512_config(transformers):
    return transformers.LlamaConfig(
        vocab_size=2048,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=1,
        eos_token_id=2,
    )


def load_model(args, torch, transformers):
    if args.model is None:
        torch.manual_seed(7)
        model = transformers.LlamaForCausalLM(llama512_config(transformers))
        return model.float()
    path = args.model
    if path.endswith(".gguf"):
        cache = args.cache or os.path.join(os.path.dirname(path), "hf")
        if not os.path.isfile(os.path.join(cache, "config.json")):
            quantized = transformers.AutoModelForCausalLM.from_pretrained(
                os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
            )
            # transformers marks GGUF-loaded models as quantized and refuses to save them: copy
            # the (already dequantized) weights into a plain model of the same config.
            config = quantized.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            model.load_state_dict(quantized.state_dict())
            model.save_pretrained(cache)
            print(f"converted {path} to {cache}", file=sys.stderr)
        path = cache
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def adapter_config(method, peft):
    if method == "bone":
        return peft.MissConfig(r=16, target_modules=TARGETS, init_weights=True)
    if method == "bat":
        return peft.MissConfig(r=16, target_modules=TARGETS, init_weights="bat")
    if method == "mini":
        return peft.MissConfig(r=16, mini_r=16, target_modules=TARGETS, init_weights="mini")
    if method == "lora":
        return peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="llama512")
    parser.add_argument("--model", default=None)
    parser.add_argument("--cache", default=None, help="HF directory a GGUF --model converts to")
    parser.add_argument(
        "--method", required=True, choices=["frozen", "full", "bone", "bat", "mini", "lora"]
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import torch
    import transformers
    import peft

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args, torch, transformers)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    tokens = args.batch * args.seq
    step_s = []
    if args.method == "frozen":
        model.eval()
        ids = torch.randint(3, vocab, (args.batch, args.seq), generator=gen)
        trainable = 0
        with torch.no_grad():
            for k in range(args.warmup + args.steps):
                start = time.perf_counter()
                model(input_ids=ids).logits
                if k >= args.warmup:
                    step_s.append(time.perf_counter() - start)
    else:
        config = adapter_config(args.method, peft)
        if config is not None:
            model = peft.get_peft_model(model, config)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        trainable = sum(p.numel() for p in params)
        optim = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
        for k in range(args.warmup + args.steps):
            ids = torch.randint(3, vocab, (args.batch, args.seq), generator=gen)
            start = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optim.step()
            optim.zero_grad(set_to_none=True)
            if k >= args.warmup:
                step_s.append(time.perf_counter() - start)
    median = statistics.median(step_s)
    print(
        json.dumps(
            {
                "side": "pytorch",
                "config": args.config,
                "method": args.method,
                "batch": args.batch,
                "seq": args.seq,
                "threads": str(torch.get_num_threads()),
                "trainable_params": trainable,
                "step_s": step_s,
                "median_step_s": median,
                "tokens_per_s": tokens / median,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
                "versions": {
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "peft": peft.__version__,
                },
            }
        )
    )


if __name__ == "__main__":
    main()
