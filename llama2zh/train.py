"""`llama2zh train`: the training loop, the same on a laptop CPU, one GPU or many (torchrun).

AdamW (weight decay on 2-D weights only; fused on CUDA), warmup then cosine decay, gradient
accumulation and clipping, bf16 autocast (fp16 with a gradient scaler where bf16 is missing),
seeded data order. On CUDA: torch.compile (unless compile = false; eager, with one warning, when
it fails), TF32 matmuls, and a loop that never waits for the GPU between log intervals: the
losses stay on the device and are read once per log interval, and the next micro-batches are
drawn on a background thread into pinned memory and copied without blocking. A NaN or infinite
loss (found at the next read, and before every save) stops the run with a clear message and
leaves the last good checkpoint in place. Checkpoints are atomic and hold everything a resumed
run needs to continue exactly (model, optimizer, scaler, step, data generator and counts);
Ctrl-C saves one and exits cleanly. Each evaluation appends to metrics.jsonl.
With lora_rank > 0 (on init_from) the model is frozen and only LoRA adapters (lora.py) are
optimized and saved, with the base checkpoint's sha256, which a resume checks.
"""

from __future__ import annotations

import json
import math
import os
import queue
import shutil
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm import tqdm

from llama2zh.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from llama2zh.config import Config
from llama2zh.corpus.dataset import Mixture, open_mixture
from llama2zh.errors import UserError
from llama2zh.fileio import atomic_output, sha256_file
from llama2zh.lora import apply_lora, load_lora_state_dict
from llama2zh.model import Transformer


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def learning_rate(step: int, c: Config) -> float:
    """Linear warmup, then cosine decay from learning_rate to min_lr at max_iters."""
    if step < c.warmup_iters:
        return c.learning_rate * (step + 1) / c.warmup_iters
    progress = min(1.0, (step - c.warmup_iters) / max(1, c.max_iters - c.warmup_iters))
    return c.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (c.learning_rate - c.min_lr)


def make_optimizer(model: Transformer, c: Config, fused: bool) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": c.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=c.learning_rate, betas=(c.beta1, c.beta2), fused=fused or None)


class Distributed:
    """Rank, world size and the process group when launched by torchrun (RANK in the environment)."""

    def __init__(self, device_kind: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = "RANK" in os.environ and self.world > 1
        if self.enabled:
            torch.distributed.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def average(self, values: torch.Tensor) -> torch.Tensor:
        """values averaged element-wise over all processes (every rank gets the same numbers, so all stop
        together); on the training device, since NCCL reduces only GPU tensors."""
        if not self.enabled:
            return values
        values = values.to(torch.float64, copy=True)  # all_reduce works in place
        torch.distributed.all_reduce(values)
        return values / self.world

    def close(self):
        if self.enabled:
            torch.distributed.destroy_process_group()


def pick_device(c: Config, dist: Distributed) -> torch.device:
    if c.device == "cuda" or (c.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("device = cuda, but no CUDA device is available")
        return torch.device("cuda", dist.local_rank)
    return torch.device("cpu")


def compute_dtype(c: Config, device: torch.device) -> str:
    """The config's dtype, except bfloat16 on a GPU without it, which becomes float16 (with a scaler)."""
    if c.dtype == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "float16"
    return c.dtype


def autocast_context(dtype: str, device: torch.device):
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float16)


class Prefetcher:
    """Training micro-batches drawn ahead on a background thread, so that the GPU never waits for the
    CPU to cut windows (pinned, for a copy that does not block the host). Each batch comes with the
    data state right after it was drawn: what a checkpoint keeps for a resumed run to draw the batch
    after the last one trained on, however far ahead the thread is."""

    def __init__(self, draw, state, pin: bool, depth: int = 4):
        self.queue = queue.Queue(depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._work, args=(draw, state, pin), daemon=True)
        self.thread.start()

    def _work(self, draw, state, pin: bool) -> None:
        try:
            while not self.stop.is_set():
                batch = draw()
                if pin:  # contiguous first: a strided view would be copied to the GPU through pageable memory
                    batch = tuple(t if t is None else t.contiguous().pin_memory() for t in batch)
                self._put((batch, state()))
        except Exception as e:  # raised again where the batch is taken
            self._put((e, None))

    def _put(self, item) -> None:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def next(self) -> tuple[tuple, dict]:
        batch, state = self.queue.get()
        if isinstance(batch, Exception):
            raise batch
        return batch, state

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def compiled(model: Transformer, x: torch.Tensor, dtype: str):
    """torch.compile'd model, tried on one forward and backward of x; when compiling fails (no
    Triton, no C compiler, an op it cannot trace), the model itself, with one warning."""
    rng = torch.get_rng_state(), torch.cuda.get_rng_state(x.device) if x.device.type == "cuda" else None
    try:
        fast = torch.compile(model)
        with autocast_context(dtype, x.device):
            fast(x, targets=x).backward()  # the graph training runs: the loss inside (Transformer.forward)
        return fast
    except Exception as e:
        while (inner := getattr(e, "inner_exception", None) or e.__cause__) is not None:
            e = inner  # dynamo wraps what failed in its own exceptions
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        print(f"warning: torch.compile failed ({type(e).__name__}: {reason}); training without it", file=sys.stderr)
        return model
    finally:  # the trial leaves no trace: no gradients, the dropout generators where they were
        model.zero_grad(set_to_none=True)
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state(rng[1], x.device)


class Trainer:
    """The loop every stage shares. A stage brings its data (an object with .batch(split, rows,
    seq_len, generator, rank, world) -> (inputs, targets, segments); target -1 is not trained
    on, segments None or the packed sequences' ids), its starting model, and what its run
    directory records besides (run_info, saved in every checkpoint)."""

    def __init__(self, config: Config, data, model: Transformer, tokenizer_sha256: str, resume: bool,
                 run_info: dict | None = None, trained_rows: list[int] = ()):
        """trained_rows: token ids whose embedding rows LoRA trains too (sft: the chat pieces)."""
        self.c = c = config
        self.dist = Distributed("cuda" if c.device != "cpu" and torch.cuda.is_available() else "cpu")
        self.device = pick_device(c, self.dist)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.set_float32_matmul_precision("high")  # TF32 for the matmuls that stay in fp32
        self.run_dir = Path(c.out_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.data, self.model = data, model
        self.tokenizer_sha256, self.run_info = tokenizer_sha256, dict(run_info or {})
        if c.lora_rank:
            self.run_info["lora"] = self._attach_lora(sorted(trained_rows))
        self.model.to(self.device)
        self.optimizer = make_optimizer(self.model, c, fused=self.device.type == "cuda")
        self.dtype = compute_dtype(c, self.device)
        if self.dtype != c.dtype:
            print(f"this GPU has no bfloat16: training in {self.dtype} with a gradient scaler")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == "float16")
        self.data_rng = torch.Generator().manual_seed(c.seed)
        torch.manual_seed(c.seed + self.dist.rank)  # the global generator: dropout's draws (LoRA)
        self.step, self.best_val, self.tokens_seen = 0, math.inf, 0
        self.pending = []  # the mean losses of the steps since the last read, on the device
        if resume and (self.run_dir / "ckpt.pt").exists():
            self._restore(self.run_dir / "ckpt.pt")
        self.data_state = self._data_state()  # after the last micro-batch trained on
        self.prefetcher = None  # started by the first step
        self.forward_model = self.model
        if c.compile and self.device.type == "cuda":  # on a CPU, compiling costs more than it saves
            trial = torch.zeros(c.batch_size, c.max_seq_len, dtype=torch.long, device=self.device)
            self.forward_model = compiled(self.model, trial, self.dtype)
        if self.dist.enabled:
            self.forward_model = torch.nn.parallel.DistributedDataParallel(
                self.forward_model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _attach_lora(self, rows: list[int]) -> dict:
        """Freezes the model and adds the config's adapters; what the run records of them and its base."""
        c = self.c
        base = Path(c.init_from) / "ckpt.pt"
        apply_lora(self.model, c.lora_rank, c.lora_alpha, c.lora_dropout, c.lora_target_list, rows,
                   torch.Generator().manual_seed(c.seed))
        trained = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters() if not p.requires_grad)  # the model's own
        if self.dist.main:
            also = f" and the rows of token ids {rows}" if rows else ""
            print(f"LoRA rank {c.lora_rank} on {c.lora_targets}{also}: {trained:,} trainable parameters "
                  f"of {total:,} ({trained / total:.1%}), the rest frozen")
        return {"rank": c.lora_rank, "alpha": c.lora_alpha, "dropout": c.lora_dropout, "targets": c.lora_target_list,
                "rows": rows, "trainable_parameters": trained, "base_run": c.init_from,
                "base_ckpt": os.path.relpath(base.resolve(), self.run_dir.resolve()), "base_sha256": sha256_file(base)}

    def _restore(self, path: Path) -> None:
        state = read_checkpoint(path)
        if state["tokenizer_sha256"] != self.tokenizer_sha256:
            raise UserError(f"{path} was trained with another tokenizer; start a new out_dir")
        saved, lora = state["run_info"].get("lora"), self.run_info.get("lora")
        if bool(saved) != bool(lora):
            raise UserError(f"{path} holds {'LoRA adapters' if saved else 'a fully trained model'}, the config asks "
                            f"for lora_rank = {self.c.lora_rank}: resume as it began, or start a new out_dir")
        if lora:
            if saved["base_sha256"] != lora["base_sha256"]:
                raise UserError(f"{path}: its LoRA base {self.c.init_from}/ckpt.pt has changed since the run began "
                                f"(sha256 {saved['base_sha256'][:12]}..., now {lora['base_sha256'][:12]}...); "
                                "restore that base or start a new out_dir")
            changed = [k for k in ("rank", "alpha", "targets", "rows") if saved[k] != lora[k]]
            if changed:
                raise UserError(f"{path}: LoRA {changed[0]} was {saved[changed[0]]}, the config says "
                                f"{lora[changed[0]]}: resume as it began, or start a new out_dir")
            load_lora_state_dict(self.model, {k: v.to(self.device) for k, v in state["model"].items()})
        else:
            self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"]["adamw"])
        self.scaler.load_state_dict(state["optimizer"]["scaler"])
        self._set_data_state({"rng": state["optimizer"]["data_rng"], "data": state["optimizer"].get("data")})
        if "torch_rng" in state["optimizer"]:  # dropout's draws (LoRA)
            torch.set_rng_state(state["optimizer"]["torch_rng"])
            if self.device.type == "cuda" and state["optimizer"].get("cuda_rng") is not None:
                torch.cuda.set_rng_state(state["optimizer"]["cuda_rng"], self.device)
        self.step = state["step"]
        self.best_val = state["optimizer"]["best_val"]
        self._forget_metrics_after(self.step)

    def _forget_metrics_after(self, step: int) -> None:
        """Drops metrics logged after the checkpoint (a crash between the two): no step twice."""
        path = self.run_dir / "metrics.jsonl"
        if self.dist.main and path.exists():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line)["step"] <= step]
            with atomic_output(path) as tmp:
                tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def _data_state(self) -> dict:
        """The data generator's state, and a mix's counts: where the draws stand."""
        return {"rng": self.data_rng.get_state(),
                "data": self.data.state_dict() if isinstance(self.data, Mixture) else None}

    def _set_data_state(self, state: dict) -> None:
        self.data_rng.set_state(state["rng"])
        if isinstance(self.data, Mixture) and state["data"] is not None:  # older runs: counted from here
            self.data.load_state_dict(state["data"])

    def save(self, name: str = "ckpt.pt") -> None:
        """Saves the run (on the main process); refuses weights that are not finite (a NaN or infinite
        loss since the last read reaches them at the step's update), so no checkpoint ever holds them."""
        if not self.dist.main:
            return
        trained = [p for p in self.model.parameters() if p.requires_grad]
        if not torch.stack([p.isfinite().all() for p in trained]).all():
            for i, loss in enumerate(torch.stack(self.pending).tolist() if self.pending else []):
                if not math.isfinite(loss):
                    raise self._non_finite(loss, self.step - len(self.pending) + i)
            raise NonFiniteLoss(f"the weights are not finite at step {self.step}; stopped, {self.run_dir / 'ckpt.pt'} "
                                "holds the last good state (try a lower learning_rate, or dtype = bfloat16)")
        training_state = {"adamw": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                          "data_rng": self.data_state["rng"], "data": self.data_state["data"],
                          "torch_rng": torch.get_rng_state(),
                          "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
                          "best_val": self.best_val}
        save_checkpoint(self.run_dir / name, self.model, config=asdict(self.c),
                        tokenizer_sha256=self.tokenizer_sha256, step=self.step, optimizer=training_state,
                        run_info=self.run_info)

    def micro_batch(self, split: str, rng: torch.Generator, data=None):
        batch = (data or self.data).batch(split, self.c.batch_size, self.c.max_seq_len, rng, self.dist.rank,
                                          self.dist.world)
        return tuple(t if t is None else t.to(self.device, non_blocking=True) for t in batch)

    def next_batch(self):
        """The next training micro-batch, on the device, from the prefetching thread."""
        if self.prefetcher is None:
            c, dist = self.c, self.dist
            self.prefetcher = Prefetcher(
                lambda: self.data.batch("train", c.batch_size, c.max_seq_len, self.data_rng, dist.rank, dist.world),
                self._data_state, pin=self.device.type == "cuda")
        batch, self.data_state = self.prefetcher.next()
        return tuple(t if t is None else t.to(self.device, non_blocking=True) for t in batch)

    def close(self) -> None:
        """Stops the prefetching thread; the data generator is put back after the last batch trained on."""
        if self.prefetcher is not None:
            self.prefetcher.close()
            self.prefetcher = None
            self._set_data_state(self.data_state)

    def batch_tokens(self, batch) -> int:
        """The tokens a micro-batch puts through the model (its inputs)."""
        return batch[0].numel()

    def reported(self, split: str) -> dict:
        """What a stage reports beside its loss, over its batches of split since the last call (dpo: rewards)."""
        return {}

    def loss(self, x, y, segments=None, model=None) -> torch.Tensor:
        """Mean cross-entropy over the targets that are trained on (not -1)."""
        with autocast_context(self.dtype, self.device):
            return (model or self.forward_model)(x, segments=segments, targets=y)

    @torch.no_grad()
    def estimate_val_loss(self) -> dict[str, float]:
        """{"val_loss": mean loss over eval_iters fixed val batches (the same ones at every evaluation)}; for a
        mix of datasets, each one's too ("val_loss/NAME", eval_iters batches of it) and val_loss their weighted mean."""
        self.model.eval()
        if isinstance(self.data, Mixture) and len(self.data.parts) > 1:
            losses = {f"val_loss/{name}": self._mean_val_loss(part) for name, part in zip(self.data.names,
                                                                                      self.data.parts, strict=True)}
            losses = {"val_loss": sum(w * loss for w, loss in zip(self.data.weights, losses.values(), strict=True)),
                      **losses}
        else:
            losses = {"val_loss": self._mean_val_loss(self.data)}
        self.model.train()
        return losses

    def _mean_val_loss(self, data) -> float:
        rng = torch.Generator().manual_seed(self.c.seed + 1)
        losses = [self.loss(*self.micro_batch("val", rng, data), model=self.model) for _ in range(self.c.eval_iters)]
        return torch.stack(losses).mean().item()

    def train_step(self) -> torch.Tensor:
        """One optimizer step over grad_accum micro-batches; returns this process's mean loss, a tensor on
        the device that nothing waits for (read_losses reads the steps' losses together)."""
        lr = learning_rate(self.step, self.c)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.device)
        for micro in range(self.c.grad_accum):
            batch = self.next_batch()
            self.tokens_seen += self.batch_tokens(batch) * self.dist.world
            last = micro == self.c.grad_accum - 1
            sync = self.forward_model.no_sync() if self.dist.enabled and not last else nullcontext()
            with sync:
                loss = self.loss(*batch)
                self.scaler.scale(loss / self.c.grad_accum).backward()
            total += loss.detach()
        mean = total / self.c.grad_accum
        self.pending.append(mean)
        if self.c.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.c.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return mean

    def _non_finite(self, loss: float, step: int) -> NonFiniteLoss:
        return NonFiniteLoss(f"loss became {loss} at step {step}; stopped, {self.run_dir / 'ckpt.pt'} "
                             "holds the last good state (try a lower learning_rate, or dtype = bfloat16)")

    def read_losses(self) -> list[float]:
        """The mean losses (over all processes) of the steps since the last read: the loop's one wait for
        the device. Raises NonFiniteLoss at the first that is NaN or infinite."""
        if not self.pending:
            return []
        losses = self.dist.average(torch.stack(self.pending)).tolist()
        for i, loss in enumerate(losses):
            if not math.isfinite(loss):  # kept pending: a save after this names the same step
                raise self._non_finite(loss, self.step - len(losses) + i)
        self.pending = []
        return losses

    def epochs(self) -> dict[str, float]:
        """A mix's epochs per dataset as of the last micro-batch trained on (other data: none)."""
        return self.data.epochs(self.data_state["data"]["drawn"]) if isinstance(self.data, Mixture) else {}

    def log(self, record: dict) -> None:
        if self.dist.main:
            with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def run(self) -> None:
        """Trains to max_iters; on Ctrl-C finishes the step in flight, saves, raises KeyboardInterrupt."""
        c = self.c
        flops, peak = flops_per_token(self.model), peak_flops(self.device)
        interrupted = []
        previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
        bar = tqdm(total=c.max_iters, initial=self.step, unit="step", desc="train", disable=not self.dist.main)
        started, self.tokens_seen, loss = time.perf_counter(), 0, math.nan
        try:
            while self.step < c.max_iters and not interrupted:
                self.train_step()
                bar.update()
                if self.step % c.log_interval == 0 or self.step == c.max_iters:
                    loss = self.read_losses()[-1]
                    rate = self.tokens_seen / (time.perf_counter() - started)
                    speed = {"tokens_per_s": rate, **({"mfu": rate * flops / peak} if peak else {})}
                    extra = self.reported("train")
                    epochs = self.epochs()
                    shown = {"epochs": " ".join(f"{n}:{e:.2f}" for n, e in epochs.items())} if epochs else {}
                    bar.set_postfix(loss=f"{loss:.3f}", **{k: f"{v:.3f}" for k, v in extra.items()},
                                    tok_s=f"{rate:,.0f}", **({"mfu": f"{speed['mfu']:.1%}"} if peak else {}), **shown)
                    self.log({"step": self.step, "loss": loss, "lr": learning_rate(self.step - 1, c), **speed,
                              **{f"epochs/{n}": e for n, e in epochs.items()}, **extra})
                    started, self.tokens_seen = time.perf_counter(), 0
                if self.step % c.eval_interval == 0 or self.step == c.max_iters:
                    loss = (self.read_losses() or [loss])[-1]  # nothing left to read after a log at this step
                    extra = self.estimate_val_loss()
                    val = extra.pop("val_loss")
                    extra.update({f"val_{k}": v for k, v in self.reported("val").items()})
                    self.log({"step": self.step, "val_loss": val, **extra})
                    bar.write(f"step {self.step}: train loss {loss:.4f}, val loss {val:.4f}"
                              + "".join(f", {k} {v:.3f}" for k, v in extra.items()))
                    if val < self.best_val:
                        self.best_val = val
                        self.save("best.pt")
                    self.save()
            self.read_losses()
        finally:
            bar.close()
            signal.signal(signal.SIGINT, previous)
            self.close()
        self.save()
        if interrupted:
            raise KeyboardInterrupt


# Dense bf16 peak FLOP/s of known GPUs, by a part of the name CUDA gives (the first match wins).
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("B200", 2250e12),
             ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("RTX 4090", 165e12),
             ("RTX 3090", 71e12))


def known_peak_flops(name: str) -> float | None:
    return next((flops for key, flops in PEAK_BF16 if key in name), None)


def measured_peak_flops(device: torch.device, n: int = 4096, dtype: torch.dtype = torch.bfloat16) -> float:
    """FLOP/s of an n x n matmul in dtype on device, measured."""
    generator = torch.Generator(device).manual_seed(0)  # not the global one
    a = torch.rand(n, n, device=device, generator=generator).to(dtype)
    (a @ a).sum().item()  # warm up
    start = time.perf_counter()
    for _ in range(8):
        b = a @ a
    b.sum().item()
    return 8 * 2 * n**3 / (time.perf_counter() - start)


def peak_flops(device: torch.device) -> float | None:
    """The yardstick of MFU: the GPU's dense bf16 peak, from the table or else measured; None on a CPU,
    whose speed is reported in tokens/s only."""
    if device.type != "cuda":
        return None
    return known_peak_flops(torch.cuda.get_device_name(device)) or measured_peak_flops(device)


def flops_per_token(model: Transformer) -> float:
    """Training FLOPs per token: 6 per parameter (forward and backward) plus attention's 12 * layers *
    dim * context (PaLM's appendix B; the causal mask's skipped half is counted, as is usual)."""
    a = model.args
    return 6 * sum(p.numel() for p in model.parameters()) + 12 * a.n_layers * a.dim * a.max_seq_len


def finish_run(run_dir: Path, tokenizer_model: Path) -> None:
    """What a finished run directory holds beside ckpt.pt: the tokenizer, model.bin, loss.png."""
    from llama2zh.export import write_model_bin
    from llama2zh.vocab.export import export_tokenizer

    if tokenizer_model != run_dir / "tokenizer.model":
        with atomic_output(run_dir / "tokenizer.model") as tmp:
            shutil.copyfile(tokenizer_model, tmp)
    export_tokenizer(run_dir / "tokenizer.model", run_dir / "tokenizer.bin")
    model, _ = load_checkpoint(run_dir / "ckpt.pt")
    write_model_bin(model, run_dir / "model.bin", version=1)
    plot_losses(run_dir)


def plot_losses(run_dir: Path) -> None:
    """loss.png from metrics.jsonl; skipped with a message when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("loss.png skipped: install matplotlib (pip install 'llama2zh[plot]') to draw it")
        return
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    for points, label in ((train, "train"), (val, "val")):
        if points:
            ax.plot(*zip(*points, strict=True), label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(run_dir.name)
    ax.legend()
    with atomic_output(run_dir / "loss.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def run_stage(config: Config, trainer: Trainer, tokenizer_model: Path) -> Path:
    """Trains, then completes the run directory (on the main process)."""
    run_dir = Path(config.out_dir)
    if trainer.dist.main:
        with atomic_output(run_dir / "config.toml") as tmp:
            tmp.write_text(config.to_toml(), encoding="utf-8")
    try:
        trainer.run()
    finally:
        trainer.dist.close()
    if trainer.dist.main:
        finish_run(run_dir, tokenizer_model)
    return run_dir


def pretraining_trainer(config: Config, resume: bool) -> Trainer:
    """Pretraining: a new model on the token shards made with TOKENIZER of DATASET, or of the MIX's datasets."""
    c = config
    tokenizer_dir = Path(c.tokenizer)
    data = open_mixture(c.datasets, tokenizer_dir, c.lang)
    tokenizer_sha256 = sha256_file(tokenizer_dir / "tokenizer.model")
    torch.manual_seed(c.seed)
    model = Transformer(c.model_args(data.vocab_size))
    model.init_weights(torch.Generator().manual_seed(c.seed))
    run_info = {"stage": "pretrain"}
    if c.init_from:  # continued pretraining: the weights of a run with this tokenizer, the config's shape
        base, state = load_checkpoint(Path(c.init_from) / "ckpt.pt")
        if state["tokenizer_sha256"] != tokenizer_sha256:
            raise UserError(f"init_from {c.init_from} was trained with another tokenizer than {tokenizer_dir}")
        if replace(base.args, max_seq_len=c.max_seq_len) != model.args:
            raise UserError(f"init_from {c.init_from} has another shape than the config ({base.args})")
        model = base.extended(max_seq_len=c.max_seq_len)
        run_info.update(base_run=c.init_from, base_step=state["step"])
    return Trainer(c, data, model, tokenizer_sha256, resume, run_info)


def train(config: Config, resume: bool = True) -> Path:
    return run_stage(config, pretraining_trainer(config, resume), Path(config.tokenizer) / "tokenizer.model")
