"""The run machinery both scripts share: their common flags, the (distributed) run, the recipe and
its schedule, the AMP training step, and fit: the epoch loop with resume and saves.

    run = Run(args)                                       # launch(body, args) makes and closes it
    schedule = Schedule(recipe, len(loader), run.world_size)
    trainer = Trainer(model, schedule, recipe, args, run)   # wraps the model, makes its AdamW
    fit(trainer, loader, loss_fn, resumed, entries)       # resumes, trains, saves
"""
import argparse
import ctypes
import datetime
import inspect
import itertools
import json
import math
import os
import platform
import re
import resource
import signal
import socket
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext

import numpy as np
import timm
import torch
import torch.distributed as dist
import torchvision
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.nn.parallel import DistributedDataParallel

import checkpoints
import models

# The optimization defaults both scripts share (README: the official recipes)
OPTIMIZATION = dict(batch_size=128, lr_scheduler='cosine', multisteps=[], gamma=0.1,
                    weight_decay=0.05, clip_grad=5.0, accumulation_steps=1, seed=0, drop_path=None,
                    amp=None, fsdp=False)


# ---------------------------------------------------------------------------------------------
# Flags both scripts take

class Parser(argparse.ArgumentParser):
    """The flags both scripts take, in groups the scripts add to (.model, .data, .optimization,
    .run); a recipe flag's default is the script's recipe, shown in its help. Errors are one
    line, not the whole usage first."""

    def __init__(self, description, recipe, output, compile, probe=None):
        super().__init__(description=description, formatter_class=HelpFormatter,
                         allow_abbrev=False)  # --lr is no --lr-scheduler
        self.model = self.add_argument_group('model')
        add_model_args(self.model)
        self.data = self.add_argument_group('data')
        add_data_args(self.data)
        self.optimization = self.add_argument_group(
            'optimization (learning rates are per 512 images: lr x effective batch / 512)')
        add_optimization_args(self.optimization)
        self.run = self.add_argument_group('run')
        add_run_args(self.run, output, compile)
        self.recipe, self.probe = recipe, probe

    def parse_args(self, args=None, namespace=None):
        for action in self._actions:  # the recipe's defaults, in the help: set last
            default = self.recipe.get(action.dest)
            if default not in (None, True, False) and 'default' not in (action.help or ''):
                shown = f"default: {default!r}"
                if self.probe and self.probe.get(action.dest, default) != default:
                    shown += f"; --linear-probe: {self.probe[action.dest]!r}"
                action.help = f"{action.help or ''} ({shown})".strip()
        return super().parse_args(args, namespace)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, but None, switches' and those the help gives."""

    def _get_help_string(self, action):
        if action.default in (None, True, False) or 'default' in (action.help or ''):
            return action.help
        return super()._get_help_string(action)


def number(interval, kind=float):
    """An argparse type: a finite number in interval, written '[0, 1]', '(0, 1]', '[1, inf)';
    anything else (NaN and infinity too) is argparse's one-line error."""
    low, high = (float(v) for v in interval[1:-1].split(','))

    def parse(text):
        value = kind(text)
        above = value > low if interval[0] == '(' else value >= low
        below = value < high if interval[-1] == ')' else value <= high
        if not (above and below and math.isfinite(value)):
            at_least = interval[0] == '[' and high == math.inf
            rule = f"at least {low:g}" if at_least else f"in {interval}"
            rule = rule if math.isfinite(value) else 'a finite number'
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse: "invalid int value: 'x'" for no number at all
    return parse


COUNT, SIZE, AMOUNT = number('[0, inf)', int), number('[1, inf)', int), number('[0, inf)')


def intensity_rule(text):
    """--intensity: a rule name, or the value that becomes white."""
    if text in ('type', 'image', 'percentile'):
        return text
    try:
        if 0 < float(text) < math.inf:
            return float(text)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"use type, image, percentile or a number above 0, got {text}")


def add_model_args(g):
    """Unset: the checkpoint's, else the named model's."""
    g.add_argument('--model', choices=list(models.MODELS),
                   help="encoder (default: the checkpoint's, else swin_base)")
    g.add_argument('--img-size', type=SIZE, help="pixels (default: the checkpoint's, else 192 "
                                                 "for Swin pretraining, 224)")
    g.add_argument('--window-size', type=SIZE, help='Swin (default: img size / 32, Swin-L and '
                                                    'SwinV2: / 16)')
    g.add_argument('--patch-size', type=SIZE, help='default: Swin 4, ViT 16')
    g.add_argument('--embed-dim', type=SIZE, help='width of the first stage')
    g.add_argument('--depths', type=SIZE, nargs='+', help='blocks per stage; ViT: one number')
    g.add_argument('--num-heads', type=SIZE, nargs='+', help='heads per stage; ViT: one number')
    g.add_argument('--in-chans', type=SIZE, help='3 RGB (default), 1 grey, any for .npy arrays')
    g.add_argument('--drop-path', type=number('[0, 1)'), help='default: the official config')
    g.add_argument('--use-checkpoint', action='store_true', help='activation checkpointing')


def add_data_args(g):
    g.add_argument('--intensity', type=intensity_rule,
                   help="how deeper images and .npy arrays become 0-1: 'type' (default: their "
                        "type's range; floats their min-max), 'image' (its min-max), "
                        "'percentile' (0.5-99.5), or the value that becomes white (4095)")
    g.add_argument('--batch-size', type=SIZE, help='per process and micro-step')
    g.add_argument('--num-workers', type=COUNT, default=min(8, os.cpu_count() or 1),
                   help='loader processes per GPU (default: 8, or the CPUs if fewer)')
    g.add_argument('--mean', type=number('(-inf, inf)'), nargs='+',
                   help='per channel, of 0-1 pixels (default: ImageNet)')
    g.add_argument('--std', type=number('(0, inf)'), nargs='+', help='default: ImageNet')


def add_optimization_args(g):
    g.add_argument('--epochs', type=SIZE)
    g.add_argument('--warmup-epochs', type=COUNT, help='linear, from --warmup-lr')
    g.add_argument('--base-lr', type=AMOUNT, help='peak lr')
    g.add_argument('--warmup-lr', type=AMOUNT, help='lr at step 0')
    g.add_argument('--min-lr', type=AMOUNT, help='final cosine lr')
    g.add_argument('--lr-scheduler', choices=['cosine', 'multistep'], help='both per step')
    g.add_argument('--multisteps', type=COUNT, nargs='*', help='epochs where the lr x --gamma')
    g.add_argument('--gamma', type=AMOUNT)
    g.add_argument('--weight-decay', type=AMOUNT, help='official exemptions: README, Fidelity')
    g.add_argument('--accumulation-steps', type=SIZE, help='micro-batches per optimizer step')
    g.add_argument('--clip-grad', type=AMOUNT, help='max gradient norm; 0 = none')
    g.add_argument('--max-nonfinite', type=SIZE, default=20,
                   help='stop after this many steps in a row with a non-finite loss or gradient')


def add_run_args(g, output, compile):
    g.add_argument('--fsdp', action='store_true', default=None,
                   help='shard weights, gradients and optimizer state over the processes (FSDP2), '
                        'for models beyond one GPU; under torchrun')
    g.add_argument('--amp', choices=['bf16', 'fp16', 'off'],
                   help='default: bf16 where native (recent GPUs, CPUs with AVX512-BF16 or '
                        'AMX), else fp16 (with a gradient scaler) on GPUs, off on CPUs')
    g.add_argument('--compile', default=compile, choices=['auto', 'on', 'off'],
                   help='torch.compile the training step (the first compiles a minute or two); '
                        'auto: on GPUs, where it was measured faster')
    g.add_argument('--output', default=output, help='checkpoints, logs and pictures')
    g.add_argument('--tensorboard', default='auto', choices=['auto', 'on', 'off'],
                   help="also write log.jsonl's numbers and the pictures for TensorBoard, to "
                        "OUTPUT/tensorboard; auto: where the tensorboard package is installed")
    g.add_argument('--resume', help='checkpoint (default: OUTPUT/checkpoint.pth if any); to use: '
                                    'also a Hugging Face model id or a published name')
    g.add_argument('--accept-changes', action='store_true',
                   help="resume with flags other than the checkpoint's: the schedule from then "
                        "on is the new one")
    g.add_argument('--no-auto-resume', dest='auto_resume', action='store_false',
                   help="start afresh even if OUTPUT holds a checkpoint")
    g.add_argument('--save-freq', type=SIZE, default=5, help='a numbered checkpoint every N epochs')
    g.add_argument('--save-steps', type=COUNT, default=0,
                   help='also save checkpoint.pth every N steps in an epoch; 0: off')
    g.add_argument('--dist-timeout', type=number('[0.1, inf)'), default=30,
                   help='minutes a collective waits for a dead or hung rank')
    g.add_argument('--print-freq', type=SIZE, default=100,
                   help='a log line every N steps; a SIGTERM stops the run at the next')
    g.add_argument('--seed', type=number('[0, 4294967295]', int),
                   help='initialisation, data order, augmentation and masks')
    g.add_argument('--device', help='cuda, cuda:N or cpu (default: cuda when available, under '
                                    'torchrun the local rank\'s GPU)')
    g.add_argument('--allow-pickle', action='store_true',
                   help='load checkpoints holding pickled objects (official SimMIM ones): this '
                        'runs code from the file, only for files you trust')


# ---------------------------------------------------------------------------------------------
# Settings: the recipe, and what a resumed or used checkpoint may not change

def recipe(args, run, defaults, inherited=None):
    """What a run trains and how, which a resumed run keeps: for each key of defaults its flag,
    else inherited's (a checkpoint's), else the default; the effective batch and amp on this run."""
    inherited = inherited or {}
    values = {}
    for key, default in defaults.items():
        values[key] = getattr(args, key, None)
        if values[key] is None:
            values[key] = inherited.get(key)
        if values[key] is None:
            values[key] = default
    values['effective_batch'] = values['batch_size'] * run.world_size * values['accumulation_steps']
    values['amp'] = autocast(values['amp'], run.device)[0]
    for key in ('data_path', 'pretrained'):  # paths, not names, wherever the run is resumed from
        if values.get(key) and os.path.exists(values[key]):
            values[key] = os.path.abspath(values[key])
    return values


def warn_unused(run, args, mode, flags, used=()):
    """A mode (--eval, --stats, ...) names the flags given among these that it does not use."""
    given = [f"--{k.replace('_', '-')}" for k in flags
             if k not in used and getattr(args, k, None) is not None]
    if given:
        run.print(f"warning: {mode} does not use {', '.join(given)}: ignored")


def check_changes(run, path, saved, given, accept, use=False):
    """Refuse to resume path with settings (given; None: not given) other than saved, unless
    --accept-changes; to use it (evaluate, predict, export) with other ones at all."""
    plain = lambda v: list(v) if isinstance(v, (list, tuple)) else v
    shown = lambda v: "''" if v == '' else 'none' if v is None else plain(v)
    name = lambda k: 'the effective batch' if k == 'effective_batch' else '--' + k.replace('_', '-')
    changed = {k: f"{name(k)} {shown(saved[k])} -> {shown(v)}" for k, v in given.items()
               if v is not None and k in saved and plain(saved[k]) != plain(v)}
    if 'pretrained' in changed and not use:  # the weights come from path
        raise ValueError(f"{changed['pretrained']}: a resumed run goes on from the weights of "
                         f"'{path}'; leave --pretrained out to resume it, or start a new run from "
                         f"--pretrained without --resume (another --output, or --no-auto-resume)")
    if not changed:
        return
    changed = ', '.join(changed.values())
    if use and not accept:
        raise ValueError(f"'{path}' was trained with other settings: {changed}; leave these flags "
                         f"out (they come from the checkpoint), or add --accept-changes to use "
                         f"it with them")
    if not accept:
        raise ValueError(f"resuming '{path}' with other settings than it was trained with: "
                         f"{changed}; rerun with the same flags, add --accept-changes to continue "
                         f"on the new settings, or start afresh with another --output (or "
                         f"--no-auto-resume)")
    run.print(f"{'using' if use else 'resuming'} with changed settings (--accept-changes): "
              f"{changed}")


# ---------------------------------------------------------------------------------------------
# The run

class Run:
    """The distributed state from torchrun's environment (or one process), the device, rank-0
    printing and logging, the output folder, and the SIGTERM that schedulers send first."""

    def __init__(self, args):
        self.tensorboard = summary_writer(args.tensorboard)  # the class, or None
        self.board, self.pictures = None, []  # its writer (from start_output), pictures awaiting it
        self.log_offset = 0  # log steps - schedule steps: a resume's steps per epoch may differ
        # torchrun sets RANK and WORLD_SIZE: then the run is distributed, with one process too
        self.distributed = 'RANK' in os.environ and 'WORLD_SIZE' in os.environ
        self.world_size = int(os.environ['WORLD_SIZE']) if self.distributed else 1
        self.rank = int(os.environ['RANK']) if self.distributed else 0
        self.device = pick_device(args.device)
        cuda = self.device.type == 'cuda'
        if cuda:
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = True  # fixed sizes: the fastest patch embedding
        else:  # Swin's shifted-window mask makes float32 denormals: tenfold slower CPU matmuls
            torch.set_flush_denormal(True)
        keep_freed_memory()
        # warnings in one line; DDP's about a 1x1 conv's grad strides on CPU says nothing
        warnings.formatwarning = lambda message, *_: f"warning: {message}\n"
        warnings.filterwarnings('ignore', message='Grad strides do not match bucket view strides')
        # FSDP2's about a block returning a view: ours are never changed in place (FSDP == DDP test)
        warnings.filterwarnings('ignore', message=r'FSDP2-wrapped module \(.*\) returned a view')
        if self.distributed:  # a killed torchrun ends its ranks, also before their first sync
            end_with_parent()
            timeout = datetime.timedelta(minutes=args.dist_timeout)
            dist.init_process_group('nccl' if cuda else 'gloo', timeout=timeout)
        self.main = self.rank == 0
        self.output = args.output
        now = datetime.datetime.now().isoformat(timespec='seconds')
        ids = [f"{socket.gethostname()} pid {os.getpid()} {now} {os.urandom(3).hex()}"]  # rank 0's
        if self.distributed:
            dist.broadcast_object_list(ids, src=0)
        self.id = ids[0]
        self.training = False  # in the loop, where a SIGTERM stops the run at the next log line
        self.sigterm = False  # this process got SIGTERM
        self.stopping = False  # some rank got SIGTERM: what the last sync() agreed on
        self.previous_handler = signal.signal(signal.SIGTERM, self.on_sigterm)
        self.launcher = os.getppid() if self.distributed else None  # torchrun: ranks end with it

    def on_sigterm(self, *_):
        if not self.training:  # before the loop there is nothing to save: stop now
            raise KeyboardInterrupt('SIGTERM')
        self.sigterm = True

    def sync(self, *values):
        """Average numbers over all ranks, and agree on a stop if any rank got SIGTERM. Called at
        log lines, where the loop waits for the device anyway; a rank whose torchrun is gone
        (killed) stops here. -> list of the means."""
        if self.launcher is not None and os.getppid() != self.launcher:
            raise ValueError(f"rank {self.rank}: torchrun, which started this process, is gone: "
                             f"stopped; rerun the command to resume")
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

    def log(self, record, step):
        """One JSON line in OUTPUT/log.jsonl, and its numbers as TensorBoard scalars of the same
        names, at the schedule's global step `step` counted on from the log resumed (rank 0)."""
        step += self.log_offset
        record = dict(record, step=step) if 'step' in record else record
        if self.main:
            self.check_output()
            with open(os.path.join(self.output, 'log.jsonl'), 'a') as f:
                f.write(json.dumps(record) + '\n')
        if self.board:
            for key, value in record.items():
                if key not in ('epoch', 'step') and type(value) in (int, float):
                    self.board.add_scalar(key, value, step)

    def picture(self, name, image, step):
        """An image (C, H, W; 0-1) for TensorBoard at global step `step` (rank 0); before the
        output is claimed (start_output) it waits."""
        if self.main and self.tensorboard:
            self.pictures.append((name, image.cpu(), step + self.log_offset))
            self.show_pictures()

    def show_pictures(self):
        while self.board and self.pictures:
            self.board.add_image(*self.pictures.pop(0))

    def save(self, entries, copies=(), sharded=False):
        """OUTPUT/checkpoint.pth and copies (rank 0; sharded: every rank writes its shards), if
        this run still owns OUTPUT (every rank checks: they stop together)."""
        self.check_output()
        if sharded:
            checkpoints.save_sharded(self.output, entries, copies)
        elif self.main:
            checkpoints.save(self.output, entries, copies)
        if self.board:  # its events up to the checkpoint on disk with it
            self.board.flush()

    def make_output(self):
        """Create --output, or a ValueError saying it cannot be."""
        try:
            os.makedirs(self.output, exist_ok=True)
        except OSError as e:
            raise ValueError(f"--output '{self.output}' is not a folder that can be written "
                             f"({e.strerror}); choose another") from None

    def start_output(self, args, entries, resumed, start, first_epoch):
        """Create --output and claim it: args.json names this run, its series (entries': the run
        that started fresh or from --resume, which reruns continue), flags, settings (entries'
        config and recipe), library versions and the --resume its series of runs started from;
        log.jsonl keeps the records up to log step `start` (the checkpoint resumed) and those of
        the epochs before first_epoch. An unwritable folder fails now, not at the first
        checkpoint."""
        self.make_output()
        if not self.main:
            return
        previous = checkpoints.run_record(self.output) or {}
        started_from = args.resume or (previous.get('started_from') if resumed else None)
        if started_from and os.path.exists(started_from):
            started_from = os.path.abspath(started_from)
        info = dict(run=self.id, series=entries['series'], args=vars(args),
                    config=entries['config'], recipe=entries['recipe'], started_from=started_from,
                    world_size=self.world_size, device=str(self.device),
                    python=platform.python_version(), torch=torch.__version__,
                    torchvision=torchvision.__version__, timm=timm.__version__,
                    command=' '.join(sys.argv))
        text = json.dumps(info, indent=1).encode()
        checkpoints.save_atomic(lambda f: f.write(text), os.path.join(self.output, 'args.json'))
        log, kept = os.path.join(self.output, 'log.jsonl'), []
        if os.path.exists(log):  # records of a killed attempt past the checkpoint: dropped
            with open(log) as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except ValueError:  # a line cut by a kill
                        continue
                    if ('step' in record and record['step'] <= start or
                            'step' not in record and record['epoch'] < first_epoch):
                        kept.append(line)
        checkpoints.save_atomic(lambda f: f.write(''.join(kept).encode()), log)
        if self.tensorboard:  # it hides the events of steps past `start` (a killed attempt's)
            folder = os.path.join(self.output, 'tensorboard')
            try:
                self.board = self.tensorboard(folder, purge_step=start + 1 if resumed else 0)
            except OSError as e:
                raise ValueError(f"cannot write {folder} ({e.strerror or e}): fix it, or pass "
                                 f"--tensorboard off") from None
            self.show_pictures()

    def check_output(self):
        """Stop if another run has started in --output since this one (its args.json names it):
        two runs into one folder would overwrite each other's checkpoints and log."""
        record = checkpoints.run_record(self.output)
        if record is not None and record.get('run') != self.id:
            raise ValueError(f"another run ({record.get('run')}) has started in {self.output}: "
                             f"this one ({self.id}) stopped without saving over it; give each "
                             f"run its own --output")

    def close(self):
        if self.board:
            self.board.close()
        if not self.sigterm:  # once signalled, a second SIGTERM at exit must not kill the stop
            signal.signal(signal.SIGTERM, self.previous_handler)
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def summary_writer(choice):
    """torch's TensorBoard SummaryWriter for --tensorboard, or None (off; auto without the
    tensorboard package)."""
    if choice == 'off':
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception as e:  # not installed; a broken install (protobuf's versions)
        missing = isinstance(e, ImportError)
        why = 'the tensorboard package' if missing else \
            f'a tensorboard that imports ({str(e).splitlines()[0][:100]})'
        if choice == 'on':
            raise ValueError(f"--tensorboard on needs {why}: pip install tensorboard (or leave the "
                             f"flag out)") from None
        if not missing:
            warnings.warn(f"no TensorBoard: it needs {why} (--tensorboard off: no warning)")
        return None
    return SummaryWriter


def pick_device(name):
    """--device: cuda, cuda:N or cpu; by default cuda where there is a GPU (the local rank's)."""
    if name is not None and not re.fullmatch(r'cpu|cuda(:\d+)?', name):
        raise ValueError(f"--device '{name}': use cuda, cuda:N or cpu")
    if name is not None and name.startswith('cuda') and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no GPU here; use --device cpu or a CUDA "
                         "build of torch on a machine with a GPU")
    if name is not None and ':' in name:
        index, count = int(name.split(':')[1]), torch.cuda.device_count()
        if index >= count:
            raise ValueError(f"--device {name}, but torch sees {count} GPU(s) here: cuda:0 to "
                             f"cuda:{count - 1}")
        if int(os.environ.get('LOCAL_WORLD_SIZE', 1)) > 1:
            raise ValueError(f"--device {name} would put every process of this machine on one "
                             f"GPU: use --device cuda (each process its local rank's)")
        return torch.device(name)
    cuda = torch.cuda.is_available() if name is None else name.startswith('cuda')
    return torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else 'cpu')


@contextmanager
def gradient_sync_off(model):
    """FSDP: gradients kept unsharded and unreduced until the block ends (accumulation)."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def keep_freed_memory():
    """glibc keeps freed memory for reuse (this process and its loader workers) instead of
    unmapping every large tensor and faulting it in again on the next step: on CPUs the training
    step's largest lever (README: Performance)."""
    try:
        libc = ctypes.CDLL('libc.so.6')
    except OSError:  # not glibc (macOS, musl)
        return
    libc.mallopt(-4, 0)  # M_MMAP_MAX: no allocation gets its own mapping
    libc.mallopt(-1, 2 ** 31 - 1)  # M_TRIM_THRESHOLD: keep up to 2 GB of free heap


def end_with_parent():
    """SIGTERM to this process when its parent (torchrun) ends (Linux): a rank still starting
    stops at once, a training one at its next log line. (One killed in the first seconds, while
    Python imports, is not reached: its parent's pid is not known to check against.)"""
    try:
        ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux with glibc
        pass


def launch(body, args):
    """The scripts' entry: body(args, run) in a Run that is always closed. A ValueError (what the
    user can fix: flags, data, checkpoints, disks) and Ctrl-C end the process in one line."""
    run = None
    try:
        run = Run(args)
        body(args, run)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt as e:  # Ctrl-C, or Run.on_sigterm's before the loop
        what = 'SIGTERM' if str(e) == 'SIGTERM' else 'interrupted (Ctrl-C)'
        if run is None or not run.training:
            raise SystemExit(f"{what} before training started: stopped; nothing was trained or "
                             f"saved") from None
        raise SystemExit(f"{what}: the checkpoints in {args.output} are whole; rerun the same "
                         f"command to resume from the last one") from None
    finally:
        if run is not None:
            run.close()


def autocast(amp, device):
    """--amp resolved for the device (bf16 where native, else fp16 on GPU, off on CPU) and its
    autocast context."""
    if amp is None and device.type == 'cuda':
        amp = 'bf16' if torch.cuda.is_bf16_supported() else 'fp16'
    elif amp is None:
        checks = ('_is_avx512_bf16_supported', '_is_amx_tile_supported')
        amp = 'bf16' if any(getattr(torch.cpu, f, lambda: False)() for f in checks) else 'off'
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(amp)
    return amp, torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def wrap(model, run, compile='off', amp='off', fsdp=False):
    """FSDP2 when fsdp (each block sharded, then the whole model: in place), else
    DistributedDataParallel when distributed (its buckets hold the gradients; the models'
    buffers are constants, not re-broadcast; BatchNorm's statistics: Trainer.average_statistics);
    then torch.compile if compile is 'on', or 'auto' on a GPU without fsdp (compiling the DDP
    wrapper keeps its reductions overlapping the backward)."""
    if fsdp:
        if not run.distributed or amp == 'fp16':
            raise ValueError("--fsdp shards over the processes of a torchrun (one process too: "
                             "torchrun --nproc_per_node 1) and computes in bf16 or float32, not "
                             "fp16: start it with torchrun, --amp bf16 or off")
        for tensor in model.state_dict().values():  # rank 0's initialisation, as DDP takes it
            dist.broadcast(tensor, src=0)
        dtype = torch.bfloat16 if amp == 'bf16' else None  # weights gathered in bf16
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in models.blocks(model):
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        if hasattr(model, 'reconstruct'):
            register_fsdp_forward_method(model, 'reconstruct')
        compile = 'off' if compile == 'auto' else compile
    elif run.distributed:
        switch = 'forward_sync_buffers'  # torch >= 2.14; earlier: broadcast_buffers
        if switch not in inspect.signature(DistributedDataParallel).parameters:
            switch = 'broadcast_buffers'
        ids = [run.device.index] if run.device.type == 'cuda' else None
        model = DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True,
                                        **{switch: False})
    if compile == 'on' or compile == 'auto' and run.device.type == 'cuda':
        run.print("torch.compile: the first step compiles the model (a minute or two); "
                  "--compile off runs eager")
        model = torch.compile(model)
    return model


# ---------------------------------------------------------------------------------------------
# Optimizer, schedule, training step

def build_optimizer(groups, lr, momentum=None):
    """Fused AdamW (one kernel per step, and it can skip a step on the device: Trainer.step) over
    parameter groups (models.param_groups); with a momentum, SGD (linear probes)."""
    if momentum is not None:
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, fused=True)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=True)


class Schedule:
    """A recipe's numbers on this run: optimizer steps per epoch (of `batches` per process), the
    lrs scaled from per 512 images to the effective batch; scheduler(optimizer) steps per step."""

    def __init__(self, recipe, batches, world_size=1):
        r = self.recipe = recipe
        self.world_size, self.epochs = world_size, r['epochs']
        self.steps_per_epoch = batches // r['accumulation_steps']
        batch = r['effective_batch'] // (world_size * r['accumulation_steps'])
        if self.steps_per_epoch == 0:
            raise ValueError(f"a training step needs {r['accumulation_steps']} full batch(es) of "
                             f"{batch} images on each of {world_size} process(es), and the images "
                             f"make {batches} per process: lower --batch-size or add images")
        if (r['lr_scheduler'] == 'multistep') != bool(r['multisteps']):
            raise ValueError("--multisteps (the epochs where the lr drops by --gamma) go with "
                             "--lr-scheduler multistep, and it needs them")
        if r['multisteps'] and max(r['multisteps']) >= r['epochs']:
            raise ValueError(f"--multisteps {max(r['multisteps'])} is not before --epochs "
                             f"{r['epochs']}: the lr would never drop there")
        scale = r['effective_batch'] / 512
        self.lr = r['base_lr'] * scale
        self.warmup_lr, self.min_lr = r['warmup_lr'] * scale, r['min_lr'] * scale

    def __str__(self):
        r = self.recipe
        batch = r['effective_batch'] // (self.world_size * r['accumulation_steps'])
        warning = ''
        if r['warmup_epochs'] >= r['epochs']:
            warning = f"; warning: --warmup-epochs {r['warmup_epochs']} is not below --epochs " \
                      f"{r['epochs']}, so the lr never reaches its peak"
        return (f"world size {self.world_size} x batch {batch} x accumulation "
                f"{r['accumulation_steps']} = effective batch {r['effective_batch']}; "
                f"{self.steps_per_epoch} steps per epoch; lr {self.lr:.3g} (= {r['base_lr']:g} x "
                f"{r['effective_batch']} / 512), warmup lr {self.warmup_lr:.3g}, min lr "
                f"{self.min_lr:.3g}{warning}")

    def scheduler(self, optimizer):
        """timm's per-step schedule (step_update), applying each group's lr_scale: linear warmup
        from the warmup lr, then cosine from step 0 to the min lr (the official settings), or
        multistep."""
        steps, r = self.steps_per_epoch, self.recipe
        warmup = dict(warmup_t=r['warmup_epochs'] * steps, warmup_lr_init=self.warmup_lr,
                      warmup_prefix=False, t_in_epochs=False)  # positions count from step 0
        if r['lr_scheduler'] == 'cosine':
            return CosineLRScheduler(optimizer, t_initial=r['epochs'] * steps, lr_min=self.min_lr,
                                     cycle_limit=1, **warmup)
        # timm decays at milestone - 1; the official scheduler at the milestone itself
        decay_t = [m * steps + 1 for m in r['multisteps']]
        return MultiStepLRScheduler(optimizer, decay_t=decay_t, decay_rate=r['gamma'], **warmup)


class Trainer:
    """The training step: autocast, accumulation without gradient reduction on micro-steps,
    unscale, clip, skip and count non-finite steps, lr per step. Nothing in it waits for the
    device. .model is the model as saved (sharded in place with --fsdp); .wrapped as trained
    (DDP, torch.compile). Its optimizer: AdamW (with a momentum: SGD) over the model's parameter
    groups (the recipe's weight decay and layer decay), made once the model is sharded."""

    def __init__(self, model, schedule, recipe, args, run, momentum=None):
        self.model, self.schedule, self.recipe = model, schedule, recipe
        self.args, self.run = args, run
        self.amp, self.autocast = autocast(recipe['amp'], run.device)
        self.sharded = bool(recipe.get('fsdp'))
        compile = getattr(args, 'compile', 'off')
        self.wrapped = wrap(model, run, compile, self.amp, self.sharded)
        groups = models.param_groups(model, recipe['weight_decay'], recipe.get('layer_decay'))
        self.optimizer = build_optimizer(groups, schedule.lr, momentum)
        self.scheduler = schedule.scheduler(self.optimizer)
        self.scaler = torch.amp.GradScaler(run.device.type, enabled=self.amp == 'fp16')
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.nonfinite = torch.zeros(3, device=run.device)  # streak, longest streak, total
        self.steps_run = 0  # by this process
        self.epoch_loss = torch.zeros((), device=run.device)  # this epoch's sum, and its steps
        self.epoch_steps = 0

    def step(self, step, micro_batches, loss_fn):
        """One optimizer step over micro_batches; loss_fn(batch) -> scalar loss.
        -> (mean loss, grad norm) tensors."""
        # As the official loop, which sets step k + 1's lr after step k: steps 0, 1 at the warmup lr
        self.scheduler.step_update(max(step - 1, 0))
        total = 0.
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with self.no_sync(last):
                with self.autocast:
                    loss = loss_fn(batch)
                self.scaler.scale(loss / len(micro_batches)).backward()
            total += loss.detach()
        self.scaler.unscale_(self.optimizer)
        clip = self.recipe['clip_grad'] or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        if hasattr(grad_norm, 'full_tensor'):  # FSDP: the global norm, over all shards
            grad_norm = grad_norm.full_tensor()
        # a non-finite loss counts too (its gradients can be finite); the same on all ranks
        bad = (~torch.isfinite(grad_norm + total)).float()
        if self.run.distributed:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        # The fused optimizer skips the update on the device when found_inf is 1 (GradScaler's
        # protocol): no step waits for this check; check_nonfinite() reads the counts at log lines.
        self.optimizer.found_inf = bad
        self.optimizer.step()
        del self.optimizer.found_inf
        self.scaler.update()  # fp16: a lower loss scale after an overflow (found by unscale_)
        streak = (self.nonfinite[0] + bad) * bad
        longest = torch.maximum(self.nonfinite[1], streak)
        self.nonfinite = torch.stack((streak, longest, self.nonfinite[2] + bad))
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_run += 1
        return total / len(micro_batches), grad_norm

    def average_statistics(self):
        """BatchNorm's running statistics (the linear probe's head) averaged over the ranks, each
        of which updated its own from its own batches: before a validation or a save."""
        if not self.run.distributed:
            return
        for module in self.model.modules():
            for name in ('running_mean', 'running_var'):
                stat = getattr(module, name, None)
                if stat is not None:
                    dist.all_reduce(stat)
                    stat.div_(self.run.world_size)

    def check_nonfinite(self, step, final=False):
        """-> the number of skipped non-finite steps; a ValueError after --max-nonfinite of them
        in a row, and at the end (final) if every step this process ran was skipped."""
        streak, longest, total = (int(v) for v in self.nonfinite.tolist())
        if longest >= self.args.max_nonfinite or final and 0 < self.steps_run <= streak:
            raise ValueError(f"{longest} consecutive steps with a non-finite loss or gradient "
                             f"(seen by step {step}): training diverged; lower --base-lr, keep "
                             f"--clip-grad, or use --amp bf16/off; resume from the last checkpoint")
        return total

    def no_sync(self, last):
        """No gradient reduction on the micro-steps before the last of a step."""
        if last or not self.run.distributed:
            return nullcontext()
        if self.sharded:
            return gradient_sync_off(self.model)
        return self.wrapped.no_sync()

    def state_dict(self):
        """The checkpoint's 'model', 'optimizer' and 'trainer' entries; with --fsdp the first
        two sharded (torch.distributed.checkpoint's, by parameter name)."""
        streak, _, total = (int(v) for v in self.nonfinite.tolist())
        trainer = dict(scaler=self.scaler.state_dict(), nonfinite_total=total,
                       nonfinite_streak=streak, epoch_loss=self.epoch_loss.item(),
                       epoch_steps=self.epoch_steps)
        if self.sharded:
            model, optimizer = get_state_dict(self.model, self.optimizer)
        else:
            model, optimizer = self.model.state_dict(), self.optimizer.state_dict()
        return dict(model=model, optimizer=optimizer, trainer=trainer)

    def load_state_dict(self, checkpoint):
        """A checkpoint's (checkpoints.Checkpoint) weights, optimizer state and counts; the
        groups' weight decay and lr scale stay this run's (--accept-changes)."""
        saved, path = checkpoint.saved, checkpoint.path
        if self.sharded != ('sharded' in saved):
            raise ValueError(f"'{path}' was saved {'with' if 'sharded' in saved else 'without'} "
                             f"--fsdp: resume it so, or start from its weights (--pretrained)")
        keep = [(g['weight_decay'], g['lr_scale']) for g in self.optimizer.param_groups]
        try:
            if self.sharded:
                model, optimizer = get_state_dict(self.model, self.optimizer)
                checkpoints.load_shards(checkpoint, dict(model=model, optimizer=optimizer))
                set_state_dict(self.model, self.optimizer, model_state_dict=model,
                               optim_state_dict=optimizer)
            else:
                self.model.load_state_dict(saved['model'])
                self.optimizer.load_state_dict(saved['optimizer'])
        except checkpoints.Corrupt:  # its files, not the model
            raise
        except (RuntimeError, ValueError, KeyError) as e:
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()][:3]
            raise ValueError(f"checkpoint '{path}' does not fit this model and optimizer "
                             f"({'; '.join(lines)[:500]}); resume it with the architecture it was "
                             f"trained with (leave the model's flags out)") from None
        for group, (weight_decay, lr_scale) in zip(self.optimizer.param_groups, keep):
            group.update(weight_decay=weight_decay, lr_scale=lr_scale)
        state = saved['trainer']
        if state['scaler'] and self.scaler.is_enabled():  # fp16 before and now, else anew
            self.scaler.load_state_dict(state['scaler'])
        streak = state.get('nonfinite_streak', 0)  # a resumed run continues it
        self.nonfinite = torch.tensor([streak, streak, state['nonfinite_total']],
                                      dtype=self.nonfinite.dtype, device=self.run.device)
        self.epoch_loss.fill_(state.get('epoch_loss', 0.))  # older checkpoints: none counted
        self.epoch_steps = state.get('epoch_steps', 0)


# ---------------------------------------------------------------------------------------------
# The loop

def fit(trainer, loader, loss_fn, resumed, entries, end_epoch=None):
    """Train for the epochs of trainer's schedule, from the start or from where resumed (a
    checkpoint of ours) stopped: its weights, optimizer state and position restored, the log kept
    up to it. OUTPUT/checkpoint.pth = entries and the training state after each epoch, every
    --save-steps steps and at a SIGTERM inside one; ckpt_epoch_N.pth every --save-freq epochs.
    end_epoch(epoch, numbered) after each epoch's steps -> more copies (e.g. ['best.pth']); it may
    update entries. -> True when done, False when stopped by a SIGTERM."""
    run, args, schedule = trainer.run, trainer.args, trainer.schedule
    start_epoch, start_step, logged = resume(trainer, resumed) if resumed else (0, 0, 0)
    run.log_offset = logged - (start_epoch * schedule.steps_per_epoch + start_step)
    series = resumed.saved.get('series') if resumed and resumed.continues else run.id
    run.start_output(args, dict(entries, series=series), bool(resumed), logged, start_epoch)

    def state(epoch, step):
        return dict(entries, **trainer.state_dict(), epoch=epoch, step=step, series=series,
                    steps_per_epoch=schedule.steps_per_epoch,
                    logged_steps=epoch * schedule.steps_per_epoch + step + run.log_offset)

    run.training = True  # from here a SIGTERM saves and stops the run at the next log line
    latest = os.path.join(args.output, 'checkpoint.pth')
    if start_epoch == schedule.epochs and resumed.continues and run.main and \
            os.path.abspath(resumed.path) != os.path.abspath(latest):
        checkpoints.copy(resumed.path, latest)  # finished; a damaged checkpoint.pth passed over
    for epoch in range(start_epoch, schedule.epochs):
        first = start_step if epoch == start_epoch else 0
        if not train_one_epoch(trainer, loader, loss_fn, epoch, state, first):
            return False
        numbered = (epoch + 1) % args.save_freq == 0 or epoch + 1 == schedule.epochs
        copies = end_epoch(epoch, numbered) if end_epoch else []
        copies = [f'ckpt_epoch_{epoch}.pth'] * numbered + copies
        run.save(state(epoch, schedule.steps_per_epoch), copies, trainer.sharded)
        if run.stopping and epoch + 1 < schedule.epochs:  # after the last epoch: done
            run.print(f"SIGTERM: stopped after epoch {epoch}; {how_to_resume(args)}")
            return False
    trainer.check_nonfinite(schedule.epochs * schedule.steps_per_epoch, final=True)
    return True


def how_to_resume(args):
    if args.auto_resume:
        return "rerun the same command to resume"
    return "rerun the command without --no-auto-resume to resume (with it, it starts afresh)"


def resume(trainer, checkpoint):
    """Restore the weights and training state of a checkpoint of ours. -> (epoch, step) to go on
    from: after a completed epoch, or inside one (--save-steps, SIGTERM), which only the same
    batches per step can continue (the images the epoch has seen are skipped by count); and the
    steps its log counts (other steps per epoch before: --accept-changes, other data)."""
    saved, path = checkpoint.saved, checkpoint.path
    trainer.load_state_dict(checkpoint)
    epoch, steps = saved['epoch'], saved['steps_per_epoch']
    step = saved.get('step', steps)
    keys = 'batch_size', 'accumulation_steps', 'effective_batch'
    batch = [checkpoint.recipe[k] for k in keys]
    if step < steps and batch != [trainer.recipe[k] for k in keys]:
        world = batch[2] // (batch[0] * batch[1])
        raise ValueError(f"'{path}' stopped inside epoch {epoch} with another batch (per process "
                         f"and step: {batch[0]} x {batch[1]}, in all {batch[2]}); resume it with "
                         f"the same one (--batch-size {batch[0]} --accumulation-steps {batch[1]} "
                         f"on {world} processes), or from the end of an epoch (a ckpt_epoch_N.pth)")
    if step < steps and steps != trainer.schedule.steps_per_epoch:
        raise ValueError(f"'{path}' stopped inside an epoch of {steps} steps; the data now make "
                         f"{trainer.schedule.steps_per_epoch}: resume with the same images, or "
                         f"from the end of an epoch (a ckpt_epoch_N.pth)")
    position = (epoch, step) if step < steps else (epoch + 1, 0)
    if position > (trainer.schedule.epochs, 0):
        where = f"epoch {epoch} step {step}" if step < steps else f"the end of epoch {epoch}"
        raise ValueError(f"'{path}' is past the end of --epochs {trainer.schedule.epochs} (it "
                         f"is at {where}): nothing to train; give --epochs {position[0] + 1} "
                         f"or more, or start afresh")
    trainer.run.print(f"resumed from {path} at epoch {position[0]}"
                      + (f" step {position[1]}" if position[1] else ''))
    return (*position, saved.get('logged_steps', epoch * steps + step))


def train_one_epoch(trainer, loader, loss_fn, epoch, state, start=0):
    """Steps start.. of one epoch of trainer.step over loader's batches (their 3rd item counts
    skipped files; loss_fn may add those it finds unreadable). Every --print-freq steps and at
    the epoch's end a log line, where the ranks also agree on a SIGTERM stop; inside the epoch
    checkpoint.pth = state(epoch, steps done) then, and every --save-steps steps. -> True, or
    False when stopped inside the epoch."""
    run, args, recipe = trainer.run, trainer.args, trainer.recipe
    steps, accumulation = trainer.schedule.steps_per_epoch, recipe['accumulation_steps']
    trainer.wrapped.train()
    loader.sampler.set_epoch(epoch, skip=start * accumulation * recipe['batch_size'])
    batches = iter(itertools.islice(loader, (steps - start) * accumulation))
    epoch_start = time.time()
    if start == 0:  # else the checkpoint's sum of the steps before it
        trainer.epoch_loss.zero_()
        trainer.epoch_steps = 0
    since_log = new_interval(run)
    for it in range(start, steps):
        t = time.time()
        micro = [next(batches) for _ in range(accumulation)]
        since_log['data_s'] += time.time() - t
        step = epoch * steps + it
        seed = hash((recipe['seed'], step, run.rank)) & 0xFFFF_FFFF  # drop path, mixup
        torch.manual_seed(seed)
        np.random.seed(seed)
        loss, grad_norm = trainer.step(step, micro, loss_fn)
        since_log['skipped'] += sum(int(b[2].sum()) for b in micro)  # loss_fn may count more
        trainer.epoch_loss += loss
        trainer.epoch_steps += 1
        since_log['loss'] += loss
        since_log['steps'] += 1
        if (it + 1) % args.print_freq == 0 or it + 1 == steps:
            log_step(trainer, since_log, epoch, it, grad_norm)
            since_log = new_interval(run)
        save_now = args.save_steps and (it + 1) % args.save_steps == 0
        if it + 1 < steps and (run.stopping or save_now):
            mean, = run.sync(trainer.epoch_loss.item())  # each rank resumes with the ranks' mean
            trainer.epoch_loss.fill_(mean)
            trainer.average_statistics()
            run.save(state(epoch, it + 1), sharded=trainer.sharded)
            if run.stopping:
                run.print(f"SIGTERM: stopped after step {it + 1} of epoch {epoch}; "
                          f"{how_to_resume(args)}")
                return False
    mean_loss, = run.sync(trainer.epoch_loss.item() / trainer.epoch_steps)
    trainer.average_statistics()
    seconds = time.time() - epoch_start
    run.print(f"epoch {epoch} done in {datetime.timedelta(seconds=int(seconds))}: mean loss "
              f"{mean_loss:.4f}")
    run.log(dict(epoch=epoch, epoch_loss=mean_loss, epoch_time_s=seconds), (epoch + 1) * steps)
    return True


def new_interval(run):
    return dict(loss=torch.zeros((), device=run.device), steps=0, data_s=0., start=time.time(),
                skipped=0)


def log_step(trainer, since_log, epoch, it, grad_norm):
    """The log line and log.jsonl record of the steps since the last; the ranks agree on a
    SIGTERM stop here."""
    run, schedule = trainer.run, trainer.schedule
    elapsed, n = time.time() - since_log['start'], since_log['steps']
    loss, skipped = run.sync(since_log['loss'].item() / n, since_log['skipped'])
    step = epoch * schedule.steps_per_epoch + it + 1
    lr = max(g['lr'] for g in trainer.optimizer.param_groups)
    r = dict(epoch=epoch, step=step, loss=loss, lr=lr, grad_norm=float(grad_norm),
             images_per_s=n * trainer.recipe['effective_batch'] / elapsed,
             data_s=since_log['data_s'] / n, peak_mem_gb=peak_memory_gb(run.device),
             skipped_files=round(skipped * run.world_size),
             nonfinite_steps=trainer.check_nonfinite(step))
    left = (schedule.epochs * schedule.steps_per_epoch - step) * elapsed / n
    eta = datetime.timedelta(seconds=int(left))
    line = (f"epoch {epoch}/{schedule.epochs} step {it + 1}/{schedule.steps_per_epoch} loss "
            f"{loss:.4f} lr {lr:.3g} grad {r['grad_norm']:.3f} {r['images_per_s']:.1f} img/s data "
            f"{r['data_s']:.3f}s mem {r['peak_mem_gb']:.2f}GB eta {eta}")
    if r['skipped_files']:
        line += f" skipped files {r['skipped_files']}"
    if r['nonfinite_steps']:
        line += f" non-finite steps {r['nonfinite_steps']}"
    run.print(line)
    run.log(r, step)


def peak_memory_gb(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # max RSS, KiB on Linux
