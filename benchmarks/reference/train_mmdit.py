"""Train the project's reference MMDiT on Fashion-MNIST: rectified flow, as SD3 and Flux are trained.

    python -m benchmarks.reference.train_mmdit --minutes 90 [--resume]

A diffusers ``SD3Transformer2DModel`` (joint attention over image and prompt tokens, dual stream,
adaLN) conditioned on class "prompts": a learned table of prompt-token embeddings ``tokens`` (11, T, J)
and pooled embeddings ``pooled`` (11, P), row 10 being the empty prompt that classifier-free guidance
uses. Both tables train with the transformer (labels dropped to row 10 with p = 0.1).

Objective (SD3 / Flux): ``x_t = (1 − σ)·x0 + σ·ε``, target ``ε − x0``, σ logit-normal, timestep ``1000·σ``.
fp32 on the CPU (bf16 autocast measured ~10× slower there). An EMA of the weights is what ships (fp16
storage). The full training state (weights, EMA, optimiser, step, RNG) is written to ``--state`` at every
checkpoint, so ``--resume`` continues exactly where a stopped run left off.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from safetensors.torch import save_file

from benchmarks.reference import data
from fastcache_compile.reference import DEFAULT_PATH, NULL_ROW

PROMPT_TOKENS = 4


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path.name


def build_model(layers: int, heads: int, head_dim: int, patch: int, joint_dim: int, pooled_dim: int):
    return SD3Transformer2DModel(
        sample_size=32,
        patch_size=patch,
        in_channels=1,
        out_channels=1,
        num_layers=layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=joint_dim,
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=pooled_dim,
        pos_embed_max_size=32 // patch,
    )


class LabelEncoder(torch.nn.Module):
    """Precomputed "prompt" embeddings per class, the way a deployment caches its prompt encodings."""

    def __init__(self, tokens: int, joint_dim: int, pooled_dim: int) -> None:
        super().__init__()
        self.tokens = torch.nn.Parameter(torch.randn(11, tokens, joint_dim) * 0.5)  # (11, T, J)
        self.pooled = torch.nn.Parameter(torch.randn(11, pooled_dim) * 0.5)  # (11, P)


def save(ema: torch.nn.Module, enc: LabelEncoder, out: Path, log: dict, steps: int, guidance: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(ema).to(torch.float16).save_pretrained(out, safe_serialization=True)
    save_file(
        {"tokens": enc.tokens.detach().half().contiguous(), "pooled": enc.pooled.detach().half().contiguous()},
        str(out / "label_encoder.safetensors"),
    )
    # Rectified flow on 32×32 pixels: no resolution shift (SD3 uses 3.0 at 1024², Flux a dynamic one).
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).save_pretrained(out / "scheduler")
    (out / "sampling.json").write_text(json.dumps({"steps": steps, "guidance": guidance}, indent=2) + "\n")
    (out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_PATH)
    p.add_argument("--state", type=Path, default=Path("benchmarks/reference/.mmdit_train_state.pt"))
    p.add_argument("--minutes", type=float, default=90.0, help="wall-clock budget of this run")
    p.add_argument("--total-minutes", type=float, default=None, help="lr schedule length (default: --minutes)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--patch", type=int, default=2)
    p.add_argument("--joint-dim", type=int, default=64)
    p.add_argument("--pooled-dim", type=int, default=64)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--steps", type=int, default=20, help="default sampling steps written to sampling.json")
    p.add_argument("--guidance", type=float, default=3.0, help="default CFG scale written to sampling.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from --state")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    images, labels = data.load("train")  # (60000, 1, 32, 32) in [-1, 1], (60000,)
    model = build_model(args.layers, args.heads, args.head_dim, args.patch, args.joint_dim, args.pooled_dim)
    enc = LabelEncoder(PROMPT_TOKENS, args.joint_dim, args.pooled_dim)
    ema, ema_enc = copy.deepcopy(model).requires_grad_(False), copy.deepcopy(enc).requires_grad_(False)
    params = [*model.parameters(), *enc.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    # paths are logged as given, relative to the repository when inside it (no machine paths in the repo)
    logged = {k: _relative(v) if isinstance(v, Path) else str(v) for k, v in vars(args).items()}
    step, wall_before, log = 0, 0.0, {"args": logged, "loss": []}
    if args.resume:
        st = torch.load(args.state, weights_only=False)
        model.load_state_dict(st["model"])
        enc.load_state_dict(st["enc"])
        ema.load_state_dict(st["ema"])
        ema_enc.load_state_dict(st["ema_enc"])
        opt.load_state_dict(st["opt"])
        step, wall_before, log = st["step"], st["wall_s"], st["log"]
        torch.set_rng_state(st["rng"])
        log.setdefault("resumed_at", []).append(step)
    n_params = sum(q.numel() for q in model.parameters())
    log["params"] = n_params
    print(f"params: {n_params / 1e6:.2f} M, starting at step {step}", flush=True)
    total = 60.0 * (args.total_minutes or args.minutes)

    def checkpoint() -> None:
        log.update(steps=step, wall_s=round(wall, 1))
        save(ema, ema_enc, args.out, log, args.steps, args.guidance)
        state = {
            "model": model.state_dict(),
            "enc": enc.state_dict(),
            "ema": ema.state_dict(),
            "ema_enc": ema_enc.state_dict(),
            "opt": opt.state_dict(),
            "step": step,
            "wall_s": wall,
            "log": log,
            "rng": torch.get_rng_state(),
        }
        tmp = args.state.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(args.state)  # atomic: a kill mid-write never leaves a broken state

    start, running = time.perf_counter(), None
    wall = wall_before
    model.train()
    while True:
        wall = wall_before + time.perf_counter() - start
        if time.perf_counter() - start > 60.0 * args.minutes:
            break
        idx = torch.randint(0, images.shape[0], (args.batch,))
        x0, y = images[idx], labels[idx].clone()
        y[torch.rand(args.batch) < args.label_dropout] = NULL_ROW
        sigma = torch.sigmoid(torch.randn(args.batch))  # logit-normal(0, 1), as SD3
        eps = torch.randn_like(x0)
        s = sigma.view(-1, 1, 1, 1)
        xt = (1 - s) * x0 + s * eps
        frac = min(wall / total, 1.0)
        lr = args.lr * min(1.0, (step + 1) / 300) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr
        pred = model(
            hidden_states=xt,
            encoder_hidden_states=enc.tokens[y],
            pooled_projections=enc.pooled[y],
            timestep=1000.0 * sigma,
            return_dict=False,
        )[0]
        loss = torch.nn.functional.mse_loss(pred, eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip([*ema.parameters(), *ema_enc.parameters()], params):
                pe.lerp_(pm, 1 - decay)
        step += 1
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 25 == 0:
            log["loss"].append({"step": step, "wall_s": round(wall, 1), "loss_ema": round(running, 5)})
            print(f"step {step} wall {wall:.0f}s loss {running:.4f} lr {lr:.2e}", flush=True)
        if step % args.save_every == 0:
            checkpoint()
    checkpoint()
    print(f"done: {step} steps, {wall:.0f} s", flush=True)


if __name__ == "__main__":
    main()
