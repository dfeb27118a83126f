"""The DP step against the non-private step on a GPU: tokens/s, time ratio and peak-memory ratio, for causal LMs of
SmolLM2-135M's and TinyLlama-1.1B's real shapes (random weights), bf16 base weights with float32 LoRA adapters
(r=8 on q,k,v,o, FFA-LoRA), rows of 256 tokens, several logical batch sizes taken in micro-batches.

The step is the site's own (:func:`client.train.logical_step` under :class:`client.dp_random.DpEngine`, bf16
autocast); memory is ``torch.cuda.max_memory_allocated`` during the steps minus what the model holds. Finishes
inside 8 minutes on an H200 (``--budget-s`` stops starting new settings after that many seconds).

Needs only torch, transformers, peft and opacus (no flwr, no ray: nothing imported here imports them). On a
machine without opacus, carry its wheels and install them there without dependencies::

    pip download opacus==1.6.0 opt_einsum==3.4.0 --no-deps -d wheels/          # here
    pip install --no-deps wheels/*.whl && python simulations/gpu_benchmark.py  # there (scipy must be present)

    python simulations/gpu_benchmark.py --device cpu --smoke   # the same code path on a tiny model, in seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

try:
    from client.train import logical_step, make_optimizer
except ImportError as e:  # opacus (or its opt_einsum, scipy) is not installed on the GPU machine
    raise ImportError(
        f"gpu_benchmark needs opacus and its dependencies ({e}): pip install --no-deps wheels/*.whl "
        "(made with: pip download opacus==1.6.0 opt_einsum==3.4.0 --no-deps -d wheels/)"
    ) from e
from shared.causal_model import row_mean_nll  # noqa: E402
from simulations.benchmark_dp_step import (  # noqa: E402
    SHAPES,
    causal_lora_model,
    causal_rows,
    make_private,
    markdown,
)

# (shape, logical batch sizes, micro-batch size): 256-token rows
PLAN: list[tuple[str, list[int], int]] = [
    ("smollm2-135m", [16, 64, 256], 16),
    ("tinyllama-1.1b", [16, 64, 128], 16),
]
SMOKE_PLAN: list[tuple[str, list[int], int]] = [("tiny", [4, 8], 2)]


def bf16_base(model: nn.Module) -> nn.Module:
    """Frozen weights in bfloat16, the trained adapter in float32 (its master weights and the optimizer's)."""
    for p in model.parameters():
        p.data = p.data.to(torch.float32 if p.requires_grad else torch.bfloat16)
    return model


def measure(
    model: nn.Module,
    batch: Any,
    *,
    shape: str,
    micro: int,
    dp: bool,
    device: str,
    steps: int,
    warmup: int,
    seq: int,
) -> dict[str, Any]:
    """``warmup`` + ``steps`` logical steps of ``model`` on ``batch``; seconds per step and peak memory."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer("sgd", params, 1e-4)
    module: nn.Module = model
    if dp:
        module, optimizer = make_private(model, optimizer, batch)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
    times = []
    try:
        for i in range(warmup + steps):
            started = time.perf_counter()
            logical_step(
                module,
                optimizer,
                batch,
                params,
                loss_fn=row_mean_nll,
                micro_batch_size=micro,
                dp=dp,
                device=device,
                autocast="bf16",
            )
            if cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - started)
    finally:
        if dp:
            module._close()  # type: ignore[operator]  # the model is plain again for the next setting
        optimizer.zero_grad(set_to_none=True)
    seconds = sorted(times)[len(times) // 2]
    row: dict[str, Any] = {
        "model": shape,
        "batch": len(batch),
        "micro": micro,
        "dp": dp,
        "autocast": "bf16",
        "base_dtype": "bfloat16",
        "seq": seq,
        "device": device,
        "seconds": seconds,
        "cpu_seconds": seconds,
        "tokens_per_s": int(batch.attention_mask.sum()) / seconds,
        "step_rss_mb": 0.0,
    }
    if cuda:
        row["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        row["cuda_step_mb"] = (torch.cuda.max_memory_allocated() - held) / 2**20
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="a tiny model and batches: proves the path works")
    parser.add_argument("--seq", type=int, default=None, help="tokens per row (256; --smoke: 32)")
    parser.add_argument("--steps", type=int, default=3, help="timed logical steps per setting")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no new setting after this many s")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch sees no CUDA device (use --device cpu --smoke here)")
    plan = SMOKE_PLAN if args.smoke else PLAN
    seq = args.seq or (32 if args.smoke else 256)
    began = time.monotonic()
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    for shape, batch_sizes, micro in plan:
        if time.monotonic() - began > args.budget_s:
            skipped.append(shape)
            continue
        model = bf16_base(causal_lora_model(shape)).to(args.device)
        for batch_size in batch_sizes:
            for dp in (False, True):
                if time.monotonic() - began > args.budget_s:
                    skipped.append(f"{shape} batch {batch_size} dp {dp}")
                    continue
                batch = causal_rows(batch_size, seq, SHAPES[shape]["vocab_size"])
                try:
                    row = measure(
                        model,
                        batch,
                        shape=shape,
                        micro=micro,
                        dp=dp,
                        device=args.device,
                        steps=args.steps,
                        warmup=args.warmup,
                        seq=seq,
                    )
                except torch.cuda.OutOfMemoryError:
                    skipped.append(f"{shape} batch {batch_size} dp {dp}: out of memory")
                    continue
                rows.append(row)
                print(
                    f"{shape} batch {batch_size} micro {micro} dp {dp}: {row['seconds']:.3f} s/step "
                    f"{row['tokens_per_s']:.0f} tokens/s peak {row.get('cuda_step_mb', 0):.0f} MiB "
                    f"({time.monotonic() - began:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
        del model
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device: {name}; rows of {seq} tokens; bf16 base weights, fp32 LoRA r=8 (q,k,v,o, FFA); bf16 autocast")
    print(markdown(rows))
    if skipped:
        print(f"not run (budget {args.budget_s:g} s or memory): {'; '.join(skipped)}")
    print(f"total {time.monotonic() - began:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
