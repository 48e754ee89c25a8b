"""The GPU check: the training commands run on one GPU, and how fast. One PASS or FAIL line per item.

    python tools/gpu_check.py --official ../SimMIM --out gpu_check_out       # one GPU, about 8 minutes
    python tools/gpu_check.py --smoke --out /tmp/smoke                        # the same items, tiny, on a CPU

Items, each in its own process with a time limit (its log is OUT/<item>.log):
  pretrain_bf16, pretrain_fp16  torchrun pretrain.py --model swin_base on generated ImageNet-size JPEGs, SIGTERM to the
                                whole process group mid-epoch (as schedulers send it), the same command again: resumed
                                mid-epoch and finished, losses finite and falling, exit within 10 s of the last
                                checkpoint. bf16 runs the GPU default (torch.compile), fp16 the eager fallback
                                (--compile off) with --decode device
  finetune                      finetune.py from that checkpoint, then --eval and --predict with the result
  attention                     our fused attention against the explicit one, forward and gradients, fp32 and bf16,
                                Swin, SwinV2 and ViT
  host_syncs                    pretraining epochs under torch.cuda.set_sync_debug_mode, single process and torchrun's
                                one-process group (NCCL): host waits per step outside the log lines
  benchmark_swin, benchmark_vit benchmark.py: Swin-B 192px and ViT-B 224px, batch 128, bf16 and fp16, ours against the
                                official model and step, alternated, 2 rounds (needs --official)
  data                          the loader with 16 workers on ImageNet-size JPEGs onto the GPU, --decode workers and
                                device, against the training step's images/s, device's pixels against the workers';
                                and benchmark.py --data --profile: one worker's milliseconds per stage
  compile_swin, compile_vit     benchmark.py: ours eager against ours under torch.compile (the GPU default), bf16
  levers (only with --items)    Swin-B compiled with CUDA graphs (--compile-mode reduce-overhead), and at batch 256
  compile_fp16 (only with --items) as compile_swin, in fp16 (GradScaler)

The first run (H200, 2026-11-28) took 508 s, before pretrain_bf16 compiled; compiling adds an estimated two minutes.
--budget ends the run in time: items past it are reported as not run, and --items runs them.
"""
import argparse
import glob
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]  # the scripts, and benchmark.py beside this file

ITEMS = ('pretrain_bf16', 'pretrain_fp16', 'finetune', 'attention', 'host_syncs', 'benchmark_swin', 'benchmark_vit',
         'data', 'compile_swin', 'compile_vit')
OPTIONAL = ('levers', 'compile_fp16')  # run only when named in --items
LIMITS = dict(pretrain_bf16=220, pretrain_fp16=80, finetune=60, attention=40, host_syncs=45, benchmark_swin=100,
              benchmark_vit=100, data=60, compile_swin=180, compile_vit=120, levers=240,
              compile_fp16=180)  # seconds on an H100 / H200


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default='gpu_check_out', help='folder for the logs, data and checkpoints')
    p.add_argument('--official', default=None, help='a microsoft/SimMIM checkout (the benchmark item needs it)')
    p.add_argument('--items', nargs='+', default=list(ITEMS), choices=ITEMS + OPTIONAL)
    p.add_argument('--budget', type=float, default=560, help='seconds for all items: each gets what is left')
    p.add_argument('--smoke', action='store_true', help='tiny models and data on the CPU: checks this script itself')
    p.add_argument('--item', default=None, help=argparse.SUPPRESS)  # run one item in this process
    return p


# ---------------------------------------------------------------------------------------------------------------------
# Sizes: the real ones on a GPU, tiny ones for --smoke

def sizes(smoke):
    if smoke:
        arch = ['--model', 'swin_tiny', '--img-size', '64', '--mask-patch-size', '16', '--embed-dim', '16',
                '--depths', '1', '1', '2', '1', '--num-heads', '1', '1', '1', '1']
        return dict(arch=arch, batch=8, images=96, workers=2, epochs=3, lr=['--base-lr', '0.05'], bench_batch=2,
                    bench_steps=2, data_images=64, swin=('swin_tiny', ['--img-size', '64']),
                    vit=('vit_small', ['--img-size', '64']), device=['--device', 'cpu'])
    return dict(arch=['--model', 'swin_base'], batch=128, images=4096, workers=16, epochs=3, lr=[], bench_batch=128,
                bench_steps=10, data_images=8192, swin=('swin_base', []), vit=('vit_base', []), device=[])


def torchrun(script, *args):
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '1',
            os.path.join(ROOT, script), *args]


def python(script, *args):
    return [sys.executable, os.path.join(ROOT, script), *args]


def read_log(folder):
    with open(os.path.join(folder, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------------------------------
# Items: each prints what it saw and returns (passed, one-line summary)

def pretrain_item(cfg, out, amp):
    """SIGTERM to the process group mid-epoch, the same command again: resumed and finished."""
    output = os.path.join(out, f'pretrain_{amp}')
    cmd = torchrun('pretrain.py', *cfg['arch'], '--data-path', os.path.join(out, 'images'), '--batch-size',
                   str(cfg['batch']), '--num-workers', str(cfg['workers']), '--epochs', str(cfg['epochs']),
                   '--warmup-epochs', '1', '--print-freq', '5', '--amp', amp, '--output', output, *cfg['lr'],
                   *(['--compile', 'off', '--decode', 'device'] if amp == 'fp16' else []), *cfg['device'])
    print(' '.join(cmd), flush=True)
    steps = cfg['images'] // cfg['batch']
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    signalled, first = None, []
    for line in proc.stdout:
        first.append(line)
        print(line, end='', flush=True)
        if signalled is None and re.search(rf'epoch 1/{cfg["epochs"]} step 5/', line):
            signalled = time.time()
            os.killpg(proc.pid, signal.SIGTERM)  # torchrun, the rank and its loader workers, as a scheduler does
    proc.wait()
    stopped = re.search(r'SIGTERM: stopped after (step (\d+) of epoch 1|epoch 1);', ''.join(first))
    expected = None if not stopped else f'at epoch 1 step {stopped.group(2)}' if stopped.group(2) else 'at epoch 2'
    resumed = subprocess.run(cmd, capture_output=True, text=True)
    exit_gap = time.time() - os.path.getmtime(os.path.join(output, 'checkpoint.pth'))  # torchrun's exit
    print(resumed.stdout + resumed.stderr[-3000:], flush=True)
    at = re.search(r'resumed from \S+ (at epoch \d+(?: step \d+)?)', resumed.stdout)
    log = read_log(output)
    steps_logged = [r for r in log if 'step' in r]
    losses = [r['loss'] for r in steps_logged]
    epochs = [r['epoch_loss'] for r in log if 'epoch_loss' in r]
    last = steps_logged[-3:]  # steady state: the last log lines of the resumed run
    images_per_s = sum(r['images_per_s'] for r in last) / len(last)
    data_share = sum(r['data_s'] for r in last) / sum(cfg['batch'] / r['images_per_s'] for r in last)
    ok = (stopped is not None and at is not None and at.group(1) == expected and resumed.returncode == 0
          and 'done:' in resumed.stdout and all(map(math.isfinite, losses)) and len(epochs) == cfg['epochs']
          and epochs[-1] < epochs[0] and os.path.exists(os.path.join(output, 'reconstruction_end.png'))
          and exit_gap <= 10)
    return ok, (f"SIGTERM at epoch 1 step 5, stopped after {stopped.group(1) if stopped else '?'}, resumed "
                f"{at.group(1) if at else '?'} (of {steps} steps per epoch), finished (exit {resumed.returncode} "
                f"{exit_gap:.1f} s after the last checkpoint, at most 10); "
                f"epoch losses "
                f"{' '.join(map('{:.4f}'.format, epochs))}; "
                f"{images_per_s:.0f} images/s, data wait {data_share:.1%} of the step, peak "
                f"{max(r['peak_mem_gb'] for r in steps_logged):.1f} GB; nonfinite steps "
                f"{steps_logged[-1]['nonfinite_steps']}")


def finetune_item(cfg, out):
    ckpt = os.path.join(out, 'pretrain_bf16', 'checkpoint.pth')
    data_path, output = os.path.join(out, 'classes'), os.path.join(out, 'finetune')
    small = ['--img-size', '64', '--window-size', '2'] if cfg['device'] else []
    train = subprocess.run(torchrun('finetune.py', '--pretrained', ckpt, '--data-path', data_path, *small,
                                    '--batch-size', '32', '--num-workers', '8', '--epochs', '2', '--warmup-epochs',
                                    '1', '--print-freq', '2', '--output', output, *cfg['device']),
                           capture_output=True, text=True)
    print(train.stdout + train.stderr[-3000:], flush=True)
    evaluate = subprocess.run(python('finetune.py', '--eval', '--resume', os.path.join(output, 'checkpoint.pth'),
                                     '--data-path', data_path, '--num-workers', '4', *cfg['device']),
                              capture_output=True, text=True)
    print(evaluate.stdout + evaluate.stderr[-3000:], flush=True)
    image = sorted(glob.glob(os.path.join(data_path, 'val', 'cat', '*.jpg')))[0]
    predict = subprocess.run(python('finetune.py', '--predict', image, '--resume', os.path.join(output, 'best.pth'),
                                    *cfg['device']), capture_output=True, text=True)
    print(predict.stdout + predict.stderr[-3000:], flush=True)
    top1 = re.search(r'top-1 ([\d.]+)% (?:top-5 [\d.]+% )?loss ([\d.]+) on (\d+) images', evaluate.stdout)
    guess = re.search(rf'{re.escape(image)}: (\w+) ([\d.]+)%, (\w+) ([\d.]+)%', predict.stdout)
    ok = (train.returncode == evaluate.returncode == predict.returncode == 0 and 'done:' in train.stdout
          and top1 is not None and int(top1.group(3)) == 64 and guess is not None)
    return ok, (f"fine-tuned 2 epochs (exit {train.returncode}); --eval: "
                f"{top1.group(0) if top1 else 'no result'}; --predict: {guess.group(0) if guess else 'no result'}")


def attention_item(cfg):
    """Fused attention against the explicit path: the same model and inputs, forward loss and every gradient."""
    import torch
    import data
    import models
    device = torch.device('cpu' if cfg['device'] else 'cuda')
    names = [('swin_tiny', 64), ('swinv2_tiny', 64), ('vit_small', 64)] if cfg['device'] else \
        [('swin_base', 192), ('swinv2_base', 192), ('vit_base', 224)]
    lines, ok = [], True
    for name, size in names:
        torch.manual_seed(0)
        model = models.build_simmim(name, img_size=size, drop_path_rate=0.).to(device)
        patch = model.patch_size
        masks = data.MaskGenerator(size, 32 if size % 32 == 0 else 16, patch, 0.6)
        x = torch.randn(8, 3, size, size, device=device)
        mask = torch.stack([masks() for _ in range(8)]).to(device)

        def run(fused, dtype):
            models.use_fused_attention(model, fused)
            model.zero_grad()
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = model(x, mask)
            loss.backward()
            return loss.detach().double(), torch.cat([p.grad.flatten().double() for p in model.parameters()])

        reference = run(False, None)
        rel = lambda a, b: float((a - b).norm() / b.norm())
        row = []
        for label, dtype in (('fp32', None), ('bf16', torch.bfloat16)):
            fused, explicit = run(True, dtype), run(False, dtype)
            fused_err = (rel(fused[0], reference[0]), rel(fused[1], reference[1]))
            explicit_err = (rel(explicit[0], reference[0]), rel(explicit[1], reference[1]))
            if dtype is None:  # float32: the same function; SDPA's memory-efficient kernel multiplies in TF32 on GPUs
                good = fused_err[0] < 1e-5 and fused_err[1] < 2e-3
            else:  # both in bf16: fused as close to float32 as the explicit path (bf16 tolerance)
                good = fused_err[1] < max(2 * explicit_err[1], 1e-3) and fused_err[1] < 5e-2
            ok &= good
            row.append(f"{label} loss {fused_err[0]:.1e} grads {fused_err[1]:.1e}"
                       + (f" (explicit bf16: {explicit_err[0]:.1e}, {explicit_err[1]:.1e})" if dtype else '')
                       + ('' if good else ' TOO FAR'))
        lines.append(f"{name}: " + '; '.join(row))
    print('\n'.join(lines))
    return ok, 'fused vs explicit, relative error against explicit fp32 -- ' + ' | '.join(lines)


def host_syncs_item(cfg, out):
    """Pretraining epochs under sync debug mode: every host wait is recorded with the line of ours that caused it.
    Waits that happen once per log line or per epoch are allowed; any that happens every step fails."""
    import benchmark
    import data
    import engine
    import models
    import pretrain
    results = []
    for distributed in (False, True):
        if distributed:
            os.environ.update(RANK='0', WORLD_SIZE='1', LOCAL_RANK='0', MASTER_ADDR='127.0.0.1', MASTER_PORT='29533')
        args = pretrain.get_args_parser().parse_args(
            [*cfg['arch'], '--data-path', os.path.join(out, 'images'), '--batch-size', str(cfg['batch'] // 2),
             '--num-workers', str(cfg['workers']), '--epochs', '1', '--print-freq', '1000', *cfg['device'],
             '--output', os.path.join(out, f'syncs_{distributed}'), '--compile', 'off'])
        os.makedirs(args.output, exist_ok=True)
        run = engine.Run(args)
        try:  # pretrain.py's settings, model, data and step, from the functions it uses
            config, recipe, _, _ = pretrain.settings(args, run, resume=False)
            model = models.build_simmim(config).to(run.device)
            models.use_fused_attention(model, run.device.type == 'cuda')
            masks = pretrain.masking(config, recipe, run)
            normalize = data.ToNormalizedTensor(config.mean, config.std)
            transform = data.PretrainTransform(config.img_size, masks, normalize)
            loader = data.build_loader(data.ImageDataset(recipe['data_path'], transform), args.batch_size,
                                       args.num_workers, recipe['seed'], run.world_size, run.rank)
            steps = 12
            schedule = engine.Schedule(recipe, 3, run.world_size)  # warm-up: 3 steps
            trainer = engine.Trainer(model, schedule, recipe, args, run)

            def loss_fn(batch):
                (images, m), _, _ = batch
                return trainer.wrapped(images.to(run.device, non_blocking=True), m.to(run.device, non_blocking=True))

            args.print_freq = 3
            engine.train_one_epoch(trainer, loader, loss_fn, 0, lambda e, s: {})
            args.print_freq = steps  # one log line, at the end
            trainer.schedule = engine.Schedule(recipe, steps, run.world_size)
            sites = benchmark.host_syncs(  # on a CPU: {}, the code path alone
                lambda: engine.train_one_epoch(trainer, loader, loss_fn, 1, lambda e, s: {}))
            per_step = {k: v for k, v in sites.items() if v >= steps}
            label = ('torchrun one-process group' + (' (gloo)' if cfg['device'] else ' (NCCL)')) if distributed \
                else 'single process'
            print(f"{label}: {steps} steps, host waits by line: {json.dumps(sites, indent=1)}")
            results.append((label, sum(sites.values()), per_step))
        finally:
            run.close()
    ok = all(not per_step for _, _, per_step in results)
    return ok, '; '.join(f"{label}: {n} host waits in 12 steps and one log line"
                         + (f", every step: {list(per_step)}" if per_step else ', none per step')
                         for label, n, per_step in results)


def benchmark_item(cfg, out, model, official, impls, amps, rounds, tag, batch=None, mode='default'):
    rows = []
    for name, extra in [model]:
        path = os.path.join(out, f'{tag}_{name}.json')
        cmd = python('tools/benchmark.py', '--model', name, *extra, '--batch-size', str(batch or cfg['bench_batch']),
                     '--compile-mode', mode, '--amp',
                     *amps, '--impls', *impls, '--rounds', str(rounds), '--steps', str(cfg['bench_steps']),
                     '--warmup', '5' if tag == 'benchmark' else '8', '--json', path, *cfg['device'],
                     *(['--official', official] if official else []))
        print(' '.join(cmd), flush=True)
        result = subprocess.run(cmd, capture_output=True, text=True)
        print(result.stdout + result.stderr[-3000:], flush=True)
        if result.returncode:
            return False, f"{name}: benchmark.py failed (exit {result.returncode})"
        with open(path) as f:
            rows.append(json.load(f))
    summary = []
    for r in rows:
        for row in r['rows']:
            summary.append(f"{r['model']} {row['impl']} {row['amp']} {row['images_per_s']:.0f} img/s "
                           f"{row['peak_gb']:.1f} GB" + (f" {row['mfu']:.0%} MFU" if row.get('mfu') else '')
                           + (f" {row['vs_official']:.2f}x official" if row.get('vs_official') else '')
                           + (f" {row['syncs_per_step']:g} syncs/step" if 'syncs_per_step' in row else ''))
    return True, '; '.join(summary)


def data_item(cfg, out):
    path = os.path.join(out, 'data.json')
    result = subprocess.run(python('tools/benchmark.py', '--data', '--decode', 'workers', 'device', '--num-workers',
                                   str(cfg['workers']), '--images', str(cfg['data_images']), '--data-batch',
                                   str(cfg['batch']), '--json', path, *cfg['device']), capture_output=True, text=True)
    print(result.stdout + result.stderr[-3000:], flush=True)
    if result.returncode:
        return False, f"benchmark.py --data failed (exit {result.returncode})"
    profile = subprocess.run(python('tools/benchmark.py', '--data', '--profile', '--images',  # where it goes
                                    str(min(cfg['data_images'], 256))), capture_output=True, text=True)
    print(profile.stdout + profile.stderr[-2000:], flush=True)
    return True, pipeline_summary(cfg, out)


def pipeline_summary(cfg, out):
    """The loader's images/s (data.json) for each --decode, against the fastest training step measured so far (ours,
    benchmark and compile items), and --decode device's pixel difference."""
    found = json.load(open(os.path.join(out, 'data.json')))
    benchmarks = [f for f in glob.glob(os.path.join(out, '*.json')) if re.search(r'(benchmark|compile|levers)_', f)]
    steps = [row for f in benchmarks for row in json.load(open(f))['rows'] if row['impl'].startswith('ours')]
    need = max(steps, key=lambda row: row['images_per_s'], default=None)
    rates = []
    for decode in ('workers', 'device'):
        rate = found[f'images_per_s_{decode}']
        rates.append(f"--decode {decode} {rate:.0f} images/s" + (f" ({rate / need['images_per_s']:.2f}x the step)"
                                                                  if need else ''))
    step = f"{need['images_per_s']:.0f} images/s of {need['impl']} {need['amp']}" if need else 'not measured'
    gap = found['difference']
    return (f"{', '.join(rates)} with {cfg['workers']} workers, batch {cfg['batch']}; the fastest step {step}; "
            f"device pixels vs workers': largest {gap['max']:.2f} of 255, {gap['differing']:.1%} differ")


def run_item(name, cfg, args):
    out = args.out
    if name.startswith('pretrain_'):
        return pretrain_item(cfg, out, name.split('_')[1])
    if name == 'finetune':
        return finetune_item(cfg, out)
    if name == 'attention':
        return attention_item(cfg)
    if name == 'host_syncs':
        return host_syncs_item(cfg, out)
    if name.startswith('benchmark_'):
        if not args.official:
            return False, 'needs --official PATH, a microsoft/SimMIM checkout'
        return benchmark_item(cfg, out, cfg[name.split('_')[1]], args.official, ['ours', 'official'], ['bf16', 'fp16'],
                              2, 'benchmark')
    if name == 'data':
        return data_item(cfg, out)
    if name == 'compile_fp16':
        return benchmark_item(cfg, out, cfg['swin'], None, ['ours', 'ours-compile'], ['fp16'], 1, 'compile_fp16')
    if name.startswith('compile_'):
        return benchmark_item(cfg, out, cfg[name.split('_')[1]], None, ['ours', 'ours-compile'], ['bf16'], 1,
                              'compile')
    if name == 'levers':  # CUDA graphs at batch 128, the default mode at twice the batch
        graphs = benchmark_item(cfg, out, cfg['swin'], None, ['ours-compile'], ['bf16'], 1, 'levers_graphs',
                                mode='reduce-overhead')
        larger = benchmark_item(cfg, out, cfg['swin'], None, ['ours-compile'], ['bf16'], 1, 'levers_batch',
                                batch=2 * cfg['bench_batch'])
        return graphs[0] and larger[0], f"reduce-overhead: {graphs[1]}; batch x2: {larger[1]}"


# ---------------------------------------------------------------------------------------------------------------------

def prepare(cfg, out):
    """Generated ImageNet-size JPEGs: a folder for pretraining, and two classes in train/ and val/ for fine-tuning."""
    import benchmark
    if not os.path.isdir(os.path.join(out, 'images')):
        benchmark.write_jpegs(os.path.join(out, 'images'), cfg['images'])
    for split, n in (('train', 128), ('val', 64)):
        if not os.path.isdir(os.path.join(out, 'classes', split)):
            benchmark.write_jpegs(os.path.join(out, 'classes', split), n, classes=('cat', 'dog'))


def kill_leftovers():
    """End every process an item left behind (torchrun runs in a session of its own), found by the variable that all
    of them inherit: the next item gets the GPU to itself."""
    marker = f'GPU_CHECK_RUN={os.getpid()}'.encode()
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            if marker in open(f'/proc/{pid}/environ', 'rb').read().split(b'\0'):
                os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass


def main(args):
    cfg = sizes(args.smoke)
    if args.official:
        args.official = os.path.abspath(args.official)
    if args.item:
        ok, summary = run_item(args.item, cfg, args)
        print(f"RESULT {json.dumps([ok, summary])}")
        return
    os.makedirs(args.out, exist_ok=True)
    os.environ['GPU_CHECK_RUN'] = str(os.getpid())  # inherited by every process of every item
    started = time.time()
    prepare(cfg, args.out)
    print(f"prepared data in {time.time() - started:.0f} s", flush=True)
    results = {}
    for name in args.items:
        t = time.time()
        log = os.path.join(args.out, f'{name}.log')
        limit = min(LIMITS[name] * (4 if args.smoke else 1), args.budget - (time.time() - started))
        if limit < 10:
            results[name] = dict(ok=False, summary='not run: the time budget is spent', seconds=0)
            print(f"FAIL {name}: not run, the time budget (--budget {args.budget:g} s) is spent", flush=True)
            continue
        timed_out = False
        with open(log, 'w') as f:
            try:
                subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:], '--item', name], stdout=f,
                               stderr=subprocess.STDOUT, timeout=limit, start_new_session=True)
            except subprocess.TimeoutExpired:
                timed_out = True
        kill_leftovers()
        text = open(log).read()
        found = re.findall(r'^RESULT (.*)$', text, re.M)
        why = f'stopped at its limit of {limit:.0f} s' if timed_out else 'it failed'
        ok, summary = json.loads(found[-1]) if found else (False, f"no result ({why}); see {log}")
        if not found:
            tail = [ln for ln in text.splitlines() if ln.strip()][-3:]
            summary += ': ' + ' / '.join(tail)[-600:]
        results[name] = dict(ok=ok, summary=summary, seconds=round(time.time() - t))
        print(f"{'PASS' if ok else 'FAIL'} {name} ({time.time() - t:.0f} s): {summary}", flush=True)
    with open(os.path.join(args.out, 'results.json'), 'w') as f:
        json.dump(results, f, indent=1)
    if results.get('data', {}).get('ok'):  # against the compiled steps measured after it too
        print(f"data, against every step measured: {pipeline_summary(cfg, args.out)}")
    print(f"{sum(r['ok'] for r in results.values())} passed, {sum(not r['ok'] for r in results.values())} failed "
          f"in {time.time() - started:.0f} s")


if __name__ == '__main__':
    main(get_args_parser().parse_args())
