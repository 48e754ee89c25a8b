"""SimMIM pretraining.

    python pretrain.py --model swin_tiny --epochs 50             # the bundled demo images, one process (CPU or GPU)
    torchrun --nproc_per_node 8 pretrain.py --model swin_base --data-path /data/imagenet/train

Defaults are the paper's Swin-B recipe: 192px, window 6, 100 epochs, lr 2e-4 per 512 images. The run machinery here
(distributed setup, optimizer, AMP step, checkpoints, logging) is shared with finetune.py.
"""
import argparse
import ctypes
import datetime
import errno
import fcntl
import inspect
import itertools
import json
import math
import os
import platform
import re
import resource
import signal
import sys
import time
import warnings
import zlib
from contextlib import nullcontext

import numpy as np
import timm
import torch
import torch.distributed as dist
import torchvision
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler
from torch.nn.parallel import DistributedDataParallel

import data
import models

# A 1x1 conv's weight gradient on CPU has other strides on its size-1 dims than DDP's bucket: the same memory layout,
# so DDP's warning about it says nothing
warnings.filterwarnings('ignore', message='Grad strides do not match bucket view strides')
DEMO_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'demo')


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None (the help text says what happens) and switches."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def at_least(low, kind=int):
    """An argparse type: a number >= low; anything else is argparse's one-line error naming the flag."""
    def parse(text):
        value = kind(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse says "invalid int value: 'x'" for what is no number at all
    return parse


COUNT, SIZE, AMOUNT = at_least(0), at_least(1), at_least(0, float)


def get_args_parser():
    p = argparse.ArgumentParser('SimMIM pretraining', formatter_class=HelpFormatter)
    g = p.add_argument_group('model')
    g.add_argument('--model', default=None, choices=list(models.MODELS),
                   help="encoder (default: --pretrained's, else swin_base)")
    g.add_argument('--img-size', type=SIZE, default=None, help='input size in pixels (default: 192 Swin, 224 ViT)')
    add_arch_args(g)
    g.add_argument('--use-checkpoint', action='store_true', help='activation checkpointing: less memory, ~25%% slower')
    g.add_argument('--pretrained', default=None,
                   help='continue pretraining from these weights (any supported layout; the decoder too if present)')

    g = p.add_argument_group('masking')
    g.add_argument('--mask-patch-size', type=SIZE, default=32, help='side of a masked square, pixels')
    g.add_argument('--mask-ratio', type=float, default=0.6, help='fraction of masked squares')
    g.add_argument('--norm-target-window', type=COUNT, default=0,
                   help='regress pixels normalised over this odd window (SwinV2 configs: 47); 0 = raw pixels')

    g = p.add_argument_group('data')
    g.add_argument('--data-path', default=None,
                   help='folder of images, searched recursively (labels unused); default: the bundled demo/ images')
    g.add_argument('--batch-size', type=SIZE, default=128, help='images per GPU (per process) and micro-step')
    g.add_argument('--num-workers', type=COUNT, default=8, help='data loading processes per GPU')
    g.add_argument('--mean', type=float, nargs='+', default=None, help='per-channel mean (default: ImageNet)')
    g.add_argument('--std', type=float, nargs='+', default=None, help='per-channel std (default: ImageNet)')

    add_optim_args(p, epochs=100, warmup_epochs=10, base_lr=2e-4, warmup_lr=1e-6, min_lr=1e-5)
    add_run_args(p, output='output/simmim_pretrain', compile='auto')
    return p


def add_arch_args(g):
    """Architecture overrides shared with finetune.py; unset ones keep the named model's value."""
    g.add_argument('--window-size', type=SIZE, default=None, help='Swin window (default: img size / 32, Swin-L / 16)')
    g.add_argument('--patch-size', type=SIZE, default=None, help='model patch size (default: Swin 4, ViT 16)')
    g.add_argument('--embed-dim', type=SIZE, default=None, help="width of the first stage (default: the model's)")
    g.add_argument('--depths', type=SIZE, nargs='+', default=None,
                   help="blocks per stage, ViT: one number (default: the model's)")
    g.add_argument('--num-heads', type=SIZE, nargs='+', default=None,
                   help="heads per stage, ViT: one number (default: the model's)")
    g.add_argument('--in-chans', type=SIZE, default=None, help='image channels: 3 (RGB, default) or 1 (grayscale)')
    g.add_argument('--drop-path', type=AMOUNT, default=None, help='stochastic depth (default: the official config)')


def arch_overrides(args):
    vit = models.MODELS[args.model]['family'] == models.VIT
    for flag in ('depths', 'num_heads'):
        value = getattr(args, flag)
        if vit and value is not None and len(value) != 1:
            raise ValueError(f"--{flag.replace('_', '-')} takes one number for ViT models, got {value}")
    return dict(window_size=args.window_size, patch_size=args.patch_size, embed_dim=args.embed_dim,
                in_chans=args.in_chans, drop_path_rate=args.drop_path,
                **({'depth': args.depths and args.depths[0], 'num_heads': args.num_heads and args.num_heads[0]}
                   if vit else {'depths': args.depths and tuple(args.depths),
                                'num_heads': args.num_heads and tuple(args.num_heads)}))


def add_optim_args(p, epochs, warmup_epochs, base_lr, warmup_lr, min_lr):
    g = p.add_argument_group('optimization (learning rates are per 512 images: lr x effective batch / 512)')
    g.add_argument('--epochs', type=SIZE, default=epochs)
    g.add_argument('--warmup-epochs', type=COUNT, default=warmup_epochs, help='linear warmup from --warmup-lr')
    g.add_argument('--base-lr', type=AMOUNT, default=base_lr, help='peak lr per 512 images')
    g.add_argument('--warmup-lr', type=AMOUNT, default=warmup_lr, help='lr at step 0, per 512 images')
    g.add_argument('--min-lr', type=AMOUNT, default=min_lr, help='final cosine lr, per 512 images')
    g.add_argument('--lr-scheduler', default='cosine', choices=['cosine', 'multistep'],
                   help='cosine to --min-lr, or x --gamma at each of --multisteps; both step every iteration')
    g.add_argument('--multisteps', type=COUNT, nargs='*', default=[], help='multistep milestones, in epochs')
    g.add_argument('--gamma', type=AMOUNT, default=0.1, help='multistep decay factor')
    g.add_argument('--weight-decay', type=AMOUNT, default=0.05,
                   help='AdamW; not on norms, biases and the official exemptions (README: Fidelity)')
    g.add_argument('--accumulation-steps', type=SIZE, default=1, help='micro-batches per optimizer step')
    g.add_argument('--clip-grad', type=AMOUNT, default=5.0, help='max gradient norm; 0 = no clipping')
    g.add_argument('--amp', default=None, choices=['bf16', 'fp16', 'off'],
                   help='autocast dtype; fp16 uses a gradient scaler (default: bf16 where the device computes it '
                        'natively: recent GPUs, CPUs with AVX512-BF16 or AMX; else fp16 on GPUs, off on CPUs)')
    g.add_argument('--max-nonfinite', type=SIZE, default=20,
                   help='abort after this many consecutive steps with a non-finite loss or gradient')


def add_run_args(p, output, compile):
    g = p.add_argument_group('run')
    g.add_argument('--compile', default=compile, choices=['auto', 'on', 'off'],
                   help='torch.compile the training forward and backward (the first step compiles for a minute or '
                        'two); auto = on GPUs, where it was measured faster; off = eager')
    g.add_argument('--output', default=output, help='folder for checkpoints, logs and pictures')
    g.add_argument('--resume', default=None, help='checkpoint to resume from (default: OUTPUT/checkpoint.pth if any)')
    g.add_argument('--accept-changes', action='store_true',
                   help='resume although optimization flags differ from the checkpoint\'s (e.g. more --epochs): the '
                        'schedule from the resumed step on is the new one')
    g.add_argument('--no-auto-resume', dest='auto_resume', action='store_false',
                   help='start afresh even if OUTPUT holds a checkpoint (by default the run continues from it)')
    g.add_argument('--save-freq', type=SIZE, default=5, help='keep a numbered checkpoint every this many epochs')
    g.add_argument('--save-steps', type=COUNT, default=0,
                   help='also update checkpoint.pth every this many steps inside an epoch (resumed exactly); 0 = off')
    g.add_argument('--dist-timeout', type=at_least(0.1, float), default=30,
                   help='minutes a collective waits for a dead or hung rank before the run stops with an error')
    g.add_argument('--print-freq', type=SIZE, default=100, help='log every this many optimizer steps')
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('--device', default=None, help='cuda or cpu (default: cuda when available)')
    g.add_argument('--allow-pickle', action='store_true',
                   help='load checkpoints holding pickled objects (official SimMIM ones hold their yacs config): this '
                        'runs code from the file, use it only for files you trust')


# ---------------------------------------------------------------------------------------------------------------------
# Run machinery, shared with finetune.py

class Run:
    """Distributed state from torchrun's environment (or a single process), the device and rank-0 logging."""

    def __init__(self, args):
        # torchrun sets RANK and WORLD_SIZE: then the run is distributed, with one process too (one code path)
        self.distributed = 'RANK' in os.environ and 'WORLD_SIZE' in os.environ
        self.world_size = int(os.environ['WORLD_SIZE']) if self.distributed else 1
        self.rank = int(os.environ['RANK']) if self.distributed else 0
        self.local_rank = int(os.environ.get('LOCAL_RANK', 0))
        if args.device is not None and not re.fullmatch(r'cpu|cuda(:\d+)?', args.device):
            raise SystemExit(f"error: --device '{args.device}': use cuda, cuda:N or cpu")
        if args.device is not None and args.device.startswith('cuda') and not torch.cuda.is_available():
            raise SystemExit("error: --device cuda, but torch sees no GPU here; use --device cpu or a CUDA build of "
                             "torch on a machine with a GPU")
        cuda = torch.cuda.is_available() if args.device is None else args.device.startswith('cuda')
        self.device = torch.device(f'cuda:{self.local_rank}' if cuda else 'cpu')
        if cuda:
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = True  # fixed input sizes: the patch embedding's fastest convolution
        if self.distributed:
            dist.init_process_group('nccl' if cuda else 'gloo', timeout=datetime.timedelta(minutes=args.dist_timeout))
        self.main = self.rank == 0
        self.output = args.output
        self.sigterm = False  # schedulers send SIGTERM before preemption: save and stop after the current step
        self.stopping = False  # what stop_requested() last said, the same on every rank
        self.training = False  # in the training loop, where a SIGTERM saves and stops after the step
        # the SIGTERM flag all ranks reduce: on the device, and its copy on the host (pinned, so copied without a wait)
        self.flag = torch.zeros((), device=self.device)
        self.flag_host = torch.zeros((), pin_memory=cuda)
        self.flag_copied = None  # a CUDA event: the last reduced flag is in flag_host
        self.previous_handler = signal.signal(signal.SIGTERM, self.on_sigterm)

    def on_sigterm(self, *_):
        if not self.training:  # before the loop there is nothing to save: stop now
            raise SystemExit("SIGTERM before training started: stopped; nothing was trained or saved")
        self.sigterm = True

    def stop_requested(self):
        """Whether any rank got SIGTERM; all ranks stop after the same step. Distributed, each step's flag is reduced
        on the device and read on the host one step later, once the device got there: the check never waits for the
        step in flight, so a SIGTERM takes effect one step later than in a single process."""
        if not self.distributed:
            self.stopping = self.sigterm
            return self.stopping
        if self.flag_copied is not None:
            self.flag_copied.synchronize()  # the device is past the last step's reduction: no wait for this step
        self.stopping = bool(self.flag_host)  # the flag reduced one step ago
        self.flag.fill_(float(self.sigterm))  # the value travels as a kernel argument: no copy that waits
        dist.all_reduce(self.flag, op=dist.ReduceOp.MAX)  # NCCL: the stream waits, not the host
        self.flag_host.copy_(self.flag, non_blocking=True)
        if self.device.type == 'cuda':
            self.flag_copied = torch.cuda.Event()
            self.flag_copied.record()
        return self.stopping

    def print(self, *msg):
        if self.main:
            print(f"[{datetime.datetime.now():%Y-%m-%d %H:%M:%S}]", *msg, flush=True)

    def log(self, record):
        """One JSON line in OUTPUT/log.jsonl (rank 0)."""
        if self.main:
            with open(os.path.join(self.output, 'log.jsonl'), 'a') as f:
                f.write(json.dumps(record) + '\n')

    def mean(self, *values):
        """Average python numbers over all ranks."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.distributed:
            dist.all_reduce(t)
            t /= self.world_size
        return t.tolist()

    def wrap(self, model):
        """DistributedDataParallel when distributed (its buckets hold the gradients: no extra copy). Buffers are not
        re-broadcast before each forward: the models' buffers (Swin's window masks and position indices) are
        constants, the same on every rank."""
        if not self.distributed:
            return model
        switch = 'forward_sync_buffers'  # torch >= 2.14; earlier: broadcast_buffers
        if switch not in inspect.signature(DistributedDataParallel).parameters:
            switch = 'broadcast_buffers'
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == 'cuda' else None,
                                       gradient_as_bucket_view=True, **{switch: False})

    def compile(self, model, when):
        """torch.compile(model) if when is 'on', or 'auto' on a GPU; compiled after the DDP wrapper, so that DDP's
        gradient reductions still overlap the backward."""
        if when == 'on' or when == 'auto' and self.device.type == 'cuda':
            self.print("torch.compile: the first step compiles the model (a minute or two); --compile off runs eager")
            return torch.compile(model)
        return model

    def fail_on_lost_peer(self, error):
        """A collective that failed because another rank died or hung (--dist-timeout): one line, not a traceback."""
        lost = ('Timed out', 'timed out', 'Connection closed by peer', 'Connection reset by peer', 'NCCL')
        if self.distributed and any(s in str(error) for s in lost):
            raise SystemExit(f"error: rank {self.rank}: another process of this run died or stopped responding "
                             f"({str(error).splitlines()[0][:200]}); rerun the same command to resume from the last "
                             f"checkpoint") from None
        raise error

    def close(self):
        if not self.sigterm:  # once signalled, a second SIGTERM during the exit must not kill the stopping process
            signal.signal(signal.SIGTERM, self.previous_handler)
        if getattr(self, 'lock', None):
            self.lock.close()
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def tune_cpu():
    """Two process-wide CPU settings; call before any parallel CPU op (the compute threads copy the first when they
    start). Each measured on a swin_base fp32 step at batch 8 (2 cores):
    - flush float32 denormals (below 1.2e-38) to zero: Swin's shifted-window mask (-100) makes softmax probabilities
      of about 4e-44, which slow matrix products tenfold (the attention products: 0.36 s -> 0.11 s per step);
    - glibc keeps freed memory for reuse instead of unmapping every large tensor when it is freed and faulting it in
      again on the next step (121,000 page faults and 0.6 s of kernel time per step -> none). No-op elsewhere."""
    torch.set_flush_denormal(True)
    try:
        libc = ctypes.CDLL('libc.so.6')
    except OSError:  # not glibc (macOS, musl)
        return
    libc.mallopt(-4, 0)  # M_MMAP_MAX: no allocation gets its own mapping
    libc.mallopt(-1, 2 ** 31 - 1)  # M_TRIM_THRESHOLD: keep up to 2 GB of free heap top


def launch(body, args):
    """body(args, run) in a Run that is always closed; a lost rank or Ctrl-C ends in one line."""
    tune_cpu()
    run = Run(args)
    try:
        body(args, run)
    except RuntimeError as e:
        run.fail_on_lost_peer(e)
    except KeyboardInterrupt:
        if not run.training:
            raise SystemExit("interrupted (Ctrl-C) before training started: nothing was trained") from None
        raise SystemExit(f"interrupted (Ctrl-C): the checkpoints in {args.output} are whole; rerun the same command "
                         f"to resume from the last one") from None
    finally:
        run.close()


def autocast(amp, device):
    """--amp resolved for the device (bf16 where native, else fp16 on GPU, off on CPU) and its autocast context."""
    if amp is None and device.type == 'cuda':
        amp = 'bf16' if torch.cuda.is_bf16_supported() else 'fp16'
    elif amp is None:
        native = [getattr(torch.cpu, f, lambda: False)() for f in ('_is_avx512_bf16_supported', '_is_amx_tile_supported')]
        amp = 'bf16' if any(native) else 'off'
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(amp)
    return amp, torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


# What the official code does not decay, besides 1-D parameters and biases: a name (module or parameter) in the path.
# In pretraining microsoft/SimMIM exempts Swin's mask token (its table keyword never matches a name, so the relative
# position tables are decayed) and ViT's cls token (the mask token and the shared table are decayed); in fine-tuning
# Swin's tables and ViT's cls token. SwinV2 (microsoft/Swin-Transformer): its keywords, tables, cpb_mlp, logit_scale.
NO_DECAY = {
    (models.SWIN, True): {'mask_token', 'absolute_pos_embed'},
    (models.SWIN, False): {'relative_position_bias_table', 'absolute_pos_embed'},
    (models.VIT, True): {'cls_token', 'pos_embed'},
    (models.VIT, False): {'cls_token', 'pos_embed'},
    (models.SWINV2, True): {'mask_token', 'absolute_pos_embed', 'relative_position_bias_table', 'cpb_mlp',
                            'logit_scale'},
    (models.SWINV2, False): {'absolute_pos_embed', 'relative_position_bias_table', 'cpb_mlp', 'logit_scale'},
}


def build_optimizer(model, args, lr_scales=None):
    """AdamW with the official weight-decay set (NO_DECAY) of a SimMIM model (pretraining) or a classifier.
    lr_scales (optional) maps a parameter name to its layer-wise lr multiplier."""
    exempt = NO_DECAY[models.MODELS[args.model]['family'], isinstance(model, models.SimMIM)]
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith('.bias') or not exempt.isdisjoint(name.split('.'))
        scale = lr_scales(name) if lr_scales else 1.0
        group = groups.setdefault((no_decay, scale), dict(params=[], weight_decay=0. if no_decay else args.weight_decay,
                                                          lr_scale=scale))
        group['params'].append(p)
    # fused: one kernel per step for the whole update, and it can skip a step on the device (Trainer.step)
    return torch.optim.AdamW(list(groups.values()), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, fused=True)


def build_scheduler(optimizer, args, steps_per_epoch):
    """Per-step schedule (timm's, stepped with step_update): linear warmup from warmup lr, then cosine from step 0 to
    min lr (the official settings), or multistep. timm applies each group's lr_scale."""
    warmup = dict(warmup_t=args.warmup_epochs * steps_per_epoch, warmup_lr_init=args.warmup_lr_scaled,
                  warmup_prefix=False, t_in_epochs=False)  # schedule positions count from step 0, warmup included
    if args.lr_scheduler == 'cosine':
        return CosineLRScheduler(optimizer, t_initial=args.epochs * steps_per_epoch, lr_min=args.min_lr_scaled,
                                 cycle_limit=1, **warmup)
    # timm decays at milestone - 1; the official scheduler at the milestone itself
    return MultiStepLRScheduler(optimizer, decay_t=[m * steps_per_epoch + 1 for m in args.multisteps],
                                decay_rate=args.gamma, **warmup)


def scale_lrs(args, run, loader):
    """The lr scaling rule (lrs are per 512 images) and the optimizer steps per epoch. -> a line describing both."""
    args.steps_per_epoch = len(loader) // args.accumulation_steps
    if args.steps_per_epoch == 0:
        raise ValueError(f"{len(loader.dataset)} images make no full step of {args.batch_size} images x "
                         f"{args.accumulation_steps} accumulation steps on each of {run.world_size} processes; "
                         f"lower --batch-size or add images")
    args.effective_batch = args.batch_size * run.world_size * args.accumulation_steps
    args.lr = args.base_lr * args.effective_batch / 512
    args.warmup_lr_scaled = args.warmup_lr * args.effective_batch / 512
    args.min_lr_scaled = args.min_lr * args.effective_batch / 512
    return (f"world size {run.world_size} x batch {args.batch_size} x accumulation {args.accumulation_steps} = "
            f"effective batch {args.effective_batch}; {args.steps_per_epoch} steps per epoch; lr {args.lr:.3g} "
            f"(= {args.base_lr:g} x {args.effective_batch} / 512), warmup lr {args.warmup_lr_scaled:.3g}, "
            f"min lr {args.min_lr_scaled:.3g}")


class Trainer:
    """The training step: autocast, accumulation without gradient all-reduce on micro-steps, unscale, clip, skip and
    count non-finite steps, lr per step. Nothing in it waits for the device."""

    def __init__(self, model, optimizer, scheduler, args, run):
        self.model, self.optimizer, self.scheduler, self.args, self.run = model, optimizer, scheduler, args, run
        self.amp, self.autocast = autocast(args.amp, run.device)
        self.scaler = torch.amp.GradScaler(run.device.type, enabled=self.amp == 'fp16')
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.nonfinite = torch.zeros(3, device=run.device)  # skipped steps: current run, longest run, total
        self.steps_run = 0  # by this process

    def step(self, step, micro_batches, loss_fn):
        """One optimizer step over micro_batches; loss_fn(batch) -> scalar loss. -> (mean loss, grad norm) tensors."""
        # As the official loop, which sets the lr of step k + 1 after step k: steps 0 and 1 run at the warmup lr
        self.scheduler.step_update(max(step - 1, 0))
        accum = len(micro_batches)
        total = 0.
        for i, batch in enumerate(micro_batches):
            sync = i == accum - 1 or not self.run.distributed
            with nullcontext() if sync else self.model.no_sync():
                with self.autocast:
                    loss = loss_fn(batch)
                self.scaler.scale(loss / accum).backward()
            total += loss.detach()
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.args.clip_grad or math.inf)
        # a non-finite loss counts too (its gradients can be finite); the same on all ranks once reduced
        bad = (~torch.isfinite(grad_norm + total)).float()
        if self.run.distributed:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        # The fused optimizer skips the update on the device when found_inf is 1 (the protocol GradScaler uses), so
        # no step waits for this check; check_nonfinite() reads the counts when logging.
        self.optimizer.found_inf = bad
        self.optimizer.step()
        del self.optimizer.found_inf
        self.scaler.update()  # fp16: lower the loss scale after an overflow (found by unscale_)
        streak = (self.nonfinite[0] + bad) * bad
        self.nonfinite = torch.stack((streak, torch.maximum(self.nonfinite[1], streak), self.nonfinite[2] + bad))
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_run += 1
        return total / accum, grad_norm

    def check_nonfinite(self, step, final=False):
        """-> the number of skipped non-finite steps; stops the run after --max-nonfinite of them in a row, and at
        its end (final) if every step this process ran was skipped."""
        streak, longest, total = (int(v) for v in self.nonfinite.tolist())
        if longest >= self.args.max_nonfinite or final and 0 < self.steps_run <= streak:
            raise SystemExit(f"error: {longest} consecutive steps with a non-finite loss or gradient (seen by step "
                             f"{step}): training diverged; lower --base-lr, keep --clip-grad, or use --amp bf16/off; "
                             f"resume from the last checkpoint")
        return total

    def state_dict(self):
        """The checkpoint's 'optimizer' and 'trainer' entries."""
        return dict(optimizer=self.optimizer.state_dict(),
                    trainer=dict(scaler=self.scaler.state_dict(), nonfinite_total=int(self.nonfinite[2])))

    def load_state_dict(self, checkpoint):
        self.optimizer.load_state_dict(checkpoint['optimizer'])
        for group in self.optimizer.param_groups:  # checkpoints of earlier versions saved a non-fused AdamW
            group.update(fused=True, foreach=None)
        if checkpoint['trainer']['scaler'] and self.scaler.is_enabled():  # fp16 before and now (else it starts anew)
            self.scaler.load_state_dict(checkpoint['trainer']['scaler'])
        self.nonfinite[2] = checkpoint['trainer']['nonfinite_total']


def save_atomic(write, path):
    """write(file) into path.tmp, flush it to disk, then rename over path: path is always whole or absent. A failed
    write (a full disk: torch reports it as a RuntimeError) removes path.tmp and stops the run in one line."""
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # SIGTERM before the loop, Ctrl-C: no .tmp left either
        if os.path.exists(tmp):
            os.remove(tmp)
        if not isinstance(e, (OSError, RuntimeError)):
            raise
        cause = next((c for c in (e, e.__cause__, e.__context__) if isinstance(c, OSError)), e)
        reason = getattr(cause, 'strerror', None) or str(cause).splitlines()[0][:200]
        fix = 'free some space' if getattr(cause, 'errno', None) == errno.ENOSPC else 'fix the path or the folder'
        kept = '; the previous file is intact' if os.path.exists(path) else ''
        raise SystemExit(f"error: could not write {path} ({reason}){kept}: {fix} and rerun the same command") from None


def checksum(obj):
    """CRC-32 of a checkpoint's payload: every tensor's bytes, shapes and dtypes, and every other value."""
    crc, rest = 0, []

    def walk(o):
        nonlocal crc
        if isinstance(o, torch.Tensor):
            crc = zlib.crc32(o.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy(), crc)
            rest.append(f'{tuple(o.shape)}{o.dtype}')
        elif isinstance(o, dict):
            for k in sorted(o, key=str):
                rest.append(repr(k))
                walk(o[k])
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)
        else:
            rest.append(repr(o))
    walk(obj)
    return zlib.crc32(''.join(rest).encode(), crc)


def save_checkpoint(run, state, keep=()):
    """OUTPUT/checkpoint.pth, atomically, with the checksum of its payload, and the same under each name in keep (a
    hard link where the disk allows)."""
    if not run.main:
        return
    state = dict(state, checksum=checksum(state))
    latest = os.path.join(run.output, 'checkpoint.pth')
    save_atomic(lambda f: torch.save(state, f), latest)
    for name in keep:
        path = os.path.join(run.output, name)
        try:
            if os.path.exists(path + '.tmp'):
                os.remove(path + '.tmp')
            os.link(latest, path + '.tmp')
            os.replace(path + '.tmp', path)
        except OSError:  # no hard links on this file system
            save_atomic(lambda f: torch.save(state, f), path)


def resume_position(checkpoint, steps_per_epoch):
    """(epoch, step) to continue from: after a completed epoch, or inside one (--save-steps, SIGTERM)."""
    step = checkpoint.get('step', steps_per_epoch)
    return (checkpoint['epoch'] + 1, 0) if step >= steps_per_epoch else (checkpoint['epoch'], step)


class CorruptCheckpoint(SystemExit):
    """A checkpoint that cannot be read whole: auto-resume passes over it."""


def load_checkpoint(path, allow_pickle=False):
    """Any supported checkpoint (models.read_checkpoint); its 'args' are read off the weights when it has none."""
    if not os.path.exists(path):
        raise SystemExit(f"error: checkpoint '{path}' does not exist")
    try:
        checkpoint = models.read_checkpoint(path, allow_pickle)
    except UnicodeDecodeError:  # a ValueError too, but from a damaged file
        raise CorruptCheckpoint(f"error: cannot load checkpoint '{path}' (unreadable header); it is truncated, "
                                f"corrupted or not a PyTorch checkpoint") from None
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    except Exception as e:  # torch's own text for a file that is no checkpoint advises weights_only=False: not shown
        why = 'not a PyTorch file' if 'pickl' in type(e).__name__.lower() else str(e).splitlines()[0].split('. ')[0]
        raise CorruptCheckpoint(f"error: cannot load checkpoint '{path}' ({why}); it is truncated, corrupted or not "
                                f"a PyTorch checkpoint") from None
    if not isinstance(checkpoint, dict):
        raise SystemExit(f"error: '{path}' holds a {type(checkpoint).__name__}, not a checkpoint (a dict of weights)")
    if 'checksum' in checkpoint and checkpoint.pop('checksum') != checksum(checkpoint):
        raise CorruptCheckpoint(f"error: checkpoint '{path}' is corrupted: its contents do not match the checksum "
                                f"saved with them (a bad copy or failing storage); resume from an earlier one "
                                f"(--resume OUTPUT/ckpt_epoch_N.pth)")
    if not isinstance(checkpoint.get('args'), dict):
        try:
            checkpoint['args'] = models.infer_arch(models.to_timm_layout(checkpoint)[0])
        except (KeyError, ValueError) as e:
            raise SystemExit(f"error: '{path}' is not a Swin, SwinV2 or ViT checkpoint that this code knows ({e})")
    return checkpoint


# the architecture a checkpoint carries over to a new run (fine-tuning, continued pretraining)
ARCH = ('model', 'patch_size', 'embed_dim', 'depths', 'num_heads', 'in_chans', 'mean', 'std')


def inherit(args, saved, names=ARCH):
    """Fill the flags the user left unset from a checkpoint's saved args."""
    for name in names:
        if getattr(args, name, None) is None and saved.get(name) is not None:
            setattr(args, name, saved[name])


# Flags that set the optimization trajectory: a resumed run keeps them unless --accept-changes says otherwise
TRAJECTORY = ('epochs', 'warmup_epochs', 'base_lr', 'warmup_lr', 'min_lr', 'lr_scheduler', 'multisteps', 'gamma',
              'weight_decay', 'clip_grad', 'accumulation_steps', 'effective_batch', 'seed')


def check_resume_flags(run, args, saved, path, names=TRAJECTORY):
    """Refuse to resume path with other trajectory flags than it was trained with, unless --accept-changes."""
    shown = lambda n: 'the effective batch' if n == 'effective_batch' else '--' + n.replace('_', '-')
    changed = [f"{shown(n)} {saved[n]} -> {getattr(args, n)}" for n in names  # unset (None): kept from the checkpoint
               if n in saved and getattr(args, n) is not None and saved[n] != getattr(args, n)]
    if changed and not args.accept_changes:
        raise SystemExit(f"error: resuming '{path}' with other settings than it was trained with: "
                         f"{', '.join(changed)}; rerun with the same flags, add --accept-changes to continue on the new settings, or start "
                         f"afresh with another --output (or --no-auto-resume)")
    if changed:
        run.print(f"resuming with changed settings (--accept-changes): {', '.join(changed)}")


def find_resume(args, run):
    """The checkpoint to resume, loaded: --resume, else OUTPUT/checkpoint.pth when auto-resume is on and it exists.
    Auto-resume passes over a corrupted checkpoint for the newest intact one, saying so. -> (path, checkpoint) or
    (None, None)."""
    if args.resume:  # a file, or a Hugging Face model folder
        return args.resume, load_checkpoint(args.resume, args.allow_pickle)
    latest = os.path.join(args.output, 'checkpoint.pth')
    if not args.auto_resume or not os.path.isfile(latest):
        return None, None
    numbered = {int(m[1]): m[0] for m in map(re.compile(r'ckpt_epoch_(\d+)\.pth').fullmatch, os.listdir(args.output))
                if m}
    for path in [latest] + [os.path.join(args.output, numbered[e]) for e in sorted(numbered, reverse=True)]:
        try:
            return path, load_checkpoint(path, args.allow_pickle)
        except CorruptCheckpoint as e:
            run.print(f"{str(e)[len('error: '):].split(';')[0]}: passed over")
    raise SystemExit(f"error: every checkpoint in {args.output} is corrupted; start afresh with --no-auto-resume")


def load_model_state(model, state, path):
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()][:3]
        raise SystemExit(f"error: checkpoint '{path}' does not fit this model ({'; '.join(lines)[:500]}); "
                         f"pass the same --model and architecture flags it was trained with")


def write_provenance(run, args):
    """Args and library versions beside the checkpoints."""
    if run.main:
        info = dict(args=vars(args), world_size=run.world_size, device=str(run.device), python=platform.python_version(),
                    torch=torch.__version__, torchvision=torchvision.__version__, timm=timm.__version__,
                    command=' '.join(sys.argv), started=datetime.datetime.now().isoformat(timespec='seconds'))
        save_atomic(lambda f: f.write(json.dumps(info, indent=1).encode()), os.path.join(run.output, 'args.json'))


def peak_memory_gb(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # max resident set, KiB on Linux


def claim_output(run, path):
    """Fail early if --output is not writable or another live run holds it; the lock dies with this process."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f'.write_test_{os.getpid()}')
        with open(probe, 'w') as f:
            f.write('ok')
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"error: --output '{path}' is not writable ({e.strerror}); choose another folder")
    if run.main:
        run.lock = open(os.path.join(path, '.lock'), 'w')
        try:
            fcntl.flock(run.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise SystemExit(f"error: another run is writing to --output '{path}'; stop it or choose another folder")


def train_one_epoch(trainer, loader, loss_fn, epoch, steps_per_epoch, args, run, state_fn, start=0):
    """Steps start.. of one epoch of trainer.step over loader's batches (whose 3rd item counts skipped files),
    logging every --print-freq steps; checkpoint.pth = state_fn(epoch, steps done) every --save-steps steps and on
    SIGTERM. -> the epoch's mean loss over all ranks, or None when stopped by SIGTERM."""
    trainer.model.train()
    loader.sampler.set_epoch(epoch, skip=start * args.accumulation_steps * args.batch_size)
    batches = iter(itertools.islice(loader, (steps_per_epoch - start) * args.accumulation_steps))
    loss_sum = torch.zeros((), device=run.device)
    window = dict(loss=torch.zeros((), device=run.device), steps=0, data=0., start=time.time(), skipped_files=0)
    epoch_start = time.time()
    for it in range(start, steps_per_epoch):
        t = time.time()
        micro = [next(batches) for _ in range(args.accumulation_steps)]
        window['data'] += time.time() - t
        skipped = sum(int(b[2].sum()) for b in micro)
        window['skipped_files'] += skipped
        step = epoch * steps_per_epoch + it
        seed = hash((args.seed, step, run.rank)) & 0xFFFF_FFFF  # drop path, mixup: a function of the step
        torch.manual_seed(seed)
        np.random.seed(seed)
        loss, grad_norm = trainer.step(step, micro, loss_fn)
        loss_sum += loss
        window['loss'] += loss
        window['steps'] += 1
        if (it + 1) % args.print_freq == 0 or it + 1 == steps_per_epoch:
            elapsed = time.time() - window['start']
            loss_avg, skipped_files = run.mean(window['loss'].item() / window['steps'], window['skipped_files'])
            nonfinite = trainer.check_nonfinite(step + 1)
            images_per_s = window['steps'] * args.effective_batch / elapsed
            remaining = (args.epochs - epoch) * steps_per_epoch - it - 1
            lr = max(group['lr'] for group in trainer.optimizer.param_groups)  # the layers without lr decay
            record = dict(epoch=epoch, step=step + 1, loss=loss_avg, lr=lr,
                          grad_norm=float(grad_norm), images_per_s=images_per_s,
                          data_s=window['data'] / window['steps'], peak_mem_gb=peak_memory_gb(run.device),
                          skipped_files=int(skipped_files * run.world_size), nonfinite_steps=nonfinite)
            run.print(f"epoch {epoch}/{args.epochs} step {it + 1}/{steps_per_epoch} loss {loss_avg:.4f} "
                      f"lr {record['lr']:.3g} grad {record['grad_norm']:.3f} {images_per_s:.1f} img/s "
                      f"data {record['data_s']:.3f}s mem {record['peak_mem_gb']:.2f}GB "
                      f"eta {datetime.timedelta(seconds=int(remaining * elapsed / window['steps']))}"
                      + (f" skipped files {record['skipped_files']}" if record['skipped_files'] else '')
                      + (f" non-finite steps {nonfinite}" if nonfinite else ''))
            run.log(record)
            window.update(loss=torch.zeros((), device=run.device), steps=0, data=0., start=time.time(),
                          skipped_files=0)
        stop = run.stop_requested()
        if it + 1 < steps_per_epoch and (stop or args.save_steps and (it + 1) % args.save_steps == 0):
            save_checkpoint(run, state_fn(epoch, it + 1))
        if stop and it + 1 < steps_per_epoch:
            run.print(f"SIGTERM: stopped after step {it + 1} of epoch {epoch}; rerun the same command to resume")
            return None
    epoch_loss, = run.mean(loss_sum.item() / (steps_per_epoch - start))
    run.print(f"epoch {epoch} done in {datetime.timedelta(seconds=int(time.time() - epoch_start))}: "
              f"mean loss {epoch_loss:.4f}")
    run.log(dict(epoch=epoch, epoch_loss=epoch_loss, epoch_time_s=time.time() - epoch_start))
    return epoch_loss


# ---------------------------------------------------------------------------------------------------------------------
# Pretraining

@torch.no_grad()
def save_reconstructions(model, images, masks, normalize, path):
    """A PNG grid, one row per image: original | masked input | reconstruction | reconstruction in the masked part."""
    was_training = model.training
    model.eval()
    rec = model.reconstruct(images, masks).float()
    model.train(was_training)
    mean = torch.tensor(normalize.mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(normalize.std, device=images.device).view(1, -1, 1, 1)
    images, rec = (images * std + mean).clamp(0, 1), (rec * std + mean).clamp(0, 1)
    p = model.patch_size
    m = masks.repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1).to(images.dtype)
    masked = images * (1 - m) + 0.5 * m
    pasted = images * (1 - m) + rec * m
    grid = torch.stack([images, masked, rec, pasted], 1).flatten(0, 1)
    save_atomic(lambda f: torchvision.utils.save_image(grid.cpu(), f, nrow=4, padding=2, format='PNG'), path)


def picture_batch(dataset, transform, mask_generator, device, n=8):
    """A fixed batch for the pictures: n images spread over the dataset, center-cropped, with a fixed mask."""
    index = torch.linspace(0, len(dataset) - 1, min(n, len(dataset))).long().tolist()
    images = torch.stack([transform(dataset.load(i)[0]) for i in index])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        masks = torch.stack([mask_generator() for _ in index])
    return images.to(device), masks.to(device)


def setup(args, run):
    """Everything that checks the user's input: model, data, sizes. Errors here are one line."""
    model = models.build_simmim(args.model, args.img_size, args.norm_target_window, args.use_checkpoint,
                                **arch_overrides(args))
    args.img_size, args.in_chans = model.encoder.patch_embed.img_size[0], model.in_chans
    normalize = data.normalization(args.in_chans, args.mean, args.std)
    mask_generator = data.MaskGenerator(args.img_size, args.mask_patch_size, model.patch_size, args.mask_ratio)
    if args.data_path is None:
        args.data_path = DEMO_DATA
        run.print(f"no --data-path given: pretraining on the bundled demo images in {DEMO_DATA}")
    dataset = data.ImageDataset(args.data_path, data.PretrainTransform(args.img_size, mask_generator, normalize),
                                args.in_chans)
    dataset.load(0)  # at least one readable image, else one clear error now rather than in a worker
    loader = data.build_loader(dataset, args.batch_size, args.num_workers, args.seed, run.world_size, run.rank)
    return model, normalize, mask_generator, dataset, loader, scale_lrs(args, run, loader)


def main(args):
    launch(pretrain, args)


def pretrain(args, run):
    claim_output(run, args.output)
    torch.manual_seed(args.seed + run.rank)
    resume, ckpt = find_resume(args, run)
    if ckpt and not ('optimizer' in ckpt and 'mask_ratio' in ckpt['args']):
        raise SystemExit(f"error: '{resume}' is no pretrain.py checkpoint, so pretraining cannot resume from it; start "
                         f"from its weights with --pretrained")
    source = load_checkpoint(args.pretrained, args.allow_pickle) if args.pretrained and not resume else None
    if ckpt or source:  # a resumed run is the run it was: its model, architecture and normalisation
        inherit(args, (ckpt or source)['args'])
    args.model = args.model or 'swin_base'
    try:
        model, normalize, mask_generator, dataset, loader, schedule = setup(args, run)
        if source:
            report = models.load_pretrained(model, source)
            run.print(f"pretrained {args.pretrained}: {len(report['loaded'])} tensors loaded, "
                      f"{len(report['resized'])} position tables resized, new: {len(report['missing'])}, "
                      f"dropped: {len(report['dropped'])}")
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    steps_per_epoch = args.steps_per_epoch
    model.to(run.device)
    models.use_fused_attention(model, run.device.type == 'cuda')
    model_ddp = run.compile(run.wrap(model), args.compile)
    optimizer = build_optimizer(model, args)
    scheduler = build_scheduler(optimizer, args, steps_per_epoch)
    trainer = Trainer(model_ddp, optimizer, scheduler, args, run)

    run.print(f"{args.model}: {sum(p.numel() for p in model.parameters()):,} parameters, {args.img_size}px, "
              f"mask {args.mask_ratio} of {args.mask_patch_size}px squares; {len(dataset):,} images in {args.data_path}")
    run.print(f"{schedule}; amp {trainer.amp}; device {run.device}")

    start_epoch, start_step = 0, 0
    if resume:
        check_resume_flags(run, args, ckpt['args'], resume, TRAJECTORY + ('pretrained', 'model', 'data_path',
                                                                         'mask_patch_size', 'mask_ratio',
                                                                         'norm_target_window'))
        load_model_state(model, ckpt['model'], resume)
        trainer.load_state_dict(ckpt)
        start_epoch, start_step = resume_position(ckpt, steps_per_epoch)
        run.print(f"resumed from {resume} at epoch {start_epoch}" + (f" step {start_step}" if start_step else ''))
    write_provenance(run, args)
    pictures = picture_batch(dataset, data.eval_transform(args.img_size, normalize, crop_pct=1.0), mask_generator,
                             run.device) if run.main else None
    if run.main and start_epoch == 0:
        save_reconstructions(model, *pictures, normalize, os.path.join(args.output, 'reconstruction_start.png'))

    def loss_fn(batch):
        (images, masks), _, _ = batch
        return model_ddp(images.to(run.device, non_blocking=True), masks.to(run.device, non_blocking=True))

    def state_fn(epoch, step):
        return dict(model=model.state_dict(), **trainer.state_dict(), epoch=epoch, step=step, args=vars(args))

    run.training = True  # from here a SIGTERM saves and stops after the current step
    for epoch in range(start_epoch, args.epochs):
        if train_one_epoch(trainer, loader, loss_fn, epoch, steps_per_epoch, args, run, state_fn,
                           start_step if epoch == start_epoch else 0) is None:
            return
        last = epoch + 1 == args.epochs
        keep = (epoch + 1) % args.save_freq == 0 or last
        save_checkpoint(run, state_fn(epoch, steps_per_epoch), keep=[f'ckpt_epoch_{epoch}.pth'] if keep else [])
        if keep and run.main:
            name = 'reconstruction_end.png' if last else f'reconstruction_epoch_{epoch}.png'
            save_reconstructions(model, *pictures, normalize, os.path.join(args.output, name))
        if run.stopping:
            run.print(f"SIGTERM: stopped after epoch {epoch}; rerun the same command to resume")
            return
    trainer.check_nonfinite(args.epochs * steps_per_epoch, final=True)
    run.print(f"done: checkpoints, log.jsonl and reconstruction pictures are in {args.output}")


if __name__ == '__main__':
    main(get_args_parser().parse_args())
