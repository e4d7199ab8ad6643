"""Your own model and training loop, with a dtrain gradient strategy (docs/custom_loop.md).

Trains a Hugging Face `BertForMaskedLM` (a small BertConfig, random init, nothing downloaded) on synthetic
masked-token data, in a plain PyTorch loop that uses dtrain only through five calls:

    strategy = build_strategy(CommConfig(strategy="dad"))   # or rankdad, allreduce, powersgd, ddp, auto, ...
    fwd = strategy.attach(model)                            # the module to run forward through
    loss.backward()
    stats = strategy.synchronize()                          # every rank now holds the same mean gradient
    optimizer.step()

and prints the bytes each step sent (`stats`, a CommStats). Run on 2 processes:

    torchrun --standalone --nproc-per-node 2 examples/custom_loop.py --strategy dad
    torchrun --standalone --nproc-per-node 2 examples/custom_loop.py --strategy rankdad --rank 4
    torchrun --standalone --nproc-per-node 2 examples/custom_loop.py --strategy dad --fpsa   # FPSA inside BERT

Needs the optional extra: pip install 'dtrain[hf]'.

The data: each sequence is an arithmetic progression of tokens (mod the vocabulary) of random length, padded;
15% of its real tokens are replaced by [MASK] and predicted. Global batch `step` is drawn from a generator seeded
with (seed, step) and rank r trains rows r·B/S ... (r+1)·B/S, so the global batch does not depend on the number
of processes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from dtrain.compression import CommStats, build_strategy, fp32_allreduce_bytes
from dtrain.config import CommConfig, FPSAConfig
from dtrain.metrics import format_bytes

PAD, MASK, FIRST_WORD = 0, 1, 2  # token ids: padding, [MASK], then the words
IGNORE = -100  # label of a position that is not predicted (the cross-entropy ignore index)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--strategy", default="dad", help="comm.strategy: dad, rankdad, allreduce, powersgd, ddp, auto")
    p.add_argument("--rank", type=int, default=4, help="rankdad / powersgd compression rank")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8, help="GLOBAL batch over all processes")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (strategy.no_sync)")
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.0, help="hidden_dropout_prob")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fpsa", action="store_true", help="swap BERT's self-attention for FPSA (dtrain.hf)")
    p.add_argument("--fpsa-max-iter", type=int, default=8)
    p.add_argument("--save", default=None, help="write model, optimizer and strategy state to SAVE.rank<r>")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


@dataclass
class Result:
    model: nn.Module
    losses: list[float] = field(default_factory=list)  # this rank's loss per step
    stats: list[CommStats] = field(default_factory=list)  # this rank's CommStats per step
    allreduce_bytes: int = 0  # what a plain fp32 all-reduce of every gradient would send per step


def build_model(args: argparse.Namespace) -> nn.Module:
    """A BertForMaskedLM that dtrain did not build: a stock transformers model, random init."""
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=4 * args.hidden,
        hidden_dropout_prob=args.dropout,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=args.seq_len,
        pad_token_id=PAD,
    )
    model = BertForMaskedLM(config)
    if args.fpsa:
        from dtrain.hf import swap_attention

        swap_attention(model, FPSAConfig(max_iter=args.fpsa_max_iter))
    return model


def global_batch(args: argparse.Namespace, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels) of the whole global batch of `step`: int64 [B, L] each."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    batch, length, words = args.batch_size, args.seq_len, args.vocab - FIRST_WORD
    start = torch.randint(0, words, (batch, 1), generator=g)
    stride = torch.randint(1, 4, (batch, 1), generator=g)
    tokens = FIRST_WORD + (start + stride * torch.arange(length)) % words
    lengths = torch.randint(length // 2, length + 1, (batch, 1), generator=g)
    real = torch.arange(length) < lengths
    masked = real & (torch.rand((batch, length), generator=g) < 0.15)
    masked[:, 0] |= ~masked.any(dim=1)  # at least one prediction per sequence
    labels = torch.where(masked, tokens, IGNORE)
    input_ids = torch.where(masked, MASK, torch.where(real, tokens, PAD))
    return input_ids, real.long(), labels


def init_distributed() -> tuple[int, int, torch.device]:
    """rank, world size and device; starts the process group under torchrun unless one is running."""
    use_cuda = torch.cuda.is_available()
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if not dist.is_initialized():
        return 0, 1, torch.device("cuda" if use_cuda else "cpu")
    use_cuda = use_cuda and dist.get_backend() == "nccl"
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if use_cuda else "cpu")
    return dist.get_rank(), dist.get_world_size(), device


def main(argv: list[str] | None = None) -> Result:
    args = parse_args(argv)
    rank, world, device = init_distributed()
    if args.batch_size % (world * args.grad_accum):
        raise SystemExit(f"--batch-size {args.batch_size} is not divisible by {world} ranks x {args.grad_accum}")
    say = (lambda *a: None) if args.quiet or rank else print

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = build_model(args).to(device)
    strategy = build_strategy(CommConfig(strategy=args.strategy, rank=args.rank))
    fwd = strategy.attach(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    result = Result(model, allreduce_bytes=fp32_allreduce_bytes(model))
    say(f"{args.strategy} on {world} rank(s): {sum(p.numel() for p in model.parameters())} parameters")

    share = args.batch_size // world
    micro = share // args.grad_accum
    for step in range(args.steps):
        ids, attention, labels = (t[rank * share : (rank + 1) * share].to(device) for t in global_batch(args, step))
        step_loss = 0.0
        for m in range(args.grad_accum):
            part = slice(m * micro, (m + 1) * micro)
            # every backward but the last only accumulates: nothing is sent until synchronize()
            quiet = strategy.no_sync() if m < args.grad_accum - 1 else contextlib.nullcontext()
            with quiet:
                loss = fwd(input_ids=ids[part], attention_mask=attention[part], labels=labels[part]).loss
                (loss / args.grad_accum).backward()
            step_loss += loss.item() / args.grad_accum
        stats = strategy.synchronize()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(step_loss)
        result.stats.append(stats)
        say(
            f"step {step:3d}  loss {step_loss:.4f}  sent {format_bytes(stats.bytes_sent)}  "
            f"wire {format_bytes(stats.wire_bytes)}  in {stats.time_s * 1e3:.1f} ms"
        )
    if result.stats:
        sent = result.stats[-1].bytes_sent
        say(
            f"{args.strategy}: {format_bytes(sent)} per step; fp32 all-reduce: {format_bytes(result.allreduce_bytes)}"
            f" ({sent / result.allreduce_bytes:.2f}x)"
        )
    if args.save:  # one file per rank: a strategy's memory (error-feedback residuals) is per rank
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "strategy": strategy.state_dict()}
        torch.save(state, f"{args.save}.rank{rank}")
    strategy.close()
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
    if dist.is_initialized():
        dist.destroy_process_group()
