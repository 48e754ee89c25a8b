"""Benchmarks: the SimMIM training step, side by side with microsoft/SimMIM's, and the data pipeline.

    python tools/benchmark.py --model swin_base --batch-size 8 --amp bf16 off    # our training step, one row per AMP
    python tools/benchmark.py --official ../SimMIM --amp bf16 off --rounds 3     # ours and the official, ratios
    python tools/benchmark.py --impls ours ours-compile --amp bf16               # eager against torch.compile
    python tools/benchmark.py --impls ours-compile --compile-mode reduce-overhead # CUDA graphs, or another mode
    python tools/benchmark.py --data --num-workers 2                             # decoded, augmented, masked images/s
    python tools/benchmark.py --data --decode workers device                     # JPEGs decoded on the device too
    python tools/benchmark.py --data --profile                                   # where one worker's time goes

A training step is forward, backward and the optimizer on fixed random images and SimMIM masks, as each code base runs
it: ours is engine.py's Trainer.step, the official one main_simmim.py's (see training_step). Its time is the mean of
--steps consecutive steps after --warmup, with the device synchronised only around them (a step that waits for the
device pays for it). The implementations alternate round by round, since absolute times on shared machines drift: the
ratio of step times is the figure. Each measurement runs in a fresh process on a CPU (peak memory is the process's
peak RSS); on a GPU a round's measurements share one process, each with its own peak of allocated memory. On a GPU the
table adds the model FLOPs utilisation (counted FLOPs per image x images/s over the measured bf16 matrix-product rate)
and the host syncs per step that torch.cuda.set_sync_debug_mode reports. --official points at a checkout of
microsoft/SimMIM; its models/ folder is imported from there, never copied here.
"""
import argparse
import gc
import importlib.util
import multiprocessing
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the scripts, one folder up
sys.path.insert(0, ROOT)
import data  # noqa: E402
import models  # noqa: E402
import engine  # noqa: E402
import pretrain  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='swin_base', choices=list(models.MODELS))
    p.add_argument('--img-size', type=int, default=None, help='default: 192 Swin, 224 ViT')
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--amp', nargs='+', default=['bf16', 'off'], choices=['bf16', 'fp16', 'off'])
    p.add_argument('--fused', default='auto', choices=['auto', 'on', 'off'],
                   help='our scaled_dot_product_attention: auto = on GPUs only, as the scripts do')
    p.add_argument('--steps', type=int, default=5, help='timed steps; their mean is reported')
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--rounds', type=int, default=1, help='repeat every measurement, alternating implementations')
    p.add_argument('--official', default=None, metavar='PATH', help='a microsoft/SimMIM checkout to compare with')
    p.add_argument('--impls', nargs='+', choices=['ours', 'ours-compile', 'official', 'ours-model'],
                   help='default: ours, and official with --official; ours-compile = ours with torch.compile; '
                        'ours-model = our model in the official step')
    p.add_argument('--compile-mode', default='default',
                   choices=['default', 'reduce-overhead', 'max-autotune-no-cudagraphs', 'max-autotune'],
                   help="ours-compile: torch.compile's mode (reduce-overhead: CUDA graphs)")
    p.add_argument('--device', default=None, help='cuda or cpu (default: cuda when available)')
    p.add_argument('--data', action='store_true', help='benchmark the data pipeline instead')
    p.add_argument('--num-workers', type=int, default=2, help='data pipeline: loader processes')
    p.add_argument('--images', type=int, default=256, help='data pipeline: generated ImageNet-size JPEGs')
    p.add_argument('--decode', nargs='+', default=['workers'], choices=['workers', 'device'],
                   help="data pipeline: pretrain.py's --decode, one row each; device also measures the pixels' "
                        "difference from the workers'")
    p.add_argument('--data-batch', type=int, default=16, help='data pipeline: images per batch')
    p.add_argument('--profile', action='store_true',
                   help='data pipeline: time each stage in this process (and other JPEG decoders)')
    p.add_argument('--json', default=None, metavar='PATH', help='also write the results here')
    p.add_argument('--child', nargs='+', help=argparse.SUPPRESS)  # measurements impl:amp, in a child process
    return p


def official_simmim(path, name, img_size):
    """microsoft/SimMIM's SimMIM model, built from its own code with the architecture of our named model."""
    spec = importlib.util.spec_from_file_location('official_models', os.path.join(path, 'models', '__init__.py'),
                                                  submodule_search_locations=[os.path.join(path, 'models')])
    package = importlib.util.module_from_spec(spec)
    sys.modules['official_models'] = package
    spec.loader.exec_module(package)
    simmim = sys.modules['official_models.simmim']
    c = models.model_config(name, img_size=img_size)
    family, drop_path = models.MODELS[name]['family'], models.MODELS[name]['drop_path'][0]
    if family == models.VIT:
        encoder = simmim.VisionTransformerForSimMIM(
            img_size=c.img_size, patch_size=16, embed_dim=c.embed_dim, depth=c.depths[0],
            num_heads=c.num_heads[0], mlp_ratio=4, qkv_bias=True, init_values=0.1, use_abs_pos_emb=False,
            use_rel_pos_bias=False, use_shared_rel_pos_bias=True, use_mean_pooling=False, num_classes=0,
            drop_path_rate=drop_path)
        return simmim.SimMIM(encoder, 16)
    if family != models.SWIN:
        raise SystemExit("error: microsoft/SimMIM has no SwinV2; compare a swin_* or vit_* model")
    encoder = simmim.SwinTransformerForSimMIM(
        img_size=c.img_size, patch_size=4, in_chans=3, num_classes=0, embed_dim=c.embed_dim,
        depths=list(c.depths), num_heads=list(c.num_heads), window_size=c.window_size, mlp_ratio=4.,
        qkv_bias=True, qk_scale=None, drop_rate=0., drop_path_rate=drop_path, ape=False, patch_norm=True)
    return simmim.SimMIM(encoder, 32)


def training_step(args, impl, amp, device):
    """-> a function running one training step of impl on fixed random images and SimMIM masks.

    ours: engine.Trainer.step on our model (fused AdamW, clipping, non-finite steps skipped on the device);
    ours-compile: the same with the model under torch.compile (pretrain.py --compile).
    official: microsoft/SimMIM's model in main_simmim.py's step: AdamW as its build_optimizer makes it (torch's default
    implementation), clip_grad_norm_(5.0), loss.item(); native autocast + GradScaler stand in for its apex amp.
    ours-model: our model in that official step, which separates what the model code gives from what the step gives.
    """
    torch.manual_seed(0)
    official_model = impl == 'official'
    model = official_simmim(args.official, args.model, args.img_size) if official_model \
        else models.build_simmim(args.model, img_size=args.img_size)
    model.to(device).train()
    if not official_model:
        models.use_fused_attention(model, device.type == 'cuda' if args.fused == 'auto' else args.fused == 'on')
    if impl == 'ours-compile':
        model.compile(mode=args.compile_mode)
    size = model.encoder.patch_embed.img_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    patch = model.encoder.patch_embed.patch_size
    masks = data.MaskGenerator(size, 32, patch[0] if isinstance(patch, (tuple, list)) else patch, 0.6)
    x = torch.randn(args.batch_size, 3, size, size, device=device)
    mask = torch.stack([masks() for _ in range(args.batch_size)]).to(device)

    if impl.startswith('ours') and impl != 'ours-model':
        targs = pretrain.get_args_parser().parse_args(['--model', args.model, '--amp', amp, '--device', device.type,
                                                       '--compile', 'off'])
        run = engine.Run(targs)  # as the scripts: host memory kept, on a CPU denormals flushed
        recipe = engine.recipe(targs, run, pretrain.RECIPE)
        schedule = engine.Schedule(recipe, 1000)  # 1000 steps per epoch
        trainer = engine.Trainer(model, schedule, recipe, targs, run)
        return lambda i: trainer.step(i, [(x, mask)], lambda batch: model(*batch))

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
    _, amp_context = engine.autocast(amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == 'fp16')

    def official_step(i):
        with amp_context:
            loss = model(x, mask)
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        scaler.step(optimizer)
        scaler.update()
        loss.item()
    return official_step


def measure_step(args, impl, amp):
    """-> one result dict: mean step time, images/s, peak memory, and on a GPU the host syncs per step."""
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    cuda = device.type == 'cuda'
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    step = training_step(args, impl, amp, device)
    sync = torch.cuda.synchronize if cuda else lambda: None
    for i in range(args.warmup):
        step(i)
    sync()
    start = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        step(i)
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    result = dict(impl=impl, amp=amp, seconds=seconds, images_per_s=args.batch_size / seconds,
                  device=torch.cuda.get_device_name() if cuda else 'cpu')
    if cuda:
        result['peak_gb'] = torch.cuda.max_memory_allocated() / 2 ** 30
        result['syncs_per_step'] = sum(host_syncs(lambda: [step(0) for _ in range(4)]).values()) / 4
    else:
        result['peak_gb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    return result


def host_syncs(fn):
    """The times fn() made the host wait for the GPU, as torch.cuda.set_sync_debug_mode reports them, by the line of
    the scripts (or of the official code) that made each wait: {'file:line code': count}. {} without a GPU."""
    if not torch.cuda.is_available():
        fn()
        return {}
    sites, active = {}, False

    def record(message, *_, **__):
        if active and 'synchroniz' in str(message):  # not what switching the mode on reports
            frames = [f for f in traceback.extract_stack()[:-1] if f.filename.startswith(ROOT)
                      and not f.filename.startswith(os.path.join(ROOT, 'tools'))]
            where = f"{os.path.relpath(frames[-1].filename, ROOT)}:{frames[-1].lineno} {frames[-1].line}" \
                if frames else '?'
            sites[where] = sites.get(where, 0) + 1

    with warnings.catch_warnings():
        warnings.simplefilter('always')
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode('warn')
        try:
            active = True
            fn()
        finally:
            active = False
            torch.cuda.set_sync_debug_mode('default')
    return sites


def flops_per_image(args):
    """Forward and backward FLOPs of one image through our model, as torch's FlopCounterMode counts them."""
    model = models.build_simmim(args.model, img_size=args.img_size)
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
    if any(i in ('official', 'ours-model') for i in impls) and not args.official:
        raise SystemExit("error: the official step needs --official PATH, a checkout of microsoft/SimMIM")
    cuda = (args.device or ('cuda' if torch.cuda.is_available() else 'cpu')).startswith('cuda')
    results = []
    for _ in range(args.rounds):
        measurements = [f'{impl}:{amp}' for amp in args.amp for impl in impls]
        for group in [measurements] if cuda else [[m] for m in measurements]:  # CPU: a process each (peak RSS)
            child = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], '--child', *group]
            out = subprocess.run(child, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(out.stderr[-3000:])
            results += [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{')]
    flops = flops_per_image(args)
    peak = bf16_matmul_peak() if cuda else None
    print(f"{args.model}, {args.img_size or 'default'} px, batch {args.batch_size}, training step (forward, backward, "
          f"optimizer), mean of {args.steps} after {args.warmup} warm-up, {args.rounds} round(s), "
          f"{results[0]['device']}, our fused attention: {args.fused}, compile mode {args.compile_mode}; "
          f"{flops / 1e9:.2f} GFLOPs per image (forward + "
          f"backward, counted)" + (f"; bf16 matmul peak measured {peak / 1e12:.0f} TFLOP/s" if cuda else ''))
    print('| implementation | amp | step s | images/s | peak GB | vs official fp32 | vs official, same amp |'
          + (' MFU | host syncs per step |' if cuda else ''))
    print('| --- | --- | ---: | ---: | ---: | ---: | ---: |' + (' ---: | ---: |' if cuda else ''))
    summary = {}
    for r in results:
        summary.setdefault((r['impl'], r['amp']), []).append(r)
    base = summary.get(('official', 'off'))
    rows = []
    for (impl, amp), rs in summary.items():
        s = statistics.median(r['seconds'] for r in rs)
        row = dict(impl=impl, amp=amp, seconds=s, images_per_s=args.batch_size / s,
                   peak_gb=max(r['peak_gb'] for r in rs), rounds=[r['seconds'] for r in rs])
        same = summary.get(('official', amp))
        ratio = lambda ref: statistics.median(r['seconds'] for r in ref) / s if ref else None
        row.update(vs_official_fp32=ratio(base), vs_official=ratio(same))
        if cuda:
            row.update(mfu=row['images_per_s'] * flops / peak, syncs_per_step=max(r['syncs_per_step'] for r in rs))
        rows.append(row)
        shown = lambda v: f"{v:.2f}x" if v else '-'
        print(f"| {impl} | {amp} | {s:.3f} | {row['images_per_s']:.2f} | {row['peak_gb']:.2f} | "
              f"{shown(row['vs_official_fp32'])} | {shown(row['vs_official'])} |"
              + (f" {row['mfu']:.1%} | {row['syncs_per_step']:g} |" if cuda else ''))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(model=args.model, batch_size=args.batch_size, device=results[0]['device'], flops=flops,
                           bf16_peak=peak, rows=rows), f, indent=1)


def benchmark_data(args):
    """Decoded, augmented and masked images/s through the real loader onto the device, on generated ImageNet-size
    JPEGs; for --decode device also how far its pixels are from the workers'."""
    engine.keep_freed_memory()  # as the scripts' runs: the workers inherit it
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    results = dict(num_workers=args.num_workers, images=args.images, batch=args.data_batch, device=str(device))
    with tempfile.TemporaryDirectory(prefix='simmim_data_') as folder:
        write_jpegs(folder, args.images)
        if args.profile:
            return profile_data(args, folder)
        for decode in args.decode:
            rate = data_rate(args, folder, decode, device)
            results[f'images_per_s_{decode}'] = rate
            print(f"data pipeline, --decode {decode}: {rate:.0f} images/s with {args.num_workers} workers "
                  f"({rate / max(args.num_workers, 1):.0f} per worker) onto {device}: JPEG decode, RandomResizedCrop "
                  f"to {args.img_size or 192}px, flip, normalise, mask; {args.images} images of 500x375, batch "
                  f"{args.data_batch}", flush=True)
        if 'device' in args.decode:
            results['difference'] = decode_difference(args, folder, device)
            print("--decode device against workers, same crops, in 0-255 levels: largest {max:.2f}, mean {mean:.3f}, "
                  "{differing:.1%} of values differ by over 0.5".format(**results['difference']))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f)


def write_jpeg(path_index):
    path, i = path_index
    rng = np.random.default_rng(i)
    w, h = (500, 375) if i % 2 else (375, 500)
    noise = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)  # smooth-ish content, JPEG-sized files
    Image.fromarray(noise).resize((w, h), Image.BICUBIC).save(path, quality=90)


def write_jpegs(folder, n, classes=()):
    """n ImageNet-size JPEGs (500x375 and 375x500) in folder, or spread over its subfolders `classes`."""
    paths = [os.path.join(folder, classes[i % len(classes)] if classes else '', f'{i}.jpg') for i in range(n)]
    for c in classes or ['']:
        os.makedirs(os.path.join(folder, c), exist_ok=True)
    with multiprocessing.Pool(min(os.cpu_count() or 1, 16)) as pool:
        pool.map(write_jpeg, [(p, i) for i, p in enumerate(paths)], chunksize=16)


def pipeline(args, folder, decode):
    """pretrain.py's dataset for --decode decode over folder, and its normalisation."""
    size = args.img_size or 192
    config = models.model_config()
    normalize = data.ToNormalizedTensor(config.mean, config.std)
    transform = data.PretrainTransform(size, data.MaskGenerator(size, 32, 4, 0.6), normalize)
    return data.ImageDataset(folder, transform, encoded=decode == 'device'), normalize


def data_rate(args, folder, decode, device):
    """The real loader's images/s over the JPEGs in folder onto device (after its workers have started), as
    pretrain.py's loss_fn takes them."""
    dataset, normalize = pipeline(args, folder, decode)
    loader = data.build_loader(dataset, args.data_batch, args.num_workers, 0)
    to_device = data.batch_to_device(dataset, args.img_size or 192, normalize, device)
    loader.sampler.set_epoch(0)
    batches = iter(loader)
    (images, _), _, skipped = next(batches)
    to_device(images, skipped)  # workers started, the decoder made
    synchronize(device)
    start, count = time.perf_counter(), 0
    for (images, _), _, skipped in batches:
        count += len(to_device(images, skipped))
    synchronize(device)
    return count / (time.perf_counter() - start)


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def decode_difference(args, folder, device, n=128):
    """--decode device's pixels against the workers' (PIL's) for the same draws (crop, flip, mask) of up to n images:
    -> dict(max, mean, differing) in 0-255 levels, differing the share of values over 0.5 apart."""
    (workers, normalize), (encoded, _) = pipeline(args, folder, 'workers'), pipeline(args, folder, 'device')
    keys = [(i, i) for i in range(min(n, len(workers)))]
    today = torch.stack([workers[k][0][0] for k in keys])
    (images, _), _, skipped = data.collate_crops([encoded[k] for k in keys])
    decoded = data.DeviceDecoder(args.img_size or 192, normalize, device)(images, skipped).cpu()
    gap = (today - decoded).abs() * torch.tensor(normalize.std).view(1, -1, 1, 1) * 255
    return dict(max=gap.max().item(), mean=gap.mean().item(), differing=(gap > 0.5).float().mean().item())


def profile_data(args, folder, batch=128):
    """Milliseconds per image of each stage of the pretraining pipeline, in this process (one
    loader worker's work), and of other JPEG decoders that a faster pipeline could use; what a
    GPU pipeline moves off the CPU is the decode and crop rows (--decode device: the last row is its worker's)."""
    from torchvision.io import decode_jpeg, read_file
    size = args.img_size or 192
    config = models.model_config()
    normalize = data.ToNormalizedTensor(config.mean, config.std)
    transform = data.PretrainTransform(size, data.MaskGenerator(size, 32, 4, 0.6), normalize)
    crop, flip = transform.transform.transforms[:2]
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder))
    times = {k: 0. for k in ('decode (PIL, data.load_image)', 'RandomResizedCrop (PIL, bilinear)',
                             'flip', 'to tensor, normalise', 'mask', f'collate (batch {batch})',
                             'alt: read + torchvision decode_jpeg (CPU)',
                             "alt: --decode device's worker (read, header, draws, mask)")}
    names = list(times)
    samples = []
    for path in paths:
        stages = [lambda: data.load_image(path), crop, flip, normalize]
        x = None
        for name, stage in zip(names, stages):
            t = time.perf_counter()
            x = stage() if x is None else stage(x)
            times[name] += time.perf_counter() - t
        t = time.perf_counter()
        mask = transform.mask_generator()
        times[names[4]] += time.perf_counter() - t
        samples.append((x, mask))
        t = time.perf_counter()
        decode_jpeg(read_file(path))
        times[names[6]] += time.perf_counter() - t
        t = time.perf_counter()
        transform(data.read_jpeg(path))
        times[names[7]] += time.perf_counter() - t
    reps = max(1, batch // len(samples) + 1)
    t = time.perf_counter()
    torch.utils.data.default_collate((samples * reps)[:batch])
    times[names[5]] = (time.perf_counter() - t) * len(paths) / batch
    total = sum(times[k] for k in names[:6])
    print(f"| stage, {size}px from {len(paths)} JPEGs of 500x375 | ms per image | share |")
    print("| --- | ---: | ---: |")
    for name in names:
        share = f"{100 * times[name] / total:.0f}%" if name in names[:6] else '-'
        print(f"| {name} | {1000 * times[name] / len(paths):.2f} | {share} |")
    print(f"| one worker, all stages | {1000 * total / len(paths):.2f} | {len(paths) / total:.0f} images/s |")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({k: 1000 * v / len(paths) for k, v in times.items()}, f)


if __name__ == '__main__':
    args = get_args_parser().parse_args()
    if args.child:
        for measurement in args.child:
            print(json.dumps(measure_step(args, *measurement.split(':'))), flush=True)
    elif args.data:
        benchmark_data(args)
    else:
        benchmark_steps(args)
