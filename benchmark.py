"""Benchmarks: the SimMIM training step, side by side with microsoft/SimMIM's, and the data pipeline.

    python benchmark.py --model swin_base --batch-size 8 --amp bf16 off          # our training step, one row per AMP
    python benchmark.py --official ../SimMIM --amp bf16 off --rounds 3           # ours and the official, ratios
    python benchmark.py --data --num-workers 2                                   # decoded, augmented, masked images/s

A training step is forward, backward and the optimizer on fixed random images and SimMIM masks, as each code base runs
it: ours is pretrain.py's Trainer.step, the official one main_simmim.py's (see training_step). Its time is the median
of --steps steps after --warmup. Each measurement runs in a fresh process (peak memory is per process), alternating
the implementations round by round, since absolute times on shared machines drift: the ratio of step times is the
figure. On a GPU the table adds the model FLOPs utilisation: counted FLOPs per image x images/s over the measured bf16
matrix-product rate. --official points at a checkout of microsoft/SimMIM; its models/ folder is imported from there,
never copied here.
"""
import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import data
import models
import pretrain
from pretrain import autocast


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='swin_base', choices=list(models.MODELS))
    p.add_argument('--img-size', type=int, default=None, help='default: 192 Swin, 224 ViT')
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--amp', nargs='+', default=['bf16', 'off'], choices=['bf16', 'fp16', 'off'])
    p.add_argument('--compile', action='store_true', help='torch.compile the model (ours only)')
    p.add_argument('--fused', default='auto', choices=['auto', 'on', 'off'],
                   help='our scaled_dot_product_attention: auto = on GPUs only, as the scripts do')
    p.add_argument('--steps', type=int, default=5, help='timed steps; the median is reported')
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--rounds', type=int, default=1, help='repeat every measurement, alternating implementations')
    p.add_argument('--official', default=None, metavar='PATH', help='a microsoft/SimMIM checkout to compare with')
    p.add_argument('--impls', nargs='+', choices=['ours', 'official', 'ours-model'],
                   help='default: ours, and official with --official; ours-model = our model in the official step')
    p.add_argument('--device', default=None, help='cuda or cpu (default: cuda when available)')
    p.add_argument('--data', action='store_true', help='benchmark the data pipeline instead')
    p.add_argument('--num-workers', type=int, default=2, help='data pipeline: loader processes')
    p.add_argument('--images', type=int, default=256, help='data pipeline: generated ImageNet-size JPEGs')
    p.add_argument('--child', nargs=2, help=argparse.SUPPRESS)  # one measurement (impl, amp), in a child process
    return p


def official_simmim(path, name, img_size):
    """microsoft/SimMIM's SimMIM model, built from its own code with the architecture of our named model."""
    spec = importlib.util.spec_from_file_location('official_models', os.path.join(path, 'models', '__init__.py'),
                                                  submodule_search_locations=[os.path.join(path, 'models')])
    package = importlib.util.module_from_spec(spec)
    sys.modules['official_models'] = package
    spec.loader.exec_module(package)
    simmim = sys.modules['official_models.simmim']
    family, kw = models.model_kwargs(name, img_size, pretrain=True)
    if family == models.VIT:
        encoder = simmim.VisionTransformerForSimMIM(
            img_size=kw['img_size'], patch_size=16, embed_dim=kw['embed_dim'], depth=kw['depth'],
            num_heads=kw['num_heads'], mlp_ratio=4, qkv_bias=True, init_values=0.1, use_abs_pos_emb=False,
            use_rel_pos_bias=False, use_shared_rel_pos_bias=True, use_mean_pooling=False, num_classes=0,
            drop_path_rate=kw['drop_path_rate'])
        return simmim.SimMIM(encoder, 16)
    if family != models.SWIN:
        raise SystemExit("error: microsoft/SimMIM has no SwinV2; compare a swin_* or vit_* model")
    encoder = simmim.SwinTransformerForSimMIM(
        img_size=kw['img_size'], patch_size=4, in_chans=3, num_classes=0, embed_dim=kw['embed_dim'],
        depths=list(kw['depths']), num_heads=list(kw['num_heads']), window_size=kw['window_size'], mlp_ratio=4.,
        qkv_bias=True, qk_scale=None, drop_rate=0., drop_path_rate=kw['drop_path_rate'], ape=False, patch_norm=True)
    return simmim.SimMIM(encoder, 32)


def training_step(args, impl, amp, device):
    """-> a function running one training step of impl on fixed random images and SimMIM masks.

    ours: pretrain.py's Trainer.step on our model (fused AdamW, clipping, non-finite steps skipped on the device).
    official: microsoft/SimMIM's model in main_simmim.py's step: AdamW as its build_optimizer makes it (torch's default
    implementation), clip_grad_norm_(5.0), loss.item(); native autocast + GradScaler stand in for its apex amp.
    ours-model: our model in that official step, which separates what the model code gives from what the step gives.
    """
    if impl == 'ours':
        pretrain.tune_cpu()  # as the scripts do; the official step runs as main_simmim.py does, without
    torch.manual_seed(0)
    official_model = impl == 'official'
    model = official_simmim(args.official, args.model, args.img_size) if official_model \
        else models.build_simmim(args.model, args.img_size)
    model.to(device).train()
    if not official_model:
        models.use_fused_attention(model, device.type == 'cuda' if args.fused == 'auto' else args.fused == 'on')
    step_model = torch.compile(model) if args.compile and not official_model else model
    size = model.encoder.patch_embed.img_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    patch = model.encoder.patch_embed.patch_size
    masks = data.MaskGenerator(size, 32, patch[0] if isinstance(patch, (tuple, list)) else patch, 0.6)
    x = torch.randn(args.batch_size, 3, size, size, device=device)
    mask = torch.stack([masks() for _ in range(args.batch_size)]).to(device)

    if impl == 'ours':
        targs = pretrain.get_args_parser().parse_args(['--amp', amp])
        targs.lr, targs.warmup_lr_scaled, targs.min_lr_scaled = 1e-4, 1e-7, 1e-6
        optimizer = pretrain.build_optimizer(model, targs)
        run = type('run', (), dict(device=device, distributed=False))()
        trainer = pretrain.Trainer(step_model, optimizer, pretrain.build_scheduler(optimizer, targs, 1000), targs, run)
        return lambda i: trainer.step(i, [(x, mask)], lambda batch: step_model(*batch))

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
    _, amp_context = autocast(amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == 'fp16')

    def official_step(i):
        with amp_context:
            loss = step_model(x, mask)
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        scaler.step(optimizer)
        scaler.update()
        loss.item()
    return official_step


def measure_step(args, impl, amp):
    """-> one result dict: median step time, images/s and peak memory of this process."""
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    step = training_step(args, impl, amp, device)
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        step(i)
        if device.type == 'cuda':
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times[args.warmup:])
    memory = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == 'cuda' \
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    return dict(impl=impl, amp=amp, seconds=seconds, images_per_s=args.batch_size / seconds, peak_gb=memory,
                device=torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu')


def flops_per_image(args):
    """Forward and backward FLOPs of one image through our model, as torch's FlopCounterMode counts them."""
    model = models.build_simmim(args.model, args.img_size)
    models.use_fused_attention(model, False)
    size = model.encoder.patch_embed.img_size[0]
    patch = model.encoder.patch_embed.patch_size[0]
    mask = data.MaskGenerator(size, 32, patch, 0.6)()[None]
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, size, size), mask).backward()
    return counter.get_total_flops()


def bf16_matmul_peak(n=8192, repeats=50):
    """The measured bf16 matrix-product rate of this GPU, FLOP/s."""
    a, b = (torch.randn(n, n, device='cuda', dtype=torch.bfloat16) for _ in range(2))
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * repeats / (time.perf_counter() - start)


def benchmark_steps(args):
    impls = args.impls or ['ours'] + (['official'] if args.official else [])
    if any(i != 'ours' for i in impls) and not args.official:
        raise SystemExit("error: the official step needs --official PATH, a checkout of microsoft/SimMIM")
    results = []
    for _ in range(args.rounds):
        for amp in args.amp:
            for impl in impls:
                child = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], '--child', impl, amp]
                out = subprocess.run(child, capture_output=True, text=True)
                if out.returncode:
                    raise SystemExit(out.stderr[-2000:])
                results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    cuda = results[0]['device'] != 'cpu'
    flops = flops_per_image(args)
    peak = bf16_matmul_peak() if cuda else None
    print(f"{args.model}, {args.img_size or 'default'} px, batch {args.batch_size}, training step (forward, backward, "
          f"optimizer), median of {args.steps} after {args.warmup} warm-up, {args.rounds} round(s), "
          f"{results[0]['device']}" + (', torch.compile' if args.compile else '') +
          f", our fused attention: {args.fused}; {flops / 1e9:.2f} GFLOPs per image (forward + backward, counted)" +
          (f"; bf16 matmul peak measured {peak / 1e12:.0f} TFLOP/s" if cuda else ''))
    print('| implementation | amp | step s | images/s | peak GB | vs official fp32 | vs official, same amp |'
          + (' MFU |' if cuda else ''))
    print('| --- | --- | ---: | ---: | ---: | ---: | ---: |' + (' ---: |' if cuda else ''))
    summary = {}
    for r in results:
        summary.setdefault((r['impl'], r['amp']), []).append(r)
    base = summary.get(('official', 'off'))
    for (impl, amp), rs in summary.items():
        s = statistics.median(r['seconds'] for r in rs)
        same = summary.get(('official', amp))
        ratio = lambda ref: f"{statistics.median(r['seconds'] for r in ref) / s:.2f}x" if ref else '-'
        print(f"| {impl} | {amp} | {s:.3f} | {args.batch_size / s:.2f} | {max(r['peak_gb'] for r in rs):.2f} | "
              f"{ratio(base)} | {ratio(same)} |" + (f" {args.batch_size / s * flops / peak:.1%} |" if cuda else ''))


def benchmark_data(args):
    """Decoded, augmented and masked images/s through the real loader, on generated ImageNet-size JPEGs."""
    pretrain.tune_cpu()  # as the scripts do: the workers inherit it
    with tempfile.TemporaryDirectory(prefix='simmim_data_') as folder:
        rate = data_rate(args, folder)
    print(f"data pipeline: {rate:.0f} images/s with {args.num_workers} workers ({rate / max(args.num_workers, 1):.0f} "
          f"per worker): JPEG decode, RandomResizedCrop to {args.img_size or 192}px, flip, normalise, mask; "
          f"{args.images} images of 500x375")


def data_rate(args, folder):
    """The real loader's images/s over --images JPEGs generated in folder (after its workers have started)."""
    rng = np.random.default_rng(0)
    for i in range(args.images):
        w, h = (500, 375) if i % 2 else (375, 500)
        noise = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)  # smooth-ish content, JPEG-sized files
        Image.fromarray(noise).resize((w, h), Image.BICUBIC).save(os.path.join(folder, f'{i}.jpg'), quality=90)
    size = args.img_size or 192
    transform = data.PretrainTransform(size, data.MaskGenerator(size, 32, 4, 0.6), data.normalization(3))
    loader = data.build_loader(data.ImageDataset(folder, transform), 16, args.num_workers, 0)
    loader.sampler.set_epoch(0)
    batches = iter(loader)
    next(batches)  # workers started
    start, count = time.perf_counter(), 0
    for (images, _), _, _ in batches:
        count += len(images)
    return count / (time.perf_counter() - start)


if __name__ == '__main__':
    args = get_args_parser().parse_args()
    if args.child:
        print(json.dumps(measure_step(args, *args.child)))
    elif args.data:
        benchmark_data(args)
    else:
        benchmark_steps(args)
