"""The run machinery pretrain.py and finetune.py share: their common flags, the (distributed) run, the optimizer and
schedule, the AMP training step, checkpoints and the epoch loop. In a file of its own so that each script reads top to
bottom as its recipe, and either can be copied with this file, models.py and data.py alone."""
import argparse
import ctypes
import datetime
import errno
import inspect
import itertools
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import socket
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
warnings.formatwarning = lambda message, *_: f"warning: {message}\n"  # one line, not the source line that warned too


# ---------------------------------------------------------------------------------------------------------------------
# Flags both scripts take

class Parser(argparse.ArgumentParser):
    """argparse, whose errors are one line (not the whole usage first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None and those the help text gives (it says what happens), and switches."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool) or '(default' in (action.help or ''):
            return action.help
        return super()._get_help_string(action)


def number(interval, kind=float):
    """An argparse type: a finite number in interval, written as in mathematics ('[0, 1]', '(0, 1]', '[1, inf)');
    anything else (NaN and infinity too) is argparse's one-line error naming the flag."""
    low, high = (float(v) for v in interval[1:-1].split(','))

    def parse(text):
        value = kind(text)
        inside = (value > low if interval[0] == '(' else value >= low) and (
            value < high if interval[-1] == ')' else value <= high)
        if not (inside and math.isfinite(value)):
            rule = f"at least {low:g}" if interval[0] == '[' and high == math.inf else f"in {interval}"
            rule = rule if math.isfinite(value) else 'a finite number'
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse says "invalid int value: 'x'" for what is no number at all
    return parse


COUNT, SIZE, AMOUNT = number('[0, inf)', int), number('[1, inf)', int), number('[0, inf)')
PROBABILITY, FRACTION = number('[0, 1]'), number('(0, 1]')


def add_arch_args(g):
    """Architecture overrides; unset ones keep the named model's (or the checkpoint's) value."""
    g.add_argument('--window-size', type=SIZE, default=None, help='Swin window (default: img size / 32, Swin-L / 16)')
    g.add_argument('--patch-size', type=SIZE, default=None, help='model patch size (default: Swin 4, ViT 16)')
    g.add_argument('--embed-dim', type=SIZE, default=None, help="width of the first stage (default: the model's)")
    g.add_argument('--depths', type=SIZE, nargs='+', default=None, help="blocks per stage, ViT: one number")
    g.add_argument('--num-heads', type=SIZE, nargs='+', default=None, help="heads per stage, ViT: one number")
    g.add_argument('--in-chans', type=SIZE, default=None,
                   help="image channels: 3 RGB (default, or the checkpoint's), 1 grey, any for .npy arrays (H x W x C)")
    g.add_argument('--drop-path', type=number('[0, 1)'), default=None,
                   help='stochastic depth (default: the official config)')
    g.add_argument('--use-checkpoint', action='store_true', help='activation checkpointing: less memory, slower')


def arch_overrides(args):
    """The architecture flags as models.build_* keyword arguments."""
    for flag in ('depths', 'num_heads'):
        if models.MODELS[args.model]['family'] == models.VIT and len(getattr(args, flag) or [0]) != 1:
            raise ValueError(f"--{flag.replace('_', '-')} takes one number for ViT models, got {getattr(args, flag)}")
    return models.arch_kwargs(vars(args))


def intensity_rule(text):
    """--intensity: a rule name, or the value that becomes white."""
    if text in ('type', 'image', 'percentile'):
        return text
    try:
        if 0 < float(text) < math.inf:
            return float(text)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"use type, image, percentile or a positive number, got {text}")


def add_data_args(g, data_help):
    g.add_argument('--data-path', default=None, help=data_help)
    g.add_argument('--intensity', type=intensity_rule, default=None,
                   help="how images of more than 8 bits and .npy arrays become 0-1: 'type' (default: integers by "
                        "their type's range, floats by their own min-max), 'image' (each image's min-max), "
                        "'percentile' (each image's 0.5-99.5 percentiles), or the value that becomes white (e.g. "
                        "4095 for 12-bit data in 16-bit files)")
    g.add_argument('--batch-size', type=SIZE, default=128, help='images per GPU (per process) and micro-step')
    g.add_argument('--num-workers', type=COUNT, default=min(8, os.cpu_count() or 1),
                   help='data loading processes per GPU (default: 8, or the CPU count if lower)')
    g.add_argument('--mean', type=number('(-inf, inf)'), nargs='+', default=None,
                   help='per-channel mean of 0-1 pixels (default: ImageNet)')
    g.add_argument('--std', type=number('(0, inf)'), nargs='+', default=None,
                   help='per-channel std (default: ImageNet)')


def add_optim_args(p, epochs=None, warmup_epochs=None, base_lr=None, warmup_lr=None, min_lr=None):
    g = p.add_argument_group('optimization (learning rates are per 512 images: lr x effective batch / 512)')
    g.add_argument('--epochs', type=SIZE, default=epochs, help='epochs to train')
    g.add_argument('--warmup-epochs', type=COUNT, default=warmup_epochs, help='linear warmup from --warmup-lr')
    g.add_argument('--base-lr', type=AMOUNT, default=base_lr, help='peak lr per 512 images')
    g.add_argument('--warmup-lr', type=AMOUNT, default=warmup_lr, help='lr at step 0, per 512 images')
    g.add_argument('--min-lr', type=AMOUNT, default=min_lr, help='final cosine lr, per 512 images')
    g.add_argument('--lr-scheduler', default='cosine', choices=['cosine', 'multistep'],
                   help='cosine to --min-lr, or x --gamma at each of --multisteps; both step every iteration')
    g.add_argument('--multisteps', type=COUNT, nargs='*', default=[], help='multistep milestones, in epochs')
    g.add_argument('--gamma', type=AMOUNT, default=0.1, help='multistep decay factor')
    g.add_argument('--weight-decay', type=AMOUNT, default=0.05,
                   help='not on norms, biases and the official exemptions (README: Fidelity)')
    g.add_argument('--accumulation-steps', type=SIZE, default=1, help='micro-batches per optimizer step')
    g.add_argument('--clip-grad', type=AMOUNT, default=5.0, help='max gradient norm; 0 = no clipping')
    g.add_argument('--amp', default=None, choices=['bf16', 'fp16', 'off'],
                   help='autocast dtype; fp16 uses a gradient scaler (default: bf16 where the device computes it '
                        'natively: recent GPUs, CPUs with AVX512-BF16 or AMX; else fp16 on GPUs, off on CPUs)')
    g.add_argument('--max-nonfinite', type=SIZE, default=20,
                   help='abort after this many consecutive steps with a non-finite loss or gradient')
    return g


def add_run_args(p, output, compile):
    g = p.add_argument_group('run')
    g.add_argument('--compile', default=compile, choices=['auto', 'on', 'off'],
                   help='torch.compile the training forward and backward (the first step compiles for a minute or '
                        'two); auto = on GPUs, where it was measured faster; off = eager')
    g.add_argument('--output', default=output, help='folder for checkpoints, logs and pictures')
    g.add_argument('--resume', default=None,
                   help='checkpoint to resume (default: OUTPUT/checkpoint.pth if any); to use, also a published name')
    g.add_argument('--accept-changes', action='store_true',
                   help="resume although optimization flags differ from the checkpoint's (e.g. more --epochs): the "
                        "schedule from the resumed step on is the new one")
    g.add_argument('--no-auto-resume', dest='auto_resume', action='store_false',
                   help='start afresh even if OUTPUT holds a checkpoint (by default the run continues from it)')
    g.add_argument('--save-freq', type=SIZE, default=5, help='keep a numbered checkpoint every this many epochs')
    g.add_argument('--save-steps', type=COUNT, default=0,
                   help='also update checkpoint.pth every this many steps inside an epoch (resumed exactly); 0 = off')
    g.add_argument('--dist-timeout', type=number('[0.1, inf)'), default=30,
                   help='minutes a collective waits for a dead or hung rank before the run stops with an error')
    g.add_argument('--print-freq', type=SIZE, default=100,
                   help='log every this many optimizer steps; a SIGTERM stops the run at the next log line')
    g.add_argument('--seed', type=number('[0, 4294967295]', int), default=0,
                   help='seeds the initialisation, data order, augmentation and masks (a function of the step)')
    g.add_argument('--device', default=None, help='cuda or cpu (default: cuda when available)')
    g.add_argument('--allow-pickle', action='store_true',
                   help='load checkpoints holding pickled objects (official SimMIM ones hold their yacs config): this '
                        'runs code from the file, use it only for files you trust')


# ---------------------------------------------------------------------------------------------------------------------
# The run

class Run:
    """The distributed state from torchrun's environment (or a single process), the device, rank-0 printing and
    logging, and the SIGTERM that schedulers send before preemption."""

    def __init__(self, args):
        # torchrun sets RANK and WORLD_SIZE: then the run is distributed, with one process too (one code path)
        self.distributed = 'RANK' in os.environ and 'WORLD_SIZE' in os.environ
        self.world_size = int(os.environ['WORLD_SIZE']) if self.distributed else 1
        self.rank = int(os.environ['RANK']) if self.distributed else 0
        if args.device is not None and not re.fullmatch(r'cpu|cuda(:\d+)?', args.device):
            raise SystemExit(f"error: --device '{args.device}': use cuda, cuda:N or cpu")
        if args.device is not None and args.device.startswith('cuda') and not torch.cuda.is_available():
            raise SystemExit("error: --device cuda, but torch sees no GPU here; use --device cpu or a CUDA build of "
                             "torch on a machine with a GPU")
        cuda = torch.cuda.is_available() if args.device is None else args.device.startswith('cuda')
        self.device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else 'cpu')
        if cuda:
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = True  # fixed input sizes: the patch embedding's fastest convolution
        else:  # Swin's shifted-window mask (-100) makes float32 denormals in softmax, which slow CPU matmuls tenfold
            torch.set_flush_denormal(True)
        keep_freed_memory()
        if self.distributed:
            dist.init_process_group('nccl' if cuda else 'gloo', timeout=datetime.timedelta(minutes=args.dist_timeout))
        self.main = self.rank == 0
        self.output = args.output
        self.id = f"{socket.gethostname()} pid {os.getpid()} {datetime.datetime.now().isoformat(timespec='seconds')}"
        self.training = False  # in the training loop, where a SIGTERM stops the run at the next log line
        self.sigterm = False  # this process got SIGTERM
        self.stopping = False  # some rank got SIGTERM: what the last sync() agreed on
        self.previous_handler = signal.signal(signal.SIGTERM, self.on_sigterm)
        self.launcher = os.getppid() if self.distributed else None  # torchrun: the ranks end with it

    def on_sigterm(self, *_):
        if not self.training:  # before the loop there is nothing to save: stop now
            raise SystemExit("SIGTERM before training started: stopped; nothing was trained or saved")
        self.sigterm = True

    def sync(self, *values):
        """Average numbers over all ranks, and agree on a stop if any rank got SIGTERM. Called at log lines, where the
        loop waits for the device anyway. A rank whose torchrun is gone (killed) stops here. -> list of the means."""
        if self.launcher is not None and os.getppid() != self.launcher:
            raise SystemExit(f"error: rank {self.rank}: torchrun, which started this process, is gone: stopped; "
                             f"rerun the command to resume")
        t = torch.tensor([*values, float(self.sigterm)], dtype=torch.float64, device=self.device)
        if self.distributed:
            dist.all_reduce(t)
            t /= self.world_size
        *means, stop = t.tolist()
        self.stopping = stop > 0
        return means

    def print(self, *msg):
        if self.main:
            print(f"[{datetime.datetime.now():%Y-%m-%d %H:%M:%S}]", *msg, flush=True)

    def log(self, record):
        """One JSON line in OUTPUT/log.jsonl (rank 0)."""
        if self.main:
            check_output(self)
            with open(os.path.join(self.output, 'log.jsonl'), 'a') as f:
                f.write(json.dumps(record) + '\n')

    def wrap(self, model, compile='off'):
        """DistributedDataParallel when distributed (its buckets hold the gradients: no extra copy; the models' buffers
        are constants, not re-broadcast before each forward), then torch.compile if compile is 'on', or 'auto' on a
        GPU (compiling the DDP wrapper keeps its gradient reductions overlapping the backward)."""
        if self.distributed:
            switch = 'forward_sync_buffers'  # torch >= 2.14; earlier: broadcast_buffers
            if switch not in inspect.signature(DistributedDataParallel).parameters:
                switch = 'broadcast_buffers'
            model = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == 'cuda'
                                            else None, gradient_as_bucket_view=True, **{switch: False})
        if compile == 'on' or compile == 'auto' and self.device.type == 'cuda':
            self.print("torch.compile: the first step compiles the model (a minute or two); --compile off runs eager")
            model = torch.compile(model)
        return model

    def close(self):
        if not self.sigterm:  # once signalled, a second SIGTERM during the exit must not kill the stopping process
            signal.signal(signal.SIGTERM, self.previous_handler)
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def keep_freed_memory():
    """glibc keeps freed memory for reuse (this process and its loader workers) instead of unmapping every large
    tensor and faulting it in again on the next step: on CPUs the training step's largest lever (README:
    Performance)."""
    try:
        libc = ctypes.CDLL('libc.so.6')
    except OSError:  # not glibc (macOS, musl)
        return
    libc.mallopt(-4, 0)  # M_MMAP_MAX: no allocation gets its own mapping
    libc.mallopt(-1, 2 ** 31 - 1)  # M_TRIM_THRESHOLD: keep up to 2 GB of free heap


def launch(body, args):
    """body(args, run) in a Run that is always closed; Ctrl-C ends in one line."""
    run = Run(args)
    try:
        body(args, run)
    except KeyboardInterrupt:
        if not run.training:
            raise SystemExit("interrupted (Ctrl-C) before training started: nothing was trained") from None
        raise SystemExit(f"interrupted (Ctrl-C): the checkpoints in {args.output} are whole; rerun the same command "
                         f"to resume from the last one") from None
    finally:
        run.close()


def normalization(args):
    """data.normalization of --mean / --std, which it sets on args (the checkpoints carry them, and --intensity)."""
    args.intensity = args.intensity or 'type'
    try:
        normalize = data.normalization(args.in_chans, args.mean, args.std)
    except ValueError as e:
        raise SystemExit(f"error: {e}: pass --mean and --std ({args.in_chans} values each, std above 0)") from None
    args.mean, args.std = list(normalize.mean), list(normalize.std)
    return normalize


def autocast(amp, device):
    """--amp resolved for the device (bf16 where native, else fp16 on GPU, off on CPU) and its autocast context."""
    if amp is None and device.type == 'cuda':
        amp = 'bf16' if torch.cuda.is_bf16_supported() else 'fp16'
    elif amp is None:
        native = [getattr(torch.cpu, f, lambda: False)()
                  for f in ('_is_avx512_bf16_supported', '_is_amx_tile_supported')]
        amp = 'bf16' if any(native) else 'off'
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(amp)
    return amp, torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


# ---------------------------------------------------------------------------------------------------------------------
# Optimizer, schedule, training step

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


def build_optimizer(model, args, lr_scales=None, momentum=None):
    """AdamW with the official weight-decay set (NO_DECAY) of a SimMIM model (pretraining) or a classifier.
    lr_scales (optional) maps a parameter name to its layer-wise lr multiplier. With a momentum: SGD (linear probes)."""
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
    if momentum is not None:
        return torch.optim.SGD(list(groups.values()), lr=args.lr, momentum=momentum, fused=True)
    return torch.optim.AdamW(list(groups.values()), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, fused=True)


def scale_lrs(args, world_size, batches):
    """Sets the optimizer steps per epoch (of `batches` per process) and the lrs by the scaling rule (lrs are per 512
    images) on args. -> a line describing both."""
    args.steps_per_epoch = batches // args.accumulation_steps
    if args.steps_per_epoch == 0:
        raise ValueError(f"the images make {batches} batches of {args.batch_size} per process, not one step of "
                         f"{args.accumulation_steps} accumulation steps on each of {world_size} processes; lower "
                         f"--batch-size or add images")
    if (args.lr_scheduler == 'multistep') != bool(args.multisteps):
        raise ValueError("--multisteps (the epochs where the lr drops by --gamma) go with --lr-scheduler multistep, "
                         "and it needs them")
    if args.multisteps and max(args.multisteps) >= args.epochs:
        raise ValueError(f"--multisteps {max(args.multisteps)} is not before --epochs {args.epochs}: the lr would "
                         f"never drop there")
    args.effective_batch = args.batch_size * world_size * args.accumulation_steps
    args.lr, args.warmup_lr_scaled, args.min_lr_scaled = (lr * args.effective_batch / 512 for lr in
                                                          (args.base_lr, args.warmup_lr, args.min_lr))
    warning = f"; warning: --warmup-epochs {args.warmup_epochs} is not below --epochs {args.epochs}, so the lr never " \
              f"reaches its peak" if args.warmup_epochs >= args.epochs else ''
    return (f"world size {world_size} x batch {args.batch_size} x accumulation {args.accumulation_steps} = "
            f"effective batch {args.effective_batch}; {args.steps_per_epoch} steps per epoch; lr {args.lr:.3g} "
            f"(= {args.base_lr:g} x {args.effective_batch} / 512), warmup lr {args.warmup_lr_scaled:.3g}, "
            f"min lr {args.min_lr_scaled:.3g}{warning}")


def build_scheduler(optimizer, args):
    """Per-step schedule (timm's, stepped with step_update): linear warmup from warmup lr, then cosine from step 0 to
    min lr (the official settings), or multistep. timm applies each group's lr_scale."""
    steps = args.steps_per_epoch
    warmup = dict(warmup_t=args.warmup_epochs * steps, warmup_lr_init=args.warmup_lr_scaled,
                  warmup_prefix=False, t_in_epochs=False)  # schedule positions count from step 0, warmup included
    if args.lr_scheduler == 'cosine':
        return CosineLRScheduler(optimizer, t_initial=args.epochs * steps, lr_min=args.min_lr_scaled, cycle_limit=1,
                                 **warmup)
    # timm decays at milestone - 1; the official scheduler at the milestone itself
    return MultiStepLRScheduler(optimizer, decay_t=[m * steps + 1 for m in args.multisteps], decay_rate=args.gamma,
                                **warmup)


class Trainer:
    """The training step: autocast, accumulation without gradient all-reduce on micro-steps, unscale, clip, skip and
    count non-finite steps, lr per step. Nothing in it waits for the device."""

    def __init__(self, model, optimizer, scheduler, args, run):
        self.model, self.optimizer, self.scheduler, self.args, self.run = model, optimizer, scheduler, args, run
        self.amp, self.autocast = autocast(args.amp, run.device)
        self.scaler = torch.amp.GradScaler(run.device.type, enabled=self.amp == 'fp16')
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.nonfinite = torch.zeros(3, device=run.device)  # skipped steps: current streak, longest streak, total
        self.steps_run = 0  # by this process
        self.epoch_loss, self.epoch_steps = torch.zeros((), device=run.device), 0  # this epoch's: train_one_epoch's

    def step(self, step, micro_batches, loss_fn):
        """One optimizer step over micro_batches; loss_fn(batch) -> scalar loss. -> (mean loss, grad norm) tensors."""
        # As the official loop, which sets the lr of step k + 1 after step k: steps 0 and 1 run at the warmup lr
        self.scheduler.step_update(max(step - 1, 0))
        total = 0.
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with nullcontext() if last or not self.run.distributed else self.model.no_sync():
                with self.autocast:
                    loss = loss_fn(batch)
                self.scaler.scale(loss / len(micro_batches)).backward()
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
        return total / len(micro_batches), grad_norm

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
                    trainer=dict(scaler=self.scaler.state_dict(), nonfinite_total=int(self.nonfinite[2]),
                                 epoch_loss=self.epoch_loss.item(), epoch_steps=self.epoch_steps))

    def load_state_dict(self, checkpoint):
        self.optimizer.load_state_dict(checkpoint['optimizer'])
        if checkpoint['trainer']['scaler'] and self.scaler.is_enabled():  # fp16 before and now (else it starts anew)
            self.scaler.load_state_dict(checkpoint['trainer']['scaler'])
        self.nonfinite[2] = checkpoint['trainer']['nonfinite_total']
        self.epoch_loss.fill_(checkpoint['trainer'].get('epoch_loss', 0.))  # older checkpoints: none counted
        self.epoch_steps = checkpoint['trainer'].get('epoch_steps', 0)


def train_one_epoch(trainer, loader, loss_fn, epoch, args, run, state_fn, start=0):
    """Steps start.. of one epoch of trainer.step over loader's batches (whose 3rd item counts skipped files). Every
    --print-freq steps and at the epoch's end a log line, where the ranks also agree on a SIGTERM stop; inside the
    epoch, checkpoint.pth = state_fn(epoch, steps done) then, and every --save-steps steps. -> the epoch's mean loss,
    or None when stopped inside it."""
    steps = args.steps_per_epoch
    trainer.model.train()
    loader.sampler.set_epoch(epoch, skip=start * args.accumulation_steps * args.batch_size)
    batches = iter(itertools.islice(loader, (steps - start) * args.accumulation_steps))
    epoch_start = time.time()
    if start == 0:  # else the checkpoint's sum of the steps before it
        trainer.epoch_loss.zero_()
        trainer.epoch_steps = 0
    since_log = dict(loss=torch.zeros((), device=run.device), steps=0, data_s=0., start=time.time(), skipped=0)
    for it in range(start, steps):
        t = time.time()
        micro = [next(batches) for _ in range(args.accumulation_steps)]
        since_log['data_s'] += time.time() - t
        since_log['skipped'] += sum(int(b[2].sum()) for b in micro)
        step = epoch * steps + it
        seed = hash((args.seed, step, run.rank)) & 0xFFFF_FFFF  # drop path, mixup: a function of the step
        torch.manual_seed(seed)
        np.random.seed(seed)
        loss, grad_norm = trainer.step(step, micro, loss_fn)
        trainer.epoch_loss += loss
        trainer.epoch_steps += 1
        since_log['loss'] += loss
        since_log['steps'] += 1
        if (it + 1) % args.print_freq == 0 or it + 1 == steps:
            log_step(trainer, since_log, epoch, it, grad_norm, args, run)
            since_log.update(loss=torch.zeros((), device=run.device), steps=0, data_s=0., start=time.time(), skipped=0)
        if it + 1 < steps and (run.stopping or args.save_steps and (it + 1) % args.save_steps == 0):
            trainer.epoch_loss.fill_(run.sync(trainer.epoch_loss.item())[0])  # each rank resumes with the ranks' mean
            save_checkpoint(run, state_fn(epoch, it + 1))
            if run.stopping:
                run.print(f"SIGTERM: stopped after step {it + 1} of epoch {epoch}; rerun the same command to resume")
                return None
    mean_loss, = run.sync(trainer.epoch_loss.item() / trainer.epoch_steps)
    run.print(f"epoch {epoch} done in {datetime.timedelta(seconds=int(time.time() - epoch_start))}: "
              f"mean loss {mean_loss:.4f}")
    run.log(dict(epoch=epoch, epoch_loss=mean_loss, epoch_time_s=time.time() - epoch_start))
    return mean_loss


def log_step(trainer, since_log, epoch, it, grad_norm, args, run):
    """The log line and log.jsonl record of the steps since the last one; the ranks agree on a SIGTERM stop here."""
    elapsed, n = time.time() - since_log['start'], since_log['steps']
    loss, skipped = run.sync(since_log['loss'].item() / n, since_log['skipped'])
    step = epoch * args.steps_per_epoch + it + 1
    record = dict(epoch=epoch, step=step, loss=loss, lr=max(g['lr'] for g in trainer.optimizer.param_groups),
                  grad_norm=float(grad_norm), images_per_s=n * args.effective_batch / elapsed,
                  data_s=since_log['data_s'] / n, peak_mem_gb=peak_memory_gb(run.device),
                  skipped_files=round(skipped * run.world_size), nonfinite_steps=trainer.check_nonfinite(step))
    eta = datetime.timedelta(seconds=int((args.epochs * args.steps_per_epoch - step) * elapsed / n))
    run.print(f"epoch {epoch}/{args.epochs} step {it + 1}/{args.steps_per_epoch} loss {loss:.4f} lr {record['lr']:.3g} "
              f"grad {record['grad_norm']:.3f} {record['images_per_s']:.1f} img/s data {record['data_s']:.3f}s "
              f"mem {record['peak_mem_gb']:.2f}GB eta {eta}"
              + (f" skipped files {record['skipped_files']}" if record['skipped_files'] else '')
              + (f" non-finite steps {record['nonfinite_steps']}" if record['nonfinite_steps'] else ''))
    run.log(record)


def peak_memory_gb(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # max resident set, KiB on Linux


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints

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
        kept = '; the previous file is intact' if os.path.isfile(path) else ''
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


def save_checkpoint(run, state, names=()):
    """OUTPUT/checkpoint.pth with the checksum of its payload, then copies named names (e.g. ckpt_epoch_N.pth); each
    written atomically."""
    if run.main:
        check_output(run)
        latest = os.path.join(run.output, 'checkpoint.pth')
        save_atomic(lambda f: torch.save(dict(state, checksum=checksum(state)), f), latest)
        for name in names:
            with open(latest, 'rb') as source:
                save_atomic(lambda f: shutil.copyfileobj(source, f), os.path.join(run.output, name))


class CorruptCheckpoint(SystemExit):
    """A checkpoint that cannot be read whole: auto-resume passes over it."""


def load_checkpoint(path, allow_pickle=False, run=None):
    """Any supported checkpoint or published name (models.read_checkpoint), verified against its checksum; its
    'args' are read off the weights when it has none. In a distributed run a name is downloaded once per machine: its
    first rank fetches it while the others wait (if it fails, torchrun ends them)."""
    try:
        if run is not None and run.distributed and path in models.PUBLISHED and not os.path.exists(path):
            if os.environ.get('LOCAL_RANK', '0') == '0':
                models.download(path)
            dist.barrier()
        checkpoint = models.read_checkpoint(path, allow_pickle)
    except models.PickledCheckpoint as e:
        raise SystemExit(f"error: {e}; pass --allow-pickle if you trust it") from None
    except models.UnreadableCheckpoint as e:
        raise CorruptCheckpoint(f"error: {e}") from None
    except (OSError, ValueError) as e:  # missing, unreadable, not downloaded
        raise SystemExit(f"error: {e}") from None
    if not isinstance(checkpoint, dict):
        raise SystemExit(f"error: '{path}' holds a {type(checkpoint).__name__}, not a checkpoint (a dict of weights)")
    if 'checksum' in checkpoint and checkpoint.pop('checksum') != checksum(checkpoint):
        raise CorruptCheckpoint(f"error: checkpoint '{path}' is corrupted: its contents do not match the checksum "
                                f"saved with them (a bad copy or failing storage); resume from an earlier one "
                                f"(--resume OUTPUT/ckpt_epoch_N.pth)")
    try:
        checkpoint['args'] = models.checkpoint_args(checkpoint)
    except ValueError as e:
        raise SystemExit(f"error: '{path}' is {e}") from None
    return checkpoint


def find_resume(args, run, training=True):
    """The checkpoint to resume, loaded: --resume, else OUTPUT/checkpoint.pth when auto-resume is on and it exists;
    in training, OUTPUT's when a run of the same --resume saved it there (the same command, rerun, continues its own
    progress). Auto-resume passes over a corrupted checkpoint for the newest intact one, saying so. -> (path,
    checkpoint) or (None, None)."""
    latest = os.path.join(args.output, 'checkpoint.pth')
    auto = args.auto_resume and os.path.isfile(latest)
    if args.resume and auto and training and started_from(args.output) == args.resume:
        run.print(f"{args.output} holds the progress of a run started from --resume {args.resume}: continuing it")
    elif args.resume:  # a file, or a Hugging Face model folder
        return args.resume, load_checkpoint(args.resume, args.allow_pickle, run)
    if not auto:
        return None, None
    numbered = {int(m[1]): m[0] for m in map(re.compile(r'ckpt_epoch_(\d+)\.pth').fullmatch, os.listdir(args.output))
                if m}
    for path in [latest] + [os.path.join(args.output, numbered[e]) for e in sorted(numbered, reverse=True)]:
        try:
            return path, load_checkpoint(path, args.allow_pickle)
        except CorruptCheckpoint as e:
            run.print(f"{str(e)[len('error: '):].split(';')[0]}: passed over")
    raise SystemExit(f"error: every checkpoint in {args.output} is corrupted; start afresh with --no-auto-resume")


def started_from(output):
    """The --resume of the run that last started in output (its args.json), or None."""
    saved = (run_record(output) or {}).get('args')
    return saved.get('resume') if isinstance(saved, dict) else None


def resume_position(checkpoint, args, path):
    """(epoch, step) to continue from: after a completed epoch, or inside one (--save-steps, SIGTERM), which only the
    same batches per step can continue (the images the epoch has seen are skipped by count)."""
    saved = checkpoint['args']
    step, epoch = checkpoint.get('step', saved['steps_per_epoch']), checkpoint['epoch']
    if step >= saved['steps_per_epoch']:
        return epoch + 1, 0
    if (saved['batch_size'], saved['accumulation_steps'], saved['effective_batch']) != (
            args.batch_size, args.accumulation_steps, args.effective_batch):
        raise SystemExit(f"error: '{path}' stopped inside epoch {epoch} with another batch (per process and step: "
                         f"{saved['batch_size']} x {saved['accumulation_steps']}, in all {saved['effective_batch']}); "
                         f"resume it with the same one, or from the end of an epoch (--resume OUTPUT/ckpt_epoch_N.pth)")
    return epoch, step


# The flags a checkpoint carries over to a new run (fine-tuning, continued pretraining)
ARCH_FLAGS = ('model', 'patch_size', 'embed_dim', 'depths', 'num_heads', 'in_chans', 'mean', 'std', 'intensity')
# The flags that shape a saved model: another value cannot load its weights
SHAPE_FLAGS = ('model', 'img_size', 'window_size', 'patch_size', 'embed_dim', 'depths', 'num_heads', 'in_chans')
# The flags that set what a run trains, and how: a resumed run keeps them unless --accept-changes
TRAJECTORY_FLAGS = SHAPE_FLAGS + ('epochs', 'warmup_epochs', 'base_lr', 'warmup_lr', 'min_lr', 'lr_scheduler',
                                  'multisteps', 'gamma', 'weight_decay', 'clip_grad', 'accumulation_steps',
                                  'effective_batch', 'seed', 'pretrained', 'data_path', 'mean', 'std', 'intensity')


def inherit(args, saved, names=ARCH_FLAGS):
    """Fill the flags the user left unset from a checkpoint's saved args. For data of other channels, not the
    normalisation and intensity (their data's), except the channel average of the mean and std for grey images; for
    a model of another family, not the architecture."""
    other_channels = args.in_chans is not None and args.in_chans != saved.get('in_chans', 3)
    family = lambda model: models.MODELS[model]['family'] if model in models.MODELS else None
    other_family = args.model is not None and family(args.model) != family(saved.get('model'))
    for name in names:
        if other_family and name in SHAPE_FLAGS:  # Swin's stages and window do not build a ViT, nor the reverse
            continue
        value = saved.get(name)
        if other_channels and name in ('mean', 'std', 'intensity'):
            value = [sum(value) / len(value)] if value and args.in_chans == 1 and name != 'intensity' else None
        if getattr(args, name, None) is None and value is not None:
            setattr(args, name, value)


def check_resume_flags(run, args, saved, path, names, use=False):
    """Refuse to resume path with other trajectory flags than it was trained with, unless --accept-changes; to use
    it (use: evaluate, predict, export) with other flags at all."""
    shown = lambda n: 'the effective batch' if n == 'effective_batch' else '--' + n.replace('_', '-')
    changed = [f"{shown(n)} {saved[n]} -> {getattr(args, n)}" for n in names  # unset (None): kept from the checkpoint
               if n in saved and getattr(args, n) is not None and saved[n] != getattr(args, n)]
    if changed and use and not args.accept_changes:
        raise SystemExit(f"error: '{path}' was trained with other settings: {', '.join(changed)}; leave these flags "
                         f"out (they come from the checkpoint), or add --accept-changes to use it with them")
    if changed and not args.accept_changes:
        raise SystemExit(f"error: resuming '{path}' with other settings than it was trained with: {', '.join(changed)}"
                         f"; rerun with the same flags, add --accept-changes to continue on the new settings, or "
                         f"start afresh with another --output (or --no-auto-resume)")
    if changed:
        run.print(f"{'using' if use else 'resuming'} with changed settings (--accept-changes): {', '.join(changed)}")


def load_pretrained(model, checkpoint, path, run):
    """models.load_pretrained, with the scripts' report line and error. -> its report."""
    try:
        report = models.load_pretrained(model, checkpoint)
    except ValueError as e:
        raise SystemExit(f"error: '{path}': {e}; pass the --model and architecture flags it was trained with") from None
    dropped = ', '.join(sorted({k.split('.')[0] for k in report['dropped']})) or '-'
    run.print(f"{path}: {len(report['loaded'])} tensors loaded, {len(report['resized'])} position tables resized, "
              f"new: {', '.join(report['missing']) or '-'}, dropped: {len(report['dropped'])} ({dropped})"
              + (f"; patch embedding adapted from {report['adapted'][1]} (timm's rule)" if report['adapted'] else ''))
    return report


def load_model_state(model, state, path):
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()][:3]
        raise SystemExit(f"error: checkpoint '{path}' does not fit this model ({'; '.join(lines)[:500]}); "
                         f"pass the same --model and architecture flags it was trained with")


def start_output(run, args, start=0):
    """Create --output and claim it: args.json there names this run (with its flags and library versions), and
    log.jsonl keeps the records of the run up to its global step `start` (the checkpoint resumed; none when starting
    afresh). An unwritable folder fails now, not at the first checkpoint."""
    make_output(args.output)
    if run.main:
        info = dict(run=run.id, args=vars(args), world_size=run.world_size, device=str(run.device),
                    python=platform.python_version(), torch=torch.__version__, torchvision=torchvision.__version__,
                    timm=timm.__version__, command=' '.join(sys.argv))
        save_atomic(lambda f: f.write(json.dumps(info, indent=1).encode()), os.path.join(args.output, 'args.json'))
        log, kept = os.path.join(args.output, 'log.jsonl'), []
        if os.path.exists(log):  # records of a killed attempt past the checkpoint would come twice
            with open(log) as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except ValueError:  # a line cut by a kill
                        continue
                    if record.get('step', (record['epoch'] + 1) * args.steps_per_epoch) <= start:
                        kept.append(line)
        save_atomic(lambda f: f.write(''.join(kept).encode()), log)


def make_output(folder):
    """Create --output, or stop in one line."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: --output '{folder}' is not a folder that can be written ({e.strerror}); choose "
                         f"another")


def check_output(run):
    """Stop if another run has started in --output since this one (its args.json names it): two runs into one folder
    would overwrite each other's checkpoints and log."""
    record = run_record(run.output)
    if record is not None and record.get('run') != run.id:
        raise SystemExit(f"error: another run ({record.get('run')}) has started in {run.output}: this one ({run.id}) "
                         f"stopped without saving over it; give each run its own --output")


def run_record(output):
    """OUTPUT/args.json, written by the run that last started there (start_output), or None if unreadable."""
    try:
        with open(os.path.join(output, 'args.json')) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None
