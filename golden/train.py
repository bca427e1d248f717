"""Train sparsec's golden models and record their held-out metrics.

    python -m sparsec.golden.train all                 # tiny-gpt, tiny-moe, digits (about 10 minutes on 2 cores)
    python -m sparsec.golden.train tiny-gpt --steps 100 --out /tmp/g   # a quick try, written elsewhere

Training is seeded and deterministic for a given torch version, thread count and machine (deterministic algorithms,
fixed thread count, seeded batch sampling). It uses the training split only: AdamW with linear warmup and a cosine
schedule, gradient clipping; the MoE model adds Mixtral's load-balancing loss so that every expert is used.

Writes ``<name>.safetensors`` (float16, keys sorted, metadata ``name`` / ``config``) and ``<name>.json``: the
configuration (model and training hyper-parameters), parameter count, file size and sha256, training steps and
seconds, torch version, seed, and the held-out metric of the model as ``load()`` returns it (the float16 weights
reloaded into float32), computed by ``evaluate_module``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from . import data
from .evaluate import evaluate_module, heldout_windows
from .models import NAMES, _HERE, _check, build, config, load_weights

TRAIN_CONFIGS: dict[str, dict] = {
    "tiny-gpt": {"steps": 1000, "threads": 2, "batch_size": 32, "seq_len": 128, "lr": 3e-3, "min_lr_ratio": 0.1, "warmup_steps": 40,
                 "weight_decay": 0.1, "betas": [0.9, 0.95], "grad_clip": 1.0},
    # one thread: the HF expert loop is many small ops, which a second thread does not speed up on a busy machine
    "tiny-moe": {"steps": 700, "threads": 1, "batch_size": 32, "seq_len": 128, "lr": 3e-3, "min_lr_ratio": 0.1, "warmup_steps": 40,
                 "weight_decay": 0.1, "betas": [0.9, 0.95], "grad_clip": 1.0, "router_aux_loss_coef": 0.05},
    "digits": {"steps": 800, "threads": 1, "batch_size": 64, "lr": 3e-3, "min_lr_ratio": 0.05, "warmup_steps": 50,
               "weight_decay": 0.05, "betas": [0.9, 0.999], "grad_clip": 1.0},
}

# limited evaluation recorded alongside the full one, for fast checks
LIMITED_WINDOWS = 48


def train_config(name: str) -> dict:
    return json.loads(json.dumps(TRAIN_CONFIGS[_check(name)]))


def _lr_at(step: int, tc: dict) -> float:
    peak, warm, total = tc["lr"], tc["warmup_steps"], tc["steps"]
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    floor = peak * tc["min_lr_ratio"]
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def load_balancing_loss(router_logits: list[torch.Tensor], num_experts: int, top_k: int) -> torch.Tensor:
    """Mixtral / Switch auxiliary loss E * sum_e (fraction of routed slots to e) * (mean router prob of e),
    computed per layer and averaged over layers (HF's ``load_balancing_loss_func`` pools all layers' tokens, which
    only balances the experts in aggregate: a layer can then starve some of its experts). Equals top_k when every
    layer is balanced."""
    losses = []
    for logits in router_logits:
        probs = F.softmax(logits, dim=-1, dtype=torch.float)
        _, selected = torch.topk(probs, top_k, dim=-1)
        expert_mask = F.one_hot(selected, num_experts).float()  # [N, k, E]
        tokens_per_expert = expert_mask.mean(dim=0)  # [k, E]
        router_prob_per_expert = probs.mean(dim=0)  # [E]
        losses.append((tokens_per_expert * router_prob_per_expert.unsqueeze(0)).sum() * num_experts)
    return torch.stack(losses).mean()


def _optimizer(model: torch.nn.Module, tc: dict) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tc["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc["lr"], betas=tuple(tc["betas"]), eps=1e-8)


def _train_lm(name: str, model: torch.nn.Module, tc: dict, seed: int, log) -> list[dict]:
    cfg = config(name)
    train, _ = data.text_splits()
    train_t = torch.from_numpy(train.astype(np.int64))
    gen = torch.Generator().manual_seed(seed + 1)
    opt = _optimizer(model, tc)
    bs, t = tc["batch_size"], tc["seq_len"]
    offs = torch.arange(t + 1)
    history = []
    model.train()
    for step in range(tc["steps"]):
        lr = _lr_at(step, tc)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, len(train_t) - t - 1, (bs,), generator=gen)
        chunk = train_t[starts[:, None] + offs[None, :]]
        x, y = chunk[:, :-1], chunk[:, 1:]
        logits, router_logits = model.forward_with_router_logits(x)
        lm_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss = lm_loss
        aux = None
        if router_logits:
            aux = load_balancing_loss(router_logits, cfg["num_experts"], cfg["num_experts_per_tok"])
            loss = loss + tc["router_aux_loss_coef"] * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc["grad_clip"])
        opt.step()
        if step % 50 == 0 or step == tc["steps"] - 1:
            row = {"step": step, "lr": lr, "loss": lm_loss.item()}
            if aux is not None:
                row["aux_loss"] = aux.item()
            history.append(row)
            log(f"  [{name}] step {step:5d}  lr {lr:.2e}  loss {lm_loss.item():.4f}"
                + (f"  aux {aux.item():.3f}" if aux is not None else ""))
    return history


def _train_digits(name: str, model: torch.nn.Module, tc: dict, seed: int, log) -> list[dict]:
    xtr, ytr, _, _ = data.digits_splits()
    xtr_t, ytr_t = torch.from_numpy(xtr), torch.from_numpy(ytr)
    gen = torch.Generator().manual_seed(seed + 1)
    opt = _optimizer(model, tc)
    history = []
    model.train()
    perm, pos = torch.randperm(len(xtr_t), generator=gen), 0
    for step in range(tc["steps"]):
        lr = _lr_at(step, tc)
        for g in opt.param_groups:
            g["lr"] = lr
        if pos + tc["batch_size"] > len(perm):
            perm, pos = torch.randperm(len(xtr_t), generator=gen), 0
        idx = perm[pos : pos + tc["batch_size"]]
        pos += tc["batch_size"]
        loss = F.cross_entropy(model(xtr_t[idx]), ytr_t[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc["grad_clip"])
        opt.step()
        if step % 250 == 0 or step == tc["steps"] - 1:
            history.append({"step": step, "lr": lr, "loss": loss.item()})
            log(f"  [{name}] step {step:5d}  lr {lr:.2e}  loss {loss.item():.4f}")
    return history


@torch.no_grad()
def expert_usage(name: str, module: torch.nn.Module, limit: int | None = None) -> list[list[float]]:
    """Per layer, the fraction of held-out tokens routed (top-k) to each expert."""
    cfg = config(name)
    x, _ = heldout_windows(name, limit)
    counts = np.zeros((cfg["num_layers"], cfg["num_experts"]), dtype=np.int64)
    ntok = 0
    module.eval()
    for s in range(0, len(x), 16):
        _, rl = module.forward_with_router_logits(torch.from_numpy(x[s : s + 16]))
        for i, r in enumerate(rl):
            sel = torch.topk(r, cfg["num_experts_per_tok"], dim=-1).indices
            counts[i] += np.bincount(sel.reshape(-1).numpy(), minlength=cfg["num_experts"])
        ntok += x[s : s + 16].size
    return (counts / ntok).round(4).tolist()


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """Write a safetensors file byte-for-byte deterministically: tensors in sorted key order, header JSON with sorted
    keys (``safetensors.torch.save_file`` orders the metadata by a hash map, so its bytes vary from run to run)."""
    dtypes = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64"}
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    blobs, offset = [], 0
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[k] = {"dtype": dtypes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * (-len(hb) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(len(hb).to_bytes(8, "little"))
        f.write(hb)
        for raw in blobs:
            f.write(raw)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def save_fp16(module: torch.nn.Module, path: str, name: str) -> None:
    state = module.state_dict()
    tensors = {k: state[k].detach().to(torch.float16).contiguous() for k in sorted(state)}
    meta = {"name": name, "config": json.dumps(config(name), sort_keys=True), "dtype": "float16",
            "producer": "sparsec.golden.train"}
    write_safetensors(tensors, path, meta)


def train_one(name: str, steps: int | None = None, seed: int = 0, out_dir: str | None = None,
              threads: int | None = None, log=print) -> dict:
    _check(name)
    out_dir = out_dir or _HERE
    os.makedirs(out_dir, exist_ok=True)
    tc = train_config(name)
    if threads is not None:
        tc["threads"] = int(threads)
    torch.set_num_threads(tc["threads"])
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    np.random.seed(seed)
    if steps is not None:
        tc["steps"] = int(steps)
        tc["warmup_steps"] = min(tc["warmup_steps"], max(1, int(steps) // 10))
    model = build(name)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[{name}] {n_params:,} parameters, {tc['steps']} steps, seed {seed}, {torch.get_num_threads()} threads")
    t0 = time.perf_counter()
    if name == "digits":
        history = _train_digits(name, model, tc, seed, log)
    else:
        history = _train_lm(name, model, tc, seed, log)
    seconds = time.perf_counter() - t0
    model.eval()

    wpath = os.path.join(out_dir, f"{name}.safetensors")
    save_fp16(model, wpath, name)
    # exactly what load() returns: fp16 weights reloaded into a float32 module
    reloaded = load_weights(build(name), wpath).to(torch.float32).eval()
    t1 = time.perf_counter()
    heldout = evaluate_module(name, reloaded)
    eval_seconds = time.perf_counter() - t1
    record = {
        "name": name,
        "config": {"model": config(name), "train": tc},
        "parameters": int(n_params),
        "file": os.path.basename(wpath),
        "file_bytes": os.path.getsize(wpath),
        "sha256": _sha256(wpath),
        "weights_dtype": "float16",
        "training": {"steps": tc["steps"], "seconds": round(seconds, 1), "threads": torch.get_num_threads(),
                     "final_loss": history[-1]["loss"], "history": history},
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "machine": platform.machine(),
        "seed": seed,
        "command": f"python -m sparsec.golden.train {name} --seed {seed}"
                   + ("" if steps is None else f" --steps {steps}") + ("" if threads is None else f" --threads {threads}"),
        "heldout": heldout,
        "eval_seconds": round(eval_seconds, 1),
    }
    if name == "digits":
        import sklearn

        record["sklearn_version"] = sklearn.__version__
        record["heldout_limited"] = {"limit": 100, **evaluate_module(name, reloaded, limit=100)}
    else:
        record["heldout_limited"] = {"limit": LIMITED_WINDOWS, **evaluate_module(name, reloaded, limit=LIMITED_WINDOWS)}
        record["train_split_bytes"] = int(data.text_split_index())
    if config(name)["kind"] == "mixtral":
        record["expert_usage_heldout"] = expert_usage(name, reloaded)
    with open(os.path.join(out_dir, f"{name}.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    log(f"[{name}] trained in {seconds:.1f}s; held-out {heldout['metric']} = {heldout['value']:.4f}; "
        f"{record['file_bytes']:,} bytes")
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sparsec.golden.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("name", choices=[*NAMES, "all"], help="which model to train")
    ap.add_argument("--steps", type=int, default=None, help="override the number of optimizer steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="override the torch thread count (results depend on it)")
    ap.add_argument("--out", default=None, help="output directory (default: the golden/ package directory)")
    args = ap.parse_args(argv)
    names = NAMES if args.name == "all" else (args.name,)
    for n in names:
        train_one(n, steps=args.steps, seed=args.seed, out_dir=args.out, threads=args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
