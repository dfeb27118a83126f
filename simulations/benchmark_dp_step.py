"""Time and peak memory of one DP-SGD step against the non-private step, on this machine's CPU.

Two models:

- ``--model smollm2`` (default): a causal LM of SmolLM2-135M's real shapes (random weights: the cost of a step
  does not depend on their values), LoRA r=8 on q,k,v,o, FFA-LoRA (only B trained), rows of ``--seq`` tokens
  whose first quarter is the prompt (no loss), the causal task's loss (each row's mean response-token NLL,
  averaged over rows). Logical batches of ``--batch-sizes`` rows taken in micro-batches of ``--micro``.
- ``--model classifier``: the builtin MiniLM classifier on the bundled reviews (max-length 48), one logical batch
  of ``--batch-sizes`` rows; micro-batch 0 (the batch in one piece, trimmed to its longest row) against
  length-sorted micro-batches.

Each configuration runs in a fresh subprocess: the step is :func:`client.train.logical_step`, the one a site
runs, under Opacus's ``make_private`` through the site's own :class:`client.dp_random.DpEngine`. Reported:
seconds per logical step (the median of ``--steps`` steps after ``--warmup`` untimed ones), tokens per second, and the
process's peak RSS (``ru_maxrss``) minus its RSS once the model is built: the step's own memory.

    python simulations/benchmark_dp_step.py                      # the table in docs/benchmarks.md
    python simulations/benchmark_dp_step.py --model classifier   # length sorting and bf16 on the classifier
    python simulations/benchmark_dp_step.py --model classifier --accuracy --batch-sizes 128  # fp32 vs bf16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

# Real shapes of the two base models the causal-LM task is benchmarked with (config.json of each).
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "tinyllama-1.1b": dict(
        hidden_size=2048,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        intermediate_size=5632,
        vocab_size=32000,
        tie_word_embeddings=False,
    ),
    "tiny": dict(  # --smoke: the same code path in seconds
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=128,
        tie_word_embeddings=True,
    ),
}


def causal_lora_model(
    shape: str, *, r: int = 8, targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj"), seed: int = 0
) -> nn.Module:
    """A random-init Llama of ``shape`` with a FFA-LoRA adapter: A frozen (nonzero), B trained."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=2048, attn_implementation="sdpa")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        model = get_peft_model(
            LlamaForCausalLM(config), LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(targets))
        )
    for name, p in model.named_parameters():
        if ".lora_A." in name:
            p.requires_grad_(False)
    model.train()
    return model


def causal_rows(n: int, seq: int, vocab: int, *, seed: int = 0) -> Any:
    """``n`` rows of ``seq`` random tokens; the first quarter is the prompt (labels -100)."""
    from shared.model import Encoded

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq), generator=gen)
    labels = ids.clone()
    labels[:, : seq // 4] = -100
    return Encoded(ids, torch.ones_like(ids), labels)


@dataclass(frozen=True)
class Setting:
    model: str  # a SHAPES key, or "classifier"
    batch: int  # rows in the logical batch
    micro: int  # micro-batch size (0: the batch in one piece)
    dp: bool
    autocast: str  # "off" or "bf16"
    seq: int = 256
    steps: int = 2
    warmup: int = 1
    threads: int = 0  # torch CPU threads (0: torch's default)
    device: str = "cpu"
    base_dtype: str = "float32"  # the frozen base's weights (bfloat16 on a GPU); the adapter stays float32


def _classifier(setting: Setting) -> tuple[nn.Module, Any, Any]:
    from shared.config import RunConfig
    from shared.data import load_rotten_tomatoes
    from shared.model import build_model, classifier_loss, encode, load_tokenizer

    cfg = RunConfig(max_length=48)
    rows = load_rotten_tomatoes()
    rows = rows.subset(list(range(setting.batch)))
    data = encode(load_tokenizer(cfg.model_path), rows.texts, rows.labels, max_length=cfg.max_length)
    return build_model(cfg, len(rows.label_names)), data, classifier_loss


def make_private(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Any) -> tuple[nn.Module, Any]:
    """``model`` and ``optimizer`` under Opacus's ``make_private`` through the site's own :class:`DpEngine` (noise
    1, clip 1, Poisson sampling, PRV accountant). Its loader of ``batch`` only tells Opacus the sample rate: the
    benchmark's steps take the fixed batch."""
    from torch.utils.data import DataLoader, TensorDataset

    from client.dp_random import DpEngine, random_source

    loader = DataLoader(TensorDataset(batch.input_ids, batch.attention_mask, batch.labels), batch_size=len(batch))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        engine = DpEngine(accountant="prv", source=random_source(None))
        module, optimizer, _ = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=True,
        )
    return module, optimizer


def _tokens(data: Any) -> int:
    return int(data.attention_mask.sum())


def run_setting(setting: Setting) -> dict[str, Any]:
    """Build the model, take one warm-up step and ``steps`` timed logical steps; time and memory."""
    from client.train import logical_step, make_optimizer

    device = setting.device
    if setting.threads:
        torch.set_num_threads(setting.threads)
    if setting.model == "classifier":
        model, batch, loss_fn = _classifier(setting)
    else:
        from shared.causal_model import row_mean_nll

        model = causal_lora_model(setting.model)
        batch = causal_rows(setting.batch, setting.seq, SHAPES[setting.model]["vocab_size"])
        loss_fn = row_mean_nll
    if setting.base_dtype != "float32":
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(getattr(torch, setting.base_dtype))
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer("sgd", params, 1e-3)
    module: nn.Module = model
    if setting.dp:
        module, optimizer = make_private(model, optimizer, batch)
    cuda = device.startswith("cuda")
    base_rss = _rss_mb()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    options = dict(loss_fn=loss_fn, micro_batch_size=setting.micro, dp=setting.dp, device=device)
    times, cpu_times = [], []
    for i in range(setting.warmup + setting.steps):
        started, cpu_started = time.perf_counter(), time.process_time()
        logical_step(module, optimizer, batch, params, autocast=setting.autocast, **options)  # type: ignore[arg-type]
        if cuda:
            torch.cuda.synchronize()
        if i >= setting.warmup:  # warm-up steps (allocator, kernels, Opacus's hooks) are not timed
            times.append(time.perf_counter() - started)
            cpu_times.append(time.process_time() - cpu_started)
    seconds = statistics.median(times)
    out: dict[str, Any] = {
        **setting.__dict__,
        "seconds": seconds,
        "cpu_seconds": statistics.median(cpu_times),  # this process's CPU time: robust on a shared machine
        "tokens_per_s": _tokens(batch) / seconds,
        "peak_rss_mb": _peak_rss_mb(),
        "step_rss_mb": _peak_rss_mb() - base_rss,
    }
    if cuda:
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["cuda_step_mb"] = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
    return out


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def in_subprocess(setting: Setting, *, timeout: float) -> dict[str, Any]:
    """``run_setting`` in a fresh interpreter, so that its peak RSS is its own."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(
        [sys.executable, __file__, "--one", json.dumps(setting.__dict__)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{setting} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _seconds(r: dict[str, Any]) -> str:
    return f"{r['seconds']:.2f}" if r["device"] != "cpu" else f"{r['seconds']:.2f} ({r['cpu_seconds']:.2f})"


def _time_ratio(dp: dict[str, Any], plain: dict[str, Any]) -> float:
    """DP over non-DP: CPU seconds on the CPU (wall time on a shared machine measures the neighbours too)."""
    field = "cpu_seconds" if dp["device"] == "cpu" else "seconds"
    return float(dp[field] / plain[field])


def markdown(rows: list[dict[str, Any]]) -> str:
    """One line per (batch, micro, precision): DP and non-DP time and memory, and their ratios."""
    key = ("model", "batch", "micro", "autocast", "base_dtype")
    pairs: dict[tuple[Any, ...], dict[bool, dict[str, Any]]] = {}
    for r in rows:
        pairs.setdefault(tuple(r[k] for k in key), {})[r["dp"]] = r
    mem = "cuda_step_mb" if any("cuda_step_mb" in r for r in rows) else "step_rss_mb"
    lines = [
        "| model | logical batch | micro-batch | precision | non-DP s/step | DP s/step | DP/non-DP time "
        "| DP tokens/s | non-DP step MiB | DP step MiB | DP/non-DP memory |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for k, pair in pairs.items():
        plain, dp = pair.get(False), pair.get(True)
        precision = k[3] if k[4] == "float32" else f"{k[3]}, base {k[4]}"
        both = dp is not None and plain is not None
        cells = [
            str(k[0]),
            str(k[1]),
            str(k[2] or "whole"),
            precision,
            _seconds(plain) if plain else "-",
            _seconds(dp) if dp else "-",
            f"{_time_ratio(dp, plain):.2f}" if dp and plain else "-",
            f"{dp['tokens_per_s']:.0f}" if dp else "-",
            f"{plain[mem]:.0f}" if plain else "-",
            f"{dp[mem]:.0f}" if dp else "-",
            f"{dp[mem] / max(plain[mem], 1e-9):.2f}" if dp and plain and both else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_settings(rows: list[dict[str, Any]]) -> str:
    """One line per setting (the classifier: whole batch against length-sorted micro-batches, fp32 against bf16)."""
    lines = [
        "| logical batch | micro-batch | precision | DP | s/step (CPU s) | vs whole fp32 (CPU s) | tokens/s "
        "| step MiB |",
        "| ---: | ---: | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    base = next((r for r in rows if r["micro"] == 0 and r["autocast"] == "off"), None)
    for r in rows:
        ratio = f"{r['cpu_seconds'] / base['cpu_seconds']:.2f}" if base else "-"
        lines.append(
            f"| {r['batch']} | {r['micro'] or 'whole'} | {r['autocast']} | {'yes' if r['dp'] else 'no'} "
            f"| {_seconds(r)} | {ratio} | {r['tokens_per_s']:.0f} | {r['step_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def accuracy(args: argparse.Namespace) -> str:
    """A centralized DP-SGD run on the bundled reviews, fp32 against bf16 autocast, with the same Poisson batches
    and the same noise (reproducible-noise): test accuracy and macro-F1 on held-out rows (evaluated in fp32)."""
    import numpy as np

    from client.train import train_round
    from shared.config import RunConfig
    from shared.data import load_rotten_tomatoes
    from shared.metrics import evaluate_model
    from shared.model import build_model, encode, load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = RunConfig(max_length=48)
    data = load_rotten_tomatoes()
    order = np.random.default_rng(0).permutation(len(data))
    train_rows, test_rows = data.subset(order[: args.train_rows]), data.subset(order[-args.test_rows :])
    tokenizer = load_tokenizer(cfg.model_path)
    train = encode(tokenizer, train_rows.texts, train_rows.labels, max_length=cfg.max_length)
    test = encode(tokenizer, test_rows.texts, test_rows.labels, max_length=cfg.max_length)
    lines = [
        f"| precision | steps | batch | noise | test accuracy | test macro-F1 | test loss ({len(test)} rows) "
        "| train s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mode in args.autocast:
        model = build_model(cfg, len(data.label_names))
        started = time.perf_counter()
        train_round(
            model,
            train,
            steps=args.accuracy_steps,
            batch_size=args.batch_sizes[0],
            learning_rate=cfg.learning_rate,
            optimizer_name=cfg.optimizer,
            dp=True,
            noise_multiplier=args.noise,
            max_grad_norm=cfg.max_grad_norm,
            seed=cfg.seed,  # the same batches and noise for every precision
            micro_batch_size=args.micro,
            autocast=mode,
        )
        seconds = time.perf_counter() - started
        m = evaluate_model(model, test, num_classes=len(data.label_names))
        lines.append(
            f"| {mode} | {args.accuracy_steps} | {args.batch_sizes[0]} | {args.noise:g} | {m['accuracy']:.4f} "
            f"| {m['macro_f1']:.4f} | {m['loss']:.4f} | {seconds:.0f} |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def settings_for(args: argparse.Namespace) -> list[Setting]:
    out = []
    for batch in args.batch_sizes:
        for autocast in args.autocast:
            micros = (0, args.micro) if args.model == "classifier" else (args.micro,)
            for micro in micros:
                for dp in (False, True) if args.model != "classifier" else (True,):
                    out.append(
                        Setting(
                            args.model,
                            batch,
                            micro,
                            dp,
                            autocast,
                            seq=args.seq,
                            steps=args.steps,
                            warmup=args.warmup,
                            threads=args.threads,
                        )
                    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", choices=[*SHAPES, "classifier"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="logical batch sizes")
    parser.add_argument("--micro", type=int, default=None, help="micro-batch size (4; classifier: 32)")
    parser.add_argument("--seq", type=int, default=256, help="tokens per row (causal LM)")
    parser.add_argument("--autocast", nargs="+", default=["off", "bf16"], choices=["off", "bf16"])
    parser.add_argument("--steps", type=int, default=1, help="timed logical steps per setting")
    parser.add_argument("--warmup", type=int, default=0, help="untimed logical steps before them")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads per setting (0: torch's default)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per setting")
    parser.add_argument(
        "--accuracy", action="store_true", help="classifier: a centralized DP-SGD run per --autocast, test metrics"
    )
    parser.add_argument("--accuracy-steps", type=int, default=32)
    parser.add_argument("--train-rows", type=int, default=3000)
    parser.add_argument("--test-rows", type=int, default=600)
    parser.add_argument("--noise", type=float, default=1.0, help="noise multiplier of the --accuracy run")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the subprocess's own setting
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_setting(Setting(**json.loads(args.one)))))
        return 0
    if args.batch_sizes is None:
        args.batch_sizes = [256] if args.model == "classifier" else [4, 16]
    if args.micro is None:
        args.micro = 32 if args.model == "classifier" else 4
    if args.accuracy:
        print(accuracy(args))
        return 0
    rows = []
    for setting in settings_for(args):
        row = in_subprocess(setting, timeout=args.timeout)
        rows.append(row)
        print(
            f"batch {setting.batch} micro {setting.micro} dp {setting.dp} autocast {setting.autocast}: "
            f"{row['seconds']:.2f} s/step, {row['tokens_per_s']:.0f} tokens/s, step +{row['step_rss_mb']:.0f} MiB",
            file=sys.stderr,
            flush=True,
        )
    print(markdown_settings(rows) if args.model == "classifier" else markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
