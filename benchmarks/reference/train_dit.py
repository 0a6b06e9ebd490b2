"""Train the project's reference DiT on Fashion-MNIST (pixel space, 32x32, CPU).

    python -m benchmarks.reference.train_dit --minutes 100 --out benchmarks/reference/dit-fmnist

A class-conditional diffusers ``DiTTransformer2DModel`` (so diffusers' own cache hooks apply to
it unchanged), epsilon-prediction with a linear DDPM noise schedule, label dropout for
classifier-free guidance, an EMA of the weights (the shipped weights), bf16 autocast on CPU.
Checkpoints are written every ``--save-every`` steps so a stopped run still leaves usable weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiTTransformer2DModel

from benchmarks.reference import data

NULL_CLASS = 10  # diffusers' LabelEmbedding puts the "no label" row after the real classes


def build_model(layers: int = 12, heads: int = 4, head_dim: int = 48, patch: int = 4) -> DiTTransformer2DModel:
    return DiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=1,
        out_channels=1,
        num_layers=layers,
        sample_size=32,
        patch_size=patch,
        num_embeds_ada_norm=10,  # class count; diffusers adds the null-class row itself
        norm_num_groups=1,
    )


def _freeze_builtin_label_dropout(model: torch.nn.Module) -> None:
    # diffusers drops labels independently inside every block's adaLN embedding when training;
    # at sampling time CFG drops them in all blocks at once, so drop consistently here instead.
    for module in model.modules():
        if type(module).__name__ == "LabelEmbedding":
            module.eval()


def save(model: torch.nn.Module, out: Path, log: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    half = copy.deepcopy(model).to(torch.float16)  # half-precision storage keeps the repo small
    half.save_pretrained(out, safe_serialization=True)
    DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", clip_sample=True, set_alpha_to_one=False
    ).save_pretrained(out / "scheduler")
    (out / "training_log.json").write_text(json.dumps(log, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("benchmarks/reference/dit-fmnist"))
    p.add_argument("--minutes", type=float, default=100.0, help="wall-clock training budget")
    p.add_argument("--max-steps", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=48)
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--resume", action="store_true", help="continue from the weights in --out (fresh optimizer)")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    images, labels = data.load("train")  # (60000, 1, 32, 32), (60000,)
    model = build_model(args.layers, args.heads, args.head_dim, args.patch)
    previous: dict = {}
    if args.resume:
        # The shipped weights are the EMA; both the trained copy and the EMA restart from them.
        state = DiTTransformer2DModel.from_pretrained(args.out, torch_dtype=torch.float32).state_dict()
        model.load_state_dict(state)
        previous = json.loads((args.out / "training_log.json").read_text())
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    model.train()
    _freeze_builtin_label_dropout(model)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    alphas = sched.alphas_cumprod  # (1000,)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params: {n_params / 1e6:.2f} M", flush=True)

    budget = args.minutes * 60.0
    start = time.perf_counter()
    log: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "params": n_params, "loss": []}
    if previous:
        log["previous_phases"] = [*previous.pop("previous_phases", []), previous]
    step, running = 0, 0.0
    while step < args.max_steps:
        elapsed = time.perf_counter() - start
        if elapsed > budget:
            break
        idx = torch.randint(0, images.shape[0], (args.batch,))
        x0, y = images[idx], labels[idx].clone()
        y[torch.rand(args.batch) < args.label_dropout] = NULL_CLASS
        t = torch.randint(0, 1000, (args.batch,))
        noise = torch.randn_like(x0)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        # Warm-up then cosine decay over the time budget (the step count is unknown up front).
        frac = min(elapsed / budget, 1.0)
        lr = args.lr * min(1.0, (step + 1) / 500) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred = model(xt, timestep=t, class_labels=y).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        step += 1
        running = loss.item() if step == 1 else 0.99 * running + 0.01 * loss.item()
        if step % 50 == 0:
            wall = time.perf_counter() - start
            log["loss"].append({"step": step, "wall_s": round(wall, 1), "loss_ema": round(running, 5)})
            print(f"step {step} wall {wall:.0f}s loss {running:.4f} lr {lr:.2e}", flush=True)
        if step % args.save_every == 0:
            log.update(steps=step, wall_s=round(time.perf_counter() - start, 1), final_loss=round(running, 5))
            save(ema, args.out, log)
    log.update(steps=step, wall_s=round(time.perf_counter() - start, 1), final_loss=round(running, 5))
    save(ema, args.out, log)
    print(f"done: {step} steps, {log['wall_s']} s, loss {running:.4f}", flush=True)


if __name__ == "__main__":
    main()
